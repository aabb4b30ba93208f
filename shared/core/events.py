"""Persisted conversation events: how they are stored in stream CONV and shown to clients.

A stored event's payload is ``{"type", "ts", "data"}``; its conversation comes from the subject
and its ``seq`` is the stream sequence, so nothing in the payload can disagree with the chain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import orjson

EVENT_TYPES = (
    "opened",
    "message",
    "assigned",
    "unassigned",
    "transferred",
    "escalated",
    "notice",
    "read",
    "closed",
)
MSG_ID_HEADER = "Nats-Msg-Id"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True)
class Event:
    """One event of a conversation's chain as a client sees it (an ``ev`` frame without ``t``)."""

    conv: str
    seq: int
    prev: int
    type: str
    ts: int
    data: dict[str, Any] = field(default_factory=dict)
    tenant: str = ""

    def frame(self) -> dict[str, Any]:
        return {
            "t": "ev",
            "conv": self.conv,
            "seq": self.seq,
            "prev": self.prev,
            "type": self.type,
            "ts": self.ts,
            "data": self.data,
        }

    def as_dict(self) -> dict[str, Any]:
        d = self.frame()
        del d["t"]
        return d

    def with_prev(self, prev: int) -> Event:
        if prev == self.prev:
            return self
        return Event(self.conv, self.seq, prev, self.type, self.ts, self.data, self.tenant)


def encode_event(type_: str, data: dict[str, Any], ts: int | None = None) -> bytes:
    return orjson.dumps({"type": type_, "ts": ts if ts is not None else now_ms(), "data": data})


def decode_event(tenant: str, conv: str, seq: int, prev: int, payload: bytes) -> Event:
    """Raises ``ValueError`` for anything that is not a well-formed event."""
    body = orjson.loads(payload)  # orjson.JSONDecodeError is a ValueError
    if not isinstance(body, dict) or body.get("type") not in EVENT_TYPES:
        raise ValueError(f"not a Parley event: {payload[:80]!r}")
    ts, data = body.get("ts", 0), body.get("data") or {}
    if not isinstance(ts, int) or isinstance(ts, bool) or not isinstance(data, dict):
        raise ValueError(f"malformed Parley event: {payload[:80]!r}")
    return Event(conv, seq, prev, body["type"], ts, data, tenant)


def message_msg_id(tenant: str, sender: str, client_id: str) -> str:
    """``Nats-Msg-Id`` of a client's ``send``: JetStream dedupe is stream-wide, so scope it fully."""
    return f"m:{tenant}:{sender}:{client_id}"
