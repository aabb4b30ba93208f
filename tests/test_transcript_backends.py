"""Both transcript backends (SQLite file, PostgreSQL schema) through the one ``TranscriptStore``
interface: idempotent batches, order-independent summaries, the conversation list and its
cursor, full-text search, export of 100k events through the CLI, retention, racing migrations."""

# ruff: noqa: F811  (fixtures imported from test_transcript_fixtures are parameters here)
from __future__ import annotations

import asyncio
import itertools
import os
import random
import subprocess
import sys

import orjson
import pytest
from test_transcript_fixtures import backend_dsn, ev, msg, open_store, pg_schema_dsn, store  # noqa: F401

from parley.core.errors import StorageError
from parley.transcript import queries
from parley.transcript.storage import ConvFilter, store_from_dsn
from parley.transcript.summary import summarize
from parley.transcript.view import conversation_state


def conversation(tenant: str, conv: str, first: int, customer: str, agent: str | None = None,
                 close: bool = False, queue: str = "support") -> list:
    rows = [ev(tenant, conv, first, "opened", queue=queue, customer={"id": customer})]
    rows.append(msg(tenant, conv, first + 1, f"hello from {customer} about order {conv}", sender=customer))
    if agent:
        rows.append(ev(tenant, conv, first + 2, "assigned", agent={"id": agent}))
        rows.append(msg(tenant, conv, first + 3, "let me check that order", sender=agent, role="agent"))
    if close:
        rows.append(ev(tenant, conv, first + 4, "closed", by={"id": customer, "role": "customer"},
                       reason="customer_closed"))
    return rows


async def test_batches_are_idempotent_and_counted(store):
    rows = conversation("t1", "c1", 10, "u1", "a1", close=True)
    assert await store.write_batch(rows) == len(rows)
    assert await store.write_batch(rows[1:] + [msg("t1", "c1", 20, "late")]) == 1
    got = await store.transcript("t1", "c1")
    assert [r.seq for r in got] == [10, 11, 12, 13, 14, 20]
    assert got[0] == rows[0]
    assert await store.transcript("t2", "c1") == []


async def test_summary_is_the_same_in_any_order_and_when_repeated(store):
    """Two writers commit a conversation's events in any order: the summary converges."""
    rows = conversation("t1", "c1", 100, "u1", "a1") + [
        ev("t1", "c1", 105, "transferred", from_queue="support", to_queue="tier2", by={"id": "a1"}),
        ev("t1", "c1", 106, "assigned", agent={"id": "a2"}),
        ev("t1", "c1", 107, "closed", by={"id": "a2", "role": "agent"}, reason="agent_closed"),
    ]
    rng = random.Random(7)
    for attempt in range(3):
        shuffled = rows[:]
        rng.shuffle(shuffled)
        conv = f"c{attempt}"
        for part in (shuffled[:3], shuffled[3:5], shuffled[5:], shuffled[1:4]):
            await store.write_batch([r.__class__(r.tenant, conv, r.seq + attempt * 100, r.type, r.ts, r.data)
                                     for r in part])
        s = await store.conversation("t1", conv)
        assert (s.state, s.queue, s.customer, s.agent) == ("closed", "tier2", "u1", "a2"), s
        assert s.first_ts == rows[0].ts and s.last_seq == 107 + attempt * 100 and s.closed_at is not None
    # the pure summary agrees with the state computed from rows
    assert conversation_state(rows[:4]) == "assigned" == summarize(rows[:4])[0].assign_type


async def test_unassigned_conversation_has_no_agent(store):
    await store.write_batch(conversation("t1", "c1", 1, "u1", "a1")
                            + [ev("t1", "c1", 9, "unassigned", agent={"id": "a1"}, reason="agent_offline")])
    s = await store.conversation("t1", "c1")
    assert (s.state, s.agent) == ("queued", None)


async def test_list_filters_and_cursor_pagination(store):
    rows = []
    seq = itertools.count(1, 10)
    expected = {}
    for i in range(57):
        customer, agent = f"u{i % 3}", (f"a{i % 2}" if i % 4 else None)
        conv = f"c{i:03d}"
        first = next(seq)
        conv_rows = conversation("t1", conv, first, customer, agent, close=i % 5 == 0,
                                 queue="billing" if i % 7 == 0 else "support")
        conv_rows = [r.__class__(r.tenant, r.conv, r.seq, r.type, 5_000 + i * 10 + (r.seq - first), r.data)
                     for r in conv_rows]
        rows += conv_rows
        expected[conv] = (customer, agent, "closed" if i % 5 == 0 else ("assigned" if agent else "queued"),
                          "billing" if i % 7 == 0 else "support", 5_000 + i * 10)
    rows += conversation("t2", "c000", 9999, "u0")  # another tenant never shows
    random.Random(1).shuffle(rows)
    for i in range(0, len(rows), 40):
        await store.write_batch(rows[i:i + 40])

    async def pages(filters: dict, viewer=None, limit=7):
        out, cursor = [], None
        while True:
            reply = await queries.answer_list(store, {"tenant": "t1", "viewer": viewer or {"role": "supervisor", "user": "s"},
                                                      "filters": filters, "cursor": cursor, "limit": limit})
            assert len(reply["conversations"]) <= limit
            out += [c["conv"] for c in reply["conversations"]]
            cursor = reply["next_cursor"]
            if cursor is None:
                return out

    def want(pred):
        return sorted((c for c, v in expected.items() if pred(v)), key=lambda c: expected[c][4], reverse=True)

    assert await pages({}) == want(lambda v: True)
    assert await pages({}, limit=200) == want(lambda v: True)
    assert await pages({"customer": "u1"}) == want(lambda v: v[0] == "u1")
    assert await pages({"agent": "a1", "state": "assigned"}) == want(lambda v: v[1] == "a1" and v[2] == "assigned")
    assert await pages({"state": "closed"}) == want(lambda v: v[2] == "closed")
    assert await pages({"queue": "billing"}) == want(lambda v: v[3] == "billing")
    assert await pages({"from": 5_100, "until": 5_300}) == want(lambda v: 5_100 <= v[4] < 5_300)
    # viewers: a customer only ever gets their own, an agent the ones they hold
    assert await pages({}, {"role": "customer", "user": "u2"}) == want(lambda v: v[0] == "u2")
    assert await pages({"customer": "u1"}, {"role": "customer", "user": "u2"}) == []
    assert await pages({}, {"role": "agent", "user": "a0"}) == want(lambda v: v[1] == "a0")
    summary = (await queries.answer_list(store, {"tenant": "t1", "viewer": {"role": "supervisor", "user": "s"},
                                                 "filters": {"customer": "u0"}, "limit": 1}))["conversations"][0]
    assert summary["customer"] == "u0" and summary["opened_at"] == expected[summary["conv"]][4]
    with pytest.raises(queries.BadRequest):
        await queries.answer_list(store, {"tenant": "t1", "viewer": {"role": "supervisor", "user": "s"},
                                          "filters": {"state": "offered"}})
    with pytest.raises(queries.BadRequest):
        await queries.answer_list(store, {"tenant": "t1", "viewer": {"role": "supervisor", "user": "s"},
                                          "cursor": "garbage!"})


async def test_search_finds_words_with_visibility_and_pagination(store):
    rows = []
    for i in range(30):
        rows += [ev("t1", f"c{i}", i * 10 + 1, "opened", queue="q", customer={"id": f"u{i % 2}"})]
        body = "my parcel never arrived" if i % 3 == 0 else "please reset my password"
        rows.append(msg("t1", f"c{i}", i * 10 + 2, body + f" (ticket {i})", sender=f"u{i % 2}"))
        if i % 2:
            rows.append(ev("t1", f"c{i}", i * 10 + 3, "assigned", agent={"id": "a1"}))
    rows.append(msg("t2", "c0", 999, "my parcel never arrived"))  # other tenant
    rows.append(ev("t1", "c0", 5, "notice", level="info", text="parcel"))  # not a message: not searched
    await store.write_batch(rows)
    supervisor = {"role": "supervisor", "user": "s"}

    async def search(q, viewer=supervisor, filters=None, limit=4):
        seqs, cursor = [], None
        while True:
            reply = await queries.answer_search(store, {"tenant": "t1", "viewer": viewer, "q": q,
                                                        "filters": filters or {}, "cursor": cursor, "limit": limit})
            seqs += [h["seq"] for h in reply["hits"]]
            cursor = reply["next_cursor"]
            if cursor is None:
                return seqs

    parcel = [i * 10 + 2 for i in range(30) if i % 3 == 0]
    assert await search("PARCEL") == sorted(parcel, reverse=True)
    assert await search("parcel arrived") == sorted(parcel, reverse=True)  # every term must match
    assert await search("parcel password") == []
    assert await search('"parcel" OR password*') == []  # user text is words, never query syntax
    assert await search("parcel", {"role": "customer", "user": "u0"}) == sorted(
        (s for s in parcel if (s // 10) % 2 == 0), reverse=True)
    assert await search("parcel", {"role": "agent", "user": "a1"}) == sorted(
        (s for s in parcel if (s // 10) % 2 == 1), reverse=True)
    assert await search("parcel", filters={"conv": "c3"}) == [32]
    assert await search("ticket", filters={"from": 1_000_000 + 100, "until": 1_000_000 + 200}, limit=3) == [
        192, 182, 172, 162, 152, 142, 132, 122, 112, 102]
    hit = (await queries.answer_search(store, {"tenant": "t1", "viewer": supervisor, "q": "parcel", "limit": 1}))["hits"][0]
    assert hit == {"conv": "c27", "seq": 272, "ts": 1_000_272, "from": {"id": "u1", "role": "customer"},
                   "body": "my parcel never arrived (ticket 27)"}


async def test_events_page_chains_from_the_resume_point(store):
    await store.write_batch(conversation("t1", "c1", 10, "u1", "a1", close=True))
    viewer = {"role": "customer", "user": "u1"}
    reply = await queries.answer_events(store, {"tenant": "t1", "viewer": viewer, "conv": "c1", "after": 11,
                                                "limit": 2})
    assert [(e["seq"], e["prev"]) for e in reply["events"]] == [(12, 11), (13, 12)]
    assert reply["state"] == "closed"
    reply = await queries.answer_events(store, {"tenant": "t1", "viewer": viewer, "conv": "c1", "after": 0,
                                                "before": 13, "limit": 10})
    assert [e["seq"] for e in reply["events"]] == [10, 11, 12]
    for other in ({"role": "customer", "user": "u2"}, {"role": "agent", "user": "a2"}):
        assert await queries.answer_events(store, {"tenant": "t1", "viewer": other, "conv": "c1"}) == {
            "error": "not_found"}


async def test_prune_deletes_whole_old_conversations_only(store):
    old = conversation("t1", "old", 1, "u1")
    live = conversation("t1", "live", 10, "u1")
    live[-1] = msg("t1", "live", 11, "still talking", ts=9_000_000)  # started long ago, active now
    await store.write_batch(old + live)
    assert await store.prune(before_ms=2_000_000, batch=1) == 1
    assert await store.transcript("t1", "old") == [] and await store.conversation("t1", "old") is None
    assert [r.seq for r in await store.transcript("t1", "live")] == [10, 11]
    assert await queries.answer_search(store, {"tenant": "t1", "viewer": {"role": "supervisor", "user": "s"},
                                               "q": "order"}) == {"hits": [], "next_cursor": None}
    assert await store.prune(before_ms=2_000_000) == 0


async def test_migrations_race_safely(backend_dsn, open_store):
    """Several writers starting at once: one applies each migration, the others find it done."""
    stores = await asyncio.gather(*(open_store() for _ in range(4)))
    versions = {await s.schema_version() for s in stores}
    assert len(versions) == 1 and versions.pop() >= 1
    await asyncio.gather(*(s.write_batch([msg("t1", "c1", i, "x")]) for i, s in enumerate(stores, 1)))
    assert len(await stores[0].transcript("t1", "c1")) == 4


async def test_closed_store_raises_storage_error(backend_dsn):
    store = store_from_dsn(backend_dsn)
    with pytest.raises(StorageError):
        await store.ping()


async def test_export_100k_events_streams_in_constant_memory(store, backend_dsn, tmp_path):
    """100k events through ``parley transcripts export``: all of them, in (ts, seq) order, within the
    time bounds, and the exporting process's peak memory far below holding them all."""
    total, batch = 100_000, 5_000
    rng = random.Random(3)
    for start in range(0, total, batch):
        await store.write_batch([
            msg("tx", f"c{i % 2000}", i + 1, f"message {i} " + "lorem ipsum " * rng.randint(1, 8), ts=10_000 + i)
            for i in range(start, start + batch)])
    out = tmp_path / "export.jsonl"
    env = {**os.environ, "PARLEY_TRANSCRIPT_DSN": backend_dsn}
    # The child reports its own peak RSS (VmHWM of its address space): ru_maxrss would also count
    # the pytest process it was forked from.
    code = ("import sys; from parley.cli.main import main; rc = main(sys.argv[1:]); "
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0], file=sys.stderr); "
            "sys.exit(rc)")
    proc = subprocess.Popen([sys.executable, "-c", code, "transcripts", "export", "--since", "10000",
                             "--until", str(10_000 + total - 100), "--format", "jsonl", "--out", str(out)],
                            env=env, stderr=subprocess.PIPE)
    _, status, _ = await asyncio.to_thread(os.wait4, proc.pid, 0)
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert os.waitstatus_to_exitcode(status) == 0, stderr
    assert f"exported {total - 100} events" in stderr
    lines = out.read_bytes().splitlines()
    assert len(lines) == total - 100
    first, last = orjson.loads(lines[0]), orjson.loads(lines[-1])
    assert first["seq"] == 1 and first["ts"] == 10_000 and first["type"] == "message" and first["tenant"] == "tx"
    assert last["seq"] == total - 100
    seqs = [int(line[line.index(b'"seq":') + 6:line.index(b',"type"')]) for line in lines]
    assert seqs == list(range(1, total - 99))
    peak_mb = int(stderr.split("VmHWM:")[1].split()[0]) / 1024
    print(f"export of {total - 100} events: peak RSS {peak_mb:.0f} MB")
    assert peak_mb < 100, f"export used {peak_mb:.0f} MB"  # the 100k rows alone would take several times that


async def test_a_backlog_batch_is_searchable_after_maintenance(store):
    """Large batches leave search indexing to a chunk (SQLite) that the writer's monitor runs."""
    await store.write_batch([msg("t1", f"c{i % 10}", i + 1, f"bulk word{i}") for i in range(600)])
    await store.maintain()
    where = ConvFilter("t1")
    assert [h.seq for h in await store.search(where, ["word599"], None, 10)] == [600]
    assert len(await store.search(where, ["bulk"], None, 1000)) == 600
    await store.write_batch([msg("t1", "c1", 1000, "quiet times word1000")])  # small: indexed at once
    assert [h.seq for h in await store.search(where, ["word1000"], None, 10)] == [1000]
