"""RouterService against a real nats-server: offers, accept/decline/expiry, auto mode, races, repair."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from helpers import eventually

from parley.core import bus, subjects
from parley.core.events import now_ms
from parley.core.records import AgentRecord, ConvRecord, PendingEvent
from parley.presence.service import PresenceService
from parley.router.logic import AGENT_OFFLINE_NOTICE
from parley.router.service import RouterService


@pytest.fixture
def fast(settings):
    return settings.with_overrides(presence_ttl_ms=1000, offer_timeout_ms=800, requeue_grace_ms=300)


@pytest.fixture
async def buckets(js, fast):
    return await bus.ensure_buckets(js, fast)


@pytest.fixture
async def router(fast):
    service = RouterService(fast)
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def inbox(nc, tenant):
    """Frames published to any user of the test's tenant: ``[(user, frame), ...]``."""
    got: list[tuple[str, dict]] = []

    async def collect(msg):
        got.append((msg.subject.rsplit(".", 1)[-1], orjson.loads(msg.data)))

    sub = await nc.subscribe(f"user.{tenant}.*", cb=collect)
    yield got
    await sub.unsubscribe()


async def put_agent(buckets, tenant, name, skills=("billing",), max_chats=3, idle_since=0, status="online"):
    record = AgentRecord(agent=name, tenant=tenant, status=status, since=now_ms(), skills=list(skills),
                         max_chats=max_chats, idle_since=idle_since)
    await bus.kv_cas(buckets.agents, subjects.kv_key(tenant, name), record.encode(), 0)


async def open_conv(buckets, tenant, conv, queue="billing", customer="cust"):
    """Create the record as the gateway does at ``open``."""
    now = now_ms()
    record = ConvRecord(conv=conv, tenant=tenant, customer=customer, queue=queue, opened_at=now, queued_at=now)
    await bus.kv_cas(buckets.convs, subjects.kv_key(tenant, conv), record.encode(), 0)


async def conv_record(buckets, tenant, conv) -> ConvRecord:
    raw, _ = await bus.kv_read(buckets.convs, subjects.kv_key(tenant, conv))
    return ConvRecord.decode(raw)


async def agent_record(buckets, tenant, agent) -> AgentRecord:
    raw, _ = await bus.kv_read(buckets.agents, subjects.kv_key(tenant, agent))
    return AgentRecord.decode(raw)


async def command(js, tenant, conv, op, by, role="agent", **extra):
    body = {"op": op, "tenant": tenant, "conv": conv, "by": {"id": by, "role": role}, **extra}
    await js.publish(subjects.route_subject(tenant, conv), orjson.dumps(body), stream=subjects.ROUTE_STREAM)


async def events(nc, tenant, conv) -> list:
    reader = bus.StreamReader(nc)
    await reader.start()
    try:
        return await reader.read(tenant, conv, after=0)
    finally:
        await reader.stop()


async def slots_free(buckets, tenant, agent) -> bool:
    """The router frees a slot after the conversation left the agent (store.py): wait for it."""
    return (await agent_record(buckets, tenant, agent)).convs == {}


def offers(inbox, conv):
    return [user for user, frame in inbox if frame.get("t") == "offer" and frame["conv"] == conv]


async def test_offer_then_accept_assigns_and_writes_event(router, buckets, nc, js, tenant, inbox, fast):
    await put_agent(buckets, tenant, "ann")
    await open_conv(buckets, tenant, "c1")
    await eventually(lambda: offers(inbox, "c1") == ["ann"], what="offer to ann")
    frame = next(f for _, f in inbox if f.get("t") == "offer")
    assert frame == {"t": "offer", "conv": "c1", "queue": "billing", "expires_ms": fast.offer_timeout_ms}
    rec = await conv_record(buckets, tenant, "c1")
    assert rec.state == "offered" and rec.offer.agent == "ann"
    assert (await agent_record(buckets, tenant, "ann")).convs == {"c1": "offer"}

    await command(js, tenant, "c1", "accept", "ann")

    async def assigned():
        r = await conv_record(buckets, tenant, "c1")
        return r.state == "assigned" and not r.outbox

    await eventually(assigned, what="assigned")
    evs = await eventually(lambda: events(nc, tenant, "c1"), what="assigned event")
    assert [(e.type, e.data) for e in evs] == [("assigned", {"agent": {"id": "ann"}})]
    assert (await agent_record(buckets, tenant, "ann")).convs == {"c1": "assigned"}


async def test_decline_goes_to_next_agent(router, buckets, js, tenant, inbox):
    await put_agent(buckets, tenant, "ann", idle_since=1)
    await put_agent(buckets, tenant, "bob", idle_since=2)
    await open_conv(buckets, tenant, "c1")
    await eventually(lambda: offers(inbox, "c1") == ["ann"], what="offer to ann (idle longest)")
    await command(js, tenant, "c1", "decline", "ann")
    await eventually(lambda: offers(inbox, "c1") == ["ann", "bob"], what="offer to bob")
    rec = await conv_record(buckets, tenant, "c1")
    assert rec.state == "offered" and rec.offer.agent == "bob" and rec.declined == ["ann"]
    await eventually(lambda: slots_free(buckets, tenant, "ann"), timeout=3, what="ann's slots freed")


async def test_expired_offer_goes_to_next_agent(router, buckets, tenant, inbox, fast):
    await put_agent(buckets, tenant, "ann", idle_since=1)
    await put_agent(buckets, tenant, "bob", idle_since=2)
    opened = time.monotonic()  # before ann's offer was made: a bound that a late observer cannot break
    await open_conv(buckets, tenant, "c1")
    await eventually(lambda: offers(inbox, "c1") == ["ann"], what="offer to ann")
    await eventually(lambda: offers(inbox, "c1") == ["ann", "bob"], timeout=3, what="offer to bob after expiry")
    assert time.monotonic() - opened >= fast.offer_timeout_ms / 1000 - 0.05
    assert (await conv_record(buckets, tenant, "c1")).declined == ["ann"]
    # Nobody else left: after bob lets it lapse too, ann gets it again.
    await eventually(lambda: len(offers(inbox, "c1")) == 3, timeout=3, what="third offer")
    assert offers(inbox, "c1")[2] == "ann"


async def test_late_accept_gets_not_found_error(router, buckets, js, tenant, inbox):
    await put_agent(buckets, tenant, "ann")
    await open_conv(buckets, tenant, "c1")
    await eventually(lambda: offers(inbox, "c1"), what="offer")
    await command(js, tenant, "c1", "accept", "eve")  # never offered to eve
    await eventually(lambda: any(u == "eve" and f.get("t") == "error" for u, f in inbox), what="error to eve")
    error = next(f for u, f in inbox if u == "eve")
    assert error["code"] == "not_found" and error["ref"] == "c1"
    assert (await conv_record(buckets, tenant, "c1")).offer.agent == "ann"


async def test_auto_mode_assigns_without_offer(fast, buckets, nc, tenant, inbox):
    router = RouterService(fast.with_overrides(routing_mode="auto"))
    await router.start()
    try:
        await put_agent(buckets, tenant, "ann")
        await open_conv(buckets, tenant, "c1")

        async def assigned():
            r = await conv_record(buckets, tenant, "c1")
            return r.state == "assigned" and r.agent == "ann" and not r.outbox

        await eventually(assigned, what="auto assignment")
        assert [e.type for e in await events(nc, tenant, "c1")] == ["assigned"]
        assert (await agent_record(buckets, tenant, "ann")).convs == {"c1": "assigned"}
        assert offers(inbox, "c1") == []
    finally:
        await router.stop()


async def test_two_routers_never_exceed_capacity(fast, buckets, js, nc, tenant):
    auto = fast.with_overrides(routing_mode="auto")
    watcher = await buckets.agents.watch(f"{tenant}.*")
    loads: list[tuple[str, int, int]] = []

    async def record_loads():
        async for entry in watcher:
            if entry is not None and entry.value:
                a = AgentRecord.decode(entry.value)
                loads.append((a.agent, a.load, a.max_chats))

    collector = asyncio.create_task(record_loads())
    for name in ("ann", "bob", "cat"):
        await put_agent(buckets, tenant, name, max_chats=2)
    routers = [RouterService(auto), RouterService(auto)]
    for r in routers:
        await r.start()
    try:
        convs = [f"c{i}" for i in range(10)]
        await asyncio.gather(*(open_conv(buckets, tenant, c) for c in convs))

        async def six_assigned():
            recs = [await conv_record(buckets, tenant, c) for c in convs]
            return sum(r.state == "assigned" and not r.outbox for r in recs) == 6  # events published

        await eventually(six_assigned, timeout=10, what="6 assignments")
        recs = {c: await conv_record(buckets, tenant, c) for c in convs}
        for name in ("ann", "bob", "cat"):
            agent = await agent_record(buckets, tenant, name)
            mine = {c for c, r in recs.items() if r.state == "assigned" and r.agent == name}
            assert set(agent.convs) == mine and len(mine) == 2
        for c, r in recs.items():
            if r.state == "assigned":
                assert [e.type for e in await events(nc, tenant, c)] == ["assigned"]
        assert all(load <= cap for _, load, cap in loads), loads
    finally:
        collector.cancel()
        await watcher.stop()
        for r in routers:
            await r.stop()


async def test_close_and_transfer_release_the_agent(fast, buckets, js, nc, tenant):
    router = RouterService(fast.with_overrides(routing_mode="auto"))
    await router.start()
    try:
        await put_agent(buckets, tenant, "ann", skills=("billing",))
        await open_conv(buckets, tenant, "c1")
        await open_conv(buckets, tenant, "c2")

        async def state(conv, expected, agent=None):
            r = await conv_record(buckets, tenant, conv)
            return r.state == expected and (agent is None or r.agent == agent) and not r.outbox

        await eventually(lambda: state("c1", "assigned", "ann"), what="c1 assigned")
        await eventually(lambda: state("c2", "assigned", "ann"), what="c2 assigned")

        await command(js, tenant, "c1", "close", "cust", role="customer")
        await eventually(lambda: state("c1", "closed"), what="c1 closed")
        closed = (await events(nc, tenant, "c1"))[-1]
        assert closed.type == "closed" and closed.data == {"by": {"id": "cust", "role": "customer"}, "reason": "customer_closed"}

        await put_agent(buckets, tenant, "tom", skills=("tier2",))
        await command(js, tenant, "c2", "transfer", "ann", queue="tier2")
        await eventually(lambda: state("c2", "assigned", "tom"), what="c2 with tom in tier2")
        types = [(e.type, e.data) for e in await events(nc, tenant, "c2")]
        assert types == [
            ("assigned", {"agent": {"id": "ann"}}),
            ("transferred", {"from_queue": "billing", "to_queue": "tier2", "by": {"id": "ann"}}),
            ("assigned", {"agent": {"id": "tom"}}),
        ]
        await eventually(lambda: slots_free(buckets, tenant, "ann"), timeout=3, what="ann's slots freed")
    finally:
        await router.stop()


async def test_offline_agent_conversations_are_requeued(fast, buckets, nc, tenant):
    presence = PresenceService(fast)
    router = RouterService(fast.with_overrides(routing_mode="auto"))
    await presence.start()
    await router.start()
    try:
        hello = {"tenant": tenant, "agent": "ann", "node": "gw1", "skills": ["billing"], "max_chats": 3}
        await nc.request(subjects.PRESENCE_HELLO, orjson.dumps(hello), timeout=5)
        await open_conv(buckets, tenant, "c1")

        async def state(expected):
            r = await conv_record(buckets, tenant, "c1")
            return r.state == expected and not r.outbox

        await eventually(lambda: state("assigned"), what="assigned to ann")
        lost_at = time.monotonic()  # no heartbeats from now on
        await eventually(lambda: state("queued"), timeout=5, what="requeued after ann went offline")
        # TTL 1 s + sweep 0.25 s + grace 0.3 s + a routing tick + slack for a loaded machine
        assert time.monotonic() - lost_at < 1.0 + 0.25 + 0.3 + 0.2 + 1.0
        types = [(e.type, e.data) for e in await events(nc, tenant, "c1")]
        assert types == [
            ("assigned", {"agent": {"id": "ann"}}),
            ("unassigned", {"agent": {"id": "ann"}, "reason": "agent_offline"}),
            ("notice", {"level": "warning", "text": AGENT_OFFLINE_NOTICE}),
        ]

        async def slot_released():
            # the slot on ann's record is freed by a second compare-and-set, after the conversation's
            ann = await agent_record(buckets, tenant, "ann")
            return ann.status == "offline" and ann.convs == {}

        await eventually(slot_released, timeout=3, what="ann's slot released")
        assert (await conv_record(buckets, tenant, "c1")).agent is None
    finally:
        await router.stop()
        await presence.stop()


async def test_leftover_outbox_and_slot_are_repaired(fast, buckets, nc, tenant):
    # A router died after storing an auto-assignment: outbox unflushed, and one stale slot.
    now = now_ms()
    record = ConvRecord(conv="c1", tenant=tenant, customer="cust", queue="billing", state="assigned", agent="ann",
                        opened_at=now, queued_at=now,
                        outbox=[PendingEvent(f"x:{tenant}:c1:1:0", "assigned", {"agent": {"id": "ann"}})])
    await bus.kv_cas(buckets.convs, subjects.kv_key(tenant, "c1"), record.encode(), 0)
    ann = AgentRecord(agent="ann", tenant=tenant, status="online", skills=["billing"], convs={"ghost": "offer"})
    await bus.kv_cas(buckets.agents, subjects.kv_key(tenant, "ann"), ann.encode(), 0)
    router = RouterService(fast)
    router.slot_repair_ms = 300
    await router.start()
    try:
        async def flushed():
            return not (await conv_record(buckets, tenant, "c1")).outbox

        await eventually(flushed, what="outbox flushed")
        assert [e.type for e in await events(nc, tenant, "c1")] == ["assigned"]

        async def slots_fixed():
            return (await agent_record(buckets, tenant, "ann")).convs == {"c1": "assigned"}

        await eventually(slots_fixed, timeout=3, what="ghost slot freed, missing slot added")
    finally:
        await router.stop()


async def test_never_offers_to_away_offline_or_full_agents(router, buckets, tenant, inbox):
    # ann, cat and dan have waited longest, but only bob may take work (G5).
    await put_agent(buckets, tenant, "ann", idle_since=1, status="away")
    await put_agent(buckets, tenant, "cat", idle_since=2, status="offline")
    await put_agent(buckets, tenant, "dan", idle_since=3, max_chats=0)
    await put_agent(buckets, tenant, "bob", idle_since=9)
    for conv in ("c1", "c2"):
        await open_conv(buckets, tenant, conv)
    await eventually(lambda: offers(inbox, "c1") and offers(inbox, "c2"), what="both offered")
    assert offers(inbox, "c1") == ["bob"] and offers(inbox, "c2") == ["bob"]
    assert (await agent_record(buckets, tenant, "bob")).convs == {"c1": "offer", "c2": "offer"}


async def test_offer_of_lost_agent_returns_to_queue_quietly(fast, buckets, nc, tenant, inbox):
    router = RouterService(fast.with_overrides(offer_timeout_ms=30000))  # no expiry: the loss moves it
    await router.start()
    try:
        await _lost_agent_offer(buckets, nc, tenant, inbox)
    finally:
        await router.stop()


async def _lost_agent_offer(buckets, nc, tenant, inbox):
    await put_agent(buckets, tenant, "ann", idle_since=1)
    await open_conv(buckets, tenant, "c1")
    await eventually(lambda: offers(inbox, "c1") == ["ann"], what="offer to ann")
    # Presence marks ann offline; bob arrives. After the grace, the offer goes to bob.
    raw, rev = await bus.kv_read(buckets.agents, subjects.kv_key(tenant, "ann"))
    ann = AgentRecord.decode(raw)
    ann.status, ann.since, ann.reason = "offline", now_ms(), "heartbeat_lost"
    await bus.kv_cas(buckets.agents, subjects.kv_key(tenant, "ann"), ann.encode(), rev)
    await put_agent(buckets, tenant, "bob", idle_since=2)
    await eventually(lambda: offers(inbox, "c1") == ["ann", "bob"], timeout=3, what="offer to bob")
    assert await events(nc, tenant, "c1") == []
    await eventually(lambda: slots_free(buckets, tenant, "ann"), timeout=3, what="ann's slots freed")
