"""An in-memory mirror of one KV bucket, kept current by a watch.

Presence and the router decide from memory and confirm each decision with a compare-and-set on
the stored revision, so a view only has to be *recent*, never exact. It keeps the highest
revision seen per key, because the service's own writes are applied locally at once
(``remember``) and the watch may deliver them later or, after a restart, deliver older ones.

Every service that decides from records uses it: the gateway (visibility, ``welcome.convs``),
presence (sweeps) and the router (matching).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from parley.core.tasks import stop_tasks

log = logging.getLogger("parley.kv_view")

T = TypeVar("T")

# Entries whose value is None mark a deletion, not a value.
DELETE_OPERATIONS = ("DEL", "PURGE")


class KvView(Generic[T]):
    """``key → (value, revision)`` of a bucket; ``keep`` drops values not worth holding in memory."""

    def __init__(
        self,
        kv: KeyValue,
        decode: Callable[[bytes], T],
        on_change: Callable[[str, T | None], None] | None = None,
        keep: Callable[[T], bool] | None = None,
    ) -> None:
        self._kv = kv
        self._decode = decode
        self._on_change = on_change
        self._keep = keep
        self.entries: dict[str, tuple[T, int]] = {}
        # called with (key, old value, new value) on every change, after ``on_change``
        self.listeners: list[Callable[[str, T | None, T | None], None]] = []
        # Revision of the newest write per key, also for keys not kept, so stale redeliveries lose.
        self._revisions: dict[str, int] = {}
        self._loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._watcher: KeyValue.KeyWatcher | None = None
        self._stopping = False

    async def start(self, timeout: float = 30.0) -> None:
        """Begin mirroring; returns once the initial values are loaded (a big bucket takes a while)."""
        self._task = asyncio.create_task(self._run(), name=f"kv-view-{self._kv._name}")
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def stop(self) -> None:
        self._stopping = True
        await self._stop_watcher()
        await stop_tasks([self._task])

    async def restart(self) -> None:
        """Start a fresh watch (after a reconnect): the server may have lost our ephemeral consumer."""
        await self._stop_watcher()

    @property
    def kv(self) -> KeyValue:
        return self._kv

    def get(self, key: str) -> tuple[T, int] | None:
        return self.entries.get(key)

    def value(self, key: str) -> T | None:
        entry = self.entries.get(key)
        return entry[0] if entry is not None else None

    def values(self) -> list[T]:
        return [v for v, _ in self.entries.values()]

    def forget(self, key: str) -> None:
        """Apply a deletion we made ourselves."""
        self.remember(key, None, self._revisions.get(key, 0))

    async def fetch(self, key: str) -> T | None:
        """The value from memory, or from the bucket when the watch has not brought it yet."""
        entry = self.entries.get(key)
        if entry is not None:
            return entry[0]
        try:
            stored = await self._kv.get(key)
        except KeyNotFoundError:
            return None
        if stored.value is None or stored.operation in DELETE_OPERATIONS:
            return None
        self.remember(key, self._decode(stored.value), stored.revision or 0)
        return self.value(key)

    def remember(self, key: str, value: T | None, revision: int) -> None:
        """Apply a write we made ourselves, without waiting for the watch to bring it back."""
        if revision < self._revisions.get(key, 0):
            return
        self._revisions[key] = revision
        old = self.value(key)
        if value is None or (self._keep is not None and not self._keep(value)):
            self.entries.pop(key, None)
        else:
            self.entries[key] = (value, revision)
        if self._on_change is not None:
            self._on_change(key, value)
        for listener in self.listeners:
            listener(key, old, value)

    async def _stop_watcher(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            try:
                await watcher.stop()
            except Exception as exc:  # already gone with the connection
                log.debug("stopping watcher: %s", exc)

    async def _run(self) -> None:
        while not self._stopping:
            try:
                self._watcher = await self._kv.watchall()
                seen: set[str] | None = set()
                async for entry in self._watcher:
                    if entry is None:
                        # Initial values delivered: keys absent from a fresh watch were deleted.
                        if seen is not None and self._loaded.is_set():
                            for gone in set(self.entries) - seen:
                                self.entries.pop(gone, None)
                        seen = None
                        self._loaded.set()
                        continue
                    if seen is not None:
                        seen.add(entry.key)
                    self._apply(entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("watch of %s failed (%s: %s); retrying", self._kv._name, type(exc).__name__, exc)
                await asyncio.sleep(0.5)

    def _apply(self, entry: KeyValue.Entry) -> None:
        revision = entry.revision or 0
        if entry.operation in DELETE_OPERATIONS or entry.value is None:
            self.remember(entry.key, None, revision)
            return
        try:
            value = self._decode(entry.value)
        except Exception as exc:  # a foreign or corrupt value must not stop the mirror
            log.error("undecodable %s/%s rev %d: %s", self._kv._name, entry.key, revision, exc)
            return
        self.remember(entry.key, value, revision)
