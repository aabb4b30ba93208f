"""Presence: turns gateways' heartbeats into the server-authoritative agent status (G4).

NATS adapter around ``logic``. Inputs (queue group ``presence``, so each message is handled by
one instance): ``hb.<tenant>.<agent>`` heartbeats, ``presence.hello`` and ``presence.set``
requests. Outputs are KV writes only: heartbeat times in ``parley_heartbeats``, status in
``parley_agents`` (gateways watch that bucket and push ``presence`` frames).

Every instance sweeps its in-memory views of both buckets and moves agents without a recent
heartbeat to ``offline`` by compare-and-set, so with several instances each transition is
written once: the loser re-reads, finds the agent offline already and writes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from parley.core import audit, bus, subjects
from parley.core.config import Settings
from parley.core.events import now_ms
from parley.core.kvview import KvView
from parley.core.records import AGENT_STATUSES, AgentRecord, Heartbeat
from parley.core.service import nats_readiness
from parley.core.tasks import stop_tasks

from . import metrics
from .logic import (
    CHOOSABLE_STATUSES,
    AgentHello,
    apply_heartbeat,
    set_chosen_status,
    sweep_decision,
    sweep_interval_s,
)

log = logging.getLogger("parley.presence")

QUEUE_GROUP = "presence"
# Heartbeats are written concurrently in chunks: one at a time would cap us near 6k/s per process.
WRITE_CHUNK = 128


def parse_hello(tenant: Any, agent: Any, body: Any) -> AgentHello | None:
    """Validate a heartbeat/hello payload; None when it cannot be trusted."""
    if not (subjects.valid_id(tenant) and subjects.valid_id(agent)) or not isinstance(body, dict):
        return None
    skills = body.get("skills") or []
    max_chats = body.get("max_chats", 3)
    node = body.get("node") or ""
    if not isinstance(skills, list) or not all(isinstance(s, str) for s in skills):
        return None
    if not isinstance(max_chats, int) or isinstance(max_chats, bool) or max_chats < 0 or not isinstance(node, str):
        return None
    return AgentHello(tenant=tenant, agent=agent, node=node, skills=tuple(skills), max_chats=max_chats)


class PresenceService:
    name = "presence"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._nc: NATS | None = None
        self._buckets: bus.Buckets | None = None
        self._agents: KvView[AgentRecord] | None = None
        self._heartbeats: KvView[Heartbeat] | None = None
        self._subs: list[Any] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._requests: set[asyncio.Task[None]] = set()
        # Latest heartbeat per agent not yet written: a burst from several gateways is one write.
        self._pending: dict[str, AgentHello] = {}
        self._pending_signal = asyncio.Event()
        self._started = False
        # A heartbeat time younger than this is not rewritten (an agent on several gateways).
        self._hb_rewrite_ms = min(500, settings.presence_ttl_ms // 10)

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._nc = await bus.connect(self.settings, self.name, reconnected_cb=self._on_reconnected)
        js = self._nc.jetstream()
        self._buckets = await bus.ensure_all(js, self.settings)
        self._agents = KvView(self._buckets.agents, AgentRecord.decode)
        self._heartbeats = KvView(self._buckets.heartbeats, Heartbeat.decode)
        await self._agents.start()
        await self._heartbeats.start()
        self._subs = [
            await self._nc.subscribe("hb.*.*", queue=QUEUE_GROUP, cb=self._on_heartbeat),
            await self._nc.subscribe(subjects.PRESENCE_HELLO, queue=QUEUE_GROUP, cb=self._on_request),
            await self._nc.subscribe(subjects.PRESENCE_SET, queue=QUEUE_GROUP, cb=self._on_request),
        ]
        await self._nc.flush(timeout=5)  # started = the server has our subscriptions (hello, heartbeats)
        self._tasks = [
            asyncio.create_task(self._write_heartbeats_loop(), name="presence-heartbeats"),
            asyncio.create_task(self._sweep_loop(), name="presence-sweep"),
        ]
        self._started = True

    async def stop(self) -> None:
        self._started = False
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
        if self._requests:
            await asyncio.wait(self._requests, timeout=2)
        await stop_tasks(self._tasks)
        for view in (self._agents, self._heartbeats):
            if view is not None:
                await view.stop()
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    def ready(self) -> tuple[bool, dict[str, str]]:
        return nats_readiness(self._nc, self._started)

    async def _on_reconnected(self) -> None:
        for view in (self._agents, self._heartbeats):
            if view is not None:
                await view.restart()

    # --- inputs ----------------------------------------------------------------------------------
    async def _on_heartbeat(self, msg: Msg) -> None:
        metrics.HEARTBEATS.inc()
        parts = msg.subject.split(".")
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            body = None
        hello = parse_hello(parts[1], parts[2], body) if len(parts) == 3 else None
        if hello is None:
            log.debug("bad heartbeat on %s dropped", msg.subject)
            return
        self._pending[subjects.kv_key(hello.tenant, hello.agent)] = hello
        self._pending_signal.set()

    async def _on_request(self, msg: Msg) -> None:
        # Requests wait on KV round trips: handle them concurrently, not in the subscription's task.
        task = asyncio.create_task(self._answer(msg))
        self._requests.add(task)
        task.add_done_callback(self._requests.discard)

    async def _answer(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            body = None
        try:
            if msg.subject == subjects.PRESENCE_HELLO:
                reply = await self._hello(body)
            else:
                reply = await self._set_status(body)
        except Exception as exc:
            log.warning("%s failed: %s: %s", msg.subject, type(exc).__name__, exc)
            metrics.ERRORS.labels("request").inc()
            reply = orjson.dumps({"error": "unavailable"})
        if msg.reply:
            try:
                await msg.respond(reply)
            except Exception as exc:
                log.warning("reply to %s failed: %s", msg.subject, exc)

    async def _hello(self, body: Any) -> bytes:
        hello = parse_hello(body.get("tenant"), body.get("agent"), body) if isinstance(body, dict) else None
        if hello is None:
            return orjson.dumps({"error": "bad_frame"})
        record = await self._sign_of_life(hello, new_connection=True)
        return record.encode()

    async def _set_status(self, body: Any) -> bytes:
        if not isinstance(body, dict):
            return orjson.dumps({"error": "bad_frame"})
        tenant, agent, status = body.get("tenant"), body.get("agent"), body.get("status")
        if not (subjects.valid_id(tenant) and subjects.valid_id(agent)) or status not in CHOOSABLE_STATUSES:
            return orjson.dumps({"error": "bad_frame"})
        record = await self._cas_agent(
            subjects.kv_key(tenant, agent), lambda cur: set_chosen_status(cur, status, now_ms()) if cur else None
        )
        if record is None:
            return orjson.dumps({"error": "not_found"})
        return record.encode()

    # --- heartbeats ------------------------------------------------------------------------------
    async def _write_heartbeats_loop(self) -> None:
        while True:
            await self._pending_signal.wait()
            self._pending_signal.clear()
            batch, self._pending = self._pending, {}
            hellos = list(batch.values())
            for i in range(0, len(hellos), WRITE_CHUNK):
                results = await asyncio.gather(
                    *(self._sign_of_life(h) for h in hellos[i : i + WRITE_CHUNK]), return_exceptions=True
                )
                for result in results:
                    if isinstance(result, Exception):
                        # Lost heartbeats are harmless: the next one (≤ 1 s) carries the same news.
                        metrics.ERRORS.labels("heartbeat").inc()
                        log.warning("heartbeat not stored: %s: %s", type(result).__name__, result)

    async def _sign_of_life(self, hello: AgentHello, new_connection: bool = False) -> AgentRecord:
        """Store the heartbeat time, then change the agent record only if the logic says so."""
        assert self._agents is not None
        key = subjects.kv_key(hello.tenant, hello.agent)
        now = now_ms()
        await self._store_heartbeat(key, hello.node, now, force=new_connection)
        known = self._agents.get(key)
        if not new_connection and known is not None and apply_heartbeat(known[0], hello, now) is None:
            return known[0]  # the common case: no agent write, no watcher woken
        record = await self._cas_agent(
            key, lambda cur: apply_heartbeat(cur, hello, now_ms(), new_connection=new_connection)
        )
        assert record is not None  # apply_heartbeat creates missing records
        return record

    async def _store_heartbeat(self, key: str, node: str, now: int, force: bool) -> None:
        assert self._heartbeats is not None and self._buckets is not None
        known = self._heartbeats.get(key)
        if not force and known is not None and now - known[0].ts < self._hb_rewrite_ms:
            return
        heartbeat = Heartbeat(ts=now, node=node)
        revision = await self._buckets.heartbeats.put(key, heartbeat.encode())
        self._heartbeats.remember(key, heartbeat, revision)
        metrics.HEARTBEAT_WRITES.inc()

    # --- status writes ---------------------------------------------------------------------------
    async def _cas_agent(self, key: str, change: Any) -> AgentRecord | None:
        """Compare-and-set the agent record with ``change``; count and mirror what was written."""
        assert self._buckets is not None and self._agents is not None
        before: list[AgentRecord | None] = []

        def tracked(current: AgentRecord | None) -> AgentRecord | None:
            before[:] = [current]
            return change(current)

        record, revision, changed = await bus.cas_loop(self._buckets.agents, key, AgentRecord.decode, tracked)
        if changed and record is not None:
            self._agents.remember(key, record, revision)
            previous = before[0] if before else None
            if previous is None or previous.status != record.status:
                metrics.TRANSITIONS.labels(record.status, record.reason or "").inc()
                if self._nc is not None:  # for the post-incident timeline (parley incident)
                    await audit.record(self._nc, "presence", record.tenant, "presence", self.settings.node_id,
                                       agent=record.agent, status=record.status, reason=record.reason,
                                       previous=previous.status if previous else None)
                log.info("agent %s %s (%s)", key, record.status, record.reason)
        return record

    # --- sweep -----------------------------------------------------------------------------------
    async def _sweep_loop(self) -> None:
        interval = sweep_interval_s(self.settings.presence_ttl_ms)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS down or slow: the next sweep tries again
                metrics.ERRORS.labels("sweep").inc()
                log.warning("sweep failed: %s: %s", type(exc).__name__, exc)

    async def sweep(self) -> None:
        assert self._agents is not None and self._heartbeats is not None
        now = now_ms()
        ttl = self.settings.presence_ttl_ms
        counts = dict.fromkeys(AGENT_STATUSES, 0)
        lapsed: list[str] = []
        for key, (record, _) in list(self._agents.entries.items()):
            counts[record.status] = counts.get(record.status, 0) + 1
            seen = self._heartbeats.get(key)
            if sweep_decision(record, seen[0] if seen else None, now, ttl) is not None:
                lapsed.append(key)
        for status, count in counts.items():
            metrics.AGENTS.labels(status).set(count)
        for i in range(0, len(lapsed), WRITE_CHUNK):
            await asyncio.gather(*(self._mark_offline(key) for key in lapsed[i : i + WRITE_CHUNK]))

    async def _mark_offline(self, key: str) -> None:
        assert self._buckets is not None
        # The view may lag a heartbeat another instance just stored: decide on the stored one.
        raw, _ = await bus.kv_read(self._buckets.heartbeats, key)
        heartbeat = Heartbeat.decode(raw) if raw else None
        ttl = self.settings.presence_ttl_ms
        await self._cas_agent(key, lambda cur: sweep_decision(cur, heartbeat, now_ms(), ttl))
