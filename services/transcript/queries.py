"""Queries the writers answer over NATS request/reply (queue group ``transcript``): the request
shapes, their validation, cursors and the visibility rule, over any ``TranscriptStore``.

Subjects (the gateway is the only caller; it passes the authenticated caller as ``viewer``):

| subject | request | reply |
|---|---|---|
| ``transcript.get`` | ``{tenant, conv}`` | ``{conv, tenant, state, events, last_seq}`` |
| ``transcript.list`` | ``{tenant, viewer, filters, cursor?, limit?}`` | ``{conversations, next_cursor}`` |
| ``transcript.search`` | ``{tenant, viewer, q, filters, cursor?, limit?}`` | ``{hits, next_cursor}`` |
| ``transcript.events`` | ``{tenant, viewer, conv, after, limit, before?}`` | ``{conv, tenant, state, events}`` |

``viewer`` is ``{"role", "user"}``: customers see their own conversations, agents the ones they
hold (or held when it closed), supervisors the whole tenant — the socket's rule, applied inside
the query so that pages are complete. Errors: ``{"error": "bad_request"|"not_found"|"unavailable",
"reason"?}``. Cursors are opaque (base64 of JSON) and only valid with the same filters.
"""

from __future__ import annotations

import base64
import binascii
from datetime import UTC, datetime
from typing import Any

import orjson

from parley.core import subjects

from .storage import CONV_STATES, ConvFilter, TranscriptStore
from .view import chained_events

LIST_SUBJECT = "transcript.list"
SEARCH_SUBJECT = "transcript.search"
EVENTS_SUBJECT = "transcript.events"
QUERY_SUBJECTS = (LIST_SUBJECT, SEARCH_SUBJECT, EVENTS_SUBJECT)

DEFAULT_LIMIT = 50
MAX_LIST_LIMIT = 200
MAX_SEARCH_LIMIT = 100
MAX_EVENTS_LIMIT = 1001  # the gateway asks for one more than its page (1000) to know if there is more
MAX_QUERY_CHARS = 200
MAX_TERMS = 16
VIEWER_ROLES = ("customer", "agent", "supervisor")
FILTER_IDS = ("agent", "customer", "queue")


class BadRequest(ValueError):
    pass


def parse_time(value: object, name: str) -> int | None:
    """Unix milliseconds from an integer (or its text) or an ISO 8601 time (UTC unless it says)."""
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise BadRequest(f"{name} must be Unix milliseconds or an ISO 8601 time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return int(when.timestamp() * 1000)
    raise BadRequest(f"{name} must be Unix milliseconds or an ISO 8601 time")


def encode_cursor(value: Any) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(value)).decode().rstrip("=")


def decode_cursor(cursor: object) -> Any:
    if cursor is None or cursor == "":
        return None
    if not isinstance(cursor, str) or len(cursor) > 200:
        raise BadRequest("bad cursor")
    try:
        return orjson.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (ValueError, binascii.Error):
        raise BadRequest("bad cursor") from None


def _limit(value: object, maximum: int, default: int = DEFAULT_LIMIT) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= maximum:
        raise BadRequest(f"limit must be 1..{maximum}")
    return value


def conv_filter(tenant: object, viewer: object, filters: object) -> ConvFilter | None:
    """The filter a viewer's request becomes; ``None`` when it can match nothing the viewer may see
    (a customer asking for another customer's conversations)."""
    if not subjects.valid_id(tenant):
        raise BadRequest("tenant must be an id")
    assert isinstance(tenant, str)
    if not isinstance(viewer, dict) or viewer.get("role") not in VIEWER_ROLES or not subjects.valid_id(
            viewer.get("user")):
        raise BadRequest("viewer must be {role, user}")
    filters = filters or {}
    if not isinstance(filters, dict):
        raise BadRequest("filters must be an object")
    ids: dict[str, str | None] = {}
    for name in FILTER_IDS:
        value = filters.get(name)
        if value is not None and not subjects.valid_id(value):
            raise BadRequest(f"{name} must be an id")
        ids[name] = value
    state = filters.get("state")
    if state is not None and state not in CONV_STATES:
        raise BadRequest(f"state must be one of {CONV_STATES}")
    since, until = parse_time(filters.get("from"), "from"), parse_time(filters.get("until"), "until")
    role, user = viewer["role"], viewer["user"]
    if role in ("customer", "agent"):  # their own only: a different explicit filter matches nothing
        if ids[role] not in (None, user):
            return None
        ids[role] = user
    return ConvFilter(tenant, since_ms=since, until_ms=until, agent=ids["agent"], customer=ids["customer"],
                      queue=ids["queue"], state=state)


def search_terms(q: object) -> list[str]:
    if not isinstance(q, str) or not q.strip() or len(q) > MAX_QUERY_CHARS:
        raise BadRequest(f"q must be 1..{MAX_QUERY_CHARS} characters")
    terms = q.split()
    if len(terms) > MAX_TERMS:
        raise BadRequest(f"at most {MAX_TERMS} search terms")
    return terms


async def answer_list(store: TranscriptStore, req: dict[str, Any]) -> dict[str, Any]:
    where = conv_filter(req.get("tenant"), req.get("viewer"), req.get("filters"))
    limit = _limit(req.get("limit"), MAX_LIST_LIMIT)
    cursor = decode_cursor(req.get("cursor"))
    if cursor is not None and not (isinstance(cursor, list) and len(cursor) == 2 and isinstance(cursor[0], int)
                                   and isinstance(cursor[1], str)):
        raise BadRequest("bad cursor")
    if where is None:
        return {"conversations": [], "next_cursor": None}
    page = await store.list_conversations(where, (cursor[0], cursor[1]) if cursor else None, limit + 1)
    more = len(page) > limit
    page = page[:limit]
    return {"conversations": [c.as_dict() for c in page],
            "next_cursor": encode_cursor([page[-1].first_ts, page[-1].conv]) if more else None}


async def answer_search(store: TranscriptStore, req: dict[str, Any]) -> dict[str, Any]:
    filters = req.get("filters") or {}
    where = conv_filter(req.get("tenant"), req.get("viewer"), filters)
    terms = search_terms(req.get("q"))
    limit = _limit(req.get("limit"), MAX_SEARCH_LIMIT)
    conv = filters.get("conv") if isinstance(filters, dict) else None
    if conv is not None and not subjects.valid_id(conv):
        raise BadRequest("conv must be an id")
    cursor = decode_cursor(req.get("cursor"))
    if cursor is not None and (not isinstance(cursor, int) or isinstance(cursor, bool)):
        raise BadRequest("bad cursor")
    if where is None:
        return {"hits": [], "next_cursor": None}
    hits = await store.search(where, terms, cursor, limit + 1, conv=conv)
    more = len(hits) > limit
    hits = hits[:limit]
    return {"hits": [h.as_dict() for h in hits], "next_cursor": encode_cursor(hits[-1].seq) if more else None}


async def answer_events(store: TranscriptStore, req: dict[str, Any]) -> dict[str, Any]:
    """A page of one conversation's stored events (history beyond the stream's window)."""
    tenant, conv, viewer = req.get("tenant"), req.get("conv"), req.get("viewer")
    if conv_filter(tenant, viewer, None) is None or not subjects.valid_id(conv):
        raise BadRequest("conv must be an id")
    assert isinstance(tenant, str) and isinstance(conv, str) and isinstance(viewer, dict)
    after, before = req.get("after", 0), req.get("before")
    if not isinstance(after, int) or after < 0 or (before is not None and not isinstance(before, int)):
        raise BadRequest("after and before must be integers")
    limit = _limit(req.get("limit"), MAX_EVENTS_LIMIT, 100)
    summary = await store.conversation(tenant, conv)
    if summary is None or not summary.may_see(viewer["user"], viewer["role"]):
        return {"error": "not_found"}
    rows = await store.events(tenant, conv, after, limit, before)
    events = chained_events(rows, first_prev=after)
    return {"conv": conv, "tenant": tenant, "state": summary.state, "events": events}


ANSWERS = {LIST_SUBJECT: answer_list, SEARCH_SUBJECT: answer_search, EVENTS_SUBJECT: answer_events}
