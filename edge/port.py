"""A bridge's own connection to its node: the client protocol over ``inproc://``, sans-IO.

Frames in, events out; values in, frames out. Each bridge thread owns one DEALER and
uses this to speak to the node. Imported events carry F_IMPORTED and a ``bridge`` header
naming the bridge, so that bridge never exports them back.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from node.codec import (
    F_ERROR,
    F_IMPORTED,
    F_REQUEST,
    F_RETAIN,
    HEAD_PUB,
    MAX_PUBLISH_HEADERS,
    NO_RESPONDERS_AT,
    NO_RESPONDERS_FOR,
    RECORD,
    Kind,
    decode_control,
    encode_control,
    encode_headers,
)
from node.errors import CodecError
from node.events import Event, decode_deliveries

BRIDGE_HEADER: Final = "bridge"
URL_HEADER: Final = "bridge-url"  # the broker it came from: no bridge to it sends it back
# The mesh nodes whose bridges an event left through, oldest first, comma-separated: an
# MQTT v5 user property / NATS header on the way out, a mesh header on the way in. A
# bridge drops what any node of its own mesh sent out before (two gateways on one
# broker stormed: each re-exported what the other imported), and what went through
# MAX_PATH bridges (a ring through other meshes).
PATH_HEADER: Final = "meshctl-path"
MAX_PATH: Final = 8
EXPORTS: Final = 1  # the subscription id of a bridge's exports
RESYNC_SIDS: Final = 1000  # ids after it for asking the retained values (``retained``)


class MeshPort:
    """Encodes a bridge's frames to its node and decodes the node's deliveries."""

    def __init__(self, name: str, node_id: str = "", url: str = "") -> None:
        self.name = name
        self.url = url
        self._origin = os.urandom(8)
        self._seq = 0
        self._topics: dict[bytes, str] = {}
        self._marks = {BRIDGE_HEADER: name, URL_HEADER: url} if url else {BRIDGE_HEADER: name}
        self._headers = encode_headers(self._marks)
        self.inbox = ""  # _INBOX/<node>/<client>, known once the node has welcomed us
        self.node_id = node_id  # the node's id (else known once it has welcomed us)
        self.max_payload = 0  # the node's limits.max_payload, once it has welcomed us
        self._resyncs = 0

    def hello(self, *, requests: bool = True) -> bytes:
        """``requests``: False when nothing on our side can answer a request (MQTT)."""
        body: dict[str, Any] = {"name": f"bridge {self.name}", "runs": True}
        if not requests:
            body["requests"] = False
        return encode_control(Kind.HELLO, body)

    def subscribe(self, patterns: tuple[str, ...]) -> bytes:
        """The bridge's one subscription: its exports (EXPORTS)."""
        return encode_control(
            Kind.SUB, {"ref": None, "sid": EXPORTS, "patterns": list(patterns), "group": None}
        )

    def retained(self, patterns: tuple[str, ...]) -> list[bytes]:
        """Frames asking the node for its retained values matching ``patterns``, once: a
        subscription with them, ended at once. Its copies of live events are dropped
        (``handle``): the exports' subscription has those."""
        self._resyncs += 1
        sid = EXPORTS + self._resyncs % RESYNC_SIDS + 1
        body = {"ref": None, "sid": sid, "patterns": list(patterns), "group": None}
        return [
            encode_control(Kind.SUB, body | {"retained": True}),
            encode_control(Kind.UNSUB, {"ref": None, "sid": sid}),
        ]

    def publish(self, topic: str, payload: bytes, *, imported: bool = True) -> bytes:
        """A PUB frame for one event (topic must already be a valid mesh topic)."""
        return HEAD_PUB + self.record(topic, payload, imported=imported)

    def record(
        self,
        topic: str,
        payload: bytes,
        *,
        imported: bool = True,
        path: str = "",
        retain: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """One event record; many go in one PUB frame (``HEAD_PUB`` + records). ``path``:
        the nodes whose bridges it left before (PATH_HEADER); ``retain``: a retained
        message there, the topic's retained value here; ``headers``: the remote
        message's own (``with_marks``)."""
        if not imported:
            return self._record(topic, payload, b"", 0)
        if headers:
            hb = self.with_marks(headers, {PATH_HEADER: path} if path else {})
        else:
            hb = encode_headers({**self._marks, PATH_HEADER: path}) if path else self._headers
        flags = F_IMPORTED | (F_RETAIN if retain else 0)
        return self._record(topic, payload, hb, flags)

    def with_marks(self, headers: Mapping[str, str], ours: Mapping[str, str]) -> bytes:
        """A remote message's headers with the bridge's marks and ``ours`` over them
        (``remote_headers``)."""
        return remote_headers(headers, {**self._marks, **ours})

    def came_from_here(self, ev: Event) -> bool:
        """Imported by a bridge of the mesh to the same broker: this one, or another node's
        (two gateways on one broker each sent the other's imports back to it). Not by a
        bridge of the same name on another node to another broker: with the default
        names, broker X -> mesh -> broker Y carried nothing, unsaid (exploratory test)."""
        headers = ev.headers
        if not headers:
            return False
        if self.url:
            return headers.get(URL_HEADER) == self.url
        return headers.get(BRIDGE_HEADER) == self.name

    def path(self, ev: Event) -> str:
        """PATH_HEADER for ``ev`` leaving the mesh here: its path so far, and this node."""
        before = ev.headers.get(PATH_HEADER)
        return f"{before},{self.node_id}" if before else self.node_id

    def looped(self, path: str, in_mesh: Callable[[str], bool]) -> bool:
        """True for an import whose PATH_HEADER says it left this mesh before (or went
        through MAX_PATH bridges): taking it in again would send it round for ever."""
        nodes = path.split(",")
        return len(nodes) >= MAX_PATH or any(n == self.node_id or in_mesh(n) for n in nodes)

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
                    elif sid != EXPORTS and not ev.flags & F_RETAIN:
                        continue  # a live event the exports' subscription brings too
                    elif not self.came_from_here(ev):
                        incoming.exports.append(ev)
                return incoming
            kind, body = decode_control(frame)
        except CodecError:
            return incoming
        if kind == Kind.WELCOME:
            self.node_id = str(body.get("node_id"))
            self.inbox = f"_INBOX/{self.node_id}/{body.get('client_id')}"
            with contextlib.suppress(TypeError, ValueError):
                self.max_payload = int(body.get("max_payload") or 0)
        elif kind == Kind.NORESP:
            incoming.no_responders.append(str(body.get("id")))
        elif kind == Kind.ERR and body.get("request"):
            refusal = Refusal(str(body["request"]), str(body.get("error")), str(body.get("code")))
            incoming.refused.append(refusal)
        return incoming

    def request(
        self,
        topic: str,
        payload: bytes,
        token: str,
        path: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> tuple[str, bytes]:
        """(event id, record) of a request into the mesh whose replies come to our inbox."""
        ours = {"reply-to": f"{self.inbox}/{token}"}
        if path:
            ours[PATH_HEADER] = path
        hb = self.with_marks(headers or {}, ours)
        rec = self._record(topic, payload, hb, F_IMPORTED | F_REQUEST)
        return rec[RECORD.size - 16 : RECORD.size].hex(), rec

    def reply(
        self,
        reply_to: str,
        payload: bytes,
        *,
        no_responders: bool = False,
        topic: str = "",
        headers: Mapping[str, str] | None = None,
        error: bool = False,
    ) -> bytes:
        """A PUB frame answering a mesh request (``no_responders``: the remote had none for
        the request on ``topic``; the node passes that on only if nothing else may answer;
        ``headers``: the remote reply's own; ``error``: it reports the responder's failure)."""
        if no_responders:
            said = {
                "status": "no-responders", NO_RESPONDERS_FOR: topic, NO_RESPONDERS_AT: self.node_id
            }  # fmt: skip
            return HEAD_PUB + self._record(reply_to, payload, encode_headers(said), F_ERROR)
        hb = remote_headers(headers, {}) if headers else b""
        return HEAD_PUB + self._record(reply_to, payload, hb, F_ERROR if error else 0)


def remote_headers(headers: Mapping[str, str], ours: Mapping[str, str]) -> bytes:
    """A remote message's headers as a mesh headers block, with ``ours`` over them. One a
    mesh header cannot be (a name of 1-255 bytes, a value up to 65,535) is left out, the
    others kept (review: one such dropped them all); all of them if together they do not
    fit a block (MAX_PUBLISH_HEADERS). The message still comes in."""
    fit = {
        k: v for k, v in headers.items() if 0 < len(k.encode()) < 256 and len(v.encode()) < 65_536
    }
    try:
        return encode_headers({**fit, **ours}, MAX_PUBLISH_HEADERS)
    except ValueError:
        return encode_headers(ours)


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
