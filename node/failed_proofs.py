"""Addresses that keep failing to prove membership: their handshakes are dropped unread.

A CURVE key that failed a proof is blocked for a while (security.py), but keys cost
nothing to make. A peer that brings a fresh key every time passes ZAP, and every first
frame it sends (a LINK may carry ~300 KiB of JSON) is decoded before its proof can be
checked: up to ~0.03 s of the node's CPU each, so a few dozen a second would stall a
node. Counting failed proofs per address bounds that: after ``limit`` failures within
``window`` seconds, first frames from that address are dropped before they are decoded,
for ``block`` seconds. Sans-IO: the caller passes the clock.

Addresses are counted as IPv4 addresses or IPv6 /64s (``source_of``). The price is that
a member behind the same address (one NAT, one /64) cannot connect over TCP while the
block lasts; local clients on ipc never count.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from typing import Final

LIMIT: Final = 20  # failed proofs from one address ...
WINDOW: Final = 60.0  # ... within this many seconds ...
BLOCK: Final = 60.0  # ... drop its first frames unread for this long
MAX_ADDRESSES: Final = 10_000  # addresses tracked at once (memory bound)


def source_of(address: str) -> str:
    """What is counted: an IPv4 address, or the /64 of an IPv6 one (a host is handed a
    whole /64 and may pick any address in it)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.split("%", maxsplit=1)[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d is an IPv4 peer
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network(f"{ip}/64", strict=False))


class FailedProofs:
    """Failed proofs per address, and the addresses blocked because of them."""

    def __init__(
        self,
        limit: int = LIMIT,
        window: float = WINDOW,
        block: float = BLOCK,
        max_addresses: int = MAX_ADDRESSES,
    ) -> None:
        self.limit = limit
        self.window = window
        self.block = block
        self.max_addresses = max_addresses
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}  # address -> when the block ends

    def failed(self, address: str, now: float) -> bool:
        """Note a failed proof from ``address``; True if that starts a block."""
        address = source_of(address)
        times = self._failures.get(address)
        if times is None:
            if len(self._failures) >= self.max_addresses:
                self._forget_quiet(now)
            times = self._failures[address] = deque(maxlen=self.limit)
        times.append(now)
        if len(times) < self.limit or now - times[0] > self.window:
            return False
        del self._failures[address]
        if len(self._blocked) >= self.max_addresses:
            self._blocked = {a: t for a, t in self._blocked.items() if t > now}
            if len(self._blocked) >= self.max_addresses:
                self._blocked.pop(next(iter(self._blocked)))
        self._blocked[address] = now + self.block
        return True

    def blocked(self, address: str, now: float) -> bool:
        """Whether first frames from ``address`` are to be dropped unread right now."""
        address = source_of(address)
        until = self._blocked.get(address)
        if until is None:
            return False
        if until > now:
            return True
        del self._blocked[address]
        return False

    def listing(self, now: float) -> dict[str, float]:
        """Blocked addresses and the seconds each block has left (for status)."""
        return {a: round(t - now, 1) for a, t in self._blocked.items() if t > now}

    def _forget_quiet(self, now: float) -> None:
        """Make room: drop addresses whose last failure left the window, or else all."""
        self._failures = {a: t for a, t in self._failures.items() if now - t[-1] <= self.window}
        if len(self._failures) >= self.max_addresses:
            self._failures.clear()
