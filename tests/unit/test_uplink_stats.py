"""How often the uplink counts its unsent spool (edge/uplink.py, ``_stats``)."""

from __future__ import annotations

import time
from pathlib import Path

import zmq

from edge.uplink import STATS_COST, STATS_EVERY, Uplink, UplinkSettings


class SlowCount:
    """A log reader whose count of the spool takes ``cost`` seconds (a large spool)."""

    def __init__(self, cost: float) -> None:
        self.cost = cost
        self.cursor = 0
        self.counts = 0

    def stats(self, _carries: object = None) -> dict[str, object]:
        self.counts += 1
        time.sleep(self.cost)
        return {"entries": 1, "bytes": 1, "oldest_age_s": None}


def test_a_costly_count_of_the_spool_is_made_less_often(tmp_path: Path) -> None:
    settings = UplinkSettings(
        "tcp://127.0.0.1:1", (">",), (), tmp_path, tmp_path / "c", "0" * 16, "n"
    )
    uplink = Uplink(settings, zmq.Context.instance(), "inproc://x", b"u")
    cheap, costly = SlowCount(0.0), SlowCount(0.1)
    for db, least in ((cheap, STATS_EVERY), (costly, STATS_COST * 0.1)):
        uplink._next_stats = 0.0
        start = time.monotonic()
        uplink._stats(db)  # type: ignore[arg-type]
        uplink._stats(db)  # type: ignore[arg-type]
        assert db.counts == 1
        assert uplink._next_stats - start >= least
    assert uplink._next_stats - start < STATS_COST * 0.1 + 1.0  # bounded by what it cost
