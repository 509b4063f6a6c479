"""The loop's link tick with many links (node/loop.py): work per tick, not per link."""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from node.config import NodeConfig
from node.loop import Identity, Node


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node bound on 127.0.0.1 only (no discovery, no store), never run."""
    cfg = NodeConfig(store=False, discovery=False, listen="127.0.0.1", port=0, ipc=False)
    n = Node(cfg, Identity("ab" * 8, "me", tmp_path))
    n.bind()
    yield n
    n.close()


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
