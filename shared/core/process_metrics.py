"""Metrics every Parley process exports, whatever its service."""

from prometheus_client import Counter, Gauge

NATS_RECONNECTS = Counter("parley_nats_reconnects_total", "NATS reconnections of this process", ["client"])
NATS_DISCONNECTS = Counter("parley_nats_disconnects_total", "NATS disconnections of this process", ["client"])
SERVICE_READY = Gauge("parley_service_ready", "1 while this process reports ready (as /readyz)", ["service"])
EVENT_LOOP_LAG = Gauge("parley_event_loop_lag_seconds", "How late the asyncio loop ran a 0.5 s timer, last sample")
