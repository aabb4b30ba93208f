"""Tokens: HS256 JWTs with the claims of SPEC §5, checked strictly and issued for trusted back ends."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import jwt

from .errors import AuthError
from .subjects import valid_id

ROLES = ("customer", "agent", "supervisor")
LEEWAY_S = 30
DEFAULT_MAX_CHATS = 3


@dataclass(frozen=True)
class Identity:
    user: str
    tenant: str
    role: str
    exp: int
    skills: tuple[str, ...] = ()
    max_chats: int = DEFAULT_MAX_CHATS
    name: str | None = None
    claims: dict[str, Any] = field(default_factory=dict, compare=False)


def check_claims(claims: dict[str, Any]) -> Identity:
    """Validate claim shapes (shared by token checks and token issue)."""
    for claim in ("sub", "tenant", "role", "exp"):
        if claim not in claims:
            raise AuthError(f"claim {claim!r} is required")
    if not valid_id(claims["sub"]) or not valid_id(claims["tenant"]):
        raise AuthError("sub and tenant must be 1-64 characters of [A-Za-z0-9_-]")
    role = claims["role"]
    if role not in ROLES:
        raise AuthError(f"role must be one of {ROLES}")
    if not isinstance(claims["exp"], int | float) or isinstance(claims["exp"], bool):
        raise AuthError("exp must be a number")
    skills = claims.get("skills", [])
    if not isinstance(skills, list) or not all(valid_id(s) for s in skills):
        raise AuthError("skills must be a list of queue names")
    max_chats = claims.get("max_chats", DEFAULT_MAX_CHATS)
    if not isinstance(max_chats, int) or isinstance(max_chats, bool) or not 0 <= max_chats <= 1000:
        raise AuthError("max_chats must be an integer 0..1000")
    name: str | None = claims.get("name")
    if name is not None and not isinstance(name, str):
        raise AuthError("name must be a string")
    return Identity(
        user=claims["sub"],
        tenant=claims["tenant"],
        role=role,
        exp=int(claims["exp"]),
        skills=tuple(skills) if role == "agent" else (),
        max_chats=max_chats,
        name=name,
        claims=claims,
    )


def verify_token(token: object, secret: str) -> Identity:
    if not isinstance(token, str) or not token:
        raise AuthError("token missing")
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=["HS256"],  # never "none", never another algorithm
            leeway=LEEWAY_S,
            options={"require": ["sub", "tenant", "role", "exp"]},
        )
    except jwt.PyJWTError as exc:
        raise AuthError(f"invalid token: {exc}") from exc
    return check_claims(claims)


def issue_token(claims: dict[str, Any], secret: str, ttl_s: int = 3600) -> str:
    """Sign a token; ``exp`` is set from ``ttl_s`` whatever the caller passed."""
    body = {k: v for k, v in claims.items() if k not in ("exp", "ttl_s")}
    body["exp"] = int(time.time()) + ttl_s
    check_claims(body)
    return jwt.encode(body, secret, algorithm="HS256")
