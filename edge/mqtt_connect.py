"""CONNECT on the MQTT listener: who may in, with which rules, and which session it gets.

A mixin of edge/mqtt_listener.py's MqttListener, split out to keep modules small; it
works on the listener's own state (the annotations below name what it uses). Passwords
are hashed in one worker thread while the client's reading waits (edge/mqtt_auth.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final

from edge.mapping import mqtt_filter_to_mesh, mqtt_shared
from edge.mqtt_auth import Authenticator
from edge.mqtt_codec import (
    CONNACK_BAD_CREDENTIALS,
    CONNACK_BAD_PROTOCOL,
    CONNACK_ID_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    CONNACK_SERVER_UNAVAILABLE,
    PROTOCOLS,
    Connack,
    Connect,
    encode,
)
from edge.mqtt_session import Session, SessionTable
from node.drops import worth_a_line
from node.membership import Permissions

if TYPE_CHECKING:
    from edge.mqtt_conn import MqttConnection

log = logging.getLogger("meshctl.node")

MAX_PENDING_CHECKS: Final = 32  # passwords waiting for the hashing worker (~1.5 s of work)
LOG_FIRST: Final = 20  # refusals and protocol errors logged one by one, then every 1000th


class ConnectSide:
    """CONNECT: the password check, the rules, session takeover and resumption."""

    # The listener's state this side works on (set in MqttListener.__init__).
    cfg: Any  # edge.mqtt_listener.ListenerConfig
    auth: Authenticator
    sessions: SessionTable
    counters: dict[str, int]
    _online: dict[str, MqttConnection]
    _hasher: ThreadPoolExecutor
    _loop: asyncio.AbstractEventLoop
    _checking: int
    _drop: Callable[[MqttConnection, str], None]
    _will: Callable[[MqttConnection, Connect], None]
    _forget: Callable[[Session], None]
    _mesh_topic: Callable[[str], bytes | None]
    closed: Callable[[MqttConnection], None]

    def _on_connect(self, conn: MqttConnection, c: Connect) -> None:
        # "MQTT" comes with level 4 and "MQIsdp" (3.1) with 3; another pair is refused,
        # as mosquitto does [MQTT-3.1.2-2] (it was accepted: conformance review).
        if c.level not in (3, 4) or PROTOCOLS.get(c.protocol) != c.level:
            conn.write(encode(Connack(False, CONNACK_BAD_PROTOCOL)))
            conn.close()
            return
        if c.username is not None and not self.auth.names_checked():
            # Anonymous, name and all: an unchecked name must not own a session that
            # another client claiming it would take over (review).
            c = dataclasses.replace(c, username=None, password=None)
        verdict = self.auth.quick(c.username, c.password)
        if verdict is not None:
            self._admit(conn, c, verdict)
            return
        # A password to hash (tens of ms): in the worker, while this client's reading waits.
        if self._checking >= MAX_PENDING_CHECKS:  # a flood: refuse at once, do not queue
            self.counters["auth_failures"] += 1
            conn.write(encode(Connack(False, CONNACK_SERVER_UNAVAILABLE)))
            conn.close()
            return
        self._checking += 1
        conn.verifying = True
        if conn.transport is not None:
            conn.transport.pause_reading()
        fut = self._loop.run_in_executor(self._hasher, self._check, conn, c)
        fut.add_done_callback(lambda f: self._verified(conn, c, f))

    def _check(self, conn: MqttConnection, c: Connect) -> Permissions | int | None:
        """In the worker: None for a client that has gone meanwhile with nothing else to
        handle (nothing to hash)."""
        if conn.closing and not conn.lost:
            return None
        return self.auth.verify(c.username, c.password)

    def _verified(self, conn: MqttConnection, c: Connect, fut: asyncio.Future[Any]) -> None:
        self._checking -= 1
        if fut.cancelled() or (conn.closing and not conn.lost):
            conn.verifying = False
            self._gone(conn)
            return
        try:
            verdict = fut.result()
        except Exception:
            log.exception("MQTT client %s: checking its password failed", conn.peer)
            verdict = CONNACK_NOT_AUTHORIZED
        if verdict is not None:
            conn.resume(lambda: self._admit(conn, c, verdict))
        self._gone(conn)

    def _gone(self, conn: MqttConnection) -> None:
        """A connection lost while its password was checked is closed now (its will)."""
        if conn.lost:
            conn.lost = False
            self.closed(conn)

    def _admit(self, conn: MqttConnection, c: Connect, verdict: Permissions | int) -> None:
        if isinstance(verdict, int) or self._will_denied(c, verdict):
            n = self.counters["auth_failures"] = self.counters["auth_failures"] + 1
            who = "no user name" if c.username is None else f"user {c.username!r}"
            if not isinstance(verdict, int):
                why = "its will's topic is not allowed"
            elif verdict == CONNACK_BAD_CREDENTIALS:
                why = "unknown user or wrong password"
            else:
                why = "anonymous clients are not allowed" if c.username is None else "refused"
            if worth_a_line(n, LOG_FIRST):
                log.warning("MQTT client %s refused (total %d): %s: %s", conn.peer, n, who, why)
            code = verdict if isinstance(verdict, int) else CONNACK_NOT_AUTHORIZED
            conn.write(encode(Connack(False, code)))
            conn.close()
            return
        conn.perms = None if verdict.unrestricted else verdict
        client_id = c.client_id
        if not client_id:
            if not c.clean_session or c.level == 3:  # MQTT 3.1 ids have 1 to 23 characters
                conn.write(encode(Connack(False, CONNACK_ID_REJECTED)))
                conn.close()
                return
            client_id = f"auto-{os.urandom(8).hex()}"
            c = Connect(client_id, True, c.keepalive, c.will, c.username, c.password, c.level)
        old = self._online.get(client_id)
        if old is not None and old.connect is not None and old.connect.username != c.username:
            # Another user's device is connected with this client id: a user may not kick
            # it off (nor take its session). Mosquitto lets it; we refuse, and count it.
            self.counters["auth_failures"] += 1
            log.warning(
                "MQTT client %s refused: client id %r is connected as another user",
                conn.peer,
                client_id,
            )
            conn.write(encode(Connack(False, CONNACK_ID_REJECTED)))
            conn.close()
            return
        old = self._online.pop(client_id, None)
        if old is not None:  # session takeover (MQTT 3.1.1 §3.1.4): the old socket goes
            self._drop(old, "the same client id connected again")  # named while it has one
            if old.connect is not None:  # its will too, as mosquitto (exploratory test)
                self._will(old, old.connect)
            old.session = None  # not detached when its socket closes: this one has it
            old.connect = None
        session, present, ended = self.sessions.attach(client_id, c.clean_session, owner=c.username)
        if present and conn.perms is not None and not self._still_allowed(session, conn.perms):
            # The user's rules changed while it was away: the session's subscriptions (and
            # what they queued) may hold what it may no longer see. Start afresh.
            ended.append(session)
            session, present, more = self.sessions.attach(client_id, True, owner=c.username)
            ended += [s for s in more if s is not ended[-1]]
            session.clean = c.clean_session
        for gone in ended:
            self._forget(gone)
        conn.connect, conn.session = c, session
        self._online[client_id] = conn
        self.counters["connects"] += 1
        conn.write(encode(Connack(present)))
        for out in session.resume():
            self.counters["delivered"] += 1
            conn.write(out)

    @staticmethod
    def _still_allowed(session: Session, perms: Permissions) -> bool:
        """True if every subscription of ``session`` is one ``perms`` grants in full."""
        for filt in session.subs:
            _group, plain = mqtt_shared(filt)
            patterns = mqtt_filter_to_mesh(plain).patterns
            kept, why = allowed(perms, patterns)
            if why is not None or kept != patterns:
                return False
        return True

    def _will_denied(self, c: Connect, perms: Permissions) -> bool:
        """True if the client's will goes to a topic its user may not publish to (refused
        at CONNECT, as mosquitto does, rather than dropped when the client dies)."""
        if c.will is None or perms.unrestricted:
            return False
        tb = self._mesh_topic(c.will.topic)
        return tb is not None and perms.check_publish(tb.decode()) is not None


def allowed(perms: Permissions, patterns: tuple[str, ...]) -> tuple[tuple[str, ...], str | None]:
    """The mesh patterns of one MQTT filter that ``perms`` lets the user subscribe to, or
    why the filter is refused. ``a/#`` is ``a/>`` plus the zero-level ``a``; with a rule
    ``sub_allow a/>`` the filter is granted and ``a`` itself left out, so nothing the
    rules do not allow is delivered. The last pattern is the filter's own: if that one is
    refused, the filter is."""
    kept = tuple(p for p in patterns[:-1] if perms.check_subscribe(p) is None)
    why = perms.check_subscribe(patterns[-1])
    return (*kept, patterns[-1]), why
