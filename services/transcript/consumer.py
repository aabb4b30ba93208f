"""The writer's JetStream edge: its durable consumer on CONV, decoding messages, dead letters.

All writer instances bind the same durable pull consumer, so the server spreads messages over
them and hands an unacked message to another writer after ``ack_wait`` when one dies.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import orjson
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as jsapi

from parley.core import subjects
from parley.core.events import MSG_ID_HEADER, decode_event

from .storage import TranscriptRow

log = logging.getLogger("parley.transcript")

DEADLETTER_SUBJECT = "deadletter.transcript"
# Long enough for a big batch to commit on a slow disk; a crashed writer's batch returns after it.
ACK_WAIT_S = 30.0
# Writers hold up to a batch each; large so that a backlog after an outage drains at full speed.
MAX_ACK_PENDING = 20000


def consumer_config(ack_wait_s: float = ACK_WAIT_S) -> jsapi.ConsumerConfig:
    return jsapi.ConsumerConfig(
        durable_name=subjects.TRANSCRIPT_CONSUMER,
        description="Parley transcript writers (shared by every instance)",
        filter_subject="conv.>",
        deliver_policy=jsapi.DeliverPolicy.ALL,
        ack_policy=jsapi.AckPolicy.EXPLICIT,
        ack_wait=ack_wait_s,
        max_ack_pending=MAX_ACK_PENDING,
        # max_deliver stays unlimited: a transcript event must never be dropped by the server.
    )


async def ensure_consumer(js: JetStreamContext, ack_wait_s: float = ACK_WAIT_S) -> jsapi.ConsumerInfo:
    """Create the durable consumer, or bring it to this config; idempotent and safe when racing."""
    return await js.add_consumer(subjects.CONV_STREAM, consumer_config(ack_wait_s))


async def bind_consumer(js: JetStreamContext, ack_wait_s: float = ACK_WAIT_S) -> JetStreamContext.PullSubscription:
    await ensure_consumer(js, ack_wait_s)
    return await js.pull_subscribe_bind(durable=subjects.TRANSCRIPT_CONSUMER, stream=subjects.CONV_STREAM)


def decode_row(msg: Msg, seq: int | None = None) -> TranscriptRow:
    """The stored row for one CONV message; ``ValueError`` when it is not a Parley event.
    ``seq``: its stream sequence when the caller has parsed ``msg.metadata`` already."""
    parts = msg.subject.split(".")
    if len(parts) != 3 or parts[0] != "conv":
        raise ValueError(f"not a conversation subject: {msg.subject}")
    tenant, conv = parts[1], parts[2]
    if seq is None:
        seq = msg.metadata.sequence.stream
    try:
        event = decode_event(tenant, conv, seq, 0, msg.data)
    except (TypeError, KeyError) as exc:  # e.g. "ts": null; decode_event only raises ValueError itself
        raise ValueError(f"bad event payload: {exc}") from exc
    if not isinstance(event.data, dict):
        raise ValueError("event data is not an object")
    return TranscriptRow(tenant, conv, seq, event.type, event.ts, event.data)


async def publish_dead_letter(js: JetStreamContext, msg: Msg, reason: str) -> None:
    """Keep an undecodable message for humans, once per stream position even when redelivered."""
    seq = msg.metadata.sequence.stream
    headers: dict[str, Any] = {
        key: value for key, value in (msg.headers or {}).items() if not key.startswith("Nats-")
    }
    headers.update(
        {
            MSG_ID_HEADER: f"dl:transcript:{seq}",
            "Parley-Source-Subject": msg.subject,
            "Parley-Source-Seq": str(seq),
            "Parley-Error": " ".join(reason.split())[:200],
        }
    )
    await js.publish(DEADLETTER_SUBJECT, msg.data, headers=headers, timeout=5.0)
    log.error("transcript: dead-lettered %s seq %d: %s", msg.subject, seq, reason)


class BatchPuller:
    """Pull requests on the durable consumer without nats-py's ``fetch()``.

    ``fetch()`` waits for every message with its own ``asyncio.wait_for`` (two tasks per message),
    which costs more than everything else the writer does per event. Here one callback appends
    messages to a list and a request ends on a status message (404 no messages, 408 expired, 409
    …) or when its batch is complete. Messages delivered for an earlier request after its fetch
    returned are kept and returned by the next fetch: the server counts them as delivered to us.
    """

    def __init__(self, nc: Any, stream: str = subjects.CONV_STREAM,
                 durable: str = subjects.TRANSCRIPT_CONSUMER) -> None:
        self._nc = nc
        self._next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}"
        self._inbox = nc.new_inbox()
        self._sub: Any = None
        self._buffer: list[Msg] = []
        self._request = 0
        self._wanted = 0
        self._ended = asyncio.Event()

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()
            self._sub = None

    async def _on_msg(self, msg: Msg) -> None:
        status = msg.headers.get("Status") if msg.headers else None
        if status:
            # Status messages come on the request's reply subject: only the current one's counts.
            if status != "100" and msg.subject.endswith(f".{self._request}"):  # 100 = idle heartbeat
                self._ended.set()
            return
        # Messages keep their stream subject, so which request they answer is unknown: all count.
        self._buffer.append(msg)
        if len(self._buffer) >= self._wanted:
            self._ended.set()

    async def _pull(self, batch: int, expires_s: float | None) -> None:
        self._request += 1
        self._wanted = batch
        self._ended.clear()
        body: dict[str, Any] = {"batch": batch}
        if expires_s is None:
            body["no_wait"] = True
        else:
            body["expires"] = int(expires_s * 1_000_000_000)
        await self._nc.publish(self._next_subject, orjson.dumps(body), reply=f"{self._inbox}.{self._request}")

    def take(self) -> list[Msg]:
        out, self._buffer = self._buffer, []
        return out

    async def fetch(self, batch: int, timeout: float) -> list[Msg]:
        """Up to ``batch`` messages (a few more when late ones arrive): what is available at once,
        else the first to arrive within ``timeout``; ``[]`` when none came."""
        if len(self._buffer) >= batch:
            return self.take()
        await self._pull(batch - len(self._buffer), None)
        await self._wait(timeout)
        if self._buffer:
            return self.take()
        await self._pull(batch, timeout)
        self._wanted = 1  # return with the first message: latency matters more than batch size here
        await self._wait(timeout + 0.05)
        return self.take()

    async def _wait(self, timeout: float) -> None:
        try:
            await asyncio.wait_for(self._ended.wait(), timeout)
        except TimeoutError:
            pass
