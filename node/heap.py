"""Freed heap kept for reuse: a busy node allocates and frees the same frames all the time.

glibc's defaults hand freed memory back to the kernel as soon as more than 128 KiB lies
free at the top of the heap, and map every block over 128 KiB on its own. A node that
moves frames of 64 KiB (and payloads up to 1 MiB) therefore paid for fresh pages again
and again: on a line of three nodes at ~300k events/s each node took 0.05-0.16 minor
page faults per event: a fresh page for the kernel to zero every 6-20 events. Keeping
up to ``tuning.heap_keep`` of freed heap took them to about 0.005 per event, and the
relaying node from 0.57-0.73 to 0.38-0.47 us of CPU per event (this change alone; the
rest of the faults came from Python's own arenas, see PASS_BYTES in loop_security.py).

The price is memory the node keeps after a burst instead of returning it: at most the
limit (16 MiB by default). ``heap_keep = 0`` leaves glibc's defaults.

The limit covers only the top of the heap. Freed blocks below a live one stay mapped:
after a burst of 512 KiB MQTT payloads queued for two absent sessions, RSS stayed at
380 MB with nothing held (soak test). So every TRIM_EVERY seconds the loop hands back
what lies free anywhere in the heap beyond the limit (``give_back``: malloc_trim).
"""

from __future__ import annotations

import ctypes
import sys
from typing import Final

M_TRIM_THRESHOLD: Final = -1  # free heap above this much at the top is given back
M_MMAP_THRESHOLD: Final = -3  # blocks at least this large are mapped on their own
HEAP_BLOCKS: Final = 4 * 1024 * 1024  # frames up to a max-size payload come from the heap
MAX_KEEP: Final = 1024 * 1024 * 1024  # mallopt takes an int
TRIM_EVERY: Final = 30.0  # seconds between give_back calls of the loop

_kept = 0  # the limit keep_freed set (0: glibc's defaults, nothing to give back)
_last_free: int | None = None  # free heap bytes after the last trim, or less since


def keep_freed(limit: int) -> bool:
    """Let the C allocator keep up to ``limit`` bytes of freed heap, and serve blocks up
    to 4 MiB from it (512 KiB, glibc's cap, on 32-bit systems such as Raspberry Pi OS
    armhf). False where nothing was set: ``limit`` 0, not Linux, or no glibc."""
    if limit <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # no mallopt (not glibc)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; musl's stub returns 0 and changes nothing.
    if mallopt(M_TRIM_THRESHOLD, min(limit, MAX_KEEP)) != 1:
        return False
    for blocks in (HEAP_BLOCKS, 512 * 1024):  # glibc refuses more than half its heap size
        if mallopt(M_MMAP_THRESHOLD, blocks) == 1:
            break
    global _kept  # noqa: PLW0603 - the process's allocator is one, as is this setting
    _kept = min(limit, MAX_KEEP)
    return True


def give_back() -> bool:
    """Return freed heap beyond the kept limit to the kernel, wherever it lies (glibc's
    malloc_trim releases whole free pages inside the heap too, not just at its top),
    when more than twice the limit lies free: a trim walks the whole heap (20 ms at
    480 MiB, review), so a node whose heap holds little free memory does not pay it every
    30 s. (Growth since the last trim was the test first: a trim while a burst was still
    held set the mark at its peak, and the freed burst was never given back: review.)
    True if it trimmed; False if it did not need to, or keep_freed set nothing."""
    if not _kept:
        return False
    global _last_free  # noqa: PLW0603 - one allocator, one process
    free = _free_heap()
    if free is not None:
        if _last_free is not None and free < _last_free:
            _last_free = free  # taken again since: what is freed next counts from here
        if free <= 2 * _kept or (_last_free is not None and free <= _last_free + _kept):
            return False  # little free, or little freed since the last trim
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has none)
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    trim(_kept)
    _last_free = _free_heap()
    return True


_MALLINFO2_FIELDS: Final = (
    "arena", "ordblks", "smblks", "hblks", "hblkhd",
    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost",
)  # fmt: skip


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _MALLINFO2_FIELDS]


def _free_heap() -> int | None:
    """Bytes in the heap's free blocks (glibc 2.33's mallinfo2; None where there is none:
    then every call trims)."""
    try:
        info = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    info.restype = _MallInfo2
    got = info()
    return int(got.fordblks + got.fsmblks)
