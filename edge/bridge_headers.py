"""What crosses a bridge besides topic and payload, sans-IO: which headers are the mesh's
own, and how an event's headers map to NATS's and back (edge/bridges.py uses them; MQTT
v5 user properties take the same names as NATS headers).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from edge.port import BRIDGE_HEADER, PATH_HEADER, URL_HEADER
from node.codec import NO_RESPONDERS_AT, NO_RESPONDERS_FOR
from node.events import Event

# Headers of the mesh's own making, which stay in it: the bridges' marks, a request's
# inbox, "no responders" and replay marks, the MQTT listener's QoS.
MESH_ONLY: Final = frozenset(
    {
        BRIDGE_HEADER, URL_HEADER, PATH_HEADER, "reply-to", "status", NO_RESPONDERS_FOR,
        NO_RESPONDERS_AT, "log-seq", "qos",
    }
)  # fmt: skip
NATS_ONLY: Final = frozenset({"Status", "Description"})  # nats-py's inline status
_NATS_HEADER_NAME: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # as nats-py checks
_CONTROL: Final = re.compile("[\x00-\x1f\x7f-\x9f]")


def nats_headers(ev: Event) -> dict[str, str]:
    """A mesh event's headers as NATS headers: the mesh's own left out, and names NATS
    cannot carry (nats-py raises for them). A reply that reports its responder's failure
    is a NATS services API error reply."""
    headers = ev.headers
    if not headers and not ev.is_error:
        return {}  # most events: the export's hot path
    out = {
        k: v for k, v in headers.items() if k not in MESH_ONLY and _NATS_HEADER_NAME.fullmatch(k)
    }
    if ev.is_error and not ev.says_no_responders:
        out["Nats-Service-Error"] = " ".join(ev.text().split())[:1000] or "error"
        out.setdefault("Nats-Service-Error-Code", "500")
    return out


def mqtt_properties(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """A mesh event's headers as MQTT v5 user properties: the mesh's own left out, and
    any with a control character (U+0000 is not allowed in an MQTT string, and mosquitto
    closes the connection on the others: one tab in a header took the bridge down, both
    ways, for good, the spool stuck on that event; review)."""
    return [
        (k, v)
        for k, v in headers.items()
        if k not in MESH_ONLY and k and not _CONTROL.search(k) and not _CONTROL.search(v)
    ]


def from_nats(headers: dict[str, str] | None) -> dict[str, str]:
    """A NATS message's own headers for the mesh: not nats-py's inline status, nor names the
    mesh gives a meaning (a NATS ``log-seq: 77`` came in as the event's log sequence:
    review)."""
    if not headers:
        return {}
    return {k: v for k, v in headers.items() if k not in NATS_ONLY and k not in MESH_ONLY}


def request_reply(reply: str | None) -> str:
    """The inbox to answer if a NATS message is a request, else "". A reply subject in
    NATS' reserved ``$`` space is no requester's: JetStream delivers with ``$JS.ACK...``,
    and the bridge's "no responders" (an empty message) to it acknowledged the message, for
    a worker that held it unacknowledged too (exploratory test): imported as an event."""
    if not reply or reply.startswith("$"):
        return ""
    return reply


def nats_headers_size(headers: dict[str, str] | None) -> int:
    """Bytes of a NATS headers block as nats-py writes it (``NATS/1.0`` line, one
    ``Name: value`` line each, a blank line): the server counts them in max_payload."""
    if not headers:
        return 0
    return 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
