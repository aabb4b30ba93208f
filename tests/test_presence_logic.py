"""Presence decisions without NATS: heartbeats, chosen status, the sweep."""

from __future__ import annotations

import pytest

from parley.core.records import AgentRecord, Heartbeat
from parley.presence.logic import (
    AgentHello,
    apply_heartbeat,
    set_chosen_status,
    sweep_decision,
    sweep_interval_s,
)

HELLO = AgentHello(tenant="t", agent="a", node="gw1", skills=("billing",), max_chats=2)


def online(**changes) -> AgentRecord:
    rec = AgentRecord(agent="a", tenant="t", status="online", chosen="online", since=100, reason="connected",
                      skills=["billing"], max_chats=2, idle_since=100, node="gw1")
    for k, v in changes.items():
        setattr(rec, k, v)
    return rec


def test_first_heartbeat_creates_an_online_record():
    rec = apply_heartbeat(None, HELLO, now=500)
    assert rec is not None
    assert (rec.status, rec.reason, rec.since, rec.idle_since) == ("online", "connected", 500, 500)
    assert rec.skills == ["billing"] and rec.max_chats == 2 and rec.node == "gw1"


def test_heartbeat_of_an_unchanged_online_agent_changes_nothing():
    assert apply_heartbeat(online(), HELLO, now=900) is None


def test_heartbeat_from_another_gateway_does_not_flip_node_but_hello_does():
    other = AgentHello("t", "a", "gw2", ("billing",), 2)
    assert apply_heartbeat(online(), other, now=900) is None
    rec = apply_heartbeat(online(), other, now=900, new_connection=True)
    assert rec is not None and rec.node == "gw2" and rec.since == 100


def test_offline_agent_returns_to_its_chosen_status():
    current = online(status="offline", chosen="away", reason="heartbeat_lost")
    rec = apply_heartbeat(current, HELLO, now=900)
    assert rec is not None and (rec.status, rec.reason, rec.since) == ("away", "reconnected", 900)
    assert current.status == "offline"  # input untouched


def test_new_skills_and_capacity_are_taken_over():
    rec = apply_heartbeat(online(), AgentHello("t", "a", "gw1", ("billing", "sales"), 5), now=900)
    assert rec is not None and rec.skills == ["billing", "sales"] and rec.max_chats == 5
    assert rec.status == "online" and rec.since == 100


def test_set_status_away_and_back():
    away = set_chosen_status(online(), "away", now=700)
    assert away is not None and (away.status, away.chosen, away.reason, away.since) == ("away", "away", "set_by_agent", 700)
    assert set_chosen_status(away, "away", now=800) is None
    back = set_chosen_status(away, "online", now=900)
    assert back is not None and (back.status, back.since) == ("online", 900)


def test_set_status_while_offline_only_remembers_the_choice():
    rec = set_chosen_status(online(status="offline"), "away", now=700)
    assert rec is not None and rec.status == "offline" and rec.chosen == "away"


def test_set_status_refuses_offline():
    with pytest.raises(ValueError):
        set_chosen_status(online(), "offline", now=1)


def test_sweep_marks_offline_only_after_the_ttl():
    hb = Heartbeat(ts=1000, node="gw1")
    assert sweep_decision(online(), hb, now=2000, ttl_ms=1000) is None
    rec = sweep_decision(online(), hb, now=2001, ttl_ms=1000)
    assert rec is not None and (rec.status, rec.reason, rec.since) == ("offline", "heartbeat_lost", 2001)
    assert sweep_decision(online(status="away"), hb, now=2001, ttl_ms=1000) is not None
    assert sweep_decision(rec, hb, now=9999, ttl_ms=1000) is None  # already offline: no write


def test_sweep_without_heartbeat_counts_from_since():
    assert sweep_decision(online(since=1000), None, now=1500, ttl_ms=1000) is None
    assert sweep_decision(online(since=1000), None, now=2500, ttl_ms=1000) is not None


def test_sweep_interval_scales_with_short_ttl():
    assert sweep_interval_s(15000) == 0.5
    assert sweep_interval_s(1000) == 0.25
