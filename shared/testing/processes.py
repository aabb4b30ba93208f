"""Run Parley services as real OS processes: for ``parley dev``, the tests and the chaos harness.

Each service is ``python -m parley.cli.main <service>`` in its own process group, configured by
``PARLEY_*`` variables, readiness checked over its HTTP port, stopped by pid (SIGTERM to drain,
SIGKILL to crash it, SIGSTOP/SIGCONT to freeze it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .nats_server import free_port, spawn

SERVICE_NAMES = ("gateway", "router", "presence", "transcript")


class ServiceError(RuntimeError):
    pass


def http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@dataclass
class ServiceProcess:
    service: str
    env: dict[str, str]
    port: int = 0
    host: str = "127.0.0.1"
    log_path: str | None = None
    proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v1/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, wait: bool = True, timeout: float = 30.0) -> ServiceProcess:
        self.port = self.port or free_port(self.host)
        env = {**os.environ, **self.env, "PARLEY_HTTP_PORT": str(self.port), "PARLEY_HTTP_HOST": self.host}
        env.setdefault("PARLEY_NODE_ID", f"{self.service}-{self.port}")
        if self.log_path is None:
            self.log_path = tempfile.mktemp(prefix=f"parley-{self.service}-", suffix=".log")
        log = open(self.log_path, "ab")
        self.proc = spawn([sys.executable, "-m", "parley.cli.main", self.service], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
        log.close()
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise ServiceError(f"{self.service} exited with {self.proc.returncode}; log:\n{self.log_tail()}")
            try:
                status, _ = http_get(f"{self.base_url}/readyz", timeout=0.5)
                if status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise ServiceError(f"{self.service} not ready after {timeout}s; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: a crash, no drain."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def freeze(self) -> None:
        self.signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (drain), then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.alive():
            self.signal(signal.SIGCONT)  # a frozen process cannot drain
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def restart(self, timeout: float = 30.0) -> ServiceProcess:
        self.stop()
        self.proc = None
        return self.start(timeout=timeout)


@dataclass
class Stack:
    """A set of service processes sharing one NATS and one transcript store."""

    nats_urls: list[str]
    env: dict[str, str] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=lambda: {s: 1 for s in SERVICE_NAMES})
    data_dir: str | None = None
    gateway_ports: list[int] = field(default_factory=list)
    gateway_host: str = "127.0.0.1"
    processes: dict[str, list[ServiceProcess]] = field(default_factory=dict)

    def base_env(self) -> dict[str, str]:
        if self.data_dir is None:
            self.data_dir = tempfile.mkdtemp(prefix="parley-stack-")
        env = {
            "PARLEY_NATS_URL": ",".join(self.nats_urls),
            "PARLEY_TRANSCRIPT_DSN": f"sqlite:///{Path(self.data_dir).resolve()}/transcripts.db",
            "PARLEY_LOG_FORMAT": "json",
        }
        env.update(self.env)
        return env

    def start(self, timeout: float = 30.0) -> Stack:
        env = self.base_env()
        order = ["transcript", "presence", "router", "gateway"]
        for name in order:
            for i in range(self.counts.get(name, 0)):
                port = self.gateway_ports[i] if name == "gateway" and i < len(self.gateway_ports) else 0
                log = str(Path(self.data_dir or ".") / f"{name}-{i}.log")
                host = self.gateway_host if name == "gateway" else "127.0.0.1"
                proc = ServiceProcess(name, {**env, "PARLEY_NODE_ID": f"{name}-{i}"}, port=port, host=host, log_path=log)
                self.processes.setdefault(name, []).append(proc.start(wait=False))
        for procs in self.processes.values():
            for p in procs:
                p.wait_ready(timeout)
        return self

    def __getitem__(self, name: str) -> list[ServiceProcess]:
        return self.processes.get(name, [])

    @property
    def gateways(self) -> list[ServiceProcess]:
        return self["gateway"]

    def all(self) -> list[ServiceProcess]:
        return [p for procs in self.processes.values() for p in procs]

    def stop(self) -> None:
        # gateways first so clients are told to reconnect before the back end goes
        for name in ("gateway", "router", "presence", "transcript"):
            for p in self.processes.get(name, []):
                p.stop()
