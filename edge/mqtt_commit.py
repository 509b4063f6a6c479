"""QoS 1/2 publishes from MQTT clients waiting for the node's commit, sans-IO.

With the node's store on, a QoS 1 or 2 PUBLISH becomes a persistent mesh event (F_PERSISTENT)
and is acknowledged (PUBACK, or PUBREC for QoS 2) only when the node's PACK names its event
id: the event is then on disk. An ERR naming the id (disk full, spool full) means nothing
was stored: MQTT 3.1.1 has no negative PUBACK, so the client's connection is closed and the
client resends on reconnect, with the same event id when its session kept the mapping
(``Session.incoming``). The node answers every persistent record it receives; a record
lost on the way (the node's queue full) is sent again, same id, after ``RETRY_AFTER``
seconds with no answer at all, as ``meshctl.client`` does.

The time is a parameter (``now``); this module keeps no clock and sends nothing.
"""

from __future__ import annotations

import itertools
from typing import Any, Final

from edge.mqtt_session import Session

RETRY_AFTER: Final = 2.0  # seconds without a PACK or ERR before records are sent again
RESEND_MAX: Final = 1_000  # records sent again per call, oldest first


class Committing:
    """Event id (hex, as PACK and ERR carry it) -> the session and packet id it answers."""

    __slots__ = ("_answered_upto", "_sends", "last_answer", "waiting")

    def __init__(self) -> None:
        # key -> (session, packet id, QoS, when last sent, send number), in the order sent
        self.waiting: dict[str, tuple[Session, int, int, float, int]] = {}
        self.last_answer = 0.0
        self._sends = itertools.count()
        self._answered_upto = -1  # the highest send number the node has answered

    def __len__(self) -> int:
        return len(self.waiting)

    def wait(
        self, session: Session, packet_id: int, qos: int, key: str, record: bytes, now: float
    ) -> None:
        """Remember a publish until the node answers for ``key``."""
        if not self.waiting:
            self.last_answer = now  # the retry clock starts with the first one waiting
        session.incoming[packet_id] = (key, record)
        self.waiting.pop(key, None)  # a resend (DUP) goes to the back
        self.waiting[key] = (session, packet_id, qos, now, next(self._sends))

    def answered(self, ids: list[Any], now: float) -> list[tuple[Session, int, int]]:
        """The (session, packet id, QoS) that ``ids`` (a PACK's or an ERR's) settle; ids
        that are not ours (a will's), or whose packet id was reused since, give nothing.
        The caller acknowledges (or refuses) them; once a PUBACK/PUBREC is written it drops
        ``session.incoming[packet_id]``, which the client may then reuse."""
        self.last_answer = now
        out = []
        waiting = self.waiting
        for i in ids:
            entry = waiting.pop(i, None)
            if entry is None:
                continue
            self._answered_upto = max(self._answered_upto, entry[4])
            held = entry[0].incoming.get(entry[1])
            if held is not None and held[0] == i:
                out.append(entry[:3])
        return out

    def due(self, now: float) -> list[bytes]:
        """Records to send again (same ids), oldest first, at most RESEND_MAX a call, each
        at least RETRY_AFTER after it was last sent: all such while the node has answered
        nothing for RETRY_AFTER, and otherwise those sent before a record it has answered
        (it answers in the order sent, so those were lost on the way).

        Resending everything waiting each time the node fell silent pushed 24 MB into a
        stalled node every 2 s at 200,000 waiting; a frame lost while the node answered
        later ones was never sent again; and resending whatever waited long, answers or
        not, resent healthy records of a saturated node (found in review)."""
        if not self.waiting:
            return []
        silent = now - self.last_answer >= RETRY_AFTER
        before = (1 << 62) if silent else self._answered_upto
        older = now - RETRY_AFTER
        out: list[bytes] = []
        seen: list[str] = []
        for key, (session, packet_id, _qos, sent, number) in self.waiting.items():
            if number >= before or sent > older or len(out) >= RESEND_MAX:
                break  # the rest were sent later still (the order is the order sent)
            seen.append(key)
            held = session.incoming.get(packet_id)
            if held is not None and held[0] == key:
                out.append(held[1])
        for key in seen:
            session, packet_id, qos, _sent, _number = self.waiting.pop(key)
            held = session.incoming.get(packet_id)
            if held is not None and held[0] == key:  # else the client reused the id: gone
                self.waiting[key] = (session, packet_id, qos, now, next(self._sends))
        return out
