"""The edge uplink: store-and-forward between an edge node and its cloud node.

Edge to cloud, the spool is the node's own log: the node logs every event matching the
uplink's export patterns (persistent or not) before it routes it, so nothing is lost to
a slow or absent cloud. This actor reads the log in order from its cursor, sends each
batch to the cloud as persistent events with their original ids, and advances the
cursor (a file the node reads to bound the spool) only when the cloud has stored them.
A batch sent again after a lost acknowledgement is dropped by the cloud's dedupe window.

Cloud to edge, persistent events wait in a durable queue on the cloud node named
``uplink-<edge node id>``; this actor consumes it, stores each event on the edge node,
and only then acknowledges it to the cloud. Direct events flow live while connected.

Events that crossed an uplink carry an ``uplink`` header (the node they came from) and
are never sent back across it, so overlapping export and import patterns make no loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import zmq

from edge.logreader import LogReader
from meshctl.client import Client, connect
from meshctl.errors import InputError, MeshError, RemoteError, Timeout
from node.codec import (
    F_IMPORTED,
    F_PERSISTENT,
    F_REQUEST,
    F_RETAINED_LIVE,
    RECORD,
    RECORD_SIZE,
    decode_headers,
    encode_headers,
    encode_record,
    with_flags,
    with_headers,
)
from node.errors import CodecError
from node.events import Event
from node.topics import SubscriptionTrie

log = logging.getLogger("meshctl.uplink")

HEADER: Final = "uplink"
_HEADER_KEY: Final = bytes((len(HEADER),)) + HEADER.encode()
BATCH: Final = 2000  # log entries read per round
IDLE_WAIT: Final = 0.02  # how long an idle round waits for the cloud
BACKOFF_MAX: Final = 5.0
STATS_EVERY: Final = 1.0
STATS_COST: Final = 20  # spool counts take at most 1/20 of the uplink thread's time
CHECK_EVERY: Final = 1.0  # an idle uplink asks the cloud this often whether it is there
# Seconds after the node starts before what waited in the cloud is taken: stored and
# acknowledged at once, it was routed into a mesh the node had not joined yet, and a
# restarted gateway lost the commands for devices on other nodes (plant scenario; mDNS
# finds the peers and the links come up well within a second).
IMPORT_GRACE: Final = 3.0
CHECK_TIMEOUT: Final = 2.0
CONFIRM_WAIT: Final = 10.0  # a shipped batch waits this long for the cloud's acknowledgement


@dataclass(frozen=True, slots=True)
class UplinkSettings:
    """What ``[uplink]`` says, plus where this node keeps its store."""

    url: str
    export: tuple[str, ...]
    imports: tuple[str, ...]
    data_dir: Path
    cursor_path: Path
    node_id: str
    node_name: str
    creds: str = ""  # client credentials for a secured cloud node


class Uplink(threading.Thread):
    """One actor thread: ships the spool up, brings cloud events down."""

    def __init__(
        self,
        settings: UplinkSettings,
        ctx: zmq.Context[zmq.Socket[bytes]],
        inproc: str,
        ident: bytes,
    ) -> None:
        super().__init__(name="uplink", daemon=True)
        self.s = settings
        self.ctx = ctx
        self.inproc = inproc
        self.zmq_ident = ident
        self.trie: SubscriptionTrie[bool] = SubscriptionTrie()
        for p in settings.export:
            self.trie.add(p, True)
        self._stopping = threading.Event()
        self._bring_after = time.monotonic() + IMPORT_GRACE
        self.state = "connecting"
        self.last_error = ""
        self.cloud_id = ""
        self.sent = 0
        self.refused = 0  # persistent exports the cloud refused for good, skipped
        self.refused_in = 0  # events from the cloud this node refused for good
        self.received = 0
        # The spool's stats (status adds the node's counts) and when they were looked at.
        self._looked: tuple[dict[str, Any], float] = ({"oldest_age_s": None}, time.monotonic())
        self.cursor = 0
        self._next_stats = 0.0

    # ---- the plugin interface ------------------------------------------------------------

    def stop(self) -> None:
        self._stopping.set()
        self.join(timeout=5)

    def status(self) -> dict[str, Any]:
        return {
            "name": "uplink",
            "kind": "uplink",
            "url": self.s.url,
            "state": self.state,
            "error": self.last_error,
            "cloud": self.cloud_id,
            "export": list(self.s.export),
            "import": list(self.s.imports),
            "sent": self.sent,
            "refused": self.refused,
            "refused_in": self.refused_in,
            "received": self.received,
            "cursor": self.cursor,
            "spool": self._spool_now(),
        }

    def _spool_now(self) -> dict[str, Any]:
        """The last look at the spool, its oldest age moved on by the time since: between
        looks (a second, or a confirm wait of 2 s) it stood still while the events aged
        (lab uplink test: 16.2 s for 5 s)."""
        looked, at = self._looked  # one read: the uplink's thread writes both at once
        spool = dict(looked)
        age = spool.get("oldest_age_s")
        if age is not None:
            spool["oldest_age_s"] = round(age + time.monotonic() - at, 3)
        return spool

    # ---- the actor -------------------------------------------------------------------------

    def run(self) -> None:
        # Everything the node logged before the uplink first ran is for the cloud too.
        db = LogReader(self.s.data_dir, self.s.cursor_path, start_at_head=False)
        local = Client(
            self.inproc, name="uplink", context=self.ctx, identity=self.zmq_ident, timeout=5.0
        )
        try:
            local.open()
            attempt = 0
            while not self._stopping.is_set():
                self._stats(db)
                try:
                    self._session(db, local)
                    attempt = 0
                except (MeshError, zmq.ZMQError) as e:
                    self.last_error = str(e)
                attempt += 1
                self._set_state(local, "down")
                wait = min(BACKOFF_MAX, 0.2 * 2 ** min(attempt, 6)) * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not crypto
                # In slices, keeping the spool's oldest age current: it read null for the
                # first ~10 s of an outage, and only moved every ~3 s after (exploratory
                # test), since nothing looked while the uplink waited.
                until = time.monotonic() + wait
                while not self._stopping.wait(min(STATS_EVERY, max(0.0, until - time.monotonic()))):
                    self._stats(db)
                    if time.monotonic() >= until:
                        break
        except Exception:  # a bug of ours must not go unnoticed: say so, the node carries on
            log.exception("uplink stopped by an internal error")
            self.state = "failed"
        finally:
            local.close()
            db.close()

    def _session(self, db: LogReader, local: Client) -> None:
        """One connection to the cloud, until it fails or we are stopped."""
        creds = self.s.creds or None
        name = f"uplink {self.s.node_name}"
        # requests=False: a cloud request on what we import reaches us as an event, but
        # its replies could not go back (the edge routes no cloud inbox); its requester
        # waited out its timeout (review). It hears "no responders" at once now.
        with connect(
            self.s.url,
            name=name,
            timeout=2.0,
            creds=creds,
            cancel=self._stopping,
            requests=False,
        ) as cloud:
            self.cloud_id = cloud.node_id
            consumer = None
            queue = f"uplink-{self.s.node_id}"
            if not self.s.imports:
                try:
                    self._stop_capture(cloud, queue)
                except MeshError as e:  # e.g. new credentials that may not touch it: the
                    # exports must go on all the same (review: they stopped for good)
                    log.warning("uplink: cannot stop queue %s on the cloud capturing: %s", queue, e)
            else:
                cloud.queue("add", queue, patterns=list(self.s.imports))
                cloud.subscribe(*self.s.imports, retained=False, callback=self._live(local))
            self.last_error = ""
            self._set_state(local, "up")
            next_check = time.monotonic() + CHECK_EVERY
            while not self._stopping.is_set():
                if consumer is None and self.s.imports and time.monotonic() >= self._bring_after:
                    # Not before: what the cloud delivered meanwhile waited unacknowledged,
                    # redelivered after the queue's ack_wait, dead-lettered (review).
                    consumer = cloud.consume(queue, max_inflight=BATCH)
                shipped = self._ship(db, cloud, local)
                brought = self._bring(cloud, local, consumer)
                self._stats(db)
                if not shipped and not brought:
                    cloud.process(IDLE_WAIT)
                    if time.monotonic() >= next_check:
                        # ZeroMQ reconnects silently: ask, so a gone cloud is noticed.
                        cloud.flush(timeout=CHECK_TIMEOUT)
                        next_check = time.monotonic() + CHECK_EVERY

    def _stop_capture(self, cloud: Client, queue: str) -> None:
        """With ``import`` taken out of the config, this edge's queue in the cloud stops
        capturing: it went on filling for ever, with no consumer (exploratory test). What
        waits there is kept, for the operator to drain or remove."""
        try:
            held = cloud.queue("info", queue)["queue"]
        except InputError:
            return  # no such queue: this edge never imported
        if not held.get("patterns"):
            return
        cloud.queue("add", queue, patterns=[])
        log.warning(
            "uplink: import is off: queue %s on the cloud no longer captures %s; %d events "
            "wait in it (`meshctl queue rm %s` there drops them)",
            queue,
            ", ".join(held["patterns"]),
            held.get("depth", 0),
            queue,
        )

    def _confirm(self, cloud: Client, local: Client, db: LogReader) -> None:
        """Wait for the cloud to store what was shipped (CONFIRM_WAIT in all, then the
        session ends). Silent for CHECK_TIMEOUT, it is 'down' meanwhile, 'up' again if the
        acknowledgements come: a cloud killed mid-batch showed 'up' for the whole wait,
        with no $mesh/uplink/down (exploratory test)."""
        deadline = time.monotonic() + CONFIRM_WAIT
        silent = False
        while True:
            self._stats(db)  # the spool's oldest grows while we wait: status shows it
            left = deadline - time.monotonic()
            waiting = cloud.unconfirmed
            try:
                cloud.confirm(timeout=max(0.01, min(CHECK_TIMEOUT, left)))
            except Timeout:
                if cloud.unconfirmed < waiting:  # slow, not silent: acks are coming
                    deadline = time.monotonic() + CONFIRM_WAIT  # (review: it flapped)
                    if silent:
                        silent, self.last_error = False, ""
                        self._set_state(local, "up")
                    continue
                if left <= CHECK_TIMEOUT:
                    raise
                if not silent:
                    silent = True
                    self.last_error = f"the cloud has not acknowledged for {CHECK_TIMEOUT:g}s"
                    self._set_state(local, "down")
                continue
            if silent:
                self.last_error = ""
                self._set_state(local, "up")
            return

    def _ship(self, db: LogReader, cloud: Client, local: Client) -> int:
        """Send the next stretch of the log to the cloud; how many entries it read."""
        rows = db.after(BATCH)
        if not rows:
            return 0
        marker = {HEADER: self.s.node_id}
        n = 0
        with cloud.batch():
            for _seq, topic, record in rows:
                if not self.trie.match(topic):
                    continue
                try:
                    if _crossed(record):
                        continue
                    if record[8] & F_REQUEST:
                        # As an event: a cloud responder's reply could not come back, and
                        # its requester had heard "no responders" (review).
                        marked = with_flags(
                            with_headers(record, marker, drop=("reply-to",)), remove=F_REQUEST
                        )
                    else:
                        marked = with_headers(record, marker)
                except CodecError as e:
                    # A headers block that does not decode (a log written before nodes
                    # refused them, or one from an older peer): raised here, it ended
                    # every session at this event, for good (review).
                    self.refused += 1
                    log.warning("uplink: an event on %s is skipped: %s", topic, e)
                    continue
                cloud.forward(marked, persistent=True)
                n += 1
        if n:
            try:
                self._confirm(cloud, local, db)
            except RemoteError as e:
                if e.code == "store" or not e.ids:
                    # The cloud could not store them now, or refused the session itself
                    # (revoked credentials: no ids named): nothing of the batch is known
                    # stored, and the session sends it again. Taken for refusals of the
                    # batch, a revoke moved the cursor past what the cloud never stored,
                    # counted as sent (lab uplink test).
                    raise
                # Refused for good (over the cloud's payload limit, denied to our
                # credentials, a topic it refuses): waiting for them would stop the uplink.
                self.refused += len(e.ids)
                n -= len(e.ids)
                log.warning("uplink: the cloud refused %d events: %s", len(e.ids), e)
            self.sent += n
        db.advance(rows[-1][0])
        self.cursor = db.cursor
        return len(rows)

    def _bring(self, cloud: Client, local: Client, consumer: Any) -> int:
        """Store on this node what waited for it in the cloud, then ack it there; how
        many events that was."""
        if consumer is None:
            return 0
        cloud.process(0)
        events: list[Event] = []
        while consumer.queue and len(events) < BATCH:
            events.append(consumer.queue.popleft())
        if not events:
            return 0
        own = 0
        with local.batch():
            for event in events:
                if event.headers.get(HEADER) != self.s.node_id:  # not our own, come back
                    local.forward(self._record(event), persistent=True)
                else:
                    own += 1  # acked below, not counted as received (exploratory test)
        refused: set[str] = set()
        try:
            local.confirm(timeout=10.0)
        except RemoteError as e:
            if e.code == "store":
                raise  # this node could not store them now: the session goes again
            # Refused here for good (over this node's payload limit, say): left unacked,
            # the cloud's queue dead-letters them after its attempts, where an operator
            # can see them; the rest of the batch goes on.
            refused = set(e.ids)
            self.refused_in += len(refused)
            log.warning("uplink: this node refused %d events from the cloud: %s", len(refused), e)
        for event in events:
            if event.id not in refused:
                consumer.ack(event)
        cloud.confirm_acks(timeout=10.0)
        self.received += len(events) - len(refused) - own
        return len(events)

    def _live(self, local: Client) -> Any:
        def on_event(event: Event) -> None:
            if event.flags & F_PERSISTENT or event.headers.get(HEADER) == self.s.node_id:
                return  # persistent ones come through the queue; our own stay away
            local.forward(self._record(event), persistent=False)
            self.received += 1

        return on_event

    def _record(self, event: Event) -> bytes:
        headers = dict(event.headers)
        headers.setdefault(HEADER, self.cloud_id)
        headers.pop("reply-to", None)  # an event here: a reply could not go back
        # Not F_RETAINED_LIVE: the mesh's own (a node refuses it), and here the value was
        # retained in the cloud, not at this edge, whose bridges must not retain it.
        flags = (event.flags | F_IMPORTED) & ~(F_PERSISTENT | F_RETAINED_LIVE | F_REQUEST)
        return encode_record(
            event.topic.encode(),
            event.data,
            encode_headers(headers),
            flags,
            event.time_ns,
            event.raw_id,
        )

    def _set_state(self, local: Client, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        body = {"node": self.s.node_id, "url": self.s.url, "cloud": self.cloud_id}
        why = self.last_error or ("the node is stopping" if self._stopping.is_set() else "")
        if state == "down":
            body["error"] = why
        log.info("uplink to %s %s%s", self.s.url, state, f": {why}" * bool(state == "down" and why))
        payload = json.dumps(body).encode()
        event_id = os.urandom(8) + time.time_ns().to_bytes(8, "big")
        record = encode_record(
            f"$mesh/uplink/{state}".encode(), payload, b"", 0, time.time_ns(), event_id
        )
        with contextlib.suppress(MeshError):
            local.forward(record, persistent=False)

    def _stats(self, db: LogReader) -> None:
        """The spool's oldest age for ``status``, every second, or less often should the
        look-up be costly (it once walked every unsent entry, ~160 ms at 256 MiB)."""
        now = time.monotonic()
        if now < self._next_stats:
            return
        self.cursor = db.cursor
        trie = self.trie
        self._looked = db.stats(lambda topic, _flags: bool(trie.match(topic))), time.monotonic()
        took = time.monotonic() - now
        self._next_stats = now + max(STATS_EVERY, STATS_COST * took)


def _crossed(record: bytes) -> bool:
    """True when the record already crossed an uplink (never send it back)."""
    tlen, hlen = RECORD.unpack_from(record)[1:3]
    if not hlen:
        return False
    block = record[RECORD_SIZE + tlen : RECORD_SIZE + tlen + hlen]
    return _HEADER_KEY in block and HEADER in decode_headers(block)


def start_uplink(
    settings: UplinkSettings,
    ctx: zmq.Context[zmq.Socket[bytes]],
    inproc: str,
    register: Any,
) -> Uplink:
    """Start the uplink actor; ``register`` lets its identity publish ``$mesh`` events."""
    ident = b"\x00uplink" + time.time_ns().to_bytes(8, "big")
    register(ident)
    uplink = Uplink(settings, ctx, inproc, ident)
    uplink.start()
    return uplink
