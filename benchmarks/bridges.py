"""Events per second through each bridge, both directions, against real local brokers.

Starts mosquitto and nats-server on free loopback ports (Debian packages; see
scripts/test), a throwaway node bridged to both, and measures, each bounded in count and
time: mesh -> MQTT subscriber, MQTT publisher -> mesh, mesh -> NATS subscriber, NATS
publisher -> mesh. Run: ``python benchmarks/bridges.py [--count N]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import nats
import paho.mqtt.client as mqtt

from meshctl import MeshError, connect
from meshctl.errors import Timeout

LAB = Path(os.environ.get("MESH_LAB_DIR", Path(__file__).resolve().parents[2] / "shared" / "lab"))
sys.path.insert(0, str(LAB))
import labhelpers as lh  # noqa: E402


def start_node(mqtt_port: int, nats_port: int, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    cfg = tmp / "c.toml"
    cfg.write_text(f"""[mesh]
discovery = false
[[bridge]]
kind = "mqtt"
url = "mqtt://127.0.0.1:{mqtt_port}"
import = ["in/mqtt/#"]
export = ["out/>"]
[[bridge]]
kind = "nats"
url = "nats://127.0.0.1:{nats_port}"
import = ["in.nats.>"]
export = ["out/>"]
""")
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [
            sys.executable,
            "-m",
            "meshctl",
            "up",
            "--port",
            "0",
            "--listen",
            "127.0.0.1",
            "--data-dir",
            str(tmp / "n"),
            "--config",
            str(cfg),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ipc = f"ipc://{tmp / 'n' / 'node.sock'}"
    deadline = time.monotonic() + 15
    while True:
        with contextlib.suppress(MeshError), connect(ipc, timeout=0.5) as c:  # not up yet
            if all(b["state"] == "up" for b in c.status()["bridges"]):
                return proc, ipc
        if time.monotonic() > deadline:
            raise SystemExit("node or bridges did not come up")
        time.sleep(0.1)


def _collect(sub: Any, count: int, t0: float) -> tuple[int, float]:
    """Receive up to ``count`` events (3 s of silence ends it); (received, time of last)."""
    got, last = 0, t0
    with contextlib.suppress(Timeout):
        while got < count:
            sub.next(3)
            got += 1
            last = time.perf_counter()
    return got, last


def mesh_to_mqtt(ipc: str, port: int, count: int) -> float:
    got = [0]
    done = threading.Event()
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    c.on_connect = lambda cl, *_: cl.subscribe("out/#")
    c.on_subscribe = lambda *_: ready.set()

    def on_message(*_: Any) -> None:
        got[0] += 1
        if got[0] >= count:
            done.set()

    c.on_message = on_message
    c.connect("127.0.0.1", port)
    c.loop_start()
    ready.wait(5)
    with connect(ipc) as client:
        t0 = time.perf_counter()
        with client.batch():
            for _ in range(count):
                client.publish("out/x", b"x" * 256)
        client.flush()
        done.wait(60)
        elapsed = time.perf_counter() - t0
    c.loop_stop()
    return got[0] / elapsed


def mqtt_to_mesh(ipc: str, port: int, count: int) -> float:
    with connect(ipc) as client:
        sub = client.subscribe("in/mqtt/>")
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.connect("127.0.0.1", port)
        c.loop_start()
        t0 = time.perf_counter()
        for _ in range(count):
            c.publish("in/mqtt/x", b"x" * 256)
        got, last = _collect(sub, count, t0)
        c.loop_stop()
    if got < count:
        print(f"  (MQTT -> mesh: {count - got} of {count} lost: QoS 0 queue limits)")
    return got / (last - t0)


def mesh_to_nats(ipc: str, port: int, count: int) -> float:
    async def run() -> float:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        got = 0
        done = asyncio.Event()

        async def cb(_m: Any) -> None:
            nonlocal got
            got += 1
            if got >= count:
                done.set()

        await nc.subscribe("out.>", cb=cb)
        await nc.flush()
        with connect(ipc) as client:
            t0 = time.perf_counter()
            with client.batch():
                for _ in range(count):
                    client.publish("out/x", b"x" * 256)
            client.flush()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 60)
            elapsed = time.perf_counter() - t0
        await nc.close()
        return got / elapsed

    return asyncio.run(run())


def nats_to_mesh(ipc: str, port: int, count: int) -> float:
    async def run(sub: Any) -> float:
        nc = await nats.connect(f"nats://127.0.0.1:{port}")
        t0 = time.perf_counter()
        for _ in range(count):
            await nc.publish("in.nats.x", b"x" * 256)
        await nc.flush()
        got, last = _collect(sub, count, t0)
        await nc.close()
        if got < count:
            print(f"  (NATS -> mesh: {count - got} of {count} lost)")
        return got / (last - t0)

    with connect(ipc) as client:
        return asyncio.run(run(client.subscribe("in/nats/>")))


def main() -> None:
    """Print events/s through each bridge in each direction."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=20_000)
    count = parser.parse_args().count
    for binary in ("mosquitto", "nats-server"):
        if shutil.which(binary) is None:
            raise SystemExit(f"{binary} is not installed (scripts/test installs it as root)")
    tmp = Path(tempfile.mkdtemp(prefix="meshctl-bridge-bench-"))
    mqtt_port, nats_port = lh.free_port(), lh.free_port()
    with lh.mosquitto(port=mqtt_port), lh.nats_server(port=nats_port):
        proc, ipc = start_node(mqtt_port, nats_port, tmp)
        try:
            for name, fn, port in (
                ("mesh -> MQTT", mesh_to_mqtt, mqtt_port),
                ("MQTT -> mesh", mqtt_to_mesh, mqtt_port),
                ("mesh -> NATS", mesh_to_nats, nats_port),
                ("NATS -> mesh", nats_to_mesh, nats_port),
            ):
                print(
                    f"{name}: {fn(ipc, port, count):,.0f} events/s (256 B, {count} events)",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(10)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
