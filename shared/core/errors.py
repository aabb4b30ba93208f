"""The one error root of Parley and its small tree.

    ParleyError
    ├── ConfigError          bad settings; fatal at start
    ├── ProtocolError        a client frame we refuse; carries a wire code (bad_frame, forbidden…)
    ├── AuthError            bad, expired or missing token            (wire: unauthorized)
    ├── UnavailableError     NATS or a dependency cannot be reached   (wire: unavailable, retry)
    └── StorageError         the transcript store refused a write     (retry later)

Library errors (nats, asyncpg, jwt) are translated at the boundary with ``raise … from exc``.
Each wire code says whether the client should retry.
"""

from __future__ import annotations

# Wire error codes of protocol v1 and whether a client should retry the same request.
RETRYABLE_CODES = {"rate_limited": True, "unavailable": True, "internal": True}
ERROR_CODES = (
    "bad_frame",
    "unauthorized",
    "forbidden",
    "not_found",
    "too_large",
    "rate_limited",
    "unavailable",
    "internal",
)


class ParleyError(Exception):
    """Root of every error Parley raises on purpose."""


class ConfigError(ParleyError):
    pass


class ProtocolError(ParleyError):
    def __init__(self, code: str, msg: str = "", ref: str | None = None) -> None:
        assert code in ERROR_CODES, code
        super().__init__(msg or code)
        self.code = code
        self.msg = msg
        self.ref = ref

    @property
    def retry(self) -> bool:
        return RETRYABLE_CODES.get(self.code, False)


class AuthError(ParleyError):
    pass


class UnavailableError(ParleyError):
    pass


class StorageError(ParleyError):
    pass
