"""Random meshes in memory: every node ends up holding every reachable node's exact interest.

Several Mesh objects over a wire that keeps each connection's frames in order but
interleaves connections at random; links are dialed (duplicates too) and cut, nodes
restart with a new epoch, interest changes, and some nodes are "old" (they never say
they take deltas, so they get whole states). After the wire goes quiet, every node must
hold the exact interest of every node it can reach. Written by a reviewer of the
interest deltas; it found that a partial handshake could become a base for deltas, and
that a state adopted from a handshake was not passed on (seeds 174 and 469).
"""

from __future__ import annotations

import random
from collections import deque

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from node.codec import Kind, decode_control, encode_control
from node.mesh import Mesh, Via

TOPICS = list("abcdefgh")
End = tuple[str, Via]


class Sim:
    """Nodes, connections (both ends), what is in flight on each, and what was cut."""

    def __init__(self, n: int, old: set[int], rng: random.Random) -> None:
        self.rng = rng
        self.ids = [f"{i + 1:x}".rjust(16, "0") for i in range(n)]
        self.old = {self.ids[i] for i in old}
        self.epoch = dict.fromkeys(self.ids, 1)
        self.nodes = {i: self._mesh(i) for i in self.ids}
        self.peer_end: dict[End, End] = {}
        self.inbox: dict[End, deque[bytes]] = {}
        self.dead: set[End] = set()
        self.dials = 0
        self.now = 0.0

    def _mesh(self, i: str) -> Mesh:
        return Mesh(
            node_id=i,
            name=f"n{i[-2:]}",
            mesh="m",
            epoch=self.epoch[i],
            dead_after=1e9,
            log=lambda _s: None,
            on_change=lambda: None,
            emit=lambda *_a: None,
        )

    def _as_sent(self, i: str, frame: bytes) -> bytes:
        """An old node's handshake does not say it takes deltas."""
        if i not in self.old:
            return frame
        kind, body = decode_control(frame)
        if kind in (Kind.LINK, Kind.LINK_OK) and "deltas" in body:
            return encode_control(kind, {k: v for k, v in body.items() if k != "deltas"})
        return frame

    def _old_links(self, i: str) -> None:
        if i in self.old:
            for link in self.nodes[i].links.values():
                link.deltas = False

    def dial(self, a: str, b: str) -> None:
        self.dials += 1
        url = f"tcp://{b}#{self.dials}"
        ident = f"{a}>{b}#{self.dials}".encode()
        self.peer_end[(a, url)] = (b, ident)
        self.peer_end[(b, ident)] = (a, url)
        self.inbox[(b, ident)] = deque([self._as_sent(a, self.nodes[a].hello())])
        self.inbox[(a, url)] = deque()

    def close(self, end: End) -> None:
        for e in (end, self.peer_end[end]):
            if e in self.dead:
                continue
            self.dead.add(e)
            self.inbox[e].clear()
            node, via = e
            if self.nodes[node].is_link(via):
                self.nodes[node].drop_via(via, "closed", 0.0)
                self._old_links(node)

    def collect(self) -> None:
        changed = True
        while changed:
            changed = False
            for i, m in self.nodes.items():
                for via in m.closed:
                    if (i, via) in self.peer_end and (i, via) not in self.dead:
                        self.close((i, via))
                        changed = True
                m.closed.clear()
                out, m.out = m.out, []
                for via, frame in out:
                    far = self.peer_end.get((i, via))
                    if (i, via) not in self.dead and far is not None and far not in self.dead:
                        self.inbox[far].append(self._as_sent(i, frame))

    def deliver_one(self) -> bool:
        ready = [k for k, q in self.inbox.items() if q and k not in self.dead]
        if not ready:
            return False
        node, via = key = self.rng.choice(ready)
        kind, body = decode_control(self.inbox[key].popleft())
        m = self.nodes[node]
        if m.is_link(via):
            if kind == Kind.STATES:
                m.on_states(via, body, 0.0)
            elif kind == Kind.LINK_REFUSE:
                m.drop_via(via, str(body.get("reason")), 0.0)
        elif isinstance(via, bytes):
            if kind == Kind.LINK:
                m.on_link_request(via, body, "", 0.0)
        elif kind == Kind.LINK_OK:
            m.on_link_ok(via, body, "static", 0.0)
        elif kind == Kind.LINK_REFUSE:
            m.refuse_outbound(via, body["reason"])
        self._old_links(node)
        self.collect()
        return True

    def pump(self) -> None:
        self.collect()
        for _ in range(100_000):
            if not self.deliver_one():
                return
        raise AssertionError("the mesh did not go quiet")

    def settle(self) -> None:
        """Until quiet, then a few of the loop's ticks (which ask for whole states a node
        holds only partly), each followed by what they set moving."""
        self.pump()
        for _ in range(3):
            self.now += 10.0
            for m in self.nodes.values():
                m.tick(self.now, 1.0)
            self.pump()

    def set_interest(self, i: str, names: set[str]) -> None:
        self.nodes[i].set_interest(frozenset((t, None) for t in names))
        self.nodes[i].flush_announcements()
        self.collect()

    def restart(self, i: str) -> None:
        for end in [e for e in self.peer_end if e[0] == i]:
            self.close(end)
        self.epoch[i] += 1
        self.nodes[i] = self._mesh(i)

    def cut(self) -> None:
        live = [e for e in self.peer_end if e not in self.dead and self.nodes[e[0]].is_link(e[1])]
        if live:
            self.close(self.rng.choice(sorted(live, key=repr)))

    def reachable(self, i: str) -> set[str]:
        seen, todo = {i}, [i]
        while todo:
            x = todo.pop()
            for y in self.nodes[x].links:
                if y not in seen and x in self.nodes[y].links:
                    seen.add(y)
                    todo.append(y)
        return seen

    def problems(self) -> list[str]:
        bad = []
        for i, m in self.nodes.items():
            for j in sorted(self.reachable(i) - {i}):
                held, truth = m.table.states.get(j), self.nodes[j]
                if held is None or held.interest != truth.interest:
                    bad.append(f"{i[-1]} holds {j[-1]} as {held} but it is {truth.state()}")
        return bad


def run(seed: int, *, n: int = 4, steps: int = 40, old_frac: float = 0.3) -> list[str]:
    """What is wrong once the wire is quiet, then once more after a last change of
    interest on every node."""
    rng = random.Random(seed)
    sim = Sim(n, {k for k in range(n) if rng.random() < old_frac}, rng)
    for _ in range(steps):
        op = rng.random()
        if op < 0.25:
            sim.dial(*rng.sample(sim.ids, 2))
        elif op < 0.35:
            sim.cut()
        elif op < 0.40:
            sim.restart(rng.choice(sim.ids))
        elif op < 0.75:
            sim.set_interest(rng.choice(sim.ids), set(rng.sample(TOPICS, rng.randint(1, 5))))
        else:
            for _ in range(rng.randint(1, 10)):
                sim.deliver_one()
    sim.settle()
    quiet = sim.problems()
    # One more change everywhere: with whole states that healed any stale copy; deltas
    # must not keep one stale.
    for i in sim.ids:
        sim.set_interest(i, {p for p, _g in sim.nodes[i].interest} ^ {rng.choice(TOPICS)})
    sim.settle()
    return quiet + sim.problems()


@given(st.integers(0, 10**6), st.sampled_from([0.0, 0.3, 1.0]))
@example(174, 0.3)  # a state adopted from a handshake was not passed on
@example(469, 0.3)
def test_every_node_holds_every_reachable_nodes_interest(seed: int, old_frac: float) -> None:
    assert run(seed, old_frac=old_frac) == []


@given(st.integers(0, 10**6))
@example(336)
@example(346)  # a whole state of the very version a handshake gave partly was refused
@example(616)
def test_the_same_when_handshakes_leave_the_interest_out(seed: int) -> None:
    """As a node holding over 256 KiB of patterns does (the bound lowered to fit here)."""
    import node.mesh

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(node.mesh, "HANDSHAKE_INTEREST_BYTES", 10)
        assert run(seed, n=5, steps=60, old_frac=0.0) == []
