"""Parley benchmark: raw JetStream baseline vs one customer → gateway → one agent.

``python -m loadtest.bench [--quick] [--out PATH]`` (``make bench ARGS=--quick``). One run:

1. starts one ``nats-server`` (free port, temporary store);
2. baseline on that server with nats-py, stream ``BENCH`` (``bench.>``, RePublish to
   ``livebench.>``, same options as Parley's ``CONV``): sequential ``await js.publish()``,
   pipelined ``publish_async``, and a fixed 1,000 msg/s rate, with a core subscriber on the
   republished subject;
3. starts the Parley stack (gateway, router, presence, transcript as subprocesses, auto routing),
   connects one agent and one customer with the SDK, opens a conversation and waits for it to be
   assigned; then sequential sends, pipelined sends (64 in flight) and a fixed 1,000 msg/s rate,
   measuring ack latency (send → ``ack``) and end-to-end latency (send → ``ev`` at the agent);
4. checks that every acknowledged message reached the agent exactly once, in order, with the
   ``seq`` of its ``ack``;
5. prints a table, writes a JSON report, stops every process it started (also on error).

Exit code: 0 on success, 1 when a delivery check failed, 2 when the run itself failed.
Percentiles are nearest-rank over every sample (no histogram approximation).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import secrets
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PAYLOAD_BYTES = 200
QUEUE = "support"
TENANT = "bench"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# --- settings ---------------------------------------------------------------------------------
@dataclass
class Plan:
    """How much of each phase to run; every phase is also bounded in time (``max_s``)."""

    base_seq_n: int = 5000
    base_pipe_n: int = 50_000
    base_rate_s: float = 5.0
    parley_seq_n: int = 3000
    parley_pipe_n: int = 20_000
    parley_rate_s: float = 10.0
    rate: int = 1000
    window: int = 64
    warmup_n: int = 200
    max_s: float = 15.0  # per closed-loop phase
    drain_s: float = 15.0  # waiting for the last acks / deliveries of a phase
    budget_s: float = 240.0  # the whole async part
    transcript: bool = True

    @classmethod
    def quick(cls) -> Plan:
        return cls(base_seq_n=1000, base_pipe_n=10_000, base_rate_s=2.0, parley_seq_n=500,
                   parley_pipe_n=3000, parley_rate_s=3.0, warmup_n=50, max_s=5.0, drain_s=10.0,
                   budget_s=120.0)


# --- statistics ---------------------------------------------------------------------------------
def percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(samples_s: list[float]) -> dict[str, Any]:
    """Latency summary in milliseconds."""
    s = sorted(x * 1000 for x in samples_s)
    out: dict[str, Any] = {"n": len(s)}
    if s:
        out.update({
            "min": round(s[0], 3),
            "p50": round(percentile(s, 50) or 0, 3),
            "p90": round(percentile(s, 90) or 0, 3),
            "p99": round(percentile(s, 99) or 0, 3),
            "p999": round(percentile(s, 99.9) or 0, 3),
            "max": round(s[-1], 3),
            "mean": round(sum(s) / len(s), 3),
        })
    return out


# --- CPU accounting -------------------------------------------------------------------------------
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_cpu_s(pid: int) -> float | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def _machine_busy() -> tuple[float, float] | None:
    try:
        parts = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = parts[3] + (parts[4] if len(parts) > 4 else 0)
    return sum(parts) - idle, sum(parts)


class CpuMeter:
    """CPU time of named processes between ``start()`` and ``stop()``, as % of one core."""

    def __init__(self, pids: Callable[[], dict[str, int]]) -> None:
        self._pids = pids
        self._t0 = 0.0
        self._before: dict[str, float | None] = {}
        self._machine: tuple[float, float] | None = None

    def _sample(self) -> dict[str, float | None]:
        values: dict[str, float | None] = {"bench": time.process_time()}
        for name, pid in self._pids().items():
            values[name] = _proc_cpu_s(pid)
        return values

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._before = self._sample()
        self._machine = _machine_busy()

    def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self._t0
        after = self._sample()
        out: dict[str, Any] = {}
        for name, value in after.items():
            before = self._before.get(name)
            if value is not None and before is not None and wall > 0:
                out[name] = round(100 * (value - before) / wall, 1)
        machine = _machine_busy()
        if machine and self._machine and machine[1] > self._machine[1]:
            ncpu = os.cpu_count() or 1
            total = 100 * ncpu * (machine[0] - self._machine[0]) / (machine[1] - self._machine[1])
            ours = sum(out.values())
            out["machine_total"] = round(total, 1)
            out["other_processes"] = round(max(0.0, total - ours), 1)  # load we did not start
        return out


# --- the gateway's own view: its PubAck latency histogram (Prometheus text) --------------------------
ACK_HIST = "parley_gateway_ack_latency_seconds_bucket"


def _scrape_ack_buckets(base_url: str) -> dict[str, float]:
    import urllib.request

    out: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"{base_url}/metrics", timeout=2) as resp:
            text = resp.read().decode(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        if line.startswith(ACK_HIST + "{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[le] = float(line.rsplit(" ", 1)[1])
    return out


class GatewayAckMeter:
    """Delta of the gateway's send → JetStream PubAck histogram over one phase: the server-side part
    of the ack latency, without WebSocket, client and gateway event-loop time around it."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._before: dict[str, float] = {}

    async def start(self) -> None:
        self._before = await asyncio.to_thread(_scrape_ack_buckets, self.base_url)

    async def stop(self) -> dict[str, Any]:
        after = await asyncio.to_thread(_scrape_ack_buckets, self.base_url)
        if not after:
            return {}
        delta = {le: after[le] - self._before.get(le, 0.0) for le in after}
        total = delta.get("+Inf", 0.0)
        if total <= 0:
            return {}
        bounds = sorted((float(le), n) for le, n in delta.items() if le != "+Inf")

        def upper(p: float) -> str:
            for bound, n in bounds:
                if n >= p / 100 * total:
                    return f"<= {bound * 1000:g}"
            return f"> {bounds[-1][0] * 1000:g}" if bounds else "?"

        return {"n": int(total), "p50_ms": upper(50), "p99_ms": upper(99),
                "share_over_ms": {f"{b * 1000:g}": round(1 - n / total, 4) for b, n in bounds if b >= 0.001}}


# --- baseline: raw nats-py JetStream -------------------------------------------------------------------
def _payload(phase: str, i: int) -> bytes:
    head = f"{phase}{i:09d}".encode()
    return head + b"x" * (PAYLOAD_BYTES - len(head))


async def run_baseline(url: str | list[str], plan: Plan, run_id: str, cpu: CpuMeter, replicas: int = 1) -> dict[str, Any]:
    import nats
    from nats.js import api as jsapi

    errors: list[str] = []
    async def on_error(exc: Exception) -> None:
        errors.append(repr(exc))

    nc = await nats.connect(url, error_cb=on_error, max_reconnect_attempts=3)
    js = nc.jetstream()
    with contextlib.suppress(Exception):
        await js.delete_stream("BENCH")
    await js.add_stream(jsapi.StreamConfig(
        name="BENCH", subjects=["bench.>"], storage=jsapi.StorageType.FILE,
        retention=jsapi.RetentionPolicy.LIMITS, max_age=3600, duplicate_window=300, num_replicas=replicas,
        allow_direct=True, republish=jsapi.RePublish(src="bench.>", dest="livebench.>"),
    ))
    live_at: dict[bytes, float] = {}

    async def on_live(msg: Any) -> None:
        live_at[msg.data[:10]] = time.perf_counter()

    sub = await nc.subscribe("livebench.>", cb=on_live)
    subject = f"bench.{TENANT}.c0"
    result: dict[str, Any] = {"stream": "BENCH", "subject": subject, "payload_bytes": PAYLOAD_BYTES,
                              "headers": "Nats-Msg-Id (unique per message, as Parley sends)"}

    def headers(phase: str, i: int) -> dict[str, str]:
        return {"Nats-Msg-Id": f"b:{run_id}:{phase}:{i}"}

    try:
        # warm-up
        for i in range(plan.warmup_n):
            await js.publish(subject, _payload("w", i), headers=headers("w", i))

        # (a) sequential
        cpu.start()
        ack_lat: list[float] = []
        sent_at: dict[bytes, float] = {}
        t_start = time.perf_counter()
        deadline = t_start + plan.max_s
        n = 0
        for i in range(plan.base_seq_n):
            data = _payload("s", i)
            t0 = time.perf_counter()
            sent_at[data[:10]] = t0
            await js.publish(subject, data, headers=headers("s", i))
            ack_lat.append(time.perf_counter() - t0)
            n += 1
            if time.perf_counter() > deadline:
                break
        elapsed = time.perf_counter() - t_start
        await _wait_until(lambda: all(k in live_at for k in sent_at), plan.drain_s)
        live_lat = [live_at[k] - t for k, t in sent_at.items() if k in live_at]
        result["sequential"] = {
            "n": n, "seconds": round(elapsed, 3), "msgs_per_s": round(n / elapsed, 1),
            "ack_ms": summarize_ms(ack_lat), "live_ms": summarize_ms(live_lat),
            "live_missing": n - len(live_lat), "cpu_pct": cpu.stop(),
        }

        # (b) pipelined publish_async: as nats-py intends it, then with the gateway's wait_stall
        for key, phase, stall, n_msgs in (("pipelined", "p", None, plan.base_pipe_n),
                                          ("pipelined_wait_stall", "q", 5.0, plan.base_pipe_n // 2)):
            cpu.start()
            futures: list[asyncio.Future[Any]] = []
            t_start = time.perf_counter()
            deadline = t_start + plan.max_s
            for i in range(n_msgs):
                data = _payload(phase, i)
                futures.append(await js.publish_async(subject, data, wait_stall=stall, headers=headers(phase, i)))
                if i % 1000 == 999 and time.perf_counter() > deadline:
                    break
            done, pending = await asyncio.wait(futures, timeout=plan.drain_s) if futures else (set(), set())
            elapsed = time.perf_counter() - t_start
            ok = sum(1 for f in done if f.exception() is None)
            result[key] = {
                "mode": f"publish_async(wait_stall={stall}), nats-py default pending limit (4000)",
                "n": len(futures), "acked": ok, "failed": len(done) - ok, "unfinished": len(pending),
                "seconds": round(elapsed, 3), "msgs_per_s": round(ok / elapsed, 1), "cpu_pct": cpu.stop(),
            }

        # (c) fixed rate
        total = int(plan.rate * plan.base_rate_s)
        cpu.start()
        acks: dict[int, float] = {}
        intended: dict[bytes, float] = {}
        fut_list: list[asyncio.Future[Any]] = []
        start = time.perf_counter() + 0.01
        max_lag = 0.0
        i = 0
        while i < total:
            now = time.perf_counter()
            due = min(total, int((now - start) * plan.rate) + 1)
            while i < due:
                t_i = start + i / plan.rate
                max_lag = max(max_lag, time.perf_counter() - t_i)
                data = _payload("r", i)
                intended[data[:10]] = t_i
                fut = await js.publish_async(subject, data, headers=headers("r", i))
                fut.add_done_callback(_record_done(acks, i))
                fut_list.append(fut)
                i += 1
            await asyncio.sleep(max(0.0, start + i / plan.rate - time.perf_counter()))
        send_elapsed = time.perf_counter() - start
        await asyncio.wait(fut_list, timeout=plan.drain_s)
        await _wait_until(lambda: all(k in live_at for k in intended), plan.drain_s)
        ack_lat = [acks[j] - (start + j / plan.rate) for j in range(total) if j in acks]
        live_lat = [live_at[k] - t for k, t in intended.items() if k in live_at]
        result["fixed_rate"] = {
            "target_msgs_per_s": plan.rate, "n": total, "acked": len(acks),
            "achieved_send_msgs_per_s": round(total / send_elapsed, 1),
            "max_schedule_lag_ms": round(max_lag * 1000, 3),
            "ack_ms": summarize_ms(ack_lat), "live_ms": summarize_ms(live_lat),
            "live_missing": total - len(live_lat), "cpu_pct": cpu.stop(),
            "latency_from": "intended send time (open loop)",
        }
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        with contextlib.suppress(Exception):
            await js.delete_stream("BENCH")
        with contextlib.suppress(Exception):
            await nc.close()
    if errors:
        result["client_errors"] = errors[:20]
    return result


def _record_done(acks: dict[int, float], i: int) -> Callable[[asyncio.Future[Any]], None]:
    def done(fut: asyncio.Future[Any]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            acks[i] = time.perf_counter()
    return done


async def _wait_until(cond: Callable[[], bool], timeout: float, step: float = 0.01) -> bool:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return cond()


# --- Parley ---------------------------------------------------------------------------------
@dataclass
class Tracker:
    """What the benchmark sent, what came back, and what the agent saw."""

    conv: str = ""
    gateway_url: str = ""
    sent_at: dict[str, float] = field(default_factory=dict)  # msg id → send (or intended) time
    ack_at: dict[str, float] = field(default_factory=dict)
    ack_seq: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    agent_at: dict[str, float] = field(default_factory=dict)
    agent_seq: dict[str, int] = field(default_factory=dict)
    agent_duplicates: list[str] = field(default_factory=list)
    agent_seq_regressions: list[tuple[int, int]] = field(default_factory=list)
    agent_order_violations: list[tuple[str, str]] = field(default_factory=list)
    agent_foreign: int = 0
    last_agent_seq: int = 0
    last_index: dict[str, int] = field(default_factory=dict)  # phase → last index seen at the agent
    nacks: list[dict[str, Any]] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    assigned: asyncio.Event = field(default_factory=asyncio.Event)

    def on_agent_ev(self, frame: dict[str, Any]) -> None:
        now = time.perf_counter()
        if frame.get("conv") != self.conv:
            return
        if frame.get("type") == "assigned":
            self.assigned.set()
        if frame.get("type") != "message":
            return
        seq = frame["seq"]
        if seq <= self.last_agent_seq:
            self.agent_seq_regressions.append((self.last_agent_seq, seq))
        self.last_agent_seq = max(self.last_agent_seq, seq)
        mid = (frame.get("data") or {}).get("id", "")
        if mid not in self.sent_at:
            self.agent_foreign += 1
            return
        if mid in self.agent_at:
            self.agent_duplicates.append(mid)
            return
        self.agent_at[mid] = now
        self.agent_seq[mid] = seq
        phase, _, index = mid.rpartition("-")
        idx = int(index)
        if idx <= self.last_index.get(phase, -1):
            self.agent_order_violations.append((phase, index))
        self.last_index[phase] = max(idx, self.last_index.get(phase, -1))

    def ack_callback(self, mid: str) -> Callable[[asyncio.Future[Any]], None]:
        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                self.failed[mid] = "cancelled"
            elif fut.exception() is not None:
                self.failed[mid] = repr(fut.exception())
            else:
                self.ack_at[mid] = time.perf_counter()
                self.ack_seq[mid] = fut.result().get("seq", -1)
        return done

    def phase_ids(self, phase: str) -> list[str]:
        prefix = phase + "-"
        return [m for m in self.sent_at if m.startswith(prefix)]

    def delivered(self, ids: list[str]) -> bool:
        return all(m in self.agent_at for m in ids if m in self.ack_at)

    def latencies(self, ids: list[str]) -> tuple[list[float], list[float]]:
        ack = [self.ack_at[m] - self.sent_at[m] for m in ids if m in self.ack_at]
        e2e = [self.agent_at[m] - self.sent_at[m] for m in ids if m in self.agent_at]
        return ack, e2e

    def check(self, ids: list[str]) -> dict[str, Any]:
        acked = [m for m in ids if m in self.ack_at]
        missing = [m for m in acked if m not in self.agent_at]
        seq_mismatch = [m for m in acked if m in self.agent_seq and self.agent_seq[m] != self.ack_seq[m]]
        prefixes = {m.rpartition("-")[0] for m in ids}
        return {
            "sent": len(ids), "acked": len(acked), "failed": sum(1 for m in ids if m in self.failed),
            "delivered_to_agent": sum(1 for m in ids if m in self.agent_at),
            "missing_at_agent": len(missing), "missing_examples": missing[:5],
            "duplicates_at_agent": sum(1 for m in self.agent_duplicates if m.rpartition("-")[0] in prefixes),
            "out_of_order_at_agent": sum(1 for p, _ in self.agent_order_violations if p in prefixes),
            "ack_seq_differs_from_ev_seq": len(seq_mismatch),
        }


def _body(mid: str) -> str:
    return (mid + " ").ljust(PAYLOAD_BYTES, "x")


async def run_parley(url: str | list[str], plan: Plan, run_id: str, cpu: CpuMeter, holder: dict[str, Any],
                     replicas: int = 1) -> dict[str, Any]:
    from parley.client import ParleyClient
    from parley.core.auth import issue_token
    from parley.testing.processes import Stack

    secret, admin = secrets.token_hex(16), secrets.token_hex(16)
    env = {
        "PARLEY_JWT_SECRET": secret,
        "PARLEY_ADMIN_KEY": admin,
        "PARLEY_ROUTING_MODE": "auto",
        # the default 200 frames/s per connection would cap one customer far below 1,000 msg/s
        "PARLEY_RATE_LIMIT": "100000",
        "PARLEY_STREAM_REPLICAS": str(replicas),
    }
    counts = {"gateway": 1, "router": 1, "presence": 1, "transcript": 1 if plan.transcript else 0}
    stack = Stack(nats_urls=[url] if isinstance(url, str) else list(url), env=env, counts=counts)
    holder["stack"] = stack
    t0 = time.perf_counter()
    await asyncio.to_thread(stack.start)
    result: dict[str, Any] = {
        "stack": {"start_s": round(time.perf_counter() - t0, 2),
                  "processes": {p.env.get("PARLEY_NODE_ID", p.service): p.pid for p in stack.all()},
                  "env_overrides": {k: v for k, v in env.items() if k not in ("PARLEY_JWT_SECRET", "PARLEY_ADMIN_KEY")},
                  "data_dir": stack.data_dir},
        "payload": f"message body of {PAYLOAD_BYTES} characters",
    }
    ws = stack.gateways[0].ws_url
    agent_token = issue_token({"sub": "agent-1", "tenant": TENANT, "role": "agent", "skills": [QUEUE],
                               "max_chats": 3}, secret, 3600)
    customer_token = issue_token({"sub": "customer-1", "tenant": TENANT, "role": "customer"}, secret, 3600)
    tr = Tracker(gateway_url=stack.gateways[0].base_url)
    agent = ParleyClient(ws, agent_token, keep_frames=False, client_name="loadtest-agent")
    customer = ParleyClient(ws, customer_token, keep_frames=False, client_name="loadtest-customer")
    agent.on("ev", tr.on_agent_ev)
    customer.on("nack", tr.nacks.append)
    for c in (agent, customer):
        c.on("error", tr.errors.append)
    try:
        t0 = time.perf_counter()
        await agent.connect()
        if not await _wait_until(lambda: (agent.presence or {}).get("status") == "online", 10):
            raise RuntimeError(f"agent not online: {agent.presence}")
        await customer.connect()
        tr.conv = await customer.open(QUEUE, timeout=15)
        await asyncio.wait_for(tr.assigned.wait(), 30)
        result["setup_s"] = round(time.perf_counter() - t0, 3)
        result["conv"] = tr.conv

        # warm-up
        for i in range(plan.warmup_n):
            mid = f"{run_id}w-{i:07d}"
            tr.sent_at[mid] = time.perf_counter()
            fut = customer.send_nowait(tr.conv, _body(mid), msg_id=mid)
            fut.add_done_callback(tr.ack_callback(mid))
            await fut
        await _wait_until(lambda: tr.delivered(tr.phase_ids(f"{run_id}w")), plan.drain_s)

        result["sequential"] = await _parley_sequential(customer, tr, plan, f"{run_id}s", cpu)
        result["pipelined"] = await _parley_pipelined(customer, tr, plan, f"{run_id}p", cpu)
        result["fixed_rate"] = await _parley_fixed_rate(customer, tr, plan, f"{run_id}r", cpu)

        all_ids = list(tr.sent_at)
        result["delivery"] = {
            **tr.check(all_ids),
            "seq_regressions_at_agent": len(tr.agent_seq_regressions),
            "unknown_messages_at_agent": tr.agent_foreign,
            "sdk_chain_violations": {"agent": [v.__dict__ for v in agent.violations[:10]],
                                     "customer": [v.__dict__ for v in customer.violations[:10]],
                                     "agent_count": len(agent.violations),
                                     "customer_count": len(customer.violations)},
            "nacks": len(tr.nacks), "nack_codes": sorted({str(n.get("code")) for n in tr.nacks}),
            "errors": len(tr.errors), "error_codes": sorted({str(e.get("code")) for e in tr.errors}),
            "reconnects": {"agent": agent.stats.reconnects, "customer": customer.stats.reconnects},
            "resent": {"agent": agent.stats.resent, "customer": customer.stats.resent},
        }
    finally:
        for c in (customer, agent):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(c.close(), 5)
    return result


async def _parley_sequential(customer: Any, tr: Tracker, plan: Plan, phase: str, cpu: CpuMeter) -> dict[str, Any]:
    gw = GatewayAckMeter(tr.gateway_url)
    await gw.start()
    cpu.start()
    t_start = time.perf_counter()
    deadline = t_start + plan.max_s
    for i in range(plan.parley_seq_n):
        mid = f"{phase}-{i:07d}"
        tr.sent_at[mid] = time.perf_counter()
        fut = customer.send_nowait(tr.conv, _body(mid), msg_id=mid)
        fut.add_done_callback(tr.ack_callback(mid))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(fut), 10)
        if time.perf_counter() > deadline:
            break
    elapsed = time.perf_counter() - t_start
    ids = tr.phase_ids(phase)
    await _wait_until(lambda: tr.delivered(ids), plan.drain_s)
    ack, e2e = tr.latencies(ids)
    n_acked = sum(1 for m in ids if m in tr.ack_at)
    return {"n": len(ids), "seconds": round(elapsed, 3), "msgs_per_s": round(n_acked / elapsed, 1),
            "ack_ms": summarize_ms(ack), "e2e_ms": summarize_ms(e2e), "cpu_pct": cpu.stop(),
            "gateway_pub_ack": await gw.stop(), "check": tr.check(ids)}


async def _parley_pipelined(customer: Any, tr: Tracker, plan: Plan, phase: str, cpu: CpuMeter) -> dict[str, Any]:
    window = asyncio.Semaphore(plan.window)
    futures: list[asyncio.Future[Any]] = []

    def release(_: asyncio.Future[Any]) -> None:
        window.release()

    gw = GatewayAckMeter(tr.gateway_url)
    await gw.start()
    cpu.start()
    t_start = time.perf_counter()
    deadline = t_start + plan.max_s
    for i in range(plan.parley_pipe_n):
        try:
            await asyncio.wait_for(window.acquire(), plan.drain_s)
        except TimeoutError:
            break  # nothing acknowledged for drain_s: stop sending, report what we have
        mid = f"{phase}-{i:07d}"
        tr.sent_at[mid] = time.perf_counter()
        fut = customer.send_nowait(tr.conv, _body(mid), msg_id=mid)
        fut.add_done_callback(tr.ack_callback(mid))
        fut.add_done_callback(release)
        futures.append(fut)
        if time.perf_counter() > deadline:
            break
    await asyncio.wait(futures, timeout=plan.drain_s)
    ids = tr.phase_ids(phase)
    acked = [m for m in ids if m in tr.ack_at]
    last_ack = max((tr.ack_at[m] for m in acked), default=t_start)
    await _wait_until(lambda: tr.delivered(ids), plan.drain_s)
    delivered = [tr.agent_at[m] for m in ids if m in tr.agent_at]
    last_delivery = max(delivered, default=t_start)
    ack, e2e = tr.latencies(ids)
    ack_elapsed = last_ack - t_start
    delivery_elapsed = last_delivery - t_start
    return {
        "window": plan.window, "n": len(ids), "seconds": round(ack_elapsed, 3),
        "msgs_per_s": round(len(acked) / ack_elapsed, 1) if ack_elapsed > 0 else 0.0,
        "delivered_msgs_per_s": round(len(delivered) / delivery_elapsed, 1) if delivery_elapsed > 0 else 0.0,
        "ack_ms": summarize_ms(ack), "e2e_ms": summarize_ms(e2e), "cpu_pct": cpu.stop(),
        "gateway_pub_ack": await gw.stop(), "check": tr.check(ids),
    }


async def _parley_fixed_rate(customer: Any, tr: Tracker, plan: Plan, phase: str, cpu: CpuMeter) -> dict[str, Any]:
    total = int(plan.rate * plan.parley_rate_s)
    futures: list[asyncio.Future[Any]] = []
    gw = GatewayAckMeter(tr.gateway_url)
    await gw.start()
    cpu.start()
    start = time.perf_counter() + 0.01
    max_lag = 0.0
    i = 0
    hard_stop = start + plan.parley_rate_s * 2 + 5
    while i < total and time.perf_counter() < hard_stop:
        now = time.perf_counter()
        due = min(total, int((now - start) * plan.rate) + 1)
        while i < due:
            t_i = start + i / plan.rate
            max_lag = max(max_lag, time.perf_counter() - t_i)
            mid = f"{phase}-{i:07d}"
            tr.sent_at[mid] = t_i  # latency from the intended time: no coordinated omission
            fut = customer.send_nowait(tr.conv, _body(mid), msg_id=mid)
            fut.add_done_callback(tr.ack_callback(mid))
            futures.append(fut)
            i += 1
        await asyncio.sleep(max(0.0, start + i / plan.rate - time.perf_counter()))
    send_elapsed = time.perf_counter() - start
    await asyncio.wait(futures, timeout=plan.drain_s)
    ids = tr.phase_ids(phase)
    await _wait_until(lambda: tr.delivered(ids), plan.drain_s)
    ack, e2e = tr.latencies(ids)
    per_second: list[float | None] = []
    for sec in range(math.ceil(plan.parley_rate_s)):
        window_ids = ids[sec * plan.rate:(sec + 1) * plan.rate]
        per_second.append(summarize_ms(tr.latencies(window_ids)[1]).get("p99"))
    return {
        "e2e_p99_ms_per_second": per_second,
        "target_msgs_per_s": plan.rate, "n": len(ids), "achieved_send_msgs_per_s": round(len(ids) / send_elapsed, 1),
        "max_schedule_lag_ms": round(max_lag * 1000, 3), "ack_ms": summarize_ms(ack), "e2e_ms": summarize_ms(e2e),
        "cpu_pct": cpu.stop(), "gateway_pub_ack": await gw.stop(), "check": tr.check(ids),
        "latency_from": "intended send time (open loop)",
    }


# --- report ------------------------------------------------------------------------------------
def _get(d: dict[str, Any], path: str) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


ROWS = [
    # label, baseline path, parley path, unit
    ("sequential throughput", "sequential.msgs_per_s", "sequential.msgs_per_s", "msg/s"),
    ("sequential ack p50", "sequential.ack_ms.p50", "sequential.ack_ms.p50", "ms"),
    ("sequential ack p99", "sequential.ack_ms.p99", "sequential.ack_ms.p99", "ms"),
    ("sequential end-to-end p50", "sequential.live_ms.p50", "sequential.e2e_ms.p50", "ms"),
    ("sequential end-to-end p99", "sequential.live_ms.p99", "sequential.e2e_ms.p99", "ms"),
    ("pipelined throughput", "pipelined.msgs_per_s", "pipelined.msgs_per_s", "msg/s"),
    ("fixed 1k/s ack p50", "fixed_rate.ack_ms.p50", "fixed_rate.ack_ms.p50", "ms"),
    ("fixed 1k/s ack p99", "fixed_rate.ack_ms.p99", "fixed_rate.ack_ms.p99", "ms"),
    ("fixed 1k/s end-to-end p50", "fixed_rate.live_ms.p50", "fixed_rate.e2e_ms.p50", "ms"),
    ("fixed 1k/s end-to-end p99", "fixed_rate.live_ms.p99", "fixed_rate.e2e_ms.p99", "ms"),
]


def ratios(report: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for label, bpath, ppath, _ in ROWS:
        b, p = _get(report.get("baseline", {}), bpath), _get(report.get("parley", {}), ppath)
        out[label] = round(p / b, 3) if isinstance(b, int | float) and isinstance(p, int | float) and b else None
    return out


def _fmt(v: Any, unit: str) -> str:
    if not isinstance(v, int | float):
        return "—"
    return f"{v:,.0f}" if unit == "msg/s" else f"{v:.2f}"


def render_table(report: dict[str, Any]) -> str:
    lines = []
    header = f"{'metric':<28} {'unit':<6} {'JetStream':>11} {'Parley':>11} {'Parley/JS':>10}"
    lines.append(header)
    lines.append("-" * len(header))
    rat = report.get("ratios", {})
    for label, bpath, ppath, unit in ROWS:
        b, p = _get(report.get("baseline", {}), bpath), _get(report.get("parley", {}), ppath)
        r = rat.get(label)
        lines.append(f"{label:<28} {unit:<6} {_fmt(b, unit):>11} {_fmt(p, unit):>11} "
                     f"{(f'{r:.2f}x' if r is not None else '—'):>10}")
    pb = report.get("parley", {})
    extra = []
    if "pipelined" in pb:
        extra.append(f"pipelined Parley delivered to agent: {_fmt(pb['pipelined'].get('delivered_msgs_per_s'), 'msg/s')} msg/s "
                     f"(window {pb['pipelined'].get('window')}); ack p50/p99 under load "
                     f"{_fmt(_get(pb, 'pipelined.ack_ms.p50'), 'ms')}/{_fmt(_get(pb, 'pipelined.ack_ms.p99'), 'ms')} ms")
    if "fixed_rate" in pb:
        fr = pb["fixed_rate"]
        extra.append(f"fixed rate achieved {_fmt(fr.get('achieved_send_msgs_per_s'), 'msg/s')} msg/s sent, "
                     f"max schedule lag {fr.get('max_schedule_lag_ms')} ms, "
                     f"e2e max {_fmt(_get(fr, 'e2e_ms.max'), 'ms')} ms")
    gw = [f"{phase} {g['p50_ms']}/{g['p99_ms']}" for phase in ("sequential", "pipelined", "fixed_rate")
          if (g := _get(pb, f"{phase}.gateway_pub_ack"))]
    if gw:
        extra.append("gateway send→PubAck p50/p99 ms (its own histogram, bucket bounds): " + ", ".join(gw))
    for phase in ("sequential", "pipelined", "fixed_rate"):
        c = _get(pb, f"{phase}.cpu_pct")
        if c:
            extra.append(f"CPU % of one core during Parley {phase}: " + ", ".join(f"{k} {v}" for k, v in c.items()))
    d = pb.get("delivery")
    if d:
        ok = report.get("delivery_ok")
        extra.append(
            f"delivery check: {'OK' if ok else 'FAILED'} — sent {d['sent']}, acked {d['acked']}, at agent "
            f"{d['delivered_to_agent']}, missing {d['missing_at_agent']}, duplicates {d['duplicates_at_agent']}, "
            f"out of order {d['out_of_order_at_agent']}, seq regressions {d['seq_regressions_at_agent']}, "
            f"ack/ev seq mismatch {d['ack_seq_differs_from_ev_seq']}, SDK chain violations "
            f"{d['sdk_chain_violations']['agent_count']}+{d['sdk_chain_violations']['customer_count']}, "
            f"nacks {d['nacks']} {d['nack_codes'] or ''}, reconnects {d['reconnects']}")
    return "\n".join(lines + [""] + extra)


def delivery_ok(parley: dict[str, Any]) -> bool:
    d = parley.get("delivery")
    if not d:
        return False
    return (d["acked"] == d["sent"] and d["missing_at_agent"] == 0 and d["duplicates_at_agent"] == 0
            and d["out_of_order_at_agent"] == 0 and d["seq_regressions_at_agent"] == 0
            and d["ack_seq_differs_from_ev_seq"] == 0 and d["sdk_chain_violations"]["agent_count"] == 0
            and d["sdk_chain_violations"]["customer_count"] == 0 and d["unknown_messages_at_agent"] == 0)


def _nats_version(binary: str) -> str:
    try:
        return subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        return "?"


def _git_state() -> dict[str, Any]:
    """The commit measured, and whether the service code differed from it (a shared working tree)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:
            return ""

    dirty = [line for line in git("status", "--porcelain", "--", "services", "shared").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD"), "services_shared_dirty": dirty}


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("nats", "aiohttp", "uvloop"):
        with contextlib.suppress(Exception):
            from importlib.metadata import version
            out[mod] = version({"nats": "nats-py"}.get(mod, mod))
    return out


# --- main ---------------------------------------------------------------------------------------
async def _run_all(nats_url: str, plan: Plan, holder: dict[str, Any], report: dict[str, Any],
                   skip_baseline: bool, skip_parley: bool) -> None:
    def pids() -> dict[str, int]:
        out = {"nats-server": holder["nats"].proc.pid}
        stack = holder.get("stack")
        if stack is not None:
            for p in stack.all():
                if p.proc is not None:
                    out[p.service] = p.pid
        return out

    cpu = CpuMeter(pids)
    run_id = secrets.token_hex(3)
    if not skip_baseline:
        print("baseline: raw JetStream (nats-py) …", flush=True)
        report["baseline"] = await run_baseline(nats_url, plan, run_id, cpu)
    if not skip_parley:
        print("parley: starting the stack, one customer and one agent …", flush=True)
        report["parley"] = await run_parley(nats_url, plan, run_id, cpu, holder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~10-15 s smoke run (CI)")
    parser.add_argument("--out", help="JSON report path (default loadtest/results/bench-<timestamp>.json)")
    parser.add_argument("--rate", type=int, help="fixed-rate phase, msg/s (default 1000)")
    parser.add_argument("--rate-seconds", type=float, help="fixed-rate phase length for Parley")
    parser.add_argument("--seq-n", type=int, help="Parley sequential messages")
    parser.add_argument("--pipe-n", type=int, help="Parley pipelined messages")
    parser.add_argument("--window", type=int, help="Parley pipelined sends in flight (default 64)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-parley", action="store_true")
    parser.add_argument("--no-transcript", action="store_true",
                        help="diagnostic: run the stack without the transcript writer (not a supported setup)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the stack's data dir and service logs")
    args = parser.parse_args(argv)

    plan = Plan.quick() if args.quick else Plan()
    plan.transcript = not args.no_transcript
    for attr, value in (("rate", args.rate), ("parley_rate_s", args.rate_seconds), ("parley_seq_n", args.seq_n),
                        ("parley_pipe_n", args.pipe_n), ("window", args.window)):
        if value is not None:
            setattr(plan, attr, value)

    from parley.testing.nats_server import NatsServer, nats_server_binary

    started = datetime.now(UTC)
    report: dict[str, Any] = {
        "started": started.isoformat(timespec="seconds"),
        "mode": "quick" if args.quick else "full",
        "plan": plan.__dict__,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_before": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "versions": {**_versions(), "nats-server": _nats_version(nats_server_binary())},
        "git": _git_state(),
    }
    holder: dict[str, Any] = {}
    code = 0
    t0 = time.perf_counter()
    # SIGTERM (e.g. a CI timeout) unwinds like Ctrl-C so the finally below stops every process
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        nats = NatsServer().start()
        holder["nats"] = nats
        print(f"nats-server {nats.url} (pid {nats.proc.pid if nats.proc else '?'})", flush=True)
        try:
            import uvloop

            loop_factory: Any = uvloop.new_event_loop
        except ImportError:  # pragma: no cover
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(asyncio.wait_for(
                _run_all(nats.url, plan, holder, report, args.skip_baseline, args.skip_parley), plan.budget_s))
    except BaseException as exc:  # report what we have, then stop everything
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        print(f"benchmark failed: {report['error']}", file=sys.stderr)
        traceback.print_exc()
        code = 2
    finally:
        stack = holder.get("stack")
        if stack is not None:
            logs = {p.env.get("PARLEY_NODE_ID", p.service): p.log_path for p in stack.all()}
            warnings = _count_log_warnings(logs)
            try:
                stack.stop()
            except Exception as exc:
                print(f"stopping the stack: {exc}", file=sys.stderr)
            report.setdefault("parley", {})["service_log_warnings"] = warnings
            report["parley"]["exit_codes"] = {p.env.get("PARLEY_NODE_ID", p.service): (p.proc.returncode if p.proc else None)
                                              for p in stack.all()}
            if args.keep_logs:
                report["parley"]["logs"] = logs
            elif stack.data_dir:
                shutil.rmtree(stack.data_dir, ignore_errors=True)
        nats = holder.get("nats")
        if nats is not None:
            nats.cleanup()
    report["seconds"] = round(time.perf_counter() - t0, 1)
    report["ratios"] = ratios(report)
    if "delivery" in report.get("parley", {}):
        report["delivery_ok"] = delivery_ok(report["parley"])
        if not report["delivery_ok"] and code == 0:
            code = 1

    out = Path(args.out) if args.out else RESULTS_DIR / f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print()
    print(f"Parley benchmark — {report['started']} — {report['mode']} run, {report['seconds']} s, "
          f"{report['machine']['cpus']} CPUs, {report['versions'].get('nats-server', '')}, "
          f"commit {report['git']['commit']}{' + uncommitted service changes' if report['git']['services_shared_dirty'] else ''}")
    print(render_table(report))
    print(f"\nreport: {out}")
    return code


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _count_log_warnings(logs: dict[str, str | None]) -> dict[str, dict[str, Any]]:
    """WARNING/ERROR lines per service log (JSON lines), with a few distinct messages."""
    out: dict[str, dict[str, Any]] = {}
    for name, path in logs.items():
        if not path or not Path(path).exists():
            continue
        counts: dict[str, int] = {}
        samples: list[str] = []
        with open(path, errors="replace") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                    level, msg = str(rec.get("level", rec.get("levelname", ""))).upper(), str(rec.get("msg", rec.get("message", "")))
                except ValueError:
                    level, msg = ("ERROR" if "Traceback" in line else ""), line.strip()
                if level in ("WARNING", "ERROR", "CRITICAL"):
                    counts[level] = counts.get(level, 0) + 1
                    if msg not in samples and len(samples) < 5:
                        samples.append(msg[:200])
        if counts:
            out[name] = {"counts": counts, "examples": samples}
    return out


if __name__ == "__main__":
    sys.exit(main())
