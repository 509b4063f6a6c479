"""Links between nodes and what travels over them, sans-IO.

A link is a ZeroMQ connection to another node of the same mesh: the dialer's DEALER to the
acceptor's ROUTER. Frames are addressed by ``via``: the ROUTER identity (bytes) for links
that were dialed to us, the dialer's URL (str) for links we dialed. The loop owns the
sockets; this module decides:

- the handshake (LINK -> LINK_OK | LINK_REFUSE): mesh name, protocol version, not
  ourselves, and one link per pair: when two links to one peer come up at once, the one
  dialed by the lower node id survives;
- heartbeats (BEAT/BEAT_ACK, round-trip time) and the dead-link verdict;
- flooding of versioned NodeStates (links + interest) so every node holds the newest state
  of every node (see routing.py);
- forwarding plans: an event goes to the other nodes that want it, one copy per next hop,
  each copy carrying the target nodes it must reach and the queue groups each serves.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from node.codec import NODE_ID_BYTES, Kind, encode_control, encode_targets
from node.drops import Drops, worth_a_line
from node.mesh_states import Interest, StatesSide
from node.routing import CAPTURE, FEATURES, QUIET, MeshRoute, MeshTable, NodeState

PROTO: Final = 1
REFUSALS_LOGGED: Final = 20  # link refusals logged one by one, then every 1000th
MAX_HOPS_FORWARD: Final = 16  # a forwarded copy travels at most this many links
CONVERGENCE_WINDOW: Final = 10.0  # seconds after a change during which copies may meet
FORGET_AFTER: Final = 600.0  # an unreachable node's state is dropped after this long
SELF: Final = "that is this node itself"
DUPLICATE: Final = "duplicate link: already linked to this node"
# A restarted node always comes back with a newer epoch, so an older one dialing while the
# newer is linked is a second live process with the node's id and key.
CLONE: Final = (
    "this node id is linked from another process started later: "
    "two nodes share one data dir (a copied device?)"
)
HANDSHAKE_INTEREST_BYTES: Final = 256 * 1024  # interest sent in LINK / LINK_OK, else none
WANT_EVERY: Final = 1.0  # seconds between asking again for whole states we lack
RTT_SAMPLE_EVERY: Final = 10  # heartbeat intervals between an accepted link's own beats
BEAT_SLACK: Final = 0.11  # s: the loop's link tick (0.1 s) and a little, on a beat's spacing
Via = bytes | str


@dataclass
class Link:
    """One link that has completed its handshake."""

    peer_id: str
    name: str
    via: Via
    outbound: bool
    found: str  # "static", "mdns" or "inbound"
    address: str
    since: float
    last_rx: float
    last_beat: float = float("-inf")
    peer_beat: float = float("-inf")  # when the peer's last BEAT arrived
    peer_beat_gap: float = float("inf")  # between its last two
    rtt: float | None = None
    # When our unanswered beats went (oldest first): on a congested link the answers wait
    # behind data, and `peers` showed the last round trip (446 ms) for 45 s while none
    # came (lab faults).
    beats: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    drops: Drops = field(default_factory=Drops)  # events its full queue refused
    deltas: bool = False  # the peer takes interest deltas (it said so in its handshake)
    answered: dict[str, float] = field(default_factory=dict)  # node id -> when sent on want


class Turn:
    """Whose turn is next in one queue group, among its members here or its nearest
    nodes: one per group and candidates, outliving routes and plans so that load stays
    even (a plan per topic with a turn of its own sent a stream with a topic per event
    all to one node, and every route-cache flush started the turns over: exploratory
    test; one per group name let a topic only one candidate holds take the others'
    turns: review)."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0


MAX_TURNS: Final = 100_000  # turns kept (then they start over)


def turn_of(turns: dict[Any, Turn], key: Any) -> Turn:
    """The turn kept in ``turns`` under ``key``, made on first use (bounded)."""
    t = turns.get(key)
    if t is None:
        if len(turns) >= MAX_TURNS:
            turns.clear()
        turns[key] = t = Turn()
    return t


@dataclass
class Plan:
    """How an event on one topic leaves this node (computed once per topic, then cached)."""

    static: list[tuple[Via, bytes]]  # (link, routing header) when no group choice is needed
    plain: tuple[str, ...]  # remote nodes with plain interest
    groups: list[tuple[str, tuple[str, ...]]]  # remote-only groups: nearest candidates
    turns: list[Turn] = field(default_factory=list)  # one per group, shared (Mesh.turn)

    @property
    def empty(self) -> bool:
        return not (self.static or self.groups)


NO_PLAN: Final = Plan([], (), [])
_STOPPED: Final = encode_control(Kind.LINK_REFUSE, {"reason": "node stopped"})


class Mesh(StatesSide):
    """This node's view of the mesh: links, node states and forwarding plans."""

    def __init__(
        self,
        *,
        node_id: str,
        name: str,
        mesh: str,
        epoch: int,
        dead_after: float,
        log: Callable[[str], None],
        on_change: Callable[[], None],
        emit: Callable[[str, dict[str, Any], float], None],
    ) -> None:
        self.node_id = node_id
        self.raw_id = bytes.fromhex(node_id)
        self.name = name
        self.mesh = mesh
        self.epoch = epoch
        self.version = 0
        self.dead_after = dead_after
        self.log = log
        self.on_change = on_change  # drops the router's route cache
        self.emit = emit
        self.table = MeshTable(node_id)
        self._turns: dict[tuple[str, tuple[str, ...]], Turn] = {}  # remote groups (see turn)
        self.links: dict[str, Link] = {}
        self.by_via: dict[Via, str] = {}
        self.interest: set[tuple[str, str | None]] = set()  # changed in place
        self.endpoints: tuple[str, ...] = ()
        self.out: list[tuple[Via, bytes]] = []
        self.closed: list[Via] = []  # outbound links the loop must close
        self.refusals: dict[Via, str] = {}  # last refusal reason per dialer, for `peers`
        self.known_dialers: dict[Via, str] = {}  # dialer URL -> peer id once learned
        self.peer_addresses: dict[bytes, str] = {}  # ROUTER identity -> remote IP (bounded)
        self.proof: dict[str, Any] | None = None  # our signed membership (secured nodes)
        self.counters = {
            "links_refused": 0,
            "hop_limit": 0,
            "no_route": 0,
            "bad_states": 0,
            "state_too_large": 0,  # states left out: no receiver would accept the frame
        }
        self._dirty = False
        self._announced: NodeState | None = None  # our last state sent to the links
        self._next_want = 0.0  # when to ask again for the whole states we lack
        self._unannounced: tuple[Interest, Interest] = (set(), set())  # changes since then
        self._up: set[str] = set()  # nodes reachable at the last topology change
        self._changed_at = float("-inf")
        self._unreachable_since: dict[str, float] = {}

    # ---- our own state -------------------------------------------------------------------

    def state(self) -> NodeState:
        return NodeState(
            self.node_id,
            self.name,
            self.epoch,
            self.version,
            frozenset(self.links),
            self.interest,
            self.endpoints,
            FEATURES,
        )

    def _handshake_state(self) -> dict[str, Any]:
        """Our state for LINK / LINK_OK, which a peer decodes before it knows we are a
        member: without the interest when that is large. Nothing is lost: once linked,
        each side announces its whole state (STATES, a newer version) at once."""
        obj = self.state().to_json()
        if len(json.dumps(obj["interest"], separators=(",", ":"))) > HANDSHAKE_INTEREST_BYTES:
            obj["interest"] = []
            obj["partial"] = True  # no delta may build on this; the peer asks for the rest
        return obj

    def hello(self) -> bytes:
        """The LINK frame a dialer sends first."""
        body = {"mesh": self.mesh, "proto": PROTO, "node": self._handshake_state()}
        body["deltas"] = True  # we take interest deltas (routing.InterestDelta)
        if self.proof is not None:
            body["member"] = self.proof
        return encode_control(Kind.LINK, body)

    # ---- handshake -----------------------------------------------------------------------

    def _check_peer(self, body: dict[str, Any]) -> tuple[NodeState | None, str]:
        if body.get("mesh") != self.mesh:
            return None, f"mesh {body.get('mesh')!r} is not this node's mesh {self.mesh!r}"
        if body.get("proto") != PROTO:
            return None, f"protocol {body.get('proto')!r} is not supported (this node: {PROTO})"
        try:
            state = NodeState.from_json(body.get("node"))
        except ValueError as e:
            return None, str(e)
        if state.node_id == self.node_id:
            return None, SELF
        return state, ""

    def on_link_request(self, via: bytes, body: dict[str, Any], address: str, now: float) -> None:
        """A node dialed us: accept (LINK_OK) or refuse with a reason it will log."""
        state, why = self._check_peer(body)
        if state is not None:
            existing = self.links.get(state.node_id)
            known = self.table.states.get(state.node_id)
            if existing is not None and existing.via != via:
                # One link per pair: the link dialed by the lower node id survives,
                # unless the peer restarted (a newer epoch): then its old link is dead.
                if known is not None and state.epoch < known.epoch:
                    # A cloned data dir: each copy took the other's place by turns, and
                    # the older showed "duplicate link" for ever (exploratory test).
                    why = CLONE
                elif self._restarted(state):
                    self._link_down(existing, "peer restarted", now)
                elif state.node_id < self.node_id and existing.outbound:
                    self._link_down(existing, "replaced by the peer's link", now)
                else:
                    why = DUPLICATE
        if state is None or why:
            n = self.counters["links_refused"] = self.counters["links_refused"] + 1
            # Rate-limited, and the peer's words cut short: anyone who reaches the port can
            # send LINK frames (found in review: 151 lines in a second, one of 70,100 chars).
            if worth_a_line(n, REFUSALS_LOGGED):
                shown = why if len(why) <= 200 else why[:200] + "..."
                self.log(f"refused link from {address or via.hex()}: {shown} (total {n})")
            refusal: dict[str, Any] = {"reason": why}
            if why in (SELF, DUPLICATE):  # who we are: the dialer stands by instead of
                refusal["node"] = self.node_id  # dialing again for ever (exploratory test)
            self.out.append((via, encode_control(Kind.LINK_REFUSE, refusal)))
            return
        assert state is not None
        address = address or self._inbound_address(via, state)
        ok: dict[str, Any] = {"node": self._handshake_state(), "deltas": True}
        if self.proof is not None:
            ok["member"] = self.proof
        self.out.append((via, encode_control(Kind.LINK_OK, ok)))
        self._link_up(
            state,
            via,
            outbound=False,
            found="inbound",
            address=address,
            now=now,
            deltas=body.get("deltas") is True,
            partial=_partial(body),
        )

    def on_link_ok(self, via: str, body: dict[str, Any], found: str, now: float) -> None:
        """Our dial was accepted."""
        state, why = self._check_peer({"mesh": self.mesh, "proto": PROTO, **body})
        if state is None:
            self.refuse_outbound(via, why)
            return
        existing = self.links.get(state.node_id)
        if existing is not None and existing.via != via:
            if self._restarted(state):
                self._link_down(existing, "peer restarted", now)
            elif self.node_id < state.node_id:
                self._link_down(existing, "replaced by our own link", now)
            else:
                self.refuse_outbound(via, DUPLICATE)
                return
        self.refusals.pop(via, None)
        self._link_up(
            state,
            via,
            outbound=True,
            found=found,
            address=via,
            now=now,
            deltas=body.get("deltas") is True,
            partial=_partial(body),
        )

    def note_address(self, via: bytes, ip: str) -> None:
        """A node dialing us from ``ip`` (as the socket saw it), for its link's address."""
        if len(self.peer_addresses) > 1000:
            self.peer_addresses.clear()
        self.peer_addresses[via] = ip

    def _inbound_address(self, via: bytes, state: NodeState) -> str:
        """The dialer's IP as the socket saw it, with the port it says it listens on."""
        ip = self.peer_addresses.pop(via, "")
        port = state.endpoints[0].rsplit(":", 1)[-1] if state.endpoints else "?"
        if ip:
            return f"tcp://{ip}:{port}"
        return state.endpoints[0] if state.endpoints else "?"

    def _restarted(self, state: NodeState) -> bool:
        known = self.table.states.get(state.node_id)
        return known is not None and state.epoch > known.epoch

    def refuse_outbound(self, via: str, why: str, peer: object = None) -> None:
        """Our dial failed the handshake: log, remember why, and have the loop close it.
        ``peer``: the refusing node's id, when it says it is linked with us already or is
        this node: the dialer then stands by (its row in `peers` merges into the link's)."""
        if isinstance(peer, str) and len(peer) == 16:
            self.known_dialers[via] = peer
        self.counters["links_refused"] += 1
        if self.refusals.get(via) != why:
            self.log(f"link to {via} refused: {why}")
        self.refusals[via] = why
        self.closed.append(via)

    def _link_up(
        self,
        state: NodeState,
        via: Via,
        *,
        outbound: bool,
        found: str,
        address: str,
        now: float,
        deltas: bool = False,
        partial: bool = False,
    ) -> None:
        link = Link(state.node_id, state.name, via, outbound, found, address, now, now)
        link.deltas = deltas
        self.links[state.node_id] = link
        self.by_via[via] = state.node_id
        if outbound:
            self.known_dialers[via] = state.node_id
        if self.table.update(state, partial=partial) and not partial:
            # Newer than what we held: the other links hear of it as from any STATES
            # (the peer's own next announcement may never come if it keeps this version).
            self._flood(via, {state.node_id: state.to_json()}, {})
        self.table.set_neighbours(self.links)
        self.log(f"link up: {state.name} ({state.node_id}) via {address}")
        self.emit(
            "$mesh/link/up",
            {"peer": state.node_id, "peer_name": state.name, "address": address},
            now,
        )
        # Give the new neighbour everything we know; everyone else learns of the link.
        whole = [s.to_json() for n, s in self.table.states.items() if n not in self.table.partial]
        for frame in self._states_frames(whole):
            self.out.append((via, frame))
        self._announce()
        self._topology_changed(now)

    def _link_down(self, link: Link, why: str, now: float) -> None:
        self.links.pop(link.peer_id, None)
        self.by_via.pop(link.via, None)
        if link.outbound:
            self.closed.append(link.via)
        self.table.set_neighbours(self.links)
        self.log(f"link down: {link.name} ({link.peer_id}): {why}")
        self.emit(
            "$mesh/link/down", {"peer": link.peer_id, "peer_name": link.name, "reason": why}, now
        )
        self._announce()
        self._topology_changed(now)

    def goodbye(self) -> None:
        """This node stops: tell every link, which goes down at once on the other side.
        Its dialer took a stopped peer for a full link (its queue refused events, counted
        as link_full) until the heartbeats' silence, 2.5 s later (plant scenario)."""
        for link in self.links.values():
            self.out.append((link.via, _STOPPED))

    def drop_via(self, via: Via, why: str, now: float) -> None:
        """The loop lost a link's socket (unreachable identity, closed dialer)."""
        peer = self.by_via.get(via)
        if peer is not None:
            self._link_down(self.links[peer], why, now)

    def converging(self, now: float) -> bool:
        """True for CONVERGENCE_WINDOW after this node last saw the mesh change: views may
        differ, so copies of an event may meet and the duplicate window must run."""
        return now - self._changed_at < CONVERGENCE_WINDOW

    def _topology_changed(self, now: float) -> None:
        """Drop cached routes; announce nodes that became reachable or unreachable."""
        self._changed_at = now
        self.on_change()
        reachable = set(self.table.paths())
        for node_id in sorted(reachable - self._up):
            name = self.table.states[node_id].name
            self.log(f"node reachable: {name} ({node_id})")
            self.emit("$mesh/node/up", {"peer": node_id, "peer_name": name}, now)
        for node_id in reachable:
            self._unreachable_since.pop(node_id, None)
        for node_id in sorted(self._up - reachable):
            self._unreachable_since[node_id] = now
            state = self.table.states.get(node_id)
            name = state.name if state else node_id
            self.log(f"node unreachable: {name} ({node_id})")
            self.emit("$mesh/node/down", {"peer": node_id, "peer_name": name}, now)
        # Nodes announced but never reachable are forgotten too, or a peer could grow the
        # table with every id it makes up.
        for node_id in self.table.states.keys() - reachable - self._unreachable_since.keys():
            self._unreachable_since[node_id] = now
        self._up = reachable

    # ---- control traffic on links ------------------------------------------------------------

    def is_link(self, via: Via) -> bool:
        return via in self.by_via

    def on_beat(self, via: Via, kind: Kind, body: dict[str, Any], now: float) -> None:
        link = self.links.get(self.by_via.get(via, ""))
        if link is None:
            return
        link.last_rx = now
        if kind == Kind.BEAT:
            link.peer_beat_gap, link.peer_beat = now - link.peer_beat, now
            self.out.append((via, encode_control(Kind.BEAT_ACK, {"t": body.get("t")})))
        elif isinstance(body.get("t"), int | float):
            with contextlib.suppress(OverflowError):  # a peer's nonsense must not raise
                t = float(body["t"])
                link.rtt = max(0.0, now - t)
                beats = link.beats
                while beats and beats[0] <= t:
                    beats.popleft()

    def heard(self, via: Via, now: float) -> None:
        """Any frame on a link proves it alive."""
        peer = self.by_via.get(via)
        if peer is not None:
            self.links[peer].last_rx = now

    def tick(self, now: float, interval: float) -> None:
        """Heartbeat links; declare silent links dead; forget nodes unreachable for
        FORGET_AFTER so the table does not grow with every id ever seen.

        The side that dialed a link beats each ``interval`` and the other answers: that
        proves both alive. The accepting side leaves out its own beats while the peer's
        arrive at least as often as ours would (spacing within ``interval`` and a tick),
        but for one every RTT_SAMPLE_EVERY intervals to sample the round trip; otherwise
        it beats every interval as both sides always did. Heartbeat settings are per
        node: waiting for silence instead lost live links to slower-beating dialers
        whenever the round trip came on top of the wait (found in two reviews). Both
        sides beating every interval was twice the frames for the same verdicts: 1.65%
        of a core per idle node in a 16-node full mesh, 1.15% now.
        """
        for node_id in [n for n, t in self._unreachable_since.items() if now - t > FORGET_AFTER]:
            del self._unreachable_since[node_id]
            if node_id not in self._up:
                self.table.forget(node_id)
                self.on_change()
        if self.table.partial and now >= self._next_want:
            self._next_want = now + WANT_EVERY
            self._want_partial()
        regular = interval + BEAT_SLACK  # the peer beats at least this often: we need not
        for link in list(self.links.values()):
            if now - link.last_rx > self.dead_after:
                self._link_down(link, f"silent for {now - link.last_rx:.1f}s", now)
                continue
            since_beat = now - link.last_beat
            if since_beat >= interval and (
                link.outbound
                or max(link.peer_beat_gap, now - link.peer_beat) > regular
                or since_beat >= RTT_SAMPLE_EVERY * interval
            ):
                link.last_beat = now
                link.beats.append(now)
                self.out.append((link.via, encode_control(Kind.BEAT, {"t": now})))

    # ---- forwarding --------------------------------------------------------------------------

    def plan(self, topic: str, local_groups: set[str], *, stored: bool = False) -> Plan:
        """Which links an event on ``topic`` published here leaves by (cacheable).
        ``stored``: the plan of a persistent event, which also goes to the nodes whose
        queues capture the topic; other events (requests too) do not, since nothing there
        would take them."""
        route = self.table.route(topic)
        plain = tuple(sorted(route.plain + route.stored)) if stored else route.plain
        if plain == () and route.groups == ():
            return NO_PLAN
        groups = [(g, nodes) for g, nodes in route.groups if g not in local_groups]
        if groups:
            return self.group_plan(plain, groups)
        return Plan(self._split([(n, ()) for n in plain], 0), plain, [])

    def group_plan(self, plain: tuple[str, ...], groups: list[tuple[str, tuple[str, ...]]]) -> Plan:
        """A plan with a choice of node per event for each remote-only group (``dynamic``),
        and a copy for each of ``plain``."""
        return Plan([], plain, groups, [self.turn(g, nodes) for g, nodes in groups])

    def turn(self, group: str, nodes: tuple[str, ...]) -> Turn:
        """The turn of queue group ``group`` among ``nodes``, its nearest holders of some
        topic: shared by every topic with those candidates. One turn per group name was
        not enough: a topic that only one of them holds moved it on too, and a poller
        alternating such a topic with one both hold sent all of the latter to one node
        (review)."""
        return turn_of(self._turns, (group, nodes))

    def inbox_plan(self, node_id: str) -> Plan:
        """Replies go straight to the requester's node, never announced as interest."""
        if node_id not in self.table.paths():
            return NO_PLAN
        return Plan(self._split([(node_id, ())], 0), (node_id,), [])

    def broadcast_plan(self, nodes: list[str]) -> Plan:
        """One copy per next hop to reach every node of ``nodes`` (retained values)."""
        reachable = self.table.paths()
        targets = sorted(n for n in nodes if n in reachable)
        if not targets:
            return NO_PLAN
        return Plan(self._split([(n, ()) for n in targets], 0), tuple(targets), [])

    def dynamic(self, plan: Plan) -> list[tuple[Via, bytes]]:
        """Per-event choice of one nearest member node per remote-only queue group."""
        assign: dict[str, list[str]] = {n: [] for n in plan.plain}
        for (group, nodes), turn in zip(plan.groups, plan.turns, strict=True):
            n = turn.n
            turn.n = n + 1
            assign.setdefault(nodes[n % len(nodes)], []).append(group)
        return self._split([(n, tuple(g)) for n, g in assign.items()], 0)

    def _split(
        self, targets: list[tuple[str, tuple[str, ...]]], hops: int
    ) -> list[tuple[Via, bytes]]:
        """Group targets by next hop: one routing header (and one copy) per link."""
        by_hop: dict[str, list[tuple[bytes, tuple[str, ...]]]] = {}
        for node, groups in targets:
            hop = self.table.next_hop(node)
            if hop is None or hop not in self.links:
                self.counters["no_route"] += 1
                continue
            by_hop.setdefault(hop, []).append((bytes.fromhex(node), groups))
        out = []
        for hop, tl in sorted(by_hop.items()):
            via = self.links[hop].via
            chunk: list[tuple[bytes, tuple[str, ...]]] = []
            chunk_bytes = 0
            for raw, groups in tl:
                # A header holds 255 entries of 255 groups each; a node with more groups
                # takes several entries, always in the same header so it gets one copy.
                entries = [(raw, groups[i : i + 255]) for i in range(0, len(groups), 255)]
                entries = entries or [(raw, ())]
                size = sum(9 + sum(1 + len(g.encode()) for g in gs) for _, gs in entries)
                if chunk and (len(chunk) + len(entries) > 255 or chunk_bytes + size > 60_000):
                    out.append((via, encode_targets(hops, chunk)))
                    chunk, chunk_bytes = [], 0
                chunk += entries[:255]
                chunk_bytes += size
            if chunk:
                out.append((via, encode_targets(hops, chunk)))
        return out

    def onward(
        self, targets: list[tuple[bytes, tuple[str, ...]]], hops: int
    ) -> tuple[tuple[str, ...] | None, list[tuple[Via, bytes]]]:
        """For a forwarded event: the groups this node serves (None: not a target) and the
        copies to pass on. Events beyond the hop limit go no further."""
        mine: tuple[str, ...] | None = None
        rest: dict[str, tuple[str, ...]] = {}
        for node, groups in targets:  # a node may take several entries (many groups)
            if node == self.raw_id:
                mine = (mine or ()) + groups
            elif len(node) == NODE_ID_BYTES:
                key = node.hex()
                rest[key] = rest.get(key, ()) + groups
        if rest and hops + 1 >= MAX_HOPS_FORWARD:
            self.counters["hop_limit"] += 1
            rest = {}
        return mine, self._split(list(rest.items()), hops + 1) if rest else []

    # ---- views ---------------------------------------------------------------------------

    def peers_view(self, now: float) -> list[dict[str, Any]]:
        out = []
        for link in sorted(self.links.values(), key=lambda x: x.name):
            out.append(
                {
                    "id": link.peer_id,
                    "name": link.name,
                    "address": link.address,
                    "found": link.found,
                    "state": "up",
                    "rtt_ms": None if link.rtt is None else round(link.rtt * 1000, 3),
                    # the oldest beat still unanswered: a round trip at least this long
                    "waiting_ms": round((now - link.beats[0]) * 1000, 3) if link.beats else 0.0,
                    "dropped": link.drops.total,
                    "age_s": round(now - link.since, 3),
                }
            )
        return out

    def mesh_view(self, now: float) -> dict[str, Any]:
        paths = self.table.paths()
        nodes = [
            {
                "id": self.node_id,
                "name": self.name,
                "self": True,
                "reachable": True,
                "hops": 0,
                "links": sorted(self.links),
                "interest": len(self.interest),
                "endpoints": list(self.endpoints),
            }
        ]
        for node_id, s in sorted(self.table.states.items(), key=lambda kv: kv[1].name):
            nodes.append(
                {
                    "id": node_id,
                    "name": s.name,
                    "self": False,
                    "reachable": node_id in paths,
                    "hops": paths[node_id][0] if node_id in paths else None,
                    "links": sorted(s.links),
                    "interest": len(s.interest),
                    "endpoints": list(s.endpoints),
                }
            )
        # Seconds until this node holds the mesh stable again (0: stable): until then a
        # forwarded event is checked against the duplicate window, as copies may meet.
        settling = max(0.0, CONVERGENCE_WINDOW - (now - self._changed_at))
        return {"nodes": nodes, "converging_s": round(settling, 3)}

    def explain(self, topic: str, local: list[dict[str, Any]]) -> dict[str, Any]:
        """What ``meshctl routes TOPIC`` shows: matching nodes, groups and each copy's path."""
        names = {n: s.name for n, s in self.table.states.items()}
        names[self.node_id] = self.name
        route: MeshRoute = self.table.route(topic)
        remote = []
        matches = self.table.matches(topic)
        plain = {node for node, group in matches if group is None}
        for node, group in matches:
            if group is not None and group.startswith(QUIET) and node in plain:
                continue  # it has a subscriber that may answer too: listed as plain (review)
            path = self.table.path_to(node)
            stored = group is not None and group.startswith(CAPTURE)
            quiet = group is not None and group.startswith(QUIET)
            remote.append(
                {
                    "node": node,
                    "name": names.get(node, node),
                    "group": None if stored or quiet else group,
                    "queues": stored,  # persistent events only, to store
                    "requests": not (stored or quiet),  # its subscribers may answer
                    "reachable": bool(path),
                    "path": [names.get(h, h) for h in path],
                }
            )
        return {
            "topic": topic,
            "local": local,
            "remote": remote,
            "copies": [
                {
                    "next_hop": names.get(h, h),
                    "nodes": [names.get(n, n) for n in ns],
                    # of those, nodes that get only persistent events, for their queues
                    "queues_only": [names.get(n, n) for n in ns if n in route.stored],
                }
                for h, ns in self._copies(route)
            ],
            "groups": [
                {"group": g, "nearest": [names.get(n, n) for n in ns]} for g, ns in route.groups
            ],
        }

    def _copies(self, route: MeshRoute) -> list[tuple[str, list[str]]]:
        by_hop: dict[str, list[str]] = {}
        for node in route.plain + route.stored:
            hop = self.table.next_hop(node)
            if hop is not None:
                by_hop.setdefault(hop, []).append(node)
        return sorted(by_hop.items())


def _partial(body: dict[str, Any]) -> bool:
    """The handshake left the peer's interest out (it holds too many patterns)."""
    node = body.get("node")
    return isinstance(node, dict) and node.get("partial") is True
