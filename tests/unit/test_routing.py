"""Mesh routing: NodeState parsing, the MeshTable's paths and routes against a reference BFS."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from node.routing import (
    EMPTY_ROUTE,
    MeshRoute,
    MeshTable,
    NodeState,
    announced,
    capture_group,
    quiet_group,
)
from node.topics import matches

S = "5000000000000000"  # this node
A, B, C, D, E = (f"{c}000000000000000" for c in "abcde")
LOW = "1000000000000000"  # sorts before every other id here

Interest = frozenset[tuple[str, str | None]]

# ---- helpers ------------------------------------------------------------------------------


def ns(
    node_id: str,
    links: Iterable[str] = (),
    interest: Iterable[tuple[str, str | None]] = (),
    *,
    epoch: int = 1,
    version: int = 1,
) -> NodeState:
    return NodeState(
        node_id, f"n-{node_id[:2]}", epoch, version, frozenset(links), frozenset(interest)
    )


def table(neighbours: Iterable[str], *states: NodeState, self_id: str = S) -> MeshTable:
    t = MeshTable(self_id)
    for s in states:
        assert t.update(s)
    t.set_neighbours(neighbours)
    return t


def line() -> MeshTable:
    """S - A - B - C, every link announced by both ends."""
    return table([A], ns(A, [S, B]), ns(B, [A, C]), ns(C, [B]))


def bfs(adj: Mapping[str, set[str]], start: str) -> dict[str, int]:
    dist = {start: 0}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for n in adj.get(node, ()):
            if n not in dist:
                dist[n] = dist[node] + 1
                queue.append(n)
    return dist


# ---- NodeState ------------------------------------------------------------------------------


def test_to_json_shape() -> None:
    s = NodeState(
        A,
        "alpha",
        7,
        3,
        frozenset([C, B]),
        frozenset([("x/>", None), ("a", "g"), ("a", None)]),
        ("tcp://h:1",),
    )
    assert s.to_json() == {
        "id": A,
        "name": "alpha",
        "epoch": 7,
        "version": 3,
        "links": [B, C],
        "interest": [["a", None], ["a", "g"], ["x/>", None]],
        "endpoints": ["tcp://h:1"],
    }
    assert NodeState.from_json(json.loads(json.dumps(s.to_json()))) == s


@pytest.mark.parametrize(
    ("old", "new", "newer"),
    [
        (None, (1, 0), True),
        ((1, 5), (1, 6), True),
        ((1, 5), (1, 5), False),
        ((1, 5), (1, 4), False),
        ((1, 99), (2, 0), True),  # a restarted node (new epoch) wins over any old version
        ((2, 0), (1, 99), False),
    ],
)
def test_newer_than(old: tuple[int, int] | None, new: tuple[int, int], newer: bool) -> None:
    other = None if old is None else ns(A, epoch=old[0], version=old[1])
    assert ns(A, epoch=new[0], version=new[1]).newer_than(other) is newer


node_ids = st.integers(0, (1 << 64) - 1).map(lambda i: f"{i:016x}")
patterns = st.sampled_from(["a", "a/*", "a/>", ">", "*", "b/*/c", "$mesh/>", "_INBOX/x/>"])
groups = st.none() | st.sampled_from(["g1", "g2", "workers"])
states = st.builds(
    NodeState,
    node_id=node_ids,
    name=st.text(max_size=64),
    epoch=st.integers(0, 1 << 63),
    version=st.integers(0, 1 << 40),
    links=st.frozensets(node_ids, max_size=5),
    interest=st.frozensets(
        st.tuples(patterns | st.text(min_size=1, max_size=8), groups), max_size=6
    ),
    endpoints=st.lists(st.text(max_size=20), max_size=3).map(tuple),
)


@given(states)
def test_json_round_trip(state: NodeState) -> None:
    wire = json.loads(json.dumps(state.to_json()))
    assert NodeState.from_json(wire) == state


json_junk = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=False)
    | st.text(max_size=20)
    | node_ids,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = ["id", "name", "epoch", "version", "links", "interest", "endpoints"]


def _only_value_error(obj: Any) -> None:
    try:
        state = NodeState.from_json(obj)
    except ValueError:
        return
    assert isinstance(state, NodeState)
    assert len(state.node_id) == 16
    assert all(len(x) == 16 for x in state.links)


@given(json_junk)
def test_from_json_junk_raises_only_value_error(obj: Any) -> None:
    _only_value_error(obj)


@given(state=states, field=st.sampled_from(FIELDS), junk=json_junk, drop=st.booleans())
def test_from_json_damaged_state_raises_only_value_error(
    state: NodeState, field: str, junk: Any, drop: bool
) -> None:
    """A valid state with one field removed or replaced by junk gets further into parsing."""
    obj = state.to_json()
    if drop:
        del obj[field]
    else:
        obj[field] = junk
    _only_value_error(obj)


GOOD: dict[str, Any] = ns(A, [B], [("a", None)]).to_json()


@pytest.mark.parametrize(
    "obj",
    [
        None,
        [],
        "state",
        {},
        {k: v for k, v in GOOD.items() if k != "id"},
        {k: v for k, v in GOOD.items() if k != "interest"},
        GOOD | {"id": A.upper()},
        GOOD | {"id": A[:15]},
        GOOD | {"id": 12},
        GOOD | {"links": [B, "nope"]},
        GOOD | {"links": 3},
        GOOD | {"interest": [["a"]]},
        GOOD | {"interest": [["a", None, "x"]]},
        GOOD | {"interest": [5]},
        GOOD | {"epoch": "soon"},
        GOOD | {"epoch": None},
        GOOD | {"version": float("nan")},
        GOOD | {"endpoints": 5},
    ],
)
def test_from_json_rejects(obj: Any) -> None:
    with pytest.raises(ValueError, match="malformed node state"):
        NodeState.from_json(obj)


@pytest.mark.parametrize("field", ["epoch", "version"])
def test_from_json_rejects_infinite_numbers(field: str) -> None:
    obj = json.loads(json.dumps(GOOD)[:-1] + f',"{field}":1e999}}')
    assert obj[field] == float("inf")
    with pytest.raises(ValueError, match="malformed node state"):
        NodeState.from_json(obj)


def test_from_json_truncates_long_names() -> None:
    assert NodeState.from_json(GOOD | {"name": "x" * 100}).name == "x" * 64


@pytest.mark.parametrize(
    ("pattern", "kept"),
    [
        ("_INBOX", False),
        ("_INBOX/ab/>", False),
        ("_INBOX/>", False),
        ("_INBOXES/x", True),
        ("a/_INBOX", True),
        (">", True),
        ("$mesh/>", True),
    ],
)
def test_announced_drops_inboxes(pattern: str, kept: bool) -> None:
    assert announced(pattern) is kept


# ---- MeshTable: tables ----------------------------------------------------------------------


def test_line_paths() -> None:
    t = line()
    assert t.paths() == {A: (1, A), B: (2, A), C: (3, A)}
    assert t.next_hop(C) == A
    assert t.next_hop(D) is None
    assert t.reachable() == [A, B, C]
    assert t.path_to(C) == [A, B, C]
    assert t.path_to(A) == [A]
    assert t.path_to(S) == []
    assert t.path_to(D) == []


def test_half_announced_edge_is_not_routed() -> None:
    # A lists B, B does not list A: the A-B edge does not count.
    t = table([A], ns(A, [S, B]), ns(B, [], [("x", None)]))
    assert t.paths() == {A: (1, A)}
    assert t.route("x") is EMPTY_ROUTE
    assert t.path_to(B) == []
    # The other half: B lists A, A does not list B.
    t = table([A], ns(A, [S]), ns(B, [A], [("x", None)]))
    assert B not in t.paths()
    assert t.route("x") is EMPTY_ROUTE
    # Once A lists B too, B is two hops away via A.
    assert t.update(ns(A, [S, B], version=2))
    assert t.paths()[B] == (2, A)
    assert t.route("x") == MeshRoute((B,), ())


def test_own_links_count_first_hand() -> None:
    # A's announced state does not list S yet (or is unknown): A is still a neighbour.
    assert table([A], ns(A, [])).paths() == {A: (1, A)}
    assert table([A]).paths() == {A: (1, A)}
    # A still lists S, but S's link to A is down: not adjacent, only reachable the long way.
    t = table([B], ns(A, [S, C]), ns(B, [S, C]), ns(C, [A, B]))
    assert t.paths() == {B: (1, B), C: (2, B), A: (3, B)}
    assert t.path_to(A) == [B, C, A]


def test_first_hop_ties_break_by_node_id() -> None:
    # S has neighbours A and B, both linked to C: every node computes the same first hop.
    t = table([B, A], ns(A, [S, C]), ns(B, [S, C]), ns(C, [A, B]))
    assert t.paths()[C] == (2, A)


def test_the_whole_state_completes_a_partial_one_of_the_same_version() -> None:
    """Found in review: a handshake without the interest, at the node's current version,
    made the whole state of that version look old, and the node seemed to want nothing."""
    t = table([A])
    assert t.update(ns(A, [S], [], version=7), partial=True)
    assert A in t.partial
    assert not t.update(ns(A, [S], [], version=7), partial=True)  # a partial one again: no
    assert t.update(ns(A, [S], [("x", None)], version=7))
    assert A not in t.partial
    assert t.route("x").plain == (A,)
    assert not t.update(ns(A, [S], [("y", None)], version=7))  # now whole: equal is old


@pytest.mark.parametrize(
    ("old", "new", "adopted"),
    [
        ((1, 5), (1, 6), True),
        ((1, 5), (1, 5), False),
        ((1, 5), (1, 4), False),
        ((1, 99), (2, 0), True),
        ((2, 0), (1, 99), False),
    ],
)
def test_only_newer_states_win(old: tuple[int, int], new: tuple[int, int], adopted: bool) -> None:
    t = table([A], ns(A, [S], [("old", None)], epoch=old[0], version=old[1]))
    assert t.route("old").plain == (A,)
    assert t.update(ns(A, [S], [("new", None)], epoch=new[0], version=new[1])) is adopted
    assert t.states[A].interest == {("new" if adopted else "old", None)}
    assert t.route("new").plain == ((A,) if adopted else ())
    assert t.route("old").plain == (() if adopted else (A,))


def test_own_state_is_ignored() -> None:
    t = table([A], ns(A, [S]))
    assert not t.update(ns(S, [A], [("x", None)], version=9))
    assert S not in t.states
    assert t.route("x") is EMPTY_ROUTE


def test_forget_removes_interest_and_reachability() -> None:
    t = line()
    assert t.update(ns(C, [B], [("x/>", None), ("x/y", "g")], version=2))
    assert t.route("x/y") == MeshRoute((C,), (("g", (C,)),))
    assert t.matches("x/y") == [(C, None), (C, "g")]
    t.forget(C)
    assert C not in t.states
    assert t.matches("x/y") == []
    assert t.route("x/y") is EMPTY_ROUTE
    assert C not in t.paths()
    t.forget(C)  # forgetting an unknown node is a no-op
    t.forget(B)  # B gone: C (were it known) and B are cut off; A stays first-hand
    assert t.paths() == {A: (1, A)}


def test_neighbour_change_updates_paths_and_routes() -> None:
    t = line()
    assert t.update(ns(C, [B], [("x", None)], version=2))
    assert t.route("x").plain == (C,)
    t.set_neighbours([])
    assert t.paths() == {}
    assert t.route("x") is EMPTY_ROUTE
    t.set_neighbours([A])
    assert t.route("x").plain == (C,)


def test_features_round_trip_and_an_older_nodes_state_has_none() -> None:
    """A mesh upgraded node by node: a node tells what it understands beyond the
    protocol version; a state without the field (an older node's, or one an older node
    passed on whole) has none, and one with junk there is refused like any malformed."""
    state = NodeState(A, "a", 1, 2, frozenset({B}), frozenset(), (), frozenset({"none-at"}))
    assert NodeState.from_json(json.loads(json.dumps(state.to_json()))) == state
    old = state.to_json()
    del old["features"]
    assert NodeState.from_json(old).features == frozenset()
    with pytest.raises(ValueError, match="malformed"):
        NodeState.from_json({**old, "features": 7})


def test_events_only_interest_gets_every_event_but_answers_no_request() -> None:
    """A node whose subscribers are MQTT clients (no reply-to) announces them as events
    only: it is routed to as a plain subscriber's node, yet a request that reaches only
    such nodes has no responder, so the requester's node says so at once."""
    t = table(
        [A],
        ns(A, [S, B], [("job", quiet_group(A)), ("mqtt/>", quiet_group(A))]),
        ns(B, [A], [("job", None), ("job", quiet_group(B)), ("q", capture_group(B)),
                    ("q", quiet_group(B))]),
    )  # fmt: skip
    job = t.route("job")
    assert job == MeshRoute((A, B), (), (), (A,))  # B has a subscriber that may answer
    assert job.answers
    only_mqtt = t.route("mqtt/x")
    assert only_mqtt == MeshRoute((A,), (), (), (A,))
    assert not only_mqtt.answers
    q = t.route("q")  # a queue there, and MQTT clients that get every event anyway
    assert q == MeshRoute((B,), (), (), (B,))
    assert not q.answers
    assert MeshRoute((), (("g", (A,)),)).answers  # a group member may answer


def test_route_groups_pick_the_nearest_members() -> None:
    # S - A - B - C and S - D - C: group "g" at A (1 hop), B (2 hops), D (1 hop); "h" at B, C.
    t = table(
        [A, D],
        ns(A, [S, B], [("job", "g")]),
        ns(B, [A, C], [("job", "g"), ("job", "h"), ("job", None)]),
        ns(C, [B, D], [("job", "h"), ("*", None)]),
        ns(D, [S, C], [("job", "g")]),
    )
    assert t.paths() == {A: (1, A), D: (1, D), B: (2, A), C: (2, D)}
    assert t.route("job") == MeshRoute((B, C), (("g", (A, D)), ("h", (B, C))))
    assert t.route("other") == MeshRoute((C,), ())
    assert t.route("$mesh/x") is EMPTY_ROUTE  # a leading '*' does not match reserved topics
    assert t.matches("job") == [
        (A, "g"),
        (B, None),
        (B, "g"),
        (B, "h"),
        (C, None),
        (C, "h"),
        (D, "g"),
    ]


# ---- MeshTable: properties against a reference BFS ----------------------------------------

PATTERNS = ["a", "a/*", "a/>", "a/b", ">", "*", "*/b", "b/>", "$mesh/>", "_INBOX/>"]
TOPICS = ["a", "a/b", "a/c", "a/b/c", "b", "b/b", "$mesh/x", "_INBOX/q"]


@st.composite
def graphs(draw: st.DrawFn, *, connected: bool) -> tuple[str, dict[str, set[str]], set[str]]:
    """(self id, links each node announces, nodes whose state is known).

    Connected: a random spanning tree plus extra edges, every edge listed by both ends and
    every state known. Otherwise: arbitrary one-sided claims and some states unknown.
    """
    ids = draw(st.lists(node_ids, min_size=2, max_size=9, unique=True))
    n = len(ids)
    claims: dict[str, set[str]] = {i: set() for i in ids}
    pairs = []
    if connected:
        pairs += [(i, draw(st.integers(0, i - 1))) for i in range(1, n)]
    extra = st.tuples(st.integers(0, n - 1), st.integers(0, n - 1))
    pairs += draw(st.lists(extra, max_size=2 * n))
    for i, j in pairs:
        if i != j:
            claims[ids[i]].add(ids[j])
            if connected or draw(st.booleans()):
                claims[ids[j]].add(ids[i])
    me = draw(st.sampled_from(ids))
    known = set(ids) if connected else set(draw(st.lists(st.sampled_from(ids))))
    return me, claims, known - {me}


def reference_adjacency(
    me: str, claims: Mapping[str, set[str]], known: set[str]
) -> dict[str, set[str]]:
    """Undirected edges: this node's own links, and links both (known) ends announce."""
    adj: dict[str, set[str]] = {i: set() for i in claims}
    for n in claims[me]:
        adj[me].add(n)
        adj[n].add(me)
    for u in known:
        for v in claims[u]:
            if v in known and u in claims[v]:
                adj[u].add(v)
    return adj


def build(
    me: str,
    claims: Mapping[str, set[str]],
    known: set[str],
    interest: Mapping[str, Interest] | None = None,
) -> MeshTable:
    t = MeshTable(me)
    t.set_neighbours(claims[me])
    for n in sorted(known):
        assert t.update(ns(n, claims[n], (interest or {}).get(n, frozenset())))
    assert not t.update(ns(me, claims[me], [(">", None)]))
    return t


def check_paths(me: str, claims: dict[str, set[str]], known: set[str]) -> None:
    t = build(me, claims, known)
    adj = reference_adjacency(me, claims, known)
    dist = bfs(adj, me)
    paths = t.paths()
    assert set(paths) == set(dist) - {me}
    for target, (d, hop) in paths.items():
        assert d == dist[target]
        assert hop in claims[me]
        assert dist[hop] == 1
        # The first hop lies on a shortest path: the smallest-id neighbour that does.
        on_shortest = sorted(n for n in claims[me] if bfs(adj, n).get(target) == d - 1)
        assert hop == on_shortest[0]
        assert t.next_hop(target) == hop
        path = t.path_to(target)
        assert len(path) == d
        assert path[0] == hop
        assert path[-1] == target
        for u, v in zip([me, *path], path, strict=False):
            assert v in adj[u]
    for other in set(claims) - set(dist):
        assert t.next_hop(other) is None
        assert t.path_to(other) == []
    assert t.reachable() == sorted(paths)


@given(graphs(connected=True))
def test_paths_on_connected_graphs(graph: tuple[str, dict[str, set[str]], set[str]]) -> None:
    me, claims, known = graph
    check_paths(me, claims, known)
    assert len(build(me, claims, known).paths()) == len(claims) - 1  # everyone is reachable


@given(graphs(connected=False))
def test_paths_with_half_links_and_unknown_nodes(
    graph: tuple[str, dict[str, set[str]], set[str]],
) -> None:
    check_paths(*graph)


interests = st.frozensets(st.tuples(st.sampled_from(PATTERNS), groups), max_size=4)


@given(
    graph=graphs(connected=False) | graphs(connected=True),
    data=st.data(),
    topic=st.sampled_from(TOPICS),
)
def test_route_agrees_with_reference(
    graph: tuple[str, dict[str, set[str]], set[str]], data: st.DataObject, topic: str
) -> None:
    me, claims, known = graph
    interest = {n: data.draw(interests, label=f"interest {n}") for n in sorted(known)}
    t = build(me, claims, known, interest)
    dist = bfs(reference_adjacency(me, claims, known), me)
    wanted = [(n, g) for n in sorted(known) for p, g in interest[n] if matches(p, topic)]
    reachable = [(n, g) for n, g in wanted if n in dist]
    plain = tuple(sorted({n for n, g in reachable if g is None}))
    members: dict[str, set[str]] = {}
    for n, g in reachable:
        if g is not None:
            members.setdefault(g, set()).add(n)
    want_groups = []
    for g, nodes in sorted(members.items()):
        near = min(dist[n] for n in nodes)
        want_groups.append((g, tuple(sorted(n for n in nodes if dist[n] == near))))
    route = t.route(topic)
    assert route == MeshRoute(plain, tuple(want_groups))
    assert t.route(topic) == route  # cached answer is the same
    assert t.matches(topic) == sorted(set(wanted), key=lambda x: (x[0], x[1] or ""))
