"""The wire format, sans-IO: bytes in, values out; values in, bytes out.

Every ZeroMQ message between a client and a node is one frame (a ROUTER adds only the
identity envelope). A frame starts with a version byte and a kind byte:

    [version u8 = 1][kind u8][body]

Control kinds (HELLO, SUB, OK, ERR, ...) carry a small JSON object as body: they are rare,
and JSON keeps them readable and extensible. Data kinds carry packed binary *records*, many
per frame, because pyzmq pays per call, not per byte (DESIGN.md): a client batches its
publishes and a node batches its deliveries.

    PUB      body = record*              (client -> node)
    DELIVER  body = ([sid u32] record | [sid|RUN u32][count u32][len u32] record{count})*
                                         (node -> client; sid 0 = the client's inbox)

A *run* is ``count`` records for one subscription, ``len`` bytes in all, as they came in
one slice of a PUB or FWD frame: a node delivers a stream on one topic without cutting it
into records (the top bit of the sid, RUN_BIT, marks it). Only clients that say in their
HELLO that they read runs (``"runs": true``) get them, and only for subscription ids
below RUN_BIT.

A record is one event: a fixed little-endian header, then topic, headers block and payload.

    payload_len u32 | topic_len u16 | headers_len u16 | flags u8 | hops u8 | reserved u16
    | time_ns u64 | id 16 bytes (8-byte origin + u64 sequence) | topic | headers | payload

The node reads only the fixed header and the topic; headers and payload pass through as
opaque bytes. The headers block is ``([klen u8][key][vlen u16][value])*`` in UTF-8.
Every decoding failure surfaces as CodecError, here and nowhere else.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Iterator, Mapping
from enum import IntEnum
from typing import Any, Final

from node.errors import CodecError

VERSION: Final = 1


class Kind(IntEnum):
    """Frame kinds; < 0x20 control (JSON body), >= 0x20 data (binary records)."""

    HELLO = 0x01  # client -> node: {"name", "version"}
    SUB = 0x02  # client -> node: {"ref", "sid", "patterns", "group"}
    UNSUB = 0x03  # client -> node: {"ref", "sid"}
    STATUS = 0x04  # client -> node: {"ref"}
    BYE = 0x05  # client -> node: {}
    PING = 0x06  # either way: {} (with "ref" from a client: a flush, answered with OK)
    LINK = 0x07  # node -> node: {"mesh", "proto", "node": NodeState}: open a link
    STATES = 0x08  # node -> node: {"states": [NodeState...]}: flooded announcements
    BEAT = 0x09  # node -> node: {"t": sender clock}: heartbeat, answered with BEAT_ACK
    ACK = 0x0A  # client -> node: {"sid", "ids"}: queue deliveries done (no answer)
    QUEUE = 0x0B  # client -> node: {"ref", "op", ...}: durable queue administration
    ENROLL = 0x0C  # joining node -> node: {"ref", "token", "secret", "node", "name"}
    REVOKE = 0x0D  # node -> node: {"revocations": [signed revocation...]}: flooded
    WELCOME = 0x11  # node -> client: {"node_id", "name", "mesh", "client_id", "max_payload"}
    OK = 0x12  # node -> client: {"ref", ...result}
    ERR = 0x13  # node -> client: {"ref"?, "error", "code"}
    NORESP = 0x14  # node -> client: {"id"}: a request nothing in the mesh can answer
    LINK_OK = 0x15  # node -> node: {"node": NodeState}: link accepted
    LINK_REFUSE = 0x16  # node -> node: {"reason"}: link refused, the dialer logs why
    BEAT_ACK = 0x17  # node -> node: {"t"}: echo of a heartbeat, gives the round-trip time
    PACK = 0x18  # node -> client: {"ids"}: persistent events committed to disk
    PUB = 0x20
    DELIVER = 0x21
    FWD = 0x22  # node -> node: [routing header] record*


CONTROL_KINDS: Final = frozenset(k for k in Kind if k < 0x20)

# Record flags.
F_REQUEST: Final = 0x01  # the publisher waits for replies: answer "no responders" at once
F_PERSISTENT: Final = 0x02  # stored before it is acknowledged (a PACK answers the publisher)
F_RETAIN: Final = 0x04  # kept as the topic's last value; set on retained deliveries
F_IMPORTED: Final = 0x08  # entered the mesh through a bridge; never export back
F_ERROR: Final = 0x10  # a reply that reports the responder's failure
# A bridge's "no responders" reply (status header) names the request's topic in this
# header: its node passes it on only if nothing else here or in the mesh may answer.
NO_RESPONDERS_FOR: Final = "no-responders-for"
# ... and its node's id in this one: the requester's node, where such answers from other
# nodes meet, passes on the last one due (node/router.py ``_none_withheld``).
NO_RESPONDERS_AT: Final = "no-responders-at"
F_REPLICA: Final = 0x20  # node -> node: a retained value to store, never to deliver
# A live copy of a retained publish (F_RETAIN cleared, as MQTT delivers it): subscribers
# see a new event; a bridge exports it retained, as MQTT 5's Retain As Published would.
F_RETAINED_LIVE: Final = 0x40

RECORD: Final = struct.Struct("<IHHBBHQ16s")
RECORD_SIZE: Final = RECORD.size
SID: Final = struct.Struct("<I")
RUN_BIT: Final = 0x8000_0000
RUN_HEAD: Final = struct.Struct("<III")  # sid | RUN_BIT, records, bytes
MAX_HEADERS_BYTES: Final = 0xFFFF
# What a publisher's headers may take of it: the node adds its own marks on the way
# (``log-seq`` on replay, ~30 bytes; ``dead-queue`` and ``dead-deliveries`` on a dead
# letter, ~100), and a block with no room for them was replayed with no sequence, or with
# the publisher's own ``log-seq`` taken for it (review).
MAX_PUBLISH_HEADERS: Final = MAX_HEADERS_BYTES - 128
MAX_CLIENT_NAME: Final = 64  # characters of a client's name that a node keeps
MAX_CONTROL_BYTES: Final = 64 * 1024
# What a client accepts from its own node: views (status, mesh, routes) of a large node
# outgrow MAX_CONTROL_BYTES, which guards the node against its clients, not the reverse.
MAX_REPLY_BYTES: Final = 16 * 1024 * 1024
# Node states carry a node's whole interest (thousands of patterns on a busy node): the
# frames that hold them may be larger, and senders cut tables into frames of this size.
MAX_STATE_BYTES: Final = 1024 * 1024
# A STATES frame whose JSON would not fit MAX_STATE_BYTES goes zlib-compressed (patterns
# repeat: 11-15x on device topics), so one node may announce ~190,000 patterns in a frame;
# everything that fitted before stays plain JSON, which older nodes read. The
# receiver inflates at most MAX_INFLATE_RATIO times what it got, and never more than
# MAX_STATE_JSON: a 16 KB bomb of empty objects used to cost 7.5 s and 765 MB to parse
# (found in review). Only STATES, which only linked (proven) nodes may send: LINK and
# LINK_OK come before membership is checked, so they stay plain JSON within
# MAX_STATE_BYTES, and a large node leaves its interest out of them (node/mesh.py).
COMPRESS_STATES_ABOVE: Final = MAX_STATE_BYTES - 2  # the body of the largest plain frame
MAX_STATE_JSON: Final = 16 * 1024 * 1024
MAX_INFLATE_RATIO: Final = 40
STATE_KINDS: Final = frozenset((Kind.LINK, Kind.LINK_OK, Kind.STATES))
# Control bodies nest a few levels (STATES: states, a state, interest, one entry). A peer's
# deeper body could parse and then break whatever echoes or prints part of it (a BEAT_ACK,
# a ref in an OK, a str() in a log line) with RecursionError, far from this boundary.
MAX_CONTROL_DEPTH: Final = 32

HEAD_PUB: Final = bytes((VERSION, Kind.PUB))
HEAD_DELIVER: Final = bytes((VERSION, Kind.DELIVER))
HEAD_FWD: Final = bytes((VERSION, Kind.FWD))
NODE_ID_BYTES: Final = 8
MAX_TARGETS: Final = 255


def frame_kind(frame: bytes) -> Kind:
    """The kind of a frame; CodecError for an unknown version or kind."""
    if len(frame) < 2:
        raise CodecError(f"frame of {len(frame)} bytes is shorter than the 2-byte head")
    if frame[0] != VERSION:
        raise CodecError(f"unsupported protocol version {frame[0]} (this node speaks {VERSION})")
    try:
        return Kind(frame[1])
    except ValueError:
        raise CodecError(f"unknown frame kind 0x{frame[1]:02x}") from None


def encode_control(kind: Kind, body: Mapping[str, Any]) -> bytes:
    """A control frame: head plus compact JSON (zlib-compressed for a large STATES frame;
    a JSON object starts with ``{``, a zlib stream with 0x78, so the reader can tell)."""
    data = json.dumps(body, separators=(",", ":")).encode()
    if kind == Kind.STATES and len(data) > COMPRESS_STATES_ABOVE:
        data = zlib.compress(data, 1)
    return bytes((VERSION, kind)) + data


def decode_control(frame: bytes, limit: int | None = None) -> tuple[Kind, dict[str, Any]]:
    """Kind and JSON object of a control frame; CodecError for anything else. ``limit``:
    the largest frame accepted (default: by kind, as a node accepts them)."""
    kind = frame_kind(frame)
    if kind not in CONTROL_KINDS:
        raise CodecError(f"frame kind {kind.name} is not a control frame")
    if limit is None:
        limit = MAX_STATE_BYTES if kind in STATE_KINDS else MAX_CONTROL_BYTES
    if len(frame) > limit:
        raise CodecError(f"control frame of {len(frame)} bytes exceeds {limit}")
    raw = frame[2:]
    if kind == Kind.STATES and raw[:1] == b"\x78":
        raw = _inflate(raw)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CodecError(f"control frame body is not JSON: {e}") from None
    except RecursionError:
        raise CodecError("control frame body nests too deeply") from None
    if not isinstance(body, dict):
        raise CodecError("control frame body is not a JSON object")
    # Counting brackets (in C) bounds the depth, so most frames skip the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_CONTROL_DEPTH and _nests_deeper(body):
        raise CodecError(f"control frame body nests deeper than {MAX_CONTROL_DEPTH} levels")
    return kind, body


def _inflate(data: bytes) -> bytes:
    """The JSON of a compressed state frame; CodecError if it is not one zlib stream or
    would inflate beyond MAX_STATE_JSON."""
    limit = min(MAX_STATE_JSON, MAX_INFLATE_RATIO * len(data))
    z = zlib.decompressobj()
    try:
        out = z.decompress(data, limit)
    except zlib.error as e:
        raise CodecError(f"compressed state frame is corrupt: {e}") from None
    if z.unconsumed_tail:
        raise CodecError(f"compressed state frame inflates beyond {limit} bytes")
    if not z.eof or z.unused_data:
        raise CodecError("compressed state frame is truncated or has trailing bytes")
    return out


def _nests_deeper(body: object, limit: int = MAX_CONTROL_DEPTH) -> bool:
    """True if ``body`` has containers nested more than ``limit`` deep; iterative, so it
    cannot itself hit the recursion limit."""
    stack: list[tuple[Any, int]] = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        items = value.values() if isinstance(value, dict) else value
        stack.extend((v, depth + 1) for v in items if isinstance(v, dict | list))
    return False


def encode_headers(headers: Mapping[str, str], limit: int = MAX_HEADERS_BYTES) -> bytes:
    """Pack a small string map; ValueError (caller's fault) if a key or value is too long,
    or the block over ``limit`` bytes."""
    if not headers:
        return b""
    out = bytearray()
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(f"header {key!r}: names and values must be strings")
        k = key.encode()
        v = value.encode()
        if not 0 < len(k) < 256:
            raise ValueError(f"header name {key!r} must be 1..255 bytes")
        if len(v) > 0xFFFF:
            raise ValueError(f"header {key!r} value of {len(v)} bytes exceeds 65535")
        out += bytes((len(k),)) + k + len(v).to_bytes(2, "little") + v
    if len(out) > limit:
        raise ValueError(f"headers of {len(out)} bytes exceed {limit}")
    return bytes(out)


def decode_headers(block: bytes) -> dict[str, str]:
    """Unpack a headers block; CodecError if it is malformed."""
    out: dict[str, str] = {}
    off, n = 0, len(block)
    try:
        while off < n:
            klen = block[off]
            kend = off + 1 + klen
            vlen = int.from_bytes(block[kend : kend + 2], "little")
            vend = kend + 2 + vlen
            if klen == 0 or vend > n or kend + 2 > n:
                raise CodecError("truncated or empty header entry")
            out[block[off + 1 : kend].decode()] = block[kend + 2 : vend].decode()
            off = vend
    except (IndexError, UnicodeDecodeError) as e:
        raise CodecError(f"malformed headers block: {e}") from None
    return out


def headers_ok(block: bytes) -> bool:
    """Whether a headers block from a publisher decodes (its subscribers' clients decode
    it; the node otherwise passes it on untouched)."""
    try:
        decode_headers(block)
    except CodecError:
        return False
    return True


def encode_record(
    topic: bytes, payload: bytes, headers: bytes, flags: int, time_ns: int, event_id: bytes
) -> bytes:
    """One packed event record (see the module docstring)."""
    return (
        RECORD.pack(len(payload), len(topic), len(headers), flags, 0, 0, time_ns, event_id)
        + topic
        + headers
        + payload
    )


def with_flags(record: bytes, add: int = 0, remove: int = 0) -> bytes:
    """A copy of ``record`` with flags set and cleared (the one byte the node rewrites)."""
    return record[:8] + bytes(((record[8] | add) & ~remove,)) + record[9:]


def with_headers(record: bytes, extra: Mapping[str, str], drop: tuple[str, ...] = ()) -> bytes:
    """A copy of ``record`` with ``extra`` headers added (replacing same-named ones) and
    those named in ``drop`` taken out.

    The slow path only (replay, dead letters): it decodes and re-encodes the headers."""
    plen, tlen, hlen, flags, hops, r, time_ns, raw_id = RECORD.unpack_from(record)
    t0 = RECORD_SIZE + tlen
    headers = decode_headers(record[t0 : t0 + hlen]) if hlen else {}
    for name in drop:
        headers.pop(name, None)
    headers.update(extra)
    hb = encode_headers(headers)
    head = RECORD.pack(plen, tlen, len(hb), flags, hops, r, time_ns, raw_id)
    return head + record[RECORD_SIZE:t0] + hb + record[t0 + hlen :]


def split_records(body: bytes, offset: int = 2) -> Iterator[tuple[int, int]]:
    """(start, end) of each record in a PUB body; CodecError on a truncated record.

    Used where clarity beats speed; the node's hot loop inlines the same arithmetic.
    """
    n = len(body)
    while offset < n:
        if offset + RECORD_SIZE > n:
            raise CodecError(f"truncated record header at byte {offset}")
        plen, tlen, hlen = RECORD.unpack_from(body, offset)[:3]
        end = offset + RECORD_SIZE + tlen + hlen + plen
        if end > n:
            raise CodecError(
                f"record at byte {offset} claims {end - offset} bytes, has {n - offset}"
            )
        yield offset, end
        offset = end


def iter_deliveries(frame: bytes) -> Iterator[tuple[int, int, int]]:
    """(sid, start, end) of each record of a DELIVER frame, runs too; CodecError when
    truncated or when a run's count or length does not match its records."""
    n = len(frame)
    offset = 2
    while offset < n:
        if offset + 4 > n:
            raise CodecError(f"truncated delivery at byte {offset}")
        (sid,) = SID.unpack_from(frame, offset)
        stop, count = run_bounds(frame, offset, sid)
        offset += RUN_HEAD.size if sid & RUN_BIT else SID.size
        for _ in range(count):
            if offset + RECORD_SIZE > stop:
                raise CodecError(f"truncated delivery at byte {offset}")
            plen, tlen, hlen = RECORD.unpack_from(frame, offset)[:3]
            end = offset + RECORD_SIZE + tlen + hlen + plen
            if end > stop:
                raise CodecError(f"delivery at byte {offset} claims {end - offset} bytes")
            yield sid & ~RUN_BIT, offset, end
            offset = end
        if sid & RUN_BIT and offset != stop:
            raise CodecError(f"run ending at byte {stop} holds more than its records")


def run_bounds(frame: bytes, offset: int, sid: int) -> tuple[int, int]:
    """Where the delivery at ``offset`` (with this ``sid``) may end, and its records: a
    run's own end and count, or the frame's end and one; CodecError for a run that
    claims more bytes than the frame has or no records."""
    if not sid & RUN_BIT:
        return len(frame), 1
    if offset + RUN_HEAD.size > len(frame):
        raise CodecError(f"truncated run head at byte {offset}")
    _, count, length = RUN_HEAD.unpack_from(frame, offset)
    stop = offset + RUN_HEAD.size + length
    if stop > len(frame) or not count:
        raise CodecError(f"run at byte {offset} claims {length} bytes and {count} records")
    return stop, count


def encode_targets(hops: int, targets: list[tuple[bytes, tuple[str, ...]]]) -> bytes:
    """The routing header of a FWD frame, length-prefixed so a relay can use it as a cache
    key without parsing it: ``[len u16][hops u8][n u8]([node 8B][ng u8]([len u8][group])*)*``,
    the hop count, then each target node and the queue groups it serves. Every record of
    the frame shares it."""
    out = bytearray((hops, len(targets)))
    for node, groups in targets:
        out += node
        out.append(len(groups))
        for g in groups:
            gb = g.encode()
            out.append(len(gb))
            out += gb
    return len(out).to_bytes(2, "little") + bytes(out)


def decode_targets(header: bytes) -> tuple[int, list[tuple[bytes, tuple[str, ...]]]]:
    """Hops and targets of a routing header (without its length prefix); CodecError."""
    try:
        hops, count = header[0], header[1]
        off = 2
        targets: list[tuple[bytes, tuple[str, ...]]] = []
        for _ in range(count):
            node = header[off : off + NODE_ID_BYTES]
            ng = header[off + NODE_ID_BYTES]
            off += NODE_ID_BYTES + 1
            groups = []
            for _ in range(ng):
                glen = header[off]
                group = header[off + 1 : off + 1 + glen]
                if len(group) != glen:
                    raise CodecError("truncated queue group name")
                groups.append(group.decode())
                off += 1 + glen
            targets.append((node, tuple(groups)))
    except IndexError:
        raise CodecError("truncated routing header") from None
    except UnicodeDecodeError:
        raise CodecError("queue group name is not UTF-8") from None
    if off != len(header):
        raise CodecError("routing header length does not match its targets")
    return hops, targets
