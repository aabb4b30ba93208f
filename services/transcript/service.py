"""The transcript writer: CONV stream → transcript store, and ``transcript.get`` queries.

Delivery is at least once and the store upsert is idempotent, so the only rule that matters for
G1 is the order: commit first, ack after. Nothing here acks a message whose row is not
committed (undecodable ones are acked once they are safely in the dead-letter stream).
Every failure on the way (NATS reconnecting, the database refusing a write) is retried inside
the loop; the loop only ends when ``stop()`` asks it to.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import nats.errors
import orjson
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from opentelemetry import trace

from parley.core import bus, subjects, telemetry
from parley.core.config import Settings
from parley.core.errors import StorageError
from parley.core.events import now_ms
from parley.core.tasks import stop_tasks

from . import metrics, queries
from .batching import BatchPolicy, PendingBatch
from .config import TranscriptConfig
from .consumer import BatchPuller, decode_row, ensure_consumer, publish_dead_letter
from .storage import TranscriptRow, TranscriptStore, store_from_dsn
from .view import transcript_reply

log = logging.getLogger("parley.transcript")
QUERY_QUEUE_GROUP = "transcript"
MIN_FETCH_S = 0.005  # nats-py rejects a zero timeout; below a few ms the pull request is pure overhead


def status_subject(node_id: str) -> str:
    """``status.transcript.<node>``; a node id with characters a subject token cannot hold is mangled."""
    return subjects.STATUS_SUBJECT.format(service="transcript", node=re.sub(r"[^A-Za-z0-9_-]", "_", node_id))


@dataclass(frozen=True)
class WriterTuning:
    batch: BatchPolicy = field(default_factory=lambda: BatchPolicy(max_size=5000))
    # Longest one fetch waits; it bounds how long stop() waits for the fetch in flight.
    idle_fetch_s: float = 0.25
    monitor_interval_s: float = 2.0
    retry_initial_s: float = 0.1
    retry_max_s: float = 5.0
    drain_timeout_s: float = 15.0


class TranscriptService:
    name = "transcript"

    def __init__(self, settings: Settings, tuning: WriterTuning | None = None,
                 config: TranscriptConfig | None = None) -> None:
        self.settings = settings
        self.config = config or TranscriptConfig.from_env()
        self.tuning = tuning or WriterTuning(
            batch=BatchPolicy(self.config.batch_max, self.config.batch_delay_s),
            monitor_interval_s=self.config.status_interval_s,
        )
        self.store: TranscriptStore | None = None
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.processed = 0  # messages this instance committed or dead-lettered and acked
        self.lag: int | None = None
        self._puller: BatchPuller | None = None
        self._query_subs: list[object] = []
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writer_task: asyncio.Task[None] | None = None
        self._consumer_ok = False
        self._last_write_ok = True
        self._ping_ok = False
        self._tracing = False

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        # The DSN is parsed here, not in __init__, so a bad one is reported as a clean start error.
        self.store = store_from_dsn(self.settings.transcript_dsn)
        await self.store.open()
        self._ping_ok = True
        self.nc = await bus.connect(self.settings, self.name)
        self.js = self.nc.jetstream()
        await bus.ensure_all(self.js, self.settings)
        await ensure_consumer(self.js, self.config.ack_wait_s)
        self._puller = BatchPuller(self.nc)
        await self._puller.start()
        self._consumer_ok = True
        self._query_subs = [await self.nc.subscribe(subjects.TRANSCRIPT_GET, queue=QUERY_QUEUE_GROUP, cb=self._on_get)]
        for subject in queries.QUERY_SUBJECTS:
            self._query_subs.append(await self.nc.subscribe(subject, queue=QUERY_QUEUE_GROUP, cb=self._on_query))
        await self.nc.flush(timeout=5)  # started = the server has our query subscriptions
        self._tracing = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        self._writer_task = asyncio.create_task(self._write_loop(), name="transcript-writer")
        self._tasks = [
            self._writer_task,
            asyncio.create_task(self._monitor_loop(), name="transcript-monitor"),
        ]
        if self.config.retention_days > 0:
            self._tasks.append(asyncio.create_task(self._prune_loop(), name="transcript-prune"))
        log.info("transcript writer %s started (store %s)", self.settings.node_id, type(self.store).__name__)

    async def stop(self) -> None:
        """Drain: commit and ack what was fetched, stop fetching, answer pending queries, close."""
        self._stopping.set()
        if self._writer_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer_task), self.tuning.drain_timeout_s)
            except TimeoutError:
                log.error("transcript: drain timed out; unacked messages will be redelivered")
        await stop_tasks(self._tasks)
        if self._puller is not None:
            # Messages that arrived after the last fetch are handed back at once rather than
            # after ack_wait; every pull request carries an expiry, so none is left behind.
            try:
                await self._puller.stop()
            except Exception as exc:
                log.debug("transcript: unsubscribe failed: %s", exc)
            await self._release(self._puller.take())
            self._puller = None
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.drain()  # waits for in-flight transcript.get handlers and flushes acks
            except Exception as exc:  # a dead connection cannot drain; closing is all that is left
                log.warning("transcript: drain failed (%s), closing", exc)
                await self.nc.close()
        if self.store is not None:
            await self.store.close()

    def ready(self) -> tuple[bool, dict[str, str]]:
        nats_ok = self.nc is not None and self.nc.is_connected
        store_ok = self.store is not None and self._ping_ok and self._last_write_ok
        checks = {
            "nats": "ok" if nats_ok else "disconnected",
            "consumer": "ok" if self._consumer_ok else "unbound",
            "store": "ok" if store_ok else "failing",
        }
        ok = all(v == "ok" for v in checks.values()) and not self._stopping.is_set()
        if self.lag is not None:
            checks["lag"] = str(self.lag)  # informational: status aggregation compares it to the threshold
        return ok, checks

    # --- writing -----------------------------------------------------------------------------------
    async def _write_loop(self) -> None:
        """Fetch → batch → commit, with one commit in flight while the next batch is fetched: the
        database works on one core while this loop decodes on the other. Each batch is acked by
        its own commit task after its transaction, so the order of the two rules holds per batch."""
        pending: PendingBatch[Msg] = PendingBatch(self.tuning.batch)
        inflight: asyncio.Task[None] | None = None
        while not self._stopping.is_set():
            try:
                due = pending.time_until_flush(time.monotonic())
                # Capped so that a stop() request is noticed quickly even while a batch ages.
                wait = self.tuning.idle_fetch_s if due is None else min(due, self.tuning.idle_fetch_s)
                if pending.room() and wait > 0:
                    fetched = await self._fetch(pending.room(), max(wait, MIN_FETCH_S))
                    now = time.monotonic()
                    for msg in fetched:
                        pending.add(msg, now)
                if pending.should_flush(time.monotonic()):
                    if inflight is not None:
                        task, inflight = inflight, None
                        await task
                    inflight = asyncio.create_task(self._commit(pending.take()), name="transcript-commit")
            except asyncio.CancelledError:
                if inflight is not None:
                    inflight.cancel()
                raise
            except Exception:  # never let one surprise end the writer; unacked work is redelivered
                log.exception("transcript: writer loop error")
                pending.take()
                await self._pause(self.tuning.retry_max_s)
        if inflight is not None:
            await inflight
        if pending:  # stop() was asked: finish what we hold rather than wait for redelivery
            await self._commit(pending.take())

    async def _fetch(self, room: int, timeout: float) -> list[Msg]:
        assert self._puller is not None
        try:
            return await self._puller.fetch(room, timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # reconnecting, consumer gone (the monitor recreates it), …
            log.warning("transcript: fetch failed: %s: %s", type(exc).__name__, exc)
            await self._pause(self.tuning.retry_initial_s * 5)
            return []

    async def _commit(self, msgs: Sequence[Msg]) -> None:
        """Write one batch in one transaction, then ack each message of it (never AckAll)."""
        assert self.js is not None and self.store is not None
        rows: list[TranscriptRow] = []
        done: list[Msg] = []
        redelivered = 0
        for msg in msgs:
            meta = msg.metadata  # parsed from the reply subject on every access: once here
            redelivered += meta.num_delivered > 1
            try:
                rows.append(decode_row(msg, meta.sequence.stream))
                done.append(msg)
            except ValueError as exc:
                if await self._dead_letter(msg, str(exc)):
                    done.append(msg)
        metrics.REDELIVERED.inc(redelivered)
        spans = self._start_spans(msgs) if self._tracing else []
        try:
            committed = await self._write_with_retry(rows, msgs)
        finally:
            for span in spans:
                span.end()
        if not committed:
            return
        for msg in done:
            try:
                await msg.ack()
            except Exception as exc:  # the row is stored; a lost ack only means an idempotent redelivery
                log.warning("transcript: ack failed: %s", exc)
        self.processed += len(done)
        metrics.BATCH_SIZE.observe(len(msgs))

    async def _write_with_retry(self, rows: list[TranscriptRow], msgs: Sequence[Msg]) -> bool:
        """True once committed; False when stopping gave up (the messages were nak'ed)."""
        assert self.store is not None
        delay = self.tuning.retry_initial_s
        held_since = time.monotonic()
        while True:
            started = time.monotonic()
            try:
                new = await self.store.write_batch(rows)
            except Exception as exc:  # StorageError, or a backend bug: either way not committed
                metrics.WRITE_FAILURES.inc()
                self._last_write_ok = False
                log.error("transcript: write of %d rows failed, retrying in %.1fs: %s", len(rows), delay, exc)
                if self._stopping.is_set():
                    await self._release(msgs)
                    return False
                await self._pause(delay)
                delay = min(delay * 2, self.tuning.retry_max_s)
                if time.monotonic() - held_since > self.config.ack_wait_s / 3:
                    # Still ours: keep the server from handing the batch to another writer meanwhile.
                    await self._in_progress(msgs)
                    held_since = time.monotonic()
                continue
            metrics.COMMIT_SECONDS.observe(time.monotonic() - started)
            metrics.EVENTS_WRITTEN.inc(new)
            self._last_write_ok = True
            return True

    async def _dead_letter(self, msg: Msg, reason: str) -> bool:
        assert self.js is not None
        try:
            await publish_dead_letter(self.js, msg, reason)
        except Exception as exc:  # not acked: it comes back after ack_wait and we try again
            log.error("transcript: could not dead-letter %s: %s", msg.subject, exc)
            return False
        metrics.DEAD_LETTERS.inc()
        return True

    @staticmethod
    async def _release(msgs: Sequence[Msg]) -> None:
        """Hand messages back at once so another writer can take them (used when stopping)."""
        for msg in msgs:
            try:
                await msg.nak()
            except Exception:
                pass  # ack_wait returns them anyway

    @staticmethod
    async def _in_progress(msgs: Sequence[Msg]) -> None:
        for msg in msgs:
            try:
                await msg.in_progress()
            except Exception:
                pass

    def _start_spans(self, msgs: Sequence[Msg]) -> list[trace.Span]:
        # One span per message, parented by the sender's context, so the writer appears in the
        # message's trace (G8). Only when tracing is configured: this is per message.
        tracer = telemetry.tracer("parley.transcript")
        return [
            tracer.start_span(
                "process conv.{tenant}.{conv}",
                context=telemetry.extract(msg.headers),
                kind=trace.SpanKind.CONSUMER,
                attributes={
                    "messaging.system": "nats",
                    "messaging.destination.template": "conv.{tenant}.{conv}",
                },
            )
            for msg in msgs
        ]

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when stop() is called."""
        try:
            await asyncio.wait_for(self._stopping.wait(), seconds)
        except TimeoutError:
            pass

    # --- health ------------------------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        """Refresh readiness and lag; recreate the consumer if it vanished (e.g. stream restored)."""
        assert self.js is not None and self.store is not None
        while not self._stopping.is_set():
            try:
                info = await self.js.consumer_info(subjects.CONV_STREAM, subjects.TRANSCRIPT_CONSUMER)
                self.lag = info.num_pending + info.num_ack_pending
                metrics.LAG.set(self.lag)
                self._consumer_ok = True
            except NotFoundError:
                self._consumer_ok = False
                log.warning("transcript: consumer missing, recreating it")
                try:
                    await ensure_consumer(self.js, self.config.ack_wait_s)
                except Exception as exc:
                    log.warning("transcript: cannot recreate consumer: %s", exc)
            except Exception as exc:
                self._consumer_ok = False
                log.debug("transcript: consumer info failed: %s", exc)
            try:
                await self.store.ping()
                await self.store.maintain()
                self._ping_ok = True
            except Exception as exc:
                self._ping_ok = False
                log.warning("transcript: store ping failed: %s", exc)
            await self._publish_status()
            await self._pause(self.tuning.monitor_interval_s)

    async def _publish_status(self) -> None:
        """The health beacon gateways aggregate into /v1/status (degraded when lag is over
        ``PARLEY_TRANSCRIPT_LAG_WARN``). Core NATS, at most once: the next one follows shortly."""
        if self.nc is None or not self.nc.is_connected or self.lag is None:
            return
        beacon = {"service": "transcript", "node": self.settings.node_id, "ts": now_ms(),
                  "ready": self.ready()[0], "lag": self.lag}
        try:
            await self.nc.publish(status_subject(self.settings.node_id), orjson.dumps(beacon))
        except Exception as exc:
            log.debug("transcript: status beacon not sent: %s", exc)

    async def _prune_loop(self) -> None:
        """Retention: delete conversations whose last event is older than the retention period.
        Every writer runs it (deletes are idempotent); the first run is spread over writers."""
        assert self.store is not None
        await self._pause(random.uniform(0, min(self.config.prune_interval_s, 10.0)))
        while not self._stopping.is_set():
            cutoff = now_ms() - self.config.retention_days * 86_400_000
            try:
                deleted = await self.store.prune(cutoff)
                metrics.PRUNED.inc(deleted)
                if deleted:
                    log.info("transcript: retention deleted %d conversations older than %d days",
                             deleted, self.config.retention_days)
            except Exception as exc:
                log.warning("transcript: retention failed, next try in %.0fs: %s", self.config.prune_interval_s, exc)
            await self._pause(self.config.prune_interval_s)

    # --- queries -----------------------------------------------------------------------------------
    async def _on_get(self, msg: Msg) -> None:
        reply = await self._answer(msg.data)
        if msg.reply:
            await self._respond(msg, reply)

    async def _on_query(self, msg: Msg) -> None:
        assert self.store is not None
        try:
            request = orjson.loads(msg.data)
            if not isinstance(request, dict):
                raise queries.BadRequest("request must be a JSON object")
            reply = await queries.ANSWERS[msg.subject](self.store, request)
        except (ValueError, queries.BadRequest) as exc:  # orjson's decode error is a ValueError
            reply = {"error": "bad_request", "reason": str(exc)}
        except StorageError as exc:
            log.error("transcript: %s failed: %s", msg.subject, exc)
            reply = {"error": "unavailable", "reason": "transcript store unavailable"}
        if msg.reply:
            await self._respond(msg, reply)

    async def _respond(self, msg: Msg, reply: dict[str, object]) -> None:
        body = orjson.dumps(reply)
        assert self.nc is not None
        if len(body) > self.nc.max_payload:
            body = orjson.dumps({"error": "too_large"})
        try:
            await msg.respond(body)
        except Exception as exc:
            log.warning("transcript: reply failed: %s", exc)

    async def _answer(self, data: bytes) -> dict[str, object]:
        assert self.store is not None
        try:
            request = orjson.loads(data)
            tenant, conv = request["tenant"], request["conv"]
        except (ValueError, KeyError, TypeError):
            return {"error": "bad_request"}
        if not subjects.valid_id(tenant) or not subjects.valid_id(conv):
            return {"error": "bad_request"}
        try:
            rows = await self.store.transcript(tenant, conv)
        except StorageError as exc:
            log.error("transcript: query failed: %s", exc)
            return {"error": "unavailable"}
        return transcript_reply(tenant, conv, rows)
