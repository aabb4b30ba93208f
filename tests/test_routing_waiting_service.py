"""The router's waiting room against a real nats-server: queue frames, staffing notices, escalation,
abandonment (also across a router restart)."""

from __future__ import annotations

import asyncio
import math
import time

import orjson
import pytest
from helpers import eventually
from test_router_service import agent_record, command, conv_record, events, open_conv, put_agent

from parley.core import bus, subjects
from parley.core.config import QueuePolicy
from parley.core.events import now_ms
from parley.core.records import AgentRecord, ConvRecord
from parley.router.service import RouterService
from parley.router.waiting import ALL_CLEAR_NOTICE, NO_AGENT_NOTICE


@pytest.fixture
def fast(settings):
    return settings.with_overrides(presence_ttl_ms=1000, offer_timeout_ms=800, requeue_grace_ms=300)


@pytest.fixture
async def buckets(js, fast):
    return await bus.ensure_buckets(js, fast)


@pytest.fixture
async def frames(nc, tenant):
    """Queue frames to any customer of the test's tenant: ``[(monotonic time, frame), ...]``."""
    got: list[tuple[float, dict]] = []

    async def collect(msg):
        frame = orjson.loads(msg.data)
        if frame.get("t") == "queue":
            got.append((time.monotonic(), frame))

    sub = await nc.subscribe(f"user.{tenant}.*", cb=collect)
    yield got
    await sub.unsubscribe()


async def start_router(settings) -> RouterService:
    router = RouterService(settings)
    await router.start()
    return router


def positions(frames, conv):
    return [f["position"] for _, f in frames if f["conv"] == conv]


async def test_queue_frames_on_entry_and_position_change_with_eta(fast, buckets, js, tenant, frames):
    router = await start_router(fast.with_overrides(routing_mode="auto"))
    try:
        await put_agent(buckets, tenant, "ann", max_chats=1)
        opened_at = time.monotonic()
        for i, conv in enumerate(("c1", "c2", "c3")):
            await open_conv(buckets, tenant, conv, customer=f"cu{i}")
            await asyncio.sleep(0.01)  # distinct queued_at: a defined FIFO order
        # (A first frame may predate c1's assignment: then c3 hears 3, then 2.)
        # (each conversation's frames have their own 1 s pacing: c2 may hear 2 before it hears 1)
        await eventually(lambda: positions(frames, "c3")[-1:] == [2] and positions(frames, "c2")[-1:] == [1],
                         what="c2 first, c3 second in line (c1 is assigned)")
        assert positions(frames, "c3") in ([2], [3, 2])
        # Nothing observed yet about handling times: the ETA is unknown, not invented.
        assert all(f["eta_s"] is None for _, f in frames)
        await asyncio.sleep(1.0)  # ann handles c1 for a second: the handling time the ETA uses
        await command(js, tenant, "c1", "close", "cu0", role="customer")
        await eventually(lambda: positions(frames, "c3")[-1:] == [1], timeout=5, what="c3 moves up")
        heard_at, last = [(t, f) for t, f in frames if f["conv"] == "c3"][-1]
        # c2 took ann's only slot, turning over as fast as c1 did: c3 is one handling time away.
        # c1 was held at least the 1 s above and at most from its opening to this frame (more than
        # 1 s when the shared machine is slow), so the ETA lies between those, rounded up.
        assert 1 <= last["eta_s"] <= max(2, math.ceil(heard_at - opened_at)), last
        stamps = [t for t, f in frames if f["conv"] == "c3"]
        # at most one frame a second per conversation (measured on arrival here: some jitter allowed)
        assert all(b - a >= 0.7 for a, b in zip(stamps, stamps[1:], strict=False))
    finally:
        await router.stop()


async def test_two_routers_send_each_frame_once(fast, buckets, tenant, frames):
    routers = [await start_router(fast), await start_router(fast)]
    try:
        await eventually(lambda: all(len(r.waiting.members.alive()) == 2 for r in routers), timeout=5,
                         what="routers know each other")
        for i in range(6):
            await open_conv(buckets, tenant, f"c{i}", queue=f"q{i}", customer=f"cu{i}")
        await eventually(lambda: all(positions(frames, f"c{i}") for i in range(6)), what="every customer told")
        await asyncio.sleep(0.6)  # a few more ticks of both routers: no second copy
        assert all(positions(frames, f"c{i}") == [1] for i in range(6)), frames
    finally:
        for r in routers:
            await r.stop()


async def test_no_agent_online_notice_then_all_clear(fast, buckets, nc, tenant):
    router = await start_router(fast)
    try:
        await put_agent(buckets, tenant, "ann", status="offline")
        await open_conv(buckets, tenant, "c1")

        async def notices():
            return [(e.data["level"], e.data["text"]) for e in await events(nc, tenant, "c1") if e.type == "notice"]

        await eventually(notices, timeout=5, what="no-agent notice")
        assert await notices() == [("warning", NO_AGENT_NOTICE)]
        raw, rev = await bus.kv_read(buckets.agents, subjects.kv_key(tenant, "ann"))
        ann = AgentRecord.decode(raw)
        ann.status, ann.since, ann.reason = "away", now_ms(), "set_by_agent"  # away is not online
        await bus.kv_cas(buckets.agents, subjects.kv_key(tenant, "ann"), ann.encode(), rev)
        await put_agent(buckets, tenant, "bob", skills=("sales",))  # online, but not for billing
        await asyncio.sleep(2.5)
        assert len(await notices()) == 1
        await put_agent(buckets, tenant, "cat")
        await eventually(lambda: _len_is(notices, 2), timeout=6, what="all-clear")
        assert (await notices())[1] == ("info", ALL_CLEAR_NOTICE)

        async def offered():
            rec = await conv_record(buckets, tenant, "c1")
            return rec.state == "offered" and rec.wait_notice == "all_clear"

        await eventually(offered, timeout=5, what="offered to cat, all-clear recorded")
    finally:
        await router.stop()


async def _len_is(fetch, n):
    return len(await fetch()) == n


async def test_escalation_moves_to_overflow_and_gets_served_there(fast, buckets, nc, tenant):
    policies = {f"{tenant}/billing": QueuePolicy(max_wait_s=1, overflow="tier2")}
    router = await start_router(fast.with_overrides(routing_mode="auto", queues=policies))
    try:
        await put_agent(buckets, tenant, "tom", skills=("tier2",))
        started = time.monotonic()
        await open_conv(buckets, tenant, "c1")

        async def assigned():
            rec = await conv_record(buckets, tenant, "c1")
            return rec.state == "assigned" and not rec.outbox

        await eventually(assigned, timeout=5, what="assigned in tier2")
        assert time.monotonic() - started >= 1.0
        evs = [(e.type, e.data) for e in await events(nc, tenant, "c1") if e.type != "notice"]
        assert evs == [("escalated", {"to_queue": "tier2", "reason": "max_wait"}), ("assigned", {"agent": {"id": "tom"}})]
        assert (await conv_record(buckets, tenant, "c1")).queue == "tier2"
        assert (await agent_record(buckets, tenant, "tom")).convs == {"c1": "assigned"}
    finally:
        await router.stop()


async def test_abandoned_while_waiting_and_seen_survives_a_router_restart(fast, buckets, nc, tenant):
    settings = fast.with_overrides(abandon_s=2)
    router = await start_router(settings)
    router.waiting.startup_grace_ms = 0

    async def stored():
        raw, _ = await bus.kv_read(buckets.seen, subjects.kv_key(tenant, "cu2"))
        return orjson.loads(raw)["ts"] if raw else None

    async def reported_and_stored():
        # cu2 is connected: its gateway reports it, repeatedly as gateways do (a core NATS message
        # sent before the router's subscription reached the server is not delivered)
        await nc.publish(subjects.customer_seen_subject(tenant, "cu2"), orjson.dumps({"node": "gw1"}))
        return await stored()

    # ... before the router meets cu2's long-waiting conversation
    seen_at = await eventually(reported_and_stored, interval=0.2, what="cu2's seen stored")
    long_ago = now_ms() - 60_000
    for conv, customer in (("gone", "cu1"), ("here", "cu2")):
        rec = ConvRecord(conv=conv, tenant=tenant, customer=customer, queue="billing", opened_at=long_ago,
                         queued_at=long_ago)
        await bus.kv_cas(buckets.convs, subjects.kv_key(tenant, conv), rec.encode(), 0)

    async def state(conv):
        """The record's state once its events are published (the router stores a transition with
        an outbox first, then publishes and clears it)."""
        rec = await conv_record(buckets, tenant, conv)
        return rec.state if not rec.outbox else "publishing"

    try:
        await eventually(lambda: _equals(state("gone"), "closed"), timeout=3, what="cu1's conversation abandoned")
        evs = await events(nc, tenant, "gone")
        assert [(e.type, e.data) for e in evs if e.type == "closed"] == [("closed", {"by": None, "reason": "abandoned"})]
        assert await state("here") == "queued"
    finally:
        await router.stop()
    # A fresh router knows cu2 was seen only from the bucket: it waits out the window from then.
    router = await start_router(settings)
    router.waiting.startup_grace_ms = 0
    try:
        await eventually(lambda: _equals(state("here"), "closed"), timeout=5, what="cu2's conversation abandoned")
        assert now_ms() - seen_at >= 2000
    finally:
        await router.stop()


async def _equals(coro, value):
    return (await coro) == value
