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
