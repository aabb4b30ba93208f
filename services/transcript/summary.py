"""Per-conversation summary rows for the conversation list: pure, order-independent merging.

Two writers may commit a conversation's events in any order (each holds a different batch), and
a batch may be redelivered. So a summary is not "the last event wins": every field is merged by
a rule that gives the same result in any order and when applied twice —

- ``customer``: from ``opened`` (first non-null wins; there is one ``opened``);
- ``queue``: of the highest-``seq`` event that names one (``opened.queue``,
  ``transferred.to_queue``, ``escalated.to_queue``), kept with that ``queue_seq``;
- ``assign_type``/``agent``: the highest-``seq`` event of ``ASSIGNMENT_EVENTS``; ``agent`` is its
  agent when it is ``assigned``, else null (as the conversation record does);
- ``first_ts``/``last_ts``/``last_seq``: min/max; ``closed_at``: the ``closed`` event's ``ts``.

``state`` is then ``closed`` if ``closed_at`` is set, ``assigned`` if ``assign_type`` is
``assigned``, else ``queued`` (``state_sql``), as ``view.conversation_state`` computes it from rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .storage import TranscriptRow
from .view import ASSIGNMENT_EVENTS


def state_sql(prefix: str = "") -> str:
    """The conversation state as an SQL expression over a ``transcript_convs`` row (alias ``prefix``)."""
    return (f"CASE WHEN {prefix}closed_at IS NOT NULL THEN 'closed' "
            f"WHEN {prefix}assign_type = 'assigned' THEN 'assigned' ELSE 'queued' END")


@dataclass
class SummaryDelta:
    """What one batch says about one conversation; merged into the stored row by the backend."""

    tenant: str
    conv: str
    customer: str | None = None
    queue: str | None = None
    queue_seq: int = 0
    agent: str | None = None
    assign_type: str | None = None
    assign_seq: int = 0
    first_ts: int = 0
    last_ts: int = 0
    last_seq: int = 0
    closed_at: int | None = None

    def params(self) -> tuple[object, ...]:
        return (self.tenant, self.conv, self.customer, self.queue, self.queue_seq, self.agent,
                self.assign_type, self.assign_seq, self.first_ts, self.last_ts, self.last_seq,
                self.closed_at)


def _id_of(value: object) -> str | None:
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return value["id"]
    return None


def _queue_of(row: TranscriptRow) -> str | None:
    key = {"opened": "queue", "transferred": "to_queue", "escalated": "to_queue"}.get(row.type)
    value = row.data.get(key) if key else None
    return value if isinstance(value, str) else None


def summarize(rows: Sequence[TranscriptRow]) -> list[SummaryDelta]:
    """One delta per conversation of the batch, sorted by (tenant, conv): writers lock in one order."""
    deltas: dict[tuple[str, str], SummaryDelta] = {}
    for r in rows:
        d = deltas.get((r.tenant, r.conv))
        if d is None:
            d = deltas[(r.tenant, r.conv)] = SummaryDelta(r.tenant, r.conv, first_ts=r.ts, last_ts=r.ts,
                                                          last_seq=r.seq)
        d.first_ts = min(d.first_ts, r.ts)
        d.last_ts = max(d.last_ts, r.ts)
        d.last_seq = max(d.last_seq, r.seq)
        if r.type == "opened" and d.customer is None:
            d.customer = _id_of(r.data.get("customer"))
        queue = _queue_of(r)
        if queue is not None and r.seq > d.queue_seq:
            d.queue, d.queue_seq = queue, r.seq
        if r.type in ASSIGNMENT_EVENTS and r.seq > d.assign_seq:
            d.assign_type, d.assign_seq = r.type, r.seq
            d.agent = _id_of(r.data.get("agent")) if r.type == "assigned" else None
        if r.type == "closed" and d.closed_at is None:
            d.closed_at = r.ts
    return [deltas[k] for k in sorted(deltas)]


# The merge, in SQL both backends accept (SQLite's two-argument max/min are GREATEST/LEAST in
# PostgreSQL: the backends substitute them). ``t`` is the stored row, ``excluded`` the delta.
MERGE_SET = """
    customer = coalesce(t.customer, excluded.customer),
    queue = CASE WHEN excluded.queue_seq > t.queue_seq THEN excluded.queue ELSE t.queue END,
    queue_seq = {max}(t.queue_seq, excluded.queue_seq),
    agent = CASE WHEN excluded.assign_seq > t.assign_seq THEN excluded.agent ELSE t.agent END,
    assign_type = CASE WHEN excluded.assign_seq > t.assign_seq THEN excluded.assign_type ELSE t.assign_type END,
    assign_seq = {max}(t.assign_seq, excluded.assign_seq),
    first_ts = {min}(t.first_ts, excluded.first_ts),
    last_ts = {max}(t.last_ts, excluded.last_ts),
    last_seq = {max}(t.last_seq, excluded.last_seq),
    closed_at = coalesce(t.closed_at, excluded.closed_at)
"""
