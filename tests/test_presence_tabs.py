"""G4 end to end through a gateway: an agent with two tabs is online while either heartbeats; every
change is pushed to every tab with its reason; after a lapse, the next connection sees ``reconnected``."""

from __future__ import annotations

import asyncio
import time

from helpers import RawSocket, eventually, token

from parley.core import bus, subjects
from parley.core.records import AgentRecord


def agent_token(agent, tenant):
    return token(agent, tenant, "agent", skills=["support"])


async def keep_pinging(sock: RawSocket, every: float = 0.1) -> None:
    while True:
        await sock.send({"t": "ping"})
        await asyncio.sleep(every)


def is_presence(status, reason=None):
    return lambda f: f["t"] == "presence" and f["status"] == status and (reason is None or f.get("reason") == reason)


async def test_two_tabs_online_while_either_heartbeats(make_stack, tenant, js):
    ttl_ms = 2500
    stack = await make_stack(heartbeat_ms=200, presence_ttl_ms=ttl_ms)
    buckets = await bus.ensure_buckets(js, stack.settings)
    history: list[tuple[float, str, str | None]] = []
    watcher = await buckets.agents.watch(subjects.kv_key(tenant, "a1"))

    async def record():
        async for entry in watcher:
            if entry is not None and entry.value:
                rec = AgentRecord.decode(entry.value)
                if not history or history[-1][1:] != (rec.status, rec.reason):
                    history.append((time.monotonic(), rec.status, rec.reason))

    recorder = asyncio.create_task(record())
    tok = agent_token("a1", tenant)
    try:
        async with RawSocket(stack.ws_url) as tab_a, RawSocket(stack.ws_url) as tab_b:
            await tab_a.hello(tok)
            await tab_a.recv_until(is_presence("online"))
            pings_a = asyncio.create_task(keep_pinging(tab_a))
            await tab_b.hello(tok)
            await tab_b.recv_until(is_presence("online"))
            pings_b = asyncio.create_task(keep_pinging(tab_b))

            # A change made in one tab is pushed to both, with its reason.
            await tab_a.send({"t": "status", "status": "away"})
            for tab in (tab_a, tab_b):
                await tab.recv_until(is_presence("away", "set_by_agent"))
            await tab_b.send({"t": "status", "status": "online"})
            for tab in (tab_a, tab_b):
                await tab.recv_until(is_presence("online", "set_by_agent"))

            # Tab A goes silent (its gateway closes it); tab B alone keeps the agent online.
            pings_a.cancel()
            assert await tab_a.closed_with(timeout=5) == 4008
            quiet_from = time.monotonic()
            await asyncio.sleep(ttl_ms / 1000 + 1.0)  # an observation window longer than the TTL
            assert [s for t, s, _ in history if t >= quiet_from] in ([], ["online"]), history
            assert history[-1][1] == "online"

            # Tab B goes silent too: offline (heartbeat_lost) within the TTL (+ sweep and forwarding).
            pings_b.cancel()
            silent_at = time.monotonic()
            await eventually(lambda: history[-1][1:] == ("offline", "heartbeat_lost"), timeout=ttl_ms / 1000 + 3,
                             what="offline after both tabs lapsed")
            # the gateway forwards heartbeats once a second, so the last one may land up to 1 s after
            # silent_at; then the TTL, a sweep interval (0.5 s) and slack for a loaded machine
            assert history[-1][0] - silent_at < ttl_ms / 1000 + 1.0 + 0.5 + 1.0
        # The next connection is told it is back, and why.
        async with RawSocket(stack.ws_url) as tab_c:
            await tab_c.hello(tok)
            frame = await tab_c.recv_until(lambda f: f["t"] == "presence")
            assert (frame["status"], frame.get("reason")) == ("online", "reconnected")
    finally:
        recorder.cancel()
        await watcher.stop()
