"""The durable side of the Router: persistent publish, queues, replay and retained values,
glued to the Durable core (node/durable.py).

A mixin of node/router.py's Router, split out to keep modules small.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Final

from node.codec import F_PERSISTENT, F_RETAIN, F_RETAINED_LIVE, RECORD_SIZE, Kind, with_flags
from node.errors import CodecError
from node.mesh import NO_PLAN
from node.queues import DEFAULT_MAX_INFLIGHT, read_refused
from node.routing import capture_group
from node.sessions import Client, Route, SubRef

log = logging.getLogger("meshctl.node")

if TYPE_CHECKING:
    from collections.abc import Callable

    from node.durable import Durable
    from node.mesh import Plan
    from node.router import Router
    from node.sessions import Acl, Counters, _Refused

_IDS_PER_FRAME: Final = 1000  # event ids per PACK/ERR frame: well under the control limit
STORE_WARN_EVERY: Final = 10.0  # seconds between log lines about a failing store


class DurableSide:
    """What persistent events, queue consumers and replays need from the Router."""

    # The Router's state this side works on (set in Router.__init__).
    durable: Durable | None
    node_id: str
    internal: set[bytes]
    client_queue: int
    acl: dict[bytes, Acl]
    counters: Counters
    clients: dict[bytes, Client]
    _pending: dict[bytes, list[bytes]]
    log: Callable[[str], None]
    _cache: dict[bytes, Route | _Refused]
    _durable_out: DurableOut
    _store_warned: float = float("-inf")  # when a failing store was last logged
    _store_errors_seen: int = 0  # the store's error count then

    if TYPE_CHECKING:  # the Router's, used here

        def _error(self, ident: bytes, ref: object, error: str, code: str) -> None: ...

        def _send_control(self, ident: bytes, kind: Kind, body: dict[str, Any]) -> None: ...

        def _count_interest(self, key: tuple[str, str | None], delta: int) -> None: ...

        def _forward(self, plan: Plan, rec: bytes) -> None: ...

    def _consume(self, client: Client, ref: object, sid: int, body: dict[str, Any]) -> None:
        """Bind a subscription to a durable queue: deliveries with explicit acks."""
        if self.durable is None:
            self._error(client.ident, ref, "this node has no store (persistence is off)", "store")
            return
        inflight = body.get("max_inflight")
        if inflight is not None and (not isinstance(inflight, int) or not 0 < inflight <= 65536):
            self._error(client.ident, ref, "max_inflight must be 1..65536", "input")
            return
        sub = SubRef(client.ident, sid, (), None)
        if client.ident not in self.internal:
            # No more in flight than its socket's queue holds (limits.client_queue, in
            # frames; a delivery takes at most one): beyond it the node dropped deliveries
            # as for a slow consumer, and each drop used up one of max_deliver attempts
            # (events went to dead letters unseen: exploratory test).
            inflight = min(inflight or DEFAULT_MAX_INFLIGHT, self.client_queue)
        try:
            q = self.durable.bind_consumer(
                client.ident, sid, sub.prefix, str(body["queue"]), inflight
            )
        except KeyError as e:
            self._error(client.ident, ref, str(e.args[0]), "input")
            return
        acl = self.acl.get(client.ident)
        queues = self.durable.queues
        why = None if acl is None else read_refused(acl, queues.readable_as(q))
        if why is not None:
            self.durable.unbind(client.ident, sid)  # a queue is a way to read its events
            self.counters.dropped["permission"] += 1
            self._error(
                client.ident, ref, f"permission denied: queue {q.name}: {why}", "permission"
            )
            return
        client.subs[sid] = sub
        granted = {"max_inflight": inflight} if inflight is not None else {}  # (the window)
        self._send_control(
            client.ident, Kind.OK, {"ref": ref, "sid": sid, "queue": q.name, **granted}
        )

    def _queue_ack(self, client: Client, body: dict[str, Any]) -> None:
        sid, ids = body.get("sid"), body.get("ids")
        consumed = body.get("replayed")
        if self.durable is not None and isinstance(sid, int) and type(consumed) is int:
            self.durable.replay_consumed(client.ident, sid, consumed)  # a replay's progress
            return
        if self.durable is None or not isinstance(sid, int) or not isinstance(ids, list):
            raise CodecError("ACK needs an integer sid and a list of ids")
        try:
            raw = [bytes.fromhex(i) for i in ids if isinstance(i, str)]
        except ValueError:
            raise CodecError("ACK ids must be hex event ids") from None
        err = self.durable.ack(client.ident, sid, raw)
        ref = body.get("ref")
        if err is not None:
            self._error(client.ident, ref, err, "input")
        elif ref is not None:  # a synchronous ack: answered once the deletion is on disk
            self.durable.answer_after_commit(client.ident, Kind.OK, {"ref": ref})

    def queue_interest(self, old: tuple[str, ...], new: tuple[str, ...]) -> None:
        """A queue's patterns changed: the mesh must route its events here (or stop)."""
        for p in old:
            self._count_interest((p, capture_group(self.node_id)), -1)
        for p in new:
            self._count_interest((p, capture_group(self.node_id)), +1)
        self._cache.clear()

    def _durable_pub(self, ident: bytes, rec: bytes, topic_b: bytes, route: Route) -> bytes | None:
        """Log, retain or persist one local event; the record to route now, or None when
        it waits for the commit (persistent) or was refused."""
        flags = rec[8]
        durable = self.durable
        if durable is None:
            if flags & F_PERSISTENT:
                self._send_control(
                    ident,
                    Kind.ERR,
                    {
                        "error": "this node has no store (persistence is off)",
                        "code": "store",
                        "ids": [rec[RECORD_SIZE - 16 : RECORD_SIZE].hex()],
                    },
                )
                return None
            if flags & F_RETAIN:  # `pub --retain` said "published" and nothing was kept
                if ident not in self.internal:  # a bridge's import: nothing to tell it
                    self._send_control(
                        ident,
                        Kind.ERR,
                        {
                            "ref": None,
                            "error": "not retained here: this node has no store "
                            "(persistence is off); the event went to current subscribers",
                            "code": "store",
                        },
                    )
                # Live, as a retained publish goes to current subscribers: a bridge still
                # retains it at its broker (a diskless gateway relays retained state).
                return live_copy(rec)
            return rec
        if flags & F_PERSISTENT:
            durable.persist(ident, rec, topic_b.decode(), route, tell=ident not in self.internal)
            return None
        kept = durable.stage(rec, topic_b.decode(), route, local=True)
        if flags & F_RETAIN and ident not in self.internal:
            if kept:
                durable.retained_by(ident)
            else:  # as over the limit `pub --retain` said "published", exit 0
                self._send_control(ident, Kind.ERR, durable.not_retained())
        return live_copy(rec)

    def route_record(self, ident: bytes, rec: bytes, route: Route) -> None:
        """Route one record as the hot loop does (the slow path: committed events)."""
        rec = live_copy(rec)
        if route.stored_plan is not NO_PLAN:  # persistent: queues elsewhere want it too
            self._forward(route.stored_plan, rec)
        pending = self._pending
        for dest, prefix in route.plain:
            pending.setdefault(dest, []).extend((prefix, rec))
        for g in route.groups:
            dest, prefix = g.pick()
            pending.setdefault(dest, []).extend((prefix, rec))

    def end_pass(self, now: float) -> None:
        """The loop read what it could: commit the pass's durable writes and release what
        waited on them."""
        if self.durable is not None:
            try:
                self.durable.end_pass(now, self._durable_out)
            except Exception as e:  # a bug of ours must not take the node down: count, log
                self._internal_error("the end of a pass", e)
            self._note_store_errors(now)

    def _note_store_errors(self, now: float) -> None:
        """Only `status` showed a full disk; a foreground node or journald says it too now,
        at most every STORE_WARN_EVERY (a pass per publish fails), whether a commit, an
        ack or a timer's write failed (review)."""
        durable = self.durable
        if durable is None or durable.errors <= self._store_errors_seen:
            return
        if now >= self._store_warned + STORE_WARN_EVERY:
            self._store_warned, self._store_errors_seen = now, durable.errors
            log.warning("store: %s (%d errors in all)", durable.last_error, durable.errors)

    def busy(self) -> bool:
        """True when the next pass has work even without input (a replay to continue)."""
        return self.durable is not None and self.durable.busy()

    def tick(self, now: float) -> None:
        """Timers of the durable side (ack waits, log bounds); the loop calls it often."""
        if self.durable is not None:
            try:
                self.durable.tick(now)
                self._note_store_errors(now)
                spool = self.durable.spool
                if spool is not None and (lost := spool.losses(now)) is not None:
                    log.warning(lost)
            except Exception as e:  # as in end_pass
                self._internal_error("a timer", e)

    def _internal_error(self, where: str, e: Exception) -> None:
        self.counters.internal_errors += 1
        self.log(f"internal error in {where}: {e!r}")


def live_copy(rec: bytes) -> bytes:
    """A retained event as live subscribers get it: without the retain flag (MQTT rule:
    the flag marks what a subscriber got because it was stored, not because it was new)."""
    if rec[8] & F_RETAIN:
        return with_flags(rec, add=F_RETAINED_LIVE, remove=F_RETAIN)
    return rec


class DurableOut:
    """Hands the Durable core's post-commit results to the Router's output queues."""

    __slots__ = ("router",)

    def __init__(self, router: Router) -> None:
        self.router = router

    def route(self, ident: bytes, record: bytes, route: Any) -> None:
        self.router.route_record(ident, record, route)

    def persisted(self, ident: bytes, ids: list[str]) -> None:
        if ident in self.router.clients:
            for i in range(0, len(ids), _IDS_PER_FRAME):
                self.router._send_control(ident, Kind.PACK, {"ids": ids[i : i + _IDS_PER_FRAME]})

    def refused(self, ident: bytes, ids: list[str], error: str) -> None:
        if ident in self.router.clients:
            for i in range(0, len(ids), _IDS_PER_FRAME):
                body = {"error": error, "code": "store", "ids": ids[i : i + _IDS_PER_FRAME]}
                self.router._send_control(ident, Kind.ERR, body)

    def deliver(self, ident: bytes, prefix: bytes, record: bytes) -> None:
        self.router._pending.setdefault(ident, []).extend((prefix, record))

    def answer(self, ident: bytes, kind: Kind, body: dict[str, Any]) -> None:
        if ident in self.router.clients:
            self.router._send_control(ident, kind, body)

    def replicate(self, record: bytes) -> None:
        self.router.replicate(record)
