"""Cursors past the store's log at start (node/loop.py, _cursors_past_the_log)."""

from __future__ import annotations

from pathlib import Path

from node.datadir import read_cursor, write_cursor
from node.loop import _cursors_past_the_log
from node.spool import SpoolReader


def test_a_cursor_past_the_log_goes_back_to_the_head_not_to_the_start(tmp_path: Path) -> None:
    """Moved aside or restored (exploratory test: the new log's first exports counted as
    sent), or a power cut that took the last commits but not the cursor (review: sending
    from 0 stored the whole log again in the cloud). Up to the head, all was sent."""
    uplink = SpoolReader("uplink", tmp_path / "uplink.cursor", (">",), False, from_start=True)
    bridge = SpoolReader("bridge b", tmp_path / "b.cursor", (">",), True)
    behind = SpoolReader("bridge c", tmp_path / "c.cursor", (">",), True)
    write_cursor(uplink.cursor_path, 3000)
    write_cursor(bridge.cursor_path, 1002)
    write_cursor(behind.cursor_path, 400)
    _cursors_past_the_log((uplink, bridge, behind), 1000)
    assert [read_cursor(r.cursor_path) for r in (uplink, bridge, behind)] == [1000, 1000, 400]
    _cursors_past_the_log((uplink,), 0)  # a new, empty store
    assert read_cursor(uplink.cursor_path) == 0
