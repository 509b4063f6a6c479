"""node/heap.py: freed heap is kept for reuse, so a node stops paying a page fault for
every large block it allocates again. Measured in a fresh interpreter (the setting is
process-wide), by the kernel's own count of minor page faults."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from node.heap import keep_freed

# What a node's pass does: hold 40 frames of 64 KiB (below glibc's mmap threshold, so
# from the heap), then free them all, 100 times over, touching every page; report the
# minor page faults that took.
PROBE = """
import json, resource, sys
from node.heap import keep_freed
kept = keep_freed(int(sys.argv[1]))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(100):
    frames = [bytes([i % 256]) * (64 * 1024) for _ in range(40)]
    del frames
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"kept": kept, "faults": after - before}))
"""


def probe(limit: int) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(limit)], capture_output=True, check=True, text=True
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_heap_takes_the_page_faults_away() -> None:
    default = probe(0)
    kept = probe(16 * 1024 * 1024)
    assert default["kept"] is False  # 0 leaves the C library alone
    assert kept["kept"] is True
    # 100 passes x 40 frames x 16 pages: by default the freed top of the heap goes back to
    # the kernel after every pass and each pass faults its pages in afresh.
    assert default["faults"] > 100 * 40 * 16 // 2
    assert kept["faults"] < 40 * 16 * 2  # the first pass, then the same pages again


def test_zero_and_negative_limits_change_nothing() -> None:
    assert keep_freed(0) is False
    assert keep_freed(-1) is False


# Freed blocks below a live one: the kept limit covers only the top of the heap, so they
# stayed mapped (an MQTT backlog drained left a node at 380 MB: soak test).
TRIM_PROBE = """
import json
from node.heap import give_back, keep_freed
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 // (1024 * 1024)
kept = keep_freed(16 * 1024 * 1024)
big, small = [], []
for i in range(200):  # 100 MB of 512 KiB blocks, each with a small live block above it
    big.append(bytes([i % 256]) * (512 * 1024))
    small.append(bytearray(2048))
during = give_back()  # a tick while the burst is held: nothing to give (review)
del big
freed = rss()
released = give_back()
again = give_back()  # nothing freed since: no second walk of the heap
print(json.dumps({"kept": kept, "during": during, "freed": freed, "after": rss(),
                  "released": released, "again": again}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim: Linux only")
def test_freed_heap_below_live_blocks_is_given_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", TRIM_PROBE], capture_output=True, check=True, text=True
    )
    got = json.loads(out.stdout)
    assert got["kept"] is True
    assert got["freed"] > 100  # MB: freed, but held
    assert got["during"] is False
    assert got["released"] is True
    assert got["after"] < got["freed"] - 80
    assert got["again"] is False
