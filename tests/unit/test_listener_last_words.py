"""The MQTT listener's last words when the node stops: the wills of its clients, once.

A real listener on 127.0.0.1 and a raw client socket, stepped by the test as the node's
loop would step it (review of the fix that made a stopping node publish wills).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from edge.mqtt_codec import Connect, Disconnect, Publish, Will, encode
from edge.mqtt_listener import STEP_PACKETS, ListenerConfig, MqttListener
from node.codec import HEAD_PUB


@pytest.fixture
def listener() -> Iterator[MqttListener]:
    cfg = ListenerConfig("127.0.0.1", 0, node_retained=False, persistent=False)
    lst = MqttListener(cfg, b"\x00mqtt-test")
    lst.start()
    yield lst
    lst.stop()


def _device(lst: MqttListener) -> socket.socket:
    """A client with a will, connected and welcomed."""
    port = int(lst.bound.rsplit(":", 1)[1])
    s = socket.create_connection(("127.0.0.1", port))
    will = Will("status/dev", b"offline", 0, False)
    s.sendall(encode(Connect("dev", True, 60, will, None, None, 4)))
    deadline = time.monotonic() + 5
    while "dev" not in lst._online and time.monotonic() < deadline:
        _pass(lst)
        time.sleep(0.01)
    assert "dev" in lst._online
    return s


def _pass(lst: MqttListener) -> list[bytes]:
    out = lst.step(0.0)
    lst.routed()
    lst.flush()
    return out


def _wills(frames: list[bytes]) -> int:
    return sum(f.count(b"status/dev") for f in frames if f.startswith(HEAD_PUB))


def test_the_will_of_a_connected_client_goes_once(listener: MqttListener) -> None:
    s = _device(listener)
    try:
        assert _wills(listener.last_words()) == 1
        listener.stop()  # its connection closes now: no second will
        assert listener.counters["wills"] == 1
    finally:
        s.close()


def test_a_client_dropped_in_the_last_pass_still_leaves_its_will(listener: MqttListener) -> None:
    """Review: a client closed for a protocol error in the node's last pass is "closing"
    until asyncio reports the socket gone, which came after the stop: no will at all."""
    s = _device(listener)
    try:
        s.sendall(b"\xf0\x00")  # a reserved packet type: the listener closes it
        deadline = time.monotonic() + 5
        while not listener._online["dev"].closing and time.monotonic() < deadline:
            _pass(listener)
            time.sleep(0.01)
        assert _wills(listener.last_words()) == 1
    finally:
        s.close()


def test_a_disconnect_the_budget_left_unread_deletes_the_will(listener: MqttListener) -> None:
    """Review: a burst longer than a step's budget, ending in DISCONNECT, left the
    DISCONNECT unread when the node stopped, and the will went all the same."""
    s = _device(listener)
    try:
        burst = b"".join(encode(Publish("load/x", b"p", 0, False)) for _ in range(STEP_PACKETS))
        s.sendall(burst + encode(Disconnect()))
        time.sleep(0.2)
        _pass(listener)  # the node's last pass: one budget of packets
        assert _wills(listener.last_words()) == 0
    finally:
        s.close()
