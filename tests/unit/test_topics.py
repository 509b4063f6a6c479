"""Topic and pattern grammar, the reference matcher, and the subscription trie vs a regex oracle."""

from __future__ import annotations

import functools
import itertools
import re
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.errors import InputError, TopicError
from node.topics import (
    MAX_TOPIC_BYTES,
    MAX_TOPIC_LEVELS,
    SubscriptionTrie,
    is_reserved,
    literal_prefix,
    matches,
    validate_pattern,
    validate_publish_topic,
    validate_topic,
)

# Example counts come from the profile in conftest.py; the central properties get more.
PROPS = settings(deadline=None)
KEY_PROPS = settings(deadline=None, max_examples=4 * settings.default.max_examples)

# ---- an independent oracle: pattern -> regular expression -----------------------------------


def naive_match(pattern: str, topic: str) -> bool:
    """Translate the pattern to a regex, level by level; apply the reserved rule on its own."""
    levels = pattern.split("/")
    first = topic.split("/", maxsplit=1)[0]
    if levels[0] in ("*", ">") and (first.startswith("$") or first == "_INBOX"):
        return False
    parts = []
    for level in levels:
        if level == "*":
            parts.append("[^/]+")
        elif level == ">":
            parts.append(".+")  # one or more whole levels: topic levels are never empty
        else:
            parts.append(re.escape(level))
    return re.fullmatch("/".join(parts), topic) is not None


# ---- validation tables ----------------------------------------------------------------------

VALID_TOPICS = [
    "a",
    "a/b/c",
    "plant1/line3/temp",
    "$mesh/node/up",
    "_INBOX/0123/abcd/1",
    "a b/c",
    "ü/ß/日本",
    "-",
    "a.b.c",
    "a" * MAX_TOPIC_BYTES,
    "é" * (MAX_TOPIC_BYTES // 2),
    "/".join(["a"] * MAX_TOPIC_LEVELS),
]

INVALID_TOPICS = [
    ("", "cannot be empty"),
    ("a//b", "empty level at position 2"),
    ("/a", "empty level at position 1"),
    ("a/", "empty level at position 2"),
    ("/", "empty level at position 1"),
    ("a/*", "wildcard in level 2"),
    ("a/>", "wildcard in level 2"),
    ("*", "wildcard in level 1"),
    ("a*b/c", "wildcard in level 1"),
    ("a/b>", "wildcard in level 2"),
    ("a\x00b", "control character"),
    ("a\tb", "control character"),
    ("a/b\nc", "control character"),
    ("a\x7fb", "control character"),
    ("a" * (MAX_TOPIC_BYTES + 1), f"1025 bytes exceeds the limit of {MAX_TOPIC_BYTES} bytes"),
    ("é" * 513, "1026 bytes exceeds the limit of 1024 bytes"),
    ("/".join(["a"] * (MAX_TOPIC_LEVELS + 1)), "33 levels exceeds the limit of 32"),
    ("a/\ud800", "not valid UTF-8"),
]

VALID_PATTERNS = [
    "a/b/c",
    "a/*/c",
    "a/>",
    ">",
    "*",
    "*/b",
    "*/*/>",
    "$mesh/>",
    "_INBOX/*/*/>",
    "a" * MAX_TOPIC_BYTES,
    "/".join(["*"] * MAX_TOPIC_LEVELS),
]

INVALID_PATTERNS = [
    ("", "cannot be empty"),
    ("a/>/c", "'>' must be the last level"),
    (">/a", "'>' must be the last level"),
    ("a*/b", "wildcard inside level 1"),
    ("a/b>", "wildcard inside level 2"),
    ("**", "wildcard inside level 1"),
    ("a/>>", "wildcard inside level 2"),
    ("a//b", "empty level at position 2"),
    ("a/", "empty level at position 2"),
    ("a/\x01", "control character"),
    ("a" * (MAX_TOPIC_BYTES + 1), "exceeds the limit of 1024 bytes"),
    ("/".join(["*"] * (MAX_TOPIC_LEVELS + 1)), "33 levels exceeds the limit of 32"),
]


@pytest.mark.parametrize("topic", VALID_TOPICS)
def test_valid_topics(topic: str) -> None:
    assert validate_topic(topic) == topic.split("/")


@pytest.mark.parametrize(("topic", "reason"), INVALID_TOPICS)
def test_invalid_topics_state_the_problem(topic: str, reason: str) -> None:
    with pytest.raises(TopicError) as info:
        validate_topic(topic)
    assert reason in str(info.value)
    assert reason in info.value.reason
    assert info.value.topic == topic


def test_topic_error_is_an_input_error() -> None:
    with pytest.raises(InputError):
        validate_topic("")


@pytest.mark.parametrize("topic", ["a\x85b", "a/\x9b31m"])
def test_c1_control_characters_are_refused(topic: str) -> None:
    with pytest.raises(TopicError, match="control character"):
        validate_topic(topic)


@pytest.mark.parametrize(
    ("topic", "ok"),
    [
        ("a/b", True),
        ("_INBOX/n/c/1", True),
        ("a$/b", True),
        ("x/$mesh", True),
        ("$mesh/node/up", False),
        ("$", False),
        ("$x/y", False),
    ],
)
def test_validate_publish_topic_refuses_dollar(topic: str, ok: bool) -> None:
    if ok:
        assert validate_publish_topic(topic) == topic.split("/")
    else:
        with pytest.raises(TopicError, match="reserved"):
            validate_publish_topic(topic)


def test_publish_topic_checks_the_grammar_too() -> None:
    with pytest.raises(TopicError, match="wildcard"):
        validate_publish_topic("a/*")


@pytest.mark.parametrize("pattern", VALID_PATTERNS)
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern.split("/")


@pytest.mark.parametrize(("pattern", "reason"), INVALID_PATTERNS)
def test_invalid_patterns_state_the_problem(pattern: str, reason: str) -> None:
    with pytest.raises(TopicError) as info:
        validate_pattern(pattern)
    assert reason in str(info.value)


@pytest.mark.parametrize(
    ("first", "reserved"),
    [
        ("$mesh", True),
        ("$", True),
        ("$SYS", True),
        ("_INBOX", True),
        ("_inbox", False),
        ("_INBOXES", False),
        ("INBOX", False),
        ("mesh$", False),
        ("a", False),
    ],
)
def test_is_reserved(first: str, reserved: bool) -> None:
    assert is_reserved(first) is reserved


# ---- matching tables ------------------------------------------------------------------------

MATCH = [
    ("a/b/c", "a/b/c"),
    ("a/*/c", "a/b/c"),
    ("a/*/c", "a/xyz/c"),
    ("*/b", "a/b"),
    ("*", "a"),
    ("a/>", "a/b"),
    ("a/>", "a/b/c/d"),
    (">", "x"),
    (">", "x/y/z"),
    ("*/>", "a/b"),
    ("a/*/>", "a/b/c"),
    ("$mesh/>", "$mesh/node/up"),
    ("$mesh/*/up", "$mesh/node/up"),
    ("_INBOX/>", "_INBOX/n/c"),
    ("_INBOX/*/c", "_INBOX/n/c"),
    ("x/>", "x/$mesh"),
    ("x/*", "x/_INBOX"),
]

NO_MATCH = [
    ("a/b/c", "a/b"),
    ("a/b", "a/b/c"),
    ("a/*/c", "a/b/d"),
    ("a/*/c", "a/c"),
    ("a/*", "a/b/c"),
    ("a/>", "a"),
    ("*/>", "a"),
    ("a/b/>", "a/b"),
    ("*", "a/b"),
    ("A", "a"),
    (">", "$mesh/node/up"),
    (">", "$x"),
    ("*", "$x"),
    ("*/node/up", "$mesh/node/up"),
    ("*/>", "$mesh/x"),
    (">", "_INBOX/n/c"),
    ("*/n/c", "_INBOX/n/c"),
    ("$mesh/>", "$mesh"),
]


@pytest.mark.parametrize(("pattern", "topic"), MATCH)
def test_matches(pattern: str, topic: str) -> None:
    assert matches(pattern, topic)
    assert naive_match(pattern, topic)
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    trie.add(pattern, 1)
    assert trie.match(topic) == {1}


@pytest.mark.parametrize(("pattern", "topic"), NO_MATCH)
def test_does_not_match(pattern: str, topic: str) -> None:
    assert not matches(pattern, topic)
    assert not naive_match(pattern, topic)
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    trie.add(pattern, 1)
    assert trie.match(topic) == set()


# ---- strategies over a small alphabet, so patterns and topics collide --------------------------
# Every topic and pattern of up to three levels (plus a trailing '>') over a few names, listed
# once, so one draw picks one and the reserved names ($mesh, $x, _INBOX) come up often.

LEVELS = ["a", "b", "c", "$mesh", "_INBOX", "$x"]
ALL_TOPICS = sorted(
    "/".join(levels) for n in range(1, 4) for levels in itertools.product(LEVELS, repeat=n)
)
ALL_PATTERNS = sorted(
    {
        "/".join(levels + ((">",) if tail else ())) or ">"
        for n in range(4)
        for levels in itertools.product([*LEVELS, "*"], repeat=n)
        for tail in (False, True)
    }
)
topic_st = st.sampled_from(ALL_TOPICS)
pattern_st = st.sampled_from(ALL_PATTERNS)
sub_st = st.integers(min_value=0, max_value=5)
pairs_st = st.lists(st.tuples(pattern_st, sub_st), max_size=25)


def test_the_alphabet_is_valid() -> None:
    for topic in ALL_TOPICS:
        validate_topic(topic)
    for pattern in ALL_PATTERNS:
        validate_pattern(pattern)


@functools.cache
def naive(pattern: str, topic: str) -> bool:
    """naive_match, cached: the alphabet is finite and each regex costs a compile."""
    return naive_match(pattern, topic)


def trie_of(pairs: list[tuple[str, int]]) -> SubscriptionTrie[int]:
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    for pattern, sub in pairs:
        trie.add(pattern, sub)
    return trie


def shape(trie: SubscriptionTrie[int]) -> Any:
    """The trie's structure as plain data, to compare two tries node by node."""

    def walk(node: Any) -> Any:
        return (
            frozenset(node.subs),
            frozenset(node.tail_subs),
            {level: walk(child) for level, child in node.children.items()},
        )

    return walk(trie._root)


def empty_shape() -> Any:
    return (frozenset(), frozenset(), {})


@KEY_PROPS
@given(pattern=pattern_st, topic=topic_st)
def test_reference_matcher_agrees_with_regex_oracle(pattern: str, topic: str) -> None:
    validate_pattern(pattern)
    validate_topic(topic)
    assert matches(pattern, topic) == naive(pattern, topic)


@KEY_PROPS
@given(pairs=pairs_st, topics=st.lists(topic_st, min_size=1, max_size=8))
def test_trie_agrees_with_naive_matcher(pairs: list[tuple[str, int]], topics: list[str]) -> None:
    trie = trie_of(pairs)
    assert len(trie) == len(set(pairs))
    assert set(trie.patterns()) == set(pairs)
    assert sorted(trie.patterns()) == sorted(set(pairs))  # each pair listed once
    for topic in topics + [instance(p) for p, _ in pairs]:
        assert trie.match(topic) == {s for p, s in pairs if naive(p, topic)}


@KEY_PROPS
@given(pattern=pattern_st, topic=topic_st)
def test_every_match_starts_with_the_literal_prefix(pattern: str, topic: str) -> None:
    """What lets the node look only under a prefix for retained values."""
    prefix = literal_prefix(pattern)
    for t in (topic, instance(pattern)):
        if matches(pattern, t):
            assert t == pattern if prefix is None else t.startswith(prefix)


def instance(pattern: str) -> str:
    """A topic the pattern is meant to match: '*' -> 'a', '>' -> 'b/c'."""
    return pattern.replace("*", "a").replace(">", "b/c")


@st.composite
def op_sequences(draw: st.DrawFn) -> list[tuple[bool, str, int]]:
    """Adds and removes over a few patterns and subscribers, so removes often hit."""
    pool = draw(st.lists(pattern_st, min_size=1, max_size=6, unique=True))
    op = st.tuples(st.booleans(), st.sampled_from(pool), st.integers(0, 2))
    return draw(st.lists(op, max_size=40))


@KEY_PROPS
@given(ops=op_sequences(), topics=st.lists(topic_st, min_size=1, max_size=6))
def test_trie_add_remove_sequences(ops: list[tuple[bool, str, int]], topics: list[str]) -> None:
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    model: set[tuple[str, int]] = set()
    for is_add, pattern, sub in ops:
        if is_add:
            assert trie.add(pattern, sub) is ((pattern, sub) not in model)
            model.add((pattern, sub))
        else:
            assert trie.remove(pattern, sub) is ((pattern, sub) in model)
            model.discard((pattern, sub))
        assert len(trie) == len(model)
    assert shape(trie) == shape(trie_of(sorted(model)))
    assert set(trie.patterns()) == model
    for topic in topics + [instance(p) for p, _ in model]:
        assert trie.match(topic) == {s for p, s in model if naive(p, topic)}
    for pattern, sub in sorted(model):
        assert trie.remove(pattern, sub)
    assert len(trie) == 0
    assert shape(trie) == empty_shape()
    assert list(trie.patterns()) == []


def test_remove_of_absent_pair_changes_nothing() -> None:
    trie = trie_of([("a/b", 1), ("a/>", 2)])
    before = shape(trie)
    assert not trie.remove("a/b", 2)
    assert not trie.remove("a/c", 1)
    assert not trie.remove("x/y/z", 1)
    assert not trie.remove("a/b/>", 1)
    assert len(trie) == 2
    assert shape(trie) == before


def test_subscriber_with_many_matching_patterns_is_returned_once() -> None:
    trie = trie_of([("a/b", 1), ("a/*", 1), ("a/>", 1), (">", 1), ("a/b", 2)])
    assert trie.match("a/b") == {1, 2}
    assert len(trie) == 5


# ---- properties over arbitrary text: only TopicError, and topics are patterns -----------------


@PROPS
@given(st.text(max_size=40) | st.text(alphabet="ab/*>$ \x00", max_size=12))
def test_validation_raises_only_topic_error(text: str) -> None:
    for validate in (validate_topic, validate_pattern, validate_publish_topic):
        try:
            levels = validate(text)
        except TopicError:
            continue
        assert levels == text.split("/")


@PROPS
@given(topic=st.text(alphabet="ab/$_", min_size=1, max_size=12))
def test_every_valid_topic_is_a_pattern_matching_itself(topic: str) -> None:
    try:
        validate_topic(topic)
    except TopicError:
        return
    assert validate_pattern(topic) == topic.split("/")
    assert matches(topic, topic)
    assert trie_of([(topic, 0)]).match(topic) == {0}
