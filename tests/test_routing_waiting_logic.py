"""Waiting-room rules without NATS: positions, ETA, staffing notices, escalation, abandonment, owners."""

from __future__ import annotations

from parley.core.config import QueuePolicy
from parley.core.records import AgentRecord, ConvRecord, Offer, PendingEvent
from parley.router.logic import accept_offer
from parley.router.waiting import (
    ALL_CLEAR,
    NO_AGENTS,
    NOTICE_MIN_GAP_MS,
    STAFFING_DEBOUNCE_MS,
    HandlingTimes,
    PositionFrames,
    Staffing,
    abandon_conv,
    escalate_conv,
    escalation_target,
    estimate_eta_s,
    is_abandoned,
    notify_wait,
    queue_lines,
    queue_owner,
    queue_staffing,
    wait_notice_due,
)


def conv(name: str = "c1", **changes) -> ConvRecord:
    rec = ConvRecord(conv=name, tenant="t", customer="cu", queue="billing", opened_at=10, queued_at=10)
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def agent(name: str, **changes) -> AgentRecord:
    rec = AgentRecord(agent=name, tenant="t", status="online", since=100, skills=["billing"], max_chats=2)
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def test_lines_are_fifo_per_queue_and_count_offered_conversations():
    convs = [conv("b", queued_at=20), conv("a", queued_at=20), conv("x", queued_at=5, state="offered"),
             conv("s", queue="sales"), conv("done", state="assigned"), conv("gone", state="closed")]
    lines = queue_lines(convs)
    assert [c.conv for c in lines[("t", "billing")]] == ["x", "a", "b"]
    assert [c.conv for c in lines[("t", "sales")]] == ["s"]


def test_staffing_counts_online_agents_full_or_not_and_since_when():
    agents = [agent("a", since=300, convs={"x": "assigned", "y": "offer"}), agent("b", since=200, max_chats=3),
              agent("away", status="away", since=900), agent("other", skills=["sales"], since=1)]
    s = queue_staffing(agents, "t", "billing")
    assert (s.online, s.capacity, s.free, s.since) == (2, 5, 3, 200)
    gone = queue_staffing([agent("a", status="offline", since=700), agent("b", status="away", since=500)], "t", "billing")
    assert (gone.online, gone.since) == (0, 700)
    assert queue_staffing([], "t", "billing").since == 0


def test_eta_from_free_slots_capacity_and_handling_time():
    staffed = Staffing(online=2, capacity=4, free=1, since=0)
    assert estimate_eta_s(1, staffed, 60_000) == 0  # a free slot: served at once
    assert estimate_eta_s(2, staffed, 60_000) == 15  # 1 ahead of a slot, 4 slots turn over per minute
    assert estimate_eta_s(9, staffed, 60_000) == 120
    assert estimate_eta_s(3, staffed, None) is None  # no handling time observed yet
    assert estimate_eta_s(3, Staffing(0, 0, 0, 0), 60_000) is None  # nobody online: unknown


def test_handling_times_from_assignment_to_release():
    h = HandlingTimes(samples=2)
    h.on_change("t.c1", conv(), conv(state="assigned", agent="a"), now=1000)
    h.on_change("t.c1", conv(state="assigned", agent="a"), conv(state="assigned", agent="a"), now=1500)
    h.on_change("t.c1", conv(state="assigned", agent="a"), conv(state="closed", agent="a"), now=4000)
    assert h.average_ms("t", "billing") == 3000
    # re-assigned to another agent (requeue then assign) counts as two handlings
    h.on_change("t.c2", None, conv("c2", state="assigned", agent="a"), now=0)
    h.on_change("t.c2", conv("c2", state="assigned", agent="a"), conv("c2", state="assigned", agent="b"), now=1000)
    assert h.average_ms("t", "billing") == 2000  # window of 2: 3000 and 1000
    assert h.average_ms("t", "sales") is None


def test_position_frames_on_entry_and_change_at_most_once_a_second():
    f = PositionFrames(gap_ms=1000)
    assert f.due("k", "q", 3, now=0)
    f.sent("k", "q", 3, now=0)
    assert not f.due("k", "q", 3, now=5000)  # unchanged: nothing to say
    assert not f.due("k", "q", 2, now=500)  # changed, but within the second
    assert f.due("k", "q", 2, now=1000)
    f.sent("k", "q", 2, now=1000)
    assert f.due("k", "other", 1, now=2000)  # entered another queue
    f.keep_only(set())
    assert f.due("k", "q", 2, now=1001)  # forgotten: a new owner speaks at once


def test_no_agent_warning_after_debounce_then_all_clear_then_rate_limited():
    now = 1_000_000
    nobody = Staffing(online=0, capacity=0, free=0, since=now - STAFFING_DEBOUNCE_MS + 1)
    assert wait_notice_due(conv(), nobody, now) is None  # too fresh: maybe a flap
    nobody = Staffing(online=0, capacity=0, free=0, since=now - STAFFING_DEBOUNCE_MS)
    assert wait_notice_due(conv(), nobody, now) == NO_AGENTS
    told = notify_wait(conv(), 7, NO_AGENTS, now).conv
    assert told.wait_notice == NO_AGENTS and told.wait_notice_at == now
    assert [(p.msg_id, p.type, p.data["level"]) for p in told.outbox] == [("x:t:c1:7:0", "notice", "warning")]
    told.outbox = []
    assert wait_notice_due(told, nobody, now + 10) is None  # said once
    back = Staffing(online=1, capacity=2, free=2, since=now + 100)
    assert wait_notice_due(told, back, now + 100 + STAFFING_DEBOUNCE_MS - 1) is None
    assert wait_notice_due(told, back, now + 100 + STAFFING_DEBOUNCE_MS) == ALL_CLEAR
    clear = notify_wait(told, 8, ALL_CLEAR, now + 3000).conv
    clear.outbox = []
    assert clear.outbox == [] and clear.wait_notice == ALL_CLEAR
    gone_again = Staffing(online=0, capacity=0, free=0, since=now + 4000)
    assert wait_notice_due(clear, gone_again, now + 3000 + NOTICE_MIN_GAP_MS - 1) is None  # flapping: quiet
    assert wait_notice_due(clear, gone_again, now + 3000 + NOTICE_MIN_GAP_MS) == NO_AGENTS


def test_notices_only_for_waiting_conversations_and_assignment_clears_silently():
    nobody = Staffing(online=0, capacity=0, free=0, since=0)
    assert wait_notice_due(conv(state="assigned", agent="a"), nobody, 10**9) is None
    assert wait_notice_due(conv(outbox=[PendingEvent("x", "notice", {})]), nobody, 10**9) is None
    offered = conv(state="offered", offer=Offer("a", 10**10), wait_notice=NO_AGENTS)
    done = accept_offer(offered, 3, "a")
    assert done.conv.wait_notice is None and [p.type for p in done.conv.outbox] == ["assigned"]


def test_escalation_after_max_wait_to_overflow():
    policy = QueuePolicy(max_wait_s=60, overflow="tier2")
    assert escalation_target(conv(queued_at=0), policy, now=60_000) is None
    assert escalation_target(conv(queued_at=0), policy, now=60_001) == "tier2"
    assert escalation_target(conv(queued_at=0, state="offered"), policy, now=99_999) is None  # offer finishes first
    assert escalation_target(conv(queued_at=0), QueuePolicy(max_wait_s=60), now=99_999) is None  # nowhere to go
    assert escalation_target(conv(queued_at=0, queue="tier2"), policy, now=99_999) is None  # already there
    assert escalation_target(conv(queued_at=0), QueuePolicy(max_wait_s=1, overflow="bad queue"), 99_999) is None
    moved = escalate_conv(conv(queued_at=0, declined=["a"]), 4, "tier2", now=70_000)
    assert moved.slot is None
    assert (moved.conv.queue, moved.conv.queued_at, moved.conv.declined) == ("tier2", 70_000, [])
    assert [(p.type, p.data) for p in moved.conv.outbox] == [("escalated", {"to_queue": "tier2", "reason": "max_wait"})]


def test_abandonment_counts_from_the_last_sign_of_the_customer():
    c = conv(opened_at=1000)
    assert not is_abandoned(c, None, now=1000 + 600_000, abandon_ms=600_000)
    assert is_abandoned(c, None, now=1001 + 600_000, abandon_ms=600_000)
    assert not is_abandoned(c, 500_000, now=1001 + 600_000, abandon_ms=600_000)  # seen later
    assert not is_abandoned(conv(state="assigned", agent="a"), None, now=10**9, abandon_ms=1)
    offered = conv(state="offered", offer=Offer("a", 5))
    closed = abandon_conv(offered, 9, now=10**9)
    assert closed.conv.state == "closed" and closed.slot is not None and closed.slot.agent == "a"
    assert [(p.type, p.data) for p in closed.conv.outbox] == [("closed", {"by": None, "reason": "abandoned"})]


def test_queue_owner_is_stable_and_moves_only_the_leavers_queues():
    members = ["r1", "r2", "r3"]
    queues = [f"q{i}" for i in range(200)]
    owners = {q: queue_owner(members, "t", q) for q in queues}
    assert set(owners.values()) == set(members)
    assert owners == {q: queue_owner(list(reversed(members)), "t", q) for q in queues}
    after = {q: queue_owner(["r1", "r3"], "t", q) for q in queues}
    assert all(after[q] == owners[q] for q in queues if owners[q] != "r2")
    assert queue_owner([], "t", "q") is None
