"""Small helpers shared by the tests: tokens, bounded waiting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from parley.core.auth import issue_token

SECRET = "test-secret-0123456789abcdefghijklmnopqrstuvwxyz"
ADMIN = "test-admin"


def token(user: str, tenant: str, role: str = "customer", secret: str = SECRET, ttl_s: int = 3600, **claims: Any) -> str:
    return issue_token({"sub": user, "tenant": tenant, "role": role, **claims}, secret, ttl_s)


async def eventually(check: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, interval: float = 0.02,
                     what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy, at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s (last: {last!r})")


class RawSocket:
    """A bare WebSocket for exact protocol checks (the SDK hides retries and pings)."""

    def __init__(self, url: str, protocol: str = "parley.v1.json") -> None:
        self.url = url
        self.protocol = protocol
        self.session: Any = None
        self.ws: Any = None

    async def __aenter__(self) -> RawSocket:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.url, protocols=(self.protocol,), autoping=False, max_msg_size=0)
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.ws.close()
        await self.session.close()

    async def send(self, frame: Any) -> None:
        import msgpack
        import orjson

        if isinstance(frame, bytes | str):
            await (self.ws.send_bytes(frame) if isinstance(frame, bytes) else self.ws.send_str(frame))
        elif self.protocol.endswith("msgpack"):
            await self.ws.send_bytes(msgpack.packb(frame))
        else:
            await self.ws.send_str(orjson.dumps(frame).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next protocol frame (pongs of WebSocket pings skipped); raises if the socket closed."""
        import aiohttp
        import msgpack
        import orjson

        while True:
            msg = await asyncio.wait_for(self.ws.receive(), timeout)
            if msg.type == aiohttp.WSMsgType.TEXT:
                return orjson.loads(msg.data)
            if msg.type == aiohttp.WSMsgType.BINARY:
                return msgpack.unpackb(msg.data)
            if msg.type in (aiohttp.WSMsgType.PONG, aiohttp.WSMsgType.PING):
                continue
            raise ConnectionError(f"socket closed: {msg.type} code={self.ws.close_code}")

    async def recv_until(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            frame = await self.recv(max(0.01, deadline - time.monotonic()))
            if predicate(frame):
                return frame

    async def closed_with(self, timeout: float = 5.0) -> int | None:
        """Read until the server closes; the close code."""
        import aiohttp

        deadline = time.monotonic() + timeout
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), max(0.01, deadline - time.monotonic()))
            if msg.type == aiohttp.WSMsgType.CLOSE:
                return msg.data  # the code the server sent (close_code may already say 1006)
            if msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING):
                return self.ws.close_code

    async def hello(self, tok: str, **extra: Any) -> dict[str, Any]:
        await self.send({"t": "hello", "token": tok, **extra})
        return await self.recv_until(lambda f: f["t"] == "welcome")


class StalledSocket:
    """A WebSocket client that stops reading after its first frames, on a socket with a tiny
    receive buffer: what a frozen or overwhelmed client looks like to the gateway."""

    def __init__(self, host: str, port: int) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: small window
        self.sock.settimeout(10)
        self.sock.connect((host, port))
        self.buf = b""

    def handshake(self) -> None:
        import base64
        import os as _os

        key = base64.b64encode(_os.urandom(16)).decode()
        self.sock.sendall((f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                           f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        while b"\r\n\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        assert b" 101 " in head.split(b"\r\n")[0], head

    def send(self, frame: dict[str, Any]) -> None:
        import os as _os

        import orjson

        payload = orjson.dumps(frame)
        mask = _os.urandom(4)
        header = bytes([0x81])
        n = len(payload)
        header += bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + n.to_bytes(2, "big")
        self.sock.sendall(header + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def recv(self) -> dict[str, Any]:
        import orjson

        def need(k: int) -> None:
            while len(self.buf) < k:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError("closed")
                self.buf += chunk

        need(2)
        n = self.buf[1] & 0x7F
        offset = 2
        if n == 126:
            need(4)
            n, offset = int.from_bytes(self.buf[2:4], "big"), 4
        elif n == 127:
            need(10)
            n, offset = int.from_bytes(self.buf[2:10], "big"), 10
        need(offset + n)
        opcode, payload = self.buf[0] & 0x0F, self.buf[offset:offset + n]
        self.buf = self.buf[offset + n:]
        if opcode == 0x8:
            raise ConnectionError(f"close frame {int.from_bytes(payload[:2], 'big') if payload else None}")
        return orjson.loads(payload)

    def recv_until(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        while True:
            frame = self.recv()
            if predicate(frame):
                return frame

    def close(self) -> None:
        self.sock.close()
