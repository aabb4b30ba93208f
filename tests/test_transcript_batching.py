"""The writer's flush policy, with an explicit clock: full batches and old batches flush."""

from __future__ import annotations

import pytest

from parley.transcript.batching import BatchPolicy, PendingBatch


def test_empty_batch_never_flushes():
    batch: PendingBatch[int] = PendingBatch(BatchPolicy(max_size=3, max_delay_s=0.05))
    assert not batch.should_flush(1000.0)
    assert batch.time_until_flush(1000.0) is None
    assert batch.room() == 3


def test_flushes_when_full():
    batch: PendingBatch[int] = PendingBatch(BatchPolicy(max_size=3, max_delay_s=10))
    for i in range(2):
        batch.add(i, now=0.0)
    assert not batch.should_flush(0.0)
    assert batch.room() == 1
    batch.add(2, now=0.0)
    assert batch.should_flush(0.0)
    assert batch.time_until_flush(0.0) == 0.0
    assert batch.room() == 0


def test_flushes_when_oldest_item_is_old_enough():
    batch: PendingBatch[str] = PendingBatch(BatchPolicy(max_size=500, max_delay_s=0.05))
    batch.add("a", now=10.0)
    batch.add("b", now=10.04)  # a younger item does not reset the clock
    assert not batch.should_flush(10.049)
    assert batch.time_until_flush(10.02) == pytest.approx(0.03)
    assert batch.should_flush(10.05)
    assert batch.time_until_flush(11.0) == 0.0


def test_take_empties_and_restarts_the_clock():
    batch: PendingBatch[int] = PendingBatch(BatchPolicy(max_size=2, max_delay_s=0.05))
    batch.add(1, now=0.0)
    batch.add(2, now=0.01)
    assert batch.take() == [1, 2]
    assert len(batch) == 0 and not batch.should_flush(100.0)
    batch.add(3, now=5.0)
    assert not batch.should_flush(5.01) and batch.should_flush(5.0625)


def test_zero_delay_flushes_every_fetch():
    batch: PendingBatch[int] = PendingBatch(BatchPolicy(max_size=100, max_delay_s=0))
    batch.add(1, now=1.0)
    assert batch.should_flush(1.0)


@pytest.mark.parametrize("size,delay", [(0, 0.05), (10, -1)])
def test_rejects_nonsense_policies(size, delay):
    with pytest.raises(ValueError):
        BatchPolicy(max_size=size, max_delay_s=delay)
