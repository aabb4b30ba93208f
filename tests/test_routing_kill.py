"""Real SIGKILL of a router process mid-assignment and of a presence process mid-sweep: a fresh
process continues from the state in NATS alone, nothing is lost, assigned twice or over capacity."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest
from helpers import eventually
from test_router_service import open_conv, put_agent

from parley.core import bus, subjects
from parley.core.records import AgentRecord, ConvRecord
from parley.testing.processes import ServiceProcess

pytestmark = pytest.mark.chaos


def service(kind: str, nats_server, tmp_path, n: int, **env: str) -> ServiceProcess:
    base = {"PARLEY_NATS_URL": nats_server.url, "PARLEY_LOG_FORMAT": "text", "PARLEY_NODE_ID": f"{kind}-{n}"}
    return ServiceProcess(kind, {**base, **env}, log_path=str(tmp_path / f"{kind}-{n}.log"))


class History:
    """Every change of one bucket's keys under a tenant, in order, decoded."""

    def __init__(self, kv, tenant, decode):
        self.kv, self.tenant, self.decode = kv, tenant, decode
        self.entries: list[tuple[float, str, object]] = []

    async def __aenter__(self):
        self.watcher = await self.kv.watch(f"{self.tenant}.*")
        self.task = asyncio.create_task(self._run())
        return self

    async def _run(self):
        async for entry in self.watcher:
            if entry is not None and entry.value:
                self.entries.append((time.monotonic(), entry.key.split(".", 1)[1], self.decode(entry.value)))

    async def __aexit__(self, *exc):
        self.task.cancel()
        await self.watcher.stop()


async def test_router_sigkill_mid_assignment(nats_server, tmp_path, js, settings, tenant, nc):
    env = {"PARLEY_ROUTING_MODE": "auto"}
    buckets = await bus.ensure_buckets(js, settings)
    agents = [f"a{i}" for i in range(20)]
    for name in agents:
        await put_agent(buckets, tenant, name, max_chats=5)
    first = await asyncio.to_thread(service("router", nats_server, tmp_path, 1, **env).start)
    convs = [f"c{i}" for i in range(100)]
    async with History(buckets.convs, tenant, ConvRecord.decode) as conv_log, \
            History(buckets.agents, tenant, AgentRecord.decode) as agent_log:
        await asyncio.gather(*(open_conv(buckets, tenant, c) for c in convs))
        await eventually(lambda: sum(r.state == "assigned" for _, _, r in conv_log.entries) >= 5, timeout=15,
                         what="assignments under way")
        first.kill()
        assigned_at_kill = len({k for _, k, r in conv_log.entries if r.state == "assigned"})
        assert assigned_at_kill < len(convs), "the kill came too late to be mid-assignment"
        second = await asyncio.to_thread(service("router", nats_server, tmp_path, 2, **env).start)
        try:
            async def all_settled():
                recs = {}
                for c in convs:
                    raw, _ = await bus.kv_read(buckets.convs, subjects.kv_key(tenant, c))
                    recs[c] = ConvRecord.decode(raw)
                return recs if all(r.state == "assigned" and not r.outbox for r in recs.values()) else None

            recs = await eventually(all_settled, timeout=20, what="every conversation assigned")

            async def slots_agree():
                for name in agents:
                    raw, _ = await bus.kv_read(buckets.agents, subjects.kv_key(tenant, name))
                    mine = {c for c, r in recs.items() if r.agent == name}
                    if set(AgentRecord.decode(raw).convs) != mine:
                        return False
                return True

            await eventually(slots_agree, timeout=10, what="agent slots repaired to match")
        finally:
            second.stop()
    reader = bus.StreamReader(nc)
    await reader.start()
    try:
        for c in convs:
            evs = await reader.read(tenant, c, after=0)
            assert [e.type for e in evs] == ["assigned"], (c, evs)
    finally:
        await reader.stop()
    for _, name, rec in agent_log.entries:
        assert rec.load <= rec.max_chats, (name, rec.convs)
    print(f"router killed with {assigned_at_kill}/100 assigned; the fresh router finished the rest")


async def test_presence_sigkill_mid_sweep(nats_server, tmp_path, js, settings, tenant, nc):
    env = {"PARLEY_PRESENCE_TTL_MS": "1500"}
    buckets = await bus.ensure_buckets(js, settings)
    first = await asyncio.to_thread(service("presence", nats_server, tmp_path, 1, **env).start)
    agents = [f"a{i}" for i in range(300)]
    async with History(buckets.agents, tenant, AgentRecord.decode) as log:
        for i in range(0, len(agents), 50):
            await asyncio.gather(*(
                nc.request(subjects.PRESENCE_HELLO, orjson.dumps(
                    {"tenant": tenant, "agent": a, "node": "gw", "skills": ["q"], "max_chats": 2}), timeout=5)
                for a in agents[i : i + 50]))
        # No heartbeats from now on: the sweep takes them all offline; kill it while it does.
        await eventually(lambda: any(r.status == "offline" for _, _, r in log.entries), timeout=10,
                         what="sweep under way")
        first.kill()
        offline_at_kill = len({k for _, k, r in log.entries if r.status == "offline"})
        second = await asyncio.to_thread(service("presence", nats_server, tmp_path, 2, **env).start)
        try:
            def statuses():
                latest = {}
                for _, key, rec in log.entries:
                    latest[key] = rec.status
                return latest

            await eventually(lambda: len(statuses()) == len(agents) and set(statuses().values()) == {"offline"},
                             timeout=15, what="every agent offline")
        finally:
            second.stop()
    transitions: dict[str, list[str]] = {}
    for _, key, rec in log.entries:
        seq = transitions.setdefault(key, [])
        if not seq or seq[-1] != rec.status:
            seq.append(rec.status)
    assert all(seq == ["online", "offline"] for seq in transitions.values()), transitions
    print(f"presence killed with {offline_at_kill}/{len(agents)} offline; the fresh instance swept the rest")
