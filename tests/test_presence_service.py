"""PresenceService against a real nats-server: hello, heartbeats, sweep, several instances."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from helpers import eventually

from parley.core import bus, subjects
from parley.core.records import AgentRecord, Heartbeat
from parley.presence.service import PresenceService


@pytest.fixture
def fast(settings):
    return settings.with_overrides(presence_ttl_ms=1000)


@pytest.fixture
async def presence(fast):
    service = PresenceService(fast)
    await service.start()
    yield service
    await service.stop()


async def read_agent(js, fast, tenant, agent) -> AgentRecord | None:
    buckets = await bus.ensure_buckets(js, fast)
    raw, _ = await bus.kv_read(buckets.agents, subjects.kv_key(tenant, agent))
    return AgentRecord.decode(raw) if raw else None


async def hello(nc, tenant, agent, skills=("billing",), max_chats=3, node="gw1") -> dict:
    body = {"tenant": tenant, "agent": agent, "node": node, "skills": list(skills), "max_chats": max_chats}
    reply = await nc.request(subjects.PRESENCE_HELLO, orjson.dumps(body), timeout=5)
    return orjson.loads(reply.data)


async def test_hello_makes_agent_online_and_replies_with_record(presence, nc, js, fast, tenant):
    record = await hello(nc, tenant, "ann", skills=("billing", "sales"), max_chats=2)
    assert record["status"] == "online" and record["reason"] == "connected"
    assert record["skills"] == ["billing", "sales"] and record["max_chats"] == 2 and record["node"] == "gw1"
    stored = await read_agent(js, fast, tenant, "ann")
    assert stored is not None and stored.status == "online"
    buckets = await bus.ensure_buckets(js, fast)
    raw, _ = await bus.kv_read(buckets.heartbeats, subjects.kv_key(tenant, "ann"))
    assert raw is not None and Heartbeat.decode(raw).node == "gw1"


async def test_without_heartbeats_agent_goes_offline_within_ttl(presence, nc, js, fast, tenant):
    await hello(nc, tenant, "bob")
    started = time.monotonic()

    async def offline():
        rec = await read_agent(js, fast, tenant, "bob")
        return rec is not None and rec.status == "offline"

    await eventually(offline, timeout=3, what="bob offline")
    elapsed = time.monotonic() - started
    # ttl + sweep interval + slack for a loaded 2-core machine (the bound is the guarantee, scaled)
    assert 0.9 < elapsed < 1.0 + 0.25 + 1.0
    rec = await read_agent(js, fast, tenant, "bob")
    assert rec.reason == "heartbeat_lost"


async def test_heartbeats_keep_agent_online_and_bring_it_back(presence, nc, js, fast, tenant):
    await hello(nc, tenant, "cat")
    payload = orjson.dumps({"node": "gw1", "skills": ["billing"], "max_chats": 3})
    for _ in range(12):  # 1.8 s of heartbeats every 150 ms: longer than the TTL
        await nc.publish(subjects.heartbeat_subject(tenant, "cat"), payload)
        await asyncio.sleep(0.15)
    rec = await read_agent(js, fast, tenant, "cat")
    assert rec.status == "online" and rec.reason == "connected"

    async def status(expected):
        r = await read_agent(js, fast, tenant, "cat")
        return r is not None and r.status == expected

    await eventually(lambda: status("offline"), timeout=3, what="cat offline")
    await nc.publish(subjects.heartbeat_subject(tenant, "cat"), payload)
    await eventually(lambda: status("online"), timeout=2, what="cat back online")
    assert (await read_agent(js, fast, tenant, "cat")).reason == "reconnected"


async def test_heartbeat_creates_a_missing_record(presence, nc, js, fast, tenant):
    payload = orjson.dumps({"node": "gw9", "skills": ["sales"], "max_chats": 4})
    await nc.publish(subjects.heartbeat_subject(tenant, "dan"), payload)

    async def created():
        return await read_agent(js, fast, tenant, "dan")

    rec = await eventually(created, timeout=2, what="record from heartbeat")
    assert rec.status == "online" and rec.skills == ["sales"] and rec.max_chats == 4


async def test_set_status_away_and_bad_status(presence, nc, tenant):
    await hello(nc, tenant, "eve")
    reply = await nc.request(subjects.PRESENCE_SET, orjson.dumps({"tenant": tenant, "agent": "eve", "status": "away"}), timeout=5)
    rec = orjson.loads(reply.data)
    assert rec["status"] == "away" and rec["chosen"] == "away" and rec["reason"] == "set_by_agent"
    bad = await nc.request(subjects.PRESENCE_SET, orjson.dumps({"tenant": tenant, "agent": "eve", "status": "offline"}), timeout=5)
    assert orjson.loads(bad.data) == {"error": "bad_frame"}


async def test_two_instances_write_one_offline_transition(fast, nc, js, tenant):
    first, second = PresenceService(fast), PresenceService(fast)
    await first.start()
    await second.start()
    try:
        await hello(nc, tenant, "fay")
        buckets = await bus.ensure_buckets(js, fast)
        watcher = await buckets.agents.watch(subjects.kv_key(tenant, "fay"))
        statuses: list[str] = []

        async def collect():
            async for entry in watcher:
                if entry is not None and entry.value:
                    statuses.append(AgentRecord.decode(entry.value).status)

        collector = asyncio.create_task(collect())
        await eventually(lambda: "offline" in statuses, timeout=3, what="offline seen")
        # Give the slower instance several sweeps to (wrongly) write a second transition.
        await asyncio.sleep(0.6)
        collector.cancel()
        await watcher.stop()
        assert statuses == ["online", "offline"]
    finally:
        await first.stop()
        await second.stop()
