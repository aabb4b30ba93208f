"""The NATS edge shared by every service: connecting, stream/bucket definitions, reading the chain.

Streams and buckets are data (``stream_configs``/``bucket_configs``) applied idempotently at
start by whichever service comes up first; no start order is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import nats
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js import api as jsapi
from nats.js.errors import APIError, KeyNotFoundError, KeyWrongLastSequenceError, NoStreamResponseError
from nats.js.kv import KeyValue

from . import process_metrics, subjects, telemetry
from .audit import AUDIT_STREAM
from .config import Settings
from .errors import UnavailableError
from .events import MSG_ID_HEADER, Event, decode_event, encode_event
from .records import ConvRecord

log = logging.getLogger("parley.bus")

T = TypeVar("T")

# Errors that mean "JetStream did not (or not yet) store this": the write must be retried or nacked.
NOT_DURABLE_ERRORS = (
    NatsTimeoutError,
    NoRespondersError,
    NoStreamResponseError,
    asyncio.TimeoutError,
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
)


async def connect(settings: Settings, name: str, **callbacks: Callable[..., Awaitable[None]]) -> NATS:
    """Connect with endless reconnects; errors are logged in one line, not as tracebacks."""

    async def error_cb(exc: Exception) -> None:
        log.warning("nats: %s: %s", type(exc).__name__, exc)

    async def disconnected_cb() -> None:
        if nc.is_closed:  # our own close() at shutdown, not a fault
            return
        process_metrics.NATS_DISCONNECTS.labels(name).inc()
        log.warning("nats: disconnected")
        if "disconnected_cb" in callbacks:
            await callbacks["disconnected_cb"]()

    async def reconnected_cb() -> None:
        process_metrics.NATS_RECONNECTS.labels(name).inc()
        log.info("nats: reconnected to %s", nc.connected_url.netloc if nc.connected_url else "?")
        if "reconnected_cb" in callbacks:
            await callbacks["reconnected_cb"]()

    nc = NATS()
    try:
        await nc.connect(
            servers=list(settings.nats_urls),
            name=f"{name}:{settings.node_id}",
            error_cb=error_cb,
            disconnected_cb=disconnected_cb,
            reconnected_cb=reconnected_cb,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,  # type: ignore[arg-type]  # nats-py annotates int, accepts float
            connect_timeout=2,
            allow_reconnect=True,
            ping_interval=5,
            max_outstanding_pings=3,
        )
    except Exception as exc:  # nats raises plain OSError/NoServersError variants
        raise UnavailableError(f"cannot connect to NATS at {','.join(settings.nats_urls)}: {exc}") from exc
    return nc


def stream_configs(settings: Settings) -> list[jsapi.StreamConfig]:
    return [
        jsapi.StreamConfig(
            name=subjects.CONV_STREAM,
            description="Parley conversation events: one subject per conversation",
            subjects=["conv.>"],
            storage=jsapi.StorageType.FILE,
            retention=jsapi.RetentionPolicy.LIMITS,
            max_age=settings.stream_max_age_s,
            duplicate_window=settings.dedupe_window_s,
            num_replicas=settings.stream_replicas,
            allow_direct=True,
            republish=jsapi.RePublish(src="conv.>", dest="live.conv.>"),
        ),
        jsapi.StreamConfig(
            name=subjects.ROUTE_STREAM,
            description="Parley routing requests (work queue shared by routers)",
            subjects=["route.>"],
            storage=jsapi.StorageType.FILE,
            retention=jsapi.RetentionPolicy.WORK_QUEUE,
            max_age=24 * 3600,
            duplicate_window=120,
            num_replicas=settings.stream_replicas,
        ),
        jsapi.StreamConfig(
            name=AUDIT_STREAM,
            description="Parley audit trail for post-incident timelines (parley incident)",
            subjects=["audit.>"],
            storage=jsapi.StorageType.FILE,
            max_age=30 * 24 * 3600,
            num_replicas=settings.stream_replicas,
        ),
        jsapi.StreamConfig(
            name=subjects.DEADLETTER_STREAM,
            description="Parley messages no consumer could process",
            subjects=["deadletter.>"],
            storage=jsapi.StorageType.FILE,
            max_age=14 * 24 * 3600,
            num_replicas=settings.stream_replicas,
        ),
    ]


def bucket_configs(settings: Settings) -> list[jsapi.KeyValueConfig]:
    def bucket(name: str, ttl: float | None = None) -> jsapi.KeyValueConfig:
        return jsapi.KeyValueConfig(bucket=name, history=1, ttl=ttl, replicas=settings.stream_replicas,
                                    direct=True, storage=jsapi.StorageType.FILE)

    return [
        # Records of closed conversations expire with the stream window; open ones are rewritten.
        bucket(subjects.CONVS_BUCKET, ttl=settings.stream_max_age_s),
        bucket(subjects.AGENTS_BUCKET),
        bucket(subjects.HEARTBEATS_BUCKET),
        bucket(subjects.NOTICES_BUCKET),
        # Last sign of a customer's connection (routers close abandoned waiting conversations);
        # an entry older than the abandonment window says no more than a missing one.
        bucket(subjects.SEEN_BUCKET, ttl=max(2 * settings.abandon_s, 3600)),
    ]


async def ensure_stream(js: JetStreamContext, config: jsapi.StreamConfig) -> None:
    """Create the stream, or bring an existing one to this config; safe when services race."""
    for _ in range(5):
        try:
            await js.stream_info(config.name)  # type: ignore[arg-type]
        except nats.js.errors.NotFoundError:
            try:
                await js.add_stream(config)
                return
            except APIError as exc:
                if exc.err_code == 10058:  # created meanwhile by another service
                    continue
                raise
        else:
            await js.update_stream(config)
            return
    raise UnavailableError(f"could not create stream {config.name}")


@dataclass
class Buckets:
    convs: KeyValue
    agents: KeyValue
    heartbeats: KeyValue
    notices: KeyValue
    seen: KeyValue


async def ensure_buckets(js: JetStreamContext, settings: Settings) -> Buckets:
    kvs: list[KeyValue] = []
    for config in bucket_configs(settings):
        try:
            kvs.append(await js.create_key_value(config))
        except APIError as exc:
            if exc.err_code != 10058:
                raise
            kvs.append(await js.key_value(config.bucket))
    return Buckets(*kvs)


async def ensure_all(js: JetStreamContext, settings: Settings, timeout: float = 60.0) -> Buckets:
    """Create every stream and bucket, waiting for JetStream to be ready (a cluster electing its
    meta leader, a server still recovering) instead of failing the service's start."""
    deadline = asyncio.get_running_loop().time() + timeout
    delay = 0.1
    while True:
        try:
            for config in stream_configs(settings):
                await ensure_stream(js, config)
            return await ensure_buckets(js, settings)
        except (APIError, *NOT_DURABLE_ERRORS) as exc:
            if asyncio.get_running_loop().time() > deadline:
                raise UnavailableError(f"JetStream not ready: {exc}") from exc
            log.warning("JetStream not ready (%s); retrying", exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


# --- compare-and-set -----------------------------------------------------------------------------
async def kv_read(kv: KeyValue, key: str) -> tuple[bytes | None, int]:
    """Current value and revision; ``(None, 0)`` when absent (revision 0 = "must not exist")."""
    try:
        entry = await kv.get(key)
    except KeyNotFoundError:
        return None, 0
    if entry.value is None or entry.operation in ("DEL", "PURGE"):
        return None, entry.revision or 0
    return entry.value, entry.revision or 0


async def kv_cas(kv: KeyValue, key: str, value: bytes, revision: int) -> int:
    """Write if the key is still at ``revision`` (0: if absent). Raises KeyWrongLastSequenceError."""
    if revision == 0:
        return await kv.create(key, value)
    return await kv.update(key, value, last=revision)


async def cas_loop(
    kv: KeyValue,
    key: str,
    decode: Callable[[bytes], T],
    change: Callable[[T | None], T | None],
    attempts: int = 50,
) -> tuple[T | None, int, bool]:
    """Apply ``change`` to the current value until a compare-and-set wins.

    ``change`` gets the decoded value (None when absent) and returns the new value, or None to
    leave it. Returns ``(value, revision, changed)``.
    """
    for _ in range(attempts):
        raw, rev = await kv_read(kv, key)
        current = decode(raw) if raw is not None else None
        new = change(current)
        if new is None:
            return current, rev, False
        try:
            new_rev = await kv_cas(kv, key, new.encode(), rev)  # type: ignore[attr-defined]
        except (KeyWrongLastSequenceError, APIError) as exc:
            if isinstance(exc, KeyWrongLastSequenceError) or getattr(exc, "err_code", None) in (10071, 10164):
                continue
            raise
        return new, new_rev, True
    raise UnavailableError(f"compare-and-set on {key} kept losing after {attempts} attempts")


# --- publishing events ---------------------------------------------------------------------------
async def publish_event(
    js: JetStreamContext,
    tenant: str,
    conv: str,
    type_: str,
    data: dict[str, Any],
    msg_id: str,
    timeout: float = 5.0,
) -> jsapi.PubAck:
    headers = {MSG_ID_HEADER: msg_id}
    telemetry.inject(headers)
    return await js.publish(
        subjects.conv_subject(tenant, conv), encode_event(type_, data), timeout=timeout, headers=headers
    )


async def flush_outbox(js: JetStreamContext, kv: KeyValue, rec: ConvRecord, revision: int) -> None:
    """Publish the events a conversation's last transition owes the chain, then clear the outbox.

    Publishing is idempotent (msg ids), and clearing is a compare-and-set: if someone changed the
    record meanwhile, their write already replaced the outbox, which we have honoured anyway.
    """
    if not rec.outbox:
        return
    for pending in rec.outbox:
        await publish_event(js, rec.tenant, rec.conv, pending.type, pending.data, pending.msg_id)
    rec.outbox = []
    try:
        await kv.update(subjects.kv_key(rec.tenant, rec.conv), rec.encode(), last=revision)
    except KeyWrongLastSequenceError:
        pass


# --- reading the chain ---------------------------------------------------------------------------
class StreamReader:
    """Reads one conversation's events from stream CONV with batched direct gets.

    No consumer is created: one wildcard inbox subscription serves every request of this process.
    """

    def __init__(self, nc: NATS, stream: str = subjects.CONV_STREAM) -> None:
        self._nc = nc
        self._stream = stream
        self._prefix = nc.new_inbox()
        self._sub: Any = None
        self._pending: dict[str, asyncio.Queue[Msg]] = {}
        self._counter = 0

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(f"{self._prefix}.*", cb=self._on_msg)

    async def stop(self) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_msg(self, msg: Msg) -> None:
        q = self._pending.get(msg.subject.rsplit(".", 1)[-1])
        if q is not None:
            q.put_nowait(msg)

    async def _request(self, body: dict[str, Any], timeout: float) -> list[Msg]:
        self._counter += 1
        token = str(self._counter)
        q: asyncio.Queue[Msg] = asyncio.Queue()
        self._pending[token] = q
        out: list[Msg] = []
        try:
            await self._nc.publish(
                f"$JS.API.DIRECT.GET.{self._stream}", orjson.dumps(body), reply=f"{self._prefix}.{token}"
            )
            async with asyncio.timeout(timeout):
                while True:
                    msg = await q.get()
                    status = (msg.headers or {}).get("Status")
                    if status:
                        if status in ("204", "404"):
                            return out
                        raise UnavailableError(f"direct get failed: {status} {msg.headers}")
                    out.append(msg)
                    if "batch" not in body:
                        return out
        except TimeoutError as exc:
            raise UnavailableError("stream read timed out") from exc
        finally:
            del self._pending[token]

    async def read(
        self, tenant: str, conv: str, after: int, limit: int = 1000, up_to: int | None = None, timeout: float = 5.0
    ) -> list[Event]:
        """Events of one conversation with ``seq > after`` (and ``<= up_to``), in order.

        ``prev`` of the first is ``after`` (the reader's resume point); the rest chain to each other.
        """
        subject = subjects.conv_subject(tenant, conv)
        body: dict[str, Any] = {"seq": after + 1, "next_by_subj": subject, "batch": limit}
        if up_to is not None:
            if up_to <= after:
                return []
            body["up_to_seq"] = up_to
        events: list[Event] = []
        prev = after
        for msg in await self._request(body, timeout):
            seq = int(msg.headers["Nats-Sequence"])  # type: ignore[index]
            if up_to is not None and seq > up_to:
                break
            try:
                ev = decode_event(tenant, conv, seq, prev, msg.data)
            except ValueError:
                log.error("undecodable event %s seq %d skipped", subject, seq)
                continue
            events.append(ev)
            prev = seq
        return events

    async def last_seq(self, tenant: str, conv: str, timeout: float = 5.0) -> int:
        msgs = await self._request({"last_by_subj": subjects.conv_subject(tenant, conv)}, timeout)
        return int(msgs[0].headers["Nats-Sequence"]) if msgs else 0  # type: ignore[index]


def live_event(msg: Msg) -> Event | None:
    """Decode an event delivered by CONV's RePublish (``live.conv.<tenant>.<conv>``)."""
    headers = msg.headers or {}
    try:
        seq = int(headers["Nats-Sequence"])
        prev = int(headers.get("Nats-Last-Sequence", "0") or 0)
        tenant, conv = subjects.split_conv_subject(msg.subject)
        return decode_event(tenant, conv, seq, prev, msg.data)
    except (KeyError, ValueError) as exc:
        log.error("bad live event on %s: %s", msg.subject, exc)
        return None
