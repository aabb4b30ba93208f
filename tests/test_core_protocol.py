"""Protocol v1 codecs and frame validation, without sockets."""

import msgpack
import orjson
import pytest

from parley.core.errors import ProtocolError
from parley.core.protocol import SUBPROTOCOL_MSGPACK, Codec, check_body, parse_frame

JSON = Codec()
MSGPACK = Codec(SUBPROTOCOL_MSGPACK)


def refused(data, codec=JSON):
    with pytest.raises(ProtocolError) as info:
        parse_frame(codec, data)
    return info.value


def test_valid_frames_round_trip_in_both_codecs():
    frame = {"t": "send", "id": "m1", "conv": "c1", "body": "hi", "extra": 1}
    assert parse_frame(JSON, orjson.dumps(frame)) == frame
    assert parse_frame(MSGPACK, msgpack.packb(frame)) == frame
    assert MSGPACK.decode(MSGPACK.encode(frame)) == frame


@pytest.mark.parametrize("data", [b"not json", b"[1,2]", b'"x"', b"{}", b'{"t": 5}'])
def test_malformed_frames_are_bad_frame(data):
    assert refused(data).code == "bad_frame"


def test_unknown_type_keeps_the_id_as_ref():
    err = refused(b'{"t":"dance","id":"r7"}')
    assert err.code == "bad_frame" and err.ref == "r7"


@pytest.mark.parametrize("frame", [
    {"t": "open", "id": "o1"},                       # queue missing
    {"t": "open", "id": 5, "queue": "q"},            # id not a string
    {"t": "read", "conv": "c", "upto": "3"},         # upto not an int
    {"t": "read", "conv": "c", "upto": True},        # a bool is not a position
    {"t": "sub", "conv": "c", "after": -1},
    {"t": "hello", "token": "x", "resume": {"c": -2}},
    {"t": "send", "id": "", "conv": "c", "body": "x"},
])
def test_wrong_field_types_are_refused(frame):
    assert refused(orjson.dumps(frame)).code == "bad_frame"


def test_text_frame_on_msgpack_is_refused():
    assert refused("{}", MSGPACK).code == "bad_frame"


def test_body_limits():
    assert check_body("x" * 10, 10) == "x" * 10
    with pytest.raises(ProtocolError) as too_long:
        check_body("x" * 11, 10)
    assert too_long.value.code == "too_large" and not too_long.value.retry
    for bad in ("", None, 5, ["x"]):
        with pytest.raises(ProtocolError) as info:
            check_body(bad, 10)
        assert info.value.code == "bad_frame"
