"""The (origin, sequence) duplicate window that keeps convergence from delivering twice.

While the mesh is stable every event reaches a node once; while it converges two copies
may meet. Each origin (a publishing session) numbers its events; a node remembers, per
origin, the highest sequence seen and a bitmap of the WINDOW before it. Origins are kept
in insertion order and the oldest are forgotten beyond MAX_ORIGINS, so memory is bounded.
"""

from __future__ import annotations

from typing import Final

WINDOW: Final = 4096
MAX_ORIGINS: Final = 65536


class DedupWindow:
    """``seen(origin, seq)`` is True for a repeat (or something too old to judge)."""

    def __init__(self, window: int = WINDOW, max_origins: int = MAX_ORIGINS) -> None:
        self.window = window
        self.max_origins = max_origins
        self._state: dict[bytes, list[int]] = {}  # origin -> [highest seq, bitmap]

    def seen(self, origin: bytes, seq: int) -> bool:
        """Record (origin, seq); True if it was already recorded or falls behind the window."""
        state = self._state.get(origin)
        if state is None:
            if len(self._state) >= self.max_origins:
                del self._state[next(iter(self._state))]
            self._state[origin] = [seq, 1]
            return False
        top, bits = state
        if seq == top + 1:  # in order, the common case: no mask until the bitmap doubles
            bits = (bits << 1) | 1
            if bits.bit_length() > 2 * self.window:
                bits &= (1 << self.window) - 1
            state[0], state[1] = seq, bits
            return False
        if seq > top:
            shift = seq - top
            bits = ((bits << shift) | 1) & ((1 << self.window) - 1) if shift < self.window else 1
            state[0], state[1] = seq, bits
            return False
        back = top - seq
        if back >= self.window:
            return True
        mask = 1 << back
        if bits & mask:
            return True
        state[1] = bits | mask
        return False

    def __len__(self) -> int:
        return len(self._state)
