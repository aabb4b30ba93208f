"""The audit trail: what happened, when, kept in stream ``AUDIT`` for post-incident reviews.

Services record notable moments (an agent going offline and back, a NATS reconnect, a burst of
nacks, a notice raised or cleared) on ``audit.<kind>.<tenant>`` (``_`` for system-wide ones).
Recording is a core publish captured by the stream: cheap, and never in the way of the work it
describes. ``parley incident`` (``parley.cli.incident``) reads it back with the conversation
events of the same window.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from nats.aio.client import Client as NATS

from .events import now_ms

log = logging.getLogger("parley.audit")

AUDIT_STREAM = "AUDIT"
SYSTEM_TENANT = "_"
KINDS = ("presence", "nats", "nack", "notice", "lag", "routing")


def audit_subject(kind: str, tenant: str | None) -> str:
    return f"audit.{kind}.{tenant or SYSTEM_TENANT}"


async def record(nc: NATS, kind: str, tenant: str | None, service: str, node: str, **data: Any) -> None:
    """Record one moment; failures are logged, never raised (the trail must not break the work)."""
    entry = {"ts": now_ms(), "kind": kind, "tenant": tenant, "service": service, "node": node, **data}
    try:
        await nc.publish(audit_subject(kind, tenant), orjson.dumps(entry))
    except Exception as exc:
        log.warning("audit %s not recorded: %s", kind, exc)
