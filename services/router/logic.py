"""Routing decisions as pure functions over ``ConvRecord``/``AgentRecord`` (no I/O).

A conversation transition returns a ``ConvTransition``: the new conversation record (with the
outbox of chain events it owes, msg ids ``x:<tenant>:<conv>:<revision>:<index>`` where the
revision is the one the compare-and-set replaces, so a retried publish is deduplicated) and the
change it implies for one agent's capacity slots. The adapter stores the two records with two
compare-and-sets in the order that never under-counts an agent's load: slots are *taken* before
the conversation moves (offer, auto-assign) and *released* after it moved (everything else).

Agent choice: among eligible agents, the one idle longest — smallest ``idle_since`` (the last
time the agent's load changed, taking or releasing a slot), ties broken by agent id — so work is
spread round-robin-like instead of filling the first agent up to ``max_chats``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from parley.core import subjects
from parley.core.records import AgentRecord, ConvRecord, Offer, PendingEvent

OFFER_SLOT = "offer"
ASSIGNED_SLOT = "assigned"
AGENT_OFFLINE_NOTICE = "Your agent was disconnected. We are connecting you to another agent."
ROUTE_OPS = ("accept", "decline", "close", "transfer")
ROLES = ("customer", "agent", "supervisor")


class RouteRefused(Exception):
    """A routing command that may not be applied; ``code`` is the wire error code."""

    def __init__(self, code: str, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


@dataclass(frozen=True)
class SlotChange:
    """Set ``agent``'s slot for the conversation to ``kind`` (``offer``/``assigned``), or free it."""

    agent: str
    kind: str | None


@dataclass
class ConvTransition:
    conv: ConvRecord
    slot: SlotChange | None = None


@dataclass(frozen=True)
class Actor:
    id: str
    role: str

    def as_data(self) -> dict[str, str]:
        return {"id": self.id, "role": self.role}


@dataclass(frozen=True)
class RouteOp:
    """A command from the ROUTE work queue (``route.<tenant>.<conv>``)."""

    op: str
    tenant: str
    conv: str
    by: Actor
    queue: str | None = None


def parse_route_op(body: Any) -> RouteOp | None:
    """Validate a ROUTE payload; None when it is malformed (dead-lettered, not retried)."""
    if not isinstance(body, dict) or body.get("op") not in ROUTE_OPS:
        return None
    by = body.get("by")
    if not isinstance(by, dict) or not subjects.valid_id(by.get("id")) or by.get("role") not in ROLES:
        return None
    tenant, conv, queue = body.get("tenant"), body.get("conv"), body.get("queue")
    if not (isinstance(tenant, str) and isinstance(conv, str) and subjects.valid_id(tenant) and subjects.valid_id(conv)):
        return None
    if body["op"] == "transfer" and not subjects.valid_id(queue):
        return None
    return RouteOp(op=body["op"], tenant=tenant, conv=conv, by=Actor(by["id"], by["role"]), queue=queue)


# --- choosing an agent ---------------------------------------------------------------------------
def can_take(agent: AgentRecord, conv: ConvRecord) -> bool:
    """May this agent get (an offer of) this conversation now? The G5 check, also inside the CAS."""
    return (
        agent.tenant == conv.tenant
        and agent.status == "online"
        and conv.queue in agent.skills
        and agent.has_capacity
        and conv.conv not in agent.convs
    )


def eligible_agents(conv: ConvRecord, agents: Iterable[AgentRecord]) -> list[AgentRecord]:
    """Agents who may get ``conv``, best first (longest idle, then id).

    Agents in ``conv.declined`` (they declined it or let its offer lapse during this wait) are
    eligible only when nobody else is.
    """
    able = sorted((a for a in agents if can_take(a, conv)), key=lambda a: (a.idle_since, a.agent))
    fresh = [a for a in able if a.agent not in conv.declined]
    return fresh or able


def choose_agent(conv: ConvRecord, agents: Iterable[AgentRecord]) -> AgentRecord | None:
    best = eligible_agents(conv, agents)
    return best[0] if best else None


def waiting_in_order(convs: Iterable[ConvRecord]) -> list[ConvRecord]:
    """Conversations ready to route, FIFO by the time they entered their queue.

    A record with a pending outbox is skipped until it is flushed, so its events reach the chain
    before the next transition's.
    """
    return sorted((c for c in convs if c.state == "queued" and not c.outbox), key=lambda c: (c.queued_at, c.conv))


# --- capacity slots ------------------------------------------------------------------------------
def take_slot(agent: AgentRecord, conv: ConvRecord, kind: str, now: int) -> AgentRecord | None:
    """The agent record with a slot held for ``conv``, or None when the agent may not take it."""
    if not can_take(agent, conv):
        return None
    new = copy.deepcopy(agent)
    new.convs[conv.conv] = kind
    new.idle_since = now
    return new


def apply_slot(agent: AgentRecord, conv_id: str, kind: str | None, now: int) -> AgentRecord | None:
    """Set or free a slot without capacity checks: the conversation already moved (or didn't)."""
    if agent.convs.get(conv_id) == kind:
        return None
    new = copy.deepcopy(agent)
    if kind is None:
        del new.convs[conv_id]
        new.idle_since = now
    else:
        new.convs[conv_id] = kind
    return new


def slot_for(conv: ConvRecord | None, agent: str) -> str | None:
    """The slot ``agent`` should hold for ``conv`` according to the conversation record."""
    if conv is None:
        return None
    if conv.state == "offered" and conv.offer is not None and conv.offer.agent == agent:
        return OFFER_SLOT
    if conv.state == "assigned" and conv.agent == agent:
        return ASSIGNED_SLOT
    return None


def holder(conv: ConvRecord) -> str | None:
    """The agent holding a slot for this conversation, if any."""
    if conv.state == "offered" and conv.offer is not None:
        return conv.offer.agent
    if conv.state == "assigned":
        return conv.agent
    return None


def slot_mismatches(
    convs: dict[str, ConvRecord], agents: Iterable[AgentRecord]
) -> list[tuple[str, str, str, str | None]]:
    """``(tenant, agent, conv, wanted kind)`` where an agent's slots disagree with the conversations.

    ``convs`` is keyed by ``<tenant>.<conv>``. A router that died between its two compare-and-sets
    leaves such a disagreement; the adapter repairs one only after it persisted for a while,
    because every transition passes through one for a few milliseconds.
    """
    out: list[tuple[str, str, str, str | None]] = []
    holders: dict[tuple[str, str], set[str]] = {}
    for conv in convs.values():
        agent = holder(conv)
        if agent is not None:
            holders.setdefault((conv.tenant, agent), set()).add(conv.conv)
    for agent in agents:
        for conv_id, kind in agent.convs.items():
            wanted = slot_for(convs.get(subjects.kv_key(agent.tenant, conv_id)), agent.agent)
            if wanted != kind:
                out.append((agent.tenant, agent.agent, conv_id, wanted))
        for conv_id in holders.get((agent.tenant, agent.agent), set()) - set(agent.convs):
            out.append((agent.tenant, agent.agent, conv_id, slot_for(convs[subjects.kv_key(agent.tenant, conv_id)], agent.agent)))
    return out


# --- conversation transitions --------------------------------------------------------------------
def with_events(conv: ConvRecord, revision: int, *events: tuple[str, dict[str, Any]]) -> ConvRecord:
    """A copy of ``conv`` whose outbox holds ``events``, with msg ids derived from ``revision``."""
    new = copy.deepcopy(conv)
    new.outbox = [
        PendingEvent(msg_id=f"x:{conv.tenant}:{conv.conv}:{revision}:{i}", type=type_, data=data)
        for i, (type_, data) in enumerate(events)
    ]
    return new


def offer_conv(conv: ConvRecord, revision: int, agent: str, now: int, timeout_ms: int) -> ConvTransition:
    assert conv.state == "queued", conv.state
    new = with_events(conv, revision)
    new.state = "offered"
    new.offer = Offer(agent=agent, expires_at=now + timeout_ms)
    return ConvTransition(new, SlotChange(agent, OFFER_SLOT))


def auto_assign_conv(conv: ConvRecord, revision: int, agent: str) -> ConvTransition:
    assert conv.state == "queued", conv.state
    return _assigned(conv, revision, agent)


def _assigned(conv: ConvRecord, revision: int, agent: str) -> ConvTransition:
    new = with_events(conv, revision, ("assigned", {"agent": {"id": agent}}))
    new.state = "assigned"
    new.agent = agent
    new.offer = None
    new.wait_notice = None  # being served is the all-clear of any "no agent online" warning
    return ConvTransition(new, SlotChange(agent, ASSIGNED_SLOT))


def _offered_to(conv: ConvRecord, agent: str) -> bool:
    return conv.state == "offered" and conv.offer is not None and conv.offer.agent == agent


def accept_offer(conv: ConvRecord, revision: int, agent: str, agent_status: str = "online") -> ConvTransition | None:
    """None when already done (a redelivered accept); RouteRefused when the offer is gone.

    G5 allows no assignment to an agent who is not ``online`` now, even for an offer made while
    it was: such an accept is refused and the offer left to expire (or be accepted once online).
    """
    if _offered_to(conv, agent):
        if agent_status != "online":
            raise RouteRefused("forbidden", f"you are {agent_status}: set your status to online to accept")
        return _assigned(conv, revision, agent)
    if conv.state == "assigned" and conv.agent == agent:
        return None
    raise RouteRefused("not_found", "no open offer of this conversation for you")


def return_offer(conv: ConvRecord, revision: int, agent: str) -> ConvTransition:
    """Declined or expired: back to the queue (same place), and the agent is asked last next time."""
    assert _offered_to(conv, agent)
    new = with_events(conv, revision)
    new.state = "queued"
    new.offer = None
    if agent not in new.declined:
        new.declined.append(agent)
    return ConvTransition(new, SlotChange(agent, None))


def decline_offer(conv: ConvRecord, revision: int, agent: str) -> ConvTransition | None:
    if _offered_to(conv, agent):
        return return_offer(conv, revision, agent)
    if agent in conv.declined:
        return None  # a redelivered decline
    raise RouteRefused("not_found", "no open offer of this conversation for you")


def expire_offer(conv: ConvRecord, revision: int, now: int) -> ConvTransition | None:
    if conv.state != "offered" or conv.offer is None or now <= conv.offer.expires_at:
        return None
    return return_offer(conv, revision, conv.offer.agent)


def close_conv(conv: ConvRecord, revision: int, by: Actor | None, now: int, reason: str | None = None) -> ConvTransition | None:
    """Close an open conversation; ``by`` None is the system (e.g. ``abandoned``)."""
    if by is not None:
        _check_may_close(conv, by)
    if conv.state == "closed":
        return None
    if reason is None:
        reason = "customer_closed" if by is not None and by.role == "customer" else "agent_closed"
    released = holder(conv)
    new = with_events(conv, revision, ("closed", {"by": by.as_data() if by else None, "reason": reason}))
    new.state = "closed"
    new.offer = None
    new.closed_at = now
    return ConvTransition(new, SlotChange(released, None) if released else None)


def _check_may_close(conv: ConvRecord, by: Actor) -> None:
    if by.role == "supervisor":
        return
    if by.role == "customer" and by.id == conv.customer:
        return
    if by.role == "agent" and conv.agent == by.id and conv.state in ("assigned", "closed"):
        return
    raise RouteRefused("not_found", "no such conversation")


def transfer_conv(conv: ConvRecord, revision: int, by: Actor, to_queue: str, now: int) -> ConvTransition:
    if not (by.role == "agent" and conv.agent == by.id and conv.state in ("assigned", "closed")):
        raise RouteRefused("not_found", "no such conversation")
    if conv.state != "assigned":
        raise RouteRefused("forbidden", "only an assigned conversation can be transferred")
    new = with_events(conv, revision, ("transferred", {"from_queue": conv.queue, "to_queue": to_queue, "by": {"id": by.id}}))
    new.state = "queued"
    new.queue = to_queue
    new.agent = None
    new.offer = None
    new.queued_at = now
    new.declined = []
    return ConvTransition(new, SlotChange(by.id, None))


def agent_lost(conv: ConvRecord, revision: int, agent: str, now: int) -> ConvTransition | None:
    """The agent is offline past the grace period: requeue what it held.

    An assigned conversation gets ``unassigned`` plus a notice to the customer and re-enters the
    queue at its back (``queued_at`` = now: it waits in this queue anew, as after a transfer); an
    outstanding offer simply returns to the queue, without events (offers are not chain events).
    """
    if _offered_to(conv, agent):
        new = with_events(conv, revision)
        new.state = "queued"
        new.offer = None
        return ConvTransition(new, SlotChange(agent, None))
    if conv.state == "assigned" and conv.agent == agent:
        new = with_events(
            conv,
            revision,
            ("unassigned", {"agent": {"id": agent}, "reason": "agent_offline"}),
            ("notice", {"level": "warning", "text": AGENT_OFFLINE_NOTICE}),
        )
        new.state = "queued"
        new.agent = None
        new.queued_at = now
        new.declined = []
        return ConvTransition(new, SlotChange(agent, None))
    return None


def is_lost(agent: AgentRecord | None, last_heartbeat: int | None, now: int, grace_ms: int, ttl_ms: int) -> bool:
    """Offline for longer than the requeue grace: a shorter disconnect keeps its conversations.

    The grace runs from the moment the heartbeats lapsed (last heartbeat + TTL), not from when a
    sweep noticed it, so that conversations are requeued within TTL + grace of the agent's last
    sign of life (G5), however late the sweep ran.
    """
    if agent is None or agent.status != "offline":
        return False
    lapsed_at = agent.since
    if last_heartbeat is not None:
        lapsed_at = min(lapsed_at, last_heartbeat + ttl_ms)
    return now - lapsed_at > grace_ms


def apply_route_op(
    conv: ConvRecord | None, revision: int, op: RouteOp, now: int, agent_status: str = "online"
) -> ConvTransition | None:
    """The transition a ROUTE command asks for; None when it is already applied.

    ``agent_status`` is the stored status of ``op.by`` (needed for ``accept`` only).
    """
    if conv is None or conv.tenant != op.tenant:
        raise RouteRefused("not_found", "no such conversation")
    if op.op in ("accept", "decline") and op.by.role != "agent":
        raise RouteRefused("not_found", "no open offer of this conversation for you")
    if op.op == "accept":
        return accept_offer(conv, revision, op.by.id, agent_status)
    if op.op == "decline":
        return decline_offer(conv, revision, op.by.id)
    if op.op == "close":
        return close_conv(conv, revision, op.by, now)
    assert op.queue is not None
    return transfer_conv(conv, revision, op.by, op.queue, now)
