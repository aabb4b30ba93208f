"""Stopping background tasks within a bound.

A plain ``cancel()`` + ``gather()`` waits forever for a task that swallows its cancellation, and
some library calls do exactly that (nats-py turns a cancelled ``next_msg`` on a closed connection
into ``ConnectionClosedError``, a cancelled publish stall into ``TooManyStalledMsgsError``); a
retry loop that catches ``Exception`` then goes round again. Shutdown must not hang on that.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

log = logging.getLogger("parley.tasks")

# How often a task that survived a cancellation is cancelled again while we wait.
RECANCEL_INTERVAL_S = 0.1


async def stop_tasks(tasks: Iterable[asyncio.Task[object] | None], timeout: float = 5.0) -> list[asyncio.Task[object]]:
    """Cancel ``tasks`` and wait up to ``timeout`` s for them to end; return those still running."""
    given = [t for t in tasks if t is not None]
    pending = {t for t in given if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        for task in pending:
            task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_INTERVAL_S, remaining))
    for task in given:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())
    for task in pending:
        log.error("task %s did not stop within %.1f s", task.get_name(), timeout)
    return list(pending)
