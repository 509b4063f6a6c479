"""Persistent MQTT sessions kept across a node's restart: saved when the listener stops,
read back (and the file removed) when it starts again.

A device that connects with clean_session=0 subscribes once and counts on the broker to
keep its subscriptions and the QoS 1 messages that wait for it. Sessions live in memory,
so before this every restart of a node (an upgrade, a reboot) dropped them: the device came
back to session_present=0 and, subscribing only the first time, never heard from its
topics again (mosquitto with ``persistence true`` keeps them). The node's store being on
is the operator's "keep what was accepted", so sessions are kept exactly then.

Saved at a clean stop, as mosquitto saves its database at shutdown, and every
``[mqtt] autosave`` seconds while the node runs (``Autosave``, as mosquitto's
autosave_interval): a node killed with SIGKILL or a power cut comes back with the
sessions as they were at the last save, not without them (edge nodes lose power), and
loses only what changed since. The file is written whole to a temporary name and renamed,
so a crash mid-save leaves the previous state, never half of one; it is removed once read,
and written again at the next save, so sessions that ended since are not brought back by
an older file. A file that cannot be read is set aside (``.bad``) with one log line: the
node starts without the sessions, as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Final

from edge.mqtt_session import Limits, Session, Subscription

log = logging.getLogger("meshctl.mqtt")

SESSIONS_FILE: Final = "mqtt_sessions.db"
FORMAT: Final = 1  # PRAGMA user_version of the file

_SCHEMA: Final = """
CREATE TABLE sessions (pos INTEGER PRIMARY KEY, client_id TEXT NOT NULL, owner TEXT,
                       next_id INTEGER NOT NULL);
CREATE TABLE subs (pos INTEGER NOT NULL, filter TEXT NOT NULL, qos INTEGER NOT NULL,
                   grp TEXT, patterns TEXT NOT NULL);
CREATE TABLE messages (pos INTEGER NOT NULL, seq INTEGER NOT NULL, packet_id INTEGER,
                       topic BLOB NOT NULL, payload BLOB NOT NULL, retain INTEGER NOT NULL);
CREATE TABLE awaiting_rel (pos INTEGER NOT NULL, packet_id INTEGER NOT NULL);
"""


# One session as rows: (client_id, owner, next packet id), its subscriptions, messages
# (packet id or None for a queued one, topic, payload, retain) and QoS 2 ids awaiting PUBREL.
_Rows = tuple[
    tuple[str, str | None, int],
    list[tuple[str, int, str | None, str]],
    list[tuple[int | None, bytes, bytes, int]],
    list[int],
]


def save(path: Path, sessions: Iterable[Session]) -> tuple[int, int]:
    """Write the persistent sessions to ``path`` (replacing it); (sessions, messages).
    OSError when it cannot be written (a full disk), the file before left as it was."""
    return write(path, snapshot(sessions))


def snapshot(sessions: Iterable[Session]) -> list[_Rows]:
    """The persistent sessions as rows, copied: another thread may write them while the
    sessions change."""
    out: list[_Rows] = []
    for s in sessions:
        if s.clean:
            continue
        subs = [
            (filt, sub.qos, sub.group, json.dumps(list(sub.patterns)))
            for filt, sub in s.subs.items()
        ]
        waiting: list[tuple[int | None, bytes, bytes, int]]
        waiting = [(pid, t, p, int(r)) for pid, (t, p, r) in s.inflight.items()]
        waiting += [(None, t, p, int(r)) for t, p, r in s.queue]
        out.append(((s.client_id, s.owner, s._next_id), subs, waiting, list(s.awaiting_rel)))
    return out


def write(path: Path, rows: list[_Rows]) -> tuple[int, int]:
    """``save`` of a ``snapshot``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        messages = _write(tmp, rows)
        tmp.replace(path)
    except sqlite3.Error as e:
        tmp.unlink(missing_ok=True)
        raise OSError(str(e)) from None
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return len(rows), messages


def _write(tmp: Path, rows: list[_Rows]) -> int:
    messages = 0
    db = sqlite3.connect(tmp)
    try:
        tmp.chmod(0o600)  # payloads are the clients' data, as the store's
        db.executescript(_SCHEMA)
        for pos, (session, subs, waiting, awaiting_rel) in enumerate(rows):
            db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?)", (pos, *session))
            db.executemany("INSERT INTO subs VALUES (?, ?, ?, ?, ?)", [(pos, *x) for x in subs])
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                [(pos, seq, *m) for seq, m in enumerate(waiting)],
            )
            rel = [(pos, i) for i in awaiting_rel]
            db.executemany("INSERT INTO awaiting_rel VALUES (?, ?)", rel)
            messages += len(waiting)
        db.execute(f"PRAGMA user_version = {FORMAT}")
        db.commit()
    finally:
        db.close()
    return messages


def discard(path: Path) -> None:
    """Remove a saved file: its sessions ended since it was written."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


class Autosave:
    """Save the persistent sessions every ``every`` seconds, in a thread of its own: the
    listener runs on the node's thread, and a save of many queued messages would hold the
    loop (and the links' heartbeats) for as long as it writes. Only the copy (``snapshot``)
    is made on the loop."""

    def __init__(self, path: Path, every: float, now: float) -> None:
        self.path = path
        self.every = every
        # The first save at once: the file was removed when read, and a second crash
        # soon after a restart lost every session (review).
        self.next_at = now
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mqtt-autosave")
        self._running: Future[tuple[int, int]] | None = None
        self.failed = False  # the last save failed (logged once until one succeeds)

    def due(self, now: float, sessions: Callable[[], Iterable[Session]]) -> None:
        """Start a save of ``sessions()`` if one is due and the one before has finished
        (the sessions asked for only then: this runs at every tick of the listener)."""
        if now < self.next_at:
            return
        if self._running is not None and not self._running.done():
            return  # a slow disk: the next tick asks again
        self.next_at = now + self.every
        self._running = self._pool.submit(self._save, snapshot(sessions()))

    def _save(self, rows: list[_Rows]) -> tuple[int, int]:
        try:
            done = write(self.path, rows)
        except OSError as e:
            if not self.failed:
                log.warning("MQTT: persistent sessions not saved to %s: %s", self.path, e)
            self.failed = True
            return 0, 0
        if self.failed:
            log.info("MQTT: persistent sessions saved to %s again", self.path)
        self.failed = False
        return done

    def close(self) -> None:
        """Wait for a save in progress (the stop's own save comes after it) and end the
        thread."""
        self._pool.shutdown(wait=True)


def load(path: Path, limits: Limits) -> list[Session]:
    """The sessions saved in ``path``, longest absent first; the file is gone after.
    A file that cannot be read is renamed ``.bad`` and logged; none are restored."""
    if not path.exists():
        return []
    try:
        sessions = _read(path, limits)
        path.unlink()
    except (sqlite3.Error, ValueError, TypeError) as e:  # TypeError: json of a wrong type
        bad = path.with_name(path.name + ".bad")
        with contextlib.suppress(OSError):
            path.replace(bad)
        log.warning("MQTT: persistent sessions not restored: %s is unreadable (%s)", bad, e)
        return []
    except OSError as e:  # not restored rather than restored again after a crash
        log.warning("MQTT: persistent sessions not restored: %s: %s", path, e)
        return []
    return sessions


def _read(path: Path, limits: Limits) -> list[Session]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        if version != FORMAT:
            raise ValueError(f"format {version}, this node reads {FORMAT}")
        by_pos: dict[int, Session] = {}
        for pos, client_id, owner, next_id in db.execute(
            "SELECT pos, client_id, owner, next_id FROM sessions ORDER BY pos"
        ):
            s = limits.session(client_id, False, owner)
            s._next_id = int(next_id)
            by_pos[pos] = s
        for pos, filt, qos, group, patterns in db.execute(
            "SELECT pos, filter, qos, grp, patterns FROM subs ORDER BY rowid"
        ):
            pats = json.loads(patterns)
            if not isinstance(pats, list) or not all(isinstance(p, str) for p in pats):
                raise ValueError(f"patterns of {filt!r} are not a list of strings")
            by_pos[pos].subs[filt] = Subscription(0, int(qos), group, tuple(pats))
        for pos, pid, topic, payload, retain in db.execute(
            "SELECT pos, packet_id, topic, payload, retain FROM messages ORDER BY pos, seq"
        ):
            s = by_pos[pos]
            message = (bytes(topic), bytes(payload), bool(retain))
            if pid is not None:
                s.inflight[int(pid)] = message
            elif (  # the bounds may be lower than they were
                len(s.queue) < s.max_queued
                and s.queued_bytes + len(message[1]) <= s.max_queued_bytes
            ):
                s.queue.append(message)
                s.queued_bytes += len(message[1])
            else:
                s.dropped += 1
        for pos, pid in db.execute("SELECT pos, packet_id FROM awaiting_rel"):
            by_pos[pos].awaiting_rel.add(int(pid))
    except KeyError as e:
        raise ValueError(f"a row names no saved session ({e})") from None
    finally:
        db.close()
    return list(by_pos.values())
