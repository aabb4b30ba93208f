"""The gateway's in-memory view of conversation and agent records, kept by KV watches (``KvView``).

Every gateway watches both buckets (one ordered consumer each per process, not per connection),
so visibility checks, ``welcome.convs`` and supervisor queries are answered from memory.
Listeners are told of every change so connections can pick up assignments and presence.
"""

from __future__ import annotations

from collections import defaultdict

from nats.js.kv import KeyValue

from parley.core import subjects
from parley.core.kvview import KvView
from parley.core.records import AgentRecord, ConvRecord


class Directory:
    """Conversation and agent records with the indexes connections need."""

    def __init__(self, convs_kv: KeyValue, agents_kv: KeyValue) -> None:
        self.convs: KvView[ConvRecord] = KvView(convs_kv, ConvRecord.decode)
        self.agents: KvView[AgentRecord] = KvView(agents_kv, AgentRecord.decode)
        # (tenant, user) → conv ids where the user is the customer / the assigned agent
        self.by_customer: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.by_agent: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.convs.listeners.append(self._index)

    async def start(self) -> None:
        await self.convs.start()
        await self.agents.start()

    async def stop(self) -> None:
        await self.convs.stop()
        await self.agents.stop()

    def _index(self, key: str, old: ConvRecord | None, new: ConvRecord | None) -> None:
        if old is not None:
            self.by_customer[(old.tenant, old.customer)].discard(old.conv)
            if old.agent:
                self.by_agent[(old.tenant, old.agent)].discard(old.conv)
        if new is not None:
            if new.is_open:
                self.by_customer[(new.tenant, new.customer)].add(new.conv)
            if new.agent and new.state == "assigned":
                self.by_agent[(new.tenant, new.agent)].add(new.conv)

    def conv(self, tenant: str, conv: str) -> ConvRecord | None:
        return self.convs.value(subjects.kv_key(tenant, conv))

    async def fetch_conv(self, tenant: str, conv: str) -> ConvRecord | None:
        return await self.convs.fetch(subjects.kv_key(tenant, conv))

    def open_convs_of(self, tenant: str, user: str, role: str) -> list[ConvRecord]:
        if role == "customer":
            ids = self.by_customer.get((tenant, user), set())
        elif role == "agent":
            ids = self.by_agent.get((tenant, user), set())
        else:
            return []
        out = [self.conv(tenant, c) for c in ids]
        return sorted((r for r in out if r is not None and r.is_open), key=lambda r: r.opened_at)

    def agent(self, tenant: str, agent: str) -> AgentRecord | None:
        return self.agents.value(subjects.kv_key(tenant, agent))

    def tenant_agents(self, tenant: str) -> list[AgentRecord]:
        return sorted((a for a in self.agents.values() if a.tenant == tenant), key=lambda a: a.agent)

    def tenant_convs(self, tenant: str) -> list[ConvRecord]:
        return [c for c in self.convs.values() if c.tenant == tenant]
