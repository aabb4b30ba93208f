"""``parley incident --since … --until …``: the post-incident timeline, from the streams.

Reads the audit trail (stream ``AUDIT``: presence changes, NATS reconnects, nack bursts,
notices, transcript lag) and the conversation events that tell the customer's side (stream
``CONV``: re-queues, escalations, abandoned chats, in-chat notices) in one time window, and
prints them in order with a summary — as text or JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from nats.js import api as jsapi

from parley.core import bus, subjects
from parley.core.audit import AUDIT_STREAM
from parley.core.config import Settings
from parley.core.errors import ParleyError

CONV_TYPES_OF_INTEREST = ("unassigned", "escalated", "notice", "transferred", "closed")
_RELATIVE = re.compile(r"^-?(\d+)([smhd])$")


def parse_time(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (``2026-11-22T12:00:00Z``), ``now``, or a duration ago (``15m``, ``-2h``)."""
    now = now or datetime.now(UTC)
    text = text.strip()
    if text == "now":
        return now
    m = _RELATIVE.match(text)
    if m:
        amount, unit = int(m.group(1)), m.group(2)
        return now - timedelta(**{{"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[unit]: amount})
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a time: {text!r} (ISO 8601, 'now' or e.g. 15m)") from exc
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("incident", help="post-incident timeline from the streams (NATS at PARLEY_NATS_URL)")
    p.add_argument("--since", required=True, type=parse_time, help="ISO time, or a duration ago like 30m")
    p.add_argument("--until", default="now", type=parse_time)
    p.add_argument("--tenant", default=None, help="only this tenant (system-wide entries are kept)")
    p.add_argument("--format", choices=("text", "json"), default="text")


async def _read(js: Any, stream: str, subject: str, since: datetime, until: datetime) -> list[tuple[int, str, bytes]]:
    """(timestamp ms, subject, payload) of a stream's messages in [since, until], in order."""
    config = jsapi.ConsumerConfig(deliver_policy=jsapi.DeliverPolicy.BY_START_TIME, opt_start_time=since,
                                  ack_policy=jsapi.AckPolicy.NONE, inactive_threshold=30)
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
    out: list[tuple[int, str, bytes]] = []
    try:
        while True:
            try:
                msgs = await sub.fetch(500, timeout=1)
            except Exception:  # nats TimeoutError: nothing more right now
                break
            done = False
            for msg in msgs:
                ts = msg.metadata.timestamp
                if ts > until:
                    done = True
                    break
                out.append((int(ts.timestamp() * 1000), msg.subject, msg.data))
            if done or (msgs and msgs[-1].metadata.num_pending == 0):
                break
    finally:
        await sub.unsubscribe()
    return out


def conv_entry(ts: int, subject: str, payload: bytes) -> dict[str, Any] | None:
    tenant, conv = subjects.split_conv_subject(subject)
    try:
        body = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    kind, data = body.get("type"), body.get("data") or {}
    if kind not in CONV_TYPES_OF_INTEREST:
        return None
    if kind == "closed" and data.get("reason") != "abandoned":
        return None
    entry = {"ts": ts, "kind": "routing" if kind != "notice" else "notice", "tenant": tenant, "conv": conv,
             "event": kind, **{k: v for k, v in data.items() if k in ("agent", "reason", "to_queue", "from_queue",
                                                                    "level", "text")}}
    return entry


def describe(e: dict[str, Any]) -> str:
    who = f"{e.get('tenant') or 'system'}"
    kind = e["kind"]
    if kind == "presence":
        return f"{who}/{e.get('agent')} {e.get('status')}" + (f" ({e['reason']})" if e.get("reason") else "")
    if kind == "nats":
        return f"{e.get('service')} {e.get('node')} NATS {e.get('event')}" + (
            f" after {e['down_s']} s down" if e.get("down_s") is not None else "")
    if kind == "nack":
        return f"{who}: {e.get('count')} × nack {e.get('code')} in {e.get('window_s')} s ({e.get('node')})"
    if kind == "lag":
        return f"transcript lag {e.get('event')} (lag {e.get('lag')} events)"
    if kind == "notice" and "conv" in e:
        return f"{who}/{e['conv']} notice [{e.get('level')}] {e.get('text')}"
    if kind == "notice":
        return f"{who} banner {e.get('event')} {e.get('id')}" + (f" [{e['level']}] {e['text']}" if e.get("text") else "")
    if e.get("event") == "unassigned":
        return f"{who}/{e['conv']} re-queued: agent {(e.get('agent') or {}).get('id')} lost ({e.get('reason')})"
    if e.get("event") == "escalated":
        return f"{who}/{e['conv']} escalated to {e.get('to_queue')} ({e.get('reason')})"
    if e.get("event") == "transferred":
        return f"{who}/{e['conv']} transferred {e.get('from_queue')} → {e.get('to_queue')}"
    if e.get("event") == "closed":
        return f"{who}/{e['conv']} closed: abandoned while waiting"
    return f"{who} {orjson.dumps(e).decode()}"


def summarize(entries: list[dict[str, Any]]) -> dict[str, Any]:
    c: Counter[str] = Counter()
    lag_peak = 0
    for e in entries:
        if e["kind"] == "presence":
            c["agents_offline" if e.get("status") == "offline" else "agents_back"] += 1
        elif e["kind"] == "nats" and e.get("event") == "reconnected":
            c["nats_reconnects"] += 1
        elif e["kind"] == "nack":
            c["nacks"] += int(e.get("count") or 0)
        elif e["kind"] == "lag":
            lag_peak = max(lag_peak, int(e.get("lag") or 0))
        elif e["kind"] == "notice":
            c["notices"] += 1
        elif e.get("event") == "unassigned":
            c["requeued"] += 1
        elif e.get("event") == "escalated":
            c["escalated"] += 1
        elif e.get("event") == "closed":
            c["abandoned"] += 1
    keys = ("agents_offline", "agents_back", "requeued", "escalated", "abandoned", "nacks", "nats_reconnects", "notices")
    return {**{k: c.get(k, 0) for k in keys}, "transcript_lag_peak": lag_peak}


async def timeline(settings: Settings, since: datetime, until: datetime, tenant: str | None) -> dict[str, Any]:
    nc = await bus.connect(settings, "incident")
    try:
        js = nc.jetstream()
        audit_subject = "audit.>"
        conv_subject = f"conv.{tenant}.*" if tenant else "conv.>"
        entries: list[dict[str, Any]] = []
        for _ts, _subject, payload in await _read(js, AUDIT_STREAM, audit_subject, since, until):
            e = orjson.loads(payload)
            if tenant is None or e.get("tenant") in (tenant, None):
                entries.append(e)
        for ts, subject, payload in await _read(js, subjects.CONV_STREAM, conv_subject, since, until):
            conv = conv_entry(ts, subject, payload)
            if conv is not None:
                entries.append(conv)
    finally:
        await nc.close()
    entries.sort(key=lambda e: e["ts"])
    return {"since": since.isoformat(), "until": until.isoformat(), "tenant": tenant, "entries": entries,
            "summary": summarize(entries)}


def render_text(report: dict[str, Any]) -> str:
    lines = [f"Incident timeline {report['since']} → {report['until']}"
             + (f" (tenant {report['tenant']})" if report["tenant"] else "")]
    for e in report["entries"]:
        when = datetime.fromtimestamp(e["ts"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        lines.append(f"{when}  {e['kind']:<9} {describe(e)}")
    if not report["entries"]:
        lines.append("(nothing recorded in this window)")
    s = report["summary"]
    lines.append("")
    lines.append("Summary: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in s.items()))
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    if args.until < args.since:
        print("parley incident: --until is before --since", file=sys.stderr)
        return 2
    try:
        settings = Settings.from_env(service="incident")
        report = asyncio.run(timeline(settings, args.since, args.until, args.tenant))
    except ParleyError as exc:
        print(f"parley incident: {exc}", file=sys.stderr)
        return 1
    if args.format == "json":
        sys.stdout.write(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_text(report))
    return 0
