"""The router's KV adapter: mirrors of ``parley_convs``/``parley_agents`` and the compare-and-sets.

Order of writes (so an agent's load is never under-counted, G5): a slot is taken on the agent
record *before* the conversation moves to the agent, and freed *after* the conversation left it.
A crash between the two leaves an over-count that ``slot_mismatches`` finds and repairs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import orjson
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import APIError, KeyWrongLastSequenceError

from parley.core import bus, subjects
from parley.core.errors import UnavailableError
from parley.core.events import now_ms
from parley.core.kvview import KvView
from parley.core.records import AgentRecord, ConvRecord, Heartbeat

from . import metrics
from .logic import ASSIGNED_SLOT, OFFER_SLOT, ConvTransition, apply_slot

log = logging.getLogger("parley.router")

# Revision conflicts: the nats-py exception, or the raw API error codes some paths return.
CAS_CONFLICT_CODES = (10071, 10164)
CAS_ATTEMPTS = 25


def is_cas_conflict(exc: BaseException) -> bool:
    return isinstance(exc, KeyWrongLastSequenceError) or (
        isinstance(exc, APIError) and getattr(exc, "err_code", None) in CAS_CONFLICT_CODES
    )


def worth_keeping(conv: ConvRecord) -> bool:
    """Closed conversations are only needed in memory while their outbox is unflushed."""
    return conv.is_open or bool(conv.outbox)


Decide = Callable[[ConvRecord | None, int], ConvTransition | None]


class RoutingStore:
    def __init__(self, nc: NATS, js: JetStreamContext, buckets: bus.Buckets, on_change: Callable[[], None]) -> None:
        self.nc = nc
        self.js = js
        self.buckets = buckets
        self.convs: KvView[ConvRecord] = KvView(
            buckets.convs, ConvRecord.decode, on_change=lambda _k, _v: on_change(), keep=worth_keeping
        )
        self.agents: KvView[AgentRecord] = KvView(buckets.agents, AgentRecord.decode, on_change=lambda _k, _v: on_change())

    async def start(self) -> None:
        await self.agents.start()
        await self.convs.start()

    async def stop(self) -> None:
        await self.convs.stop()
        await self.agents.stop()

    async def restart_views(self) -> None:
        await self.agents.restart()
        await self.convs.restart()

    # --- reading fresh -----------------------------------------------------------------------
    async def read_conv(self, tenant: str, conv: str) -> tuple[ConvRecord | None, int]:
        key = subjects.kv_key(tenant, conv)
        raw, rev = await bus.kv_read(self.buckets.convs, key)
        record = ConvRecord.decode(raw) if raw else None
        self.convs.remember(key, record, rev)
        return record, rev

    async def read_agent(self, tenant: str, agent: str) -> tuple[AgentRecord | None, int]:
        key = subjects.kv_key(tenant, agent)
        raw, rev = await bus.kv_read(self.buckets.agents, key)
        record = AgentRecord.decode(raw) if raw else None
        self.agents.remember(key, record, rev)
        return record, rev

    async def read_heartbeat(self, tenant: str, agent: str) -> int | None:
        """Time of the agent's last heartbeat as presence stored it, if any."""
        raw, _ = await bus.kv_read(self.buckets.heartbeats, subjects.kv_key(tenant, agent))
        return Heartbeat.decode(raw).ts if raw else None

    async def read_seen(self, tenant: str, customer: str) -> int | None:
        """When a gateway last reported the customer connected, if it is still on record."""
        raw, _ = await bus.kv_read(self.buckets.seen, subjects.kv_key(tenant, customer))
        if raw is None:
            return None
        try:
            return int(orjson.loads(raw)["ts"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None

    async def write_seen(self, key: str, ts: int, node: str) -> None:
        await self.buckets.seen.put(key, orjson.dumps({"ts": ts, "node": node}))

    # --- single compare-and-sets -------------------------------------------------------------
    async def cas_agent(self, record: AgentRecord, revision: int) -> int:
        key = subjects.kv_key(record.tenant, record.agent)
        new_rev = await bus.kv_cas(self.buckets.agents, key, record.encode(), revision)
        self.agents.remember(key, record, new_rev)
        return new_rev

    async def cas_conv(self, record: ConvRecord, revision: int) -> int:
        key = subjects.kv_key(record.tenant, record.conv)
        new_rev = await bus.kv_cas(self.buckets.convs, key, record.encode(), revision)
        self.convs.remember(key, record, new_rev)
        return new_rev

    async def set_slot(self, tenant: str, agent: str, conv: str, kind: str | None) -> None:
        """Make the agent's slot for ``conv`` be ``kind`` (None: free), whatever else changed."""
        key = subjects.kv_key(tenant, agent)

        def change(current: AgentRecord | None) -> AgentRecord | None:
            return apply_slot(current, conv, kind, now_ms()) if current is not None else None

        record, rev, changed = await bus.cas_loop(self.buckets.agents, key, AgentRecord.decode, change)
        if changed:
            self.agents.remember(key, record, rev)

    async def prepare_accept(self, tenant: str, agent: str, conv: str) -> str:
        """Before an ``accept`` moves the conversation, turn the agent's offer slot into an assigned
        one by compare-and-set on the record that holds the agent's status: an assignment is then
        always preceded by a revision of that record showing the agent ``online`` with the slot
        (G5, checkable in the bucket's history). Returns the agent's status."""
        key = subjects.kv_key(tenant, agent)
        seen: list[str] = ["offline"]

        def change(current: AgentRecord | None) -> AgentRecord | None:
            seen[0] = current.status if current is not None else "offline"
            if current is None or current.status != "online" or current.convs.get(conv) != OFFER_SLOT:
                return None
            return apply_slot(current, conv, ASSIGNED_SLOT, now_ms())

        record, rev, _ = await bus.cas_loop(self.buckets.agents, key, AgentRecord.decode, change)
        self.agents.remember(key, record, rev)
        return seen[0]

    async def flush(self, record: ConvRecord, revision: int) -> None:
        """Publish the events the record owes the chain (deduplicated), then clear its outbox."""
        if record.outbox:
            # bus.flush_outbox empties the list it is given; our mirror must keep its own copy.
            await bus.flush_outbox(self.js, self.buckets.convs, copy.deepcopy(record), revision)

    # --- a whole conversation transition -----------------------------------------------------
    async def transition(self, tenant: str, conv: str, decide: Decide) -> tuple[ConvRecord | None, ConvTransition | None]:
        """Read the record, let ``decide`` pick the transition, store it by CAS, then settle it.

        ``decide`` may raise ``RouteRefused``. A pending outbox of an earlier transition is
        flushed first, so its events precede the new ones in the chain. Returns the record as
        it is now and the transition applied (None when ``decide`` found nothing to do).
        """
        for _ in range(CAS_ATTEMPTS):
            current, rev = await self.read_conv(tenant, conv)
            if current is not None and current.outbox:
                await self.flush(current, rev)
                continue
            chosen = decide(current, rev)
            if chosen is None:
                return current, None
            try:
                new_rev = await self.cas_conv(chosen.conv, rev)
            except Exception as exc:
                if is_cas_conflict(exc):
                    metrics.CAS_CONFLICTS.labels("conv").inc()
                    continue
                raise
            await self.settle(chosen, new_rev)
            return chosen.conv, chosen
        raise UnavailableError(f"conversation {tenant}.{conv} kept changing under us")

    async def settle(self, chosen: ConvTransition, revision: int) -> None:
        """After the conversation moved: its events to the chain, then the agent's slot."""
        await self.flush(chosen.conv, revision)
        if chosen.slot is not None:
            await self.set_slot(chosen.conv.tenant, chosen.slot.agent, chosen.conv.conv, chosen.slot.kind)
