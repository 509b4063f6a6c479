"""Large node states: a STATES frame over 1 MiB of JSON travels compressed, inflated with a bound.

A node's state carries its whole interest; a gateway with tens of thousands of device
subscriptions used to exceed the 1 MiB a receiver decodes, so the link never came up.
"""

from __future__ import annotations

import json
import zlib

import pytest

from node.codec import (
    COMPRESS_STATES_ABOVE,
    MAX_STATE_BYTES,
    MAX_STATE_JSON,
    Kind,
    decode_control,
    encode_control,
)
from node.errors import CodecError


def big_state(patterns: int) -> dict[str, object]:
    interest = [[f"plant{i % 50}/line{i % 40}/device{i}/cmd/>", None] for i in range(patterns)]
    return {"id": "0123456789abcdef", "name": "gw", "epoch": 1, "version": 1, "links": [],
            "interest": interest, "endpoints": []}  # fmt: skip


def test_a_state_of_100000_patterns_fits_one_states_frame() -> None:
    body = {"states": [big_state(100_000), big_state(10)]}
    frame = encode_control(Kind.STATES, body)
    assert len(json.dumps(body)) > 4 * MAX_STATE_BYTES
    assert len(frame) <= MAX_STATE_BYTES
    assert decode_control(frame) == (Kind.STATES, body)


@pytest.mark.parametrize("kind", [Kind.LINK, Kind.LINK_OK])
def test_handshake_frames_are_never_compressed(kind: Kind) -> None:
    """A peer decodes LINK / LINK_OK before it knows the sender is a member: they stay
    plain JSON (a large node leaves its interest out, see test_mesh_core), and a
    compressed one is refused, not inflated."""
    body = {"mesh": "m", "proto": 1, "node": big_state(5_000)}
    frame = encode_control(kind, body)
    assert frame[2:3] == b"{"
    assert decode_control(frame) == (kind, body)
    with pytest.raises(CodecError, match="not JSON"):
        decode_control(compressed(kind, json.dumps(body).encode()))


def test_small_frames_stay_plain_json() -> None:
    frame = encode_control(Kind.STATES, {"states": [big_state(10)]})
    assert frame[2:3] == b"{"
    assert len(frame) < COMPRESS_STATES_ABOVE
    other = encode_control(Kind.STATUS, {"ref": 1, "pad": "x" * 60_000})
    assert other[2:3] == b"{"  # only state kinds are ever compressed


def compressed(kind: Kind, data: bytes) -> bytes:
    return bytes((1, kind)) + zlib.compress(data, 9)


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (compressed(Kind.STATES, b"{" + b" " * (MAX_STATE_JSON + 10) + b"}"), "inflates beyond"),
        # Found in review: 16 KB that inflates to 16 MB of empty objects took 7.5 s and
        # 765 MB to parse; inflation is now held to 40x the bytes received.
        (compressed(Kind.STATES, b'{"a":[' + b"{}," * 5_333_330 + b"{}]}"), "inflates beyond"),
        (compressed(Kind.STATES, b'{"states":[]}')[:-3], "truncated"),
        (compressed(Kind.STATES, b'{"states":[]}') + b"junk", "trailing"),
        (bytes((1, Kind.STATES)) + b"\x78\x9c not zlib at all", "corrupt"),
        (compressed(Kind.STATES, b"[1, 2]"), "not a JSON object"),
        (compressed(Kind.STATES, b"\xff\xfe"), "not JSON"),
        (compressed(Kind.STATES, b'{"a":' + b"[" * 40 + b"]" * 40 + b"}"), "nests deeper"),
    ],
    ids=["bomb", "dense-bomb", "truncated", "trailing", "corrupt", "array", "binary", "deep"],
)
def test_bad_compressed_states_are_codec_errors(frame: bytes, why: str) -> None:
    assert len(frame) <= MAX_STATE_BYTES
    with pytest.raises(CodecError, match=why):
        decode_control(frame)


def test_a_compressed_body_on_a_non_state_kind_is_not_inflated() -> None:
    with pytest.raises(CodecError, match="not JSON"):
        decode_control(compressed(Kind.STATUS, b'{"ref":1}'))
