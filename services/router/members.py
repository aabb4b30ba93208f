"""Which routers are alive: each announces itself on ``router.members`` about once a second.

Used only to give each queue one speaker for its ephemeral ``queue`` frames and its periodic
upkeep (``waiting.queue_owner``). Views of the member list may differ for up to ``EXPIRY_S``
while a router joins or dies; during that window a queue may have two speakers (a customer gets
a frame twice) or none (frames are late by up to that long). Correctness never depends on it:
every state change is still a compare-and-set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from parley.core import subjects
from parley.core.tasks import stop_tasks

log = logging.getLogger("parley.router.members")

BEACON_S = 1.0
EXPIRY_S = 3.0


class RouterMembers:
    def __init__(self, nc: NATS, node: str) -> None:
        self._nc = nc
        self.node = node
        self._heard: dict[str, float] = {}
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._sub = await self._nc.subscribe(subjects.ROUTER_MEMBERS, cb=self._on_beacon)
        await self._announce()
        self._task = asyncio.create_task(self._beacon_loop(), name="router-members")

    async def stop(self) -> None:
        await stop_tasks([self._task])
        try:
            if self._nc.is_connected:
                await self._nc.publish(subjects.ROUTER_MEMBERS, orjson.dumps({"node": self.node, "gone": True}))
            if self._sub is not None:
                await self._sub.unsubscribe()
        except Exception:  # closing anyway: the others expire us
            pass

    def alive(self) -> list[str]:
        cutoff = time.monotonic() - EXPIRY_S
        return sorted({self.node} | {n for n, at in self._heard.items() if at >= cutoff})

    async def _announce(self) -> None:
        await self._nc.publish(subjects.ROUTER_MEMBERS, orjson.dumps({"node": self.node}))

    async def _beacon_loop(self) -> None:
        while True:
            await asyncio.sleep(BEACON_S)
            try:
                await self._announce()
            except Exception as exc:  # reconnecting: the next beacon goes out later
                log.debug("router beacon failed: %s", exc)

    async def _on_beacon(self, msg: Msg) -> None:
        try:
            body = orjson.loads(msg.data)
            node = body["node"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return
        if not isinstance(node, str) or node == self.node:
            return
        if body.get("gone"):
            self._heard.pop(node, None)
        else:
            self._heard[node] = time.monotonic()
