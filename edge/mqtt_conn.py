"""One MQTT client's TCP connection to the listener: bytes to packets, packets to bytes.

The protocol object only frames and buffers; what a packet means is decided by the
listener (mqtt_listener.py), which owns the sessions and the node connection. Writes made
while handling one read are coalesced into one ``transport.write``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from edge.mqtt_codec import Connect, Decoder, MqttProtocolError, Packet
from edge.mqtt_session import Session
from node.membership import Permissions

if TYPE_CHECKING:
    from edge.mqtt_listener import MqttListener

log = logging.getLogger("meshctl.node")


class MqttConnection(asyncio.Protocol):
    """A connected socket and, once CONNECT was accepted, its session."""

    def __init__(self, listener: MqttListener, max_packet: int) -> None:
        self.listener = listener
        self.decoder = Decoder(max_packet)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.connect: Connect | None = None
        self.session: Session | None = None
        self.last_rx = 0.0
        self.opened = 0.0
        self.said_disconnect = False
        self.closing = False
        self.out: list[bytes] = []
        # QoS 1/2 publishes not yet acknowledged, in the order they came: packet id ->
        # its PUBACK (PUBREC) once ready. Acks go out in that order (MQTT 3.1.1 4.6).
        self.unacked: OrderedDict[int, bytes | None] = OrderedDict()
        self._in_read = False
        self.perms: Permissions | None = None  # the user's rules; None: unrestricted
        self.verdicts: dict[bytes, str | None] = {}  # its publish topics, checked once each
        self.verifying = False  # its password is being hashed; reading is paused
        self.lost = False  # the socket went while verifying: closed once ``held`` is handled
        self.finished = False  # close() was called: nothing more it sent is handled
        self.held: list[Packet] = []  # what came after that CONNECT, handled once it is in
        self.early: list[bytes] | None = None  # TLS: data that came before secured()

    @property
    def name(self) -> str:
        cid = self.connect.client_id if self.connect is not None else "-"
        return f"{cid}@{self.peer}"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        if self.listener.cfg.tls is not None:  # an mqtts port: nothing is read in clear
            self.early = []
            transport.pause_reading()
            self.listener.start_tls(self, transport)
            return
        self.secured(transport)

    def secured(self, transport: asyncio.Transport) -> None:
        """The connection is ready for MQTT (over TLS once its handshake is done); what
        the client sent with its last handshake message is handled now."""
        self.transport = transport
        self.opened = self.last_rx = self.listener.now()
        self.listener.opened(self)
        early, self.early = self.early, None
        if early:
            self.data_received(b"".join(early))

    def data_received(self, data: bytes) -> None:
        self._read(data, max(self.listener.budget, 0))

    def read_backlog(self) -> None:
        """Handle more of what ``data_received`` left over (the listener's next steps)."""
        self._read(b"", max(self.listener.budget, 0))

    def eof_received(self) -> bool | None:
        """The client closed its side. What the step's budget left unread is handled now,
        whatever the budget: on TLS the transport closes right after this, paused or not,
        and the packets (a DISCONNECT among them, which cancels the will) would be lost."""
        if self.decoder.more and not self.closing:
            self._read(b"", 1 << 62)
            self.listener.forget_deferred(self)
        return None  # close the transport

    def _read(self, data: bytes, limit: int) -> None:
        """Handle at most ``limit`` packets of what arrived; the rest waits (``defer``)."""
        if self.closing:
            return
        if self.early is not None:
            # Decrypted, but asyncio hands it over before start_tls returns the secured
            # transport: answering now would write in clear on the raw one. Kept until then.
            self.early.append(data)
            return
        self.last_rx = self.listener.now()
        if self.connect is None and not self.decoder.pending and data and data[:1] != b"\x10":
            # Not MQTT at all (an HTTP probe, a port scan): say so now, not when a
            # length it never meant has been read.
            self.listener.protocol_error(self, f"first byte {data[:1].hex()} is not CONNECT")
            return
        self._in_read = True
        listener = self.listener
        try:
            packets = self.decoder.feed(data, limit)
            listener.budget -= len(packets)
            for packet in packets:
                if self.verifying:  # after a CONNECT whose password is being checked
                    self.held.append(packet)
                    continue
                listener.on_packet(self, packet)
                if self.closing:
                    break
            if self.decoder.error is not None and not self.closing and not self.verifying:
                listener.protocol_error(self, str(self.decoder.error))  # (verifying: after held)
        except MqttProtocolError as e:
            listener.protocol_error(self, str(e))
        finally:
            self._in_read = False
            self.flush()
        if self.decoder.more and not self.closing:
            # The step's budget is spent: the rest waits, and so does this socket.
            listener.defer(self)

    def resume(self, admit: Callable[[], None]) -> None:
        """The password was checked: ``admit`` (CONNACK), then what arrived meanwhile, in
        one write; then read again."""
        self.verifying = False
        held, self.held = self.held, []
        self._in_read = True
        try:
            admit()
            for packet in held:
                if self.finished:  # (a lost socket is closing, but its packets still count)
                    break
                self.listener.on_packet(self, packet)
            if self.decoder.error is not None and not self.finished:
                self.listener.protocol_error(self, str(self.decoder.error))
        finally:
            self._in_read = False
            self.flush()
        if not self.closing and self.transport is not None and not self.decoder.more:
            self.transport.resume_reading()  # (with a backlog: once it is read)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.verifying and self.held and not self.finished:
            # It sent more after its CONNECT and left (TLS closes at the client's EOF even
            # while reading is paused). Once the password is checked, what it sent is
            # handled as if it had stayed: its publishes, its DISCONNECT (no will).
            self.lost = True  # before ``closing``: the hashing worker reads both
            self.closing = True
            return
        self.closing = True
        self.listener.closed(self)

    def write(self, packet: bytes) -> None:
        """Queue a packet; it goes out at the end of the current read or with ``flush``."""
        self.out.append(packet)
        if not self._in_read:
            self.flush()

    def flush(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.out[0] if len(self.out) == 1 else b"".join(self.out))
        self.out.clear()

    def backlog(self) -> int:
        """Bytes written but not yet taken by the kernel (a slow reader grows this)."""
        t = self.transport
        return 0 if t is None else t.get_write_buffer_size()

    def close(self, *, abort: bool = False) -> None:
        """Close after writing what is queued (``abort``: drop it, for a peer gone bad)."""
        self.finished = True
        if self.closing:
            if abort and self.transport is not None:
                self.transport.abort()  # a graceful close that has not finished: end it
            return
        self.closing = True
        if self.transport is None:
            return
        if abort:
            self.out.clear()
            self.transport.abort()
        else:
            self.flush()
            # A TLS transport paused for the budget (or a password check) that has seen
            # the client's EOF finishes closing only once it may read again.
            self.transport.resume_reading()
            self.transport.close()
