"""The node's I/O shell: one ROUTER socket (tcp + ipc), one poll loop, no decisions.

Frames are read in batches and handed to the Router core; whatever it returns is sent with
NOBLOCK so that a slow client can never stall the loop: a full queue is a counted drop.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, Final, Protocol

import zmq
from zmq.utils.monitor import recv_monitor_message

from node import __version__, datadir, discovery, heap
from node.codec import MAX_STATE_BYTES, Kind, encode_control
from node.config import NodeConfig
from node.dialers import HANDSHAKE_TIMEOUT, KEY_REFUSED, Dialers, zmtp_silence
from node.drops import worth_a_line
from node.durable import Durable, DurableConfig
from node.errors import InputError
from node.loop_discovery import DiscoverySide
from node.loop_security import (
    DRAIN_BATCH,
    PASS_BYTES,
    POLLIN,
    SecureSide,
    events_of,
    from_network,
)
from node.mesh import SELF
from node.renewal import Renewal
from node.residents import Resident, Residents
from node.router import Router
from node.security import REVOKED_SELF, Security, join_links
from node.spool import SpoolReader
from node.store import open_store

log = logging.getLogger("meshctl.node")

PROBE_INTERVAL: Final = 0.5  # how often silent clients are probed for liveness
IDLE_BEFORE_PROBE: Final = 1.0
MAX_POLL_MS: Final = 100  # upper bound on reacting to a stop request
LINK_TICK: Final = 0.1  # how often dials, handshakes and heartbeats are looked at
LAST_WORDS_MS: Final = 200  # what a stopping node's sockets may take to send their last
MAX_SOCKETS: Final = 16_384  # libzmq sockets (one per dialed link), not the files' limit
SPIN_AFTER_PASS_BELOW: Final = 16 * 1024  # bytes read lately (see run); more: a stream
RECENT_CAP: Final = 4 * SPIN_AFTER_PASS_BELOW  # a stream's end lets the spin back in ~11 passes
SPIN_SOCKETS: Final = 32  # dialed links beyond which the loop polls instead of spinning
_PING: Final = encode_control(Kind.PING, {})
_LINK_KIND: Final = bytes((Kind.LINK,))
_HANDSHAKE_FAILED: Final = (
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


@dataclass(frozen=True, slots=True)
class Identity:
    """Who this node is, once its data dir has been read."""

    node_id: str
    name: str
    data_dir: Path


def fade(recent: int, pass_bytes: int) -> int:
    """The heaviest recent pass's bytes, fading by 1/8 a pass, capped (see Node.run)."""
    return min(max(recent * 7 >> 3, pass_bytes), RECENT_CAP)


class Node(SecureSide, DiscoverySide):
    """A running node: sockets, the poll loop and the Router core."""

    def __init__(
        self, config: NodeConfig, identity: Identity, security: Security | None = None
    ) -> None:
        self.config = config
        self.security = security
        self.identity = identity
        self.ctx = zmq.Context()
        # One socket per link we dial: libzmq's default of 1,023 sockets ended the node
        # (an uncaught error in the dial) in a mesh of ~1,000 nodes.
        self.ctx.set(zmq.MAX_SOCKETS, MAX_SOCKETS)
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.endpoints: list[str] = []
        self._ipc_path: Path | None = None  # the ipc socket's file, removed at close
        self.started = time.monotonic()
        self._stop = False
        self._pass_bytes = 0
        self._recent_bytes = 0  # the heaviest recent pass's bytes, fading (see run)
        self.plugins: list[Plugin] = []
        self.durable = _open_durable(config, identity.data_dir)
        self.router = Router(
            node_id=identity.node_id,
            name=identity.name,
            mesh=config.mesh,
            max_payload=config.max_payload,
            max_clients=config.max_clients,
            max_subscriptions=config.max_subscriptions,
            wall_ns=time.time_ns,
            log=log.info,
            dead_after=config.dead_after,
            epoch=datadir.next_epoch(identity.data_dir, time.time_ns()),
            durable=self.durable,
            client_queue=config.client_queue,
        )
        self.router.status_extra = self._status_extra
        self.residents = Residents(self.router)
        self._poll_changed = True
        self.router.peers_extra = self._dialer_view
        self.dialers = Dialers(
            self.ctx,
            max_payload=config.max_payload,
            backoff_max=config.backoff_max,
            curve=None if security is None else security.dial_curve,
            silent_ms=zmtp_silence(config.dead_after),
        )
        for url in config.links:
            self.dialers.add(url, "static", 0.0)
        self._keys: dict[bytes, str] = {}  # ROUTER identity -> CURVE key it proved ("" local)
        self._pins: dict[str, str] = {}  # node id -> CurveZMQ key of its proven links
        self._synced: set[str] = set()  # linked nodes that have our revocations
        self.renewal = None if security is None else Renewal(security, log.warning)
        if security is not None:
            self.router.net.proof = security.creds.member
            for url, key in join_links(identity.data_dir):
                self.dialers.add(url, "static", 0.0, key)
        self.discovery: discovery.Discovery | None = None
        self.discovered: dict[str, dict[str, Any]] = {}  # mDNS service name -> TXT + url

    def bind(self) -> None:
        """Open the listeners; the tcp port may be 0, and the real one is recorded."""
        s = self.sock
        s.setsockopt(zmq.ROUTER_MANDATORY, 1)  # full queue -> EAGAIN we can count; gone -> error
        s.setsockopt(zmq.SNDHWM, self.config.client_queue)
        s.setsockopt(zmq.RCVHWM, 10_000)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.HEARTBEAT_IVL, 1000)  # libzmq drops hung peers; we notice on send
        # As the dialers': links that peers dialed come in here too, and at a fixed 3 s a
        # pause shorter than mesh.dead_after cut them, for dead_after (review). Clients
        # share it: a silent one is noticed after as long (3 s at the default).
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, self.dialers.silent_ms)
        s.setsockopt(zmq.HANDSHAKE_IVL, 2000)
        # Backstop only: the router refuses oversized payloads with an explicit error first.
        # Twice the limit, so a client that ignores it by up to 2x (a 2 MiB event at the
        # 1 MiB default) hears why; beyond that libzmq cuts the connection unread.
        s.setsockopt(zmq.MAXMSGSIZE, max(2 * self.config.max_payload, MAX_STATE_BYTES) + 192 * 1024)
        self._monitor = s.get_monitor_socket(_HANDSHAKE_FAILED)
        # Local endpoints first, without CURVE: libzmq copies security options into each
        # listener at bind time, so ipc (guarded by the data dir's 0700) and inproc stay
        # plain while the TCP listener bound after serve_curve() is CURVE + ZAP only.
        ipc = ""
        if self.config.ipc:
            ipc = datadir.ipc_endpoint(self.identity.data_dir)
            Path(ipc[len("ipc://") :]).unlink(missing_ok=True)  # stale file of a dead node
            s.bind(ipc)
            Path(ipc[len("ipc://") :]).chmod(0o600)
            self._ipc_path = Path(ipc[len("ipc://") :])
        # In-process actors (bridges) connect here; inproc needs this node's context.
        self.inproc = f"inproc://meshctl-{self.identity.node_id}"
        s.bind(self.inproc)
        if self.security is not None:
            self.security.serve_curve(s)
        tcp = f"tcp://{self.config.listen}:{self.config.port}"
        try:
            s.bind(tcp)
        except zmq.ZMQError as e:
            if e.errno == errno.ENODEV:  # not an address or interface of this host: input
                raise InputError(
                    f"cannot listen on {tcp}: {self.config.listen!r} is not an IPv4 address "
                    "or a network interface of this host (listen.address, --listen)"
                ) from None
            raise OSError(f"cannot listen on {tcp}: {e.strerror}") from None
        self.endpoints.append(s.getsockopt_string(zmq.LAST_ENDPOINT))
        self.router.net.endpoints = tuple(
            discovery.wildcard_to_address(e, self.config.interfaces) for e in self.endpoints
        )
        if ipc:
            self.endpoints.append(ipc)

    def attach(self, resident: Resident) -> None:
        """Run ``resident`` on this loop's thread (node/residents.py); before ``run``."""
        self.residents.attach(resident)
        self._poll_changed = True

    def _status_extra(self, now: float) -> dict[str, Any]:
        # A plugin whose status names a "section" gets a key of its own (the MQTT
        # listener: "mqtt"); the others are listed as bridges.
        bridges: list[dict[str, Any]] = []
        sections: dict[str, dict[str, Any]] = {}
        spool = self.durable.spool if self.durable is not None else None
        readers = spool.readers_now() if spool is not None else {}
        for status in (p.status() for p in self.plugins):
            key = status.pop("section", None)
            if key is None:
                bridges.append(_with_spool(status, readers))
            else:
                sections[key] = status
        return {
            **sections,
            "version": __version__,
            "pid": os.getpid(),
            "data_dir": str(self.identity.data_dir),
            "endpoints": self.endpoints,
            # By the clock as it is now: one that NTP set after the start showed 1970.
            "started": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - (now - self.started))
            ),
            "uptime_s": round(now - self.started, 3),
            "bridges": bridges,
            "security": {"mode": "insecure"} if self.security is None else self.security.view(),
            "limits": {
                "max_payload": self.config.max_payload,
                "client_queue": self.config.client_queue,
                "max_clients": self.config.max_clients,
                "max_subscriptions": self.config.max_subscriptions,
            },
        }

    def request_stop(self, *_: object) -> None:
        """Ask the loop to finish its current pass and shut down."""
        self._stop = True

    def run(self) -> None:
        """Serve until a stop is requested (SIGINT/SIGTERM in the foreground)."""
        spin = self.config.spin_us / 1e6
        poller = self._new_poller()  # one Poller: Socket.poll() would build one per call
        residents = self.residents
        now = time.monotonic()
        self.router.emit_system("$mesh/node/up", {"endpoints": self.endpoints}, now)
        next_probe = now + PROBE_INTERVAL
        next_link_tick = now
        next_trim = now + heap.TRIM_EVERY
        drain = self._drain if self.security is None else self._drain_secure
        while not self._stop:
            if self.dialers.changed or self._poll_changed:
                poller = self._new_poller()
            ready: dict[Any, int] = {}
            # Spin only while passes are light (request-reply, trickles): under a stream
            # the CPU is better left to the publishers and subscribers. Lately, not just the
            # last pass: an MQTT stream alternates passes of one packet and of dozens. So
            # the heaviest recent pass, fading by 1/8 a pass (a steady load of passes under
            # the bound still spins, as before).
            recent = self._recent_bytes = fade(self._recent_bytes, self._pass_bytes)
            light = recent < SPIN_AFTER_PASS_BELOW
            self._pass_bytes = 0
            spun = light and self._spin(spin)
            residents_busy = False
            if not spun:
                if residents.by_ident and residents.busy():
                    residents_busy = True
                    timeout = 0  # its callbacks are ready: asyncio's "call soon"
                else:
                    wait = 0.0 if self.router.busy() else min(next_probe, next_link_tick) - now
                    timeout = max(0, min(MAX_POLL_MS, int(wait * 1000) + 1))
                ready = dict(poller.poll(timeout))
            now = time.monotonic()
            drain(now)
            if len(ready) != 1 or self.sock not in ready:
                self._drain_dialers(now, None if spun else ready)
                self._read_discovery(now)
            # Residents step when they have input or work, and at each link tick (their
            # timers), not on every pass of a stream that does not concern them.
            if residents.by_ident and (
                spun or residents_busy or now >= next_link_tick or residents.readable(ready)
            ):
                self._pass_bytes += residents.step(now)
            if now >= next_link_tick:
                if self.security is not None:
                    self._security_tick(now)
                self._link_tick(now)
                self.router.tick(now)
                next_link_tick = now + LINK_TICK
            self.router.end_pass(now)
            if now >= next_probe:
                self._read_monitor()
                self._probe(now)
                next_probe = now + PROBE_INTERVAL
                if now >= next_trim:
                    heap.give_back()
                    next_trim = now + heap.TRIM_EVERY
            self._flush(now)
        # MQTT clients' wills first: their connections end with the node, and MQTT 3.1.1
        # publishes a will whenever a connection closes without DISCONNECT (a stopping
        # node sent none, and a device's retained "online" stayed for good: exploratory
        # test). Then the node's own last word, then the pass's commit and output.
        residents.last_words(time.monotonic())
        self.router.emit_system("$mesh/node/down", {"reason": "stopped"}, time.monotonic())
        self.router.end_pass(time.monotonic())
        self._flush(time.monotonic())
        # After the last events: a link the peer drops at our goodbye takes nothing that
        # comes behind it (review: our node/down never reached the other nodes).
        self.router.net.goodbye()
        self._flush(time.monotonic())

    def _new_poller(self) -> zmq.Poller:
        self.dialers.changed = self._poll_changed = False
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        for fd in self.residents.fds():
            poller.register(fd, zmq.POLLIN)
        if self.discovery is not None:
            poller.register(self.discovery.pipe, zmq.POLLIN)
        for s in self.dialers.sockets():
            poller.register(s, zmq.POLLIN)
        return poller

    def _drain_dialers(self, now: float, ready: dict[Any, int] | None) -> None:
        """Read frames that arrived on links we dialed: on those the poll found ready, or
        on all after a spin (which it does only while they are few). Asking every one
        each pass kept the thread 36% busy at 250 links with nothing but heartbeats."""
        socks = self.dialers.by_sock
        items = socks.items() if ready is None else [(s, socks[s]) for s in ready if s in socks]
        handle = self.router.handle_dialed
        for sock, d in list(items):
            events = events_of(sock)
            budget = self._pass_bytes + PASS_BYTES
            for _ in range(DRAIN_BATCH):
                # A frame just read may have removed this dialer (a REVOKE naming its peer
                # closes the socket at once): asking a closed socket ended the node.
                if socks.get(sock) is not d:
                    break
                if self._pass_bytes > budget or not events(zmq.EVENTS) & POLLIN:
                    break
                frame = sock.recv()
                self._pass_bytes += len(frame)
                if self.security is not None and not self._admit_dialed(d.url, frame, now):
                    continue
                handle(d.url, d.found, frame, now)

    def _link_tick(self, now: float) -> None:
        """Dial what is due, time out stuck handshakes, notice links that went down."""
        net = self.router.net
        revoked = self.security is not None and self.security.self_revoked
        # Once per tick, not per dialer: the hello carries our whole interest (23 ms at
        # 20,000 patterns), and 500 dialers due at once held the thread 18 s.
        hello: bytes | None = None
        discovered: set[str] | None = None
        for d in list(self.dialers.by_url.values()):
            if d.state in ("idle", "backoff") and now >= d.next_try:
                if revoked:  # every member refuses us now: dialing would only be noise
                    d.last_error, d.next_try = REVOKED_SELF, now + 3600.0
                    continue
                if d.peer_id == self.identity.node_id:  # a link to ourselves: never useful
                    d.state, d.last_error, d.next_try = "stopped", SELF, now + 3600.0
                    continue
                link = net.links.get(d.peer_id or "")
                if link is not None and link.via != d.url:
                    d.next_try = now + 1.0  # already linked the other way round: stand by
                    continue
                hello = hello or net.hello()
                self.dialers.dial(d, hello, now)
            elif d.state == "dialing":
                if d.url in net.by_via:
                    d.state, d.attempt, d.peer_id, d.last_error = "up", 0, net.by_via[d.url], ""
                    self.dialers.end_monitor(d)
                elif now - d.dial_started > HANDSHAKE_TIMEOUT:
                    why = self.dialers.handshake_failure(d)
                    if why == KEY_REFUSED and d.last_error != KEY_REFUSED:
                        log.warning("%s: %s", d.endpoint, why)  # once, not every redial
                    d.last_error = why or f"no answer within {HANDSHAKE_TIMEOUT:g}s"
                    self.dialers.backoff(d, now)
            elif d.state == "up" and d.url not in net.by_via:
                self.dialers.backoff(d, now)
            if d.found == "mdns" and d.state != "up":
                discovered = self._discovered_urls() if discovered is None else discovered
                if d.url not in discovered:
                    self.dialers.remove(d.url)  # mDNS said goodbye: stop redialling
        net.tick(now, self.config.heartbeat)

    def _close_refused(self, now: float) -> None:
        net = self.router.net
        for via in net.closed:
            d = self.dialers.by_url.get(via) if isinstance(via, str) else None
            if d is not None:
                d.last_error = net.refusals.get(via, "link down")
                if d.url in net.known_dialers:
                    d.peer_id = net.known_dialers[d.url]
                self.dialers.backoff(d, now)
        net.closed.clear()

    def _spin(self, seconds: float) -> bool:
        """Busy-wait up to ``seconds`` for input; True if some arrived.

        A reply usually follows a forwarded request within ~100 µs; catching it without a
        sleep/wake cycle halves request-reply latency (measured: 4-hop p50 219 -> 96 µs).
        The cost is at most ``seconds`` of CPU after each burst; ``tuning.spin_us = 0``
        turns it off for devices where idle CPU matters more.

        Never while in-process actors with threads of their own run (bridges, the
        uplink): the spin holds the interpreter lock, so they waited it out (an MQTT QoS 1
        round trip took 601 µs with the spin and 347 µs without, p50, store off, when the
        listener was a thread). Residents run on this thread: the spin watches their
        descriptors, and ends at once when one has work that must not wait.
        """
        if seconds <= 0 or len(self.dialers.by_sock) > SPIN_SOCKETS:
            return False  # many links: one round of asking them all outlasts the spin
        residents = self.residents
        if any(i not in residents.by_ident for i in self.router.internal):
            return False
        if residents.by_ident and residents.busy():
            return True
        checks = [events_of(self.sock), *(events_of(s) for s in self.dialers.by_sock)]
        input_now = residents.input_now if residents.by_ident else None
        clock = time.perf_counter
        end = clock() + seconds
        while clock() < end:
            for events in checks:
                if events(zmq.EVENTS) & POLLIN:
                    return True
            if input_now is not None and input_now():
                return True
        return False

    def _drain(self, now: float) -> None:
        sock = self.sock
        recv = sock.recv
        handle = self.router.handle
        known = self.router.clients
        links = self.router.net.by_via
        residents = self.residents.by_ident
        internal = self.router.internal
        events = events_of(sock)
        budget = self._pass_bytes + PASS_BYTES
        for _ in range(DRAIN_BATCH):
            # Asking EVENTS is cheaper than catching zmq.Again.
            if self._pass_bytes > budget or not events(zmq.EVENTS) & POLLIN:
                return
            ident = recv()
            if ident in internal:  # the node's own actors come over inproc, nothing else
                msg = recv(copy=False)
                frame = msg.bytes
                if ident in residents or from_network(msg):
                    self._impostor(ident)
                    continue
            elif ident in known or ident in links:
                frame = recv()
            else:  # a newcomer: if it is a node dialing us, keep its address for `peers`
                msg = recv(copy=False)
                frame = msg.bytes
                if frame[1:2] == _LINK_KIND:
                    self.router.net.note_address(ident, str(msg.get("Peer-Address") or ""))
            if sock.getsockopt(zmq.RCVMORE):
                while sock.getsockopt(zmq.RCVMORE):
                    recv()
                self.router.bad_frame(ident, "multi-part message (the protocol sends one frame)")
                continue
            self._pass_bytes += len(frame)
            handle(ident, frame, now)

    def _impostor(self, ident: bytes) -> None:
        """A frame from the network under the identity of one of the node's own actors:
        the MQTT listener has no socket, and the bridges and the uplink come over inproc.
        A client that set its routing id so took the listener's session (every MQTT
        subscription went), or the place of a bridge whose thread had ended, and passed
        the client and subscription limits as an internal actor (reviews). Dropped,
        counted, logged (no answer: it would go to the actor)."""
        self.router.counters.bad_frames += 1
        self.router.log(f"dropped a frame from the network claiming the identity {ident.hex()}")

    def _flush(self, now: float) -> None:
        send = self.sock.send
        router = self.router
        residents = self.residents.by_ident
        for dest, frame, count in router.take_output():
            if isinstance(dest, str):
                self._send_dialed(dest, frame, now)
                continue
            if dest in residents:
                self.residents.take(dest, frame)
                if count:
                    router.delivered(dest, count)
                continue
            try:
                send(dest, zmq.NOBLOCK | zmq.SNDMORE)
                send(frame, zmq.NOBLOCK)
            except zmq.Again:
                if count:
                    router.dropped(dest, count, now)
                else:
                    router.link_dropped(dest, frame, now)
                continue
            except zmq.ZMQError as e:
                if e.errno == zmq.EHOSTUNREACH:
                    router.gone(dest, now)
                    continue
                raise
            if count:
                router.delivered(dest, count)
        if residents:
            self.residents.flush()
        if router.net.closed:
            self._close_refused(now)

    def _send_dialed(self, url: str, frame: bytes, now: float) -> None:
        d = self.dialers.by_url.get(url)
        if d is None or d.sock is None:
            return
        try:
            d.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            self.router.link_dropped(url, frame, now)

    def _probe(self, now: float) -> None:
        """Send a tiny PING to silent clients; libzmq reports a vanished peer as unreachable."""
        for ident in self.router.idle_clients(now, IDLE_BEFORE_PROBE):
            if ident in self.residents.by_ident:
                continue  # on this thread: it cannot vanish unnoticed
            try:
                self.sock.send(ident, zmq.NOBLOCK | zmq.SNDMORE)
                self.sock.send(_PING, zmq.NOBLOCK)
            except zmq.Again:
                continue
            except zmq.ZMQError as e:
                if e.errno != zmq.EHOSTUNREACH:
                    raise
                self.router.drop_client(ident, "connection lost", now)

    def _read_monitor(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            if event["event"] & _HANDSHAKE_FAILED:
                c = self.router.counters
                c.bad_handshakes += 1
                if worth_a_line(c.bad_handshakes):
                    log.warning(
                        "a connection ended before its ZMTP handshake did: garbage, or a "
                        "peer that gave up (total %d)",
                        c.bad_handshakes,
                    )

    def close(self) -> None:
        """Close sockets and the context; safe to call twice."""
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
        # A moment for the last frames (node/down, the links' goodbye) to leave: closed
        # at once, they were lost as often as not.
        self.dialers.close_all(LAST_WORDS_MS)
        if self.durable is not None:
            self.durable.close()
            self.durable = None
        if not self.sock.closed:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)
            self.sock.close(linger=LAST_WORDS_MS)
        if self._ipc_path is not None:
            # Left behind, it named a node that was gone: local commands chose it over
            # the TCP port and said "cannot reach a node" (exploratory test).
            self._ipc_path.unlink(missing_ok=True)
            self._ipc_path = None
        if self.security is not None:
            self.security.stop()
        self.ctx.term()


def _open_durable(config: NodeConfig, data_dir: Path) -> Durable | None:
    """The store and the durable core, unless ``store.enabled = false``; StoreError if the
    store is unusable (the node refuses to start rather than serve it short)."""
    if not config.store:
        return None
    store = open_store(data_dir, sync=config.store_sync)
    readers = _spool_readers(config, data_dir)
    _cursors_past_the_log(readers, store.log_head())
    return Durable(
        store,
        DurableConfig(
            log_patterns=config.log_patterns,
            log_max_bytes=config.log_max_bytes,
            log_max_age=config.log_max_age,
            spool_readers=readers,
            spool_max_bytes=config.spool_max_bytes,
            spool_overflow=config.spool_overflow,
        ),
        time.time_ns,
    )


def _cursors_past_the_log(readers: tuple[SpoolReader, ...], head: int) -> None:
    """A cursor past the log's head: the store was moved aside (as the node advises when
    it cannot open it) or restored from a backup, or a power cut took the log's last
    commits (sync = normal) but not the cursor's. Kept, the new log's first events
    counted as sent, and every export was lost in silence (exploratory test). What the
    log holds up to its head was sent in each case (a backup is a copy of the same log),
    so each reader goes on from the head; resending from 0 duplicated the whole log in
    the cloud after a power cut (review)."""
    for r in readers:
        cursor = datadir.read_cursor(r.cursor_path)
        if cursor is None or cursor <= head:
            continue
        datadir.write_cursor(r.cursor_path, head)
        log.warning(
            "%s: its cursor %d is past the store's log (head %d): the store was replaced "
            "or lost its last commits; it sends what comes after %d",
            r.name,
            cursor,
            head,
            head,
        )


def _with_spool(status: dict[str, Any], readers: dict[str, dict[str, int]]) -> dict[str, Any]:
    """A bridge's or the uplink's status with the node's count of what it has to send.
    Its own count is every log entry after its cursor, exports or not: it said 632
    entries where the uplink had 120 to send (exploratory test)."""
    name = "uplink" if status.get("kind") == "uplink" else f"bridge {status.get('name')}"
    mine, own = readers.get(name), status.get("spool")
    if mine is not None and own is not None:
        status["spool"] = {**own, "entries": mine["entries"], "bytes": mine["bytes"]}
        if not mine["entries"]:  # its age was the first log entry after the cursor, any topic
            status["spool"]["oldest_age_s"] = None
    return status


def _spool_readers(config: NodeConfig, data_dir: Path) -> tuple[SpoolReader, ...]:
    """The uplink and each exporting bridge: what each reads from the log, from where."""
    readers = []
    if config.uplink_url:
        path = datadir.uplink_cursor_path(data_dir)
        readers.append(
            SpoolReader(
                "uplink", path, config.uplink_export, persistent_only=False, from_start=True
            )
        )
    for b in config.bridges:
        if b.exports:
            path = datadir.bridge_cursor_path(data_dir, b.name)
            readers.append(SpoolReader(f"bridge {b.name}", path, b.exports, persistent_only=True))
    return tuple(readers)


class Plugin(Protocol):
    """An in-process actor started with the node (a bridge, the MQTT listener): stopped
    with it, and shown in its status (under "bridges", or under the key its status dict
    names as "section")."""

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


GC_THRESHOLD: Final = (10_000, 10, 10)


FEW_FILES: Final = 4096  # an open-files limit below this is warned about at start


def raise_file_limit(ceiling: int = 1 << 20) -> int:
    """Raise this process's soft limit on open files to its hard limit (at most
    ``ceiling``); returns the soft limit now in force.

    Each dialed link holds two files (its socket's mailbox and its connection) and each
    client one. Under the common soft limit of 1,024 a node ran out near 500 links, and
    mostly inside libzmq's own thread, where no error reaches the loop: dials hung and
    new clients got nothing through. Brokers raise it the same way."""
    try:
        import resource  # noqa: PLC0415 - POSIX only
    except ImportError:  # pragma: no cover - not POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = ceiling if hard == resource.RLIM_INFINITY else min(hard, ceiling)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _tune_memory(config: NodeConfig) -> None:
    """Collect less often, never walk what start-up made, and keep freed heap for reuse
    (node/heap.py).

    A node allocates steadily and keeps large, long-lived tables (the interest of every
    node of the mesh). With CPython's default first threshold (700 new containers),
    collections walked those tables again and again: adopting the state of a neighbour
    with 60,000 patterns took 1.2 s (past a fast heartbeat bound) and takes 0.45 s now.
    The node's garbage holds few cycles, so rarer collections cost little memory.
    """
    gc.set_threshold(*GC_THRESHOLD)
    gc.freeze()  # imports, config, sockets: permanent, out of every later collection
    if config.heap_keep and not heap.keep_freed(config.heap_keep):
        log.debug("tuning.heap_keep: the C library takes no such setting here")


def serve(
    config: NodeConfig,
    identity: Identity,
    plugins: Callable[[Node], list[Plugin]] | None = None,
    security: Security | None = None,
    ready: Callable[[], None] | None = None,
) -> None:
    """Run a node in the foreground until SIGINT or SIGTERM; logs one line per notable event.
    ``ready`` is called once every listener is bound (`up --detach` waits for it).

    ``plugins`` starts in-process actors once the node listens (``meshctl up`` passes the
    edge bridges this way, so node/ never imports edge/).
    """
    files = raise_file_limit()  # before any socket: see there
    if 0 < files < FEW_FILES:
        # libzmq (4.3.5) aborts the process when a local (ipc) client connects while the
        # open files are used up, which a flood of TCP connections can do (exploratory
        # test: 148 connections that never handshake, then `meshctl status`, at 128).
        log.warning(
            "open files limited to %d (ulimit -n, LimitNOFILE): a flood of connections can "
            "use them up, and the node then aborts when a local client connects; allow at "
            "least %d",
            files,
            FEW_FILES,
        )
    datadir.write_pid(identity.data_dir)  # first: a second node must not open the store
    try:
        node = Node(config, identity, security)
    except BaseException:
        datadir.remove_pid(identity.data_dir)
        raise
    if security is not None:
        security.start(node.ctx)  # before bind: with no ZAP handler CURVE fails closed
    else:
        log.warning(
            "INSECURE: open mode (--insecure): no encryption, no membership; anyone who "
            "reaches this node or advertises mesh %r joins",
            config.mesh,
        )
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        node.request_stop()

    listening = False
    try:
        node.bind()
        node.start_discovery()
        if plugins is not None:
            node.plugins = plugins(node)
        for s in old:
            signal.signal(s, on_signal)
        log.info(
            "node %s (%s) of mesh %r listening on %s",
            identity.node_id,
            identity.name,
            config.mesh,
            ", ".join(node.endpoints),
        )
        listening = True
        if ready is not None:
            ready()
        _tune_memory(config)
        node.run()
    finally:
        for s in old:
            # A second signal while the node saves what it keeps (MQTT sessions: seconds
            # for a large one) killed it mid-save and every session was lost; `meshctl
            # down` said "did not stop within 5s", and a second `down` did it (review).
            signal.signal(s, _stopping_already)
        try:
            for plugin in node.plugins:
                plugin.stop()
            node.close()
            datadir.remove_pid(identity.data_dir)
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        if listening:  # after a failed start, the error says it all (a line less)
            log.info("node stopped")


def _stopping_already(signum: int, _frame: FrameType | None) -> None:
    log.info("received %s while stopping: the stop goes on", signal.Signals(signum).name)
