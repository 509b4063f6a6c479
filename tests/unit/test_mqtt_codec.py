"""MQTT 3.1.1 codec: golden bytes, bad packets as data, round trips, garbage -> only its error."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.mqtt_codec import (
    MAX_REMAINING,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    MqttProtocolError,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    encode,
    encode_publish,
    remaining_length,
)
from node.errors import CodecError


def decode_all(data: bytes) -> list[Packet]:
    return Decoder().feed(data)


# ---- golden bytes (what mosquitto_pub and paho send) ------------------------------------


def test_golden_connect_of_mosquitto_pub() -> None:
    raw = bytes.fromhex("101000044d5154540402003c000474657374")
    assert decode_all(raw) == [Connect("test", clean_session=True, keepalive=60)]
    assert encode(Connect("test", keepalive=60)) == raw


def test_golden_publish_qos1() -> None:
    raw = bytes.fromhex("320a0003612f620001686921")
    assert decode_all(raw) == [Publish("a/b", b"hi!", qos=1, packet_id=1)]
    assert encode_publish(b"a/b", b"hi!", 1, 1) == raw


def test_golden_subscribe_and_small_packets() -> None:
    raw = bytes.fromhex("82080001000361 2f2300".replace(" ", "")) + bytes.fromhex("c000e000")
    assert decode_all(raw) == [Subscribe(1, (("a/#", 0),)), PingReq(), Disconnect()]


@pytest.mark.parametrize(
    ("n", "varint"),
    [(0, "00"), (127, "7f"), (128, "8001"), (16383, "ff7f"), (16384, "808001"),
     (2097152, "80808001"), (MAX_REMAINING, "ffffff7f")],
)  # fmt: skip
def test_remaining_length_table(n: int, varint: str) -> None:
    assert remaining_length(n).hex() == varint


@pytest.mark.parametrize("size", [0, 120, 121, 122, 16_370, 16_376, 16_377, 16_378, 70_000])
def test_publish_length_bytes_at_each_boundary(size: int) -> None:
    """encode_publish writes one- and two-byte lengths itself (the hot path)."""
    raw = encode_publish(b"a/b", b"x" * size, 1, 9)  # 7 bytes of topic and packet id
    n = 7 + size
    assert raw[1 : 1 + len(remaining_length(n))] == remaining_length(n)
    assert decode_all(raw) == [Publish("a/b", b"x" * size, 1, False, False, 9)]


def test_remaining_length_beyond_limit_is_our_error() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        remaining_length(MAX_REMAINING + 1)


# ---- bad packets, kept as data (mosquitto's broker tests do the same) --------------------

BAD = [
    ("00 00", "reserved packet type 0"),
    ("f0 00", "reserved packet type 15"),
    ("c1 00", "flags"),  # PINGREQ with a flag bit
    ("80 05 00 01 00 01 61", "flags"),  # SUBSCRIBE must have flags 0010
    ("36 05 00 01 61 00 01", "QoS 3"),
    ("38 03 00 01 61", "DUP set on QoS 0"),
    ("30 03 00 01 23", "holds '+', '#'"),  # topic "#"
    ("30 02 00 00", "empty"),
    ("30 03 00 05 61", "overruns"),
    ("30 03 00 01 ff", "not valid UTF-8"),
    ("32 05 00 01 61 00 00", "packet id 0"),
    ("32 03 00 01 61", "without its packet id"),
    ("40 03 00 01 00", "2-byte packet id"),
    ("40 02 00 00", "packet id 0"),
    ("82 02 00 01", "without topic filters"),
    ("82 06 00 01 00 01 61 03", "requested QoS"),
    ("82 05 00 01 00 01 61", "truncated SUBSCRIBE"),
    ("a2 02 00 01", "without topic filters"),
    ("c0 01 00", "1-byte body"),
    ("10 0c 00 04 4d 51 54 54 04 01 00 3c 00 00", "reserved flag"),
    ("10 0c 00 04 4d 51 54 58 04 02 00 3c 00 00", "is not MQTT"),
    ("10 0c 00 04 4d 51 54 54 04 1e 00 3c 00 00", "will QoS 3"),
    ("10 0c 00 04 4d 51 54 54 04 22 00 3c 00 00", "without a will"),
    ("10 0c 00 04 4d 51 54 54 04 42 00 3c 00 00", "password without a user name"),
    ("10 0e 00 06 4d 51 49 73 64 70 03 42 00 3c 00 00", "password without a user name"),
    ("10 0d 00 04 4d 51 54 54 04 02 00 3c 00 00 ff", "after the CONNECT"),
    ("10 0d 00 04 4d 51 54 54 04 02 00 3c 00 01 00", "contains NUL"),
    ("10 06 00 04 4d 51 54 54", "truncated CONNECT"),
    ("30 ff ff ff ff 01", "longer than 4 bytes"),
]


@pytest.mark.parametrize(("hexdump", "why"), BAD, ids=[w for _, w in BAD])
def test_bad_packets_raise_protocol_error(hexdump: str, why: str) -> None:
    with pytest.raises(MqttProtocolError, match=re.escape(why)):
        decode_all(bytes.fromhex(hexdump.replace(" ", "")))


def test_oversized_packet_refused_before_it_arrives() -> None:
    dec = Decoder(max_packet=100)
    with pytest.raises(MqttProtocolError, match="exceeds the limit of 100"):
        dec.feed(b"\x30\xe8\x07")  # announces 1000 bytes


def test_protocol_error_is_a_codec_error() -> None:
    assert issubclass(MqttProtocolError, CodecError)


def test_incomplete_packets_wait_for_more() -> None:
    dec = Decoder()
    raw = encode_publish(b"t", b"x" * 300, 1, 7)
    assert dec.feed(raw[:1]) == []
    assert dec.feed(raw[1:2]) == []  # half of a two-byte remaining length
    assert dec.feed(raw[2:-1]) == []
    assert dec.pending == len(raw) - 1
    assert dec.feed(raw[-1:]) == [Publish("t", b"x" * 300, 1, False, False, 7)]
    assert dec.pending == 0


def test_level_5_connect_decodes_so_the_listener_can_refuse_it() -> None:
    c = decode_all(encode(Connect("x", level=5)))[0]
    assert isinstance(c, Connect)
    assert c.level == 5


def test_a_real_mqtt5_connect_with_properties_decodes_to_its_level() -> None:
    """Found in review: an MQTT 5 CONNECT carries properties after the keepalive, which
    the 3.1.1 parse read as the client id: 'string field overruns the packet', and the
    client was cut off with no CONNACK instead of getting 0x01."""
    props = bytes((5, 0x11)) + (300).to_bytes(4, "big")  # session expiry interval
    body = b"\x00\x04MQTT" + bytes((5, 0x02)) + (60).to_bytes(2, "big") + props
    body += b"\x00\x03dev"
    (c,) = decode_all(bytes((0x10, len(body))) + body)
    assert isinstance(c, Connect)
    assert (c.level, c.keepalive) == (5, 60)


# ---- properties -----------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=20)
topic = text.filter(lambda t: t and "+" not in t and "#" not in t)
pid = st.integers(1, 0xFFFF)
blob = st.binary(max_size=300)


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    qos = draw(st.integers(0, 2))
    return Publish(
        draw(topic),
        draw(blob),
        qos,
        draw(st.booleans()),
        draw(st.booleans()) if qos else False,
        draw(pid) if qos else 0,
    )


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    will = draw(st.none() | st.builds(Will, topic, blob, st.integers(0, 2), st.booleans()))
    username = draw(st.none() | text)
    password = draw(st.none() | blob) if username is not None else None
    return Connect(
        draw(text), draw(st.booleans()), draw(st.integers(0, 0xFFFF)), will, username,
        password, draw(st.integers(0, 255)), draw(st.sampled_from([b"MQTT", b"MQIsdp"])),
    )  # fmt: skip


packets = st.one_of(
    publishes(),
    connects(),
    st.builds(Connack, st.booleans(), st.integers(0, 255)),
    st.builds(PubAck, pid),
    st.builds(PubRec, pid),
    st.builds(PubRel, pid),
    st.builds(PubComp, pid),
    st.builds(UnsubAck, pid),
    st.builds(
        Subscribe,
        pid,
        st.lists(st.tuples(text, st.integers(0, 2)), min_size=1, max_size=4).map(tuple),
    ),
    st.builds(SubAck, pid, st.lists(st.integers(0, 255), min_size=1, max_size=4).map(tuple)),
    st.builds(Unsubscribe, pid, st.lists(text, min_size=1, max_size=4).map(tuple)),
    st.just(PingReq()),
    st.just(PingResp()),
    st.just(Disconnect()),
)


@given(st.lists(packets, max_size=6))
def test_round_trip(batch: list[Packet]) -> None:
    assert decode_all(b"".join(encode(p) for p in batch)) == batch


@given(st.lists(packets, min_size=1, max_size=6), st.data())
def test_any_split_of_the_stream_gives_the_same_packets(
    batch: list[Packet], data: st.DataObject
) -> None:
    stream = b"".join(encode(p) for p in batch)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    dec = Decoder()
    got: list[Packet] = []
    for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        got += dec.feed(stream[a:b])
    assert got == batch
    assert dec.pending == 0


@given(st.lists(packets, max_size=12), st.data())
def test_a_limited_feed_keeps_the_rest_for_the_next_call(
    batch: list[Packet], data: st.DataObject
) -> None:
    """The listener parses at most a budget of packets per step (edge/mqtt_conn.py): what
    is left over comes out, in order, from later calls that bring no new bytes."""
    stream = b"".join(encode(p) for p in batch)
    cut = data.draw(st.integers(0, len(stream)))
    dec = Decoder()
    got: list[Packet] = []
    for chunk in (stream[:cut], stream[cut:]):
        limit = data.draw(st.integers(1, 4))
        out = dec.feed(chunk, limit)
        got += out
        while dec.more:
            assert len(out) == limit
            limit = data.draw(st.integers(1, 4))
            out = dec.feed(b"", limit)
            assert len(out) <= limit
            got += out
    assert got == batch
    assert dec.pending == 0


@given(st.lists(packets, min_size=1, max_size=5), st.sampled_from([b"\x00\x00", b"\xf0\x00"]))
def test_whole_packets_before_garbage_come_out_and_the_error_after_them(
    batch: list[Packet], garbage: bytes
) -> None:
    dec = Decoder()
    assert dec.feed(b"".join(encode(p) for p in batch) + garbage) == batch
    assert isinstance(dec.error, MqttProtocolError)
    with pytest.raises(MqttProtocolError):
        dec.feed(b"")


@given(st.binary(max_size=200))
def test_garbage_raises_only_protocol_errors(data: bytes) -> None:
    with contextlib.suppress(MqttProtocolError):
        Decoder(max_packet=1000).feed(data)


@given(st.lists(packets, min_size=1, max_size=3), st.integers(0, 10_000), st.integers(0, 255))
def test_corrupted_valid_stream_raises_only_protocol_errors(
    batch: list[Packet], where: int, value: int
) -> None:
    stream = bytearray(b"".join(encode(p) for p in batch))
    stream[where % len(stream)] = value
    with contextlib.suppress(MqttProtocolError):
        Decoder().feed(bytes(stream))
