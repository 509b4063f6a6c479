"""Cutting queued records into frames of bounded size, sans-IO.

Frames stay near MAX_FRAME_BYTES so that a client's or a link's queue, counted in frames
by ZeroMQ's high-water mark, is also bounded in bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from node.codec import HEAD_DELIVER, HEAD_FWD

MAX_FRAME_BYTES: Final = 64 * 1024


def link_frames(header: bytes, parts: list[bytes]) -> Iterator[bytes]:
    """FWD frames of about MAX_FRAME_BYTES: one routing header, then records."""
    head = HEAD_FWD + header
    start = 0
    size = 0
    for i, part in enumerate(parts):
        size += len(part)
        if size >= MAX_FRAME_BYTES:
            yield head + b"".join(parts[start : i + 1])
            start, size = i + 1, 0
    if start < len(parts):
        yield head + b"".join(parts[start:])


def frames_counted(parts: list[bytes]) -> Iterator[tuple[bytes, int]]:
    """Cut (sid prefix, record) pairs into DELIVER frames of about MAX_FRAME_BYTES."""
    start = 0
    size = 0
    n = len(parts)
    for i in range(1, n, 2):
        size += len(parts[i]) + 4
        if size >= MAX_FRAME_BYTES:
            yield HEAD_DELIVER + b"".join(parts[start : i + 1]), (i + 1 - start) // 2
            start, size = i + 1, 0
    if start < n:
        yield HEAD_DELIVER + b"".join(parts[start:]), (n - start) // 2
