"""A customer and an agent chatting end to end through all four services (in-process), real NATS."""

import asyncio

import aiohttp
import pytest
from helpers import ADMIN, RawSocket, StalledSocket, eventually, token

from parley.client import ParleyClient


def agent_token(agent, tenant, skills=("support",), **claims):
    return token(agent, tenant, "agent", skills=list(skills), **claims)


async def connect(url, tok, **kw):
    client = ParleyClient(url, tok, **kw)
    await client.connect()
    return client


def of_type(kind, conv=None, **fields):
    def match(f):
        if f.get("t") == "ev":
            return f["type"] == kind and (conv is None or f["conv"] == conv) and all(
                f["data"].get(k) == v for k, v in fields.items())
        return f.get("t") == kind and (conv is None or f.get("conv") == conv)
    return match


async def assigned_chat(stack, tenant, agent="a1", customer="c1"):
    """A customer's conversation offered to and accepted by an online agent."""
    ag = await connect(stack.ws_url, agent_token(agent, tenant))
    await ag.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    cu = await connect(stack.ws_url, token(customer, tenant))
    conv = await cu.open("support")
    offer = await ag.wait_for(of_type("offer", conv))
    assert offer["queue"] == "support" and 0 < offer["expires_ms"] <= 3000
    await ag.accept(conv)
    await ag.wait_for(of_type("assigned", conv))
    await cu.wait_for(of_type("assigned", conv))
    return ag, cu, conv


async def http(method, url, tok=None, **kw):
    headers = {"Authorization": f"Bearer {tok}"} if tok else {}
    async with aiohttp.ClientSession() as s, s.request(method, url, headers=headers, **kw) as r:
        body = await r.read()
        ctype = r.headers.get("Content-Type", "")
        return r.status, (await r.json() if "json" in ctype and body else body.decode())


async def test_full_chat_with_transcript(stack, tenant):
    ag, cu, conv = await assigned_chat(stack, tenant)
    assert cu.welcome["convs"] == []
    for i in range(3):
        await cu.send(conv, f"customer {i}")
        await ag.send(conv, f"agent {i}")
    await ag.wait_for(of_type("message", conv, body="customer 2"))
    await cu.wait_for(of_type("message", conv, body="agent 2"))  # delivery to each side is its own
    got = [f["data"]["body"] for f in cu.conv_events(conv) if f["type"] == "message"]
    assert got == ["customer 0", "agent 0", "customer 1", "agent 1", "customer 2", "agent 2"]

    await cu.typing(conv)
    typing = await ag.wait_for(of_type("typing", conv))
    assert typing["from"] == {"id": "c1"}
    last = cu.positions[conv]
    await ag.read(conv, last)
    await cu.wait_for(of_type("read", conv))

    await cu.close_conversation(conv)
    closed = await ag.wait_for(of_type("closed", conv))
    await cu.wait_for(of_type("closed", conv))
    assert closed["data"] == {"by": {"id": "c1", "role": "customer"}, "reason": "customer_closed"}
    with pytest.raises(Exception) as info:
        await cu.send(conv, "after close", timeout=5)
    assert getattr(info.value, "code", None) == "forbidden"

    # both sides saw the same gapless chain
    for client in (ag, cu):
        assert client.violations == []
    assert [f["seq"] for f in cu.conv_events(conv)] == [f["seq"] for f in ag.conv_events(conv)]

    async def transcript_complete():
        status, body = await http("GET", f"{stack.base_url}/v1/conversations/{conv}/transcript", token("c1", tenant))
        done = status == 200 and body["state"] == "closed" and body["events"] and body["events"][-1]["type"] == "closed"
        return body if done else None

    transcript = await eventually(transcript_complete, what="closed transcript")
    assert [e["seq"] for e in transcript["events"]] == [f["seq"] for f in cu.conv_events(conv)]
    assert transcript["events"][0]["type"] == "opened" and transcript["events"][-1]["type"] == "closed"
    status, text = await http("GET", f"{stack.base_url}/v1/conversations/{conv}/transcript?format=text",
                              agent_token("a1", tenant))
    assert status == 200 and "customer c1: customer 0" in text and "agent a1: agent 2" in text
    await ag.close()
    await cu.close()


async def test_customer_resumes_after_drop_and_gets_exactly_the_missed_events(stack, tenant):
    """G3: customer drops, agent sends 20, customer resumes: exactly those 20, in order, chain intact."""
    ag, cu, conv = await assigned_chat(stack, tenant)
    before = cu.positions[conv]
    cu.send_ping = False
    await cu.close()
    sent = [(await ag.send(conv, f"m{i}"))["seq"] for i in range(20)]
    again = ParleyClient(stack.ws_url, token("c1", tenant))
    again.positions = {conv: before}
    welcome = await again.connect()
    assert [c["conv"] for c in welcome["convs"]] == [conv]
    assert welcome["convs"][0]["state"] == "assigned" and welcome["convs"][0]["agent"] == "a1"
    assert welcome["convs"][0]["last_seq"] == sent[-1]
    await again.wait_for(lambda f: f.get("t") == "ev" and f["seq"] == sent[-1])
    evs = again.conv_events(conv)
    assert [e["seq"] for e in evs] == sent
    assert [e["prev"] for e in evs] == [before] + sent[:-1]
    assert [e["data"]["body"] for e in evs] == [f"m{i}" for i in range(20)]
    assert again.violations == []
    await again.close()
    await ag.close()


async def test_unacked_send_survives_a_dropped_connection(stack, tenant):
    ag, cu, conv = await assigned_chat(stack, tenant)
    futures = [cu.send_nowait(conv, f"burst {i}") for i in range(30)]
    await cu.drop()  # cut mid-burst: whatever was not acked is sent again after the reconnect
    acks = [await f for f in futures]
    seqs = [a["seq"] for a in acks]
    assert len(set(seqs)) == 30
    await ag.wait_for(lambda f: f.get("t") == "ev" and f["seq"] == max(seqs))
    bodies = [f["data"]["body"] for f in ag.conv_events(conv) if f["type"] == "message"]
    assert sorted(bodies) == sorted(f"burst {i}" for i in range(30)) and len(bodies) == 30
    assert ag.violations == [] and cu.violations == []
    await ag.close()
    await cu.close()


async def test_agent_status_frames_and_bad_status(stack, tenant):
    ag = await connect(stack.ws_url, agent_token("a1", tenant))
    first = await ag.wait_for(of_type("presence"))
    assert first["status"] == "online"
    await ag.set_status("away")
    away = await ag.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "away")
    assert away["reason"] == "set_by_agent"
    await ag.send_frame({"t": "status", "status": "busy"})
    err = await ag.wait_for(of_type("error"))
    assert err["code"] == "bad_frame"
    # an away agent gets no offer; back online, it does
    cu = await connect(stack.ws_url, token("c1", tenant))
    conv = await cu.open("support")
    mark = len(ag.frames)
    await ag.set_status("online")
    await ag.wait_for(of_type("offer", conv), since=mark)
    await ag.close()
    await cu.close()


async def test_decline_moves_the_offer_to_the_next_agent(stack, tenant):
    a1 = await connect(stack.ws_url, agent_token("a1", tenant))
    a2 = await connect(stack.ws_url, agent_token("a2", tenant))
    for a in (a1, a2):
        await a.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    cu = await connect(stack.ws_url, token("c1", tenant))
    conv = await cu.open("support")
    first = await eventually(lambda: next((a for a in (a1, a2) if any(of_type("offer", conv)(f) for f in a.frames)), None),
                             what="first offer")
    other = a2 if first is a1 else a1
    await first.decline(conv)
    await other.wait_for(of_type("offer", conv))
    await other.accept(conv)
    ev = await cu.wait_for(of_type("assigned", conv))
    assert ev["data"]["agent"]["id"] == other.welcome["user"]
    for c in (a1, a2, cu):
        await c.close()


async def test_auto_mode_assigns_without_offer(make_stack, tenant):
    stack = await make_stack(routing_mode="auto")
    ag = await connect(stack.ws_url, agent_token("a1", tenant))
    await ag.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    cu = await connect(stack.ws_url, token("c1", tenant))
    conv = await cu.open("support")
    ev = await ag.wait_for(of_type("assigned", conv))
    assert ev["data"] == {"agent": {"id": "a1"}}
    assert not any(f.get("t") == "offer" for f in ag.frames)
    # the agent's replay starts at the conversation's first event
    assert ag.conv_events(conv)[0]["type"] == "opened"
    await ag.close()
    await cu.close()


async def test_transfer_releases_the_agent(stack, tenant):
    ag, cu, conv = await assigned_chat(stack, tenant)
    await ag.transfer(conv, "tier2")
    ev = await ag.wait_for(of_type("transferred", conv))
    assert ev["data"] == {"from_queue": "support", "to_queue": "tier2", "by": {"id": "a1"}}
    await cu.wait_for(of_type("transferred", conv))
    mark = len(ag.frames)
    await cu.send(conv, "still there?")
    await cu.wait_for(of_type("message", conv, body="still there?"))
    with pytest.raises(TimeoutError):  # a released agent gets nothing of it after the release
        await ag.wait_for(lambda f: f.get("conv") == conv, timeout=0.5, since=mark)
    await ag.close()
    await cu.close()


async def test_agent_reconnect_rebuilds_from_welcome(stack, tenant):
    ag, cu, conv = await assigned_chat(stack, tenant)
    await cu.send(conv, "before reload")
    await ag.close()
    fresh = await connect(stack.ws_url, agent_token("a1", tenant))  # a reloaded console: no local state
    assert [(c["conv"], c["state"], c["agent"]) for c in fresh.welcome["convs"]] == [(conv, "assigned", "a1")]
    await fresh.wait_for(of_type("message", conv, body="before reload"))
    assert [f["type"] for f in fresh.conv_events(conv)][:2] == ["opened", "assigned"]
    presence_at = next(i for i, f in enumerate(fresh.frames) if f.get("t") == "presence")
    first_ev = next(i for i, f in enumerate(fresh.frames) if f.get("t") == "ev")
    assert presence_at < first_ev  # SPEC: presence right after welcome, before any replay
    await fresh.close()
    await cu.close()


async def test_visibility_and_sub(stack, tenant):
    ag, cu, conv = await assigned_chat(stack, tenant)
    async with RawSocket(stack.ws_url) as other:
        await other.hello(token("c2", tenant))
        await other.send({"t": "sub", "conv": conv, "after": 0})
        err = await other.recv_until(lambda f: f["t"] == "error")
        assert (err["code"], err.get("ref")) == ("not_found", conv)
        await other.send({"t": "send", "id": "x", "conv": conv, "body": "hi"})
        assert (await other.recv_until(lambda f: f["t"] == "nack"))["code"] == "not_found"
    async with RawSocket(stack.ws_url) as stranger:  # another tenant never sees it
        await stranger.hello(token("s1", tenant + "x", "supervisor"))
        await stranger.send({"t": "sub", "conv": conv, "after": 0})
        assert (await stranger.recv_until(lambda f: f["t"] == "error"))["code"] == "not_found"
    sup = await connect(stack.ws_url, token("s1", tenant, "supervisor"))
    assert sup.welcome["convs"] == []
    await sup.sub(conv, after=0)
    await sup.wait_for(of_type("assigned", conv))
    await cu.send(conv, "watched")
    await sup.wait_for(of_type("message", conv, body="watched"))
    assert sup.violations == []
    for c in (ag, cu, sup):
        await c.close()


async def test_http_events_pagination_and_auth(stack, tenant):
    ag, cu, conv = await assigned_chat(stack, tenant)
    for i in range(5):
        await cu.send(conv, f"p{i}")
    url = f"{stack.base_url}/v1/conversations/{conv}/events"
    status, page1 = await http("GET", url + "?after=0&limit=3", token("c1", tenant))
    assert status == 200 and len(page1["events"]) == 3 and page1["next_after"] == page1["events"][-1]["seq"]
    status, page2 = await http("GET", url + f"?after={page1['next_after']}&limit=1000", token("c1", tenant))
    assert status == 200 and page2["next_after"] is None
    seqs = [e["seq"] for e in page1["events"] + page2["events"]]
    assert seqs == sorted(seqs) and len(seqs) == 2 + 5  # opened, assigned, 5 messages
    assert page1["events"][0]["prev"] == 0 and page2["events"][0]["prev"] == page1["next_after"]
    assert (await http("GET", url))[0] == 401
    assert (await http("GET", url, "garbage"))[0] == 401
    assert (await http("GET", url, token("c2", tenant)))[0] == 404
    assert (await http("GET", url.replace(conv, "cnosuch"), token("c1", tenant)))[0] == 404
    assert (await http("GET", url + "?limit=5000", token("c1", tenant)))[0] == 400
    assert (await http("GET", url + "?after=x", token("c1", tenant)))[0] == 400
    assert (await http("GET", url, token("s", tenant, "supervisor")))[0] == 200
    status, _ = await http("GET", f"{stack.base_url}/v1/conversations/{conv}/transcript", token("c2", tenant))
    assert status == 404
    for c in (ag, cu):
        await c.close()


async def test_supervisor_agents_and_queues(stack, tenant):
    ag = await connect(stack.ws_url, agent_token("a1", tenant, max_chats=2))
    await ag.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    cu = await connect(stack.ws_url, token("c1", tenant))
    await cu.open("billing")  # nobody serves billing: it waits
    sup = token("s1", tenant, "supervisor")
    status, body = await http("GET", f"{stack.base_url}/v1/agents", sup)
    assert status == 200
    [a] = body["agents"]
    assert (a["id"], a["status"], a["max_chats"], a["skills"]) == ("a1", "online", 2, ["support"])
    assert isinstance(a["last_heartbeat"], int) and a["node"]

    async def billing_waiting():
        status, body = await http("GET", f"{stack.base_url}/v1/queues", sup)
        return next((q for q in body["queues"] if q["queue"] == "billing" and q["depth"] == 1), None)

    billing = await eventually(billing_waiting, what="billing queue depth")
    assert billing["agents_online"] == 0
    status, body = await http("GET", f"{stack.base_url}/v1/queues", sup)
    assert next(q for q in body["queues"] if q["queue"] == "support")["agents_online"] == 1
    assert (await http("GET", f"{stack.base_url}/v1/agents", token("c1", tenant)))[0] == 403
    assert (await http("GET", f"{stack.base_url}/v1/queues", agent_token("a1", tenant)))[0] == 403
    assert (await http("GET", f"{stack.base_url}/v1/queues"))[0] == 401
    await ag.close()
    await cu.close()


async def test_tokens_status_and_notices(stack, tenant):
    base = stack.base_url
    status, body = await http("POST", f"{base}/v1/tokens", ADMIN, json={"sub": "u9", "tenant": tenant, "role": "customer",
                                                                       "ttl_s": 60, "exp": 1})
    assert status == 200
    cu = await connect(stack.ws_url, body["token"])
    assert cu.welcome["user"] == "u9"
    assert (await http("POST", f"{base}/v1/tokens", "wrong", json={}))[0] == 401
    assert (await http("POST", f"{base}/v1/tokens", None, json={}))[0] == 401
    assert (await http("POST", f"{base}/v1/tokens", ADMIN, json={"sub": "u", "tenant": tenant, "role": "root"}))[0] == 400
    assert (await http("POST", f"{base}/v1/tokens", ADMIN, data=b"{"))[0] == 400

    status, st = await http("GET", f"{base}/v1/status")
    assert status == 200 and st["status"] == "operational" and st["notices"] == []
    assert st["components"]["nats"]["status"] == "ok"
    status, created = await http("POST", f"{base}/v1/notices", ADMIN,
                                 json={"tenant": tenant, "level": "warning", "text": "Slow replies today"})
    assert status == 201
    pushed = await cu.wait_for(of_type("notice"))
    assert (pushed["id"], pushed["level"], pushed["text"]) == (created["id"], "warning", "Slow replies today")
    status, st = await http("GET", f"{base}/v1/status?tenant={tenant}")
    assert st["status"] == "degraded" and [n["id"] for n in st["notices"]] == [created["id"]]
    assert (await http("GET", f"{base}/v1/status?tenant={tenant}x"))[1]["notices"] == []
    late = await connect(stack.ws_url, token("u10", tenant))  # connecting later still sees it
    assert (await late.wait_for(of_type("notice")))["id"] == created["id"]
    assert (await http("POST", f"{base}/v1/notices", ADMIN, json={"tenant": tenant, "level": "meh", "text": "x"}))[0] == 400
    assert (await http("POST", f"{base}/v1/notices", None, json={}))[0] == 401
    assert (await http("DELETE", f"{base}/v1/notices/{created['id']}", ADMIN))[0] == 204
    cleared = await cu.wait_for(lambda f: f.get("t") == "notice" and f.get("cleared"))
    assert cleared["id"] == created["id"]
    assert (await http("DELETE", f"{base}/v1/notices/{created['id']}", ADMIN))[0] == 404
    assert (await http("GET", f"{base}/v1/status?tenant={tenant}"))[1]["status"] == "operational"
    status, spec = await http("GET", f"{base}/openapi.json")
    assert status == 200 and "/v1/conversations/{conv}/events" in spec["paths"]
    for path in ("/healthz", "/readyz"):
        assert (await http("GET", base + path))[0] == 200
    status, metrics = await http("GET", f"{base}/metrics")
    assert status == 200 and "parley_gateway_connections" in metrics
    await cu.close()
    await late.close()


async def test_slow_reader_is_disconnected_not_buffered(make_stack, tenant):
    """A client that stops reading cannot grow the gateway's memory: its bounded outbound queue
    fills and it is disconnected (to reconnect and resume), while the others go on."""
    stack = await make_stack(outbound_queue=600, rate_limit=100000, routing_mode="auto")
    ag = await connect(stack.ws_url, agent_token("a1", tenant))
    await ag.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    # a blocking socket, driven from a thread: the gateway shares this test's event loop
    slow = await asyncio.to_thread(StalledSocket, "127.0.0.1", stack.gateway.settings.http_port)
    try:
        await asyncio.to_thread(slow.handshake)
        await asyncio.to_thread(slow.send, {"t": "hello", "token": token("c1", tenant)})
        await asyncio.to_thread(slow.recv_until, lambda f: f["t"] == "welcome")
        await asyncio.to_thread(slow.send, {"t": "open", "id": "o", "queue": "support"})
        conv = (await asyncio.to_thread(slow.recv_until, lambda f: f["t"] == "opened"))["conv"]
        await ag.wait_for(of_type("assigned", conv))
        # the customer reads nothing more; the agent sends 4 KiB messages at it
        for _ in range(4):
            await asyncio.gather(*(ag.send_nowait(conv, "x" * 4000) for _ in range(500)))
            if not any(c.user == "c1" for c in stack.gateway.connections):
                break

        async def disconnected():
            return not any(c.user == "c1" for c in stack.gateway.connections)

        await eventually(disconnected, timeout=30, what="slow reader disconnected")
        assert stack.gateway.connections and ag.unacked == 0  # the agent was never held up
    finally:
        slow.close()
    await ag.close()


async def test_graceful_shutdown_sends_reconnect_then_1012(make_stack, tenant):
    stack = await make_stack()
    async with RawSocket(stack.ws_url) as s:
        await s.hello(token("c1", tenant))
        stopping = asyncio.create_task(stack.gateway.stop())
        frame = await s.recv_until(lambda f: f["t"] == "reconnect")
        assert isinstance(frame["after_ms"], int) and frame["after_ms"] >= 0
        assert await s.closed_with() == 1012
        await stopping
    stack.services.remove(stack.gateway)


async def test_token_expiry_closes_4001(stack, tenant):
    async with RawSocket(stack.ws_url) as s:
        await s.hello(token("c1", tenant, ttl_s=1))
        err = await s.recv_until(lambda f: f["t"] == "error", timeout=5)
        assert err["code"] == "unauthorized"
        assert await s.closed_with() == 4001


async def test_sdk_event_iterator(stack, tenant):
    ag, cu, conv = await assigned_chat(stack, tenant)
    stream = cu.events(conv)
    await ag.send(conv, "one")
    await ag.send(conv, "two")
    got = []
    async with asyncio.timeout(10):
        async for ev in stream:
            if ev["type"] == "message":
                got.append(ev["data"]["body"])
            if len(got) == 2:
                break
    assert got == ["one", "two"]
    await ag.close()
    await cu.close()


async def test_agent_lost_is_marked_offline_and_chat_requeued(make_stack, tenant):
    """G4 + G5 through the gateway: an agent that vanishes goes offline; its chat is re-queued."""
    stack = await make_stack(presence_ttl_ms=1500, requeue_grace_ms=500, heartbeat_ms=300, offer_timeout_ms=3000)
    ag, cu, conv = await assigned_chat(stack, tenant)
    ag.send_ping = False
    await ag.drop()  # no close frame, no more heartbeats
    await ag.close()
    sup = token("s1", tenant, "supervisor")

    async def offline():
        status, body = await http("GET", f"{stack.base_url}/v1/agents", sup)
        return any(a["id"] == "a1" and a["status"] == "offline" for a in body["agents"])

    await eventually(offline, timeout=1.5 + 3, what="agent offline within TTL")
    unassigned = await cu.wait_for(of_type("unassigned", conv), timeout=1.5 + 0.5 + 5)
    assert unassigned["data"] == {"agent": {"id": "a1"}, "reason": "agent_offline"}
    notice = await cu.wait_for(of_type("notice", conv))
    assert notice["data"]["level"] in ("info", "warning") and notice["data"]["text"]
    back = await connect(stack.ws_url, agent_token("a1", tenant))
    # The first push is the server's view at that moment; on a slow node presence may answer the
    # hello late and the session starts "offline" until the next heartbeat — never a false online.
    presence = await back.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online", timeout=15)
    assert presence["reason"] == "reconnected"
    await back.wait_for(of_type("offer", conv))  # routed again once an agent is there
    assert cu.violations == []
    await back.close()
    await cu.close()


async def test_long_history_replays_through_a_small_outbound_queue(make_stack, tenant):
    """A replay longer than the outbound queue waits for room instead of overflowing it."""
    stack = await make_stack(outbound_queue=40, routing_mode="auto")
    ag = await connect(stack.ws_url, agent_token("a1", tenant))
    await ag.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    cu = await connect(stack.ws_url, token("c1", tenant))
    conv = await cu.open("support")
    await ag.wait_for(of_type("assigned", conv))
    for i in range(300):
        last = (await ag.send(conv, f"h{i}"))["seq"]  # the ack's seq: the agent's own echo may lag
    await cu.close()
    again = await connect(stack.ws_url, token("c1", tenant))  # resume from 0: replay of 302 events
    await again.wait_for(lambda f: f.get("t") == "ev" and f["seq"] == last, timeout=20)
    assert [e["data"]["body"] for e in again.conv_events(conv) if e["type"] == "message"] == [f"h{i}" for i in range(300)]
    assert again.violations == [] and again.stats.reconnects == 0
    await again.close()
    await ag.close()


async def test_long_wait_notice_and_queue_gauges(make_stack, tenant):
    """G7: a customer waiting longer than PARLEY_WAIT_WARN_S is told so in the chat, once."""
    from prometheus_client import REGISTRY

    stack = await make_stack(wait_warn_s=1, routing_mode="auto")
    ag = await connect(stack.ws_url, agent_token("a1", tenant, max_chats=1))
    await ag.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    first = await connect(stack.ws_url, token("c1", tenant))
    busy = await first.open("support")
    await ag.wait_for(of_type("assigned", busy))
    waiting = await connect(stack.ws_url, token("c2", tenant))
    conv = await waiting.open("support")  # the only agent is full: it waits
    notice = await waiting.wait_for(of_type("notice", conv), timeout=10)
    assert notice["data"]["level"] == "warning" and "wait" in notice["data"]["text"]
    position = await waiting.wait_for(of_type("queue", conv))
    assert position["position"] == 1

    def gauge(name):
        return REGISTRY.get_sample_value(name, {"tenant": tenant, "queue": "support"})

    await eventually(lambda: gauge("parley_router_queue_depth") == 1, what="queue depth gauge")
    assert gauge("parley_router_queue_agents_online") == 1 and gauge("parley_router_queue_oldest_wait_seconds") >= 1
    await first.close_conversation(busy)
    await waiting.wait_for(of_type("assigned", conv), timeout=10)
    notices = [f for f in waiting.conv_events(conv) if f["type"] == "notice"]
    assert len(notices) == 1  # told once, not every tick
    for c in (ag, first, waiting):
        await c.close()
