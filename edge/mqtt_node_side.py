"""The MQTT listener's side facing its node: batched PUB frames out, deliveries, flush
answers and commit acknowledgements (PACK/ERR) in.

A mixin of edge/mqtt_listener.py's MqttListener, split out to keep modules small; it
works on the listener's own state (the annotations below name what it uses). Frames go
to the node by ``step``'s return value and come back by ``take``, in the node's loop
(node/residents.py); what they cause is written to the clients by ``flush``.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from edge.mapping import mesh_topic_to_mqtt
from edge.mqtt_commit import Committing
from edge.mqtt_connect import LOG_FIRST
from edge.mqtt_session import Session, SessionTable, Subscription
from node.codec import (
    F_RETAIN,
    HEAD_PUB,
    RECORD_SIZE,
    RUN_BIT,
    RUN_HEAD,
    SID,
    Kind,
    decode_control,
    encode_headers,
)
from node.drops import worth_a_line
from node.errors import CodecError, InputError

if TYPE_CHECKING:
    from edge.mqtt_conn import MqttConnection

log = logging.getLogger("meshctl.node")

QOS_HEADER: Final = "qos"
HB_QOS0: Final = encode_headers({QOS_HEADER: "0"})
MAX_BACKLOG: Final = 8 * 1024 * 1024  # QoS 0 to a client with more unsent bytes is dropped
ACK: Final = struct.Struct(">BBH")  # PUBACK/PUBREC: first byte, length 2, packet id
_DELIVERY: Final = struct.Struct("<IIHHB")  # sid, plen, tlen, hlen, flags
_HEAD: Final = struct.Struct("<IHHB")  # plen, tlen, hlen, flags: a record in a run

# (connection, packet, sids whose deliveries it releases, packet id if it is an ack)
Pending = list[tuple["MqttConnection", bytes, tuple[int, ...], int]]


class NodeSide:
    """Frames to and from the node."""

    # The listener's state this side works on (set in MqttListener.__init__).
    counters: dict[str, int]
    committing: Committing
    now: Callable[[], float]
    _open: bool
    _to_node: list[bytes]
    _online: dict[str, MqttConnection]
    _sids: dict[int, tuple[Session, Subscription]]
    _retired: dict[int, tuple[Session, Subscription, float]]
    sessions: SessionTable
    _to_mqtt: dict[bytes, bytes | None]
    _records: list[bytes]
    _record_bytes: int
    _after: Pending
    _sent: Pending
    _held: dict[int, list[bytes]]
    _flush_due: bool
    _touched: set[MqttConnection]

    def _schedule_flush(self) -> None:
        self._flush_due = True  # at the end of this step (or the next: ``busy`` says so)

    def _flush(self) -> None:
        """Once per step: hand batched records to the node; what waits for them to be
        routed goes out with ``routed``."""
        self._flush_due = False
        self._send_records()
        if self._after:
            self._sent += self._after
            self._after = []

    def routed(self) -> None:
        """The node has handled every frame of this step: the packets that waited for it
        (SUBACKs, QoS 1 acknowledgements with the store off) and the deliveries held
        behind a SUBACK go out, ahead of what the node's output of this pass adds."""
        sent, self._sent = self._sent, []
        for conn, packet, release, pid in sent:
            held = [p for sid in release for p in self._held.pop(sid, ())]
            if not conn.closing:
                if pid:
                    self._acked(conn, pid, packet)
                else:
                    conn.out.append(packet)
                conn.out.extend(held)
                self._touched.add(conn)

    def _acked(self, conn: MqttConnection, pid: int, packet: bytes) -> None:
        """``packet`` acknowledges publish ``pid``: it goes out (to ``conn.out``) once the
        acks of every publish that came before it have, so that one ready early (a refused
        topic, acknowledged at once) does not overtake them (MQTT 3.1.1 section 4.6)."""
        unacked = conn.unacked
        if pid not in unacked:  # from before a reconnect: nothing of this connection waits
            if conn.session is not None:
                conn.session.incoming.pop(pid, None)
            conn.out.append(packet)
            return
        unacked[pid] = packet
        incoming = conn.session.incoming if conn.session is not None else {}
        while unacked:
            first, ready = next(iter(unacked.items()))
            if ready is None:
                return
            del unacked[first]
            # Only now may the client reuse the id; until then a resend (DUP) on another
            # connection keeps the event id it had (edge/mqtt_commit.py).
            incoming.pop(first, None)
            conn.out.append(ready)

    def _send_records(self) -> None:
        if self._records:
            frame = HEAD_PUB + b"".join(self._records)
            self._records.clear()
            self._record_bytes = 0
            self._send(frame)

    def _send(self, frame: bytes) -> None:
        if self._open:
            self._to_node.append(frame)

    def take(self, frame: bytes) -> None:
        """A frame from the node; what it writes goes out with ``flush``."""
        if frame[:2] == b"\x01\x21":
            self._deliver(frame, self._touched)
        else:
            self._on_control(frame, self._touched)

    def flush(self) -> None:
        """The node's frames of this pass are in: one write per client they touched."""
        touched = self._touched
        for conn in touched:
            conn.flush()
        touched.clear()

    def _on_control(self, frame: bytes, touched: set[MqttConnection]) -> None:
        try:
            kind, body = decode_control(frame)
        except CodecError as e:
            log.warning("MQTT listener: bad frame from the node: %s", e)
            return
        if kind == Kind.PACK:
            self._committed(body.get("ids") or [], touched)
        elif kind == Kind.ERR and isinstance(body.get("ids"), list):
            self._refused(body["ids"], str(body.get("error")))
        elif kind == Kind.ERR:
            log.warning("MQTT listener: the node said: %s", body.get("error"))

    def _committed(self, ids: list[Any], touched: set[MqttConnection]) -> None:
        """The node stored these events: PUBACK (PUBREC) each to its client, in one write
        per client per frame. A client that is not connected right now keeps the mapping
        in its session: its resend (DUP) reuses the id and the node acknowledges again."""
        online = self._online
        for session, pid, qos in self.committing.answered(ids, self.now()):
            conn = online.get(session.client_id)
            if conn is None or conn.session is not session or conn.closing:
                continue
            if qos == 1:
                self._acked(conn, pid, ACK.pack(0x40, 2, pid))
            else:
                session.awaiting_rel.add(pid)
                self._acked(conn, pid, ACK.pack(0x50, 2, pid))
            touched.add(conn)

    def _refused(self, ids: list[Any], error: str) -> None:
        """The node could not store these events (disk or spool full). MQTT 3.1.1 has no
        negative PUBACK: close the client's connection; it resends on reconnect."""
        for session, pid, qos in self.committing.answered(ids, self.now()):
            n = self.counters["store_refused"] = self.counters["store_refused"] + 1
            conn = self._online.get(session.client_id)
            if conn is None or conn.session is not session or conn.closing:
                continue
            if worth_a_line(n, LOG_FIRST):
                log.warning(
                    "MQTT client %s: closing: the node could not store its QoS %d message "
                    "(packet id %d; total %d): %s",
                    conn.name, qos, pid, n, error,
                )  # fmt: skip
            conn.close(abort=True)

    def _deliver(self, frame: bytes, touched: set[MqttConnection]) -> None:
        """Events from the node to MQTT clients: once per client even when several of its
        subscriptions match, at the highest of their QoS (MQTT 3.1.1 §3.3.5).

        The node sends one copy per matching subscription, all of one event's copies
        before the next event's, but a frame ends at ~64 KiB: copies may straddle two
        frames (an exploratory test got 41 duplicates in 600 5 kB messages when this
        looked within one frame). So each session remembers the last message it got.
        (A run, codec.py, comes only for a route with one subscription per client.)"""
        single = _DELIVERY.unpack_from
        in_run = _HEAD.unpack_from
        sids = self._sids
        online = self._online
        n = len(frame)
        off = 2
        left = stop = 0  # in a run (codec.py): records still to read, where it ends
        while off < n:
            if left:
                if off + RECORD_SIZE > stop:
                    break  # frames from our own node: never malformed
                plen, tlen, hlen, flags = in_run(frame, off)
                t0 = off + RECORD_SIZE
                left -= 1
            else:
                if off + SID.size + RECORD_SIZE > n:
                    break
                sid, plen, tlen, hlen, flags = single(frame, off)
                if sid & RUN_BIT:
                    _, left, length = RUN_HEAD.unpack_from(frame, off)
                    off += RUN_HEAD.size
                    stop = min(off + length, n)
                    sid ^= RUN_BIT
                    continue
                t0 = off + SID.size + RECORD_SIZE
            h0 = t0 + tlen
            p0 = h0 + hlen
            end = p0 + plen
            rec_id = frame[t0 - 16 : t0]
            off = end
            target = sids.get(sid)
            if target is None:
                retired = self._retired.get(sid)
                if (
                    retired is None
                    or self.sessions.by_id.get(retired[0].client_id) is not retired[0]
                ):
                    continue
                target = retired[0], retired[1]  # replaced a moment ago: still its flow
            session, sub = target
            qos = sub.qos
            overlap = len(session.subs) > 1 or bool(self._retired)
            if overlap and sub.group is None and not flags & F_RETAIN:
                # Plain live copies only: a retained message comes once per SUBSCRIBE (a
                # resend is due, MQTT 3.1.1 3.8.4), and a shared subscription's copy is
                # its group's own, as in MQTT 5 4.8.2; both were taken for repeats (review).
                if rec_id == session.last:
                    continue
                session.last = rec_id
                qos = max(qos, session.max_qos(frame[t0:h0]))
            topic = self._mqtt_topic(frame[t0:h0])
            if topic is None:
                self.counters["refused_topics"] += 1
                continue
            if qos and hlen and frame[h0:p0] == HB_QOS0:
                qos = 0
            conn = online.get(session.client_id)
            if qos == 0 and conn is not None and conn.backlog() > MAX_BACKLOG:
                self.counters["dropped_slow"] += 1
                continue
            dropped = session.dropped
            packet = session.deliver(topic, frame[p0:end], qos, retain=bool(flags & F_RETAIN))
            if packet is None:
                if qos and session.dropped != dropped:
                    self._queue_full(session)
                continue
            if conn is None:
                continue
            self.counters["delivered"] += 1
            held = self._held.get(sid)
            if held is not None:
                held.append(packet)  # before its SUBACK: goes out right after it
            else:
                conn.out.append(packet)
                touched.add(conn)

    def _queue_full(self, session: Session) -> None:
        """A QoS 1 message dropped for a full session queue: counted and logged. It was
        neither (exploratory test: a subscriber got 61,492 of 100,000, every count 0)."""
        n = self.counters["dropped_queue_full"] = self.counters["dropped_queue_full"] + 1
        if worth_a_line(n, LOG_FIRST):
            log.warning(
                "MQTT client %s: QoS 1 message dropped: its session queue is full "
                "(mqtt.max_queued %d, max_queued_bytes %d; total %d)",
                session.client_id, session.max_queued, session.max_queued_bytes, n,
            )  # fmt: skip

    def _mqtt_topic(self, tb: bytes) -> bytes | None:
        topic = self._to_mqtt.get(tb, b"")
        if topic == b"":
            try:
                topic = mesh_topic_to_mqtt(tb.decode()).encode()
            except (InputError, UnicodeDecodeError):
                topic = None
            if len(self._to_mqtt) > 65_536:
                self._to_mqtt.clear()
            self._to_mqtt[tb] = topic
        return topic
