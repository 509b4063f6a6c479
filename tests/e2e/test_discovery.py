"""mDNS discovery's actor (node/discovery.py) against a real zeroconf peer, on 127.0.0.1
only: nothing is sent on the machine's own network."""

from __future__ import annotations

import gc
import json
import logging
import time
import uuid
from collections.abc import Iterator

import pytest
import zmq
from zeroconf import DNSOutgoing, DNSPointer, IPVersion, ServiceInfo, Zeroconf, const

from node.discovery import RESOLVE_TIMEOUT_MS, SERVICE_TYPE, Discovery

SILENT = 6  # announced services that never answer a resolution


@pytest.fixture
def mesh() -> str:
    return "t-" + uuid.uuid4().hex[:8]  # names no other test or node on this host uses


@pytest.fixture
def discovery(mesh: str) -> Iterator[Discovery]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    d = Discovery(
        ctx, node_id="aa" * 8, name="me", mesh=mesh, proto=1, port=1, addresses=["127.0.0.1"]
    )
    d.start()
    yield d
    d.stop()
    ctx.term()


@pytest.fixture
def peer() -> Iterator[Zeroconf]:
    zc = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
    yield zc
    zc.close()


def _point(d: Discovery, peer: Zeroconf, names: list[str]) -> None:
    """Pointers to ``names``, services with no SRV, TXT or address records, once ``d``
    listens (sent earlier they would be lost, and the test would prove nothing)."""
    assert d._registered.wait(10), "discovery never came up"
    out = DNSOutgoing(const._FLAGS_QR_RESPONSE | const._FLAGS_AA)
    for name in names:
        out.add_answer_at_time(
            DNSPointer(SERVICE_TYPE, const._TYPE_PTR, const._CLASS_IN, 120, name), 0
        )
    peer.send(out)
    time.sleep(0.3)  # they are being resolved now


def _silent(mesh: str) -> list[str]:
    return [f"silent{i}-{mesh}.{SERVICE_TYPE}" for i in range(SILENT)]


def _real_peer_found(d: Discovery, peer: Zeroconf, mesh: str) -> dict[str, object] | None:
    """Announce a real service and wait for ``d`` to report it (None: it did not)."""
    info = ServiceInfo(
        SERVICE_TYPE,
        f"real-{mesh}.{SERVICE_TYPE}",
        port=4242,
        properties={"mesh": mesh, "id": "bb" * 8, "name": "real", "proto": "1"},
        server=f"real-{mesh}.local.",
        parsed_addresses=["127.0.0.1"],
    )
    peer.register_service(info)
    return _found(d, "real-", timeout=2 * RESOLVE_TIMEOUT_MS / 1000)


def _found(d: Discovery, prefix: str, timeout: float) -> dict[str, object] | None:
    poller = zmq.Poller()
    poller.register(d.pipe, zmq.POLLIN)
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if poller.poll(int(left * 1000) + 1):
            msg = json.loads(d.pipe.recv())
            if msg["event"] == "found" and msg["service"].startswith(prefix):
                return msg  # type: ignore[no-any-return]
    return None


def test_services_that_never_answer_do_not_hold_up_the_others(
    discovery: Discovery, peer: Zeroconf, mesh: str
) -> None:
    """Resolved one at a time, each silent service held the rest up for the whole
    timeout: a real peer announced after six of them was found 10 s late."""
    _point(discovery, peer, _silent(mesh))
    found = _real_peer_found(discovery, peer, mesh)
    assert found is not None, "the real peer was not found while silent ones were resolved"
    assert (found["id"], found["port"], found["addresses"]) == ("bb" * 8, 4242, ["127.0.0.1"])


def test_a_malformed_pointer_does_not_end_discovery(
    discovery: Discovery, peer: Zeroconf, mesh: str
) -> None:
    """Found in review: a pointer to a name zeroconf refuses to resolve (an instance
    label over 63 bytes) raised out of the actor's loop: the node stopped discovering
    and advertising."""
    _point(discovery, peer, ["a" * 40 + "." + "b" * 40 + f"-{mesh}.{SERVICE_TYPE}"])
    found = _real_peer_found(discovery, peer, mesh)
    assert found is not None
    assert found["port"] == 4242
    assert discovery._thread.is_alive()


def test_a_stop_leaves_no_resolution_pending(
    mesh: str, peer: Zeroconf, caplog: pytest.LogCaptureFixture
) -> None:
    """Found in review: resolutions still running when zeroconf closed were left pending,
    and asyncio logged "Task was destroyed but it is pending!" for each, seconds later."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    d = Discovery(
        ctx, node_id="cc" * 8, name="me", mesh=mesh, proto=1, port=1, addresses=["127.0.0.1"]
    )
    d.start()
    try:
        _point(d, peer, _silent(mesh))
    finally:
        caplog.set_level(logging.ERROR, logger="asyncio")
        t = time.monotonic()
        d.stop()
        stopped = time.monotonic() - t
        ctx.term()
    del d
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text
    assert stopped < RESOLVE_TIMEOUT_MS / 1000
