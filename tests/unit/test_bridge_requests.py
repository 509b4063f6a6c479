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


def test_an_answered_request_takes_more_replies_for_a_while_then_is_forgotten(
    bridge: tuple[NatsBridge, zmq.Socket[bytes]],
) -> None:
    """Scatter-gather from NATS got one reply (exploratory test): the request is kept
    ANSWERED_LINGER after its first reply, and no "no responders" is due for it."""
    b, sock = bridge
    (token,) = ask(b, sock, 1)
    first = b._answer(token)
    assert first is not None
    assert b._answer(token) == first  # a second reply goes to the same requester
    assert b._request_ids == {}
    b._answered[token] = 0.0  # its linger is over
    b._expire_requests()
    assert (b._requests, b._answered, b._answer(token)) == ({}, {}, None)


def test_past_max_asking_a_mesh_request_gets_an_error_reply_at_once(
    bridge: tuple[NatsBridge, zmq.Socket[bytes]],
) -> None:
    """Each request waiting for NATS holds its payload up to REQUEST_TIMEOUT: 100 a
    second that NATS never answered held 200 MB (review). Past MAX_ASKING, an error."""
    from node.codec import F_ERROR, RECORD
    from node.events import Event

    class Sent(list[bytes]):
        def send(self, frame: bytes) -> None:
            self.append(frame)

    b, _sock = bridge
    ev = Event("svc/x", b"q", {"reply-to": "_INBOX/n/c/7"}, b"\0" * 16, 0, flags=0x01)
    sent = Sent()
    b._too_many_asking(sent, ev)  # type: ignore[arg-type]
    ((frame),) = sent
    flags = RECORD.unpack_from(frame, 2)[3]
    tlen = RECORD.unpack_from(frame, 2)[1]
    assert flags & F_ERROR
    assert frame[2 + RECORD.size : 2 + RECORD.size + tlen] == b"_INBOX/n/c/7"
    assert b"requests already wait for NATS replies" in frame
    assert b.counters["refused"] == 1
