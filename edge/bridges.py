"""Bridge actors: each a thread with its own DEALER to the node (inproc) and a client of an
external broker. Topic mapping lives in mapping.py; this module only moves bytes.

What a bridge does while its broker is down: persistent exports wait in the node's log
(the spool, edge/logreader.py) and go out in order once the broker is back; direct
exports are dropped and counted (``dropped_remote_down``), as they are at most once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import queue
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import zmq

from edge.bridge_headers import (
    MESH_ONLY,
    from_nats,
    mqtt_properties,
    nats_headers,
    nats_headers_size,
    request_reply,
)
from edge.logreader import LogReader
from edge.mapping import (
    mesh_to_nats,
    mesh_topic_to_mqtt,
    mqtt_topic_to_mesh,
    nats_to_mesh,
    swap_prefix,
)
from edge.mqtt_export import Limits, Round, broker_limits, publish_size, queued
from edge.port import PATH_HEADER, MeshPort, Refusal
from edge.tls import client_context
from node import datadir
from node.bridge_config import BridgeConfig
from node.codec import (
    F_PERSISTENT,
    F_RETAIN,
    F_RETAINED_LIVE,
    HEAD_PUB,
)
from node.drops import worth_a_line
from node.errors import CodecError, InputError
from node.events import Event, decode_event
from node.topics import SubscriptionTrie, is_reserved, matches, validate_topic

log = logging.getLogger("meshctl.node")

POLL_MS: Final = 50
_POLLIN: Final = int(zmq.POLLIN)  # a plain int: `int & IntFlag` goes through enum code (0.8 us)
IMPORT_FRAME_BYTES: Final = 64 * 1024
# A mesh request forwarded to NATS waits this long for its reply; the mesh requester's
# own timeout (which the bridge does not know) ends it sooner. It was 5 s: a NATS service
# answering in 7 s never answered a `meshctl req -t 10s` (exploratory test).
REQUEST_TIMEOUT: Final = 60.0
MAX_ASKING: Final = 1000  # mesh requests waiting for NATS at once; more get an error reply
REQUEST_MEMORY: Final = 60.0  # a NATS request is remembered this long for its reply
# ... and this long after its first reply, for more (a NATS requester gathering several,
# as `nats req --replies`; each NATS request got one reply: exploratory test)
ANSWERED_LINGER: Final = 5.0
NATS_NO_RESPONDERS: Final = "503"  # the status NATS servers send; nats-py raises on it
_ERROR_CODES: Final = {"payload": "413", "permission": "403", "topic": "400"}
SPOOL_BATCH: Final = 500  # persistent exports read from the log per round
SPOOL_WAIT: Final = 5.0  # how long the NATS server may take to acknowledge a round
ROUND_POLL_MS: Final = 10  # the MQTT bridge's look at its round's acknowledgements
FLUSH_GIVE_UP: Final = 60.0  # a NATS round unacknowledged this long goes again
PING_EVERY: Final = 3  # seconds between nats-py's PINGs; 3 unanswered: reconnect
LOG_FIRST: Final = 10  # oversized exports, errors: logged one by one, then every 1000th


# An import waiting for the node: (remote topic, payload, reply subject, PATH_HEADER,
# retained, its own headers)
Import = tuple[str, bytes, str, str, bool, dict[str, str] | None]


class Bridge:
    """Common part: the node side (port, socket, counters) and the thread."""

    SEPARATOR = ""  # between levels in the remote dialect

    def __init__(
        self,
        cfg: BridgeConfig,
        ctx: zmq.Context[zmq.Socket[bytes]],
        endpoint: str,
        ident: bytes,
        data_dir: Path | None = None,
        tls: ssl.SSLContext | None = None,
        node_id: str = "",
        in_mesh: Callable[[str], bool] = lambda _node: False,
    ) -> None:
        self.cfg = cfg
        self.in_mesh = in_mesh  # a node id of this mesh? (read from this thread: a dict lookup)
        self.tls = tls  # edge/tls.py's client context when cfg.tls (read once, at start)
        self.data_dir = data_dir  # None: the node has no store, so no spool either
        self.spool: LogReader | None = None
        self._exports: SubscriptionTrie[bool] = SubscriptionTrie()
        for p in cfg.exports:
            self._exports.add(p, True)
        self.ctx = ctx
        self.endpoint = endpoint
        self.ident = ident
        self.port = MeshPort(cfg.name, node_id, cfg.url)
        self.state = "starting"
        self.detail = ""  # what the last change of state said (a down's reason)
        self.counters = {
            "imported": 0,
            "exported": 0,
            "refused": 0,
            "refused_too_big": 0,
            "dropped_remote_down": 0,
            "dropped_import_full": 0,
            "dropped_loop": 0,  # imports that left this mesh before (PATH_HEADER)
            "spooled": 0,
            "errors": 0,
        }
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"bridge-{cfg.name}", daemon=True)
        self._inbox: queue.Queue[Import] = queue.Queue(maxsize=100_000)
        self._first_of: dict[str, int] = {}  # remote topic -> first import it matches
        # Remote requests waiting for a mesh reply, oldest first:
        # token -> (NATS reply subject, when, mesh event id)
        self._requests: dict[str, tuple[str, float, str]] = {}
        self._request_ids: dict[str, str] = {}  # mesh event id -> token, for no-responders
        self._answered: dict[str, float] = {}  # token -> until when more replies go on
        self._tokens = itertools.count(1)
        self._unmapped: list[tuple[str, Refusal]] = []  # requests refused here: reply to
        self._notices: queue.Queue[tuple[str, dict[str, Any]]] = queue.Queue()
        self._marks: dict[str, Any] = {}  # MQTT: user properties by PATH_HEADER value

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def status(self) -> dict[str, Any]:
        spool = self._spool_stats
        return {
            "spool": spool,
            "name": self.cfg.name,
            "kind": self.cfg.kind,
            "url": self.cfg.shown_url,
            "state": self.state,
            # why it is down: only the log and $mesh/bridge/down said (exploratory test)
            "detail": "" if self.state == "up" else self.detail,
            "import": list(self.cfg.imports),
            "export": list(self.cfg.exports),
            **self.counters,
        }

    def _set_state(self, state: str, detail: str = "") -> None:
        self.detail = detail
        if state != self.state:
            self.state = state
            log.info(
                "bridge %s (%s): %s%s",
                self.cfg.name,
                self.cfg.shown_url,
                state,
                f": {detail}" if detail else "",
            )
            # Callbacks run on the client library's threads: only the bridge thread may use
            # the node socket, so the $mesh event waits in a queue for it.
            self._notices.put(
                (
                    f"$mesh/bridge/{'up' if state == 'up' else 'down'}",
                    {"bridge": self.cfg.name, "url": self.cfg.shown_url, "detail": detail},
                )
            )

    def _take(
        self,
        remote: str,
        payload: bytes,
        reply: str = "",
        path: str = "",
        retain: bool = False,
        headers: dict[str, str] | None = None,
    ) -> None:
        """From the client library's thread: queue an import (bounded; overflow counted).
        ``reply``: the remote requester's reply subject, when it is a request; ``path``:
        its PATH_HEADER, when a meshctl bridge sent it there; ``retain``: an MQTT retained
        message, kept as the topic's retained value in the mesh too; ``headers``: its own
        headers (NATS)."""
        try:
            self._inbox.put_nowait((remote, payload, reply, path, retain, headers))
        except queue.Full:
            self.counters["dropped_import_full"] += 1

    def _first_import(self, remote: str, match: Callable[[str, str], bool]) -> int:
        """The index of the first import pattern that ``remote`` matches (-1: none),
        remembered: most imports repeat a few topics."""
        known = self._first_of
        i = known.get(remote)
        if i is None:
            i = next((j for j, p in enumerate(self.cfg.imports) if match(p, remote)), -1)
            if len(known) >= 4096:
                known.clear()
            known[remote] = i
        return i

    def _send_notices(self, sock: zmq.Socket[bytes]) -> None:
        while True:
            try:
                topic, body = self._notices.get_nowait()
            except queue.Empty:
                return
            sock.send(self.port.publish(topic, json.dumps(body).encode(), imported=False))

    # ---- the spool: persistent exports from the node's log ------------------------------

    _spool_stats: dict[str, Any] | None = None
    _next_stats = 0.0

    def _count_spool(self) -> None:
        """The spool's oldest age for ``status`` (the node adds its counts), every second,
        whether the remote is up or not. It was counted only on idle rounds and cleared
        on every other one: a stuck spool showed no entries, an idle one none half the
        time (found in review)."""
        now = time.monotonic()
        if self.spool is None or now < self._next_stats:
            return
        exports = self._exports
        self._spool_stats = self.spool.stats(
            lambda topic, flags: bool(flags & F_PERSISTENT and exports.match(topic))
        )
        self._next_stats = now + max(1.0, 10 * (time.monotonic() - now))

    def _open_spool(self) -> None:
        """Persistent exports go through the log from a cursor, so a broker that is away
        (or dies mid-stream) misses none of them; the cursor starts at the log's end."""
        if self.data_dir is not None and self.cfg.exports:
            path = datadir.bridge_cursor_path(self.data_dir, self.cfg.name)
            self.spool = LogReader(self.data_dir, path, start_at_head=True)

    def _spooled(self, ev: Event) -> bool:
        """True for a live export the spool carries instead."""
        return self.spool is not None and bool(ev.flags & F_PERSISTENT)

    def _spool_round(self) -> tuple[int, list[Event], bool] | None:
        """The next persistent events to export from the log, the sequence to move the
        cursor to once the broker has them, and whether the round was full (more may
        wait); None when there is nothing new."""
        got = self._spool_events()
        if got is None:
            return None
        seq, pairs, full = got
        return seq, [ev for _seq, ev in pairs], full

    def _spool_events(self) -> tuple[int, list[tuple[int, Event]], bool] | None:
        """``_spool_round``, each event with its own sequence."""
        assert self.spool is not None
        rows = self.spool.after(SPOOL_BATCH)
        if not rows:
            return None
        events = []
        for seq, topic, record in rows:
            if record[8] & F_PERSISTENT and self._exports.match(topic):
                try:
                    ev = decode_event(record, 0, len(record))
                except CodecError:
                    continue
                if not self.port.came_from_here(ev):  # not one we (or our broker) sent
                    events.append((seq, ev))
        return rows[-1][0], events, len(rows) == SPOOL_BATCH

    def _spool_done(self, seq: int, sent: int) -> None:
        assert self.spool is not None
        self.spool.advance(seq)
        self.counters["exported"] += sent
        self.counters["spooled"] += sent

    def _open_port(self) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, self.ident)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        sock.send(self.port.hello(requests=self.cfg.kind != "mqtt"))
        if self.cfg.exports:
            sock.send(self.port.subscribe(self.cfg.exports))
        return sock

    def _drain_imports(self, sock: zmq.Socket[bytes], to_mesh: Callable[[str], str]) -> bool:
        """Move queued imports into the mesh, many records per frame; True if any."""
        batch: list[bytes] = []
        size = 0
        sent_any = False
        while True:
            try:
                remote, payload, reply, path, retain, headers = self._inbox.get_nowait()
            except queue.Empty:
                break
            if path and self.port.looped(path, self.in_mesh):
                self.counters["dropped_loop"] += 1
                continue
            why = "outside the bridge's remote_prefix"
            try:
                topic = swap_prefix(to_mesh(remote), self.cfg.remote_prefix, self.cfg.local_prefix)
                if topic is not None:  # a longer local prefix may take it over the limits
                    validate_topic(topic)
            except InputError as e:  # the node dropped those, counted here as imported
                topic, why = None, str(e)
            if topic is not None and _reserved(topic):
                # NATS '>' matches '$...' subjects: a NATS client published $mesh/node/down
                # into the mesh, or a reply to a pending request (exploratory test).
                topic, why = None, "its first level is reserved in the mesh"
            if topic is None:
                n = self.counters["refused"] = self.counters["refused"] + 1
                if worth_a_line(n, LOG_FIRST):  # only counted: no operator could find which
                    log.warning(
                        "bridge %s: import %r refused: %s (total %d)", self.cfg.name, remote, why, n
                    )
                if reply:  # a NATS requester hears why at once (the NATS pump answers)
                    error = f"subject {remote!r} has no mesh topic: {why}"
                    self._unmapped.append((reply, Refusal("", error, "topic")))
                continue
            limit = self.port.max_payload
            if limit and len(payload) > limit:
                # The node would drop it (its payload_too_large): counted here as imported,
                # and nothing at the bridge said so (exploratory test). A NATS requester is
                # answered at once, as the node would (413).
                self._too_big(f"the mesh ({topic})", len(payload), limit, "the node's")
                if reply:
                    why = f"payload of {len(payload)} bytes exceeds the limit of {limit} bytes"
                    self._unmapped.append((reply, Refusal("", why, "payload")))
                continue
            if reply and self.port.inbox:
                token = str(next(self._tokens))
                event_id, rec = self.port.request(topic, payload, token, path, headers)
                self._requests[token] = (reply, time.monotonic(), event_id)
                self._request_ids[event_id] = token
            else:
                rec = self.port.record(topic, payload, path=path, retain=retain, headers=headers)
            batch.append(rec)
            size += len(rec)
            self.counters["imported"] += 1
            if size >= IMPORT_FRAME_BYTES:
                sock.send(HEAD_PUB + b"".join(batch))
                batch, size, sent_any = [], 0, True
        if batch:
            sock.send(HEAD_PUB + b"".join(batch))
        return sent_any or bool(batch)

    def _too_big(self, subject: str, size: int, limit: int, whose: str = "the server's") -> None:
        n = self.counters["refused_too_big"] = self.counters["refused_too_big"] + 1
        if worth_a_line(n, LOG_FIRST):
            log.warning(
                "bridge %s: not sent to %s: %d bytes, over %s max_payload %d (total %d)",
                self.cfg.name, subject, size, whose, limit, n,
            )  # fmt: skip

    def _expire_requests(self) -> None:
        """Forget remote requests nobody answered (their requesters gave up long ago):
        the oldest first, so a pump walks only what it forgets."""
        now = time.monotonic()
        cutoff = now - REQUEST_MEMORY
        requests = self._requests
        while requests:
            token = next(iter(requests))
            if requests[token][1] >= cutoff:
                break
            self._forget_request(token)
        answered = self._answered
        while answered:
            token = next(iter(answered))
            if answered[token] > now:
                break
            del answered[token]
            self._forget_request(token)

    def _answer(self, token: str) -> tuple[str, float, str] | None:
        """A mesh reply to the remote request ``token``: the request, remembered
        ANSWERED_LINGER more for further replies; no "no responders" is due for it now."""
        pending = self._requests.get(token)
        if pending is not None and token not in self._answered:
            self._answered[token] = time.monotonic() + ANSWERED_LINGER
            self._request_ids.pop(pending[2], None)
        return pending

    def _forget_request(self, token: str) -> tuple[str, float, str] | None:
        """The remote request ``token`` is answered or given up: forget both entries (an
        answered one used to stay in ``_request_ids``: 64 MB after an hour at 100/s)."""
        pending = self._requests.pop(token, None)
        if pending is not None:
            self._request_ids.pop(pending[2], None)
        return pending

    def _no_responders(self, sock: zmq.Socket[bytes], ev: Event, why: str) -> None:
        """If ``ev`` is a request, tell its requester at once that nothing on our side
        answers it, and why (the node withholds it while something else may)."""
        if ev.is_request and ev.reply_to:
            sock.send(
                self.port.reply(ev.reply_to, why.encode(), no_responders=True, topic=ev.topic)
            )

    def _export_topic(self, topic: str, to_remote: Callable[[str], str]) -> str | None:
        """The remote topic of an export, or None (refused: the caller counts it).

        The part after the local prefix and the remote prefix are mapped apart, then
        joined: mapped whole, a longer remote prefix took a valid topic over the mesh's
        own limits (32 levels, 1,024 bytes), which bind neither MQTT nor NATS, and the
        error escaped: it ended the MQTT bridge's thread for good (exploratory test)."""
        cfg = self.cfg
        rest = swap_prefix(topic, cfg.local_prefix, "") if topic != cfg.local_prefix else ""
        if rest is None:
            return None  # outside the local prefix
        try:
            parts = [to_remote(p) for p in (cfg.remote_prefix, rest) if p]
        except InputError:  # no form in the remote dialect
            return None
        return self.SEPARATOR.join(parts) or None

    def _run(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError


class MqttBridge(Bridge):
    """paho-mqtt (MQTT v5, so subscriptions are no-local: our exports never come back)."""

    SEPARATOR = "/"
    _round: Round | None = None  # the spool round the broker has not answered in full
    _resync = False  # the broker accepted us: send it the mesh's retained values
    _limits: Limits = Limits()  # what the broker said it takes, when it last accepted us

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (message id, why) of the broker's refusals, from paho's thread, in order
        self._answers: collections.deque[tuple[int, str]] = collections.deque()

    def _run(self) -> None:
        import paho.mqtt.client as mqtt  # noqa: PLC0415 - optional dependency
        from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415
        from paho.mqtt.properties import Properties  # noqa: PLC0415
        from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: PLC0415

        sock = self._open_port()
        # Unique per node: two nodes with one bridge config each took the other's session
        # at the broker, and both flapped for good (exploratory test); the first 8 hex
        # digits of the ident were the same "\0bri" on every node.
        unique = self.port.node_id[:8] or self.ident[-4:].hex()
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"meshctl-{self.cfg.name}-{unique}",
            protocol=mqtt.MQTTv5,
        )
        if self.cfg.username:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.tls is not None:
            client.tls_set_context(self.tls)
        client.reconnect_delay_set(min_delay=1, max_delay=10)

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, props: Any) -> None:
            if reason.is_failure:
                self._set_state("down", str(reason))
                return
            limits = broker_limits(props)
            if limits != self._limits:
                self._limits = limits
                self._say_limits()
            self._resync = True  # the bridge thread sends the mesh's retained values
            for i, filt in enumerate(self.cfg.imports):
                # Retain As Published: a retained publish keeps its flag on its way to us,
                # so it becomes the mesh's retained value too (the flag was dropped).
                # The identifier says which import a copy came by (see on_message).
                ident = Properties(PacketTypes.SUBSCRIBE)
                ident.SubscriptionIdentifier = i + 1
                c.subscribe(
                    filt,
                    options=SubscribeOptions(
                        qos=self.cfg.qos, noLocal=True, retainAsPublished=True
                    ),
                    properties=ident,
                )
            self._set_state("up")

        def on_disconnect(_c: Any, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
            # paho says "Unspecified error" for a connection that broke: a killed broker,
            # plain MQTT on a TLS port (exploratory test). The broker's DISCONNECT says why.
            said = getattr(flags, "is_disconnect_packet_from_server", True) or reason.value != 128
            self._set_state("down", str(reason) if said else "the connection was lost")

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            # Overlapping imports ("dup/#" and "dup/+") brought one message in twice, a copy
            # a subscription (exploratory test): only the first matching import's counts.
            ids = getattr(msg.properties, "SubscriptionIdentifier", None) or ()
            first = self._first_import(msg.topic, mqtt.topic_matches_sub) if ids else -1
            if first >= 0 and first + 1 not in ids:  # (none matched here: taken, not lost)
                return
            marks = getattr(msg.properties, "UserProperty", None) or ()
            path = next((v for k, v in marks if k == PATH_HEADER), "")
            # The others are the message's own headers (MQTT v5 user properties)
            own = (
                {k: v for k, v in marks if k not in MESH_ONLY} if len(marks) > bool(path) else None
            )
            self._take(msg.topic, msg.payload, path=path, retain=bool(msg.retain), headers=own)

        def on_connect_fail(_c: Any, _u: Any) -> None:  # a broker that never answered
            # paho calls this inside its `except OSError`: the error says why (a refused
            # port, a certificate that does not verify: it said neither; exploratory test)
            why = sys.exc_info()[1]
            where = f"cannot connect to {self.cfg.host}:{self.cfg.port}"
            self._set_state("down", f"{where}: {why}" if why is not None else where)

        client.on_connect = on_connect
        client.on_connect_fail = on_connect_fail
        client.on_disconnect = on_disconnect
        client.on_message = on_message
        # Refusals come to on_publish only: for QoS 0 exports paho makes two objects for
        # each call (11 % off the bridge's rate to MQTT), so it is set at QoS 0 only while
        # a spool round (QoS 1) waits.
        client.on_publish = self._on_publish if self.cfg.qos else None
        self._open_spool()  # before the connect: on_connect asks whether there is one
        client.connect_async(self.cfg.host, self.cfg.port, keepalive=10)
        client.loop_start()
        behind = False  # the last spool round was full: more waits, do not sleep
        try:
            while not self._stop.is_set():
                wait = ROUND_POLL_MS if self._round is not None else POLL_MS
                if sock.poll(0 if behind else wait):
                    while int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
                        for ev in self.port.events(sock.recv()):
                            # (a retained value, F_RETAIN, comes from ``retained``)
                            if not self._spooled(ev) or ev.flags & F_RETAIN:
                                self._export_mqtt(client, sock, ev)
                behind = False
                if self._resync:
                    # The broker's retained values are the mesh's once more: a broker that
                    # restarted without its store (or a new one) had none of them, and a
                    # late MQTT subscriber there got nothing, as mosquitto's own bridges
                    # do not let happen (exploratory test). Sent as they come, retained.
                    self._resync = False
                    if self.cfg.exports and self._limits.retain:
                        for frame in self.port.retained(self.cfg.exports):
                            sock.send(frame)
                self._take_answers()
                if self.spool is not None:
                    behind = self._drain_spool_mqtt(client)
                self._count_spool()
                self._drain_imports(sock, mqtt_topic_to_mesh)
                self._send_notices(sock)
        finally:
            # DISCONNECT first: it wakes paho's network thread, which loop_stop() alone
            # left to its 1 s select timeout (a second added to every node's stop).
            client.disconnect()
            client.loop_stop()
            sock.close(linger=0)
            if self.spool is not None:
                self.spool.close()

    def _export_mqtt(self, client: Any, sock: zmq.Socket[bytes], ev: Event) -> Any:
        """Publish one export. A request goes out as a message too (MQTT subscribers see
        it, as mesh ones do), but nothing over MQTT can answer it: the bridge said so in
        its HELLO ("requests": false), so its export is events-only interest and the
        requester's node answers "no responders" when nothing else may answer. It says
        so itself too, for requester nodes that predate events-only interest (they took
        the export for a responder and waited out their timeouts: rolling-upgrade test);
        a node that answered itself drops it."""
        remote = self._export_topic(ev.topic, mesh_topic_to_mqtt)
        self._no_responders(sock, ev, f"MQTT ({self.cfg.name}) has no request-reply")
        if remote is None:
            self.counters["refused"] += 1
        elif self.state != "up":
            self.counters["dropped_remote_down"] += 1
        else:
            info = self._publish_mqtt(client, remote, ev, self.cfg.qos)
            if info is None:
                return None
            if queued(info, min(self.cfg.qos, self._limits.max_qos)):
                self.counters["exported"] += 1
            else:  # no connection at QoS 0, or paho's 65,535 message ids all wait for one
                self.counters["dropped_remote_down"] += 1
            return info
        return None

    def _publish_mqtt(self, client: Any, remote: str, ev: Event, qos: int) -> Any:
        """Publish with PATH_HEADER and the event's own headers as MQTT v5 user properties
        (one Properties object per path, kept, for events without headers: nearly every
        export has the same one, this node alone). None for a message the broker said it
        takes none of (over its maximum packet size): counted and logged. A broker that
        closes the connection on such a message was sent it again on every reconnect,
        and the bridge went up and down each second for good (exploratory test)."""
        path = self.port.path(ev)
        own = mqtt_properties(ev.headers) if ev.headers else []
        marks = self._marks
        props = None if own else marks.get(path)
        if props is None:
            from paho.mqtt.packettypes import PacketTypes  # noqa: PLC0415 - optional dependency
            from paho.mqtt.properties import Properties  # noqa: PLC0415

            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = [(PATH_HEADER, path), *own]
            if not own:
                if len(marks) > 1024:
                    marks.clear()
                marks[path] = props
        limits = self._limits
        qos = min(qos, limits.max_qos)
        if limits.max_packet:
            pairs = [(PATH_HEADER, path), *own]  # what props carries
            size = publish_size(remote, ev.data, pairs, qos)
            if size > limits.max_packet:
                self._too_big(f"the broker ({remote})", size, limits.max_packet, "its packet")
                return None
        # Retained at the broker as in the mesh (a clear clears it): a live copy of a
        # retained publish carries F_RETAINED_LIVE; a stored one (the spool's) F_RETAIN.
        # Not where the broker keeps none (it closes the connection on a retained one).
        retain = limits.retain and bool(ev.flags & (F_RETAIN | F_RETAINED_LIVE))
        return client.publish(remote, ev.data, qos=qos, retain=retain, properties=props)

    def _on_publish(self, _c: Any, _u: Any, mid: int, reason: Any, _p: Any) -> None:
        """From paho's thread: the broker refused a message (an MQTT v5 reason code of
        0x80 or more in its PUBACK: not authorised, quota, payload format). The bridge
        thread takes these in ``_take_answers``; what was taken it reads from paho's
        message info (``published``)."""
        if reason.value >= 0x80:
            self._answers.append((mid, str(reason)))

    def _take_answers(self) -> None:
        """The broker's refusals so far, of a round's message or a live export: counted
        and logged. A refusal was counted as exported, and the spool moved past it unsaid
        (exploratory test); it still moves past it: it can never be delivered there."""
        pending = self._round.pending if self._round is not None else {}
        answers = self._answers
        while answers:
            mid, why = answers.popleft()
            held = pending.get(mid)
            if held is None:
                self.counters["exported"] -= 1  # a live export, counted when published
            elif self._round is not None:
                self._round.refused.add(mid)
            n = self.counters["refused"] = self.counters["refused"] + 1
            if worth_a_line(n, LOG_FIRST):
                what = f"{held[1].topic!r}" if held is not None else "an export"
                log.warning(
                    "bridge %s: the broker refused %s: %s (total %d)", self.cfg.name, what, why, n
                )

    def _say_limits(self) -> None:
        """Log what the broker's limits change (from paho's thread, when they change)."""
        limits = self._limits
        if limits.max_qos < 1 and self.spool is not None:
            log.warning(
                "bridge %s: the broker takes QoS 0 at most: persistent exports go to it at "
                "most once", self.cfg.name,
            )  # fmt: skip
        if not limits.retain:
            log.warning(
                "bridge %s: the broker keeps no retained messages: retained exports go as "
                "plain messages", self.cfg.name,
            )  # fmt: skip

    def _drain_spool_mqtt(self, client: Any) -> bool:
        """Send the next persistent exports; move the cursor once the broker has answered
        them all (PUBACK: at QoS 1 whatever ``qos`` says, as at QoS 0 nothing tells the
        bridge that the broker has them: a broker killed after the write lost every one,
        the spool empty; exploratory test). A round the broker has not answered waits in
        paho, which sends it again after a reconnect: sent again here too, every 5 s a
        broker hung, each export arrived six times (exploratory test).
        True when the caller should come back at once: a full round is done (more may
        wait: one round per 50 ms poll read at most 10,000 log entries a second, exports
        or not, which a fleet of devices logging persistent events outruns)."""
        if self._round is not None:
            return self._settle_round(client)
        if self.state != "up":
            return False
        got = self._spool_events()
        if got is None:
            return False
        seq, events, full = got
        pending: dict[int, tuple[Any, Event]] = {}
        client.on_publish = self._on_publish
        for at, ev in events:
            remote = self._export_topic(ev.topic, mesh_topic_to_mqtt)
            if remote is None:
                self.counters["refused"] += 1
                continue
            info = self._publish_mqtt(client, remote, ev, 1)
            if info is None:
                continue  # over the broker's limit: counted, and the round goes on
            if not queued(info, self._limits.max_qos):
                # Not queued (paho's message ids all wait for the broker; at QoS 0, the
                # connection gone): this one and the rest go in a later round, and the
                # cursor moves only past those before it.
                seq, full = at - 1, bool(pending)
                break
            pending[info.mid] = (info, ev)
        self._round = Round(seq, full, pending, len(pending))
        return self._settle_round(client)

    def _settle_round(self, client: Any) -> bool:
        """Close the round if the broker has answered it all (True if it was full: come
        back at once); drop it if a QoS 0 message of it was lost (it goes again)."""
        done = self._round
        assert done is not None
        answered = done.done()
        self._take_answers()  # the refusals of those, and maybe of more
        if done.settle(answered):
            self._round = None
        elif done.pending:
            return False
        else:
            self._round = None
            self._spool_done(done.seq, done.sent - len(done.refused))
        if not self.cfg.qos:
            client.on_publish = None  # (paho called it before marking the last one done)
        return self._round is None and done.full and not done.pending


def _nats_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` one token, ``>`` one or more at the end."""
    return matches(pattern, subject, ".")


def _one_line(record: logging.LogRecord) -> bool:
    """A logging filter for nats-py's logger: its errors come with a traceback (a message
    it could not parse, ``_read_loop``), which the node's log never holds; the exception
    goes on the line instead. The bridge says what it does about it."""
    if record.exc_info and record.exc_info[1] is not None:
        record.msg = f"{record.getMessage()}: {record.exc_info[1]!r}"
        record.args = ()
        record.exc_info = None
    return True


class NatsBridge(Bridge):
    """nats-py on an asyncio loop in this thread; ``no_echo`` keeps our exports from
    coming back on our own subscriptions."""

    SEPARATOR = "."

    def _run(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        # A round whose acknowledgement is late: (flush, cursor, sent, client, reconnects)
        self._flushing: tuple[asyncio.Future[Any], int, int, Any, int] | None = None
        asyncio.run(self._until_stopped())

    async def _until_stopped(self) -> None:
        """Run the bridge until ``stop()``, cancelling whatever it awaits then. It checked
        only between rounds, and nats-py's connect to a server that is not there waits
        as long as it likes: the bridge never ended, its socket stayed open, and the
        node's shutdown waited for it for ever (found in review)."""
        main = asyncio.create_task(self._main())
        while not main.done() and not self._stop.is_set():
            await asyncio.wait({main}, timeout=0.1)
        main.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main

    async def _ask(self, nc: Any, sock: zmq.Socket[bytes], subject: str, ev: Any) -> None:
        """A mesh request for a NATS responder: ask, and answer the mesh requester."""
        import nats.errors  # noqa: PLC0415 - optional dependency

        assert ev.reply_to is not None
        headers = self._headers_out(ev)
        if self._over_max_payload(nc, subject, ev.data, headers):
            return  # the mesh requester times out, as below
        try:
            msg = await nc.request(subject, ev.data, timeout=REQUEST_TIMEOUT, headers=headers)
        except nats.errors.NoRespondersError:
            self._no_responders(sock, ev, f"NATS has none for {subject}")
        except nats.errors.TimeoutError:
            return  # the mesh requester times out on its own, as a NATS requester would
        else:
            limit = self.port.max_payload
            if limit and len(msg.data) > limit:  # the node would drop it: say why at once
                why = f"the NATS reply of {len(msg.data)} bytes exceeds the limit of {limit}"
                sock.send(self.port.reply(ev.reply_to, why.encode(), error=True))
                return
            said = from_nats(msg.headers)
            error = "Nats-Service-Error" in said  # the NATS services API's error reply
            data = msg.data or (said["Nats-Service-Error"].encode() if error else b"")
            sock.send(self.port.reply(ev.reply_to, data, headers=said, error=error))

    async def _main(self) -> None:
        import nats  # noqa: PLC0415 - optional dependency

        nats_log = logging.getLogger("nats.aio.client")  # a filter sees its own logger's
        if _one_line not in nats_log.filters:
            nats_log.addFilter(_one_line)

        sock = self._open_port()
        self._open_spool()
        nc: Any = None
        delay = 0.2
        try:
            while not self._stop.is_set():
                if nc is None or nc.is_closed:
                    nc = await self._connect_pumping(nats, sock)
                    if nc is None:
                        self._count_spool()
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 10.0)
                        continue
                    delay = 0.2
                if self._reader_died(nc):
                    await nc.close()  # and connect again at the top of the loop
                    continue
                try:
                    await self._pump(sock, nc)
                except Exception as e:  # a bug of ours (or nats-py's) must not end the bridge
                    n = self.counters["errors"] = self.counters["errors"] + 1
                    if worth_a_line(n, LOG_FIRST):
                        log.error(
                            "bridge %s: %r (total %d; the bridge goes on)", self.cfg.name, e, n,
                            exc_info=e,
                        )  # fmt: skip
                    await asyncio.sleep(1.0)  # a lasting fault: once a second, not a spin
        finally:
            try:
                if nc is not None and not nc.is_closed:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(nc.close(), 1.0)
            finally:  # even if stop() cancels that wait: an open socket holds the node
                sock.close(linger=0)
                if self.spool is not None:
                    self.spool.close()

    async def _connect_pumping(self, nats: Any, sock: zmq.Socket[bytes]) -> Any:
        """``_connect``, answering the node meanwhile: nats-py's first connect to a server
        that is not there retries for ever, and mesh requests on our exports waited out
        their timeouts unread (review)."""
        connecting = asyncio.ensure_future(self._connect(nats))
        try:
            while not connecting.done():
                try:
                    self._pump_down(sock)
                except Exception as e:  # as in _pump: a bug must not end the bridge
                    self.counters["errors"] += 1
                    log.error("bridge %s: %r (the bridge goes on)", self.cfg.name, e, exc_info=e)
                self._count_spool()  # `status` showed no spool while the first connect ran
                await asyncio.wait({connecting}, timeout=POLL_MS / 1000)
            return connecting.result()
        finally:
            connecting.cancel()

    def _pump_down(self, sock: zmq.Socket[bytes]) -> None:
        """What the node sends while there is no connection: live exports are dropped,
        counted, and a request is told at once that nothing there can answer it."""
        while int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
            for ev in self.port.handle(sock.recv()).exports:
                if not self._spooled(ev):
                    self._unsent(sock, ev, self._export_topic(ev.topic, mesh_to_nats))

    def _unsent(self, sock: zmq.Socket[bytes], ev: Event, remote: str | None) -> None:
        """A live export that does not go: its topic has no subject (``remote`` None), or
        the server is away. Counted; a request is told why at once, where it waited out
        its timeout untold."""
        if remote is None:
            self.counters["refused"] += 1
            self._no_responders(sock, ev, f"{ev.topic} has no NATS subject")
        else:
            self.counters["dropped_remote_down"] += 1
            self._no_responders(sock, ev, f"NATS ({self.cfg.name}) is not connected")

    def _reader_died(self, nc: Any) -> bool:
        """True when nats-py's reading task has ended on a connection it holds up: a message
        it cannot parse (any NATS client may publish a subject that is not UTF-8) ends it
        with a log line, and no import arrived again while the bridge said "up" (found in
        an exploratory test). Its own reconnects end it too, but then it is not connected."""
        reading = getattr(nc, "_reading_task", None)  # nats-py's; no public way to ask
        if not (nc.is_connected and reading is not None and reading.done()):
            return False
        n = self.counters["errors"] = self.counters["errors"] + 1
        log.warning(
            "bridge %s: the NATS client stopped reading (a message it could not parse; "
            "total %d): connecting again",
            self.cfg.name, n,
        )  # fmt: skip
        self._set_state("down", "the NATS client stopped reading")
        return True

    async def _drain_spool_nats(self, nc: Any) -> bool:
        """Send the next persistent exports; move the cursor once the server has them all
        (a flush round trip). True if there were some.

        A round whose acknowledgement is late is waited for, not sent again: while a
        server was cut off (a cable pulled for 10 s), each round went again every
        SPOOL_WAIT into nats-py's buffer, and the server got each export up to three
        times once it was back (plant scenario). The flush runs in a task of its own,
        never cancelled at our deadline: nats-py sets the result of a late PONG on the
        cancelled future, and its reading task died of it (InvalidStateError)."""
        if self._flushing is not None:
            task, seq, sent, client, reconnects = self._flushing
            same = client is nc and nc.stats["reconnects"] == reconnects
            if not task.done() and same:
                return False
            self._flushing = None
            if not task.done():  # nats-py forgets the PINGs of a connection it replaced,
                task.cancel()  # and a client we replaced answers none (review: 60 s stall)
                return False
            if task.cancelled() or task.exception() is not None:
                return False  # the connection went: the round goes again
            self._spool_done(seq, sent)
            return True
        got = self._spool_round()
        if got is None:
            return False
        seq, events, _full = got
        sent = 0
        try:
            for ev in events:
                remote = self._export_topic(ev.topic, mesh_to_nats)
                if remote is None:
                    self.counters["refused"] += 1
                    continue
                if not await self._publish_nats(nc, remote, ev.data, self._headers_out(ev)):
                    continue  # never deliverable there: waiting for it would stop the spool
                sent += 1
            flush = asyncio.ensure_future(nc.flush(timeout=FLUSH_GIVE_UP))
            done, _ = await asyncio.wait({flush}, timeout=SPOOL_WAIT)
            if not done:
                self._flushing = (flush, seq, sent, nc, nc.stats["reconnects"])
                return False
            flush.result()
        except Exception as e:  # the server went away mid-round: it goes again later
            log.debug("bridge %s: spool round cut short: %s", self.cfg.name, e)
            return False
        self._spool_done(seq, sent)
        return True

    async def _publish_nats(
        self, nc: Any, subject: str, data: bytes, headers: dict[str, str] | None = None
    ) -> bool:
        """Publish to NATS; False, counted (``refused_too_big``), for a message over the
        server's max_payload (1 MB by default, the mesh allows more): nats-py raises for
        it, which ended the bridge's thread, or stopped its spool at that event for good."""
        if self._over_max_payload(nc, subject, data, headers):
            return False
        await nc.publish(subject, data, headers=headers or None)
        return True

    def _headers_out(self, ev: Event) -> dict[str, str]:
        """An export's NATS headers: its own, and its path out of the mesh (PATH_HEADER)."""
        return nats_headers(ev) | {PATH_HEADER: self.port.path(ev)}

    def _over_max_payload(
        self, nc: Any, subject: str, data: bytes, headers: dict[str, str] | None
    ) -> bool:
        """True (counted, logged) when the server would refuse the message for its size.
        The server counts headers and payload against max_payload, nats-py only the
        payload: an export a few bytes under 1 MiB passed nats-py, the server closed the
        connection for it, and the spool sent it again at every reconnect for good, the
        exports behind it never (exploratory test)."""
        size = len(data) + nats_headers_size(headers)
        if size <= nc.max_payload:
            return False
        self._too_big(subject, size, nc.max_payload)
        return True

    def _too_many_asking(self, sock: zmq.Socket[bytes], ev: Event) -> None:
        """MAX_ASKING requests wait for NATS already: an error reply at once (counted in
        ``refused``). Each waits up to REQUEST_TIMEOUT holding its payload: 100 requests
        a second of 64 KiB that NATS never answered held 200 MB (review)."""
        n = self.counters["refused"] = self.counters["refused"] + 1
        why = f"bridge {self.cfg.name}: {MAX_ASKING} requests already wait for NATS replies"
        if worth_a_line(n, LOG_FIRST):
            log.warning("%s: one refused (refused, total %d)", why, n)
        assert ev.reply_to is not None
        sock.send(self.port.reply(ev.reply_to, why.encode(), error=True))

    def _undecodable(self) -> None:
        n = self.counters["refused"] = self.counters["refused"] + 1
        if worth_a_line(n, LOG_FIRST):
            log.warning(
                "bridge %s: a NATS message whose subject is not UTF-8 was dropped (refused, "
                "total %d)", self.cfg.name, n,
            )  # fmt: skip

    async def _connect(self, nats: Any) -> Any:
        async def on_disconnected() -> None:
            self._set_state("down", "disconnected")

        async def on_reconnected() -> None:
            self._set_state("up")

        async def on_error(e: Exception) -> None:
            log.debug("bridge %s: %s", self.cfg.name, e)
            if self.state != "up":
                # nats-py retries a first connect for ever inside connect() (we ask it to
                # reconnect for ever), so only this callback hears why: the bridge stayed
                # "starting" without a word for a closed port or a wrong password.
                self._set_state("down", str(e) or type(e).__name__)

        try:
            nc = _tolerant_client(nats)()
            nc.on_undecodable = self._undecodable
            await nc.connect(
                servers=[f"{'tls' if self.cfg.tls else 'nats'}://{self.cfg.host}:{self.cfg.port}"],
                tls=self.tls,
                user=self.cfg.username or None,
                password=self.cfg.password or None,
                no_echo=True,
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                connect_timeout=2,
                # A server cut off (no FIN) went unnoticed for the default 2 x 120 s:
                # "up", exports buffered, requests timing out (plant scenario).
                ping_interval=PING_EVERY,
                max_outstanding_pings=3,
                name=f"meshctl-{self.cfg.name}",
                disconnected_cb=on_disconnected,
                reconnected_cb=on_reconnected,
                error_cb=on_error,
            )
        except Exception as e:  # any failure to connect means: retry later
            self._set_state("down", str(e) or type(e).__name__)
            return None

        def taker(i: int) -> Callable[[Any], Awaitable[None]]:
            async def on_msg(msg: Any) -> None:
                # Overlapping imports ("nd.>" and "nd.*") brought a message in once a
                # subscription (exploratory test): only the first matching import's counts.
                first = self._first_import(msg.subject, _nats_matches) if i else -1
                if first not in (-1, i):  # (none matched here: taken, not lost)
                    return
                path = (msg.headers or {}).get(PATH_HEADER, "")
                said = from_nats(msg.headers)
                self._take(msg.subject, msg.data, request_reply(msg.reply), path, headers=said)

            return on_msg

        for i, subject in enumerate(self.cfg.imports):
            await nc.subscribe(subject, cb=taker(i))
        self._set_state("up")
        return nc

    async def _pump(self, sock: zmq.Socket[bytes], nc: Any) -> None:
        busy = False
        while int(sock.getsockopt(zmq.EVENTS)) & _POLLIN:
            busy = True
            incoming = self.port.handle(sock.recv())
            for ev in incoming.exports:
                if self._spooled(ev):
                    continue
                remote = self._export_topic(ev.topic, mesh_to_nats)
                if remote is None or not nc.is_connected:
                    self._unsent(sock, ev, remote)
                elif ev.is_request and ev.reply_to:
                    if len(self._tasks) >= MAX_ASKING:
                        self._too_many_asking(sock, ev)
                        continue
                    self._tasks.add(asyncio.create_task(self._ask(nc, sock, remote, ev)))
                    self.counters["exported"] += 1
                elif await self._publish_nats(nc, remote, ev.data, self._headers_out(ev)):
                    self.counters["exported"] += 1
            for ev in incoming.replies:  # a mesh responder answered a NATS requester
                pending = self._answer(ev.topic.rsplit("/", 1)[-1])
                if pending is None or not nc.is_connected:
                    continue
                if ev.says_no_responders:  # another bridge had none
                    # As NATS says it: it went out as a reply, its text taken for the
                    # answer (review: "NATS has none for svc.x" as a successful reply).
                    await nc.publish(pending[0], b"", headers={"Status": NATS_NO_RESPONDERS})
                else:
                    await self._publish_nats(nc, pending[0], ev.data, nats_headers(ev))
            for event_id in incoming.no_responders:  # nothing in the mesh can answer
                pending = self._forget_request(self._request_ids.get(event_id, ""))
                if pending is not None and nc.is_connected:
                    await nc.publish(pending[0], b"", headers={"Status": NATS_NO_RESPONDERS})
            for refusal in incoming.refused:  # the node dropped the request: say why at once
                pending = self._forget_request(self._request_ids.get(refusal.request, ""))
                if pending is not None:
                    await _answer_error(nc, pending[0], refusal)
        if self.spool is not None and nc.is_connected:
            busy = await self._drain_spool_nats(nc) or busy
        self._count_spool()
        self._tasks = {t for t in self._tasks if not t.done()}
        self._expire_requests()
        busy = self._drain_imports(sock, nats_to_mesh) or busy
        unmapped, self._unmapped = self._unmapped, []
        for reply, refusal in unmapped:
            await _answer_error(nc, reply, refusal)
        self._send_notices(sock)
        await asyncio.sleep(0 if busy else 0.005)


_TOLERANT: list[type] = []


def _tolerant_client(nats: Any) -> type:
    """nats-py's client, but a message whose subject, reply subject or header status line
    is not UTF-8 is dropped and told (``on_undecodable``) instead of raising in its
    reading task: any NATS client may publish one, and the reconnect it caused lost the
    messages right behind it (200 of 200 back to back; exploratory test, and review for
    the status line)."""
    if not _TOLERANT:

        class TolerantClient(nats.aio.client.Client):  # type: ignore[misc,name-defined]
            on_undecodable: Callable[[], None] = staticmethod(lambda: None)  # type: ignore[assignment]

            async def _process_msg(self, *args: Any, **kwargs: Any) -> Any:
                try:
                    return await super()._process_msg(*args, **kwargs)
                except UnicodeDecodeError:
                    self.on_undecodable()
                    return None

        _TOLERANT.append(TolerantClient)
    return _TOLERANT[0]


def _reserved(topic: str) -> bool:
    """The node's own events (``$...``) and request replies (``_INBOX/...``): never from
    outside through a bridge."""
    return is_reserved(topic.split("/", 1)[0])


async def _answer_error(nc: Any, reply: str, refusal: Refusal) -> None:
    """A NATS service error reply (the headers of the NATS services API, nats.micro), so a
    requester learns at once why the mesh refused its request instead of timing out."""
    if nc.is_connected:
        code = _ERROR_CODES.get(refusal.code, "400")
        headers = {"Nats-Service-Error": refusal.error, "Nats-Service-Error-Code": code}
        await nc.publish(reply, refusal.error.encode(), headers=headers)


def start_bridges(
    configs: tuple[BridgeConfig, ...],
    ctx: zmq.Context[zmq.Socket[bytes]],
    endpoint: str,
    register: Callable[[bytes], None],
    data_dir: Path | None = None,
    tls: dict[str, ssl.SSLContext] | None = None,
    node_id: str = "",
    in_mesh: Callable[[str], bool] = lambda _node: False,
) -> list[Bridge]:
    """Start one actor per ``[[bridge]]``; ``register`` tells the node their identities.
    ``tls`` holds the TLS contexts `meshctl up` built (by bridge name); missing ones are
    built here (ConfigError if their files are unusable)."""
    bridges: list[Bridge] = []
    for i, cfg in enumerate(configs):
        ident = b"\x00bridge" + i.to_bytes(2, "big") + time.time_ns().to_bytes(8, "big")
        register(ident)
        cls = MqttBridge if cfg.kind == "mqtt" else NatsBridge
        context = (tls or {}).get(cfg.name) or client_context(cfg, where=f"bridge[{i}]")
        bridge = cls(cfg, ctx, endpoint, ident, data_dir, context, node_id, in_mesh)
        bridge.start()
        bridges.append(bridge)
    return bridges
