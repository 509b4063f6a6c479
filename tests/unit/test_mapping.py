"""Dialect mapping: tables for each rule, and round trips that must be lossless."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge.mapping import (
    MappingError,
    check,
    mesh_pattern_to_mqtt,
    mesh_to_nats,
    mesh_topic_to_mqtt,
    mqtt_filter_error,
    mqtt_filter_to_mesh,
    mqtt_shared,
    mqtt_topic_to_mesh,
    nats_to_mesh,
    swap_prefix,
)
from node.errors import InputError
from node.topics import matches


@pytest.mark.parametrize(
    ("filt", "patterns", "warned"),
    [
        ("a/b", ("a/b",), False),
        ("a/+/c", ("a/*/c",), False),
        ("a/#", ("a", "a/>"), True),  # MQTT a/# also matches a
        ("#", (">",), False),
        ("+", ("*",), False),
        ("+/b/#", ("*/b", "*/b/>"), True),
    ],
)
def test_mqtt_filters_into_the_mesh(filt: str, patterns: tuple[str, ...], warned: bool) -> None:
    mapped = mqtt_filter_to_mesh(filt)
    assert mapped.patterns == patterns
    assert bool(mapped.warnings) == warned


@pytest.mark.parametrize("filt", ["", "a/#/b", "a+/b", "a/b#", "a//b", "/a", "a*/b", "a/>"])
def test_unmappable_mqtt_filters_are_refused(filt: str) -> None:
    with pytest.raises(MappingError):
        mqtt_filter_to_mesh(filt)


@pytest.mark.parametrize(
    ("filt", "bad"),
    [("a/#/b", True), ("a+", True), ("a#", True), ("", True), ("a/+b", True), ("#/a", True),
     ("$share/g+/a", True), ("a/#", False), ("+/+", False), ("#", False), ("/a", False),
     ("a//b", False), ("$SYS/#", False), ("$share/g/a/#", False), ("a b/c", False)],
)  # fmt: skip
def test_what_is_no_mqtt_filter_at_all(filt: str, bad: bool) -> None:
    """Section 4.7.1's rules only: valid filters the mesh cannot take (``/a``, ``$SYS``)
    are refused by ``mqtt_subscription`` with SUBACK 0x80, not closed."""
    assert (mqtt_filter_error(filt) is not None) is bad


@pytest.mark.parametrize("topic", ["a//b", "/a", "a/", "a/+", "a/#", "a*b", "a/>", ""])
def test_unmappable_mqtt_topics_are_refused(topic: str) -> None:
    with pytest.raises(MappingError):
        mqtt_topic_to_mesh(topic)


def test_mesh_patterns_to_mqtt_warn_about_zero_levels() -> None:
    assert mesh_pattern_to_mqtt("a/*/c").patterns == ("a/+/c",)
    mapped = mesh_pattern_to_mqtt("a/>")
    assert mapped.patterns == ("a/#",)
    assert "zero-level" in mapped.warnings[0]
    assert mesh_pattern_to_mqtt(">").warnings == ()
    with pytest.raises(MappingError):
        mesh_pattern_to_mqtt("a+b/c")
    with pytest.raises(MappingError):
        mesh_topic_to_mqtt("a/#b")


@pytest.mark.parametrize(
    ("mesh", "nats"),
    [("a/b/c", "a.b.c"), ("a/*/c", "a.*.c"), ("a/>", "a.>"), (">", ">"), ("x", "x")],
)
def test_nats_subjects(mesh: str, nats: str) -> None:
    assert mesh_to_nats(mesh, pattern=True) == nats
    assert nats_to_mesh(nats, pattern=True) == mesh


@pytest.mark.parametrize("topic", ["a.b/c", "a b/c", "x/y z"])
def test_mesh_levels_nats_cannot_carry_are_refused(topic: str) -> None:
    with pytest.raises(MappingError):
        mesh_to_nats(topic)


@pytest.mark.parametrize("subject", ["a/b.c", "a..b", ".a", "a.", "a b", ""])
def test_nats_subjects_the_mesh_cannot_carry_are_refused(subject: str) -> None:
    with pytest.raises(MappingError):
        nats_to_mesh(subject)


def test_shared_subscriptions_and_prefixes() -> None:
    assert mqtt_shared("$share/workers/jobs/+") == ("workers", "jobs/+")
    assert mqtt_shared("jobs/+") == (None, "jobs/+")
    with pytest.raises(MappingError):
        mqtt_shared("$share/g")
    assert swap_prefix("site1/a/b", "site1", "") == "a/b"
    assert swap_prefix("a/b", "", "site1") == "site1/a/b"
    assert swap_prefix("site10/a", "site1", "x") is None  # whole levels only
    assert check("a/>", "mqtt").patterns == ("a/#",)


level = st.text(alphabet="abcz09_-+#.é ", min_size=1, max_size=4)
safe_level = st.text(alphabet="abcz09_-é", min_size=1, max_size=4)


@given(st.lists(safe_level, min_size=1, max_size=6))
def test_mappable_topics_round_trip(levels: list[str]) -> None:
    topic = "/".join(levels)
    assert nats_to_mesh(mesh_to_nats(topic)) == topic
    assert mqtt_topic_to_mesh(mesh_topic_to_mqtt(topic)) == topic


@given(st.lists(level, min_size=1, max_size=6))
def test_mapping_refuses_or_preserves_never_corrupts(levels: list[str]) -> None:
    topic = "/".join(levels)
    for there, back in ((mesh_to_nats, nats_to_mesh), (mesh_topic_to_mqtt, mqtt_topic_to_mesh)):
        try:
            mapped = there(topic)
        except MappingError:
            continue
        assert back(mapped) == topic


@given(
    st.lists(st.sampled_from(["a", "b", "+"]), min_size=1, max_size=4),
    st.booleans(),
    st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=5),
)
def test_mqtt_filter_semantics_survive(
    levels: list[str], hash_tail: bool, topic_levels: list[str]
) -> None:
    """Mesh patterns from an MQTT filter match exactly the topics MQTT would match."""
    filt = "/".join([*levels, "#"] if hash_tail else levels)
    topic = "/".join(topic_levels)
    patterns = mqtt_filter_to_mesh(filt).patterns
    assert any(matches(p, topic) for p in patterns) == mqtt_matches(filt, topic)


def mqtt_matches(filt: str, topic: str) -> bool:
    """A naive MQTT 3.1.1 matcher (spec 4.7), for reference."""
    f, t = filt.split("/"), topic.split("/")
    for i, lvl in enumerate(f):
        if lvl == "#":
            return True  # also zero levels: a/# matches a
        if i >= len(t) or (lvl != "+" and lvl != t[i]):
            return False
    return len(f) == len(t)


# ---- meshctl topic check: the rules that apply where the pattern is used ------------------


@pytest.mark.parametrize(
    ("pattern", "source", "to", "why"),
    [
        # What the MQTT listener answers with SUBACK 0x80, topic check said was fine:
        ("$SYS/#", "mqtt", "mesh", "the only '$' topics here are $mesh/..."),
        ("$share/g*/a", "mqtt", "mesh", "queue group 'g*' holds a wildcard"),
        ("$share/+/a", "mqtt", "mesh", "queue group '+' holds a wildcard"),
        ("$share/g x/a", "mqtt", "nats", "queue group 'g x' holds a wildcard"),
        # A bridge does not import the mesh's reserved space:
        ("_INBOX.>", "nats", "mesh", "'_INBOX' is reserved in the mesh"),
        ("$mesh.>", "nats", "mqtt", "'$mesh' is reserved in the mesh"),
        # The same dialect was echoed back unchecked:
        ("a//b", "mesh", "mesh", "empty level"),
        ("a/#/b", "mqtt", "mqtt", "'#' must be the last level"),
        # Named the intermediate dialect: "cannot map 'a/>' to mesh".
        ("a/>", "nats", "mqtt", "as a nats pattern: token 'a/>' holds '/'"),
    ],
)
def test_topic_check_refuses_what_is_refused_where_it_is_used(
    pattern: str, source: str, to: str, why: str
) -> None:
    with pytest.raises(InputError, match=re.escape(why)):
        check(pattern, to, source)


def test_topic_check_maps_through_the_mesh() -> None:
    assert check("a.*", "mqtt", "nats").patterns == ("a/+",)
    assert check("a/#", "nats", "mqtt").patterns == ("a", "a.>")
    assert check("$mesh/#", "mesh", "mqtt").patterns == ("$mesh", "$mesh/>")
    assert check("a/+", "mqtt", "mqtt").patterns == ("a/+",)
