"""What every Parley process shares: logging, the health/metrics HTTP server, signal-driven drain.

A service implements ``start()``, ``stop()`` (drain: finish or leave work for redelivery) and
``ready()``; ``run_service`` wires them to SIGTERM/SIGINT and to ``/healthz``, ``/readyz`` and
``/metrics`` on ``PARLEY_HTTP_PORT``. The gateway mounts the same three routes on its own app.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from typing import Any, Protocol

import orjson
from aiohttp import web
from opentelemetry import trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from . import process_metrics
from .config import Settings
from .health import StatusBeacon

log = logging.getLogger("parley.service")


class Service(Protocol):
    name: str

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def ready(self) -> tuple[bool, dict[str, str]]: ...


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, with the current trace and span ids when a span is active.

    Message bodies are never logged by Parley's code; keep it that way in new log lines.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
            entry["span_id"] = format(span.span_id, "016x")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


def setup_logging(level: str | None = None) -> None:
    level = level or os.environ.get("PARLEY_LOG_LEVEL", "INFO")
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("PARLEY_LOG_FORMAT", "json") == "json":
        handler.setFormatter(JsonLogFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def nats_readiness(nc: Any, started: bool) -> tuple[bool, dict[str, str]]:
    """``ready()`` of a service whose only dependency is its NATS connection."""
    connected = nc is not None and nc.is_connected
    return connected and started, {"nats": "connected" if connected else "disconnected", "started": str(started).lower()}


def add_health_routes(app: web.Application, service: Service) -> None:
    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive", "service": service.name})

    async def readyz(_: web.Request) -> web.Response:
        ok, checks = service.ready()
        return web.json_response({"ready": ok, "checks": checks}, status=200 if ok else 503)

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)


async def serve_health(service: Service, settings: Settings) -> web.AppRunner:
    app = web.Application()
    add_health_routes(app, service)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    return runner


async def run_until_signalled(service: Service, settings: Settings, own_http: bool = False) -> None:
    """Start the service (and its health server unless it serves HTTP itself), wait for a signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = None if own_http else await serve_health(service, settings)
    await service.start()
    beacon = StatusBeacon(settings, service)
    await beacon.start()
    lag_monitor = asyncio.create_task(monitor_event_loop_lag())
    log.info("%s %s ready (http port %d)", service.name, settings.node_id, settings.http_port)
    print(f"parley-{service.name} {settings.node_id} listening on :{settings.http_port}", flush=True)
    await stop.wait()
    log.info("%s draining", service.name)
    lag_monitor.cancel()
    await service.stop()
    await beacon.stop()
    if runner is not None:
        await runner.cleanup()


async def monitor_event_loop_lag(interval: float = 0.5) -> None:
    """A loop that runs its timers late is a process that answers late: export by how much."""
    loop = asyncio.get_running_loop()
    while True:
        expected = loop.time() + interval
        await asyncio.sleep(interval)
        process_metrics.EVENT_LOOP_LAG.set(max(0.0, loop.time() - expected))


def install_event_loop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover - uvloop is a dependency, but not on every platform
        pass
