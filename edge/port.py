"""A bridge's own connection to its node: the client protocol over ``inproc://``, sans-IO.

Frames in, events out; values in, frames out. Each bridge thread owns one DEALER and
uses this to speak to the node. Imported events carry F_IMPORTED and a ``bridge`` header
naming the bridge, so that bridge never exports them back.
"""

from __future__ import annotations

import os
import time
from typing import Final

from node.codec import F_IMPORTED, HEAD_PUB, RECORD, Kind, encode_control, encode_headers
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
        self._seq += 1
        tb = topic.encode()
        hb = self._headers if imported else b""
        rec = RECORD.pack(
            len(payload),
            len(tb),
            len(hb),
            F_IMPORTED if imported else 0,
            0,
            0,
            time.time_ns(),
            self._origin + self._seq.to_bytes(8, "big"),
        )
        return rec + tb + hb + payload

    def events(self, frame: bytes) -> list[Event]:
        """Events for export in a frame from the node; control frames give none."""
        if frame[:2] != b"\x01\x21":
            return []
        try:
            return [
                ev
                for _, ev in decode_deliveries(frame, self._topics)
                if ev.headers.get(BRIDGE_HEADER) != self.name
            ]
        except CodecError:
            return []
