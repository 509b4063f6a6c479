"""The guaranteed side of a node: persistent publish, the log, retained events, durable
queues and replay. Sans-IO except for its Store; the Router calls it, the loop never does.

Everything one pass of the loop writes is committed together at the end of the pass
(``end_pass``). Only after the commit are persistent publishers acknowledged, persistent
events routed, and queue deliveries sent, so nothing a client was told is stored can be
lost by a crash, and nothing is sent that a failed commit would have to take back.
"""

from __future__ import annotations

import heapq
import time
from bisect import bisect_left, insort
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from node.clock import SET_AFTER_NS
from node.codec import (
    F_PERSISTENT,
    F_REPLICA,
    F_RETAIN,
    RECORD_SIZE,
    Kind,
    encode_record,
    with_flags,
    with_headers,
)
from node.errors import CodecError
from node.queues import DEFAULT_MAX_INFLIGHT, Consumer, Queue, Queues
from node.spool import Spool, SpoolReader
from node.store import Store, StoreError
from node.topics import SubscriptionTrie, literal_prefix, matches

DEDUPE_WINDOW: Final = 120.0  # seconds, as NATS JetStream's Nats-Msg-Id window
REPLAY_BATCH: Final = 2048  # log entries read per replaying subscription per pass
# ... and about this many bytes of them: 2,048 entries of 1 MiB were read and sent in one
# pass, which held the node for seconds and its memory at ~1 GB (exploratory test).
REPLAY_BATCH_BYTES: Final = 4 * 1024 * 1024
REPLAY_WINDOW: Final = 20_000  # replayed events a paced client may have unconsumed
# ... and bytes of them, for a client that reports by bytes too ("paced_bytes"): 20,000
# events of 70 kB outgrow what a client's socket queues hold (its and the node's, 1,000
# frames each), and a slow reader lost replayed events (exploratory test)
REPLAY_WINDOW_BYTES: Final = 16 * 1024 * 1024
LOG_ALL: Final = 1
LOG_PERSISTENT: Final = 2
TRIM_EVERY: Final = 5.0
MAX_SEEN: Final = 1_000_000  # ids in the in-memory dedupe window at most
MAX_SINCE: Final = 100 * 365 * 86400.0
MAX_CLEARS: Final = 10_000  # retained clears kept (tombstones of ~50 B), oldest forgotten past it
SPOOL_CHECK: Final = 0.5
SPOOL_FULL: Final = (
    "the spool is full (the uplink's cloud or a bridge's broker has been away too long); "
    "events for the cloud are refused until it drains"
)
_ID: Final = slice(RECORD_SIZE - 16, RECORD_SIZE)


@dataclass(frozen=True, slots=True)
class DurableConfig:
    """The ``[store]`` settings a node runs with."""

    log_patterns: tuple[str, ...] = ()
    log_max_bytes: int = 256 * 1024 * 1024
    log_max_age: float = 7 * 24 * 3600.0
    dedupe_window: float = DEDUPE_WINDOW
    retained_max_bytes: int = 64 * 1024 * 1024
    spool_readers: tuple[SpoolReader, ...] = ()  # the uplink and exporting bridges
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_overflow: str = "drop-oldest"


@dataclass
class Replay:
    """A subscription catching up from the log before it goes live."""

    ident: bytes
    sid: int
    prefix: bytes
    cursor: int
    trie: SubscriptionTrie[int]
    on_live: Callable[[], None]
    paced: bool = False  # the client reports what it consumed: at most a window ahead
    window_bytes: int = 0  # ... and at most this many bytes ahead (0: events only)
    sizes: deque[int] = field(default_factory=deque)  # of those sent, not yet consumed
    unconsumed: int = 0  # their bytes
    sent: int = 0
    acked: int = 0
    # The subscription wants retained values: they come when the replay ends, those it
    # did not bring (one it replays is history in its place: sent first as well, it came
    # twice). ``last_retained``: per topic, the id of the last retained publish replayed.
    retained: bool = False
    last_retained: dict[str, bytes] = field(default_factory=dict)
    patterns: tuple[str, ...] = ()


@dataclass
class Held:
    """A persistent event waiting for the pass's commit before it is routed."""

    ident: bytes
    record: bytes
    route: Any


@dataclass
class _Pass:
    """What one pass staged; committed or rolled back together."""

    log: list[tuple[bytes, str, int, bytes]] = field(default_factory=list)
    dedupe: list[bytes] = field(default_factory=list)
    acks: dict[bytes, list[str]] = field(default_factory=dict)
    held: list[Held] = field(default_factory=list)
    captured: list[list[Queue]] = field(default_factory=list)
    acked: list[tuple[Queue, int]] = field(default_factory=list)
    retained: dict[str, tuple[bytes, bool]] = field(default_factory=dict)  # empty: a clear
    replicate: list[bytes] = field(default_factory=list)
    answers: list[tuple[bytes, Kind, dict[str, Any]]] = field(default_factory=list)
    notices: list[tuple[bytes, Kind, dict[str, Any]]] = field(default_factory=list)  # if stored
    refused: dict[bytes, list[str]] = field(default_factory=dict)
    undo: list[Callable[[Output, str], None]] = field(default_factory=list)  # if it fails
    unset: bool = False  # it logs entries stamped while the clock was not set
    restamped: int | None = None  # the first entry it restamps (log_restamp)
    retainers: set[bytes] = field(default_factory=set)  # clients whose retained value waits


class Durable:
    """Persistent publish, log, retained, queues and replay for one node."""

    def __init__(self, store: Store, config: DurableConfig, wall_ns: Callable[[], int]) -> None:
        self.store = store
        self.config = config
        self.wall_ns = wall_ns
        self.queues = Queues(store)
        readers = config.spool_readers
        self.log_trie: SubscriptionTrie[bool] = SubscriptionTrie()
        for p in config.log_patterns:
            self.log_trie.add(p, True)
        self.persist_trie: SubscriptionTrie[bool] = SubscriptionTrie()
        for r in readers:  # the uplink carries every export, a bridge persistent ones
            for p in r.patterns:
                (self.persist_trie if r.persistent_only else self.log_trie).add(p, True)
        self.spool = (
            Spool(readers, config.spool_max_bytes, config.spool_overflow == "refuse")
            if readers
            else None
        )
        self._next_spool_check = 0.0
        if self.spool is not None:
            # At start, whole: the node serves nobody and has no links yet, so building in
            # steps bought nothing here, and in refuse mode every step let events in
            # against a partial count (review). Later rebuilds go in steps.
            self.spool.check(store)
            while self.spool.building:
                self.spool.check(store)
        held = store.retained_all()
        self.retained: dict[str, bytes] = {t: r for t, r, _local in held if not _empty(r)}
        # Clears, kept with their time as values are (tombstones): without them a node
        # that was down when a value was cleared brought the old value back to every
        # node when it returned, and kept it (exploratory test).
        self.cleared: dict[str, bytes] = {t: r for t, r, _local in held if _empty(r)}
        self._retained_topics = sorted(self.retained)  # for retained_for's prefix search
        self.retained_local: set[str] = {t for t, _r, local in held if local}
        self.replicas = 0
        self.retained_bytes = sum(len(r) for r in self.retained.values())
        self.retained_refused = 0
        self._staged_retained = 0
        now_ns = wall_ns()
        # Ids of persistent events within the dedupe window, oldest first, with when they
        # came on the monotonic clock (the loop's ``now``): by the wall clock, a step
        # forward (NTP after a boot at 1970) emptied the window, and a resent event was
        # stored and delivered twice (clock faults). Those from the store are placed on it
        # by their age.
        self._now = time.monotonic()
        self.seen: OrderedDict[bytes, float] = OrderedDict(
            # An age below 0 (the clock is behind the log: a reboot at 1970) counts as 0:
            # placed in the future, those ids blocked every later prune (review).
            (raw, self._now - (0.0 if t_ns is None else max(0.0, (now_ns - t_ns) / 1e9)))
            for raw, t_ns in store.dedupe_load(now_ns, int(config.dedupe_window * 1e9))
        )
        self.consumers: dict[tuple[bytes, int], tuple[Queue, Consumer]] = {}
        # The first of the entries stamped while the wall clock was not set (a boot at
        # 1970): restamped once it is, or the first NTP step aged out the whole log (clock
        # faults). At start they are the log's newest; later, each pass's that had any.
        self._unset_from: int | None = store.unset_tail(SET_AFTER_NS)
        if self._unset_from is None and store.unset_queue_rows(SET_AFTER_NS):
            self._unset_from = store.log_head() + 1  # queue rows only (a remote capture)
        self.replays: list[Replay] = []
        self.p = _Pass()
        self.errors = 0
        self.last_error = ""
        self.duplicates = 0
        self.persisted = 0
        self.logged = 0
        self._next_trim = 0.0
        self._work = False  # something for end_pass to do (set by every staging call)

    # ---- staging, during the pass ------------------------------------------------------

    def wants_log(self, topic: str) -> int:
        """LOG_ALL: the log keeps every event on ``topic``; LOG_PERSISTENT: only the
        persistent ones (a bridge's spool); 0: none but local persistent events."""
        if self.log_trie.match(topic):
            return LOG_ALL
        return LOG_PERSISTENT if self.persist_trie.match(topic) else 0

    def persist(
        self, ident: bytes, record: bytes, topic: str, route: Any, *, tell: bool = True
    ) -> bool:
        """A persistent event from a local publisher; False if it is a duplicate (already
        stored: it is acknowledged again but not routed again). ``tell``: errors beyond
        the acknowledgement go to the publisher (not to the node's own actors)."""
        self._work = True
        raw = record[_ID]
        if raw in self.seen:  # first: a resend of a stored event was "spool full" (and
            self.duplicates += 1  # counted against it), for an event that was not lost
            self.p.acks.setdefault(ident, []).append(raw.hex())
            return False
        if self._spool_refuses(topic, record[8], len(record)):
            self.p.refused.setdefault(ident, []).append(raw.hex())
            return False
        self.p.acks.setdefault(ident, []).append(raw.hex())
        self.seen[raw] = self._now  # as of the last pass: close enough, and no clock call
        self.p.dedupe.append(raw)
        if not self.stage(record, topic, route, local=True, admitted=True) and tell:
            # Stored in the log, acknowledged, but not retained: said after the commit
            # (`pub --retain --persistent` said "stored", exit 0: review).
            self.answer_after_commit(ident, Kind.ERR, self.not_retained())
        self.p.held.append(Held(ident, record, route))
        return True

    def not_retained(self) -> dict[str, Any]:
        """The error body for a retained value that found no room."""
        limit = self.config.retained_max_bytes
        if limit % 2**20 == 0:
            size = f"{limit >> 20} MiB"
        else:
            size = f"{limit >> 10} KiB" if limit % 1024 == 0 else f"{limit} bytes"
        why = (
            f"not retained: the node holds {size} of retained values, its limit; the "
            "event went to current subscribers"
        )
        return {"ref": None, "error": why, "code": "store"}

    def stage(
        self, record: bytes, topic: str, route: Any, *, local: bool, admitted: bool = False
    ) -> bool:
        """Log, capture and retain one event as its flags and route say. ``admitted``:
        ``persist`` has already asked the spool (and counted it there). False when a
        retained value found no room (``retained_max_bytes``): its publisher is told."""
        self._work = True
        flags = record[8]
        # The node's clock, not the publisher's: a device without a real-time clock must
        # not have its events aged out of the log (or replayed from 1970) at once.
        t_ns = self.wall_ns()
        if t_ns < SET_AFTER_NS:
            self.p.unset = True
        keep = route.log == LOG_ALL or (flags & F_PERSISTENT and (local or route.log))
        if keep and (admitted or not self._spool_refuses(topic, flags, len(record))):
            self.p.log.append((record[_ID], topic, t_ns, record))
        if flags & F_PERSISTENT and route.queues:
            self.queues.capture(route.queues, record[_ID], record, t_ns)
            self.p.captured.append(route.queues)
        if flags & F_RETAIN and local:
            # Kept and compared by the node's clock too: a client's clock an hour ahead
            # made its clear beat every newer value on the other nodes (review). A clear
            # is kept as a bare tombstone: its payload and headers (up to 64 KiB) went
            # into memory, the store and every node (review: 120 MB for 2,000 clears).
            # Never earlier than what this node holds: its own value was replaced by one
            # stamped earlier (a clock stepped back, a device at 1970 before NTP), which
            # every other node then refused as older, and the nodes disagreed for good
            # (clock faults). Later than the held one, it wins everywhere.
            held = self.p.retained.get(topic)
            held_rec = held[0] if held else self.retained.get(topic) or self.cleared.get(topic)
            if held_rec is not None:
                t_ns = max(t_ns, _time_ns(held_rec) + 1)
            kept = _tombstone(record, t_ns) if _empty(record) else _stamped(record, t_ns)
            if not (_empty(kept) or self._retained_room(topic, kept)):
                return False
            self.p.retained[topic] = (kept, True)
            self.p.replicate.append(kept)  # every other node keeps it too
        return True

    def stage_replica(self, record: bytes, topic: str) -> None:
        """A retained value another node replicated to this one: keep it unless what this
        node holds for the topic is newer (by publish time)."""
        self._work = True
        self.replicas += 1
        record = with_flags(record, remove=F_REPLICA)
        if _empty(record):
            record = _tombstone(record, _time_ns(record))
        staged = self.p.retained.get(topic)
        current = (
            staged[0] if staged is not None else self.retained.get(topic) or self.cleared.get(topic)
        )
        if current is not None and _order(current) > _order(record):
            return  # what is here is newer: a value, or a clear (ties: by event id)
        if _empty(record) or self._retained_room(topic, record):
            self.p.retained[topic] = (record, False)

    def local_retained(self) -> list[bytes]:
        """The retained values published on this node, for a node that joins the mesh,
        and the clears published here (the other node may still hold what they cleared)."""
        local = self.retained_local
        values = [self.retained[t] for t in self._retained_topics if t in local]
        return values + [r for t, r in self.cleared.items() if t in local]

    def _forget_clears(self) -> None:
        """The oldest tenth of the clears kept, forgotten (a client inventing topics must
        not grow them without bound); a value they cleared may then come back from a
        node that was away for that long."""
        oldest = sorted(self.cleared, key=lambda t: _time_ns(self.cleared[t]))
        for topic in oldest[: len(oldest) // 10 + 1]:
            del self.cleared[topic]
            self.retained_local.discard(topic)
            self.store.retain(topic, None, False)
        try:
            self.store.commit()
        except StoreError:
            self.store.rollback()  # kept on disk: forgotten at the next start instead

    def _retained_room(self, topic: str, record: bytes) -> bool:
        """Retained values live in memory too: bounded in bytes (a client inventing topics
        must not exhaust the node); what does not fit is routed but not kept, and counted."""
        old = self.retained.get(topic)
        staged = self.p.retained.get(topic)
        grow = len(record) - len((staged[0] if staged is not None else old) or b"")
        if self.retained_bytes + self._staged_retained + grow > self.config.retained_max_bytes:
            self.retained_refused += 1
            return False
        self._staged_retained += grow
        return True

    def _spool_refuses(self, topic: str, flags: int, size: int) -> bool:
        """With overflow = refuse and the spool full, events for a reader that is behind
        are refused."""
        return self.spool is not None and self.spool.refuses(topic, flags, size)

    def ack(self, ident: bytes, sid: int, ids: list[bytes]) -> str | None:
        """A consumer acknowledged deliveries; an error text if ``sid`` is no consumer."""
        self._work = True
        bound = self.consumers.get((ident, sid))
        if bound is None:
            return f"subscription {sid} is not bound to a queue"
        q, consumer = bound
        try:
            done = self.queues.ack(q, consumer, ids)
        except StoreError as e:
            self.errors += 1
            self.last_error = str(e)
            return None  # not deleted: Queues.ack put them back to be delivered again
        self.p.acked.extend((q, s) for s in done)
        return None

    def answer_after_commit(self, ident: bytes, kind: Kind, body: dict[str, Any]) -> None:
        """Answer an administrative request once its change is on disk."""
        self._work = True
        self.p.answers.append((ident, kind, body))

    def notify_after_commit(self, ident: bytes, kind: Kind, body: dict[str, Any]) -> None:
        """Tell ``ident`` of a change once it is on disk, and nothing if the pass fails (a
        removed queue's consumers: its failed removal is undone, and they heard a bare
        store error about a subscription that was fine: review)."""
        self._work = True
        self.p.notices.append((ident, kind, body))

    def retained_by(self, ident: bytes) -> None:
        """Client ``ident`` published a retained value in this pass: it hears if the
        commit fails, and its flush waits for the commit (`pub --retain` on a full disk
        said "published", exit 0, and the old value stayed)."""
        self.p.retainers.add(ident)

    def waits_on(self, ident: bytes) -> bool:
        """True when a flush by ``ident`` must wait for this pass's commit."""
        return ident in self.p.retainers

    def on_rollback(self, undo: Callable[[Output, str], None]) -> None:
        """Run ``undo`` if this pass's commit fails: an administrative change made in memory
        must not outlive its rolled-back rows (a queue made while the disk was full took
        persistent events, acknowledged, and was gone with them after a restart)."""
        self.p.undo.append(undo)

    def drop_consumers(self, q: Queue) -> list[tuple[bytes, int]]:
        """A removed queue's consumers get nothing more: the (client, sid) of each, to
        be told (their subscriptions stay, idle)."""
        gone = [k for k, (bq, _c) in self.consumers.items() if bq is q]
        for key in gone:
            del self.consumers[key]
        return gone

    # ---- the commit ----------------------------------------------------------------------

    def end_pass(self, now: float, out: Output) -> None:
        """Write what the pass staged, commit, then release acks, routes and deliveries."""
        self._now = now
        if not (self._work or self.replays or self.store.pending):
            if self.spool is not None:
                self.spool.committed()  # none of its deletes is pending: nothing was written
            return  # an idle pass costs nothing here (request-reply runs many of them)
        self._work = False
        p, self.p = self.p, _Pass()
        taken: list[tuple[Queue, list[tuple[Consumer, bytes, int]]]] = []
        try:
            last = self.store.log_append(p.log)
            for topic, (rec, local) in p.retained.items():
                self.store.retain(topic, rec, local)
            staged = Counter(q.name for queues in p.captured for q in queues)
            for q in list(self.queues.busy):  # take() may wake a dead-letter queue
                waiting = q.depth + staged[q.name] - len(q.inflight)
                if q.redeliver or waiting > 0:
                    got = self.queues.take(q, now)
                    if got:
                        taken.append((q, got))
            self.store.commit()
        except StoreError as e:
            self.store.rollback()
            self._failed(p, taken, str(e), out)
            return
        self.persisted += len(p.dedupe)
        self.logged += len(p.log)
        if p.unset:  # the whole pass's entries: a bound, and cheap (none: its queue rows)
            first = last - len(p.log) + 1 if p.log else self.store.log_head() + 1
            self._unset_from = first if self._unset_from is None else min(self._unset_from, first)
        if self.spool is not None:
            self.spool.committed()
            self.spool.appended(last - len(p.log) + 1, p.log)
        for queues in p.captured:
            self.queues.committed_capture(queues)
        self.queues.committed_dead()
        busy = self.queues.busy
        for q in [q for q in busy if self.queues.idle(q)]:
            del busy[q]
        self._staged_retained = 0
        for topic, (rec, local) in p.retained.items():
            old = self.retained.pop(topic, None)
            self.retained_bytes -= len(old or b"")
            self.retained_local.discard(topic)
            cleared = _empty(rec)
            if old is not None and cleared:
                del self._retained_topics[bisect_left(self._retained_topics, topic)]
            elif old is None and not cleared:
                insort(self._retained_topics, topic)
            if cleared:
                self.cleared[topic] = rec
            else:
                self.cleared.pop(topic, None)
                self.retained[topic] = rec
                self.retained_bytes += len(rec)
            if local:
                self.retained_local.add(topic)
        if len(self.cleared) > MAX_CLEARS:
            self._forget_clears()
        for rec in p.replicate:
            out.replicate(rec)
        for ident, kind, body in p.answers + p.notices:
            out.answer(ident, kind, body)
        for held in p.held:
            out.route(held.ident, held.record, held.route)
        for ident, ids in p.acks.items():
            out.persisted(ident, ids)
        for ident, ids in p.refused.items():
            out.refused(ident, ids, SPOOL_FULL)
        for _q, got in taken:
            for consumer, rec, _seq in got:
                out.deliver(consumer.ident, consumer.prefix, rec)
        if self.replays:
            self._pump_replays(out)

    def _failed(
        self,
        p: _Pass,
        taken: list[tuple[Queue, list[tuple[Consumer, bytes, int]]]],
        error: str,
        out: Output,
    ) -> None:
        """Nothing of the pass was stored: say so to every publisher waiting on it."""
        self.errors += 1
        if p.restamped is not None:  # rolled back: the next trim would age them out (review)
            first = p.restamped
            self._unset_from = first if self._unset_from is None else min(self._unset_from, first)
        self._staged_retained = 0
        self.last_error = error
        if self.spool is not None:
            self.spool.failed()
        for raw in p.dedupe:
            self.seen.pop(raw, None)
        for q, got in taken:
            self.queues.undo_take(q, got)
        for queues in p.captured:
            self.queues.uncaptured(queues)
        self.queues.undo_dead()
        for q, seq in p.acked:  # the acks were not stored: the messages are owed again
            q.depth += 1
            heapq.heappush(q.redeliver, seq)
            self.queues.wake(q)
            self._work = True  # the next pass hands them out, traffic or not
        for ident, ids in p.acks.items():
            out.refused(ident, ids, error)
        for ident, ids in p.refused.items():
            out.refused(ident, ids, SPOOL_FULL)
        for ident in p.retainers:
            why = f"not retained: {error}; the event went to current subscribers"
            out.answer(ident, Kind.ERR, {"ref": None, "error": why, "code": "store"})
        for ident, _kind, body in p.answers:
            out.answer(ident, Kind.ERR, {"ref": body.get("ref"), "error": error, "code": "store"})
        # Last: the restores above may wake a queue the pass made, which the undo forgets.
        for undo in reversed(p.undo):
            undo(out, error)

    # ---- timers ------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Ack-wait expiry, dedupe window and log bounds; cheap when nothing is due."""
        now_ns = self.wall_ns()
        if self.queues.busy:
            self._work = True  # messages may wait for room, or a failed pass left them owed
        try:
            for q in list(self.queues.by_name.values()):
                if q.inflight:
                    before = len(q.inflight)
                    self.queues.expire(q, now, now_ns)
                    if len(q.inflight) != before:
                        self._work = True  # redeliveries or dead letters to send
            if self.spool is not None and now >= self._next_spool_check:
                self.spool.check(self.store)
                # A build goes on at the next tick: in steps, with passes between them.
                self._next_spool_check = now + (0.0 if self.spool.building else SPOOL_CHECK)
            if self._unset_from is not None and now_ns >= SET_AFTER_NS:  # set since
                first, self._unset_from = self._unset_from, None
                self._work = True  # the next pass commits it; if that fails, again later
                self.p.restamped = first
                self.store.log_restamp(first, SET_AFTER_NS, now_ns)
            if now >= self._next_trim:
                self._next_trim = now + TRIM_EVERY
                self._prune_seen(now - self.config.dedupe_window)
                bounds = self.config.log_max_bytes, int(self.config.log_max_age * 1e9), now_ns
                if self.spool is None:
                    self.store.log_trim(*bounds)
                else:
                    self.spool.trim_log(self.store, *bounds)
        except StoreError as e:
            # A failed write rolled the pass back: its commit fails, and _failed tells the
            # spool. A failed read did not: the spool's deletes still commit (review).
            self.errors += 1
            self.last_error = str(e)

    def _prune_seen(self, cutoff: float) -> None:
        """Forget ids older than the window (the log keeps them for a restart), and never
        hold more than a bound however fast events come."""
        seen = self.seen
        while seen and (len(seen) > MAX_SEEN or next(iter(seen.values())) < cutoff):
            seen.popitem(last=False)

    # ---- subscriptions -------------------------------------------------------------------

    def bind_consumer(
        self, ident: bytes, sid: int, prefix: bytes, name: str, max_inflight: int | None
    ) -> Queue:
        """Attach a client subscription to a queue; KeyError if there is no such queue."""
        self._work = True
        q = self.queues.by_name.get(name)
        if q is None:
            raise KeyError(
                f"no queue named {name!r} on this node (a queue lives on the node where it "
                "was added: connect there, or add it with `meshctl queue add`)"
            )
        c = Consumer(ident, sid, prefix, max_inflight or DEFAULT_MAX_INFLIGHT)
        self.queues.bind(q, c)
        self.consumers[(ident, sid)] = (q, c)
        return q

    def unbind(self, ident: bytes, sid: int) -> bool:
        self._work = True
        bound = self.consumers.pop((ident, sid), None)
        if bound is not None:
            try:
                self.queues.unbind(*bound, self.wall_ns())
            except StoreError as e:  # a dead-letter move failed: counted; retried never
                self.errors += 1
                self.last_error = str(e)
        self.replays = [r for r in self.replays if (r.ident, r.sid) != (ident, sid)]
        return bound is not None

    def client_gone(self, ident: bytes) -> None:
        for key in [k for k in self.consumers if k[0] == ident]:
            self.unbind(*key)
        self.replays = [r for r in self.replays if r.ident != ident]

    def retained_for(self, patterns: tuple[str, ...]) -> list[bytes]:
        """Retained records matching any of ``patterns``, in topic order.

        Only the topics under each pattern's literal prefix are looked at, found by
        bisection: sorting and matching every retained topic took 78 ms at 100,000 values,
        paid by each MQTT device's SUBSCRIBE to its own topic."""
        return [self.retained[t] for t in self._retained_matching(patterns)]

    def _retained_matching(self, patterns: tuple[str, ...]) -> list[str]:
        """The retained topics matching any of ``patterns``, sorted."""
        found: set[str] = set()
        keys = self._retained_topics
        for p in patterns:
            prefix = literal_prefix(p)
            if prefix is None:
                if p in self.retained:
                    found.add(p)
                continue
            i = bisect_left(keys, prefix)
            while i < len(keys) and keys[i].startswith(prefix):
                if matches(p, keys[i]):
                    found.add(keys[i])
                i += 1
        return sorted(found)

    def start_replay(
        self,
        ident: bytes,
        sid: int,
        prefix: bytes,
        patterns: tuple[str, ...],
        *,
        since_s: float | None,
        from_seq: int | None,
        on_live: Callable[[], None],
        paced: bool = False,
        paced_bytes: bool = False,
        retained: bool = False,
    ) -> int:
        """Begin replaying the log to a subscription; returns the first sequence it gets.
        ``retained``: the subscription also wants the retained values; each comes once,
        in the replay if it holds it, else when the replay ends."""
        self._work = True
        if from_seq is not None:
            cursor = max(0, from_seq - 1)
            # What retention trimmed is not there: the answer says where it starts (it
            # said the sequence asked for, and the replay began later: exploratory test)
            cursor = max(cursor, self.store.log_stats()[2] - 1)
        else:
            cursor = self.store.log_seq_at(self.wall_ns() - int((since_s or 0) * 1e9))
        trie: SubscriptionTrie[int] = SubscriptionTrie()
        for p in patterns:
            trie.add(p, 0)
        replay = Replay(
            ident, sid, prefix, cursor, trie, on_live, paced, retained=retained, patterns=patterns
        )
        if paced and paced_bytes:
            replay.window_bytes = REPLAY_WINDOW_BYTES
        self.replays.append(replay)
        return cursor + 1

    def _pump_replays(self, out: Output) -> None:
        """Send the next stretch of the log to each replaying subscription; one that has
        caught up goes live now, in the same pass, so there is no gap and no duplicate at
        the seam (every earlier event is in the log, every later one is routed live)."""
        still = []
        for r in self.replays:
            limit, budget = REPLAY_BATCH, REPLAY_BATCH_BYTES
            if r.paced:
                limit = min(limit, REPLAY_WINDOW - (r.sent - r.acked))
                if r.window_bytes:
                    budget = min(budget, r.window_bytes - r.unconsumed)
                if limit <= 0 or budget <= 0:
                    still.append(r)  # the client is behind: wait for its report
                    continue
            rows, cut = self.store.log_span(r.cursor, limit, budget)
            for seq, topic, rec in rows:
                if r.trie.match(topic):
                    record = bytes(rec)
                    if record[8] & F_RETAIN:  # history, not the topic's value now
                        if r.retained:
                            r.last_retained[topic] = record[_ID]
                        record = with_flags(record, remove=F_RETAIN)
                    out.deliver(r.ident, r.prefix, with_seq(record, seq))
                    r.sent += 1
                    if r.window_bytes:
                        r.sizes.append(len(record))
                        r.unconsumed += len(record)
                r.cursor = seq
            if len(rows) < limit and not cut:
                if r.retained:  # the values as they are now, less those just replayed
                    for topic in self._retained_matching(r.patterns):
                        record = self.retained[topic]
                        if r.last_retained.get(topic) != record[_ID]:
                            out.deliver(r.ident, r.prefix, record)
                r.on_live()
            else:
                still.append(r)
        self.replays = still

    def replay_consumed(self, ident: bytes, sid: int, count: int) -> None:
        """A paced client has consumed ``count`` replayed events of ``sid`` so far."""
        self._work = True
        for r in self.replays:
            if r.ident == ident and r.sid == sid:
                for _ in range(min(count - r.acked, len(r.sizes))):
                    r.unconsumed -= r.sizes.popleft()
                r.acked = max(r.acked, count)

    def busy(self) -> bool:
        """True while a replay could send more now: the loop should not sleep."""
        return any(self._may_send(r) for r in self.replays)

    @staticmethod
    def _may_send(r: Replay) -> bool:
        if not r.paced:
            return True
        if r.window_bytes and r.unconsumed >= r.window_bytes:
            return False
        return r.sent - r.acked < REPLAY_WINDOW

    # ---- views -------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        n, size, first, _t = self.store.log_stats()
        return {
            "path": str(self.store.path),
            "sync": self.store.sync,
            "commits": self.store.commits,
            "persisted": self.persisted,
            "duplicates": self.duplicates,
            "errors": self.errors,
            "last_error": self.last_error,
            # The head, not first + n - 1: the log has holes where it was trimmed around
            # the spool (exploratory test).
            "log": {
                "entries": n,
                "bytes": size,
                "first_seq": first,
                "head_seq": self.store.log_head(),
            },
            "retained": len(self.retained),
            "retained_clears": len(self.cleared),  # kept so that old values stay cleared
            "retained_replicas_in": self.replicas,
            "retained_bytes": self.retained_bytes,
            "retained_refused": self.retained_refused,
            "queues": len(self.queues.by_name),
            "spool": None if self.spool is None else self.spool.status(),
        }

    def close(self) -> None:
        self.store.close()


def replay_options(
    body: dict[str, Any], group: object, durable: Durable | None
) -> dict[str, Any] | None:
    """``since_s``/``from_seq`` of a SUB request, or None for a live-only subscription;
    ValueError says what is wrong."""
    since, from_seq = body.get("since_s"), body.get("from_seq")
    if since is None and from_seq is None:
        return None
    if durable is None:
        raise ValueError("this node keeps no log (persistence is off): nothing to replay")
    if group is not None:
        raise ValueError("a queue group cannot replay the log")
    if since is not None and from_seq is not None:
        raise ValueError("give either since or from-seq, not both")
    if since is not None and (
        isinstance(since, bool)
        or not isinstance(since, (int, float))
        or not 0 <= since <= MAX_SINCE  # NaN fails this too
    ):
        raise ValueError(
            f"since must be a number of seconds from 0 to {MAX_SINCE:.0f}, not {since!r}"
        )
    if from_seq is not None and (
        isinstance(from_seq, bool) or not isinstance(from_seq, int) or not 1 <= from_seq < 2**62
    ):
        raise ValueError(f"from-seq must be a positive integer, not {from_seq!r}")
    paced = body.get("paced") is True
    paced_bytes = paced and body.get("paced_bytes") is True
    return {"since_s": since, "from_seq": from_seq, "paced": paced, "paced_bytes": paced_bytes}


class Output(Protocol):
    """What the Durable core hands back to the Router after a commit."""

    def route(self, ident: bytes, record: bytes, route: Any) -> None: ...

    def persisted(self, ident: bytes, ids: list[str]) -> None: ...

    def refused(self, ident: bytes, ids: list[str], error: str) -> None: ...

    def deliver(self, ident: bytes, prefix: bytes, record: bytes) -> None: ...

    def answer(self, ident: bytes, kind: Kind, body: dict[str, Any]) -> None: ...

    def replicate(self, record: bytes) -> None: ...


def _empty(record: bytes) -> bool:
    """A retained record with no payload: a clear."""
    return int.from_bytes(record[0:4], "little") == 0


def _time_ns(record: bytes) -> int:
    return int.from_bytes(record[RECORD_SIZE - 24 : RECORD_SIZE - 16], "little")


def _order(record: bytes) -> tuple[int, bytes]:
    """Which of two retained records for a topic is the later: by time, then by event id,
    so that every node picks the same one of two published in the same nanosecond."""
    return _time_ns(record), record[_ID]


def _stamped(record: bytes, t_ns: int) -> bytes:
    """``record`` with its time set to ``t_ns`` (the node's clock)."""
    return record[: RECORD_SIZE - 24] + t_ns.to_bytes(8, "little") + record[RECORD_SIZE - 16 :]


def _tombstone(record: bytes, t_ns: int) -> bytes:
    """A clear as it is kept: its topic, id and time, without payload or headers."""
    tlen = int.from_bytes(record[4:6], "little")
    topic = record[RECORD_SIZE : RECORD_SIZE + tlen]
    return encode_record(topic, b"", b"", record[8], t_ns, record[_ID])


def with_seq(record: bytes, seq: int) -> bytes:
    """A replayed record carries its log sequence in a ``log-seq`` header, so a consumer
    can resume with ``--from-seq`` (unless its own headers block is malformed, or so large
    that the header would not fit: the node passes headers through unread, so such an event
    is replayed as it was published). Such an event raised out of the replays' pump: every
    replay on the node stopped there, and the pump failed again each pass (exploratory)."""
    try:
        return with_headers(record, {"log-seq": str(seq)})
    except CodecError:
        return record
    except ValueError:  # no room (logged before publishers were kept to less): not the
        return with_headers(record, {}, drop=("log-seq",))  # publisher's own taken for it
