"""The NATS side of one gateway process, shared by all its connections.

Subscriptions are reference counted: one ``live.conv.<t>.<c>`` (and typing) subscription per
conversation visible on any local connection, one ``user.<t>.<u>`` per connected user, one
``notice.>`` for the process. No JetStream consumer is created per connection or message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from opentelemetry.trace import SpanKind

from parley.core import bus, subjects, telemetry
from parley.core.config import Settings
from parley.core.events import Event
from parley.core.records import AgentRecord, ConvRecord
from parley.core.tasks import stop_tasks

from .directory import Directory

log = logging.getLogger("parley.gateway.hub")

# Presence answers after a few KV round trips; on a loaded node that can take seconds. Past this,
# the session starts with the stored record and the next heartbeat brings the correction.
PRESENCE_REQUEST_TIMEOUT_S = 5.0


class Listener(Protocol):
    tenant: str
    user: str
    role: str

    def on_live(self, ev: Event) -> None: ...

    def on_frame(self, frame: dict[str, Any]) -> None: ...

    def on_typing(self, frame: dict[str, Any]) -> None: ...

    def on_conv_record(self, rec: ConvRecord) -> None: ...

    def on_agent_record(self, rec: AgentRecord) -> None: ...


@dataclass
class ConvWatch:
    subs: list[Subscription]
    listeners: set[Listener] = field(default_factory=set)


@dataclass
class AgentActivity:
    skills: list[str]
    max_chats: int
    dirty: bool = True


class Hub:
    def __init__(
        self, settings: Settings, nc: NATS, js: JetStreamContext, directory: Directory, reader: bus.StreamReader
    ) -> None:
        self.settings = settings
        self.nc = nc
        self.js = js
        self.directory = directory
        self.reader = reader
        self.listeners: set[Listener] = set()
        self.by_user: dict[tuple[str, str], set[Listener]] = defaultdict(set)
        self.by_tenant: dict[str, set[Listener]] = defaultdict(set)
        self._user_subs: dict[tuple[str, str], Subscription] = {}
        self._convs: dict[tuple[str, str], ConvWatch] = {}
        self._conv_locks: dict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._agents_active: dict[tuple[str, str], AgentActivity] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._notice_sub: Subscription | None = None
        directory.convs.listeners.append(self._conv_changed)
        directory.agents.listeners.append(self._agent_changed)

    async def start(self) -> None:
        self._notice_sub = await self.nc.subscribe("notice.*", cb=self._on_notice)
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))

    async def stop(self) -> None:
        await stop_tasks(self._tasks)

    # --- connections -----------------------------------------------------------------------------
    async def register(self, listener: Listener) -> None:
        key = (listener.tenant, listener.user)
        self.listeners.add(listener)
        self.by_tenant[listener.tenant].add(listener)
        self.by_user[key].add(listener)
        if key not in self._user_subs:
            self._user_subs[key] = await self.nc.subscribe(
                subjects.user_subject(*key), cb=self._on_user_frame
            )
            if listener.role == "customer":
                await self._publish_seen(*key)

    async def unregister(self, listener: Listener) -> None:
        key = (listener.tenant, listener.user)
        self.listeners.discard(listener)
        self.by_tenant[listener.tenant].discard(listener)
        users = self.by_user.get(key)
        if users is not None:
            users.discard(listener)
            if not users:
                del self.by_user[key]
                sub = self._user_subs.pop(key, None)
                if sub is not None:
                    await _unsubscribe(sub)
                self._agents_active.pop(key, None)
        for conv_key in [k for k, w in self._convs.items() if listener in w.listeners]:
            await self.unwatch(listener, *conv_key)

    # --- conversations ---------------------------------------------------------------------------
    async def watch(self, listener: Listener, tenant: str, conv: str) -> None:
        """Start live delivery of a conversation to ``listener`` (subscribe before replaying)."""
        key = (tenant, conv)
        async with self._conv_locks[key]:
            watch = self._convs.get(key)
            if watch is None:
                live = await self.nc.subscribe(subjects.live_subject(tenant, conv), cb=self._on_live)
                typing = await self.nc.subscribe(subjects.typing_subject(tenant, conv), cb=self._on_typing)
                watch = self._convs[key] = ConvWatch([live, typing])
            watch.listeners.add(listener)

    async def unwatch(self, listener: Listener, tenant: str, conv: str) -> None:
        key = (tenant, conv)
        async with self._conv_locks[key]:
            watch = self._convs.get(key)
            if watch is None:
                return
            watch.listeners.discard(listener)
            if not watch.listeners:
                del self._convs[key]
                for sub in watch.subs:
                    await _unsubscribe(sub)

    async def _on_live(self, msg: Msg) -> None:
        ev = bus.live_event(msg)
        if ev is None:
            return
        watch = self._convs.get((ev.tenant, ev.conv))
        if watch is None:
            return
        span = None
        if telemetry.enabled():  # the delivering end of the message's trace (G8)
            span = telemetry.start_span(
                f"deliver {telemetry.LIVE_TEMPLATE}", SpanKind.CONSUMER, parent=telemetry.extract(msg.headers),
                attributes=telemetry.messaging_attributes(
                    "deliver", telemetry.LIVE_TEMPLATE, ev.seq, **{
                        "parley.event.type": ev.type, "parley.node": self.settings.node_id,
                        "parley.connections": len(watch.listeners)}))
        for listener in list(watch.listeners):
            listener.on_live(ev)
        if span is not None:
            span.end()

    async def _on_typing(self, msg: Msg) -> None:
        tenant, conv = subjects.split_conv_subject(msg.subject)
        watch = self._convs.get((tenant, conv))
        if watch is None:
            return
        frame = orjson.loads(msg.data)
        for listener in list(watch.listeners):
            listener.on_typing(frame)

    async def _on_user_frame(self, msg: Msg) -> None:
        _, tenant, user = msg.subject.split(".", 2)
        try:
            frame = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            log.error("bad frame on %s", msg.subject)
            return
        for listener in list(self.by_user.get((tenant, user), ())):
            listener.on_frame(frame)

    async def _on_notice(self, msg: Msg) -> None:
        tenant = msg.subject.split(".", 1)[1]
        frame = orjson.loads(msg.data)
        for listener in list(self.by_tenant.get(tenant, ())):
            listener.on_frame(frame)

    def _conv_changed(self, key: str, old: ConvRecord | None, new: ConvRecord | None) -> None:
        if new is None or new.state != "assigned" or not new.agent:
            return
        for listener in list(self.by_user.get((new.tenant, new.agent), ())):
            listener.on_conv_record(new)

    def _agent_changed(self, key: str, old: AgentRecord | None, new: AgentRecord | None) -> None:
        if new is None:
            return
        for listener in list(self.by_user.get((new.tenant, new.agent), ())):
            listener.on_agent_record(new)

    # --- presence --------------------------------------------------------------------------------
    def agent_active(self, tenant: str, agent: str, skills: list[str], max_chats: int) -> None:
        """An agent's connection showed life; presence hears of it at most once a second."""
        key = (tenant, agent)
        activity = self._agents_active.get(key)
        if activity is None:
            self._agents_active[key] = AgentActivity(skills, max_chats)
        else:
            activity.dirty = True

    async def presence_hello(self, tenant: str, agent: str, skills: list[str], max_chats: int) -> AgentRecord | None:
        body = {"tenant": tenant, "agent": agent, "node": self.settings.node_id, "skills": skills,
                "max_chats": max_chats}
        try:
            reply = await self.nc.request(subjects.PRESENCE_HELLO, orjson.dumps(body), timeout=PRESENCE_REQUEST_TIMEOUT_S)
            return AgentRecord.decode(reply.data)
        except Exception as exc:  # no presence instance, timeout, NATS down: fall back to the bucket
            log.warning("presence hello for %s/%s failed: %s", tenant, agent, exc)
        try:
            return await self.directory.agents.fetch(subjects.kv_key(tenant, agent))
        except Exception as exc:  # the bucket cannot answer either: the session still starts, as offline
            log.warning("agent record %s/%s unreadable: %s", tenant, agent, exc)
            return None

    async def presence_set(self, tenant: str, agent: str, status: str) -> dict[str, Any]:
        reply = await self.nc.request(
            subjects.PRESENCE_SET, orjson.dumps({"tenant": tenant, "agent": agent, "status": status}),
            timeout=PRESENCE_REQUEST_TIMEOUT_S,
        )
        return orjson.loads(reply.data)

    async def _publish_seen(self, tenant: str, customer: str) -> None:
        try:
            await self.nc.publish(subjects.customer_seen_subject(tenant, customer),
                                  orjson.dumps({"node": self.settings.node_id}))
        except Exception as exc:
            log.warning("customer seen publish failed: %s", exc)

    async def _heartbeat_loop(self) -> None:
        last_seen_round = time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            if time.monotonic() - last_seen_round >= subjects.CUSTOMER_SEEN_INTERVAL_S:
                last_seen_round = time.monotonic()
                for tenant, user in [k for k, ls in self.by_user.items() if any(x.role == "customer" for x in ls)]:
                    await self._publish_seen(tenant, user)
            for (tenant, agent), activity in list(self._agents_active.items()):
                if not activity.dirty:
                    continue
                activity.dirty = False
                body = {"node": self.settings.node_id, "skills": activity.skills, "max_chats": activity.max_chats}
                try:
                    await self.nc.publish(subjects.heartbeat_subject(tenant, agent), orjson.dumps(body))
                except Exception as exc:
                    log.warning("heartbeat publish failed: %s", exc)
                    activity.dirty = True

    # --- routing commands ------------------------------------------------------------------------
    async def route(self, op: str, tenant: str, conv: str, by: dict[str, str], msg_id: str, **extra: Any) -> None:
        body = {"op": op, "tenant": tenant, "conv": conv, "by": by, **extra}
        await self.js.publish(
            subjects.route_subject(tenant, conv), orjson.dumps(body), timeout=5, headers={"Nats-Msg-Id": msg_id}
        )


async def _unsubscribe(sub: Subscription) -> None:
    try:
        await sub.unsubscribe()
    except Exception:  # connection closing or reconnecting: the subscription goes with it
        pass
