"""The Python client library against a real node: what an application sees when the
node restarts, stalls or is sent a bad event, and when its own callback fails.

Found in session 11's exploratory test of the library (helper report, repro scripts).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from helpers import NodeFactory, NodeProcess

from meshctl import connect
from meshctl.client import Client
from meshctl.errors import Timeout
from node.codec import RECORD
from node.events import Event

pytestmark = pytest.mark.e2e


@contextlib.contextmanager
def stopped(node: NodeProcess) -> Iterator[None]:
    """The node alive but silent (SIGSTOP) for the block."""
    os.kill(node.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(node.pid, signal.SIGCONT)


def subscriptions_of(admin: Client, name: str) -> int:
    clients = admin.status()["clients"]
    return sum(c["subscriptions"] for c in clients if c["name"] == name)


def test_the_first_calls_after_a_node_restart_are_answered(
    make_node: NodeFactory, short_tmp: Path
) -> None:
    """The node answers a request from a client it forgot with "no session", not naming
    the request: the client greeted it again but the request waited out its timeout, and
    a subscribe that failed so was made by the greeting anyway, unseen by the application
    (a queue group member that took a third of the group's events, all dropped)."""
    data_dir = short_tmp / "node"
    first = make_node(data_dir=data_dir)
    worker = connect(first.ipc, name="worker", timeout=3)
    first.stop()
    second = make_node(data_dir=data_dir)  # the same ipc path
    started = time.monotonic()
    assert worker.status()["id"] == second.node_id
    sub = worker.subscribe("jobs/>", group="workers")
    assert time.monotonic() - started < 2
    admin = connect(second.ipc, name="admin")
    assert subscriptions_of(admin, "worker") == 1
    for i in range(30):
        admin.publish(f"jobs/{i}", str(i))
    admin.flush()
    assert sorted(int(sub.next(2).data) for _ in range(30)) == list(range(30))
    worker.close()
    admin.close()


def test_a_subscribe_given_up_on_is_withdrawn_at_the_node(node: NodeProcess) -> None:
    admin = connect(node.ipc, name="admin")
    worker = connect(node.ipc, name="worker", timeout=0.5)
    with stopped(node), pytest.raises(Timeout):
        worker.subscribe("jobs/>", group="workers")
    other = connect(node.ipc, name="other")
    other.flush()  # the node has read the late SUB and the withdrawal after it
    worker.flush()
    assert subscriptions_of(admin, "worker") == 0
    for c in (admin, worker, other):
        c.close()


def test_a_persistent_publish_that_raised_is_not_stored_later(node: NodeProcess) -> None:
    """Raised, but kept and stored by the next confirm(): an application retrying the
    publish that failed stored the event twice."""
    admin = connect(node.ipc, name="admin")
    admin.queue("add", "orders", patterns=["orders/>"])
    pub = connect(node.ipc, name="pub", timeout=0.5)
    returned: list[str] = []
    with stopped(node):
        with contextlib.suppress(Timeout):  # the socket's queue fills while the node is stopped
            for i in range(5000):
                pub.publish(f"orders/{i}", str(i), persistent=True)
                returned.append(str(i))
        assert 0 < len(returned) < 5000
        assert pub.unconfirmed == len(returned)
    pub.timeout = 10
    assert pub.confirm(timeout=10) == len(returned)
    consumer = admin.consume("orders")
    got = []
    with contextlib.suppress(Timeout):
        while True:
            event = consumer.next(1)
            got.append(event.data.decode())
            consumer.ack(event)  # (a window stays within limits.client_queue)
    assert sorted(got, key=int) == returned
    admin.close()
    pub.close()


def _record(topic: str, payload: bytes, headers: bytes = b"") -> bytes:
    tb = topic.encode()
    return (
        RECORD.pack(len(payload), len(tb), len(headers), 0, 0, 0, time.time_ns(), os.urandom(16))
        + tb
        + headers
        + payload
    )


def test_an_event_with_a_malformed_headers_block_costs_no_other_event(
    node: NodeProcess,
) -> None:
    """The node passed such a block on, and each subscriber's client dropped the whole
    delivery frame it came in: 0 of 403 good events arrived, nothing counted."""
    subscriber = connect(node.ipc, name="victim")
    sub = subscriber.subscribe("hb/>")
    raw = zmq.Context.instance().socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(node.ipc)
    try:
        raw.send(b"\x01\x01" + json.dumps({"name": "rogue"}).encode())
        assert raw.poll(5000)
        raw.recv()  # WELCOME
        bad = b"\x05ab"  # a name of 5 bytes, 2 there
        raw.send(b"\x01\x20" + _record("hb/1", b"good") + _record("hb/2", b"evil", bad))
        assert raw.poll(5000)
        refusal = json.loads(raw.recv()[2:])
        assert "headers" in refusal["error"]
    finally:
        raw.close()
    pub = connect(node.ipc, name="pub")
    with pub.batch():
        for i in range(100):
            pub.publish("hb/burst", str(i))
    pub.flush()
    got = [sub.next(2).data for _ in range(101)]
    assert got == [b"good", *(str(i).encode() for i in range(100))]
    assert pub.status()["counters"]["dropped"]["bad_headers"] == 1
    assert subscriber.bad_deliveries == 0
    subscriber.close()
    pub.close()


def test_a_callback_that_raises_loses_no_other_event(node: NodeProcess) -> None:
    """The rest of its frame was lost, for every subscription of the client."""
    client = connect(node.ipc, name="app")
    seen: dict[str, list[bytes]] = {"a": [], "b": []}

    def on_a(event: object) -> None:
        data = event.data  # type: ignore[attr-defined]
        seen["a"].append(data)
        if data == b"0":
            raise RuntimeError("application bug")

    client.subscribe("cb/a", callback=on_a)
    client.subscribe("cb/b", callback=lambda e: seen["b"].append(e.data))
    pub = connect(node.ipc, name="pub")
    with pub.batch():  # one frame: the failing event first
        for i in range(50):
            pub.publish("cb/a", str(i))
            pub.publish("cb/b", str(i))
    pub.flush()
    with pytest.raises(RuntimeError, match="application bug"):
        client.run(until=lambda: False, timeout=5)
    client.run(until=lambda: len(seen["a"]) == 50 and len(seen["b"]) == 50, timeout=2)
    assert seen == {k: [str(i).encode() for i in range(50)] for k in "ab"}
    client.close()
    pub.close()


def test_callbacks_never_run_inside_subscribe_or_status(node: NodeProcess) -> None:
    """A callback ran inside the wait of subscribe (or flush, status) for its answer: one
    that raised left subscribe with its error, and the new subscription was withdrawn.
    They run inside process/run/next, as documented, in order, none lost."""
    client = connect(node.ipc, name="app")
    inside = [False]
    seen: list[bytes] = []

    def handle(event: object) -> None:
        assert not inside[0], "a callback ran inside a control request"
        seen.append(event.data)  # type: ignore[attr-defined]
        raise RuntimeError("application bug")

    client.subscribe("cb/a", callback=handle)
    pub = connect(node.ipc, name="pub")
    with pub.batch():
        for i in range(20):
            pub.publish("cb/a", str(i))
    pub.flush()
    time.sleep(0.2)  # the events wait at the client
    inside[0] = True
    more = client.subscribe("cb/b")  # used to raise "application bug"
    client.flush()
    assert client.status()["clients"]
    inside[0] = False
    while len(seen) < 20:
        with contextlib.suppress(RuntimeError):
            client.process(1)
    assert seen == [str(i).encode() for i in range(20)]
    pub.publish("cb/b", "b")
    pub.flush()
    assert more.next(5).data == b"b"
    client.close()
    pub.close()


def test_bad_arguments_are_input_errors_and_views_are_checked(node: NodeProcess) -> None:
    from meshctl.errors import InputError

    client = connect(node.ipc, name="n" * 100_000)  # the node keeps 64 characters
    assert [c["name"] for c in client.status()["clients"]] == ["n" * 64]
    with pytest.raises(InputError, match="strings"):
        client.publish("t", b"x", headers={"k": 5})  # type: ignore[dict-item]
    with pytest.raises(InputError, match="no view 'bogus'"):
        client.view("bogus")
    assert "ref" not in client.queue("ls")
    assert client.status()["counters"]["internal_errors"] == 0
    client.close()


def test_unsubscribe_as_the_first_call_after_a_node_restart(
    make_node: NodeFactory, short_tmp: Path
) -> None:
    """Review: the UNSUB waiting for its answer was sent again to the restarted node,
    which had no such subscription: "no subscription 1"."""
    data_dir = short_tmp / "node"
    first = make_node(data_dir=data_dir)
    client = connect(first.ipc, name="app", timeout=3)
    sub = client.subscribe("a/>")
    first.stop()
    second = make_node(data_dir=data_dir)
    sub.unsubscribe()
    admin = connect(second.ipc, name="admin")
    assert subscriptions_of(admin, "app") == 0
    client.close()
    admin.close()


def test_a_silent_node_is_told_on_stderr_and_so_is_its_return(
    make_node: NodeFactory, capfd: pytest.CaptureFixture[str]
) -> None:
    """`meshctl sub` (and tail, reply) whose node was killed waited for ever without a
    word, as if the topic were merely quiet. The wait now says when the node falls silent
    and when it answers again (the CLI waits 5 s; 1.5 here)."""
    from meshctl.cli.watch import NodeWatch

    node = make_node()
    with connect(node.ipc, name="watcher") as client, connect(node.ipc) as pub:
        sub = client.subscribe("w/>")
        watch = NodeWatch(client, silent_after=1.5)
        with pytest.raises(Timeout):
            watch.next(sub, 1.2)  # quiet but alive: the node is heard, nothing is said
        assert capfd.readouterr().err == ""
        with stopped(node), pytest.raises(Timeout):
            watch.next(sub, 2.2)
        assert "has not answered for 2s: waiting for it" in capfd.readouterr().err
        pub.publish("w/1", b"back")
        assert watch.next(sub, 5).data == b"back"
        assert "answers again" in capfd.readouterr().err
        # A client that publishes is never probed by the node (it is not quiet): its own
        # keepalive is answered, or its silence grew while the node was fine (review).
        loudest = 0.0
        for _ in range(11):
            client.publish("elsewhere/x", b".")
            with pytest.raises(Timeout):
                sub.next(0.3)
            loudest = max(loudest, client.silence)
        assert loudest < 2.6


def test_a_resumed_subscription_gets_the_retained_values_as_they_are_now(
    make_node: NodeFactory, short_tmp: Path
) -> None:
    """A value retained while the subscriber's node was away (or before its client came
    back) was never delivered: the resubscription asked for no retained values, so a
    dashboard showed a stale value (exploratory test of day-2 operations)."""
    data_dir = short_tmp / "node"
    first = make_node(data_dir=data_dir)
    with connect(first.ipc) as pub:
        pub.publish("rr/x", b"v1", retain=True)
        pub.flush()
    watcher = connect(first.ipc, name="dashboard", timeout=3)
    sub = watcher.subscribe("rr/>", retained=True)
    assert sub.next(2).data == b"v1"
    first.stop()
    second = make_node(data_dir=data_dir)
    with connect(second.ipc) as pub:
        pub.publish("rr/x", b"v2", retain=True)  # before the watcher's client is back
        pub.flush()
    got = sub.next(5)
    assert (got.data, got.retained) == (b"v2", True)
    watcher.close()


def test_a_requests_header_limit_is_said_of_the_callers_headers(node: NodeProcess) -> None:
    """Exploratory test: headers that a publish takes were refused on a request with a
    size the caller never gave (the library's reply-to counted in)."""
    from meshctl.errors import InputError
    from node.codec import MAX_PUBLISH_HEADERS

    client = connect(node.ipc, name="app")
    headers = {"pad": "p" * (MAX_PUBLISH_HEADERS - 6)}  # 1 + 3 + 2 + value: the whole block
    client.publish("h/t", b"x", headers=headers)  # a publish takes it
    with pytest.raises(InputError, match=rf"{MAX_PUBLISH_HEADERS} bytes .*reply-to takes \d+"):
        client.request("h/t", b"x", headers=headers, timeout=1)
    client.close()


def test_events_held_for_a_callback_keep_their_order(node: NodeProcess) -> None:
    """Review: a callback that subscribed (its events held meanwhile) and then worked
    saw 1,150 newer events run before the held ones: the read loop went on after it."""
    import threading

    client = connect(node.ipc, name="app")
    got: list[int] = []

    def handle(event: Event) -> None:
        got.append(int(event.data))
        if len(got) == 500:
            time.sleep(0.05)  # frames pile up at the socket
            client.subscribe("other/x")  # its events are held while this waits
            time.sleep(0.05)

    client.subscribe("o/x", callback=handle)

    def publish() -> None:
        with connect(node.ipc, name="pub") as pub:
            for i in range(5_000):
                pub.publish("o/x", str(i))
                if i % 50 == 0:
                    time.sleep(0.002)
            pub.flush()

    t = threading.Thread(target=publish)
    t.start()
    client.run(until=lambda: len(got) >= 5_000, timeout=5)
    t.join(10)
    assert got == list(range(5_000))
    client.close()
