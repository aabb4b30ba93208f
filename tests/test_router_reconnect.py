"""Presence and router survive a NATS restart: their loops and KV mirrors come back by themselves."""

from __future__ import annotations

import asyncio

import orjson
from helpers import eventually

from parley.core import bus, subjects
from parley.core.config import Settings
from parley.core.events import now_ms
from parley.core.records import ConvRecord
from parley.presence.service import PresenceService
from parley.router.service import RouterService
from parley.testing.nats_server import NatsServer


async def test_services_recover_after_nats_restart(tmp_path):
    server = NatsServer(store_dir=str(tmp_path / "nats")).start()
    settings = Settings(nats_urls=(server.url,), node_id="reconnect", presence_ttl_ms=3000,
                        offer_timeout_ms=2000, requeue_grace_ms=500, routing_mode="auto")
    presence, router = PresenceService(settings), RouterService(settings)
    await presence.start()
    await router.start()
    nc = await bus.connect(settings, "test")
    try:
        server.kill()
        await asyncio.sleep(0.5)  # a real outage: the services see the connection drop
        server.start()
        await eventually(lambda: nc.is_connected and router.ready()[0] and presence.ready()[0], timeout=10,
                         what="reconnected")
        js = nc.jetstream()
        buckets = await bus.ensure_buckets(js, settings)

        async def hello():
            body = {"tenant": "t1", "agent": "ann", "node": "gw", "skills": ["q"], "max_chats": 2}
            try:
                reply = await nc.request(subjects.PRESENCE_HELLO, orjson.dumps(body), timeout=1)
            except Exception:
                return None
            return orjson.loads(reply.data).get("status") == "online"

        await eventually(hello, timeout=10, what="presence answering after restart")
        now = now_ms()
        conv = ConvRecord(conv="c1", tenant="t1", customer="cu", queue="q", opened_at=now, queued_at=now)
        await bus.kv_cas(buckets.convs, subjects.kv_key("t1", "c1"), conv.encode(), 0)

        async def assigned():
            raw, _ = await bus.kv_read(buckets.convs, subjects.kv_key("t1", "c1"))
            return ConvRecord.decode(raw).state == "assigned"

        await eventually(assigned, timeout=10, what="routed after restart")
        body = {"op": "close", "tenant": "t1", "conv": "c1", "by": {"id": "cu", "role": "customer"}}
        await js.publish(subjects.route_subject("t1", "c1"), orjson.dumps(body), stream=subjects.ROUTE_STREAM)

        async def closed():
            raw, _ = await bus.kv_read(buckets.convs, subjects.kv_key("t1", "c1"))
            return ConvRecord.decode(raw).state == "closed"

        await eventually(closed, timeout=10, what="ROUTE consumer working after restart")
    finally:
        await nc.close()
        await router.stop()
        await presence.stop()
        server.cleanup()
