"""The Parley Python SDK: one logical session over as many WebSocket connections as it takes.

* reconnects with jittered backoff across a list of gateway URLs and resumes every
  conversation from the last ``seq`` it got (``hello.resume``);
* keeps every ``send`` until its ``ack`` and sends it again, with the same id, after a reconnect
  or a retryable ``nack`` — the server de-duplicates, so the message is stored once;
* checks the ``prev`` chain of every event and records any gap or duplicate in ``violations``;
* exposes frames as callbacks (``on``), an async iterator (``events()``) or ``wait_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from parley.core.protocol import CLOSE_UNAUTHORIZED, SUBPROTOCOL_JSON, Codec

log = logging.getLogger("parley.client")

TokenSource = str | Callable[[], str | Awaitable[str]]
Frame = dict[str, Any]


class ParleyClientError(Exception):
    pass


class Nacked(ParleyClientError):
    def __init__(self, frame: Frame) -> None:
        super().__init__(f"nack {frame.get('code')}")
        self.frame = frame
        self.code = frame.get("code")


class RequestFailed(ParleyClientError):
    def __init__(self, frame: Frame) -> None:
        super().__init__(f"error {frame.get('code')}: {frame.get('msg', '')}")
        self.frame = frame
        self.code = frame.get("code")


@dataclass
class _PendingSend:
    frame: Frame
    future: asyncio.Future[Frame]
    sent_at: float = 0.0
    attempts: int = 0


@dataclass
class _PendingOpen:
    frame: Frame
    future: asyncio.Future[str]


@dataclass
class Violation:
    kind: str  # "gap" | "duplicate"
    conv: str
    seq: int
    prev: int
    expected_prev: int


@dataclass
class ClientStats:
    connects: int = 0
    reconnects: int = 0
    resent: int = 0
    last_close_code: int | None = None
    close_codes: list[int] = field(default_factory=list)


class ParleyClient:
    def __init__(
        self,
        urls: str | list[str],
        token: TokenSource,
        *,
        subprotocol: str = SUBPROTOCOL_JSON,
        client_name: str = "parley-py/0.1",
        backoff_min: float = 0.05,
        backoff_max: float = 3.0,
        keep_frames: bool = True,
        send_ping: bool = True,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 3.0,
        silence_heartbeats: float = 2.5,
    ) -> None:
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        self._token = token
        self.codec = Codec(subprotocol)
        self.client_name = client_name
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.keep_frames = keep_frames
        self.send_ping = send_ping
        # a gateway that does not answer: no WebSocket upgrade within handshake_timeout, no welcome
        # within connect_timeout, or no frame at all for silence_heartbeats x heartbeat_ms although we
        # ping (the server answers every ping). A frozen or partitioned gateway keeps accepting TCP
        # connections (the kernel does) and keeps open ones open; without these the session would
        # wait on it for as long as it is frozen instead of moving to another gateway (G6). The
        # upgrade is answered before any NATS work, so its bound is short; welcome waits on presence.
        self.connect_timeout = connect_timeout
        self.handshake_timeout = min(handshake_timeout, connect_timeout)
        self.silence_heartbeats = silence_heartbeats
        self._last_rx = 0.0
        self.positions: dict[str, int] = {}
        self.violations: list[Violation] = []
        self.frames: list[Frame] = []
        self.welcome: Frame | None = None
        self.presence: Frame | None = None
        self.stats = ClientStats()
        self.connected = asyncio.Event()
        self._pending: OrderedDict[str, _PendingSend] = OrderedDict()
        self._opens: dict[str, _PendingOpen] = {}
        self._callbacks: dict[str, list[Callable[[Frame], Any]]] = {}
        self._changed = asyncio.Condition()
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._session: aiohttp.ClientSession | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self._url_index = 0
        self._fatal: BaseException | None = None
        self._retry_task: asyncio.Task[None] | None = None

    # --- lifecycle -------------------------------------------------------------------------------
    async def connect(self, timeout: float = 10.0) -> Frame:
        """Start the session and wait for the first ``welcome``."""
        self._session = aiohttp.ClientSession()
        self._runner = asyncio.create_task(self._run())
        await self.wait_connected(timeout)
        assert self.welcome is not None
        return self.welcome

    async def wait_connected(self, timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            while not self.connected.is_set():
                if self._fatal:
                    raise self._fatal
                await asyncio.wait([asyncio.create_task(self.connected.wait())], timeout=0.1)

    async def close(self) -> None:
        self._closing = True
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._runner
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> ParleyClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def drop(self) -> None:
        """Cut the current connection abruptly (no close frame); the session reconnects by itself."""
        ws = self._ws
        if ws is not None:
            transport = ws._response.connection.transport if ws._response.connection else None  # noqa: SLF001
            if transport is not None:
                transport.abort()

    async def _token_value(self) -> str:
        if isinstance(self._token, str):
            return self._token
        value = self._token()
        return await value if inspect.isawaitable(value) else value

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            url = self.urls[self._url_index % len(self.urls)]
            self._url_index += 1
            try:
                await self._session_once(url)
                attempt = 0 if self.stats.last_close_code != CLOSE_UNAUTHORIZED else attempt + 1
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.debug("connect to %s failed: %s", url, exc)
                attempt += 1
            except asyncio.CancelledError:
                raise
            if self._closing:
                return
            if self.stats.last_close_code == CLOSE_UNAUTHORIZED and isinstance(self._token, str) and attempt >= 2:
                self._fatal = ParleyClientError("token refused (4001)")
                return
            delay = min(self.backoff_max, self.backoff_min * (2 ** min(attempt, 10)))
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))

    async def _session_once(self, url: str) -> None:
        assert self._session is not None
        token = await self._token_value()
        async with asyncio.timeout(self.handshake_timeout):
            ws = await self._session.ws_connect(url, protocols=(self.codec.subprotocol,), autoping=True,
                                                max_msg_size=0, timeout=aiohttp.ClientWSTimeout(ws_close=2))
        async with ws:
            self._ws = ws
            self._last_rx = time.monotonic()
            hello: Frame = {"t": "hello", "token": token, "client": self.client_name}
            if self.positions:
                hello["resume"] = dict(self.positions)
            await self._write(hello)
            pinger: asyncio.Task[None] | None = None
            no_welcome = asyncio.get_running_loop().call_later(self.connect_timeout, self._abort, ws)
            try:
                async for msg in ws:
                    self._last_rx = time.monotonic()
                    if msg.type not in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                        break
                    frame = self.codec.decode(msg.data)
                    if frame.get("t") == "welcome":
                        no_welcome.cancel()
                        self._on_welcome(frame)
                        if pinger is None and self.send_ping:
                            pinger = asyncio.create_task(self._ping_loop(ws, frame.get("heartbeat_ms", 5000)))
                        await self._resend_pending()
                    await self._dispatch(frame)
            finally:
                no_welcome.cancel()
                if pinger is not None:
                    pinger.cancel()
                self.connected.clear()
                self._ws = None
                code = ws.close_code
                self.stats.last_close_code = code
                if code is not None:
                    self.stats.close_codes.append(code)

    def _on_welcome(self, frame: Frame) -> None:
        self.welcome = frame
        self.stats.connects += 1
        if self.stats.connects > 1:
            self.stats.reconnects += 1
        self.connected.set()

    async def _ping_loop(self, ws: aiohttp.ClientWebSocketResponse, heartbeat_ms: int) -> None:
        silence_s = self.silence_heartbeats * heartbeat_ms / 1000
        while True:
            await asyncio.sleep(heartbeat_ms / 1000)
            if time.monotonic() - self._last_rx > silence_s:
                log.debug("no frame for %.1fs: dropping the connection", silence_s)
                self._abort(ws)
                return
            with contextlib.suppress(Exception):
                await self._write({"t": "ping"})

    @staticmethod
    def _abort(ws: aiohttp.ClientWebSocketResponse) -> None:
        """Cut a connection that stopped answering (no close handshake: the peer would not answer it)."""
        conn = ws._response.connection  # noqa: SLF001
        if conn is not None and conn.transport is not None:
            conn.transport.abort()

    async def _write(self, frame: Frame) -> None:
        ws = self._ws
        if ws is None or ws.closed:
            raise ConnectionError("not connected")
        data = self.codec.encode(frame)
        if self.codec.binary:
            await ws.send_bytes(data)
        else:
            await ws.send_str(data.decode())

    async def send_frame(self, frame: Frame) -> None:
        """Send a raw frame on the current connection (for frames without delivery tracking)."""
        await self._write(frame)

    async def _resend_pending(self) -> None:
        for pending_open in list(self._opens.values()):
            with contextlib.suppress(Exception):
                await self._write(pending_open.frame)
        for pending in list(self._pending.values()):
            pending.attempts += 1
            self.stats.resent += 1
            with contextlib.suppress(Exception):
                await self._write(pending.frame)

    # --- incoming --------------------------------------------------------------------------------
    async def _dispatch(self, frame: Frame) -> None:
        kind = str(frame.get("t"))
        if kind == "ev":
            if not self._check_chain(frame):
                return  # a duplicate: already delivered
        elif kind == "ack":
            pending = self._pending.pop(str(frame.get("id")), None)
            if pending is not None and not pending.future.done():
                pending.future.set_result(frame)
        elif kind == "nack":
            self._on_nack(frame)
        elif kind == "opened":
            pending_open = self._opens.pop(str(frame.get("id")), None)
            if pending_open is not None and not pending_open.future.done():
                pending_open.future.set_result(frame["conv"])
        elif kind == "error":
            self._on_error(frame)
        elif kind == "presence":
            self.presence = frame
        if self.keep_frames:
            self.frames.append(frame)
        for cb in self._callbacks.get(kind, []) + self._callbacks.get("*", []):
            result = cb(frame)
            if inspect.isawaitable(result):
                await result
        async with self._changed:
            self._changed.notify_all()

    def _check_chain(self, frame: Frame) -> bool:
        conv, seq, prev = frame["conv"], frame["seq"], frame["prev"]
        last = self.positions.get(conv, 0)
        if seq <= last:
            self.violations.append(Violation("duplicate", conv, seq, prev, last))
            return False
        if prev != last:
            self.violations.append(Violation("gap", conv, seq, prev, last))
        self.positions[conv] = seq
        return True

    def _on_nack(self, frame: Frame) -> None:
        pending = self._pending.get(str(frame.get("id")))
        if pending is None:
            return
        if frame.get("retry"):
            asyncio.get_running_loop().call_later(
                min(2.0, 0.1 * 2 ** min(pending.attempts, 5)) * random.uniform(0.5, 1.5),
                lambda: asyncio.ensure_future(self._retry(pending)),
            )
            return
        del self._pending[frame["id"]]
        if not pending.future.done():
            pending.future.set_exception(Nacked(frame))

    async def _retry(self, pending: _PendingSend) -> None:
        if pending.future.done() or pending.frame["id"] not in self._pending:
            return
        pending.attempts += 1
        with contextlib.suppress(Exception):
            await self._write(pending.frame)

    def _on_error(self, frame: Frame) -> None:
        ref = frame.get("ref")
        pending_open = self._opens.get(str(ref)) if ref is not None else None
        if pending_open is None:
            return
        if frame.get("code") in ("unavailable", "rate_limited", "internal"):
            async def again() -> None:
                await asyncio.sleep(0.2)
                with contextlib.suppress(Exception):
                    await self._write(pending_open.frame)

            asyncio.ensure_future(again())
            return
        del self._opens[str(ref)]
        if not pending_open.future.done():
            pending_open.future.set_exception(RequestFailed(frame))

    # --- frames for the application ---------------------------------------------------------------
    def on(self, kind: str, callback: Callable[[Frame], Any]) -> None:
        """Call ``callback(frame)`` for every frame of type ``kind`` (``"*"``: every frame)."""
        self._callbacks.setdefault(kind, []).append(callback)

    async def wait_for(self, predicate: Callable[[Frame], bool], timeout: float = 10.0, since: int = 0) -> Frame:
        """The first frame (from index ``since`` of ``frames``) that matches, waiting up to ``timeout``."""
        deadline = time.monotonic() + timeout
        index = since
        async with self._changed:
            while True:
                while index < len(self.frames):
                    frame = self.frames[index]
                    index += 1
                    if predicate(frame):
                        return frame
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no matching frame within {timeout}s")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), remaining)

    def events(self, conv: str | None = None) -> AsyncIterator[Frame]:
        """Async iterator over ``ev`` frames (optionally of one conversation), from now on."""
        queue: asyncio.Queue[Frame] = asyncio.Queue()

        def push(frame: Frame) -> None:
            if conv is None or frame["conv"] == conv:
                queue.put_nowait(frame)

        self.on("ev", push)

        async def iterate() -> AsyncIterator[Frame]:
            while True:
                yield await queue.get()

        return iterate()

    def conv_events(self, conv: str) -> list[Frame]:
        return [f for f in self.frames if f.get("t") == "ev" and f["conv"] == conv]

    # --- requests --------------------------------------------------------------------------------
    async def open(self, queue: str, topic: str | None = None, meta: dict[str, Any] | None = None,
                   request_id: str | None = None, timeout: float = 30.0) -> str:
        """Open a conversation (retried until ``opened``); returns its id."""
        frame: Frame = {"t": "open", "id": request_id or uuid.uuid4().hex, "queue": queue}
        if topic is not None:
            frame["topic"] = topic
        if meta is not None:
            frame["meta"] = meta
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._opens[frame["id"]] = _PendingOpen(frame, future)
        with contextlib.suppress(ConnectionError):
            await self._write(frame)
        return await asyncio.wait_for(future, timeout)

    async def send(self, conv: str, body: str, msg_id: str | None = None, timeout: float | None = 30.0) -> Frame:
        """Send a message; resolves with its ``ack`` once durable, retrying across reconnects."""
        future = self.send_nowait(conv, body, msg_id)
        return await asyncio.wait_for(future, timeout)

    def send_nowait(self, conv: str, body: str, msg_id: str | None = None) -> asyncio.Future[Frame]:
        frame: Frame = {"t": "send", "id": msg_id or uuid.uuid4().hex, "conv": conv, "body": body}
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        if frame["id"] in self._pending:
            return self._pending[frame["id"]].future
        pending = _PendingSend(frame, future, sent_at=time.perf_counter())
        self._pending[frame["id"]] = pending
        if self._ws is not None and self.connected.is_set():
            asyncio.ensure_future(self._write_quiet(frame))
        return future

    async def _write_quiet(self, frame: Frame) -> None:
        with contextlib.suppress(Exception):
            await self._write(frame)

    @property
    def unacked(self) -> int:
        return len(self._pending)

    async def read(self, conv: str, upto: int) -> None:
        await self._write({"t": "read", "conv": conv, "upto": upto})

    async def typing(self, conv: str) -> None:
        await self._write({"t": "typing", "conv": conv})

    async def close_conversation(self, conv: str) -> None:
        await self._write({"t": "close", "conv": conv})

    async def sub(self, conv: str, after: int | None = None) -> None:
        await self._write({"t": "sub", "conv": conv, "after": self.positions.get(conv, 0) if after is None else after})

    async def set_status(self, status: str) -> None:
        await self._write({"t": "status", "status": status})

    async def accept(self, conv: str) -> None:
        await self._write({"t": "accept", "conv": conv})

    async def decline(self, conv: str) -> None:
        await self._write({"t": "decline", "conv": conv})

    async def transfer(self, conv: str, queue: str) -> None:
        await self._write({"t": "transfer", "conv": conv, "queue": queue})
