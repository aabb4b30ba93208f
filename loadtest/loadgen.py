"""Parley load generator: many SDK sessions in one asyncio process, every message checked.

``LoadGenerator`` is the library form (the chaos suite drives it inside its tests); ``python -m
loadtest run …`` is the command line (``loadtest/__main__.py``).

Model: ``customers`` customer sessions and ``agents`` agent sessions (SDK ``ParleyClient``, each
with the whole gateway URL list, so a session reconnects to any gateway and resumes). Customers
open one conversation each, ``open_rate`` per second, in queue ``queue``; routing must run in
``auto`` mode (or agents would have to accept offers). Once a conversation is assigned, messages
flow both ways at ``msg_rate`` in total (open loop: a message is due at its *intended* time
whether or not earlier ones were acknowledged; latency is measured from that intended time, so a
stall is not hidden by coordinated omission), ``msg_size`` characters each, for ``duration``
seconds. Then sending stops, the last acks and deliveries are awaited (bounded), conversations are
closed and the transcript store is compared with what the clients were promised.

Checks (each counted, the run fails when any is non-zero):

- ``unacked``: a send never acknowledged (the SDK retries every send until acked, so under any
  single fault each send must end acked);
- ``nacked``: a send refused for good (``nack`` with ``retry: false``);
- ``lost``: acked but never delivered to the other side of the conversation;
- ``duplicated``: one client message id delivered at two different ``seq`` (stored twice), or a
  ``seq`` re-delivered on a connection (SDK ``violations`` of kind ``duplicate``); the same event
  read again by a new agent after a re-assignment is history, not a duplicate;
- ``gaps``: an event whose ``prev`` is not the ``seq`` the connection last got (SDK
  ``violations`` of kind ``gap``);
- ``out_of_order``: a delivered event's ``seq`` differs from its ``ack`` ``seq`` (the receiver got
  it at another place in the chain than the sender was promised);
- ``transcript_*``: after closing, a conversation's stored transcript (``GET
  /v1/conversations/{conv}/transcript``, customer token) misses an acked message, holds one twice,
  has it at another ``seq`` than acked, or differs from the chain the customer received.

Not failures, reported: ``refused_after_release`` (an agent's sends answered ``nack not_found``
after its conversation was re-queued away from it — agent lost) and ``send_order_inversions`` — two messages of one sender stored in another
order than sent. The protocol orders events by ``seq``, not by send time; a send retried after a
retryable ``nack`` (e.g. while NATS is unreachable) is legitimately stored after a later one.

Latencies: HDR histograms (``hdrhistogram``, µs, 3 significant digits) of ack latency (intended
send → ``ack``) and end-to-end latency (intended send → ``ev`` at the other side); per second, the
counts and percentiles for the timeline and plot; fault moments (``mark``) with the time until
delivery resumed after each.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

HDR_MAX_US = 3_600_000_000  # one hour
HDR_DIGITS = 3


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HDR_MAX_US, HDR_DIGITS)


def hdr_summary(h: HdrHistogram) -> dict[str, Any]:
    """Percentiles in milliseconds."""
    n = h.get_total_count()
    if not n:
        return {"n": 0}
    return {"n": n, **{name: round(h.get_value_at_percentile(p) / 1000, 3)
                       for name, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9))},
            "max": round(h.get_max_value() / 1000, 3), "mean": round(h.get_mean_value() / 1000, 3)}


@dataclass
class LoadSpec:
    urls: list[str]  # gateway WebSocket URLs (every session gets the whole list)
    http_urls: list[str]  # gateway HTTP base URLs (transcripts)
    secret: str  # PARLEY_JWT_SECRET, to issue tokens
    tenant: str = "load"
    queue: str = "support"
    customers: int = 20
    agents: int = 4
    max_chats: int = 0  # 0: enough for every conversation (ceil(customers / agents) + 1)
    open_rate: float = 20.0  # conversations opened per second
    msg_rate: float = 200.0  # messages per second, both directions together
    msg_size: int = 200  # characters per body
    agent_share: float = 0.5  # share of messages sent by agents
    duration: float = 30.0  # seconds of sending (after every conversation is assigned)
    drain_s: float = 30.0  # bound for the last acks/deliveries after sending stops
    setup_s: float = 60.0  # bound for connecting, opening and assignment
    transcript_s: float = 60.0  # bound for closing and transcript comparison
    close_at_end: bool = True
    check_transcripts: bool = True
    run_id: str = ""
    client_urls_rotate: bool = True  # session i starts at gateway i % len(urls): spread over gateways

    def __post_init__(self) -> None:
        self.run_id = self.run_id or uuid.uuid4().hex[:6]
        if not self.max_chats:
            self.max_chats = math.ceil(self.customers / max(1, self.agents)) + 1


class Msg:
    __slots__ = ("mid", "conv", "side", "n", "t_sent", "t_ack", "ack_seq", "t_deliv", "deliv_seq",
                 "deliveries", "failed")

    def __init__(self, mid: str, conv: Conversation, side: str, n: int, t_sent: float) -> None:
        self.mid, self.conv, self.side, self.n, self.t_sent = mid, conv, side, n, t_sent
        self.t_ack: float | None = None
        self.ack_seq: int | None = None
        self.t_deliv: float | None = None
        self.deliv_seq: int | None = None
        self.deliveries = 0
        self.failed: str | None = None


@dataclass
class Conversation:
    index: int
    customer: Any  # ParleyClient
    customer_id: str
    conv: str | None = None
    agent: Any = None  # ParleyClient of the assigned agent
    agent_id: str | None = None
    t_open: float = 0.0
    t_assigned: float | None = None
    t_closed: float | None = None
    sent: dict[str, int] = field(default_factory=lambda: {"c": 0, "a": 0})
    last_deliv_n: dict[str, int] = field(default_factory=lambda: {"c": -1, "a": -1})
    customer_seqs: list[int] = field(default_factory=list)
    released: int = 0  # `unassigned` events seen (agent lost: re-queued)


@dataclass
class Fault:
    label: str
    t: float  # perf_counter
    resumed_s: float | None = None
    slowest_conv: str | None = None
    routed_s: float | None = None  # a conversation opened at the fault: time until assigned
    measured: bool = True  # counts as a failover figure (False: a moment marked for the plot only)


class LoadGenerator:
    """One process's share of the load. ``await start()``, ``await run()`` (or ``start_sending`` /
    ``stop_sending`` around faults), ``await finish()`` → report dict."""

    def __init__(self, spec: LoadSpec, on_progress: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.spec = spec
        self.on_progress = on_progress
        self.convs: list[Conversation] = []
        self.by_conv: dict[str, Conversation] = {}
        self.agents: list[Any] = []
        self.agent_ids: dict[int, str] = {}
        self.msgs: dict[str, Msg] = {}
        self.faults: list[Fault] = []
        self.ack_hist = new_histogram()
        self.e2e_hist = new_histogram()
        self.route_hist = new_histogram()
        self.seconds: dict[int, dict[str, Any]] = {}  # per-second timeline
        self.duplicated_ids: list[str] = []
        self.out_of_order: list[str] = []
        self.send_order_inversions = 0
        self.foreign = 0
        self.nacks: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.t0 = time.perf_counter()
        self._pending_assign: dict[str, tuple[Any, str, float]] = {}
        self._sender: asyncio.Task[None] | None = None
        self._sending = False
        self._sent_total = 0
        self._rr = 0
        self._probes: list[Any] = []
        self._probe_n = 0

    # --- clients --------------------------------------------------------------------------------
    def _token(self, sub: str, role: str, **claims: Any) -> str:
        from parley.core.auth import issue_token

        return issue_token({"sub": sub, "tenant": self.spec.tenant, "role": role, **claims}, self.spec.secret, 24 * 3600)

    def _urls(self, i: int) -> list[str]:
        urls = list(self.spec.urls)
        if self.spec.client_urls_rotate and urls:
            k = i % len(urls)
            urls = urls[k:] + urls[:k]
        return urls

    def _second(self, t: float) -> dict[str, Any]:
        sec = int(t - self.t0)
        slot = self.seconds.get(sec)
        if slot is None:
            slot = self.seconds[sec] = {"sent": 0, "acked": 0, "delivered": 0, "e2e": new_histogram()}
        return slot

    async def start(self) -> None:
        """Connect agents (wait until online), connect customers, open every conversation at
        ``open_rate`` and wait until each is assigned."""
        from parley.client import ParleyClient

        s = self.spec
        deadline = time.monotonic() + s.setup_s
        for i in range(s.agents):
            agent_id = f"{s.run_id}-a{i}"
            client = ParleyClient(self._urls(i), self._token(agent_id, "agent", skills=[s.queue], max_chats=s.max_chats),
                                  keep_frames=False, client_name="parley-loadgen/agent")
            self.agent_ids[id(client)] = agent_id
            client.on("ev", self._ev_handler(client, "a"))
            self._watch(client)
            self.agents.append(client)
        try:
            await asyncio.gather(*(a.connect(timeout=s.setup_s) for a in self.agents))
        except TimeoutError as exc:
            raise TimeoutError("load generator: agents not connected in time: " + "; ".join(
                f"{self.agent_ids[id(a)]} connected={a.connected.is_set()} {a.stats}" for a in self.agents)) from exc
        await self._until(lambda: all((a.presence or {}).get("status") == "online" for a in self.agents), deadline,
                          "agents online")
        for i in range(s.customers):
            cid = f"{s.run_id}-c{i}"
            client = ParleyClient(self._urls(i), self._token(cid, "customer"), keep_frames=False,
                                  client_name="parley-loadgen/customer")
            conv = Conversation(i, client, cid)
            client.on("ev", self._ev_handler(client, "c", conv))
            self._watch(client)
            self.convs.append(conv)
        await asyncio.gather(*(c.customer.connect(timeout=s.setup_s) for c in self.convs))
        opens = []
        t_start = time.perf_counter()
        for i, conv in enumerate(self.convs):
            delay = t_start + i / s.open_rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            opens.append(asyncio.ensure_future(self._open(conv, deadline)))
        await asyncio.gather(*opens)
        if not await self._until(lambda: all(c.agent is not None for c in self.convs), deadline, None):
            waiting = [c.conv for c in self.convs if c.agent is None]
            raise TimeoutError(f"load generator: {len(waiting)} of {len(self.convs)} conversations not assigned within "
                               f"{s.setup_s}s (e.g. {waiting[:3]}); agents {[(a.presence or {}).get('status') for a in self.agents]}, "
                               f"errors {self.errors}, nacks {self.nacks}")

    async def _open(self, conv: Conversation, deadline: float) -> None:
        conv.t_open = time.perf_counter()
        conv.conv = await conv.customer.open(self.spec.queue, timeout=max(1.0, deadline - time.monotonic()))
        self.by_conv[conv.conv] = conv
        early = self._pending_assign.pop(conv.conv, None)
        if early is not None:
            self._assign(conv, *early)

    def _assign(self, conv: Conversation, agent: Any, agent_id: str, t: float) -> None:
        conv.agent, conv.agent_id = agent, agent_id
        if conv.t_assigned is None:
            conv.t_assigned = t
            self.route_hist.record_value(max(1, int((t - conv.t_open) * 1e6)))

    def _watch(self, client: Any) -> None:
        def on_nack(frame: dict[str, Any]) -> None:
            code = str(frame.get("code"))
            self.nacks[code] = self.nacks.get(code, 0) + 1

        def on_error(frame: dict[str, Any]) -> None:
            code = str(frame.get("code"))
            self.errors[code] = self.errors.get(code, 0) + 1

        client.on("nack", on_nack)
        client.on("error", on_error)

    def _ev_handler(self, client: Any, side: str, conv: Conversation | None = None) -> Callable[[dict[str, Any]], None]:
        def handle(frame: dict[str, Any]) -> None:
            now = time.perf_counter()
            kind = frame.get("type")
            c = conv if conv is not None else self.by_conv.get(frame["conv"])
            if side == "c" and conv is not None:
                conv.customer_seqs.append(frame["seq"])
                if kind == "closed" and conv.t_closed is None:
                    conv.t_closed = now
            if kind == "assigned" and side == "a":
                agent_id = self.agent_ids[id(client)]
                if c is None:
                    self._pending_assign[frame["conv"]] = (client, agent_id, now)
                elif (frame.get("data") or {}).get("agent", {}).get("id") == agent_id:
                    self._assign(c, client, agent_id, now)
                return
            if kind == "unassigned" and c is not None and side == "c":
                c.agent = None  # re-queued: no agent sends until assigned again
                c.released += 1
                return
            if kind != "message":
                return
            mid = (frame.get("data") or {}).get("id", "")
            m = self.msgs.get(mid)
            if m is None:
                self.foreign += 1
                return
            if m.side == side:
                return  # the sender's own echo
            m.deliveries += 1
            if m.deliveries > 1:
                # the same event again (another agent after a re-assignment reads the history) is
                # not a duplicate; the same client id stored at another seq is
                if frame["seq"] != m.deliv_seq:
                    self.duplicated_ids.append(mid)
                return
            m.t_deliv, m.deliv_seq = now, frame["seq"]
            if m.ack_seq is not None and m.ack_seq != frame["seq"]:
                self.out_of_order.append(mid)
            last = m.conv.last_deliv_n[m.side]
            if m.n < last:
                self.send_order_inversions += 1
            else:
                m.conv.last_deliv_n[m.side] = m.n
            lat_us = max(1, int((now - m.t_sent) * 1e6))
            self.e2e_hist.record_value(lat_us)
            slot = self._second(now)
            slot["delivered"] += 1
            slot["e2e"].record_value(lat_us)

        return handle

    # --- sending --------------------------------------------------------------------------------
    def start_sending(self) -> None:
        if self._sender is None:
            self._sending = True
            self._sender = asyncio.ensure_future(self._send_loop())

    async def stop_sending(self) -> None:
        self._sending = False
        if self._sender is not None:
            await self._sender
            self._sender = None

    async def _send_loop(self) -> None:
        s = self.spec
        start = time.perf_counter()
        i = 0
        last_progress = start
        while self._sending:
            now = time.perf_counter()
            due = int((now - start) * s.msg_rate)
            while i < due:
                self._send_one(start + i / s.msg_rate)
                i += 1
            if self.on_progress is not None and now - last_progress >= 1.0:
                last_progress = now
                self.on_progress(self.progress())
            await asyncio.sleep(max(0.002, start + (i + 1) / s.msg_rate - time.perf_counter()))

    def _send_one(self, t_intended: float) -> None:
        ready = [c for c in self.convs if c.agent is not None and c.conv is not None and c.t_closed is None]
        if not ready:
            return
        conv = ready[self._rr % len(ready)]
        self._rr += 1
        self._sent_total += 1
        # agent_share of the messages from agents, spread evenly (Bresenham)
        side = "a" if int(self._sent_total * self.spec.agent_share) != int((self._sent_total - 1) * self.spec.agent_share) else "c"
        client = conv.agent if side == "a" else conv.customer
        n = conv.sent[side]
        conv.sent[side] += 1
        mid = f"{self.spec.run_id}.{conv.index}.{side}.{n}"
        m = Msg(mid, conv, side, n, t_intended)
        self.msgs[mid] = m
        self._second(t_intended)["sent"] += 1
        body = (mid + " ").ljust(self.spec.msg_size, "x")[: max(self.spec.msg_size, len(mid))]
        fut = client.send_nowait(conv.conv, body, msg_id=mid)
        fut.add_done_callback(self._on_ack(m))

    def _on_ack(self, m: Msg) -> Callable[[asyncio.Future[Any]], None]:
        def done(fut: asyncio.Future[Any]) -> None:
            if fut.cancelled():
                m.failed = "cancelled"
                return
            exc = fut.exception()
            if exc is not None:
                m.failed = repr(exc)
                return
            now = time.perf_counter()
            m.t_ack, m.ack_seq = now, fut.result().get("seq")
            if m.deliv_seq is not None and m.deliv_seq != m.ack_seq and m.mid not in self.out_of_order:
                self.out_of_order.append(m.mid)
            self.ack_hist.record_value(max(1, int((now - m.t_sent) * 1e6)))
            self._second(now)["acked"] += 1

        return done

    async def run(self) -> None:
        """Send for ``duration`` seconds."""
        self.start_sending()
        await asyncio.sleep(self.spec.duration)  # the load's own length, not a synchronisation
        await self.stop_sending()

    # --- faults ---------------------------------------------------------------------------------
    def mark(self, label: str, measured: bool = True) -> Fault:
        """Record a fault moment (now); ``resumed_after`` measures delivery after it."""
        fault = Fault(label, time.perf_counter(), measured=measured)
        self.faults.append(fault)
        return fault

    def resumed_after(self, fault: Fault) -> tuple[float | None, str | None]:
        """Max over the conversations with traffic after the fault of: the time from the fault to the
        first delivery (to the other side) of a message intended at or after the fault. None while a
        conversation with such messages has none delivered yet."""
        first: dict[int, float | None] = {}
        for m in self.msgs.values():
            if m.t_sent < fault.t:
                continue
            idx = m.conv.index
            if m.t_deliv is not None:
                prev = first.get(idx)
                if prev is None or m.t_deliv < prev:
                    first[idx] = m.t_deliv
            else:
                first.setdefault(idx, None)
        if not first or any(v is None for v in first.values()):
            return None, None
        slowest = max(first, key=lambda k: first[k] or 0.0)
        return round((first[slowest] or 0.0) - fault.t, 3), self.convs[slowest].conv

    async def wait_resumed(self, fault: Fault, timeout: float = 60.0) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            resumed, conv = self.resumed_after(fault)
            if resumed is not None:
                fault.resumed_s, fault.slowest_conv = resumed, conv
                return resumed
            await asyncio.sleep(0.05)
        return None

    async def probe_routing(self, fault: Fault | None = None, timeout: float = 30.0,
                            urls: list[str] | None = None) -> float | None:
        """A new customer opens a conversation now; seconds until it is assigned (None: not in time).
        ``urls``: the gateway list of its session (default: rotated like the others')."""
        from parley.client import ParleyClient

        self._probe_n += 1
        cid = f"{self.spec.run_id}-probe{self._probe_n}"
        client = ParleyClient(urls or self._urls(self._probe_n), self._token(cid, "customer"), keep_frames=False,
                              client_name="parley-loadgen/probe")
        self._probes.append(client)
        assigned = asyncio.Event()
        client.on("ev", lambda f: assigned.set() if f.get("type") == "assigned" else None)
        t = time.perf_counter()
        try:
            async with asyncio.timeout(timeout):
                await client.connect(timeout=timeout)
                conv = await client.open(self.spec.queue, timeout=timeout)
                await assigned.wait()
        except TimeoutError:
            return None
        routed = round(time.perf_counter() - t, 3)
        if fault is not None:
            fault.routed_s = routed
        with contextlib.suppress(Exception):
            await client.close_conversation(conv)
        return routed

    # --- the end --------------------------------------------------------------------------------
    async def drain(self) -> None:
        """Wait (bounded) until every send is acked or failed and every acked message delivered."""
        await self._until(lambda: all((m.t_ack is not None or m.failed) and (m.t_ack is None or m.t_deliv is not None)
                                      for m in self.msgs.values()),
                          time.monotonic() + self.spec.drain_s, None)

    async def verify_transcripts(self) -> dict[str, Any]:
        """Close every conversation, then compare each stored transcript with what was promised."""
        import aiohttp

        deadline = time.monotonic() + self.spec.transcript_s
        live = [c for c in self.convs if c.conv is not None]
        for c in live:
            with contextlib.suppress(Exception):
                await c.customer.close_conversation(c.conv)
        await self._until(lambda: all(self._closed_seen(c) for c in live), deadline, None)
        by_conv_msgs: dict[str, list[Msg]] = {}
        for m in self.msgs.values():
            by_conv_msgs.setdefault(m.conv.conv or "", []).append(m)
        result = {"conversations": len(live), "complete": 0, "missing": 0, "duplicates": 0, "seq_mismatch": 0,
                  "chain_mismatch": 0, "unreadable": 0, "examples": []}
        pending = {c.conv: c for c in live}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            attempt = 0
            while pending and time.monotonic() < deadline:
                attempt += 1
                for conv_id, c in list(pending.items()):
                    base = self.spec.http_urls[attempt % len(self.spec.http_urls)]
                    verdict = await self._check_transcript(session, base, c, by_conv_msgs.get(conv_id, []))
                    if verdict is None:
                        continue  # not (yet) complete: ask again
                    pending.pop(conv_id)
                    for k, v in verdict.items():
                        if k != "example":
                            result[k] += v
                    if verdict.get("example") and len(result["examples"]) < 5:
                        result["examples"].append(verdict["example"])
                    if not any(v for k, v in verdict.items() if k not in ("complete", "example")):
                        result["complete"] += 1
                if pending:
                    await asyncio.sleep(0.25)
            # what never became complete: judge the last answer as final
            for conv_id, c in pending.items():
                base = self.spec.http_urls[0]
                verdict = await self._check_transcript(session, base, c, by_conv_msgs.get(conv_id, []), final=True)
                for k, v in (verdict or {"unreadable": 1}).items():
                    if k != "example":
                        result[k] += v
                if verdict and verdict.get("example") and len(result["examples"]) < 5:
                    result["examples"].append(verdict["example"])
        return result

    @staticmethod
    def _closed_seen(c: Conversation) -> bool:
        return c.t_closed is not None

    async def _check_transcript(self, session: Any, base: str, c: Conversation, msgs: list[Msg],
                                final: bool = False) -> dict[str, Any] | None:
        try:
            async with session.get(f"{base}/v1/conversations/{c.conv}/transcript",
                                   headers={"Authorization": f"Bearer {self._token(c.customer_id, 'customer')}"}) as r:
                if r.status != 200:
                    return {"unreadable": 1, "example": f"{c.conv}: HTTP {r.status}"} if final else None
                body = await r.json()
        except Exception as exc:
            return {"unreadable": 1, "example": f"{c.conv}: {exc!r}"} if final else None
        events = body.get("events", [])
        seqs = [e["seq"] for e in events]
        stored: dict[str, list[int]] = {}
        for e in events:
            if e.get("type") == "message":
                stored.setdefault((e.get("data") or {}).get("id", ""), []).append(e["seq"])
        acked = [m for m in msgs if m.ack_seq is not None]
        missing = [m.mid for m in acked if m.mid not in stored]
        dups = [mid for mid, ss in stored.items() if len(ss) > 1]
        mismatch = [m.mid for m in acked if m.mid in stored and stored[m.mid][0] != m.ack_seq]
        chain_ok = seqs == c.customer_seqs
        if not final and (missing or not chain_ok):
            return None  # the writer may still be catching up
        example = None
        if missing or dups or mismatch or not chain_ok:
            example = (f"{c.conv}: missing {missing[:3]} dups {dups[:3]} seq mismatch {mismatch[:3]} "
                       f"chain {'ok' if chain_ok else f'store {seqs[-3:]} vs customer {c.customer_seqs[-3:]}'}")
        return {"missing": len(missing), "duplicates": len(dups), "seq_mismatch": len(mismatch),
                "chain_mismatch": 0 if chain_ok else 1, "example": example}

    async def finish(self) -> dict[str, Any]:
        """Stop sending, drain, verify transcripts, close sessions; the report."""
        await self.stop_sending()
        await self.drain()
        transcripts = await self.verify_transcripts() if (self.spec.check_transcripts and self.spec.close_at_end) else None
        report = self.report(transcripts)
        await self.close()
        return report

    async def close(self) -> None:
        clients = [c.customer for c in self.convs] + self.agents + self._probes
        await asyncio.gather(*(asyncio.wait_for(c.close(), 5) for c in clients), return_exceptions=True)

    # --- report ---------------------------------------------------------------------------------
    def _violations(self) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {"gap": [], "duplicate": []}
        for client in [c.customer for c in self.convs] + self.agents:
            for v in client.violations:
                out.setdefault(v.kind, []).append(asdict(v))
        return out

    @staticmethod
    def _released_refusal(m: Msg) -> bool:
        """An agent's send refused because the conversation was re-queued away from the agent (agent
        lost, e.g. no heartbeat reached presence for PRESENCE_TTL): the protocol's answer, not a loss."""
        return m.side == "a" and m.conv.released > 0 and "not_found" in (m.failed or "")

    def checks(self) -> dict[str, int]:
        acked = [m for m in self.msgs.values() if m.ack_seq is not None]
        viol = self._violations()
        return {
            "unacked": sum(1 for m in self.msgs.values() if m.ack_seq is None and not m.failed),
            "nacked": sum(1 for m in self.msgs.values() if m.failed and not self._released_refusal(m)),
            "lost": sum(1 for m in acked if m.t_deliv is None),
            "duplicated": len(self.duplicated_ids) + len(viol["duplicate"]),
            "gaps": len(viol["gap"]),
            "out_of_order": len(self.out_of_order),
        }

    def progress(self) -> dict[str, Any]:
        now = time.perf_counter()
        recent = [self.seconds.get(int(now - self.t0) - k) for k in (1, 2)]
        e2e = new_histogram()
        for slot in recent:
            if slot:
                e2e.add(slot["e2e"])
        clients = [c.customer for c in self.convs] + self.agents
        return {
            "elapsed_s": round(now - self.t0, 1),
            "conversations": len(self.convs), "assigned": sum(1 for c in self.convs if c.agent is not None),
            "sent": len(self.msgs), "acked": sum(1 for m in self.msgs.values() if m.ack_seq is not None),
            "delivered": sum(1 for m in self.msgs.values() if m.t_deliv is not None),
            "rate_delivered": sum(s["delivered"] for s in recent if s) / 2,
            "e2e_recent_ms": hdr_summary(e2e),
            # sends still waiting for their ack are in flight, not failed, while the run goes on
            "checks": {k: v for k, v in self.checks().items() if k != "unacked"},
            "in_flight": sum(1 for m in self.msgs.values() if m.ack_seq is None and not m.failed),
            "reconnects": sum(c.stats.reconnects for c in clients),
            "connected": sum(1 for c in clients if c.connected.is_set()), "clients": len(clients),
            "faults": [f.label for f in self.faults],
        }

    def timeline(self) -> list[dict[str, Any]]:
        out = []
        for sec in sorted(self.seconds):
            slot = self.seconds[sec]
            h = slot["e2e"]
            out.append({"t": sec, "sent": slot["sent"], "acked": slot["acked"], "delivered": slot["delivered"],
                        **({"e2e_p50_ms": round(h.get_value_at_percentile(50) / 1000, 3),
                            "e2e_p99_ms": round(h.get_value_at_percentile(99) / 1000, 3),
                            "e2e_max_ms": round(h.get_max_value() / 1000, 3)} if h.get_total_count() else {})})
        return out

    def report(self, transcripts: dict[str, Any] | None = None) -> dict[str, Any]:
        checks = self.checks()
        if transcripts is not None:
            for k in ("missing", "duplicates", "seq_mismatch", "chain_mismatch", "unreadable"):
                checks[f"transcript_{k}"] = transcripts[k]
        clients = [c.customer for c in self.convs] + self.agents
        viol = self._violations()
        failed_examples = [f"{m.mid}: {m.failed}" for m in self.msgs.values() if m.failed][:5]
        lost_examples = [m.mid for m in self.msgs.values() if m.ack_seq is not None and m.t_deliv is None][:5]
        unacked_examples = [m.mid for m in self.msgs.values() if m.ack_seq is None and not m.failed][:5]
        return {
            "run_id": self.spec.run_id,
            "spec": {k: v for k, v in asdict(self.spec).items() if k not in ("secret",)},
            "messages": len(self.msgs),
            "acked": sum(1 for m in self.msgs.values() if m.ack_seq is not None),
            "delivered": sum(1 for m in self.msgs.values() if m.t_deliv is not None),
            "checks": checks,
            "ok": not any(checks.values()),
            "examples": {"nacked": failed_examples, "lost": lost_examples, "unacked": unacked_examples,
                         "duplicated": self.duplicated_ids[:5], "out_of_order": self.out_of_order[:5],
                         "gaps": viol["gap"][:5]},
            "send_order_inversions": self.send_order_inversions,
            "refused_after_release": sum(1 for m in self.msgs.values() if m.failed and self._released_refusal(m)),
            "requeued_conversations": sum(1 for c in self.convs if c.released),
            "foreign_messages": self.foreign,
            "latency_ms": {"ack": hdr_summary(self.ack_hist), "e2e": hdr_summary(self.e2e_hist),
                           "open_to_assigned": hdr_summary(self.route_hist)},
            "hdr": {"ack": self.ack_hist.encode().decode(), "e2e": self.e2e_hist.encode().decode()},
            "faults": [{"label": f.label, "t": round(f.t - self.t0, 3), "resumed_s": f.resumed_s,
                        "slowest_conv": f.slowest_conv, "routed_s": f.routed_s, "measured": f.measured}
                       for f in self.faults],
            "clients": {"sessions": len(clients), "reconnects": sum(c.stats.reconnects for c in clients),
                        "resent": sum(c.stats.resent for c in clients),
                        "close_codes": _count([code for c in clients for code in c.stats.close_codes])},
            "nacks": dict(self.nacks), "errors": dict(self.errors),
            "transcripts": transcripts,
            "timeline": self.timeline(),
        }

    # --- helpers --------------------------------------------------------------------------------
    async def _until(self, cond: Callable[[], bool], deadline: float, what: str | None) -> bool:
        while time.monotonic() < deadline:
            if cond():
                return True
            await asyncio.sleep(0.05)
        if cond():
            return True
        if what is not None:
            raise TimeoutError(f"load generator: {what} not reached in time")
        return False


def _count(values: list[Any]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[str(v)] = out.get(str(v), 0) + 1
    return out

