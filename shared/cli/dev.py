"""``parley dev``: an embedded nats-server and one process of each service, for a laptop."""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

from parley.core.auth import issue_token
from parley.core.config import Settings
from parley.core.errors import ConfigError
from parley.testing.nats_server import NatsServer, NatsServerError
from parley.testing.processes import ServiceError, Stack

DEMO_TENANT = "demo"


def run_dev(args: argparse.Namespace) -> int:
    try:
        Settings.from_env(service="dev")  # fail early on bad PARLEY_* values
    except ConfigError as exc:
        print(f"parley dev: configuration error: {exc}", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    jwt_secret = os.environ.get("PARLEY_JWT_SECRET") or secrets.token_urlsafe(32)
    admin_key = os.environ.get("PARLEY_ADMIN_KEY") or secrets.token_urlsafe(24)
    generated = [n for n in ("PARLEY_JWT_SECRET", "PARLEY_ADMIN_KEY") if not os.environ.get(n)]

    nats: NatsServer | None = None
    stack: Stack | None = None
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if args.nats_url:
            nats_urls = [u.strip() for u in args.nats_url.split(",") if u.strip()]
        else:
            nats = NatsServer(store_dir=str(data_dir / "nats"), name="parley-dev",
                              sync_always=os.environ.get("PARLEY_NATS_SYNC_ALWAYS") == "1").start()
            nats_urls = [nats.url]
        env = {
            "PARLEY_JWT_SECRET": jwt_secret,
            "PARLEY_ADMIN_KEY": admin_key,
            "PARLEY_TRANSCRIPT_DSN": os.environ.get("PARLEY_TRANSCRIPT_DSN", f"sqlite:///{data_dir}/transcripts.db"),
            "PARLEY_DEMO_TOKENS": "1",  # the demo page's /demo/tokens: a dev gateway only (docs/web.md)
        }
        stack = Stack(nats_urls, env=env, data_dir=str(data_dir), gateway_ports=[args.port], gateway_host=args.host)
        stack.start()
        nats_note = f" (pid {nats.proc.pid})" if nats is not None and nats.proc is not None else " (external)"
        _print_banner(args, nats_urls, nats_note, stack, jwt_secret, admin_key, generated)
        while not stop.wait(0.5):
            for proc in stack.all():
                if not proc.alive():
                    print(f"parley dev: {proc.service} exited ({proc.proc.returncode if proc.proc else '?'}); "
                          f"restarting. Log: {proc.log_path}", file=sys.stderr, flush=True)
                    proc.proc = None
                    proc.start(wait=False)
        print("\nparley dev: stopping…", flush=True)
        return 0
    except (NatsServerError, ServiceError) as exc:
        print(f"parley dev: {exc}", file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            stack.stop()
        if nats is not None:
            nats.stop()


def _print_banner(args: argparse.Namespace, nats_urls: list[str], nats_note: str, stack: Stack, secret: str, admin: str,
                  generated: list[str]) -> None:
    host = "127.0.0.1" if args.host in ("0.0.0.0", "") else args.host
    base = f"http://{host}:{args.port}"
    customer = issue_token({"sub": "customer-1", "tenant": DEMO_TENANT, "role": "customer", "name": "Casey"}, secret, 86400)
    agent = issue_token({"sub": "agent-1", "tenant": DEMO_TENANT, "role": "agent", "skills": ["support"],
                         "max_chats": 3, "name": "Alex"}, secret, 86400)
    supervisor = issue_token({"sub": "supervisor-1", "tenant": DEMO_TENANT, "role": "supervisor"}, secret, 86400)
    lines = [
        "",
        "Parley dev is running.",
        f"  Web demo    {base}/   (customer widget, agent console, supervisor view)",
        f"  WebSocket   ws://{host}:{args.port}/v1/ws",
        f"  HTTP        {base}/v1/status   {base}/openapi.json",
        f"  NATS        {', '.join(nats_urls)}{nats_note}",
        f"  data dir    {Path(args.data_dir).resolve()}",
        "  services    " + ", ".join(f"{p.service} :{p.port} (pid {p.pid})" for p in stack.all()),
        "",
        f"  admin key   {admin}",
        f"  jwt secret  {secret}" + ("   (generated; set PARLEY_JWT_SECRET to keep tokens across restarts)"
                                     if "PARLEY_JWT_SECRET" in generated else ""),
        "",
        "Demo tokens (tenant 'demo', valid 24 h; the agent serves queue 'support'):",
        f"  customer    {customer}",
        f"  agent       {agent}",
        f"  supervisor  {supervisor}",
        "",
        "Chat from two terminals:",
        f"  parley chat --url ws://{host}:{args.port}/v1/ws --token <customer token>   (then: /open support)",
        f"  parley chat --url ws://{host}:{args.port}/v1/ws --token <agent token>      (offers are accepted with /accept)",
        "Ctrl-C stops everything.",
        "",
    ]
    print("\n".join(lines), flush=True)
