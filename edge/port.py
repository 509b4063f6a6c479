"""A bridge's own connection to its node: the client protocol over ``inproc://``, sans-IO.

Frames in, events out; values in, frames out. Each bridge thread owns one DEALER and
uses this to speak to the node. Imported events carry F_IMPORTED and a ``bridge`` header
naming the bridge, so that bridge never exports them back.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Final

from node.codec import (
    F_ERROR,
    F_IMPORTED,
    F_REQUEST,
    HEAD_PUB,
    RECORD,
    Kind,
    decode_control,
    encode_control,
    encode_headers,
)
from node.errors import CodecError
from node.events import Event, decode_deliveries

BRIDGE_HEADER: Final = "bridge"


class MeshPort:
    """Encodes a bridge's frames to its node and decodes the node's deliveries."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._origin = os.urandom(8)
        self._seq = 0
        self._topics: dict[bytes, str] = {}
        self._headers = encode_headers({BRIDGE_HEADER: name})
        self.inbox = ""  # _INBOX/<node>/<client>, known once the node has welcomed us

    def hello(self) -> bytes:
        return encode_control(Kind.HELLO, {"name": f"bridge {self.name}"})

    def subscribe(self, patterns: tuple[str, ...]) -> bytes:
        return encode_control(
            Kind.SUB, {"ref": None, "sid": 1, "patterns": list(patterns), "group": None}
        )

    def publish(self, topic: str, payload: bytes, *, imported: bool = True) -> bytes:
        """A PUB frame for one event (topic must already be a valid mesh topic)."""
        return HEAD_PUB + self.record(topic, payload, imported=imported)

    def record(self, topic: str, payload: bytes, *, imported: bool = True) -> bytes:
        """One event record; many go in one PUB frame (``HEAD_PUB`` + records)."""
        hb = self._headers if imported else b""
        return self._record(topic, payload, hb, F_IMPORTED if imported else 0)

    def _record(self, topic: str, payload: bytes, hb: bytes, flags: int) -> bytes:
        return self.raw_record(topic.encode(), payload, hb, flags)

    def raw_record(self, tb: bytes, payload: bytes, hb: bytes = b"", flags: int = 0) -> bytes:
        """One record from an encoded topic and headers block (callers that cache them)."""
        self._seq += 1
        rec = RECORD.pack(
            len(payload),
            len(tb),
            len(hb),
            flags,
            0,
            0,
            time.time_ns(),
            self._origin + self._seq.to_bytes(8, "big"),
        )
        return rec + tb + hb + payload

    def events(self, frame: bytes) -> list[Event]:
        """Events for export in a frame from the node; control frames give none."""
        return self.handle(frame).exports

    def handle(self, frame: bytes) -> Incoming:
        """Sort a frame from the node: events to export, replies to our requests (our inbox,
        sid 0), ids of our requests that nothing in the mesh can answer, and those the node
        refused (too big, a bad topic)."""
        incoming = Incoming([], [], [], [])
        try:
            if frame[:2] == b"\x01\x21":
                for sid, ev in decode_deliveries(frame, self._topics):
                    if sid == 0:
                        incoming.replies.append(ev)
                    elif ev.headers.get(BRIDGE_HEADER) != self.name:
                        incoming.exports.append(ev)
                return incoming
            kind, body = decode_control(frame)
        except CodecError:
            return incoming
        if kind == Kind.WELCOME:
            self.inbox = f"_INBOX/{body.get('node_id')}/{body.get('client_id')}"
        elif kind == Kind.NORESP:
            incoming.no_responders.append(str(body.get("id")))
        elif kind == Kind.ERR and body.get("request"):
            refusal = Refusal(str(body["request"]), str(body.get("error")), str(body.get("code")))
            incoming.refused.append(refusal)
        return incoming

    def request(self, topic: str, payload: bytes, token: str) -> tuple[str, bytes]:
        """(event id, record) of a request into the mesh whose replies come to our inbox."""
        headers = encode_headers({BRIDGE_HEADER: self.name, "reply-to": f"{self.inbox}/{token}"})
        rec = self._record(topic, payload, headers, F_IMPORTED | F_REQUEST)
        return rec[RECORD.size - 16 : RECORD.size].hex(), rec

    def reply(self, reply_to: str, payload: bytes, *, no_responders: bool = False) -> bytes:
        """A PUB frame answering a mesh request (``no_responders``: the remote had none)."""
        headers = encode_headers({"status": "no-responders"}) if no_responders else b""
        flags = F_ERROR if no_responders else 0
        return HEAD_PUB + self._record(reply_to, payload, headers, flags)


@dataclass
class Incoming:
    """What one frame from the node holds for a bridge."""

    exports: list[Event]
    replies: list[Event]
    no_responders: list[str]
    refused: list[Refusal]


@dataclass(frozen=True, slots=True)
class Refusal:
    """The node dropped one of our requests: its event id, why, and the node's code."""

    request: str
    error: str
    code: str
