"""The README's client-library example as a program: pub/sub, request-reply and batching.

Run it against a node: ``python examples/quickstart.py --server tcp://127.0.0.1:4850``
(default: ``$MESHCTL_SERVER`` or the local node).
"""

from __future__ import annotations

import argparse
import os

from meshctl import connect


def main() -> None:
    """Publish and receive one event, answer one request, then send 10,000 in batches."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--server", default=os.environ.get("MESHCTL_SERVER"))
    server = parser.parse_args().server

    with connect(server, name="example") as client:
        temps = client.subscribe("plant1/*/temp")  # returns once the node confirmed
        client.publish("plant1/line3/temp", b"21.5", {"unit": "C"})
        event = temps.next(timeout=1.0)
        print(event.topic, event.data, event.headers)

        # A responder: callbacks run whenever the client reads its socket, which
        # request() does while it waits, so this one process can ask itself.
        client.subscribe(
            "svc/upper", group="upper", callback=lambda req: client.reply(req, req.data.upper())
        )
        reply = client.request("svc/upper", b"hello", timeout=2.0)
        print(reply.data)

        with client.batch():  # coalesce many events per frame
            for n in range(10_000):
                client.publish("load/test", str(n))
        client.flush()  # returns when the node has processed them all
        print("published 10000 events")


if __name__ == "__main__":
    main()
