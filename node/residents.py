"""In-process actors that run on the node's own thread: the MQTT listener.

The bridges and the uplink are threads, each with an inproc DEALER to the node: their
client libraries (paho, nats-py) bring loops of their own. An actor the node can step
itself needs no thread at all. The loop polls the actor's file descriptor beside its own
sockets, steps it once per pass, and hands frames both ways as calls: a message an MQTT
client publishes is routed, and its PUBACK and the subscribers' PUBLISHes written, in
the same pass. Through a thread, each such round trip was two wake-ups of one thread by
the other and a frame each way through libzmq, with both threads taking turns at the
interpreter lock.

The frames are the client protocol's, as over a socket: the Router cannot tell a
resident from any other local client, except that its identity is internal.
"""

from __future__ import annotations

import logging
import select
from typing import Any, Final, Protocol

from node.drops import worth_a_line
from node.router import Router

log = logging.getLogger("meshctl.node")

LOG_FIRST: Final = 10  # errors logged with their traceback, then every 1000th
# What a byte from a resident weighs toward the loop's "a stream: do not spin": MQTT packets
# are small, and each costs the node a read, asyncio's callbacks and an acknowledgement.
BYTE_WEIGHT: Final = 4


class Resident(Protocol):
    """What the loop needs of an actor that runs on its thread."""

    ident: bytes  # its client identity at the Router

    def fileno(self) -> int:
        """A descriptor that becomes readable when the actor has input (its selector)."""
        ...

    def step(self, now: float) -> list[bytes]:
        """Handle what is ready without blocking; the frames it sends the node."""
        ...

    def busy(self) -> bool:
        """True when it has work that must not wait for input (the loop must not sleep)."""
        ...

    def routed(self) -> None:
        """The Router has handled every frame the last ``step`` returned (in order)."""
        ...

    def take(self, frame: bytes) -> None:
        """A frame from the node (what the Router would have sent its socket)."""
        ...

    def flush(self) -> None:
        """The loop's output for this pass is handed over: write what it caused."""
        ...

    def last_words(self) -> list[bytes]:
        """The node is stopping: frames to route before it goes (MQTT clients' wills)."""
        ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class Residents:
    """The node's residents by identity; an error of one is logged and counted, never
    raised into the loop (the node serves on, as for a bad frame)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.by_ident: dict[bytes, Resident] = {}
        self.errors = 0
        self._fds: list[int] = []
        self._poll = select.poll()  # the same descriptors, for the loop's spin

    def attach(self, resident: Resident) -> None:
        self.by_ident[resident.ident] = resident
        self.router.internal.add(resident.ident)
        fd = resident.fileno()
        self._fds.append(fd)
        self._poll.register(fd, select.POLLIN)

    def fds(self) -> list[int]:
        """Their descriptors (asked once each, at ``attach``), for the loop's poller."""
        return self._fds

    def readable(self, ready: dict[Any, int]) -> bool:
        """True if the poll found a resident's descriptor ready."""
        return any(fd in ready for fd in self._fds)

    def input_now(self) -> bool:
        """True if a resident has input waiting, without blocking (the loop's spin asks
        this between its looks at the sockets)."""
        return bool(self._poll.poll(0))

    def step(self, now: float) -> int:
        """Step each resident and route what it sent; what that weighs (its bytes times
        BYTE_WEIGHT) toward the loop's decision to spin."""
        handle = self.router.handle
        size = 0
        for ident, r in self.by_ident.items():
            try:
                frames = r.step(now)
            except Exception as e:
                self._failed(r, "step", e)
                continue
            for frame in frames:
                size += len(frame)
                handle(ident, frame, now)
            try:
                r.routed()
            except Exception as e:
                self._failed(r, "routed", e)
        return size * BYTE_WEIGHT

    def busy(self) -> bool:
        for r in self.by_ident.values():
            try:
                if r.busy():
                    return True
            except Exception as e:
                self._failed(r, "busy", e)
        return False

    def take(self, ident: bytes, frame: bytes) -> None:
        try:
            self.by_ident[ident].take(frame)
        except Exception as e:
            self._failed(self.by_ident[ident], "a frame from the node", e)

    def flush(self) -> None:
        for r in self.by_ident.values():
            try:
                r.flush()
            except Exception as e:
                self._failed(r, "flush", e)

    def last_words(self, now: float) -> None:
        """Route what the residents have to say before the node stops."""
        for ident, r in self.by_ident.items():
            try:
                frames = r.last_words()
            except Exception as e:
                self._failed(r, "last words", e)
                continue
            for frame in frames:
                self.router.handle(ident, frame, now)

    def _failed(self, r: Resident, where: str, e: Exception) -> None:
        self.router.counters.internal_errors += 1
        self.errors += 1
        if worth_a_line(self.errors, LOG_FIRST):
            log.error(
                "internal error in %s (%s; total %d): %r",
                type(r).__name__, where, self.errors, e, exc_info=e,
            )  # fmt: skip
