"""What the node takes from its wall clock when the clock may not be set yet.

A device without a real-time clock boots at 1970 (or at its last shutdown) and NTP steps
the clock later. A time before ``SET_AFTER`` is taken as "the clock was not set": the log
does not age such entries out (they go by size), and the node signs no join token or
membership record with it, whose validity would be wrong by decades.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Final

SET_AFTER: Final = 1_735_689_600  # 2025-01-01T00:00:00Z: no clock in use says earlier
SET_AFTER_NS: Final = SET_AFTER * 10**9


def clock_is_set(now: float | None = None) -> bool:
    """True when the wall clock (``now``, seconds; default: now) is past ``SET_AFTER``."""
    return (time.time() if now is None else now) >= SET_AFTER


def unset_clock_error(whose: str = "this host's", now: float | None = None) -> str:
    """The one-line reason a node refuses to sign while its clock is not set."""
    t = time.time() if now is None else now
    said = datetime.fromtimestamp(max(t, 0), timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"{whose} clock says {said}, which cannot be right: set it (NTP) before issuing "
        "tokens, records or credentials, whose validity is counted from it"
    )
