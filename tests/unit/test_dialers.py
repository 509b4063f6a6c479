"""node/dialers.py: one dialer per place a node is dialed at, and the key it needs."""

from __future__ import annotations

import zmq

from node.dialers import Dialers


def dialers() -> Dialers:
    return Dialers(zmq.Context.instance(), max_payload=1024, backoff_max=1.0)


def test_a_join_links_key_reaches_a_static_link_to_the_same_place() -> None:
    """`up --join TOKEN --link tcp://gateway`: the static link came first and the join
    link's key was dropped with it; it dialed keyless for ever (exploratory test)."""
    d = dialers()
    static = d.add("tcp://127.0.0.1:7001", "static", 0.0)
    joined = d.add("tcp://127.0.0.1:7001", "static", 5.0, "KEY")
    assert joined is static
    assert (static.server_key, static.next_try) == ("KEY", 5.0)  # and dialed again now
    assert d.add("tcp://127.0.0.1:7001", "static", 9.0, "OTHER").server_key == "KEY"


def test_a_keyed_link_and_the_join_link_to_one_node_are_one_dialer() -> None:
    """A '#KEY' static link and the join link to the same node dialed it twice (review)."""
    d = dialers()
    keyed = d.add("tcp://127.0.0.1:7000#KEY", "static", 0.0)
    assert keyed.server_key == "KEY"
    assert d.add("tcp://127.0.0.1:7000", "static", 0.0, "KEY") is keyed
    assert d.add("tcp://127.0.0.1:7000", "mdns", 0.0, "KEY").found == "static"
    assert list(d.by_url) == ["tcp://127.0.0.1:7000#KEY"]


def test_libzmq_never_ends_a_silent_connection_before_the_mesh_calls_it_dead() -> None:
    """Review: with `mesh.dead_after = "30s"`, libzmq's fixed 3 s closed a paused peer's
    connection while the link stayed "up", and what was queued on it vanished uncounted."""
    from node.dialers import Dialer, zmtp_silence

    assert zmtp_silence(2.5) == 3000  # the default keeps libzmq's 3 s
    assert zmtp_silence(30.0) == 30500
    d = Dialers(zmq.Context.instance(), max_payload=1024, backoff_max=1.0, silent_ms=30500)
    dialer = d.add("tcp://127.0.0.1:7002", "static", 0.0)
    assert isinstance(dialer, Dialer)
    d.dial(dialer, b"hello", 0.0)
    try:
        assert dialer.sock is not None
        assert dialer.sock.getsockopt(zmq.HEARTBEAT_TIMEOUT) == 30500
    finally:
        d.close_all()
