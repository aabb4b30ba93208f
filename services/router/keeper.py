"""The router's care of waiting conversations: queue frames, staffing notices, escalation, abandonment.

Every ``TICK_S`` the router walks the queues it *owns* (``waiting.queue_owner`` over the live
routers, ``members.RouterMembers``) and, for each waiting conversation:

- moves it to the overflow queue when it waited past ``max_wait_s`` (``escalated`` event);
- closes it as ``abandoned`` when its customer showed no connection for ``PARLEY_ABANDON_S``;
- sends the ``no agent online`` warning or its all-clear as a persisted ``notice``;
- publishes a ``queue`` frame (position, ETA) to the customer when one is due.

Transitions are compare-and-sets through ``RoutingStore.transition`` (a decision is re-checked on
the fresh record), so an ownership overlap while routers join or leave costs a lost race, never a
double event. Frames are ephemeral: an overlap may send one twice, a gap delays them.

Customers' last sign of connection (``seen.<tenant>.<customer>`` from gateways, every
``CUSTOMER_SEEN_INTERVAL_S``) is stored in bucket ``parley_seen`` by whichever router receives it
(queue group), so a restarted router knows it without having heard anything itself.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from parley.core import subjects
from parley.core.config import Settings, queue_policy
from parley.core.events import now_ms
from parley.core.records import ConvRecord
from parley.core.tasks import stop_tasks

from . import metrics
from .logic import ConvTransition
from .members import RouterMembers
from .store import RoutingStore
from .waiting import (
    LONG_WAIT,
    HandlingTimes,
    PositionFrames,
    abandon_conv,
    abandoned_since,
    escalate_conv,
    escalation_target,
    estimate_eta_s,
    is_abandoned,
    long_wait_due,
    notify_wait,
    queue_frame,
    queue_lines,
    queue_owner,
    staffing_by_queue,
    wait_notice_due,
)

log = logging.getLogger("parley.router.keeper")

TICK_S = 0.25
SEEN_QUEUE_GROUP = "router-seen"
# One stored ``seen`` per customer per this long, however many gateways/tabs report it.
SEEN_REWRITE_MS = 2000
# Before abandoning anything, hear the gateways for two rounds: while no router ran, their
# ``seen`` reports went unheard and the stored times may be old.
SEEN_STARTUP_GRACE_MS = int(2 * subjects.CUSTOMER_SEEN_INTERVAL_S * 1000) + 1000
CONCURRENCY = 64


class WaitingRoom:
    def __init__(self, settings: Settings, nc: NATS, store: RoutingStore) -> None:
        self.settings = settings
        self._nc = nc
        self._store = store
        self.members = RouterMembers(nc, f"{settings.node_id}~{uuid.uuid4().hex[:8]}")
        self.handling = HandlingTimes()
        self.frames = PositionFrames()
        self.startup_grace_ms = min(SEEN_STARTUP_GRACE_MS, settings.abandon_s * 1000)
        self._listening_since = now_ms()
        self._seen_cache: dict[str, int] = {}  # customer key → last seen as stored
        self._seen_pending: dict[str, tuple[int, str]] = {}
        self._seen_written: dict[str, int] = {}
        self._seen_signal = asyncio.Event()
        self._sub: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._exported_queues: set[tuple[str, str]] = set()

    async def start(self) -> None:
        self._store.convs.listeners.append(lambda k, old, new: self.handling.on_change(k, old, new, now_ms()))
        await self.members.start()
        self._sub = await self._nc.subscribe("seen.*.*", queue=SEEN_QUEUE_GROUP, cb=self._on_seen)
        self._listening_since = now_ms()
        self._tasks = [
            asyncio.create_task(self._loop(), name="router-waiting"),
            asyncio.create_task(self._seen_writer(), name="router-seen"),
        ]

    async def stop(self) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:
                pass
        await stop_tasks(self._tasks)
        await self._flush_seen()
        await self.members.stop()

    def reconnected(self) -> None:
        """``seen`` reports may have gone unheard while we were away: grace again."""
        self._listening_since = now_ms()

    # --- the loop --------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away or slow: the next tick retries
                metrics.ERRORS.labels("waiting").inc()
                log.warning("waiting-room pass failed: %s: %s", type(exc).__name__, exc)

    async def run_once(self) -> None:
        now = now_ms()
        lines = queue_lines(self._store.convs.values())
        members = self.members.alive()
        staffing = staffing_by_queue(self._store.agents.values(), lines)
        abandon_ms = self.settings.abandon_s * 1000
        may_abandon = now - self._listening_since >= self.startup_grace_ms
        work: list[Callable[[], Awaitable[None]]] = []
        frames: list[tuple[ConvRecord, dict[str, object]]] = []
        mine: set[str] = set()
        for (tenant, queue), line in lines.items():
            if queue_owner(members, tenant, queue) != self.members.node:
                continue
            policy = queue_policy(self.settings, tenant, queue)
            staffed = staffing[(tenant, queue)]
            handling = self.handling.average_ms(tenant, queue)
            for position, conv in enumerate(line, start=1):
                key = subjects.kv_key(tenant, conv.conv)
                mine.add(key)
                if escalation_target(conv, policy, now) is not None:
                    work.append(self._escalate_task(conv))
                    continue
                if may_abandon and now - abandoned_since(conv, self._cached_seen(conv)) > abandon_ms:
                    work.append(self._abandon_task(conv))
                    continue
                kind = wait_notice_due(conv, staffed, now)
                if kind is None and long_wait_due(conv, now, self.settings.wait_warn_s * 1000):
                    kind = LONG_WAIT
                if kind is not None:
                    work.append(self._notice_task(conv, kind))
                if self.frames.due(key, queue, position, now):
                    self.frames.sent(key, queue, position, now)
                    frames.append((conv, queue_frame(conv, position, estimate_eta_s(position, staffed, handling))))
        self.frames.keep_only(mine)
        self._export_queue_gauges(lines, staffing, now)
        if len(self._seen_cache) > 100_000:  # a cache: a forgotten customer costs one read
            self._seen_cache = {k: t for k, t in self._seen_cache.items() if now - t < abandon_ms}
        for conv, frame in frames:
            await self._nc.publish(subjects.user_subject(conv.tenant, conv.customer), orjson.dumps(frame))
        if frames:
            metrics.QUEUE_FRAMES.inc(len(frames))
        for i in range(0, len(work), CONCURRENCY):
            results = await asyncio.gather(*(w() for w in work[i : i + CONCURRENCY]), return_exceptions=True)
            for result in results:
                if isinstance(result, Exception):
                    metrics.ERRORS.labels("waiting").inc()
                    log.warning("waiting-room transition failed: %s: %s", type(result).__name__, result)

    def _export_queue_gauges(self, lines: Any, staffing: Any, now: int) -> None:
        """Depth, oldest wait and agents online per queue (every router exports the same values;
        dashboards and alerts take the max)."""
        current: set[tuple[str, str]] = set()
        for (tenant, queue), line in lines.items():
            current.add((tenant, queue))
            metrics.QUEUE_DEPTH.labels(tenant, queue).set(len(line))
            oldest = min((c.queued_at for c in line), default=now)
            metrics.QUEUE_OLDEST_WAIT.labels(tenant, queue).set(max(0.0, (now - oldest) / 1000))
            metrics.QUEUE_AGENTS_ONLINE.labels(tenant, queue).set(staffing[(tenant, queue)].online)
        for gone in self._exported_queues - current:
            for gauge in (metrics.QUEUE_DEPTH, metrics.QUEUE_OLDEST_WAIT, metrics.QUEUE_AGENTS_ONLINE):
                try:
                    gauge.remove(*gone)
                except KeyError:
                    pass
        self._exported_queues = current

    def _cached_seen(self, conv: ConvRecord) -> int | None:
        return self._seen_cache.get(subjects.kv_key(conv.tenant, conv.customer))

    # --- transitions -----------------------------------------------------------------------------
    def _escalate_task(self, conv: ConvRecord) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            def decide(cur: ConvRecord | None, rev: int) -> ConvTransition | None:
                if cur is None:
                    return None
                target = escalation_target(cur, queue_policy(self.settings, cur.tenant, cur.queue), now_ms())
                return escalate_conv(cur, rev, target, now_ms()) if target else None

            _, done = await self._store.transition(conv.tenant, conv.conv, decide)
            if done is not None:
                metrics.REQUEUES.labels("escalated").inc()
                log.info("conversation %s.%s escalated %s → %s", conv.tenant, conv.conv, conv.queue, done.conv.queue)

        return run

    def _abandon_task(self, conv: ConvRecord) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            customer_key = subjects.kv_key(conv.tenant, conv.customer)
            last_seen = await self._store.read_seen(conv.tenant, conv.customer)
            if last_seen is not None:
                self._seen_cache[customer_key] = max(last_seen, self._seen_cache.get(customer_key, 0))
            abandon_ms = self.settings.abandon_s * 1000
            if not is_abandoned(conv, last_seen, now_ms(), abandon_ms):
                return

            def decide(cur: ConvRecord | None, rev: int) -> ConvTransition | None:
                if cur is None or not is_abandoned(cur, last_seen, now_ms(), abandon_ms):
                    return None
                return abandon_conv(cur, rev, now_ms())

            _, done = await self._store.transition(conv.tenant, conv.conv, decide)
            if done is not None:
                metrics.ABANDONED.inc()
                log.info("conversation %s.%s abandoned by %s", conv.tenant, conv.conv, conv.customer)

        return run

    def _notice_task(self, conv: ConvRecord, kind: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            def decide(cur: ConvRecord | None, rev: int) -> ConvTransition | None:
                if cur is None or cur.queue != conv.queue:
                    return None
                staffed = staffing_by_queue(self._store.agents.values(), [(cur.tenant, cur.queue)])
                if kind == LONG_WAIT:
                    if not long_wait_due(cur, now_ms(), self.settings.wait_warn_s * 1000):
                        return None
                elif wait_notice_due(cur, staffed[(cur.tenant, cur.queue)], now_ms()) != kind:
                    return None
                return notify_wait(cur, rev, kind, now_ms())

            _, done = await self._store.transition(conv.tenant, conv.conv, decide)
            if done is not None:
                metrics.WAIT_NOTICES.labels(kind).inc()
                log.info("conversation %s.%s told %s", conv.tenant, conv.conv, kind)

        return run

    # --- customers' last sign of connection ------------------------------------------------------
    async def _on_seen(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) != 3 or not (subjects.valid_id(parts[1]) and subjects.valid_id(parts[2])):
            return
        try:
            node = str(orjson.loads(msg.data).get("node", ""))
        except (orjson.JSONDecodeError, AttributeError):
            node = ""
        key = subjects.kv_key(parts[1], parts[2])
        now = now_ms()
        self._seen_cache[key] = now
        if now - self._seen_written.get(key, 0) < SEEN_REWRITE_MS:
            return
        self._seen_pending[key] = (now, node)
        self._seen_signal.set()

    async def _seen_writer(self) -> None:
        while True:
            await self._seen_signal.wait()
            self._seen_signal.clear()
            try:
                await self._flush_seen()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the next report (≤ 5 s) carries the same news
                metrics.ERRORS.labels("seen").inc()
                log.warning("customer seen not stored: %s: %s", type(exc).__name__, exc)

    async def _flush_seen(self) -> None:
        batch, self._seen_pending = self._seen_pending, {}
        items = list(batch.items())
        for i in range(0, len(items), CONCURRENCY):
            chunk = items[i : i + CONCURRENCY]
            await asyncio.gather(*(self._store.write_seen(key, ts, node) for key, (ts, node) in chunk))
            for key, (ts, _) in chunk:
                self._seen_written[key] = ts
        if len(self._seen_written) > 100_000:  # only a throttle: forgetting costs one extra write
            cutoff = now_ms() - SEEN_REWRITE_MS
            self._seen_written = {k: t for k, t in self._seen_written.items() if t >= cutoff}
