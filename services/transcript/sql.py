"""SQL text shared by the two backends; only placeholders differ (``?`` in SQLite, ``$n`` in asyncpg)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .storage import ConvFilter, ListCursor
from .summary import state_sql

CONV_COLUMNS = f"tenant, conv, {state_sql()}, queue, customer, agent, first_ts, last_ts, last_seq, closed_at"


class Params:
    """Collects parameters and hands out the backend's placeholder for each."""

    def __init__(self, style: str) -> None:
        self.style = style
        self.values: list[Any] = []

    def __call__(self, value: Any) -> str:
        self.values.append(value)
        return "?" if self.style == "qmark" else f"${len(self.values)}"


def conv_conditions(where: ConvFilter, p: Callable[[Any], str], prefix: str = "",
                    time_column: str = "first_ts") -> list[str]:
    """``AND``-ed conditions on ``transcript_convs`` (aliased ``prefix``) for a filter."""
    c = [f"{prefix}tenant = {p(where.tenant)}"]
    for column in ("agent", "customer", "queue"):
        value = getattr(where, column)
        if value is not None:
            c.append(f"{prefix}{column} = {p(value)}")
    if where.state is not None:
        c.append(f"{state_sql(prefix)} = {p(where.state)}")
    if where.since_ms is not None:
        c.append(f"{time_column} >= {p(where.since_ms)}")
    if where.until_ms is not None:
        c.append(f"{time_column} < {p(where.until_ms)}")
    return c


def list_query(where: ConvFilter, after: ListCursor | None, limit: int, style: str) -> tuple[str, list[Any]]:
    p = Params(style)
    conditions = conv_conditions(where, p)
    if after is not None:
        conditions.append(f"(first_ts, conv) < ({p(after[0])}, {p(after[1])})")
    sql = (f"SELECT {CONV_COLUMNS} FROM transcript_convs WHERE {' AND '.join(conditions)} "
           f"ORDER BY first_ts DESC, conv DESC LIMIT {p(limit)}")
    return sql, p.values


def conv_query(tenant: str, conv: str, style: str) -> tuple[str, list[Any]]:
    p = Params(style)
    return (f"SELECT {CONV_COLUMNS} FROM transcript_convs WHERE tenant = {p(tenant)} AND conv = {p(conv)}",
            p.values)


def events_query(tenant: str, conv: str, after: int, limit: int, before: int | None,
                 style: str) -> tuple[str, list[Any]]:
    p = Params(style)
    sql = (f"SELECT tenant, conv, seq, type, ts, data FROM transcript_events "
           f"WHERE tenant = {p(tenant)} AND conv = {p(conv)} AND seq > {p(after)}")
    if before is not None:
        sql += f" AND seq < {p(before)}"
    return sql + f" ORDER BY seq LIMIT {p(limit)}", p.values


def export_query(since_ms: int, until_ms: int, tenant: str | None, after: tuple[int, int] | None,
                 chunk: int, style: str) -> tuple[str, list[Any]]:
    p = Params(style)
    conditions = [f"ts >= {p(since_ms)}", f"ts < {p(until_ms)}"]
    if after is not None:
        conditions.append(f"(ts, seq) > ({p(after[0])}, {p(after[1])})")
    if tenant is not None:
        conditions.append(f"tenant = {p(tenant)}")
    return (f"SELECT tenant, conv, seq, type, ts, data FROM transcript_events WHERE {' AND '.join(conditions)} "
            f"ORDER BY ts, seq LIMIT {p(chunk)}", p.values)


def search_scope(where: ConvFilter, conv: str | None, before_seq: int | None, p: Params) -> list[str]:
    """Conditions on the conversation (alias ``c``) and the event (alias ``e``) of a search."""
    scope = ConvFilter(where.tenant, agent=where.agent, customer=where.customer, queue=where.queue,
                       state=where.state)
    c = conv_conditions(scope, p, prefix="c.")
    if conv is not None:
        c.append(f"c.conv = {p(conv)}")
    if where.since_ms is not None:
        c.append(f"e.ts >= {p(where.since_ms)}")
    if where.until_ms is not None:
        c.append(f"e.ts < {p(where.until_ms)}")
    if before_seq is not None:
        c.append(f"e.seq < {p(before_seq)}")
    return c


def fts5_match(terms: Sequence[str]) -> str:
    """Each term as a quoted FTS5 string (user text is never FTS5 syntax); all must match."""
    return " ".join('"' + t.replace('"', '""') + '"' for t in terms)
