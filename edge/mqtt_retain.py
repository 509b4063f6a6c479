"""Retained MQTT messages behind one seam, and MQTT topic-filter matching, sans-IO.

Matching (MQTT 3.1.1 §4.7): levels split on ``/``; ``+`` matches exactly one level (an
empty one too), ``#`` as the last level matches the parent and any number of levels below
(``a/#`` matches ``a``, ``a/b``, ``a/b/c``); a filter starting with a wildcard never
matches a topic starting with ``$``.

Where retained messages live is behind the ``Retained`` protocol. With the node's store
on (the default), the node keeps them (``NodeRetained``): the listener sets the record
flag F_RETAIN on a retained publish and asks for retained events in its SUB, so they are
shared with mesh clients and survive a restart. With ``store.enabled = false`` the
listener keeps them itself (``ListenerRetained``): in memory, for its own MQTT clients.
"""

from __future__ import annotations

from bisect import bisect_left, insort
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

    in_node: bool  # True: F_RETAIN on publishes, "retained" on SUBs; the node does the rest

    def count(self) -> int | None:
        """Retained topics held here (None: held by the node, see its status)."""

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """Keep ``payload`` as the topic's retained message; an empty payload clears it."""

    def matching(self, filt: str) -> list[RetainedMessage]:
        """Retained messages a new subscription to ``filt`` receives first."""


class NodeRetained:
    """The node keeps retained events: nothing to do here."""

    in_node = True

    def count(self) -> int | None:
        return None

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """The record's F_RETAIN flag tells the node."""

    def matching(self, filt: str) -> list[RetainedMessage]:
        """The node sends them in answer to the SUB."""
        return []


class ListenerRetained:
    """Retained messages in memory, bounded: past ``limit`` topics the oldest is dropped."""

    in_node = False

    def __init__(self, limit: int = MAX_RETAINED) -> None:
        self.limit = limit
        self.dropped = 0
        self._by_topic: OrderedDict[str, RetainedMessage] = OrderedDict()
        # The same topics sorted: a filter looks only under its literal prefix. Matching
        # every topic took 6-9 ms per wildcard filter at 10,000, so devices resubscribing
        # after a restart held the listener's thread for a minute.
        self._topics: list[str] = []

    def count(self) -> int | None:
        return len(self._by_topic)

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """Keep ``payload`` as the topic's retained message; an empty payload clears it."""
        old = self._by_topic.pop(topic, None)
        if not payload:
            if old is not None:
                self._unsort(topic)
            return
        self._by_topic[topic] = RetainedMessage(topic, payload, qos)
        if old is None:
            insort(self._topics, topic)
        if len(self._by_topic) > self.limit:
            gone, _ = self._by_topic.popitem(last=False)
            self._unsort(gone)
            self.dropped += 1

    def _unsort(self, topic: str) -> None:
        del self._topics[bisect_left(self._topics, topic)]

    def matching(self, filt: str) -> list[RetainedMessage]:
        """Retained messages a new subscription to ``filt`` receives first, in topic order."""
        levels = filt.split("/")
        k = next((i for i, level in enumerate(levels) if level in ("+", "#")), None)
        if k is None:
            hit = self._by_topic.get(filt)
            return [] if hit is None else [hit]
        found = []
        parent = "/".join(levels[:k])
        if k and levels[k] == "#" and parent in self._by_topic:  # a/# matches a itself
            found.append(self._by_topic[parent])
        prefix = parent + "/" if k else ""
        topics = self._topics
        i = bisect_left(topics, prefix)
        while i < len(topics) and topics[i].startswith(prefix):
            if filter_matches(filt, topics[i]):
                found.append(self._by_topic[topics[i]])
            i += 1
        return found
