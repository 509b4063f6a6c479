"""The loop (node/loop.py): its link tick with many links (work per tick, not per link),
and when it spins."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from node.config import NodeConfig
from node.loop import SPIN_AFTER_PASS_BELOW, Identity, Node, fade


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node bound on 127.0.0.1 only (no discovery, no store), never run."""
    cfg = NodeConfig(store=False, discovery=False, listen="127.0.0.1", port=0, ipc=False)
    n = Node(cfg, Identity("ab" * 8, "me", tmp_path))
    n.bind()
    yield n
    n.close()


def test_the_loop_does_not_spin_with_threaded_actors(node: Node) -> None:
    """The spin holds the interpreter lock: a bridge's thread (and the MQTT listener's,
    when it was one) waited it out on each round trip (QoS 1 p50 601 -> 347 µs without)."""
    t = time.perf_counter()
    assert node._spin(0.05) is False  # nothing arrives: it spins the whole time
    assert time.perf_counter() - t >= 0.05
    node.router.internal.add(b"mqtt-listener")
    t = time.perf_counter()
    assert node._spin(0.05) is False
    assert time.perf_counter() - t < 0.04


def test_the_loop_spins_with_residents_and_watches_their_descriptors(node: Node) -> None:
    """A resident runs on the loop's thread, so the spin keeps nobody waiting; it must end
    when the resident has input or work (MQTT QoS 1 p50 203-253 -> 136-151 µs, store off)."""
    from tests.unit.test_residents import Actor

    actor = Actor(b"resident")
    node.attach(actor)
    try:
        t = time.perf_counter()
        assert node._spin(0.05) is False  # nothing arrives: it spins the whole time
        assert time.perf_counter() - t >= 0.05
        os.write(actor._w, b"x")
        t = time.perf_counter()
        assert node._spin(0.05) is True
        assert time.perf_counter() - t < 0.04
        os.read(actor.fileno(), 1)
        actor.outbox.append(b"work")  # busy: work that must not wait for input
        t = time.perf_counter()
        assert node._spin(0.05) is True
        assert time.perf_counter() - t < 0.04
    finally:
        actor.stop()


def test_the_spin_waits_out_streams_not_steady_light_passes() -> None:
    """A steady load of passes under the bound still spins (request-reply); an MQTT
    stream's passes of one packet between passes of dozens do not; after a stream the
    spin is back within a dozen passes."""
    recent = 0
    for _ in range(50):
        recent = fade(recent, SPIN_AFTER_PASS_BELOW - 1)
        assert recent < SPIN_AFTER_PASS_BELOW
    for _ in range(20):  # ~50 MQTT records (x4), then three single ones, again and again
        for size in (62_000, 1_300, 1_300, 1_300):
            recent = fade(recent, size)
            assert recent >= SPIN_AFTER_PASS_BELOW
    for _ in range(12):
        recent = fade(recent, 1_300)
    assert recent < SPIN_AFTER_PASS_BELOW
    assert fade(0, 10**9) == fade(fade(0, 10**9), 10**9)  # capped: a flood is not remembered


def test_one_hello_per_tick_however_many_links_are_due(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an audit: the hello (our whole interest) was built for each dial, 23 ms at
    20,000 patterns, so 500 links due at once held the thread for 18 s."""
    for i in range(40):
        node.dialers.add(f"tcp://127.0.0.1:{9 + i}", "static", 0.0)
    built = []
    hello = node.router.net.hello
    monkeypatch.setattr(node.router.net, "hello", lambda: built.append(1) or hello())
    node._link_tick(1.0)
    assert len(built) == 1
    assert sum(d.state == "dialing" for d in node.dialers.by_url.values()) == 40


def test_a_dial_without_a_socket_backs_off_instead_of_ending_the_node(
    node: Node, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an audit: past libzmq's 1,023 sockets, the dial's error went uncaught and
    ended the loop (a mesh of ~1,000 nodes)."""
    node.dialers.add("tcp://127.0.0.1:9", "static", 0.0)

    def no_socket(*_a: object) -> zmq.Socket[bytes]:
        raise zmq.ZMQError(errno.EMFILE)

    monkeypatch.setattr(node.dialers.ctx, "socket", no_socket)
    node._link_tick(1.0)
    (d,) = node.dialers.by_url.values()
    assert d.state == "backoff"
    assert "cannot open a socket" in d.last_error


@pytest.mark.parametrize("sender", ["revoked peer", "other peer"])
def test_a_revoke_that_closes_a_dialed_link_mid_pass_does_not_end_the_node(
    tmp_path: Path, sender: str
) -> None:
    """Found in review (older than this test): a REVOKE read on a dialed link closes the
    revoked peer's socket at once; reading on from that closed socket in the same pass
    raised ENOTSOCK out of the loop, and the node exited."""
    import time

    from node import membership as ms
    from node import security
    from node.codec import Kind, encode_control
    from node.dialers import Dialer

    me = "ab" * 8
    creds = security.init_mesh(tmp_path, mesh="plant", node_id=me, name="me", now=time.time())
    sec = security.Security(creds, tmp_path, me, lambda _m: None)
    cfg = NodeConfig(
        store=False, discovery=False, listen="127.0.0.1", port=0, ipc=False, mesh="plant"
    )
    node = Node(cfg, Identity(me, "me", tmp_path), security=sec)
    node.bind()
    far: dict[str, tuple[zmq.Socket[bytes], bytes]] = {}
    try:
        for name, peer_id in (("other peer", "1" * 16), ("revoked peer", "2" * 16)):
            router = node.ctx.socket(zmq.ROUTER)
            url = f"tcp://127.0.0.1:{router.bind_to_random_port('tcp://127.0.0.1')}"
            dealer = node.ctx.socket(zmq.DEALER)
            dealer.connect(url)
            dealer.send(b"hi")
            ident, _ = router.recv_multipart()
            key = zmq.curve_keypair()[0].decode()
            d = Dialer(url, "static", sock=dealer, state="up", peer_id=peer_id, server_key=key)
            node.dialers.by_url[url], node.dialers.by_sock[dealer] = d, d
            node.router.net.by_via[url] = peer_id
            far[name] = (router, ident)
        revoked = node.dialers.by_url[
            next(u for u, d in node.dialers.by_url.items() if d.peer_id == "2" * 16)
        ]
        rec = ms.revocation_record(
            mesh="plant", node=revoked.peer_id or "", key=revoked.server_key, at=int(time.time())
        )
        router, ident = far[sender]
        revoke = {"revocations": [ms.sign(creds.signing_key, rec)]}
        router.send_multipart([ident, encode_control(Kind.REVOKE, revoke)])
        router, ident = far["revoked peer"]  # and the revoked peer's socket has input too
        router.send_multipart([ident, encode_control(Kind.PING, {})])
        time.sleep(0.2)
        node._drain_dialers(time.monotonic(), None)  # as after a spin: every dialer
        assert [d.peer_id for d in node.dialers.by_url.values()] == ["1" * 16]
        assert sec.is_revoked("2" * 16)
    finally:
        for router, _ident in far.values():
            router.close(0)
        node.close()


def test_the_node_raises_its_soft_limit_on_open_files() -> None:
    """Found in review: each dialed link holds two files, and under a soft limit of 1,024
    a node ran out near 500 links, inside libzmq where no error reached it."""
    import resource
    import subprocess
    import sys

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = "from node.loop import raise_file_limit; print(raise_file_limit(4096))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard)),
        capture_output=True,
        text=True,
        check=True,
    )
    want = 4096 if hard == resource.RLIM_INFINITY else min(hard, 4096)
    assert int(done.stdout) == want


def test_a_network_peer_cannot_pass_for_one_of_the_nodes_own_actors(node: Node) -> None:
    """Review: the identity of a bridge or the uplink (shown by `status`) could be taken
    over TCP once its inproc socket had closed, and passed the client and subscription
    limits as an internal actor. The node's own actors come over inproc only."""
    from node.codec import Kind, encode_control

    ident = b"\x00bridge-test"
    node.router.internal.add(ident)
    ctx = zmq.Context.instance()
    impostor = ctx.socket(zmq.DEALER)
    impostor.setsockopt(zmq.LINGER, 0)
    impostor.setsockopt(zmq.ROUTING_ID, ident)
    impostor.connect(node.endpoints[0])
    try:
        impostor.send(encode_control(Kind.HELLO, {"name": "impostor"}))
        deadline = time.monotonic() + 5
        while node.router.counters.bad_frames == 0 and time.monotonic() < deadline:
            node._drain(time.monotonic())
            time.sleep(0.01)
        assert node.router.counters.bad_frames == 1
        assert ident not in node.router.clients
    finally:
        impostor.close()


def test_a_second_signal_while_the_node_stops_does_not_end_the_stop(tmp_path: Path) -> None:
    """Found in review: the default handlers came back before the plugins stopped, so a
    second SIGTERM while the MQTT listener saved its sessions killed the node mid-save."""
    code = f"""
import os, signal, sys
from pathlib import Path
from node.config import NodeConfig
from node.loop import Identity, serve

class Saver:
    def stop(self):
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, mid-stop
        Path({str(tmp_path / "saved")!r}).write_text("yes")

cfg = NodeConfig(store=False, discovery=False, listen="127.0.0.1", port=0, ipc=False)
ident = Identity("ab" * 8, "me", Path({str(tmp_path)!r}))
serve(cfg, ident, lambda node: [Saver()], None, lambda: os.kill(os.getpid(), signal.SIGTERM))
print("stopped")
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "saved").read_text() == "yes"
    assert "stopped" in done.stdout
