"""Routing benchmark: 1,000 agents, 10,000 waiting conversations, two router processes.

``python -m loadtest.routing_bench [--quick] [--mode auto|offer] [--routers N] [--out PATH]``

1. starts one ``nats-server`` (free port, temporary store) and creates the buckets;
2. stores ``agents`` online agent records (each serves 2 of ``queues`` queues, ``max_chats``
   slots; capacity exceeds the backlog so every conversation can be placed) and ``backlog``
   waiting conversation records spread over the queues — as gateways and presence would;
3. starts ``routers`` router processes (``parley router``) and measures how fast they drain the
   backlog: **throughput** = decisions per second from the first to the last decision (a decision
   is an ``assigned`` record in auto mode, an ``offered`` one in offer mode), observed by a watch;
4. then opens ``probe`` more conversations at ``probe_rate``/s into free capacity and measures
   **decision latency**: the conversation record created → the decision stored, per conversation
   (p50/p99, nearest rank over every sample); the routers' own ``parley_router_decision_seconds``
   histogram (slot CAS + conversation CAS) is scraped too;
5. checks that no agent is over capacity and that every conversation is placed exactly once
   (its slot on exactly one agent), prints a table and writes a JSON report.

Exit code 0 on success, 1 when a check failed, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import tempfile
import time
import traceback
import urllib.request
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from parley.core import bus, subjects
from parley.core.config import Settings
from parley.core.events import now_ms
from parley.core.records import AgentRecord, ConvRecord
from parley.testing.nats_server import NatsServer
from parley.testing.processes import ServiceProcess

TENANT = "bench"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Plan:
    agents: int = 1000
    backlog: int = 10_000
    queues: int = 10
    # Slack over backlog + probe: agents serve 2 queues each, so a queue's last conversations
    # need free slots on the agents of *that* queue, not just anywhere.
    max_chats: int = 12
    probe: int = 1000
    probe_rate: float = 100.0
    routers: int = 2
    mode: str = "auto"
    drain_timeout_s: float = 600.0

    @classmethod
    def quick(cls) -> Plan:
        return cls(agents=100, backlog=1000, queues=5, max_chats=14, probe=200, drain_timeout_s=120.0)


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)] if ordered else float("nan")


def histogram_quantile(text: str, name: str, q: float) -> float | None:
    """A quantile from summed Prometheus histogram buckets (linear inside the bucket)."""
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith(f"{name}_bucket{{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[float("inf") if le == "+Inf" else float(le)] = float(line.rsplit(" ", 1)[1])
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total == 0:
        return None
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if math.isinf(bound):
                return lower
            inside = buckets[bound] - below
            return lower + (bound - lower) * ((rank - below) / inside if inside else 1)
        lower, below = bound, buckets[bound]
    return None


class Observer:
    """Watches the conversation bucket: when each conversation was first placed."""

    def __init__(self, kv: Any, decided_state: str) -> None:
        self.kv = kv
        self.state = decided_state
        self.decided: dict[str, float] = {}
        self.created: dict[str, float] = {}

    async def start(self) -> None:
        self.watcher = await self.kv.watch(f"{TENANT}.*", include_history=False)
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for entry in self.watcher:
            if entry is None or not entry.value:
                continue
            rec = ConvRecord.decode(entry.value)
            if rec.state == self.state and rec.conv not in self.decided:
                self.decided[rec.conv] = time.perf_counter()

    async def stop(self) -> None:
        self.task.cancel()
        await self.watcher.stop()


async def put_all(kv: Any, items: list[tuple[str, bytes]], chunk: int = 256) -> None:
    for i in range(0, len(items), chunk):
        await asyncio.gather(*(bus.kv_cas(kv, k, v, 0) for k, v in items[i : i + chunk]))


async def run(plan: Plan) -> dict[str, Any]:
    server = NatsServer().start()
    routers: list[ServiceProcess] = []
    try:
        settings = Settings(nats_urls=(server.url,), node_id="bench", routing_mode=plan.mode,
                            offer_timeout_ms=600_000, abandon_s=3600)
        nc = await bus.connect(settings, "bench")
        js = nc.jetstream()
        buckets = await bus.ensure_all(js, settings)
        now = now_ms()
        queues = [f"q{i}" for i in range(plan.queues)]
        agents = [
            AgentRecord(agent=f"a{i}", tenant=TENANT, status="online", since=now, reason="connected",
                        skills=[queues[i % plan.queues], queues[(i + 1) % plan.queues]], max_chats=plan.max_chats,
                        idle_since=now - i)
            for i in range(plan.agents)
        ]
        await put_all(buckets.agents, [(subjects.kv_key(TENANT, a.agent), a.encode()) for a in agents])
        convs = [
            ConvRecord(conv=f"c{i}", tenant=TENANT, customer=f"u{i}", queue=queues[i % plan.queues],
                       opened_at=now, queued_at=now + i)
            for i in range(plan.backlog)
        ]
        t0 = time.perf_counter()
        await put_all(buckets.convs, [(subjects.kv_key(TENANT, c.conv), c.encode()) for c in convs])
        print(f"stored {plan.agents} agents and {plan.backlog} waiting conversations in {time.perf_counter() - t0:.1f}s",
              flush=True)
        decided_state = "assigned" if plan.mode == "auto" else "offered"
        observer = Observer(buckets.convs, decided_state)
        await observer.start()

        env = {"PARLEY_NATS_URL": server.url, "PARLEY_ROUTING_MODE": plan.mode, "PARLEY_LOG_LEVEL": "WARNING",
               "PARLEY_OFFER_TIMEOUT_MS": "600000", "PARLEY_ABANDON_S": "3600"}
        log_dir = tempfile.mkdtemp(prefix="parley-routing-bench-")
        started = time.perf_counter()
        for i in range(plan.routers):
            routers.append(ServiceProcess("router", {**env, "PARLEY_NODE_ID": f"router-{i}"},
                                          log_path=f"{log_dir}/router-{i}.log").start(wait=False))
        for r in routers:
            await asyncio.to_thread(r.wait_ready, 60)
        deadline = time.perf_counter() + plan.drain_timeout_s
        while len(observer.decided) < plan.backlog and time.perf_counter() < deadline:
            await asyncio.sleep(0.1)
        if len(observer.decided) < plan.backlog:
            raise RuntimeError(f"only {len(observer.decided)}/{plan.backlog} placed in {plan.drain_timeout_s}s")
        stamps = sorted(observer.decided.values())
        drain_s = stamps[-1] - stamps[0]
        throughput = (plan.backlog - 1) / drain_s if drain_s > 0 else float("inf")
        print(f"backlog drained: {plan.backlog} decisions in {drain_s:.2f}s = {throughput:.0f}/s "
              f"(first decision {stamps[0] - started:.2f}s after the routers were spawned)", flush=True)

        # Decision latency at a steady rate, into free capacity.
        latencies: list[float] = []
        probe_ids = [f"p{i}" for i in range(plan.probe)]
        interval = 1 / plan.probe_rate
        next_at = time.perf_counter()
        for i, conv in enumerate(probe_ids):
            rec = ConvRecord(conv=conv, tenant=TENANT, customer=f"pu{i}", queue=queues[i % plan.queues],
                             opened_at=now_ms(), queued_at=now_ms())
            observer.created[conv] = time.perf_counter()
            await bus.kv_cas(buckets.convs, subjects.kv_key(TENANT, conv), rec.encode(), 0)
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        deadline = time.perf_counter() + 60
        while not all(c in observer.decided for c in probe_ids) and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        latencies = [(observer.decided[c] - observer.created[c]) * 1000 for c in probe_ids if c in observer.decided]
        await observer.stop()

        metrics_text = "".join(
            urllib.request.urlopen(f"{r.base_url}/metrics", timeout=5).read().decode() for r in routers)
        internal = {f"p{q}": histogram_quantile(metrics_text, "parley_router_decision_seconds", q / 100)
                    for q in (50, 99)}

        # Checks: capacity, and every conversation's slot on exactly one agent.
        problems: list[str] = []
        holders: dict[str, list[str]] = {}
        keys = [subjects.kv_key(TENANT, a.agent) for a in agents]
        for i in range(0, len(keys), 256):
            raws = await asyncio.gather(*(bus.kv_read(buckets.agents, k) for k in keys[i : i + 256]))
            for raw, _ in raws:
                a = AgentRecord.decode(raw)  # type: ignore[arg-type]
                if a.load > a.max_chats:
                    problems.append(f"{a.agent} over capacity: {a.load}/{a.max_chats}")
                for conv in a.convs:
                    holders.setdefault(conv, []).append(a.agent)
        for conv in [c.conv for c in convs] + probe_ids:
            if len(holders.get(conv, [])) != 1:
                problems.append(f"{conv} held by {holders.get(conv, [])}")
        await nc.close()
        return {
            "when": datetime.now(UTC).isoformat(),
            "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform()},
            "plan": asdict(plan),
            "backlog": {"decisions": plan.backlog, "seconds": round(drain_s, 3), "per_s": round(throughput, 1)},
            "latency_ms": {
                "samples": len(latencies), "rate_per_s": plan.probe_rate,
                "p50": round(percentile(latencies, 50), 2), "p99": round(percentile(latencies, 99), 2),
                "max": round(max(latencies), 2) if latencies else None,
            },
            "router_decision_ms": {k: round(v * 1000, 2) if v is not None else None for k, v in internal.items()},
            "problems": problems[:20],
            "ok": not problems and len(latencies) == plan.probe,
        }
    finally:
        for r in routers:
            r.stop()
        server.cleanup()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 agents, 1,000 conversations")
    parser.add_argument("--mode", choices=("auto", "offer"), default="auto")
    parser.add_argument("--routers", type=int, default=2)
    parser.add_argument("--out", help="JSON report path (default loadtest/results/routing-<time>.json)")
    args = parser.parse_args(argv)
    plan = Plan.quick() if args.quick else Plan()
    plan.mode, plan.routers = args.mode, args.routers
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    try:
        report = asyncio.run(run(plan))
    except Exception:
        traceback.print_exc()
        return 2
    out = Path(args.out) if args.out else RESULTS_DIR / f"routing-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    lat, internal = report["latency_ms"], report["router_decision_ms"]
    print(f"\nrouting: {plan.agents} agents, {plan.backlog} waiting, {plan.routers} routers, {plan.mode} mode")
    print(f"  backlog throughput   {report['backlog']['per_s']:>8.0f} decisions/s ({report['backlog']['seconds']} s)")
    print(f"  decision latency     p50 {lat['p50']} ms, p99 {lat['p99']} ms (record → decision, {lat['rate_per_s']:.0f}/s)")
    print(f"  router decision time p50 {internal['p50']} ms, p99 {internal['p99']} ms (slot CAS + conv CAS)")
    print(f"  checks               {'ok' if report['ok'] else report['problems']}")
    print(f"  report               {out}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
