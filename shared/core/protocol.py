"""WebSocket protocol v1 without I/O: codecs, frame validation, close codes.

``parse_frame`` turns raw bytes into a validated dict or raises ``ProtocolError`` with the wire
code and the frame's ``id`` as ``ref``; the gateway and the SDK only move bytes around it.
"""

from __future__ import annotations

from typing import Any

import msgpack
import orjson

from .errors import ProtocolError

SUBPROTOCOL_JSON = "parley.v1.json"
SUBPROTOCOL_MSGPACK = "parley.v1.msgpack"
SUBPROTOCOLS = (SUBPROTOCOL_JSON, SUBPROTOCOL_MSGPACK)

MAX_FRAME_BYTES = 64 * 1024
HELLO_TIMEOUT_S = 10.0

CLOSE_UNAUTHORIZED = 4001
CLOSE_TIMEOUT = 4008  # heartbeat or hello timeout
CLOSE_RATE_LIMITED = 4029
CLOSE_TOO_LARGE = 1009
CLOSE_RESTART = 1012  # graceful shutdown: reconnect to any gateway
CLOSE_SLOW_CONSUMER = 1013  # "try again later": the client could not keep up; reconnect and resume

# Close codes after which a client should not reconnect with the same token.
FATAL_CLOSE_CODES = (CLOSE_UNAUTHORIZED,)

_STR = (str,)
_INT = (int,)
_DICT = (dict,)

# Client frame type → {field: (accepted types, required)}. Unknown fields are ignored.
CLIENT_FRAMES: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "hello": {"token": (_STR, True), "resume": (_DICT, False), "client": (_STR, False)},
    "ping": {},
    "open": {"id": (_STR, True), "queue": (_STR, True), "topic": (_STR, False), "meta": (_DICT, False)},
    "send": {"id": (_STR, True), "conv": (_STR, True), "body": ((str, type(None)), False)},
    "read": {"conv": (_STR, True), "upto": (_INT, True)},
    "typing": {"conv": (_STR, True)},
    "close": {"conv": (_STR, True)},
    "sub": {"conv": (_STR, True), "after": (_INT, False)},
    "status": {"status": (_STR, True)},
    "accept": {"conv": (_STR, True)},
    "decline": {"conv": (_STR, True)},
    "transfer": {"conv": (_STR, True), "queue": (_STR, True)},
}


class Codec:
    """Encodes frames for one subprotocol; ``binary`` says which WebSocket frame type carries them."""

    def __init__(self, subprotocol: str = SUBPROTOCOL_JSON) -> None:
        if subprotocol not in SUBPROTOCOLS:
            raise ValueError(subprotocol)
        self.subprotocol = subprotocol
        self.binary = subprotocol == SUBPROTOCOL_MSGPACK

    def encode(self, frame: dict[str, Any]) -> bytes:
        if self.binary:
            return msgpack.packb(frame, use_bin_type=True)
        return orjson.dumps(frame)

    def decode(self, data: bytes | str) -> Any:
        if self.binary:
            if isinstance(data, str):
                raise ValueError("text frame on the msgpack subprotocol")
            return msgpack.unpackb(data, raw=False, strict_map_key=False)
        return orjson.loads(data)


def parse_frame(codec: Codec, data: bytes | str) -> dict[str, Any]:
    """Decode and validate one client frame."""
    try:
        frame = codec.decode(data)
    except Exception as exc:  # orjson/msgpack raise several types; all mean "not a frame"
        raise ProtocolError("bad_frame", f"undecodable frame: {exc.__class__.__name__}") from exc
    if not isinstance(frame, dict):
        raise ProtocolError("bad_frame", "a frame is an object")
    ref = frame.get("id") if isinstance(frame.get("id"), str) else None
    kind = frame.get("t")
    if not isinstance(kind, str):
        raise ProtocolError("bad_frame", "missing string field 't'", ref)
    schema = CLIENT_FRAMES.get(kind)
    if schema is None:
        raise ProtocolError("bad_frame", f"unknown frame type {kind!r}", ref)
    for name, (types, required) in schema.items():
        if name not in frame:
            if required:
                raise ProtocolError("bad_frame", f"{kind}: field {name!r} is required", ref)
            continue
        value = frame[name]
        # bool is an int in Python, but never a valid seq or position on the wire
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ProtocolError("bad_frame", f"{kind}: field {name!r} has the wrong type", ref)
    if kind in ("open", "send") and not frame["id"]:
        raise ProtocolError("bad_frame", f"{kind}: 'id' must not be empty", ref)
    if kind in ("read", "sub") and (frame.get("upto", frame.get("after")) or 0) < 0:
        raise ProtocolError("bad_frame", f"{kind}: positions are >= 0", ref)
    if kind == "hello" and "resume" in frame:
        for conv, seq in frame["resume"].items():
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise ProtocolError("bad_frame", f"hello: resume[{conv!r}] must be a non-negative integer")
    return frame


def check_body(body: object, max_body: int) -> str:
    """A ``send`` body: 1..max_body characters of text."""
    if not isinstance(body, str) or not body:
        raise ProtocolError("bad_frame", "body must be a non-empty string")
    if len(body) > max_body:
        raise ProtocolError("too_large", f"body is longer than {max_body} characters")
    return body


def error_frame(code: str, msg: str = "", ref: str | None = None) -> dict[str, Any]:
    frame: dict[str, Any] = {"t": "error", "code": code}
    if msg:
        frame["msg"] = msg
    if ref is not None:
        frame["ref"] = ref
    return frame


def nack_frame(msg_id: Any, code: str, retry: bool) -> dict[str, Any]:
    return {"t": "nack", "id": msg_id, "code": code, "retry": retry}
