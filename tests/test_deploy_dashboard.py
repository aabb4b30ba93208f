"""The Grafana dashboard shipped in deploy/ only shows metrics the code exports."""

import json
import re
from pathlib import Path

from test_deploy_chart import exposed_names

DASHBOARD = Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "parley.json"


def test_every_metric_on_the_dashboard_exists():
    exposed = exposed_names()
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            for metric in re.findall(r"\b(parley_[a-z0-9_]+)", target["expr"]):
                assert metric in exposed, f"{panel['title']}: {metric} is not exported by services/ or shared/"
                used.add(metric.removesuffix("_bucket"))
    # the signals the issue names are all on it
    for needed in ("parley_gateway_connections", "parley_gateway_nacks_total", "parley_gateway_ack_latency_seconds",
                   "parley_router_queue_depth", "parley_router_queue_oldest_wait_seconds", "parley_presence_agents",
                   "parley_transcript_lag_events", "parley_nats_reconnects_total", "parley_event_loop_lag_seconds",
                   "parley_router_offers_total", "parley_router_offer_expiries_total"):
        assert needed in used, needed
