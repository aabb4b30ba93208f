"""PostgreSQL transcript store: asyncpg connection pool, versioned migrations under an advisory lock.

``PARLEY_TRANSCRIPT_DSN=postgresql://user@host:5432/db?schema=name``: every writer of a deployment
points at the same database; ``schema`` (default ``public``) keeps the tables apart from others.
A batch is one transaction of two statements fed by arrays (``unnest``), so its cost hardly grows
with its size: the events (``ON CONFLICT DO NOTHING``) and the merged conversation summaries.
Message bodies are indexed for search by a generated ``tsvector`` column (``simple`` config: no
language-specific stemming, as SQLite's FTS5 ``unicode61``) with a partial GIN index.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode

import asyncpg
import orjson

from parley.core.errors import ConfigError, StorageError

from . import sql
from .storage import ConvFilter, ConvSummary, ListCursor, SearchHit, TranscriptRow, TranscriptStore
from .summary import MERGE_SET, summarize

SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
TSCONFIG = "simple"

MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            f"""
            CREATE TABLE transcript_events (
                tenant text NOT NULL,
                conv text NOT NULL,
                seq bigint NOT NULL,
                type text NOT NULL,
                ts bigint NOT NULL,
                data jsonb NOT NULL,
                body text,
                body_tsv tsvector GENERATED ALWAYS AS (to_tsvector('{TSCONFIG}', coalesce(body, ''))) STORED,
                PRIMARY KEY (tenant, conv, seq)
            )
            """,
            "CREATE INDEX transcript_events_ts ON transcript_events (ts, seq)",
            "CREATE INDEX transcript_events_search ON transcript_events USING gin (body_tsv) WHERE body IS NOT NULL",
            """
            CREATE TABLE transcript_convs (
                tenant text NOT NULL,
                conv text NOT NULL,
                customer text,
                queue text,
                queue_seq bigint NOT NULL DEFAULT 0,
                agent text,
                assign_type text,
                assign_seq bigint NOT NULL DEFAULT 0,
                first_ts bigint NOT NULL,
                last_ts bigint NOT NULL,
                last_seq bigint NOT NULL,
                closed_at bigint,
                PRIMARY KEY (tenant, conv)
            )
            """,
            "CREATE INDEX transcript_convs_recent ON transcript_convs (tenant, first_ts, conv)",
            "CREATE INDEX transcript_convs_customer ON transcript_convs (tenant, customer, first_ts)",
            "CREATE INDEX transcript_convs_agent ON transcript_convs (tenant, agent, first_ts)",
            "CREATE INDEX transcript_convs_last_ts ON transcript_convs (last_ts)",
        ),
    ),
)
SCHEMA_VERSION = MIGRATIONS[-1][0]

INSERT_ROWS = """
    INSERT INTO transcript_events (tenant, conv, seq, type, ts, data, body)
    SELECT t, c, s, ty, ts, d::jsonb, b
    FROM unnest($1::text[], $2::text[], $3::bigint[], $4::text[], $5::bigint[], $6::text[], $7::text[])
        AS u(t, c, s, ty, ts, d, b)
    ON CONFLICT (tenant, conv, seq) DO NOTHING
"""
UPSERT_SUMMARIES = f"""
    INSERT INTO transcript_convs AS t (tenant, conv, customer, queue, queue_seq, agent, assign_type,
                                       assign_seq, first_ts, last_ts, last_seq, closed_at)
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::text[],
                         $7::text[], $8::bigint[], $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[])
    ON CONFLICT (tenant, conv) DO UPDATE SET {MERGE_SET.format(max="GREATEST", min="LEAST")}
"""
SEARCH = f"""
    SELECT e.tenant, e.conv, e.seq, e.ts, e.data
    FROM transcript_events e
    JOIN transcript_convs c ON c.tenant = e.tenant AND c.conv = e.conv
    WHERE e.body IS NOT NULL AND e.body_tsv @@ plainto_tsquery('{TSCONFIG}', $1) AND e.tenant = $2 AND {{scope}}
    ORDER BY e.seq DESC LIMIT {{limit}}
"""
PRUNE = """
    WITH doomed AS (
        SELECT tenant, conv FROM transcript_convs WHERE last_ts < $1 LIMIT $2 FOR UPDATE SKIP LOCKED
    ), events AS (
        DELETE FROM transcript_events e USING doomed d WHERE e.tenant = d.tenant AND e.conv = d.conv
    )
    DELETE FROM transcript_convs c USING doomed d WHERE c.tenant = d.tenant AND c.conv = d.conv
"""

# Errors that mean "the database did not do it": connection lost or refused, server shutting down,
# statement refused. All become StorageError, which the writer retries.
DB_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _no_nul(value: Any) -> Any:
    """PostgreSQL text and jsonb cannot hold U+0000; stored as U+FFFD rather than failing forever."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_no_nul(k): _no_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nul(v) for v in value]
    return value


def _row_arrays(rows: Sequence[TranscriptRow]) -> list[list[Any]]:
    cols: list[list[Any]] = [[], [], [], [], [], [], []]
    for r in sorted(rows, key=lambda r: (r.tenant, r.conv, r.seq)):  # one lock order for all writers
        data = orjson.dumps(r.data).decode()
        body = r.body
        if "\\u0000" in data:
            data = orjson.dumps(_no_nul(r.data)).decode()
            body = _no_nul(body)
        for col, value in zip(cols, (r.tenant, r.conv, r.seq, r.type, r.ts, data, body), strict=True):
            col.append(value)
    return cols


class PostgresStore(TranscriptStore):
    def __init__(self, dsn: str, schema: str = "public", pool_min: int = 1, pool_max: int = 8,
                 command_timeout_s: float = 30.0) -> None:
        if not SCHEMA_RE.match(schema):
            raise ConfigError(f"PARLEY_TRANSCRIPT_DSN: schema {schema!r} must match {SCHEMA_RE.pattern}")
        self.dsn = dsn
        self.schema = schema
        self._pool_min = pool_min
        self._pool_max = pool_max
        self._command_timeout_s = command_timeout_s
        self._pool: asyncpg.Pool | None = None

    @classmethod
    def from_dsn(cls, dsn: str) -> PostgresStore:
        """Split Parley's own options (``schema``, ``pool_max``) from what asyncpg understands."""
        base, _, query = dsn.partition("?")
        if base.startswith("postgresql+asyncpg://"):
            base = "postgresql://" + base[len("postgresql+asyncpg://"):]
        options = dict(parse_qsl(query))
        schema = options.pop("schema", "public")
        try:
            pool_max = int(options.pop("pool_max", "8"))
        except ValueError as exc:
            raise ConfigError("PARLEY_TRANSCRIPT_DSN: pool_max must be an integer") from exc
        rest = urlencode(options)
        return cls(base + (f"?{rest}" if rest else ""), schema=schema, pool_max=pool_max)

    # --- lifecycle ---------------------------------------------------------------------------
    async def open(self) -> None:
        with self._errors("connect"):
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=self._pool_min, max_size=self._pool_max,
                command_timeout=self._command_timeout_s,
                server_settings={"search_path": self.schema, "application_name": "parley-transcript"},
            )
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await pool.close()
            except DB_ERRORS:
                pool.terminate()

    async def _migrate(self) -> None:
        # One transaction holding a transaction-level advisory lock keyed by the schema: writers
        # starting together queue here, and each finds the versions the first one applied.
        async with self._conn("migrate") as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"parley_transcript:{self.schema}")
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(
                f'CREATE TABLE IF NOT EXISTS "{self.schema}".schema_version (version integer PRIMARY KEY, '
                "applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {r[0] for r in await conn.fetch(f'SELECT version FROM "{self.schema}".schema_version')}
            for version, statements in MIGRATIONS:
                if version in done:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute(f'INSERT INTO "{self.schema}".schema_version (version) VALUES ($1)', version)

    # --- writing -----------------------------------------------------------------------------
    async def write_batch(self, rows: Sequence[TranscriptRow]) -> int:
        if not rows:
            return 0
        events = _row_arrays(rows)
        summaries = [list(col) for col in zip(*(d.params() for d in summarize(rows)), strict=True)]
        async with self._conn("write") as conn, conn.transaction():
            status = await conn.execute(INSERT_ROWS, *events)
            await conn.execute(UPSERT_SUMMARIES, *summaries)
        return int(status.rsplit(" ", 1)[-1])

    async def prune(self, before_ms: int, batch: int = 500) -> int:
        total = 0
        while True:
            async with self._conn("prune") as conn:
                status = await conn.execute(PRUNE, before_ms, batch)
            deleted = int(status.rsplit(" ", 1)[-1])
            total += deleted
            if deleted < batch:
                return total

    # --- reading -----------------------------------------------------------------------------
    async def _fetch(self, query: str, params: Sequence[Any]) -> list[asyncpg.Record]:
        async with self._conn("query") as conn:
            return await conn.fetch(query, *params)

    @staticmethod
    def _rows(raw: Sequence[asyncpg.Record]) -> list[TranscriptRow]:
        return [TranscriptRow(r[0], r[1], r[2], r[3], r[4], orjson.loads(r[5])) for r in raw]

    async def transcript(self, tenant: str, conv: str) -> list[TranscriptRow]:
        return self._rows(await self._fetch(
            "SELECT tenant, conv, seq, type, ts, data FROM transcript_events "
            "WHERE tenant = $1 AND conv = $2 ORDER BY seq", (tenant, conv)))

    async def events(self, tenant: str, conv: str, after: int, limit: int,
                     before: int | None = None) -> list[TranscriptRow]:
        return self._rows(await self._fetch(*sql.events_query(tenant, conv, after, limit, before, "numeric")))

    async def conversation(self, tenant: str, conv: str) -> ConvSummary | None:
        raw = await self._fetch(*sql.conv_query(tenant, conv, "numeric"))
        return ConvSummary(*raw[0]) if raw else None

    async def list_conversations(self, where: ConvFilter, after: ListCursor | None,
                                 limit: int) -> list[ConvSummary]:
        return [ConvSummary(*r) for r in await self._fetch(*sql.list_query(where, after, limit, "numeric"))]

    async def search(self, where: ConvFilter, terms: Sequence[str], before_seq: int | None,
                     limit: int, conv: str | None = None) -> list[SearchHit]:
        if not terms:
            return []
        p = sql.Params("numeric")
        p(" ".join(terms))
        p(where.tenant)
        scope = " AND ".join(sql.search_scope(where, conv, before_seq, p))
        query = SEARCH.format(scope=scope, limit=p(limit))
        return [SearchHit(r[0], r[1], r[2], r[3], orjson.loads(r[4])) for r in await self._fetch(query, p.values)]

    async def export(self, since_ms: int, until_ms: int, tenant: str | None = None,
                     chunk: int = 5000) -> AsyncIterator[TranscriptRow]:
        after: tuple[int, int] | None = None
        while True:
            rows = self._rows(await self._fetch(*sql.export_query(since_ms, until_ms, tenant, after, chunk, "numeric")))
            for r in rows:
                yield r
            if len(rows) < chunk:
                return
            after = (rows[-1].ts, rows[-1].seq)

    async def ping(self) -> None:
        async with self._conn("ping") as conn:
            await conn.fetchval("SELECT 1")

    async def schema_version(self) -> int:
        async with self._conn("query") as conn:
            return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version"))

    # --- plumbing ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except DB_ERRORS as exc:
            raise StorageError(f"postgresql {what}: {type(exc).__name__}: {exc}") from exc

    @contextlib.asynccontextmanager
    async def _conn(self, what: str) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise StorageError("transcript store is not open")
        with self._errors(what):
            async with self._pool.acquire(timeout=self._command_timeout_s) as conn:
                yield conn
