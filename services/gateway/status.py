"""``/v1/status`` from the services' health beacons, and system-wide notices when it degrades.

``assess`` is pure: beacons + what this gateway knows (its NATS link) → overall status and
components. ``StatusBoard`` keeps the latest beacon of every instance and tells connected
clients (ephemeral ``notice`` frames, each later followed by an all-clear) when transcripts lag
or NATS is unreachable (G7).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from parley.core.health import BEACON_STALE_S, Beacon

log = logging.getLogger("parley.gateway.status")

SERVICES = ("router", "presence", "transcript")


@dataclass(frozen=True)
class Assessment:
    status: str  # operational | degraded | outage
    components: dict[str, dict[str, Any]]
    transcript_lag: int | None

    @property
    def transcripts_lagging(self) -> bool:
        return self.components.get("transcript", {}).get("status") == "lagging"


def assess(nats_ok: bool, draining: bool, node: str, beacons: list[Beacon], now_ms: int, lag_warn: int) -> Assessment:
    components: dict[str, dict[str, Any]] = {
        "gateway": {"status": "draining" if draining else "ok", "node": node},
        "nats": {"status": "ok" if nats_ok else "down"},
    }
    fresh = [b for b in beacons if now_ms - b.ts <= BEACON_STALE_S * 1000]
    degraded = False
    lag: int | None = None
    for service in SERVICES:
        mine = [b for b in fresh if b.service == service]
        ready = [b for b in mine if b.ready]
        if not nats_ok:
            state = "unknown"  # we cannot hear them
        elif not ready:
            state = "down"
        elif len(ready) < len(mine):
            state = "degraded"
        else:
            state = "ok"
        comp: dict[str, Any] = {"status": state, "instances": len(mine), "ready": len(ready)}
        if service == "transcript":
            lags = [int(b.checks["lag"]) for b in mine if isinstance(b.checks.get("lag"), int)]
            if lags:
                lag = max(lags)
                comp["lag"] = lag
                if state == "ok" and lag > lag_warn:
                    comp["status"] = "lagging"
        components[service] = comp
        degraded = degraded or comp["status"] not in ("ok", "unknown")
    if not nats_ok:
        overall = "outage"
    elif degraded:
        overall = "degraded"
    else:
        overall = "operational"
    return Assessment(overall, components, lag)


# System-wide notices this gateway raises by itself (ids are stable so the all-clear matches).
NATS_NOTICE = {"t": "notice", "id": "sys-nats", "level": "critical",
               "text": "We are having trouble delivering messages. Messages you send are kept and retried."}
LAG_NOTICE = {"t": "notice", "id": "sys-transcripts", "level": "warning",
              "text": "Chat history is being saved with a delay. Your messages are safe."}


def all_clear(notice: dict[str, Any]) -> dict[str, Any]:
    return {"t": "notice", "id": notice["id"], "level": "info", "text": "Resolved: service is back to normal.",
            "cleared": True}


class StatusBoard:
    """Latest beacon per instance; raises and clears system notices on transitions."""

    def __init__(self, broadcast: Callable[[dict[str, Any]], None], min_interval_s: float = 10.0) -> None:
        self.beacons: dict[tuple[str, str], Beacon] = {}
        self._broadcast = broadcast
        self._active: dict[str, bool] = {}
        self._changed_at: dict[str, float] = {}
        self._min_interval_s = min_interval_s  # a flapping signal raises at most one notice per interval

    def note(self, beacon: Beacon) -> None:
        key = (beacon.service, beacon.node)
        old = self.beacons.get(key)
        if old is None or beacon.ts >= old.ts:
            self.beacons[key] = beacon

    def signal(self, notice: dict[str, Any], on: bool) -> bool:
        """Raise or clear a system notice; True when clients were told something."""
        nid = notice["id"]
        if self._active.get(nid, False) == on:
            return False
        now = time.monotonic()
        if on and now - self._changed_at.get(nid, -1e9) < self._min_interval_s:
            return False  # flapping: stay quiet, the next evaluation will raise it if it persists
        self._active[nid] = on
        self._changed_at[nid] = now
        log.warning("system notice %s %s", nid, "raised" if on else "cleared")
        self._broadcast(notice if on else all_clear(notice))
        return True

    def active_notices(self) -> list[dict[str, Any]]:
        return [n for n in (NATS_NOTICE, LAG_NOTICE) if self._active.get(n["id"])]
