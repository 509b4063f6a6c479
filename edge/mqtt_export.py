"""What the MQTT bridge keeps about its exports, sans-IO: the spool round the broker has
not answered yet, and the limits the broker announced (MQTT v5 CONNACK properties).

A broker that closes the connection on a message over its limits (a packet too large, a
retained message where it keeps none) was sent it again on every reconnect, so the
bridge went up and down each second for good (exploratory test): what the broker said
it takes is checked before sending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from node.events import Event

# paho's MQTT_ERR_* codes (paho is an optional dependency: not imported here)
SUCCESS: Final = 0
NO_CONN: Final = 4  # not connected: at QoS 1 kept, and sent after the reconnect; at 0 gone
CONN_LOST: Final = 7  # a QoS 0 message not yet written when the connection broke: gone


def queued(info: Any, qos: int) -> bool:
    """paho took the message and will send it (again after a reconnect, at QoS 1). A QoS 0
    message published with no connection is gone, and nothing marks it: a round waited
    for it for good (review)."""
    return bool(info.rc == SUCCESS or (qos and info.rc == NO_CONN))


@dataclass(slots=True)
class Round:
    """A spool round the broker has not answered in full: the cursor it moves to, whether
    more may wait, its messages not yet answered (paho's message info and the event, by
    message id), how many were sent, and which the broker refused (by message id)."""

    seq: int
    full: bool
    pending: dict[int, tuple[Any, Event]]
    sent: int
    refused: set[int] = field(default_factory=set)

    def done(self) -> list[int]:
        """The messages paho is done with, by id. Taken before the refusals are read:
        paho calls on_publish, then marks the message done, so a refusal read first
        could arrive after it and the message count as delivered (review)."""
        return [mid for mid, (info, _ev) in self.pending.items() if published(info)]

    def settle(self, done: list[int]) -> bool:
        """Drop the messages ``done`` names; True if one was lost (QoS 0, not written when
        the connection broke: paho never answers it, and the round waited for good;
        review), so the round must go again."""
        for mid in done:
            info, _ev = self.pending.pop(mid)
            if info.rc == CONN_LOST:
                return True
        return False


def published(info: Any) -> bool:
    """paho is done with a message: answered (PUBACK), or at QoS 0 written or lost. Read
    from its flag: ``is_published()`` raises for one queued while disconnected (rc
    NO_CONN), which paho still sends after the reconnect and answers. paho's
    ``on_publish`` gives only the message id, which a later message may reuse: an answer
    to a live export whose id a round's message took next counted for that message, and
    the cursor moved past five events never sent (review)."""
    return bool(info._published)


@dataclass(frozen=True, slots=True)
class Limits:
    """What a broker said it takes (MQTT v5 CONNACK properties)."""

    max_packet: int = 0  # bytes; 0: no limit said
    max_qos: int = 1
    retain: bool = True


def broker_limits(props: Any) -> Limits:
    """The limits in a CONNACK's properties (paho's Properties, or None)."""
    return Limits(
        int(getattr(props, "MaximumPacketSize", 0) or 0),
        min(1, int(getattr(props, "MaximumQoS", 1))),
        bool(getattr(props, "RetainAvailable", 1)),
    )


def publish_size(topic: str, payload: bytes, properties: list[tuple[str, str]], qos: int) -> int:
    """Bytes of an MQTT v5 PUBLISH with these user properties: what a broker's maximum
    packet size counts. Counted here: paho's ``Properties.pack()`` took 9 us an export
    (review), and paho packs them again to send."""
    props = sum(5 + len(k.encode()) + len(v.encode()) for k, v in properties)
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + _varint(props) + props + len(payload)
    return 1 + _varint(rest) + rest


def _varint(n: int) -> int:
    """Bytes of MQTT's variable byte integer for ``n``."""
    return 1 if n < 128 else 2 if n < 16_384 else 3 if n < 2_097_152 else 4
