"""Properties the fuzz script checks at a million inputs, here at hypothesis' small counts:
garbage is a CodecError for the decoders and a counted bad frame for the Router."""

from __future__ import annotations

import contextlib
import json
from types import ModuleType
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from node.codec import (
    VERSION,
    Kind,
    decode_control,
    decode_headers,
    decode_targets,
    iter_deliveries,
    split_records,
)
from node.errors import CodecError
from node.events import decode_deliveries

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
state_keys = ("id", "name", "epoch", "version", "links", "interest", "endpoints")


@given(
    head=st.sampled_from([b"", b"\x01", bytes((VERSION, Kind.PUB)), bytes((VERSION, Kind.FWD))]),
    body=st.binary(max_size=200),
)
def test_decoders_raise_only_codec_error(head: bytes, body: bytes) -> None:
    frame = head + body
    for decode in (
        lambda: decode_control(frame),
        lambda: decode_headers(frame),
        lambda: list(split_records(frame)),
        lambda: list(iter_deliveries(frame)),
        lambda: decode_targets(frame),
        lambda: decode_deliveries(frame, {}),
    ):
        with contextlib.suppress(CodecError):
            decode()


@given(
    kind=st.sampled_from([Kind.LINK, Kind.STATES, Kind.BEAT, Kind.BEAT_ACK, Kind.ERR]),
    ident=st.sampled_from([b"peer-ident", b"client-1", b"stranger"]),
    state=st.fixed_dictionaries({}, optional=dict.fromkeys(state_keys, json_values)),
    extra=st.dictionaries(st.sampled_from(["t", "ref", "mesh", "proto", "reason"]), json_values),
)
def test_hostile_link_bodies_are_never_internal_errors(
    fuzz_script: ModuleType,
    kind: Kind,
    ident: bytes,
    state: dict[str, Any],
    extra: dict[str, Any],
) -> None:
    """On the fuzz script's router: a client, an inbound and a dialed link."""
    harness = fuzz_script.Harness()  # closed: each example's store dir stayed in /tmp
    try:
        r = harness.router
        body = {"mesh": fuzz_script.MESH, "proto": 1, "node": state, "states": [state], **extra}
        frame = bytes((VERSION, kind)) + json.dumps(body).encode()
        r.handle(ident, frame, 1.0)
        link_ok = bytes((VERSION, Kind.LINK_OK)) + frame[2:]
        r.handle_dialed(fuzz_script.SPARE_URL, "static", link_ok, 1.0)
        r.handle(b"client-1", bytes((VERSION, Kind.PUB)) + bytes(40), 1.0)
        list(r.take_output())
        assert r.counters.internal_errors == 0
    finally:
        harness.close()
