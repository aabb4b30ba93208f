"""Prometheus metrics of the router (``parley_router_*``), defined once per process."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OFFERS = Counter("parley_router_offers_total", "Offers made to agents")
OFFER_EXPIRIES = Counter("parley_router_offer_expiries_total", "Offers that lapsed and went back to the queue")
ASSIGNMENTS = Counter("parley_router_assignments_total", "Conversations assigned to an agent", ["how"])
REQUEUES = Counter("parley_router_requeues_total", "Conversations put back into a queue", ["reason"])
OPS = Counter("parley_router_ops_total", "Routing commands from the ROUTE stream", ["op", "result"])
CAS_CONFLICTS = Counter("parley_router_cas_conflicts_total", "Compare-and-sets lost to another writer", ["record"])
SLOT_REPAIRS = Counter("parley_router_slot_repairs_total", "Agent capacity slots corrected after a crash")
ERRORS = Counter("parley_router_errors_total", "Failed passes or commands (retried)", ["stage"])
DECISION_SECONDS = Histogram(
    "parley_router_decision_seconds",
    "Time to store one routing decision (slot reservation + conversation compare-and-set)",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)
WAIT_SECONDS = Histogram(
    "parley_router_wait_seconds",
    "Time a conversation waited in its queue before an offer or assignment",
    buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600),
)
QUEUE_FRAMES = Counter("parley_router_queue_frames_total", "Queue position frames sent to waiting customers")
WAIT_NOTICES = Counter("parley_router_wait_notices_total", "Persisted notices about a queue's staffing", ["kind"])
ABANDONED = Counter("parley_router_abandoned_total", "Waiting conversations closed because the customer left")

QUEUE_DEPTH = Gauge("parley_router_queue_depth", "Conversations waiting (queued or offered) per queue", ["tenant", "queue"])
QUEUE_OLDEST_WAIT = Gauge("parley_router_queue_oldest_wait_seconds", "Longest current wait per queue", ["tenant", "queue"])
QUEUE_AGENTS_ONLINE = Gauge("parley_router_queue_agents_online", "Online agents serving the queue (full or not)",
                            ["tenant", "queue"])
