"""The spool: what the uplink and the bridges still have to send from the node's log.

The uplink and each exporting bridge read the log from a cursor (edge/logreader.py) that
they move once their far side has the events. What one of them still has to send is the
entries after its cursor that it carries: every export for the uplink, the persistent
exports for a bridge. Those entries are *live*, and only they are the spool's: its bound
counts their bytes, drop-oldest deletes the oldest of them, and the log's own bounds (size
and age) trim every entry but them. Before, the spool was the whole log after the
slowest cursor: persistent traffic on topics nobody exports, while the cloud was away,
counted toward the bound and pushed out the exports that waited (found in review).

The node keeps an index of the entries some reader carries, (seq, bytes, which readers),
appended as passes commit and built from the log at start. Each operation walks only
what it changes: a cursor's move what it passed, drop-oldest what it deletes, the trim
the live entries it keeps. A walk of the whole spool with topic matching would stall
the node's thread for about a second at 256 MiB.
"""

from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from node.codec import F_PERSISTENT
from node.datadir import read_cursor
from node.store import Store
from node.topics import SubscriptionTrie

TOPIC_CACHE: Final = 4096  # topics whose readers are remembered
TRIM_WALK: Final = 100_000  # live entries one trim steps over at most
TRIM_ROUNDS: Final = 16  # estimates of what to cut, per trim
CALM_AFTER_FAILURE: Final = 5.0  # seconds before a rolled-back spool counts again
BUILD_CHUNK: Final = 50_000  # log entries indexed per step of a build (~70 ms)
REPORT_EVERY: Final = 10.0  # seconds between two log lines about lost or refused events
COMPACT_AT: Final = 4096  # index entries no longer live before the index is shortened
SHOWN_FULL_FOR: Final = 2.0  # seconds a reader shows full after one of its events was refused


@dataclass(frozen=True, slots=True)
class SpoolReader:
    """One reader of the log whose unsent entries the node keeps."""

    name: str  # as the status shows it: "uplink", "bridge NAME"
    cursor_path: Path
    patterns: tuple[str, ...]
    persistent_only: bool  # a bridge sends persistent exports from the log; the uplink all
    from_start: bool = False  # with no cursor file yet, it will read the log from its start


@dataclass(slots=True)
class _Reader:
    spec: SpoolReader
    bit: int
    cursor: int | None = None  # None: not started yet (no cursor file), waits for nothing
    entries: int = 0  # live entries it carries
    bytes: int = 0
    dropped: int = 0  # deleted by drop-oldest before it sent them
    uncommitted: int = 0  # of those, by deletes the next commit makes (or a failure undoes)
    staged: int = 0  # bytes for it this pass accepted (overflow = refuse), not yet committed
    refused_at: float = -1e9  # when an event it carries was last refused (monotonic)


class Spool:
    """The live entries of the log, their bound, and the log's trim around them."""

    def __init__(self, readers: tuple[SpoolReader, ...], max_bytes: int, refuse: bool) -> None:
        self.readers = [_Reader(spec, 1 << i) for i, spec in enumerate(readers)]
        self._tries: list[SubscriptionTrie[bool]] = []
        for spec in readers:
            trie: SubscriptionTrie[bool] = SubscriptionTrie()
            for p in spec.patterns:
                trie.add(p, True)
            self._tries.append(trie)
        self.max_bytes = max_bytes
        self.refuse = refuse
        self.full = 0  # overflow = refuse, the bound reached: the readers that are behind
        self.dropped = 0
        self.refused = 0
        self._uncommitted = 0  # as _Reader.uncommitted, for the total
        self._staged = 0  # as _Reader.staged, for the total
        self._dirty = False  # this pass deletes from the log: a rollback undoes the index
        self._calm_until = 0.0  # after a rollback of its deletes, the spool waits this long
        self._by_topic: dict[str, tuple[int, int]] = {}
        self._told = (0, 0)  # dropped and refused as the last log line said
        self._next_report = 0.0
        self._reset()

    def _reset(self) -> None:
        """Forget the index: the next ``check`` builds it from the log."""
        self.stale = True
        self.scan: int | None = None  # while the index is built: the last seq indexed
        self.seqs = array("q")
        self.sizes = array("q")
        self.masks: list[int] = []  # the readers that carry the entry; 0 once it is deleted
        self.hint = 0  # no entry before this index is live
        self.covered = 0  # the index holds every entry after this seq that a reader carries
        self.trimmed = 0  # every entry up to this seq that is not live was deleted, but...
        self.dead: list[tuple[int, int]] = []  # ...these (seq, bytes), which died since
        self.live_n = 0
        self.live_bytes = 0
        for r in self.readers:
            r.entries = r.bytes = 0

    # ---- what the log gains -------------------------------------------------------------

    def _mask(self, topic: str, flags: int) -> int:
        """The readers that carry an entry on ``topic`` with ``flags``."""
        got = self._by_topic.get(topic)
        if got is None:
            if len(self._by_topic) >= TOPIC_CACHE:
                self._by_topic.clear()
            every = persistent = 0
            for r, trie in zip(self.readers, self._tries, strict=True):
                if trie.match(topic):
                    if r.spec.persistent_only:
                        persistent |= r.bit
                    else:
                        every |= r.bit
            got = self._by_topic[topic] = (every, persistent)
        return got[0] | (got[1] if flags & F_PERSISTENT else 0)

    def _add(self, seq: int, mask: int, size: int) -> None:
        self.seqs.append(seq)
        self.sizes.append(size)
        self.masks.append(mask)
        live = False
        for r in self.readers:
            if mask & r.bit and r.cursor is not None and seq > r.cursor:
                r.entries += 1
                r.bytes += size
                live = True
        if live:
            self.live_n += 1
            self.live_bytes += size

    def appended(self, first: int, rows: list[tuple[bytes, str, int, bytes]]) -> None:
        """A pass committed ``rows`` (id, topic, time, record) at sequences from ``first``."""
        self._unstage()
        if self.stale or self.scan is not None:
            return  # the next check, or a step of the build, reads them from the log
        for seq, (_id, topic, _t, record) in enumerate(rows, first):
            mask = self._mask(topic, record[8])
            if mask:
                self._add(seq, mask, len(record))

    def _behind(self, over: int) -> int:
        """The readers to blame for ``over`` bytes: the furthest behind first, until they
        account for it. Every reader with something unsent was blamed before, so an uplink
        with one event in flight at the check had its topics refused while a bridge was
        away (found in review)."""
        full = 0
        for r in sorted(self.readers, key=lambda r: r.bytes + r.staged, reverse=True):
            if over <= 0 or not (r.entries or r.staged):
                break
            full |= r.bit
            over -= r.bytes + r.staged
        return full

    def refuses(self, topic: str, flags: int, size: int) -> bool:
        """With overflow = refuse, an event of ``size`` bytes that would take the spool
        over its bound is refused (and counted) if a reader that is behind carries it.
        Only those: one reader behind refused every reader's topics before (found in
        review). What the pass has accepted so far counts: the bound was checked every
        0.5 s only, and one burst filled the spool to four times it (exploratory test)."""
        if not self.refuse:
            return False
        mask = self._mask(topic, flags)
        if not mask:
            return False
        excess = self.live_bytes + self._staged + size - self.max_bytes
        blamed = mask & self.full or (excess > 0 and mask & self._behind(excess))
        if blamed:
            self.refused += 1
            now = time.monotonic()
            for r in self.readers:
                if blamed & r.bit:
                    r.refused_at = now
            return True
        self._staged += size
        for r in self.readers:
            if mask & r.bit:
                r.staged += size
        return False

    # ---- the readers move, the bound holds --------------------------------------------------

    def check(self, store: Store) -> None:
        """Read the cursors, then enforce the bound: drop the oldest live entries, or
        (overflow = refuse) refuse new ones until the readers catch up."""
        if not self._sync(store):
            return
        if self.refuse:
            # Full: over the bound. Not "or refusing since the last check": each refusal
            # because it was full kept it full, and a steady stream was refused for ever
            # after the spool had drained (exploratory test).
            self.full = self._behind(self.live_bytes - self.max_bytes)
        elif self.live_bytes > self.max_bytes:
            self._drop_oldest(store)

    def _sync(self, store: Store) -> bool:
        """Follow the readers' cursors; False while a failed pass's pause lasts."""
        if self.stale and time.monotonic() < self._calm_until:
            return False
        # A cursor file that went away (an operator, a disk error) changes nothing: its
        # reader rewrites it as it sends. Read as the log's start, it made the whole log
        # live again, for drop-oldest to take what others still had to send (review).
        cursors = [_cursor(r.spec, r.cursor) for r in self.readers]
        if self.stale:
            self._rebuild(store, cursors)
        if self.scan is not None and not self._build(store):
            return False  # the readers' moves wait for the index: it counts from their cursors
        for r, new in zip(self.readers, cursors, strict=True):
            if new is None or new == r.cursor:
                continue
            if r.cursor is None and new >= max(self.covered, self.trimmed):
                self._start(r, new)  # a bridge's first start, at the log's end
            elif r.cursor is None or new < r.cursor:
                self._rebuild(store, cursors)  # it may want history the index lacks
                return self._build(store)
            else:
                self._advance(r, new)
        self._compact()
        return True

    def _rebuild(self, store: Store, cursors: list[int | None]) -> None:
        """Start the index afresh from the log: every entry after the earliest cursor,
        read by ``_build`` in steps."""
        self._reset()
        for r, cursor in zip(self.readers, cursors, strict=True):
            r.cursor = cursor
        started = [c for c in cursors if c is not None]
        self.covered = min(started) if started else store.log_head()
        self.scan = self.covered if started else None
        self.stale = False

    @property
    def building(self) -> bool:
        """The index is being read from the log: its counts are not whole yet."""
        return self.scan is not None

    def _build(self, store: Store) -> bool:
        """Index up to BUILD_CHUNK more entries; True once the index holds the log.

        In steps, one per check, because a build takes ~1.4 s a million entries, on the
        node's thread: at start, or after a full disk undid the spool's deletes, a spool
        of a few million small events held the node longer than its peers' dead_after
        (3 s). Entries committed meanwhile are read by a later step (``appended`` leaves
        them); the bound, the trim and the readers' moves wait for the last step."""
        assert self.scan is not None
        n = 0
        for seq, topic, size, flags in store.log_scan(self.scan, BUILD_CHUNK):
            n += 1
            self.scan = seq
            mask = self._mask(topic, flags)
            if mask:
                self._add(seq, mask, size)
        if n < BUILD_CHUNK:
            self.scan = None
        return self.scan is None

    def _start(self, reader: _Reader, cursor: int) -> None:
        """``reader`` starts at ``cursor``: the index holds what it carries after that
        (entries are indexed for every reader, started or not), and the trim has not
        passed it, so counting them is enough."""
        seqs, sizes, masks = self.seqs, self.sizes, self.masks
        start = bisect_right(seqs, cursor)
        for k in range(start, len(seqs)):
            mask, seq = masks[k], seqs[k]
            if not mask & reader.bit:
                continue
            if not self._alive(seq, mask):
                self.live_n += 1
                self.live_bytes += sizes[k]
                self.hint = min(self.hint, k)
            reader.entries += 1
            reader.bytes += sizes[k]
        reader.cursor = cursor

    def _alive(self, seq: int, mask: int) -> bool:
        return any(mask & r.bit and r.cursor is not None and seq > r.cursor for r in self.readers)

    def _advance(self, reader: _Reader, cursor: int) -> None:
        """``reader`` has sent everything up to ``cursor``: what only it carried dies."""
        seqs, sizes, masks = self.seqs, self.sizes, self.masks
        start = bisect_right(seqs, reader.cursor or 0, self.hint)
        end = bisect_right(seqs, cursor, start)
        reader.cursor = cursor
        bit = reader.bit
        for k in range(start, end):
            mask = masks[k]
            if not mask & bit:
                continue
            seq, size = seqs[k], sizes[k]
            reader.entries -= 1
            reader.bytes -= size
            if not self._alive(seq, mask):
                self.live_n -= 1
                self.live_bytes -= size
                if seq <= self.trimmed:
                    self.dead.append((seq, size))  # behind the trim: it must come back for it

    def _compact(self) -> None:
        """Step the hint over entries no longer live; once most of the index is no longer
        live, keep only what is. Not just the part before the first live entry: one
        entry a bridge still has to send kept everything after it, sent or trimmed, in
        memory for good (found in review: 20,001 entries for 1 live)."""
        seqs, sizes, masks = self.seqs, self.sizes, self.masks
        k, n = self.hint, len(seqs)
        while k < n and not (masks[k] and self._alive(seqs[k], masks[k])):
            k += 1
        self.hint = k
        if n - self.live_n < max(COMPACT_AT, self.live_n):
            return
        keep = [i for i in range(k, n) if masks[i] and self._alive(seqs[i], masks[i])]
        if any(r.cursor is None for r in self.readers):
            # What a reader that has not started carries may have gone: it now starts
            # from the log if it starts before this point (_sync).
            self.covered = max(self.covered, seqs[n - 1])
        self.seqs = array("q", (seqs[i] for i in keep))
        self.sizes = array("q", (sizes[i] for i in keep))
        self.masks = [masks[i] for i in keep]
        self.hint = 0

    def _drop_oldest(self, store: Store) -> None:
        """Delete the oldest live entries until the rest fit the bound (counted per reader
        that had not sent them)."""
        over = self.live_bytes - self.max_bytes
        seqs, sizes, masks = self.seqs, self.sizes, self.masks
        gone: list[int] = []
        freed = 0
        k, n = self.hint, len(seqs)
        while k < n and freed < over:
            mask, seq = masks[k], seqs[k]
            if mask and self._alive(seq, mask):
                size = sizes[k]
                for r in self.readers:
                    if mask & r.bit and r.cursor is not None and seq > r.cursor:
                        r.entries -= 1
                        r.bytes -= size
                        r.dropped += 1
                        r.uncommitted += 1
                masks[k] = 0
                gone.append(seq)
                freed += size
            k += 1
        self.hint = k
        self.live_n -= len(gone)
        self.live_bytes -= freed
        self.dropped += len(gone)
        self._uncommitted += len(gone)
        self._dirty = True
        store.log_delete_seqs(gone, freed)

    # ---- the log's own bounds, around the live entries -----------------------------------

    def trim_log(self, store: Store, max_bytes: int, max_age_ns: int, now_ns: int) -> int:
        """Delete the oldest entries that are not live beyond the log's bounds (size: the
        log less the spool; age: the log's max age); returns how many went."""
        if not self._sync(store):  # a reader that started since the check holds its history
            return 0
        # Up to ``trimmed`` all is live or in ``dead``: the search for the first young
        # entry starts after it. From the log's start, it stepped over every unsent entry
        # older than the age bound at each trim (63 ms at 800,000, found in review).
        cutoff = now_ns - max_age_ns
        upto = store.log_before_time(cutoff, after=self.trimmed)
        n, size, _first, _t = store.log_stats()
        over = size - self.live_bytes - max_bytes
        gone = 0
        if self.dead:
            self.dead.sort()  # the oldest first: they were sent, and are the log's again
            # Sent entries go for age as the log's oldest end does: up to the first young
            # entry from the first of them, so an old one waits behind a young one (the
            # clock stepped back). A bisection by their times took a young one (review).
            young_from = store.log_before_time(cutoff, after=self.dead[0][0] - 1)
            old = bisect_right(self.dead, (young_from, 1 << 62))
            cut, freed = 0, 0
            for _seq, bytes_ in self.dead:
                if cut >= old and freed >= over:
                    break
                cut += 1
                freed += bytes_
            if cut:
                self._dirty = True
                gone += store.log_delete_seqs([s for s, _ in self.dead[:cut]], freed)
                del self.dead[:cut]
                over -= freed
        walked = 0
        if upto > self.trimmed:
            n_gone, _freed, walked = self._trim_upto(store, upto, TRIM_WALK)
            gone += n_gone
            n, size, _first, _t = store.log_stats()
            over = size - self.live_bytes - max_bytes
        head = store.log_head()
        for _round in range(TRIM_ROUNDS):
            if over <= 0 or walked >= TRIM_WALK or self.trimmed >= head:
                break
            # Roughly the share over the bound of what is not live, counted from where
            # the last round ended: live entries there make a round fall short, not over.
            share = int((n - self.live_n) * over / (size - self.live_bytes)) + 1
            n_gone, freed, steps = self._trim_upto(
                store, store.log_seq_after(self.trimmed, share), TRIM_WALK - walked
            )
            gone += n_gone
            over -= freed
            walked += steps + 1
            n -= n_gone
            size -= freed
        return gone

    def _trim_upto(self, store: Store, upto: int, walk: int) -> tuple[int, int, int]:
        """Delete what is not live in (trimmed, upto], stepping over at most ``walk`` live
        entries (the rest at the next trim); (entries, bytes, live entries stepped over)."""
        seqs, masks = self.seqs, self.masks
        keep: list[int] = []
        for k in range(bisect_right(seqs, self.trimmed, self.hint), bisect_right(seqs, upto)):
            if masks[k] and self._alive(seqs[k], masks[k]):
                keep.append(seqs[k])
                if len(keep) >= walk:
                    upto = seqs[k]
                    break
        was, self._dirty = self._dirty, True  # before the write: a failed one counts too
        n, size = store.log_delete_except(self.trimmed, upto, keep)
        if not n:  # nothing of the log changed (review: a clean pass never committed)
            self._dirty = was
        self.trimmed = upto
        return n, size, len(keep)

    # ---- the pass's outcome ---------------------------------------------------------------

    def _unstage(self) -> None:
        """The pass is over: what it accepted is in the log (and the index), or gone."""
        if self._staged:
            self._staged = 0
            for r in self.readers:
                r.staged = 0

    def committed(self) -> None:
        if not (self._dirty or self._uncommitted):
            return  # the common case, on every idle pass
        self._dirty = False
        self._uncommitted = 0
        for r in self.readers:
            r.uncommitted = 0

    def failed(self) -> None:
        """A pass was rolled back. If it held this spool's deletes, the index is counted
        again from the log, after a pause: a disk that is full fails pass after pass, and
        a rebuild costs ~1.4 s a million entries."""
        self._unstage()
        if not self._dirty:
            return
        self._dirty = False
        self._calm_until = time.monotonic() + CALM_AFTER_FAILURE
        self.dropped -= self._uncommitted
        self._uncommitted = 0
        for r in self.readers:
            r.dropped -= r.uncommitted
            r.uncommitted = 0
        self._reset()

    def losses(self, now: float) -> str | None:
        """A warning about the events drop-oldest deleted or refuse mode refused since the
        last one, at most one per REPORT_EVERY: an operator reading the log learns that
        the spool overflowed when it does, not from a counter in status (session 9)."""
        dropped = self.dropped - self._uncommitted  # a rollback may still take the rest back
        told_dropped, told_refused = self._told
        told_dropped = min(told_dropped, dropped)  # a rollback took back drops already told
        if now < self._next_report or (dropped == told_dropped and self.refused == told_refused):
            return None
        self._told = (dropped, self.refused)
        self._next_report = now + REPORT_EVERY
        mib = f"{self.max_bytes / 2**20:g} MiB"
        parts = []
        if dropped > told_dropped:
            who = ", ".join(
                f"{r.spec.name} {r.dropped - r.uncommitted}"
                for r in self.readers
                if r.dropped - r.uncommitted
            )
            parts.append(
                f"dropped the oldest {dropped - told_dropped} unsent events "
                f"(total by reader: {who})"
            )
        if self.refused > told_refused:
            parts.append(f"refused {self.refused - told_refused} persistent events")
        return f"spool over its bound of {mib}: {'; '.join(parts)}"

    def readers_now(self) -> dict[str, dict[str, int]]:
        """Each reader's entries and bytes still to send, by name."""
        return {r.spec.name: {"entries": r.entries, "bytes": r.bytes} for r in self.readers}

    def _shown_full(self, r: _Reader, now: float) -> bool:
        """Full as an operator means it: over the bound, or refusing its events lately
        (refused ones never enter, so the bytes alone flipped between checks)."""
        return bool(self.full & r.bit) or now - r.refused_at < SHOWN_FULL_FOR

    def status(self) -> dict[str, object]:
        now = time.monotonic()
        return {
            "building": self.building,  # the counts below are not whole yet
            "full": any(self._shown_full(r, now) for r in self.readers),
            "dropped": self.dropped,
            "refused": self.refused,
            "max_bytes": self.max_bytes,
            "entries": self.live_n,
            "bytes": self.live_bytes,
            "readers": {
                r.spec.name: {
                    "cursor": r.cursor,
                    "entries": r.entries,
                    "bytes": r.bytes,
                    "dropped": r.dropped,
                    "full": self._shown_full(r, now),
                }
                for r in self.readers
            },
        }


def _cursor(spec: SpoolReader, known: int | None) -> int | None:
    """Where ``spec`` is in the log, given where it was (``known``); None while a reader
    that starts at the log's end has not started (it will want nothing before that)."""
    cursor = read_cursor(spec.cursor_path)
    if cursor is None:
        return known if known is not None or not spec.from_start else 0
    return cursor
