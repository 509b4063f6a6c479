"""What the MQTT bridge keeps about its exports, sans-IO: the spool round the broker has
not answered yet, and the limits the broker announced (MQTT v5 CONNACK properties).

A broker that closes the connection on a message over its limits (a packet too large, a
retained message where it keeps none) was sent it again on every reconnect, so the
bridge went up and down each second for good (exploratory test): what the broker said
it takes is checked before sending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from node.events import Event


@dataclass(slots=True)
class Round:
    """A spool round the broker has not answered in full: the cursor it moves to, whether
    it was full (more may wait), its messages not yet answered (by paho message id),
    how many were sent and how many of those the broker refused."""

    seq: int
    full: bool
    pending: dict[int, Event]
    sent: int
    refused: int = 0


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


def publish_size(topic: str, payload: bytes, packed_props: bytes, qos: int) -> int:
    """Bytes of an MQTT v5 PUBLISH: what a broker's maximum packet size counts."""
    rest = 2 + len(topic.encode()) + (2 if qos else 0) + len(packed_props) + len(payload)
    return 1 + (1 if rest < 128 else 2 if rest < 16_384 else 3 if rest < 2_097_152 else 4) + rest
