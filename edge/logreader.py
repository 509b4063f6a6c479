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
from pathlib import Path
from typing import Any

from node.datadir import read_cursor, write_cursor
from node.store import FILE_NAME


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

    def stats(self) -> dict[str, Any]:
        """The age of the oldest entry not yet sent: one lookup by key. What the reader
        still has to send, in entries and bytes, is the node's count (node/spool.py),
        which its status shows; this walked every unsent entry (~160 ms at 256 MiB) for
        a count of the whole log after the cursor that the status no longer shows."""
        row = self.db.execute(
            "SELECT time_ns FROM log WHERE seq > ? ORDER BY seq LIMIT 1", (self.cursor,)
        ).fetchone()
        age = None if row is None else round((time.time_ns() - row[0]) / 1e9, 3)
        return {"oldest_age_s": age}

    def close(self) -> None:
        self.db.close()
