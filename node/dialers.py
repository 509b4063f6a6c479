"""Outbound links: one DEALER per peer address, redialled with capped, jittered backoff.

The Mesh core decides whether a link is up; this shell owns the sockets: it opens a
DEALER, sends the LINK hello, gives up after the handshake timeout, closes what the core
asks it to close, and waits ``min(backoff_max, 0.2 s * 2**attempt) * U(0.5, 1)`` before the
next dial so that a fleet restarting at once does not redial in lockstep.
"""

from __future__ import annotations

import contextlib
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import zmq
from zmq.utils.monitor import recv_monitor_message

from node.codec import MAX_STATE_BYTES

log = logging.getLogger("meshctl.node")

HANDSHAKE_TIMEOUT: Final = 2.0
FIRST_BACKOFF: Final = 0.2
_CURVE_FAILED: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)
KEY_REFUSED: Final = (
    "the peer refused this node's key in the CurveZMQ handshake (this node revoked, "
    "perhaps while it was down; or blocked there for 30 s after a failed proof)"
)
HANDSHAKE_BROKEN: Final = (
    "the CurveZMQ handshake failed: is the peer secured, and is its key the one dialed?"
)


@dataclass
class Dialer:
    """One address we keep a link to."""

    url: str
    found: str  # "static" or "mdns"
    sock: zmq.Socket[bytes] | None = None
    state: str = "idle"  # idle -> dialing -> up -> backoff -> dialing ...
    attempt: int = 0
    next_try: float = 0.0
    dial_started: float = 0.0
    peer_id: str | None = None
    last_error: str = ""
    server_key: str = ""  # the peer's CurveZMQ public key (secured nodes)
    monitor: zmq.Socket[bytes] | None = None  # handshake failures while dialing (secured)

    @property
    def endpoint(self) -> str:
        """The URL to connect to: a static link's ``#KEY`` suffix removed."""
        return self.url.split("#", 1)[0]


class Dialers:
    """All outbound links of a node."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        max_payload: int,
        backoff_max: float,
        curve: Callable[[zmq.Socket[bytes], str], None] | None = None,
        silent_ms: int = 3000,
    ) -> None:
        self.ctx = ctx
        self.max_payload = max_payload
        self.silent_ms = silent_ms  # libzmq ends a connection this long silent (zmtp_silence)
        self.backoff_max = backoff_max
        self.by_url: dict[str, Dialer] = {}
        self.by_sock: dict[zmq.Socket[bytes], Dialer] = {}
        self.changed = False  # the set of sockets to poll changed
        self.curve = curve  # sets CURVE client options on a new socket (secured nodes)

    def add(self, url: str, found: str, now: float, server_key: str = "") -> Dialer:
        """Dial ``url`` from now on (the dialer: a new one, or the one already dialing that
        place). A key for a URL already dialed without one is taken:
        a static link to the node a joiner enrolled with (its join link, with the key)
        dialed keyless for ever, "no CurveZMQ key known" (exploratory test)."""
        endpoint, _, keyed = url.partition("#")
        server_key = server_key or keyed
        d = self.by_url.get(url)
        if d is None:  # the same place spelt otherwise: a '#KEY' link and the join link
            d = next((x for x in self.by_url.values() if x.endpoint == endpoint), None)
        if d is not None:  # to one node dialed it twice (review)
            if server_key and not d.server_key:
                d.server_key = server_key
                d.next_try = now
            return d
        d = self.by_url[url] = Dialer(url, found, next_try=now, server_key=server_key)
        return d

    def remove(self, url: str, last: bytes | None = None) -> None:
        """Stop dialing ``url``; ``last``, if given, is sent first and given a second to
        leave (a REVOKE telling the peer why it is cut off)."""
        d = self.by_url.pop(url, None)
        if d is None:
            return
        linger_ms = 0
        if last is not None and d.sock is not None:
            with contextlib.suppress(zmq.ZMQError):
                d.sock.send(last, zmq.NOBLOCK)
                linger_ms = 1000
        self._close(d, linger_ms)

    def dial(self, d: Dialer, hello: bytes, now: float) -> None:
        if self.curve is not None and not d.server_key:
            d.last_error = "no CurveZMQ key known for this peer (add #KEY to the link URL)"
            self.backoff(d, now)
            return
        try:
            sock = self.ctx.socket(zmq.DEALER)
        except zmq.ZMQError as e:  # out of sockets (the context's or the process's files)
            d.last_error = f"cannot open a socket: {e.strerror}"
            self.backoff(d, now)
            return
        if self.curve is not None:
            self.curve(sock, d.server_key)
        sock.setsockopt(zmq.LINGER, 0)
        # No silent reconnect: a new connection must start with a new LINK hello, so a
        # lost connection ends this socket; heartbeats notice, and we redial afresh.
        sock.setsockopt(zmq.RECONNECT_IVL, -1)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.setsockopt(zmq.RCVHWM, 10_000)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 1000)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.silent_ms)
        # Events up to max_payload, node states up to MAX_STATE_BYTES, whichever is more.
        sock.setsockopt(zmq.MAXMSGSIZE, max(self.max_payload, MAX_STATE_BYTES) + 256 * 1024)
        # Why a dial fails: a peer's ZAP refusal says no more. Watched from before the
        # connect: a monitor attached after it may miss the refusal (a client did, in CI).
        monitor = sock.get_monitor_socket(_CURVE_FAILED) if self.curve is not None else None
        try:
            sock.connect(d.endpoint)
        except zmq.ZMQError as e:
            if monitor is not None:
                monitor.close(linger=0)
            sock.close(linger=0)
            d.last_error = e.strerror
            self.backoff(d, now)
            return
        d.monitor = monitor
        d.sock = sock
        d.state = "dialing"
        d.dial_started = now
        self.by_sock[sock] = d
        self.changed = True
        try:
            sock.send(hello, zmq.NOBLOCK)  # queued until TCP connects
        except zmq.Again:
            # The connection already failed its handshake (a CURVE peer we dialed open, or
            # the other way round) and libzmq dropped the pipe: a failed dial, not a crash.
            d.last_error = "handshake failed (security mode or key mismatch?)"
            self.backoff(d, now)

    def handshake_failure(self, d: Dialer) -> str | None:
        """Why ``d``'s CurveZMQ handshake failed, if it did: a node revoked while it was
        down saw only "no answer within 2s" (noted in session 9). Only the peer's refusal
        of our key is told apart; any other failure may be a peer restarting."""
        if d.monitor is None:
            return None
        why = None
        with contextlib.suppress(zmq.ZMQError):
            while d.monitor.poll(0):
                event = recv_monitor_message(d.monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    return KEY_REFUSED
                why = HANDSHAKE_BROKEN
        return why

    def end_monitor(self, d: Dialer) -> None:
        """Stop watching ``d``'s handshake: it is up, or its socket closes."""
        if d.monitor is not None:
            if d.sock is not None:
                with contextlib.suppress(zmq.ZMQError):
                    d.sock.disable_monitor()
            d.monitor.close(linger=0)
            d.monitor = None

    def _close(self, d: Dialer, linger_ms: int = 0) -> None:
        self.end_monitor(d)
        if d.sock is not None:
            self.by_sock.pop(d.sock, None)
            d.sock.close(linger=linger_ms)
            d.sock = None
            self.changed = True

    def backoff(self, d: Dialer, now: float) -> None:
        """Close the socket and schedule the next dial."""
        self._close(d)
        delay = min(self.backoff_max, FIRST_BACKOFF * 2**d.attempt) * random.uniform(0.5, 1.0)  # noqa: S311
        d.attempt = min(d.attempt + 1, 30)
        d.state = "backoff"
        d.next_try = now + delay

    def sockets(self) -> list[zmq.Socket[bytes]]:
        return list(self.by_sock)

    def close_all(self, linger_ms: int = 0) -> None:
        for d in self.by_url.values():
            self._close(d, linger_ms)


def zmtp_silence(dead_after: float) -> int:
    """Milliseconds of silence after which libzmq ends a connection: never before the
    mesh declares the link dead. At a fixed 3 s, a `mesh.dead_after` of 30 s kept a link
    "up" whose connection libzmq had closed, and what was queued on it went uncounted
    (review)."""
    return int(max(3.0, dead_after + 0.5) * 1000)  # the mesh notices within a tick
