"""Gapless, ordered delivery of one conversation to one connection (G3), without I/O.

A ``ConversationCursor`` remembers the last ``seq`` a connection got for a conversation. Live
events (at most once, from RePublish) arrive with the stream's per-subject previous sequence:

* ``seq <= last``: already delivered (a replay overlap or a duplicate) — dropped;
* ``prev <= last < seq``: nothing of this conversation lies between — delivered, its ``prev``
  shown as ``last`` so the client's chain is unbroken;
* ``prev > last``: events were missed — the caller reads ``(last, up_to]`` from the stream,
  feeds them through ``accept`` in order, then calls ``finish_fill``.

While a fill (or the initial replay) runs, live events are buffered and released after it.
Every method returns ``(events to deliver now, gap to fill or None)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import Event


@dataclass(frozen=True)
class Gap:
    after: int
    up_to: int


Step = tuple[list[Event], Gap | None]


@dataclass
class ConversationCursor:
    conv: str
    last: int = 0
    filling: bool = True  # a new cursor starts with the replay from ``last``
    buffered: list[Event] = field(default_factory=list)

    def on_live(self, ev: Event) -> Step:
        if self.filling:
            self.buffered.append(ev)
            return [], None
        if ev.seq <= self.last:
            return [], None
        if ev.prev > self.last:
            self.filling = True
            self.buffered.append(ev)
            return [], Gap(self.last, ev.seq)
        return [self._advance(ev)], None

    def accept(self, ev: Event) -> Event | None:
        """An event read from the stream, in order: the event to deliver, or None if old."""
        if ev.seq <= self.last:
            return None
        return self._advance(ev)

    def finish_fill(self) -> Step:
        """A replay or fill is done: release buffered live events, or the next gap among them."""
        out: list[Event] = []
        self.buffered.sort(key=lambda e: e.seq)
        while self.buffered:
            ev = self.buffered[0]
            if ev.seq <= self.last:
                self.buffered.pop(0)
                continue
            if ev.prev > self.last:
                return out, Gap(self.last, ev.seq)
            self.buffered.pop(0)
            out.append(self._advance(ev))
        self.filling = False
        return out, None

    def _advance(self, ev: Event) -> Event:
        prev, self.last = self.last, ev.seq
        return ev.with_prev(prev)
