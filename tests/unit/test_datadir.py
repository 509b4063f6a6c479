"""The pid file as the node's lock (node/datadir.py): a real file and real flock locks."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from node import datadir
from node.errors import ConfigError


def test_a_stale_pid_names_no_node_and_a_held_lock_does(tmp_path: Path) -> None:
    (tmp_path / datadir.PID_FILE).write_text("1\n")  # left by a crash: pid 1 is alive
    assert datadir.read_pid(tmp_path) is None
    datadir.write_pid(tmp_path)
    try:
        assert datadir.read_pid(tmp_path) == os.getpid()
        # A second claim, as another process's would be (flock is per open file).
        with pytest.raises(ConfigError, match=f"already running here \\(pid {os.getpid()}"):
            datadir.write_pid(tmp_path)
    finally:
        datadir.remove_pid(tmp_path)
    assert datadir.read_pid(tmp_path) is None
    assert (tmp_path / datadir.PID_FILE).read_text() == ""


def test_a_probe_of_the_pid_file_never_refuses_a_starting_node(tmp_path: Path) -> None:
    """Found in review: read_pid's shared lock, taken for a moment, made a node that
    locked at that moment refuse to start ("already running (pid ?)"). Here a probe's
    lock is held for 50 ms, as if the node came at that moment."""
    (tmp_path / datadir.PID_FILE).write_text("12345\n")  # a crashed node's, say
    probe = os.open(tmp_path / datadir.PID_FILE, os.O_RDONLY)
    fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    threading.Timer(0.05, os.close, (probe,)).start()
    datadir.write_pid(tmp_path)  # waits the probe out
    try:
        assert datadir.read_pid(tmp_path) == os.getpid()
    finally:
        datadir.remove_pid(tmp_path)
