"""Headers across the bridges (edge/bridge_headers.py): what stays in the mesh, what NATS
can carry, and the size NATS counts against max_payload."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from edge.bridge_headers import (
    MESH_ONLY,
    from_nats,
    mqtt_properties,
    nats_headers,
    nats_headers_size,
    request_reply,
)
from node.codec import F_ERROR
from node.events import Event

NAME = st.text(alphabet="abcXYZ019-_.!~", min_size=1, max_size=12)
VALUE = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc"), max_codepoint=0x2FF))


def event(headers: dict[str, str], flags: int = 0, data: bytes = b"") -> Event:
    return Event("t", data, headers, b"\0" * 16, 0, flags=flags)


@given(st.dictionaries(NAME, VALUE.map(str.strip), max_size=6))
def test_the_size_is_what_nats_counts(headers: dict[str, str]) -> None:
    """The server counts the whole block, as nats-py writes it, against max_payload."""
    block = b"NATS/1.0\r\n"
    for k, v in headers.items():
        block += k.encode() + b": " + v.encode() + b"\r\n"
    block += b"\r\n"
    assert nats_headers_size(headers) == (len(block) if headers else 0)


def test_the_meshs_own_headers_stay_in_the_mesh_both_ways() -> None:
    own = dict.fromkeys(MESH_ONLY, "x")
    out = nats_headers(event({**own, "X-Trace": "a", "not a token": "b"}))
    assert out == {"X-Trace": "a"}
    back = from_nats({**own, "Status": "503", "Description": "d", "X-Trace": "a"})
    assert back == {"X-Trace": "a"}
    assert from_nats(None) == {}


def test_an_error_reply_is_a_nats_service_error() -> None:
    out = nats_headers(event({}, F_ERROR, b"it  broke\nbadly"))
    assert out == {"Nats-Service-Error": "it broke badly", "Nats-Service-Error-Code": "500"}
    assert nats_headers(event({}, 0, b"fine")) == {}


def test_only_a_requesters_reply_subject_is_a_request() -> None:
    assert request_reply("_INBOX.abc") == "_INBOX.abc"
    assert request_reply("$JS.ACK.s.c.1.1.1.0.0") == ""  # JetStream's ack subject
    assert request_reply(None) == request_reply("") == ""


def test_mqtt_user_properties_leave_out_control_characters() -> None:
    """One tab in a header took the MQTT bridge down, both ways, for good (review)."""
    props = mqtt_properties(
        {"X-Ok": "1", "X-Tab": "a\tb", "X-Nul": "a\0b", "a\nb": "v", "log-seq": "1"}
    )
    assert props == [("X-Ok", "1")]


def test_a_header_the_mesh_cannot_hold_leaves_the_others_in() -> None:
    """One such dropped them all (review)."""
    from edge.port import MeshPort
    from node.codec import decode_headers

    port = MeshPort("b")
    block = port.with_marks({"": "e", "X-Keep": "k", "n" * 300: "v"}, {})
    assert decode_headers(block) == {"X-Keep": "k", "bridge": "b"}
