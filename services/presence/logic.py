"""Presence decisions as pure functions over ``AgentRecord``/``Heartbeat`` (no I/O).

Every function returns the *new* record, or ``None`` when nothing would change, so the adapter
writes (and every gateway watching ``parley_agents`` pushes a frame) only on a real change.
Inputs are never mutated: the adapter may retry a compare-and-set with a fresh record.

Rules (protocol v1, "Agents"):
- A heartbeat or hello from an agent without a record creates it ``online`` (``connected``).
- A heartbeat turns an ``offline`` agent into the status it last chose (``reconnected``).
- An agent whose last heartbeat is older than ``PRESENCE_TTL`` becomes ``offline``
  (``heartbeat_lost``); a disconnect shorter than that changes nothing.
- ``since`` is the time of the last status transition.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from parley.core.records import AgentRecord, Heartbeat

CHOOSABLE_STATUSES = ("online", "away")


@dataclass(frozen=True)
class AgentHello:
    """What a gateway tells presence about a connected agent (heartbeat or hello)."""

    tenant: str
    agent: str
    node: str
    skills: tuple[str, ...]
    max_chats: int


def apply_heartbeat(current: AgentRecord | None, hello: AgentHello, now: int, *, new_connection: bool = False) -> AgentRecord | None:
    """The record after a sign of life from the agent, or None when it stays as it is.

    ``node`` follows heartbeats only when the agent comes (back) online or on a new connection
    (hello): an agent connected to two gateways would otherwise flip it on every heartbeat and
    make every watcher of the bucket see a change per second.
    """
    if current is None:
        return AgentRecord(
            agent=hello.agent,
            tenant=hello.tenant,
            status="online",
            chosen="online",
            since=now,
            reason="connected",
            skills=list(hello.skills),
            max_chats=hello.max_chats,
            idle_since=now,
            node=hello.node,
        )
    new = copy.deepcopy(current)
    if new.status == "offline":
        new.status = new.chosen if new.chosen in CHOOSABLE_STATUSES else "online"
        new.since = now
        new.reason = "reconnected"
        new.node = hello.node
    elif new_connection or new.node is None:
        new.node = hello.node
    new.skills = list(hello.skills)
    new.max_chats = hello.max_chats
    return None if new == current else new


def set_chosen_status(current: AgentRecord, status: str, now: int) -> AgentRecord | None:
    """The agent chose ``online`` or ``away``.

    While the agent is ``offline`` (no heartbeat within the TTL) only the choice is remembered:
    heartbeats are the authority on being connected, and the next one applies the choice.
    """
    if status not in CHOOSABLE_STATUSES:
        raise ValueError(f"not a status an agent may choose: {status!r}")
    new = copy.deepcopy(current)
    new.chosen = status
    if new.status != "offline" and new.status != status:
        new.status = status
        new.since = now
        new.reason = "set_by_agent"
    return None if new == current else new


def last_sign_of_life(record: AgentRecord, heartbeat: Heartbeat | None) -> int:
    """When the agent was last heard of: its heartbeat, else the time it came online."""
    if heartbeat is None:
        return record.since
    return max(heartbeat.ts, record.since)


def sweep_decision(current: AgentRecord | None, heartbeat: Heartbeat | None, now: int, ttl_ms: int) -> AgentRecord | None:
    """``offline`` (``heartbeat_lost``) when the agent has not heartbeated for longer than the TTL."""
    if current is None or current.status == "offline":
        return None
    if now - last_sign_of_life(current, heartbeat) <= ttl_ms:
        return None
    new = copy.deepcopy(current)
    new.status = "offline"
    new.since = now
    new.reason = "heartbeat_lost"
    return new


def sweep_interval_s(ttl_ms: int) -> float:
    """Twice a second (a sweep is an in-memory scan), faster for short TTLs: offline is written
    at most TTL + min(0.5 s, TTL/4) after the last heartbeat."""
    return max(0.02, min(0.5, ttl_ms / 4000))
