"""The NATS bridge's memory of remote requests waiting for a mesh reply (edge/bridges.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import zmq

from edge.bridges import REQUEST_MEMORY, NatsBridge
from edge.mapping import nats_to_mesh
from node.bridge_config import parse_bridges


@pytest.fixture
def bridge() -> Iterator[tuple[NatsBridge, zmq.Socket[bytes]]]:
    """A NATS bridge (not started) whose requests go into an inproc socket."""
    ctx = zmq.Context.instance()
    sink, sock = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    # A name of its own each time: libzmq releases a closed socket's inproc name in its
    # reaper thread, so the next test binding the same name could find it still taken.
    name = f"inproc://bridge-requests-{os.urandom(6).hex()}"
    sink.bind(name)
    sock.connect(name)
    (cfg,) = parse_bridges([{"kind": "nats", "url": "nats://h", "import": ["svc.>"]}], "t")
    b = NatsBridge(cfg, ctx, "inproc://unused", b"b")
    b.port.inbox = "_INBOX/0123456789abcdef/01"
    yield b, sock
    sink.close(0)
    sock.close(0)


def ask(b: NatsBridge, sock: zmq.Socket[bytes], n: int) -> list[str]:
    """``n`` NATS requests into the mesh; their tokens."""
    before = set(b._requests)
    for i in range(n):
        b._inbox.put((f"svc.{i}", b"q", f"_INBOX.r{i}", "", False, None))
    b._drain_imports(sock, nats_to_mesh)
    return [t for t in b._requests if t not in before]


def test_an_answered_request_is_forgotten_entirely(
    bridge: tuple[NatsBridge, zmq.Socket[bytes]],
) -> None:
    """Found by an audit: an answer dropped the token but kept the event id's entry, 64 MB
    after an hour at 100 requests a second."""
    b, sock = bridge
    tokens = ask(b, sock, 100)
    assert len(b._requests) == len(b._request_ids) == 100
    for token in tokens:
        assert b._forget_request(token) is not None
    assert b._requests == {}
    assert b._request_ids == {}


def test_unanswered_requests_are_forgotten_oldest_first(
    bridge: tuple[NatsBridge, zmq.Socket[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    import edge.bridges

    b, sock = bridge
    clock = [1000.0]
    monkeypatch.setattr(edge.bridges.time, "monotonic", lambda: clock[0])
    old = ask(b, sock, 3)
    clock[0] += REQUEST_MEMORY / 2
    young = ask(b, sock, 2)
    clock[0] += REQUEST_MEMORY / 2 + 1
    b._expire_requests()
    assert list(b._requests) == young
    assert sorted(b._request_ids.values()) == sorted(young)
    assert not set(old) & set(b._requests)
