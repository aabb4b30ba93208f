"""Names on the bus: streams, buckets, subjects. Defined once so services cannot drift apart.

Tenants, users, conversations and queues become subject tokens, so their ids are restricted to
``[A-Za-z0-9_-]`` (checked at token issue and at ``hello``).
"""

from __future__ import annotations

import re

CONV_STREAM = "CONV"
ROUTE_STREAM = "ROUTE"
DEADLETTER_STREAM = "DEADLETTER"

CONVS_BUCKET = "parley_convs"  # conversation state records, key "<tenant>.<conv>"
AGENTS_BUCKET = "parley_agents"  # agent status + load records, key "<tenant>.<agent>"
HEARTBEATS_BUCKET = "parley_heartbeats"  # last heartbeat per agent, key "<tenant>.<agent>"
NOTICES_BUCKET = "parley_notices"  # tenant incident banners, key "<tenant>.<id>"
SEEN_BUCKET = "parley_seen"  # when a customer last had a connection, key "<tenant>.<customer>"

TRANSCRIPT_CONSUMER = "transcript"
ROUTER_CONSUMER = "router"

ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_id(value: object) -> bool:
    return isinstance(value, str) and ID_RE.match(value) is not None


# --- persisted conversation events (stream CONV) -------------------------------------------
def conv_subject(tenant: str, conv: str) -> str:
    return f"conv.{tenant}.{conv}"


def live_subject(tenant: str, conv: str) -> str:
    """Where CONV's RePublish puts each stored event (core NATS, at most once)."""
    return f"live.conv.{tenant}.{conv}"


def split_conv_subject(subject: str) -> tuple[str, str]:
    """``conv.t.c`` or ``live.conv.t.c`` → ``(t, c)``."""
    parts = subject.split(".")
    return parts[-2], parts[-1]


# --- routing requests (stream ROUTE, work queue) --------------------------------------------
def route_subject(tenant: str, conv: str) -> str:
    return f"route.{tenant}.{conv}"


# --- ephemeral traffic (core NATS) -----------------------------------------------------------
def typing_subject(tenant: str, conv: str) -> str:
    return f"eph.conv.{tenant}.{conv}"


def user_subject(tenant: str, user: str) -> str:
    """Frames addressed to every connection of one user (offers, presence, queue positions)."""
    return f"user.{tenant}.{user}"


def tenant_notice_subject(tenant: str) -> str:
    return f"notice.{tenant}"


def heartbeat_subject(tenant: str, agent: str) -> str:
    return f"hb.{tenant}.{agent}"


def customer_seen_subject(tenant: str, customer: str) -> str:
    """Published by gateways for every connected customer every ``CUSTOMER_SEEN_INTERVAL_S``
    (payload ``{"node"}``): routers use it to close conversations abandoned while waiting."""
    return f"seen.{tenant}.{customer}"


CUSTOMER_SEEN_INTERVAL_S = 5.0

# Routers announce themselves here (``{"node", "gone"?}``, about once a second) so that each
# queue's ephemeral work (queue position frames) has one owner among the live routers.
ROUTER_MEMBERS = "router.members"


PRESENCE_HELLO = "presence.hello"  # request: an agent connected; reply: its record after the heartbeat
PRESENCE_SET = "presence.set"  # request: an agent chose online/away; reply: its record
TRANSCRIPT_GET = "transcript.get"  # request: {tenant, conv}; reply: transcript JSON
STATUS_SUBJECT = "status.{service}.{node}"  # services' health beacons (issue 6 aggregates them)


def kv_key(tenant: str, ident: str) -> str:
    return f"{tenant}.{ident}"
