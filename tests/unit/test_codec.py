"""Wire format: golden v1 frames, corrupt frames as data, round trips, garbage -> CodecError."""

from __future__ import annotations

import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.codec import (
    CONTROL_KINDS,
    F_ERROR,
    F_REQUEST,
    HEAD_DELIVER,
    HEAD_PUB,
    MAX_CONTROL_BYTES,
    MAX_CONTROL_DEPTH,
    RECORD,
    RECORD_SIZE,
    RUN_BIT,
    RUN_HEAD,
    SID,
    VERSION,
    Kind,
    decode_control,
    decode_headers,
    encode_control,
    encode_headers,
    encode_record,
    frame_kind,
    iter_deliveries,
    split_records,
)
from node.errors import CodecError
from node.events import Event, decode_deliveries, decode_event

# Example counts come from the profile in conftest.py; the central properties get more.
PROPS = settings(deadline=None)
KEY_PROPS = settings(deadline=None, max_examples=4 * settings.default.max_examples)
DATA = Path(__file__).parent.parent / "data" / "codec"

T = 1_700_000_000_123_456_789
ID1 = bytes.fromhex("00112233445566770100000000000000")
ID2 = bytes.fromhex("00112233445566770200000000000000")
GOLDEN_HEADERS = {"content-type": "text/plain", "reply-to": "_INBOX/0123456789abcdef/c0ffee/1"}


def read(name: str) -> bytes:
    return (DATA / name).read_bytes()


def event_fields(ev: Event) -> tuple[Any, ...]:
    return (ev.topic, ev.data, dict(ev.headers), ev.raw_id, ev.time_ns, ev.flags)


# ---- the layout itself ----------------------------------------------------------------------


def test_record_layout_is_frozen() -> None:
    assert VERSION == 1
    assert RECORD.format == "<IHHBBHQ16s"
    assert RECORD_SIZE == 36
    assert SID.size == 4
    assert HEAD_PUB == b"\x01\x20"
    assert HEAD_DELIVER == b"\x01\x21"
    rec = encode_record(b"t/x", b"pay", b"\x01k\x01\x00v", 0x11, 0x0102030405060708, ID1)
    assert rec[0:4] == (3).to_bytes(4, "little")  # payload_len
    assert rec[4:6] == (3).to_bytes(2, "little")  # topic_len
    assert rec[6:8] == (5).to_bytes(2, "little")  # headers_len
    assert rec[8] == 0x11  # flags
    assert rec[9] == 0  # hops
    assert rec[10:12] == b"\0\0"  # reserved
    assert rec[12:20] == (0x0102030405060708).to_bytes(8, "little")  # time_ns
    assert rec[20:36] == ID1
    assert rec[36:] == b"t/x" + b"\x01k\x01\x00v" + b"pay"


def test_kind_numbers_are_frozen() -> None:
    """New kinds may be added; the numbers of the v1 kinds never change."""
    v1 = {
        "HELLO": 0x01,
        "SUB": 0x02,
        "UNSUB": 0x03,
        "STATUS": 0x04,
        "BYE": 0x05,
        "PING": 0x06,
        "WELCOME": 0x11,
        "OK": 0x12,
        "ERR": 0x13,
        "NORESP": 0x14,
        "PUB": 0x20,
        "DELIVER": 0x21,
    }
    assert {name: Kind[name].value for name in v1} == v1
    assert {k for k in Kind if k < 0x20} == CONTROL_KINDS


# ---- golden frames --------------------------------------------------------------------------

GOLDEN_CONTROL = [
    ("v1-hello.bin", Kind.HELLO, {"name": "golden", "version": "0.1.0"}),
    (
        "v1-sub.bin",
        Kind.SUB,
        {"ref": 1, "sid": 7, "patterns": ["plant1/*/temp", "alerts/>"], "group": "workers"},
    ),
    ("v1-unsub.bin", Kind.UNSUB, {"ref": 2, "sid": 7}),
    ("v1-status.bin", Kind.STATUS, {"ref": 3}),
    ("v1-bye.bin", Kind.BYE, {}),
    ("v1-ping.bin", Kind.PING, {"ref": 4}),
    (
        "v1-welcome.bin",
        Kind.WELCOME,
        {
            "node_id": "0123456789abcdef",
            "name": "n1",
            "mesh": "default",
            "client_id": "c0ffee",
            "max_payload": 1048576,
        },
    ),
    ("v1-ok.bin", Kind.OK, {"ref": 1, "sid": 7}),
    (
        "v1-err.bin",
        Kind.ERR,
        {"ref": 1, "error": "invalid topic 'a//b': empty level at position 2", "code": "input"},
    ),
    ("v1-noresp.bin", Kind.NORESP, {"id": ID1.hex(), "topic": "svc/echo"}),
]

# (topic, payload, headers, id, time_ns, flags) of the two records in v1-pub / v1-deliver.
GOLDEN_EVENTS = [
    ("plant1/line3/temp", b"21.5", {}, ID1, T, 0),
    ("svc/echo", b"ping", GOLDEN_HEADERS, ID2, T + 1, F_REQUEST),
]


def golden_records() -> list[bytes]:
    return [
        encode_record(t.encode(), p, encode_headers(h), f, tm, i)
        for t, p, h, i, tm, f in GOLDEN_EVENTS
    ]


@pytest.mark.parametrize(("name", "kind", "body"), GOLDEN_CONTROL)
def test_golden_control_frames(name: str, kind: Kind, body: dict[str, Any]) -> None:
    data = read(name)
    assert encode_control(kind, body) == data
    assert frame_kind(data) is kind
    assert decode_control(data) == (kind, body)


def test_golden_headers_block() -> None:
    data = read("v1-headers.bin")
    assert encode_headers(GOLDEN_HEADERS) == data
    assert decode_headers(data) == GOLDEN_HEADERS


def test_golden_pub_frame() -> None:
    data = read("v1-pub.bin")
    assert HEAD_PUB + b"".join(golden_records()) == data
    assert frame_kind(data) is Kind.PUB
    events = [decode_event(data, s, e) for s, e in split_records(data)]
    assert [event_fields(ev) for ev in events] == GOLDEN_EVENTS
    assert events[0].id == ID1.hex()
    assert events[1].is_request
    assert not events[1].is_error
    assert events[1].reply_to == GOLDEN_HEADERS["reply-to"]
    assert events[0].time == pytest.approx(T / 1e9)
    assert events[0].text() == "21.5"


def test_golden_deliver_frame() -> None:
    data = read("v1-deliver.bin")
    r1, r2 = golden_records()
    assert HEAD_DELIVER + SID.pack(7) + r1 + SID.pack(0) + r2 == data
    assert frame_kind(data) is Kind.DELIVER
    got = [(sid, event_fields(decode_event(data, s, e))) for sid, s, e in iter_deliveries(data)]
    assert got == [(7, GOLDEN_EVENTS[0]), (0, GOLDEN_EVENTS[1])]


def test_golden_deliver_frame_with_a_run() -> None:
    """Both records for subscription 7 as one run, then one for the inbox (sid 0)."""
    data = read("v1-deliver-run.bin")
    r1, r2 = golden_records()
    run = RUN_HEAD.pack(RUN_BIT | 7, 2, len(r1 + r2)) + r1 + r2
    assert HEAD_DELIVER + run + SID.pack(0) + r2 == data
    got = [(sid, event_fields(decode_event(data, s, e))) for sid, s, e in iter_deliveries(data)]
    assert got == [(7, GOLDEN_EVENTS[0]), (7, GOLDEN_EVENTS[1]), (0, GOLDEN_EVENTS[1])]
    assert [(sid, event_fields(ev)) for sid, ev in decode_deliveries(data, {})] == got


def decode_frame(data: bytes) -> object:
    """Decode a whole frame of any kind, all the way to Events, as a receiver would."""
    kind = frame_kind(data)
    if kind is Kind.PUB:
        return [decode_event(data, s, e) for s, e in split_records(data)]
    if kind is Kind.DELIVER:
        return [(sid, decode_event(data, s, e)) for sid, s, e in iter_deliveries(data)]
    return decode_control(data)


# Corrupt cases kept as data (mosquitto style): file -> a fragment of the CodecError message.
CORRUPT_FRAMES = [
    ("v1-empty.bin", "shorter than the 2-byte head"),
    ("v1-short-head.bin", "shorter than the 2-byte head"),
    ("v1-bad-version.bin", "unsupported protocol version 2"),
    ("v1-unknown-kind.bin", "unknown frame kind 0x7f"),
    ("v1-control-not-json.bin", "not JSON"),
    ("v1-control-not-object.bin", "not a JSON object"),
    ("v1-control-not-utf8.bin", "not JSON"),
    ("v1-control-data-kind.bin", "truncated delivery"),
    ("v1-truncated-header.bin", "truncated record header"),
    ("v1-length-overrun.bin", "claims"),
    ("v1-second-record-truncated.bin", "claims"),
    ("v1-deliver-truncated.bin", "truncated delivery"),
    ("v1-deliver-overrun.bin", "claims"),
    ("v1-topic-not-utf8.bin", "topic is not UTF-8"),
]
CORRUPT_HEADERS = [
    "v1-headers-truncated.bin",
    "v1-headers-empty-key.bin",
    "v1-headers-value-overrun.bin",
    "v1-headers-not-utf8.bin",
]


@pytest.mark.parametrize(("name", "why"), CORRUPT_FRAMES)
def test_corrupt_frames_raise_codec_error(name: str, why: str) -> None:
    with pytest.raises(CodecError, match=why):
        decode_frame(read(name))


@pytest.mark.parametrize("name", CORRUPT_HEADERS)
def test_corrupt_headers_raise_codec_error(name: str) -> None:
    with pytest.raises(CodecError):
        decode_headers(read(name))


def test_every_data_file_is_covered() -> None:
    golden = {n for n, _, _ in GOLDEN_CONTROL} | {
        "v1-headers.bin",
        "v1-pub.bin",
        "v1-deliver.bin",
        "v1-deliver-run.bin",
    }
    corrupt = {n for n, _ in CORRUPT_FRAMES} | set(CORRUPT_HEADERS)
    assert not golden & corrupt
    assert {p.name for p in DATA.glob("*.bin")} == golden | corrupt


def test_data_kind_is_not_a_control_frame() -> None:
    with pytest.raises(CodecError, match="DELIVER is not a control frame"):
        decode_control(read("v1-control-data-kind.bin"))
    with pytest.raises(CodecError, match="PUB is not a control frame"):
        decode_control(read("v1-pub.bin"))


def test_second_record_truncated_yields_the_first_then_fails() -> None:
    data = read("v1-second-record-truncated.bin")
    it = split_records(data)
    s, e = next(it)
    assert decode_event(data, s, e).topic == GOLDEN_EVENTS[0][0]
    with pytest.raises(CodecError):
        next(it)


# ---- small tables -----------------------------------------------------------------------------


def test_empty_bodies() -> None:
    assert encode_headers({}) == b""
    assert decode_headers(b"") == {}
    assert list(split_records(HEAD_PUB)) == []
    assert list(iter_deliveries(HEAD_DELIVER)) == []


def test_event_text_replaces_invalid_utf8() -> None:
    ev = Event("t", b"ok \xff", {}, bytes(16), 1_500_000_000, 0)
    assert ev.text() == "ok \ufffd"
    assert ev.time == 1.5
    assert ev.id == "00" * 16


def test_event_without_headers_has_empty_mapping() -> None:
    rec = encode_record(b"a", b"", b"", F_ERROR, 0, bytes(16))
    ev = decode_event(rec, 0, len(rec))
    assert dict(ev.headers) == {}
    assert ev.reply_to is None
    assert ev.is_error
    assert not ev.is_request
    assert "topic='a'" in repr(ev)


@pytest.mark.parametrize(
    ("headers", "why"),
    [
        ({"": "v"}, "1..255 bytes"),
        ({"k" * 256: "v"}, "1..255 bytes"),
        ({"é" * 128: "v"}, "1..255 bytes"),
        ({"k": "v" * 0x10000}, "exceeds 65535"),
        ({f"k{i}": "v" * 0x4000 for i in range(4)}, "exceed 65535"),
    ],
)
def test_encode_headers_refuses_oversize(headers: dict[str, str], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        encode_headers(headers)


def test_encode_headers_limits_are_inclusive() -> None:
    block = encode_headers({"k" * 255: "v" * 1000})
    assert decode_headers(block) == {"k" * 255: "v" * 1000}


def test_decode_control_size_limit() -> None:
    body = {"pad": "x" * (MAX_CONTROL_BYTES - 20)}
    frame = encode_control(Kind.PING, body)
    assert len(frame) <= MAX_CONTROL_BYTES
    assert decode_control(frame) == (Kind.PING, body)
    big = encode_control(Kind.PING, {"pad": "x" * MAX_CONTROL_BYTES})
    with pytest.raises(CodecError, match=f"exceeds {MAX_CONTROL_BYTES}"):
        decode_control(big)


@pytest.mark.parametrize("body", [b"[" * 5000, b'{"a":' * 5000], ids=["array", "object"])
def test_deeply_nested_control_body_is_a_codec_error(body: bytes) -> None:
    with pytest.raises(CodecError):
        decode_control(bytes((VERSION, Kind.PING)) + body)


def test_control_body_depth_limit() -> None:
    """Found by benchmarks/fuzz.py: a body json.loads accepts, nested just short of the
    recursion limit, broke whoever echoed part of it (BEAT_ACK, an OK's ref)."""
    at_limit = "[" * (MAX_CONTROL_DEPTH - 1) + "]" * (MAX_CONTROL_DEPTH - 1)
    assert decode_control(bytes((VERSION, Kind.PING)) + b'{"ref":' + at_limit.encode() + b"}")
    for depth in (MAX_CONTROL_DEPTH, sys.getrecursionlimit() - 10):
        deep = "[" * depth + "]" * depth
        with pytest.raises(CodecError, match="nests"):
            decode_control(bytes((VERSION, Kind.BEAT)) + b'{"t":' + deep.encode() + b"}")
    wide = {"states": [[[1]]] * 1000}  # many brackets, little depth: accepted
    assert decode_control(encode_control(Kind.STATES, wide)) == (Kind.STATES, wide)


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 35), (0, 36), (0, 38), (1, 37), (36, 36), (40, 40), (41, 41), (0, 100), (37, 0)],
)
def test_decode_event_bounds(start: int, end: int) -> None:
    rec = encode_record(b"a", b"", b"", 0, 0, bytes(16)) + b"\0" * 4
    assert event_fields(decode_event(rec, 0, 37)) == ("a", b"", {}, bytes(16), 0, 0)
    with pytest.raises(CodecError):
        decode_event(rec, start, end)


# ---- round-trip properties ---------------------------------------------------------------

header_key = st.text(min_size=1, max_size=12)
header_map = st.dictionaries(header_key, st.text(max_size=24), max_size=4)
topic_bytes = st.text(max_size=24).map(str.encode)
flags_st = st.integers(0, 255)
time_st = st.integers(0, 2**64 - 1)
id_st = st.binary(min_size=16, max_size=16)
# (topic, payload, headers, flags, time_ns, id) as given to encode_record.
EventT = tuple[bytes, bytes, dict[str, str], int, int, bytes]
event_st = st.tuples(topic_bytes, st.binary(max_size=64), header_map, flags_st, time_st, id_st)


def record_of(ev: EventT) -> bytes:
    topic, payload, headers, flags, time_ns, event_id = ev
    return encode_record(topic, payload, encode_headers(headers), flags, time_ns, event_id)


def expected(ev: EventT) -> tuple[Any, ...]:
    topic, payload, headers, flags, time_ns, event_id = ev
    return (topic.decode(), payload, headers, event_id, time_ns, flags)


@PROPS
@given(header_map)
def test_headers_round_trip(headers: dict[str, str]) -> None:
    block = encode_headers(headers)
    assert decode_headers(block) == headers
    assert list(decode_headers(block)) == list(headers)  # order kept


@KEY_PROPS
@given(ev=event_st, prefix=st.binary(max_size=8), suffix=st.binary(max_size=8))
def test_record_round_trip(ev: EventT, prefix: bytes, suffix: bytes) -> None:
    rec = record_of(ev)
    assert len(rec) == RECORD_SIZE + len(ev[0]) + len(encode_headers(ev[2])) + len(ev[1])
    buf = prefix + rec + suffix
    got = decode_event(buf, len(prefix), len(prefix) + len(rec))
    assert event_fields(got) == expected(ev)
    assert got.id == ev[5].hex()
    assert got.is_request is bool(ev[3] & F_REQUEST)


@PROPS
@given(st.lists(st.tuples(st.integers(0, RUN_BIT - 1), event_st), max_size=3))
def test_pub_and_deliver_frames_round_trip(items: list[tuple[int, EventT]]) -> None:
    pub = HEAD_PUB + b"".join(record_of(ev) for _, ev in items)
    assert frame_kind(pub) is Kind.PUB
    got = [event_fields(decode_event(pub, s, e)) for s, e in split_records(pub)]
    assert got == [expected(ev) for _, ev in items]

    deliver = HEAD_DELIVER + b"".join(SID.pack(sid) + record_of(ev) for sid, ev in items)
    assert frame_kind(deliver) is Kind.DELIVER
    got2 = [
        (sid, event_fields(decode_event(deliver, s, e))) for sid, s, e in iter_deliveries(deliver)
    ]
    assert got2 == [(sid, expected(ev)) for sid, ev in items]


# A DELIVER body as (sid, events, as a run or one by one) pieces.
Pieces = list[tuple[int, list[EventT], bool]]
pieces_st = st.lists(
    st.tuples(
        st.integers(0, RUN_BIT - 1), st.lists(event_st, min_size=1, max_size=4), st.booleans()
    ),
    max_size=4,
)


def deliver_frame(pieces: Pieces) -> bytes:
    out = [HEAD_DELIVER]
    for sid, events, as_run in pieces:
        records = [record_of(ev) for ev in events]
        if as_run:
            body = b"".join(records)
            out.append(RUN_HEAD.pack(sid | RUN_BIT, len(records), len(body)) + body)
        else:
            out.extend(SID.pack(sid) + rec for rec in records)
    return b"".join(out)


@KEY_PROPS
@given(pieces_st)
def test_runs_and_single_deliveries_read_alike(pieces: Pieces) -> None:
    """A run reads as its records one by one, each with the run's sid, in both readers
    (the codec's and the subscriber's hot path)."""
    frame = deliver_frame(pieces)
    want = [(sid, expected(ev)) for sid, events, _ in pieces for ev in events]
    got = [(sid, event_fields(decode_event(frame, s, e))) for sid, s, e in iter_deliveries(frame)]
    assert got == want
    fast = [(sid, event_fields(ev)) for sid, ev in decode_deliveries(frame, {})]
    assert fast == want


def _bad_runs() -> list[bytes]:
    rec = encode_record(b"a/b", b"xy", b"", 0, T, ID1)
    two = rec + rec
    head = RUN_HEAD.pack
    return [
        HEAD_DELIVER + head(RUN_BIT | 1, 3, len(two)) + two,  # says 3, holds 2
        HEAD_DELIVER + head(RUN_BIT | 1, 1, len(two)) + two,  # says 1, holds 2
        HEAD_DELIVER + head(RUN_BIT | 1, 2, len(two) + 1) + two,  # longer than the frame
        HEAD_DELIVER + head(RUN_BIT | 1, 2, len(two) - 1) + two,  # a record overruns it
        HEAD_DELIVER + head(RUN_BIT | 1, 0, 0),  # no records
        HEAD_DELIVER + head(RUN_BIT | 1, 2, len(two))[:10],  # a cut head
    ]


@pytest.mark.parametrize("frame", _bad_runs())
def test_a_run_whose_head_does_not_match_its_records_is_refused(frame: bytes) -> None:
    with pytest.raises(CodecError):
        list(iter_deliveries(frame))
    with pytest.raises(CodecError):
        decode_deliveries(frame, {})


json_scalar = st.none() | st.booleans() | st.integers() | st.text(max_size=10)
json_value = (
    json_scalar
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.lists(json_scalar, max_size=3)
    | st.dictionaries(st.text(max_size=5), json_scalar, max_size=2)
)


@PROPS
@given(
    kind=st.sampled_from(sorted(CONTROL_KINDS)),
    body=st.dictionaries(st.text(max_size=8), json_value, max_size=4),
)
def test_control_round_trip(kind: Kind, body: dict[str, Any]) -> None:
    assert decode_control(encode_control(kind, body)) == (kind, body)


# ---- garbage in: only CodecError out ---------------------------------------------------------

any_head = st.builds(
    lambda k, b: bytes((VERSION, k)) + b, st.integers(0, 255), st.binary(max_size=80)
)
garbage = st.binary(max_size=80) | any_head


small_record = st.builds(
    encode_record,
    st.sampled_from([b"a", b"a/b", "é/€".encode(), b"", b"\xff"]),
    st.binary(max_size=12),
    st.sampled_from([b"", encode_headers({"k": "v"}), encode_headers(GOLDEN_HEADERS)]),
    st.integers(0, 255),
    st.integers(0, 2**64 - 1),
    st.just(ID1),
)


@st.composite
def mangled_frames(draw: st.DrawFn, head: bytes) -> bytes:
    """A valid data frame, then truncated, extended and with a few bytes overwritten."""
    records = draw(st.lists(small_record, min_size=1, max_size=3))
    if head == HEAD_DELIVER:
        records = [SID.pack(0) + rec for rec in records]
    buf = bytearray(head + b"".join(records))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(2, len(buf) - 1))
        buf[pos] = draw(st.integers(0, 255))
    cut = draw(st.integers(2, len(buf)))
    return bytes(buf[:cut]) + draw(st.binary(max_size=8))


json_ish = st.text(alphabet='{}[]":,1a \\', max_size=30).map(lambda s: b"\x01\x01" + s.encode())
header_ish = st.lists(st.binary(max_size=4), max_size=6).map(
    lambda xs: b"".join(bytes((len(x),)) + x + len(x).to_bytes(2, "little") + x for x in xs)
) | st.binary(max_size=30).map(lambda b: b"\x01k" + b)

# Every decoder, called the way a receiver calls it; iterators are consumed.
DECODERS: list[tuple[str, Callable[[bytes, int, int], object]]] = [
    ("frame_kind", lambda data, _s, _e: frame_kind(data)),
    ("decode_control", lambda data, _s, _e: decode_control(data)),
    ("decode_headers", lambda data, _s, _e: decode_headers(data)),
    ("split_records", lambda data, _s, _e: list(split_records(data))),
    ("iter_deliveries", lambda data, _s, _e: list(iter_deliveries(data))),
    ("decode_event", decode_event),
]


@KEY_PROPS
@given(
    data=garbage | json_ish | header_ish | mangled_frames(HEAD_PUB) | mangled_frames(HEAD_DELIVER),
    bounds=st.data(),
)
def test_every_decoder_raises_only_codec_error(data: bytes, bounds: st.DataObject) -> None:
    start = bounds.draw(st.integers(0, len(data)), label="start")
    end = bounds.draw(st.integers(0, len(data)), label="end")
    for name, decode in DECODERS:
        try:
            decode(data, start, end)
        except CodecError:
            pass
        except Exception as e:
            raise AssertionError(f"{name} raised {e!r}, not CodecError") from e


def test_struct_errors_do_not_leak_from_decode_event() -> None:
    with pytest.raises(CodecError):
        decode_event(b"\x00" * 10, 0, 10)
    with pytest.raises(CodecError):
        decode_event(b"", 0, 0)
    assert issubclass(CodecError, Exception)
    assert not issubclass(CodecError, struct.error)
