"""The node's routing core, sans-IO: frames from clients in, frames for clients out.

It owns client sessions, the subscription trie, queue-group choice, the per-topic route
cache and the counters. It never touches a socket or a clock: the loop passes ``now`` in and
sends what ``take_output`` hands back. The cache is dropped whenever interest changes.
Its mesh side (router_mesh.py) and durable side (router_durable.py) are mixins of the one
Router; its values live in sessions.py.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from typing import Any, Final

from node import queue_admin, views
from node.codec import (
    F_ERROR,
    F_IMPORTED,
    F_PERSISTENT,
    F_REPLICA,
    F_REQUEST,
    F_RETAINED_LIVE,
    MAX_CLIENT_NAME,
    MAX_PUBLISH_HEADERS,
    NO_RESPONDERS_AT,
    NO_RESPONDERS_FOR,
    RECORD_SIZE,
    RUN_BIT,
    RUN_HEAD,
    SID,
    Kind,
    decode_control,
    encode_control,
    encode_record,
    frame_kind,
    headers_ok,
)
from node.dedup import DedupWindow
from node.drops import worth_a_line
from node.durable import LOG_ALL, Durable, replay_options
from node.errors import CodecError, TopicError
from node.events import Event, decode_event
from node.framing import MAX_RUN_BYTES, frames_counted, link_frames
from node.mesh import NO_PLAN, Mesh, Plan, Turn, Via, turn_of
from node.router_durable import DurableOut, DurableSide
from node.router_mesh import MeshSide
from node.routing import NONE_AT, announced, capture_group, quiet_group
from node.sessions import (
    DURABLE_FLAGS,
    MAX_GROUP_NAME,
    NOWHERE,
    Acl,
    Client,
    Counters,
    Route,
    SubRef,
    _Group,
    _Refused,
    _valid_group,
    publish_verdict,
)
from node.topics import (
    INBOX_PREFIX,
    SubscriptionTrie,
    inbox_node,
    validate_pattern,
    validate_publish_topic,
    validate_topic,
)

_HEAD: Final = struct.Struct("<IHHB")  # payload_len, topic_len, headers_len, flags
_ORIGIN_SEQ: Final = struct.Struct(">8sQ")  # the event id: origin, big-endian sequence
_LINK_ONLY: Final = frozenset((Kind.FWD, Kind.STATES, Kind.BEAT, Kind.BEAT_ACK))
# What an identity without a session may send; anything else is answered "say HELLO
# first" on its kind byte alone, so a stranger cannot make the node parse 1 MiB of JSON.
_GREETINGS: Final = frozenset((Kind.HELLO, Kind.LINK))
_NOT_LINKED: Final = encode_control(Kind.LINK_REFUSE, {"reason": "not linked (node restarted?)"})
ROUTE_CACHE_SIZE: Final = 65536
SYSTEM_HOLD: Final = 1.0  # seconds a $mesh event no other node wants yet is kept
MAX_HELD_SYSTEM: Final = 1000
_HELD_TOPICS: Final = ("$mesh/link/", "$mesh/node/")  # events that may be held
_FLAGS_AT: Final = 2 + 8  # the first record's flags byte in a PUB frame


OPERATOR_PLACES: Final = 16  # clients beyond limits.max_clients for operators' sessions
LOOKER_ONLY: Final = (
    "node has reached its limit of clients: an operator's session beyond it may only look"
)
EVENTS_ONLY: Final = "only subscribers that cannot answer: MQTT clients, uplinks"
_IMPORTED_REQUEST: Final = F_IMPORTED | F_REQUEST  # a bridge's request from its remote side
_MESH_FLAGS: Final = F_REPLICA | F_RETAINED_LIVE  # set by nodes only, refused from clients


class Router(MeshSide, DurableSide):
    """Sessions, interest and delivery for one node."""

    def __init__(
        self,
        *,
        node_id: str,
        name: str,
        mesh: str,
        max_payload: int,
        max_clients: int,
        max_subscriptions: int,
        wall_ns: Callable[[], int],
        log: Callable[[str], None] = lambda _msg: None,
        dead_after: float = 2.5,
        epoch: int | None = None,
        durable: Durable | None = None,
        client_queue: int = 1000,
    ) -> None:
        self.node_id = node_id
        self.name = name
        self.mesh_name = mesh
        self.max_payload = max_payload
        self.max_clients = max_clients
        self.max_subscriptions = max_subscriptions
        self.client_queue = client_queue  # frames a client's socket queue holds (HWM)
        self.log = log
        self.wall_ns = wall_ns  # stamps the node's own events; a parameter so tests pin it
        self.clients: dict[bytes, Client] = {}
        self.by_client_id: dict[str, bytes] = {}
        self.trie: SubscriptionTrie[SubRef] = SubscriptionTrie()
        self.counters = Counters()
        self.status_extra: Callable[[float], dict[str, Any]] = lambda _now: {}
        self.peers_extra: Callable[[float], list[dict[str, Any]]] = lambda _now: []
        self.internal: set[bytes] = set()  # identities of in-process actors (bridges, MQTT)
        # Clients that take events but cannot answer a request (HELLO "requests": false:
        # the MQTT listener, MQTT bridges, uplinks): their interest is events only.
        self.mute: set[bytes] = set()
        # Clients that read a slice of records as one run (HELLO "runs": true, codec.py).
        self.readers: set[bytes] = set()
        self._untold_slow: set[bytes] = set()  # slow consumers with drops not yet told
        # Per request (its reply-to): the bridges here and the nodes that said "no
        # responders" to it so far.
        self._said_none: dict[str, set[bytes | str]] = {}
        # Permissions of clients that proved a restricted identity; enforced here, at the
        # node the client is attached to, so nothing refused ever enters the mesh.
        self.acl: dict[bytes, Acl] = {}
        self._acl_seen: dict[bytes, dict[bytes, str | None]] = {}
        self._cache: dict[bytes, Route | _Refused] = {}
        self._headers_known: dict[bytes, bool] = {}  # header blocks seen: whether they decode
        self._fwd_cache: dict[bytes, tuple[tuple[str, ...] | None, list[tuple[Via, bytes]]]] = {}
        self._turns: dict[tuple[Any, ...], Turn] = {}  # per group and members (see turn_of)
        # One Plan object per distinct set of (link, header) copies, so that events on
        # different topics bound for the same links still travel on as one run.
        self._plans: dict[tuple[tuple[str, ...], tuple[tuple[Via, bytes], ...]], Plan] = {}
        self._control: list[tuple[bytes, bytes, int]] = []
        self._pending: dict[bytes, list[bytes]] = {}
        # The node's own events: half its id (to read in an event id), half this run's
        # (the low bits of its epoch, which rises every run). With the whole id and a
        # sequence from 0, a restarted node's $mesh events had the ids of the last run's,
        # and other nodes' duplicate window dropped them while the mesh converged, which a
        # restart always starts (exploratory test).
        run = (wall_ns() if epoch is None else epoch) & 0xFFFFFFFF
        self._origin = bytes.fromhex(node_id)[:4].ljust(4, b"\0") + run.to_bytes(4, "big")
        self._run_tag = f"{run:08x}"  # in each client id: ids never repeat across runs
        # (record, topic, until, (nodes, groups) it went to): the mesh's own changes, kept
        self._held_system: list[tuple[bytes, str, float, tuple[set[str], set[str]]]] = []
        self._seq = 0
        self._inbox = f"{INBOX_PREFIX}/{node_id}/"
        self._interest: dict[tuple[str, str | None], int] = {}
        # (pattern, group) -> True taken up / False dropped, net, since the mesh last heard
        self._interest_changes: dict[tuple[str, str | None], bool] = {}
        self._link_control: list[tuple[Via, bytes]] = []
        self._link_pending: dict[tuple[Via, bytes], list[bytes]] = {}
        self._dedup = DedupWindow()
        self.durable = durable
        self._durable_out = DurableOut(self)
        self._reachable: set[str] = set()
        if durable is not None:
            for q in durable.queues.by_name.values():
                for p in q.patterns:
                    self._count_interest((p, capture_group(self.node_id)), +1)
            # The uplink carries every event on its exports, from anywhere in the mesh:
            # they must come here. Only those published here did, and the cloud got none
            # of a plant's other nodes' (plant scenario). Events only: it answers nothing.
            for r in durable.config.spool_readers:
                if not r.persistent_only:
                    for p in r.patterns:
                        self._count_interest((p, quiet_group(self.node_id)), +1)
        self.net = Mesh(
            node_id=node_id,
            name=name,
            mesh=mesh,
            epoch=wall_ns() if epoch is None else epoch,
            dead_after=dead_after,
            log=log,
            on_change=self._routes_changed,
            emit=self.emit_system,
        )

    # ---- input -------------------------------------------------------------------------

    def handle(self, ident: bytes, frame: bytes, now: float) -> None:
        """Process one frame from ``ident``; garbage is counted and dropped, never raised."""
        try:
            if len(frame) >= 2 and frame[1] == Kind.PUB and frame[0] == 1:
                if (
                    len(frame) > _FLAGS_AT
                    and frame[_FLAGS_AT] & F_ERROR
                    and ident in self.internal
                    and self._others_answer(ident, frame)
                ):
                    return
                self._on_pub(ident, frame, now)
                return
            if ident in self.net.by_via:
                self._on_link_frame(ident, frame, now)
                return
            kind = frame_kind(frame)
            if kind in _LINK_ONLY and ident not in self.clients:
                # A node that still thinks it is linked to us (we restarted): say so, and
                # its link goes down now instead of after its heartbeat timeout.
                self._control.append((ident, _NOT_LINKED, 0))
                return
            if kind in (Kind.PUB, Kind.DELIVER, Kind.FWD):
                raise CodecError(f"{kind.name} is not a frame a client may send")
            if ident not in self.clients and kind not in _GREETINGS:
                self._no_session(ident)  # decided on the kind byte: no JSON parsed for it
                return
            kind, body = decode_control(frame)
            if kind == Kind.LINK:
                self.net.on_link_request(ident, body, "", now)
                return
            self._on_control(ident, kind, body, now)
        except CodecError as e:
            self.bad_frame(ident, str(e))
        except Exception as e:  # a bug of ours must not take the node down: drop, count, log
            self.counters.internal_errors += 1
            self.log(f"internal error on a frame from {ident.hex()} (dropped): {e!r}")

    def bad_frame(self, ident: bytes | None, why: str) -> None:
        """Count a malformed frame and tell its sender, if any."""
        self.counters.bad_frames += 1
        if worth_a_line(self.counters.bad_frames):
            who = ident.hex() if ident else "?"
            self.log(f"bad frame from {who} (total {self.counters.bad_frames}): {why}")
        if ident is not None and ident in self.clients:
            self._error(ident, None, f"malformed frame dropped: {why}", "protocol")

    def _on_control(self, ident: bytes, kind: Kind, body: dict[str, Any], now: float) -> None:
        """A decoded control frame: HELLO, or one from a client with a session (``handle``
        answered every other sender before decoding)."""
        if kind == Kind.HELLO:
            self._hello(ident, body, now)
            return
        client = self.clients[ident]
        client.last_seen = now
        ref = body.get("ref")
        if kind == Kind.SUB:
            if client.looker:
                self._error(ident, ref, LOOKER_ONLY, "limit")
                return
            self._subscribe(client, ref, body)
        elif kind == Kind.UNSUB:
            self._unsubscribe(client, ref, body)
        elif kind == Kind.STATUS:
            if ident in self.acl:
                # The views name every client, queue, topic and path of the node: a client
                # held to some topics read them all (exploratory test).
                self.counters.dropped["permission"] += 1
                why = "permission denied: the node's views need credentials without rules"
                self._error(ident, ref, why, "permission")
                return
            self._send_control(ident, Kind.OK, {"ref": ref, "status": self.view(body, now)})
        elif kind == Kind.BYE:
            self.drop_client(ident, "said bye", now)
        elif kind == Kind.PING:
            if ref is not None:  # a flush: everything sent before it has been processed
                if self.durable is not None and self.durable.waits_on(ident):
                    # ... and stored, for a retained value: its failure comes as the answer
                    self.durable.answer_after_commit(ident, Kind.OK, {"ref": ref})
                else:
                    self._send_control(ident, Kind.OK, {"ref": ref})
            else:  # a keepalive: the client has not heard from us for a while. A client
                # that publishes is never probed (it is not quiet), so without an answer
                # its Client.silence grew while the node was fine (review).
                self._send_control(ident, Kind.PING, {})
        elif kind == Kind.ACK:
            self._queue_ack(client, body)
        elif kind == Kind.QUEUE:
            answer = queue_admin.handle(self, ident, body, now)
            if answer is not None:
                self._send_control(ident, *answer)
        else:
            raise CodecError(f"{kind.name} is not a frame a client may send")

    def _no_session(self, ident: bytes) -> None:
        """A frame from an identity that never said HELLO (or a node restart forgot it):
        count it and tell the sender, whose client library then greets us again."""
        self.counters.dropped["no_session"] += 1
        self._send_control(
            ident, Kind.ERR, {"error": "no session: say HELLO first", "code": "session"}
        )

    def _hello(self, ident: bytes, body: dict[str, Any], now: float) -> None:
        if ident in self.clients:
            self.drop_client(ident, "new hello", now)
        # An operator's short session (status, peers, queue ls) may take one of a few
        # places beyond the limit: at the limit every view failed, even on the node's own
        # host, and nothing said clients were being turned away (scale test).
        extra = OPERATOR_PLACES if body.get("operator") is True else 0
        # The node's own actors (MQTT listener, bridges, uplink) take no client's place:
        # with two of them, `max_clients = 2` let no client in.
        taken = len(self.clients) - sum(1 for i in self.internal if i in self.clients)
        if ident not in self.internal and taken >= self.max_clients + extra:
            n = self.counters.clients_refused = self.counters.clients_refused + 1
            if worth_a_line(n):
                who = str(body.get("name", ""))[:MAX_CLIENT_NAME] or ident.hex()
                self.log(
                    f"client {who!r} refused: the node has reached its limit of "
                    f"{self.max_clients} clients (limits.max_clients; {n} refused so far)"
                )
            self._send_control(
                ident,
                Kind.ERR,
                {
                    "error": f"node has reached its limit of {self.max_clients} clients",
                    "code": "limit",
                },
            )
            return
        name = str(body.get("name", ""))[:MAX_CLIENT_NAME]
        if body.get("requests") is False:  # MQTT's, an uplink's: it takes events only
            self.mute.add(ident)
        if body.get("runs") is True:
            self.readers.add(ident)
        client = Client(ident, name, now, now, run_tag=self._run_tag)
        client.looker = ident not in self.internal and taken >= self.max_clients
        self.clients[ident] = client
        self.by_client_id[client.client_id] = ident
        self._send_control(
            ident,
            Kind.WELCOME,
            {
                "node_id": self.node_id,
                "name": self.name,
                "mesh": self.mesh_name,
                "client_id": client.client_id,
                "max_payload": self.max_payload,
            },
        )
        self.log(f"client {client.client_id} connected ({name or 'anonymous'})")
        self.emit_system("$mesh/client/connect", {"client": client.client_id, "name": name}, now)

    def _subscribe(self, client: Client, ref: object, body: dict[str, Any]) -> None:
        sid, patterns, group = body.get("sid"), body.get("patterns"), body.get("group")
        try:
            # Below RUN_BIT for a client that reads runs: the bit marks a run (codec.py).
            top = RUN_BIT if client.ident in self.readers else 2**32
            if not isinstance(sid, int) or not 0 < sid < top or sid in client.subs:
                raise ValueError(
                    f"subscription id {sid!r} is not a new integer from 1 to {top - 1}"
                )
            if body.get("queue") is not None:
                self._consume(client, ref, sid, body)
                return
            if not isinstance(patterns, list) or not patterns:
                raise ValueError("a subscription needs at least one pattern")
            for p in patterns:
                if not isinstance(p, str):
                    raise ValueError(f"pattern {p!r} is not a string")
                validate_pattern(p)
            acl = self.acl.get(client.ident)
            if acl is not None:
                for p in patterns:
                    if (why := acl.check_subscribe(p)) is not None:
                        self.counters.dropped["permission"] += 1
                        self._error(client.ident, ref, f"permission denied: {why}", "permission")
                        return
            if group is not None and not _valid_group(group):
                raise ValueError(
                    f"queue group {group!r} must be 1-{MAX_GROUP_NAME} bytes "
                    "without spaces, '/', '*' or '>'"
                )
            # In-process actors (the MQTT listener) subscribe for many clients of their own
            # and apply the limit per client themselves.
            if client.ident not in self.internal:
                held = client.patterns
                if held + len(patterns) > self.max_subscriptions:
                    raise ValueError(
                        f"{held + len(patterns)} patterns exceed the limit of "
                        f"{self.max_subscriptions} per client"
                    )
        except (ValueError, TopicError) as e:
            self._error(client.ident, ref, str(e), "input")
            return
        sub = SubRef(client.ident, sid, tuple(dict.fromkeys(patterns)), group)
        try:
            replay = replay_options(body, group, self.durable)
        except ValueError as e:
            self._error(client.ident, ref, str(e), "input")
            return
        client.subs[sid] = sub
        client.patterns += len(sub.patterns)
        answer: dict[str, Any] = {"ref": ref, "sid": sid}
        if replay is None:
            self._go_live(sub)
        else:
            assert self.durable is not None
            answer["first_seq"] = self.durable.start_replay(
                client.ident,
                sid,
                sub.prefix,
                sub.patterns,
                **replay,
                on_live=lambda: self._go_live(sub),
                retained=bool(body.get("retained")),
            )
        self._send_control(client.ident, Kind.OK, answer)
        if body.get("retained") and self.durable is not None and replay is None:
            parts = self._pending.setdefault(client.ident, [])
            for rec in self.durable.retained_for(sub.patterns):
                parts.extend((sub.prefix, rec))

    def _go_live(self, sub: SubRef) -> None:
        """Route live events to ``sub`` from now on (at once, or after its replay)."""
        client = self.clients.get(sub.client)
        if client is None or client.subs.get(sub.sid) is not sub or sub.live:
            return
        sub.live = True
        key = self._interest_group(sub)
        for p in sub.patterns:
            self.trie.add(p, sub)
            self._count_interest((p, key), +1)
        self._cache.clear()

    def _unsubscribe(self, client: Client, ref: object, body: dict[str, Any]) -> None:
        sid = body.get("sid")
        sub = client.subs.pop(sid, None) if isinstance(sid, int) else None
        if sub is None:
            self._error(client.ident, ref, f"no subscription {body.get('sid')!r}", "input")
            return
        client.patterns -= len(sub.patterns)
        self._remove_sub(sub)
        self._send_control(client.ident, Kind.OK, {"ref": ref, "sid": sub.sid})

    def _remove_sub(self, sub: SubRef) -> None:
        if self.durable is not None:
            self.durable.unbind(sub.client, sub.sid)
        if not sub.live:
            return
        sub.live = False
        key = self._interest_group(sub)
        for p in sub.patterns:
            self.trie.remove(p, sub)
            self._count_interest((p, key), -1)
        self._cache.clear()

    def _interest_group(self, sub: SubRef) -> str | None:
        """The group a subscription's patterns are announced in: a client that cannot
        answer requests holds them for events only (node/routing.py QUIET)."""
        if sub.group is None and sub.client in self.mute:
            return quiet_group(self.node_id)
        return sub.group

    def _count_interest(self, key: tuple[str, str | None], delta: int) -> None:
        """Keep a count per (pattern, group) so the mesh hears only real changes."""
        n = self._interest.get(key, 0) + delta
        if n > 0:
            self._interest[key] = n
            if n == 1 and delta > 0:
                self._interest_changed(key, True)
        else:
            self._interest.pop(key, None)
            self._interest_changed(key, False)

    def _interest_changed(self, key: tuple[str, str | None], held: bool) -> None:
        if self._interest_changes.get(key) is (not held):
            del self._interest_changes[key]  # undone before the mesh heard of it
        else:
            self._interest_changes[key] = held

    def gone(self, ident: bytes, now: float) -> None:
        """The loop found ``ident`` unreachable: a client or a node that had dialed us."""
        if ident in self.net.by_via:
            self.net.drop_via(ident, "connection closed", now)
        else:
            self.drop_client(ident, "connection closed", now)

    def drop_client(self, ident: bytes, why: str, now: float) -> None:
        """Forget a client and its interest (bye, gone, or replaced)."""
        client = self.clients.pop(ident, None)
        if client is None:
            return
        self.by_client_id.pop(client.client_id, None)
        self.acl.pop(ident, None)
        self._acl_seen.pop(ident, None)
        for sub in client.subs.values():
            self._remove_sub(sub)
        self.mute.discard(ident)  # after its subscriptions: their interest is quiet
        self.readers.discard(ident)
        self._pending.pop(ident, None)
        if self.durable is not None:
            self.durable.client_gone(ident)
        self.log(f"client {client.client_id} disconnected: {why}")
        self.emit_system(
            "$mesh/client/disconnect",
            {"client": client.client_id, "name": client.name, "reason": why},
            now,
        )

    # ---- the data path -------------------------------------------------------------------

    def _on_pub(self, ident: bytes, frame: bytes, now: float) -> None:
        """Route a client's frame of records.

        Consecutive records bound for the same links travel on as one slice of the frame
        (a *run*) rather than one slice each: a node that only forwards a stream then
        touches each record's header and topic and nothing else. That cut the first hop's
        CPU per event by a third in `meshctl bench --suite mesh`. Consecutive records for
        the same subscribers here go to each as one run too (``_deliver_run``).

        A stream repeats itself: a record with the topic, flags and headers of the one
        before goes its way without asking again what those decide (permission, topic,
        headers, route); only its payload's size is checked. The node's CPU per event in
        the same benchmark, one node: 1.14 µs before, 0.98 after.
        """
        client = self.clients.get(ident)
        if client is None:
            self._no_session(ident)
            return
        client.last_seen = now
        if client.looker:
            self._error(ident, None, LOOKER_ONLY, "limit")
            return
        cache = self._cache
        pending = self._pending
        unpack = _HEAD.unpack_from
        max_payload = self.max_payload
        acl = self.acl.get(ident) if self.acl else None
        n = len(frame)
        off = 2
        count = 0
        forwarded = 0
        no_interest = 0
        run_plan = NO_PLAN  # the static plan of the run being gathered, from run_start
        run_start = run_end = 0
        # The run being gathered for subscribers here: the route and where it starts and
        # ends, and its records (0: none being gathered).
        near = NOWHERE
        near_start = near_end = near_count = 0
        # The way the record before went, for the next if it repeats its topic, flags and
        # headers: the links it went along (or NO_PLAN), its route when it was delivered
        # here (or None), and whether nothing wanted it. rep_flags -1: no such record.
        rep_flags, rep_topic, rep_hb = -1, b"", b""
        way, unwanted = NO_PLAN, False
        here: Route | None = None
        seen = b""  # the topic of the record before (a stream's second record starts it)
        bad = ""  # why the rest of the frame cannot be read
        try:
            while off < n:
                if off + RECORD_SIZE > n:
                    bad = f"truncated record header at byte {off}"
                    break
                plen, tlen, hlen, flags = unpack(frame, off)
                start = off
                t0 = off + RECORD_SIZE
                end = t0 + tlen + hlen + plen
                if end > n:
                    bad = f"record at byte {off} overruns the frame"
                    break
                off = end
                if (
                    flags == rep_flags
                    and tlen == len(rep_topic)
                    and hlen == len(rep_hb)
                    and plen <= max_payload
                    and frame.startswith(rep_topic, t0)
                    and (not hlen or frame.startswith(rep_hb, t0 + tlen))
                ):
                    count += 1  # a stream: as the record before (see above)
                else:
                    rep_flags = -1
                    if near_count:  # delivered before any answer to this record (its ERR)
                        self._deliver_run(near, frame[near_start:near_end], near_count)
                        near_count = 0
                    topic = frame[t0 : t0 + tlen]
                    if plen > max_payload:
                        self.counters.dropped["payload_too_large"] += 1
                        self._refuse(
                            ident,
                            frame[t0 - 16 : t0],
                            flags,
                            f"payload of {plen} bytes exceeds the limit of "
                            f"{max_payload} bytes; event dropped",
                            "payload",
                        )
                        continue
                    if acl is not None and self._acl_refuses(ident, acl, topic, frame, t0, flags):
                        continue
                    if flags & _MESH_FLAGS:
                        # Node to node only: a client's F_REPLICA went to local subscribers,
                        # yet no other node delivered it, and each kept it as a retained value;
                        # its F_RETAINED_LIVE made every bridge retain it at its broker (review).
                        why = f"flag {flags & _MESH_FLAGS:#04x} is the mesh's own"
                        self._refuse(ident, frame[t0 - 16 : t0], flags, why, "input")
                        continue
                    if hlen and (
                        hlen > MAX_PUBLISH_HEADERS
                        or not self._headers_ok(frame[t0 + tlen : t0 + tlen + hlen])
                    ):
                        # Passed on, it made each subscriber's client drop the whole delivery
                        # frame it came in, good events with it (exploratory test).
                        self.counters.dropped["bad_headers"] += 1
                        self._refuse(
                            ident,
                            frame[t0 - 16 : t0],
                            flags,
                            f"headers block of {hlen} bytes, over {MAX_PUBLISH_HEADERS} (the "
                            "node keeps the rest for its own marks); event dropped"
                            if hlen > MAX_PUBLISH_HEADERS
                            else "malformed headers block; event dropped",
                            "input",
                        )
                        continue
                    route = cache.get(topic)
                    if route is None:
                        route = self._resolve(topic)
                    if type(route) is _Refused:
                        if ident in self.internal:  # in-process actors announce $mesh events
                            route = self._remote_route(topic)
                        if type(route) is _Refused:
                            self.counters.dropped["bad_topic"] += 1
                            self._refuse(
                                ident,
                                frame[t0 - 16 : t0],
                                flags,
                                route.reason,  # type: ignore[union-attr]
                                "topic",
                            )
                            continue
                    count += 1
                    if flags & route.alone_flags or route.alone:  # type: ignore[union-attr]
                        if run_plan is not NO_PLAN:  # (the run's records go first)
                            self._forward_run(run_plan, frame[run_start:run_end])
                            run_plan = NO_PLAN
                        self._route_alone(ident, frame[start:end], topic, flags, route)  # type: ignore[arg-type]
                        continue
                    way, unwanted = route.plan, route.unwanted  # type: ignore[union-attr]
                    here = route if route.local else None  # type: ignore[assignment,union-attr]
                    if topic == seen:  # a stream: what repeats this record goes unasked
                        rep_flags, rep_topic, rep_hb = flags, topic, frame[t0 + tlen : end - plen]
                    seen = topic
                if way is not NO_PLAN:
                    forwarded += len(way.static)
                    if way is run_plan and start == run_end and end - run_start <= MAX_RUN_BYTES:
                        run_end = end
                    else:
                        if run_plan is not NO_PLAN:
                            self._forward_run(run_plan, frame[run_start:run_end])
                        run_plan, run_start, run_end = way, start, end
                if here is not None:
                    if (
                        near_count
                        and here is near
                        and start == near_end
                        and end - near_start <= MAX_RUN_BYTES
                    ):
                        near_end = end
                        near_count += 1
                        continue
                    if near_count:
                        self._deliver_run(near, frame[near_start:near_end], near_count)
                        near_count = 0
                    if here.runs is not None:
                        near, near_start, near_end, near_count = here, start, end, 1
                        continue
                    rec = frame[start:end]
                    for dest, prefix in here.plain:
                        parts = pending.get(dest)
                        if parts is None:
                            pending[dest] = parts = []
                        parts.append(prefix)
                        parts.append(rec)
                    if here.groups:
                        self._to_groups(here, rec)
                elif unwanted:
                    no_interest += 1
        finally:  # records of unfinished runs still go (as they did one by one)
            if run_plan is not NO_PLAN:
                self._forward_run(run_plan, frame[run_start:run_end])
            if near_count:
                self._deliver_run(near, frame[near_start:near_end], near_count)
        if bad:  # after what came before it in the frame
            self.bad_frame(ident, bad)
        client.events_in += count
        self.counters.events_in += count
        self.counters.forwarded_out += forwarded
        self.counters.no_interest += no_interest

    def _route_alone(
        self, ident: bytes, rec: bytes, topic: bytes, flags: int, route: Route
    ) -> None:
        """Route a client's record that goes on its own, not in a run: a persistent or
        logged one (stored first), a request (answered when nothing can), or one whose
        copies need a choice of node per event."""
        event_id = rec[RECORD_SIZE - 16 : RECORD_SIZE]
        if flags & DURABLE_FLAGS or route.log == LOG_ALL:
            stored = self._durable_pub(ident, rec, topic, route)
            if stored is None:
                return  # routed after the pass's commit, or refused
            rec = stored
        plan = route.plan
        if plan is not NO_PLAN:
            self._forward(plan, rec)
        local = (route.plain or route.groups) and not (
            flags & _IMPORTED_REQUEST == _IMPORTED_REQUEST and self._only_its_own(ident, route)
        )
        if local:
            pending = self._pending
            for dest, prefix in route.plain:
                pending.setdefault(dest, []).extend((prefix, rec))
            self._to_groups(route, rec, request=bool(flags & F_REQUEST))
        elif plan.empty:
            self.counters.no_interest += 1
        if flags & F_REQUEST and not (route.answers if local else self._mesh_answers(topic, plan)):
            quiet = bool(local or not plan.empty)  # it went to events-only ones
            # A bridge's import is answered only when nothing at all takes it, as NATS
            # would: its "no responders" (a 503 on NATS) beat a service on the NATS side
            # that would have answered (review).
            if not (quiet and flags & F_IMPORTED):
                self._no_responders(ident, event_id, topic, quiet=quiet)

    def _deliver_run(self, route: Route, run: bytes, count: int) -> None:
        """Queue ``count`` consecutive records (one slice) for each of ``route``'s plain
        subscribers, who all read runs (``route.runs``): one head and one slice each,
        where each record took a prefix and a slice of its own. In `meshctl bench --suite
        mesh`, the CPU per event of the node that delivers a forwarded stream went from
        1.00 µs to 0.68, and of one node that takes and delivers it from 1.03 to ~0.85."""
        pending = self._pending
        if count == 1:  # a head would cost more than the sid
            for dest, prefix in route.plain:
                pending.setdefault(dest, []).extend((prefix, run))
            return
        size = len(run)
        pack = RUN_HEAD.pack
        for dest, head in route.runs:  # type: ignore[union-attr]
            parts = pending.get(dest)
            if parts is None:
                pending[dest] = parts = []
            parts.append(pack(head, count, size))
            parts.append(run)

    def _to_groups(self, route: Route, rec: bytes, *, request: bool = False) -> None:
        """Queue ``rec`` for one member of each of the route's local groups."""
        pending = self._pending
        for g in route.groups:
            dest, prefix = g.pick(request)
            pending.setdefault(dest, []).extend((prefix, rec))

    def _no_responders(
        self, ident: bytes, event_id: bytes, topic: bytes, *, quiet: bool = False
    ) -> None:
        """Tell a requester at once that nothing here or in the mesh can answer;
        ``quiet``: something subscribes, but only to take events (MQTT clients)."""
        body = {"id": event_id.hex(), "topic": topic.decode()}
        if quiet:
            body["why"] = EVENTS_ONLY
        self._send_control(ident, Kind.NORESP, body)

    def _mesh_answers(self, topic: bytes, plan: Plan) -> bool:
        """True when another node may answer a request on ``topic`` (not only MQTT
        subscribers or queues there)."""
        return not plan.empty and self.net.table.route(topic.decode()).answers

    @staticmethod
    def _only_its_own(ident: bytes, route: Route) -> bool:
        """True when a bridge's imported request would reach nothing here but the bridge's
        own export subscription, which drops it (it came from there) and never answers:
        NATS requesters waited out their timeout instead of "no responders" when a bridge
        exported what it imported (exploratory test). Other nodes may still answer."""
        return _local_dests(route) <= {ident}

    def _headers_ok(self, block: bytes) -> bool:
        """``headers_ok``, remembered: a publisher mostly repeats a few header blocks, and
        decoding each cost ~1.9 µs per event on the hot path (review)."""
        if len(block) > 1024:  # kept small: 1,024 blocks of 64 KiB would be 64 MiB
            return headers_ok(block)
        known = self._headers_known
        ok = known.get(block)
        if ok is None:
            if len(known) >= 1024:
                known.clear()
            ok = known[block] = headers_ok(block)
        return ok

    def _forward_run(self, plan: Plan, run: bytes) -> None:
        """Queue a run of records (one slice) for each link of a static plan."""
        link_pending = self._link_pending
        for key in plan.static:
            lp = link_pending.get(key)
            if lp is None:
                link_pending[key] = lp = []
            lp.append(run)

    def _acl_refuses(
        self, ident: bytes, acl: Acl, topic_b: bytes, frame: bytes, t0: int, flags: int
    ) -> bool:
        """Check one publish against the client's permissions (cached per topic); a refusal
        is counted and answered with an error naming the topic and the rule. ``frame``,
        ``t0`` and ``flags``: the record, for the refusal only (this runs per record)."""
        why = publish_verdict(acl, self._acl_seen.setdefault(ident, {}), topic_b)
        if why is None:
            return False
        self.counters.dropped["permission"] += 1
        msg = f"permission denied: {why}; event dropped"
        self._refuse(ident, frame[t0 - 16 : t0], flags, msg, "permission")
        return True

    def _refuse(self, ident: bytes, event_id: bytes, flags: int, error: str, code: str) -> None:
        """Answer a dropped event. A persistent one's error names its id (``ids``): the
        publisher waits for an answer about each id (``confirm``), and without one it
        resent the event forever (an edge's uplink stopped at it for good). A request's
        names it too (``request``): its requester waited out its timeout instead."""
        body: dict[str, Any] = {"ref": None, "error": error, "code": code}
        if flags & F_PERSISTENT:
            body["ids"] = [event_id.hex()]
        elif flags & F_REQUEST:
            body["request"] = event_id.hex()
        self._send_control(ident, Kind.ERR, body)

    def _remote_route(self, topic_b: bytes) -> Route | _Refused:
        """Route of a topic that arrived from another node: its ``$mesh/...`` events are
        fine (and never cached, so a local client cannot ride on them)."""
        if not topic_b.startswith(b"$"):
            return self._resolve(topic_b)
        try:
            topic = topic_b.decode()
            validate_topic(topic)
        except (UnicodeDecodeError, TopicError) as e:
            return _Refused(str(e))
        return self._route_for(topic)

    def _resolve(self, topic_b: bytes) -> Route | _Refused:
        """Compute (and usually cache) the route of a topic seen for the first time."""
        try:
            topic = topic_b.decode()
            validate_publish_topic(topic)
        except UnicodeDecodeError:
            route: Route | _Refused = _Refused("topic is not valid UTF-8")
        except TopicError as e:
            route = _Refused(str(e))
        else:
            route = self._route_for(topic)
            if topic.startswith(INBOX_PREFIX + "/"):
                return route  # one-off reply topics would only flush the cache
        if len(self._cache) >= ROUTE_CACHE_SIZE:
            self._cache.clear()
        self._cache[topic_b] = route
        return route

    def _shared_plan(self, plan: Plan) -> Plan:
        """One Plan object per set of static copies, so that the hot loop can tell by
        identity that consecutive records leave the same way (a run)."""
        if not plan.static or plan.groups:  # grouped plans: a choice per event anyway
            return plan
        if len(self._plans) >= ROUTE_CACHE_SIZE:
            self._plans.clear()
        return self._plans.setdefault((plan.plain, tuple(plan.static)), plan)

    def _route_for(self, topic: str) -> Route:
        plain: list[tuple[bytes, bytes]] = []
        grouped: dict[str, list[tuple[bytes, bytes]]] = {}
        for sub in self.trie.match(topic):
            if sub.group is None:
                plain.append((sub.client, sub.prefix))
            else:
                grouped.setdefault(sub.group, []).append((sub.client, sub.prefix))
        plan = NO_PLAN
        stored_plan = None  # the same as plan unless a queue elsewhere captures the topic
        inbox = topic.startswith(INBOX_PREFIX + "/")
        if inbox:
            target = self._inbox_target(topic)
            if target is not None and target not in plain:
                plain.append(target)
            elif target is None:
                plan = self._inbox_plan(topic)
        else:
            plan = self._shared_plan(self.net.plan(topic, set(grouped)))
            if self.net.table.route(topic).stored:  # a queue elsewhere captures the topic
                stored_plan = self._shared_plan(self.net.plan(topic, set(grouped), stored=True))
        # Sorted so the round-robin order does not depend on set iteration order; a turn
        # per group and members, as Mesh.turn keeps one per group and nodes.
        mute = self.mute
        groups = []
        for name, m in sorted(grouped.items()):
            members = sorted(m)
            key = hash(tuple(members))  # a hash: the tuples of big groups piled up (review)
            turn = turn_of(self._turns, (name, key))
            answering = [x for x in members if x[0] not in mute]
            if 0 < len(answering) < len(members):  # mixed: requests have turns of their own
                asks = turn_of(self._turns, (name, key, "requests"))
                groups.append(_Group(name, members, turn, answering, asks))
            else:
                groups.append(_Group(name, members, turn))
        answers = inbox or self._answers(plain, groups, topic)
        durable = self.durable
        if durable is None or inbox:
            return Route(plain, groups, plan, answers=answers, readers=self.readers)
        queues = list(durable.queues.trie.match(topic))
        log = durable.wants_log(topic)
        return Route(
            plain, groups, plan, log, queues, stored_plan, answers=answers, readers=self.readers
        )

    def _answers(self, plain: list[tuple[bytes, bytes]], groups: list[_Group], topic: str) -> bool:
        """True when a subscriber here that may answer, or another node's, matches."""
        mute = self.mute
        return (
            any(d not in mute for d, _ in plain)
            or any(d not in mute for g in groups for d, _ in g.members)
            or self.net.table.route(topic).answers
        )

    def _others_answer(self, ident: bytes, frame: bytes) -> bool:
        """True for a bridge's "no responders" (its remote side had none) to a request
        that something else may answer: it is withheld. It beat a mesh responder that took
        0.2 s, and the requester heard "no responders" (exploratory test). Alone, the
        bridge's answer is the mesh's, and goes at once. For a requester on another node,
        only what is here is weighed: that node weighs the rest (``_none_withheld``)."""
        try:
            ev = decode_event(frame, 2, len(frame))
        except CodecError:
            return False
        # The requester's node weighs the other nodes' answers; one that predates that
        # (a mesh being upgraded) passed ours on at once, beating a responder: for its
        # requesters we weigh them here, as before (rolling-upgrade test).
        node = inbox_node(ev.topic)
        held = self.net.table.states.get(node) if node is not None else None
        mesh = node == self.node_id or held is None or NONE_AT not in held.features
        return self._withhold_none(ev, ident, mesh=mesh)

    def _none_withheld(self, rec: bytes) -> bool:
        """For a forwarded reply flagged as an error: True when it is another node's
        bridge saying "no responders" to a request of a client here that something else
        may still answer. Only here are the requester and every answer known: the bridge's
        node counted this node's own bridge, the requester, as a responder, and a NATS
        requester timed out (exploratory test)."""
        try:
            ev = decode_event(rec, 0, len(rec))
        except CodecError:
            return False
        node = ev.headers.get(NO_RESPONDERS_AT)
        if node is None or not ev.topic.startswith(self._inbox):
            return False
        return self._withhold_none(ev, node, mesh=True)

    def _withhold_none(self, ev: Event, said_by: bytes | str, *, mesh: bool) -> bool:
        """Whether a "no responders" answer (from bridge ``said_by`` here, or from node
        ``said_by``) waits for others that may answer: clients here, and with ``mesh``
        other nodes. Answers are gathered per request: the last one due goes (review: two
        NATS bridges exporting one topic held back each other's)."""
        if not ev.says_no_responders:
            return False
        topic = ev.headers[NO_RESPONDERS_FOR]
        route = self._resolve(topic.encode())
        if type(route) is _Refused:
            return False
        if ev.topic.startswith(self._inbox) and not route.answers:  # type: ignore[union-attr]
            # We said "no responders" at once ourselves (only subscribers that cannot
            # answer, such as an MQTT bridge, which says so too for older requester nodes)
            return True
        due: set[bytes | str] = set(_local_dests(route) - self.mute)  # type: ignore[arg-type]
        requester = self._inbox_target(ev.topic)  # it asked: it will not answer (review)
        if requester is not None:
            due.discard(requester[0])
        if mesh and not route.plan.empty:  # type: ignore[union-attr]
            due |= self.net.table.route(topic).responders
        said = self._said_none.pop(ev.topic, set()) | {said_by}
        if due <= said:
            return False  # the last answer due: it goes
        self._said_none[ev.topic] = said
        if len(self._said_none) > 10_000:  # requests whose other answers never came
            del self._said_none[next(iter(self._said_none))]
        self.counters.no_responders_withheld += 1
        return True

    def _inbox_target(self, topic: str) -> tuple[bytes, bytes] | None:
        """``_INBOX/<node>/<client>/...`` goes straight to that client's inbox (sid 0)."""
        if not topic.startswith(self._inbox):
            return None
        client_id = topic[len(self._inbox) :].split("/", 1)[0]
        ident = self.by_client_id.get(client_id)
        return None if ident is None else (ident, SID.pack(0))

    def has_interest(self, topic: str) -> bool:
        """True if anything would receive an event on ``topic`` (for operator views)."""
        route = self._route_for(topic)
        return bool(route.plain or route.groups)

    def emit_system(self, topic: str, body: dict[str, Any], now: float) -> None:
        """Publish one of the node's own ``$mesh/...`` events to whoever listens."""
        payload = json.dumps({"node": self.node_id, "node_name": self.name, **body}).encode()
        self._seq += 1
        rec = encode_record(
            topic.encode(),
            payload,
            b"",
            0,
            self.wall_ns(),
            self._origin + self._seq.to_bytes(8, "big"),
        )
        route = self._route_for(topic)
        for dest, prefix in route.plain + [g.pick() for g in route.groups]:
            self._pending.setdefault(dest, []).extend((prefix, rec))
        if self._held_system:
            self._release_held(now)  # the older ones first: in order (review)
        sent: tuple[set[str], set[str]] = (set(), set())  # nodes, and groups, it went to
        if not route.plan.empty:
            self._forward(route.plan, rec)
            sent[0].update(route.plan.plain)
            sent[1].update(g for g, _ in route.plan.groups)
        if topic.startswith(_HELD_TOPICS) and len(self._held_system) < MAX_HELD_SYSTEM:
            # Nodes that want it may not be known yet, only because the states of a link
            # that is coming up have not arrived: a new node's own link/up and node/up
            # never reached $mesh subscribers elsewhere (exploratory test), and a restarted
            # node's reached those behind one neighbour only, the first whose state came
            # (plant scenario). Kept a moment, for the nodes that turn up meanwhile. Only
            # the mesh's own changes: a burst of client events would crowd them out.
            self._held_system.append((rec, topic, now + SYSTEM_HOLD, sent))

    def tick(self, now: float) -> None:
        """Timers: the durable side's, held $mesh events, full links' drops untold."""
        DurableSide.tick(self, now)
        self.notice_full_links(now)
        for ident in list(self._untold_slow):
            client = self.clients.get(ident)
            if client is None:
                self._untold_slow.discard(ident)
            else:
                self._notice_slow(client, now)
        if self._held_system:
            self._release_held(now)

    def _release_held(self, now: float) -> None:
        """Send the held $mesh events on to the nodes that want them now and have not had
        them; forget the expired ones."""
        held, self._held_system = self._held_system, []
        plans: dict[str, Plan] = {}  # a few topics, many events: one route each
        for rec, topic, until, (nodes, groups) in held:
            plan = plans.get(topic)
            if plan is None:
                plan = plans[topic] = self._route_for(topic).plan
            new = [n for n in plan.plain if n not in nodes]
            if new:
                self._forward(self.net.broadcast_plan(new), rec)
                nodes.update(new)
            new_groups = [(g, m) for g, m in plan.groups if g not in groups]
            if new_groups:  # one member of each (review: groups got none)
                self._forward(self.net.group_plan((), new_groups), rec)
                groups.update(g for g, _ in new_groups)
            if now < until:
                self._held_system.append((rec, topic, until, (nodes, groups)))

    # ---- output ------------------------------------------------------------------------

    def _send_control(self, ident: bytes, kind: Kind, body: dict[str, Any]) -> None:
        parts = self._pending.pop(ident, None)
        if parts:  # keep order: data routed to this client before the control reply
            self._control.extend((ident, f, n) for f, n in frames_counted(parts))
        self._control.append((ident, encode_control(kind, body), 0))

    def _error(self, ident: bytes, ref: object, error: str, code: str) -> None:
        self._send_control(ident, Kind.ERR, {"ref": ref, "error": error, "code": code})

    def take_output(self) -> Iterator[tuple[Via, bytes, int]]:
        """Everything to send now as (destination, frame, events for a client), control first.

        A destination is a ROUTER identity (bytes: a client or a node that dialed us) or the
        URL of a link we dialed (str). Link frames count 0 events.
        """
        if self._interest_changes:
            changes, self._interest_changes = self._interest_changes, {}
            self.net.change_interest(
                {k for k, held in changes.items() if held and announced(k[0])},
                {k for k, held in changes.items() if not held and announced(k[0])},
            )
        self.net.flush_announcements()
        control, self._control = self._control, []
        yield from control
        link_out, self.net.out = self.net.out, []
        for via, frame in link_out:
            yield via, frame, 0
        pending, self._pending = self._pending, {}
        for ident, parts in pending.items():
            for frame, count in frames_counted(parts):
                yield ident, frame, count
        links, self._link_pending = self._link_pending, {}
        for (via, header), parts in links.items():
            for frame in link_frames(header, parts):
                yield via, frame, 0

    def delivered(self, ident: bytes, count: int) -> None:
        """The loop handed ``count`` events to ``ident``'s queue."""
        self.counters.events_out += count
        client = self.clients.get(ident)
        if client is not None:
            client.events_out += count

    def dropped(self, ident: bytes, count: int, now: float) -> None:
        """``ident``'s queue was full: count the drop and announce it, at most once a second."""
        self.counters.dropped["slow_consumer"] += count
        client = self.clients.get(ident)
        if client is None:
            return
        client.drops.total += count
        self._untold_slow.add(ident)
        self._notice_slow(client, now)

    def _notice_slow(self, client: Client, now: float) -> None:
        """Tell a slow consumer's drops, at most once a second; the rest of a burst goes
        from the timer (a burst said "dropped 1" and never the rest: review)."""
        newly = client.drops.untold(now)
        if not newly:
            return
        self._untold_slow.discard(client.ident)
        self.log(f"slow consumer {client.client_id} ({client.name}): dropped {newly} events")
        self.emit_system(
            "$mesh/slow-consumer",
            {
                "client": client.client_id,
                "name": client.name,
                "dropped": newly,
                "dropped_total": client.drops.total,
            },
            now,
        )

    def idle_clients(self, now: float, idle: float) -> list[bytes]:
        """Clients silent for ``idle`` seconds: the loop probes them to notice the dead."""
        return [c.ident for c in self.clients.values() if now - c.last_seen >= idle]

    # ---- views -------------------------------------------------------------------------

    def view(self, body: dict[str, Any], now: float) -> dict[str, Any]:
        """Answer a STATUS request: the node status, or the peers, mesh or routes view."""
        return views.view(self, body, now)

    def status(self, now: float) -> dict[str, Any]:
        """The node's state for ``meshctl status``; JSON-ready."""
        return views.status(self, now)


def _local_dests(route: Route) -> set[bytes]:
    """Every client or actor here that a route delivers to: plain, or in a group."""
    return {d for d, _ in route.plain} | {d for g in route.groups for d, _ in g.members}
