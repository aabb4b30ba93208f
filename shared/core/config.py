"""Settings for every Parley service, read once from ``PARLEY_*`` variables.

One frozen dataclass holds what all services share; each service reads only the fields it
needs. ``Settings.from_env()`` is the single place environment variables are parsed, so a typo
in a value fails at start with the variable's name, not later in a handler.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import ConfigError

ROUTING_MODES = ("offer", "auto")


@dataclass(frozen=True)
class QueuePolicy:
    """How long a conversation may wait in a queue before it overflows elsewhere."""

    max_wait_s: int | None = None
    overflow: str | None = None


@dataclass(frozen=True)
class Settings:
    nats_urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    jwt_secret: str = ""
    admin_key: str = ""
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    node_id: str = ""
    stream_replicas: int = 1
    heartbeat_ms: int = 5000
    presence_ttl_ms: int = 15000
    offer_timeout_ms: int = 30000
    requeue_grace_ms: int = 5000
    routing_mode: str = "offer"
    transcript_dsn: str = "sqlite:///.parley/transcripts.db"
    dedupe_window_s: int = 300
    # How long the conversation stream keeps events; the transcript store is the long-term record.
    stream_max_age_s: int = 30 * 24 * 3600
    max_body: int = 4096
    rate_limit: int = 200
    queues: Mapping[str, QueuePolicy] = field(default_factory=dict)
    abandon_s: int = 600
    wait_warn_s: int = 120
    transcript_lag_warn: int = 1000
    # Frames a connection may have queued towards a slow client before it is disconnected.
    outbound_queue: int = 2000

    @property
    def heartbeat_timeout_s(self) -> float:
        return 3 * self.heartbeat_ms / 1000

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, service: str = "") -> Settings:
        env = os.environ if env is None else env
        d = cls()

        def text(name: str, default: str) -> str:
            return env.get(name, default).strip() or default

        def integer(name: str, default: int, minimum: int = 0) -> int:
            return int(env_number(env, name, default, minimum, integer=True))

        routing_mode = text("PARLEY_ROUTING_MODE", d.routing_mode)
        if routing_mode not in ROUTING_MODES:
            raise ConfigError(f"PARLEY_ROUTING_MODE must be one of {ROUTING_MODES}, got {routing_mode!r}")
        urls = tuple(u.strip() for u in text("PARLEY_NATS_URL", ",".join(d.nats_urls)).split(",") if u.strip())
        node_id = text("PARLEY_NODE_ID", "") or f"{service or 'parley'}-{os.uname().nodename}-{os.getpid()}"
        settings = cls(
            nats_urls=urls,
            jwt_secret=env.get("PARLEY_JWT_SECRET", ""),
            admin_key=env.get("PARLEY_ADMIN_KEY", ""),
            http_host=text("PARLEY_HTTP_HOST", d.http_host),
            http_port=integer("PARLEY_HTTP_PORT", d.http_port),
            node_id=node_id,
            stream_replicas=integer("PARLEY_STREAM_REPLICAS", d.stream_replicas, 1),
            heartbeat_ms=integer("PARLEY_HEARTBEAT_MS", d.heartbeat_ms, 100),
            presence_ttl_ms=integer("PARLEY_PRESENCE_TTL_MS", d.presence_ttl_ms, 100),
            offer_timeout_ms=integer("PARLEY_OFFER_TIMEOUT_MS", d.offer_timeout_ms, 100),
            requeue_grace_ms=integer("PARLEY_REQUEUE_GRACE_MS", d.requeue_grace_ms),
            routing_mode=routing_mode,
            transcript_dsn=text("PARLEY_TRANSCRIPT_DSN", d.transcript_dsn),
            dedupe_window_s=integer("PARLEY_DEDUPE_WINDOW_S", d.dedupe_window_s, 1),
            stream_max_age_s=integer("PARLEY_STREAM_MAX_AGE_S", d.stream_max_age_s, 1),
            max_body=integer("PARLEY_MAX_BODY", d.max_body, 1),
            rate_limit=integer("PARLEY_RATE_LIMIT", d.rate_limit, 1),
            queues=parse_queue_policies(env.get("PARLEY_QUEUES", "")),
            abandon_s=integer("PARLEY_ABANDON_S", d.abandon_s, 1),
            wait_warn_s=integer("PARLEY_WAIT_WARN_S", d.wait_warn_s, 1),
            transcript_lag_warn=integer("PARLEY_TRANSCRIPT_LAG_WARN", d.transcript_lag_warn, 1),
            outbound_queue=integer("PARLEY_OUTBOUND_QUEUE", d.outbound_queue, 10),
        )
        if settings.dedupe_window_s > settings.stream_max_age_s:
            raise ConfigError("PARLEY_DEDUPE_WINDOW_S may not exceed PARLEY_STREAM_MAX_AGE_S")
        return settings


def env_number(env: Mapping[str, str], name: str, default: float, minimum: float, integer: bool = False) -> float:
    """One numeric ``PARLEY_*`` variable: its default when unset, a ConfigError naming it when bad."""
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name} must be {'an integer' if integer else 'a number'}, got {raw!r}") from exc
    if value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def parse_queue_policies(raw: str) -> dict[str, QueuePolicy]:
    """``PARLEY_QUEUES``: JSON object of queue name (``name``, ``tenant/name`` or ``*``) to policy."""
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"PARLEY_QUEUES is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError("PARLEY_QUEUES must be a JSON object of queue name to policy")
    policies: dict[str, QueuePolicy] = {}
    for name, spec in data.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"PARLEY_QUEUES[{name!r}] must be an object")
        max_wait = spec.get("max_wait_s")
        overflow = spec.get("overflow")
        if max_wait is not None and (not isinstance(max_wait, int) or max_wait < 0):
            raise ConfigError(f"PARLEY_QUEUES[{name!r}].max_wait_s must be a non-negative integer")
        if overflow is not None and not isinstance(overflow, str):
            raise ConfigError(f"PARLEY_QUEUES[{name!r}].overflow must be a string")
        policies[name] = QueuePolicy(max_wait_s=max_wait, overflow=overflow)
    return policies


def queue_policy(settings: Settings, tenant: str, queue: str) -> QueuePolicy:
    """The most specific policy for a tenant's queue: ``tenant/name``, then ``name``, then ``*``."""
    for key in (f"{tenant}/{queue}", queue, "*"):
        if key in settings.queues:
            return settings.queues[key]
    return QueuePolicy()
