"""Honest status (G7): beacons → /v1/status, and system notices with their all-clear."""

import aiohttp
from helpers import eventually, token

from parley.client import ParleyClient
from parley.core.events import now_ms
from parley.core.health import BEACON_STALE_S, Beacon, status_subject
from parley.gateway.status import LAG_NOTICE, StatusBoard, assess


def beacon(service, node="n1", ready=True, age_s=0.0, **checks):
    return Beacon(service, node, now_ms() - int(age_s * 1000), ready, checks)


def test_assess_all_ready_is_operational():
    a = assess(True, False, "gw", [beacon("router"), beacon("presence"), beacon("transcript", lag=3)], now_ms(), 1000)
    assert a.status == "operational" and a.components["transcript"] == {"status": "ok", "instances": 1, "ready": 1, "lag": 3}


def test_assess_missing_stale_or_unready_services_degrade():
    now = now_ms()
    base = [beacon("presence"), beacon("transcript")]
    assert assess(True, False, "gw", base, now, 1000).components["router"]["status"] == "down"
    stale = base + [beacon("router", age_s=BEACON_STALE_S + 1)]
    assert assess(True, False, "gw", stale, now, 1000).status == "degraded"
    half = base + [beacon("router", "r1"), beacon("router", "r2", ready=False)]
    a = assess(True, False, "gw", half, now, 1000)
    assert a.status == "degraded" and a.components["router"] == {"status": "degraded", "instances": 2, "ready": 1}


def test_assess_lag_and_outage():
    now = now_ms()
    lagging = [beacon("router"), beacon("presence"), beacon("transcript", lag=5000)]
    a = assess(True, False, "gw", lagging, now, 1000)
    assert a.status == "degraded" and a.transcripts_lagging and a.transcript_lag == 5000
    assert assess(False, False, "gw", lagging, now, 1000).status == "outage"


def test_board_raises_once_clears_and_damps_flapping():
    sent = []
    board = StatusBoard(sent.append, min_interval_s=60)
    board.signal(LAG_NOTICE, True)
    board.signal(LAG_NOTICE, True)
    assert sent == [LAG_NOTICE] and board.active_notices() == [LAG_NOTICE]
    board.signal(LAG_NOTICE, False)
    assert sent[-1]["cleared"] and sent[-1]["id"] == LAG_NOTICE["id"] and board.active_notices() == []
    board.signal(LAG_NOTICE, True)  # flapping back within the interval: quiet
    assert len(sent) == 2


async def test_status_from_live_beacons_and_lag_notice(make_stack, nc, tenant):
    stack = await make_stack(transcript_lag_warn=100)
    url = f"{stack.base_url}/v1/status"

    async def status():
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            return await r.json()

    st = await eventually(lambda: _operational(status), what="operational")
    assert {"router", "presence", "transcript", "nats", "gateway"} <= set(st["components"])
    client = ParleyClient(stack.ws_url, token("c1", tenant))
    welcome = await client.connect()
    assert welcome["status"] == "operational"
    # the flap guard (tested above) would hide our notice if the real writer's own start-up backlog
    # (events of earlier tests on this NATS) raised and cleared one moments ago
    stack.gateway.board._min_interval_s = 0
    # a second writer reports a backlog over the threshold
    await nc.publish(status_subject("transcript", "lagging-writer"), beacon("transcript", "lagging-writer", lag=5000).encode())
    notice = await client.wait_for(lambda f: f.get("t") == "notice" and f["id"] == LAG_NOTICE["id"], timeout=5)
    assert notice["level"] == "warning"
    st = await status()
    assert st["status"] == "degraded" and st["components"]["transcript"]["status"] == "lagging"
    assert any(n["id"] == LAG_NOTICE["id"] for n in st["notices"])
    await nc.publish(status_subject("transcript", "lagging-writer"), beacon("transcript", "lagging-writer", lag=0).encode())
    cleared = await client.wait_for(lambda f: f.get("t") == "notice" and f.get("cleared"), timeout=5)
    assert cleared["id"] == LAG_NOTICE["id"]
    await eventually(lambda: _operational(status), what="operational again")
    await client.close()


async def _operational(status):
    st = await status()
    return st if st["status"] == "operational" else None
