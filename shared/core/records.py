"""State records kept in KV buckets: conversations and agents.

Both are updated only by compare-and-set on the KV revision, so racing routers, presence
instances and gateways cannot overwrite each other's decisions.

A conversation record carries an *outbox*: the chain events its last transition owes the stream.
Whoever changes the record writes the outbox in the same compare-and-set, then publishes it with
deterministic ``Nats-Msg-Id``s; anyone who later finds a non-empty outbox publishes it again
(deduplicated) and clears it. A crash between the state change and the event is so repaired by
the next reader instead of leaving the chain and the state apart.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

CONV_STATES = ("queued", "offered", "assigned", "closed")
AGENT_STATUSES = ("online", "away", "offline")


@dataclass
class Offer:
    agent: str
    expires_at: int  # unix ms


@dataclass
class PendingEvent:
    msg_id: str
    type: str
    data: dict[str, Any]


@dataclass
class ConvRecord:
    conv: str
    tenant: str
    customer: str
    queue: str
    state: str = "queued"
    topic: str | None = None
    agent: str | None = None  # the assigned agent; kept after close for transcript access
    offer: Offer | None = None
    opened_at: int = 0
    queued_at: int = 0  # when it (re-)entered its current queue
    closed_at: int | None = None
    declined: list[str] = field(default_factory=list)  # agents who let this wait's offer go
    outbox: list[PendingEvent] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    # The last wait notice the customer got ("no_agents" while that warning stands, then
    # "all_clear") and when: routers send each once, and rate-limit them (protocol v1, G7).
    wait_notice: str | None = None
    wait_notice_at: int = 0

    @property
    def client_state(self) -> str:
        """The state as protocol v1 shows it: an offered conversation is still waiting."""
        return "queued" if self.state == "offered" else self.state

    @property
    def is_open(self) -> bool:
        return self.state != "closed"

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> ConvRecord:
        d = orjson.loads(raw)
        offer = d.pop("offer", None)
        outbox = d.pop("outbox", None) or []
        rec = cls(**d)
        rec.offer = Offer(**offer) if offer else None
        rec.outbox = [PendingEvent(**p) for p in outbox]
        return rec

    def may_see(self, user: str, role: str, tenant: str) -> bool:
        """Visibility rule of protocol v1: customers their own, agents assigned ones, supervisors all."""
        if tenant != self.tenant:
            return False
        if role == "supervisor":
            return True
        if role == "customer":
            return user == self.customer
        if role == "agent":
            return self.agent == user and self.state in ("assigned", "closed")
        return False


@dataclass
class AgentRecord:
    agent: str
    tenant: str
    status: str = "offline"
    chosen: str = "online"  # what the agent last asked for; status is this while heartbeats flow
    since: int = 0
    reason: str | None = None
    skills: list[str] = field(default_factory=list)
    max_chats: int = 3
    # conversations holding a slot of this agent's capacity: conv → "offer" | "assigned"
    convs: dict[str, str] = field(default_factory=dict)
    idle_since: int = 0  # last time the agent's load changed; the longest-idle agent is preferred
    node: str | None = None

    @property
    def load(self) -> int:
        return len(self.convs)

    @property
    def has_capacity(self) -> bool:
        return self.load < self.max_chats

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> AgentRecord:
        return cls(**orjson.loads(raw))

    def presence_frame(self) -> dict[str, Any]:
        frame: dict[str, Any] = {"t": "presence", "status": self.status, "since": self.since}
        if self.reason:
            frame["reason"] = self.reason
        return frame


@dataclass
class Heartbeat:
    ts: int
    node: str

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> Heartbeat:
        return cls(**orjson.loads(raw))


@dataclass
class Notice:
    """A tenant-wide incident banner (admin API), shown on /v1/status and pushed to clients."""

    id: str
    tenant: str
    level: str
    text: str
    created: int = 0

    def frame(self) -> dict[str, Any]:
        return {"t": "notice", "id": self.id, "level": self.level, "text": self.text}

    def encode(self) -> bytes:
        return orjson.dumps(asdict(self))

    @classmethod
    def decode(cls, raw: bytes) -> Notice:
        return cls(**orjson.loads(raw))
