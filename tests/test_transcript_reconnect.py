"""The writer survives its NATS server being killed and restarted (a private server, not the session's)."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from parley.core import bus, subjects
from parley.core.config import Settings
from parley.testing.nats_server import NatsServer
from parley.transcript.service import TranscriptService


async def wait_for(condition, timeout: float = 15.0, what: str = ""):
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
def private_nats(tmp_path):
    server = NatsServer(store_dir=str(tmp_path / "nats")).start()
    yield server
    server.cleanup()


async def test_writer_survives_nats_restart(private_nats, tmp_path, tenant):
    settings = Settings(
        nats_urls=(private_nats.url,), node_id="reconnect-test", transcript_dsn=f"sqlite:///{tmp_path}/t.db"
    )
    nc = await bus.connect(settings, "test")
    js = nc.jetstream()
    await bus.ensure_all(js, settings)
    service = TranscriptService(settings)
    await service.start()
    try:
        first = await bus.publish_event(js, tenant, "c1", "opened", {"queue": "q"}, msg_id=f"{tenant}:o")

        async def last_seq() -> int:
            try:
                reply = await nc.request(
                    subjects.TRANSCRIPT_GET, orjson.dumps({"tenant": tenant, "conv": "c1"}), timeout=1
                )
            except Exception:  # no responders / timeout while the server is coming back
                return -1
            return orjson.loads(reply.data).get("last_seq", 0)

        def stored(seq: int):
            async def check() -> bool:
                return await last_seq() == seq

            return check

        await wait_for(stored(first.seq), what="first event stored")

        private_nats.kill()
        await wait_for(lambda: not service.ready()[0], what="not ready while NATS is down")
        await asyncio.to_thread(private_nats.start)  # same port and store: the stream comes back

        async def publish_after_restart():
            try:
                return await bus.publish_event(
                    js, tenant, "c1", "message", {"id": "m", "body": "after"}, msg_id=f"{tenant}:m", timeout=1
                )
            except bus.NOT_DURABLE_ERRORS:
                return None

        acks = []

        async def published() -> bool:
            ack = await publish_after_restart()
            if ack is not None:
                acks.append(ack)
            return ack is not None

        await wait_for(published, what="JetStream back after restart")
        await wait_for(stored(acks[0].seq), what="event after restart stored")
        await wait_for(lambda: service.ready()[0], what="ready again")
    finally:
        await service.stop()
        await nc.close()
