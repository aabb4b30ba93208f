"""Fixtures: a real nats-server on free ports (never :4222), started once per test session."""

from __future__ import annotations

import asyncio
import io
import os
import uuid

import pytest
from helpers import ADMIN, SECRET

# servers and services this run starts die with it, even when the run itself is killed
os.environ["PARLEY_CHILDREN_DIE_WITH_PARENT"] = "1"

from parley.core import bus
from parley.core.config import Settings
from parley.testing.nats_server import NatsServer


@pytest.fixture(scope="session")
def nats_server():
    server = NatsServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def settings(nats_server) -> Settings:
    return Settings(nats_urls=(nats_server.url,), jwt_secret=SECRET, admin_key=ADMIN,
                    node_id="test-node")


@pytest.fixture
async def nc(settings):
    conn = await bus.connect(settings, "test")
    yield conn
    await conn.close()


@pytest.fixture
async def js(nc, settings):
    js = nc.jetstream()
    await bus.ensure_all(js, settings)
    return js


@pytest.fixture
def tenant() -> str:
    """A fresh tenant per test keeps tests independent on one shared NATS."""
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
async def gateway(settings):
    """A gateway in this test's event loop, on a free port."""
    from parley.gateway.app import GatewayService
    from parley.testing.nats_server import free_port

    gw = GatewayService(settings.with_overrides(http_host="127.0.0.1", http_port=free_port()))
    await gw.start()
    gw.ws_url = f"ws://127.0.0.1:{gw.settings.http_port}/v1/ws"
    gw.base_url = f"http://127.0.0.1:{gw.settings.http_port}"
    yield gw
    await stop_within(gw, STOP_BOUND_S)


class InProcessStack:
    """Gateway, router, presence and transcript writer in this test's event loop."""

    def __init__(self, settings):
        self.settings = settings
        self.services = []

    async def start(self):
        from parley.core.health import StatusBeacon
        from parley.gateway.app import GatewayService
        from parley.presence.service import PresenceService
        from parley.router.service import RouterService
        from parley.testing.nats_server import free_port
        from parley.transcript.service import TranscriptService

        self.beacons = []
        for cls in (TranscriptService, PresenceService, RouterService):
            svc_settings = self.settings.with_overrides(node_id=f"{cls.__name__}-test")
            svc = cls(svc_settings)
            await svc.start()
            self.services.append(svc)
            beacon = StatusBeacon(svc_settings, svc)  # as run_until_signalled does for a process
            await beacon.start()
            self.beacons.append(beacon)
        self.gateway = GatewayService(self.settings.with_overrides(http_host="127.0.0.1", http_port=free_port()))
        await self.gateway.start()
        self.services.append(self.gateway)
        self.ws_url = f"ws://127.0.0.1:{self.gateway.settings.http_port}/v1/ws"
        self.base_url = f"http://127.0.0.1:{self.gateway.settings.http_port}"
        return self

    async def stop(self):
        hung = []
        for part in [*self.beacons, *reversed(self.services)]:
            try:
                await stop_within(part, STOP_BOUND_S)
            except pytest.fail.Exception as exc:  # stop the rest, then report
                hung.append(str(exc))
        if hung:
            pytest.fail("\n".join(hung))


# A service's stop() is bounded in production by its own timeouts; a teardown that still hangs
# is a bug worth a clear failure (with every task's stack), not a silent wait for the test timeout.
STOP_BOUND_S = 45


async def stop_within(service, seconds: float) -> None:
    stopping = asyncio.ensure_future(service.stop())
    done, _ = await asyncio.wait({stopping}, timeout=seconds)
    if stopping in done:
        stopping.result()
        return
    stacks = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=8, file=stacks)
    stopping.cancel()
    pytest.fail(f"{type(service).__name__}.stop() did not finish in {seconds} s; tasks:\n{stacks.getvalue()}")


@pytest.fixture
async def make_stack(settings, tmp_path):
    stacks = []

    async def make(**overrides):
        overrides.setdefault("transcript_dsn", f"sqlite:///{tmp_path}/transcripts-{len(stacks)}.db")
        stack = InProcessStack(settings.with_overrides(**overrides))
        stacks.append(stack)
        return await stack.start()

    yield make
    for stack in stacks:
        await stack.stop()


@pytest.fixture
async def stack(make_stack):
    return await make_stack(offer_timeout_ms=3000)
