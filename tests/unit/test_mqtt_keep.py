"""Persistent MQTT sessions saved at a stop and read back at the next start
(edge/mqtt_keep.py): what comes back is what was saved, and a bad file costs the sessions,
never the node."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.mqtt_keep import load, save
from edge.mqtt_session import Limits, Session, SessionTable, Subscription

Message = tuple[bytes, bytes, bool]
messages = st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=200), st.booleans())


def _session(name: str, *, clean: bool = False) -> Session:
    s = Session(name, clean, owner="alice")
    s.subscribe("a/#", Subscription(7, 1, None, ("a", "a/>")))
    s.subscribe("$share/g/b/+", Subscription(8, 0, "g", ("b/*",)))
    return s


def _state(s: Session) -> tuple[object, ...]:
    subs = {f: (x.qos, x.group, x.patterns) for f, x in s.subs.items()}
    return (s.client_id, s.owner, s.clean, subs, s.inflight, list(s.queue), s.awaiting_rel)


@settings(max_examples=60, deadline=None)
@given(
    inflight=st.dictionaries(st.integers(1, 0xFFFF), messages, max_size=5),
    queued=st.lists(messages, max_size=8),
    rel=st.sets(st.integers(1, 0xFFFF), max_size=3),
)
def test_a_saved_session_comes_back_as_it_was(
    tmp_path_factory: pytest.TempPathFactory,
    inflight: dict[int, Message],
    queued: list[Message],
    rel: set[int],
) -> None:
    path = tmp_path_factory.mktemp("keep") / "sessions.db"
    s = _session("dev-1")
    s.inflight.update(inflight)
    s.queue.extend(queued)
    s.queued_bytes = sum(len(m[1]) for m in queued)
    s.awaiting_rel.update(rel)
    s._next_id = 42
    assert save(path, [s, _session("gone", clean=True)]) == (1, len(inflight) + len(queued))
    (back,) = load(path, Limits())
    assert _state(back) == _state(s)
    assert back.queued_bytes == s.queued_bytes
    assert back._next_id == 42
    assert not back.online
    assert not path.exists()  # read once: a crash later never brings back stale sessions
    back._send(b"t", b"p")  # a new message takes a packet id no message in flight has
    assert back._next_id not in inflight
    assert len(back.inflight) == len(inflight) + 1


def test_sessions_come_back_in_the_order_they_would_be_dropped(tmp_path: Path) -> None:
    table = SessionTable()
    for name in ("old", "newer", "online"):
        table.attach(name, False)
    for name in ("newer", "old"):  # "newer" went away first: it is the longest absent
        table.detach(table.by_id[name])
    table.by_id["online"].online = True
    save(tmp_path / "s.db", table.persistent())
    restored = SessionTable(max_offline=2)
    ended = []
    for s in load(tmp_path / "s.db", Limits()):
        ended += restored.restore(s)
    assert [s.client_id for s in ended] == ["newer"]
    assert sorted(restored.by_id) == ["old", "online"]


def test_lower_bounds_now_drop_the_messages_beyond_them(tmp_path: Path) -> None:
    s = _session("dev")
    s.queue.extend((b"t", bytes(10), False) for _ in range(5))
    save(tmp_path / "s.db", [s])
    (back,) = load(tmp_path / "s.db", Limits(max_queued=3))
    assert len(back.queue) == 3
    assert back.dropped == 2
    assert back.max_queued == 3


@pytest.mark.parametrize("damage", ["garbage", "wrong format", "orphan row"])
def test_an_unreadable_file_is_set_aside_with_one_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str
) -> None:
    path = tmp_path / "s.db"
    if damage == "garbage":
        path.write_bytes(b"not a database at all" * 50)
    else:
        save(path, [_session("dev")])
        db = sqlite3.connect(path)
        if damage == "wrong format":
            db.execute("PRAGMA user_version = 99")
        else:
            db.execute("INSERT INTO subs VALUES (5, 'x', 1, NULL, '[]')")
        db.commit()
        db.close()
    with caplog.at_level(logging.WARNING, logger="meshctl.mqtt"):
        assert load(path, Limits()) == []
    assert not path.exists()
    assert (tmp_path / "s.db.bad").exists()
    (line,) = caplog.messages
    assert "persistent sessions not restored" in line


def test_a_failed_save_raises_oserror_and_leaves_the_file_before(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    save(path, [_session("first")])
    (tmp_path / "s.db.tmp").mkdir()  # the temporary name cannot be a database
    with pytest.raises(IsADirectoryError):
        save(path, [_session("second")])
    assert [s.client_id for s in load(path, Limits())] == ["first"]
