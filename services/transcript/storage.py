"""Where transcripts are kept: a backend-neutral async interface and the DSN that picks a backend.

Every writer instance of a deployment shares one store. Writes are idempotent upserts keyed by
the event's position (``tenant, conv, seq``; ``seq`` is the CONV stream sequence), so a batch
that is redelivered after a crash between commit and ack is stored once. Next to the events each
backend keeps one summary row per conversation (``transcript_convs``, see ``summary.py``) for the
conversation list, and a full-text index over message bodies. The SQL lives in each backend
(``sqlite_store.py``, ``postgres_store.py``); the service, the CLI and the queries only see this
module.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from parley.core.errors import ConfigError

CONV_STATES = ("queued", "assigned", "closed")


@dataclass(frozen=True)
class TranscriptRow:
    """One stored conversation event. ``prev`` is not stored: it follows from the row order."""

    tenant: str
    conv: str
    seq: int
    type: str
    ts: int
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def body(self) -> str | None:
        """The message text, kept in its own column so that search can index it."""
        if self.type != "message":
            return None
        body = self.data.get("body")
        return body if isinstance(body, str) else None

    def as_export(self) -> dict[str, Any]:
        """One line of ``parley transcripts export --format jsonl``."""
        return {"tenant": self.tenant, "conv": self.conv, "seq": self.seq, "type": self.type,
                "ts": self.ts, "data": self.data}


@dataclass(frozen=True)
class ConvSummary:
    """One conversation as the list shows it (``transcript_convs``)."""

    tenant: str
    conv: str
    state: str
    queue: str | None
    customer: str | None
    agent: str | None  # the agent holding it (after close: the one who held it last), else None
    first_ts: int  # time of its first stored event (its ``opened``): the list's order and time filter
    last_ts: int
    last_seq: int
    closed_at: int | None

    def as_dict(self) -> dict[str, Any]:
        return {"conv": self.conv, "state": self.state, "queue": self.queue, "customer": self.customer,
                "agent": self.agent, "opened_at": self.first_ts, "last_ts": self.last_ts,
                "last_seq": self.last_seq, "closed_at": self.closed_at}

    def may_see(self, user: str, role: str) -> bool:
        """The socket's visibility rule over stored data (the KV record may have expired)."""
        if role == "supervisor":
            return True
        if role == "customer":
            return self.customer == user
        if role == "agent":
            return self.agent == user
        return False


@dataclass(frozen=True)
class ConvFilter:
    """Conversation list filters; every field set must match (``None`` = any)."""

    tenant: str
    since_ms: int | None = None  # first_ts >= since_ms
    until_ms: int | None = None  # first_ts < until_ms
    agent: str | None = None
    customer: str | None = None
    queue: str | None = None
    state: str | None = None


@dataclass(frozen=True)
class SearchHit:
    tenant: str
    conv: str
    seq: int
    ts: int
    data: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {"conv": self.conv, "seq": self.seq, "ts": self.ts, "from": self.data.get("from"),
                "body": self.data.get("body")}


# A list page continues after this (first_ts, conv), in descending order.
ListCursor = tuple[int, str]


class TranscriptStore(abc.ABC):
    """Async transcript storage. Backends translate their errors into ``StorageError``."""

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema to the current version (idempotent, safe when racing)."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def write_batch(self, rows: Sequence[TranscriptRow]) -> int:
        """Insert rows in one transaction, ignoring ones already stored; returns how many were new.

        The conversation summaries and the search index change in the same transaction."""

    @abc.abstractmethod
    async def transcript(self, tenant: str, conv: str) -> list[TranscriptRow]:
        """All stored events of one conversation, ordered by ``seq``; empty when unknown."""

    @abc.abstractmethod
    async def events(self, tenant: str, conv: str, after: int, limit: int,
                     before: int | None = None) -> list[TranscriptRow]:
        """At most ``limit`` events with ``after < seq`` (``< before``), ordered by ``seq``."""

    @abc.abstractmethod
    async def conversation(self, tenant: str, conv: str) -> ConvSummary | None: ...

    @abc.abstractmethod
    async def list_conversations(self, where: ConvFilter, after: ListCursor | None,
                                 limit: int) -> list[ConvSummary]:
        """Newest first by ``(first_ts, conv)``, continuing strictly after ``after``."""

    @abc.abstractmethod
    async def search(self, where: ConvFilter, terms: Sequence[str], before_seq: int | None,
                     limit: int, conv: str | None = None) -> list[SearchHit]:
        """Messages whose body holds every term, newest (highest ``seq``) first, ``seq < before_seq``.

        ``where`` restricts the conversations (tenant, customer, agent, …); its time bounds apply
        to the message's ``ts``."""

    @abc.abstractmethod
    def export(self, since_ms: int, until_ms: int, tenant: str | None = None,
               chunk: int = 5000) -> AsyncIterator[TranscriptRow]:
        """Events with ``since_ms <= ts < until_ms`` ordered by ``(ts, seq)``, read ``chunk`` rows at
        a time (keyset pagination), so memory stays constant for any number of rows."""

    @abc.abstractmethod
    async def prune(self, before_ms: int, batch: int = 500) -> int:
        """Delete conversations whose last event is older than ``before_ms``, ``batch`` per
        transaction; returns how many conversations were deleted."""

    async def maintain(self) -> None:  # noqa: B027  (optional: most backends need nothing)
        """Periodic housekeeping the writer runs every few seconds (e.g. search indexing)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise ``StorageError`` unless the store answers a trivial query."""

    @abc.abstractmethod
    async def schema_version(self) -> int: ...


SQLITE_PREFIX = "sqlite:///"
POSTGRES_PREFIXES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


def sqlite_path_from_dsn(dsn: str) -> Path:
    """``sqlite:///rel/path`` is relative to the working directory, ``sqlite:////abs/path`` absolute."""
    raw = dsn[len(SQLITE_PREFIX) :].split("?", 1)[0]
    if not raw or raw.endswith("/"):
        raise ConfigError(f"PARLEY_TRANSCRIPT_DSN {dsn!r} names no database file")
    return Path(raw)


def _query_options(dsn: str) -> dict[str, str]:
    return dict(parse_qsl(dsn.split("?", 1)[1])) if "?" in dsn else {}


def store_from_dsn(dsn: str) -> TranscriptStore:
    """The store ``PARLEY_TRANSCRIPT_DSN`` asks for (not opened yet).

    ``sqlite:///path?busy_timeout_ms=N`` sets how long a write waits for another writer's lock
    (default 10000). ``postgresql://…?schema=name`` keeps the tables in that schema (created if
    missing; default ``public``) — several deployments or test runs can share one database.
    """
    dsn = dsn.strip()
    if dsn.startswith(SQLITE_PREFIX):
        from .sqlite_store import SqliteStore

        options = _query_options(dsn)
        try:
            busy_ms = int(options.get("busy_timeout_ms", "10000"))
        except ValueError as exc:
            raise ConfigError("PARLEY_TRANSCRIPT_DSN: busy_timeout_ms must be an integer") from exc
        return SqliteStore(sqlite_path_from_dsn(dsn), busy_timeout_s=busy_ms / 1000)
    if dsn.startswith(POSTGRES_PREFIXES):
        from .postgres_store import PostgresStore

        return PostgresStore.from_dsn(dsn)
    raise ConfigError(
        f"PARLEY_TRANSCRIPT_DSN must start with sqlite:/// or postgresql://, got {dsn!r}"
    )
