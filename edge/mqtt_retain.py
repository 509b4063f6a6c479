"""Retained MQTT messages behind one seam, and MQTT topic-filter matching, sans-IO.

Matching (MQTT 3.1.1 §4.7): levels split on ``/``; ``+`` matches exactly one level (an
empty one too), ``#`` as the last level matches the parent and any number of levels below
(``a/#`` matches ``a``, ``a/b``, ``a/b/c``); a filter starting with a wildcard never
matches a topic starting with ``$``.

Retained messages live in the listener for now (``ListenerRetained``), so only MQTT
clients of this node see them, and a node restart forgets them. The node itself will keep
them (record flag F_RETAIN, SUB ``"retained": true``) with the durability work; the
listener talks to its store only through the ``Retained`` protocol, so switching is one
class.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Protocol

MAX_RETAINED: Final = 10_000


def filter_matches(filt: str, topic: str) -> bool:
    """True if MQTT filter ``filt`` matches topic name ``topic``."""
    if topic.startswith("$") and filt[:1] in ("+", "#"):
        return False
    fl = filt.split("/")
    tl = topic.split("/")
    for i, level in enumerate(fl):
        if level == "#":
            return True
        if i >= len(tl):
            return False
        if level not in ("+", tl[i]):
            return False
    return len(fl) == len(tl)


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    """The last retained message of one topic."""

    topic: str
    payload: bytes
    qos: int


class Retained(Protocol):
    """What the listener needs from a store of retained messages."""

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """Keep ``payload`` as the topic's retained message; an empty payload clears it."""

    def matching(self, filt: str) -> list[RetainedMessage]:
        """Retained messages a new subscription to ``filt`` receives first."""


class ListenerRetained:
    """Retained messages in memory, bounded: past ``limit`` topics the oldest is dropped."""

    def __init__(self, limit: int = MAX_RETAINED) -> None:
        self.limit = limit
        self.dropped = 0
        self._by_topic: OrderedDict[str, RetainedMessage] = OrderedDict()

    def __len__(self) -> int:
        return len(self._by_topic)

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """Keep ``payload`` as the topic's retained message; an empty payload clears it."""
        self._by_topic.pop(topic, None)
        if not payload:
            return
        self._by_topic[topic] = RetainedMessage(topic, payload, qos)
        if len(self._by_topic) > self.limit:
            self._by_topic.popitem(last=False)
            self.dropped += 1

    def matching(self, filt: str) -> list[RetainedMessage]:
        """Retained messages a new subscription to ``filt`` receives first."""
        if "+" not in filt and "#" not in filt:
            hit = self._by_topic.get(filt)
            return [] if hit is None else [hit]
        return [m for t, m in self._by_topic.items() if filter_matches(filt, t)]
