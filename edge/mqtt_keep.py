"""Persistent MQTT sessions kept across a node's restart: saved when the listener stops,
read back (and the file removed) when it starts again.

A device that connects with clean_session=0 subscribes once and counts on the broker to
keep its subscriptions and the QoS 1 messages that wait for it. Sessions live in memory,
so before this every restart of a node (an upgrade, a reboot) dropped them: the device came
back to session_present=0 and, subscribing only the first time, never heard from its
topics again (mosquitto with ``persistence true`` keeps them). The node's store being on
is the operator's "keep what was accepted", so sessions are kept exactly then.

Saved at a clean stop, as mosquitto saves its database at shutdown; a node killed with
SIGKILL or a power cut loses the sessions (not the persistent events in the store). The
file is written whole to a temporary name and renamed, so a crash mid-save leaves the
previous state or none, never half of one; it is removed once read, so a crash later never
brings back sessions that changed since. A file that cannot be read is set aside
(``.bad``) with one log line: the node starts without the sessions, as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
from collections.abc import Iterable
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


def save(path: Path, sessions: Iterable[Session]) -> tuple[int, int]:
    """Write the persistent sessions to ``path`` (replacing it); (sessions, messages).
    OSError when it cannot be written (a full disk), the file before left as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.unlink(missing_ok=True)
        kept, messages = _write(tmp, sessions)
        tmp.replace(path)
    except sqlite3.Error as e:
        tmp.unlink(missing_ok=True)
        raise OSError(str(e)) from None
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return kept, messages


def _write(tmp: Path, sessions: Iterable[Session]) -> tuple[int, int]:
    kept = messages = 0
    db = sqlite3.connect(tmp)
    try:
        tmp.chmod(0o600)  # payloads are the clients' data, as the store's
        db.executescript(_SCHEMA)
        for pos, s in enumerate(x for x in sessions if not x.clean):
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?)", (pos, s.client_id, s.owner, s._next_id)
            )
            db.executemany(
                "INSERT INTO subs VALUES (?, ?, ?, ?, ?)",
                [
                    (pos, filt, sub.qos, sub.group, json.dumps(list(sub.patterns)))
                    for filt, sub in s.subs.items()
                ],
            )
            waiting: list[tuple[int | None, bytes, bytes, bool]]
            waiting = [(pid, *m) for pid, m in s.inflight.items()]
            waiting += [(None, *m) for m in s.queue]
            db.executemany(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?)",
                [(pos, seq, pid, t, p, int(r)) for seq, (pid, t, p, r) in enumerate(waiting)],
            )
            db.executemany(
                "INSERT INTO awaiting_rel VALUES (?, ?)", [(pos, i) for i in s.awaiting_rel]
            )
            kept += 1
            messages += len(waiting)
        db.execute(f"PRAGMA user_version = {FORMAT}")
        db.commit()
    finally:
        db.close()
    return kept, messages


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
