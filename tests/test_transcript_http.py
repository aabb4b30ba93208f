"""Transcript queries over HTTP through the in-process stack: /v1/conversations and /v1/search with
the socket's visibility, and conversation history served from the store once the stream (and the
conversation record) have aged out."""

from __future__ import annotations

import aiohttp
import pytest
from conftest import InProcessStack
from helpers import token
from test_transcript_fixtures import wait_for

from parley.client import ParleyClient
from parley.core import bus, subjects
from parley.core.config import Settings
from parley.testing.nats_server import NatsServer


async def get(base: str, path: str, tok: str | None, **params) -> tuple[int, dict]:
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    async with aiohttp.ClientSession() as s, s.get(base + path, params=params, headers=headers) as r:
        return r.status, await r.json()


async def test_list_and_search_with_visibility(make_stack, tenant):
    stack = await make_stack(routing_mode="auto")
    agent = ParleyClient(stack.ws_url, token("a1", tenant, "agent", skills=["support"]))
    await agent.connect()
    await agent.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    convs = {}
    for customer in ("c1", "c2"):
        client = ParleyClient(stack.ws_url, token(customer, tenant))
        await client.connect()
        conv = await client.open("support")
        await client.wait_for(lambda f, conv=conv: f.get("t") == "ev" and f["conv"] == conv and f["type"] == "assigned")
        await client.send(conv, f"my parcel from {customer} is late")
        await client.close()
        convs[customer] = conv
    sup, c1, c2 = token("s1", tenant, "supervisor"), token("c1", tenant), token("c2", tenant)
    a1, a2 = token("a1", tenant, "agent"), token("a2", tenant, "agent")

    async def listed(tok, **params):
        status, body = await get(stack.base_url, "/v1/conversations", tok, **params)
        assert status == 200, body
        return [c["conv"] for c in body["conversations"]]

    async def searched(tok, q, **params):
        status, body = await get(stack.base_url, "/v1/search", tok, q=q, **params)
        assert status == 200, body
        return [(h["conv"], h["body"]) for h in body["hits"]]

    # each conversation's message comes after its `assigned` event in the stream, so once both
    # messages are indexed the writer has committed the assignments the listings filter on
    await wait_for(lambda: _count(searched(sup, "parcel"), 2), what="messages indexed")
    assert set(await listed(sup)) == set(convs.values())
    assert await listed(c1) == [convs["c1"]]
    assert await listed(c2, customer="c1") == []
    assert set(await listed(a1)) == set(convs.values())
    assert await listed(a2) == []
    assert await listed(sup, customer="c2", state="assigned") == [convs["c2"]]
    page = await get(stack.base_url, "/v1/conversations", sup, limit=1)
    assert len(page[1]["conversations"]) == 1 and page[1]["next_cursor"]
    rest = await get(stack.base_url, "/v1/conversations", sup, limit=1, cursor=page[1]["next_cursor"])
    assert {page[1]["conversations"][0]["conv"], rest[1]["conversations"][0]["conv"]} == set(convs.values())

    assert await searched(c2, "parcel late") == [(convs["c2"], "my parcel from c2 is late")]
    assert await searched(a2, "parcel") == []
    assert (await get(stack.base_url, "/v1/search", sup))[0] == 400
    assert (await get(stack.base_url, "/v1/conversations", None))[0] == 401
    assert (await get(stack.base_url, "/v1/conversations", sup, state="bogus"))[0] == 400
    assert (await get(stack.base_url, "/v1/conversations", sup, limit=5000))[0] == 400
    paths = (await get(stack.base_url, "/openapi.json", None))[1]["paths"]
    assert "/v1/conversations" in paths and "/v1/search" in paths and "/v1/agents" in paths
    await agent.close()


async def _count(coro, n) -> bool:
    return len(await coro) == n


@pytest.fixture
def short_window_nats(tmp_path):
    """A NATS of its own: this test gives stream CONV a 2-second window."""
    server = NatsServer(store_dir=str(tmp_path / "nats")).start()
    yield server
    server.cleanup()


async def test_history_beyond_the_stream_window_comes_from_the_store(short_window_nats, tmp_path, tenant):
    settings = Settings(nats_urls=(short_window_nats.url,), jwt_secret=__import__("helpers").SECRET,
                        node_id="window-test", stream_max_age_s=2, dedupe_window_s=1,
                        transcript_dsn=f"sqlite:///{tmp_path}/t.db")
    stack = await InProcessStack(settings).start()
    try:
        customer = ParleyClient(stack.ws_url, token("c1", tenant))
        await customer.connect()
        conv = await customer.open("support")
        sent = [(await customer.send(conv, f"m{i}"))["seq"] for i in range(5)]
        await customer.close()
        c1 = token("c1", tenant)
        status, live = await get(stack.base_url, f"/v1/conversations/{conv}/events", c1)
        assert status == 200 and [e["seq"] for e in live["events"]][-5:] == sent

        nc = await bus.connect(settings, "test")
        js = nc.jetstream()

        async def aged_out() -> bool:
            info = await js.stream_info(subjects.CONV_STREAM)
            return info.state.first_seq > sent[-1] or info.state.messages == 0

        await wait_for(aged_out, timeout=20, what="the stream dropping the conversation")
        await nc.close()
        status, old = await get(stack.base_url, f"/v1/conversations/{conv}/events", c1, after=0, limit=3)
        assert status == 200, old
        first_page = old["events"]
        assert [e["type"] for e in first_page] == ["opened", "message", "message"]
        status, more = await get(stack.base_url, f"/v1/conversations/{conv}/events", c1, after=old["next_after"])
        events = first_page + more["events"]
        assert [e["seq"] for e in events if e["type"] == "message"] == sent
        assert [e["prev"] for e in events[1:]] == [e["seq"] for e in events[:-1]]
        assert more["next_after"] is None
        assert (await get(stack.base_url, f"/v1/conversations/{conv}/events", token("c2", tenant)))[0] == 404
        assert (await get(stack.base_url, f"/v1/conversations/{conv}/events", token("a1", tenant, "agent")))[0] == 404
        sup = token("s", tenant, "supervisor")
        assert (await get(stack.base_url, f"/v1/conversations/{conv}/events", sup))[0] == 200
        assert (await get(stack.base_url, "/v1/conversations/nosuch/events", sup))[0] == 404
    finally:
        await stack.stop()
