"""Property-based churn (hypothesis) against real NATS: two routers and two presence instances while
agents connect, drop without a word, go away and come back, customers open and close, offers are
accepted, declined or left to expire. Then an invariant checker over the whole record:

- the agents bucket's history (every revision of every agent record, via a watch) and the
  heartbeats the simulated gateways sent;
- every offer frame published to an agent;
- every conversation's chain in stream CONV.

Invariants (G4, G5): an offer or assignment is only ever created in a revision of the agent's record
that shows it ``online`` and within ``max_chats`` (the compare-and-set that made it); no agent record
ever exceeds its capacity; an agent is marked ``offline`` only after a TTL without heartbeats, and
is never left ``online`` long after they stopped; an assigned agent who stays away has each of its
conversations re-queued within TTL + grace + 5 s; no conversation is assigned twice at once or
lost: once capacity exists, every open conversation is assigned, and agent slots match the records.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field

import orjson
import pytest
from helpers import eventually
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from parley.core import bus, subjects
from parley.core.config import Settings
from parley.core.events import now_ms
from parley.core.records import AgentRecord, ConvRecord
from parley.presence.service import PresenceService
from parley.router.service import RouterService

pytestmark = pytest.mark.chaos

TTL_MS = 1000
GRACE_MS = 300
OFFER_MS = 600
HEARTBEAT_S = 0.2
AGENTS = 4
MAX_CHATS = 2
QUEUE = "support"
SWEEP_SLACK_MS = 1000  # sweep interval (250 ms) + KV round trips + a loaded 2-core box

OPS = ("connect", "connect", "drop", "drop", "away", "back", "open", "open", "open", "close")
steps_strategy = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 31), st.floats(0.02, 0.25)), min_size=15, max_size=28
)


@dataclass
class SimAgent:
    name: str
    connected: bool = False
    heartbeats: list[int] = field(default_factory=list)  # wall ms of every heartbeat sent
    drops: list[int] = field(default_factory=list)
    backs: list[int] = field(default_factory=list)  # reconnects, wall ms
    task: asyncio.Task | None = None


class Churn:
    def __init__(self, url: str, rng: random.Random) -> None:
        self.tenant = "churn" + uuid.uuid4().hex[:8]
        self.settings = Settings(nats_urls=(url,), node_id="churn", presence_ttl_ms=TTL_MS,
                                 requeue_grace_ms=GRACE_MS, offer_timeout_ms=OFFER_MS, routing_mode="offer")
        self.rng = rng
        self.agents = [SimAgent(f"a{i}") for i in range(AGENTS)]
        self.convs: list[str] = []
        self.closed: set[str] = set()
        self.offers: list[tuple[int, str, str]] = []  # (wall ms, agent, conv)
        self.history: list[tuple[str, int, AgentRecord]] = []  # (agent, revision, record)
        self.accept_all = False
        self.tasks: set[asyncio.Task] = set()

    # --- setup -----------------------------------------------------------------------------------
    async def start(self) -> None:
        self.nc = await bus.connect(self.settings, "churn")
        self.js = self.nc.jetstream()
        self.buckets = await bus.ensure_all(self.js, self.settings)
        self.watcher = await self.buckets.agents.watch(f"{self.tenant}.*")
        self.watch_task = asyncio.create_task(self._watch())
        self.offer_sub = await self.nc.subscribe(f"user.{self.tenant}.*", cb=self._on_frame)
        self.services = []
        for i in range(2):
            for cls in (PresenceService, RouterService):
                svc = cls(self.settings.with_overrides(node_id=f"{cls.__name__}-{i}"))
                await svc.start()
                self.services.append(svc)

    async def stop(self) -> None:
        for agent in self.agents:
            if agent.task:
                agent.task.cancel()
        for task in list(self.tasks):
            task.cancel()
        for svc in self.services:
            await svc.stop()
        self.watch_task.cancel()
        await self.watcher.stop()
        await self.nc.close()

    async def _watch(self) -> None:
        async for entry in self.watcher:
            if entry is not None and entry.value:
                rec = AgentRecord.decode(entry.value)
                self.history.append((rec.agent, entry.revision or 0, rec))

    async def _on_frame(self, msg) -> None:
        frame = orjson.loads(msg.data)
        if frame.get("t") != "offer":
            return
        agent = msg.subject.rsplit(".", 1)[1]
        self.offers.append((now_ms(), agent, frame["conv"]))
        sim = next(a for a in self.agents if a.name == agent)
        if not sim.connected:
            return  # nobody is there to answer
        choice = "accept" if self.accept_all else self.rng.choice(("accept", "accept", "decline", "ignore"))
        if choice != "ignore":
            self._spawn(self._answer(agent, frame["conv"], choice, self.rng.uniform(0, 0.2)))

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, agent: str, conv: str, op: str, delay: float) -> None:
        await asyncio.sleep(delay)  # a human's reaction time, not synchronisation
        await self.route(op, conv, agent, "agent")

    async def route(self, op: str, conv: str, by: str, role: str) -> None:
        body = {"op": op, "tenant": self.tenant, "conv": conv, "by": {"id": by, "role": role}}
        await self.js.publish(subjects.route_subject(self.tenant, conv), orjson.dumps(body),
                              stream=subjects.ROUTE_STREAM)

    # --- what a gateway would do -----------------------------------------------------------------
    async def connect(self, agent: SimAgent) -> None:
        if agent.connected:
            return
        agent.connected = True
        agent.backs.append(now_ms())
        body = {"tenant": self.tenant, "agent": agent.name, "node": "gw", "skills": [QUEUE], "max_chats": MAX_CHATS}
        agent.heartbeats.append(now_ms())
        await self.nc.request(subjects.PRESENCE_HELLO, orjson.dumps(body), timeout=5)
        agent.task = asyncio.create_task(self._heartbeat(agent))

    async def _heartbeat(self, agent: SimAgent) -> None:
        payload = orjson.dumps({"node": "gw", "skills": [QUEUE], "max_chats": MAX_CHATS})
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            agent.heartbeats.append(now_ms())
            await self.nc.publish(subjects.heartbeat_subject(self.tenant, agent.name), payload)

    def drop(self, agent: SimAgent) -> None:
        """The connection vanishes without a close frame: heartbeats just stop."""
        if not agent.connected:
            return
        agent.connected = False
        if agent.task:
            agent.task.cancel()
        agent.drops.append(now_ms())

    async def set_status(self, agent: SimAgent, status: str) -> None:
        if agent.connected:
            body = {"tenant": self.tenant, "agent": agent.name, "status": status}
            await self.nc.request(subjects.PRESENCE_SET, orjson.dumps(body), timeout=5)

    async def open(self) -> None:
        if len(self.convs) - len(self.closed) >= AGENTS * MAX_CHATS:
            return  # keep the load within total capacity, so "assigned once capacity exists" is decidable
        conv, customer = f"c{len(self.convs)}", f"cu{len(self.convs)}"
        self.convs.append(conv)
        await bus.publish_event(self.js, self.tenant, conv, "opened", {"queue": QUEUE, "customer": {"id": customer}},
                                msg_id=f"o:{self.tenant}:{customer}:1")
        now = now_ms()
        rec = ConvRecord(conv=conv, tenant=self.tenant, customer=customer, queue=QUEUE, opened_at=now, queued_at=now)
        await bus.kv_cas(self.buckets.convs, subjects.kv_key(self.tenant, conv), rec.encode(), 0)

    async def close(self, index: int) -> None:
        open_ = [c for c in self.convs if c not in self.closed]
        if open_:
            conv = open_[index % len(open_)]
            self.closed.add(conv)
            await self.route("close", conv, "cu" + conv[1:], "customer")

    async def run(self, steps) -> None:
        for op, index, pause in steps:
            agent = self.agents[index % AGENTS]
            if op == "connect":
                await self.connect(agent)
            elif op == "drop":
                self.drop(agent)
            elif op == "away":
                await self.set_status(agent, "away")
            elif op == "back":
                await self.set_status(agent, "online")
            elif op == "open":
                await self.open()
            else:
                await self.close(index)
            await asyncio.sleep(pause)  # the script's pacing, not synchronisation

    async def quiesce(self) -> dict[str, ConvRecord]:
        """Let the lost agents be lost, then everyone back online and accepting: all served."""
        await asyncio.sleep((TTL_MS + GRACE_MS + SWEEP_SLACK_MS) / 1000)  # dropped agents stay away this long
        self.accept_all = True
        for agent in self.agents:
            await self.connect(agent)
            await self.set_status(agent, "online")
        for ts, agent, conv in list(self.offers):  # offers made before accept_all: answer them now
            if now_ms() - ts < OFFER_MS:
                self._spawn(self._answer(agent, conv, "accept", 0))
        open_convs = [c for c in self.convs if c not in self.closed]

        async def records():
            out = {}
            for conv in self.convs:
                raw, _ = await bus.kv_read(self.buckets.convs, subjects.kv_key(self.tenant, conv))
                out[conv] = ConvRecord.decode(raw)
            done = all(out[c].state == "assigned" and not out[c].outbox for c in open_convs) and all(
                out[c].state == "closed" and not out[c].outbox for c in self.closed)
            return [out] if done else None

        return (await eventually(records, timeout=15, what="every open conversation assigned"))[0]

    async def chains(self) -> dict[str, list]:
        reader = bus.StreamReader(self.nc)
        await reader.start()
        try:
            return {c: await reader.read(self.tenant, c, after=0) for c in self.convs}
        finally:
            await reader.stop()

    async def agent_records(self) -> dict[str, AgentRecord]:
        out = {}
        for agent in self.agents:
            raw, _ = await bus.kv_read(self.buckets.agents, subjects.kv_key(self.tenant, agent.name))
            out[agent.name] = AgentRecord.decode(raw)
        return out


# --- the invariant checker -----------------------------------------------------------------------
def check_capacity_and_status(history: list[tuple[str, int, AgentRecord]]) -> set[tuple[str, str, str]]:
    """Per agent, in revision order: slots are only taken or upgraded while online and within
    capacity. Returns ``(agent, conv, kind)`` of every slot creation, for matching offers/assignments."""
    created: set[tuple[str, str, str]] = set()
    last: dict[str, AgentRecord] = {}
    for agent, _, rec in sorted(history, key=lambda h: h[1]):
        before = last.get(agent)
        old = before.convs if before else {}
        assert rec.load <= rec.max_chats, f"{agent} over capacity: {rec.convs}"
        for conv, kind in rec.convs.items():
            if old.get(conv) != kind:
                assert rec.status == "online", f"{agent} got a {kind} slot for {conv} while {rec.status}"
                created.add((agent, conv, kind))
        last[agent] = rec
    return created


def check_presence_truthful(history, agents: list[SimAgent]) -> None:
    """Offline only after a TTL without heartbeats; never online long after they stopped."""
    by_name = {a.name: a for a in agents}
    for agent, _, rec in history:
        if rec.status == "offline":
            sent = [t for t in by_name[agent].heartbeats if t <= rec.since]
            # presence stores a heartbeat at most every 100 ms at this TTL (a burst is one write), so
            # the last one stored may be up to that much older than the last one sent
            assert sent and rec.since - sent[-1] >= TTL_MS - 150, f"{agent} offline {rec.since - sent[-1]} ms after a heartbeat"
            assert rec.reason == "heartbeat_lost"
    for sim in agents:
        for dropped in sim.drops:
            back = next((t for t in sim.backs if t > dropped), None)
            deadline = dropped + TTL_MS + SWEEP_SLACK_MS
            if back is not None and back <= deadline:
                continue
            offline = [r.since for a, _, r in history if a == sim.name and r.status == "offline" and r.since >= dropped]
            assert offline and offline[0] <= deadline, f"{sim.name} left online after its drop at {dropped}"


def check_chains(chains, records, created, offers, agents: list[SimAgent]) -> None:
    for agent, conv, _ in [(a, c, 0) for _, a, c in offers]:
        assert (agent, conv, "offer") in created, f"offer of {conv} to {agent} without a reserved slot"
    by_name = {a.name: a for a in agents}
    for conv, evs in chains.items():
        holder = None
        assigned_at = 0
        for ev in evs:
            if ev.type == "assigned":
                assert holder is None, f"{conv} assigned to {ev.data['agent']['id']} while held by {holder}"
                holder, assigned_at = ev.data["agent"]["id"], ev.ts
                assert (holder, conv, "assigned") in created, f"{conv} assigned to {holder} without an online slot"
            elif ev.type == "unassigned":
                assert ev.data == {"agent": {"id": holder}, "reason": "agent_offline"}
                sim = by_name[holder]
                drop = max((t for t in sim.drops if t <= ev.ts), default=None)
                assert drop is not None, f"{conv} unassigned from {holder}, who never dropped"
                holder = None
            elif ev.type == "closed":
                assert ev is evs[-1], f"{conv} has events after closed"
                holder = None
        # Re-queue bound: a holder who dropped and stayed away lost the conversation in time.
        if holder is not None:
            sim = by_name[holder]
            for dropped in [t for t in sim.drops if t >= assigned_at]:
                back = next((t for t in sim.backs if t > dropped), None)
                assert back is not None and back - dropped <= TTL_MS + GRACE_MS + 5000, (
                    f"{conv} still with {holder}, who dropped at {dropped} and did not come back in time")
        rec = records[conv]
        if rec.state == "assigned":
            assert holder == rec.agent, f"{conv}: chain says {holder}, record says {rec.agent}"
        else:
            assert rec.state == "closed" and evs[-1].type == "closed"
    for conv, evs in chains.items():
        unassigned = [e for e in evs if e.type == "unassigned"]
        for ev in unassigned:
            sim = by_name[ev.data["agent"]["id"]]
            drop = max(t for t in sim.drops if t <= ev.ts)
            assert ev.ts - drop <= TTL_MS + GRACE_MS + 5000, f"{conv} requeued {ev.ts - drop} ms after the drop"


def check_slots(records: dict[str, ConvRecord], agent_records: dict[str, AgentRecord]) -> None:
    for name, rec in agent_records.items():
        mine = {c for c, r in records.items() if r.state == "assigned" and r.agent == name}
        assert set(rec.convs) == mine and all(k == "assigned" for k in rec.convs.values()), (name, rec.convs, mine)


async def scenario(url: str, steps, rng: random.Random) -> None:
    churn = Churn(url, rng)
    await churn.start()
    try:
        await churn.run(steps)
        records = await churn.quiesce()
        chains = await churn.chains()
        agent_records = await eventually(churn.agent_records, what="agent records")

        async def slots_settled():
            got = await churn.agent_records()
            try:
                check_slots(records, got)
            except AssertionError:
                return None
            return got

        agent_records = await eventually(slots_settled, timeout=5, what="slots match the records")

        async def history_caught_up():
            # the watch has delivered every agent record's latest revision
            for agent in churn.agents:
                _, rev = await bus.kv_read(churn.buckets.agents, subjects.kv_key(churn.tenant, agent.name))
                if max((r for a, r, _ in churn.history if a == agent.name), default=0) < rev:
                    return False
            return True

        await eventually(history_caught_up, timeout=10, what="the watch delivered the last revisions")
        created = check_capacity_and_status(churn.history)
        check_presence_truthful(churn.history, churn.agents)
        check_chains(chains, records, created, churn.offers, churn.agents)
        check_slots(records, agent_records)
        types = [e.type for evs in chains.values() for e in evs]
        print(f"churn: {len(churn.convs)} convs, {len(churn.offers)} offers, {types.count('assigned')} assigned, "
              f"{types.count('unassigned')} requeued, {sum(len(a.drops) for a in churn.agents)} drops, "
              f"{sum(r.status == 'offline' for _, _, r in churn.history)} offline revisions")
    except BaseException:
        print("steps:", steps)
        raise
    finally:
        await churn.stop()


# Every kind of churn at least once: holders dropping for good and coming back, away/back, closes.
SCRIPTED = [("connect", i, 0.02) for i in range(4)] + [("open", 0, 0.05)] * 6 + [
    ("drop", 0, 0.3), ("away", 1, 0.1), ("open", 0, 0.1), ("drop", 2, 0.5), ("connect", 2, 0.2), ("back", 1, 0.1),
    ("close", 3, 0.1), ("open", 0, 0.2), ("drop", 3, 0.1), ("close", 1, 0.1), ("connect", 0, 0.2),
]


@settings(max_examples=3, deadline=None, database=None, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=steps_strategy, rng=st.randoms(use_true_random=False))
@example(steps=SCRIPTED, rng=random.Random(7))
def test_routing_and_presence_invariants_under_churn(nats_server, steps, rng):
    started = time.monotonic()
    asyncio.run(scenario(nats_server.url, steps, rng))
    print(f"churn example: {len(steps)} steps in {time.monotonic() - started:.1f}s")
