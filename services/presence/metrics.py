"""Prometheus metrics of presence (``parley_presence_*``), defined once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

AGENTS = Gauge("parley_presence_agents", "Agents known to this presence instance, by status", ["status"])
TRANSITIONS = Counter(
    "parley_presence_transitions_total", "Agent status transitions written by this instance", ["status", "reason"]
)
HEARTBEATS = Counter("parley_presence_heartbeats_total", "Agent heartbeats received")
HEARTBEAT_WRITES = Counter("parley_presence_heartbeat_writes_total", "Heartbeat times stored in KV")
ERRORS = Counter("parley_presence_errors_total", "Failures handling heartbeats or sweeps", ["stage"])
