"""The node's native MQTT 3.1.1 listener: an actor on the node's own thread.

An asyncio loop with a TCP server for MQTT clients, stepped by the node's loop once per
pass (node/residents.py: no thread, no socket to the node; frames go both ways as calls).
Its identity is internal, so the node does not apply its per-client subscription limit to
it; the listener applies that limit per MQTT client. Every MQTT subscription is one mesh
subscription (its own sid); every MQTT publish is one record in a batched PUB frame.
Topic rules are edge/mapping.py's; packets are edge/mqtt_codec.py's; sessions
edge/mqtt_session.py's; retained messages sit behind the ``Retained`` seam of
edge/mqtt_retain.py (in the node when its store is on).

QoS 1 and 2 from a client, with the node's store on, are persistent events: the PUBACK
(PUBREC) is written when the node's PACK names the event's id, i.e. once it is committed
to disk (edge/mqtt_commit.py); an ERR naming it closes that client's connection. With the
store off they are acknowledged once the node has routed them: the node handles the
frames a step returns, then calls ``routed``, which writes the acks. QoS 0 publishes carry
a ``qos: 0`` header so that subscribers receive min(publish QoS, subscription QoS); events
published by mesh clients have no QoS and are delivered at the subscription's QoS.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import selectors
import ssl
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from edge.mapping import (
    MappingError,
    mqtt_filter_error,
    mqtt_subscription,
    mqtt_topic_to_mesh,
)
from edge.mqtt_auth import USERS_FILE, Authenticator
from edge.mqtt_codec import (
    PINGRESP,
    SUBACK_FAILURE,
    Connect,
    Disconnect,
    Packet,
    PingReq,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    Type,
    Unsubscribe,
    Will,
    encode,
    encode_ack,
)
from edge.mqtt_commit import Committing
from edge.mqtt_conn import MqttConnection
from edge.mqtt_connect import LOG_FIRST, ConnectSide, allowed
from edge.mqtt_keep import SESSIONS_FILE, Autosave, discard, load, save
from edge.mqtt_node_side import ACK, HB_QOS0, NodeSide, Pending
from edge.mqtt_retain import ListenerRetained, NodeRetained, Retained
from edge.mqtt_session import Limits, Session, SessionTable, Subscription
from edge.port import MeshPort
from node.codec import (
    F_PERSISTENT,
    F_RETAIN,
    RECORD_SIZE,
    Kind,
    encode_control,
)
from node.config import NodeConfig, host_port
from node.drops import worth_a_line
from node.errors import InputError
from node.sessions import publish_verdict
from node.topics import matches, validate_publish_topic

log = logging.getLogger("meshctl.node")

FRAME_BYTES: Final = 64 * 1024  # PUB frames to the node are cut at about this size
CONNECT_TIMEOUT: Final = 10.0  # a socket that sends no CONNECT this long is closed
TICK: Final = 0.25  # keepalive and CONNECT deadlines are checked this often
RETIRE_FOR: Final = 2.0  # a replaced subscription still delivers what was sent to it
# Packets handled per step; the rest waits in its connection's decoder, with the socket
# paused, for the next steps. Without it one step read 256 KiB from every ready client
# and the node's own clients and links waited: with 32 clients flooding QoS 0, a local
# `meshctl status` took 1.6 s (p50) instead of 6 ms.
STEP_PACKETS: Final = 256
_ID: Final = slice(RECORD_SIZE - 16, RECORD_SIZE)  # a record's event id


@dataclass(frozen=True, slots=True)
class ListenerConfig:
    """What the listener needs from the node config."""

    host: str
    port: int
    max_inflight: int = 100
    max_queued: int = 1000
    max_queued_bytes: int = 16 * 1024 * 1024
    max_sessions: int = 1000
    max_subscriptions: int = 10_000
    max_packet: int = 1024 * 1024 + 65_536
    node_retained: bool = True  # the node keeps retained events (its store is on)
    persistent: bool = True  # QoS 1/2 publishes are persistent events (the store is on)
    max_payload: int = 1024 * 1024  # the node's limit: larger publishes are refused here
    users: Path | None = None  # mqtt_users.json: names, password hashes, permissions
    anonymous: bool = True  # clients without a user name may connect (unrestricted)
    tls: ssl.SSLContext | None = None  # edge/tls.py: the port speaks TLS (mqtts)
    sessions_file: Path | None = None  # persistent sessions kept across a restart here
    autosave: float = 60.0  # seconds between saves of them while running; 0: at stop only


class MqttListener(ConnectSide, NodeSide):
    """The actor: ``start()`` binds (or raises OSError); then the node's loop steps it
    (node/residents.py's Resident) until ``stop()``. All on the node's thread."""

    def __init__(self, cfg: ListenerConfig, ident: bytes) -> None:
        self.cfg = cfg
        self.ident = ident
        self.port = MeshPort("mqtt")
        self.retained: Retained = NodeRetained() if cfg.node_retained else ListenerRetained()
        self.sessions = SessionTable(
            cfg.max_sessions, Limits(cfg.max_inflight, cfg.max_queued, cfg.max_queued_bytes)
        )
        self.auth = Authenticator(cfg.users, anonymous=cfg.anonymous)
        # One worker: a flood of wrong passwords queues here instead of taking every core.
        self._hasher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqtt-auth")
        self._checking = 0  # passwords queued or being hashed
        self.bound = ""
        self.counters = {
            "connects": 0,
            "published": 0,
            "delivered": 0,
            "refused_topics": 0,
            "protocol_errors": 0,
            "keepalive_timeouts": 0,
            "wills": 0,
            "sessions_evicted": 0,  # absent persistent sessions dropped past max_sessions
            "sessions_restored": 0,  # persistent sessions kept from the run before
            "dropped_slow": 0,
            # QoS 1 messages for a session whose queue was full (mqtt.max_queued, bytes)
            "dropped_queue_full": 0,
            "refused_payloads": 0,
            "store_refused": 0,
            "auth_failures": 0,
            "denied": 0,  # publishes and subscriptions a user's permissions refused
            "tls_failures": 0,  # connections that failed the TLS handshake
        }
        self.committing = Committing()
        self._conns: set[MqttConnection] = set()
        self._online: dict[str, MqttConnection] = {}
        self._sids: dict[int, tuple[Session, Subscription]] = {}
        self._retired: dict[int, tuple[Session, Subscription, float]] = {}  # replaced, until
        self._next_sid = itertools.count(1)
        self._to_mesh: dict[str, bytes | None] = {}
        self._to_mqtt: dict[bytes, bytes | None] = {}
        self._records: list[bytes] = []
        self._record_bytes = 0
        # Packets written once the node has routed this step's frames, and the sids whose
        # deliveries wait for them (a new subscription's, until its SUBACK is out).
        self._after: Pending = []
        self._sent: Pending = []
        self._held: dict[int, list[bytes]] = {}
        self._flush_due = False
        self._to_node: list[bytes] = []  # frames for the node, taken by ``step``
        self._touched: set[MqttConnection] = set()  # written to by the node's frames
        self.budget = STEP_PACKETS  # packets this step may still handle
        self._deferred: dict[MqttConnection, None] = {}  # paused with packets to handle
        self._open = False  # between start and stop: frames may go to the node
        self._final = False  # the wills went with the node's last words: no more
        self._selector = selectors.DefaultSelector()  # epoll here: one fd for the node to poll
        self._loop = asyncio.SelectorEventLoop(self._selector)
        self._loop.set_exception_handler(_log_one_line)
        self._server: asyncio.Server | None = None
        self._tick: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()  # TLS handshakes under way
        self.now: Callable[[], float] = self._loop.time
        self._autosave: Autosave | None = None  # saves the persistent sessions (store on)

    # ---- the actor -----------------------------------------------------------------------

    def start(self) -> None:
        """Bind the TCP port (OSError if it cannot be) and greet the node."""
        try:
            self._loop.run_until_complete(self._bind())
        except OSError:
            self._loop.close()
            raise
        self._open = True
        # "requests": false: MQTT 3.1.1 clients cannot answer a mesh request (no reply-to)
        hello = {"name": "mqtt listener", "requests": False, "runs": True}
        self._send(encode_control(Kind.HELLO, hello))
        if self.cfg.sessions_file is not None:
            self._restore(self.cfg.sessions_file)
            if self.cfg.autosave:
                self._autosave = Autosave(self.cfg.sessions_file, self.cfg.autosave, self.now())
        self._tick = self._loop.create_task(self._ticker())
        log.info("MQTT listener on %s", self.bound)

    async def _bind(self) -> None:
        try:
            self._server = await self._loop.create_server(
                lambda: MqttConnection(self, self.cfg.max_packet),
                self.cfg.host,
                self.cfg.port,
                reuse_address=True,
            )
        except OSError as e:
            where = f"{self.cfg.host}:{self.cfg.port}"
            why = os.strerror(e.errno).lower() if e.errno else str(e)
            raise OSError(f"cannot listen for MQTT on {where}: {why}") from None
        addr = self._server.sockets[0].getsockname()
        self.bound = f"{addr[0]}:{addr[1]}" if ":" not in addr[0] else f"[{addr[0]}]:{addr[1]}"

    def stop(self) -> None:
        """Close the port and every connection. The node is stopping: the wills went with
        its last words (``last_words``)."""
        if self._loop.is_closed():
            return
        self._open = False
        if self._autosave is not None:
            self._autosave.close()  # before the stop's own save, which has the last word
        self._keep()
        self._loop.run_until_complete(self._close())
        self._loop.close()
        self._hasher.shutdown(wait=False, cancel_futures=True)

    def _keep(self) -> None:
        """Save the persistent sessions for the next start (the store on), or say what
        the stop drops: an operator read nothing of it before (exploratory test)."""
        kept = self.sessions.persistent()
        if not kept:
            if self.cfg.sessions_file is not None:  # an autosave's, of sessions now ended
                discard(self.cfg.sessions_file)
            return
        waiting = sum(len(x.queue) + len(x.inflight) for x in kept)
        n, s = len(kept), "s" if len(kept) > 1 else ""
        if self.cfg.sessions_file is not None:
            try:
                save(self.cfg.sessions_file, kept)
            except OSError as e:
                discard(self.cfg.sessions_file)  # an autosave's: older than what is lost
                log.warning(
                    "MQTT: %d persistent session%s lost, %d QoS 1 messages in them: cannot "
                    "save them to %s: %s", n, s, waiting, self.cfg.sessions_file, e,
                )  # fmt: skip
            else:
                log.info(
                    "MQTT: %d persistent session%s kept for the next start, %d QoS 1 "
                    "messages waiting in them", n, s, waiting,
                )  # fmt: skip
            return
        log.warning(
            "MQTT: %d persistent session%s end%s with the node, %d QoS 1 messages "
            "undelivered in them (sessions are kept across a restart only with the store on)",
            n, s, "" if n > 1 else "s", waiting,
        )  # fmt: skip

    def _restore(self, path: Path) -> None:
        """Take back the persistent sessions the run before kept: absent, their
        subscriptions active at the node again, their messages waiting."""
        restored = load(path, self.sessions.limits)
        evicted: list[Session] = []
        for session in restored:
            for sub in session.subs.values():
                sub.sid = next(self._next_sid)
                self._sids[sub.sid] = (session, sub)
                body = {"ref": None, "sid": sub.sid, "patterns": list(sub.patterns)}
                self._send(encode_control(Kind.SUB, body | {"group": sub.group}))
            for gone in self.sessions.restore(session):  # mqtt.max_sessions was lowered
                self._forget(gone)
                evicted.append(gone)
        if not restored:
            return
        kept = [x for x in restored if x not in evicted]
        waiting = sum(len(x.queue) + len(x.inflight) for x in kept)
        # What lower bounds than before cost is said, as they would be at runtime (review)
        cut = sum(x.dropped for x in restored) + sum(len(x.queue) for x in evicted)
        self.counters["sessions_restored"] = len(kept)
        self.counters["sessions_evicted"] += len(evicted)
        self.counters["dropped_queue_full"] += sum(x.dropped for x in kept)
        log.info(
            "MQTT: %d persistent session%s restored, %d QoS 1 messages waiting in them",
            len(kept), "" if len(kept) == 1 else "s", waiting,
        )  # fmt: skip
        if evicted or cut:
            log.warning(
                "MQTT: %d saved session%s not restored past mqtt.max_sessions (%d), %d saved "
                "QoS 1 messages dropped past mqtt.max_sessions or mqtt.max_queued",
                len(evicted), "" if len(evicted) == 1 else "s", self.sessions.max_offline, cut,
            )  # fmt: skip

    async def _close(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
        for task in list(self._handshakes):
            task.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            conn.close(abort=True)
        await asyncio.sleep(0)  # the transports' connection_lost callbacks
        self.bound = ""

    # ---- stepped by the node's loop (node/residents.py) ------------------------------------

    def fileno(self) -> int:
        return self._selector.fileno()  # type: ignore[attr-defined]  # epoll, kqueue

    def step(self, now: float) -> list[bytes]:
        """One pass of the asyncio loop: what the clients sent, timers due, callbacks that
        were ready; never waits (asyncio polls with no timeout once stop() was called)."""
        self.budget = STEP_PACKETS
        if self._deferred:
            self._read_deferred()
        loop = self._loop
        loop.call_soon(loop.stop)
        loop.run_forever()
        if self._flush_due:
            self._flush()
        out, self._to_node = self._to_node, []
        return out

    def busy(self) -> bool:
        # Callbacks asyncio made ready for its next pass (a connection just accepted or
        # closed, a future's result): the node must not sleep on them. CPython keeps them
        # in ``_ready``; tests/unit/test_residents.py fails if that ever changes.
        ready = self._loop._ready  # type: ignore[attr-defined]
        return self._flush_due or bool(self._to_node or self._deferred or ready)

    def defer(self, conn: MqttConnection) -> None:
        """``conn`` has packets left over after this step's budget: it stops reading and
        is handled first in the next steps."""
        if conn not in self._deferred:
            self._deferred[conn] = None
            if conn.transport is not None:
                conn.transport.pause_reading()

    def forget_deferred(self, conn: MqttConnection) -> None:
        self._deferred.pop(conn, None)

    def _read_deferred(self) -> None:
        deferred = self._deferred
        for conn in list(deferred):
            if self.budget <= 0:
                return
            del deferred[conn]
            if conn.closing:
                continue
            try:
                conn.read_backlog()  # may defer it again, behind the others
            except Exception:  # as asyncio does for data_received: that client goes
                log.exception("MQTT client %s: internal error, closing", conn.name)
                conn.close(abort=True)
                continue
            t = conn.transport
            if conn not in deferred and not conn.closing and not conn.verifying and t:
                t.resume_reading()

    def status(self) -> dict[str, Any]:
        """For ``meshctl status``."""
        return {
            "section": "mqtt",
            "listen": self.bound,
            "state": "up" if self.bound else "down",
            "clients": len(self._online),
            "sessions": len(self.sessions),
            "offline_sessions": self.sessions.offline,
            "retained": self.retained.count(),  # None: kept by the node (its status)
            "qos1": "persistent" if self.cfg.persistent else "after routing",
            "anonymous": self.cfg.anonymous,
            "tls": self.cfg.tls is not None,
            "client_certs": self.cfg.tls is not None
            and self.cfg.tls.verify_mode == ssl.CERT_REQUIRED,
            "users": len(self.auth.users),
            **({"users_error": self.auth.error} if self.auth.error else {}),
            "awaiting_commit": len(self.committing),
            **self.counters,
        }

    def start_tls(self, conn: MqttConnection, transport: asyncio.Transport) -> None:
        """Secure a new connection (an mqtts port): ``conn`` is opened once it is done."""
        task = self._loop.create_task(self._handshake(conn, transport))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, conn: MqttConnection, transport: asyncio.Transport) -> None:
        """A client that fails the TLS handshake (plain MQTT or garbage on this port, no or
        an untrusted certificate, silence) is bad input: one line, counted, closed."""
        assert self.cfg.tls is not None
        try:
            secured = await self._loop.start_tls(
                transport, conn, self.cfg.tls, server_side=True,
                ssl_handshake_timeout=CONNECT_TIMEOUT,
            )  # fmt: skip
        except OSError as e:  # ssl.SSLError, ConnectionError and TimeoutError are OSErrors
            n = self.counters["tls_failures"] = self.counters["tls_failures"] + 1
            if worth_a_line(n, LOG_FIRST):
                why = getattr(e, "reason", None) or str(e) or type(e).__name__
                log.warning(
                    "MQTT client %s: TLS handshake failed (total %d): %s", conn.peer, n, why
                )
            transport.abort()
            return
        if secured is None or conn.closing:  # the client left during the handshake
            transport.abort()
            return
        conn.secured(secured)

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            now = self.now()
            for conn in list(self._conns):
                if conn.connect is None:
                    if not conn.verifying and now - conn.opened > CONNECT_TIMEOUT:
                        self._drop(conn, "no CONNECT within 10s")
                elif conn.connect.keepalive and now - conn.last_rx > 1.5 * conn.connect.keepalive:
                    self.counters["keepalive_timeouts"] += 1
                    self._drop(conn, f"silent for 1.5 x keepalive {conn.connect.keepalive}s")
            for sid in [k for k, (_s, _u, until) in self._retired.items() if until <= now]:
                del self._retired[sid]
            if self._autosave is not None:
                self._autosave.due(now, self.sessions.persistent)
            again = self.committing.due(now)
            if again:  # a PUB frame lost on the way (the node's queue full): same ids again
                for rec in again:
                    self._add_record(rec)
                self._schedule_flush()

    # ---- connections ---------------------------------------------------------------------

    def opened(self, conn: MqttConnection) -> None:
        self._conns.add(conn)

    def closed(self, conn: MqttConnection) -> None:
        """The socket is gone: publish the will unless the client said DISCONNECT."""
        self._conns.discard(conn)
        self._deferred.pop(conn, None)
        connect, session = conn.connect, conn.session
        conn.session = None
        if connect is None or session is None:
            return
        if self._online.get(connect.client_id) is conn:
            del self._online[connect.client_id]
        self._will(conn, connect)
        for gone in self.sessions.detach(session):
            if gone is not session:  # the longest absent made room: its queue is lost
                n = self.counters["sessions_evicted"] = self.counters["sessions_evicted"] + 1
                if worth_a_line(n, LOG_FIRST):
                    log.warning(
                        "MQTT: %d absent persistent sessions kept (mqtt.max_sessions); "
                        "dropped the longest absent, %s, and what it had queued (total %d)",
                        self.sessions.max_offline, gone.client_id, n,
                    )  # fmt: skip
            self._forget(gone)
        self._schedule_flush()

    def last_words(self) -> list[bytes]:
        """The node is stopping: the wills of the clients connected now, as frames for
        it to route before it goes (it closes their connections without DISCONNECT). No
        will is published after this."""
        # What the step's budget left unread goes first: a DISCONNECT among it deletes
        # the will (review). Then every connection that still holds its session, those
        # closing too, whose close would come only after this (review).
        self.budget = 1 << 62
        self._read_deferred()
        # And what reached the sockets since the last step: a DISCONNECT just sent was
        # still unread when SIGTERM came, and that client's will went out (a CI flake)
        loop = self._loop
        loop.call_soon(loop.stop)
        loop.run_forever()
        for conn in list(self._conns):
            if conn.connect is not None and conn.session is not None:
                self._will(conn, conn.connect)
        self._final = True
        self._flush()
        out, self._to_node = self._to_node, []
        return out

    def _will(self, conn: MqttConnection, connect: Connect) -> None:
        """Publish ``conn``'s last will unless it said DISCONNECT (MQTT 3.1.1 §3.1.2.5):
        when its socket goes, when another connection takes its session over, and when
        the node stops (``last_words``; once)."""
        if connect.will is not None and not conn.said_disconnect and not self._final:
            self.counters["wills"] += 1
            self._publish(None, _will_publish(connect.will))

    def _drop(self, conn: MqttConnection, why: str) -> None:
        log.info("MQTT client %s: closing: %s", conn.name, why)
        conn.close(abort=True)

    def protocol_error(self, conn: MqttConnection, why: str) -> None:
        """The client sent garbage (or broke the protocol): close only its connection."""
        n = self.counters["protocol_errors"] = self.counters["protocol_errors"] + 1
        if worth_a_line(n, LOG_FIRST):
            log.warning("MQTT client %s: protocol error (total %d): %s", conn.name, n, why)
        # The answers to what came before it in the same read go first (a CONNACK, a
        # PINGRESP), as a broker reading packet by packet sends them; they were dropped,
        # and a client saw its connection reset with no CONNACK (conformance review).
        conn.flush()
        conn.close(abort=True)

    # ---- packets from clients -------------------------------------------------------------

    def on_packet(self, conn: MqttConnection, packet: Packet) -> None:
        """One decoded packet; anything out of place is a protocol error."""
        if conn.connect is None:
            if not isinstance(packet, Connect):
                self.protocol_error(conn, f"first packet is {type(packet).__name__}, not CONNECT")
            else:
                self._on_connect(conn, packet)
            return
        session = conn.session
        if session is None:
            return
        match packet:
            case Publish():
                self._on_publish(conn, packet)
            case PubAck(packet_id=pid):
                for out in session.acked(pid):  # what waited in its queue: delivered now
                    self.counters["delivered"] += 1
                    conn.write(out)
            case Subscribe():
                self._on_subscribe(conn, session, packet)
            case Unsubscribe(packet_id=pid, filters=filters):
                if self._bad_filter(conn, filters):
                    return
                for filt in filters:
                    sub = session.unsubscribe(filt)
                    if sub is not None:
                        self._unsub(sub)
                conn.write(encode_ack(Type.UNSUBACK, pid))
            case PingReq():
                conn.write(PINGRESP)
            case PubRel(packet_id=pid):
                session.awaiting_rel.discard(pid)
                conn.write(encode_ack(Type.PUBCOMP, pid))
            case Disconnect():
                conn.said_disconnect = True
                conn.close()
            case PubRec() | PubComp():
                self.protocol_error(conn, "QoS 2 acknowledgement for a message never sent")
            case _:
                self.protocol_error(conn, f"{type(packet).__name__} is not sent by clients")

    def _mesh_topic(self, topic: str) -> bytes | None:
        """The mesh topic of an MQTT topic name, or None (refused: counted by the caller)."""
        tb = self._to_mesh.get(topic, b"")
        if tb == b"":
            try:
                validate_publish_topic(mqtt_topic_to_mesh(topic))
                tb = topic.encode()
            except InputError:
                tb = None
            if len(self._to_mesh) > 65_536:
                self._to_mesh.clear()
            self._to_mesh[topic] = tb
        return tb

    def _on_publish(self, conn: MqttConnection, p: Publish) -> None:
        qos = p.qos
        if qos == 0:
            self._publish(conn, p)
            return
        session: Session = conn.session  # type: ignore[assignment]  # on_packet checked it
        pid = p.packet_id
        if pid in conn.unacked:  # a resend before its ack went out: it keeps its place
            if not self.cfg.persistent:
                return  # routed already, its ack is on the way: not published twice
        else:
            conn.unacked[pid] = None
        if qos == 2 and pid in session.awaiting_rel:
            self._acked(conn, pid, ACK.pack(0x50, 2, pid))  # a resend: published already
            return
        if self.cfg.persistent:
            self._persist(conn, session, p)
            return
        rec = self._publish(conn, p)
        ack = ACK.pack(0x40 if qos == 1 else 0x50, 2, pid)
        if qos == 2:
            session.awaiting_rel.add(pid)
        if rec is not None:
            self._after.append((conn, ack, (), pid))
            self._schedule_flush()
        else:  # refused topics are acknowledged, so the client does not resend
            self._acked(conn, pid, ack)

    def _persist(self, conn: MqttConnection, session: Session, p: Publish) -> None:
        """QoS 1/2 as a persistent event, acknowledged on the node's PACK (``_committed``).
        A resend (DUP) of a packet id still waiting goes out with the event id it had."""
        pid = p.packet_id
        held = session.incoming.get(pid) if p.dup else None
        if held is not None:
            key, rec = held
            self._add_record(rec)
            self._schedule_flush()
        else:
            made = self._publish(conn, p)
            if made is None:  # refused here: acknowledged, so the client does not resend
                self._acked(conn, pid, ACK.pack(0x40 if p.qos == 1 else 0x50, 2, pid))
                if p.qos == 2:
                    session.awaiting_rel.add(pid)
                return
            key, rec = made[_ID].hex(), made
        self.committing.wait(session, pid, p.qos, key, rec, self.now())

    def _publish(self, conn: MqttConnection | None, p: Publish) -> bytes | None:
        """Queue one message for the node: its record, or None if refused (its topic has no
        mesh equivalent, or its payload exceeds the node's limit)."""
        tb = self._mesh_topic(p.topic)
        if tb is None:
            self.counters["refused_topics"] += 1
            if conn is not None:
                log.debug("MQTT client %s: topic %r refused", conn.name, p.topic)
            return None
        if conn is not None and conn.perms is not None:
            why = publish_verdict(conn.perms, conn.verdicts, tb)
            if why is not None:  # acknowledged all the same: MQTT 3.1.1 has no refusal
                self._denied(conn, why)
                return None
        if len(p.payload) > self.cfg.max_payload:
            self.counters["refused_payloads"] += 1
            if conn is not None:
                log.debug("MQTT client %s: %d-byte payload refused", conn.name, len(p.payload))
            return None
        flags = 0
        if p.retain:
            self.retained.retain(p.topic, p.payload, p.qos)
            flags = F_RETAIN if self.retained.in_node else 0
        if p.qos and self.cfg.persistent:
            flags |= F_PERSISTENT
        rec = self.port.raw_record(tb, p.payload, HB_QOS0 if p.qos == 0 else b"", flags)
        self.counters["published"] += 1
        self._add_record(rec)
        self._schedule_flush()
        return rec

    def _add_record(self, rec: bytes) -> None:
        self._records.append(rec)
        self._record_bytes += len(rec)
        if self._record_bytes >= FRAME_BYTES:
            self._send_records()

    def _bad_filter(self, conn: MqttConnection, filters: Iterable[str]) -> bool:
        """True (and the connection closed) when a filter is no MQTT filter at all."""
        for filt in filters:
            why = mqtt_filter_error(filt)
            if why is not None:
                self.protocol_error(conn, f"not a topic filter: {why}")
                return True
        return False

    def _on_subscribe(self, conn: MqttConnection, session: Session, s: Subscribe) -> None:
        if self._bad_filter(conn, (f for f, _ in s.filters)):
            return
        codes: list[int] = []
        retained: list[bytes] = []
        sids: list[int] = []
        for filt, qos in s.filters:
            try:
                group, plain, mapped = mqtt_subscription(filt)
                patterns = mapped.patterns
            except MappingError as e:
                self.counters["refused_topics"] += 1
                log.debug("MQTT client %s: filter refused: %s", conn.name, e)
                codes.append(SUBACK_FAILURE)
                continue
            if conn.perms is not None:
                patterns, why = allowed(conn.perms, patterns)
                if why is not None:
                    self._denied(conn, why)
                    codes.append(SUBACK_FAILURE)
                    continue
            if filt not in session.subs and len(session.subs) >= self.cfg.max_subscriptions:
                codes.append(SUBACK_FAILURE)
                continue
            granted = min(qos, 1)
            sub = Subscription(next(self._next_sid), granted, group, patterns)
            old = session.subscribe(filt, sub)
            if old is not None:
                self._retire(session, old)
            self._sids[sub.sid] = (session, sub)
            self._held[sub.sid] = []
            sids.append(sub.sid)
            body: dict[str, Any] = {"ref": None, "sid": sub.sid, "patterns": list(patterns)}
            body["group"] = group
            if group is None and self.retained.in_node:
                body["retained"] = True
            self._send(encode_control(Kind.SUB, body))
            codes.append(granted)
            if group is None:
                for m in self.retained.matching(plain):
                    if conn.perms is not None and not any(matches(p, m.topic) for p in patterns):
                        continue  # kept by the listener (no store): the rules apply here too
                    q = min(m.qos, granted)
                    packet = session.deliver(m.topic.encode(), m.payload, q, retain=True)
                    if packet is not None:
                        retained.append(packet)
        # SUBACK once the node has the subscriptions, so a publish right after it is seen.
        self._after.append((conn, encode(SubAck(s.packet_id, tuple(codes))), tuple(sids), 0))
        self._after.extend((conn, r, (), 0) for r in retained)
        self._schedule_flush()

    def _denied(self, conn: MqttConnection, why: str) -> None:
        n = self.counters["denied"] = self.counters["denied"] + 1
        if worth_a_line(n, LOG_FIRST):
            log.warning("MQTT client %s: %s (total %d)", conn.name, why, n)

    def _unsub(self, sub: Subscription) -> None:
        self._sids.pop(sub.sid, None)
        self._send(encode_control(Kind.UNSUB, {"ref": None, "sid": sub.sid}))

    def _retire(self, session: Session, sub: Subscription) -> None:
        """``sub`` is replaced (the same filter subscribed again): what the node already
        sent it still goes to the client for RETIRE_FOR seconds. It was dropped at once,
        and a client re-subscribing mid-stream lost messages (review; MQTT 3.1.1
        3.8.4: the flow of publications must not be interrupted)."""
        self._unsub(sub)
        self._retired[sub.sid] = (session, sub, self.now() + RETIRE_FOR)

    def _forget(self, session: Session) -> None:
        """A session ended for good: its mesh subscriptions go."""
        for sub in session.unsubscribe_all():
            self._unsub(sub)


def _will_publish(will: Will) -> Publish:
    return Publish(will.topic, will.payload, will.qos, will.retain)


def start_listener(
    config: NodeConfig,
    *,
    data_dir: Path | None = None,
    tls: ssl.SSLContext | None = None,
) -> MqttListener:
    """Start the listener ``[mqtt]`` asks for; OSError when its port cannot be bound.
    The caller attaches it to the node (``Node.attach``), whose loop then steps it. Its
    users (``meshctl mqtt passwd``) are read from ``data_dir``; ``tls`` (from
    edge/tls.py) makes it an mqtts port."""
    host, port = host_port(config.mqtt_listen)
    anonymous = (
        config.insecure if config.mqtt_anonymous == "auto" else config.mqtt_anonymous == "true"
    )
    cfg = ListenerConfig(
        host,
        port,
        max_inflight=config.mqtt_max_inflight,
        max_queued=config.mqtt_max_queued,
        max_queued_bytes=config.mqtt_max_queued_bytes,
        max_sessions=config.mqtt_max_sessions,
        max_subscriptions=config.max_subscriptions,
        max_packet=config.max_payload + 65_536,
        node_retained=config.store,
        persistent=config.store,
        max_payload=config.max_payload,
        users=None if data_dir is None else data_dir / USERS_FILE,
        anonymous=anonymous,
        tls=tls,
        sessions_file=data_dir / SESSIONS_FILE if data_dir is not None and config.store else None,
        autosave=config.mqtt_autosave,
    )
    if anonymous and not config.insecure:
        # The operator turned anonymous MQTT on for a secured mesh: say what that means
        # where the operator looks first.
        log.warning(
            "MQTT listener on %s takes anonymous clients ([mqtt] allow_anonymous): anyone "
            "who reaches it may publish and subscribe like a local client",
            config.mqtt_listen,
        )
    ident = b"\x00mqtt" + time.time_ns().to_bytes(8, "big")
    listener = MqttListener(cfg, ident)
    listener.start()
    return listener


def _log_one_line(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A refused accept as one log line: with the open files used up, each wrote a
    traceback into the node's log (asyncio waits a second, then accepts again). Anything
    else keeps asyncio's report, traceback and all: it is a bug to see (review)."""
    exc = context.get("exception")
    if isinstance(exc, OSError) and "accept" in str(context.get("message", "")):
        log.warning("MQTT listener: %s: %s", context["message"], exc)
    else:
        loop.default_exception_handler(context)
