"""Gateway wiring: NATS, the record directory, the hub, and the aiohttp app (WebSocket + HTTP)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from typing import Any

import orjson
from aiohttp import web
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from parley.core import audit as audit_trail
from parley.core import bus, subjects
from parley.core.config import Settings
from parley.core.events import now_ms
from parley.core.health import STATUS_PING, Beacon
from parley.core.kvview import KvView
from parley.core.protocol import (
    CLOSE_RESTART,
    HELLO_TIMEOUT_S,
    MAX_FRAME_BYTES,
    SUBPROTOCOL_JSON,
    SUBPROTOCOLS,
    Codec,
)
from parley.core.records import Notice
from parley.core.service import add_health_routes
from parley.core.tasks import stop_tasks

from . import http_api, metrics
from .connection import Connection
from .directory import Directory
from .hub import Hub
from .status import LAG_NOTICE, NATS_NOTICE, Assessment, StatusBoard, assess

log = logging.getLogger("parley.gateway")

DRAIN_TIMEOUT_S = 10.0
GATEWAY_KEY: web.AppKey[GatewayService] = web.AppKey("gateway")


class GatewayService:
    name = "gateway"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self.hub: Hub = None  # type: ignore[assignment]  # set in start()
        self.connections: set[Connection] = set()
        self.draining = False
        self.started = False
        self.board = StatusBoard(self.broadcast)
        self._nats_down_at: float | None = None
        self._nacks: dict[tuple[str, str], int] = {}
        self._status_task: asyncio.Task[None] | None = None
        self.hello_timeout_s = HELLO_TIMEOUT_S  # SPEC: 10 s; tests shorten it
        self._runner: web.AppRunner | None = None
        self.app = self._build_app()

    # --- lifecycle -------------------------------------------------------------------------------
    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app[GATEWAY_KEY] = self
        add_health_routes(app, self)
        app.router.add_get("/v1/ws", self._ws_handler)
        http_api.add_routes(app)
        __import__(f"{__package__}.web_routes", fromlist=["add_routes"]).add_routes(app)  # pages: web_routes.py
        return app

    async def start(self) -> None:
        self.nc = await bus.connect(self.settings, "gateway", disconnected_cb=self._nats_down,
                                    reconnected_cb=self._nats_up)
        metrics.NATS_CONNECTED.set(1)
        js = self.nc.jetstream()
        buckets = await bus.ensure_all(js, self.settings)
        reader = bus.StreamReader(self.nc)
        await reader.start()
        directory = Directory(buckets.convs, buckets.agents)
        await directory.start()
        self.buckets = buckets
        self.notice_view: KvView[Notice] = KvView(buckets.notices, Notice.decode)
        await self.notice_view.start()
        self.hub = Hub(self.settings, self.nc, js, directory, reader)
        await self.hub.start()
        await self.nc.subscribe("status.*.*", cb=self._on_beacon)
        await self.nc.publish(STATUS_PING, b"")  # every service answers with a beacon at once
        await self.nc.flush()
        self._status_task = asyncio.create_task(self._status_loop())
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=2)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.settings.http_host, self.settings.http_port).start()
        self.started = True

    async def stop(self) -> None:
        """Drain: readiness off, every client told to reconnect elsewhere (1012), then exit."""
        self.draining = True
        for conn in list(self.connections):
            conn.close_after_flush(CLOSE_RESTART, {"t": "reconnect", "after_ms": random.randint(100, 1500)})
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                while self.connections:
                    await asyncio.sleep(0.05)
        except TimeoutError:
            log.warning("%d connections did not close in time", len(self.connections))
        if self._runner is not None:
            await self._runner.cleanup()
        await stop_tasks([self._status_task])
        if self.hub is not None:
            await self.hub.stop()
            await self.hub.directory.stop()
            await self.notice_view.stop()
        if self.nc is not None and not self.nc.is_closed:
            await self.nc.close()

    async def _nats_down(self) -> None:
        metrics.NATS_CONNECTED.set(0)
        self._nats_down_at = time.monotonic()
        self.board.signal(NATS_NOTICE, True)

    async def _nats_up(self) -> None:
        metrics.NATS_CONNECTED.set(1)
        self.board.signal(NATS_NOTICE, False)
        if self.started:  # the server may have lost the watches' ephemeral consumers
            for view in (self.hub.directory.convs, self.hub.directory.agents, self.notice_view):
                await view.restart()
        down_s = round(time.monotonic() - self._nats_down_at, 3) if self._nats_down_at else None
        await self.audit("nats", None, event="reconnected", down_s=down_s,
                         server=self.nc.connected_url.netloc if self.nc and self.nc.connected_url else None)
        with contextlib.suppress(Exception):
            await self.nc.publish(STATUS_PING, b"")  # type: ignore[union-attr]

    # --- status ----------------------------------------------------------------------------------
    def broadcast(self, frame: dict[str, Any]) -> None:
        for conn in list(self.connections):
            conn.send(frame)

    async def _on_beacon(self, msg: Msg) -> None:
        try:
            self.board.note(Beacon.decode(msg.data))
        except (ValueError, KeyError, TypeError):
            log.warning("bad status beacon on %s", msg.subject)

    def assessment(self) -> Assessment:
        return assess(self.nc is not None and self.nc.is_connected, self.draining, self.settings.node_id,
                      list(self.board.beacons.values()), now_ms(), self.settings.transcript_lag_warn)

    async def audit(self, kind: str, tenant: str | None, **data: Any) -> None:
        if self.nc is not None:
            await audit_trail.record(self.nc, kind, tenant, "gateway", self.settings.node_id, **data)

    def count_nack(self, tenant: str, code: str) -> None:
        self._nacks[(tenant, code)] = self._nacks.get((tenant, code), 0) + 1

    async def _status_loop(self) -> None:
        """Once a second: system notices from the assessment; every 10 s: nack counts to the trail."""
        ticks = 0
        while True:
            await asyncio.sleep(1.0)
            ticks += 1
            assessment = self.assessment()
            lagging = assessment.transcripts_lagging
            if self.board.signal(LAG_NOTICE, lagging):
                await self.audit("lag", None, event="raised" if lagging else "cleared", lag=assessment.transcript_lag)
            if ticks % 10 == 0 and self._nacks:
                nacks, self._nacks = self._nacks, {}
                for (tenant, code), count in nacks.items():
                    await self.audit("nack", tenant, code=code, count=count, window_s=10)

    def ready(self) -> tuple[bool, dict[str, str]]:
        checks = {
            "nats": "ok" if self.nc is not None and self.nc.is_connected else "down",
            "streams": "ok" if self.started else "starting",
            "draining": "yes" if self.draining else "no",
        }
        return checks["nats"] == "ok" and self.started and not self.draining, checks

    def system_status(self) -> str:
        return self.assessment().status

    # --- tenant notices (incident banners) --------------------------------------------------------
    def notices(self, tenant: str) -> list[Notice]:
        return sorted((n for n in self.notice_view.values() if n.tenant == tenant), key=lambda n: n.created)

    def find_notice(self, notice_id: str) -> Notice | None:
        return next((n for n in self.notice_view.values() if n.id == notice_id), None)

    def note_notice(self, notice: Notice, revision: int) -> None:
        self.notice_view.remember(subjects.kv_key(notice.tenant, notice.id), notice, revision)

    def forget_notice(self, notice: Notice) -> None:
        self.notice_view.forget(subjects.kv_key(notice.tenant, notice.id))

    @staticmethod
    def json(obj: Any) -> Any:
        """bytes → object, object → bytes (orjson), for frames crossing NATS."""
        return orjson.loads(obj) if isinstance(obj, bytes | str) else orjson.dumps(obj)

    # --- WebSocket -------------------------------------------------------------------------------
    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        if self.draining or not self.started:
            raise web.HTTPServiceUnavailable(reason="gateway draining")
        ws = web.WebSocketResponse(protocols=SUBPROTOCOLS, max_msg_size=MAX_FRAME_BYTES, autoping=False)
        await ws.prepare(request)
        conn = Connection(self, ws, Codec(ws.ws_protocol or SUBPROTOCOL_JSON), request.transport)  # type: ignore[arg-type]
        try:
            await conn.run()
        except Exception:
            log.exception("connection failed")
        return ws
