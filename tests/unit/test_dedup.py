"""The (origin, seq) duplicate window: tables of sequences, and a set-based reference model."""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.dedup import MAX_ORIGINS, WINDOW, DedupWindow

O1, O2, O3 = b"origin-1", b"origin-2", b"origin-3"


class Reference:
    """What DedupWindow promises, written the slow way: a set of every seq per origin."""

    def __init__(self, window: int, max_origins: int) -> None:
        self.window = window
        self.max_origins = max_origins
        self.origins: OrderedDict[bytes, set[int]] = OrderedDict()

    def seen(self, origin: bytes, seq: int) -> bool:
        seqs = self.origins.get(origin)
        if seqs is None:
            if len(self.origins) >= self.max_origins:
                self.origins.popitem(last=False)  # the oldest *inserted* origin goes first
            self.origins[origin] = {seq}
            return False
        top = max(seqs)
        if seq <= top - self.window:  # too old to judge: reported as a repeat
            return True
        if seq in seqs:
            return True
        seqs.add(seq)
        return False


# ---- tables -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "window"),
    [
        # (seq, expected) for one origin
        ([(5, False), (5, True), (6, False), (6, True)], 4),
        ([(5, False), (3, False), (3, True), (4, False), (5, True)], 4),
        ([(10, False), (7, False), (6, True), (7, True)], 4),  # 6 is window (4) behind 10
        ([(10, False), (20, False), (10, True), (17, False), (16, True)], 4),  # jump > window
        ([(0, False), (4, False), (1, False), (0, True), (2, False), (3, False), (3, True)], 4),
        ([(1, False), (1 + WINDOW - 1, False), (1, True), (2, False)], WINDOW),
        ([(1, False), (1 + WINDOW, False), (1, True), (2, False), (2, True)], WINDOW),
        ([(7, False), (7, True)], 1),  # window 1: only the newest is remembered
        ([(7, False), (6, True), (8, False), (7, True)], 1),
    ],
    ids=[
        "repeat",
        "out-of-order",
        "window-edge",
        "jump",
        "fill-gaps",
        "default-edge",
        "default-past-edge",
        "window-1-repeat",
        "window-1-older",
    ],
)
def test_single_origin(steps: list[tuple[int, bool]], window: int) -> None:
    d = DedupWindow(window=window)
    assert [d.seen(O1, seq) for seq, _ in steps] == [want for _, want in steps]


def test_origins_are_independent() -> None:
    d = DedupWindow(window=8)
    assert not d.seen(O1, 1)
    assert not d.seen(O2, 1)
    assert d.seen(O1, 1)
    assert d.seen(O2, 1)
    assert not d.seen(O3, 1)
    assert len(d) == 3


def test_oldest_origin_is_forgotten() -> None:
    d = DedupWindow(window=8, max_origins=2)
    assert not d.seen(O1, 1)
    assert not d.seen(O2, 1)
    assert d.seen(O1, 1)  # still known; being active does not move it to the back
    assert not d.seen(O3, 1)  # evicts O1, the oldest inserted
    assert len(d) == 2
    assert d.seen(O2, 1)
    assert d.seen(O3, 1)
    assert not d.seen(O1, 1)  # O1 was forgotten, so its repeat passes (the bounded-memory cost)
    assert len(d) == 2


def test_defaults() -> None:
    d = DedupWindow()
    assert (d.window, d.max_origins) == (WINDOW, MAX_ORIGINS)
    assert len(d) == 0


# ---- properties ---------------------------------------------------------------------------

origins = st.sampled_from([O1, O2, O3, b"origin-4"])


@given(
    window=st.integers(1, 12),
    max_origins=st.integers(1, 4),
    events=st.lists(st.tuples(origins, st.integers(0, 40)), max_size=80),
)
def test_agrees_with_reference(
    window: int, max_origins: int, events: list[tuple[bytes, int]]
) -> None:
    d = DedupWindow(window=window, max_origins=max_origins)
    ref = Reference(window, max_origins)
    for origin, seq in events:
        assert d.seen(origin, seq) == ref.seen(origin, seq), (origin, seq)
        assert len(d) == len(ref.origins) <= max_origins


@given(
    base=st.integers(0, 1 << 40),
    offsets=st.lists(st.tuples(origins, st.integers(0, WINDOW - 1)), max_size=60),
)
def test_within_the_window_only_repeats_are_seen(
    base: int, offsets: list[tuple[bytes, int]]
) -> None:
    """All seqs within one default window of each other: True exactly for repeats."""
    d = DedupWindow()
    held: set[tuple[bytes, int]] = set()
    for origin, off in offsets:
        key = (origin, base + off)
        assert d.seen(*key) == (key in held)
        held.add(key)


@given(
    top=st.integers(0, 1000),
    behind=st.integers(0, 3000),
    window=st.integers(1, 64),
)
def test_older_than_the_window_is_seen(top: int, behind: int, window: int) -> None:
    d = DedupWindow(window=window)
    assert not d.seen(O1, top)
    assert d.seen(O1, top - behind) == (behind == 0 or behind >= window)


@given(
    window=st.integers(1, 12),
    steps=st.lists(
        st.tuples(
            origins,
            st.one_of(st.just(1), st.integers(-20, 20)),  # mostly in order, as on a link
        ),
        max_size=200,
    ),
)
def test_runs_skips_and_late_arrivals_agree_with_reference(
    window: int, steps: list[tuple[bytes, int]]
) -> None:
    """Long in-order runs (the fast path), skips and late seqs, each origin its own stream."""
    d = DedupWindow(window=window)
    ref = Reference(window, MAX_ORIGINS)
    at = dict.fromkeys((O1, O2, O3, b"origin-4"), 100)
    for origin, delta in steps:
        at[origin] = max(0, at[origin] + delta)
        assert d.seen(origin, at[origin]) == ref.seen(origin, at[origin]), (origin, at[origin])
