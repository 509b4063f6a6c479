"""Durable queues: messages on disk, consumers and in-flight deliveries in memory.

A queue captures matching persistent events (from this node's clients or forwarded by the
mesh) whether or not a consumer is connected. Consumers share it; each message goes to
one of them and stays on disk until acknowledged. A delivery not acknowledged within the
queue's ack wait, or held by a consumer that went away, is delivered again; after
``max_deliver`` attempts the message moves to the dead-letter queue ``NAME.dead`` with
its delivery count in its headers.

Delivery counts are written in the same commit that precedes sending, so after a crash
every message that may have reached a consumer comes back marked as a redelivery.
"""

from __future__ import annotations

import heapq
import json
import re
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from node.codec import with_headers
from node.errors import CodecError
from node.store import Store, StoreError
from node.topics import SubscriptionTrie, validate_pattern

DEAD_SUFFIX: Final = ".dead"
DEFAULT_ACK_WAIT: Final = 30.0
DEFAULT_MAX_DELIVER: Final = 5
DEFAULT_MAX_INFLIGHT: Final = 256
MAX_QUEUES: Final = 10_000  # per node (plus at most one dead-letter queue each)
MAX_NAME: Final = 64
_NAME: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}")
_COUNT: Final = struct.Struct("<H")
_COUNT_AT: Final = 10  # the record header's reserved u16 carries the delivery count


@dataclass(eq=False)
class Consumer:
    """One client subscription bound to a queue."""

    ident: bytes
    sid: int
    prefix: bytes
    max_inflight: int
    inflight: dict[bytes, int] = field(default_factory=dict)  # event id -> seq


@dataclass
class Inflight:
    consumer: Consumer
    deadline: float
    deliveries: int
    raw: bytes  # the event id: the key of this delivery in ``consumer.inflight``

    def release(self, seq: int) -> None:
        """Forget the delivery on its consumer's side: one dict operation, where searching
        the consumer's deliveries for ``seq`` made a tick that expired many of them
        quadratic (16,384 in flight, all expiring at once: 7.5 s of the node's thread)."""
        if self.consumer.inflight.get(self.raw) == seq:
            del self.consumer.inflight[self.raw]


@dataclass(eq=False)  # identity: the trie holds queues in sets
class Queue:
    """One durable queue's configuration and in-memory state (its messages are on disk)."""

    name: str
    patterns: tuple[str, ...]
    ack_wait: float
    max_deliver: int
    created: float
    depth: int = 0
    staged: int = 0  # captured in this pass, counted in depth once committed
    next_seq: int = 1
    cursor: int = 0  # every seq above this has not been handed out since start
    redeliver: list[int] = field(default_factory=list)  # heap of seqs to hand out again
    # seq -> the consumer whose ack wait it outlived: its redelivery goes to another one
    # with room, if there is one (it went back to the stalled holder round after round,
    # and to the dead letters, while another consumer sat idle: exploratory test)
    expired_on: dict[int, Consumer] = field(default_factory=dict)
    inflight: dict[int, Inflight] = field(default_factory=dict)
    consumers: list[Consumer] = field(default_factory=list)
    turn: int = 0
    redeliveries: int = 0
    dead_lettered: int = 0

    @property
    def is_dead_letter(self) -> bool:
        return self.name.endswith(DEAD_SUFFIX)


class ReadRules(Protocol):
    """A client's subscribe rules (node/membership.py's Acl)."""

    def check_subscribe(self, pattern: str) -> str | None: ...


def read_refused(acl: ReadRules, patterns: Iterable[str] | None) -> str | None:
    """Why a client with ``acl`` may not read events of ``patterns`` (a queue's, from
    ``Queues.readable_as``), or None if it may."""
    if patterns is None:
        return "its queue is gone: only a client without rules may read its dead letters"
    for p in patterns:
        if (why := acl.check_subscribe(p)) is not None:
            return why
    return None


def validate_queue_name(name: object) -> str:
    """A queue name; ValueError naming the rule otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(
            f"queue name {name!r} must be 1-64 characters of letters, digits, '_', '-', '.'"
        )
    return name


def with_count(record: bytes, deliveries: int) -> bytes:
    """The record as a consumer sees it: the delivery count in the reserved header field."""
    return record[:_COUNT_AT] + _COUNT.pack(min(deliveries, 0xFFFF)) + record[_COUNT_AT + 2 :]


def dead_record(record: bytes, queue: str, deliveries: int) -> bytes:
    """The record as it enters the dead-letter queue: where it died and after how many
    deliveries, in its headers."""
    try:
        return with_headers(
            with_count(record, 0), {"dead-queue": queue, "dead-deliveries": str(deliveries)}
        )
    except (CodecError, ValueError):  # its headers are malformed (passed through unread),
        return with_count(record, 0)  # or too large to take these: as it was


@dataclass(slots=True)
class _DeadLetter:
    """A message moved to its dead letters in the pass's transaction."""

    q: Queue
    seq: int
    dlq: Queue
    lower: bool = True  # lower q's depth at the commit (not if a purge already set it)


class Queues:
    """Every durable queue of a node; the Durable core drives it once per pass."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.by_name: dict[str, Queue] = {}
        # Queues with a consumer and messages that may wait for it, the only ones a pass
        # offers messages: walking every queue took 1.5 ms a pass at 10,000 (a cloud node
        # holds one per edge node it uplinks). A superset: the pass drops the idle ones.
        self.busy: dict[Queue, None] = {}
        self.trie: SubscriptionTrie[Queue] = SubscriptionTrie()
        # Dead letters moved in this pass's transaction: counted once the pass commits,
        # owed again if it fails.
        self.dead_pending: list[_DeadLetter] = []
        self._load()

    def _load(self) -> None:
        for name, patterns, ack_wait, max_deliver, created in self.store.read(
            "SELECT name, patterns, ack_wait, max_deliver, created FROM queues"
        ):
            q = Queue(name, tuple(json.loads(patterns)), ack_wait, max_deliver, created)
            depth, top = self.store.read(
                "SELECT count(*), max(seq) FROM qmsgs WHERE queue = ?", (name,)
            )[0]
            q.depth, q.next_seq = int(depth), int(top or 0) + 1
            self._attach(q)

    def _attach(self, q: Queue) -> None:
        self.by_name[q.name] = q
        for p in q.patterns:
            self.trie.add(p, q)

    # ---- administration ----------------------------------------------------------------

    def add(
        self,
        name: str,
        patterns: list[str],
        *,
        ack_wait: float,
        max_deliver: int,
        now_wall: float,
        dead_letters_of: Queue | None = None,
    ) -> Queue:
        """Create a queue (or update its patterns and settings); ValueError on bad input."""
        validate_queue_name(name if dead_letters_of is None else dead_letters_of.name)
        if name.endswith(DEAD_SUFFIX) and patterns:
            raise ValueError(f"{name!r} is a dead-letter queue name; it takes no patterns")
        if (
            dead_letters_of is None
            and name not in self.by_name  # an older store's queue may still be updated
            and len(name + DEAD_SUFFIX) > MAX_NAME
        ):
            # Found in review: its dead letters' queue name was refused when the first
            # message died, an internal error each time, and the message stayed stuck.
            raise ValueError(
                f"queue name {name!r} is {len(name)} characters: at most "
                f"{MAX_NAME - len(DEAD_SUFFIX)}, so that its dead letters' '{name}{DEAD_SUFFIX}' "
                f"fits in {MAX_NAME}"
            )
        for p in patterns:
            validate_pattern(p)
        if not ack_wait > 0:
            raise ValueError("ack wait must be positive")
        if max_deliver < 1:
            raise ValueError("max deliver must be at least 1")
        old = self.by_name.get(name)
        if old is None and dead_letters_of is None and len(self.by_name) >= MAX_QUEUES:
            raise ValueError(f"this node has reached its limit of {MAX_QUEUES} queues")
        created = old.created if old is not None else now_wall
        # Written first: a write that fails leaves the queue as it was (its patterns were
        # already out of the trie, and the queue routed nothing, until a restart).
        self.store.guard(
            "INSERT OR REPLACE INTO queues VALUES (?, ?, ?, ?, ?)",
            (name, json.dumps(list(patterns)), ack_wait, max_deliver, created),
        )
        if old is not None:
            self.configure(old, tuple(patterns), ack_wait, max_deliver)
            return old
        q = Queue(name, tuple(patterns), ack_wait, max_deliver, created)
        self._attach(q)
        return q

    def configure(
        self, q: Queue, patterns: tuple[str, ...], ack_wait: float, max_deliver: int
    ) -> None:
        """Set a queue's patterns and settings in memory (``add``, or its undo)."""
        for p in q.patterns:
            self.trie.remove(p, q)
        q.patterns, q.ack_wait, q.max_deliver = patterns, ack_wait, max_deliver
        for p in patterns:
            self.trie.add(p, q)

    def restore(self, q: Queue) -> None:
        """Put a removed queue back in memory only: the undo of removing it."""
        self._attach(q)

    def forget(self, q: Queue) -> None:
        """Drop a queue from memory only: the undo of creating it in a pass that failed."""
        for p in q.patterns:
            self.trie.remove(p, q)
        self.by_name.pop(q.name, None)
        self.busy.pop(q, None)

    def remove(self, name: str) -> Queue:
        q = self.get(name)
        self.store.guard("DELETE FROM qmsgs WHERE queue = ?", (name,))
        self.store.guard("DELETE FROM queues WHERE name = ?", (name,))
        for p in q.patterns:
            self.trie.remove(p, q)
        del self.by_name[name]
        self.busy.pop(q, None)
        return q

    def purge(self, name: str) -> int:
        q = self.get(name)
        moving = [d for d in self.dead_pending if d.q is q and d.lower]
        gone = q.depth - len(moving)  # those are on their way to the dead letters
        for d in moving:
            d.lower = False  # the depth is set to 0 here: the commit must not lower it again
        self.store.guard("DELETE FROM qmsgs WHERE queue = ?", (name,))
        q.depth, q.staged, q.cursor, q.redeliver = 0, 0, q.next_seq - 1, []
        q.inflight.clear()
        for c in q.consumers:
            c.inflight.clear()
        return gone

    def readable_as(self, q: Queue) -> tuple[str, ...] | None:
        """The patterns whose events ``q`` holds, to check a restricted client's read
        rights against: a dead-letter queue holds its queue's (it has none of its own, and
        any client could read the dead letters of a queue it was denied: exploratory test);
        None when that queue is gone, and no pattern can vouch for what is left."""
        if not q.is_dead_letter:
            return q.patterns
        origin = self.by_name.get(q.name.removesuffix(DEAD_SUFFIX))
        if origin is None or origin.created > q.created:
            # A queue made again under that name after its letters died vouches for
            # nothing they hold: a client removed one, made it again on topics it may
            # read, and read the old dead letters (review).
            return None
        return origin.patterns

    def get(self, name: str) -> Queue:
        q = self.by_name.get(name)
        if q is None:
            raise KeyError(f"no queue named {name!r}")
        return q

    def dead_letter_queue(self, q: Queue, now_wall: float) -> Queue:
        name = q.name + DEAD_SUFFIX
        dlq = self.by_name.get(name)
        if dlq is not None:
            # Its row again, in this pass: one created in a pass that failed was rolled
            # back, and its messages would have had no queue after a restart (review).
            self.store.guard(
                "INSERT OR IGNORE INTO queues VALUES (?, ?, ?, ?, ?)",
                (name, "[]", dlq.ack_wait, dlq.max_deliver, dlq.created),
            )
        else:
            # Not counted against the limit: at most one per queue, and it must not fail.
            dlq = self.add(
                name,
                [],
                ack_wait=q.ack_wait,
                max_deliver=1 << 30,
                now_wall=now_wall,
                dead_letters_of=q,
            )
        return dlq

    def info(self, q: Queue, now_ns: int) -> dict[str, Any]:
        oldest = self.store.read(
            "SELECT min(at_ns), coalesce(sum(length(record)), 0) FROM qmsgs WHERE queue = ?",
            (q.name,),
        )[0]
        return {
            "name": q.name,
            "patterns": list(q.patterns),
            "depth": q.depth,
            "bytes": int(oldest[1]),
            # Never below 0: after the clock stepped back it read -3599.7 (clock faults).
            "oldest_age_s": max(0.0, round((now_ns - oldest[0]) / 1e9, 3)) if oldest[0] else None,
            "consumers": len(q.consumers),
            "inflight": len(q.inflight),
            "redeliveries": q.redeliveries,
            "dead_lettered": q.dead_lettered,
            "ack_wait_s": q.ack_wait,
            "max_deliver": q.max_deliver,
        }

    # ---- the data path -----------------------------------------------------------------

    def capture(self, queues: list[Queue], event_id: bytes, record: bytes, at_ns: int) -> None:
        """Store one persistent event in each of ``queues`` (inside the pass's transaction)."""
        rows = []
        for q in queues:
            rows.append((q.name, q.next_seq, event_id, at_ns, record))
            q.next_seq += 1
        self.store.guard_many(
            "INSERT INTO qmsgs (queue, seq, id, at_ns, record) VALUES (?, ?, ?, ?, ?)", rows
        )
        for q in queues:  # only once stored: a refused insert stages nothing
            q.staged += 1
            self.wake(q)

    def committed_capture(self, queues: list[Queue]) -> None:
        for q in queues:
            if q.staged:  # not if a purge in the same pass took it with the rest
                q.staged -= 1
                q.depth += 1

    def uncaptured(self, queues: list[Queue]) -> None:
        """The pass failed: what it captured is not stored."""
        for q in queues:
            q.staged = 0

    def bind(self, q: Queue, consumer: Consumer) -> None:
        q.consumers.append(consumer)
        self.wake(q)

    def wake(self, q: Queue) -> None:
        """``q`` may have messages for its consumers: the next pass looks."""
        if q.consumers:
            self.busy[q] = None

    def idle(self, q: Queue) -> bool:
        """Nothing of ``q`` waits to be handed out (the pass stops looking at it)."""
        return not q.redeliver and q.depth <= len(q.inflight)

    def unbind(self, q: Queue, consumer: Consumer, now_ns: int) -> None:
        """A consumer left: what it held is delivered again, to someone else (or, if that
        was its last attempt, moves to the dead letters)."""
        if consumer in q.consumers:
            q.consumers.remove(consumer)
        if not q.consumers:
            self.busy.pop(q, None)
        try:
            for seq in consumer.inflight.values():
                f = q.inflight.pop(seq, None)
                if f is None:
                    continue
                if f.deliveries >= q.max_deliver:
                    self._dead_letter(q, seq, f.deliveries, now_ns)
                else:
                    heapq.heappush(q.redeliver, seq)
        finally:  # a dead letter the store refused must not leave the rest unoffered
            consumer.inflight.clear()
            self.wake(q)

    def ack(self, q: Queue, consumer: Consumer, ids: list[bytes]) -> list[int]:
        """Remove acknowledged messages; returns their seqs.

        An id this consumer does not hold (delivered to it before a node restart, or
        since handed to another consumer) is still removed if it is in the queue: the
        consumer has processed that event, and delivering it again would only make a
        duplicate.
        """
        done: list[int] = []
        stray: list[bytes] = []
        released: list[int] = []  # deliveries forgotten here: owed again if the store fails
        for raw in ids:
            seq = consumer.inflight.pop(raw, None)
            if seq is not None and q.inflight.pop(seq, None) is not None:
                done.append(seq)
                released.append(seq)
            else:
                stray.append(raw)
        found: list[int] = []
        try:
            if done:
                self.store.guard_many(
                    "DELETE FROM qmsgs WHERE queue = ? AND seq = ?", ((q.name, s) for s in done)
                )
            for i in range(0, len(stray), 500):
                chunk = stray[i : i + 500]
                marks = ",".join("?" * len(chunk))
                rows = self.store.guard(
                    f"DELETE FROM qmsgs WHERE queue = ? AND id IN ({marks}) RETURNING seq",  # noqa: S608 - only placeholders
                    (q.name, *chunk),
                ).fetchall()
                for (seq,) in rows:
                    found.append(seq)
                    f = q.inflight.pop(seq, None)
                    if f is not None:
                        f.release(seq)
                        released.append(seq)
        except StoreError:
            # The pass is rolled back with these deletes: what was in flight is owed again
            # (it had left the in-flight set, so no ack wait would ever bring it back).
            for seq in released:
                heapq.heappush(q.redeliver, seq)
            self.wake(q)
            raise
        q.depth -= len(done) + len(found)
        return done + found

    def expire(self, q: Queue, now: float, now_ns: int) -> None:
        """Deliveries past their ack wait go back to the queue, or to its dead letters."""
        late = [(seq, f) for seq, f in q.inflight.items() if f.deadline <= now]
        for seq, f in late:
            del q.inflight[seq]
            f.release(seq)
            if f.deliveries >= q.max_deliver:
                self._dead_letter(q, seq, f.deliveries, now_ns)
            else:
                heapq.heappush(q.redeliver, seq)
                q.expired_on[seq] = f.consumer
                self.wake(q)

    def _dead_letter(self, q: Queue, seq: int, deliveries: int, now_ns: int) -> None:
        """Move a message out of ``q`` into its dead letters. If the store refuses, the
        message (already out of the in-flight set) is owed again: the next expiry of its
        next delivery tries the move once more."""
        try:
            rows = self.store.read(
                "SELECT id, record FROM qmsgs WHERE queue = ? AND seq = ?", (q.name, seq)
            )
            if not rows:
                return
            raw, record = rows[0]
            dlq = self.dead_letter_queue(q, now_ns / 1e9)
            dead = dead_record(bytes(record), q.name, deliveries)
            self.capture([dlq], bytes(raw), dead, now_ns)
            self.store.guard("DELETE FROM qmsgs WHERE queue = ? AND seq = ?", (q.name, seq))
        except StoreError:
            heapq.heappush(q.redeliver, seq)
            self.wake(q)
            raise
        self.dead_pending.append(_DeadLetter(q, seq, dlq))

    def committed_dead(self) -> None:
        """The pass committed: its dead letters left their queues."""
        for d in self.dead_pending:
            self.committed_capture([d.dlq])
            if d.lower:  # not if a purge in the same pass already set the depth
                d.q.depth -= 1
            d.q.dead_lettered += 1
        self.dead_pending.clear()

    def undo_dead(self) -> None:
        """The pass failed: its dead letters are still in their queues, owed again (they
        had left the in-flight set, so no ack wait would have brought them back)."""
        for d in self.dead_pending:
            self.uncaptured([d.dlq])
            heapq.heappush(d.q.redeliver, d.seq)
            self.wake(d.q)
        self.dead_pending.clear()

    def take(self, q: Queue, now: float) -> list[tuple[Consumer, bytes, int]]:
        """Hand out what consumers have room for: (consumer, record to send, seq).

        Redeliveries go first, then new messages in order. Delivery counts are written in
        this pass's transaction; the caller sends only after it commits. A message that
        has had all its attempts (the last was under way when the node stopped) goes to
        the dead letters instead: an attempt counts once it is committed, acked or not.
        """
        room = sum(max(0, c.max_inflight - len(c.inflight)) for c in q.consumers)
        if not room:
            return []
        rows: list[tuple[int, bytes, int, bytes]] = []
        popped: list[int] = []  # redeliveries taken off the heap, owed still if a read fails
        avoid: dict[int, Consumer] = {}
        try:
            while q.redeliver and len(rows) < room:
                seq = heapq.heappop(q.redeliver)
                holder = q.expired_on.pop(seq, None)
                if seq in q.inflight:
                    continue
                if holder is not None:
                    avoid[seq] = holder
                popped.append(seq)
                rows.extend(
                    self.store.read(
                        "SELECT seq, id, deliveries, record FROM qmsgs WHERE queue = ? AND seq = ?",
                        (q.name, seq),
                    )
                )
            if len(rows) < room:
                fresh = self.store.read(
                    "SELECT seq, id, deliveries, record FROM qmsgs WHERE queue = ? AND seq > ? "
                    "ORDER BY seq LIMIT ?",
                    (q.name, q.cursor, room - len(rows)),
                )
                if fresh:
                    q.cursor = fresh[-1][0]
                rows.extend(r for r in fresh if r[0] not in q.inflight)
        except StoreError:
            for seq in popped:
                heapq.heappush(q.redeliver, seq)
            q.expired_on.update(avoid)
            raise
        out = []
        updates = []
        spent: list[tuple[int, int]] = []  # (seq, deliveries) of messages out of attempts
        for seq, raw_id, deliveries, record in rows:
            if deliveries >= q.max_deliver:  # its last attempt was under way at a crash
                spent.append((seq, deliveries))
                continue
            consumer = self._next_consumer(q, avoid.get(seq))
            if consumer is None:
                heapq.heappush(q.redeliver, seq)
                continue
            n = deliveries + 1
            if n > 1:
                q.redeliveries += 1
            raw = bytes(raw_id)
            consumer.inflight[raw] = seq
            q.inflight[seq] = Inflight(consumer, now + q.ack_wait, n, raw)
            updates.append((n, q.name, seq))
            out.append((consumer, with_count(bytes(record), n), seq))
        if updates:
            try:
                self.store.guard_many(
                    "UPDATE qmsgs SET deliveries = ? WHERE queue = ? AND seq = ?", updates
                )
            except StoreError:
                self.undo_take(q, out)  # not sent: not in flight either (no ack wait)
                for seq, _n in spent:
                    heapq.heappush(q.redeliver, seq)
                raise
        for i, (seq, n) in enumerate(spent):
            try:
                self._dead_letter(q, seq, n, time.time_ns())
            except StoreError:  # that one is owed again (_dead_letter); so are the rest
                self.undo_take(q, out)
                for later, _n in spent[i + 1 :]:
                    heapq.heappush(q.redeliver, later)
                raise
        return out

    def _next_consumer(self, q: Queue, avoid: Consumer | None = None) -> Consumer | None:
        """Round-robin over consumers with room, so several share the load; ``avoid``
        only if no other has room."""
        n = len(q.consumers)
        fallback = None
        for i in range(n):
            c = q.consumers[(q.turn + i) % n]
            if len(c.inflight) < c.max_inflight:
                if c is avoid:
                    fallback = c
                    continue
                q.turn = (q.turn + i + 1) % n
                return c
        return fallback

    def undo_take(self, q: Queue, taken: list[tuple[Consumer, bytes, int]]) -> None:
        """The commit failed: nothing was sent, so the messages wait again."""
        for _consumer, _rec, seq in taken:
            f = q.inflight.pop(seq, None)
            if f is not None:
                f.release(seq)
                if f.deliveries > 1:
                    q.redeliveries -= 1
            heapq.heappush(q.redeliver, seq)
        self.wake(q)
