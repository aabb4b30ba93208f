"""How a stored transcript is shown: the ``prev`` chain and the conversation state, no I/O.

``prev`` is derived from row order instead of stored, so the chain is always the one of the
rows actually present; ``state`` follows the protocol's client states (an offer is not an event,
so there is no ``offered`` here).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .storage import TranscriptRow

# Events that change who holds the conversation; the latest one decides assigned vs queued.
ASSIGNMENT_EVENTS = ("assigned", "unassigned", "transferred", "escalated")


def conversation_state(rows: Sequence[TranscriptRow]) -> str:
    if any(r.type == "closed" for r in rows):
        return "closed"
    latest = next((r.type for r in reversed(rows) if r.type in ASSIGNMENT_EVENTS), None)
    return "assigned" if latest == "assigned" else "queued"


def chained_events(rows: Sequence[TranscriptRow], first_prev: int = 0) -> list[dict[str, Any]]:
    """Rows (ordered by seq) as ``ev`` frames without ``t``; ``prev`` is the previous row's seq
    (``first_prev`` for the first: 0 for a whole transcript, the resume point for a page)."""
    events = []
    prev = first_prev
    for r in rows:
        events.append(
            {"conv": r.conv, "seq": r.seq, "prev": prev, "type": r.type, "ts": r.ts, "data": r.data}
        )
        prev = r.seq
    return events


def transcript_reply(tenant: str, conv: str, rows: Sequence[TranscriptRow]) -> dict[str, Any]:
    """The ``transcript.get`` answer; an unknown conversation is ``not_found``."""
    if not rows:
        return {"error": "not_found"}
    return {
        "conv": conv,
        "tenant": tenant,
        "state": conversation_state(rows),
        "events": chained_events(rows),
        "last_seq": rows[-1].seq,
    }
