"""The node's durable state in SQLite (stdlib ``sqlite3``, WAL) in its data dir.

What lives here: the event log (persistent events always, direct events whose topic
matches the configured log patterns; it doubles as the persistent-publish dedupe record),
retained events, and durable queues with their messages. The loop thread owns the one connection
and commits once per pass (group commit): everything written during a pass becomes
durable together, and only then are publishers acknowledged.

Durability, stated exactly (also in the README):

* ``sync = "normal"`` (default): a commit is written to the WAL file before the node
  acknowledges. It survives a crash of the node process (``kill -9``); a power loss or
  kernel crash may lose the last commits that the OS had not yet flushed.
* ``sync = "full"``: the WAL is fsync'ed on every commit; acknowledged events also
  survive a power loss, at the cost of one fsync per pass.

Every failure surfaces as StoreError with a message an operator can act on.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Final

from node.clock import SET_AFTER_NS
from node.datadir import EPOCH_FILE
from node.errors import NodeError

SCHEMA_VERSION: Final = 1
CLOCK_STEP_NS: Final = 60 * 10**9  # how far back the node's clock may step between entries
FILE_NAME: Final = "store.db"

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS log (
    seq INTEGER PRIMARY KEY, id BLOB NOT NULL, topic TEXT NOT NULL,
    time_ns INTEGER NOT NULL, record BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS retained (
    topic TEXT PRIMARY KEY, record BLOB NOT NULL, local INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS queues (
    name TEXT PRIMARY KEY, patterns TEXT NOT NULL, ack_wait REAL NOT NULL,
    max_deliver INTEGER NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS qmsgs (
    queue TEXT NOT NULL, seq INTEGER NOT NULL, id BLOB NOT NULL, at_ns INTEGER NOT NULL,
    deliveries INTEGER NOT NULL DEFAULT 0, record BLOB NOT NULL,
    PRIMARY KEY (queue, seq)) WITHOUT ROWID;
"""


class StoreError(NodeError):
    """The store cannot be opened or written (corrupt file, disk full, permissions)."""


class Store:
    """One SQLite database; writes batch into one transaction until ``commit``."""

    def __init__(self, path: Path, *, sync: str = "normal") -> None:
        self.path = path
        self.sync = sync
        self._in_tx = False
        self._failed = ""  # a write of this pass failed: the pass is rolled back as a whole
        self.commits = 0
        self._head: int | None = None  # the log's highest sequence ever (None: ask SQLite)
        self._totals: tuple[int, int] | None = None  # the log's (entries, bytes); None: count
        try:
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._check()
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if sync == 'full' else 'NORMAL'}")
            self.db.executescript(_SCHEMA)
            self._version()
            self._writable()
        except sqlite3.DatabaseError as e:
            why = " ".join(str(e).split())  # one line: sqlite's reports span several
            raise StoreError(
                f"store {path} is unreadable ({why}); move it aside to start with an empty "
                "store, or restore it from a backup"
            ) from None

    def _check(self) -> None:
        """Refuse a corrupt file at start rather than serve it short."""
        rows = self.db.execute("PRAGMA quick_check").fetchall()
        if rows != [("ok",)]:
            detail = "; ".join(str(r[0]) for r in rows[:3])
            raise sqlite3.DatabaseError(f"integrity check failed: {detail}")

    def _writable(self) -> None:
        """Refuse a store this process may read but not write (another user's file, after
        one `sudo meshctl up`): SQLite opens it read-only without a word, and the node
        served, refusing every persistent publish and queue change."""
        try:
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('opened', ?)", (str(time.time_ns()),)
            )
        except sqlite3.OperationalError as e:
            raise StoreError(
                f"store {self.path} is not writable ({e}): check the owner and mode of it "
                "and of its -wal and -shm files"
            ) from None

    def _version(self) -> None:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            self.db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        elif row[0] != str(SCHEMA_VERSION):
            raise sqlite3.DatabaseError(
                f"schema version {row[0]}, this node reads version {SCHEMA_VERSION}"
            )

    # ---- transactions ----------------------------------------------------------------

    def _write(self, sql: str, args: Iterable[object] = ()) -> sqlite3.Cursor:
        if self._failed:
            raise sqlite3.OperationalError(self._failed)
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True
        return self.db.execute(sql, tuple(args))

    def _write_many(self, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
        if self._failed:
            raise sqlite3.OperationalError(self._failed)
        if not self._in_tx:
            self.db.execute("BEGIN")
            self._in_tx = True
        self.db.executemany(sql, rows)

    @property
    def pending(self) -> bool:
        """True while this pass has written (or failed to write) something."""
        return self._in_tx or bool(self._failed)

    def commit(self) -> None:
        """Make this pass's writes durable; StoreError (after a rollback) if that fails or
        if any write of the pass failed (then nothing of the pass is kept)."""
        if self._failed:
            why, self._failed = self._failed, ""
            raise StoreError(_explain(sqlite3.OperationalError(why)))
        if not self._in_tx:
            return
        try:
            self.db.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as e:
            self.rollback()
            raise StoreError(_explain(e)) from None
        finally:
            self._in_tx = False

    def rollback(self) -> None:
        """Forget this pass's writes; the next pass starts clean."""
        if self.db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.db.execute("ROLLBACK")
        self._in_tx = False
        self._failed = ""
        self._head = None  # the pass's appends are gone
        self._totals = None  # and so are its changes to them: count again

    def guard(self, sql: str, args: Iterable[object] = ()) -> sqlite3.Cursor:
        """One write inside the pass's transaction; StoreError on failure, after which
        the whole pass is rolled back and ``commit`` fails too."""
        try:
            return self._write(sql, args)
        except sqlite3.Error as e:
            self._fail(e)
            raise StoreError(_explain(e)) from None

    def guard_many(self, sql: str, rows: Iterable[tuple[object, ...]]) -> None:
        """Many writes inside the pass's transaction; StoreError as ``guard``."""
        try:
            self._write_many(sql, rows)
        except sqlite3.Error as e:
            self._fail(e)
            raise StoreError(_explain(e)) from None

    def _fail(self, e: sqlite3.Error) -> None:
        self.rollback()
        self._failed = self._failed or str(e)

    def read(self, sql: str, args: Iterable[object] = ()) -> list[tuple]:  # type: ignore[type-arg]
        """Rows of a query (sees this pass's uncommitted writes: one connection)."""
        try:
            return self.db.execute(sql, tuple(args)).fetchall()
        except sqlite3.Error as e:
            raise StoreError(_explain(e)) from None

    def close(self) -> None:
        """Commit what is pending and close; safe to call twice."""
        with contextlib.suppress(StoreError):
            self.commit()
        with contextlib.suppress(sqlite3.Error):
            self.db.close()

    # ---- the log ---------------------------------------------------------------------

    def log_head(self) -> int:
        """The highest log sequence ever used (0 for a new log), even if trimmed away.

        Sequences never go back: cursors (the uplink's, each bridge's, a replaying
        client's) say "everything up to N was sent", and a log that restarted at 1 after
        an idle night trimmed it empty had its new events skipped until it passed N."""
        if self._head is None:
            row = self.read("SELECT max(seq) FROM log")[0]
            kept = self.read("SELECT value FROM meta WHERE key = 'log_head'")
            self._head = max(int(row[0] or 0), int(kept[0][0]) if kept else 0)
        return self._head

    def unset_tail(self, before_ns: int) -> int | None:
        """The first of the newest entries stamped before ``before_ns`` (None if the
        newest is not): walked from the head, so it costs what those entries are."""
        first = None
        try:
            for seq, t_ns in self.db.execute("SELECT seq, time_ns FROM log ORDER BY seq DESC"):
                if t_ns >= before_ns:
                    break
                first = seq
        except sqlite3.Error as e:
            raise StoreError(_explain(e)) from None
        return first

    def unset_queue_rows(self, before_ns: int) -> bool:
        """True if a queue holds a message stamped before ``before_ns`` (captured from
        another node while the clock was not set: it has no log entry here)."""
        return bool(self.read("SELECT 1 FROM qmsgs WHERE at_ns < ? LIMIT 1", (before_ns,)))

    def log_restamp(self, first: int, before_ns: int, now_ns: int) -> None:
        """Give entries from ``first`` on stamped before ``before_ns`` the time ``now_ns``
        (in the pass): stamped while the clock was not set (node/clock.py), they were
        older than any age bound, and the first NTP step aged out the whole log (clock
        faults). Now is an upper bound of when they came: they stay at least as long as
        they should. From ``first`` only: a whole-log UPDATE took 1.4 s and 261 MiB of
        WAL at 267 MiB (review)."""
        self.guard(
            "UPDATE log SET time_ns = ? WHERE seq >= ? AND time_ns < ?",
            (now_ns, first, before_ns),
        )
        self.guard("UPDATE qmsgs SET at_ns = ? WHERE at_ns < ?", (now_ns, before_ns))

    def _keep_head(self) -> None:
        """Before deleting from the log: remember its head (the newest row may go)."""
        self.guard(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('log_head', ?)",
            (str(self.log_head()),),
        )

    def log_append(self, rows: list[tuple[bytes, str, int, bytes]]) -> int:
        """Append (id, topic, time_ns, record) rows; returns the last sequence used."""
        if not rows:
            return 0
        head = self.log_head()
        self.guard_many(
            "INSERT INTO log (seq, id, topic, time_ns, record) VALUES (?, ?, ?, ?, ?)",
            ((head + i, *r) for i, r in enumerate(rows, 1)),
        )
        self._head = head + len(rows)
        if self._totals is not None:
            n, size = self._totals
            self._totals = n + len(rows), size + sum(len(r[3]) for r in rows)
        return self._head

    def log_after(self, seq: int, limit: int) -> list[tuple[int, str, bytes]]:
        """(seq, topic, record) of up to ``limit`` log entries after ``seq``, in order."""
        return self.read(
            "SELECT seq, topic, record FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
            (seq, limit),
        )

    def log_span(
        self, seq: int, limit: int, max_bytes: int
    ) -> tuple[list[tuple[int, str, bytes]], bool]:
        """``log_after``, but no more entries once their records reach ``max_bytes`` (at
        least one): (rows, True if it stopped there). Rows are read one by one: 2,048
        entries of 1 MiB were one read of ~2 GB, a stall and 1 GB of memory (review)."""
        rows = []
        size = 0
        try:
            cursor = self.db.execute(
                "SELECT seq, topic, record FROM log WHERE seq > ? ORDER BY seq LIMIT ?",
                (seq, limit),
            )
            for row in cursor:
                rows.append(row)
                size += len(row[2])
                if size >= max_bytes:
                    cursor.close()
                    return rows, True
        except sqlite3.Error as e:
            raise StoreError(_explain(e)) from None
        return rows, False

    def log_seq_at(self, time_ns: int) -> int:
        """The last sequence before ``time_ns`` (so replay from it starts at that time).

        A binary search along the sequence, ~20 lookups by key: the log is in time order
        but for a clock that stepped back. Scanning for the time (there is no index on it,
        which would cost every append) took ~150 ms on a full log, a stall of the node's
        thread for each ``--since`` subscription."""
        last = self.read("SELECT seq, time_ns FROM log ORDER BY seq DESC LIMIT 1")
        if not last or last[0][1] < time_ns:
            return self.log_head()
        lo, hi = self._entry_from(0)[0], int(last[0][0])
        while lo < hi:  # the first position whose next entry is at or after time_ns
            mid = (lo + hi) // 2
            if self._entry_from(mid)[1] >= time_ns:
                hi = mid
            else:
                lo = mid + 1
        return self._entry_from(lo)[0] - 1

    def _entry_from(self, seq: int) -> tuple[int, int]:
        """(seq, time_ns) of the first entry at or after ``seq`` (the log has one)."""
        row = self.read("SELECT seq, time_ns FROM log WHERE seq >= ? ORDER BY seq LIMIT 1", (seq,))
        return int(row[0][0]), int(row[0][1])

    def log_stats(self) -> tuple[int, int, int, int]:
        """(entries, bytes, first seq, first time_ns) of the log."""
        n, size = self._log_totals()
        row = self.read("SELECT seq, time_ns FROM log ORDER BY seq LIMIT 1")
        first, t = row[0] if row else (0, 0)
        return n, size, int(first), int(t)

    def _log_totals(self) -> tuple[int, int]:
        """(entries, bytes) of the whole log, kept as it changes.

        Counting a full log (256 MiB, ~750,000 entries) takes ~190 ms, and the trim asks
        every 5 s: the node's thread stood still that long. So the whole log is counted
        once, and then each append and delete adjusts the totals."""
        if self._totals is None:
            n, size = self.read("SELECT count(*), coalesce(sum(length(record)), 0) FROM log")[0]
            self._totals = int(n), int(size)
        return self._totals

    def _range_totals(self, after: int, upto: int) -> tuple[int, int]:
        """(entries, bytes) with ``after < seq <= upto``: a walk of that range only."""
        n, size = self.read(
            "SELECT count(*), coalesce(sum(length(record)), 0) FROM log WHERE seq > ? AND seq <= ?",
            (after, upto),
        )[0]
        return int(n), int(size)

    def _delete_log(self, after: int, upto: int) -> tuple[int, int]:
        """Delete the entries with ``after < seq <= upto``, keeping the totals; their
        counting walks the same rows as the delete, so it costs what the delete does.
        (entries, bytes) deleted."""
        n, size = self._range_totals(after, upto)
        if not n:
            return 0, 0
        self._keep_head()
        self.guard("DELETE FROM log WHERE seq > ? AND seq <= ?", (after, upto))
        if self._totals is not None:
            self._totals = self._totals[0] - n, self._totals[1] - size
        return n, size

    def log_trim(self, max_bytes: int, max_age_ns: int, now_ns: int) -> int:
        """Drop the oldest entries beyond the size or age bound; returns how many went.

        Entries go from the oldest end, by sequence: the log is in time order but for a
        clock that stepped back, and an old entry behind a newer one waits for it (as a
        segment of Kafka's log does). So the trim walks only what it deletes. (With an
        uplink or bridges, node/spool.py trims around what they have not sent.)"""
        gone = self._delete_log(-1, self.log_before_time(now_ns - max_age_ns))[0]
        n, size, first, _t = self.log_stats()
        if size > max_bytes and n:
            # Cut roughly the share over the bound, oldest first; the next trim refines.
            over = max(1, int(n * (size - max_bytes) / size))
            gone += self._delete_log(-1, first + over - 1)[0]
        return gone

    def log_before_time(self, time_ns: int, after: int = -1) -> int:
        """The sequence before the first entry after ``after`` at or after ``time_ns``
        (the head if none is): the old end of the log, found from its oldest entry."""
        young = self.read(
            "SELECT seq FROM log WHERE seq > ? AND time_ns >= ? ORDER BY seq LIMIT 1",
            (after, time_ns),
        )
        return int(young[0][0]) - 1 if young else self.log_head()

    def log_seq_after(self, after: int, count: int) -> int:
        """The sequence of the ``count``-th entry after ``after`` (the head if fewer)."""
        row = self.read(
            "SELECT seq FROM log WHERE seq > ? ORDER BY seq LIMIT 1 OFFSET ?", (after, count - 1)
        )
        return int(row[0][0]) if row else self.log_head()

    def log_scan(self, after: int, limit: int = -1) -> Iterator[tuple[int, str, int, int]]:
        """(seq, topic, bytes, flags) of each entry after ``after`` (at most ``limit``;
        -1: all), in order, without reading the records: the spool's index is built
        from it."""
        try:
            for seq, topic, size, flags in self.db.execute(
                "SELECT seq, topic, length(record), substr(record, 9, 1) FROM log "
                "WHERE seq > ? ORDER BY seq LIMIT ?",
                (after, limit),
            ):
                yield int(seq), topic, int(size), flags[0] if flags else 0
        except sqlite3.Error as e:
            raise StoreError(_explain(e)) from None

    def log_delete_seqs(self, seqs: list[int], size: int) -> int:
        """Delete the entries ``seqs``, whose records the caller knows to total ``size``
        bytes (the spool's index does), by key; returns how many went."""
        if not seqs:
            return 0
        self._keep_head()
        before = self.db.total_changes
        self.guard_many("DELETE FROM log WHERE seq = ?", ((s,) for s in seqs))
        gone = self.db.total_changes - before
        if self._totals is not None:
            n, total = self._totals
            self._totals = (n - gone, total - size) if gone == len(seqs) else None
        return gone

    def log_delete_except(self, after: int, upto: int, keep: list[int]) -> tuple[int, int]:
        """Delete the entries with ``after < seq <= upto`` but those in ``keep``: one
        statement, however many holes the kept entries leave; (entries, bytes) deleted."""
        if not keep:
            return self._delete_log(after, upto)
        self.guard("CREATE TEMP TABLE IF NOT EXISTS kept (seq INTEGER PRIMARY KEY)")
        self.guard("DELETE FROM kept")
        self.guard_many("INSERT INTO kept VALUES (?)", ((s,) for s in keep))
        n, size = self.read(
            "SELECT count(*), coalesce(sum(length(record)), 0) FROM log "
            "WHERE seq > ? AND seq <= ? AND seq NOT IN (SELECT seq FROM kept)",
            (after, upto),
        )[0]
        if not n:
            return 0, 0
        self._keep_head()
        self.guard(
            "DELETE FROM log WHERE seq > ? AND seq <= ? AND seq NOT IN (SELECT seq FROM kept)",
            (after, upto),
        )
        if self._totals is not None:
            self._totals = self._totals[0] - int(n), self._totals[1] - int(size)
        return int(n), int(size)

    # ---- dedupe ------------------------------------------------------------------------

    def dedupe_load(self, now_ns: int, window_ns: int) -> Iterator[tuple[bytes, int | None]]:
        """(id, time) of what the log took within the window: a publisher retrying after
        our crash is caught. Every persistent event is logged, so the log is the dedupe
        record too (one write per event instead of three with a table and its index).

        The time is None for an entry stamped while the clock was not set, now that it
        is (node/clock.py): its age is unknown, and such entries are the log's newest;
        skipped by the time window, a resend after NTP was stored twice (review). A log
        ahead of the clock (a reboot at 1970) is read within the window of its newest
        entry, not whole (500,000 ids, 180 MiB: review)."""
        # Newest first along the primary key, stopping a minute past the window (the node's
        # clock may have stepped back): start-up reads the window, not the whole log.
        found: list[tuple[bytes, int | None]] = []
        clock_set = now_ns >= SET_AFTER_NS
        since = now_ns - window_ns
        try:
            for raw, t_ns in self.db.execute("SELECT id, time_ns FROM log ORDER BY seq DESC"):
                if clock_set and t_ns < SET_AFTER_NS:
                    found.append((bytes(raw), None))
                    continue
                # The window ends at the latest time seen, if that is ahead of the clock:
                # taken from the newest entry alone, a second boot at 1970 (whose first
                # entry was older than the log before it) read the whole log (reviews).
                since = max(since, t_ns - window_ns)
                if t_ns < since - CLOCK_STEP_NS:
                    break
                if t_ns >= since:
                    found.append((bytes(raw), int(t_ns)))
        except sqlite3.Error as e:
            raise StoreError(_explain(e)) from None
        yield from reversed(found)

    # ---- retained ----------------------------------------------------------------------

    def retained_all(self) -> list[tuple[str, bytes, bool]]:
        """(topic, record, published on this node) of every retained value."""
        rows = self.read("SELECT topic, record, local FROM retained")
        return [(t, bytes(r), bool(local)) for t, r, local in rows]

    def retain(self, topic: str, record: bytes | None, local: bool) -> None:
        """Keep ``record`` as the last value of ``topic``; None clears it. ``local``: it
        was published on this node (which then tells nodes that join later)."""
        if record is None:
            self.guard("DELETE FROM retained WHERE topic = ?", (topic,))
        else:
            self.guard(
                "INSERT OR REPLACE INTO retained VALUES (?, ?, ?)", (topic, record, int(local))
            )


def _explain(e: sqlite3.Error) -> str:
    text = str(e)
    if "full" in text or "disk I/O" in text:
        return f"the node's disk is full or failing ({text}); nothing was stored"
    if "readonly" in text or "permission" in text.lower():
        return f"the node cannot write its store ({text})"
    if "locked" in text:
        return f"the store is locked by another process ({text})"
    return f"store error: {text}"


def open_store(data_dir: Path, *, sync: str = "normal") -> Store:
    """The node's store in ``data_dir``; StoreError with a clear message if unusable."""
    path = data_dir / FILE_NAME
    with contextlib.suppress(OSError):
        # SQLite takes an empty file for a new store: a truncated one started the node
        # with no queues, log or retained values, and no word (exploratory test). A store
        # is never empty once a node has run here (the epoch file is written after it).
        if path.stat().st_size == 0 and (data_dir / EPOCH_FILE).exists():
            raise StoreError(
                f"store {path} is empty, but a node has run in {data_dir}: the store was "
                "truncated or replaced; restore it from a backup, or delete it (and its "
                "-wal and -shm files) to start with an empty store"
            )
    return Store(path, sync=sync)
