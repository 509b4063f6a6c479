"""MQTT sessions of the listener, sans-IO: subscriptions and outgoing QoS 1 state.

A session outlives its connection when the client connected with clean_session=0: its
subscriptions stay active at the node and QoS 1 messages for it wait in a bounded queue
until it comes back, when unacknowledged ones are sent again with DUP set (MQTT 3.1.1
§4.4). QoS 0 messages for an absent client are dropped, as mosquitto does by default.
Everything is in memory; with the node's store on, the listener saves the persistent
sessions when it stops and restores them when it starts (edge/mqtt_keep.py).

Outgoing QoS 1 flow: at most ``max_inflight`` messages await PUBACK; more wait in the
queue (at most ``max_queued``; beyond that new ones are dropped and counted).

Incoming QoS 1/2 flow (the node's store on): ``incoming`` maps the client's packet id to
the mesh event (id, record) made for it until the PUBACK/PUBREC is out, so a resend with
DUP after a reconnect carries the same event id and the node's dedupe window drops it if
it was stored already. ``awaiting_rel`` holds QoS 2 ids between PUBREC and PUBREL.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Final

from edge.mqtt_codec import encode_publish
from node.topics import matches

MAX_PACKET_ID: Final = 0xFFFF
MAX_QOS_CACHE: Final = 256  # topics whose QoS a session with overlaps remembers (~40 KB)


@dataclass(slots=True)
class Subscription:
    """One MQTT subscription and the mesh subscription (sid) that serves it."""

    sid: int
    qos: int
    group: str | None
    patterns: tuple[str, ...] = ()  # its mesh patterns, for the QoS of overlapping ones


@dataclass
class Session:
    """What the listener keeps for one client id."""

    client_id: str
    clean: bool
    max_inflight: int = 100
    max_queued: int = 1000
    # Payload bytes queued, bounded as mosquitto's max_queued_bytes: bounded by count
    # alone, one absent device's session held 1,000 payloads of 1 MiB (soak test).
    max_queued_bytes: int = 16 * 1024 * 1024
    queued_bytes: int = 0
    online: bool = False
    subs: dict[str, Subscription] = field(default_factory=dict)
    # (topic, payload, retain): a retained message keeps its flag when it waits or is
    # sent again (it lost it, found by an exploratory test against mosquitto)
    inflight: dict[int, tuple[bytes, bytes, bool]] = field(default_factory=dict)
    queue: deque[tuple[bytes, bytes, bool]] = field(default_factory=deque)
    incoming: dict[int, tuple[str, bytes]] = field(default_factory=dict)
    awaiting_rel: set[int] = field(default_factory=set)
    dropped: int = 0
    owner: str | None = None  # the MQTT user name it was made for (None: anonymous)
    last: bytes = b""  # the event id of the last plain live copy: its other copies skip
    _next_id: int = 0
    _qos: dict[bytes, int] = field(default_factory=dict)  # mesh topic -> QoS (overlaps)

    def subscribe(self, filt: str, sub: Subscription) -> Subscription | None:
        """Add (or replace) the subscription to ``filt``; the one it replaced."""
        old = self.subs.pop(filt, None)
        self.subs[filt] = sub
        self._qos.clear()
        return old

    def unsubscribe(self, filt: str) -> Subscription | None:
        self._qos.clear()
        return self.subs.pop(filt, None)

    def unsubscribe_all(self) -> list[Subscription]:
        self._qos.clear()
        subs = list(self.subs.values())
        self.subs.clear()
        return subs

    def max_qos(self, topic: bytes) -> int:
        """The highest QoS of the plain subscriptions matching ``topic`` (a mesh topic):
        the QoS of the one copy a client with overlapping subscriptions gets (MQTT 3.1.1
        §3.3.5). Cached by topic until the subscriptions change."""
        qos = self._qos.get(topic)
        if qos is None:
            text = topic.decode()
            qos = max(
                (
                    s.qos
                    for s in self.subs.values()
                    if s.group is None and any(matches(p, text) for p in s.patterns)
                ),
                default=0,
            )
            if len(self._qos) >= MAX_QOS_CACHE:
                self._qos.clear()
            self._qos[topic] = qos
        return qos

    def deliver(
        self, topic: bytes, payload: bytes, qos: int, *, retain: bool = False
    ) -> bytes | None:
        """The PUBLISH to write now for one message, or None (queued or dropped).
        ``retain`` marks a retained message sent for a new subscription."""
        if qos == 0:
            if self.online:
                return encode_publish(topic, payload, retain=retain)
            self.dropped += 1
            return None
        if self.online and len(self.inflight) < self.max_inflight and not self.queue:
            return self._send(topic, payload, retain=retain)
        size = len(payload)
        if len(self.queue) >= self.max_queued or self.queued_bytes + size > self.max_queued_bytes:
            self.dropped += 1
            return None
        self.queue.append((topic, payload, retain))
        self.queued_bytes += size
        return None

    def acked(self, packet_id: int) -> list[bytes]:
        """PUBACK from the client: forget the message and send what waited for room."""
        self.inflight.pop(packet_id, None)
        return self._fill()

    def resume(self) -> list[bytes]:
        """The client is back: every unacknowledged message again (DUP), then the queue."""
        self.online = True
        out = [
            encode_publish(topic, payload, 1, pid, dup=True, retain=retain)
            for pid, (topic, payload, retain) in self.inflight.items()
        ]
        return out + self._fill()

    def _fill(self) -> list[bytes]:
        out = []
        while self.online and self.queue and len(self.inflight) < self.max_inflight:
            topic, payload, retain = self.queue.popleft()
            self.queued_bytes -= len(payload)
            out.append(self._send(topic, payload, retain=retain))
        return out

    def _send(self, topic: bytes, payload: bytes, *, retain: bool = False) -> bytes:
        pid = self._next_id
        while True:
            pid = pid % MAX_PACKET_ID + 1
            if pid not in self.inflight:
                break
        self._next_id = pid
        self.inflight[pid] = (topic, payload, retain)
        return encode_publish(topic, payload, 1, pid, retain=retain)


@dataclass(frozen=True, slots=True)
class Limits:
    """The bounds of each session (the listener's ``mqtt.*`` as configured now)."""

    max_inflight: int = 100
    max_queued: int = 1000
    max_queued_bytes: int = 16 * 1024 * 1024

    def session(self, client_id: str, clean: bool, owner: str | None = None) -> Session:
        """A new session within these bounds."""
        return Session(
            client_id,
            clean,
            max_inflight=self.max_inflight,
            max_queued=self.max_queued,
            max_queued_bytes=self.max_queued_bytes,
            owner=owner,
        )


class SessionTable:
    """Sessions by client id; at most ``max_offline`` absent persistent sessions are kept
    (the longest absent is dropped first)."""

    def __init__(self, max_offline: int = 1000, limits: Limits | None = None) -> None:
        self.max_offline = max_offline
        self.limits = limits or Limits()
        self.by_id: dict[str, Session] = {}
        self._offline: OrderedDict[str, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self.by_id)

    @property
    def offline(self) -> int:
        return len(self._offline)

    def attach(
        self, client_id: str, clean: bool, *, owner: str | None = None
    ) -> tuple[Session, bool, list[Session]]:
        """The session for a new connection: (session, session_present, sessions to
        forget). A clean connect always starts afresh and ends an old session, and so
        does another user's connect with the same client id: it must not inherit the
        subscriptions (and queued messages) the first user's rules allowed."""
        self._offline.pop(client_id, None)
        old = self.by_id.pop(client_id, None)
        ended = []
        if old is not None and (clean or old.clean or old.owner != owner):
            ended.append(old)
            old = None
        if old is not None:
            old.clean = False
            self.by_id[client_id] = old
            return old, True, ended
        session = self.limits.session(client_id, clean, owner)
        self.by_id[client_id] = session
        return session, False, ended

    def persistent(self) -> list[Session]:
        """The persistent sessions, the absent ones first (longest absent first), then
        those connected now: the order in which they would be dropped."""
        absent = [self.by_id[c] for c in self._offline]
        return absent + [s for s in self.by_id.values() if not s.clean and s.online]

    def restore(self, session: Session) -> list[Session]:
        """Keep an absent ``session`` saved by an earlier run (edge/mqtt_keep.py): sessions
        to forget (the longest absent, past ``max_offline``)."""
        self.by_id[session.client_id] = session
        self._offline[session.client_id] = None
        return self._evict()

    def detach(self, session: Session) -> list[Session]:
        """The connection ended: sessions to forget (a clean one, or the oldest absent)."""
        session.online = False
        if self.by_id.get(session.client_id) is not session:
            return []  # already replaced by a newer connection of the same client id
        if session.clean:
            del self.by_id[session.client_id]
            return [session]
        self._offline[session.client_id] = None
        return self._evict()

    def _evict(self) -> list[Session]:
        ended = []
        while len(self._offline) > self.max_offline:
            gone, _ = self._offline.popitem(last=False)
            ended.append(self.by_id.pop(gone))
        return ended
