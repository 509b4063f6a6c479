"""node/residents.py: actors stepped on the node's thread, frames both ways by call.

The MQTT listener is the real resident (its behaviour is tested end to end through
``meshctl up`` in tests/e2e/test_mqtt_*.py); these pin what the loop relies on.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

from node.codec import HEAD_PUB, Kind, decode_control, encode_control, encode_record, frame_kind
from node.residents import BYTE_WEIGHT, Residents
from node.router import Router
from tests.unit.test_router import make_router


class Actor:
    """A resident that sends what it is given and keeps what the node hands it."""

    def __init__(self, ident: bytes, *, fail: str = "") -> None:
        self.ident = ident
        self.fail = fail
        self.outbox: list[bytes] = []
        self.got: list[bytes] = []
        self.flushes = 0
        self.routed_calls = 0
        self.check: Callable[[], bool] | None = None
        self._r, self._w = os.pipe()

    def fileno(self) -> int:
        return self._r

    def step(self, now: float) -> list[bytes]:
        if self.fail == "step":
            raise RuntimeError("boom")
        out, self.outbox = self.outbox, []
        return out

    def busy(self) -> bool:
        return bool(self.outbox)

    def routed(self) -> None:
        self.routed_calls += 1
        if self.check is not None:
            assert self.check(), "routed() came before the Router handled the step's frames"

    def last_words(self) -> list[bytes]:
        return []

    def take(self, frame: bytes) -> None:
        if self.fail == "take":
            raise RuntimeError("boom")
        self.got.append(frame)

    def flush(self) -> None:
        self.flushes += 1

    def stop(self) -> None:
        os.close(self._r)
        os.close(self._w)

    def status(self) -> dict[str, Any]:
        return {}


def _pass(router: Router, residents: Residents, now: float = 1.0) -> None:
    """What Node.run does with residents in one pass: step, route, hand output back."""
    residents.step(now)
    router.end_pass(now)
    for dest, frame, _count in router.take_output():
        if dest in residents.by_ident:
            residents.take(dest, frame)
    residents.flush()


def _kinds(frames: list[bytes]) -> list[Kind]:
    return [frame_kind(f) for f in frames]


def test_a_resident_is_an_internal_client_and_its_frames_are_routed_in_the_same_pass() -> None:
    router = make_router()
    residents = Residents(router)
    a, b = Actor(b"\x00res-a"), Actor(b"\x00res-b")
    residents.attach(a)
    residents.attach(b)
    assert router.internal == {a.ident, b.ident}
    assert residents.fds() == [a.fileno(), b.fileno()]
    a.outbox.append(encode_control(Kind.HELLO, {"name": "a"}))
    b.outbox += [
        encode_control(Kind.HELLO, {"name": "b"}),
        encode_control(Kind.SUB, {"ref": 1, "sid": 7, "patterns": ["t/>"], "group": None}),
    ]
    b.check = lambda: b.ident in router.clients and len(router.trie) == 1
    assert residents.busy()
    _pass(router, residents)
    assert not residents.busy()
    assert a.routed_calls == b.routed_calls == 1
    assert _kinds(a.got) == [Kind.WELCOME]
    assert _kinds(b.got) == [Kind.WELCOME, Kind.OK]
    a.outbox.append(HEAD_PUB + encode_record(b"t/x", b"hi", b"", 0, 1, bytes(16)))
    _pass(router, residents, 2.0)
    assert _kinds(b.got[2:]) == [Kind.DELIVER]
    assert b"hi" in b.got[2]
    assert a.flushes == b.flushes == 2
    assert router.counters.internal_errors == 0


def test_an_error_in_one_resident_is_counted_and_the_others_go_on() -> None:
    router = make_router()
    residents = Residents(router)
    bad, good = Actor(b"\x00bad", fail="step"), Actor(b"\x00good")
    residents.attach(bad)
    residents.attach(good)
    good.outbox.append(encode_control(Kind.HELLO, {"name": "good"}))
    _pass(router, residents)
    assert router.counters.internal_errors == 1
    assert _kinds(good.got) == [Kind.WELCOME]
    # A frame the node hands a resident that fails on it: counted, not raised.
    bad.fail = "take"
    bad.outbox.append(encode_control(Kind.HELLO, {"name": "bad"}))
    _pass(router, residents, 2.0)
    assert router.counters.internal_errors == 2
    assert decode_control(good.got[0])[0] == Kind.WELCOME


def test_asyncio_keeps_ready_callbacks_where_the_mqtt_listener_looks() -> None:
    """MqttListener.busy reads ``loop._ready`` (CPython's queue of callbacks for the next
    iteration) so the node does not sleep on them. If a Python release renames it, this
    fails instead of the listener answering 100 ms late."""
    loop = asyncio.SelectorEventLoop()
    try:
        assert len(loop._ready) == 0  # type: ignore[attr-defined]
        loop.call_soon(lambda: None)
        assert len(loop._ready) == 1  # type: ignore[attr-defined]
        loop.call_soon(loop.stop)
        loop.run_forever()
        assert len(loop._ready) == 0  # type: ignore[attr-defined]
    finally:
        loop.close()


def test_input_now_sees_a_descriptor_ready_and_step_weighs_what_it_routed() -> None:
    """The loop's spin asks ``input_now`` between its looks at the sockets, and spins only
    while passes are light: a resident's bytes count BYTE_WEIGHT times."""
    router = make_router()
    residents = Residents(router)
    actor = Actor(b"resident")
    residents.attach(actor)
    try:
        assert residents.input_now() is False
        os.write(actor._w, b"x")
        assert residents.input_now() is True
        os.read(actor.fileno(), 1)
        assert residents.input_now() is False
        frame = HEAD_PUB + encode_record(b"a/b", b"payload", b"", 0, 1, bytes(16))
        actor.outbox += [frame, frame]
        assert residents.step(1.0) == 2 * len(frame) * BYTE_WEIGHT
        assert residents.step(1.0) == 0
    finally:
        actor.stop()


def test_the_listeners_loop_logs_refused_accepts_in_one_line_and_bugs_in_full(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Review: the one-line handler (for accepts refused while the open files are used
    up) took the traceback off every error of the loop, bugs in a protocol too."""
    import asyncio
    import errno

    from edge.mqtt_listener import _log_one_line

    loop = asyncio.new_event_loop()
    try:
        refused = OSError(errno.EMFILE, "Too many open files")
        with caplog.at_level("WARNING"):
            _log_one_line(
                loop, {"message": "socket.accept() out of system resource", "exception": refused}
            )
            _log_one_line(
                loop,
                {
                    "message": "Fatal error: protocol.data_received() call failed.",
                    "exception": KeyError("bug"),
                },
            )
    finally:
        loop.close()
    first, second = caplog.records
    assert first.getMessage() == (
        "MQTT listener: socket.accept() out of system resource: [Errno 24] Too many open files"
    )
    assert first.exc_info is None
    assert second.levelname == "ERROR"
    assert second.exc_info is not None
    assert isinstance(second.exc_info[1], KeyError)
