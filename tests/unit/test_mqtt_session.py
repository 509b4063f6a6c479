"""MQTT sessions (QoS 1 window, queue, resume with DUP), the session table, retained store."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from edge.mqtt_codec import Decoder, Publish
from edge.mqtt_commit import RESEND_MAX, RETRY_AFTER, Committing
from edge.mqtt_retain import ListenerRetained, NodeRetained, filter_matches
from edge.mqtt_session import Session, SessionTable, Subscription


def publishes(packets: list[bytes]) -> list[Publish]:
    out = Decoder().feed(b"".join(packets))
    assert all(isinstance(p, Publish) for p in out)
    return out  # type: ignore[return-value]


# ---- Session ----------------------------------------------------------------------------


def test_qos0_goes_out_only_while_online() -> None:
    s = Session("c", clean=True, online=True)
    assert publishes([s.deliver(b"t", b"x", 0)]) == [Publish("t", b"x")]  # type: ignore[list-item]
    s.online = False
    assert s.deliver(b"t", b"x", 0) is None
    assert s.dropped == 1


def test_qos1_window_then_queue_then_fill_on_ack() -> None:
    s = Session("c", clean=False, max_inflight=2, max_queued=2, online=True)
    sent = [s.deliver(b"t", bytes([i]), 1) for i in range(5)]
    assert [p is not None for p in sent] == [True, True, False, False, False]
    assert s.dropped == 1  # the fifth: queue of 2 full
    first = publishes([sent[0]])[0]  # type: ignore[list-item]
    assert (first.qos, first.packet_id, first.dup) == (1, 1, False)
    more = publishes(s.acked(1))
    assert [(p.payload, p.packet_id) for p in more] == [(b"\x02", 3)]
    assert sorted(s.inflight) == [2, 3]


def test_the_queue_is_bounded_in_bytes_too() -> None:
    """Bounded by count alone, one absent device's session held 1,000 payloads of 1 MiB
    (soak test); mosquitto's max_queued_bytes bounds it, and so does this."""
    s = Session("c", clean=False, max_inflight=1, max_queued=100, max_queued_bytes=10)
    assert [s.deliver(b"t", b"x" * 4, 1) for _ in range(4)] == [None] * 4
    assert (len(s.queue), s.queued_bytes, s.dropped) == (2, 8, 2)  # a third: 12 > 10
    s.online = True
    assert len(publishes(s.resume())) == 1  # one in flight, one still queued
    assert s.queued_bytes == 4
    assert s.deliver(b"t", b"y" * 6, 1) is None  # 10: fits again
    assert (len(s.queue), s.queued_bytes, s.dropped) == (2, 10, 2)


def test_a_retained_message_keeps_its_flag_in_the_queue_and_on_resume() -> None:
    s = Session("c", clean=False, max_inflight=1, online=True)
    first = s.deliver(b"r/1", b"a", 1, retain=True)
    assert s.deliver(b"r/2", b"b", 1, retain=True) is None  # waits: the window is 1
    s.online = False
    p1, p2 = publishes(s.resume())[0], publishes(s.acked(1))[0]
    assert (p1.topic, p1.retain, p1.dup) == ("r/1", True, True)
    assert (p2.topic, p2.retain, p2.dup) == ("r/2", True, False)
    assert first is not None


def test_max_qos_is_the_highest_plain_subscription_that_matches() -> None:
    s = Session("c", clean=True, online=True)
    s.subscribe("a/#", Subscription(1, 0, None, ("a", "a/>")))
    s.subscribe("a/+", Subscription(2, 1, None, ("a/*",)))
    s.subscribe("$share/g/a/b", Subscription(3, 1, "g", ("a/b",)))
    assert s.max_qos(b"a/x") == 1
    assert s.max_qos(b"a/x/y") == 0  # only a/# matches
    assert s.max_qos(b"b") == 0
    s.unsubscribe("a/+")  # the cache is dropped with it
    assert s.max_qos(b"a/x") == 0


def test_resume_resends_inflight_with_dup_then_queue() -> None:
    s = Session("c", clean=False, max_inflight=1, online=True)
    s.deliver(b"t", b"a", 1)
    s.online = False
    s.deliver(b"t", b"b", 1)
    got = publishes(s.resume())
    assert [(p.payload, p.dup, p.packet_id) for p in got] == [(b"a", True, 1)]
    got = publishes(s.acked(1))
    assert [(p.payload, p.dup) for p in got] == [(b"b", False)]


def test_packet_ids_skip_those_in_flight_and_wrap() -> None:
    s = Session("c", clean=False, max_inflight=3, online=True)
    s._next_id = 0xFFFE
    ids = [publishes([s.deliver(b"t", b"", 1)])[0].packet_id for _ in range(3)]  # type: ignore[list-item]
    assert ids == [0xFFFF, 1, 2]


def test_retained_flag_on_immediate_delivery() -> None:
    s = Session("c", clean=True, online=True)
    p = publishes([s.deliver(b"t", b"x", 1, retain=True)])[0]  # type: ignore[list-item]
    assert p.retain


# ---- SessionTable -----------------------------------------------------------------------


def test_persistent_session_comes_back_and_clean_one_does_not() -> None:
    table = SessionTable()
    s, present, ended = table.attach("a", clean=False)
    assert (present, ended) == (False, [])
    assert table.detach(s) == []
    again, present, _ = table.attach("a", clean=False)
    assert again is s
    assert present
    _, present, ended = table.attach("a", clean=True)
    assert not present
    assert ended == [s]


def test_clean_session_ends_on_detach() -> None:
    table = SessionTable()
    s, _, _ = table.attach("a", clean=True)
    assert table.detach(s) == [s]
    assert len(table) == 0


def test_absent_sessions_are_bounded_oldest_first() -> None:
    table = SessionTable(max_offline=2)
    sessions = [table.attach(name, clean=False)[0] for name in "abc"]
    ended = [gone for s in sessions for gone in table.detach(s)]
    assert [g.client_id for g in ended] == ["a"]
    assert table.offline == 2


# ---- retained and filters ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("filt", "topic", "hit"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/b", "a/b", True),
        ("+", "/a", False),
        ("+/+", "/a", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("a/b", "a/b/c", False),
    ],
)
def test_filter_matches(filt: str, topic: str, hit: bool) -> None:
    assert filter_matches(filt, topic) is hit


def naive(filt: str, topic: str) -> bool:
    if topic.startswith("$") and filt[:1] in "+#":
        return False
    f, t = filt.split("/"), topic.split("/")
    if f[-1] == "#":
        return len(t) >= len(f) - 1 and all(a in ("+", b) for a, b in zip(f[:-1], t, strict=False))
    return len(f) == len(t) and all(a in ("+", b) for a, b in zip(f, t, strict=True))


level = st.sampled_from(["a", "b", "", "$x"])


@given(st.lists(level | st.just("+"), min_size=1, max_size=4), st.booleans(),
       st.lists(level, min_size=1, max_size=4))  # fmt: skip
def test_filter_matches_agrees_with_naive(fl: list[str], hash_: bool, tl: list[str]) -> None:
    filt = "/".join([*fl, "#"] if hash_ else fl)
    topic = "/".join(tl)
    assert filter_matches(filt, topic) == naive(filt, topic)


def test_retained_set_clear_match_and_bound() -> None:
    r = ListenerRetained(limit=2)
    r.retain("a/b", b"1", 1)
    r.retain("a/c", b"2", 0)
    assert {m.topic for m in r.matching("a/+")} == {"a/b", "a/c"}
    assert [m.payload for m in r.matching("a/b")] == [b"1"]
    r.retain("a/b", b"", 0)
    assert r.matching("a/b") == []
    r.retain("x", b"1", 0)
    r.retain("y", b"1", 0)
    assert r.count() == 2
    assert r.dropped == 1
    assert r.matching("a/#") == []


_LEVELS = st.sampled_from(["a", "b", "", "$s"])


@given(
    st.lists(st.tuples(st.lists(_LEVELS, min_size=1, max_size=3), st.booleans()), max_size=25),
    st.lists(st.sampled_from(["a", "b", "", "+", "#", "$s"]), min_size=1, max_size=4),
    st.integers(2, 30),
)
@example([(["a"], True), (["a", "b"], True), (["ab"], True)], ["a", "#"], 10)  # a/# has a
@example([(["", "a"], True), (["a"], True)], ["", "+"], 10)  # an empty first level
def test_listener_retained_finds_what_a_scan_of_every_topic_finds(
    changes: list[tuple[list[str], bool]], filter_levels: list[str], limit: int
) -> None:
    """``matching`` looks only under the filter's literal prefix (and at the parent for a
    trailing ``#``); the reference matches every retained topic."""
    if "#" in filter_levels[:-1]:
        filter_levels = filter_levels[: filter_levels.index("#") + 1]  # '#' comes last
    filt = "/".join(filter_levels)
    r = ListenerRetained(limit=limit)
    for levels, keep in changes:
        r.retain("/".join(levels), b"x" if keep else b"", 0)
    held = sorted(r._by_topic)
    assert r._topics == held  # the sorted copy never drifts
    want = [t for t in held if filter_matches(filt, t)]
    got = [m.topic for m in r.matching(filt)]
    assert sorted(got) == want
    assert len(got) == len(set(got))


def test_node_retained_leaves_it_to_the_node() -> None:
    r = NodeRetained()
    r.retain("a", b"x", 1)
    assert r.in_node
    assert r.matching("a") == []
    assert r.count() is None


# ---- Committing: QoS 1/2 publishes waiting for the node's commit ---------------------------


def test_committing_settles_each_id_once_and_ignores_strangers() -> None:
    c, s = Committing(), Session("c", clean=False, online=True)
    c.wait(s, 7, 1, "aa", b"rec-a", now=0.0)
    c.wait(s, 8, 2, "bb", b"rec-b", now=0.0)
    assert c.answered(["bb", "zz", "aa", "aa"], now=1.0) == [(s, 8, 2), (s, 7, 1)]
    assert len(c) == 0
    assert s.incoming == {7: ("aa", b"rec-a"), 8: ("bb", b"rec-b")}  # until the ack is out


def test_committing_skips_a_packet_id_reused_since() -> None:
    c, s = Committing(), Session("c", clean=False)
    c.wait(s, 7, 1, "old", b"r1", now=0.0)
    c.wait(s, 7, 1, "new", b"r2", now=0.0)  # the client reused 7 (a different message)
    assert c.answered(["old"], now=0.5) == []
    assert c.answered(["new"], now=0.5) == [(s, 7, 1)]


def test_committing_resends_after_silence_each_record_once_per_wait() -> None:
    c, s = Committing(), Session("c", clean=False)
    assert c.due(100.0) == []
    c.wait(s, 1, 1, "a", b"r1", now=10.0)
    c.wait(s, 2, 1, "b", b"r2", now=10.5)
    assert c.due(10.0 + RETRY_AFTER - 0.01) == []
    assert c.due(10.0 + RETRY_AFTER) == [b"r1"]  # same record: same event id
    assert c.due(10.5 + RETRY_AFTER) == [b"r2"]  # each when its own wait is over
    assert c.due(10.5 + RETRY_AFTER + 0.1) == []  # each clock restarted
    c.answered(["a"], now=13.0)
    assert c.due(13.0 + RETRY_AFTER) == [b"r2"]


def test_committing_resends_a_lost_record_while_the_node_answers_later_ones() -> None:
    """Found by an audit: a frame lost while the node answered later ones was never sent
    again (any answer restarted the one clock)."""
    c, s = Committing(), Session("c", clean=False)
    c.wait(s, 1, 1, "lost", b"r1", now=0.0)
    for t in range(1, 9):
        c.wait(s, 100 + t, 1, f"k{t}", b"x", now=float(t))
        c.answered([f"k{t}"], now=float(t))
        assert c.due(float(t)) == ([b"r1"] if t in (2, 4, 6, 8) else [])


def test_committing_never_resends_what_a_busy_node_has_not_reached() -> None:
    """Found in review: resending whatever waited long, answers or not, resent healthy
    records of a saturated node (each one more duplicate for it to drop)."""
    c, s = Committing(), Session("c", clean=False)
    for i in range(500):
        c.wait(s, i + 1, 1, f"k{i}", b"x", now=0.0)
    for t in range(1, 50):  # the node answers 10 a second, in the order sent
        c.answered([f"k{i}" for i in range(10 * (t - 1), 10 * t)], now=float(t))
        assert c.due(float(t)) == []


def test_committing_resends_at_most_a_bounded_batch_oldest_first() -> None:
    """Resending all that waited each time the node fell silent pushed 24 MB into a stalled
    node every 2 s at 200,000 waiting."""
    c, s = Committing(), Session("c", clean=False)
    for i in range(RESEND_MAX + 10):
        c.wait(s, i + 1, 1, f"k{i}", b"%d" % i, now=0.0)
    first = c.due(RETRY_AFTER)
    assert first == [b"%d" % i for i in range(RESEND_MAX)]
    assert c.due(RETRY_AFTER) == [b"%d" % i for i in range(RESEND_MAX, RESEND_MAX + 10)]
    assert c.due(RETRY_AFTER) == []
    s.incoming[1] = ("someone-else", b"")  # the client reused packet id 1
    assert b"0" not in c.due(2 * RETRY_AFTER)
    assert "k0" not in c.waiting
