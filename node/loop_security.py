"""The security side of the node's loop: what a secured node checks on every frame.

A mixin of node/loop.py's Node, split out to keep modules small; it works on the Node's
own state (the annotations below name what it uses). Open mode never calls it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

import zmq

from node import renewal
from node.codec import MAX_CONTROL_BYTES, Kind, decode_control, encode_control
from node.framing import json_batches

if TYPE_CHECKING:
    from node.dialers import Dialers
    from node.residents import Residents
    from node.router import Router
    from node.security import Security

DRAIN_BATCH: Final = 256  # frames read per wake-up before output is flushed
REVOKE_FRAME_BUDGET: Final = MAX_CONTROL_BYTES * 3 // 4  # JSON bytes of revocations a frame
# Bytes read from one socket per pass before output is flushed. Every record read stays
# alive until the flush at the end of the pass, and CPython returns an emptied 1 MiB arena
# of small objects to the kernel at once (it keeps just one): passes of up to 256 frames
# (16 MiB) mapped and unmapped arenas every time, a page fault every ~7 records on the
# node that delivers from a link. Bounded passes reuse the same arenas (measured: 0.16 ->
# 0.00-0.02 faults per event there, 1.9 -> 1.5-1.6 us of CPU per event).
PASS_BYTES: Final = 256 * 1024
POLLIN: Final = int(zmq.POLLIN)  # a plain int: `int & IntFlag` goes through enum code (0.8 us)


def from_network(msg: zmq.Frame) -> bool:
    """True if a frame came over a network transport (TCP, ipc), which sets the peer's
    address; inproc, the node's own actors' way in, sets none."""
    try:
        return msg.get("Peer-Address") is not None
    except zmq.ZMQError:
        return False


def events_of(sock: zmq.Socket[bytes]) -> Callable[[int], int]:
    """``sock.getsockopt`` typed for the int options the loop asks (EVENTS, RCVMORE)."""
    return cast("Callable[[int], int]", sock.getsockopt)


_REVOKE_KIND: Final = bytes((Kind.REVOKE,))
_LINK_OK_KIND: Final = bytes((Kind.LINK_OK,))
_GUARDED: Final = frozenset((Kind.LINK, Kind.HELLO, Kind.ENROLL))  # first frames to prove


class SecureSide:
    """Membership on first frames, one CURVE key per connection, revocations."""

    # The Node's state this side works on (set in Node.__init__).
    sock: zmq.Socket[bytes]
    router: Router
    security: Security | None
    renewal: renewal.Renewal | None
    dialers: Dialers
    _keys: dict[bytes, str]
    _pins: dict[str, str]
    _synced: set[str]
    _pass_bytes: int
    residents: Residents

    if TYPE_CHECKING:  # the Node's, used here

        def _impostor(self, ident: bytes) -> None: ...

    def _drain_secure(self, now: float) -> None:
        """``_drain`` for a secured node: every frame's CURVE key (libzmq's User-Id, set by
        the ZAP handler) is checked against the key its ROUTER identity proved first, so a
        connection that takes over a dead client's identity cannot inherit its session; the
        first LINK, HELLO or ENROLL of a connection must prove membership."""
        sock = self.sock
        recv = sock.recv
        handle = self.router.handle
        keys = self._keys
        events = events_of(sock)
        budget = self._pass_bytes + PASS_BYTES
        for _ in range(DRAIN_BATCH):
            if self._pass_bytes > budget or not events(zmq.EVENTS) & POLLIN:
                return
            ident = recv()
            msg = recv(copy=False)
            frame = msg.bytes
            if sock.getsockopt(zmq.RCVMORE):
                while sock.getsockopt(zmq.RCVMORE):
                    recv()
                self.router.bad_frame(ident, "multi-part message (the protocol sends one frame)")
                continue
            if ident in self.router.internal and (
                ident in self.residents.by_ident or from_network(msg)
            ):
                self._impostor(ident)
                continue
            try:
                key = str(msg.get("User-Id") or "")
            except zmq.ZMQError:
                key = ""  # ipc or inproc: no CURVE; the data dir's permissions guard it
            known = keys.get(ident)
            if known != key:
                if known is not None:  # another connection took over this identity
                    self.router.gone(ident, now)
                if len(keys) > 100_000:
                    self._prune_keys()
                keys[ident] = key
            self._pass_bytes += len(frame)
            kind = frame[1] if len(frame) > 1 else -1
            if kind == Kind.REVOKE and ident in self.router.net.by_via:
                self._on_revoke_frame(frame, now)
                continue
            if kind == Kind.LINK and ident not in self.router.net.by_via:
                # A node dialing us: its address as the socket saw it, for `peers` (secured
                # nodes showed the peer's host name from its endpoints: lab test).
                self.router.net.note_address(ident, str(msg.get("Peer-Address") or ""))
            if key and kind in _GUARDED and not self._admit(ident, key, kind, frame, msg, now):
                continue
            handle(ident, frame, now)

    def _prune_keys(self) -> None:
        live = self.router.clients.keys() | self.router.net.by_via.keys()
        self._keys = {i: k for i, k in self._keys.items() if i in live}

    def _admit(
        self, ident: bytes, key: str, kind: int, frame: bytes, msg: zmq.Frame, now: float
    ) -> bool:
        """Check a guarded first frame from a CURVE connection; False if it was handled
        (refused, or an enrollment answered) and must not reach the router."""
        sec = self.security
        assert sec is not None
        address = str(msg.get("Peer-Address") or "")
        if address and sec.proofs.blocked(address, now):  # before the costly decode
            sec.counters["handshakes_dropped"] += 1
            return False
        try:
            _, body = decode_control(frame)
        except Exception:
            self._proof_failed(address, now)
            return True
        router = self.router
        if kind == Kind.LINK:
            why = sec.check_link(body, key, f"tcp://{address or '?'}")
            if why is not None:
                self._proof_failed(address, now)
                router.net.counters["links_refused"] += 1
                router._send_control(ident, Kind.LINK_REFUSE, {"reason": why})
                return False
            node = body["node"]["id"]
            self._pins[node] = key
            return not sec.is_revoked(node)
        if kind == Kind.HELLO:
            member, why = sec.check_hello(body, key)
            if member is None:
                self._proof_failed(address, now)
                router._send_control(ident, Kind.ERR, {"error": why, "code": "auth"})
                return False
            router.handle(ident, frame, now)
            if ident in router.clients and not member.perms.unrestricted:
                router.acl[ident] = member.perms
            return False
        ok, answer = sec.enroll(body, key)
        answer["ref"] = body.get("ref")
        if not ok:
            self._proof_failed(address, now)
            answer["code"] = "auth"
        router._send_control(ident, Kind.OK if ok else Kind.ERR, answer)
        return False

    def _proof_failed(self, address: str, now: float) -> None:
        """Count a failed first frame against its address (node/failed_proofs.py)."""
        sec = self.security
        assert sec is not None
        if address and sec.proofs.failed(address, now):
            sec.counters["address_blocks"] += 1
            p = sec.proofs
            sec.log(
                f"address {address}: {p.limit} failed proofs within {p.window:g}s; its "
                f"handshakes are dropped unread for {p.block:g}s"
            )

    def _admit_dialed(self, url: str, frame: bytes, now: float) -> bool:
        """Check what a node we dialed says: its LINK_OK must prove that it is a member
        holding the key we dialed (CURVE proved that it holds the secret half)."""
        sec = self.security
        assert sec is not None
        net = self.router.net
        kind = frame[1:2]
        if kind == _REVOKE_KIND and url in net.by_via:
            self._on_revoke_frame(frame, now)
            return False
        if kind != _LINK_OK_KIND or url in net.by_via:
            return True
        d = self.dialers.by_url.get(url)
        try:
            _, body = decode_control(frame)
        except Exception:
            return True
        why = sec.check_link(body, d.server_key if d else "", url)
        if why is not None:
            net.refuse_outbound(url, why)
            return False
        self._pins[body["node"]["id"]] = d.server_key if d else ""
        return True

    def _on_revoke_frame(self, frame: bytes, now: float) -> None:
        try:
            _, body = decode_control(frame)
        except Exception:
            self.router.counters.bad_frames += 1
            return
        assert self.security is not None
        self._apply_revocations(self.security.accept_revocations(body.get("revocations")), now)

    def _apply_revocations(self, fresh: list[dict[str, Any]], now: float) -> None:
        """Close everything of each newly revoked member and pass the revocations on."""
        if not fresh:
            return
        # One walk of the connections' keys and one of the dialers for all of them (a walk
        # per revocation took 2.9 s for 244 of them at 100,000 connections).
        revoked = {signed["rec"]["key"] for signed in fresh}
        mesh = fresh[0]["rec"].get("mesh")
        for ident, k in list(self._keys.items()):
            if k in revoked and ident in self.router.clients:
                # Told, as NATS says "user revoked": dropped in silence, a subscriber
                # waited for ever and a publisher's flush timed out (exploratory test).
                why = f"client not authorised for mesh {mesh!r}: revoked"
                self.router._send_control(ident, Kind.ERR, {"error": why, "code": "auth"})
                self.router.drop_client(ident, "membership revoked", now)
        net = self.router.net
        frames = revocation_frames(fresh)
        for each in net.links.values():  # the revoked node too: it learns why, and stops
            net.out.extend((each.via, frame) for frame in frames)
        by_node = {signed["rec"]["node"]: signed for signed in fresh}
        by_key = {signed["rec"]["key"]: signed for signed in fresh}
        for node in by_node.keys() & net.links.keys():
            net.drop_via(net.links[node].via, "membership revoked", now)
        for d in list(self.dialers.by_url.values()):
            hit = by_node.get(d.peer_id or "") or (
                by_key.get(d.server_key) if d.server_key else None
            )
            if hit is not None:
                # The REVOKE queued for this link would find the dialer gone at flush: it
                # goes now, so the revoked node learns why (and stops dialing).
                own = encode_control(Kind.REVOKE, {"revocations": [hit]})
                self.dialers.remove(d.url, last=own)

    def _security_tick(self, now: float) -> None:
        """Pick up `meshctl revoke` (it writes revoked.json) and give newly linked
        neighbours every revocation we know, so late joiners learn them too."""
        sec = self.security
        assert sec is not None
        self._apply_revocations(sec.poll_revocations_file(), now)
        renewed = self.renewal.tick(time.time(), now) if self.renewal is not None else None
        if renewed is not None:
            self.router.net.proof = renewed
            until = time.strftime("%Y-%m-%d", time.gmtime(renewal.expires(renewed)))
            sec.log(f"membership renewed until {until} (UTC)")
            sec.install_member(renewed)
        sec.save_member()  # again, if saving it failed
        net = self.router.net
        new = net.links.keys() - self._synced
        if new and sec.revocations:
            frames = revocation_frames(sec.revocations)
            for node in new:
                net.out.extend((net.links[node].via, frame) for frame in frames)
        for node in new:
            if sec.is_revoked(node):
                net.drop_via(net.links[node].via, "membership revoked", now)
        self._synced = set(net.links)


def revocation_frames(revocations: list[dict[str, Any]]) -> list[bytes]:
    """REVOKE frames holding ``revocations``, each within what a receiver decodes: one
    frame of them all was refused whole by every receiver past ~245 (over 64 KiB), so
    revocations stopped spreading, and links coming up learnt none."""
    return [
        encode_control(Kind.REVOKE, {"revocations": batch})
        for batch in json_batches(revocations, REVOKE_FRAME_BUDGET)
    ]
