"""How node states travel between nodes, sans-IO: announcing our own, flooding others'.

A mixin of node/mesh.py's Mesh, split out to keep modules small; it works on the Mesh's
own state (the annotations below name what it uses).

Each node announces a versioned state: its links and the (pattern, group) entries its
clients hold. Where only the entries changed and the peer said in its handshake that it
takes them (``deltas``), the announcement is an InterestDelta against the version before;
otherwise, and to older peers, the whole state. A node that receives a delta it cannot
apply (it missed a version, or never heard of the node) asks the link it came from for
the whole state (``want``), and any node answers such a request with what it holds.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any, Final

from node.codec import MAX_STATE_BYTES, Kind, encode_control
from node.framing import json_batches
from node.routing import InterestDelta, MeshTable, NodeState

if TYPE_CHECKING:
    from node.mesh import Link, Via

STATES_FRAME_BUDGET: Final = MAX_STATE_BYTES // 2  # bytes of states per STATES frame
Interest = set[tuple[str, str | None]]


class StatesSide:
    """Announcing and flooding node states."""

    # The Mesh's state this side works on (set in Mesh.__init__).
    node_id: str
    version: int
    interest: set[tuple[str, str | None]]  # changed in place
    links: dict[str, Link]
    by_via: dict[Via, str]
    table: MeshTable
    out: list[tuple[Via, bytes]]
    counters: dict[str, int]
    log: Callable[[str], None]
    on_change: Callable[[], None]
    _dirty: bool
    _announced: NodeState | None  # our last state sent to the links
    _unannounced: tuple[Interest, Interest]  # (added, removed) since then

    def state(self) -> NodeState:
        raise NotImplementedError

    def _topology_changed(self, now: float) -> None:
        raise NotImplementedError

    def set_interest(self, interest: AbstractSet[tuple[str, str | None]]) -> None:
        """The local clients' patterns are now ``interest``: announce at the next output."""
        self.change_interest(interest - self.interest, self.interest - interest)

    def change_interest(
        self,
        add: Iterable[tuple[str, str | None]],
        remove: Iterable[tuple[str, str | None]],
    ) -> None:
        """The local clients took up or dropped these (pattern, group) entries: announce
        at the next output. Costs what changed, not what is held: a copy of the whole set
        per change took 17 ms at 150,000 patterns, and a stream of changes kept the loop
        from its heartbeats until links went down (scale test)."""
        held = self.interest
        add = {k for k in add if k not in held}
        remove = {k for k in remove if k in held}
        if not (add or remove):
            return
        held -= remove  # in place: the states we announced hold only its size (``_announce``)
        held |= add
        pending_add, pending_remove = self._unannounced
        for k in add:
            if k in pending_remove:
                pending_remove.discard(k)
            else:
                pending_add.add(k)
        for k in remove:
            if k in pending_add:
                pending_add.discard(k)
            else:
                pending_remove.add(k)
        self._dirty = True

    def _announce(self) -> None:
        """Send our new state to every link: as a delta where only our interest changed
        and the peer takes deltas, else whole."""
        self.version += 1
        state = self.state()
        before, self._announced = self._announced, state
        add, remove = self._unannounced
        self._unannounced = (set(), set())
        delta = None
        if (
            before is not None
            and (before.name, before.links, before.endpoints)
            == (state.name, state.links, state.endpoints)
            and len(add) + len(remove) < len(state.interest)
        ):
            delta = InterestDelta(
                state.node_id,
                state.epoch,
                state.version,
                before.version,
                frozenset(add),
                frozenset(remove),
            )
        whole: bytes | None = None
        part: bytes | None = None
        for link in self.links.values():
            if delta is not None and link.deltas:
                if part is None:
                    part = self._own_frame(delta.to_json(), len(add) + len(remove))
                frame = part
            else:
                if whole is None:  # encoded once for all links (b"": too large, counted once)
                    whole = self._own_frame(state.to_json(), len(state.interest))
                frame = whole
            if frame:
                self.out.append((link.via, frame))

    def _own_frame(self, obj: dict[str, Any], patterns: int) -> bytes:
        """Our STATES frame for ``obj``; empty if no receiver would accept it (counted)."""
        frame = encode_control(Kind.STATES, {"states": [obj]})
        if len(frame) <= MAX_STATE_BYTES:  # receivers would drop it, or libzmq the link
            return frame
        n = self.counters["state_too_large"] = self.counters["state_too_large"] + 1
        if n == 1 or n % 100 == 0:
            self.log(
                f"this node's interest ({patterns} patterns) does not fit in "
                f"a state frame ({len(frame)} bytes compressed, limit {MAX_STATE_BYTES}): "
                "not announced; other nodes keep its last announced interest, and new "
                "links to it fail until it holds fewer patterns"
            )
        return b""

    def _states_frames(self, states: list[dict[str, Any]]) -> list[bytes]:
        """STATES frames holding ``states``, each within the size a receiver accepts (a
        table of many nodes with large interest would not fit in one). A state too large
        for any frame, even compressed, is left out and counted: a receiver would drop
        it, or libzmq the link."""
        frames = [
            encode_control(Kind.STATES, {"states": batch})
            for batch in json_batches(states, STATES_FRAME_BUDGET)
        ]
        fit = [f for f in frames if len(f) <= MAX_STATE_BYTES]
        self.counters["state_too_large"] += len(frames) - len(fit)
        return fit

    def flush_announcements(self) -> None:
        """Send our state once for all changes since the last call (coalesces bursts)."""
        if self._dirty:
            self._dirty = False
            self._announce()

    # ---- from other nodes ---------------------------------------------------------------

    def on_states(self, via: Via, body: dict[str, Any], now: float) -> None:
        """Adopt newer states and deltas and pass each on to every other link (flooding);
        answer a peer's ``want`` (states it missed a delta of) and ask for ours."""
        link = self.links.get(self.by_via.get(via, ""))
        if link is None:
            return
        link.last_rx = now
        states = body.get("states")
        want = body.get("want")
        if not isinstance(states, list) or not isinstance(want, list | None):
            self.counters["bad_states"] += 1
            return
        if want:
            self._send_wanted(via, want, now)
        reshaped = False  # once per frame: paths are found again over the whole table
        fresh: dict[str, dict[str, Any]] = {}  # node id -> what to pass on
        deltas: dict[str, list[dict[str, Any]]] = {}
        gaps: set[str] = set()
        for obj in states[:10_000]:
            if isinstance(obj, dict) and "base" in obj:
                self._take_delta(obj, deltas, gaps)
                continue
            try:
                state = NodeState.from_json(obj)
            except ValueError:
                self.counters["bad_states"] += 1
                continue
            topology_before = self.table.states.get(state.node_id)
            if self.table.update(state):
                fresh[state.node_id] = obj
                deltas.pop(state.node_id, None)  # the whole state supersedes them
                gaps.discard(state.node_id)
                if topology_before is None or topology_before.links != state.links:
                    reshaped = True
        if reshaped:
            self._topology_changed(now)
        if gaps:
            self.out.append(
                (via, encode_control(Kind.STATES, {"states": [], "want": sorted(gaps)}))
            )
        if fresh or deltas:
            self.on_change()
            self._flood(via, fresh, deltas)

    def _take_delta(
        self, obj: dict[str, Any], deltas: dict[str, list[dict[str, Any]]], gaps: set[str]
    ) -> None:
        try:
            delta = InterestDelta.from_json(obj)
        except ValueError:
            self.counters["bad_states"] += 1
            return
        verdict = self.table.apply(delta)
        if verdict == "applied":
            deltas.setdefault(delta.node_id, []).append(obj)
        elif verdict == "gap":
            gaps.add(delta.node_id)

    def _flood(
        self, via: Via, fresh: dict[str, dict[str, Any]], deltas: dict[str, list[dict[str, Any]]]
    ) -> None:
        """Pass adopted states on: deltas to links that take them, whole states to others."""
        part: list[bytes] | None = None
        whole: list[bytes] | None = None
        for other in self.links.values():
            if other.via == via:
                continue
            if other.deltas:
                if part is None:
                    objs = [*fresh.values(), *(o for d in deltas.values() for o in d)]
                    part = self._states_frames(objs)
                frames = part
            else:
                if whole is None:
                    now_held = [self.table.states[n].to_json() for n in deltas]
                    whole = self._states_frames([*fresh.values(), *now_held])
                frames = whole
            self.out.extend((other.via, frame) for frame in frames)

    def _send_wanted(self, via: Via, want: list[Any], now: float) -> None:
        """A peer missed a delta of these nodes: send the whole states we hold, each at
        most once a second to one link (a repeated id must not make us send it again and
        again: 2,000 copies of one id once cost 308 MB of frames)."""
        link = self.links[self.by_via[via]]
        answered = link.answered
        held = []
        for node_id in dict.fromkeys(x for x in want[:10_000] if isinstance(x, str)):
            if now - answered.get(node_id, float("-inf")) < 1.0:
                continue
            if node_id == self.node_id:
                # Its interest is our live set (changed in place): with changes not yet
                # announced it holds them too, under the older version. Harmless: the
                # delta that announces them adds and removes the same entries again.
                state = self._announced
            elif node_id in self.table.partial:
                state = None  # what we hold of it is not the whole truth
            else:
                state = self.table.states.get(node_id)
            if state is not None:
                answered[node_id] = now
                held.append(state.to_json())
        if len(answered) > 10_000:
            answered.clear()
        for frame in self._states_frames(held):
            self.out.append((via, frame))

    def _want_partial(self) -> None:
        """Ask the next hop towards each node we hold only partly for its whole state."""
        by_link: dict[Via, list[str]] = {}
        for node_id in sorted(self.table.partial):
            hop = self.table.next_hop(node_id)
            link = self.links.get(hop) if hop is not None else None
            if link is not None:
                by_link.setdefault(link.via, []).append(node_id)
        for via, ids in by_link.items():
            self.out.append((via, encode_control(Kind.STATES, {"states": [], "want": ids})))
