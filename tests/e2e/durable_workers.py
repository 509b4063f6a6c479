"""Producer and consumer processes for the durability fault tests (run with ``python -m``).

Each writes what it was *told by the node* to a file, one JSON line per fact, so the
test can check the guarantees after a ``kill -9`` of the node:

    producer: {"confirmed": [payload, ...]}         the node acknowledged these as stored
    consumer: {"got": payload, "n": deliveries}     a delivery from the queue
              {"acked": [payload, ...]}             the node committed these acks
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TextIO

from meshctl import connect
from meshctl.errors import Timeout
from node.events import Event

CHUNK = 250
DEADLINE = 90.0


def _line(out: TextIO, obj: object) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def produce(server: str, topic: str, count: int, out: TextIO) -> int:
    with connect(server, name="fault-producer", timeout=2.0) as client:
        for start in range(0, count, CHUNK):
            batch = list(range(start, min(start + CHUNK, count)))
            with client.batch():
                for i in batch:
                    client.publish(topic, str(i), persistent=True)
            client.confirm(timeout=DEADLINE)
            _line(out, {"confirmed": batch})
    return 0


def consume(server: str, queue: str, count: int, out: TextIO) -> int:
    deadline = time.monotonic() + DEADLINE
    seen: set[int] = set()
    unconfirmed: list[int] = []  # acked, not yet confirmed by the node
    with connect(server, name="fault-consumer", timeout=2.0) as client:
        sub = client.consume(queue, max_inflight=500)

        def take(event: Event) -> None:
            payload = int(event.data)
            seen.add(payload)
            _line(out, {"got": payload, "n": event.deliveries})
            sub.ack(event)
            unconfirmed.append(payload)

        while len(seen) < count and time.monotonic() < deadline:
            try:
                event = sub.next(timeout=0.2)
            except Timeout:
                event = None
            if event is not None:
                take(event)
            if unconfirmed and (event is None or len(unconfirmed) >= 100):
                batch, unconfirmed = unconfirmed, []
                try:
                    client.confirm_acks(timeout=1.0)
                except Timeout:
                    unconfirmed = batch + unconfirmed  # the node is down: try again later
                    continue
                # Deliveries the node sent before it confirmed came in before the answer:
                # record them first, so that the file keeps the node's order.
                while sub.queue:
                    take(sub.queue.popleft())
                _line(out, {"acked": batch})
    return 0 if len(seen) == count else 1


def main(argv: list[str]) -> int:
    role, server, name, count, path = argv
    with Path(path).open("w") as out:
        if role == "producer":
            return produce(server, name, int(count), out)
        return consume(server, name, int(count), out)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
