"""MQTT 3.1.1 packets, sans-IO: bytes in, packets out; packets in, bytes out.

A packet is a fixed header (type in the high nibble, flags in the low one), a remaining
length (1-4 byte varint, 7 bits each) and a variable part. Strings are a u16 big-endian
length then UTF-8 without NUL; binary fields the same without the UTF-8 rule.

The decoder is incremental (``Decoder.feed`` takes whatever the socket gave and returns
every complete packet) and checks what the standard says a receiver MUST check: reserved
flag bits, QoS 3, packet id 0 on QoS > 0, empty SUBSCRIBE/UNSUBSCRIBE lists, wildcards in
a PUBLISH topic, malformed UTF-8 or NUL in strings, lengths that do not add up, packets
larger than the limit. Every failure is ``MqttProtocolError`` and nothing else: the peer
sent garbage, so its connection is closed. Whether a packet may be sent in the current
state of a session (CONNECT first, once) is the listener's business, not the codec's.

Written here rather than taken from a library: the listener needs a decoder it can feed
from its own event loop at tens of thousands of packets a second, with no threads or
callbacks of its own (see README, "MQTT listener").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

from node.errors import CodecError

MAX_REMAINING: Final = 268_435_455  # the largest 4-byte varint (MQTT 3.1.1 §2.2.3)
PROTOCOLS: Final = {b"MQTT": 4, b"MQIsdp": 3}  # protocol name -> the level it comes with
_U16: Final = struct.Struct(">H")


class MqttProtocolError(CodecError):
    """The peer sent bytes that are not a valid MQTT 3.1.1 packet; close its connection."""


class Type(IntEnum):
    """Control packet types (high nibble of the first byte)."""

    CONNECT = 1
    CONNACK = 2
    PUBLISH = 3
    PUBACK = 4
    PUBREC = 5
    PUBREL = 6
    PUBCOMP = 7
    SUBSCRIBE = 8
    SUBACK = 9
    UNSUBSCRIBE = 10
    UNSUBACK = 11
    PINGREQ = 12
    PINGRESP = 13
    DISCONNECT = 14


# Flags a packet type must carry in the low nibble (PUBLISH has its own: dup/qos/retain).
_FLAGS: Final = {t: (0b0010 if t in (6, 8, 10) else 0) for t in range(1, 15) if t != 3}
CONNACK_ACCEPTED: Final = 0
CONNACK_BAD_PROTOCOL: Final = 1
CONNACK_ID_REJECTED: Final = 2
CONNACK_SERVER_UNAVAILABLE: Final = 3
CONNACK_BAD_CREDENTIALS: Final = 4  # bad user name or password
CONNACK_NOT_AUTHORIZED: Final = 5
SUBACK_FAILURE: Final = 0x80


@dataclass(frozen=True, slots=True)
class Will:
    """The message a broker publishes for a client that vanishes without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True, slots=True)
class Connect:
    client_id: str
    clean_session: bool = True
    keepalive: int = 0
    will: Will | None = None
    username: str | None = None
    password: bytes | None = None
    level: int = 4
    protocol: bytes = b"MQTT"


@dataclass(frozen=True, slots=True)
class Connack:
    session_present: bool = False
    return_code: int = CONNACK_ACCEPTED


@dataclass(slots=True)
class Publish:
    """One application message. Not frozen: the hot path builds one per message, and
    frozen dataclasses cost several times more to construct (as node.events.Event)."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int = 0


@dataclass(slots=True)
class PubAck:
    """Not frozen, for the same reason as Publish: one per QoS 1 message."""

    packet_id: int


@dataclass(frozen=True, slots=True)
class PubRec:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PubRel:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PubComp:
    packet_id: int


@dataclass(frozen=True, slots=True)
class Subscribe:
    packet_id: int
    filters: tuple[tuple[str, int], ...]  # (topic filter, requested QoS)


@dataclass(frozen=True, slots=True)
class SubAck:
    packet_id: int
    return_codes: tuple[int, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    packet_id: int
    filters: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnsubAck:
    packet_id: int


@dataclass(frozen=True, slots=True)
class PingReq:
    pass


@dataclass(frozen=True, slots=True)
class PingResp:
    pass


@dataclass(frozen=True, slots=True)
class Disconnect:
    pass


Packet = (
    Connect
    | Connack
    | Publish
    | PubAck
    | PubRec
    | PubRel
    | PubComp
    | Subscribe
    | SubAck
    | Unsubscribe
    | UnsubAck
    | PingReq
    | PingResp
    | Disconnect
)
_ID_ONLY: Final[dict[int, type[PubAck | PubRec | PubRel | PubComp | UnsubAck]]] = {
    4: PubAck,
    5: PubRec,
    6: PubRel,
    7: PubComp,
    11: UnsubAck,
}
_ACK_TYPES: Final = {cls: Type(kind) for kind, cls in _ID_ONLY.items()}


# ---- decoding ------------------------------------------------------------------------------


class Decoder:
    """Turns a byte stream into packets; keeps the tail of an incomplete packet."""

    def __init__(self, max_packet: int = MAX_REMAINING) -> None:
        self.max_packet = max_packet
        self._buf = b""
        self.more = False  # the last feed stopped at its limit: whole packets wait in _buf
        # Garbage after whole packets of the same read: those came first and are handed
        # over (as a broker reading packet by packet would handle them); this is raised
        # by the next call, and the caller asks for it once it has handled them.
        self.error: MqttProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes held back because they do not yet make a whole packet."""
        return len(self._buf)

    def feed(self, data: bytes, limit: int = 1 << 62) -> list[Packet]:
        """The complete packets in what arrived so far, at most ``limit`` of them (the rest
        wait for the next call: ``more``); MqttProtocolError on garbage, or ``error`` set
        when whole packets came before it."""
        if self.error is not None:
            raise self.error
        buf = self._buf + data if self._buf else data
        out: list[Packet] = []
        try:
            return self._packets(buf, out, limit)
        except MqttProtocolError as e:
            if not out:
                raise
            self.error = e
            self._buf = b""
            self.more = False
            return out

    def _packets(self, buf: bytes, out: list[Packet], limit: int) -> list[Packet]:
        n = len(buf)
        off = 0
        self.more = False
        while n - off >= 2:
            if len(out) >= limit:
                self.more = True
                break
            b0 = buf[off]
            i = off + 1
            length = buf[i]
            i += 1
            if length & 0x80:
                length &= 0x7F
                shift = 7
                while True:
                    if i >= n:
                        self._buf = buf[off:]
                        return out
                    b = buf[i]
                    i += 1
                    length |= (b & 0x7F) << shift
                    if not b & 0x80:
                        break
                    shift += 7
                    if shift > 21:
                        raise MqttProtocolError("remaining length longer than 4 bytes")
            if length > self.max_packet:
                raise MqttProtocolError(
                    f"packet of {length} bytes exceeds the limit of {self.max_packet}"
                )
            end = i + length
            if end > n:
                break
            if b0 == 0x40 and length == 2 and (buf[i] or buf[i + 1]):  # PUBACK, inlined
                out.append(PubAck((buf[i] << 8) | buf[i + 1]))
            else:
                out.append(parse(b0, buf[i:end]))
            off = end
        self._buf = buf[off:] if off < n else b""
        return out


def parse(first: int, body: bytes) -> Packet:
    """One packet from its first byte and its variable part; MqttProtocolError on garbage."""
    kind = first >> 4
    flags = first & 0x0F
    if kind == 3:
        return _publish(flags, body)
    if kind not in _FLAGS:
        raise MqttProtocolError(f"reserved packet type {kind}")
    if flags != _FLAGS[kind]:
        raise MqttProtocolError(f"{Type(kind).name} with flags {flags:#06b}")
    try:
        if kind in _ID_ONLY:
            return _ID_ONLY[kind](_packet_id(body, exact=True))
        if kind == 1:
            return _connect(body)
        if kind == 8:
            return _subscribe(body)
        if kind == 10:
            return _unsubscribe(body)
        if kind == 2:
            if len(body) != 2 or body[0] > 1:
                raise MqttProtocolError("CONNACK is 2 bytes with flags 0 or 1")
            return Connack(bool(body[0]), body[1])
        if kind == 9:
            if len(body) < 3:
                raise MqttProtocolError("SUBACK without return codes")
            return SubAck(_packet_id(body), tuple(body[2:]))
    except (IndexError, struct.error):
        raise MqttProtocolError(f"truncated {Type(kind).name}") from None
    if body:  # PINGREQ, PINGRESP, DISCONNECT
        raise MqttProtocolError(f"{Type(kind).name} with a {len(body)}-byte body")
    return _EMPTY[kind]


_EMPTY: Final[dict[int, Packet]] = {12: PingReq(), 13: PingResp(), 14: Disconnect()}


def _packet_id(body: bytes, *, exact: bool = False) -> int:
    if len(body) < 2 or (exact and len(body) != 2):
        raise MqttProtocolError(f"expected a 2-byte packet id, got {len(body)} bytes")
    pid: int = _U16.unpack_from(body)[0]
    if pid == 0:
        raise MqttProtocolError("packet id 0")
    return pid


def _string(body: bytes, off: int) -> tuple[str, int]:
    """A UTF-8 string field at ``off``: (text, offset after it)."""
    raw, off = _binary(body, off)
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise MqttProtocolError("string field is not valid UTF-8") from None
    if "\x00" in text:
        raise MqttProtocolError("string field contains NUL")
    return text, off


def _binary(body: bytes, off: int) -> tuple[bytes, int]:
    if off + 2 > len(body):
        raise MqttProtocolError("truncated length of a string field")
    end = off + 2 + ((body[off] << 8) | body[off + 1])
    if end > len(body):
        raise MqttProtocolError("string field overruns the packet")
    return body[off + 2 : end], end


def _publish(flags: int, body: bytes) -> Publish:
    qos = (flags >> 1) & 3
    if qos == 3:
        raise MqttProtocolError("PUBLISH with QoS 3")
    if qos == 0 and flags & 8:
        raise MqttProtocolError("PUBLISH with DUP set on QoS 0")
    n = len(body)
    if n < 2:
        raise MqttProtocolError("truncated PUBLISH topic")
    end = 2 + ((body[0] << 8) | body[1])
    if end > n:
        raise MqttProtocolError("PUBLISH topic overruns the packet")
    try:
        topic = body[2:end].decode()
    except UnicodeDecodeError:
        raise MqttProtocolError("PUBLISH topic is not valid UTF-8") from None
    if not topic or "+" in topic or "#" in topic or "\x00" in topic:
        raise MqttProtocolError(f"PUBLISH topic {topic[:80]!r} is empty or holds '+', '#', NUL")
    pid = 0
    if qos:
        if end + 2 > n:
            raise MqttProtocolError("PUBLISH without its packet id")
        pid = (body[end] << 8) | body[end + 1]
        if pid == 0:
            raise MqttProtocolError("packet id 0")
        end += 2
    return Publish(topic, body[end:], qos, bool(flags & 1), bool(flags & 8), pid)


def _connect(body: bytes) -> Connect:
    protocol, off = _binary(body, 0)
    if protocol not in PROTOCOLS:
        raise MqttProtocolError(f"protocol name {protocol[:20]!r} is not MQTT")
    level, flags = body[off], body[off + 1]
    keepalive = _U16.unpack_from(body, off + 2)[0]
    off += 4
    try:
        return _connect_payload(body, off, protocol, level, flags, keepalive)
    except MqttProtocolError:
        if level in (3, 4):
            raise
        # Another version's CONNECT (MQTT 5 puts properties here): the level is enough to
        # answer CONNACK 0x01, as 3.1.1 asks. Parsed as 3.1.1 it failed, and the client was
        # cut off with no answer (found in review).
        return Connect("", True, keepalive, None, None, None, level, protocol)


def _connect_payload(
    body: bytes, off: int, protocol: bytes, level: int, flags: int, keepalive: int
) -> Connect:
    if flags & 1:
        raise MqttProtocolError("CONNECT reserved flag set")
    client_id, off = _string(body, off)
    will = None
    will_qos = (flags >> 3) & 3
    if flags & 4:
        if will_qos == 3:
            raise MqttProtocolError("will QoS 3")
        topic, off = _string(body, off)
        payload, off = _binary(body, off)
        if not topic or "+" in topic or "#" in topic:
            raise MqttProtocolError("will topic is empty or holds a wildcard")
        will = Will(topic, payload, will_qos, bool(flags & 0x20))
    elif flags & 0x38:
        raise MqttProtocolError("will QoS or retain set without a will")
    username = password = None
    if flags & 0x80:
        username, off = _string(body, off)
    elif flags & 0x40:  # 3.1 too: mosquitto closes the connection, as for 3.1.1
        raise MqttProtocolError("password without a user name")
    if flags & 0x40:
        password, off = _binary(body, off)
    if off != len(body):
        raise MqttProtocolError(f"{len(body) - off} bytes after the CONNECT payload")
    return Connect(client_id, bool(flags & 2), keepalive, will, username, password, level, protocol)


def _subscribe(body: bytes) -> Subscribe:
    pid = _packet_id(body)
    off = 2
    filters = []
    while off < len(body):
        filt, off = _string(body, off)
        qos = body[off]
        off += 1
        if qos > 2:
            raise MqttProtocolError(f"requested QoS byte {qos:#04x}")
        filters.append((filt, qos))
    if not filters:
        raise MqttProtocolError("SUBSCRIBE without topic filters")
    return Subscribe(pid, tuple(filters))


def _unsubscribe(body: bytes) -> Unsubscribe:
    pid = _packet_id(body)
    off = 2
    filters = []
    while off < len(body):
        filt, off = _string(body, off)
        filters.append(filt)
    if not filters:
        raise MqttProtocolError("UNSUBSCRIBE without topic filters")
    return Unsubscribe(pid, tuple(filters))


# ---- encoding ------------------------------------------------------------------------------


def remaining_length(n: int) -> bytes:
    """The varint of a remaining length; ValueError (our fault) beyond the MQTT limit."""
    if n < 128:
        return bytes((n,))
    if n > MAX_REMAINING:
        raise ValueError(f"packet body of {n} bytes exceeds the MQTT limit {MAX_REMAINING}")
    out = bytearray()
    while True:
        digit = n & 0x7F
        n >>= 7
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def encode_publish(
    topic: bytes,
    payload: bytes,
    qos: int = 0,
    packet_id: int = 0,
    *,
    retain: bool = False,
    dup: bool = False,
) -> bytes:
    """A PUBLISH packet from an already UTF-8 topic: the listener's hot path."""
    first = 0x30 | (qos << 1) | retain | (dup << 3)
    if qos:
        var = len(topic).to_bytes(2, "big") + topic + packet_id.to_bytes(2, "big")
    else:
        var = len(topic).to_bytes(2, "big") + topic
    n = len(var) + len(payload)
    if n < 128:
        head = bytes((first, n))
    elif n < 16_384:  # two length bytes: most messages; the loop below showed in profiles
        head = bytes((first, (n & 0x7F) | 0x80, n >> 7))
    else:
        head = bytes((first,)) + remaining_length(n)
    return head + var + payload


def encode_ack(kind: Type, packet_id: int) -> bytes:
    """PUBACK, PUBREC, PUBREL, PUBCOMP or UNSUBACK: the per-message path of QoS 1 and 2."""
    return bytes(((kind << 4) | _FLAGS[kind], 2)) + packet_id.to_bytes(2, "big")


def _str(text: str) -> bytes:
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def _bin(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "big") + raw


def encode(packet: Packet) -> bytes:
    """Any packet as bytes (clients' packets too: tests and tools use them)."""
    if isinstance(packet, Publish):
        return encode_publish(
            packet.topic.encode(),
            packet.payload,
            packet.qos,
            packet.packet_id,
            retain=packet.retain,
            dup=packet.dup,
        )
    body: bytes
    match packet:
        case PubAck() | PubRec() | PubRel() | PubComp() | UnsubAck():
            return encode_ack(_ACK_TYPES[type(packet)], packet.packet_id)
        case Connack(session_present=sp, return_code=rc):
            kind, body = 2, bytes((int(sp), rc))
        case Subscribe(packet_id=pid, filters=filters):
            kind = 8
            body = _U16.pack(pid) + b"".join(_str(f) + bytes((q,)) for f, q in filters)
        case SubAck(packet_id=pid, return_codes=codes):
            kind, body = 9, _U16.pack(pid) + bytes(codes)
        case Unsubscribe(packet_id=pid, filters=filters):
            kind, body = 10, _U16.pack(pid) + b"".join(_str(f) for f in filters)
        case Connect():
            kind, body = 1, _encode_connect(packet)
        case PingReq():
            kind, body = 12, b""
        case PingResp():
            kind, body = 13, b""
        case Disconnect():
            kind, body = 14, b""
        case _:  # pragma: no cover - the union is exhaustive
            raise TypeError(f"not an MQTT packet: {packet!r}")
    return bytes(((kind << 4) | _FLAGS[kind],)) + remaining_length(len(body)) + body


def _encode_connect(c: Connect) -> bytes:
    flags = 2 if c.clean_session else 0
    tail = _str(c.client_id)
    if c.will is not None:
        flags |= 4 | (c.will.qos << 3) | (0x20 if c.will.retain else 0)
        tail += _str(c.will.topic) + _bin(c.will.payload)
    if c.username is not None:
        flags |= 0x80
        tail += _str(c.username)
    if c.password is not None:
        flags |= 0x40
        tail += _bin(c.password)
    return _bin(c.protocol) + bytes((c.level, flags)) + _U16.pack(c.keepalive) + tail


PINGRESP: Final = encode(PingResp())
