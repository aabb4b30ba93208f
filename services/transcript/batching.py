"""When the writer commits: a pure batching policy, no I/O, so it can be tested without a clock.

A batch is flushed when it is full (one big transaction amortises the commit's fsync) or when its
oldest item has waited ``max_delay_s`` (so a quiet conversation's events still reach the store
within a bounded delay). Times are plain floats from any monotonic clock, passed in by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class BatchPolicy:
    max_size: int = 500
    max_delay_s: float = 0.05

    def __post_init__(self) -> None:
        if self.max_size < 1:
            raise ValueError("max_size must be >= 1")
        if self.max_delay_s < 0:
            raise ValueError("max_delay_s must be >= 0")


@dataclass
class PendingBatch(Generic[T]):
    """Items waiting for the next commit, with the time the oldest one arrived."""

    policy: BatchPolicy = field(default_factory=BatchPolicy)
    items: list[T] = field(default_factory=list)
    oldest_at: float | None = None

    def __len__(self) -> int:
        return len(self.items)

    def add(self, item: T, now: float) -> None:
        if self.oldest_at is None:
            self.oldest_at = now
        self.items.append(item)

    def room(self) -> int:
        """How many more items fit before the batch is full (what to ask the server for)."""
        return max(self.policy.max_size - len(self.items), 0)

    def should_flush(self, now: float) -> bool:
        if not self.items:
            return False
        if len(self.items) >= self.policy.max_size:
            return True
        assert self.oldest_at is not None
        return now - self.oldest_at >= self.policy.max_delay_s

    def time_until_flush(self, now: float) -> float | None:
        """Seconds until the age limit forces a flush; None when empty (nothing is due)."""
        if not self.items:
            return None
        if len(self.items) >= self.policy.max_size:
            return 0.0
        assert self.oldest_at is not None
        return max(self.oldest_at + self.policy.max_delay_s - now, 0.0)

    def take(self) -> list[T]:
        items, self.items, self.oldest_at = self.items, [], None
        return items
