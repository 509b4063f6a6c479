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

    def count(self) -> int | None:
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
