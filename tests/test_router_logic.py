"""Routing decisions without NATS: eligibility, choice, every conversation transition."""

from __future__ import annotations

import pytest

from parley.core.records import AgentRecord, ConvRecord, Offer
from parley.router.logic import (
    AGENT_OFFLINE_NOTICE,
    Actor,
    RouteOp,
    RouteRefused,
    SlotChange,
    accept_offer,
    agent_lost,
    apply_route_op,
    apply_slot,
    auto_assign_conv,
    choose_agent,
    close_conv,
    decline_offer,
    eligible_agents,
    expire_offer,
    is_lost,
    offer_conv,
    parse_route_op,
    slot_mismatches,
    take_slot,
    transfer_conv,
    waiting_in_order,
)


def agent(name: str, **changes) -> AgentRecord:
    rec = AgentRecord(agent=name, tenant="t", status="online", since=1, skills=["billing"], max_chats=2, idle_since=100)
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def conv(name: str = "c1", **changes) -> ConvRecord:
    rec = ConvRecord(conv=name, tenant="t", customer="cu", queue="billing", opened_at=10, queued_at=10)
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def offered(to: str = "a", expires_at: int = 5000, name: str = "c1") -> ConvRecord:
    return conv(name, state="offered", offer=Offer(agent=to, expires_at=expires_at))


def assigned(to: str = "a", name: str = "c1") -> ConvRecord:
    return conv(name, state="assigned", agent=to)


# --- eligibility and choice ------------------------------------------------------------------
def test_only_online_agents_serving_the_queue_with_capacity_are_eligible():
    agents = [
        agent("ok"),
        agent("away", status="away"),
        agent("off", status="offline"),
        agent("other_skill", skills=["sales"]),
        agent("full", convs={"x": "assigned", "y": "offer"}),
        agent("other_tenant", tenant="u"),
    ]
    assert [a.agent for a in eligible_agents(conv(), agents)] == ["ok"]


def test_longest_idle_agent_first_ties_by_id():
    agents = [agent("b", idle_since=50), agent("a", idle_since=50), agent("c", idle_since=10)]
    assert [a.agent for a in eligible_agents(conv(), agents)] == ["c", "a", "b"]
    assert choose_agent(conv(), agents).agent == "c"


def test_decliners_are_asked_only_when_nobody_else_is_eligible():
    agents = [agent("a", idle_since=1), agent("b", idle_since=2)]
    assert choose_agent(conv(declined=["a"]), agents).agent == "b"
    assert choose_agent(conv(declined=["a", "b"]), agents).agent == "a"
    assert choose_agent(conv(), []) is None


def test_waiting_is_fifo_and_skips_records_with_outbox():
    from parley.core.records import PendingEvent

    convs = [
        conv("late", queued_at=30),
        conv("early", queued_at=5),
        conv("busy", queued_at=1, outbox=[PendingEvent("x", "assigned", {})]),
        conv("gone", queued_at=1, state="offered"),
    ]
    assert [c.conv for c in waiting_in_order(convs)] == ["early", "late"]


# --- slots -----------------------------------------------------------------------------------
def test_take_slot_checks_capacity_and_status_and_updates_idle_since():
    taken = take_slot(agent("a"), conv(), "offer", now=500)
    assert taken is not None and taken.convs == {"c1": "offer"} and taken.idle_since == 500
    assert take_slot(agent("a", status="away"), conv(), "offer", now=500) is None
    assert take_slot(agent("a", convs={"x": "assigned", "y": "assigned"}), conv(), "offer", now=500) is None
    assert take_slot(agent("a", convs={"c1": "offer"}), conv(), "offer", now=500) is None  # held already


def test_apply_slot_sets_and_frees():
    a = agent("a", convs={"c1": "offer"})
    up = apply_slot(a, "c1", "assigned", now=700)
    assert up is not None and up.convs == {"c1": "assigned"} and up.idle_since == 100
    freed = apply_slot(a, "c1", None, now=700)
    assert freed is not None and freed.convs == {} and freed.idle_since == 700
    assert apply_slot(a, "zz", None, now=700) is None
    assert a.convs == {"c1": "offer"}


def test_slot_mismatches_finds_leaks_and_missing_slots():
    convs = {"t.c1": offered("a"), "t.c2": assigned("b", name="c2"), "t.c3": conv("c3")}
    agents = [agent("a", convs={"c1": "offer", "c3": "offer"}), agent("b")]
    assert sorted(slot_mismatches(convs, agents)) == [("t", "a", "c3", None), ("t", "b", "c2", "assigned")]


# --- transitions -----------------------------------------------------------------------------
def test_offer_moves_to_offered_without_events():
    tr = offer_conv(conv(), 7, "a", now=1000, timeout_ms=800)
    assert tr.conv.state == "offered" and tr.conv.offer == Offer("a", 1800) and tr.conv.outbox == []
    assert tr.slot == SlotChange("a", "offer")


def test_auto_assign_writes_assigned_event_with_deterministic_id():
    tr = auto_assign_conv(conv(), 7, "a")
    assert tr.conv.state == "assigned" and tr.conv.agent == "a"
    [ev] = tr.conv.outbox
    assert (ev.msg_id, ev.type, ev.data) == ("x:t:c1:7:0", "assigned", {"agent": {"id": "a"}})
    assert tr.slot == SlotChange("a", "assigned")


def test_accept_by_offered_agent_assigns():
    tr = accept_offer(offered("a"), 9, "a")
    assert tr is not None and tr.conv.state == "assigned" and tr.conv.offer is None
    assert [e.type for e in tr.conv.outbox] == ["assigned"] and tr.slot == SlotChange("a", "assigned")
    assert accept_offer(assigned("a"), 10, "a") is None  # redelivered
    with pytest.raises(RouteRefused) as refused:
        accept_offer(offered("a"), 9, "a", agent_status="offline")  # G5: never assign to offline
    assert refused.value.code == "forbidden"
    with pytest.raises(RouteRefused) as refused:
        accept_offer(offered("a"), 9, "b")
    assert refused.value.code == "not_found"
    with pytest.raises(RouteRefused):
        accept_offer(conv(), 9, "a")  # the offer expired meanwhile


def test_decline_and_expiry_requeue_in_place_and_remember_the_agent():
    tr = decline_offer(offered("a"), 9, "a")
    assert tr is not None and tr.conv.state == "queued" and tr.conv.declined == ["a"] and tr.conv.queued_at == 10
    assert tr.conv.outbox == [] and tr.slot == SlotChange("a", None)
    assert decline_offer(tr.conv, 10, "a") is None  # redelivered
    assert expire_offer(offered("a", expires_at=5000), 9, now=5000) is None
    lapsed = expire_offer(offered("a", expires_at=5000), 9, now=5001)
    assert lapsed is not None and lapsed.conv.declined == ["a"] and lapsed.slot == SlotChange("a", None)


def test_close_by_customer_agent_or_supervisor():
    by_customer = close_conv(assigned("a"), 4, Actor("cu", "customer"), now=900)
    assert by_customer is not None and by_customer.conv.state == "closed" and by_customer.conv.closed_at == 900
    [ev] = by_customer.conv.outbox
    assert ev.data == {"by": {"id": "cu", "role": "customer"}, "reason": "customer_closed"}
    assert by_customer.slot == SlotChange("a", None) and by_customer.conv.agent == "a"
    by_agent = close_conv(assigned("a"), 4, Actor("a", "agent"), now=900)
    assert by_agent.conv.outbox[0].data["reason"] == "agent_closed"
    assert close_conv(conv(), 4, Actor("boss", "supervisor"), now=900).slot is None
    offered_close = close_conv(offered("b"), 4, Actor("cu", "customer"), now=900)
    assert offered_close.slot == SlotChange("b", None)
    assert close_conv(by_customer.conv, 5, Actor("cu", "customer"), now=901) is None
    for stranger in (Actor("zz", "customer"), Actor("b", "agent")):
        with pytest.raises(RouteRefused):
            close_conv(assigned("a"), 4, stranger, now=900)
    system = close_conv(conv(), 4, None, now=900, reason="abandoned")
    assert system.conv.outbox[0].data == {"by": None, "reason": "abandoned"}


def test_transfer_requeues_in_new_queue():
    tr = transfer_conv(assigned("a"), 6, Actor("a", "agent"), "tier2", now=2000)
    assert tr.conv.state == "queued" and tr.conv.queue == "tier2" and tr.conv.queued_at == 2000
    assert tr.conv.agent is None and tr.conv.declined == []
    [ev] = tr.conv.outbox
    assert ev.type == "transferred" and ev.data == {"from_queue": "billing", "to_queue": "tier2", "by": {"id": "a"}}
    assert tr.slot == SlotChange("a", None)
    with pytest.raises(RouteRefused) as refused:
        transfer_conv(assigned("a"), 6, Actor("b", "agent"), "tier2", now=2000)
    assert refused.value.code == "not_found"
    closed = close_conv(assigned("a"), 4, Actor("a", "agent"), now=900).conv
    with pytest.raises(RouteRefused) as refused:
        transfer_conv(closed, 6, Actor("a", "agent"), "tier2", now=2000)
    assert refused.value.code == "forbidden"


def test_agent_lost_requeues_with_unassigned_and_notice():
    tr = agent_lost(assigned("a"), 12, "a", now=3000)
    assert tr is not None and tr.conv.state == "queued" and tr.conv.agent is None and tr.conv.queued_at == 3000
    assert [(e.msg_id, e.type, e.data) for e in tr.conv.outbox] == [
        ("x:t:c1:12:0", "unassigned", {"agent": {"id": "a"}, "reason": "agent_offline"}),
        ("x:t:c1:12:1", "notice", {"level": "warning", "text": AGENT_OFFLINE_NOTICE}),
    ]
    quiet = agent_lost(offered("a"), 12, "a", now=3000)
    assert quiet is not None and quiet.conv.state == "queued" and quiet.conv.outbox == []
    assert agent_lost(assigned("b"), 12, "a", now=3000) is None


def test_is_lost_after_grace_only():
    off = agent("a", status="offline", since=1000)
    assert not is_lost(off, None, now=1300, grace_ms=300, ttl_ms=500)
    assert is_lost(off, None, now=1301, grace_ms=300, ttl_ms=500)
    assert not is_lost(agent("a", since=0), None, now=99999, grace_ms=300, ttl_ms=500)
    assert not is_lost(None, None, now=99999, grace_ms=300, ttl_ms=500)


def test_grace_runs_from_when_heartbeats_lapsed_not_from_a_late_sweep():
    # last heartbeat at 100, TTL 500: lapsed at 600 although the sweep wrote offline at 1000
    off = agent("a", status="offline", since=1000)
    assert not is_lost(off, 100, now=900, grace_ms=300, ttl_ms=500)
    assert is_lost(off, 100, now=901, grace_ms=300, ttl_ms=500)


def test_route_op_parsing_and_dispatch():
    raw = {"op": "accept", "tenant": "t", "conv": "c1", "by": {"id": "a", "role": "agent"}}
    op = parse_route_op(raw)
    assert op == RouteOp("accept", "t", "c1", Actor("a", "agent"))
    assert parse_route_op({**raw, "op": "steal"}) is None
    assert parse_route_op({**raw, "by": {"id": "a", "role": "god"}}) is None
    assert parse_route_op({**raw, "op": "transfer"}) is None  # needs a queue
    assert parse_route_op({**raw, "tenant": 5}) is None
    assert apply_route_op(offered("a"), 3, op, now=1).conv.state == "assigned"
    with pytest.raises(RouteRefused):
        apply_route_op(None, 0, op, now=1)
    with pytest.raises(RouteRefused):
        apply_route_op(offered("a"), 3, RouteOp("accept", "t", "c1", Actor("a", "customer")), now=1)


def test_transitions_do_not_mutate_their_input():
    original = offered("a")
    snapshot = original.encode()
    accept_offer(original, 1, "a")
    decline_offer(original, 1, "a")
    close_conv(original, 1, Actor("cu", "customer"), now=5)
    assert original.encode() == snapshot
