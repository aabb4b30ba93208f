"""The gateway's web pages: the customer widget, the agent console, the supervisor view and the demo.

Static files live in ``web/`` beside this module (shipped as package data) and are served from
memory:

- ``/`` and ``/demo`` — demo page linking the three; ``/demo/embed`` — the widget in another page
- ``/widget``, ``/console``, ``/supervisor`` — configured by the URL fragment (``#token=…&urls=…``)
- ``/web/<file>`` — ``parley.js`` and the pages' modules and stylesheet; scripts and styles carry
  ``Access-Control-Allow-Origin: *`` so other sites can embed the widget with one module tag

Demo tokens (``/demo/tokens``, ``/demo/token?role=``) exist only when ``PARLEY_DEMO_TOKENS=1``, which
``parley dev`` sets for its gateway: they mint tokens of tenant ``demo`` for anyone who asks, so a
production gateway never has them (404).
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from parley.core.auth import issue_token

DEMO_TENANT = "demo"
DEMO_TTL_S = 8 * 3600
DEMO_COOKIE = "parley_demo_customer"
DEMO_ENV = "PARLEY_DEMO_TOKENS"

PAGES = {
    "/": "index.html",
    "/demo": "index.html",
    "/demo/embed": "embed.html",
    "/widget": "widget.html",
    "/console": "console.html",
    "/supervisor": "supervisor.html",
}
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html"}
ASSET_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*\.(js|css|html)$")
# No inline script or style anywhere: a message body that somehow became markup could not run.
PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self' ws: wss:; "
            "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'self'")

WEB_FILES: web.AppKey[dict[str, bytes]] = web.AppKey("web_files")


def web_files() -> dict[str, bytes]:
    """Every file of the ``web`` package-data folder, by name."""
    folder = resources.files("parley.gateway").joinpath("web")
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and ASSET_NAME.match(f.name)}


def demo_tokens_enabled() -> bool:
    return os.environ.get(DEMO_ENV) == "1"


def add_routes(app: web.Application) -> None:
    app[WEB_FILES] = web_files()
    for path, name in PAGES.items():
        app.router.add_get(path, _page(name))
    app.router.add_get("/web/{name}", asset)
    app.router.add_get("/demo/tokens", demo_tokens)
    app.router.add_get("/demo/token", demo_token)


def _file(request: web.Request, name: str) -> bytes:
    body = request.app[WEB_FILES].get(name) if ASSET_NAME.match(name) else None
    if body is None:
        raise web.HTTPNotFound()
    return body


def _page(name: str) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(body=_file(request, name), content_type="text/html", charset="utf-8", headers={
            "Content-Security-Policy": PAGE_CSP,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-cache",
        })

    return handler


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    body = _file(request, name)
    ext = name[name.rindex("."):]
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    if ext in (".js", ".css"):
        headers["Access-Control-Allow-Origin"] = "*"
    else:
        headers["Content-Security-Policy"] = PAGE_CSP
    return web.Response(body=body, content_type=CONTENT_TYPES[ext], charset="utf-8", headers=headers)


# --- demo tokens (parley dev only) -----------------------------------------------------------------
def _demo_customer(request: web.Request) -> str:
    cookie = request.cookies.get(DEMO_COOKIE, "")
    return cookie if re.fullmatch(r"[a-f0-9]{8,16}", cookie) else secrets.token_hex(4)


def _mint(request: web.Request, role: str, customer_id: str) -> str:
    from .app import GATEWAY_KEY

    secret = request.app[GATEWAY_KEY].settings.jwt_secret
    by_role: dict[str, dict[str, Any]] = {
        "customer": {"sub": f"customer-{customer_id}", "role": "customer", "name": "Demo customer"},
        "agent": {"sub": "agent-1", "role": "agent", "skills": ["support"], "max_chats": 3, "name": "Alex"},
        "agent2": {"sub": "agent-2", "role": "agent", "skills": ["support", "tier2"], "max_chats": 3, "name": "Sam"},
        "supervisor": {"sub": "supervisor-1", "role": "supervisor", "name": "Morgan"},
    }
    return issue_token({**by_role[role], "tenant": DEMO_TENANT}, secret, DEMO_TTL_S)


def _demo_response(request: web.Request, data: dict[str, str], customer_id: str) -> web.Response:
    resp = web.json_response(data, headers={"Cache-Control": "no-store"})
    resp.set_cookie(DEMO_COOKIE, customer_id, httponly=True, samesite="Lax", path="/", max_age=DEMO_TTL_S)
    return resp


async def demo_tokens(request: web.Request) -> web.Response:
    if not demo_tokens_enabled():
        raise web.HTTPNotFound()
    customer_id = _demo_customer(request)
    data = {role: _mint(request, role, customer_id) for role in ("customer", "agent", "agent2", "supervisor")}
    return _demo_response(request, {"tenant": DEMO_TENANT, "customer_id": f"customer-{customer_id}", **data}, customer_id)


async def demo_token(request: web.Request) -> web.Response:
    """One fresh token (the widget's ``data-token-url`` in the embed demo); the customer is the cookie's."""
    if not demo_tokens_enabled():
        raise web.HTTPNotFound()
    role = request.query.get("role", "customer")
    if role not in ("customer", "agent", "agent2", "supervisor"):
        raise web.HTTPBadRequest(text="role must be customer, agent, agent2 or supervisor")
    customer_id = _demo_customer(request)
    return _demo_response(request, {"token": _mint(request, role, customer_id)}, customer_id)
