"""Topics across a bridge's prefixes (edge/bridges.py): what goes out, what comes in.

Found by an exploratory test of the dialects: a remote prefix longer than the local one
took a valid 32-level mesh topic over the mesh's own limits, which bind neither MQTT nor
NATS; the error escaped and ended the MQTT bridge's thread for good (and wedged a NATS
bridge's spool). Imports that a longer local prefix took over the limits were counted
"imported" and dropped by the node.
"""

from __future__ import annotations

from typing import Any

import pytest
import zmq

from edge.bridges import MqttBridge, NatsBridge, _nats_matches
from edge.mapping import mesh_to_nats, mesh_topic_to_mqtt, mqtt_topic_to_mesh
from node.bridge_config import parse_bridges
from node.events import decode_event

DEEP = "/".join(["l"] * 31)  # with "site1/" in front: 32 levels, the mesh's most


def bridge(kind: str, **cfg: Any) -> Any:
    (c,) = parse_bridges([{"kind": kind, "url": f"{kind}://h", **cfg}], "t")
    cls = MqttBridge if kind == "mqtt" else NatsBridge
    return cls(c, zmq.Context.instance(), "inproc://unused", b"b")


@pytest.mark.parametrize(
    ("kind", "remote", "to_remote", "deep"),
    [
        ("mqtt", "plant/n", mesh_topic_to_mqtt, "plant/n/" + DEEP),
        ("nats", "plant.n", mesh_to_nats, "plant.n." + DEEP.replace("/", ".")),
    ],
)
def test_exports_swap_prefixes_past_the_mesh_limits(
    kind: str, remote: str, to_remote: Any, deep: str
) -> None:
    b = bridge(kind, local_prefix="site1", remote_prefix=remote, export=["site1/>"])
    sep = "/" if kind == "mqtt" else "."
    assert b._export_topic(f"site1/{DEEP}", to_remote) == deep  # 33 levels: fine remotely
    assert b._export_topic("site1/a/b", to_remote) == f"plant{sep}n{sep}a{sep}b"
    assert b._export_topic("site1", to_remote) == remote  # the prefix itself
    assert b._export_topic("other/a", to_remote) is None  # outside the local prefix
    plain = bridge(kind, export=[">"])
    assert plain._export_topic("a/b", to_remote) == f"a{sep}b"


def test_an_export_without_a_remote_form_is_refused_not_raised() -> None:
    b = bridge("nats", local_prefix="site1", remote_prefix="plant.n", export=["site1/>"])
    assert b._export_topic("site1/a.b", mesh_to_nats) is None
    assert b._export_topic("site1/a b", mesh_to_nats) is None
    m = bridge("mqtt", export=[">"])
    assert m._export_topic("a+b/c", mesh_topic_to_mqtt) is None


def test_imports_a_longer_local_prefix_takes_over_the_limits_are_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """And logged with the topic (an exploratory test found them only counted)."""
    b = bridge("mqtt", remote_prefix="p", local_prefix="site1/area2", **{"import": ["p/#"]})
    ctx = zmq.Context.instance()
    pull, push = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    pull.bind("inproc://imports")
    push.connect("inproc://imports")
    try:
        b._take("p/" + DEEP, b"too deep")  # 31 levels after p/ + 2 of prefix: 33
        b._take("p/ok", b"fine")
        assert b._drain_imports(push, mqtt_topic_to_mesh)
        frame = pull.recv()
        assert [decode_event(frame, 2, len(frame)).topic] == ["site1/area2/ok"]
        assert b.counters["refused"] == 1
        assert b.counters["imported"] == 1
        assert f"import 'p/{DEEP}' refused: " in caplog.text
    finally:
        pull.close(0)
        push.close(0)


@pytest.mark.parametrize(
    ("pattern", "subject", "match"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),  # NATS '>' is one token or more
        ("*.b", "a.b", True),
        ("a.b", "a.c", False),
        (">", "x", True),
    ],
)
def test_nats_matching_for_overlapping_imports(pattern: str, subject: str, match: bool) -> None:
    """Which import a NATS message counts under when several match (the first)."""
    assert _nats_matches(pattern, subject) is match
