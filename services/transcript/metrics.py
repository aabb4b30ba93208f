"""Prometheus metrics of the transcript writer (process-wide, shared by instances in one process)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_WRITTEN = Counter(
    "parley_transcript_events_written", "Events committed to the transcript store (new rows only)"
)
BATCH_SIZE = Histogram(
    "parley_transcript_batch_size",
    "Messages per committed batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000),
)
COMMIT_SECONDS = Histogram(
    "parley_transcript_commit_seconds",
    "Time to commit one batch to the transcript store",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
DEAD_LETTERS = Counter("parley_transcript_dead_letters", "Undecodable messages sent to deadletter.transcript")
WRITE_FAILURES = Counter("parley_transcript_write_failures", "Batches the store refused (retried)")
LAG = Gauge(
    "parley_transcript_lag_events",
    "Events in CONV not yet committed by the writers (consumer pending + awaiting ack)",
)
PRUNED = Counter("parley_transcript_pruned_conversations", "Conversations deleted by the retention setting")
REDELIVERED = Counter(
    "parley_transcript_redelivered",
    "Messages received again (another writer crashed or was slow before acking them; the upsert ignores repeats)",
)
