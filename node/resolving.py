"""Which announced mDNS services to resolve now, and when to try again, sans-IO.

node/discovery.py resolves what its browser announces. One at a time, a service that never
answers held up every other for the whole timeout (2 s each: on a LAN of many such
services, finding a peer took minutes); and a resolution that failed once (an answer lost
on Wi-Fi, a peer still booting) was never tried again, so that peer stayed unlinked until
it changed its records. Here up to ``limit`` resolutions run at once, a name never tried
goes before any retry (a LAN of stale pointers must not keep a new peer waiting), and a
failed one is tried again after 2, 4, 8, 16 and 32 s; then not until it is announced
again (stale pointers live up to 75 minutes: retrying each forever would keep the
resolvers busy and the network chattering for nothing).

The time is a parameter (``now``); this module keeps no clock and starts nothing.
"""

from __future__ import annotations

from typing import Final

RETRY_FIRST: Final = 2.0  # seconds after the first failure
TRIES: Final = 6  # resolutions of one announcement before waiting for the next one


class Resolutions:
    """Announced names, the ones due for a resolution, and the ones being resolved."""

    __slots__ = ("_due", "_failures", "announced", "limit", "running")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.announced: set[str] = set()
        self.running: set[str] = set()
        self._due: dict[str, float] = {}  # name -> when to resolve it (again)
        self._failures: dict[str, int] = {}  # name -> failed tries in a row

    def added(self, name: str, now: float) -> None:
        """The browser announced ``name`` (new, or its records changed): resolve it now,
        after the one running for it, if any."""
        self.announced.add(name)
        self._failures.pop(name, None)
        self._due[name] = now

    def removed(self, name: str) -> None:
        """The service said goodbye (or expired): no more tries, and a resolution still
        running for it is not reported."""
        self.announced.discard(name)
        self._due.pop(name, None)
        self._failures.pop(name, None)

    def start(self, now: float) -> list[str]:
        """Names to resolve now, keeping at most ``limit`` running: the fewest failed
        tries first, then the oldest wish."""
        room = self.limit - len(self.running)
        if room <= 0 or not self._due:
            return []
        out = [n for n, t in self._due.items() if t <= now and n not in self.running]
        failures = self._failures
        out.sort(key=lambda n: (failures.get(n, 0), self._due[n]))
        out = out[:room]
        for name in out:
            del self._due[name]
            self.running.add(name)
        return out

    def finished(self, name: str, ok: bool, now: float) -> bool:
        """A resolution of ``name`` ended; True if its result is to be reported (the
        service is still announced). A failure is tried again later (at most TRIES in
        all), unless a newer announcement already asked for another try."""
        self.running.discard(name)
        if name not in self.announced:
            return False
        if ok:
            self._failures.pop(name, None)
            return True
        if name in self._due:  # announced again meanwhile: that one is a fresh start
            return False
        n = self._failures[name] = self._failures.get(name, 0) + 1
        if n < TRIES:
            self._due[name] = now + RETRY_FIRST * 2 ** (n - 1)
        return False
