"""Per-connection frame rate limit: a token bucket, plus the "continuously over for 10 s" rule."""

from __future__ import annotations

from dataclasses import dataclass

SUSTAINED_LIMIT_S = 10.0


@dataclass
class TokenBucket:
    rate: float  # frames per second
    burst: float  # bucket size (protocol v1: twice the rate)
    tokens: float = -1.0
    updated: float = 0.0
    # when the connection started being refused without a break (None: it is within its limit)
    over_since: float | None = None

    def __post_init__(self) -> None:
        if self.tokens < 0:
            self.tokens = self.burst

    def allow(self, now: float) -> bool:
        if self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            # one accepted frame ends "continuously over" only once the bucket has refilled a bit
            if self.tokens >= 1.0:
                self.over_since = None
            return True
        if self.over_since is None:
            self.over_since = now
        return False

    def sustained_overload(self, now: float) -> bool:
        return self.over_since is not None and now - self.over_since >= SUSTAINED_LIMIT_S
