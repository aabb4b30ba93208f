"""Shutdown of background tasks is bounded, even for tasks that swallow a cancellation."""

from __future__ import annotations

import asyncio

from parley.core.tasks import stop_tasks


async def test_task_that_swallows_one_cancellation_is_cancelled_again():
    rounds = []

    async def stubborn_loop():  # as a retry loop around a call that turns CancelledError into an error
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                rounds.append("swallowed")
                if len(rounds) == 1:
                    continue
                raise

    task = asyncio.create_task(stubborn_loop())
    await asyncio.sleep(0)
    left = await stop_tasks([task, None], timeout=5)
    assert left == [] and task.cancelled() and rounds == ["swallowed", "swallowed"]


async def test_task_that_never_stops_is_reported_not_waited_for():
    released = asyncio.Event()

    async def immortal():
        while not released.is_set():
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    async def failed():
        raise RuntimeError("boom")

    stuck, broken = asyncio.create_task(immortal()), asyncio.create_task(failed())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    left = await stop_tasks([stuck, broken], timeout=0.3)
    assert left == [stuck] and loop.time() - started < 5
    assert isinstance(broken.exception(), RuntimeError)
    released.set()  # let it end, so the test leaves no task behind
    stuck.cancel()
    await asyncio.wait_for(stuck, 5)
