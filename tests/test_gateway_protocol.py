"""Protocol v1 over real sockets against an in-process gateway and a real nats-server.

These cover what needs no router: session rules, bad input, limits, G2, subprotocols.
"""

import asyncio

import aiohttp
import msgpack
import orjson
import pytest
from helpers import RawSocket, token

from parley.client import ParleyClient


async def test_bad_token_gets_unauthorized_and_4001(gateway, tenant):
    async with RawSocket(gateway.ws_url) as s:
        await s.send({"t": "hello", "token": "nope"})
        assert (await s.recv())["code"] == "unauthorized"
        assert await s.closed_with() == 4001


@pytest.mark.parametrize("first", [{"t": "ping"}, {"t": "send", "id": "m", "conv": "c", "body": "x"}, "garbage"])
async def test_any_frame_before_hello_is_unauthorized(gateway, first):
    async with RawSocket(gateway.ws_url) as s:
        await s.send(first)
        assert (await s.recv())["code"] == "unauthorized"
        assert await s.closed_with() == 4001


async def test_no_hello_in_time_closes_4008(gateway):
    gateway.hello_timeout_s = 0.3
    async with RawSocket(gateway.ws_url) as s:
        assert await s.closed_with() == 4008


async def test_expired_token_refused_and_other_tenant_secret_refused(gateway, tenant):
    async with RawSocket(gateway.ws_url) as s:
        await s.send({"t": "hello", "token": token("u", tenant, ttl_s=-120)})
        assert (await s.recv())["code"] == "unauthorized"
    async with RawSocket(gateway.ws_url) as s:
        await s.send({"t": "hello", "token": token("u", tenant, secret="x" * 40)})
        assert (await s.recv())["code"] == "unauthorized"


async def test_welcome_shape_and_ping_pong(gateway, tenant):
    async with RawSocket(gateway.ws_url) as s:
        w = await s.hello(token("u1", tenant))
        # only a gateway runs here: honest status says routing and transcripts are down
        assert {k: w[k] for k in ("user", "role", "convs", "status")} == {
            "user": "u1", "role": "customer", "convs": [], "status": "degraded"}
        assert w["heartbeat_ms"] == 5000 and w["session"] and w["node"] == "test-node"
        await s.send({"t": "ping"})
        pong = await s.recv()
        assert pong["t"] == "pong" and isinstance(pong["ts"], int)


async def test_malformed_frames_get_errors_and_the_connection_stays(gateway, tenant):
    async with RawSocket(gateway.ws_url) as s:
        await s.hello(token("u1", tenant))
        await s.send("{not json")
        assert (await s.recv())["code"] == "bad_frame"
        await s.send({"t": "teleport", "id": "r1"})
        err = await s.recv()
        assert (err["t"], err["code"], err["ref"]) == ("error", "bad_frame", "r1")
        await s.send({"t": "open", "id": "o1", "queue": 7})
        err = await s.recv()
        assert (err["code"], err["ref"]) == ("bad_frame", "o1")
        await s.send({"t": "send", "id": "m1", "conv": 5, "body": "x"})  # a send always gets a nack
        nack = await s.recv()
        assert nack == {"t": "nack", "id": "m1", "code": "bad_frame", "retry": False}
        await s.send({"t": "ping"})
        assert (await s.recv())["t"] == "pong"


async def test_send_body_rules(gateway, tenant):
    async with RawSocket(gateway.ws_url) as s:
        await s.hello(token("u1", tenant))
        await s.send({"t": "open", "id": "o1", "queue": "support"})
        conv = (await s.recv_until(lambda f: f["t"] == "opened"))["conv"]
        for i, body in enumerate(["", None, 42]):
            await s.send({"t": "send", "id": f"b{i}", "conv": conv, "body": body})
            nack = await s.recv_until(lambda f: f["t"] == "nack")
            assert (nack["id"], nack["code"], nack["retry"]) == (f"b{i}", "bad_frame", False)
        await s.send({"t": "send", "id": "long", "conv": conv, "body": "x" * 4097})
        nack = await s.recv_until(lambda f: f["t"] == "nack")
        assert (nack["id"], nack["code"], nack["retry"]) == ("long", "too_large", False)
        await s.send({"t": "send", "id": "max", "conv": conv, "body": "é" * 4096})
        ack = await s.recv_until(lambda f: f["t"] == "ack")
        assert ack["id"] == "max"
        await s.send({"t": "send", "id": "x1", "conv": "cnothere", "body": "hi"})
        nack = await s.recv_until(lambda f: f["t"] == "nack")
        assert (nack["code"], nack["retry"]) == ("not_found", False)


async def test_frame_over_64k_closes_1009(gateway, tenant):
    async with RawSocket(gateway.ws_url) as s:
        await s.hello(token("u1", tenant))
        await s.send(orjson.dumps({"t": "ping", "pad": "x" * 70000}).decode())
        assert await s.closed_with() == 1009


async def test_same_id_twice_gives_same_seq_and_one_event(gateway, tenant):
    """G2: a retried send (also from a new connection) is stored once."""
    c = ParleyClient(gateway.ws_url, token("u1", tenant))
    await c.connect()
    conv = await c.open("support")
    first = await c.send(conv, "once", msg_id="dup-1")
    await c.close()
    async with RawSocket(gateway.ws_url) as s:
        await s.hello(token("u1", tenant), resume={conv: first["seq"]})
        await s.send({"t": "send", "id": "dup-1", "conv": conv, "body": "once"})
        again = await s.recv_until(lambda f: f["t"] == "ack")
        assert again["seq"] == first["seq"]
        await s.send({"t": "send", "id": "next", "conv": conv, "body": "two"})
        nxt = await s.recv_until(lambda f: f["t"] == "ev" and f["type"] == "message")
        assert nxt["data"]["id"] == "next"  # no second event for dup-1 before it
    page = await _events(gateway, tenant, conv)
    assert [e["data"]["id"] for e in page if e["type"] == "message"] == ["dup-1", "next"]


async def test_open_is_idempotent_by_request_id(gateway, tenant):
    async with RawSocket(gateway.ws_url) as s:
        await s.hello(token("u1", tenant))
        await s.send({"t": "open", "id": "same", "queue": "support"})
        a = (await s.recv_until(lambda f: f["t"] == "opened"))["conv"]
        await s.send({"t": "open", "id": "same", "queue": "support"})
        b = (await s.recv_until(lambda f: f["t"] == "opened"))["conv"]
    assert a == b
    assert [e["type"] for e in await _events(gateway, tenant, a)] == ["opened"]


async def test_msgpack_subprotocol(gateway, tenant):
    async with RawSocket(gateway.ws_url, protocol="parley.v1.msgpack") as s:
        assert s.ws.protocol == "parley.v1.msgpack"
        w = await s.hello(token("u1", tenant))
        assert w["role"] == "customer"
        await s.send({"t": "open", "id": "o", "queue": "support"})
        conv = (await s.recv_until(lambda f: f["t"] == "opened"))["conv"]
        await s.send({"t": "send", "id": "m", "conv": conv, "body": "binary"})
        ev = await s.recv_until(lambda f: f["t"] == "ev" and f["type"] == "message")
        assert ev["data"]["body"] == "binary"
        await s.send(b"\xc1")  # never valid msgpack
        assert (await s.recv_until(lambda f: f["t"] == "error"))["code"] == "bad_frame"


async def test_default_subprotocol_is_json_without_offer(gateway, tenant):
    async with aiohttp.ClientSession() as session, session.ws_connect(gateway.ws_url) as ws:
        await ws.send_str(orjson.dumps({"t": "hello", "token": token("u1", tenant)}).decode())
        msg = await ws.receive(timeout=5)
        assert msg.type == aiohttp.WSMsgType.TEXT and orjson.loads(msg.data)["t"] == "welcome"
    assert msgpack  # imported for the msgpack test above


async def test_heartbeat_timeout_closes_4008(settings, tenant):
    from parley.gateway.app import GatewayService
    from parley.testing.nats_server import free_port

    gw = GatewayService(settings.with_overrides(http_host="127.0.0.1", http_port=free_port(), heartbeat_ms=200))
    await gw.start()
    try:
        async with RawSocket(f"ws://127.0.0.1:{gw.settings.http_port}/v1/ws") as s:
            w = await s.hello(token("u1", tenant))
            assert w["heartbeat_ms"] == 200
            for _ in range(4):  # frames keep it alive...
                await asyncio.sleep(0.3)
                await s.send({"t": "ping"})
            await s.ws.ping()  # ...WebSocket pings too
            assert await s.closed_with(timeout=3) == 4008  # ...silence does not
    finally:
        await gw.stop()


async def test_rate_limit_nacks_then_closes_4029(settings, tenant):
    from parley.gateway.app import GatewayService
    from parley.testing.nats_server import free_port

    # 1 frame/s, burst 2: the bucket stays empty while the test reads its answers, however slowly
    gw = GatewayService(settings.with_overrides(http_host="127.0.0.1", http_port=free_port(), rate_limit=1))
    await gw.start()
    try:
        async with RawSocket(f"ws://127.0.0.1:{gw.settings.http_port}/v1/ws") as s:
            await s.hello(token("u1", tenant))
            for i in range(12):
                await s.send({"t": "send", "id": f"r{i}", "conv": "cx", "body": "x"})
            codes = [(await s.recv_until(lambda f: f["t"] == "nack"))["code"] for _ in range(12)]
            assert codes.count("rate_limited") >= 1
            limited = [c for c in codes if c == "rate_limited"]
            assert limited and all(c in ("rate_limited", "not_found") for c in codes)
            await s.send({"t": "ping"})
            err = await s.recv_until(lambda f: f["t"] in ("error", "pong"))
            assert err["t"] == "error" and err["code"] == "rate_limited"
            # keep hammering for over 10 s: closed with 4029
            code = None
            for _ in range(600):
                if s.ws.closed:
                    break
                await s.send({"t": "ping"})
                try:
                    while code is None:
                        msg = await s.ws.receive(timeout=0.04)
                        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED):
                            code = s.ws.close_code
                except TimeoutError:
                    pass
                if code is not None:
                    break
            assert code == 4029
    finally:
        await gw.stop()


async def _events(gateway, tenant, conv, after=0, limit=100, tok=None):
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{gateway.base_url}/v1/conversations/{conv}/events",
                               params={"after": after, "limit": limit},
                               headers={"Authorization": f"Bearer {tok or token('u1', tenant)}"}) as resp:
            assert resp.status == 200, await resp.text()
            return (await resp.json())["events"]
