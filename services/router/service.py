"""Router: offers or assigns waiting conversations to agents, and keeps that state repaired.

One matching pass (woken by any change to either bucket, and at least every ``TICK_S`` for offer
expiry) does, in order: flush outboxes left by a crashed writer, expire lapsed offers, requeue
the conversations of agents lost past the grace period, route waiting conversations FIFO per
queue, and repair capacity slots a crash left inconsistent. Every write is a compare-and-set on
a fresh or mirrored revision, so any number of routers may run the same pass concurrently.
ROUTE commands are applied by ``RouteCommandConsumer`` alongside, and waiting conversations
(queue frames, staffing notices, escalation, abandonment) are looked after by ``WaitingRoom``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import orjson
from nats.aio.client import Client as NATS

from parley.core import bus, subjects
from parley.core.config import Settings
from parley.core.events import now_ms
from parley.core.records import AgentRecord, ConvRecord
from parley.core.service import nats_readiness
from parley.core.tasks import stop_tasks

from . import metrics
from .keeper import WaitingRoom
from .logic import (
    ASSIGNED_SLOT,
    OFFER_SLOT,
    ConvTransition,
    agent_lost,
    auto_assign_conv,
    choose_agent,
    expire_offer,
    holder,
    is_lost,
    offer_conv,
    slot_for,
    slot_mismatches,
    take_slot,
    waiting_in_order,
)
from .route_ops import RouteCommandConsumer
from .store import RoutingStore, is_cas_conflict

log = logging.getLogger("parley.router")

TICK_S = 0.2  # offers expire within this of their deadline
MIN_PASS_GAP_S = 0.01  # a burst of watch updates is one pass, not hundreds
# Another router normally flushes its own outbox within milliseconds; only older ones are ours.
OUTBOX_REPAIR_MS = 500
# A slot/conversation disagreement lasting this long is a crash's leftover, not a transition.
SLOT_REPAIR_MS = 3000


class RouterService:
    name = "router"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.slot_repair_ms = SLOT_REPAIR_MS
        self._nc: NATS | None = None
        self._store: RoutingStore | None = None
        self._commands: RouteCommandConsumer | None = None
        self.waiting: WaitingRoom | None = None
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._first_pass = True
        self._outbox_seen: dict[str, tuple[int, int]] = {}  # conv key → (revision, first seen)
        self._slot_suspects: dict[tuple[str, str, str, str | None], int] = {}

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._nc = await bus.connect(self.settings, self.name, reconnected_cb=self._on_reconnected)
        js = self._nc.jetstream()
        buckets = await bus.ensure_all(js, self.settings)
        self._store = RoutingStore(self._nc, js, buckets, on_change=self._wake.set)
        await self._store.start()
        self._commands = RouteCommandConsumer(self._store, on_applied=self._wake.set)
        self.waiting = WaitingRoom(self.settings, self._nc, self._store)
        await self.waiting.start()
        await self._nc.flush(timeout=5)  # started = the server has our subscriptions (seen reports are core NATS)
        self._tasks = [
            asyncio.create_task(self._matching_loop(), name="router-matching"),
            asyncio.create_task(self._commands.run(), name="router-commands"),
        ]
        self._started = True

    async def stop(self) -> None:
        self._started = False
        if self._commands is not None:
            self._commands.stop()
            # Let the command in hand finish (ack) rather than leave it for redelivery.
            await asyncio.wait(self._tasks[1:], timeout=3)
        await stop_tasks(self._tasks)
        if self.waiting is not None:
            await self.waiting.stop()
        if self._store is not None:
            await self._store.stop()
        if self._nc is not None and not self._nc.is_closed:
            await self._nc.close()

    def ready(self) -> tuple[bool, dict[str, str]]:
        return nats_readiness(self._nc, self._started)

    async def _on_reconnected(self) -> None:
        if self._store is not None:
            await self._store.restart_views()
        if self.waiting is not None:
            self.waiting.reconnected()
        self._wake.set()

    # --- the matching loop ---------------------------------------------------------------------
    async def _matching_loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=TICK_S)
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self.run_pass()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away or slow: the next pass retries everything
                metrics.ERRORS.labels("pass").inc()
                log.warning("routing pass failed: %s: %s", type(exc).__name__, exc)
                await asyncio.sleep(TICK_S)
            await asyncio.sleep(MIN_PASS_GAP_S)

    async def run_pass(self) -> None:
        await self._repair_outboxes()
        await self._expire_offers()
        await self._requeue_lost_agents()
        await self._route_waiting()
        await self._repair_slots()
        self._first_pass = False

    def _convs(self) -> list[tuple[ConvRecord, int]]:
        assert self._store is not None
        return list(self._store.convs.entries.values())

    def _agents(self) -> list[AgentRecord]:
        assert self._store is not None
        return [record for record, _ in self._store.agents.entries.values()]

    async def _repair_outboxes(self) -> None:
        assert self._store is not None
        now = now_ms()
        seen: dict[str, tuple[int, int]] = {}
        for key, (conv, rev) in list(self._store.convs.entries.items()):
            if not conv.outbox:
                continue
            known = self._outbox_seen.get(key)
            first = known[1] if known and known[0] == rev else now
            seen[key] = (rev, first)
            if self._first_pass or now - first > OUTBOX_REPAIR_MS:
                log.info("flushing outbox left on %s rev %d", key, rev)
                await self._store.flush(conv, rev)
        self._outbox_seen = seen

    async def _expire_offers(self) -> None:
        assert self._store is not None
        now = now_ms()
        for conv, rev in self._convs():
            if expire_offer(conv, rev, now) is None:
                continue
            _, done = await self._store.transition(conv.tenant, conv.conv, lambda cur, r: expire_offer(cur, r, now_ms()) if cur else None)
            if done is not None:
                metrics.OFFER_EXPIRIES.inc()
                log.info("offer of %s.%s to %s expired", conv.tenant, conv.conv, done.slot.agent if done.slot else "?")

    async def _requeue_lost_agents(self) -> None:
        assert self._store is not None
        suspects: dict[tuple[str, str], list[str]] = defaultdict(list)
        for conv, _ in self._convs():
            agent = holder(conv)
            if agent is None:
                continue
            known = self._store.agents.get(subjects.kv_key(conv.tenant, agent))
            if known is not None and known[0].status == "offline":
                suspects[(conv.tenant, agent)].append(conv.conv)
        for (tenant, agent), convs in suspects.items():
            # Decide on stored values: the mirror may lag a comeback.
            record, _ = await self._store.read_agent(tenant, agent)
            last_heartbeat = await self._store.read_heartbeat(tenant, agent)
            settings = self.settings
            if not is_lost(record, last_heartbeat, now_ms(), settings.requeue_grace_ms, settings.presence_ttl_ms):
                continue

            def requeue(current: ConvRecord | None, revision: int, lost: str = agent) -> ConvTransition | None:
                return agent_lost(current, revision, lost, now_ms()) if current is not None else None

            for conv_id in convs:
                _, done = await self._store.transition(tenant, conv_id, requeue)
                if done is not None:
                    metrics.REQUEUES.labels("agent_offline").inc()
                    log.info("conversation %s.%s requeued: agent %s offline", tenant, conv_id, agent)

    async def _route_waiting(self) -> None:
        by_queue: dict[tuple[str, str], list[tuple[ConvRecord, int]]] = defaultdict(list)
        revisions: dict[str, int] = {}
        for conv, rev in self._convs():
            revisions[subjects.kv_key(conv.tenant, conv.conv)] = rev
        for conv in waiting_in_order(c for c, _ in self._convs()):
            by_queue[(conv.tenant, conv.queue)].append((conv, revisions[subjects.kv_key(conv.tenant, conv.conv)]))
        if not by_queue:
            return
        for (tenant, _queue), waiting in by_queue.items():
            for conv, rev in waiting:
                agent = choose_agent(conv, self._tenant_agents(tenant))
                if agent is None:
                    break  # nobody can take the oldest, so nobody can take the younger ones
                if not await self._route_one(conv, rev, agent):
                    self._wake.set()  # lost a race: look again with fresh records soon
                    break

    def _tenant_agents(self, tenant: str) -> list[AgentRecord]:
        # Read through the mirror each time: the previous decision just changed an agent's load.
        return [a for a in self._agents() if a.tenant == tenant]

    async def _route_one(self, conv: ConvRecord, conv_rev: int, agent: AgentRecord) -> bool:
        """Reserve a slot on ``agent``, then move ``conv`` to it; False when a race was lost."""
        assert self._store is not None and self._nc is not None
        started = time.perf_counter()
        offer_mode = self.settings.routing_mode == "offer"
        kind = OFFER_SLOT if offer_mode else ASSIGNED_SLOT
        now = now_ms()
        known = self._store.agents.get(subjects.kv_key(agent.tenant, agent.agent))
        reserved = take_slot(agent, conv, kind, now)
        if known is None or reserved is None:
            return False
        try:
            await self._store.cas_agent(reserved, known[1])
        except Exception as exc:
            if not is_cas_conflict(exc):
                raise
            metrics.CAS_CONFLICTS.labels("agent").inc()
            await self._store.read_agent(agent.tenant, agent.agent)
            return False
        if offer_mode:
            chosen = offer_conv(conv, conv_rev, agent.agent, now, self.settings.offer_timeout_ms)
        else:
            chosen = auto_assign_conv(conv, conv_rev, agent.agent)
        try:
            conv_rev = await self._store.cas_conv(chosen.conv, conv_rev)
        except Exception as exc:
            if not is_cas_conflict(exc):
                raise  # unknown outcome (timeout): the slot repair settles it either way
            metrics.CAS_CONFLICTS.labels("conv").inc()
            # Nobody else can hold this slot (take_slot requires it free), so freeing it is safe.
            await self._store.set_slot(agent.tenant, agent.agent, conv.conv, None)
            await self._store.read_conv(conv.tenant, conv.conv)
            return False
        metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
        metrics.WAIT_SECONDS.observe(max(0, now - conv.queued_at) / 1000)
        if offer_mode:
            metrics.OFFERS.inc()
            frame = {"t": "offer", "conv": conv.conv, "queue": conv.queue, "expires_ms": self.settings.offer_timeout_ms}
            await self._nc.publish(subjects.user_subject(agent.tenant, agent.agent), orjson.dumps(frame))
            log.info("offered %s.%s to %s", conv.tenant, conv.conv, agent.agent)
        else:
            metrics.ASSIGNMENTS.labels("auto").inc()
            await self._store.flush(chosen.conv, conv_rev)
            log.info("assigned %s.%s to %s", conv.tenant, conv.conv, agent.agent)
        return True

    async def _repair_slots(self) -> None:
        assert self._store is not None
        now = now_ms()
        convs = {key: conv for key, (conv, _) in self._store.convs.entries.items()}
        current = set(slot_mismatches(convs, self._agents()))
        self._slot_suspects = {m: self._slot_suspects.get(m, now) for m in current}
        for (tenant, agent, conv_id, _), since in list(self._slot_suspects.items()):
            if now - since <= self.slot_repair_ms:
                continue
            conv, _ = await self._store.read_conv(tenant, conv_id)
            wanted = slot_for(conv, agent)
            log.warning("repairing slot of %s.%s for %s: %s", tenant, agent, conv_id, wanted)
            await self._store.set_slot(tenant, agent, conv_id, wanted)
            metrics.SLOT_REPAIRS.inc()
