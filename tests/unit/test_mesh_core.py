"""The sans-IO Mesh: handshake, one link per pair, heartbeats, flooding and forwarding plans.

Several Mesh objects talk through a tiny in-test wire that hands each ``out`` frame to the
peer's handler, as the loop and Router would; time is passed explicitly, nothing sleeps.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.codec import Kind, decode_control, decode_targets
from node.mesh import FORGET_AFTER, MAX_HOPS_FORWARD, NO_PLAN, PROTO, Mesh, Via
from node.routing import FEATURES, NodeState, capture_group, quiet_group

MESH = "m"
A, B, C, D, E = (f"{c}000000000000000" for c in "abcde")
S = "5000000000000000"
LOW = "1000000000000000"  # the only id lower than S
NAMES = {A: "alpha", B: "bravo", C: "charlie", D: "delta", E: "echo", S: "self", LOW: "low"}

# ---- helpers ------------------------------------------------------------------------------


class Node:
    """A Mesh plus what it logged, emitted and how often it dropped its route cache."""

    def __init__(self, node_id: str, *, epoch: int = 1, dead_after: float = 3.0) -> None:
        self.logs: list[str] = []
        self.events: list[tuple[str, dict[str, Any], float]] = []
        self.changes = 0
        self.mesh = Mesh(
            node_id=node_id,
            name=NAMES[node_id],
            mesh=MESH,
            epoch=epoch,
            dead_after=dead_after,
            log=self.logs.append,
            on_change=self._changed,
            emit=lambda topic, body, now: self.events.append((topic, body, now)),
        )

    def _changed(self) -> None:
        self.changes += 1

    @property
    def id(self) -> str:
        return self.mesh.node_id

    def emitted(self, topic: str) -> list[dict[str, Any]]:
        return [body for t, body, _ in self.events if t == topic]

    def take(self) -> list[tuple[Via, Kind, dict[str, Any]]]:
        """Decode and clear the control frames this node queued."""
        out, self.mesh.out = self.mesh.out, []
        return [(via, *decode_control(frame)) for via, frame in out]


def state(
    node_id: str, links: Any = (), interest: Any = (), *, epoch: int = 1, version: int = 1
) -> NodeState:
    return NodeState(
        node_id, NAMES.get(node_id, node_id), epoch, version, frozenset(links), frozenset(interest)
    )


def link_body(st_: NodeState, *, mesh: str = MESH, proto: Any = PROTO) -> dict[str, Any]:
    return {"mesh": mesh, "proto": proto, "node": st_.to_json()}


def link_in(node: Node, peer: NodeState, now: float = 0.0) -> bytes:
    """``peer`` dials ``node``: return the ROUTER identity the link is known by."""
    via = f"from-{peer.node_id[:1]}".encode()
    node.mesh.on_link_request(via, link_body(peer), "", now)
    assert node.mesh.is_link(via), node.logs
    return via


def targets_of(header: bytes) -> tuple[int, list[tuple[str, tuple[str, ...]]]]:
    """Hops and (node id, groups) of a routing header as encode_targets writes it."""
    assert int.from_bytes(header[:2], "little") == len(header) - 2
    hops, targets = decode_targets(header[2:])
    return hops, [(n.hex(), g) for n, g in targets]


def copies(frames: list[tuple[Via, bytes]]) -> list[tuple[Via, int, list[Any]]]:
    return [(via, *targets_of(h)) for via, h in frames]


class Wire:
    """Connections between Nodes. The dialer addresses the acceptor by URL (a str via), the
    acceptor knows the dialer by ROUTER identity (a bytes via); frames on one connection
    arrive in order. Closing a connection (``mesh.closed``) drops what is still in flight."""

    def __init__(self, *nodes: Node) -> None:
        self.nodes = {n.id: n for n in nodes}
        self.peer_end: dict[tuple[str, Via], tuple[str, Via]] = {}
        self.inbox: dict[tuple[str, Via], deque[bytes]] = {}
        self.dead: set[tuple[str, Via]] = set()

    def dial(self, dialer: Node, acceptor: Node) -> str:
        url = f"tcp://{acceptor.mesh.name}"
        ident = f"{dialer.mesh.name}>{acceptor.mesh.name}".encode()
        self.peer_end[(dialer.id, url)] = (acceptor.id, ident)
        self.peer_end[(acceptor.id, ident)] = (dialer.id, url)
        self.inbox[(acceptor.id, ident)] = deque([dialer.mesh.hello()])
        self.inbox[(dialer.id, url)] = deque()
        return url

    def collect(self) -> None:
        for node in self.nodes.values():
            for via in node.mesh.closed:
                end = (node.id, via)
                self.dead |= {end, self.peer_end[end]}
                for e in (end, self.peer_end[end]):
                    self.inbox[e].clear()
            node.mesh.closed.clear()
            out, node.mesh.out = node.mesh.out, []
            for via, frame in out:
                far = self.peer_end[(node.id, via)]
                if far not in self.dead:
                    self.inbox[far].append(frame)

    def ready(self) -> list[tuple[str, Via]]:
        return sorted((k for k, q in self.inbox.items() if q), key=repr)

    def deliver_one(self, key: tuple[str, Via], now: float) -> None:
        node_id, via = key
        deliver(self.nodes[node_id].mesh, via, self.inbox[key].popleft(), now)
        self.collect()

    def pump(self, now: float) -> None:
        self.collect()
        for _ in range(1000):
            ready = self.ready()
            if not ready:
                return
            for key in ready:
                self.deliver_one(key, now)
        raise AssertionError("the mesh did not go quiet")


def deliver(m: Mesh, via: Via, frame: bytes, now: float) -> None:
    """What Router.handle / handle_dialed do with a frame from another node."""
    kind, body = decode_control(frame)
    if m.is_link(via):
        m.heard(via, now)
        if kind == Kind.STATES:
            m.on_states(via, body, now)
        elif kind in (Kind.BEAT, Kind.BEAT_ACK):
            m.on_beat(via, kind, body, now)
        elif kind == Kind.LINK_REFUSE:
            m.drop_via(via, str(body.get("reason")), now)
        else:
            raise AssertionError(f"unexpected {kind.name} on a link")
    elif isinstance(via, bytes):
        assert kind == Kind.LINK, kind
        m.on_link_request(via, body, "", now)
    elif kind == Kind.LINK_OK:
        m.on_link_ok(via, body, "static", now)
    elif kind == Kind.LINK_REFUSE:
        m.refuse_outbound(via, body["reason"])


def line(now: float = 0.0) -> tuple[Wire, Node, Node, Node]:
    """alpha - bravo - charlie: alpha dials bravo, charlie dials bravo."""
    a, b, c = Node(A), Node(B), Node(C)
    wire = Wire(a, b, c)
    wire.dial(a, b)
    wire.dial(c, b)
    wire.pump(now)
    return wire, a, b, c


# ---- handshake ----------------------------------------------------------------------------


def test_link_request_accepted() -> None:
    n = Node(S)
    via = link_in(n, state(A, [], [("x", None)]), now=0.0)
    out = n.take()
    assert out[0] == (
        via,
        Kind.LINK_OK,
        {"node": NodeState(S, "self", 1, 0, features=FEATURES).to_json(), "deltas": True},
    )
    # The new neighbour is given everything this node knows, then everyone hears the news.
    assert (via, Kind.STATES, {"states": [state(A, [], [("x", None)]).to_json()]}) in out
    assert (via, Kind.STATES, {"states": [n.mesh.state().to_json()]}) in out
    assert n.mesh.state().links == {A}
    assert n.mesh.version == 1
    assert n.mesh.table.paths() == {A: (1, A)}
    assert n.mesh.table.route("x").plain == (A,)
    assert n.emitted("$mesh/link/up") == [{"peer": A, "peer_name": "alpha", "address": "?"}]
    assert n.emitted("$mesh/node/up") == [{"peer": A, "peer_name": "alpha"}]
    assert n.changes >= 1
    (peer,) = n.mesh.peers_view(2.0)
    assert (peer["id"], peer["found"], peer["age_s"], peer["rtt_ms"]) == (A, "inbound", 2.0, None)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (link_body(state(A), mesh="other"), "mesh 'other' is not this node's mesh 'm'"),
        ({"proto": PROTO, "node": state(A).to_json()}, "mesh None is not this node's mesh"),
        (link_body(state(A), proto=2), "protocol 2 is not supported (this node: 1)"),
        (link_body(state(A), proto="1"), "protocol '1' is not supported"),
        (link_body(state(S)), "that is this node itself"),
        ({"mesh": MESH, "proto": PROTO, "node": {"id": "nope"}}, "malformed node state"),
        ({"mesh": MESH, "proto": PROTO}, "malformed node state"),
    ],
    ids=["mesh", "no-mesh", "proto", "proto-str", "self", "bad-state", "no-state"],
)
def test_link_request_refused(body: dict[str, Any], reason: str) -> None:
    n = Node(S)
    n.mesh.on_link_request(b"dialer", body, "tcp://x:1", 0.0)
    ((via, kind, reply),) = n.take()
    assert (via, kind) == (b"dialer", Kind.LINK_REFUSE)
    assert reason in reply["reason"]
    assert not n.mesh.links
    assert not n.mesh.is_link(b"dialer")
    assert n.mesh.counters["links_refused"] == 1
    assert any("refused link from tcp://x:1" in line for line in n.logs)
    assert n.events == []


def test_link_refusals_are_logged_rate_limited_and_cut_short() -> None:
    """Found in review: anyone reaching the port can send LINK frames; each refusal was
    logged with the sender's words in full (151 lines in a second, one of 70,100 chars)."""
    n = Node(S)
    for i in range(2000):
        n.mesh.on_link_request(b"dialer%d" % i, {"mesh": "x" * 70_000}, "", 0.0)
    assert n.mesh.counters["links_refused"] == 2000
    assert 20 <= len(n.logs) <= 22
    assert max(len(line) for line in n.logs) < 400


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"node": state(S).to_json()}, "that is this node itself"),
        ({"node": None}, "malformed node state"),
        ({}, "malformed node state"),
    ],
)
def test_link_ok_refused(body: dict[str, Any], reason: str) -> None:
    n = Node(S)
    for _ in range(2):
        n.mesh.on_link_ok("tcp://x:1", body, "static", 0.0)
    assert n.mesh.closed == ["tcp://x:1", "tcp://x:1"]
    assert reason in n.mesh.refusals["tcp://x:1"]
    assert n.mesh.counters["links_refused"] == 2
    assert len(n.logs) == 1  # the same refusal is logged once
    assert not n.mesh.links


def test_link_ok_brings_the_link_up() -> None:
    n = Node(S)
    n.mesh.refusals["tcp://a:1"] = "earlier"
    n.mesh.on_link_ok("tcp://a:1", {"node": state(A).to_json()}, "mdns", 1.0)
    assert n.mesh.is_link("tcp://a:1")
    assert n.mesh.known_dialers == {"tcp://a:1": A}
    assert "tcp://a:1" not in n.mesh.refusals
    link = n.mesh.links[A]
    assert (link.outbound, link.found, link.address, link.since) == (True, "mdns", "tcp://a:1", 1.0)


# ---- one link per pair ---------------------------------------------------------------------
# S (5...) sits between LOW (1...) and A (a...); the link dialed by the lower id survives.


def test_higher_id_refuses_a_second_link_when_its_own_dial_is_lower() -> None:
    n = Node(S)
    n.mesh.on_link_ok("tcp://a", {"node": state(A).to_json()}, "static", 0.0)  # S dialed A
    n.take()
    n.mesh.on_link_request(b"a-dials", link_body(state(A)), "", 0.5)  # A dials S as well
    ((via, kind, body),) = n.take()
    assert (via, kind) == (b"a-dials", Kind.LINK_REFUSE)
    assert body["reason"] == "duplicate link: already linked to this node"
    assert n.mesh.links[A].via == "tcp://a"


def test_an_older_run_of_a_linked_node_is_told_it_is_a_clone() -> None:
    """A copied data dir started elsewhere: a restarted node always has a newer epoch, so
    an older one dialing while the newer is linked is a second live process. It was told
    "duplicate link" and the two took each other's place by turns (exploratory test)."""
    n = Node(S)
    n.mesh.on_link_request(b"copy", link_body(state(LOW, epoch=2)), "10.0.0.2:1", 0.0)
    n.take()
    n.mesh.on_link_request(b"original", link_body(state(LOW, epoch=1)), "10.0.0.1:1", 0.5)
    assert n.mesh.links[LOW].via == b"copy"  # the one started later keeps its place
    ((via, kind, body),) = n.take()
    assert (via, kind) == (b"original", Kind.LINK_REFUSE)
    assert "two nodes share one data dir" in body["reason"]
    assert "refused link from 10.0.0.1:1: this node id is linked" in n.logs[-1]


def test_lower_peers_dial_replaces_our_outbound_link() -> None:
    n = Node(S)
    n.mesh.on_link_ok("tcp://low", {"node": state(LOW).to_json()}, "static", 0.0)  # S dialed
    n.mesh.on_link_request(b"low-dials", link_body(state(LOW)), "", 0.5)  # LOW dials S
    assert n.mesh.links[LOW].via == b"low-dials"
    assert not n.mesh.is_link("tcp://low")
    assert n.mesh.closed == ["tcp://low"]  # the loop closes our dialer
    (down,) = n.emitted("$mesh/link/down")
    assert down == {"peer": LOW, "peer_name": "low", "reason": "replaced by the peer's link"}


def test_our_lower_dial_replaces_the_peers_inbound_link() -> None:
    n = Node(S)
    link_in(n, state(A))  # A dialed S
    n.mesh.on_link_ok("tcp://a", {"node": state(A).to_json()}, "static", 0.5)  # S's dial to A
    assert n.mesh.links[A].via == "tcp://a"
    assert not n.mesh.is_link(b"from-a")
    assert n.mesh.closed == []  # an inbound link has no dialer of ours to close
    assert n.emitted("$mesh/link/down")[0]["reason"] == "replaced by our own link"


def test_our_higher_dial_is_refused_when_the_peer_already_dialed() -> None:
    n = Node(S)
    link_in(n, state(LOW))  # LOW dialed S
    n.mesh.on_link_ok("tcp://low", {"node": state(LOW).to_json()}, "static", 0.5)
    assert n.mesh.links[LOW].via == b"from-1"
    assert n.mesh.closed == ["tcp://low"]
    assert n.mesh.refusals["tcp://low"] == "duplicate link: already linked to this node"


@given(st.data())
def test_simultaneous_dials_keep_the_lower_ids_link(data: st.DataObject) -> None:
    """A and B dial each other at once; whatever order frames arrive in, both keep A's."""
    a, b = Node(A), Node(B)
    wire = Wire(a, b)
    url_b = wire.dial(a, b)
    url_a = wire.dial(b, a)
    wire.collect()
    for _ in range(200):
        ready = wire.ready()
        if not ready:
            break
        wire.deliver_one(data.draw(st.sampled_from(ready)), 0.0)
    assert not wire.ready()
    assert set(a.mesh.links) == {B}
    assert set(b.mesh.links) == {A}
    assert a.mesh.links[B].via == url_b
    assert b.mesh.links[A].via == b"alpha>bravo"
    assert a.mesh.by_via == {url_b: B}
    assert b.mesh.by_via == {b"alpha>bravo": A}
    assert (b.id, url_a) in wire.dead  # bravo's own dial was closed
    assert a.mesh.table.paths() == {B: (1, B)}
    assert b.mesh.table.paths() == {A: (1, A)}


# ---- heartbeats and dead links ---------------------------------------------------------------


def test_heartbeats_and_round_trip_time() -> None:
    """The side that dialed beats every interval; the answer gives the round trip."""
    n = Node(S, dead_after=3.0)
    via = "tcp://a:1"
    n.mesh.on_link_ok(via, {"node": state(A).to_json()}, "static", 0.0)
    n.take()
    n.mesh.tick(0.5, 1.0)
    assert n.take() == [(via, Kind.BEAT, {"t": 0.5})]
    n.mesh.tick(1.0, 1.0)
    assert n.take() == []  # not yet due
    n.mesh.tick(1.5, 1.0)
    assert n.take() == [(via, Kind.BEAT, {"t": 1.5})]
    n.mesh.on_beat(via, Kind.BEAT, {"t": 9.0}, 1.6)  # an older peer beats too: answered
    assert n.take() == [(via, Kind.BEAT_ACK, {"t": 9.0})]
    n.mesh.on_beat(via, Kind.BEAT_ACK, {"t": 1.5}, 1.75)
    assert n.mesh.links[A].rtt == pytest.approx(0.25)
    assert n.mesh.peers_view(2.0)[0]["rtt_ms"] == 250.0
    n.mesh.on_beat(via, Kind.BEAT_ACK, {"t": "junk"}, 1.8)  # ignored, still heard
    assert n.mesh.links[A].rtt == pytest.approx(0.25)
    assert n.mesh.links[A].last_rx == 1.8


def test_peers_shows_how_long_the_oldest_beat_has_waited_for_its_answer() -> None:
    """Lab faults: on a congested link the answers waited behind data, and `peers` showed
    the last round trip (446 ms) for 45 s while none came."""
    n = Node(S, dead_after=60.0)
    via = "tcp://a:1"
    n.mesh.on_link_ok(via, {"node": state(A).to_json()}, "static", 0.0)
    for t in (0.5, 1.5, 2.5):
        n.mesh.tick(t, 1.0)
    n.mesh.on_beat(via, Kind.BEAT_ACK, {"t": 0.5}, 0.6)
    view = n.mesh.peers_view(10.5)[0]
    assert (view["rtt_ms"], view["waiting_ms"]) == (100.0, 9000.0)  # the beat of 1.5 waits
    n.mesh.on_beat(via, Kind.BEAT_ACK, {"t": 2.5}, 10.6)  # answers come in order
    assert n.mesh.peers_view(10.7)[0]["waiting_ms"] == 0.0


def test_the_accepting_side_beats_only_to_sample_the_round_trip_or_when_not_heard() -> None:
    """The dialer's beats and our answers prove both sides alive: answering is enough
    (half the heartbeat frames) while its beats come at least as often as ours would.
    Our own beats sample the round trip now and then, and go out every interval as
    soon as the dialer's are late."""
    n = Node(S, dead_after=3.0)
    via = link_in(n, state(A), now=0.0)
    n.take()
    n.mesh.tick(0.5, 1.0)
    assert n.take() == [(via, Kind.BEAT, {"t": 0.5})]  # a first sample at once
    beats = []
    for k in range(1, 16):  # the dialer beats every second; we answer
        t = 0.5 + k
        n.mesh.on_beat(via, Kind.BEAT, {"t": t}, t)
        n.mesh.tick(t + 0.01, 1.0)
        for beat in [v for v in n.take() if v[1] == Kind.BEAT]:
            beats.append(beat[2]["t"])
            n.mesh.on_beat(via, Kind.BEAT_ACK, beat[2], t + 0.1)
    # 1.51: one beat of the dialer's says nothing of its spacing yet; then every
    # RTT_SAMPLE_EVERY intervals.
    assert beats == [1.51, 11.51]
    assert n.mesh.links[A].rtt == pytest.approx(0.09)
    n.mesh.tick(16.55, 1.0)  # its last beat came at 15.5: not late yet
    assert n.take() == []
    n.mesh.tick(16.65, 1.0)  # late: we beat
    assert n.take() == [(via, Kind.BEAT, {"t": 16.65})]
    n.mesh.tick(17.6, 1.0)
    assert n.take() == []  # not an interval since that beat
    n.mesh.tick(17.7, 1.0)
    assert n.take() == [(via, Kind.BEAT, {"t": 17.7})]
    n.mesh.tick(18.4, 1.0)
    assert A in n.mesh.links
    n.mesh.tick(18.6, 1.0)
    assert A not in n.mesh.links  # 3.1 s without a word


@pytest.mark.parametrize(
    ("dead_after", "dialer_every", "rtt"), [(1.8, 3.0, 0.05), (2.5, 5.0, 0.7), (1.5, 3.0, 0.85)]
)
def test_an_accepted_link_to_a_slower_beating_dialer_stays_up(
    dead_after: float, dialer_every: float, rtt: float
) -> None:
    """Found in two reviews: heartbeat settings are per node. A dialer beating every 3 s
    (or 5 s) and ours answering: we must beat every interval ourselves, as both sides
    always did. Waiting two of our intervals of silence lost a live link every few
    seconds (1 s / 1.8 s here), or past a 0.4 s round trip at the defaults (0.7 s here);
    waiting min(1.5 intervals, dead_after / 2) still lost it at 1 s / 1.5 s and 0.85 s."""
    n = Node(S, dead_after=dead_after)
    via = link_in(n, state(A), now=0.0)
    answers: list[tuple[float, float]] = []  # (when, beat time) of the dialer's answers
    t = 0.0
    while t < 30.0:
        t = round(t + 0.1, 1)  # the loop's link tick
        if t % dialer_every == 0:
            n.mesh.on_beat(via, Kind.BEAT, {"t": t}, t)
        for when, sent in [a for a in answers if a[0] <= t]:
            answers.remove((when, sent))
            n.mesh.on_beat(via, Kind.BEAT_ACK, {"t": sent}, when)
        n.mesh.tick(t, 1.0)
        answers += [(t + rtt, b["t"]) for v, k, b in n.take() if k == Kind.BEAT]
        assert A in n.mesh.links, f"the live link was declared dead at {t}"


def test_silent_link_is_taken_down() -> None:
    n = Node(S, dead_after=3.0)
    via = link_in(n, state(A), now=0.0)
    n.mesh.on_link_ok("tcp://b", {"node": state(B).to_json()}, "static", 0.0)
    n.take()
    n.mesh.heard(via, 2.5)
    n.mesh.tick(5.0, 1.0)
    assert set(n.mesh.links) == {A}
    assert n.mesh.closed == ["tcp://b"]
    (down,) = n.emitted("$mesh/link/down")
    assert down == {"peer": B, "peer_name": "bravo", "reason": "silent for 5.0s"}
    assert n.emitted("$mesh/node/down") == [{"peer": B, "peer_name": "bravo"}]
    assert [e[2] for e in n.events if e[0] == "$mesh/link/down"] == [5.0]
    # The survivor hears the new state (without B) and its heartbeat.
    kinds = {k: body for v, k, body in n.take() if v == via}
    assert kinds[Kind.STATES]["states"][0]["links"] == [A]
    assert kinds[Kind.BEAT] == {"t": 5.0}
    n.mesh.tick(5.4, 1.0)
    assert set(n.mesh.links) == {A}  # 5.4 - 2.5 = 2.9 <= dead_after
    n.mesh.tick(5.6, 1.0)
    assert not n.mesh.links


def test_frames_from_unknown_vias_are_ignored() -> None:
    n = Node(S)
    n.mesh.on_states(b"stranger", {"states": [state(A).to_json()]}, 0.0)
    n.mesh.on_beat(b"stranger", Kind.BEAT, {"t": 1}, 0.0)
    n.mesh.heard(b"stranger", 0.0)
    n.mesh.drop_via(b"stranger", "gone", 0.0)
    assert n.take() == []
    assert not n.mesh.table.states


def test_nodes_that_were_never_reachable_are_forgotten_too() -> None:
    """Found by benchmarks/fuzz.py: states of made-up nodes, never reachable, were kept
    for ever, so a peer could grow the table (and every link-up's STATES) without bound."""
    n = Node(S, dead_after=1e9)
    via = link_in(n, state(A, [S]), now=0.0)
    ghost = state(B, [C])  # B claims a link to C; neither links to us: never reachable
    n.mesh.on_states(via, {"states": [ghost.to_json()]}, 1.0)
    assert B in n.mesh.table.states
    n.mesh.tick(1.0 + FORGET_AFTER, 1e9)
    assert B in n.mesh.table.states  # not yet
    n.mesh.tick(1.5 + FORGET_AFTER, 1e9)
    assert B not in n.mesh.table.states
    assert A in n.mesh.table.states  # the neighbour stays


# ---- flooding ------------------------------------------------------------------------------


def test_newer_states_are_flooded_to_every_other_link() -> None:
    hub = Node(S)
    via_a = link_in(hub, state(A, [S]))
    via_b = link_in(hub, state(B, [S]))
    via_c = link_in(hub, state(C, [S]))
    hub.take()
    d1 = state(D, [A], [("x", None)], version=1)
    hub.mesh.on_states(via_a, {"states": [d1.to_json()]}, 1.0)
    out = hub.take()
    assert sorted((v, k) for v, k, _ in out) == [(via_b, Kind.STATES), (via_c, Kind.STATES)]
    assert all(body == {"states": [d1.to_json()]} for _, _, body in out)
    assert hub.mesh.links[A].last_rx == 1.0
    # The same state again, from anywhere, or an older one: nothing moves.
    hub.mesh.on_states(via_b, {"states": [d1.to_json()]}, 1.0)
    hub.mesh.on_states(via_a, {"states": [state(D, [A], version=0).to_json()]}, 1.0)
    assert hub.take() == []
    # A newer epoch beats any version; only the fresh states of a batch travel on.
    d2 = state(D, [A], epoch=2, version=0)
    hub.mesh.on_states(via_c, {"states": [d1.to_json(), d2.to_json(), {"id": "junk"}]}, 2.0)
    out = hub.take()
    assert sorted(v for v, _, _ in out) == [via_a, via_b]
    assert all(body == {"states": [d2.to_json()]} for _, _, body in out)
    assert hub.mesh.counters["bad_states"] == 1
    hub.mesh.on_states(via_c, {"states": "nope"}, 2.0)
    assert hub.mesh.counters["bad_states"] == 2
    assert hub.take() == []


def test_own_state_is_not_adopted_or_flooded() -> None:
    hub = Node(S)
    via_a = link_in(hub, state(A, [S]))
    link_in(hub, state(B, [S]))
    hub.take()
    hub.mesh.on_states(via_a, {"states": [state(S, [], epoch=99).to_json()]}, 1.0)
    assert hub.take() == []
    assert S not in hub.mesh.table.states


def test_announcements_are_coalesced() -> None:
    n = Node(S)
    via = link_in(n, state(A))
    n.take()
    version = n.mesh.version
    n.mesh.set_interest(frozenset({("x", None)}))
    n.mesh.set_interest(frozenset({("x", None), ("y", "g")}))
    n.mesh.flush_announcements()
    n.mesh.flush_announcements()
    ((v, kind, body),) = n.take()
    assert (v, kind) == (via, Kind.STATES)
    assert body["states"][0]["interest"] == [["x", None], ["y", "g"]]
    assert n.mesh.version == version + 1
    n.mesh.set_interest(frozenset({("x", None), ("y", "g")}))  # unchanged
    n.mesh.flush_announcements()
    assert n.take() == []


# ---- interest deltas ----------------------------------------------------------------------


def patterns(*names: str) -> frozenset[tuple[str, str | None]]:
    return frozenset((n, None) for n in names)


def delta_link_in(node: Node, peer: NodeState) -> bytes:
    """``peer`` dials ``node`` and says it takes interest deltas."""
    via = f"from-{peer.node_id[:1]}".encode()
    node.mesh.on_link_request(via, {**link_body(peer), "deltas": True}, "", 0.0)
    assert node.mesh.is_link(via), node.logs
    return via


def test_an_interest_change_goes_as_a_delta_to_peers_that_take_them() -> None:
    n = Node(S)
    via_new = delta_link_in(n, state(A))
    via_old = link_in(n, state(B))  # an older node: whole states only
    n.mesh.set_interest(patterns(*"abcdef"))
    n.mesh.flush_announcements()
    n.take()
    n.mesh.set_interest(patterns(*"abcdeg"))
    n.mesh.flush_announcements()
    out = {v: body["states"] for v, _k, body in n.take()}
    version = n.mesh.version
    assert out[via_new] == [
        {"id": S, "epoch": 1, "version": version, "base": version - 1}
        | {"add": [["g", None]], "remove": [["f", None]]}
    ]
    assert out[via_old] == [n.mesh.state().to_json()]
    # Links changing, or a change as large as the state, go whole to everyone.
    n.mesh.set_interest(patterns("z"))
    n.mesh.flush_announcements()
    assert all("base" not in body["states"][0] for _v, _k, body in n.take())


def test_deltas_are_applied_and_passed_on_whole_to_older_peers() -> None:
    hub = Node(S)
    via_a = delta_link_in(hub, state(A, [S], [("x", None), ("y", None)], version=3))
    via_b = delta_link_in(hub, state(B, [S]))
    via_c = link_in(hub, state(C, [S]))
    hub.take()
    delta = {"id": A, "epoch": 1, "version": 4, "base": 3, "add": [["z", "g"]]}
    delta |= {"remove": [["x", None]]}
    hub.mesh.on_states(via_a, {"states": [delta]}, 1.0)
    held = hub.mesh.table.states[A]
    assert (held.version, held.interest) == (4, frozenset({("y", None), ("z", "g")}))
    assert held.links == {S}
    assert hub.mesh.table.route("x").plain == ()
    assert hub.mesh.table.route("z").groups == (("g", (A,)),)
    out = {v: body["states"] for v, _k, body in hub.take()}
    assert out == {via_b: [delta], via_c: [held.to_json()]}
    # Again (it came round another way), or older: nothing moves.
    hub.mesh.on_states(via_b, {"states": [delta]}, 1.0)
    assert hub.take() == []
    assert hub.mesh.counters["bad_states"] == 0


def test_interest_changes_cost_what_changed_not_what_is_held() -> None:
    """Each delta copied the whole interest set on both sides: 17 ms a change at 150,000
    patterns, and a stream of changes kept the loop from its heartbeats until the links
    went down (scale test; benchmarks/interest_churn.py measures it). The held sets are
    changed in place: the same objects after every change."""
    wire, a, b, _c = line()
    a.mesh.set_interest(patterns("x", "y"))
    a.mesh.flush_announcements()
    wire.pump(1.0)
    own = a.mesh.interest
    a.mesh.change_interest({("z", None)}, set())  # the first delta copies a decoded state
    a.mesh.flush_announcements()
    wire.pump(1.0)
    held = b.mesh.table.states[A].interest
    a.mesh.change_interest(set(), {("x", None)})
    a.mesh.flush_announcements()
    wire.pump(1.0)
    assert a.mesh.interest is own
    assert b.mesh.table.states[A].interest is held
    assert held == patterns("y", "z")
    assert b.mesh.table.route("x").plain == ()


def test_a_missed_delta_is_made_good_by_asking_for_the_whole_state() -> None:
    hub = Node(S)
    via_a = delta_link_in(hub, state(A, [S], [("x", None)], version=3))
    hub.take()
    late = {"id": A, "epoch": 1, "version": 6, "base": 5, "add": [["q", None]], "remove": []}
    hub.mesh.on_states(via_a, {"states": [late]}, 1.0)
    assert hub.take() == [(via_a, Kind.STATES, {"states": [], "want": [A]})]
    assert hub.mesh.table.states[A].version == 3  # unchanged until the whole state comes
    # Asked the same, a node answers with what it holds, its own last announcement too.
    whole = state(A, [S], [("x", None), ("p", None), ("q", None)], version=6)
    hub.mesh.on_states(via_a, {"states": [whole.to_json()], "want": [A, S, "junk", 7]}, 2.0)
    ((v, kind, body),) = hub.take()
    assert (v, kind) == (via_a, Kind.STATES)
    assert [s["id"] for s in body["states"]] == [A, S]
    assert hub.mesh.table.states[A] == whole
    hub.mesh.on_states(via_a, {"states": [], "want": "nope"}, 2.0)
    bad = [{"id": A, "epoch": 1, "version": 7, "base": 7, "add": [], "remove": []}, {"base": 1}]
    hub.mesh.on_states(via_a, {"states": bad}, 2.0)
    assert hub.mesh.counters["bad_states"] == 3
    assert hub.take() == []


@given(st.lists(st.sets(st.sampled_from("abcdefgh"), max_size=8), min_size=1, max_size=12))
def test_every_node_holds_each_interest_after_any_changes(changes: list[set[str]]) -> None:
    """A line of three delta-taking nodes: whatever alpha's interest goes through, the
    others end up holding it exactly, and route by it."""
    wire, a, b, c = line()
    for names in changes:
        a.mesh.set_interest(patterns(*names))
        a.mesh.flush_announcements()
        wire.pump(1.0)
        for other in (b, c):
            assert other.mesh.table.states[A].interest == patterns(*names)
            assert {t for t in "abcdefgh" if other.mesh.table.route(t).plain} == names


# ---- a three-node line over the in-test wire -----------------------------------------------


def test_line_converges() -> None:
    _, a, b, c = line()
    assert a.mesh.table.paths() == {B: (1, B), C: (2, B)}
    assert c.mesh.table.paths() == {B: (1, B), A: (2, B)}
    assert b.mesh.table.paths() == {A: (1, A), C: (1, C)}
    assert a.mesh.table.path_to(C) == [B, C]
    assert [e["peer"] for e in a.emitted("$mesh/node/up")] == [B, C]
    assert a.mesh.links[B].outbound
    assert not b.mesh.links[A].outbound


def test_event_travels_the_line_one_copy_per_hop() -> None:
    wire, a, b, c = line()
    c.mesh.set_interest(frozenset({("t/>", None)}))
    c.mesh.flush_announcements()
    wire.pump(0.5)
    assert a.mesh.table.route("t/x").plain == (C,)
    plan = a.mesh.plan("t/x", set())
    assert plan.groups == []
    assert copies(plan.static) == [("tcp://bravo", 0, [(C, ())])]
    hops, targets = decode_targets(plan.static[0][1][2:])
    mine, onward = b.mesh.onward(targets, hops)
    assert mine is None
    assert copies(onward) == [(b"charlie>bravo", 1, [(C, ())])]
    hops, targets = decode_targets(onward[0][1][2:])
    assert c.mesh.onward(targets, hops) == ((), [])
    assert a.mesh.plan("u", set()) is NO_PLAN


def test_queue_group_goes_to_the_nearest_member_only() -> None:
    wire, a, b, c = line()
    b.mesh.set_interest(frozenset({("jobs", "workers")}))
    c.mesh.set_interest(frozenset({("jobs", "workers"), ("jobs", None)}))
    b.mesh.flush_announcements()
    c.mesh.flush_announcements()
    wire.pump(0.5)
    plan = a.mesh.plan("jobs", set())
    assert plan.groups == [("workers", (B,))]
    for _ in range(3):  # bravo is nearest every time; charlie's plain copy shares the hop
        assert copies(a.mesh.dynamic(plan)) == [("tcp://bravo", 0, [(C, ()), (B, ("workers",))])]
    # A local member of the group serves it: only the plain copy leaves.
    local = a.mesh.plan("jobs", {"workers"})
    assert local.groups == []
    assert copies(local.static) == [("tcp://bravo", 0, [(C, ())])]
    hops, targets = decode_targets(a.mesh.dynamic(plan)[0][1][2:])
    mine, onward = b.mesh.onward(targets, hops)
    assert mine == ("workers",)
    assert copies(onward) == [(b"charlie>bravo", 1, [(C, ())])]


def test_dead_link_in_the_line_cuts_the_far_end_off() -> None:
    wire, a, b, c = line(now=0.0)
    c.mesh.set_interest(frozenset({("t", None)}))
    c.mesh.flush_announcements()
    wire.pump(0.0)
    b.mesh.heard(b"alpha>bravo", 4.5)  # alpha keeps talking; charlie went silent
    b.mesh.tick(5.0, 1.0)
    assert set(b.mesh.links) == {A}
    assert b.emitted("$mesh/link/down")[0]["peer"] == C
    wire.pump(5.0)
    assert a.mesh.table.paths() == {B: (1, B)}
    assert a.mesh.plan("t", set()) is NO_PLAN
    assert a.emitted("$mesh/node/down") == [{"peer": C, "peer_name": "charlie"}]
    assert [t for t, _, now in a.events if now == 5.0] == ["$mesh/node/down"]


# ---- forwarding decisions on a hub -------------------------------------------------------------


def hub_with_two_branches() -> tuple[Node, bytes, bytes]:
    """self - A - C, self - B - D, and E behind A too; interest on C, D and E."""
    hub = Node(S)
    via_a = link_in(hub, state(A, [S, C, E]))
    via_b = link_in(hub, state(B, [S, D]))
    hub.mesh.on_states(
        via_a,
        {
            "states": [
                state(C, [A], [("t", None), ("t", "g")]).to_json(),
                state(E, [A], [("t", None)]).to_json(),
            ]
        },
        0.0,
    )
    hub.mesh.on_states(via_b, {"states": [state(D, [B], [("t", None), ("t", "g")]).to_json()]}, 0.0)
    hub.take()
    return hub, via_a, via_b


def test_plan_makes_one_copy_per_next_hop() -> None:
    hub, via_a, via_b = hub_with_two_branches()
    plan = hub.mesh.plan("t", {"g"})
    assert plan.plain == (C, D, E)
    assert copies(plan.static) == [
        (via_a, 0, [(C, ()), (E, ())]),
        (via_b, 0, [(D, ())]),
    ]


def test_a_queues_node_gets_persistent_events_only() -> None:
    """B's queue captures "t" (and so does D's, which also has a subscriber): a direct
    event or a request does not go to B, where nothing would take it; a persistent one
    does. A node with a subscriber is not named twice."""
    hub, via_a, via_b = hub_with_two_branches()
    hub.mesh.on_states(
        via_b,
        {
            "states": [
                state(B, [S, D], [("t", capture_group(B))], version=2).to_json(),
                state(D, [B], [("t", None), ("t", capture_group(D))], version=2).to_json(),
            ]
        },
        0.0,
    )
    assert hub.mesh.table.route("t").stored == (B,)
    # One "group" per queue node: a node that predates them takes each for a group of one
    # member, so each queue node still gets every persistent event (review: one shared
    # name made such a node pick one queue node per event).
    assert capture_group(B) != capture_group(D)
    assert hub.mesh.plan("t", {"g"}).plain == (C, D, E)
    stored = hub.mesh.plan("t", {"g"}, stored=True)
    assert stored.plain == (B, C, D, E)
    assert copies(stored.static) == [
        (via_a, 0, [(C, ()), (E, ())]),
        (via_b, 0, [(B, ()), (D, ())]),
    ]
    assert hub.mesh.plan("u", set(), stored=True) is NO_PLAN
    shown = hub.mesh.explain("t", [])
    assert [(r["name"], r["group"], r["queues"]) for r in shown["remote"] if r["queues"]] == [
        (NAMES[B], None, True),
        (NAMES[D], None, True),
    ]


def test_events_only_nodes_get_every_event_and_are_shown_once() -> None:
    """B's subscribers are MQTT clients only (events only), D has both kinds: both get
    every event, requests included; `routes` names D once, as plain (review: twice)."""
    hub, _via_a, via_b = hub_with_two_branches()
    hub.mesh.on_states(
        via_b,
        {
            "states": [
                state(B, [S, D], [("t", quiet_group(B))], version=2).to_json(),
                state(D, [B], [("t", None), ("t", quiet_group(D))], version=2).to_json(),
            ]
        },
        0.0,
    )
    route = hub.mesh.table.route("t")
    assert (route.plain, route.quiet, route.answers) == ((B, C, D, E), (B,), True)
    assert hub.mesh.plan("t", {"g"}).plain == (B, C, D, E)
    shown = [(r["name"], r["group"], r["requests"]) for r in hub.mesh.explain("t", [])["remote"]]
    assert [r for r in shown if not r[2]] == [(NAMES[B], None, False)]
    assert [r for r in shown if r[0] == NAMES[D]] == [(NAMES[D], None, True)]


def test_dynamic_takes_turns_among_equally_near_members() -> None:
    hub, via_a, via_b = hub_with_two_branches()
    plan = hub.mesh.plan("t", set())
    assert plan.static == []
    assert plan.groups == [("g", (C, D))]
    picks = []
    for _ in range(4):
        got = {via: dict(t) for via, _, t in copies(hub.mesh.dynamic(plan))}
        assert set(got) == {via_a, via_b}  # plain copies always go both ways
        picks.append(next(n for t in got.values() for n, g in t.items() if g == ("g",)))
    assert picks == [C, D, C, D]


def test_turns_among_equally_near_members_go_on_across_topics_and_new_plans() -> None:
    """Found in an exploratory test: each topic's plan took turns of its own from the
    first node, so a stream with a topic per event (orders/1, orders/2, ...) all went to
    one node; and every route-cache flush (any change of interest) started over."""
    hub, via_a, via_b = hub_with_two_branches()
    hub.mesh.on_states(via_a, {"states": [state(C, [A], [("t/>", "g")], version=2).to_json()]}, 0.0)
    hub.mesh.on_states(via_b, {"states": [state(D, [B], [("t/>", "g")], version=2).to_json()]}, 0.0)
    picks = []
    for i in range(6):
        plan = hub.mesh.plan(f"t/{i}", set())  # a new topic, a new plan, each time
        assert plan.groups == [("g", (C, D))]
        (target,) = [n for _, _, t in copies(hub.mesh.dynamic(plan)) for n, g in t if g]
        picks.append(target)
    assert picks == [C, D, C, D, C, D]


def test_a_topic_only_one_node_holds_does_not_take_the_others_turns() -> None:
    """Review of the fix above: with one turn per group name, a poller alternating t/x
    (held by C and D) and t/y (held by C alone) sent every t/x event to C: each t/y
    event moved the shared turn on. Turns are per group and candidate nodes."""
    hub, via_a, via_b = hub_with_two_branches()
    hub.mesh.on_states(via_a, {"states": [state(C, [A], [("t/>", "g")], version=2).to_json()]}, 0.0)
    hub.mesh.on_states(via_b, {"states": [state(D, [B], [("t/x", "g")], version=2).to_json()]}, 0.0)
    plans = {t: hub.mesh.plan(t, set()) for t in ("t/x", "t/y")}
    got = []
    for i in range(8):
        topic = ("t/x", "t/y")[i % 2]
        (target,) = [n for _, _, t in copies(hub.mesh.dynamic(plans[topic])) for n, g in t if g]
        got.append((topic, target))
    assert [n for t, n in got if t == "t/x"] == [C, D, C, D]


@pytest.mark.parametrize(("hops", "forwarded"), [(0, True), (14, True), (15, False), (40, False)])
def test_onward_hop_limit(hops: int, forwarded: bool) -> None:
    hub, via_a, _ = hub_with_two_branches()
    mine, onward = hub.mesh.onward([(bytes.fromhex(S), ("g",)), (bytes.fromhex(C), ())], hops)
    assert mine == ("g",)  # this node still delivers its own share
    if forwarded:
        assert copies(onward) == [(via_a, hops + 1, [(C, ())])]
        assert hops + 1 < MAX_HOPS_FORWARD
    else:
        assert onward == []
    assert hub.mesh.counters["hop_limit"] == (0 if forwarded else 1)


def test_onward_skips_malformed_and_unreachable_targets() -> None:
    hub, _, via_b = hub_with_two_branches()
    unknown = bytes.fromhex("f" * 16)
    mine, onward = hub.mesh.onward([(b"short", ()), (unknown, ()), (bytes.fromhex(D), ())], 2)
    assert mine is None
    assert copies(onward) == [(via_b, 3, [(D, ())])]
    assert hub.mesh.counters["no_route"] == 1


def test_copies_are_split_at_255_targets() -> None:
    hub = Node(S)
    far = [f"{i:016x}" for i in range(0x100, 0x100 + 300)]
    via = link_in(hub, state(A, [S, *far]))
    hub.mesh.on_states(via, {"states": [state(n, [A], [("t", None)]).to_json() for n in far]}, 0.0)
    plan = hub.mesh.plan("t", set())
    sizes = [(v, len(t)) for v, _, t in copies(plan.static)]
    assert sizes == [(via, 255), (via, 45)]
    assert sorted(n for _, _, t in copies(plan.static) for n, _ in t) == far


def test_inbox_plan_goes_straight_to_the_node() -> None:
    hub, via_a, _ = hub_with_two_branches()
    assert copies(hub.mesh.inbox_plan(E).static) == [(via_a, 0, [(E, ())])]
    assert hub.mesh.inbox_plan("f" * 16) is NO_PLAN


def test_group_names_are_limited_in_bytes_where_they_enter() -> None:
    """Routing headers carry a group name's length in one byte: names over 64 UTF-8 bytes
    are refused by the router at SUB and dropped from states announced by other nodes."""
    from node.router import _valid_group
    from node.routing import NodeState

    long_name = "\N{GRINNING FACE}" * 64  # 64 characters, 256 bytes
    assert not _valid_group(long_name)
    assert _valid_group("\N{GRINNING FACE}" * 16)  # 64 bytes
    bad = state(A, [S], [("t", long_name)]).to_json()
    with pytest.raises(ValueError, match="queue group"):
        NodeState.from_json(bad)


def test_group_names_with_lone_surrogates_are_refused_where_they_enter() -> None:
    """Found by benchmarks/fuzz.py: JSON carries "\\ud800", which passed the byte-length
    check and then failed to encode into the routing header of every event for the group."""
    from node.router import _valid_group

    assert not _valid_group("g\udc80")
    with pytest.raises(ValueError, match="not UTF-8"):
        NodeState.from_json(state(A, [S], [("t", "g\ud800")]).to_json())
    hub = Node(S)
    via = link_in(hub, state(A, [S]))
    hub.mesh.on_states(via, {"states": [state(A, [S], [("t", "\ud800")], version=2).to_json()]}, 0)
    assert hub.mesh.counters["bad_states"] == 1
    assert hub.mesh.plan("t", set()) is NO_PLAN


def test_many_groups_on_one_node_can_be_forwarded() -> None:
    names = tuple(f"g{i:03d}" for i in range(256))
    hub = Node(S)
    via = link_in(hub, state(A, [S], [("t", g) for g in names]))
    plan = hub.mesh.plan("t", set())
    sent = [(n, g) for _, _, t in copies(hub.mesh.dynamic(plan)) for n, g in t]
    assert sorted(g for _, gs in sent for g in gs) == list(names)
    assert {v for v, _ in hub.mesh.dynamic(plan)} == {via}


def test_a_large_table_reaches_a_new_neighbour_in_frames_it_accepts() -> None:
    """Found in review (the fuzz helper's report): a new neighbour got the whole table in
    one STATES frame, and a table of busy nodes (thousands of patterns each) exceeded the
    size a receiver decodes, so the neighbour learnt nothing. Tables go in several frames."""
    from node.codec import MAX_STATE_BYTES

    s = Node(S)
    via_a = link_in(s, state(A))
    s.take()
    others = [f"{i:016x}" for i in range(0x7000000000000000, 0x7000000000000000 + 40)]
    busy = [
        state(n, [A], [(f"plant/{n}/line{j}/sensor/*", None) for j in range(1500)]).to_json()
        for n in others
    ]
    s.mesh.on_states(via_a, {"states": busy}, 0.0)
    s.take()
    via_b = link_in(s, state(B))
    frames = [f for v, f in s.mesh.out if v == via_b]
    assert all(len(f) <= MAX_STATE_BYTES for f in frames)
    tables = [body for kind, body in map(decode_control, frames) if kind == Kind.STATES]
    assert len(tables) > 1
    learnt = {st["id"] for body in tables for st in body["states"]}
    assert set(others) <= learnt


def test_a_large_node_links_without_its_interest_then_announces_it() -> None:
    """LINK and LINK_OK are decoded before membership is checked, so they are never
    compressed and a large node leaves its interest out of them; each side announces its
    whole state (a newer version, in STATES) right after the link comes up."""
    from node.codec import MAX_STATE_BYTES

    a, b = Node(A), Node(B)
    big = frozenset((f"plant{i % 50}/line{i % 40}/device{i}/cmd", None) for i in range(60_000))
    a.mesh.set_interest(big)
    b.mesh.set_interest(big)
    hello = a.mesh.hello()
    assert len(hello) <= MAX_STATE_BYTES
    assert decode_control(hello)[1]["node"]["interest"] == []
    wire = Wire(a, b)
    wire.dial(a, b)
    wire.pump(0.0)
    for node, other in ((a, b), (b, a)):
        assert node.mesh.table.states[other.id].interest == big
        assert node.mesh.plan("plant1/line1/device1/cmd", set()).static


def test_a_table_arriving_in_one_frame_finds_paths_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new state in a frame found every path again: a new link to a mesh of 2,000
    nodes kept the node's thread for 1.7 s."""
    hub = Node(S)
    via = link_in(hub, state(A, [S]))
    hub.take()
    searches = []
    bfs = hub.mesh.table._bfs
    monkeypatch.setattr(hub.mesh.table, "_bfs", lambda: searches.append(1) or bfs())
    ids = [f"{i:016x}" for i in range(0x100, 0x100 + 50)]
    line = [A, *ids]  # S - A - ids[0] - ... - ids[-1], one frame
    chain = [state(A, [S, ids[0]], version=2)]
    chain += [state(n, line[i : i + 3 : 2]) for i, n in enumerate(ids)]
    hub.mesh.on_states(via, {"states": [s.to_json() for s in chain]}, 1.0)
    assert len(searches) == 1
    assert len(hub.mesh.table.paths()) == 51
    assert len(hub.emitted("$mesh/node/up")) == 51


def test_the_mesh_view_says_how_long_the_mesh_still_converges() -> None:
    """``meshctl mesh`` (and the benchmark, before it measures) can tell when duplicate
    checks are on because the mesh changed recently."""
    n = Node(S)
    link_in(n, state(A, [S]), now=5.0)
    assert n.mesh.mesh_view(5.0)["converging_s"] == 10.0
    assert n.mesh.mesh_view(12.5)["converging_s"] == 2.5
    assert n.mesh.converging(12.5)
    assert n.mesh.mesh_view(15.0)["converging_s"] == 0.0
    assert not n.mesh.converging(15.0)


def test_a_want_is_answered_once_per_node_and_second() -> None:
    """Found in review: 2,000 copies of one id in a 38 KB want made a node send its state
    2,000 times (308 MB of frames)."""
    hub = Node(S)
    via_a = delta_link_in(hub, state(A, [S]))
    hub.take()
    hub.mesh.on_states(via_a, {"states": [], "want": [A, S] * 2000}, 1.0)
    ((_v, _k, body),) = hub.take()
    assert [s["id"] for s in body["states"]] == [A, S]
    hub.mesh.on_states(via_a, {"states": [], "want": [A]}, 1.5)
    assert hub.take() == []  # asked again within the second
    hub.mesh.on_states(via_a, {"states": [], "want": [A]}, 2.6)
    assert [b["states"][0]["id"] for _v, _k, b in hub.take()] == [A]


def test_a_state_too_large_for_a_frame_is_left_out_and_counted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a want got our state in one frame over the limit, which the
    receiver drops (or libzmq, with the link)."""
    import node.mesh_states

    monkeypatch.setattr(node.mesh_states, "MAX_STATE_BYTES", 4096)
    monkeypatch.setattr(node.mesh_states, "STATES_FRAME_BUDGET", 2048)
    hub = Node(S)
    via_a = delta_link_in(hub, state(A, [S]))
    hub.mesh.set_interest(patterns(*(f"device/{i:05}/cmd" for i in range(400))))
    hub.mesh.flush_announcements()
    hub.take()
    before = hub.mesh.counters["state_too_large"]
    hub.mesh.on_states(via_a, {"states": [], "want": [S, A]}, 1.0)
    ((_v, _k, body),) = hub.take()
    assert [s["id"] for s in body["states"]] == [A]  # ours left out, the small one sent
    assert hub.mesh.counters["state_too_large"] == before + 1


def test_a_handshake_without_the_interest_is_never_a_base_for_deltas() -> None:
    """Found in review: a large node's LINK leaves its interest out; the receiver took that
    empty interest as the node's version N, applied later deltas to it, and stayed wrong
    whenever no whole state followed (the dialer refused its own duplicate link)."""
    hub = Node(S)
    big = state(A, [S], version=5).to_json() | {"interest": [], "partial": True}
    via_a = f"from-{A[:1]}".encode()
    hub.mesh.on_link_request(via_a, {**link_body(state(A)), "node": big, "deltas": True}, "", 0.0)
    via_b = delta_link_in(hub, state(B, [S]))
    sent_b = [s["id"] for v, _k, body in hub.take() if v == via_b for s in body.get("states", [])]
    assert A not in sent_b  # a partial state is not passed on as if it were whole
    assert A in hub.mesh.table.partial
    delta = {"id": A, "epoch": 1, "version": 6, "base": 5, "add": [["x", None]], "remove": []}
    hub.mesh.on_states(via_a, {"states": [delta]}, 1.0)
    assert hub.take() == [(via_a, Kind.STATES, {"states": [], "want": [A]})]
    hub.mesh.tick(2.0, 1.0)  # and again from the tick, towards the node, until it comes
    assert (via_a, Kind.STATES, {"states": [], "want": [A]}) in hub.take()
    whole = state(A, [S], [("x", None), ("y", None)], version=6)
    hub.mesh.on_states(via_a, {"states": [whole.to_json()]}, 2.5)
    assert A not in hub.mesh.table.partial
    assert hub.mesh.table.states[A] == whole
    hub.take()
    hub.mesh.tick(4.0, 1.0)
    assert all("want" not in body for _v, _k, body in hub.take())
