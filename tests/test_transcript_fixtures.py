"""Fixtures for the transcript tests on both backends (imported by the test_transcript_* modules).

PostgreSQL: ``PARLEY_TEST_PG_DSN`` (default the local server, user postgres, database test). Each
test gets its own schema (``?schema=`` of the DSN), or its own database when it needs to take the
database away; both are dropped afterwards. When no server answers, PostgreSQL cases are skipped
with the reason printed (CI has one).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

from parley.transcript.storage import TranscriptRow, TranscriptStore, store_from_dsn

PG_DSN = os.environ.get("PARLEY_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")


async def pg_admin() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(PG_DSN, timeout=3)
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        reason = f"PostgreSQL not reachable at {PG_DSN} ({exc}); set PARLEY_TEST_PG_DSN"
        print(reason)
        if os.environ.get("PARLEY_REQUIRE_POSTGRES") == "1":  # CI: the backend must be tested
            pytest.fail(reason)
        pytest.skip(reason)


def with_database(dsn: str, database: str) -> str:
    base, _, query = dsn.partition("?")
    return base.rsplit("/", 1)[0] + "/" + database + (f"?{query}" if query else "")


@pytest.fixture
async def pg_schema_dsn():
    """A DSN whose tables live in a fresh schema, dropped after the test."""
    admin = await pg_admin()
    schema = "parley_t_" + uuid.uuid4().hex[:12]
    yield f"{PG_DSN}{'&' if '?' in PG_DSN else '?'}schema={schema}"
    await admin.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    await admin.close()


@pytest.fixture
async def pg_database_dsn():
    """A DSN of a fresh database (for tests that refuse connections to it), dropped after the test."""
    admin = await pg_admin()
    name = "parley_t_" + uuid.uuid4().hex[:12]
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield with_database(PG_DSN, name)
    await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


@pytest.fixture(params=BACKENDS)
def backend_dsn(request, tmp_path):
    """The DSN of an empty store on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/transcripts.db"
    return request.getfixturevalue("pg_schema_dsn")


@pytest.fixture
async def open_store(backend_dsn):
    """Open stores on the test's DSN; all closed at teardown."""
    stores: list[TranscriptStore] = []

    async def make() -> TranscriptStore:
        store = store_from_dsn(backend_dsn)
        await store.open()
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def store(open_store):
    return await open_store()


def msg(tenant: str, conv: str, seq: int, body: str, sender: str = "u1", role: str = "customer",
        ts: int | None = None) -> TranscriptRow:
    return TranscriptRow(tenant, conv, seq, "message", 1_000_000 + seq if ts is None else ts,
                         {"id": f"m{seq}", "from": {"id": sender, "role": role}, "body": body})


def ev(tenant: str, conv: str, seq: int, type_: str, ts: int | None = None, **data) -> TranscriptRow:
    return TranscriptRow(tenant, conv, seq, type_, 1_000_000 + seq if ts is None else ts, data)


async def wait_for(condition: Callable[[], Awaitable[object] | object], timeout: float = 15.0,
                   what: str = "") -> object:
    """Poll every 20 ms until ``condition`` holds; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what or condition}")
        await asyncio.sleep(0.02)
