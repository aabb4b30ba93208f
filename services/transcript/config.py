"""The transcript writer's own settings (``PARLEY_TRANSCRIPT_*``), next to the shared ``Settings``.

| variable | default | meaning |
|---|---|---|
| ``PARLEY_TRANSCRIPT_RETENTION_DAYS`` | 0 (keep) | delete conversations whose last event is older |
| ``PARLEY_TRANSCRIPT_PRUNE_INTERVAL_S`` | 3600 | how often each writer applies the retention |
| ``PARLEY_TRANSCRIPT_BATCH`` | 5000 | most events per transaction (reached while a backlog drains) |
| ``PARLEY_TRANSCRIPT_BATCH_DELAY_MS`` | 50 | longest an event waits for its batch to fill |
| ``PARLEY_TRANSCRIPT_ACK_WAIT_S`` | 30 | how long a crashed writer's batch waits before redelivery |
| ``PARLEY_TRANSCRIPT_STATUS_INTERVAL_S`` | 2 | period of the ``status.transcript.<node>`` beacon |
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from parley.core.config import env_number


@dataclass(frozen=True)
class TranscriptConfig:
    retention_days: int = 0
    prune_interval_s: float = 3600.0
    batch_max: int = 5000
    batch_delay_s: float = 0.05
    ack_wait_s: float = 30.0
    status_interval_s: float = 2.0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> TranscriptConfig:
        env = os.environ if env is None else env

        def number(name: str, default: float, minimum: float) -> float:
            return env_number(env, name, default, minimum)

        d = cls()
        return cls(
            retention_days=int(number("PARLEY_TRANSCRIPT_RETENTION_DAYS", d.retention_days, 0)),
            prune_interval_s=number("PARLEY_TRANSCRIPT_PRUNE_INTERVAL_S", d.prune_interval_s, 1),
            batch_max=int(number("PARLEY_TRANSCRIPT_BATCH", d.batch_max, 1)),
            batch_delay_s=number("PARLEY_TRANSCRIPT_BATCH_DELAY_MS", d.batch_delay_s * 1000, 0) / 1000,
            ack_wait_s=number("PARLEY_TRANSCRIPT_ACK_WAIT_S", d.ack_wait_s, 1),
            status_interval_s=number("PARLEY_TRANSCRIPT_STATUS_INTERVAL_S", d.status_interval_s, 0.1),
        )
