"""``parley transcripts export|prune``: the transcript store, directly (``PARLEY_TRANSCRIPT_DSN``).

``export`` streams events as JSON lines (one event per line: ``tenant, conv, seq, type, ts,
data``), ordered by time, read from the database a chunk at a time: memory stays constant for
any number of rows. ``prune`` applies a retention period once (the writers also apply
``PARLEY_TRANSCRIPT_RETENTION_DAYS`` periodically).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import BinaryIO

import orjson

from parley.core.config import Settings
from parley.core.errors import ConfigError, ParleyError
from parley.transcript.queries import BadRequest, parse_time
from parley.transcript.storage import store_from_dsn

FLUSH_EVERY = 1000


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    tr = sub.add_parser("transcripts", help="export or prune the transcript store (PARLEY_TRANSCRIPT_DSN)")
    tr.add_argument("--dsn", default=None, help="transcript store (default: PARLEY_TRANSCRIPT_DSN)")
    actions = tr.add_subparsers(dest="action", required=True)
    export = actions.add_parser("export", help="stream events as JSON lines")
    export.add_argument("--since", default="0", help="Unix ms or ISO 8601 time (inclusive; default: all)")
    export.add_argument("--until", default=None, help="Unix ms or ISO 8601 time (exclusive; default: now)")
    export.add_argument("--tenant", default=None, help="only this tenant")
    export.add_argument("--format", default="jsonl", choices=["jsonl"])
    export.add_argument("--out", default="-", help="file to write (default: stdout)")
    export.add_argument("--chunk", type=int, default=5000, help="rows read per query")
    prune = actions.add_parser("prune", help="delete conversations older than a retention period")
    prune.add_argument("--days", type=float, default=None,
                       help="retention in days (default: PARLEY_TRANSCRIPT_RETENTION_DAYS)")


def run(args: argparse.Namespace) -> int:
    try:
        dsn = args.dsn or Settings.from_env(service="transcripts").transcript_dsn
        if args.action == "export":
            return asyncio.run(export(dsn, args))
        return asyncio.run(prune(dsn, args))
    except (ConfigError, BadRequest) as exc:
        print(f"parley transcripts: {exc}", file=sys.stderr)
        return 2
    except ParleyError as exc:
        print(f"parley transcripts: {exc}", file=sys.stderr)
        return 1


async def export(dsn: str, args: argparse.Namespace) -> int:
    since = parse_time(args.since, "--since") or 0
    until = parse_time(args.until, "--until") or int(time.time() * 1000) + 1
    store = store_from_dsn(dsn)
    await store.open()
    out: BinaryIO = sys.stdout.buffer if args.out == "-" else open(args.out, "wb")  # noqa: SIM115
    count = 0
    try:
        lines: list[bytes] = []
        async for row in store.export(since, until, tenant=args.tenant, chunk=args.chunk):
            lines.append(orjson.dumps(row.as_export()))
            if len(lines) >= FLUSH_EVERY:
                out.write(b"\n".join(lines) + b"\n")
                count += len(lines)
                lines = []
        if lines:
            out.write(b"\n".join(lines) + b"\n")
            count += len(lines)
        out.flush()
    except BrokenPipeError:  # e.g. piped into head: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        if out is not sys.stdout.buffer:
            out.close()
        await store.close()
    print(f"parley transcripts: exported {count} events", file=sys.stderr)
    return 0


async def prune(dsn: str, args: argparse.Namespace) -> int:
    days = args.days
    if days is None:
        from parley.transcript.config import TranscriptConfig

        days = TranscriptConfig.from_env().retention_days
    if not days or days <= 0:
        raise ConfigError("give --days N or set PARLEY_TRANSCRIPT_RETENTION_DAYS")
    store = store_from_dsn(dsn)
    await store.open()
    try:
        deleted = await store.prune(int(time.time() * 1000 - days * 86_400_000))
    finally:
        await store.close()
    print(f"parley transcripts: deleted {deleted} conversations older than {days:g} days", file=sys.stderr)
    return 0
