"""Topics, subscription patterns and the subscription trie.

Topics are levels separated by ``/``: ``plant1/line3/temp``. A level is non-empty UTF-8
without ``*``, ``>`` or control characters (C0, DEL and C1). Patterns add two wildcards,
each a whole level:

    ``*``  matches exactly one level           ``a/*/c`` matches ``a/b/c``
    ``>``  matches one or more trailing levels  ``a/>`` matches ``a/b``, ``a/b/c``, never ``a``

Valid patterns:   ``a/b/c``  ``a/*/c``  ``a/>``  ``>``  ``*/b``
Invalid patterns: ``a/>/c`` (``>`` not last)  ``a*/b`` (wildcard inside a level)  ``a//b``

Reserved topics: a first level starting with ``$`` (``$mesh/...``, the mesh's own events) or
equal to ``_INBOX`` (replies). A wildcard in the *first* level never matches them, as in MQTT,
so ``>`` is "every application event" and ``meshctl tail`` subscribes to ``$mesh/>`` explicitly.
Clients may not publish to ``$`` topics; only nodes do.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Final, Generic, TypeVar, cast

from node.errors import TopicError

MAX_TOPIC_BYTES: Final = 1024
MAX_TOPIC_LEVELS: Final = 32
INBOX_PREFIX: Final = "_INBOX"
SYSTEM_PREFIX: Final = "$mesh"

_FORBIDDEN: Final = frozenset(chr(c) for c in [*range(0x20), *range(0x7F, 0xA0)])
# The common case in one C-speed match: non-empty levels of allowed characters.
_PLAIN_TOPIC: Final = re.compile(r"[^\x00-\x1f\x7f-\x9f*>/]+(?:/[^\x00-\x1f\x7f-\x9f*>/]+)*")

S = TypeVar("S")


def _check_common(text: str, what: str) -> list[str]:
    """Checks shared by topics and patterns; returns the levels."""
    if not text:
        raise TopicError(text, f"a {what} cannot be empty")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_TOPIC_BYTES:
        raise TopicError(text, f"{size} bytes exceeds the limit of {MAX_TOPIC_BYTES} bytes")
    levels = text.split("/")
    if len(levels) > MAX_TOPIC_LEVELS:
        raise TopicError(text, f"{len(levels)} levels exceeds the limit of {MAX_TOPIC_LEVELS}")
    for i, level in enumerate(levels, 1):
        if not level:
            raise TopicError(text, f"empty level at position {i} (no leading, trailing or '//')")
        bad = _FORBIDDEN.intersection(level)
        if bad:
            raise TopicError(text, f"control character {min(bad)!r} in level {i}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise TopicError(text, "not valid UTF-8") from None
    return levels


def validate_topic(topic: str) -> list[str]:
    """Raise TopicError unless ``topic`` is a concrete topic one may deliver to; return levels."""
    if (
        _PLAIN_TOPIC.fullmatch(topic)
        and topic.count("/") < MAX_TOPIC_LEVELS
        and ((topic.isascii() and len(topic) <= MAX_TOPIC_BYTES) or _utf8(topic))
    ):
        return topic.split("/")
    levels = _check_common(topic, "topic")
    for i, level in enumerate(levels, 1):
        if "*" in level or ">" in level:
            raise TopicError(topic, f"wildcard in level {i}: a topic to publish to has none")
    return levels


def _utf8(text: str) -> bool:
    try:
        return len(text.encode("utf-8")) <= MAX_TOPIC_BYTES
    except UnicodeEncodeError:
        return False


def validate_publish_topic(topic: str) -> list[str]:
    """Like validate_topic, and refuse the reserved ``$`` space that only nodes write to."""
    levels = validate_topic(topic)
    if levels[0].startswith("$"):
        raise TopicError(topic, "topics starting with '$' are reserved for the mesh")
    return levels


def validate_pattern(pattern: str) -> list[str]:
    """Raise TopicError unless ``pattern`` is a valid subscription pattern; return levels."""
    levels = _check_common(pattern, "pattern")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level in ("*", ">"):
            if level == ">" and i != last:
                raise TopicError(pattern, "'>' must be the last level")
            continue
        if "*" in level or ">" in level:
            raise TopicError(
                pattern, f"wildcard inside level {i + 1} ({level!r}): '*' and '>' stand alone"
            )
    return levels


def is_reserved(first_level: str) -> bool:
    """True for first levels that a leading wildcard must not match."""
    return first_level.startswith("$") or first_level == INBOX_PREFIX


def inbox_node(topic: str) -> str | None:
    """The node id of a reply topic ``_INBOX/<node>/...`` (where its requester is), or None
    for any other topic."""
    parts = topic.split("/", 2)
    return parts[1] if len(parts) == 3 and parts[0] == INBOX_PREFIX else None


def matches(pattern: str, topic: str, sep: str = "/") -> bool:
    """Reference matcher for one pattern and one topic (both assumed valid). ``sep``:
    the level separator, "." for NATS subjects (same ``*`` and ``>``)."""
    p = pattern.split(sep)
    t = topic.split(sep)
    if p[0] in ("*", ">") and is_reserved(t[0]):
        return False
    for i, level in enumerate(p):
        if level == ">":
            return len(t) > i
        if i >= len(t) or (level != "*" and level != t[i]):
            return False
    return len(p) == len(t)


def literal_prefix(pattern: str) -> str | None:
    """What every topic that ``pattern`` matches starts with: its levels before the first
    wildcard, then ``/`` ("" when it starts with one); None for a pattern without
    wildcards, which matches only itself. (``>`` never matches zero levels, so ``a/>``
    matches nothing outside ``a/``.)"""
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if level in ("*", ">"):
            return "/".join(levels[:i]) + "/" if i else ""
    return None


# Shared, never mutated: most trie nodes have no children or no patterns of one kind.
# Three containers per node made 60,000 device patterns take 82 MB (39 MB now) and most
# of a second to insert (the garbage collector walking them).
_NO_CHILDREN: Final[dict[str, Any]] = {}
_NO_SUBS: Final[frozenset[Any]] = frozenset()


class _Node(Generic[S]):
    __slots__ = ("children", "subs", "tail_subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node[S]] = _NO_CHILDREN
        self.subs: set[S] | frozenset[S] = _NO_SUBS  # patterns ending exactly here
        self.tail_subs: set[S] | frozenset[S] = _NO_SUBS  # ending here with a '>' level

    def empty(self) -> bool:
        return not (self.children or self.subs or self.tail_subs)


class SubscriptionTrie(Generic[S]):
    """Maps patterns to subscribers; ``match(topic)`` returns those whose pattern matches.

    Holds no sockets and sends nothing: delivery, queue groups and limits live elsewhere.
    A subscriber may hold many patterns; ``match`` returns it once.
    """

    def __init__(self) -> None:
        self._root: _Node[S] = _Node()
        self._count = 0

    def __len__(self) -> int:
        """Number of (pattern, subscriber) pairs held."""
        return self._count

    def add(self, pattern: str, sub: S) -> bool:
        """Add ``sub`` under ``pattern``; False if it was already there."""
        levels = pattern.split("/")
        node = self._root
        tail = levels[-1] == ">"
        for level in levels[:-1] if tail else levels:
            child = node.children.get(level)
            if child is None:  # not setdefault: that builds a node for every level walked
                if node.children is _NO_CHILDREN:
                    node.children = {}
                child = node.children[level] = _Node()
            node = child
        target = node.tail_subs if tail else node.subs
        if sub in target:
            return False
        if target is _NO_SUBS:
            target = set()
            if tail:
                node.tail_subs = target
            else:
                node.subs = target
        cast("set[S]", target).add(sub)  # a real set now, not the shared empty one
        self._count += 1
        return True

    def remove(self, pattern: str, sub: S) -> bool:
        """Remove ``sub`` from ``pattern`` and prune empty nodes; False if it was not there."""
        levels = pattern.split("/")
        tail = levels[-1] == ">"
        path: list[tuple[_Node[S], str]] = []
        node = self._root
        for level in levels[:-1] if tail else levels:
            child = node.children.get(level)
            if child is None:
                return False
            path.append((node, level))
            node = child
        target = node.tail_subs if tail else node.subs
        if sub not in target:
            return False
        target.discard(sub)  # type: ignore[union-attr]  # it held sub: a real set
        self._count -= 1
        for parent, level in reversed(path):
            if not parent.children[level].empty():
                break
            del parent.children[level]
        return True

    def match(self, topic: str) -> set[S]:
        """Every subscriber with a pattern matching ``topic`` (a valid concrete topic)."""
        levels = topic.split("/")
        out: set[S] = set()
        reserved = is_reserved(levels[0])
        self._walk(self._root, levels, 0, out, reserved)
        return out

    def _walk(self, node: _Node[S], levels: list[str], i: int, out: set[S], reserved: bool) -> None:
        if i == len(levels):
            out |= node.subs
            return
        wild_ok = not (reserved and i == 0)
        if wild_ok and node.tail_subs:
            out |= node.tail_subs
        child = node.children.get(levels[i])
        if child is not None:
            self._walk(child, levels, i + 1, out, reserved)
        if wild_ok:
            star = node.children.get("*")
            if star is not None:
                self._walk(star, levels, i + 1, out, reserved)

    def patterns(self) -> Iterable[tuple[str, S]]:
        """Every (pattern, subscriber) pair, for status output and tests."""
        stack: list[tuple[_Node[S], list[str]]] = [(self._root, [])]
        while stack:
            node, prefix = stack.pop()
            for sub in node.subs:
                yield "/".join(prefix), sub
            for sub in node.tail_subs:
                yield "/".join([*prefix, ">"]), sub
            for level, child in node.children.items():
                stack.append((child, [*prefix, level]))
