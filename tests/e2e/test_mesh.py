"""Several real nodes on one host, joined by static links: routing, groups, faults.

Topologies: a line A-B-C (A reaches C only through B), a triangle, and a 4-node ring.
Clients are the real client library over each node's ipc socket. Discovery is off: these
nodes only know each other through ``--link``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import NodeFactory, NodeProcess, free_tcp_port, run_cli, wait_for

from meshctl import connect
from meshctl.client import Client
from meshctl.errors import NoResponders, Timeout

pytestmark = [pytest.mark.e2e, pytest.mark.mesh]

FAST = '[mesh]\nheartbeat = "200ms"\ndead_after = "1s"\nbackoff_max = "500ms"\n'


class Mesh:
    """Nodes started for one test, stopped (and their logs shown on failure) afterwards."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.nodes: dict[str, NodeProcess] = {}
        self.clients: list[Client] = []

    def start(
        self,
        name: str,
        links: list[str] = (),
        *,
        data_dir: Path | None = None,
        port: int | None = None,
        config: str = "",
    ) -> NodeProcess:
        args = ["--no-discovery"]
        for other in links:
            args += ["--link", f"tcp://127.0.0.1:{self.nodes[other].tcp_port}"]
        if port is not None:
            args += ["--port", str(port)]
        node = NodeProcess.start(
            self.tmp_path / name,
            name=name,
            config_text=FAST + config,
            data_dir=data_dir,
            extra_args=args,
        )
        node.wait_ready(timeout=10)
        self.nodes[name] = node
        return node

    def client(self, name: str) -> Client:
        c = connect(self.nodes[name].ipc, name=f"test@{name}", timeout=5)
        self.clients.append(c)
        return c

    def wait_linked(self, name: str, peers: int, timeout: float = 10) -> None:
        wait_for(
            lambda: (
                len(self.view(name, "peers")["peers"]) >= peers
                and all(p["state"] == "up" for p in self.view(name, "peers")["peers"])
            ),
            timeout=timeout,
            what=f"{name} to have {peers} links up",
        )

    def wait_reachable(self, name: str, count: int, timeout: float = 10) -> None:
        def ok() -> bool:
            nodes = self.view(name, "mesh")["nodes"]
            return sum(1 for n in nodes if n["reachable"]) == count

        wait_for(ok, timeout=timeout, what=f"{name} to reach {count} nodes")

    def wait_interest(self, name: str, topic: str, nodes: int, timeout: float = 5) -> None:
        """Until ``name`` routes ``topic`` to ``nodes`` remote (node, group) entries."""
        wait_for(
            lambda: (
                sum(1 for r in self.view(name, "routes", topic=topic)["remote"] if r["reachable"])
                >= nodes
            ),
            timeout=timeout,
            what=f"{name} to see interest in {topic} on {nodes} nodes",
        )

    def view(self, name: str, view: str, **args: object) -> dict:
        with connect(self.nodes[name].ipc, timeout=5) as c:
            return c.view(view, **args)

    def close(self, failed: bool) -> None:
        for c in self.clients:
            c.close()
        for node in self.nodes.values():
            node.stop()
        if failed:
            for name, node in self.nodes.items():
                print(f"--- {name} log\n{node.log_text()}")


@pytest.fixture
def mesh(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        rep = getattr(request.node, "rep_call", None)
        m.close(rep is None or rep.failed)


def drain(sub, timeout: float = 0.5) -> list:
    """Everything that arrives until ``timeout`` passes without an event."""
    got = []
    try:
        while True:
            got.append(sub.next(timeout))
    except Timeout:
        return got


def line(mesh: Mesh) -> None:
    """A - B - C: A and C both link to B only."""
    mesh.start("B")
    mesh.start("A", ["B"])
    mesh.start("C", ["B"])
    for n in "ABC":
        mesh.wait_reachable(n, 3)


def test_line_delivers_exactly_once_across_two_hops(mesh: Mesh) -> None:
    line(mesh)
    subs = {n: mesh.client(n).subscribe("plant/>") for n in "ABC"}
    for n in "AB":
        mesh.wait_interest(n, "plant/x", 1 if n == "B" else 2)
    pub = mesh.client("A")
    with pub.batch():
        for i in range(200):
            pub.publish("plant/x", str(i))
    pub.flush()
    for n, sub in subs.items():
        got = [e.data for e in drain(sub)]
        assert got == [str(i).encode() for i in range(200)], f"{n} got {len(got)} events"


def test_no_echo_and_no_flooding(mesh: Mesh) -> None:
    line(mesh)
    a = mesh.client("A")
    sub_a = a.subscribe("t/>")
    mesh.client("C").subscribe("other/>")
    mesh.wait_interest("A", "other/x", 1)
    for i in range(50):
        a.publish("t/x", str(i))
    a.flush()
    assert len(drain(sub_a)) == 50  # published and subscribed on A: once, never back from B
    b = mesh.view("B", "status")["counters"]
    # Nothing on B or C wants t/x: A forwarded none of it.
    assert b["forwarded_in"] == 0
    assert mesh.view("A", "status")["counters"]["forwarded_out"] == 0


def test_triangle_and_ring_deliver_exactly_once(mesh: Mesh) -> None:
    mesh.start("A")
    mesh.start("B", ["A"])
    mesh.start("C", ["A", "B"])
    mesh.start("D", ["C", "A"])  # A-B, A-C, B-C triangle plus D linked to C and A
    for n in "ABCD":
        mesh.wait_reachable(n, 4)
    subs = {n: mesh.client(n).subscribe("r/*") for n in "ABCD"}
    mesh.wait_interest("B", "r/x", 3)
    pub = mesh.client("B")
    for i in range(100):
        pub.publish("r/x", str(i))
    pub.flush()
    for n, sub in subs.items():
        got = Counter(e.data for e in drain(sub))
        assert len(got) == 100, f"{n}: {len(got)} distinct events"
        assert set(got.values()) == {1}, f"{n}: duplicates"


def test_four_node_ring(mesh: Mesh) -> None:
    mesh.start("A")
    mesh.start("B", ["A"])
    mesh.start("C", ["B"])
    mesh.start("D", ["C", "A"])  # ring A-B-C-D-A: C is two hops from A either way
    for n in "ABCD":
        mesh.wait_reachable(n, 4)
    sub = mesh.client("C").subscribe("ring/>")
    mesh.wait_interest("A", "ring/x", 1)
    routes = mesh.view("A", "routes", topic="ring/x")
    assert len(routes["copies"]) == 1  # one copy, one path, no flooding
    pub = mesh.client("A")
    for i in range(100):
        pub.publish("ring/x", str(i))
    pub.flush()
    assert [e.data for e in drain(sub)] == [str(i).encode() for i in range(100)]


def test_queue_group_picks_one_member_mesh_wide_preferring_local(mesh: Mesh) -> None:
    line(mesh)
    members = {n: mesh.client(n).subscribe("job/*", group="workers") for n in "BC"}
    mesh.wait_interest("A", "job/x", 2)
    pub = mesh.client("A")
    for i in range(60):
        pub.publish("job/x", str(i))
    pub.flush()
    got = {n: drain(s) for n, s in members.items()}
    assert sum(len(v) for v in got.values()) == 60
    # The nearest member wins: B is one hop from A, C two.
    assert len(got["B"]) == 60
    # A member on the publishing node is preferred over every remote one.
    local = mesh.client("A").subscribe("job/*", group="workers")
    for i in range(30):
        pub.publish("job/x", str(i))
    pub.flush()
    assert len(drain(local)) == 30
    assert all(not drain(s, 0.2) for s in members.values())
    # `routes` says so (exploratory test: it named B as the group's target, and the text
    # said nothing of the group at all).
    view = mesh.view("A", "routes", topic="job/x")
    assert [(g["group"], g["here"]) for g in view["groups"]] == [("workers", True)]
    shown = run_cli("routes", "job/x", server=mesh.nodes["A"].ipc)
    assert "group workers: every event to a member on this node" in shown.stdout, shown.stdout
    assert "(nearest)" not in shown.stdout
    # A name that needs escaping in the text, and two subscriptions here (review).
    _held = [mesh.client("A").subscribe("job/*", group="w[x]") for _ in range(2)]
    mesh.client("C").subscribe("job/*", group="w[x]")
    mesh.wait_interest("A", "job/x", 3)
    shown = run_cli("routes", "job/x", server=mesh.nodes["A"].ipc)
    said = "group w[x]: every event to a member on this node, round-robin among its 2"
    assert said in shown.stdout, shown.stdout
    assert "(nearest)" not in shown.stdout


def test_queue_group_members_at_equal_distance_share(mesh: Mesh) -> None:
    line(mesh)
    members = {n: mesh.client(n).subscribe("job/*", group="g") for n in "AC"}
    mesh.wait_interest("B", "job/x", 2)
    pub = mesh.client("B")
    for i in range(100):
        pub.publish("job/x", str(i))
    pub.flush()
    counts = {n: len(drain(s)) for n, s in members.items()}
    assert sum(counts.values()) == 100
    assert 30 <= counts["A"] <= 70, counts


def test_request_reply_and_no_responders_across_hops(mesh: Mesh) -> None:
    line(mesh)
    responder = mesh.client("C")
    responder.subscribe(
        "svc/echo", group="svc", callback=lambda req: responder.reply(req, b"echo:" + req.data)
    )
    stop = threading.Event()

    def serve() -> None:  # the responder's client is used by this thread only
        while not stop.is_set():
            responder.process(0.05)

    worker = threading.Thread(target=serve)
    worker.start()
    try:
        mesh.wait_interest("A", "svc/echo", 1)
        requester = mesh.client("A")
        replies = [requester.request("svc/echo", str(i), timeout=2) for i in range(5)]
        assert [r.data for r in replies] == [f"echo:{i}".encode() for i in range(5)]
        start = time.monotonic()
        with pytest.raises(NoResponders):
            requester.request("nobody/here", b"x", timeout=2)
        assert time.monotonic() - start < 0.5  # at once (its timeout: 2 s; tests run two at a time)
    finally:
        stop.set()
        worker.join(5)


def test_cli_request_across_hops(mesh: Mesh, bg) -> None:
    line(mesh)
    bg.start("reply", "svc/time", "--echo", server=mesh.nodes["C"].ipc)
    mesh.wait_interest("A", "svc/time", 1)
    r = run_cli("req", "svc/time", "hello", server=mesh.nodes["A"].ipc)
    assert r.returncode == 0, r.describe()
    assert r.stdout.strip() == "hello"
    r = run_cli("req", "svc/none", "hello", server=mesh.nodes["A"].ipc)
    assert r.returncode == 1
    assert "no responders for svc/none" in r.stderr


def test_killed_node_interest_is_withdrawn_and_it_relinks(mesh: Mesh) -> None:
    line(mesh)
    c = mesh.client("C")
    c.subscribe("svc/c", group="svc")
    mesh.wait_interest("A", "svc/c", 1)
    c_node = mesh.nodes["C"]
    data_dir, port = c_node.data_dir, c_node.tcp_port
    os.kill(c_node.pid, signal.SIGKILL)
    c_node.proc.wait(5)
    mesh.clients.remove(c)
    t0 = time.monotonic()
    mesh.wait_reachable("A", 2, timeout=5)
    withdrawn_after = time.monotonic() - t0
    assert withdrawn_after < 3.0, f"withdrawal took {withdrawn_after:.2f}s"
    requester = mesh.client("A")
    with pytest.raises(NoResponders):
        requester.request("svc/c", b"x", timeout=1)
    # C comes back on the same port and data dir: it relinks by itself.
    mesh.start("C", ["B"], data_dir=data_dir, port=port)
    mesh.wait_reachable("A", 3, timeout=10)
    sub = mesh.client("C").subscribe("back/>")
    mesh.wait_interest("A", "back/x", 1)
    requester.publish("back/x", b"1")
    requester.flush()
    assert [e.data for e in drain(sub)] == [b"1"]


def test_a_restarted_nodes_own_events_reach_the_mesh(mesh: Mesh) -> None:
    """Found by an exploratory test: a node's own $mesh events were numbered from 0 each
    run under its id, so after a restart the other nodes' duplicate window (active
    while the mesh converges, which a restart starts) dropped them as seen."""
    mesh.start("A")
    mesh.start("B", ["A"])
    mesh.wait_linked("B", 1)
    watch = mesh.client("B").subscribe("$mesh/>")
    mesh.wait_interest("A", "$mesh/client/connect", 1)
    for _ in range(150):  # the first run's events: B sees (and its window keeps) 300 seqs,
        mesh.client("A").close()  # more than the second run makes before it is checked
    assert len(drain(watch)) >= 300
    a = mesh.nodes["A"]
    data_dir, port = a.data_dir, a.tcp_port
    os.kill(a.pid, signal.SIGKILL)
    a.proc.wait(5)
    mesh.clients[:] = [c for c in mesh.clients if c.server != a.ipc]
    mesh.start("A", data_dir=data_dir, port=port)
    mesh.wait_linked("A", 1, timeout=15)
    mesh.wait_interest("A", "$mesh/client/connect", 1)
    for _i in range(3):
        mesh.client("A")
    got = [e for e in drain(watch, 2.0) if e.topic == "$mesh/client/connect"]
    names = [json.loads(e.data).get("name") for e in got]
    assert names.count("test@A") >= 3, names


def test_a_new_nodes_own_link_up_reaches_a_subscriber_two_hops_away(mesh: Mesh) -> None:
    """Found by an exploratory test: a node that joins emits its link/up and node/up
    before the states of the nodes behind its new neighbour arrive, so nobody there was
    interested yet, and $mesh subscribers two hops away never saw them. Such an event is
    kept a moment (while the mesh converges) and sent once someone wants it."""
    mesh.start("B")
    mesh.start("C", ["B"])
    mesh.wait_linked("C", 1)
    watch = mesh.client("C").subscribe("$mesh/link/>", "$mesh/node/>")
    mesh.wait_interest("B", "$mesh/link/up", 1)
    a = mesh.start("A", ["B"])
    got = [e for e in drain(watch, 2.0) if json.loads(e.data)["node"] == a.node_id]
    links = [json.loads(e.data)["peer_name"] for e in got if e.topic == "$mesh/link/up"]
    assert links == ["B"], [e.data for e in got]
    # In A's order: a new event went out before the held ones (review).
    seqs = [int.from_bytes(e.raw_id[8:], "big") for e in got]
    assert seqs == sorted(seqs), [(e.topic, e.data) for e in got]


@pytest.mark.parametrize("group", [None, "g"])
def test_a_new_nodes_node_up_reaches_subscribers_behind_each_neighbour_once(
    mesh: Mesh, group: str | None
) -> None:
    """Plant scenario: a restarted node's node/up reached $mesh subscribers behind one of
    its two neighbours only, the one whose state came first; the held copy went to the
    first nodes that wanted it and was forgotten. It is kept its moment for the nodes
    that turn up meanwhile, and each gets one copy; a queue group one (review: none)."""
    mesh.start("B")
    mesh.start("D")
    watches = {n: mesh.client(n).subscribe("$mesh/node/>", group=group) for n in ("B", "D")}
    a = mesh.start("A", ["B", "D"])
    got = {}
    for name, watch in watches.items():
        bodies = [(e.topic, json.loads(e.data)) for e in drain(watch, 2.0)]
        # A's own node/up, not one it announced of a peer it reached
        got[name] = [t for t, b in bodies if b["node"] == a.node_id and "peer" not in b]
    if group is None:
        assert got == {"B": ["$mesh/node/up"], "D": ["$mesh/node/up"]}
    else:
        assert sorted(got["B"] + got["D"]) == ["$mesh/node/up"], got


@pytest.mark.parametrize("stopped", ["A", "B"], ids=["dialed", "dialer"])
def test_a_stopping_node_ends_its_links_at_once(mesh: Mesh, stopped: str) -> None:
    """Plant scenario: the node that had dialed a stopped peer took it for a full link
    ($mesh/link/full, events counted link_full) until the heartbeats' silence said it
    was gone. A stopping node says goodbye on every link."""
    mesh.start("A")
    mesh.start("B", ["A"])
    mesh.wait_linked("B", 1)
    mesh.wait_linked("A", 1)
    other = "B" if stopped == "A" else "A"
    watch = mesh.client(other).subscribe("$mesh/node/down")
    mesh.wait_interest(stopped, "$mesh/node/down", 1)
    gone = mesh.nodes[stopped].node_id
    mesh.nodes[stopped].stop()
    wait_for(
        lambda: "peer ended the link: node stopped" in mesh.nodes[other].log_text(),
        timeout=0.9,  # under mesh.dead_after (1 s here): not the heartbeats' silence
        what=f"{other} to hear that {stopped} stopped",
    )
    # Its own node/down came before the goodbye (review: it never did after it).
    bodies = [json.loads(e.data) for e in drain(watch, 0.5)]
    assert {"node": gone, "reason": "stopped"}.items() <= next(
        (b for b in bodies if b["node"] == gone), {}
    ).items(), bodies


def test_new_subscription_takes_effect_within_100ms(mesh: Mesh) -> None:
    line(mesh)
    pub = mesh.client("A")
    sub = mesh.client("C").subscribe("fresh/>")
    time.sleep(0.1)  # the bound under test: no retry, no polling of routes
    pub.publish("fresh/x", b"1")
    pub.flush()
    assert [e.data for e in drain(sub, 1.0)] == [b"1"]


def test_operator_views_and_mesh_events(mesh: Mesh) -> None:
    mesh.start("B")
    tail = mesh.client("B").subscribe("$mesh/>")
    mesh.start("A", ["B"])
    mesh.wait_reachable("B", 2)
    topics = {e.topic for e in drain(tail, 1.0)}
    assert "$mesh/link/up" in topics
    assert "$mesh/node/up" in topics
    peers = run_cli("peers", "--json", server=mesh.nodes["A"].ipc)
    assert peers.returncode == 0, peers.describe()
    (row,) = peers.json_lines()
    assert row["name"] == "B"
    assert row["state"] == "up"
    assert row["found"] == "static"
    assert {"id", "address", "rtt_ms", "age_s"} <= row.keys()
    view = run_cli("mesh", "--json", server=mesh.nodes["A"].ipc).json_lines()[0]
    assert {n["name"] for n in view["nodes"]} == {"A", "B"}
    human = run_cli("mesh", server=mesh.nodes["A"].ipc)
    assert "B" in human.stdout
    assert human.returncode == 0
    routes = run_cli("routes", "x/y", "--json", server=mesh.nodes["A"].ipc).json_lines()[0]
    assert routes["remote"] == []
    assert routes["local"] == []


def test_stopped_peer_is_noticed_and_relinks_when_continued(mesh: Mesh) -> None:
    """SIGSTOP: the process is alive, its sockets open, but silent. Heartbeats must notice."""
    line(mesh)
    c_node = mesh.nodes["C"]
    os.kill(c_node.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        mesh.wait_reachable("A", 2, timeout=5)
        assert time.monotonic() - t0 < 3.0  # dead_after is 1 s in this test's config
    finally:
        os.kill(c_node.pid, signal.SIGCONT)
    mesh.wait_reachable("A", 3, timeout=10)
    sub = mesh.client("C").subscribe("cont/>")
    mesh.wait_interest("A", "cont/x", 1)
    pub = mesh.client("A")
    pub.publish("cont/x", b"1")
    pub.flush()
    assert [e.data for e in drain(sub)] == [b"1"]


def test_a_peer_whose_link_is_down_is_still_named_in_peers(mesh: Mesh) -> None:
    """Exploratory test (lab faults): while a link was cut, its row in `meshctl peers`
    named the peer "?", just when the operator wants to know which node is cut off."""
    mesh.start("A")
    mesh.start("B", ["A"])
    mesh.wait_linked("B", 1)
    a = mesh.nodes["A"]
    os.kill(a.pid, signal.SIGSTOP)
    try:
        rows = wait_for(
            lambda: [p for p in mesh.view("B", "peers")["peers"] if p["state"] != "up"],
            timeout=5,
            what="B's link to A down",
        )
        assert [(p["name"], p["found"]) for p in rows] == [("A", "static")]
    finally:
        os.kill(a.pid, signal.SIGCONT)


def test_a_silence_shorter_than_dead_after_keeps_the_link_on_both_ends(
    make_node: NodeFactory,
) -> None:
    """Review: with mesh.dead_after = "30s", libzmq's fixed 3 s timeout on the dialed
    node's socket cut the link during a 4 s pause of the dialer; the dialer kept it "up"
    for 30 s with nowhere to send, and what was published meanwhile was lost."""
    cfg = '[mesh]\ndiscovery = false\nheartbeat = "1s"\ndead_after = "30s"\n'
    b = make_node(config_text=cfg, name="b")
    a = make_node(config_text=cfg, name="a", extra_args=["--link", b.tcp])
    with connect(a.ipc) as sub_client, connect(b.ipc) as pub:
        sub = sub_client.subscribe("p/>")
        wait_for(
            lambda: any(r["reachable"] for r in pub.view("routes", topic="p/x")["remote"]),
            timeout=5,
            what="b routes p/x to a",
        )
        os.kill(a.pid, signal.SIGSTOP)
        try:
            for i in range(8):
                pub.publish("p/x", str(i))
                pub.flush()
                time.sleep(0.5)
        finally:
            os.kill(a.pid, signal.SIGCONT)
        got = [sub.next(10).data for _ in range(8)]
    assert got == [str(i).encode() for i in range(8)]
    assert "link down" not in b.log_text()
    assert "link down" not in a.log_text()


def test_a_queue_captures_persistent_events_published_on_another_node(mesh: Mesh) -> None:
    """A - B - C: a durable queue on C captures what A's publisher stores, with no
    consumer connected."""
    line(mesh)
    admin = mesh.client("C")
    admin.queue("add", "orders", patterns=["orders/>"])
    mesh.wait_interest("A", "orders/1", 1)
    pub = mesh.client("A")
    for i in range(100):
        pub.publish("orders/1", str(i), persistent=True)
        pub.publish("orders/direct", "not captured")  # direct events are not queued
    assert pub.confirm(timeout=5) == 100
    wait_for(
        lambda: admin.queue("info", "orders")["queue"]["depth"] == 100,
        timeout=5,
        what="C's queue to hold 100 events",
    )
    consumer = mesh.client("C").consume("orders")
    got = [consumer.next(timeout=2) for _ in range(100)]
    assert [e.data for e in got] == [str(i).encode() for i in range(100)]
    assert all(e.deliveries == 1 for e in got)
    # A queue is no responder: a request on its topics from A is answered "no responders"
    # by A at once, as it is on C (it waited out its timeout); and only the persistent
    # events travelled to C, the direct ones had nowhere to go there.
    start = time.monotonic()
    with pytest.raises(NoResponders):
        pub.request("orders/1", b"?", timeout=2)
    assert time.monotonic() - start < 0.5
    assert mesh.view("C", "status")["counters"]["forwarded_in"] == 100
    on_a = mesh.nodes["A"].ipc
    explained = json.loads(run_cli("routes", "orders/1", "--json", server=on_a).stdout)
    assert [(r["name"], r["queues"]) for r in explained["remote"]] == [("C", True)]
    assert explained["copies"][0]["queues_only"] == ["C"]
    text = run_cli("routes", "orders/1", server=on_a).stdout
    assert "C (queues: persistent events): B → C" in text
    assert "but persistent ones are stored" in text
    here = run_cli("routes", "orders/1", server=mesh.nodes["C"].ipc).stdout
    assert "this node: queue orders (persistent events)" in here


def test_retained_values_reach_new_subscribers_on_any_node_even_nodes_that_join_later(
    mesh: Mesh,
) -> None:
    """A - B - C: a value retained on A is kept by every node (replicated, not routed as an
    event), so a new subscriber on C gets it; D, linked to C after the fact, gets it too,
    and a newer value or a clear on A replaces it everywhere."""
    line(mesh)
    pub = mesh.client("A")
    pub.publish("cfg/rate", "10", retain=True)
    pub.flush()

    def retained_on(node: str, pattern: str = "cfg/>") -> list[tuple[str, bytes]]:
        with connect(mesh.nodes[node].ipc, timeout=5) as c:
            sub = c.subscribe(pattern)
            return [(e.topic, e.data) for e in drain(sub, 0.3) if e.retained]

    wait_for(lambda: retained_on("C") == [("cfg/rate", b"10")], timeout=5, what="C keeps it")
    mesh.start("D", ["C"])
    mesh.wait_reachable("D", 4)
    wait_for(lambda: retained_on("D") == [("cfg/rate", b"10")], timeout=5, what="D gets it")
    live = mesh.client("D").subscribe("cfg/>", retained=False)  # D converging: dedup is on
    mesh.wait_interest("A", "cfg/rate", 1)
    pub.publish("cfg/rate", "20", retain=True)
    pub.publish("cfg/old", "x", retain=True)
    pub.publish("cfg/old", "", retain=True)  # cleared
    pub.flush()
    wait_for(lambda: retained_on("D") == [("cfg/rate", b"20")], timeout=5, what="D updated")
    assert [e.data for e in drain(live)] == [b"20", b"x", b""]  # the replicas took nothing


def test_a_clear_reaches_a_node_that_was_down_and_its_old_values_stay_cleared(
    mesh: Mesh,
) -> None:
    """Found in an exploratory test: clears were not kept. C, down while A cleared two
    values, kept one of them for good, and sent the other (published on C) back to every
    node when it returned: the deleted value was everywhere again."""
    line(mesh)
    mesh.client("A").publish("cfg/x", "fromA", retain=True)
    mesh.client("C").publish("cfg/y", "fromC", retain=True)

    def retained_on(node: str) -> dict[str, bytes]:
        sub = mesh.client(node).subscribe("cfg/>")
        return {e.topic: e.data for e in drain(sub, 0.3) if e.retained}

    both = {"cfg/x": b"fromA", "cfg/y": b"fromC"}
    wait_for(lambda: retained_on("A") == both == retained_on("C"), timeout=5, what="kept")
    c = mesh.nodes["C"]
    data_dir, port = c.data_dir, c.tcp_port
    c.stop()
    mesh.clients[:] = [cl for cl in mesh.clients if cl.server != c.ipc]
    clearer = mesh.client("A")
    clearer.publish("cfg/x", "", retain=True)
    clearer.publish("cfg/y", "", retain=True)
    clearer.flush()
    wait_for(lambda: retained_on("B") == {}, timeout=5, what="cleared on B")
    mesh.start("C", ["B"], data_dir=data_dir, port=port)
    for n in "ABC":
        mesh.wait_reachable(n, 3)
    time.sleep(0.5)  # each side has sent the other what it holds
    assert {n: retained_on(n) for n in "ABC"} == {"A": {}, "B": {}, "C": {}}


def test_links_listed_on_both_sides_or_to_itself_stop_being_dialled(mesh: Mesh) -> None:
    """Found in an exploratory test: with A and B each listing the other (or a node
    listing itself), the losing dial was redialled for ever, refused each time, and
    `peers` showed a phantom row "? ? ... backoff (duplicate link ...)"."""
    port_b = free_tcp_port()
    config = f'links = ["tcp://127.0.0.1:{port_b}"]\n'  # under FAST's [mesh]
    mesh.start("A", config=config)
    mesh.start("B", ["A"], port=port_b, config=config)  # B's list names B itself too
    mesh.wait_linked("A", 1)
    time.sleep(2.5)  # several backoffs' worth of redials, if they still happened
    for name in "AB":
        rows = mesh.view(name, "peers")["peers"]
        linked = [r for r in rows if r["state"] == "up"]
        assert len(linked) == 1, rows
        others = [r for r in rows if r["state"] != "up"]
        assert all(r["state"] == "stopped" and "itself" in r["error"] for r in others), rows
    assert mesh.view("A", "status")["counters"].get("links_refused", 0) <= 1


def test_a_node_with_60000_patterns_links_and_is_routed_to(mesh: Mesh) -> None:
    """Its state (about 2.5 MB of JSON) used to exceed the 1 MiB a peer decodes: the link
    never came up. State frames over 64 KiB now travel compressed."""
    mesh.start("B", config="[limits]\nmax_subscriptions = 100000\n")
    sub = mesh.client("B")
    pats = [f"plant{i % 50}/line{i % 40}/device{i}/cmd" for i in range(60_000)]
    subs = [sub.subscribe(*pats[i : i + 2000]) for i in range(0, len(pats), 2000)]
    mesh.start("A", ["B"])  # LINK_OK carries B's whole state
    mesh.wait_linked("A", 1)
    mesh.wait_interest("A", pats[-1], 1, timeout=10)
    late = sub.subscribe("late/topic")  # and a later STATES announcement of it
    mesh.wait_interest("A", "late/topic", 1, timeout=10)
    pub = mesh.client("A")
    for topic in (pats[0], pats[-1], "late/topic"):
        pub.publish(topic, b"x")
    pub.flush()
    got = [e.topic for s in (subs[0], subs[-1], late) for e in drain(s)]
    assert got == [pats[0], pats[-1], "late/topic"]
    assert "does not fit" not in mesh.nodes["B"].log_text()
