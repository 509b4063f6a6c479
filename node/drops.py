"""Events a full queue refused, and how many of them have been told: one slow consumer's or
one link's. Notices go at most once an interval; the rest of a burst is told by a timer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

NOTICE_EVERY: Final = 1.0  # seconds: at most one notice of drops per client or link


@dataclass(slots=True)
class Drops:
    total: int = 0
    told: int = 0
    told_at: float = float("-inf")

    def untold(self, now: float) -> int:
        """The drops not told yet, marked told, if a notice is due (none in the last
        NOTICE_EVERY seconds); 0 otherwise."""
        if self.total == self.told or now - self.told_at < NOTICE_EVERY:
            return 0
        newly, self.told, self.told_at = self.total - self.told, self.total, now
        return newly


def worth_a_line(n: int, first: int = 10) -> bool:
    """Whether the ``n``-th of something counted gets a log line: the first ``first`` one
    by one, then every 1000th, so a flood of bad input costs a few lines, not the disk,
    and the counter in `meshctl status` tells the rest."""
    return n <= first or n % 1000 == 0
