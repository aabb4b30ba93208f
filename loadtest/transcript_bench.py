"""Transcript writer benchmark: events/s into each backend and time to catch up a backlog.

``python -m loadtest.transcript_bench [--quick] [--events N] [--backends sqlite,postgresql]
[--pg-dsn DSN] [--out PATH]``. One run:

1. starts a private ``nats-server`` (free port, temporary store) and publishes a backlog of N
   events (default 100,000; ``--quick`` 20,000) into stream ``CONV``: 1,000 conversations, each
   ``opened``, ``assigned``, messages (≈200-byte bodies) and a ``closed`` — what a busy day leaves;
2. per backend: a fresh store (SQLite file in a temp dir; PostgreSQL in a throw-away schema),
   a fresh durable consumer, then one ``TranscriptService`` (default settings: batches up to 5,000,
   one commit in flight while the next batch is fetched) started in this process, plus
   ``--writers N-1`` writer processes; the clock runs from the moment they are started until the
   consumer has every event committed and acked — the time to catch up the backlog, and N / that
   time is the writers' throughput;
3. checks the store holds exactly N events (no loss, no duplicates);
4. also measures the store alone (``write_batch`` of 5,000 rows, no NATS) for the ceiling;
5. prints a table and writes a JSON report (``loadtest/results/transcript-bench-*.json``).

Exit code 0 on success, 1 when a check failed, 2 when the run could not be done.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_PG_DSN = os.environ.get("PARLEY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
WORDS = ("order parcel refund invoice password account delivery tracking address payment late broken "
         "thanks please help when where how today tomorrow").split()


def backlog_events(n: int, convs: int = 1000, seed: int = 1) -> list[tuple[str, str, dict[str, Any]]]:
    """(conv, type, data) in publication order: conversations interleaved, as in production."""
    rng = random.Random(seed)
    per_conv = max(n // convs, 4)
    out: list[tuple[str, str, dict[str, Any]]] = []
    steps = []
    for c in range(convs):
        conv = f"c{c:05d}"
        kinds = ["opened", "assigned"] + ["message"] * (per_conv - 3) + ["closed"]
        steps.append((conv, kinds))
    i = 0
    while len(out) < n and steps:
        conv, kinds = steps[i % len(steps)]
        kind = kinds.pop(0)
        if kind == "opened":
            data: dict[str, Any] = {"queue": "support", "customer": {"id": f"u{conv}"}}
        elif kind == "assigned":
            data = {"agent": {"id": f"a{rng.randint(1, 50)}"}}
        elif kind == "closed":
            data = {"by": {"id": f"u{conv}", "role": "customer"}, "reason": "customer_closed"}
        else:
            body = " ".join(rng.choice(WORDS) for _ in range(30))[:200]
            data = {"id": uuid.uuid4().hex[:12], "from": {"id": f"u{conv}", "role": "customer"}, "body": body}
        out.append((conv, kind, data))
        if not kinds:
            steps.pop(i % len(steps))
        else:
            i += 1
    return out[:n]


async def publish_backlog(nc: Any, n: int) -> float:
    from parley.core import subjects
    from parley.core.events import MSG_ID_HEADER, encode_event

    js = nc.jetstream()
    started = time.perf_counter()
    events = backlog_events(n)
    for first in range(0, len(events), 500):
        await asyncio.gather(*(
            js.publish(subjects.conv_subject("bench", conv), encode_event(kind, data),
                       headers={MSG_ID_HEADER: f"bench:{first + k}"})
            for k, (conv, kind, data) in enumerate(events[first:first + 500])))
    return len(events) / (time.perf_counter() - started)


async def store_only(dsn: str, n: int) -> float:
    from parley.transcript.storage import TranscriptRow, store_from_dsn

    store = store_from_dsn(dsn)
    await store.open()
    try:
        rows = [TranscriptRow("solo", conv, i + 1, kind, 1_700_000_000_000 + i, data)
                for i, (conv, kind, data) in enumerate(backlog_events(n, seed=2))]
        started = time.perf_counter()
        for first in range(0, n, 5000):  # the writer's default batch while a backlog drains
            await store.write_batch(rows[first:first + 5000])
        return n / (time.perf_counter() - started)
    finally:
        await store.close()


async def catch_up(nats_url: str, dsn: str, n: int, writers: int = 1) -> dict[str, Any]:
    """Writer 0 runs in this process; more writers (``--writers``) run as ``parley transcript``
    processes. Done when the consumer has delivered every event and none is left unacked."""
    from nats.js.errors import NotFoundError

    from parley.core import bus, subjects
    from parley.core.config import Settings
    from parley.testing.processes import ServiceProcess
    from parley.transcript.service import TranscriptService

    settings = Settings(nats_urls=(nats_url,), node_id="bench-writer", transcript_dsn=dsn)
    nc = await bus.connect(settings, "bench")
    js = nc.jetstream()
    try:  # a fresh consumer: the whole stream is the backlog
        await js.delete_consumer(subjects.CONV_STREAM, subjects.TRANSCRIPT_CONSUMER)
    except NotFoundError:
        pass
    service = TranscriptService(settings)
    extra = [ServiceProcess("transcript", {"PARLEY_NATS_URL": nats_url, "PARLEY_TRANSCRIPT_DSN": dsn,
                                           "PARLEY_NODE_ID": f"bench-writer-{i}", "PARLEY_LOG_LEVEL": "WARNING"})
             for i in range(1, writers)]
    await service.start()  # creates the consumer and the schema before the others race for them
    for p in extra:
        p.start(wait=False)
    await asyncio.gather(*(asyncio.to_thread(p.wait_ready) for p in extra))
    started = time.perf_counter()  # writers are up: from here on it is the catch-up only
    try:
        deadline = started + 600
        while True:
            info = await js.consumer_info(subjects.CONV_STREAM, subjects.TRANSCRIPT_CONSUMER)
            if info.num_pending == 0 and info.num_ack_pending == 0 and info.delivered.stream_seq >= n:
                break
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{info.num_pending} events still pending after 600 s")
            await asyncio.sleep(0.01)
        elapsed = time.perf_counter() - started
        assert service.store is not None
        stored = 0
        async for _ in service.store.export(0, 2**62, tenant="bench", chunk=20_000):
            stored += 1
    finally:
        for p in extra:
            await asyncio.to_thread(p.stop)
        await service.stop()
        await nc.close()
    return {"events": n, "writers": writers, "catch_up_s": round(elapsed, 3), "events_per_s": round(n / elapsed),
            "stored": stored, "ok": stored == n}


async def postgres_schema(dsn: str) -> tuple[str, str] | None:
    import asyncpg

    try:
        conn = await asyncpg.connect(dsn, timeout=3)
    except Exception as exc:
        print(f"postgresql: skipped, {dsn} not reachable ({exc})")
        return None
    await conn.close()
    schema = "parley_bench_" + uuid.uuid4().hex[:8]
    return f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}", schema


async def drop_schema(dsn: str, schema: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await conn.close()


async def run(args: argparse.Namespace) -> int:
    from parley.core import bus
    from parley.core.config import Settings
    from parley.testing.nats_server import NatsServer

    n = args.events or (20_000 if args.quick else 100_000)
    report: dict[str, Any] = {"started": datetime.now(UTC).isoformat(), "events": n, "host": {
        "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "backends": {}}
    tmp = tempfile.mkdtemp(prefix="parley-tbench-")
    server = NatsServer(store_dir=f"{tmp}/nats").start()
    failed = False
    try:
        settings = Settings(nats_urls=(server.url,), node_id="bench")
        nc = await bus.connect(settings, "bench")
        await bus.ensure_all(nc.jetstream(), settings)
        report["publish_events_per_s"] = round(await publish_backlog(nc, n))
        await nc.close()
        print(f"backlog: {n} events published ({report['publish_events_per_s']}/s)")
        for backend in args.backends.split(","):
            cleanup: tuple[str, str] | None = None
            if backend == "sqlite":
                dsn, solo_dsn = f"sqlite:///{tmp}/writer.db", f"sqlite:///{tmp}/solo.db"
            elif backend == "postgresql":
                made = await postgres_schema(args.pg_dsn)
                if made is None:
                    report["backends"][backend] = {"skipped": "not reachable"}
                    continue
                dsn, schema = made
                solo_dsn = dsn.replace(schema, schema + "_solo")
                cleanup = (args.pg_dsn, schema)
            else:
                print(f"unknown backend {backend}", file=sys.stderr)
                return 2
            try:
                result = await catch_up(server.url, dsn, n, args.writers)
                result["store_only_events_per_s"] = round(await store_only(solo_dsn, min(n, 50_000)))
            finally:
                if cleanup:
                    await drop_schema(*cleanup)
                    await drop_schema(cleanup[0], cleanup[1] + "_solo")
            report["backends"][backend] = result
            failed |= not result["ok"]
            print(f"{backend:>10}: {args.writers} writer(s), backlog of {n} caught up in {result['catch_up_s']:.2f} s = "
                  f"{result['events_per_s']} events/s through NATS (store alone: "
                  f"{result['store_only_events_per_s']} events/s); stored {result['stored']} "
                  f"{'OK' if result['ok'] else 'MISMATCH'}")
    finally:
        server.cleanup()
    out = Path(args.out) if args.out else RESULTS_DIR / f"transcript-bench-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"report: {out}")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.transcript_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 events instead of 100,000")
    parser.add_argument("--events", type=int, default=0)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--pg-dsn", default=DEFAULT_PG_DSN)
    parser.add_argument("--writers", type=int, default=1, help="writer instances (1 in-process + N-1 processes)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    from parley.core.service import install_event_loop, setup_logging

    setup_logging("WARNING")
    install_event_loop()
    try:
        return asyncio.run(run(args))
    except Exception as exc:
        print(f"transcript bench failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
