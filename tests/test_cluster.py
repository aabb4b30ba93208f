"""G1/G2/G3 on a 3-node JetStream cluster (R3): SIGKILL of the CONV stream leader mid-stream."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import ADMIN, SECRET, eventually, token

from parley.client import ParleyClient
from parley.core import bus, subjects
from parley.core.config import Settings
from parley.testing.nats_server import NatsCluster
from parley.testing.processes import Stack

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def cluster():
    c = NatsCluster(size=3).start()
    yield c
    c.cleanup()


async def stream_leader(urls: list[str], stream: str) -> str:
    nc = await bus.connect(Settings(nats_urls=tuple(urls)), "probe")
    try:
        info = await nc.jetstream().stream_info(stream)
        return info.cluster.leader
    finally:
        await nc.close()


async def test_stream_leader_sigkill_loses_and_duplicates_nothing(cluster, tmp_path, tenant):
    stack = Stack(cluster.urls, env={"PARLEY_JWT_SECRET": SECRET, "PARLEY_ADMIN_KEY": ADMIN,
                                     "PARLEY_ROUTING_MODE": "auto", "PARLEY_STREAM_REPLICAS": "3"},
                  data_dir=str(tmp_path), counts={"gateway": 2, "router": 1, "presence": 1, "transcript": 1}).start(60)
    try:
        urls = [g.ws_url for g in stack.gateways]
        agent = ParleyClient(urls[::-1], token("a1", tenant, "agent", skills=["support"]))
        await agent.connect()
        customer = ParleyClient(urls, token("c1", tenant))
        await customer.connect()
        conv = await customer.open("support")
        await agent.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "assigned", timeout=20)

        leader = cluster.node_named(await stream_leader(cluster.urls, subjects.CONV_STREAM))
        total, futures = 200, []
        for i in range(total):
            futures.append(customer.send_nowait(conv, f"r{i}"))
            if i == 50:
                leader.kill()
                killed_at = time.monotonic()
            await asyncio.sleep(0.005)
        acks = await asyncio.wait_for(asyncio.gather(*futures), 90)
        print(f"all {total} sends acked {time.monotonic() - killed_at:.2f}s after the leader was killed")
        seqs = [a["seq"] for a in acks]
        assert len(set(seqs)) == total
        await agent.wait_for(lambda f: f.get("t") == "ev" and f["seq"] == max(seqs), timeout=30)
        bodies = [e["data"]["body"] for e in agent.conv_events(conv) if e["type"] == "message"]
        assert sorted(bodies) == sorted(f"r{i}" for i in range(total)) and len(bodies) == total
        assert customer.violations == [] and agent.violations == []

        cluster.restart(leader)
        await customer.close_conversation(conv)
        await agent.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "closed", timeout=30)
        # the chain as the customer has it, up to its own `closed` (it may reach the agent first)
        await customer.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "closed", timeout=30)
        expected = [e["seq"] for e in customer.conv_events(conv)]

        async def transcript_complete():
            import aiohttp

            async with aiohttp.ClientSession() as s, s.get(
                    f"{stack.gateways[0].base_url}/v1/conversations/{conv}/transcript",
                    headers={"Authorization": f"Bearer {token('c1', tenant)}"}) as r:
                body = await r.json() if r.status == 200 else {}
                return [e["seq"] for e in body.get("events", [])] == expected

        await eventually(transcript_complete, timeout=30, what="complete transcript")
        await customer.close()
        await agent.close()
    finally:
        stack.stop()
