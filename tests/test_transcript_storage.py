"""SQLite transcript store on real files: schema versions, idempotent batches, DSN parsing, views."""

from __future__ import annotations

import sqlite3

import pytest

from parley.core.errors import ConfigError, StorageError
from parley.transcript.sqlite_store import SCHEMA_VERSION, SqliteStore
from parley.transcript.storage import TranscriptRow, store_from_dsn
from parley.transcript.view import chained_events, conversation_state, transcript_reply


def row(seq: int, type_: str = "message", conv: str = "c1", tenant: str = "t1", **data) -> TranscriptRow:
    return TranscriptRow(tenant, conv, seq, type_, 1000 + seq, data or {"body": f"hello {seq}"})


@pytest.fixture
async def store(tmp_path):
    s = SqliteStore(tmp_path / "deep" / "dir" / "t.db")
    await s.open()
    yield s
    await s.close()


async def test_open_creates_dirs_schema_and_wal(store, tmp_path):
    assert (tmp_path / "deep" / "dir" / "t.db").exists()
    assert await store.schema_version() == SCHEMA_VERSION
    await store.ping()
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_write_batch_is_idempotent_and_transcript_is_ordered(store):
    assert await store.write_batch([row(7), row(3, "opened", queue="q"), row(12, conv="other")]) == 3
    # The same events again (a redelivered batch), mixed with one new one: only the new one counts.
    assert await store.write_batch([row(7), row(3, "opened", queue="q"), row(9)]) == 1
    rows = await store.transcript("t1", "c1")
    assert [r.seq for r in rows] == [3, 7, 9]
    assert rows[0] == row(3, "opened", queue="q")
    assert await store.transcript("t2", "c1") == []  # tenants never mix
    assert await store.write_batch([]) == 0


async def test_message_body_has_its_own_column(store):
    await store.write_batch([row(1, "opened", queue="q"), row(2, body="find me")])
    with sqlite3.connect(store.path) as conn:
        bodies = conn.execute("SELECT seq, body FROM transcript_events ORDER BY seq").fetchall()
    assert bodies == [(1, None), (2, "find me")]


async def test_reopen_keeps_data_and_does_not_migrate_twice(tmp_path):
    first = SqliteStore(tmp_path / "t.db")
    await first.open()
    await first.write_batch([row(1)])
    second = SqliteStore(tmp_path / "t.db")  # a second writer on the same file
    await second.open()
    assert [r.seq for r in await second.transcript("t1", "c1")] == [1]
    await second.write_batch([row(2)])
    assert [r.seq for r in await first.transcript("t1", "c1")] == [1, 2]
    await first.close()
    await second.close()
    with sqlite3.connect(tmp_path / "t.db") as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone()[0] == SCHEMA_VERSION


async def test_failed_batch_commits_nothing(store):
    with sqlite3.connect(store.path) as conn:
        conn.execute(
            "CREATE TRIGGER refuse BEFORE INSERT ON transcript_events WHEN NEW.seq = 5 "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    with pytest.raises(StorageError, match="injected failure"):
        await store.write_batch([row(4), row(5), row(6)])
    assert await store.transcript("t1", "c1") == []


async def test_closed_store_refuses_with_storage_error(tmp_path):
    s = SqliteStore(tmp_path / "t.db")
    with pytest.raises(StorageError):
        await s.ping()


def test_dsn_relative_and_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = store_from_dsn("sqlite:///data/t.db")
    assert isinstance(rel, SqliteStore) and str(rel.path) == "data/t.db"
    absolute = store_from_dsn(f"sqlite:///{tmp_path}/x/t.db")  # tmp_path starts with "/": four slashes
    assert isinstance(absolute, SqliteStore) and absolute.path == tmp_path / "x" / "t.db"


async def test_relative_dsn_creates_parent_dirs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = store_from_dsn("sqlite:///a/b/t.db")
    await s.open()
    await s.close()
    assert (tmp_path / "a" / "b" / "t.db").exists()


@pytest.mark.parametrize("dsn", ["postgresql://u:p@db/parley", "postgres://db/parley?schema=s1&sslmode=disable",
                                 "postgresql+asyncpg://db/parley"])
def test_postgres_dsn_picks_the_postgres_store(dsn):
    from parley.transcript.postgres_store import PostgresStore

    store = store_from_dsn(dsn)
    assert isinstance(store, PostgresStore) and store.dsn.startswith(("postgresql://", "postgres://"))
    assert "schema" not in store.dsn and store.schema == ("s1" if "s1" in dsn else "public")


def test_postgres_schema_name_is_checked():
    with pytest.raises(ConfigError, match="schema"):
        store_from_dsn("postgresql://db/parley?schema=x;drop")


def test_sqlite_busy_timeout_option(tmp_path):
    store = store_from_dsn(f"sqlite:///{tmp_path}/t.db?busy_timeout_ms=250")
    assert isinstance(store, SqliteStore) and store.path == tmp_path / "t.db" and store._busy_timeout_s == 0.25


@pytest.mark.parametrize("dsn", ["mysql://db", "sqlite:///", "transcripts.db"])
def test_unusable_dsn_is_a_config_error(dsn):
    with pytest.raises(ConfigError):
        store_from_dsn(dsn)


def test_state_follows_latest_assignment_event_and_closed_wins():
    opened = [row(1, "opened", queue="q")]
    assert conversation_state(opened) == "queued"
    assigned = opened + [row(2, "assigned", agent={"id": "a"}), row(3)]
    assert conversation_state(assigned) == "assigned"
    assert conversation_state(assigned + [row(4, "unassigned", reason="agent_offline")]) == "queued"
    assert conversation_state(assigned + [row(4, "transferred")]) == "queued"
    assert conversation_state(assigned + [row(4, "escalated")]) == "queued"
    assert conversation_state(assigned + [row(4, "closed"), row(5, "read")]) == "closed"


def test_reply_chains_prev_and_reports_unknown_conversations():
    rows = [row(3, "opened", queue="q"), row(8), row(21)]
    assert [(e["seq"], e["prev"]) for e in chained_events(rows)] == [(3, 0), (8, 3), (21, 8)]
    reply = transcript_reply("t1", "c1", rows)
    assert reply["last_seq"] == 21 and reply["state"] == "queued" and reply["tenant"] == "t1"
    assert reply["events"][1] == {"conv": "c1", "seq": 8, "prev": 3, "type": "message", "ts": 1008,
                                  "data": {"body": "hello 8"}}
    assert transcript_reply("t1", "c1", []) == {"error": "not_found"}


async def test_version_1_file_is_migrated_with_summaries_and_search(tmp_path):
    """A store written before schema version 2 gains conversation summaries and its search index."""
    from parley.transcript.storage import ConvFilter

    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY)")
        conn.execute(MIGRATIONS_V1)
        conn.execute("INSERT INTO schema_version VALUES (1)")
        conn.executemany("INSERT INTO transcript_events VALUES (?, ?, ?, ?, ?, ?, ?)", [
            ("t1", "c1", 1, "opened", 1001, '{"queue":"q","customer":{"id":"u1"}}', None),
            ("t1", "c1", 2, "message", 1002, '{"body":"where is my refund"}', "where is my refund"),
            ("t1", "c1", 3, "closed", 1003, '{"reason":"customer_closed"}', None)])
    store = SqliteStore(path)
    await store.open()
    try:
        assert await store.schema_version() == SCHEMA_VERSION
        (summary,) = await store.list_conversations(ConvFilter("t1"), None, 10)
        assert (summary.conv, summary.customer, summary.state, summary.queue) == ("c1", "u1", "closed", "q")
        assert [h.seq for h in await store.search(ConvFilter("t1"), ["refund"], None, 10)] == [2]
    finally:
        await store.close()


MIGRATIONS_V1 = """
    CREATE TABLE transcript_events (
        tenant TEXT NOT NULL, conv TEXT NOT NULL, seq INTEGER NOT NULL, type TEXT NOT NULL,
        ts INTEGER NOT NULL, data TEXT NOT NULL, body TEXT, PRIMARY KEY (tenant, conv, seq)
    ) WITHOUT ROWID
"""
