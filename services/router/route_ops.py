"""The ROUTE work queue: ``accept``/``decline``/``close``/``transfer`` commands from gateways.

All routers share the durable pull consumer ``router``, so each command is applied by one of
them, and a router that dies leaves its unacknowledged commands to be redelivered. A command is
acknowledged only after its transition is stored and its events are in the chain; transitions
are idempotent (a redelivered command finds its work done and changes nothing).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import nats.errors
import orjson
from nats.aio.msg import Msg
from nats.js import api as jsapi

from parley.core import subjects
from parley.core.events import now_ms

from . import metrics
from .logic import RouteOp, RouteRefused, apply_route_op, parse_route_op
from .store import RoutingStore

log = logging.getLogger("parley.router.ops")

FETCH_BATCH = 50
FETCH_TIMEOUT_S = 1.0
ACK_WAIT_S = 10
# A command that failed for a transient reason (NATS busy, leader election) is retried soon.
RETRY_DELAY_S = 0.5


def consumer_config() -> jsapi.ConsumerConfig:
    return jsapi.ConsumerConfig(
        durable_name=subjects.ROUTER_CONSUMER,
        ack_policy=jsapi.AckPolicy.EXPLICIT,
        ack_wait=ACK_WAIT_S,
        filter_subject="route.>",
        max_ack_pending=1000,
    )


class RouteCommandConsumer:
    def __init__(self, store: RoutingStore, on_applied: Callable[[], None]) -> None:
        self._store = store
        self._on_applied = on_applied
        self._stopping = False
        self._psub: Any = None

    def stop(self) -> None:
        """Finish the command in hand, fetch no more."""
        self._stopping = True

    async def run(self) -> None:
        while not self._stopping:
            try:
                if self._psub is None:
                    self._psub = await self._store.js.pull_subscribe(
                        "route.>", durable=subjects.ROUTER_CONSUMER, stream=subjects.ROUTE_STREAM, config=consumer_config()
                    )
                try:
                    msgs = await self._psub.fetch(batch=FETCH_BATCH, timeout=FETCH_TIMEOUT_S)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                for msg in msgs:
                    await self.handle(msg)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # reconnecting, consumer lost with a server: subscribe again
                metrics.ERRORS.labels("route_fetch").inc()
                log.warning("ROUTE fetch failed: %s: %s", type(exc).__name__, exc)
                await self._drop_subscription()
                await asyncio.sleep(RETRY_DELAY_S)
        await self._drop_subscription()

    async def _drop_subscription(self) -> None:
        psub, self._psub = self._psub, None
        if psub is not None:
            try:
                await psub.unsubscribe()
            except Exception:
                pass

    async def handle(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
        except orjson.JSONDecodeError:
            body = None
        op = parse_route_op(body)
        if op is None or msg.subject != subjects.route_subject(op.tenant, op.conv):
            await self._dead_letter(msg)
            return
        try:
            status = "online"
            if op.op == "accept":
                status = await self._store.prepare_accept(op.tenant, op.by.id, op.conv)
            _, done = await self._store.transition(
                op.tenant, op.conv, lambda cur, rev: apply_route_op(cur, rev, op, now_ms(), status)
            )
        except RouteRefused as refused:
            metrics.OPS.labels(op.op, refused.code).inc()
            await msg.ack()
            await self._tell(op, refused)
            return
        except Exception as exc:
            metrics.OPS.labels(op.op, "retry").inc()
            log.warning("%s of %s.%s failed, retrying: %s: %s", op.op, op.tenant, op.conv, type(exc).__name__, exc)
            await self._nak(msg)
            return
        metrics.OPS.labels(op.op, "ok" if done is not None else "already_done").inc()
        if op.op == "accept" and done is not None:
            metrics.ASSIGNMENTS.labels("accept").inc()
        await msg.ack()
        self._on_applied()

    async def _tell(self, op: RouteOp, refused: RouteRefused) -> None:
        frame = {"t": "error", "code": refused.code, "msg": refused.msg, "ref": op.conv}
        try:
            await self._store.nc.publish(subjects.user_subject(op.tenant, op.by.id), orjson.dumps(frame))
        except Exception as exc:  # the user just misses an error frame
            log.info("could not tell %s about refused %s: %s", op.by.id, op.op, exc)

    async def _nak(self, msg: Msg) -> None:
        try:
            await msg.nak(delay=RETRY_DELAY_S)
        except Exception:  # redelivered after ack_wait anyway
            pass

    async def _dead_letter(self, msg: Msg) -> None:
        metrics.OPS.labels("invalid", "dead_letter").inc()
        log.error("undecodable routing command on %s dead-lettered: %r", msg.subject, msg.data[:200])
        try:
            await self._store.js.publish(f"{subjects.DEADLETTER_STREAM.lower()}.{msg.subject}", msg.data)
        except Exception as exc:
            log.warning("dead-letter publish failed: %s", exc)
            await self._nak(msg)
            return
        await msg.ack()
