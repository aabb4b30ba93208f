"""``python -m loadtest`` — the Parley load generator (see ``loadtest/loadgen.py`` and
docs/benchmarks.md, "Load generator").

Against a running deployment (tokens are signed with its ``PARLEY_JWT_SECRET``; routing must be
``auto``)::

    python -m loadtest --url ws://gw1:8080/v1/ws --url ws://gw2:8080/v1/ws --secret "$PARLEY_JWT_SECRET" \
        --customers 200 --agents 40 --rate 500 --duration 60

Or on a local deployment it starts itself (3-node R3 cluster, 2 of each service), with faults::

    python -m loadtest --spawn --customers 30 --agents 6 --rate 200 --duration 60 \
        --fault 15:kill:gateway-0 --fault 35:kill:nats-leader

``--procs N`` splits the sessions over N processes (each its own queue, so a conversation's two
sides stay in one process). Prints a live view, writes a JSON report and a PNG plot; exit code 0
when every check passed, 1 when one failed, 2 when the run itself failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .loadgen import LoadGenerator, LoadSpec

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FAULT_ACTIONS = ("kill", "freeze", "restart", "nats-outage")


def parse_fault(text: str) -> dict[str, Any]:
    """``AT:ACTION[:TARGET[:SECONDS]]`` — AT seconds after sending starts; ACTION kill (SIGKILL, started
    again 2 s later), freeze (SIGSTOP for SECONDS, default 5, then SIGCONT), restart (SIGTERM +
    start), nats-outage (every NATS node SIGKILLed for SECONDS). TARGET ``gateway-0``, ``router-1``, …,
    ``nats-1`` or ``nats-leader`` (the CONV stream leader)."""
    parts = text.split(":")
    if len(parts) < 2 or parts[1] not in FAULT_ACTIONS:
        raise argparse.ArgumentTypeError(f"bad --fault {text!r}: AT:ACTION[:TARGET[:SECONDS]], ACTION in {FAULT_ACTIONS}")
    fault = {"at": float(parts[0]), "action": parts[1], "target": parts[2] if len(parts) > 2 else "",
             "seconds": float(parts[3]) if len(parts) > 3 else 5.0}
    if fault["action"] == "nats-outage" and len(parts) == 3:
        fault["seconds"], fault["target"] = float(parts[2]), ""
    return fault


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtest", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", action="append", default=[], help="gateway WebSocket URL (repeat for several)")
    p.add_argument("--http", action="append", default=[], help="gateway HTTP base URL (default: from --url)")
    p.add_argument("--secret", default=os.environ.get("PARLEY_JWT_SECRET", ""), help="JWT secret (env PARLEY_JWT_SECRET)")
    p.add_argument("--tenant", default="load")
    p.add_argument("--queue", default="support")
    p.add_argument("--spawn", action="store_true", help="start a local deployment (NATS + services) for the run")
    p.add_argument("--nats-nodes", type=int, default=3, help="with --spawn: NATS nodes (1 or 3)")
    p.add_argument("--replicas", type=int, default=0, help="with --spawn: stream replicas (default = nodes)")
    p.add_argument("--instances", type=int, default=2, help="with --spawn: instances of each service")
    p.add_argument("--customers", type=int, default=20)
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--max-chats", type=int, default=0, help="per agent (default: enough for every conversation)")
    p.add_argument("--open-rate", type=float, default=20.0, help="conversations opened per second")
    p.add_argument("--rate", type=float, default=200.0, help="messages per second, both directions together")
    p.add_argument("--size", type=int, default=200, help="message body size (characters)")
    p.add_argument("--agent-share", type=float, default=0.5, help="share of the messages sent by agents")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of sending")
    p.add_argument("--drain", type=float, default=30.0, help="bound on waiting for the last acks/deliveries")
    p.add_argument("--no-transcripts", action="store_true", help="do not close conversations and compare transcripts")
    p.add_argument("--fault", action="append", type=parse_fault, default=[], help=parse_fault.__doc__)
    p.add_argument("--procs", type=int, default=1, help="worker processes")
    p.add_argument("--out", help="JSON report (default loadtest/results/load-<timestamp>.json; the PNG next to it)")
    p.add_argument("--no-progress", action="store_true", help="no live view")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: JSON spec of a worker process
    return p


# --- one process's share -----------------------------------------------------------------------------
async def run_worker(spec_json: str) -> int:
    """A worker: set up, say ``ready``, then obey ``go`` / ``mark <label>`` / ``stop`` on stdin while
    printing progress lines; finally print the report (one JSON line ``{"report": …}``)."""
    spec = LoadSpec(**json.loads(spec_json))

    def emit(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj, default=str) + "\n")
        sys.stdout.flush()

    gen = LoadGenerator(spec, on_progress=lambda p: emit({"progress": p}))
    await gen.start()
    emit({"ready": True})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    watchers: list[asyncio.Task[Any]] = []
    while True:
        line = (await reader.readline()).decode().strip()
        if not line or line == "stop":
            break
        if line == "go":
            gen.start_sending()
        elif line.startswith("mark "):
            fault = gen.mark(line[5:])
            watchers.append(asyncio.ensure_future(gen.wait_resumed(fault, 120)))
    report = await gen.finish()
    for w in watchers:
        w.cancel()
    emit({"report": report})
    return 0


# --- the coordinator --------------------------------------------------------------------------------
class Workers:
    """N worker subprocesses (or one in-process generator) driven the same way."""

    def __init__(self, specs: list[LoadSpec], in_process: bool) -> None:
        self.specs = specs
        self.in_process = in_process
        self.procs: list[asyncio.subprocess.Process] = []
        self.progress: list[dict[str, Any]] = [{} for _ in specs]
        self.reports: list[dict[str, Any] | None] = [None for _ in specs]
        self.gen: LoadGenerator | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._watchers: list[asyncio.Task[Any]] = []

    async def start(self, timeout: float) -> None:
        if self.in_process:
            self.gen = LoadGenerator(self.specs[0], on_progress=lambda p: self.progress.__setitem__(0, p))
            await self.gen.start()
            return
        ready = [asyncio.Event() for _ in self.specs]
        for i, spec in enumerate(self.specs):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest", "--worker", json.dumps(asdict(spec)),
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, limit=64 * 1024 * 1024,
                cwd=str(Path(__file__).resolve().parent.parent))
            self.procs.append(proc)
            self._readers.append(asyncio.ensure_future(self._read(i, proc, ready[i])))
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), timeout)

    async def _read(self, i: int, proc: asyncio.subprocess.Process, ready: asyncio.Event) -> None:
        assert proc.stdout is not None
        while True:
            line = await proc.stdout.readline()
            if not line:
                return
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if msg.get("ready"):
                    ready.set()
                elif "progress" in msg:
                    self.progress[i] = msg["progress"]
                elif "report" in msg:
                    self.reports[i] = msg["report"]

    async def _tell(self, line: str) -> None:
        for proc in self.procs:
            if proc.stdin is not None and proc.returncode is None:
                proc.stdin.write((line + "\n").encode())
                with contextlib.suppress(ConnectionError):
                    await proc.stdin.drain()

    async def go(self) -> None:
        if self.gen is not None:
            self.gen.start_sending()
        await self._tell("go")

    async def mark(self, label: str) -> None:
        if self.gen is not None:
            self._watchers.append(asyncio.ensure_future(self.gen.wait_resumed(self.gen.mark(label), 120)))
        await self._tell(f"mark {label}")

    async def finish(self, timeout: float) -> list[dict[str, Any]]:
        if self.gen is not None:
            report = await self.gen.finish()
            for w in self._watchers:
                w.cancel()
            return [report]
        await self._tell("stop")
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in self.procs)), timeout)
        await asyncio.gather(*self._readers, return_exceptions=True)
        missing = [i for i, r in enumerate(self.reports) if r is None]
        if missing:
            raise RuntimeError(f"workers {missing} ended without a report")
        return [r for r in self.reports if r is not None]

    def kill(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    def merged_progress(self) -> dict[str, Any]:
        parts = [p for p in self.progress if p]
        if not parts:
            return {}
        if len(parts) == 1:
            return parts[0]
        out: dict[str, Any] = {"elapsed_s": max(p["elapsed_s"] for p in parts), "faults": parts[0].get("faults", [])}
        for k in ("conversations", "assigned", "sent", "acked", "delivered", "rate_delivered", "reconnects",
                  "connected", "clients", "in_flight"):
            out[k] = sum(p.get(k, 0) for p in parts)
        out["checks"] = {k: sum(p["checks"].get(k, 0) for p in parts) for k in parts[0]["checks"]}
        worst = max(parts, key=lambda p: p.get("e2e_recent_ms", {}).get("p99", 0))
        out["e2e_recent_ms"] = worst.get("e2e_recent_ms", {})
        return out


async def inject(dep: Any, fault: dict[str, Any], workers: Workers, log: list[str]) -> None:
    """Carry out one fault on the spawned deployment (blocking parts in a thread)."""
    action, target = fault["action"], fault["target"]
    label = f"{action} {target}".strip() if action != "nats-outage" else f"all NATS down {fault['seconds']:g} s"
    if action == "nats-outage":
        nodes = dep.nats_nodes_list
        for node in nodes:
            await asyncio.to_thread(dep.kill_nats, node)
        await workers.mark(label)
        await asyncio.sleep(fault["seconds"])  # the outage's length is the fault itself
        await asyncio.to_thread(dep.restart_all_nats)
        log.append(f"{label}: restarted")
        return
    if target.startswith("nats"):
        node = (await dep.leader("CONV")) if target == "nats-leader" else dep.nats_nodes_list[int(target.split("-")[1])]
        label = f"{action} {target} ({node.name})"
        if action == "kill":
            await asyncio.to_thread(dep.kill_nats, node)
            await workers.mark(label)
            await asyncio.sleep(2.0)  # down for a while, as a crashed node is
            await asyncio.to_thread(dep.restart_nats, node)
        else:
            raise SystemExit(f"--fault {action} is not supported for NATS nodes (kill only)")
        return
    name, _, idx = target.rpartition("-")
    index = int(idx)
    proc = dep.service(name, index)
    if action == "kill":
        await asyncio.to_thread(dep.kill_service, name, index)
        await workers.mark(label)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(dep.restart_service, name, index)
    elif action == "freeze":
        proc.freeze()
        await workers.mark(label + f" {fault['seconds']:g} s")
        await asyncio.sleep(fault["seconds"])
        proc.thaw()
    elif action == "restart":
        await workers.mark(label)
        await asyncio.to_thread(dep.restart_service, name, index)
    log.append(f"{label}: done")


async def coordinate(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    dep = None
    try:
        if args.spawn:
            from .harness import Deployment

            dep = Deployment(nats_nodes=args.nats_nodes, replicas=args.replicas or args.nats_nodes,
                             instances=args.instances, env={"PARLEY_RATE_LIMIT": "100000"})
            print(f"starting {args.nats_nodes} NATS node(s), {args.instances} instance(s) of each service …", flush=True)
            await asyncio.to_thread(dep.start)
            urls, http, secret = dep.ws_urls, dep.http_urls, dep.secret
            report["deployment"] = {"nats": dep.nats_urls, "gateways": urls, "pids": dep.pids()}
        else:
            urls = args.url
            http = args.http or [u.replace("ws://", "http://").replace("wss://", "https://").split("/v1/ws")[0] for u in urls]
            secret = args.secret
            if not urls or not secret:
                raise SystemExit("give --url (repeatable) and --secret, or --spawn")
        n = max(1, args.procs)
        run = datetime.now(UTC).strftime("%H%M%S")
        specs = []
        for i in range(n):
            def share(total: int, i: int = i) -> int:
                return total // n + (1 if i < total % n else 0)

            specs.append(LoadSpec(
                urls=urls, http_urls=http, secret=secret, tenant=args.tenant,
                queue=args.queue if n == 1 else f"{args.queue}-p{i}", customers=share(args.customers),
                agents=max(1, share(args.agents)), max_chats=args.max_chats, open_rate=args.open_rate / n,
                msg_rate=args.rate / n, msg_size=args.size, agent_share=args.agent_share, duration=args.duration,
                drain_s=args.drain, check_transcripts=not args.no_transcripts, close_at_end=not args.no_transcripts,
                run_id=f"{run}p{i}"))
        workers = Workers(specs, in_process=(n == 1))
        live = None
        if not args.no_progress:
            from rich.live import Live

            from .report import progress_table

            live = Live(progress_table({}), refresh_per_second=2)
            live.start()
        fault_log: list[str] = []
        try:
            await workers.start(timeout=120)
            await workers.go()
            t0 = time.perf_counter()
            faults = sorted(args.fault, key=lambda f: f["at"])
            tasks = []
            while (elapsed := time.perf_counter() - t0) < args.duration:
                while faults and faults[0]["at"] <= elapsed:
                    if dep is None:
                        raise SystemExit("--fault needs --spawn")
                    tasks.append(asyncio.ensure_future(inject(dep, faults.pop(0), workers, fault_log)))
                if live is not None:
                    live.update(progress_table(workers.merged_progress()))
                await asyncio.sleep(0.25)
            await asyncio.gather(*tasks)
            if live is not None:
                live.update(progress_table(workers.merged_progress(), "Parley load — draining, checking transcripts"))
            parts = await workers.finish(timeout=args.drain + 180)
        finally:
            if live is not None:
                live.stop()
            workers.kill()
        report["fault_log"] = fault_log
        return parts
    finally:
        if dep is not None:
            await asyncio.to_thread(dep.stop)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import uvloop

        loop_factory: Any = uvloop.new_event_loop
    except ImportError:  # pragma: no cover
        loop_factory = None
    if args.worker:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(run_worker(args.worker))

    from .report import merge_reports, plot, summary_lines

    started = datetime.now(UTC)
    meta: dict[str, Any] = {"started": started.isoformat(timespec="seconds"), "argv": sys.argv[1:]}
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            parts = runner.run(coordinate(args, meta))
    except (Exception, KeyboardInterrupt) as exc:
        print(f"load run failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        traceback.print_exc()
        return 2
    report = {**meta, **merge_reports(parts)}
    out = Path(args.out) if args.out else RESULTS_DIR / f"load-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = out.with_suffix(".png")
    plot(report, str(png))
    print("\n".join(summary_lines(report)))
    print(f"report: {out}\nplot:   {png}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
