"""Waiting for events while telling the operator when the node falls silent.

A ``meshctl sub`` whose node was killed waited for ever without a word, as if the topic
were merely quiet. NATS's CLI says "Disconnected" and "Reconnected"; so do these
commands, on stderr, and go on waiting: the client resumes by itself (subscriptions
included) when the node answers again.
"""

from __future__ import annotations

import time
from typing import Final

from meshctl.cli.output import note
from meshctl.client import Client, Subscription
from meshctl.errors import Timeout
from node.events import Event

# A live node is heard at least every ~1.5 s (it probes quiet clients every 0.5 s after
# 1 s of quiet), so this much silence means it is gone, stopped or cut off.
SILENT_AFTER: Final = 5.0
SLICE: Final = 1.0  # how often a wait looks at the silence


class NodeWatch:
    """Says once when the node falls silent and once when it is heard again."""

    def __init__(self, client: Client, silent_after: float = SILENT_AFTER) -> None:
        self.client = client
        self.silent_after = silent_after
        self.silent = False
        self.resumes = client.resumes

    def check(self) -> None:
        if self.client.resumes != self.resumes:
            # The node dropped what it had queued for us: a subscriber read nothing of it
            # and took the gap for a quiet stream (exploratory test: 94,555 events).
            self.resumes = self.client.resumes
            note(
                f"the node at {self.client.server} had forgotten this client (it restarted, "
                "or dropped it as slow or silent): subscriptions restored; live events in "
                "between are lost (a replay or a queue goes on where it was)"
            )
        quiet = self.client.silence
        if not self.silent and quiet >= self.silent_after:
            self.silent = True
            note(
                f"the node at {self.client.server} has not answered for {quiet:.0f}s: "
                "waiting for it (Ctrl-C to stop)"
            )
        elif self.silent and quiet < self.silent_after:
            self.silent = False
            note(f"the node at {self.client.server} answers again")

    def next(self, subscription: Subscription, timeout: float | None = None) -> Event:
        """``subscription.next(timeout)``, in slices that check the node's silence."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            try:
                event = subscription.next(SLICE if left is None else max(0.0, min(SLICE, left)))
            except Timeout:
                self.check()
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                continue
            if self.silent or self.client.resumes != self.resumes:
                self.check()
            return event
