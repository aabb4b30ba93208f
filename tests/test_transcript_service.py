"""The transcript writer against a real nats-server and real SQLite files.

The CONV stream and the durable ``transcript`` consumer are shared by the whole test session,
so a writer here also stores other tests' events: every assertion looks at this test's tenant.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Awaitable, Callable

import orjson
import pytest

from parley.core import bus, subjects
from parley.core.errors import ConfigError
from parley.transcript.batching import BatchPolicy
from parley.transcript.consumer import DEADLETTER_SUBJECT, ensure_consumer
from parley.transcript.service import TranscriptService, WriterTuning
from parley.transcript.sqlite_store import SqliteStore
from parley.transcript.storage import TranscriptRow


async def wait_for(condition: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0, what: str = ""):
    """Poll every 20 ms until ``condition`` holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what or condition}")
        await asyncio.sleep(0.02)


async def get_transcript(nc, tenant: str, conv: str) -> dict:
    reply = await nc.request(subjects.TRANSCRIPT_GET, orjson.dumps({"tenant": tenant, "conv": conv}), timeout=2)
    return orjson.loads(reply.data)


def transcript_has(nc, tenant: str, conv: str, last_seq: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        reply = await get_transcript(nc, tenant, conv)
        return reply.get("last_seq") == last_seq

    return check


@pytest.fixture
def db_settings(settings, tmp_path):
    return settings.with_overrides(transcript_dsn=f"sqlite:///{tmp_path}/transcripts/t.db")


@pytest.fixture
async def writers():
    """Start TranscriptService instances; every one still running is stopped at teardown."""
    started: list[TranscriptService] = []

    async def start(settings, tuning: WriterTuning | None = None) -> TranscriptService:
        service = TranscriptService(settings, tuning)
        await service.start()
        started.append(service)
        return service

    yield start
    for service in started:
        await service.stop()


async def publish(js, tenant, conv, type_, data, key):
    ack = await bus.publish_event(js, tenant, conv, type_, data, msg_id=f"{tenant}:{conv}:{key}")
    return ack.seq


async def test_events_show_up_with_prev_chain_and_state(js, nc, db_settings, tenant, writers):
    service = await writers(db_settings)
    ok, checks = service.ready()
    assert ok, checks
    seqs = [await publish(js, tenant, "c1", "opened", {"queue": "q", "customer": {"id": "u1"}}, "o")]
    await publish(js, tenant, "c2", "opened", {"queue": "q", "customer": {"id": "u2"}}, "o")  # interleaved
    seqs.append(await publish(js, tenant, "c1", "message", {"id": "m1", "from": {"id": "u1"}, "body": "hi"}, "m1"))
    seqs.append(await publish(js, tenant, "c1", "assigned", {"agent": {"id": "a1"}}, "a"))
    await publish(js, tenant, "c2", "message", {"id": "m1", "from": {"id": "u2"}, "body": "yo"}, "m1")
    seqs.append(await publish(js, tenant, "c1", "message", {"id": "m2", "from": {"id": "a1"}, "body": "hello"}, "m2"))

    await wait_for(transcript_has(nc, tenant, "c1", seqs[-1]), what="c1 in the transcript")
    reply = await get_transcript(nc, tenant, "c1")
    assert reply["conv"] == "c1" and reply["tenant"] == tenant and reply["state"] == "assigned"
    assert [e["seq"] for e in reply["events"]] == seqs
    assert [e["prev"] for e in reply["events"]] == [0] + seqs[:-1]
    assert [e["type"] for e in reply["events"]] == ["opened", "message", "assigned", "message"]
    assert reply["events"][1]["data"]["body"] == "hi" and reply["events"][1]["conv"] == "c1"
    assert reply["events"][0]["ts"] > 0

    closed = await publish(js, tenant, "c1", "closed", {"by": None, "reason": "abandoned"}, "x")
    await wait_for(transcript_has(nc, tenant, "c1", closed), what="closed event")
    assert (await get_transcript(nc, tenant, "c1"))["state"] == "closed"
    assert (await get_transcript(nc, tenant, "c2"))["state"] == "queued"
    assert await get_transcript(nc, tenant, "nope") == {"error": "not_found"}
    assert await get_transcript(nc, "other" + tenant, "c1") == {"error": "not_found"}
    bad = await nc.request(subjects.TRANSCRIPT_GET, b"{not json", timeout=2)
    assert orjson.loads(bad.data) == {"error": "bad_request"}


async def test_redelivered_events_are_stored_once(js, nc, db_settings, tenant, writers, tmp_path):
    """A writer that committed but died before acking: the next writer gets the batch again."""
    await ensure_consumer(js)
    seqs = [await publish(js, tenant, "c1", "message", {"body": str(i)}, i) for i in range(5)]

    # Play the crashed writer: take the messages from the shared consumer, commit ours, never ack.
    store = SqliteStore(tmp_path / "transcripts" / "t.db")
    await store.open()
    psub = await js.pull_subscribe_bind(durable=subjects.TRANSCRIPT_CONSUMER, stream=subjects.CONV_STREAM)
    seen: set[int] = set()
    held = []
    deadline = time.monotonic() + 10
    while not set(seqs) <= seen and time.monotonic() < deadline:
        try:
            msgs = await psub.fetch(1000, timeout=0.5)
        except TimeoutError:
            continue
        held.extend(msgs)
        ours = [m for m in msgs if m.subject == subjects.conv_subject(tenant, "c1")]
        seen.update(m.metadata.sequence.stream for m in ours)
        await store.write_batch(
            [TranscriptRow(tenant, "c1", m.metadata.sequence.stream, "message", 1, orjson.loads(m.data)["data"])
             for m in ours]
        )
    assert set(seqs) <= seen
    # nak rather than wait ack_wait (30 s): the server redelivers at once, exactly as after a crash.
    for m in held:
        await m.nak()
    await psub.unsubscribe()
    await store.close()

    service = await writers(db_settings)
    await wait_for(lambda: service.processed >= len(seqs), what="redelivered messages processed")
    await wait_for(transcript_has(nc, tenant, "c1", seqs[-1]), what="transcript")
    reply = await get_transcript(nc, tenant, "c1")
    assert [e["seq"] for e in reply["events"]] == seqs
    with sqlite3.connect(tmp_path / "transcripts" / "t.db") as conn:
        count = conn.execute("SELECT count(*) FROM transcript_events WHERE tenant = ?", (tenant,)).fetchone()[0]
    assert count == len(seqs)


async def test_two_writers_share_the_work_without_gaps_or_duplicates(js, nc, db_settings, tenant, writers):
    # Small batches so that both writers keep pull requests open while the events arrive.
    tuning = WriterTuning(batch=BatchPolicy(max_size=10, max_delay_s=0.01))
    first = await writers(db_settings, tuning)
    second = await writers(db_settings.with_overrides(node_id="test-node-2"), tuning)
    await wait_for(lambda: first.lag == 0 or second.lag == 0, what="backlog of earlier tests drained")
    before = (first.processed, second.processed)

    convs = [f"c{i}" for i in range(4)]
    expected: dict[str, list[int]] = {c: [] for c in convs}
    for start in range(0, 200, 20):
        acks = await asyncio.gather(
            *(bus.publish_event(js, tenant, convs[i % 4], "message", {"body": str(i)}, f"{tenant}:{i}")
              for i in range(start, start + 20))
        )
        for i, ack in zip(range(start, start + 20), acks, strict=True):
            expected[convs[i % 4]].append(ack.seq)

    for conv in convs:
        # Complete = every seq present: the two writers commit their batches in any order.
        async def complete(conv=conv) -> bool:
            reply = await get_transcript(nc, tenant, conv)
            return [e["seq"] for e in reply.get("events", [])] == sorted(expected[conv])

        await wait_for(complete, what=f"{conv} complete")
        events = (await get_transcript(nc, tenant, conv))["events"]
        assert [e["seq"] for e in events] == sorted(expected[conv])
        assert [e["prev"] for e in events] == [0] + sorted(expected[conv])[:-1]
    assert first.processed > before[0] and second.processed > before[1], "both writers took part"


async def test_undecodable_payload_is_dead_lettered_and_does_not_block(js, nc, db_settings, tenant, writers):
    dead: list = []

    async def collect(msg):
        if (msg.headers or {}).get("Parley-Source-Subject", "").startswith(f"conv.{tenant}."):
            dead.append(msg)

    sub = await nc.subscribe(DEADLETTER_SUBJECT, cb=collect)
    await writers(db_settings)
    garbage = await js.publish(subjects.conv_subject(tenant, "c1"), b"\xffnot json")
    bogus = await js.publish(subjects.conv_subject(tenant, "c1"), orjson.dumps({"type": "bogus", "data": {}}))
    good = await publish(js, tenant, "c1", "opened", {"queue": "q", "customer": {"id": "u1"}}, "o")
    later = await publish(js, tenant, "c1", "message", {"id": "m", "from": {"id": "u1"}, "body": "after"}, "m")

    await wait_for(transcript_has(nc, tenant, "c1", later), what="events after the bad ones")
    await wait_for(lambda: len(dead) >= 2, what="dead letters")
    reply = await get_transcript(nc, tenant, "c1")
    assert [e["seq"] for e in reply["events"]] == [good, later]
    assert reply["events"][0]["prev"] == 0
    assert sorted(int(m.headers["Parley-Source-Seq"]) for m in dead) == [garbage.seq, bogus.seq]
    assert {m.data for m in dead} == {b"\xffnot json", orjson.dumps({"type": "bogus", "data": {}})}
    assert all(m.headers.get("Parley-Error") for m in dead)
    await sub.unsubscribe()


async def test_database_failure_is_retried_without_ack_and_marks_not_ready(
    js, nc, db_settings, tenant, writers, tmp_path
):
    tuning = WriterTuning(retry_initial_s=0.05, retry_max_s=0.2)
    service = await writers(db_settings, tuning)
    db = tmp_path / "transcripts" / "t.db"
    with sqlite3.connect(db) as conn:  # a real SQLite failure, limited to this test's tenant
        conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT ON transcript_events WHEN NEW.tenant = '{tenant}' "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
    seq = await publish(js, tenant, "c1", "opened", {"queue": "q", "customer": {"id": "u1"}}, "o")
    await wait_for(lambda: not service.ready()[0], what="not ready while writes fail")
    assert service.ready()[1]["store"] == "failing"
    assert await get_transcript(nc, tenant, "c1") == {"error": "not_found"}

    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER refuse")
    await wait_for(transcript_has(nc, tenant, "c1", seq), what="write retried after recovery")
    await wait_for(lambda: service.ready()[0], what="ready again")


async def test_stop_drains_the_batch_in_hand(js, nc, db_settings, tenant, writers, tmp_path):
    # A batch that would wait 60 s: only the drain in stop() can commit it within this test.
    tuning = WriterTuning(batch=BatchPolicy(max_size=100_000, max_delay_s=60))
    service = await writers(db_settings, tuning)
    seqs = [await publish(js, tenant, "c1", "message", {"body": str(i)}, i) for i in range(20)]

    async def all_delivered() -> bool:
        info = await js.consumer_info(subjects.CONV_STREAM, subjects.TRANSCRIPT_CONSUMER)
        return info.num_pending == 0 and info.num_ack_pending >= len(seqs)

    await wait_for(all_delivered, what="writer holding the events")
    assert await get_transcript(nc, tenant, "c1") == {"error": "not_found"}

    await service.stop()
    assert not service.ready()[0]
    assert service.processed >= len(seqs)
    store = SqliteStore(tmp_path / "transcripts" / "t.db")
    await store.open()
    assert [r.seq for r in await store.transcript(tenant, "c1")] == seqs
    await store.close()

    async def all_acked() -> bool:
        info = await js.consumer_info(subjects.CONV_STREAM, subjects.TRANSCRIPT_CONSUMER)
        return info.num_ack_pending == 0

    await wait_for(all_acked, what="acks after commit")


async def test_bad_dsn_fails_at_start(db_settings):
    service = TranscriptService(db_settings.with_overrides(transcript_dsn="mysql://db/parley"))
    with pytest.raises(ConfigError, match="PARLEY_TRANSCRIPT_DSN"):
        await service.start()
