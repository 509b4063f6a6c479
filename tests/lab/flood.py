"""Hostile host for the lab flood test: bogus mDNS services with the victim's mesh name, plus
a bounded stream of connection attempts on a node's port (garbage, and CURVE handshakes with
random keys that then send a LINK without membership). Stops by itself after --seconds."""

from __future__ import annotations

import argparse
import asyncio
import secrets
import socket
import sys
import time

import zmq
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

SERVICE = "_meshctl._tcp.local."


async def advertise(mesh: str, n: int, address: str) -> AsyncZeroconf:
    aiozc = AsyncZeroconf(interfaces=[address], ip_version=IPVersion.V4Only)
    tasks = []
    for i in range(n):
        node = secrets.token_hex(8)
        info = ServiceInfo(
            SERVICE,
            f"bogus{i}-{node[:8]}.{SERVICE}",
            port=20000 + i,
            properties={
                "mesh": mesh,
                "id": node,
                "proto": "1",
                "name": f"bogus{i}",
                "pk": zmq.curve_keypair()[0].decode(),
            },
            server=f"bogus-{node}.local.",
            parsed_addresses=[address],
        )
        tasks.append(await aiozc.async_register_service(info, cooperating_responders=True))
    await asyncio.gather(*tasks)
    return aiozc


def hammer(target: str, port: int, until: float, server_key: bytes | None) -> int:
    """Connection attempts at about 100 a second, each closed again; returns the count."""
    ctx = zmq.Context()
    n = 0
    while time.monotonic() < until:
        try:
            with socket.create_connection((target, port), timeout=1) as s:
                s.sendall(secrets.token_bytes(64))
        except OSError:
            pass
        d = ctx.socket(zmq.DEALER)
        d.linger = 0
        pub, sec = zmq.curve_keypair()
        d.curve_publickey, d.curve_secretkey = pub, sec
        d.curve_serverkey = server_key or zmq.curve_keypair()[0]
        d.connect(f"tcp://{target}:{port}")
        d.send(b"\x01\x07{}", zmq.NOBLOCK)
        time.sleep(0.01)
        d.close(0)
        n += 1
    ctx.term()
    return n


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mesh", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--port", type=int, default=4850)
    ap.add_argument("--services", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--server-key", default="", help="the node's CurveZMQ key: reach ZAP")
    args = ap.parse_args()
    me = socket.gethostbyname(socket.gethostname())
    addrs = [a for a in (me,) if not a.startswith("127.")]
    address = addrs[0] if addrs else args.target.rsplit(".", 1)[0] + ".3"
    until = time.monotonic() + args.seconds
    aiozc = await advertise(args.mesh, args.services, address)
    print("flooding", file=sys.stderr, flush=True)
    n = await asyncio.get_running_loop().run_in_executor(
        None, hammer, args.target, args.port, until, args.server_key.encode() or None
    )
    print(f"made {n} connection attempts", file=sys.stderr, flush=True)
    await aiozc.async_close()


if __name__ == "__main__":
    asyncio.run(main())
