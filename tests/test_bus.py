"""The bus helpers against a real nats-server: idempotent setup, RePublish headers, direct reads."""

from __future__ import annotations

import asyncio

from parley.core import bus, subjects
from parley.core.records import ConvRecord


async def test_ensure_all_is_idempotent(js, settings):
    await bus.ensure_all(js, settings)
    await bus.ensure_all(js, settings)
    info = await js.stream_info(subjects.CONV_STREAM)
    assert info.config.allow_direct and info.config.republish.dest == "live.conv.>"


async def test_republish_carries_per_subject_chain_and_reader_fills(nc, js, tenant):
    got: list = []

    async def collect(msg):
        got.append(msg)

    sub = await nc.subscribe(f"live.conv.{tenant}.>", cb=collect)
    seqs = {"a": [], "b": []}
    for i in range(6):
        conv = "a" if i % 2 == 0 else "b"
        ack = await bus.publish_event(js, tenant, conv, "message", {"n": i}, msg_id=f"{tenant}-{i}")
        seqs[conv].append(ack.seq)
    dup = await bus.publish_event(js, tenant, "a", "message", {"n": 0}, msg_id=f"{tenant}-0")
    assert dup.duplicate and dup.seq == seqs["a"][0]
    async with asyncio.timeout(5):
        while len(got) < 6:
            await asyncio.sleep(0.01)
    evs = [bus.live_event(m) for m in got if m.subject.endswith(".a")]
    assert [e.seq for e in evs] == seqs["a"]
    assert [e.prev for e in evs] == [0] + seqs["a"][:-1]
    await sub.unsubscribe()

    reader = bus.StreamReader(nc)
    await reader.start()
    events = await reader.read(tenant, "a", after=0)
    assert [e.seq for e in events] == seqs["a"] and [e.data["n"] for e in events] == [0, 2, 4]
    assert [e.prev for e in events] == [0] + seqs["a"][:-1]
    tail = await reader.read(tenant, "a", after=seqs["a"][0], limit=1)
    assert [e.seq for e in tail] == [seqs["a"][1]]
    bounded = await reader.read(tenant, "a", after=0, up_to=seqs["a"][1])
    assert [e.seq for e in bounded] == seqs["a"][:2]
    assert await reader.read(tenant, "nothing", after=0) == []
    assert await reader.last_seq(tenant, "b") == seqs["b"][-1]
    assert await reader.last_seq(tenant, "nothing") == 0
    await reader.stop()


async def test_cas_loop_and_outbox(js, settings, tenant):
    buckets = await bus.ensure_buckets(js, settings)
    key = subjects.kv_key(tenant, "c1")

    def create(cur):
        return ConvRecord(conv="c1", tenant=tenant, customer="u1", queue="q") if cur is None else None

    rec, rev, changed = await bus.cas_loop(buckets.convs, key, ConvRecord.decode, create)
    assert changed and rev > 0
    _, _, changed_again = await bus.cas_loop(buckets.convs, key, ConvRecord.decode, create)
    assert not changed_again
