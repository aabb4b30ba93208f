"""What happens to a conversation while it waits, as pure functions (no I/O).

- **Position**: the waiting conversations of a queue (``queued`` and ``offered``) in FIFO order of
  ``queued_at`` (ties by id); position 1 is served next.
- **ETA** (``estimate_eta_s``): the online agents serving the queue have ``capacity`` slots in all,
  ``free`` of them free now; each slot frees up once per average handling time ``H`` (the mean of
  the last ``HANDLING_SAMPLES`` conversations of this queue, from assignment to release: close,
  transfer or re-queue), so the queue drains at ``capacity / H`` conversations per second and the
  first ``free`` positions are served at once: ``eta = ceil(max(0, position - free) * H / capacity)``.
  ``None`` (unknown) when no agent of the queue is online or no handling time was observed yet.
- **Staffing notices** (SPEC G7): a waiting conversation whose queue has had no online agent for
  ``STAFFING_DEBOUNCE_MS`` gets a persisted ``notice`` (warning) once; when an agent has been
  online for ``STAFFING_DEBOUNCE_MS`` again, an all-clear ``notice`` (info). A new warning comes
  no sooner than ``NOTICE_MIN_GAP_MS`` after the previous notice, so a flapping queue costs a
  customer at most one warning/all-clear pair per that interval. Being assigned clears it silently.
- **Escalation**: a ``queued`` conversation waiting longer than its queue's ``max_wait_s`` moves to
  the queue's ``overflow`` with an ``escalated`` event and waits there anew (an outstanding offer
  is allowed to finish first).
- **Abandonment**: a waiting conversation whose customer has shown no connection for
  ``PARLEY_ABANDON_S`` — counted from the later of ``opened_at`` (the customer was connected to
  open it) and the last ``seen`` a gateway reported — is closed, reason ``abandoned``, ``by`` null.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass

from parley.core import subjects
from parley.core.config import QueuePolicy
from parley.core.records import AgentRecord, ConvRecord

from .logic import ConvTransition, close_conv, with_events

WAITING_STATES = ("queued", "offered")
NO_AGENT_NOTICE = (
    "No agent for this queue is online right now. You keep your place in the queue "
    "and will be connected as soon as an agent is available."
)
ALL_CLEAR_NOTICE = "An agent for this queue is online again. You will be connected shortly."
LONG_WAIT_NOTICE = (
    "Sorry for the wait: all our agents are busy. You keep your place in the queue and will be "
    "connected as soon as an agent is free."
)
NO_AGENTS = "no_agents"
ALL_CLEAR = "all_clear"
LONG_WAIT = "long_wait"
STAFFING_DEBOUNCE_MS = 2000
NOTICE_MIN_GAP_MS = 30_000
HANDLING_SAMPLES = 50
POSITION_FRAME_GAP_MS = 1000


# --- queue lines and positions -------------------------------------------------------------------
def is_waiting(conv: ConvRecord) -> bool:
    return conv.state in WAITING_STATES


def queue_lines(convs: Iterable[ConvRecord]) -> dict[tuple[str, str], list[ConvRecord]]:
    """``(tenant, queue)`` → its waiting conversations, first in line first."""
    lines: dict[tuple[str, str], list[ConvRecord]] = defaultdict(list)
    for conv in convs:
        if is_waiting(conv):
            lines[(conv.tenant, conv.queue)].append(conv)
    for line in lines.values():
        line.sort(key=lambda c: (c.queued_at, c.conv))
    return lines


@dataclass(frozen=True)
class Staffing:
    """The online agents serving one queue (full or not), and since when that held."""

    online: int
    capacity: int  # their max_chats, summed
    free: int  # their free slots
    # online > 0: since when the queue has had an online agent continuously;
    # online == 0: since when it has had none (0 when no agent ever served it).
    since: int


def queue_staffing(agents: Iterable[AgentRecord], tenant: str, queue: str) -> Staffing:
    serving = [a for a in agents if a.tenant == tenant and queue in a.skills]
    online = [a for a in serving if a.status == "online"]
    if online:
        return Staffing(
            online=len(online),
            capacity=sum(a.max_chats for a in online),
            free=sum(max(0, a.max_chats - a.load) for a in online),
            since=min(a.since for a in online),
        )
    # An agent's ``since`` is its last status change, no earlier than when it stopped being online.
    return Staffing(online=0, capacity=0, free=0, since=max((a.since for a in serving), default=0))


def staffing_by_queue(agents: Iterable[AgentRecord], lines: Iterable[tuple[str, str]]) -> dict[tuple[str, str], Staffing]:
    by_tenant: dict[str, list[AgentRecord]] = defaultdict(list)
    for agent in agents:
        by_tenant[agent.tenant].append(agent)
    return {(t, q): queue_staffing(by_tenant.get(t, []), t, q) for t, q in lines}


# --- ETA -----------------------------------------------------------------------------------------
class HandlingTimes:
    """Recent handling times per queue: assignment to release, as observed by this router."""

    def __init__(self, samples: int = HANDLING_SAMPLES) -> None:
        self._samples = samples
        self._times: dict[tuple[str, str], deque[int]] = {}
        self._started: dict[str, tuple[int, str, str]] = {}  # conv key → (assigned at, tenant, queue)

    def observe(self, tenant: str, queue: str, ms: int) -> None:
        self._times.setdefault((tenant, queue), deque(maxlen=self._samples)).append(max(0, ms))

    def average_ms(self, tenant: str, queue: str) -> float | None:
        times = self._times.get((tenant, queue))
        return sum(times) / len(times) if times else None

    def on_change(self, key: str, old: ConvRecord | None, new: ConvRecord | None, now: int) -> None:
        """Feed from the conversation records' changes (a ``KvView`` listener)."""
        old_agent = old.agent if old is not None and old.state == "assigned" else None
        new_agent = new.agent if new is not None and new.state == "assigned" else None
        if old_agent == new_agent:
            return
        started = self._started.pop(key, None)
        if old_agent is not None and started is not None:
            self.observe(started[1], started[2], now - started[0])
        if new is not None and new_agent is not None:
            self._started[key] = (now, new.tenant, new.queue)


def estimate_eta_s(position: int, staffing: Staffing, handling_ms: float | None) -> int | None:
    if staffing.online == 0 or staffing.capacity == 0 or handling_ms is None:
        return None
    behind_free = max(0, position - staffing.free)
    return math.ceil(behind_free * handling_ms / staffing.capacity / 1000)


class PositionFrames:
    """Which ``queue`` frames are due: on entering a queue and on a position change, ≤ 1/s each."""

    def __init__(self, gap_ms: int = POSITION_FRAME_GAP_MS) -> None:
        self.gap_ms = gap_ms
        self._sent: dict[str, tuple[str, int, int]] = {}  # conv key → (queue, position, sent at)

    def due(self, key: str, queue: str, position: int, now: int) -> bool:
        last = self._sent.get(key)
        if last is None:
            return True
        if (last[0], last[1]) == (queue, position):
            return False
        return now - last[2] >= self.gap_ms

    def sent(self, key: str, queue: str, position: int, now: int) -> None:
        self._sent[key] = (queue, position, now)

    def keep_only(self, keys: set[str]) -> None:
        """Forget conversations no longer waiting (or no longer ours)."""
        for key in [k for k in self._sent if k not in keys]:
            del self._sent[key]


def queue_frame(conv: ConvRecord, position: int, eta_s: int | None) -> dict[str, object]:
    return {"t": "queue", "conv": conv.conv, "position": position, "eta_s": eta_s}


# --- staffing notices ----------------------------------------------------------------------------
def wait_notice_due(conv: ConvRecord, staffing: Staffing, now: int) -> str | None:
    """``no_agents``/``all_clear`` when that notice is owed to this waiting conversation now."""
    if not is_waiting(conv) or conv.outbox:
        return None
    settled = now - staffing.since >= STAFFING_DEBOUNCE_MS
    if staffing.online == 0:
        if conv.wait_notice == NO_AGENTS or not settled:
            return None
        if conv.wait_notice_at and now - conv.wait_notice_at < NOTICE_MIN_GAP_MS:
            return None
        return NO_AGENTS
    if conv.wait_notice == NO_AGENTS and settled:
        return ALL_CLEAR
    return None


def long_wait_due(conv: ConvRecord, now: int, warn_ms: int) -> bool:
    """A customer waiting longer than ``PARLEY_WAIT_WARN_S`` is told so once per stay in a queue,
    unless a staffing notice already spoke to them after that point."""
    if not is_waiting(conv) or conv.outbox or now - conv.queued_at <= warn_ms:
        return False
    return conv.wait_notice_at is None or conv.wait_notice_at < conv.queued_at + warn_ms


def notify_wait(conv: ConvRecord, revision: int, kind: str, now: int) -> ConvTransition:
    if kind == NO_AGENTS:
        event = ("notice", {"level": "warning", "text": NO_AGENT_NOTICE})
    elif kind == LONG_WAIT:
        event = ("notice", {"level": "warning", "text": LONG_WAIT_NOTICE})
    else:
        event = ("notice", {"level": "info", "text": ALL_CLEAR_NOTICE})
    new = with_events(conv, revision, event)
    new.wait_notice = kind
    new.wait_notice_at = now
    return ConvTransition(new)


# --- escalation ----------------------------------------------------------------------------------
def escalation_target(conv: ConvRecord, policy: QueuePolicy, now: int) -> str | None:
    """The overflow queue ``conv`` must move to now, if any."""
    if conv.state != "queued" or conv.outbox or policy.max_wait_s is None or not policy.overflow:
        return None
    if policy.overflow == conv.queue or not subjects.valid_id(policy.overflow):
        return None
    if now - conv.queued_at <= policy.max_wait_s * 1000:
        return None
    return policy.overflow


def escalate_conv(conv: ConvRecord, revision: int, to_queue: str, now: int) -> ConvTransition:
    new = with_events(conv, revision, ("escalated", {"to_queue": to_queue, "reason": "max_wait"}))
    new.queue = to_queue
    new.queued_at = now
    new.declined = []
    return ConvTransition(new)


# --- abandonment ---------------------------------------------------------------------------------
def abandoned_since(conv: ConvRecord, last_seen: int | None) -> int:
    """The last time the customer is known to have had a connection."""
    return max(conv.opened_at, last_seen or 0)


def is_abandoned(conv: ConvRecord, last_seen: int | None, now: int, abandon_ms: int) -> bool:
    return is_waiting(conv) and not conv.outbox and now - abandoned_since(conv, last_seen) > abandon_ms


def abandon_conv(conv: ConvRecord, revision: int, now: int) -> ConvTransition | None:
    return close_conv(conv, revision, None, now, reason="abandoned")


# --- which router speaks for a queue -------------------------------------------------------------
def queue_owner(members: Iterable[str], tenant: str, queue: str) -> str | None:
    """Rendezvous hashing: every router computes the same owner from the same member list, and a
    router leaving or joining moves only the queues it wins or owned."""
    best: tuple[bytes, str] | None = None
    for member in members:
        score = hashlib.blake2b(f"{member}\x00{tenant}\x00{queue}".encode(), digest_size=8).digest()
        if best is None or (score, member) > best:
            best = (score, member)
    return best[1] if best else None
