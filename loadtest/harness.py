"""A local Parley deployment to put load and faults on: a 3-node JetStream cluster (or one node) on
loopback and N instances of each service as real processes, with fault helpers that act on one
process by pid (SIGKILL, SIGSTOP/SIGCONT, SIGTERM + restart). Used by ``python -m loadtest run
--spawn`` and by the chaos suite (``tests/test_chaos.py``).

The fault helpers block (they wait for a process to exit or become ready): call them through
``asyncio.to_thread`` from a running load.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from parley.testing.nats_server import NatsCluster, NatsServer
from parley.testing.processes import ServiceProcess, Stack


@dataclass
class Deployment:
    nats_nodes: int = 3
    replicas: int = 3
    instances: int = 2  # of each service
    env: dict[str, str] = field(default_factory=dict)
    sync_always: bool = False
    secret: str = field(default_factory=lambda: secrets.token_hex(16))
    admin_key: str = field(default_factory=lambda: secrets.token_hex(16))
    cluster: NatsCluster | None = None
    single: NatsServer | None = None
    stack: Stack | None = None
    data_dir: str | None = None

    @property
    def nats_urls(self) -> list[str]:
        if self.cluster is not None:
            return self.cluster.urls
        assert self.single is not None
        return [self.single.url]

    @property
    def nats_nodes_list(self) -> list[NatsServer]:
        if self.cluster is not None:
            return self.cluster.nodes
        return [self.single] if self.single is not None else []

    def start(self, timeout: float = 60.0) -> Deployment:
        self.data_dir = self.data_dir or tempfile.mkdtemp(prefix="parley-deploy-")
        if self.nats_nodes > 1:
            self.cluster = NatsCluster(size=self.nats_nodes, base_dir=f"{self.data_dir}/nats",
                                       sync_always=self.sync_always).start(timeout)
        else:
            self.single = NatsServer(store_dir=f"{self.data_dir}/nats", sync_always=self.sync_always).start(timeout)
        env = {"PARLEY_JWT_SECRET": self.secret, "PARLEY_ADMIN_KEY": self.admin_key,
               "PARLEY_ROUTING_MODE": "auto", "PARLEY_STREAM_REPLICAS": str(self.replicas), **self.env}
        Path(f"{self.data_dir}/stack").mkdir(parents=True, exist_ok=True)
        counts = {s: self.instances for s in ("gateway", "router", "presence", "transcript")}
        self.stack = Stack(self.nats_urls, env=env, counts=counts, data_dir=f"{self.data_dir}/stack").start(timeout)
        return self

    # --- addresses ----------------------------------------------------------------------------
    @property
    def ws_urls(self) -> list[str]:
        assert self.stack is not None
        return [g.ws_url for g in self.stack.gateways]

    @property
    def http_urls(self) -> list[str]:
        assert self.stack is not None
        return [g.base_url for g in self.stack.gateways]

    def service(self, name: str, index: int = 0) -> ServiceProcess:
        assert self.stack is not None
        return self.stack[name][index]

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for node in self.nats_nodes_list:
            if node.proc is not None and node.proc.poll() is None:
                out[node.name] = node.proc.pid
        if self.stack is not None:
            for p in self.stack.all():
                if p.alive():
                    out[p.env.get("PARLEY_NODE_ID", p.service)] = p.pid
        return out

    # --- faults (blocking) ------------------------------------------------------------------------
    def kill_service(self, name: str, index: int = 0) -> ServiceProcess:
        p = self.service(name, index)
        p.kill()
        return p

    def restart_service(self, name: str, index: int = 0, timeout: float = 30.0) -> ServiceProcess:
        """Start a killed instance again (same port, same node id) or SIGTERM-restart a live one."""
        p = self.service(name, index)
        if p.alive():
            return p.restart(timeout)
        p.proc = None
        return p.start(timeout=timeout)

    def stream_leader(self, stream: str = "CONV", timeout: float = 15.0) -> NatsServer:
        return asyncio.run(self.leader(stream, timeout))

    async def leader(self, stream: str = "CONV", timeout: float = 15.0) -> NatsServer:
        import nats

        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            live = [n.url for n in self.nats_nodes_list if n.proc is not None and n.proc.poll() is None]
            try:
                nc = await nats.connect(live, connect_timeout=2, max_reconnect_attempts=1, error_cb=_quiet)
                try:
                    info = await nc.jetstream().stream_info(stream)
                finally:
                    await nc.close()
                if info.cluster is not None and info.cluster.leader:
                    return next(n for n in self.nats_nodes_list if n.name == info.cluster.leader)
            except Exception as exc:  # no leader yet
                last = exc
            await asyncio.sleep(0.2)
        raise RuntimeError(f"no leader for stream {stream} within {timeout}s: {last!r}")

    def kill_nats(self, node: NatsServer) -> None:
        node.kill()

    def restart_nats(self, node: NatsServer, timeout: float = 30.0) -> None:
        node.proc = None
        node.start(timeout)

    def wait_current(self, node: NatsServer, timeout: float = 60.0) -> float:
        """Until the node's full ``/healthz`` is 200: JetStream current with the meta leader and with
        every stream and consumer it holds a replica of. A rolling restart must wait for this before
        taking the next node down, or two of three replicas are behind at once (no quorum).
        Returns the seconds waited."""
        import urllib.error
        import urllib.request

        t0 = time.monotonic()
        url = f"http://{node.host}:{node.monitor_port}/healthz"
        last = ""
        while time.monotonic() - t0 < timeout:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")[:300]
            except (urllib.error.URLError, OSError) as exc:
                last = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(f"NATS node {node.name} not current after {timeout}s: {last}")

    def restart_all_nats(self, timeout: float = 30.0) -> None:
        """Start every (killed) node at once: a JetStream cluster is healthy only with a quorum."""
        nodes = self.nats_nodes_list
        for node in nodes:
            node.proc = None
            node.start_process(timeout)
        for node in nodes:
            node._wait_healthy(timeout)  # noqa: SLF001

    def stop(self) -> None:
        if self.stack is not None:
            for p in self.stack.all():
                if p.proc is not None:
                    try:
                        p.stop(10)
                    except Exception:  # pragma: no cover - best effort teardown
                        p.kill()
        if self.cluster is not None:
            self.cluster.cleanup()
        if self.single is not None:
            self.single.cleanup()
        if self.data_dir and not os.environ.get("PARLEY_KEEP_DEPLOYMENT"):
            shutil.rmtree(self.data_dir, ignore_errors=True)


async def _quiet(_exc: Exception) -> None:
    return None


def describe(dep: Deployment) -> dict[str, Any]:
    return {"nats_nodes": dep.nats_nodes, "replicas": dep.replicas, "instances": dep.instances,
            "env": {k: v for k, v in dep.env.items()}, "sync_always": dep.sync_always}
