"""The Event value and how it is read from and written to a record.

An event id is 16 bytes: an 8-byte origin (random per publishing session) and a u64
sequence. It is unique without coordination, orders a session's events, and gives the
mesh its (origin, sequence) duplicate window for free.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Final

from node.codec import (
    F_ERROR,
    F_REQUEST,
    F_RETAIN,
    NO_RESPONDERS_FOR,
    RECORD,
    RECORD_SIZE,
    RUN_BIT,
    RUN_HEAD,
    decode_headers,
    run_bounds,
)
from node.errors import CodecError
from node.topics import INBOX_PREFIX

_INBOX: Final = INBOX_PREFIX + "/"  # where a request's reply goes

_EMPTY: Final[Mapping[str, str]] = {}


class Event:
    """One event as a subscriber sees it. Fields are read-only by convention.

    A plain slotted class rather than a frozen dataclass: subscribers build one per event,
    and frozen dataclasses cost several times more to construct.
    """

    __slots__ = ("data", "deliveries", "flags", "headers", "raw_id", "time_ns", "topic")

    def __init__(
        self,
        topic: str,
        data: bytes,
        headers: Mapping[str, str],
        raw_id: bytes,
        time_ns: int,
        flags: int = 0,
        deliveries: int = 0,
    ) -> None:
        self.topic = topic
        self.data = data
        self.headers = headers
        self.raw_id = raw_id
        self.time_ns = time_ns
        self.flags = flags
        self.deliveries = deliveries  # from a durable queue: 1 the first time, then more

    @property
    def id(self) -> str:
        """The event id as 32 hex digits: origin then sequence."""
        return self.raw_id.hex()

    @property
    def time(self) -> float:
        """Publish time, seconds since the epoch (the publisher's clock)."""
        return self.time_ns / 1e9

    @property
    def reply_to(self) -> str | None:
        """Where a reply goes: the requester's inbox, for requests only. A plain publish
        with a ``reply-to`` header of its own made responders publish wherever it said,
        with their permissions (exploratory test: around the publisher's pub_allow)."""
        to = self.headers.get("reply-to")
        if to is None or not self.flags & F_REQUEST or not to.startswith(_INBOX):
            return None
        return to

    @property
    def says_no_responders(self) -> bool:
        """A bridge's answer that its remote side had no responder (edge/port.py), not a
        reply: an error with the status and the topic it was for (a real reply with a
        ``status: no-responders`` header of its own was taken for one: exploratory test)."""
        headers = self.headers
        return (
            bool(self.flags & F_ERROR)
            and headers.get("status") == "no-responders"
            and NO_RESPONDERS_FOR in headers
        )

    @property
    def is_request(self) -> bool:
        return bool(self.flags & F_REQUEST)

    @property
    def redelivered(self) -> bool:
        """True when a durable queue delivers this event again (it may have been seen)."""
        return self.deliveries > 1

    @property
    def retained(self) -> bool:
        """True for a stored last value delivered because the subscription is new."""
        return bool(self.flags & F_RETAIN)

    @property
    def seq(self) -> int | None:
        """The log sequence of a replayed event (resume with ``from_seq``)."""
        value = self.headers.get("log-seq")
        return int(value) if value is not None and value.isdigit() else None

    @property
    def is_error(self) -> bool:
        """True for a reply that reports the responder's failure."""
        return bool(self.flags & F_ERROR)

    def text(self) -> str:
        """Payload as UTF-8 text, with replacement characters where it is not."""
        return self.data.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"Event(topic={self.topic!r}, data={self.data[:40]!r}, id={self.id})"


def decode_event(buf: bytes, start: int, end: int) -> Event:
    """The Event in ``buf[start:end]``; CodecError if it is not a well-formed record."""
    try:
        plen, tlen, hlen, flags, _hops, count, time_ns, raw_id = RECORD.unpack_from(buf, start)
    except Exception as e:  # struct.error
        raise CodecError(f"truncated record: {e}") from None
    t0 = start + RECORD_SIZE
    h0 = t0 + tlen
    p0 = h0 + hlen
    if p0 + plen != end or end > len(buf):
        raise CodecError("record lengths do not add up")
    try:
        topic = buf[t0:h0].decode()
    except UnicodeDecodeError:
        raise CodecError("topic is not UTF-8") from None
    headers = decode_headers(buf[h0:p0]) if hlen else _EMPTY
    return Event(topic, buf[p0:end], headers, raw_id, time_ns, flags, count)


_DELIVERY: Final = struct.Struct("<I" + RECORD.format.lstrip("<"))
_TOPIC_CACHE_MAX: Final = 4096


def decode_deliveries(
    frame: bytes, topics: dict[bytes, str], bad: list[int] | None = None
) -> list[tuple[int, Event]]:
    """Every (sid, Event) of a DELIVER frame, runs too; CodecError if its framing is
    malformed.

    The subscriber's hot path: one struct unpack per event, and ``topics`` caches decoded
    topic strings across frames because a stream mostly repeats a few topics.

    A record whose headers block does not decode is left out alone and counted in
    ``bad[0]``: raised, it cost every good event of its frame (exploratory test). Nodes
    refuse such blocks from publishers now; a log written before may still hold one.
    """
    out: list[tuple[int, Event]] = []
    single = _DELIVERY.unpack_from  # a sid and a record's header: one call per event
    in_run = RECORD.unpack_from
    hdr = _DELIVERY.size
    run_bit = RUN_BIT
    n = len(frame)
    off = 2
    # In a run (codec.py): the records still to read and where it ends (``sid`` stays
    # the run's).
    left = stop = 0
    try:
        while off < n:
            if left:
                plen, tlen, hlen, flags, _hops, count, time_ns, raw_id = in_run(frame, off)
                h0 = off + RECORD_SIZE + tlen
                p0 = h0 + hlen
                end = p0 + plen
                left -= 1
                if end > stop or (not left and end != stop):
                    raise CodecError(f"record at byte {off} does not fit its run")
            else:
                sid, plen, tlen, hlen, flags, _hops, count, time_ns, raw_id = single(frame, off)
                if sid & run_bit:
                    stop, left = run_bounds(frame, off, sid)
                    sid ^= run_bit
                    off += RUN_HEAD.size
                    continue
                h0 = off + hdr + tlen
                p0 = h0 + hlen
                end = p0 + plen
                if end > n:
                    raise CodecError(f"delivery at byte {off} overruns the frame")
            tb = frame[h0 - tlen : h0]
            topic = topics.get(tb)
            if topic is None:
                topic = tb.decode()
                if len(topics) >= _TOPIC_CACHE_MAX:
                    topics.clear()
                topics[tb] = topic
            off = end
            headers: Mapping[str, str] = _EMPTY
            if hlen:
                try:
                    headers = decode_headers(frame[h0:p0])
                except CodecError:
                    if bad is not None:
                        bad[0] += 1
                    continue
            out.append((sid, Event(topic, frame[p0:end], headers, raw_id, time_ns, flags, count)))
        if left:
            raise CodecError(f"run ending at byte {stop} holds fewer records than it says")
    except struct.error as e:
        raise CodecError(f"truncated delivery: {e}") from None
    except UnicodeDecodeError:
        raise CodecError("topic is not UTF-8") from None
    return out
