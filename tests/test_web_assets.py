"""The web pages as files and HTTP routes (no browser): shipped in the wheel, served with a strict
CSP, scripts embeddable cross-origin, demo tokens only under ``parley dev``."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import aiohttp
import pytest
from helpers import SECRET

from parley.core.auth import verify_token
from parley.gateway import web_routes

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {"parley.js", "chat.js", "ui.js", "widget.js", "console.js", "supervisor.js", "demo.js", "parley.css",
            "index.html", "widget.html", "console.html", "supervisor.html", "embed.html"}


def test_importlib_resources_finds_the_web_files():
    assert EXPECTED <= set(web_routes.web_files())


def test_built_wheel_contains_the_web_files(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("services", "shared"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    # an isolated build, as any installer would make it (the build backend comes from the registry)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(src)],
                           capture_output=True, text=True, timeout=300)
    if built.returncode != 0 and ("Could not find a version" in built.stderr or "NewConnectionError" in built.stderr):
        pytest.skip(f"no package index for the build backend: {built.stderr[-300:]}")
    assert built.returncode == 0, built.stderr
    wheel = next(out.glob("parley-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {f"parley/gateway/web/{n}" for n in EXPECTED} <= names
    assert "parley/gateway/web_routes.py" in names


async def test_pages_and_assets_are_served(gateway, monkeypatch):
    monkeypatch.delenv(web_routes.DEMO_ENV, raising=False)
    async with aiohttp.ClientSession() as s:
        for path in ("/", "/widget", "/console", "/supervisor", "/demo/embed"):
            async with s.get(gateway.base_url + path) as r:
                assert r.status == 200, path
                assert r.content_type == "text/html"
                csp = r.headers["Content-Security-Policy"]
                assert "script-src 'self'" in csp and "unsafe-inline" not in csp
        async with s.get(gateway.base_url + "/web/parley.js") as r:
            assert r.status == 200 and r.content_type == "text/javascript"
            assert r.headers["Access-Control-Allow-Origin"] == "*"  # module scripts from another site
            assert "export class ParleyClient" in await r.text()
        for bad in ("/web/nope.js", "/web/..%2Fapp.py", "/web/web_routes.py"):
            async with s.get(gateway.base_url + bad) as r:
                assert r.status == 404, bad
        async with s.get(gateway.base_url + "/demo/tokens") as r:
            assert r.status == 404  # token minting only under parley dev
        async with s.get(gateway.base_url + "/demo/token?role=agent") as r:
            assert r.status == 404


async def test_demo_tokens_under_parley_dev(gateway, monkeypatch):
    monkeypatch.setenv(web_routes.DEMO_ENV, "1")
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:  # unsafe: an IP host
        async with s.get(gateway.base_url + "/demo/tokens") as r:
            assert r.status == 200
            data = await r.json()
        roles = {k: verify_token(data[k], SECRET) for k in ("customer", "agent", "agent2", "supervisor")}
        assert {i.tenant for i in roles.values()} == {"demo"}
        assert roles["customer"].user == data["customer_id"] and roles["agent"].role == "agent"
        # the customer is the cookie's: a fresh token for the embedded widget is the same customer
        async with s.get(gateway.base_url + "/demo/token?role=customer") as r:
            assert verify_token((await r.json())["token"], SECRET).user == data["customer_id"]
