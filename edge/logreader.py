"""Reading the node's log from a cursor: the spool of the uplink and of the bridges.

An actor that must not lose events while its far side is away (the cloud node, an MQTT
broker, a NATS server) does not keep a queue of its own: the node logs what it must carry
before routing it, and the actor reads the log in order from its cursor, a small file in
the data dir that it moves only once the far side has the events. The node reads the same
file so that it never trims what has not been sent (``node/durable.py``, Spool).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from node.datadir import read_cursor, write_cursor
from node.store import FILE_NAME

STATS_PAGE: Final = 1000  # log entries a stats walk reads at a time
STATS_WALK: Final = 20_000  # and at most, past the cursor (an older one is not shown)


class LogReader:
    """A read-only view of the log (WAL: it never blocks the node's writes) and a cursor."""

    def __init__(self, data_dir: Path, cursor_path: Path, *, start_at_head: bool) -> None:
        self.db = sqlite3.connect(
            f"file:{data_dir / FILE_NAME}?mode=ro", uri=True, check_same_thread=False
        )
        self.path = cursor_path
        cursor = read_cursor(cursor_path)
        if cursor is None:
            # A new reader that should not send history: it starts where the log ends now.
            cursor = self.head() if start_at_head else 0
            write_cursor(cursor_path, cursor)
        self.cursor = cursor

    def head(self) -> int:
        return int(self.db.execute("SELECT coalesce(max(seq), 0) FROM log").fetchone()[0])

    def after(self, limit: int) -> list[tuple[int, str, bytes]]:
        """Up to ``limit`` entries after the cursor, in order: (seq, topic, record). The
        log has holes where it was trimmed around what some reader carries; what the spool
        bound dropped is counted by the node (``store.spool.readers`` in its status)."""
        rows = self.db.execute(
            "SELECT seq, topic, record FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
            (self.cursor, limit),
        ).fetchall()
        return [(seq, topic, bytes(record)) for seq, topic, record in rows]

    def advance(self, seq: int) -> None:
        """The far side has everything up to ``seq``."""
        if seq > self.cursor:
            self.cursor = seq
            write_cursor(self.path, seq)

    def stats(self, carries: Callable[[str, int], bool] | None = None) -> dict[str, Any]:
        """The age of the oldest entry not yet sent that this reader carries (``carries``:
        by topic and flags; None: every entry). What the reader still has to send, in
        entries and bytes, is the node's count (node/spool.py), which its status shows.

        Any entry used to count: an unrelated persistent event logged 10 s before an
        export showed "oldest 11s" for one of 1 s (exploratory test). The walk reads the
        topic and the flags byte only, in pages, at most STATS_WALK entries."""
        after, walked, last_ns = self.cursor, 0, None
        while walked < STATS_WALK:
            rows = self.db.execute(
                "SELECT seq, topic, time_ns, substr(record, 9, 1) FROM log WHERE seq > ? "
                "ORDER BY seq LIMIT ?",
                (after, STATS_PAGE),
            ).fetchall()
            for _seq, topic, time_ns, flags in rows:
                if carries is None or carries(topic, flags[0] if flags else 0):
                    return {"oldest_age_s": _age(time_ns)}
            if len(rows) < STATS_PAGE:
                return {"oldest_age_s": None}
            after, walked, last_ns = rows[-1][0], walked + len(rows), rows[-1][2]
        # Walked that far without one: it is older than the last entry walked, if any
        # waits at all ("nothing old" was shown for a 10-minute-old export: review).
        age = None if last_ns is None else _age(last_ns)
        return {"oldest_age_s": age, "oldest_at_least": True}

    def close(self) -> None:
        self.db.close()


def _age(time_ns: int) -> float:
    """Seconds since ``time_ns``, never below 0 (a clock stepped back showed -3595: review)."""
    return max(0.0, round((time.time_ns() - time_ns) / 1e9, 3))
