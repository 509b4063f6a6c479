"""Mesh routing, sans-IO: who wants what, the shape of the mesh, and the next hop.

Every node announces a versioned NodeState (its links and the patterns and queue groups
its clients hold) and floods it; every node keeps the newest state of every node. From
that table this module answers, for a topic, which *other* nodes must receive an event
(every node with a matching plain subscription; per queue group, the nearest nodes with a
member) and, for a node, which neighbour is the first hop of a shortest path.

An edge counts only when both ends list it (a node's own links count as soon as they are
up), so a half-dead link is never routed over. Paths are found breadth-first with
neighbours visited in id order, so every node computes the same deterministic paths.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from typing import Any, Final

from node.topics import INBOX_PREFIX, SubscriptionTrie

MAX_HOPS: Final = 16
MAX_GROUP_BYTES: Final = 64
# The "group" of a durable queue's pattern, "/queues/<node id>": the node wants the
# persistent events on it, to store, but has no subscriber that would answer a request or
# take a direct event. A client's group name cannot hold a "/", so no group is mistaken
# for it. One per node: a node that predates it takes each for a group of one member and
# sends every queue node a copy, as it did (one name for all made it pick one: review).
CAPTURE: Final = "/queues/"
# The "group" of a pattern held on a node only by subscribers that take events but cannot
# answer a request (MQTT 3.1.1 clients and MQTT bridges: no reply-to), "/events/<node id>".
# Other nodes forward it everything, as to a plain subscriber, but do not count it as a
# responder: a request that reaches nothing else gets "no responders" at once from the
# requester's node, where it waited out its timeout (exploratory tests). A node that
# predates it takes it for a group of one member: that node still gets a copy.
QUIET: Final = "/events/"
# Features (NodeState.features): "none-at": this node weighs the "no responders" of other
# nodes' bridges for its own requesters (node/router.py ``_none_withheld``).
NONE_AT: Final = "none-at"
FEATURES: Final = frozenset({NONE_AT})


def capture_group(node_id: str) -> str:
    """The capture "group" that node ``node_id`` announces its queues' patterns in."""
    return CAPTURE + node_id


def quiet_group(node_id: str) -> str:
    """The "group" that node ``node_id`` announces its events-only patterns in."""
    return QUIET + node_id


def _interest_order(entry: tuple[str, str | None]) -> tuple[str, str]:
    return entry[0], entry[1] or ""


@dataclass(frozen=True, slots=True)
class NodeState:
    """What one node announces about itself; newer (epoch, version) replaces older."""

    node_id: str
    name: str
    epoch: int  # the node's start time in ns: a restarted node supersedes its old states
    version: int
    links: frozenset[str] = frozenset()
    interest: AbstractSet[tuple[str, str | None]] = frozenset()  # a set once deltas apply
    endpoints: tuple[str, ...] = ()
    # What the node's code understands beyond the protocol version, for a mesh whose
    # nodes are upgraded one by one; an older node announces none (and drops them when
    # it passes a state on whole: the others then take the node for an older one).
    features: frozenset[str] = frozenset()

    def newer_than(self, other: NodeState | None) -> bool:
        return other is None or (self.epoch, self.version) > (other.epoch, other.version)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "name": self.name,
            "epoch": self.epoch,
            "version": self.version,
            "links": sorted(self.links),
            "interest": [[p, g] for p, g in sorted(self.interest, key=_interest_order)],
            "endpoints": list(self.endpoints),
            **({"features": sorted(self.features)} if self.features else {}),
        }

    @classmethod
    def from_json(cls, obj: Any) -> NodeState:
        """Parse an announced state; ValueError if it is malformed (the peer's fault)."""
        try:
            interest = _interest(obj["interest"])
            state = cls(
                node_id=_node_id(obj["id"]),
                name=str(obj["name"])[:64],
                epoch=int(obj["epoch"]),
                version=int(obj["version"]),
                links=frozenset(_node_id(x) for x in obj["links"]),
                interest=interest,
                endpoints=tuple(str(e) for e in obj.get("endpoints", ())),
                features=frozenset(str(f)[:32] for f in obj.get("features", ())[:16]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"malformed node state: {e!r}") from None
        return state


@dataclass(frozen=True, slots=True)
class InterestDelta:
    """How a node's interest changed since the version it announced before (``base``).

    What floods when only a node's patterns changed, instead of its whole state: a node
    holding 50,000 patterns that added one re-announced all of them, ~90 ms to send and
    ~125 ms for every other node to take in, for each change. Links, name and endpoints
    never travel in a delta; a change to them goes out as a whole state."""

    node_id: str
    epoch: int
    version: int
    base: int
    add: frozenset[tuple[str, str | None]]
    remove: frozenset[tuple[str, str | None]]

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.node_id,
            "epoch": self.epoch,
            "version": self.version,
            "base": self.base,
            "add": [[p, g] for p, g in sorted(self.add, key=_interest_order)],
            "remove": [[p, g] for p, g in sorted(self.remove, key=_interest_order)],
        }

    @classmethod
    def from_json(cls, obj: Any) -> InterestDelta:
        """Parse an announced delta; ValueError if it is malformed (the peer's fault)."""
        try:
            delta = cls(
                node_id=_node_id(obj["id"]),
                epoch=int(obj["epoch"]),
                version=int(obj["version"]),
                base=int(obj["base"]),
                add=_interest(obj["add"]),
                remove=_interest(obj["remove"]),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise ValueError(f"malformed interest delta: {e!r}") from None
        if delta.base >= delta.version:
            raise ValueError(f"malformed interest delta: base {delta.base} >= {delta.version}")
        return delta


def _interest(entries: Any) -> frozenset[tuple[str, str | None]]:
    return frozenset((str(p), None if g is None else _group(g)) for p, g in entries)


def _group(value: object) -> str:
    """A queue group name as routing headers can carry it (at most 64 UTF-8 bytes).

    Strict UTF-8: JSON can carry a lone surrogate, which would pass here and then fail to
    encode into the routing header of every event forwarded to that group.
    """
    text = str(value)
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        raise ValueError(f"queue group {text[:80]!r} is not UTF-8") from None
    if not 0 < size <= MAX_GROUP_BYTES:
        raise ValueError(f"queue group {text[:80]!r} is not 1-{MAX_GROUP_BYTES} bytes")
    return text


def _node_id(value: object) -> str:
    text = str(value)
    if len(text) != 16 or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{text[:40]!r} is not a node id")
    return text


def announced(pattern: str) -> bool:
    """True for a pattern a node announces: all but reply inboxes, which route by node id."""
    return not (pattern == INBOX_PREFIX or pattern.startswith(INBOX_PREFIX + "/"))


@dataclass(frozen=True, slots=True)
class MeshRoute:
    """Other nodes an event on one topic must reach."""

    plain: tuple[str, ...]  # nodes with a plain subscription
    groups: tuple[tuple[str, tuple[str, ...]], ...]  # (group, nearest member nodes)
    stored: tuple[str, ...] = ()  # other nodes with a queue that captures the topic
    quiet: tuple[str, ...] = ()  # of ``plain``, nodes whose subscribers cannot answer

    @property
    def responders(self) -> set[str]:
        """The nodes of the route that may answer a request."""
        return set(self.plain).difference(self.quiet).union(*(n for _, n in self.groups))

    @property
    def answers(self) -> bool:
        """True when some node of the route may answer a request."""
        return bool(self.responders)


EMPTY_ROUTE: Final = MeshRoute((), ())


@dataclass
class MeshTable:
    """The newest NodeState of every node, the interest trie, and shortest-path next hops."""

    self_id: str
    states: dict[str, NodeState] = field(default_factory=dict)
    neighbours: set[str] = field(default_factory=set)  # links of this node that are up
    _trie: SubscriptionTrie[tuple[str, str | None]] = field(default_factory=SubscriptionTrie)
    _paths: dict[str, tuple[int, str]] | None = None  # node -> (distance, first hop)
    _routes: dict[str, MeshRoute] = field(default_factory=dict)
    # Nodes whose interest we hold only from a handshake that left it out (a large node):
    # no delta applies to it; the whole state is asked for until it comes.
    partial: set[str] = field(default_factory=set)

    def update(self, state: NodeState, *, partial: bool = False) -> bool:
        """Adopt ``state`` if it is newer than what we hold; True if it changed anything.
        ``partial``: its interest was left out (a handshake), so it is not the whole truth."""
        if state.node_id == self.self_id:
            return False
        old = self.states.get(state.node_id)
        completes = (  # the whole state of the version a handshake gave us without interest
            not partial
            and old is not None
            and state.node_id in self.partial
            and (state.epoch, state.version) == (old.epoch, old.version)
        )
        if not (completes or state.newer_than(old)):
            return False
        if partial:
            self.partial.add(state.node_id)
        else:
            self.partial.discard(state.node_id)
        # Only the difference: a node with 60,000 patterns that adds one re-announces all
        # of them, and rebuilding its part of the trie took a second (heartbeats missed).
        before = old.interest if old is not None else frozenset()
        for p, g in before - state.interest:
            self._trie.remove(p, (state.node_id, g))
        for p, g in state.interest - before:
            self._trie.add(p, (state.node_id, g))
        self.states[state.node_id] = state
        self._changed(topology=old is None or old.links != state.links)
        return True

    def apply(self, delta: InterestDelta) -> str:
        """Adopt an interest delta: "applied"; "stale" when we hold that version or a newer
        one; "gap" when we hold no state it applies to (a version was missed on the way:
        the caller asks for the whole state)."""
        old = self.states.get(delta.node_id)
        if delta.node_id == self.self_id or (
            old is not None and (delta.epoch, delta.version) <= (old.epoch, old.version)
        ):
            return "stale"
        if (
            old is None
            or (old.epoch, old.version) != (delta.epoch, delta.base)
            or delta.node_id in self.partial
        ):
            return "gap"
        interest = old.interest
        gone, new = delta.remove & interest, delta.add - interest
        for p, g in gone:
            self._trie.remove(p, (delta.node_id, g))
        for p, g in new:
            self._trie.add(p, (delta.node_id, g))
        # Changed in place (a state decoded whole is copied once, at its first delta):
        # a copy per delta took 17 ms at 150,000 patterns, and a stream of them kept the
        # loop from its heartbeats until links went down (scale test). No other holder
        # keeps a state once replaced: they are encoded when sent.
        if not isinstance(interest, set):
            interest = set(interest)
        interest -= gone
        interest |= new
        self.states[delta.node_id] = replace(old, version=delta.version, interest=interest)
        self._changed(topology=False)
        return "applied"

    def forget(self, node_id: str) -> None:
        """Drop a node that has been unreachable for long."""
        old = self.states.pop(node_id, None)
        self.partial.discard(node_id)
        if old is not None:
            for p, g in old.interest:
                self._trie.remove(p, (node_id, g))
            self._changed(topology=True)

    def set_neighbours(self, neighbours: Iterable[str]) -> None:
        """The links of this node that are up (first-hand, so they count at once)."""
        new = set(neighbours)
        if new != self.neighbours:
            self.neighbours = new
            self._changed(topology=True)

    def _changed(self, *, topology: bool) -> None:
        self._routes.clear()
        if topology:
            self._paths = None

    # ---- paths ---------------------------------------------------------------------------

    def paths(self) -> dict[str, tuple[int, str]]:
        """Distance and first hop of every reachable node (not this one)."""
        if self._paths is None:
            self._paths = self._bfs()
        return self._paths

    def _adjacent(self, node: str) -> list[str]:
        if node == self.self_id:
            return sorted(self.neighbours)
        state = self.states.get(node)
        if state is None:
            return []
        out = []
        for other in state.links:
            if other == self.self_id:
                if node in self.neighbours:
                    out.append(other)
                continue
            peer = self.states.get(other)
            if peer is not None and node in peer.links:
                out.append(other)
        return sorted(out)

    def _bfs(self) -> dict[str, tuple[int, str]]:
        paths: dict[str, tuple[int, str]] = {}
        queue: deque[tuple[str, int, str]] = deque()
        for n in self._adjacent(self.self_id):
            paths[n] = (1, n)
            queue.append((n, 1, n))
        while queue:
            node, dist, first = queue.popleft()
            for n in self._adjacent(node):
                if n != self.self_id and n not in paths:
                    paths[n] = (dist + 1, first)
                    queue.append((n, dist + 1, first))
        return paths

    def next_hop(self, node_id: str) -> str | None:
        """First neighbour on a shortest path to ``node_id``, or None if unreachable."""
        hop = self.paths().get(node_id)
        return None if hop is None else hop[1]

    def reachable(self) -> list[str]:
        return sorted(self.paths())

    # ---- interest ------------------------------------------------------------------------

    def route(self, topic: str) -> MeshRoute:
        """Other reachable nodes that want ``topic``: plain ones (of which ``quiet`` ones
        cannot answer a request), per group the nearest, and those whose queues capture it
        (persistent events only)."""
        cached = self._routes.get(topic)
        if cached is not None:
            return cached
        paths = self.paths()
        plain: set[str] = set()
        stored: set[str] = set()
        quiet: set[str] = set()
        groups: dict[str, list[tuple[int, str]]] = {}
        for node, group in self._trie.match(topic):
            hop = paths.get(node)
            if hop is None:
                continue
            if group is None:
                plain.add(node)
            elif group.startswith(CAPTURE):
                stored.add(node)
            elif group.startswith(QUIET):
                quiet.add(node)
            else:
                groups.setdefault(group, []).append((hop[0], node))
        grouped = []
        for name, members in sorted(groups.items()):
            nearest = min(d for d, _ in members)
            grouped.append((name, tuple(sorted(n for d, n in members if d == nearest))))
        quiet -= plain  # a node with one subscriber that may answer is a responder
        plain |= quiet  # and events go to both alike
        stored -= plain  # a plain subscriber's node gets every event anyway
        route = (
            MeshRoute(
                tuple(sorted(plain)), tuple(grouped), tuple(sorted(stored)), tuple(sorted(quiet))
            )
            if plain or grouped or stored
            else EMPTY_ROUTE
        )
        if len(self._routes) > 65536:
            self._routes.clear()
        self._routes[topic] = route
        return route

    def matches(self, topic: str) -> list[tuple[str, str | None]]:
        """Every (node, group) whose announced interest matches ``topic``, for operator views."""
        return sorted(self._trie.match(topic), key=lambda x: (x[0], x[1] or ""))

    def path_to(self, node_id: str) -> list[str]:
        """The hops from this node to ``node_id`` (excluding this node), for operator views."""
        hops: list[str] = []
        current = self.self_id
        seen = {current}
        while current != node_id:
            if current == self.self_id:
                nxt = self.next_hop(node_id)
            else:
                nxt = _next_towards(self, current, node_id)
            if nxt is None or nxt in seen:
                return []
            hops.append(nxt)
            seen.add(nxt)
            current = nxt
        return hops


def _next_towards(table: MeshTable, start: str, target: str) -> str | None:
    """First hop from ``start`` towards ``target`` as ``start`` computes it (same BFS rules)."""
    seen = {start}
    queue: deque[tuple[str, str]] = deque()
    for n in table._adjacent(start):
        seen.add(n)
        queue.append((n, n))
    while queue:
        node, first = queue.popleft()
        if node == target:
            return first
        for n in table._adjacent(node):
            if n not in seen:
                seen.add(n)
                queue.append((n, first))
    return None
