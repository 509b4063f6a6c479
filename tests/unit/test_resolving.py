"""Which mDNS services discovery resolves, and when again (node/resolving.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node.resolving import RETRY_FIRST, TRIES, Resolutions


def test_at_most_limit_run_at_once_oldest_first() -> None:
    r = Resolutions(2)
    for i, name in enumerate("abcd"):
        r.added(name, float(i))
    assert r.start(10.0) == ["a", "b"]
    assert r.start(10.0) == []  # full
    assert r.finished("a", True, 10.0)
    assert r.start(10.0) == ["c"]


def test_a_failure_is_tried_again_after_a_doubling_wait_then_left_until_announced() -> None:
    r = Resolutions(4)
    r.added("x", 0.0)
    assert r.start(0.0) == ["x"]
    now, waits = 0.0, []
    for _ in range(TRIES - 1):
        assert not r.finished("x", False, now)
        t = now
        while not r.start(t):  # the first moment it is started again
            t += 0.5
        waits.append(t - now)
        now = t
    assert waits == [RETRY_FIRST * 2**i for i in range(TRIES - 1)] == [2, 4, 8, 16, 32]
    assert not r.finished("x", False, now)  # the last try failed: no more
    assert r.start(now + 3600) == []
    r.added("x", now + 3600)  # announced again (its records changed, or it came back)
    assert r.start(now + 3600) == ["x"]


def test_a_new_announcement_is_not_queued_behind_overdue_retries() -> None:
    """Found in review: oldest wish first put every overdue retry of a LAN's stale
    pointers ahead of a peer just announced (1,000 of them: a wait of minutes)."""
    r = Resolutions(1)
    r.added("stale1", 0.0)
    r.added("stale2", 0.0)
    assert r.start(0.0) == ["stale1"]
    r.finished("stale1", False, 2.0)
    assert r.start(2.0) == ["stale2"]
    r.finished("stale2", False, 4.0)
    r.added("real", 10.0)
    assert r.start(10.0) == ["real"]
    r.finished("real", True, 10.1)
    assert r.start(10.1) == ["stale1"]


def test_a_removed_service_is_neither_reported_nor_tried_again() -> None:
    r = Resolutions(4)
    r.added("x", 0.0)
    assert r.start(0.0) == ["x"]
    r.removed("x")
    assert not r.finished("x", True, 1.0)
    assert not r.finished("x", False, 1.0)
    assert r.start(1000.0) == []


def test_an_announcement_while_resolving_asks_again_after_it() -> None:
    """Updated records (a new port, say) mid-resolution: the result in hand is reported
    and the name is resolved once more, at once."""
    r = Resolutions(4)
    r.added("x", 0.0)
    assert r.start(0.0) == ["x"]
    r.added("x", 0.5)
    assert r.start(0.5) == []  # one resolution per name at a time
    assert not r.finished("x", False, 1.0)  # a failure does not push the new wish back
    assert r.start(1.0) == ["x"]
    assert r.finished("x", True, 1.2)


def test_a_failure_of_a_resolution_overtaken_by_an_announcement_is_not_counted() -> None:
    """The announcement made a fresh start: the name keeps all its tries (and so its
    place among new names; found in review)."""
    r = Resolutions(4)
    r.added("x", 0.0)
    assert r.start(0.0) == ["x"]
    r.added("x", 0.5)
    assert not r.finished("x", False, 1.0)
    tries, now = 0, 1.0
    while now < 1000:
        if r.start(now):
            tries += 1
            r.finished("x", False, now)
        now += 0.5
    assert tries == TRIES


def test_success_resets_the_backoff() -> None:
    r = Resolutions(1)
    r.added("x", 0.0)
    for t in (0.0, 2.0, 6.0):  # fails three times: the next wait would be 8 s
        assert r.start(t) == ["x"]
        r.finished("x", False, t)
    r.added("x", 14.0)  # re-announced: resolve now
    assert r.start(14.0) == ["x"]
    assert r.finished("x", True, 14.0)
    r.added("x", 20.0)
    assert r.start(20.0) == ["x"]
    r.finished("x", False, 20.0)
    assert r.start(20.0 + RETRY_FIRST - 0.01) == []
    assert r.start(20.0 + RETRY_FIRST) == ["x"]


_OPS = st.lists(
    st.tuples(
        st.sampled_from(["added", "removed", "start", "ok", "fail"]),
        st.sampled_from("abcdef"),
        st.floats(0, 5),
    ),
    max_size=80,
)


@given(_OPS, st.integers(1, 4))
def test_never_over_the_limit_never_reports_a_removed_name(
    ops: list[tuple[str, str, float]], limit: int
) -> None:
    r = Resolutions(limit)
    now = 0.0
    for op, name, dt in ops:
        now += dt
        if op == "added":
            r.added(name, now)
        elif op == "removed":
            r.removed(name)
        elif op == "start":
            started = r.start(now)
            assert len(set(started)) == len(started)
            assert all(n in r.announced for n in started)
        elif name in r.running:
            reported = r.finished(name, op == "ok", now)
            assert reported == (op == "ok" and name in r.announced)
        assert len(r.running) <= limit
