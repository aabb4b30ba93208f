"""Health beacons: every service tells the others how it is, over core NATS.

Each process publishes ``status.<service>.<node>`` every ``BEACON_INTERVAL_S`` and whenever a
gateway asks (``status.ping``), with its readiness checks. Gateways aggregate them into
``/v1/status`` (``parley.gateway.status``). The beacon has its own NATS connection so a service
busy or stuck on its main connection still reports, and a dead one simply stops reporting.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from . import process_metrics
from .config import Settings
from .events import now_ms

log = logging.getLogger("parley.health")

BEACON_INTERVAL_S = 2.0
STATUS_PING = "status.ping"
# A beacon older than this means the instance is gone (or cut off from NATS).
BEACON_STALE_S = 3 * BEACON_INTERVAL_S + 1


def status_subject(service: str, node: str) -> str:
    return f"status.{service}.{node}"


class Reporting(Protocol):
    name: str

    def ready(self) -> tuple[bool, dict[str, Any]]: ...


@dataclass
class Beacon:
    service: str
    node: str
    ts: int
    ready: bool
    checks: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        return orjson.dumps({"service": self.service, "node": self.node, "ts": self.ts, "ready": self.ready,
                             "checks": self.checks})

    @classmethod
    def decode(cls, raw: bytes) -> Beacon:
        d = orjson.loads(raw)
        return cls(str(d["service"]), str(d["node"]), int(d["ts"]), bool(d["ready"]), dict(d.get("checks") or {}))


class StatusBeacon:
    """Publishes one service's beacon periodically and on request."""

    def __init__(self, settings: Settings, service: Reporting) -> None:
        self.settings = settings
        self.service = service
        self.nc: NATS | None = None
        self._task: asyncio.Task[None] | None = None

    def beacon(self) -> Beacon:
        try:
            ready, checks = self.service.ready()
        except Exception as exc:  # a broken ready() is itself a health signal
            ready, checks = False, {"error": type(exc).__name__}
        process_metrics.SERVICE_READY.labels(self.service.name).set(1 if ready else 0)
        return Beacon(self.service.name, self.settings.node_id, now_ms(), ready, checks)

    async def start(self) -> None:
        from . import bus

        try:
            self.nc = await bus.connect(self.settings, f"{self.service.name}-beacon")
        except Exception as exc:  # NATS down at start: the service itself will say so
            log.warning("status beacon not started: %s", exc)
            return
        await self.nc.subscribe(STATUS_PING, cb=self._on_ping)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    async def publish(self) -> None:
        if self.nc is not None and self.nc.is_connected:
            b = self.beacon()
            await self.nc.publish(status_subject(b.service, b.node), b.encode())

    async def _on_ping(self, msg: Msg) -> None:
        await self.publish()

    async def _loop(self) -> None:
        while True:
            try:
                await self.publish()
            except Exception as exc:
                log.debug("beacon publish failed: %s", exc)
            await asyncio.sleep(BEACON_INTERVAL_S)
