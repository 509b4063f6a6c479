"""Messages per second through the node's MQTT listener, as a ratio to mosquitto.

Same clients both times: a paho-mqtt publisher (this process) -> broker -> a paho-mqtt
subscriber (its own process), QoS 0 and QoS 1, 256-byte payloads. The brokers are a
throwaway ``meshctl up --mqtt`` and Debian's mosquitto, each on a free 127.0.0.1 port in
the same run, each stopped by its PID. Bounded: ``--count`` messages per run, ``--rounds``
interleaved rounds (medians reported), and a run ends after 3 s without a message.
With the node's store on (the default), QoS 1 through meshctl is persistent: each PUBACK
waits for the event's commit to SQLite, which mosquitto (``persistence false``) does not
do; ``--no-store`` measures the node without a store (QoS 1 acknowledged after routing).
Run: ``python benchmarks/mqtt_listener.py [--count N] [--rounds N] [--no-store]``.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt

LAB = Path(os.environ.get("MESH_LAB_DIR", Path(__file__).resolve().parents[2] / "shared" / "lab"))
sys.path.insert(0, str(LAB))
import labhelpers as lh  # noqa: E402

PAYLOAD = b"x" * 256
INFLIGHT = 100  # QoS 1 window of the clients and of both brokers
QUEUE = 100_000  # both brokers queue this many QoS 1 messages per client: nothing is lost


def _client(name: str) -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(INFLIGHT)
    c.max_queued_messages_set(0)
    return c


def subscriber(port: int, qos: int, count: int, ready: Any, result: Any) -> None:
    """In its own process: receive until ``count`` or 3 s of silence; report (n, last)."""
    got = [0, 0.0]
    c = _client(f"bench-sub-{os.getpid()}")

    def on_message(*_: Any) -> None:
        got[0] += 1
        got[1] = time.monotonic()

    c.on_message = on_message
    c.on_subscribe = lambda *_: ready.set()
    c.on_connect = lambda cl, *_: cl.subscribe("bench/#", qos)
    c.connect("127.0.0.1", port)
    c.loop_start()
    last_seen, last_n = time.monotonic(), 0
    while got[0] < count:
        time.sleep(0.05)
        if got[0] != last_n:
            last_seen, last_n = time.monotonic(), got[0]
        elif time.monotonic() - last_seen > 3:
            break
    c.loop_stop()
    c.disconnect()
    result.put((got[0], got[1]))


def run(port: int, qos: int, count: int) -> tuple[float, int]:
    """(messages/s, messages received) for one broker and QoS."""
    ctx = mp.get_context("spawn")
    ready, result = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=subscriber, args=(port, qos, count, ready, result))
    proc.start()
    try:
        if not ready.wait(10):
            raise SystemExit(f"subscriber on port {port} never subscribed")
        pub = _client(f"bench-pub-{os.getpid()}")
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        t0 = time.monotonic()
        info = None
        for i in range(count):
            info = pub.publish(f"bench/{i % 16}", PAYLOAD, qos=qos)
        if info is not None:
            info.wait_for_publish(60)
        got, last = result.get(timeout=120)
        pub.loop_stop()
        pub.disconnect()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return (got / (last - t0) if got else 0.0), got


@contextlib.contextmanager
def mosquitto(tmp: Path) -> Iterator[int]:
    port = lh.free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"max_inflight_messages {INFLIGHT}\nmax_queued_messages {QUEUE}\n"
    )
    with _stopped(["mosquitto", "-c", str(conf)], port) as p:
        yield p


@contextlib.contextmanager
def meshctl_node(tmp: Path, *, store: bool = True) -> Iterator[int]:
    port = lh.free_port()
    conf = tmp / "meshctl.toml"
    conf.write_text(
        f'[mqtt]\nlisten = "127.0.0.1:{port}"\nmax_inflight = {INFLIGHT}\nmax_queued = {QUEUE}\n'
        "allow_anonymous = true\n"  # as mosquitto here: the clients bring no user
        + ("" if store else "[store]\nenabled = false\n")
    )
    argv = [sys.executable, "-m", "meshctl", "up", "--port", "0", "--listen", "127.0.0.1",
            "--no-discovery", "--data-dir", str(tmp / "node"), "--config", str(conf)]  # fmt: skip
    with _stopped(argv, port) as p:
        yield p


@contextlib.contextmanager
def _stopped(argv: list[str], port: int) -> Iterator[int]:
    """Run a broker until the block ends; stop it by its PID."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603
    try:
        lh.wait_listening(proc, port, timeout=15)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def main() -> None:
    """Print messages/s through each broker (median of interleaved rounds) and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--no-store", action="store_true", help="node without a store: QoS 1 is not persistent"
    )
    args = parser.parse_args()
    if shutil.which("mosquitto") is None:
        raise SystemExit("mosquitto is not installed (scripts/test installs it as root)")
    tmp = Path(tempfile.mkdtemp(prefix="meshctl-mqtt-bench-"))
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        with (
            mosquitto(tmp) as mosq_port,
            meshctl_node(tmp, store=not args.no_store) as mesh_port,
        ):
            for rnd in range(args.rounds):  # interleaved: machine noise hits both alike
                for qos in (0, 1):
                    for name, port in (("mosquitto", mosq_port), ("meshctl", mesh_port)):
                        rate, got = run(port, qos, args.count)
                        rates.setdefault((name, qos), []).append(rate)
                        lost = f", {args.count - got} lost" if got < args.count else ""
                        print(f"round {rnd + 1} {name:9} QoS {qos}: {rate:9,.0f} msg/s{lost}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for qos in (0, 1):
        mosq = statistics.median(rates["mosquitto", qos])
        mesh = statistics.median(rates["meshctl", qos])
        print(
            f"QoS {qos}: mosquitto {mosq:,.0f} msg/s, meshctl {mesh:,.0f} msg/s, "
            f"ratio {mesh / mosq:.2f} (medians of {args.rounds}, {args.count} messages each)",
            flush=True,
        )


if __name__ == "__main__":
    main()
