"""SQLite transcript store: stdlib ``sqlite3`` on dedicated threads, WAL, versioned schema.

One thread owns the writing connection and one the reading connection, because a sqlite3
connection must stay on its thread and because WAL lets queries run while a batch commits.
Several writer processes may share the file: ``BEGIN IMMEDIATE`` takes the write lock up front
(no deadlock on lock upgrade) and ``busy_timeout`` makes the others wait instead of failing.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import orjson

from parley.core.errors import StorageError

from . import sql
from .storage import ConvFilter, ConvSummary, ListCursor, SearchHit, TranscriptRow, TranscriptStore
from .summary import MERGE_SET, summarize

T = TypeVar("T")

# Versioned migrations, applied in order inside one transaction each; never edit a released one.
# A step is SQL text or a function of the connection (data backfills).
Step = str | Callable[[sqlite3.Connection], None]


def _backfill_v2(conn: sqlite3.Connection) -> None:
    """Summaries and search index for rows stored before schema version 2."""
    conn.execute(
        "INSERT INTO transcript_fts (rowid, body, tenant, conv) "
        "SELECT seq, body, tenant, conv FROM transcript_events WHERE body IS NOT NULL"
    )
    cursor = conn.execute(SELECT_ALL_BY_CONV)
    while chunk := cursor.fetchmany(5000):
        rows = [TranscriptRow(t, c, s, ty, ts, orjson.loads(d)) for t, c, s, ty, ts, d in chunk]
        conn.executemany(UPSERT_SUMMARY, [d.params() for d in summarize(rows)])


MIGRATIONS: tuple[tuple[int, tuple[Step, ...]], ...] = (
    (
        1,
        (
            """
            CREATE TABLE transcript_events (
                tenant TEXT NOT NULL,
                conv TEXT NOT NULL,
                seq INTEGER NOT NULL,
                type TEXT NOT NULL,
                ts INTEGER NOT NULL,
                data TEXT NOT NULL,
                body TEXT,
                PRIMARY KEY (tenant, conv, seq)
            ) WITHOUT ROWID
            """,
        ),
    ),
    (
        2,
        (
            """
            CREATE TABLE transcript_convs (
                tenant TEXT NOT NULL,
                conv TEXT NOT NULL,
                customer TEXT,
                queue TEXT,
                queue_seq INTEGER NOT NULL DEFAULT 0,
                agent TEXT,
                assign_type TEXT,
                assign_seq INTEGER NOT NULL DEFAULT 0,
                first_ts INTEGER NOT NULL,
                last_ts INTEGER NOT NULL,
                last_seq INTEGER NOT NULL,
                closed_at INTEGER,
                PRIMARY KEY (tenant, conv)
            ) WITHOUT ROWID
            """,
            "CREATE INDEX transcript_convs_recent ON transcript_convs (tenant, first_ts, conv)",
            "CREATE INDEX transcript_convs_customer ON transcript_convs (tenant, customer, first_ts)",
            "CREATE INDEX transcript_convs_agent ON transcript_convs (tenant, agent, first_ts)",
            "CREATE INDEX transcript_convs_last_ts ON transcript_convs (last_ts)",
            "CREATE INDEX transcript_events_ts ON transcript_events (ts, seq)",
            # rowid = seq: the stream sequence is unique across conversations, and FTS5 walks
            # rowids in descending order natively, which is the search's order and its cursor.
            """
            CREATE VIRTUAL TABLE transcript_fts USING fts5(
                body, tenant UNINDEXED, conv UNINDEXED, tokenize = 'unicode61 remove_diacritics 2'
            )
            """,
            # Triggers fire only for rows really inserted, so a redelivered event is not indexed twice.
            """
            CREATE TRIGGER transcript_fts_insert AFTER INSERT ON transcript_events
            WHEN NEW.body IS NOT NULL BEGIN
                INSERT OR REPLACE INTO transcript_fts (rowid, body, tenant, conv)
                VALUES (NEW.seq, NEW.body, NEW.tenant, NEW.conv);
            END
            """,
            """
            CREATE TRIGGER transcript_fts_delete AFTER DELETE ON transcript_events
            WHEN OLD.body IS NOT NULL BEGIN
                DELETE FROM transcript_fts WHERE rowid = OLD.seq;
            END
            """,
            _backfill_v2,
        ),
    ),
    (
        3,
        (
            # Indexing each message as it is inserted halves the write rate (an FTS5 segment per
            # transaction, merged over and over). Inserted messages are queued here instead and
            # indexed in chunks (``_index_pending``): at once for small batches, every
            # INDEX_CHUNK rows while a backlog drains.
            "DROP TRIGGER transcript_fts_insert",
            "CREATE TABLE transcript_fts_pending (tenant TEXT NOT NULL, conv TEXT NOT NULL, seq INTEGER NOT NULL)",
            """
            CREATE TRIGGER transcript_fts_pending_insert AFTER INSERT ON transcript_events
            WHEN NEW.body IS NOT NULL BEGIN
                INSERT INTO transcript_fts_pending (tenant, conv, seq) VALUES (NEW.tenant, NEW.conv, NEW.seq);
            END
            """,
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]
# A batch smaller than this is indexed for search in its own transaction (quiet times: search sees
# a message as soon as it is stored); larger ones (a backlog) leave it to a chunk of INDEX_CHUNK.
INDEX_AT_ONCE_BELOW = 500
INDEX_CHUNK = 10_000
INDEX_PENDING = """
    INSERT OR REPLACE INTO transcript_fts (rowid, body, tenant, conv)
    SELECT e.seq, e.body, e.tenant, e.conv FROM transcript_fts_pending p
    JOIN transcript_events e ON e.tenant = p.tenant AND e.conv = p.conv AND e.seq = p.seq
    WHERE p.rowid <= ?
"""

INSERT_ROW = """
    INSERT INTO transcript_events (tenant, conv, seq, type, ts, data, body)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (tenant, conv, seq) DO NOTHING
"""
UPSERT_SUMMARY = f"""
    INSERT INTO transcript_convs AS t (tenant, conv, customer, queue, queue_seq, agent, assign_type,
                                       assign_seq, first_ts, last_ts, last_seq, closed_at)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (tenant, conv) DO UPDATE SET {MERGE_SET.format(max="max", min="min")}
"""
SELECT_CONV = """
    SELECT tenant, conv, seq, type, ts, data FROM transcript_events
    WHERE tenant = ? AND conv = ? ORDER BY seq
"""
SELECT_ALL_BY_CONV = "SELECT tenant, conv, seq, type, ts, data FROM transcript_events ORDER BY tenant, conv, seq"
SEARCH = """
    SELECT e.tenant, e.conv, e.seq, e.ts, e.data
    FROM transcript_fts f
    JOIN transcript_events e ON e.tenant = f.tenant AND e.conv = f.conv AND e.seq = f.rowid
    JOIN transcript_convs c ON c.tenant = e.tenant AND c.conv = e.conv
    WHERE transcript_fts MATCH ? AND f.tenant = ? AND {scope}
    ORDER BY f.rowid DESC LIMIT ?
"""


class SqliteStore(TranscriptStore):
    def __init__(self, path: str | Path, busy_timeout_s: float = 10.0) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._writer_thread: ThreadPoolExecutor | None = None
        self._reader_thread: ThreadPoolExecutor | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._unindexed = 1  # rows maybe waiting for the search index (1: look once after open)

    # --- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create directory for {self.path}: {exc}") from exc
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="transcript-sqlite-write")
        self._reader_thread = ThreadPoolExecutor(1, thread_name_prefix="transcript-sqlite-read")
        self._writer = await self._run(self._writer_thread, self._open_writer)
        self._reader = await self._run(self._reader_thread, self._connect)

    async def close(self) -> None:
        for conn, thread in ((self._reader, self._reader_thread), (self._writer, self._writer_thread)):
            if thread is None:
                continue
            if conn is not None:
                await self._run(thread, conn.close)
            thread.shutdown(wait=True)
        self._reader = self._writer = None
        self._reader_thread = self._writer_thread = None

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a batch is exactly one transaction.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
        return conn

    def _open_writer(self) -> sqlite3.Connection:
        conn = self._connect()
        # Switching to WAL needs an exclusive lock and SQLite may answer "database is locked" at once,
        # without its busy handler, while another writer opens the same file: retry, bounded.
        deadline = time.monotonic() + self._busy_timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode = WAL")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        # FULL, not WAL's usual NORMAL: we ack to JetStream after commit, so a commit must survive
        # power loss, or the acked event would be missing from the transcript.
        conn.execute("PRAGMA synchronous = FULL")
        # Rows are clustered by (tenant, conv, seq), so a batch of interleaved conversations dirties
        # one leaf page per conversation: keep those pages in memory (64 MiB, writer only).
        conn.execute("PRAGMA cache_size = -65536")
        self._migrate(conn)
        return conn

    @staticmethod
    def _migrate(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY)")
        for version, statements in MIGRATIONS:
            # One transaction per migration, re-checked under the write lock: writers starting
            # together must not apply a migration twice.
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("SELECT 1 FROM schema_version WHERE version = ?", (version,)).fetchone():
                    conn.execute("COMMIT")
                    continue
                for step in statements:
                    if callable(step):
                        step(conn)
                    else:
                        conn.execute(step)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    # --- operations --------------------------------------------------------------------------
    async def write_batch(self, rows: Sequence[TranscriptRow]) -> int:
        if not rows:
            return 0
        params = [
            (r.tenant, r.conv, r.seq, r.type, r.ts, orjson.dumps(r.data).decode(), r.body) for r in rows
        ]
        summaries = [d.params() for d in summarize(rows)]
        return await self._run(self._require(self._writer_thread), lambda: self._insert(params, summaries))

    def _insert(self, params: Sequence[tuple[object, ...]], summaries: Sequence[tuple[object, ...]]) -> int:
        conn = self._require(self._writer)
        conn.execute("BEGIN IMMEDIATE")
        try:
            # rowcount sums sqlite3_changes(), which leaves out the trigger's search-index rows.
            new = conn.executemany(INSERT_ROW, params).rowcount
            conn.executemany(UPSERT_SUMMARY, summaries)
            self._unindexed += new
            if len(params) < INDEX_AT_ONCE_BELOW or self._unindexed >= INDEX_CHUNK:
                self._index_pending(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return new

    def _index_pending(self, conn: sqlite3.Connection) -> None:
        """Move queued messages into the search index (inside the caller's transaction)."""
        top = conn.execute("SELECT max(rowid) FROM transcript_fts_pending").fetchone()[0]
        if top is not None:
            conn.execute(INDEX_PENDING, (top,))
            conn.execute("DELETE FROM transcript_fts_pending WHERE rowid <= ?", (top,))
        self._unindexed = 0

    async def maintain(self) -> None:
        """Index what a backlog left queued (the writer calls this every few seconds)."""
        if not self._unindexed:
            return

        def index() -> None:
            conn = self._require(self._writer)
            conn.execute("BEGIN IMMEDIATE")
            try:
                self._index_pending(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        await self._run(self._require(self._writer_thread), index)

    async def transcript(self, tenant: str, conv: str) -> list[TranscriptRow]:
        def query() -> list[TranscriptRow]:
            cursor = self._require(self._reader).execute(SELECT_CONV, (tenant, conv))
            return [TranscriptRow(t, c, s, ty, ts, orjson.loads(d)) for t, c, s, ty, ts, d in cursor]

        return await self._run(self._require(self._reader_thread), query)

    def _read(self, sql_text: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        return self._require(self._reader).execute(sql_text, params).fetchall()

    async def _query(self, sql_text: str, params: Sequence[object]) -> list[tuple[Any, ...]]:
        return await self._run(self._require(self._reader_thread), lambda: self._read(sql_text, params))

    @staticmethod
    def _rows(raw: list[tuple[Any, ...]]) -> list[TranscriptRow]:
        return [TranscriptRow(t, c, s, ty, ts, orjson.loads(d)) for t, c, s, ty, ts, d in raw]

    async def events(self, tenant: str, conv: str, after: int, limit: int,
                     before: int | None = None) -> list[TranscriptRow]:
        return self._rows(await self._query(*sql.events_query(tenant, conv, after, limit, before, "qmark")))

    async def conversation(self, tenant: str, conv: str) -> ConvSummary | None:
        raw = await self._query(*sql.conv_query(tenant, conv, "qmark"))
        return ConvSummary(*raw[0]) if raw else None

    async def list_conversations(self, where: ConvFilter, after: ListCursor | None,
                                 limit: int) -> list[ConvSummary]:
        return [ConvSummary(*r) for r in await self._query(*sql.list_query(where, after, limit, "qmark"))]

    async def search(self, where: ConvFilter, terms: Sequence[str], before_seq: int | None,
                     limit: int, conv: str | None = None) -> list[SearchHit]:
        if not terms:
            return []
        p = sql.Params("qmark")
        p(sql.fts5_match(terms))
        p(where.tenant)
        scope = " AND ".join(sql.search_scope(where, conv, before_seq, p))
        p(limit)
        raw = await self._query(SEARCH.format(scope=scope), p.values)
        return [SearchHit(t, c, seq, ts, orjson.loads(d)) for t, c, seq, ts, d in raw]

    async def export(self, since_ms: int, until_ms: int, tenant: str | None = None,
                     chunk: int = 5000) -> AsyncIterator[TranscriptRow]:
        after: tuple[int, int] | None = None
        while True:
            rows = self._rows(await self._query(*sql.export_query(since_ms, until_ms, tenant, after, chunk, "qmark")))
            for r in rows:
                yield r
            if len(rows) < chunk:
                return
            after = (rows[-1].ts, rows[-1].seq)

    async def prune(self, before_ms: int, batch: int = 500) -> int:
        def delete_some() -> int:
            conn = self._require(self._writer)
            conn.execute("BEGIN IMMEDIATE")
            try:
                convs = conn.execute(
                    "SELECT tenant, conv FROM transcript_convs WHERE last_ts < ? LIMIT ?", (before_ms, batch)
                ).fetchall()
                conn.executemany("DELETE FROM transcript_events WHERE tenant = ? AND conv = ?", convs)
                conn.executemany("DELETE FROM transcript_convs WHERE tenant = ? AND conv = ?", convs)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return len(convs)

        total = 0
        while True:  # one short transaction per batch: writers are not held up for long
            deleted = await self._run(self._require(self._writer_thread), delete_some)
            total += deleted
            if deleted < batch:
                return total

    async def ping(self) -> None:
        def check() -> None:
            self._require(self._reader).execute("SELECT count(*) FROM schema_version").fetchone()

        await self._run(self._require(self._reader_thread), check)

    async def schema_version(self) -> int:
        def read() -> int:
            row = self._require(self._reader).execute("SELECT max(version) FROM schema_version").fetchone()
            return int(row[0] or 0)

        return await self._run(self._require(self._reader_thread), read)

    # --- plumbing ----------------------------------------------------------------------------
    @staticmethod
    def _require(value: T | None) -> T:
        if value is None:
            raise StorageError("transcript store is not open")
        return value

    @staticmethod
    async def _run(thread: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(thread, fn)
        except sqlite3.Error as exc:
            raise StorageError(f"sqlite: {exc}") from exc
