"""The mesh on a real (virtual) LAN: mDNS discovery, mesh isolation, cable pulls, join time.

Each test builds its own netns lab (hosts h1..hN on a private bridge with real multicast,
no default route) and runs ``meshctl up`` inside the hosts with nothing but a name, a
data dir, a mesh name unique to the test and the short-timing config (heartbeat 200ms,
dead_after 1s, backoff_max 1s). Clients run inside the hosts too, over each node's ipc
socket. Run alone with ``pytest -m lab``; needs root (skipped otherwise, failed if CI=true).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import pytest

from .conftest import MeshLab, wait_for

pytestmark = [pytest.mark.lab, pytest.mark.e2e]

LabFactory = Callable[[int], MeshLab]


def start_mesh(lab: MeshLab, hosts: range, mesh: str) -> None:
    """Start a node on each host (all at once: they find each other), wait until listening."""
    for i in hosts:
        lab.start(i, mesh=mesh)
    for i in hosts:
        lab.wait_ready(i)


def deliver(lab: MeshLab, src: int, dst: int, topic: str, payload: str) -> dict:
    """``sub --count 1`` on host dst, ``pub`` on host src; returns the event dst printed."""
    sub = lab.spawn(dst, "sub", topic, "--count", "1", "--timeout", "5s", "--json")
    sub.wait_stderr(f"subscribed: {topic}", timeout=10)
    lab.wait_interest(src, topic, lab.nodes[dst].name)
    done = lab.cli(src, "pub", topic, payload)
    assert done.returncode == 0, done.stderr
    assert sub.wait_exit(timeout=8) == 0, sub.describe()
    events = [json.loads(line) for line in sub.lines if line.strip()]
    assert len(events) == 1, sub.describe()
    return events[0]


def test_three_hosts_discover_link_and_deliver(make_lab: LabFactory, mesh_name: str) -> None:
    lab = make_lab(3)
    start_mesh(lab, range(1, 4), mesh_name)

    deadline = time.monotonic() + 15
    for i in (1, 2, 3):
        lab.wait_links(
            i, {f"h{j}" for j in (1, 2, 3) if j != i}, timeout=max(0.5, deadline - time.monotonic())
        )
    for i in (1, 2, 3):
        peers = lab.view(i, "peers")
        assert len(peers) == 2, peers
        assert {p["found"] for p in peers} <= {"mdns", "inbound"}, peers  # nothing static
        assert all(p["state"] == "up" for p in peers), peers
        assert "mDNS: found" in lab.nodes[i].log()

    topic = f"lab/{uuid.uuid4().hex[:8]}/temp"
    event = deliver(lab, 1, 3, topic, "21.5 from h1")
    assert event["topic"] == topic
    assert event["data"] == "21.5 from h1"


def test_node_of_another_mesh_is_listed_never_linked(make_lab: LabFactory, mesh_name: str) -> None:
    lab = make_lab(4)
    other = f"other-{uuid.uuid4().hex[:10]}"
    for i in (1, 2, 3):
        lab.start(i, mesh=mesh_name)
    lab.start(4, mesh=other)
    for i in (1, 2, 3, 4):
        lab.wait_ready(i)
    lab.wait_links(1, {"h2", "h3"}, timeout=15)

    def h4_listed() -> dict | None:
        return next((p for p in lab.view(1, "peers") if p["name"] == "h4"), None)

    row = wait_for(h4_listed, timeout=10, interval=0.1, what="h1 to list h4")
    assert row["state"] == "not linked", row
    assert row["found"] == "mdns", row
    assert other in row["error"], row
    assert row["address"] == f"tcp://{lab.lab.addr(4)}:4850", row

    # h4 has found the others as well, and refuses them the same way.
    wait_for(
        lambda: {p["name"] for p in lab.view(4, "peers")} >= {"h1", "h2", "h3"},
        timeout=10,
        interval=0.1,
        what="h4 to list h1..h3",
    )
    assert all(
        p["state"] == "not linked" and mesh_name in p["error"] for p in lab.view(4, "peers")
    ), lab.view(4, "peers")

    # Events on the mesh never reach h4; a subscriber on h3 is the positive control.
    topic = f"lab/{uuid.uuid4().hex[:8]}/x"
    outsider = lab.spawn(4, "sub", topic, "--timeout", "2s")
    outsider.wait_stderr(f"subscribed: {topic}", timeout=10)
    event = deliver(lab, 1, 3, topic, "members only")
    assert event["data"] == "members only"
    assert outsider.wait_exit(timeout=6) == 1, outsider.describe()
    assert outsider.lines == [], outsider.describe()

    for i in (1, 2, 3):
        assert "h4" not in lab.peers_up(i)
        assert "link up: h4" not in lab.nodes[i].log()
        assert "h4" not in {n["name"] for n in lab.view(i, "mesh")["nodes"]}
    assert lab.peers_up(4) == set()
    assert "link up" not in lab.nodes[4].log()
    assert "not linking" in lab.nodes[4].log()


def test_cable_pull_detected_then_relinks(make_lab: LabFactory, mesh_name: str) -> None:
    lab = make_lab(3)
    start_mesh(lab, range(1, 4), mesh_name)
    for i in (1, 2, 3):
        lab.wait_links(i, {f"h{j}" for j in (1, 2, 3) if j != i}, timeout=15)
    assert lab.reachable(1) == {"h2", "h3"}

    pulled = time.monotonic()
    lab.ctl("link", "2", "down")
    wait_for(
        lambda: "h2" not in lab.reachable(1),
        timeout=3,
        interval=0.05,
        what="h1 to see h2 unreachable within 3 s of the cable pull (dead_after 1s)",
    )
    detected = time.monotonic() - pulled
    print(f"cable pull on h2 detected by h1 after {detected:.2f}s (dead_after 1s)")
    assert "link down: h2" in lab.nodes[1].log()
    assert lab.reachable(1) == {"h3"}, "h1 must keep h3 while h2 is cut off"

    restored = time.monotonic()
    lab.ctl("link", "2", "up")
    wait_for(
        lambda: lab.reachable(1) == {"h2", "h3"},
        timeout=10,
        interval=0.1,
        what="h2 to relink by itself within 10 s of the cable coming back",
    )
    lab.wait_links(2, {"h1", "h3"}, timeout=max(0.5, 10 - (time.monotonic() - restored)))
    print(f"h2 relinked {time.monotonic() - restored:.2f}s after the cable came back")

    topic = f"lab/{uuid.uuid4().hex[:8]}/after"
    event = deliver(lab, 1, 2, topic, "welcome back")
    assert event["data"] == "welcome back"


def test_time_from_up_to_first_event(
    make_lab: LabFactory, mesh_name: str, record_property: Callable[[str, object], None]
) -> None:
    lab = make_lab(3)
    start_mesh(lab, range(1, 3), mesh_name)
    lab.wait_links(1, {"h2"}, timeout=15)
    # An established mesh: h1 and h2 have finished mDNS probing and answer queries (links
    # come up before that, so without this wait the figure would include their probing).
    for i in (1, 2):
        wait_for(
            lambda i=i: "mDNS: advertising" in lab.nodes[i].log(),
            timeout=10,
            what=f"h{i} to advertise itself",
        )

    # A publisher on h1: one event every 50 ms with a sequence number. A local subscriber
    # proves it is publishing before the clock starts.
    topic = f"lab/{uuid.uuid4().hex[:8]}/seq"
    publisher = lab.spawn(1, "pub", topic, "{{n}}", "--count", "400", "--rate", "20")
    probe = lab.spawn(1, "sub", topic, "--count", "1", "--timeout", "5s")
    probe.wait_stderr("subscribed:", timeout=10)
    assert probe.wait_exit(timeout=8) == 0, probe.describe() + publisher.describe()

    t0 = time.monotonic()
    node = lab.start(3, mesh=mesh_name)
    wait_for(node.sock.exists, timeout=8, interval=0.005, what="h3's ipc socket")
    t_sock = time.monotonic() - t0
    sub = lab.spawn(3, "sub", topic, "--count", "1", "--timeout", "8s", "--json")
    t_subscribed = sub.wait_stderr("subscribed:", timeout=8) - t0
    arrived, line = sub.wait_line(timeout=8)
    elapsed = arrived - t0

    seq = int(json.loads(line)["data"])
    assert seq >= 1
    # Of two nodes that find each other, the lower id dials at once and the other waits 1 s
    # for that dial: the figure is ~1 s longer when h3's (random) id is the highest, as
    # then it dials nobody at once (one link to h1 or h2 is enough to get the event).
    my_id = lab.view(3, "status")["id"]
    highest = all(my_id > p["id"] for p in lab.view(3, "peers"))
    print(
        f"time from `meshctl up` on h3 to its first delivered event: {elapsed:.2f}s "
        f"(ipc socket after {t_sock:.2f}s, subscribed after {t_subscribed:.2f}s, "
        f"first event #{seq}, h3's id {'is' if highest else 'is not'} the highest; "
        f"target <= 2 s)"
    )
    record_property("time_to_first_event_s", round(elapsed, 3))
    assert sub.wait_exit(timeout=5) == 0, sub.describe()
    assert elapsed < 8, f"first event after {elapsed:.2f}s"
    assert publisher.proc.poll() is None, publisher.describe()  # still publishing throughout


def test_inbound_link_shows_the_peers_address(make_lab: LabFactory, mesh_name: str) -> None:
    lab = make_lab(2)
    start_mesh(lab, range(1, 3), mesh_name)
    lab.wait_links(1, {"h2"}, timeout=15)
    lab.wait_links(2, {"h1"}, timeout=15)
    rows = {i: lab.view(i, "peers")[0] for i in (1, 2)}
    # One link per pair: one side dialed it (found "mdns"), the other accepted it.
    assert sorted(r["found"] for r in rows.values()) == ["inbound", "mdns"], rows
    for i, row in rows.items():
        assert row["address"] == f"tcp://{lab.lab.addr(3 - i)}:4850", rows
