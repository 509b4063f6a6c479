"""How the client library settles persistent events from the node's answers (PACK, and
ERR naming ids): what ``confirm()`` raises, and what it must not.

The node's frames are fed to a real Client (never connected) as its reader would."""

from __future__ import annotations

import pytest

from meshctl.client import Client
from meshctl.errors import RemoteError
from node.codec import Kind, encode_control

X, Y, Z = "aa" * 16, "bb" * 16, "cc" * 16


def err(ids: list[str], code: str) -> bytes:
    body = {"ref": None, "error": f"{code} refusal", "code": code, "ids": ids}
    return encode_control(Kind.ERR, body)


def client(*pending: str) -> Client:
    c = Client("tcp://127.0.0.1:1")
    c._unacked = {bytes.fromhex(i): b"record" for i in pending}
    return c


SESSION = encode_control(Kind.ERR, {"error": "no session: say HELLO first", "code": "session"})


def greeted() -> tuple[Client, list[bytes]]:
    """A client that had its WELCOME, and the frames it sends from now on."""
    c = Client("tcp://127.0.0.1:1")
    sent: list[bytes] = []
    c._sock = object()  # type: ignore[assignment]
    c._send = sent.append  # type: ignore[method-assign]
    c.node = {"node_id": "n"}
    return c, sent


def test_refusals_of_several_kinds_name_every_refused_id() -> None:
    """Found in review: only the first kind's ids were named, so the uplink counted a
    batch with one event over the payload limit and one denied as one refused, one sent."""
    c = client(X, Y, Z)
    c._dispatch(err([X], "payload"))
    c._dispatch(err([Y], "permission"))
    c._dispatch(encode_control(Kind.PACK, {"ids": [Z]}))
    with pytest.raises(RemoteError, match=r"payload refusal \(and 1 more\)") as e:
        c._wait_acks(0, 1.0)
    assert (e.value.code, set(e.value.ids)) == ("payload", {X, Y})


def test_a_store_error_goes_before_refusals_which_the_next_confirm_raises() -> None:
    """A full disk is worth sending again; the uplink must not skip those events. The
    refusal was cleared with it and never reported (found in the third review)."""
    c = client(X, Y)
    c._dispatch(err([X], "payload"))
    c._dispatch(err([Y], "store"))
    with pytest.raises(RemoteError) as e:
        c._wait_acks(0, 1.0)
    assert (e.value.code, e.value.ids) == ("store", (Y,))
    with pytest.raises(RemoteError) as later:
        c._wait_acks(0, 1.0)
    assert (later.value.code, later.value.ids) == ("payload", (X,))


def test_a_late_refusal_of_a_resent_event_does_not_fail_the_next_confirm() -> None:
    """Found in review: the client resends unacknowledged events after a while; one
    refused is refused again, and that second answer came after confirm() had returned,
    failing the next confirm() for a batch stored in full."""
    c = client(X)
    c._dispatch(err([X], "payload"))
    with pytest.raises(RemoteError):
        c._wait_acks(0, 1.0)
    c._dispatch(err([X], "payload"))  # the resend's answer, late
    c._unacked = {bytes.fromhex(Y): b"record"}  # the next batch
    c._dispatch(encode_control(Kind.PACK, {"ids": [Y]}))
    c._wait_acks(0, 1.0)  # all of it stored: nothing to raise


def test_the_node_forgetting_us_is_answered_by_one_hello_and_raises_nothing() -> None:
    """Found in review: each frame sent between a node's restart and the client's new
    HELLO is answered 'no session'; the first made the client greet again, the others were
    raised as errors, so `pub -p` across a node restart failed though all was stored."""
    c, sent = greeted()
    for _ in range(3):
        c._dispatch(SESSION)
    assert sum(frame[1] == Kind.HELLO for frame in sent) == 1
    assert not c._async_errors


def test_a_greeting_that_got_no_welcome_is_sent_again() -> None:
    """Found in the third review: once the client had greeted a restarted node, it ignored
    every later 'no session'; if the node went away again before reading that HELLO, no
    HELLO was ever sent again and every call timed out."""
    c, sent = greeted()
    c._dispatch(SESSION)
    c._dispatch(SESSION)  # the same restart: no second HELLO
    assert sum(frame[1] == Kind.HELLO for frame in sent) == 1
    c._resumed_at -= c.timeout + 1  # no WELCOME within the timeout
    c._dispatch(SESSION)
    assert sum(frame[1] == Kind.HELLO for frame in sent) == 2


def test_a_retained_value_sent_again_after_a_resume_is_delivered_once() -> None:
    """After a node restart a subscription asks for the retained values again (one that
    changed while the node was away was never seen); one it already has is not delivered
    twice: `sub --count 2` spent its count on a repeat (review). A replaying subscription
    does not ask again: its replay brought them (review)."""
    from meshctl.client import Subscription
    from node.codec import F_RETAIN, decode_control
    from node.events import Event

    c, sent = greeted()
    plain = Subscription(c, 1, ("t/>",), None, None)
    plain.resume_body = {"patterns": ["t/>"], "group": None, "retained": True}
    plain.last_ids = {}
    replay = Subscription(c, 2, ("r/>",), None, None)
    replay.resume_body = {"patterns": ["r/>"], "group": None, "retained": True, "since_s": 60}
    c._subs = {1: plain, 2: replay}

    def value(v: bytes, n: int) -> Event:
        return Event("t/x", v, {}, bytes([n]) * 16, 1, flags=F_RETAIN)

    c._deliver([(1, value(b"v1", 1))])
    c._resume()
    c._deliver([(1, value(b"v1", 1)), (1, value(b"v2", 2))])
    assert [e.data for e in plain.queue] == [b"v1", b"v2"]
    subs = [decode_control(f)[1] for f in sent if decode_control(f)[0] == Kind.SUB]
    assert [(b["sid"], b.get("retained")) for b in subs] == [(1, True), (2, None)]
