"""Renewing this node's membership record before it expires.

A node's record (``member.json``) is signed for a year (``NODE_RECORD_DAYS``). Devices run
for longer than that, and a record that expired would have every link refused at its next
handshake: the mesh would come apart a year after it was made. So a node renews its own
record once less than ``RENEW_BEFORE`` remains, checking at start and then every
``CHECK_EVERY``:

* the authority (the node holding the mesh key) signs a new record for itself;
* any other node asks the node that enrolled it (its join link) over CurveZMQ, sending
  the record it still holds: an ENROLL with ``renew``. The authority checks that record
  as it checks a LINK (its signature, expiry, revocation, the key CURVE proved, the node
  id) and signs the same identity for another period. No token: the valid record is the
  proof, as an ACME client renews with the key of the certificate it holds.

The exchange runs on a thread; the node's loop only installs the answer. A record that
has expired cannot be renewed that way: such a node joins again with a new token
(``meshctl up --join`` on its data dir).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Final

import zmq

from node import membership as ms
from node.clock import clock_is_set
from node.codec import MAX_REPLY_BYTES, Kind, decode_control, encode_control
from node.errors import CodecError, NodeError
from node.security import NODE_RECORD_DAYS, Security, join_links

RENEW_BEFORE: Final = 30 * 86400.0  # seconds of validity left when a node renews
CHECK_EVERY: Final = 3600.0  # and after a failed attempt, the next one
ASK_TIMEOUT: Final = 10.0


class RenewalError(NodeError):
    """The node that enrolls could not be asked, or its answer does not hold."""


class BadAddress(RenewalError):
    """The address or key to ask at is unusable (a token's, a join link's)."""


def expires(signed: dict[str, Any]) -> int:
    """When a signed record expires (unix seconds; 0 if it says nothing readable)."""
    rec = signed.get("rec")
    exp = rec.get("exp") if isinstance(rec, dict) else None
    return exp if isinstance(exp, int) else 0


def ask(
    url: str,
    server_key: str,
    keys: tuple[bytes, bytes],
    body: dict[str, Any],
    timeout: float,
) -> tuple[int, dict[str, Any]]:
    """Send one ENROLL over CURVE to the node holding ``server_key`` at ``url`` and wait
    for its answer: (kind, body). ``keys``: our CurveZMQ (public, secret)."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    try:
        s.curve_publickey, s.curve_secretkey = keys
        try:  # a token's or join link's own parts: a bad one said "internal error: ZMQError"
            s.curve_serverkey = server_key.encode()
            s.connect(url)
        except (zmq.ZMQError, ValueError) as e:
            raise BadAddress(f"cannot connect to {url!r} with key {server_key!r}: {e}") from None
        s.send(encode_control(Kind.ENROLL, body))
        if not s.poll(int(timeout * 1000)):
            raise RenewalError(
                f"no answer from {url} within {timeout:g}s (is that node up and reachable?)"
            )
        try:
            # Its answer carries every revocation of the mesh: past 64 KiB at ~245.
            kind, answer = decode_control(s.recv(), MAX_REPLY_BYTES)
        except CodecError as e:
            raise RenewalError(f"answer from {url} unreadable: {e}") from None
    finally:
        s.close(0)
    return kind, answer


class Renewal:
    """When this node's record is due, a new one, from the node's own mesh key or from
    the node that enrolled it."""

    def __init__(self, security: Security, log: Callable[[str], None]) -> None:
        self.sec = security
        self.log = log
        self._next = 0.0
        self._thread: threading.Thread | None = None
        self._got: dict[str, Any] | None = None

    def tick(self, wall: float, now: float) -> dict[str, Any] | None:
        """A renewed record to install, or None. ``wall``: unix time; ``now``: the
        loop's monotonic clock."""
        if self._thread is not None:
            if self._thread.is_alive():
                return None
            self._thread = None
            got, self._got = self._got, None
            return got
        if now < self._next:
            return None
        self._next = now + CHECK_EVERY
        creds = self.sec.creds
        left = expires(creds.member) - wall
        if left > RENEW_BEFORE:
            return None
        if creds.signing_key is not None:  # the authority: its own key signs
            if not clock_is_set(wall):  # a record valid until 1971 would not do
                return None
            rec = dict(creds.member["rec"])
            rec["exp"] = int(wall + NODE_RECORD_DAYS * 86400)
            return ms.sign(creds.signing_key, rec)
        if left <= 0:
            # The node's own clock may be what is wrong (clock faults: a clock a year
            # ahead got this advice; set right, the node relinked with no new token).
            said = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(wall))
            self.log(
                "this node's membership has expired and cannot be renewed: other nodes "
                "refuse its links; join again with a new token from `meshctl invite` "
                f"(`meshctl up --join TOKEN` on this data dir), unless this host's clock, "
                f"which says {said}, is wrong: then set it, nothing else is needed"
            )
            return None
        try:
            links = join_links(self.sec.data_dir)
        except (NodeError, OSError) as e:
            self.log(f"membership expires {_day(creds.member)}; its join link is unreadable: {e}")
            return None
        if not links:
            self.log(f"membership expires {_day(creds.member)}; no join link to renew it at")
            return None
        self._thread = threading.Thread(
            target=self._ask, args=(links[0], wall), name="meshctl-renewal", daemon=True
        )
        self._thread.start()
        return None

    def _ask(self, link: tuple[str, str], wall: float) -> None:
        url, server_key = link
        sec = self.sec
        body = {"ref": 1, "renew": True, "node": sec.node_id, "member": sec.creds.member}
        try:
            kind, answer = ask(
                url, server_key, (sec.creds.public, sec.creds.secret), body, ASK_TIMEOUT
            )
            if kind != Kind.OK:
                raise RenewalError(f"refused by {url}: {answer.get('error')}")
            signed = answer.get("member")
            ms.check_member(
                signed,
                mesh=sec.creds.mesh,
                mesh_pk=sec.creds.mesh_pk,
                now=wall,
                curve_key=sec.creds.public_text,
                node=sec.node_id,
            )
            assert isinstance(signed, dict)  # check_member held: a signed record
            if expires(signed) <= expires(sec.creds.member):  # an authority's clock behind
                raise RenewalError(f"{url} answered with a record that expires no later")
        except (RenewalError, ms.MembershipError, zmq.ZMQError) as e:
            self.log(
                f"membership renewal failed (it expires {_day(sec.creds.member)}; again in "
                f"{CHECK_EVERY / 60:g} min): {e}"
            )
            return
        self._got = signed


def _day(signed: dict[str, Any]) -> str:
    """When a record expires, as an operator reads it in a log line."""
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires(signed)))
