"""G7 when NATS itself is gone: nack (never a fake ack), /readyz fails, /v1/status says outage,
clients are told — and everything recovers by itself when NATS returns."""

import os
import subprocess
import sys

import aiohttp
import orjson
import pytest
from helpers import ADMIN, SECRET, eventually, token

from parley.client import ParleyClient
from parley.core.config import Settings
from parley.gateway.status import NATS_NOTICE
from parley.testing.nats_server import NatsServer


@pytest.fixture
def private_nats():
    server = NatsServer().start()
    yield server
    server.cleanup()


async def get(url):
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, await r.json()


async def test_nats_down_then_back(private_nats, tmp_path, tenant):
    from conftest import InProcessStack

    settings = Settings(nats_urls=(private_nats.url,), jwt_secret=SECRET, admin_key=ADMIN, node_id="outage",
                        routing_mode="auto")
    restarted = None
    stack = await InProcessStack(settings.with_overrides(transcript_dsn=f"sqlite:///{tmp_path}/t.db")).start()
    try:
        agent = ParleyClient(stack.ws_url, token("a1", tenant, "agent", skills=["support"]))
        await agent.connect()
        customer = ParleyClient(stack.ws_url, token("c1", tenant))
        await customer.connect()
        conv = await customer.open("support")
        await agent.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "assigned")
        await customer.send(conv, "before")

        private_nats.kill()
        notice = await customer.wait_for(lambda f: f.get("t") == "notice" and f["id"] == NATS_NOTICE["id"], timeout=10)
        assert notice["level"] == "critical"
        status, ready = await get(f"{stack.base_url}/readyz")
        assert status == 503 and ready["checks"]["nats"] == "down"
        _, st = await get(f"{stack.base_url}/v1/status")
        assert st["status"] == "outage" and st["components"]["nats"]["status"] == "down"

        mark = len(customer.frames)
        pending = customer.send_nowait(conv, "during")  # not durable now: nack, kept, retried
        nack = await customer.wait_for(lambda f: f.get("t") == "nack", since=mark, timeout=15)
        assert nack["code"] == "unavailable" and nack["retry"] is True
        assert not pending.done()

        restarted = NatsServer(store_dir=private_nats.store_dir, port=private_nats.port,
                               monitor_port=private_nats.monitor_port, name=private_nats.name).start()
        ack = await pending  # retried with the same id once NATS is back
        assert ack["seq"] > 0
        await customer.wait_for(lambda f: f.get("t") == "notice" and f.get("cleared"), timeout=15)
        await eventually(lambda: _ready(stack.base_url), timeout=15, what="ready again")
        await agent.wait_for(lambda f: f.get("t") == "ev" and f.get("data", {}).get("body") == "during", timeout=15)
        bodies = [f["data"]["body"] for f in agent.conv_events(conv) if f["type"] == "message"]
        assert bodies == ["before", "during"]
        after = await customer.send(conv, "after")
        assert after["seq"] > ack["seq"]
        assert customer.violations == [] and agent.violations == []

        def reconnect_in_timeline():  # the outage is in the post-incident timeline
            out = subprocess.run([sys.executable, "-m", "parley.cli.main", "incident", "--since", "5m", "--format", "json"],
                                 env={**os.environ, "PARLEY_NATS_URL": private_nats.url}, capture_output=True, timeout=60)
            entries = orjson.loads(out.stdout)["entries"] if out.returncode == 0 else []
            return [e for e in entries if e["kind"] == "nats" and e.get("event") == "reconnected"]

        [reconnect] = await eventually(reconnect_in_timeline, timeout=15, what="NATS reconnect in the timeline")
        assert reconnect["down_s"] > 0 and reconnect["service"] == "gateway"
        await customer.close()
        await agent.close()
    finally:
        await stack.stop()
        if restarted is not None:
            restarted.stop()


async def _ready(base):
    status, _ = await get(f"{base}/readyz")
    return status == 200
