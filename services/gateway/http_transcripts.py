"""HTTP routes over the transcript store (answered by the writers over NATS request/reply).

- ``GET /v1/conversations?from=&until=&agent=&customer=&queue=&state=&cursor=&limit=``
- ``GET /v1/search?q=&conv=&from=&until=&agent=&customer=&queue=&state=&cursor=&limit=``
- ``GET /v1/conversations/{conv}/events`` beyond the stream's window (``history_events``)

Visibility is the socket's: customers their own conversations, agents the ones they hold,
supervisors the tenant. The gateway passes the caller as ``viewer`` and the query applies it, so
pages are complete and nothing of another caller leaks into them.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from parley.core import subjects
from parley.core.auth import Identity
from parley.core.errors import UnavailableError
from parley.core.events import Event
from parley.transcript import queries

from .http_api import _caller, _gw, _int_param, _json, fail

QUERY_TIMEOUT_S = 5.0
FILTER_PARAMS = ("from", "until", "agent", "customer", "queue", "state")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/conversations", list_conversations)
    app.router.add_get("/v1/search", search)


def _viewer(who: Identity) -> dict[str, str]:
    return {"role": who.role, "user": who.user}


def _filters(request: web.Request, extra: tuple[str, ...] = ()) -> dict[str, str]:
    return {k: v for k in FILTER_PARAMS + extra if (v := request.query.get(k, "")) != ""}


async def _ask(request: web.Request, subject: str, body: dict[str, Any]) -> dict[str, Any] | web.Response:
    """One request to the transcript writers; their errors mapped to HTTP answers."""
    try:
        reply = await _gw(request).hub.nc.request(subject, orjson.dumps(body), timeout=QUERY_TIMEOUT_S)
        data = orjson.loads(reply.data)
    except Exception:
        return fail(503, "unavailable", "transcript service unavailable")
    error = data.get("error")
    if error == "bad_request":
        return fail(400, "bad_request", str(data.get("reason", "bad request")))
    if error == "not_found":
        return fail(404, "not_found", "no such conversation")
    if error:
        return fail(503, "unavailable", str(data.get("reason", error)))
    return data


async def list_conversations(request: web.Request) -> web.Response:
    who = _caller(request)
    if isinstance(who, web.Response):
        return who
    body = {"tenant": who.tenant, "viewer": _viewer(who), "filters": _filters(request),
            "cursor": request.query.get("cursor") or None,
            "limit": _int_param(request, "limit", queries.DEFAULT_LIMIT, 1, queries.MAX_LIST_LIMIT)}
    data = await _ask(request, queries.LIST_SUBJECT, body)
    return data if isinstance(data, web.Response) else _json(data)


async def search(request: web.Request) -> web.Response:
    who = _caller(request)
    if isinstance(who, web.Response):
        return who
    body = {"tenant": who.tenant, "viewer": _viewer(who), "q": request.query.get("q", ""),
            "filters": _filters(request, ("conv",)), "cursor": request.query.get("cursor") or None,
            "limit": _int_param(request, "limit", 20, 1, queries.MAX_SEARCH_LIMIT)}
    data = await _ask(request, queries.SEARCH_SUBJECT, body)
    return data if isinstance(data, web.Response) else _json(data)


async def history_events(request: web.Request) -> web.Response:
    """``GET /v1/conversations/{conv}/events``: from stream CONV, and from the transcript store for
    what the stream no longer holds (older than its max age) — also once the conversation's record
    has expired with it, when visibility is decided on the stored transcript."""
    who = _caller(request)
    if isinstance(who, web.Response):
        return who
    after = _int_param(request, "after", 0, 0, 2**63)
    limit = _int_param(request, "limit", 100, 1, 1000)
    conv = request.match_info["conv"]
    if not subjects.valid_id(conv):
        return fail(404, "not_found", "no such conversation")
    gw = _gw(request)
    rec = await gw.hub.directory.fetch_conv(who.tenant, conv)
    if rec is not None and not rec.may_see(who.user, who.role, who.tenant):
        return fail(404, "not_found", "no such conversation")
    try:
        first_in_stream = (await gw.hub.js.stream_info(subjects.CONV_STREAM)).state.first_seq
    except Exception:
        return fail(503, "unavailable", "stream unavailable")
    older: list[dict[str, Any]] = []
    if rec is None or after + 1 < first_in_stream:
        # The record expires with the stream window: without it, only the store knows the conversation.
        body = {"tenant": who.tenant, "viewer": _viewer(who), "conv": conv, "after": after,
                "limit": limit + 1, "before": first_in_stream if rec is not None else None}
        data = await _ask(request, queries.EVENTS_SUBJECT, body)
        if isinstance(data, web.Response):
            if rec is None or data.status != 404:
                return data
        else:
            older = data["events"]
        if rec is None or len(older) > limit:
            more = len(older) > limit
            older = older[:limit]
            return _json({"events": older, "next_after": older[-1]["seq"] if more else None})
    resume = older[-1]["seq"] if older else after
    try:
        newer: list[Event] = await gw.hub.reader.read(who.tenant, conv, resume, limit + 1 - len(older))
    except UnavailableError as exc:
        return fail(503, "unavailable", str(exc))
    events = older + [e.as_dict() for e in newer]
    more = len(events) > limit
    events = events[:limit]
    return _json({"events": events, "next_after": events[-1]["seq"] if more else None})
