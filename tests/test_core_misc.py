"""Auth, rate limiting, configuration and packaging guards."""

import importlib
import time

import jwt
import pytest

from parley.core.auth import AuthError, issue_token, verify_token
from parley.core.config import Settings, queue_policy
from parley.core.errors import ConfigError
from parley.core.ratelimit import TokenBucket

SECRET = "s" * 40


def test_token_round_trip_and_exp_from_ttl():
    tok = issue_token({"sub": "a1", "tenant": "t1", "role": "agent", "skills": ["q"], "exp": 1}, SECRET, ttl_s=60)
    who = verify_token(tok, SECRET)
    assert (who.user, who.tenant, who.role, who.skills, who.max_chats) == ("a1", "t1", "agent", ("q",), 3)
    assert abs(who.exp - (time.time() + 60)) < 5


@pytest.mark.parametrize("claims,key,alg", [
    ({"sub": "u", "tenant": "t", "role": "customer"}, SECRET, "HS256"),               # no exp
    ({"sub": "u", "tenant": "t", "role": "admin", "exp": 2**40}, SECRET, "HS256"),   # unknown role
    ({"sub": "u", "tenant": "t", "role": "customer", "exp": 2**40}, "other" * 8, "HS256"),  # bad signature
    ({"sub": "u", "tenant": "t", "role": "customer", "exp": 2**40}, SECRET, "HS512"),  # other algorithm
    ({"sub": "u", "tenant": "t", "role": "customer", "exp": int(time.time()) - 60}, SECRET, "HS256"),  # expired
    ({"sub": "u.x", "tenant": "t", "role": "customer", "exp": 2**40}, SECRET, "HS256"),  # not a subject token
])
def test_bad_tokens_are_refused(claims, key, alg):
    with pytest.raises(AuthError):
        verify_token(jwt.encode(claims, key, algorithm=alg), SECRET)


def test_alg_none_is_refused():
    tok = jwt.encode({"sub": "u", "tenant": "t", "role": "customer", "exp": 2**40}, None, algorithm="none")
    with pytest.raises(AuthError):
        verify_token(tok, SECRET)


def test_expired_within_leeway_is_accepted():
    tok = jwt.encode({"sub": "u", "tenant": "t", "role": "customer", "exp": int(time.time()) - 10}, SECRET)
    assert verify_token(tok, SECRET).user == "u"


def test_token_bucket_burst_refill_and_sustained_overload():
    b = TokenBucket(rate=10, burst=20)
    assert all(b.allow(100.0) for _ in range(20))
    assert not b.allow(100.0)
    assert b.allow(100.2)  # 2 tokens refilled
    now = 101.0
    while b.allow(now):
        pass
    start = now
    for i in range(200):  # keep hammering for 10 s
        b.allow(start + i * 0.05)
        b.tokens = 0
    assert b.sustained_overload(start + 10.0)


def test_settings_from_env_and_errors():
    s = Settings.from_env({"PARLEY_NATS_URL": "nats://a:1, nats://b:2", "PARLEY_ROUTING_MODE": "auto",
                           "PARLEY_QUEUES": '{"*": {"max_wait_s": 60, "overflow": "tier2"}, "acme/vip": {"max_wait_s": 5}}'})
    assert s.nats_urls == ("nats://a:1", "nats://b:2") and s.routing_mode == "auto"
    assert queue_policy(s, "acme", "vip").max_wait_s == 5
    assert queue_policy(s, "other", "vip").overflow == "tier2"
    for bad in ({"PARLEY_HEARTBEAT_MS": "soon"}, {"PARLEY_ROUTING_MODE": "random"}, {"PARLEY_QUEUES": "[1]"},
                {"PARLEY_DEDUPE_WINDOW_S": "100", "PARLEY_STREAM_MAX_AGE_S": "50"}):
        with pytest.raises(ConfigError):
            Settings.from_env(bad)


def test_bare_shared_package_is_not_importable():
    # STYLE: only the parley.* namespace exists; a stray `shared` would mean two copies of every class
    with pytest.raises(ImportError):
        importlib.import_module("shared")
