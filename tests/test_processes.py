"""The services as separate OS processes: resume on a second gateway process, a gateway SIGKILLed
mid-stream, and ``parley dev`` end to end."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
from helpers import ADMIN, SECRET, eventually, token

from parley.client import ParleyClient
from parley.testing.nats_server import free_port
from parley.testing.processes import Stack


@pytest.fixture(scope="module")
def procs(nats_server, tmp_path_factory):
    stack = Stack(
        [nats_server.url],
        env={"PARLEY_JWT_SECRET": SECRET, "PARLEY_ADMIN_KEY": ADMIN, "PARLEY_ROUTING_MODE": "auto"},
        counts={"gateway": 2, "router": 1, "presence": 1, "transcript": 1},
        data_dir=str(tmp_path_factory.mktemp("stack")),
    ).start()
    yield stack
    stack.stop()
    for p in stack.all():
        assert not p.alive(), f"{p.service} still running"


def agent_token(agent, tenant):
    return token(agent, tenant, "agent", skills=["support"])


async def assigned_pair(procs, tenant, customer_urls, agent_urls):
    agent = ParleyClient(agent_urls, agent_token("a1", tenant))
    await agent.connect()
    await agent.wait_for(lambda f: f.get("t") == "presence" and f["status"] == "online")
    customer = ParleyClient(customer_urls, token("c1", tenant))
    await customer.connect()
    conv = await customer.open("support")
    await agent.wait_for(lambda f: f.get("t") == "ev" and f["conv"] == conv and f["type"] == "assigned", timeout=15)
    return customer, agent, conv


async def test_resume_on_a_second_gateway_process(procs, tenant):
    """G3: the customer drops from gateway 1, the agent sends 20, the customer resumes on gateway 2."""
    gw1, gw2 = procs.gateways
    customer, agent, conv = await assigned_pair(procs, tenant, gw1.ws_url, gw2.ws_url)
    resume_at = (await customer.send(conv, "before the drop"))["seq"]  # its own echo may still be on the way
    await customer.close()
    sent = [(await agent.send(conv, f"m{i}"))["seq"] for i in range(20)]

    back = ParleyClient(gw2.ws_url, token("c1", tenant))
    back.positions = {conv: resume_at}
    welcome = await back.connect()
    assert welcome["node"] != customer.welcome["node"]
    await back.wait_for(lambda f: f.get("t") == "ev" and f["seq"] == sent[-1], timeout=10)
    evs = back.conv_events(conv)
    assert [e["seq"] for e in evs] == sent
    assert [e["prev"] for e in evs] == [resume_at] + sent[:-1]
    assert [e["data"]["body"] for e in evs] == [f"m{i}" for i in range(20)]
    assert back.violations == [] and agent.violations == []
    await back.close()
    await agent.close()


async def test_gateway_sigkill_mid_stream_loses_and_duplicates_nothing(procs, tenant):
    """G1/G2/G3: SIGKILL the customer's gateway while it sends; every send is acked exactly once."""
    gw1, gw2 = procs.gateways
    customer, agent, conv = await assigned_pair(procs, tenant, [gw1.ws_url, gw2.ws_url], [gw2.ws_url, gw1.ws_url])
    assert customer.welcome["node"] == "gateway-0"
    total = 300
    futures = []
    for i in range(total):
        futures.append(customer.send_nowait(conv, f"k{i}"))
        if i == 100:
            gw1.kill()
            killed_at = time.monotonic()
        await asyncio.sleep(0.002)
    acks = await asyncio.wait_for(asyncio.gather(*futures), 60)
    resumed_in = time.monotonic() - killed_at
    seqs = [a["seq"] for a in acks]
    assert len(set(seqs)) == total, "two sends share a seq"
    await agent.wait_for(lambda f: f.get("t") == "ev" and f["seq"] == max(seqs), timeout=20)
    bodies = [e["data"]["body"] for e in agent.conv_events(conv) if e["type"] == "message"]
    assert sorted(bodies) == sorted(f"k{i}" for i in range(total)) and len(bodies) == total
    assert customer.violations == [] and agent.violations == []
    assert customer.stats.reconnects >= 1 and customer.welcome["node"] == "gateway-1"
    print(f"all {total} sends acked {resumed_in:.2f}s after the kill")
    gw1.restart()
    await customer.close()
    await agent.close()


async def test_new_session_moves_past_a_frozen_gateway(procs, tenant):
    """G6: a SIGSTOPped gateway still completes TCP handshakes (the kernel does) but never answers the
    WebSocket upgrade; the SDK gives it ``handshake_timeout``, not the whole (long) welcome wait."""
    gw1, gw2 = procs.gateways
    customer = ParleyClient([gw1.ws_url, gw2.ws_url], token("c-frozen", tenant), connect_timeout=30.0)
    gw1.freeze()
    try:
        started = time.monotonic()
        welcome = await customer.connect(timeout=40)
        waited = time.monotonic() - started
    finally:
        gw1.thaw()
    assert welcome["node"] == "gateway-1"
    # the first attempt went to the frozen gateway and was abandoned after handshake_timeout (3 s),
    # far sooner than connect_timeout (30 s) would have
    assert customer.handshake_timeout <= waited < 15, waited
    await customer.close()


async def test_parley_dev_end_to_end(tmp_path):
    """``parley dev`` as a user runs it: chat with the printed tokens, transcript after close, clean exit."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PARLEY_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "parley.cli.main", "dev", "--port", str(port), "--data-dir", str(tmp_path / "data")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )
    banner: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            banner.append(line)
            if "Ctrl-C stops everything" in line:
                break
        text = "".join(banner)
        assert "Ctrl-C stops everything" in text, text
        tokens = dict(re.findall(r"^\s+(customer|agent|supervisor)\s+(\S+\.\S+\.\S+)$", text, re.M))
        admin = re.search(r"admin key\s+(\S+)", text).group(1)
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", text)]
        assert len(pids) == 5 and set(tokens) == {"customer", "agent", "supervisor"}
        url = f"ws://127.0.0.1:{port}/v1/ws"

        agent = ParleyClient(url, tokens["agent"])
        await agent.connect()
        customer = ParleyClient(url, tokens["customer"])
        await customer.connect()
        conv = await customer.open("support")
        await agent.wait_for(lambda f: f.get("t") == "offer" and f["conv"] == conv, timeout=30)
        await agent.accept(conv)
        await customer.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "assigned", timeout=30)
        await customer.send(conv, "my order is late")
        await agent.send(conv, "let me check")
        await customer.wait_for(lambda f: f.get("t") == "ev" and f.get("data", {}).get("body") == "let me check", timeout=30)
        await customer.close_conversation(conv)
        await agent.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "closed", timeout=30)
        # the chain as the customer has it, up to its own `closed` (it may reach the agent first)
        await customer.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "closed", timeout=30)
        expected = [e["seq"] for e in customer.conv_events(conv)]

        async def transcript():
            async with aiohttp.ClientSession() as s, s.get(
                    f"http://127.0.0.1:{port}/v1/conversations/{conv}/transcript",
                    headers={"Authorization": f"Bearer {tokens['customer']}"}) as r:
                body = await r.json()
                return body if [e["seq"] for e in body.get("events", [])] == expected else None

        got = await eventually(transcript, timeout=60, what="complete transcript")
        assert got["state"] == "closed"
        assert [e["data"].get("body") for e in got["events"] if e["type"] == "message"] == ["my order is late", "let me check"]
        async with aiohttp.ClientSession() as s, s.post(
                f"http://127.0.0.1:{port}/v1/tokens", headers={"Authorization": f"Bearer {admin}"},
                json={"sub": "x", "tenant": "demo", "role": "customer"}) as r:
            assert r.status == 200
        await agent.close()
        await customer.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0
    for pid in pids:  # no stray service process left behind
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    nats_conf = list((tmp_path / "data" / "nats").glob("*.conf"))
    assert nats_conf, "dev did not start its own nats-server in the data dir"
