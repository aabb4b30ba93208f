"""OpenAPI 3.1 description of the gateway's HTTP API (served at ``/openapi.json``)."""

from typing import Any

_err = {"$ref": "#/components/schemas/Error"}
_bearer: list[dict[str, list[str]]] = [{"bearer": []}]


def _resp(desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": desc}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


_event = {
    "type": "object",
    "required": ["conv", "seq", "prev", "type", "ts", "data"],
    "properties": {
        "conv": {"type": "string"}, "seq": {"type": "integer"}, "prev": {"type": "integer"},
        "type": {"type": "string", "enum": ["opened", "message", "assigned", "unassigned", "transferred",
                                           "escalated", "notice", "read", "closed"]},
        "ts": {"type": "integer", "description": "Unix milliseconds"}, "data": {"type": "object"},
    },
}
_conv_param = {"name": "conv", "in": "path", "required": True, "schema": {"type": "string"}}
_time = {"oneOf": [{"type": "integer", "description": "Unix milliseconds"},
                  {"type": "string", "format": "date-time"}]}
_filter_params: list[dict[str, Any]] = [
    {"name": "from", "in": "query", "schema": _time}, {"name": "until", "in": "query", "schema": _time},
    {"name": "agent", "in": "query", "schema": {"type": "string"}},
    {"name": "customer", "in": "query", "schema": {"type": "string"}},
    {"name": "queue", "in": "query", "schema": {"type": "string"}},
    {"name": "state", "in": "query", "schema": {"enum": ["queued", "assigned", "closed"]}},
]
_summary = {
    "type": "object",
    "properties": {
        "conv": {"type": "string"}, "state": {"enum": ["queued", "assigned", "closed"]},
        "queue": {"type": ["string", "null"]}, "customer": {"type": ["string", "null"]},
        "agent": {"type": ["string", "null"]}, "opened_at": {"type": "integer"}, "last_ts": {"type": "integer"},
        "last_seq": {"type": "integer"}, "closed_at": {"type": ["integer", "null"]},
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "Parley gateway", "version": "1.0.0",
             "description": "HTTP API of the Parley gateway. The WebSocket protocol v1 lives at GET /v1/ws."},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                       "description": "A user JWT, or PARLEY_ADMIN_KEY on admin routes"}},
        "schemas": {
            "Error": {"type": "object", "required": ["error", "reason"],
                      "properties": {"error": {"type": "string"}, "reason": {"type": "string"}}},
            "Event": _event,
            "ConversationSummary": _summary,
        },
    },
    "paths": {
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": _resp("alive")}}},
        "/readyz": {"get": {"summary": "Readiness: NATS connected, streams ready, not draining",
                            "responses": {"200": _resp("ready"), "503": _resp("not ready")}}},
        "/metrics": {"get": {"summary": "Prometheus metrics (parley_*)", "responses": {"200": {"description": "text"}}}},
        "/v1/ws": {"get": {"summary": "WebSocket protocol v1 (subprotocols parley.v1.json, parley.v1.msgpack)",
                           "responses": {"101": {"description": "switching protocols"}}}},
        "/v1/status": {"get": {
            "summary": "System status and a tenant's notices",
            "parameters": [{"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"}}],
            "responses": {"200": _resp("status", {"type": "object", "required": ["status", "components", "notices"],
                                                   "properties": {"status": {"enum": ["operational", "degraded", "outage"]},
                                                                  "components": {"type": "object"},
                                                                  "notices": {"type": "array"}}})}}},
        "/v1/tokens": {"post": {
            "summary": "Issue a user token (admin key)", "security": _bearer,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["sub", "tenant", "role"],
                "properties": {"sub": {"type": "string"}, "tenant": {"type": "string"},
                               "role": {"enum": ["customer", "agent", "supervisor"]},
                               "skills": {"type": "array", "items": {"type": "string"}},
                               "max_chats": {"type": "integer"}, "name": {"type": "string"},
                               "ttl_s": {"type": "integer", "default": 3600}}}}}},
            "responses": {"200": _resp("token", {"type": "object", "properties": {"token": {"type": "string"}}}),
                          "400": _resp("bad claims", _err), "401": _resp("missing or wrong admin key", _err)}}},
        "/v1/conversations/{conv}/events": {"get": {
            "summary": "A page of a conversation's events: from the stream, and from the transcript store "
                       "for events older than the stream's window", "security": _bearer,
            "parameters": [_conv_param,
                           {"name": "after", "in": "query", "schema": {"type": "integer", "default": 0}},
                           {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 100, "maximum": 1000}}],
            "responses": {"200": _resp("events", {"type": "object", "properties": {
                "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                "next_after": {"type": ["integer", "null"]}}}),
                "400": _resp("bad parameter", _err), "401": _resp("no valid token", _err),
                "404": _resp("not found or not visible", _err)}}},
        "/v1/conversations/{conv}/transcript": {"get": {
            "summary": "The stored transcript (json or text)", "security": _bearer,
            "parameters": [_conv_param, {"name": "format", "in": "query", "schema": {"enum": ["json", "text"]}}],
            "responses": {"200": _resp("transcript", {"type": "object", "properties": {
                "conv": {"type": "string"}, "tenant": {"type": "string"},
                "state": {"enum": ["queued", "assigned", "closed"]},
                "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}}}}),
                "401": _resp("no valid token", _err), "404": _resp("not found or not visible", _err),
                "503": _resp("transcript service unavailable", _err)}}},
        "/v1/conversations": {"get": {
            "summary": "Stored conversations the caller may see, newest first (transcript store)",
            "description": "Customers see their own conversations, agents the ones they hold (or held when it "
                           "closed), supervisors the tenant. from/until bound the conversation's first event.",
            "security": _bearer,
            "parameters": _filter_params + [
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "next_cursor of the previous page (same filters)"},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 50, "maximum": 200}}],
            "responses": {"200": _resp("a page of conversations", {"type": "object", "properties": {
                "conversations": {"type": "array", "items": {"$ref": "#/components/schemas/ConversationSummary"}},
                "next_cursor": {"type": ["string", "null"]}}}),
                "400": _resp("bad parameter", _err), "401": _resp("no valid token", _err),
                "503": _resp("transcript service unavailable", _err)}}},
        "/v1/search": {"get": {
            "summary": "Full-text search over message bodies the caller may see, newest first",
            "description": "Every whitespace-separated term must occur (whole words, case-insensitive). "
                           "from/until bound the message's time.",
            "security": _bearer,
            "parameters": [{"name": "q", "in": "query", "required": True, "schema": {"type": "string", "maxLength": 200}},
                           {"name": "conv", "in": "query", "schema": {"type": "string"}}] + _filter_params + [
                {"name": "cursor", "in": "query", "schema": {"type": "string"}},
                {"name": "limit", "in": "query", "schema": {"type": "integer", "default": 20, "maximum": 100}}],
            "responses": {"200": _resp("a page of matching messages", {"type": "object", "properties": {
                "hits": {"type": "array", "items": {"type": "object", "properties": {
                    "conv": {"type": "string"}, "seq": {"type": "integer"}, "ts": {"type": "integer"},
                    "from": {"type": ["object", "null"]}, "body": {"type": "string"}}}},
                "next_cursor": {"type": ["string", "null"]}}}),
                "400": _resp("bad parameter", _err), "401": _resp("no valid token", _err),
                "503": _resp("transcript service unavailable", _err)}}},
        "/v1/agents": {"get": {"summary": "Agents of the caller's tenant (supervisors)", "security": _bearer,
                               "responses": {"200": _resp("agents"), "401": _resp("no token", _err),
                                             "403": _resp("not a supervisor", _err)}}},
        "/v1/queues": {"get": {"summary": "Queues of the caller's tenant (supervisors)", "security": _bearer,
                               "responses": {"200": _resp("queues"), "401": _resp("no token", _err),
                                             "403": _resp("not a supervisor", _err)}}},
        "/v1/notices": {"post": {
            "summary": "Broadcast an incident banner to a tenant (admin key)", "security": _bearer,
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["tenant", "level", "text"],
                "properties": {"tenant": {"type": "string"}, "level": {"enum": ["info", "warning", "critical"]},
                               "text": {"type": "string"}}}}}},
            "responses": {"201": _resp("created", {"type": "object", "properties": {"id": {"type": "string"}}}),
                          "400": _resp("bad body", _err), "401": _resp("admin key required", _err)}}},
        "/v1/notices/{id}": {"delete": {
            "summary": "End an incident banner (admin key)", "security": _bearer,
            "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": {"204": {"description": "removed"}, "401": _resp("admin key required", _err),
                          "404": _resp("no such notice", _err)}}},
    },
}
