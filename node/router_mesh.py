"""The mesh side of the Router: frames on links, forwarding, and retained replicas.

A mixin of node/router.py's Router, split out to keep modules small; it works on the
Router's own state (the annotations below name what it uses).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any, Final

from node.codec import (
    F_ERROR,
    F_REPLICA,
    F_REQUEST,
    F_RETAIN,
    HEAD_FWD,
    RECORD_SIZE,
    Kind,
    decode_control,
    decode_targets,
    split_records,
    with_flags,
)
from node.durable import LOG_ALL
from node.errors import CodecError, TopicError
from node.framing import MAX_RUN_BYTES
from node.mesh import NO_PLAN, Link, Plan, Via
from node.router_durable import live_copy
from node.sessions import DURABLE_FLAGS, NOWHERE, _Refused
from node.topics import inbox_node, validate_topic

if TYPE_CHECKING:
    from collections.abc import Callable

    from node.dedup import DedupWindow
    from node.durable import Durable
    from node.mesh import Mesh
    from node.sessions import Counters, Route

_HEAD: Final = struct.Struct("<IHHB")  # payload_len, topic_len, headers_len, flags
_ORIGIN_SEQ: Final = struct.Struct(">8sQ")  # the event id: origin, big-endian sequence


class MeshSide:
    """Link frames in, forwarded events out and delivered here, retained replicas."""

    # The Router's state this side works on (set in Router.__init__).
    net: Mesh
    durable: Durable | None
    counters: Counters
    _pending: dict[bytes, list[bytes]]
    _link_pending: dict[tuple[Via, bytes], list[bytes]]
    _plans: dict[tuple[tuple[str, ...], tuple[tuple[Via, bytes], ...]], Plan]
    _reachable: set[str]
    node_id: str
    log: Callable[[str], None]
    _cache: dict[bytes, Route | _Refused]
    _fwd_cache: dict[bytes, tuple[tuple[str, ...] | None, list[tuple[Via, bytes]]]]
    _dedup: DedupWindow

    if TYPE_CHECKING:  # the Router's, used here

        def _remote_route(self, topic_b: bytes) -> Route | _Refused: ...

        def _none_withheld(self, rec: bytes) -> bool: ...

        def _deliver_run(self, route: Route, run: bytes, count: int) -> None: ...

        def emit_system(self, topic: str, body: dict[str, Any], now: float) -> None: ...

    def link_dropped(self, via: Via, frame: bytes, now: float) -> None:
        """A full queue refused ``frame``, a link's or a client's frame of no events: count
        a link's events, per link too, and say so at most once a second per link (log,
        ``$mesh/link/full``), as for a slow consumer. It was one node-wide count of
        frames, with no word (lab faults: half of a stream over a 256 kbit link gone,
        `peers` and the log silent)."""
        events = _records_in(frame)
        if not events:  # a state, a beat, or a control frame to a client
            self.counters.dropped["control_full"] += 1
            return
        self.counters.dropped["link_full"] += events
        link = self.net.links.get(self.net.by_via.get(via, ""))
        if link is None:
            return
        link.drops.total += events
        self._notice_link_full(link, now)

    def notice_full_links(self, now: float) -> None:
        """The drops of a burst after its first notice, told once the interval is over:
        a burst said "dropped 1" and never the rest (review). Called by the loop's timer."""
        for link in self.net.links.values():
            self._notice_link_full(link, now)

    def _notice_link_full(self, link: Link, now: float) -> None:
        newly = link.drops.untold(now)
        if not newly:
            return
        self.log(f"link to {link.name} ({link.peer_id}) full: dropped {newly} events")
        body = {"peer": link.peer_id, "peer_name": link.name, "dropped": newly}
        self.emit_system("$mesh/link/full", {**body, "dropped_total": link.drops.total}, now)

    def handle_dialed(self, via: str, found: str, frame: bytes, now: float) -> None:
        """A frame on a link we dialed (the loop's DEALER for ``via``)."""
        try:
            if via in self.net.by_via:
                self._on_link_frame(via, frame, now)
                return
            kind, body = decode_control(frame)
            if kind == Kind.LINK_OK:
                self.net.on_link_ok(via, body, found, now)
            elif kind == Kind.LINK_REFUSE:
                why = str(body.get("reason", "no reason given"))[:200]
                self.net.refuse_outbound(via, why, body.get("node"))
            elif kind == Kind.ERR:
                self.net.refuse_outbound(via, str(body.get("error", "error"))[:200])
        except CodecError as e:
            self.counters.bad_frames += 1
            self.log(f"bad frame on link {via}: {e}")
        except Exception as e:  # a bug of ours must not take the node down: drop, count, log
            self.counters.internal_errors += 1
            self.log(f"internal error on a frame from link {via} (dropped): {e!r}")

    def _on_link_frame(self, via: Via, frame: bytes, now: float) -> None:
        if frame[:2] == HEAD_FWD:
            self.net.heard(via, now)
            self._on_forward(via, frame, now)
            return
        kind, body = decode_control(frame)
        if kind in (Kind.ERR, Kind.LINK_REFUSE):  # e.g. a restarted peer that forgot us
            reason = body.get("reason") or body.get("error") or "refused"
            self.net.drop_via(via, f"peer ended the link: {str(reason)[:200]}", now)
            return
        self.net.heard(via, now)
        if kind == Kind.STATES:
            self.net.on_states(via, body, now)
        elif kind in (Kind.BEAT, Kind.BEAT_ACK):
            self.net.on_beat(via, kind, body, now)
        elif kind == Kind.LINK:  # the peer restarted and dials again on the same socket
            self.net.drop_via(via, "peer re-linked", now)
            if isinstance(via, bytes):
                self.net.on_link_request(via, body, "", now)

    def _routes_changed(self) -> None:
        """The mesh changed: every cached routing decision may be wrong now. Nodes that
        became reachable get the retained values published here."""
        self._cache.clear()
        self._plans.clear()
        self._fwd_cache.clear()
        reachable = set(self.net.table.paths())
        new = reachable - self._reachable
        self._reachable = reachable
        if new and self.durable is not None:
            for rec in self.durable.local_retained():
                self.replicate(rec, sorted(new))

    def replicate(self, rec: bytes, nodes: list[str] | None = None) -> None:
        """Send a retained value to ``nodes`` (default: every reachable node) to keep."""
        plan = self.net.broadcast_plan(nodes if nodes is not None else list(self._reachable))
        if plan is NO_PLAN:
            return
        self._forward(plan, with_flags(rec, add=F_REPLICA | F_RETAIN))

    def _inbox_plan(self, topic: str) -> Plan:
        """``_INBOX/<other node>/...``: straight to that node."""
        node = inbox_node(topic)
        if node is None or node == self.node_id:
            return NO_PLAN
        return self.net.inbox_plan(node)

    def _forward(self, plan: Plan, rec: bytes) -> None:
        """Queue one copy of ``rec`` per next hop of ``plan``, grouped by routing header so
        that a frame carries one header and many records."""
        pending = self._link_pending
        for key in plan.static if not plan.groups else self.net.dynamic(plan):
            parts = pending.get(key)
            if parts is None:
                pending[key] = parts = []
            parts.append(rec)
            self.counters.forwarded_out += 1

    def _on_forward(self, via: Via, frame: bytes, now: float) -> None:
        """Events from another node: pass the frame on, deliver here if we are a target.

        A frame carries one routing header for all its records, and what to do with a
        header is decided once and cached until the mesh changes, so a relay passes a
        frame on without touching its records.
        """
        if len(frame) < 4:
            raise CodecError("truncated forwarded frame")
        h1 = 4 + int.from_bytes(frame[2:4], "little")
        header = frame[4:h1]
        decision = self._fwd_cache.get(header)
        if decision is None:
            hops, targets = decode_targets(header)
            decision = self.net.onward(targets, hops)
            if len(self._fwd_cache) > 4096:
                self._fwd_cache.clear()
            self._fwd_cache[header] = decision
        mine, onward = decision
        body = frame[h1:]
        for key in onward:
            self._link_pending.setdefault(key, []).append(body)
            self.counters.relayed_frames += 1
        if mine is not None:
            self._deliver_forwarded(body, mine, self.net.converging(now))

    def _deliver_forwarded(self, body: bytes, groups: tuple[str, ...], dedup: bool) -> None:
        """Local delivery of records from another node: plain subscribers and the queue
        groups this node was chosen for.

        While the mesh is stable every target gets exactly one copy by construction (the
        origin names the targets; each is in one copy). Only while it converges can copies
        meet, so only then does the (origin, sequence) window run (``dedup``).
        """
        pending = self._pending
        cache = self._cache
        durable = self.durable
        window = self._dedup
        admit = window.admit
        origin_seq = _ORIGIN_SEQ.unpack_from
        # Records of one origin mostly come in order. Once the window admits one as its
        # origin's top, the sequences right after it are new without asking; the window
        # learns the run (``extend``) before anything else is asked, and at the end.
        # Saves a call per record while the mesh converges.
        run_origin, run_seq, run_told = b"", -1, -1
        # Records for the same subscribers here go to each as one run (Router._deliver_run):
        # the route, where the run starts and ends, and its records (0: none gathered).
        near = NOWHERE
        near_start = near_end = near_count = 0
        unpack = _HEAD.unpack_from
        n = len(body)
        off = 0
        count = 0
        try:
            while off < n:
                if off + RECORD_SIZE > n:
                    raise CodecError(f"truncated forwarded record at byte {off}")
                plen, tlen, hlen, flags = unpack(body, off)
                t0 = off + RECORD_SIZE
                end = t0 + tlen + hlen + plen
                if end > n:
                    raise CodecError(f"forwarded record at byte {off} overruns the frame")
                start = off
                off = end
                count += 1
                if flags & F_REPLICA:  # a retained value to keep, not an event to deliver: it
                    self._keep_replica(body[start:end], tlen)  # shares the event's id, so no
                    continue  # dedup
                if flags & F_ERROR and self._none_withheld(body[start:end]):
                    continue  # another node's bridge had none, and others may answer
                if dedup:
                    origin, seq = origin_seq(body, t0 - 16)
                    if seq == run_seq + 1 and origin == run_origin:
                        run_seq = seq  # right after the top the window admitted: new
                    else:
                        if run_seq != run_told:
                            window.extend(run_origin, run_seq)
                        top = admit(origin, seq)
                        if top is None:
                            self.counters.duplicates += 1
                            run_origin, run_seq, run_told = b"", -1, -1
                            continue
                        run_origin, run_seq, run_told = (origin, seq, seq) if top else (b"", -1, -1)
                topic = body[t0 : t0 + tlen]
                route = cache.get(topic)
                if route is None:
                    route = self._remote_route(topic)
                if type(route) is _Refused:
                    self.counters.dropped["bad_topic"] += 1
                    continue
                stored = durable is not None and (flags & DURABLE_FLAGS or route.log == LOG_ALL)  # type: ignore[union-attr]
                if route.runs is not None and not stored:  # type: ignore[union-attr]
                    if (
                        near_count
                        and route is near
                        and start == near_end
                        and end - near_start <= MAX_RUN_BYTES
                    ):
                        near_count += 1
                    else:
                        if near_count:
                            self._deliver_run(near, body[near_start:near_end], near_count)
                        near, near_start, near_count = route, start, 1  # type: ignore[assignment]
                    # The records that repeat it, if the next one may: asked of every record
                    # of a stream whose topics vary (devices/<id>/...), the look cost the
                    # last node 15 % of its rate (`bench --suite mesh`, 20,000 topics).
                    if (
                        not dedup
                        and not flags & F_ERROR
                        and body.startswith(topic, off + RECORD_SIZE)
                    ):
                        off, more = _stream(body, off, flags, topic, near_start + MAX_RUN_BYTES)
                        near_count += more
                        count += more
                    near_end = off
                    continue
                if near_count:
                    self._deliver_run(near, body[near_start:near_end], near_count)
                    near_count = 0
                rec = body[start:end]
                if stored:
                    durable.stage(rec, topic.decode(), route, local=False)  # type: ignore[union-attr,arg-type]
                    rec = live_copy(rec)
                for dest, prefix in route.plain:  # type: ignore[union-attr]
                    parts = pending.get(dest)
                    if parts is None:
                        pending[dest] = parts = []
                    parts.append(prefix)
                    parts.append(rec)
                if groups:
                    for g in route.groups:  # type: ignore[union-attr]
                        if g.name in groups:
                            dest, prefix = g.pick(bool(flags & F_REQUEST))
                            pending.setdefault(dest, []).extend((prefix, rec))
        finally:
            if near_count:
                self._deliver_run(near, body[near_start:near_end], near_count)
            if run_seq != run_told:
                window.extend(run_origin, run_seq)
        self.counters.forwarded_in += count

    def _keep_replica(self, rec: bytes, tlen: int) -> None:
        """Store a retained value another node replicated here (topic checked first)."""
        try:
            topic = rec[RECORD_SIZE : RECORD_SIZE + tlen].decode()
            validate_topic(topic)
        except (UnicodeDecodeError, TopicError):
            self.counters.dropped["bad_topic"] += 1
            return
        if self.durable is not None:
            self.durable.stage_replica(rec, topic)


def _stream(body: bytes, off: int, flags: int, topic: bytes, limit: int) -> tuple[int, int]:
    """Where the records from ``off`` on that repeat ``flags`` and ``topic`` end (within
    ``body`` and before ``limit``), and how many they are: they go the way the record
    before went, unasked, so a stream costs this and nothing else per record."""
    unpack = _HEAD.unpack_from
    tlen = len(topic)
    n = min(len(body), limit)
    off, k = _same_size(body, off, flags, topic, n)
    while off + RECORD_SIZE <= n:
        plen, tl, hlen, fl = unpack(body, off)
        if fl != flags or tl != tlen or not body.startswith(topic, off + RECORD_SIZE):
            break
        end = off + RECORD_SIZE + tl + hlen + plen
        if end > n:
            break  # the caller's loop refuses it, or starts a new run with it
        off = end
        k += 1
    return off, k


_SAME_SIZE_FROM: Final = 8  # records in a row worth checking at once (each costs a slice)
_LENGTHS: Final = 9  # bytes of a record's lengths and flags, at its start


def _same_size(body: bytes, off: int, flags: int, topic: bytes, n: int) -> tuple[int, int]:
    """The records from ``off`` on as ``_stream`` takes them, when they are all of the
    size of the first (a stream of fixed-size payloads): checked field byte by field
    byte across all of them at once (a strided slice each), 92 ns a record where the
    loop took 267. Equal lengths make equal sizes, so the records tile ``body`` from
    ``off``; equal flags and topics make them repeat the one before. Else (off, 0)."""
    if off + RECORD_SIZE > n:
        return off, 0
    plen, tlen, hlen, fl = _HEAD.unpack_from(body, off)
    size = RECORD_SIZE + tlen + hlen + plen
    k = (n - off) // size
    if k < _SAME_SIZE_FROM or fl != flags or tlen != len(topic):
        return off, 0
    lengths = body[off : off + _LENGTHS]
    at = off + RECORD_SIZE
    for i in (0, 1, k // 2, k - 1):  # a few first: mixed topics or sizes fail here, cheaply
        if not (body.startswith(lengths, off + i * size) and body.startswith(topic, at + i * size)):
            return off, 0
    stop = off + k * size
    for j in range(_LENGTHS):
        if body[off + j : stop : size] != lengths[j : j + 1] * k:
            return off, 0
    for j in range(tlen):
        if body[at + j : stop : size] != topic[j : j + 1] * k:
            return off, 0
    return stop, k


def _records_in(frame: bytes) -> int:
    """Events in a FWD frame (0 for a link's other frames, or one that does not parse)."""
    if frame[:2] != HEAD_FWD or len(frame) < 4:
        return 0
    try:
        return sum(1 for _ in split_records(frame, 4 + int.from_bytes(frame[2:4], "little")))
    except CodecError:
        return 0
