"""``parley incident``: the post-incident timeline, rebuilt from the streams after real faults."""

import argparse
import os
import subprocess
import sys
from datetime import UTC, datetime

import aiohttp
import orjson
import pytest
from helpers import ADMIN, eventually, token

from parley.cli.incident import parse_time
from parley.client import ParleyClient


def run_incident(nats_url, *args):
    env = {**os.environ, "PARLEY_NATS_URL": nats_url}
    out = subprocess.run([sys.executable, "-m", "parley.cli.main", "incident", *args],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_parse_time_forms():
    now = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
    assert parse_time("15m", now) == datetime(2026, 11, 22, 11, 45, tzinfo=UTC)
    assert parse_time("-2h", now) == datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    assert parse_time("2026-11-22T11:00:00Z") == datetime(2026, 11, 22, 11, 0, tzinfo=UTC)
    assert parse_time("now", now) == now
    with pytest.raises(argparse.ArgumentTypeError):
        parse_time("yesterday-ish")


async def test_timeline_of_a_lost_agent_and_a_banner(make_stack, nats_server, tenant):
    stack = await make_stack(presence_ttl_ms=1000, requeue_grace_ms=300, heartbeat_ms=300, routing_mode="auto")
    agent = ParleyClient(stack.ws_url, token("a1", tenant, "agent", skills=["support"]))
    await agent.connect()
    customer = ParleyClient(stack.ws_url, token("c1", tenant))
    await customer.connect()
    conv = await customer.open("support")
    await agent.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "assigned", timeout=10)
    agent.send_ping = False
    await agent.drop()
    await agent.close()
    await customer.wait_for(lambda f: f.get("t") == "ev" and f["type"] == "unassigned", timeout=10)
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{stack.base_url}/v1/notices", headers={"Authorization": f"Bearer {ADMIN}"},
                          json={"tenant": tenant, "level": "warning", "text": "Slow replies"}) as r:
            notice_id = (await r.json())["id"]
        async with s.delete(f"{stack.base_url}/v1/notices/{notice_id}", headers={"Authorization": f"Bearer {ADMIN}"}):
            pass

    def report():
        data = orjson.loads(run_incident(nats_server.url, "--since", "5m", "--tenant", tenant, "--format", "json"))
        s = data["summary"]
        return data if s["requeued"] == 1 and s["notices"] >= 3 and s["agents_offline"] >= 1 else None

    data = await eventually(report, timeout=15, what="timeline with the re-queue and the banner")
    kinds = [(e["kind"], e.get("event")) for e in data["entries"]]
    assert ("routing", "unassigned") in kinds
    offline = next(e for e in data["entries"] if e["kind"] == "presence" and e["status"] == "offline")
    assert (offline["agent"], offline["reason"]) == ("a1", "heartbeat_lost")
    assert ("notice", "posted") in kinds and ("notice", "deleted") in kinds
    assert [e["ts"] for e in data["entries"]] == sorted(e["ts"] for e in data["entries"])
    unassigned = next(e for e in data["entries"] if e.get("event") == "unassigned")
    assert unassigned["conv"] == conv and unassigned["agent"] == {"id": "a1"}
    text = run_incident(nats_server.url, "--since", "5m", "--tenant", tenant)
    assert f"{tenant}/{conv} re-queued: agent a1 lost (agent_offline)" in text and "Summary:" in text
    assert f"{tenant}/a1 offline (heartbeat_lost)" in text
    other = orjson.loads(run_incident(nats_server.url, "--since", "5m", "--tenant", tenant + "x", "--format", "json"))
    assert other["summary"]["requeued"] == 0
    await customer.close()
