"""The gateway's HTTP API (SPEC §6). Errors are JSON ``{"error": code, "reason": text}``."""

from __future__ import annotations

import hmac
import time
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from parley.core import bus, subjects
from parley.core.auth import Identity, issue_token, verify_token
from parley.core.errors import AuthError
from parley.core.events import now_ms
from parley.core.records import ConvRecord, Notice

from .openapi import OPENAPI

if TYPE_CHECKING:
    from .app import GatewayService

NOTICE_LEVELS = ("info", "warning", "critical")
MAX_NOTICE_TEXT = 2000


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/status", status)
    app.router.add_post("/v1/tokens", tokens)
    app.router.add_get("/v1/conversations/{conv}/events", conversation_events)
    app.router.add_get("/v1/conversations/{conv}/transcript", conversation_transcript)
    app.router.add_get("/v1/agents", agents)
    app.router.add_get("/v1/queues", queues)
    app.router.add_post("/v1/notices", post_notice)
    app.router.add_delete("/v1/notices/{id}", delete_notice)
    from . import http_transcripts  # imports this module: imported here, once this one is loaded

    http_transcripts.add_routes(app)


def _gw(request: web.Request) -> GatewayService:
    from .app import GATEWAY_KEY

    return request.app[GATEWAY_KEY]


def fail(status: int, code: str, reason: str) -> web.Response:
    return web.json_response({"error": code, "reason": reason}, status=status)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return None
    return header[len("Bearer "):].strip() or None


def _caller(request: web.Request) -> Identity | web.Response:
    try:
        return verify_token(_bearer(request), _gw(request).settings.jwt_secret)
    except AuthError as exc:
        return fail(401, "unauthorized", str(exc))


def _is_admin(request: web.Request) -> bool:
    key = _gw(request).settings.admin_key
    given = _bearer(request)
    return bool(key) and given is not None and hmac.compare_digest(given.encode(), key.encode())


async def _visible_conv(request: web.Request, who: Identity) -> ConvRecord | web.Response:
    conv = request.match_info["conv"]
    rec = await _gw(request).hub.directory.fetch_conv(who.tenant, conv) if subjects.valid_id(conv) else None
    if rec is None or not rec.may_see(who.user, who.role, who.tenant):
        return fail(404, "not_found", "no such conversation")
    return rec


def _int_param(request: web.Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(text=orjson.dumps({"error": "bad_request", "reason": f"{name} must be an integer"}).decode(),
                                 content_type="application/json") from None
    if not lo <= value <= hi:
        raise web.HTTPBadRequest(text=orjson.dumps({"error": "bad_request", "reason": f"{name} must be {lo}..{hi}"}).decode(),
                                 content_type="application/json")
    return value


# --- public --------------------------------------------------------------------------------------
async def openapi(request: web.Request) -> web.Response:
    return _json(OPENAPI)


async def status(request: web.Request) -> web.Response:
    gw = _gw(request)
    assessment = gw.assessment()
    tenant = request.query.get("tenant")
    notices = [n.frame() for n in gw.notices(tenant)] if tenant else []
    notices += [dict(n) for n in gw.board.active_notices()]  # system-wide trouble concerns every tenant
    for n in notices:
        n.pop("t", None)
    overall, components = assessment.status, assessment.components
    if overall == "operational" and any(n["level"] in ("warning", "critical") for n in notices):
        overall = "degraded"
    return _json({"status": overall, "components": components, "notices": notices})


# --- admin ---------------------------------------------------------------------------------------
async def _admin_body(request: web.Request) -> dict[str, Any] | web.Response:
    """The JSON object body of an admin request, or the 401/400 answer."""
    if not _is_admin(request):
        return fail(401, "unauthorized", "admin key required (Authorization: Bearer <PARLEY_ADMIN_KEY>)")
    try:
        body = await request.json(loads=orjson.loads)
    except ValueError:
        return fail(400, "bad_request", "body must be JSON")
    if not isinstance(body, dict):
        return fail(400, "bad_request", "body must be a JSON object")
    return body


async def tokens(request: web.Request) -> web.Response:
    body = await _admin_body(request)
    if isinstance(body, web.Response):
        return body
    ttl = body.get("ttl_s", 3600)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 30 * 24 * 3600:
        return fail(400, "bad_request", "ttl_s must be an integer 1..2592000")
    try:
        token = issue_token({**body, "exp": 0}, _gw(request).settings.jwt_secret, ttl)
    except AuthError as exc:
        return fail(400, "bad_request", str(exc))
    return _json({"token": token})


async def post_notice(request: web.Request) -> web.Response:
    body = await _admin_body(request)
    if isinstance(body, web.Response):
        return body
    tenant, level, text = body.get("tenant"), body.get("level"), body.get("text")
    if not subjects.valid_id(tenant):
        return fail(400, "bad_request", "tenant must be 1-64 characters of [A-Za-z0-9_-]")
    if level not in NOTICE_LEVELS:
        return fail(400, "bad_request", f"level must be one of {NOTICE_LEVELS}")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_NOTICE_TEXT:
        return fail(400, "bad_request", f"text must be 1..{MAX_NOTICE_TEXT} characters")
    notice = Notice(id="n" + uuid.uuid4().hex[:15], tenant=tenant, level=level, text=text, created=now_ms())
    gw = _gw(request)
    try:
        revision = await gw.buckets.notices.put(subjects.kv_key(tenant, notice.id), notice.encode())
        await gw.hub.nc.publish(subjects.tenant_notice_subject(tenant), orjson.dumps(notice.frame()))
    except bus.NOT_DURABLE_ERRORS:
        return fail(503, "unavailable", "NATS unavailable; notice not stored")
    gw.note_notice(notice, revision)
    await gw.audit("notice", tenant, event="posted", id=notice.id, level=level, text=text)
    return _json({"id": notice.id}, status=201)


async def delete_notice(request: web.Request) -> web.Response:
    if not _is_admin(request):
        return fail(401, "unauthorized", "admin key required")
    gw = _gw(request)
    notice = gw.find_notice(request.match_info["id"])
    if notice is None:
        return fail(404, "not_found", "no such notice")
    try:
        await gw.buckets.notices.delete(subjects.kv_key(notice.tenant, notice.id))
        cleared = {"t": "notice", "id": notice.id, "level": "info", "text": f"Resolved: {notice.text}", "cleared": True}
        await gw.hub.nc.publish(subjects.tenant_notice_subject(notice.tenant), orjson.dumps(cleared))
    except bus.NOT_DURABLE_ERRORS:
        return fail(503, "unavailable", "NATS unavailable; notice not removed")
    gw.forget_notice(notice)
    await gw.audit("notice", notice.tenant, event="deleted", id=notice.id)
    return web.Response(status=204)


# --- conversations -------------------------------------------------------------------------------
async def conversation_events(request: web.Request) -> web.Response:
    """From the stream, and from the transcript store beyond the stream's window."""
    from .http_transcripts import history_events

    return await history_events(request)


async def conversation_transcript(request: web.Request) -> web.Response:
    who = _caller(request)
    if isinstance(who, web.Response):
        return who
    rec = await _visible_conv(request, who)
    if isinstance(rec, web.Response):
        return rec
    fmt = request.query.get("format", "json")
    if fmt not in ("json", "text"):
        return fail(400, "bad_request", "format must be json or text")
    gw = _gw(request)
    try:
        reply = await gw.hub.nc.request(subjects.TRANSCRIPT_GET, orjson.dumps({"tenant": rec.tenant, "conv": rec.conv}), timeout=5)
        data = orjson.loads(reply.data)
    except Exception:
        return fail(503, "unavailable", "transcript service unavailable")
    if data.get("error") == "not_found":
        data = {"conv": rec.conv, "tenant": rec.tenant, "state": rec.client_state, "events": []}
    elif "error" in data:
        return fail(503, "unavailable", str(data["error"]))
    data.pop("last_seq", None)
    if fmt == "json":
        return _json(data)
    return web.Response(text=transcript_text(data), content_type="text/plain", charset="utf-8")


def transcript_text(data: dict[str, Any]) -> str:
    lines = [f"# conversation {data['conv']} ({data['tenant']}) — {data['state']}"]
    for ev in data["events"]:
        when = datetime.fromtimestamp(ev["ts"] / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S")
        d = ev.get("data") or {}
        kind = ev["type"]
        if kind == "message":
            who = d.get("from", {})
            line = f"{who.get('role', '?')} {who.get('id', '?')}: {d.get('body', '')}"
        elif kind == "opened":
            line = f"opened in queue {d.get('queue')} by customer {d.get('customer', {}).get('id')}"
        elif kind in ("assigned", "unassigned"):
            line = f"{kind} agent {d.get('agent', {}).get('id')}" + (f" ({d['reason']})" if d.get("reason") else "")
        elif kind == "closed":
            by = d.get("by") or {}
            line = f"closed ({d.get('reason')}) by {by.get('role', 'system')} {by.get('id', '')}".rstrip()
        elif kind == "notice":
            line = f"notice [{d.get('level')}]: {d.get('text')}"
        else:
            line = f"{kind} {orjson.dumps(d).decode()}"
        lines.append(f"[{when}] #{ev['seq']} {line}")
    return "\n".join(lines) + "\n"


# --- supervisors ---------------------------------------------------------------------------------
def _supervisor(request: web.Request) -> Identity | web.Response:
    who = _caller(request)
    if isinstance(who, web.Response):
        return who
    if who.role != "supervisor":
        return fail(403, "forbidden", "supervisors only")
    return who


async def agents(request: web.Request) -> web.Response:
    who = _supervisor(request)
    if isinstance(who, web.Response):
        return who
    gw = _gw(request)
    out = []
    for a in gw.hub.directory.tenant_agents(who.tenant):
        hb_ms = None
        try:
            raw, _ = await bus.kv_read(gw.buckets.heartbeats, subjects.kv_key(a.tenant, a.agent))
            hb_ms = orjson.loads(raw)["ts"] if raw else None
        except Exception:
            pass
        out.append({"id": a.agent, "status": a.status, "load": a.load, "max_chats": a.max_chats,
                    "skills": a.skills, "last_heartbeat": hb_ms, "node": a.node})
    return _json({"agents": out})


async def queues(request: web.Request) -> web.Response:
    who = _supervisor(request)
    if isinstance(who, web.Response):
        return who
    gw = _gw(request)
    now = time.time() * 1000
    stats: dict[str, dict[str, Any]] = {}
    for c in gw.hub.directory.tenant_convs(who.tenant):
        if c.state not in ("queued", "offered"):
            continue
        q = stats.setdefault(c.queue, {"queue": c.queue, "depth": 0, "oldest_wait_s": 0, "agents_online": 0})
        q["depth"] += 1
        q["oldest_wait_s"] = max(q["oldest_wait_s"], int((now - c.queued_at) / 1000))
    agents_ = gw.hub.directory.tenant_agents(who.tenant)
    for a in agents_:
        for skill in a.skills:
            stats.setdefault(skill, {"queue": skill, "depth": 0, "oldest_wait_s": 0, "agents_online": 0})
    for q in stats.values():
        q["agents_online"] = sum(1 for a in agents_ if a.status == "online" and q["queue"] in a.skills)
    return _json({"queues": sorted(stats.values(), key=lambda q: q["queue"])})
