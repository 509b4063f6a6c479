"""The log's kept totals (node/store.py): the node never counts the whole log on a timer.

Every check compares the store's answers with SQLite counting the rows itself, after any
mix of appends, trims, the spool's deletes (by key, and of a range around kept entries),
commits and rollbacks.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.store import Store, StoreError, open_store

BIG = 1 << 62


def counted(store: Store) -> tuple[int, int]:
    """(entries, bytes) of the log, counted by SQLite."""
    n, size = store.db.execute(
        "SELECT count(*), coalesce(sum(length(record)), 0) FROM log"
    ).fetchone()
    return n, size


def rows(sizes: list[int], t_ns: int) -> list[tuple[bytes, str, int, bytes]]:
    return [(bytes(16), "t", t_ns, b"r" * n) for n in sizes]


_ops = st.one_of(
    st.tuples(st.just("append"), st.lists(st.integers(0, 300), min_size=1, max_size=8)),
    st.tuples(st.just("trim_age"), st.integers(0, 40)),
    st.tuples(st.just("trim_size"), st.integers(0, 4000)),
    st.tuples(st.just("cursor"), st.integers(-5, 5)),
    st.tuples(st.just("no_reader"), st.none()),  # no reader yet: Spool.cursor()'s 1 << 62
    st.tuples(st.just("drop"), st.integers(0, 3000)),
    st.tuples(st.just("commit"), st.none()),
    st.tuples(st.just("rollback"), st.none()),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_ops, max_size=40))
def test_kept_totals_match_a_count_after_any_changes(ops: list[tuple[str, Any]]) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = open_store(Path(d))
        clock = 100
        try:
            for op, arg in ops:
                if op == "append":
                    clock += 1
                    store.log_append(rows(arg, clock))
                elif op == "trim_age":
                    store.log_trim(BIG, arg, clock)
                elif op == "trim_size":
                    store.log_trim(arg, BIG, clock)
                elif op == "delete_seqs":  # the spool knows their sizes: its index holds them
                    there = {
                        s: n
                        for s, n in store.db.execute("SELECT seq, length(record) FROM log")
                        if s in arg
                    }
                    store.log_delete_seqs(sorted(there), sum(there.values()))
                elif op == "delete_except":
                    after, upto, *keep = arg
                    store.log_delete_except(after, upto, keep)
                elif op == "commit":
                    store.commit()
                else:
                    store.rollback()
                assert store.log_stats()[:2] == counted(store)
        finally:
            store.close()


def test_the_age_trim_goes_from_the_oldest_end() -> None:
    """An entry behind a newer one (the clock stepped back) waits for it to go."""
    with tempfile.TemporaryDirectory() as d:
        store = open_store(Path(d))
        for t in (10, 11, 50, 12, 60):
            store.log_append(rows([5], t))
        assert store.log_trim(BIG, max_age_ns=20, now_ns=70) == 2  # 10 and 11, not 12
        assert [r[1] for r in store.log_after(0, 10)] == ["t"] * 3
        assert store.log_stats() == (3, 15, 3, 50)
        assert store.log_trim(BIG, max_age_ns=20, now_ns=75) == 2  # 50, then 12 behind it
        assert store.log_stats() == (1, 5, 5, 60)
        store.close()


def test_the_totals_survive_a_failed_pass(tmp_path: Path) -> None:
    """A pass rolled back (disk full) takes its appends with it: the totals count again."""
    store = open_store(tmp_path)
    store.log_append(rows([7, 7], 1))
    store.commit()
    assert store.log_stats()[:2] == (2, 14)
    store.log_append(rows([100], 2))
    with pytest.raises(StoreError):
        store.guard("INSERT INTO nowhere VALUES (1)")  # a failed write rolls the pass back
    assert store.log_stats()[:2] == (2, 14) == counted(store)
    store.close()


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), max_size=40), st.integers(0, 130))
def test_the_replay_start_for_a_time_matches_a_scan(
    entries: list[tuple[int, bool]], at: int
) -> None:
    """``log_seq_at`` searches instead of scanning; on a log in time order with gaps
    anywhere (a trimmed front, a dropped spool range) it answers as the scan did."""
    with tempfile.TemporaryDirectory() as d:
        store = open_store(Path(d))
        t = 0
        for dt, _ in entries:
            t += dt
            store.log_append(rows([1], t))
        gone = [(seq,) for seq, (_, drop) in enumerate(entries, 1) if drop]
        store.db.executemany("DELETE FROM log WHERE seq = ?", gone)
        row = store.db.execute("SELECT min(seq) FROM log WHERE time_ns >= ?", (at,)).fetchone()
        assert store.log_seq_at(at) == (row[0] - 1 if row[0] is not None else store.log_head())
        store.close()
