"""One client WebSocket: hello, frames in, frames out, and gapless conversation feeds.

Frame validation and delivery ordering are the sans-I/O parts in ``parley.core.protocol`` and
``parley.core.feed``; this class wires them to the socket and the hub.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from aiohttp import WSMsgType, web
from nats.js.errors import KeyWrongLastSequenceError
from opentelemetry.trace import SpanKind, Status, StatusCode

from parley.core import bus, subjects, telemetry
from parley.core.auth import Identity, verify_token
from parley.core.errors import AuthError, ProtocolError, UnavailableError
from parley.core.events import Event, encode_event, message_msg_id, now_ms
from parley.core.feed import ConversationCursor
from parley.core.protocol import (
    CLOSE_RATE_LIMITED,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TIMEOUT,
    CLOSE_UNAUTHORIZED,
    Codec,
    check_body,
    error_frame,
    nack_frame,
    parse_frame,
)
from parley.core.ratelimit import TokenBucket
from parley.core.records import AgentRecord, ConvRecord

from . import metrics

if TYPE_CHECKING:
    from .app import GatewayService

log = logging.getLogger("parley.gateway.conn")

MAX_INFLIGHT_SENDS = 256  # per connection; beyond it we stop reading the socket (back-pressure)
ACK_TIMEOUT_S = 5.0
READ_PAGE = 1000
# After a conversation becomes visible, the stream is read once more this much later: see make_visible.
TAIL_RECHECK_S = 0.5
ROOM_WAIT_S = 10.0  # a replay waiting this long for the client to read: the client is too slow
_CLOSE = object()


def conversation_id(tenant: str, customer: str, request_id: str) -> str:
    """Derived from the open request, so a retried ``open`` names the same conversation."""
    digest = hashlib.sha256(f"{tenant}\x00{customer}\x00{request_id}".encode()).hexdigest()
    return "c" + digest[:23]


class Connection:
    def __init__(self, gateway: GatewayService, ws: web.WebSocketResponse, codec: Codec,
                 transport: asyncio.Transport | None = None) -> None:
        self.gw = gateway
        self.transport = transport
        self.hub = gateway.hub
        self.settings = gateway.settings
        self.ws = ws
        self.codec = codec
        self.session = uuid.uuid4().hex[:16]
        self.identity: Identity | None = None
        self.tenant = self.user = self.role = ""
        self.out: asyncio.Queue[Any] = asyncio.Queue(maxsize=self.settings.outbound_queue)
        # Replays wait for room (they may use half the queue); live frames never wait: a client
        # too slow for live traffic is disconnected instead.
        self._room = asyncio.Event()
        self.replay_page = max(1, min(READ_PAGE, self.settings.outbound_queue // 4))
        self.cursors: dict[str, ConversationCursor] = {}
        self.positions: dict[str, int] = {}  # last seq delivered, kept after a release
        self.filling: set[str] = set()
        self.last_seen = time.monotonic()
        self.bucket = TokenBucket(rate=self.settings.rate_limit, burst=2 * self.settings.rate_limit)
        self.inflight = asyncio.Semaphore(MAX_INFLIGHT_SENDS)
        self.closed = False
        self.close_code: int | None = None
        self.last_presence: tuple[str, int, str | None] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()

    # --- lifecycle -------------------------------------------------------------------------------
    async def run(self) -> None:
        writer = asyncio.create_task(self._writer())
        metrics.CONNECTIONS.inc()
        try:
            if await self._hello():
                self._spawn(self._watchdog())
                self._spawn(self._token_expiry())
                await self._read_loop()
        except Exception:
            # never a silent 1000 for a failure of ours: say so, with a code clients reconnect on
            log.exception("session %s failed", self.session)
            self.close_after_flush(1011, error_frame("internal", "session failed; reconnect"))
        finally:
            metrics.CONNECTIONS.dec()
            self.closed = True
            for t in list(self.tasks):
                t.cancel()
            if self.identity is not None:
                await self.hub.unregister(self)
            if not writer.done():
                self.out.put_nowait(_CLOSE) if not self.out.full() else writer.cancel()
                try:
                    await asyncio.wait_for(writer, 2)
                except (TimeoutError, asyncio.CancelledError):
                    writer.cancel()
            if not self.ws.closed:
                await self._close_or_abort(self.close_code or 1000)
            self.gw.connections.discard(self)  # last: a draining gateway waits for the close handshake

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def send(self, frame: dict[str, Any]) -> None:
        """Queue a frame; a client that lets the queue fill up is disconnected, to resume later."""
        if self.closed:
            return
        try:
            self.out.put_nowait(self.codec.encode(frame))
            metrics.FRAMES_OUT.labels(frame.get("t", "?")).inc()
        except asyncio.QueueFull:
            self._slow_consumer()

    def _slow_consumer(self) -> None:
        if self.closed:
            return
        log.warning("slow consumer %s/%s: closing %d", self.tenant, self.user, CLOSE_SLOW_CONSUMER)
        metrics.SLOW_CONSUMERS.inc()
        self.close_now(CLOSE_SLOW_CONSUMER)

    def close_after_flush(self, code: int, frame: dict[str, Any] | None = None) -> None:
        if frame is not None:
            self.send(frame)
        if self.closed:
            return
        self.close_code = code
        self.closed = True
        try:
            self.out.put_nowait(_CLOSE)
        except asyncio.QueueFull:
            self.close_now(code)

    def close_now(self, code: int) -> None:
        """Close without waiting for queued frames; a peer that does not read loses its socket."""
        self.closed = True
        self.close_code = code
        asyncio.get_running_loop().create_task(self._close_or_abort(code))

    async def _close_or_abort(self, code: int) -> None:
        try:
            await asyncio.wait_for(self.ws.close(code=code), 1.0)
        except (TimeoutError, ConnectionError, RuntimeError):
            if self.transport is not None:
                self.transport.abort()  # its buffers are full: the close frame cannot get through

    async def _writer(self) -> None:
        binary = self.codec.binary
        try:
            while True:
                data = await self.out.get()
                if self.out.qsize() <= self.out.maxsize // 4:
                    self._room.set()
                if data is _CLOSE:
                    await self.ws.close(code=self.close_code or 1000)
                    return
                if binary:
                    await self.ws.send_bytes(data)
                else:
                    await self.ws.send_frame(data, WSMsgType.TEXT)
        except (ConnectionResetError, RuntimeError):  # the peer went away mid-send
            self.closed = True

    # --- hello -----------------------------------------------------------------------------------
    async def _hello(self) -> bool:
        try:
            msg = await asyncio.wait_for(self.ws.receive(), self.gw.hello_timeout_s)
        except TimeoutError:
            self.close_after_flush(CLOSE_TIMEOUT, error_frame("unauthorized", "no hello within 10 s"))
            return False
        if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
            return False
        try:
            frame = parse_frame(self.codec, msg.data)
            if frame["t"] != "hello":
                raise AuthError("the first frame must be hello")
            identity = verify_token(frame["token"], self.settings.jwt_secret)
        except ProtocolError as exc:
            self.close_after_flush(CLOSE_UNAUTHORIZED, error_frame("unauthorized", f"the first frame must be a valid hello: {exc}"))
            return False
        except AuthError as exc:
            self.close_after_flush(CLOSE_UNAUTHORIZED, error_frame("unauthorized", str(exc)))
            return False
        self.identity = identity
        self.tenant, self.user, self.role = identity.tenant, identity.user, identity.role
        self.last_seen = time.monotonic()
        await self.hub.register(self)
        self.gw.connections.add(self)

        presence: AgentRecord | None = None
        if self.role == "agent":
            presence = await self.hub.presence_hello(self.tenant, self.user, list(identity.skills), identity.max_chats)
            self.hub.agent_active(self.tenant, self.user, list(identity.skills), identity.max_chats)
        records = self.hub.directory.open_convs_of(self.tenant, self.user, self.role)
        try:
            lasts = await asyncio.gather(*(self.hub.reader.last_seq(r.tenant, r.conv) for r in records))
        except UnavailableError:
            lasts = [0] * len(records)
        self.send({
            "t": "welcome",
            "session": self.session,
            "user": self.user,
            "role": self.role,
            "node": self.settings.node_id,
            "heartbeat_ms": self.settings.heartbeat_ms,
            "convs": [
                {"conv": r.conv, "state": r.client_state, "last_seq": last, "queue": r.queue, "agent": r.agent}
                for r, last in zip(records, lasts, strict=True)
            ],
            "status": self.gw.system_status(),
        })
        if self.role == "agent":
            self._push_presence(presence or AgentRecord(self.user, self.tenant), force=True)
            self._resend_offers()
        for notice in self.gw.notices(self.tenant):
            self.send(notice.frame())
        for notice_frame in self.gw.board.active_notices():  # not `frame`: that is the hello, read below
            self.send(notice_frame)
        resume = frame.get("resume") or {}
        for r in records:
            await self.make_visible(r.conv, resume.get(r.conv, 0))
        return True

    def _resend_offers(self) -> None:
        now = now_ms()
        for rec in self.hub.directory.tenant_convs(self.tenant):
            if rec.state == "offered" and rec.offer and rec.offer.agent == self.user and rec.offer.expires_at > now:
                self.send({"t": "offer", "conv": rec.conv, "queue": rec.queue, "expires_ms": rec.offer.expires_at - now})

    # --- reading ---------------------------------------------------------------------------------
    async def _read_loop(self) -> None:
        while not self.closed:
            msg = await self.ws.receive()
            if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return
            self.last_seen = time.monotonic()
            if self.role == "agent":
                self.hub.agent_active(self.tenant, self.user, list(self.identity.skills), self.identity.max_chats)  # type: ignore[union-attr]
            if msg.type == WSMsgType.PING:
                await self.ws.pong(msg.data)
                continue
            if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                continue
            await self._on_data(msg.data)

    async def _on_data(self, data: bytes | str) -> None:
        now = time.monotonic()
        try:
            frame = parse_frame(self.codec, data)
        except ProtocolError as exc:
            metrics.FRAMES_IN.labels("invalid").inc()
            self._refuse(exc, _peek_send_id(self.codec, data))
            return
        kind = frame["t"]
        metrics.FRAMES_IN.labels(kind).inc()
        if not self.bucket.allow(now):
            if self.bucket.sustained_overload(now):
                self.close_after_flush(CLOSE_RATE_LIMITED, error_frame("rate_limited", "over the frame rate for 10 s"))
                return
            limited = ProtocolError("rate_limited", "too many frames", frame.get("id") if isinstance(frame.get("id"), str) else None)
            self._refuse(limited, frame["id"] if kind == "send" else None)
            return
        handler = getattr(self, f"_on_{kind}")
        try:
            await handler(frame)
        except ProtocolError as exc:
            self._refuse(exc, frame["id"] if kind == "send" else None)
        except UnavailableError as exc:
            self._refuse(ProtocolError("unavailable", str(exc), frame.get("id")), frame["id"] if kind == "send" else None)
        except Exception as exc:
            log.exception("frame %s failed", kind)
            self._refuse(ProtocolError("internal", type(exc).__name__, frame.get("id")), frame["id"] if kind == "send" else None)

    def _refuse(self, exc: ProtocolError, send_id: Any = None) -> None:
        """A refused ``send`` always gets a ``nack``; anything else an ``error`` frame."""
        if send_id is not None:
            metrics.NACKS.labels(exc.code).inc()
            self.gw.count_nack(self.tenant, exc.code)
            self.send(nack_frame(send_id, exc.code, exc.retry))
        else:
            self.send(error_frame(exc.code, exc.msg, exc.ref))

    # --- frame handlers --------------------------------------------------------------------------
    async def _on_hello(self, frame: dict[str, Any]) -> None:
        raise ProtocolError("bad_frame", "already said hello")

    async def _on_ping(self, frame: dict[str, Any]) -> None:
        self.send({"t": "pong", "ts": now_ms()})

    async def _on_open(self, frame: dict[str, Any]) -> None:
        ref = frame["id"]
        if self.role != "customer":
            raise ProtocolError("forbidden", "only customers open conversations", ref)
        if not subjects.valid_id(frame["queue"]):
            raise ProtocolError("bad_frame", "queue must be 1-64 characters of [A-Za-z0-9_-]", ref)
        conv = conversation_id(self.tenant, self.user, ref)
        rec = await self.hub.directory.fetch_conv(self.tenant, conv)
        if rec is None:
            rec = await self._create_conversation(conv, frame)
        if rec.customer != self.user:  # a hash collision across customers: never expose it
            raise ProtocolError("internal", "conversation id conflict", ref)
        self.send({"t": "opened", "id": ref, "conv": conv})
        await self.make_visible(conv, self.positions.get(conv, 0))

    async def _create_conversation(self, conv: str, frame: dict[str, Any]) -> ConvRecord:
        now = now_ms()
        data: dict[str, Any] = {"queue": frame["queue"], "customer": {"id": self.user}}
        if frame.get("topic"):
            data["topic"] = frame["topic"]
        try:
            await bus.publish_event(self.hub.js, self.tenant, conv, "opened", data,
                                    msg_id=f"o:{self.tenant}:{self.user}:{frame['id']}")
        except bus.NOT_DURABLE_ERRORS as exc:
            raise UnavailableError("could not store the conversation; retry") from exc
        rec = ConvRecord(conv=conv, tenant=self.tenant, customer=self.user, queue=frame["queue"],
                         topic=frame.get("topic"), opened_at=now, queued_at=now, meta=frame.get("meta") or {})
        key = subjects.kv_key(self.tenant, conv)
        try:
            rev = await bus.kv_cas(self.hub.directory.convs.kv, key, rec.encode(), 0)
            self.hub.directory.convs.remember(key, rec, rev)
        except KeyWrongLastSequenceError:  # a retry raced us: the record exists
            existing = await self.hub.directory.convs.fetch(key)
            if existing is None:
                raise UnavailableError("conversation record vanished") from None
            return existing
        except bus.NOT_DURABLE_ERRORS as exc:
            raise UnavailableError("could not store the conversation; retry") from exc
        return rec

    async def _on_send(self, frame: dict[str, Any]) -> None:
        msg_id, conv = frame["id"], frame["conv"]
        body = check_body(frame.get("body"), self.settings.max_body)
        rec = await self._writable(conv)
        await self.inflight.acquire()
        started = time.perf_counter()
        headers = {"Nats-Msg-Id": message_msg_id(self.tenant, self.user, msg_id)}
        spans = self._send_spans(headers) if telemetry.enabled() else None
        payload = encode_event("message", {"id": msg_id, "from": {"id": self.user, "role": self.role}, "body": body})
        try:
            # no wait_stall: on Python 3.11 its timeout costs a task per call (half the throughput);
            # MAX_INFLIGHT_SENDS already bounds what one connection can have pending
            future = await self.hub.js.publish_async(subjects.conv_subject(rec.tenant, conv), payload, headers=headers)
        except Exception as exc:
            self.inflight.release()
            _end_spans(spans, error=exc)
            raise UnavailableError(f"not stored: {type(exc).__name__}") from exc
        self._track_ack(msg_id, conv, future, started, spans)

    def _send_spans(self, headers: dict[str, str]) -> tuple[Any, Any]:
        """The trace of one message starts here: receive (server) → publish (producer, in headers)."""
        receive = telemetry.start_span("receive send", SpanKind.SERVER, attributes={
            "parley.tenant": self.tenant, "parley.role": self.role, "parley.node": self.settings.node_id})
        publish = telemetry.start_span(f"publish {telemetry.CONV_TEMPLATE}", SpanKind.PRODUCER,
                                       parent=telemetry.child_context(receive),
                                       attributes=telemetry.messaging_attributes("publish", telemetry.CONV_TEMPLATE))
        telemetry.inject(headers, telemetry.child_context(publish))
        return receive, publish

    def _track_ack(self, msg_id: str, conv: str, future: asyncio.Future[Any], started: float,
                   spans: tuple[Any, Any] | None) -> None:
        """Answer ``ack`` on the PubAck, ``nack`` if none within ACK_TIMEOUT_S (a timer, not a task)."""
        timer = asyncio.get_running_loop().call_later(ACK_TIMEOUT_S, future.cancel)

        def done(f: asyncio.Future[Any]) -> None:
            timer.cancel()
            self.inflight.release()
            if f.cancelled() or f.exception() is not None:  # timeout, API error, connection lost
                metrics.NACKS.labels("unavailable").inc()
                self.gw.count_nack(self.tenant, "unavailable")
                log.warning("send %s not acknowledged by JetStream: %s", msg_id,
                            "timeout" if f.cancelled() else type(f.exception()).__name__)
                _end_spans(spans, error=f.exception() if not f.cancelled() else TimeoutError())
                self.send(nack_frame(msg_id, "unavailable", True))
                return
            seq = f.result().seq
            metrics.ACK_LATENCY.observe(time.perf_counter() - started)
            if spans is not None:
                spans[1].set_attribute("messaging.message.id", str(seq))
                _end_spans(spans)
            self.send({"t": "ack", "id": msg_id, "conv": conv, "seq": seq})

        future.add_done_callback(done)

    async def _writable(self, conv: str) -> ConvRecord:
        rec = await self.hub.directory.fetch_conv(self.tenant, conv)
        if rec is None or not rec.may_see(self.user, self.role, self.tenant):
            raise ProtocolError("not_found", "no such conversation")
        if self.role == "supervisor" or rec.state == "closed":
            raise ProtocolError("forbidden", "conversation closed" if rec.state == "closed" else "read only")
        if self.role == "agent" and not (rec.state == "assigned" and rec.agent == self.user):
            raise ProtocolError("forbidden", "not assigned to you")
        return rec

    async def _on_read(self, frame: dict[str, Any]) -> None:
        conv, upto = frame["conv"], frame["upto"]
        rec = await self.hub.directory.fetch_conv(self.tenant, conv)
        if rec is None or not rec.may_see(self.user, self.role, self.tenant) or self.role == "supervisor":
            raise ProtocolError("not_found", "no such conversation")
        try:
            await bus.publish_event(self.hub.js, self.tenant, conv, "read", {"by": {"id": self.user}, "upto": upto},
                                    msg_id=f"r:{self.tenant}:{conv}:{self.user}:{upto}")
        except bus.NOT_DURABLE_ERRORS as exc:
            raise UnavailableError("read receipt not stored") from exc

    async def _on_typing(self, frame: dict[str, Any]) -> None:
        conv = frame["conv"]
        if conv not in self.cursors or self.role == "supervisor":
            raise ProtocolError("not_found", "no such conversation")
        out = {"t": "typing", "conv": conv, "from": {"id": self.user}}
        await self.hub.nc.publish(subjects.typing_subject(self.tenant, conv), self.gw.json(out))

    async def _on_close(self, frame: dict[str, Any]) -> None:
        conv = frame["conv"]
        rec = await self._writable(conv)
        await self._route("close", rec)

    async def _on_sub(self, frame: dict[str, Any]) -> None:
        conv = frame["conv"]
        rec = await self.hub.directory.fetch_conv(self.tenant, conv)
        if rec is None or not rec.may_see(self.user, self.role, self.tenant):
            raise ProtocolError("not_found", "no such conversation", conv)
        await self.make_visible(conv, frame.get("after", self.positions.get(conv, 0)))

    async def _on_status(self, frame: dict[str, Any]) -> None:
        if self.role != "agent":
            raise ProtocolError("forbidden", "only agents have a status")
        if frame["status"] not in ("online", "away"):
            raise ProtocolError("bad_frame", "status must be online or away")
        try:
            reply = await self.hub.presence_set(self.tenant, self.user, frame["status"])
        except Exception as exc:
            raise UnavailableError("presence service unavailable") from exc
        if "error" in reply:
            raise ProtocolError("bad_frame", str(reply["error"]))
        self._push_presence(AgentRecord.decode(self.gw.json(reply)), force=True)

    async def _on_accept(self, frame: dict[str, Any]) -> None:
        await self._offer_reply("accept", frame["conv"])

    async def _on_decline(self, frame: dict[str, Any]) -> None:
        await self._offer_reply("decline", frame["conv"])

    async def _offer_reply(self, op: str, conv: str) -> None:
        if self.role != "agent":
            raise ProtocolError("forbidden", "only agents answer offers")
        rec = await self.hub.directory.fetch_conv(self.tenant, conv)
        if rec is None or rec.offer is None or rec.offer.agent != self.user:
            raise ProtocolError("not_found", "no such offer", conv)
        await self._route(op, rec, nonce=str(rec.offer.expires_at))

    async def _on_transfer(self, frame: dict[str, Any]) -> None:
        if self.role != "agent":
            raise ProtocolError("forbidden", "only agents transfer")
        if not subjects.valid_id(frame["queue"]):
            raise ProtocolError("bad_frame", "queue must be 1-64 characters of [A-Za-z0-9_-]")
        rec = await self._writable(frame["conv"])
        await self._route("transfer", rec, queue=frame["queue"])

    async def _route(self, op: str, rec: ConvRecord, nonce: str = "", **extra: Any) -> None:
        msg_id = f"rt:{rec.tenant}:{rec.conv}:{op}:{self.user}:{nonce or uuid.uuid4().hex}"
        try:
            await self.hub.route(op, rec.tenant, rec.conv, {"id": self.user, "role": self.role}, msg_id, **extra)
        except bus.NOT_DURABLE_ERRORS as exc:
            raise UnavailableError(f"{op} not stored; retry") from exc

    # --- conversation feeds ----------------------------------------------------------------------
    async def make_visible(self, conv: str, after: int) -> None:
        """Replay after ``after``, then live (SPEC §4); nothing new if already visible."""
        if conv in self.cursors or self.closed:
            return
        cursor = self.cursors[conv] = ConversationCursor(conv, last=after)
        await self.hub.watch(self, self.tenant, conv)  # subscribe first: live events buffer meanwhile
        self._start_fill(cursor, None)
        # In a cluster the live subscription reaches the stream leader's node (which republishes) a
        # moment after this gateway's node has it: an event stored in that moment is neither in the
        # replay nor on the live feed, and would only be noticed as a gap with the conversation's
        # next event (seen by the chaos suite: an agent never got `assigned` of a quiet conversation).
        self._spawn(self._recheck_tail(cursor))

    async def _recheck_tail(self, cursor: ConversationCursor) -> None:
        await asyncio.sleep(TAIL_RECHECK_S)
        if self._is_current(cursor) and not cursor.filling and cursor.conv not in self.filling:
            cursor.filling = True  # live events buffer while the stream is read after cursor.last
            self._start_fill(cursor, None)

    def _start_fill(self, cursor: ConversationCursor, up_to: int | None) -> None:
        if cursor.conv not in self.filling:
            self.filling.add(cursor.conv)
            self._spawn(self._fill(cursor, up_to))

    async def _wait_for_room(self, frames: int) -> None:
        """Hold a replay until the client has read enough; a client that reads nothing for
        ROOM_WAIT_S is treated as too slow (and resumes elsewhere)."""
        while not self.closed and self.out.qsize() + frames > self.out.maxsize // 2:
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), ROOM_WAIT_S)
            except TimeoutError:
                self._slow_consumer()
                return

    def _is_current(self, cursor: ConversationCursor) -> bool:
        """False once the conversation was released (or replaced) on this connection."""
        return self.cursors.get(cursor.conv) is cursor

    async def _fill(self, cursor: ConversationCursor, up_to: int | None) -> None:
        delay = 0.1
        try:
            while self._is_current(cursor):
                try:
                    await self._wait_for_room(self.replay_page)
                    events = await self.hub.reader.read(self.tenant, cursor.conv, cursor.last, self.replay_page, up_to)
                except UnavailableError as exc:
                    log.warning("replay of %s paused: %s", cursor.conv, exc)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 2.0)
                    continue
                for ev in events:
                    out = cursor.accept(ev)
                    if out is not None and not self._deliver(out):
                        return
                if len(events) == self.replay_page:
                    continue
                ready, gap = cursor.finish_fill()
                for ev in ready:
                    if not self._deliver(ev):
                        return
                if gap is None:
                    return
                up_to = gap.up_to
        finally:
            self.filling.discard(cursor.conv)

    def on_live(self, ev: Event) -> None:
        cursor = self.cursors.get(ev.conv)
        if cursor is None:
            return
        ready, gap = cursor.on_live(ev)
        if len(cursor.buffered) > self.out.maxsize:
            # live events pile up behind a replay that waits for this client to read: it is too
            # slow for the live traffic, and its memory must stay bounded too
            self._slow_consumer()
            return
        for out in ready:
            if not self._deliver(out):
                return
        if gap is not None:
            self._start_fill(cursor, gap.up_to)

    def _deliver(self, ev: Event) -> bool:
        """Send one event; False when it released this connection from the conversation."""
        self.send(ev.frame())
        self.positions[ev.conv] = ev.seq
        if self.role == "agent" and _releases(ev, self.user):
            self.cursors.pop(ev.conv, None)
            self._spawn(self.hub.unwatch(self, self.tenant, ev.conv))
            return False
        return True

    # --- pushes from the hub ---------------------------------------------------------------------
    def on_frame(self, frame: dict[str, Any]) -> None:
        self.send(frame)

    def on_typing(self, frame: dict[str, Any]) -> None:
        if frame.get("from", {}).get("id") != self.user and frame.get("conv") in self.cursors:
            self.send(frame)

    def on_conv_record(self, rec: ConvRecord) -> None:
        if self.role == "agent" and rec.agent == self.user and rec.state == "assigned" and rec.conv not in self.cursors:
            self._spawn(self.make_visible(rec.conv, self.positions.get(rec.conv, 0)))

    def on_agent_record(self, rec: AgentRecord) -> None:
        self._push_presence(rec)

    def _push_presence(self, rec: AgentRecord, force: bool = False) -> None:
        """Push the server's status; never before ``welcome``, never an older one after a newer."""
        if self.last_presence is None and not force:
            return
        state = (rec.status, rec.since, rec.reason)
        if state == self.last_presence:
            return
        if not force and self.last_presence is not None and rec.since < self.last_presence[1]:
            return  # the watch caught up with a state the hello reply had already superseded
        self.last_presence = state
        self.send(rec.presence_frame())

    # --- timers ----------------------------------------------------------------------------------
    async def _watchdog(self) -> None:
        timeout = self.settings.heartbeat_timeout_s
        while not self.closed:
            await asyncio.sleep(min(1.0, timeout / 3))
            if time.monotonic() - self.last_seen > timeout:
                self.close_after_flush(CLOSE_TIMEOUT)
                return

    async def _token_expiry(self) -> None:
        assert self.identity is not None
        await asyncio.sleep(max(0.0, self.identity.exp - time.time()))
        self.close_after_flush(CLOSE_UNAUTHORIZED, error_frame("unauthorized", "token expired"))


def _end_spans(spans: tuple[Any, Any] | None, error: BaseException | None = None) -> None:
    if spans is None:
        return
    for span in reversed(spans):
        if error is not None:
            span.set_status(Status(StatusCode.ERROR, type(error).__name__))
        span.end()


def _releases(ev: Event, agent: str) -> bool:
    """Does this event end the agent's part in the conversation? (it is the last they get)"""
    if ev.type in ("closed", "transferred"):
        return True
    if ev.type in ("unassigned", "escalated"):
        return (ev.data.get("agent") or {}).get("id", agent) == agent
    return False


def _peek_send_id(codec: Codec, data: bytes | str) -> Any:
    """The ``id`` of a malformed frame that is a ``send``, so it still gets a ``nack``."""
    try:
        frame = codec.decode(data)
    except Exception:
        return None
    if isinstance(frame, dict) and frame.get("t") == "send" and "id" in frame:
        return frame["id"]
    return None
