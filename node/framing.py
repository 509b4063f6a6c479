"""Cutting queued records into frames of bounded size, sans-IO.

Frames stay near MAX_FRAME_BYTES so that a client's or a link's queue, counted in frames
by ZeroMQ's high-water mark, is also bounded in bytes.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Iterator
from itertools import accumulate
from typing import Any, Final

from node.codec import HEAD_DELIVER, HEAD_FWD, RUN_HEAD, SID

MAX_FRAME_BYTES: Final = 64 * 1024
# A run of records (codec.py) for one subscriber or link, one item of a frame: a frame
# ends after the item that reaches MAX_FRAME_BYTES, so runs as long as that made frames of
# twice the bound (review), and a frame now passes it by at most a quarter (or a record).
MAX_RUN_BYTES: Final = MAX_FRAME_BYTES // 4


def _cuts(cum: list[int]) -> Iterator[tuple[int, int]]:
    """(first, last) item of each frame: cut after the item that reaches MAX_FRAME_BYTES.

    ``cum`` holds running byte totals; ``accumulate`` and ``bisect`` keep the per-item
    work in C, which showed in profiles of a busy node.
    """
    n = len(cum)
    start = 0
    base = 0
    while start < n:
        k = min(bisect_left(cum, base + MAX_FRAME_BYTES, lo=start), n - 1)
        yield start, k
        base = cum[k]
        start = k + 1


def link_frames(header: bytes, parts: list[bytes]) -> Iterator[bytes]:
    """FWD frames of about MAX_FRAME_BYTES: one routing header, then records."""
    head = HEAD_FWD + header
    for first, last in _cuts(list(accumulate(map(len, parts)))):
        chunk = parts[first : last + 1]
        chunk.insert(0, head)  # one join copies the records once; head + join copied twice
        yield b"".join(chunk)


def frames_counted(parts: list[bytes]) -> Iterator[tuple[bytes, int]]:
    """Cut (prefix, records) pairs into DELIVER frames of about MAX_FRAME_BYTES, each with
    its count of events: a prefix is a sid (one record) or a run's head (its count)."""
    heads = parts[0::2]
    counts = None
    if sum(map(len, heads)) != SID.size * len(heads):  # runs among them
        counts = list(accumulate(map(_events_after, heads)))
    for first, last in _cuts(list(accumulate(map(len, parts)))[1::2]):
        chunk = parts[2 * first : 2 * last + 2]
        chunk.insert(0, HEAD_DELIVER)
        if counts is None:
            yield b"".join(chunk), last + 1 - first
        else:
            yield b"".join(chunk), counts[last] - (counts[first - 1] if first else 0)


def _events_after(head: bytes) -> int:
    """Records after a delivery prefix: one after a sid, a run's count after its head."""
    return 1 if len(head) == SID.size else RUN_HEAD.unpack(head)[1]


def json_batches(objs: list[dict[str, Any]], budget: int) -> Iterator[list[dict[str, Any]]]:
    """``objs`` in order, in runs whose compact JSON stays within ``budget`` bytes (an
    object larger than that goes alone): the control frames that carry many states or
    revocations, each within what a receiver decodes."""
    batch: list[dict[str, Any]] = []
    size = 0
    for obj in objs:
        n = len(json.dumps(obj, separators=(",", ":"))) + 1
        if batch and size + n > budget:
            yield batch
            batch, size = [], 0
        batch.append(obj)
        size += n
    if batch:
        yield batch
