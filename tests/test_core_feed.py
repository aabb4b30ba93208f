"""The gapless-delivery cursor (G3) as pure logic."""

from parley.core.events import Event
from parley.core.feed import ConversationCursor, Gap


def ev(seq, prev):
    return Event("c", seq, prev, "message", 0, {})


def test_replay_then_buffered_live_without_duplicates():
    cur = ConversationCursor("c", last=0)
    assert cur.on_live(ev(5, 3)) == ([], None)  # buffered during the replay
    replayed = [cur.accept(e) for e in (ev(3, 0), ev(5, 3))]
    assert [(e.seq, e.prev) for e in replayed] == [(3, 0), (5, 3)]
    assert cur.finish_fill() == ([], None)  # the buffered 5 was already replayed
    out, gap = cur.on_live(ev(9, 5))
    assert [(e.seq, e.prev) for e in out] == [(9, 5)] and gap is None


def test_gap_in_live_feed_asks_for_a_fill():
    cur = ConversationCursor("c", last=9, filling=False)
    out, gap = cur.on_live(ev(20, 15))  # 15 was never seen here
    assert out == [] and gap == Gap(9, 20)
    assert cur.on_live(ev(25, 20)) == ([], None)  # buffered while filling
    assert cur.accept(ev(15, 9)).prev == 9
    assert cur.accept(ev(20, 15)).prev == 15
    out, gap = cur.finish_fill()
    assert [(e.seq, e.prev) for e in out] == [(25, 20)] and gap is None and not cur.filling


def test_resume_point_between_events_is_shown_as_prev():
    # the client resumes at 7; the next event's real predecessor is 4: nothing lies between
    cur = ConversationCursor("c", last=7, filling=False)
    out, gap = cur.on_live(ev(12, 4))
    assert gap is None and [(e.seq, e.prev) for e in out] == [(12, 7)]


def test_old_and_duplicate_live_events_are_dropped():
    cur = ConversationCursor("c", last=10, filling=False)
    assert cur.on_live(ev(10, 8)) == ([], None)
    assert cur.on_live(ev(4, 0)) == ([], None)


def test_gap_found_among_buffered_events():
    cur = ConversationCursor("c", last=0)
    cur.on_live(ev(2, 1))
    cur.on_live(ev(7, 6))
    cur.accept(ev(1, 0))
    out, gap = cur.finish_fill()
    assert [e.seq for e in out] == [2] and gap == Gap(2, 7) and cur.filling
