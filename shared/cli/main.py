"""``parley`` console script: one service per process, or everything at once with ``parley dev``."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys

from parley.core.config import Settings
from parley.core.errors import ConfigError, ParleyError
from parley.core.service import install_event_loop, run_until_signalled, setup_logging

# service name → (module, class); each class takes Settings and implements core.service.Service
SERVICES = {
    "gateway": ("parley.gateway.app", "GatewayService"),
    "router": ("parley.router.service", "RouterService"),
    "presence": ("parley.presence.service", "PresenceService"),
    "transcript": ("parley.transcript.service", "TranscriptService"),
}


def load_service(name: str, settings: Settings):  # type: ignore[no-untyped-def]
    module, cls = SERVICES[name]
    return getattr(importlib.import_module(module), cls)(settings)


def run_one(name: str) -> int:
    setup_logging()
    try:
        settings = Settings.from_env(service=name)
        if name == "gateway" and not settings.jwt_secret:
            raise ConfigError("PARLEY_JWT_SECRET is required for the gateway")
    except ConfigError as exc:
        print(f"parley {name}: configuration error: {exc}", file=sys.stderr)
        return 2
    from parley.core import telemetry

    telemetry.setup(name, settings.node_id)
    install_event_loop()
    service = load_service(name, settings)
    try:
        asyncio.run(run_until_signalled(service, settings, own_http=(name == "gateway")))
    except ParleyError as exc:
        print(f"parley {name}: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="parley", description="Parley chat broker")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SERVICES:
        sub.add_parser(name, help=f"run one {name} (configured by PARLEY_* variables)")
    dev = sub.add_parser("dev", help="embedded NATS and every service in one command")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8080)
    dev.add_argument("--data-dir", default="./.parley")
    dev.add_argument("--nats-url", default=None, help="use this NATS instead of starting one")
    sub.add_parser("chat", help="a terminal chat client (see parley chat --help)", add_help=False)
    from parley.cli import transcripts

    transcripts.add_parser(sub)
    from parley.cli import incident

    incident.add_parser(sub)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["chat"]:
        from parley.cli.chat import main as chat_main

        return chat_main(argv[1:])
    args = parser.parse_args(argv)
    if args.command in SERVICES:
        return run_one(args.command)
    if args.command == "transcripts":
        return transcripts.run(args)
    if args.command == "incident":
        return incident.run(args)
    if args.command == "dev":
        from parley.cli.dev import run_dev

        return run_dev(args)
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
