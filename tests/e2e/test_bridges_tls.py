"""Bridges over TLS to real brokers with a private CA: mosquitto asking for a client
certificate (as cloud brokers such as AWS IoT Core do), and nats-server. Each broker is
started on a free 127.0.0.1 port and stopped by its PID; certificates are made per test
(tests/tls_certs.py)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    NodeFactory,
    NodeProcess,
    cli_env,
    free_tcp_port,
    need_binary,
    run_up_refused,
    wait_for,
)
from tls_certs import Authority

from meshctl.client import connect

pytestmark = [pytest.mark.e2e, pytest.mark.bridge]


@contextlib.contextmanager
def broker(argv: list[str], port: int) -> Iterator[None]:
    """Run a broker until the block ends: wait until it accepts on ``port``, stop by PID."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert proc.poll() is None, f"{argv[0]} exited: {proc.stderr.read()!r}"  # type: ignore[union-attr]
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert time.monotonic() < deadline, f"{argv[0]} never listened on {port}"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    ca = Authority(tmp_path)
    return {
        "ca": ca.pem,
        "server": ca.issue("broker", "localhost", server=True),
        "client": ca.issue("edge-node", "edge-node", server=False),
        "tool": ca.issue("tool", "tool", server=False),
    }


def bridged(make_node: NodeFactory, table: str) -> NodeProcess:
    node = make_node(config_text=table)
    wait_for(
        lambda: all(b["state"] == "up" for b in node.status()["bridges"]),
        timeout=15,
        what="bridge up over TLS",
    )
    return node


def test_mqtt_bridge_with_private_ca_and_client_certificate(
    make_node: NodeFactory, pki: dict[str, Any], tmp_path: Path
) -> None:
    need_binary("mosquitto")
    need_binary("mosquitto_sub")
    port, server = free_tcp_port(), pki["server"]
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        f"cafile {pki['ca']}\ncertfile {server.cert}\nkeyfile {server.key}\n"
        "require_certificate true\nuser root\n"
    )
    mine, tool = pki["client"], pki["tool"]
    tool_tls = ["--cafile", str(pki["ca"]), "--cert", str(tool.cert), "--key", str(tool.key)]
    with broker(["mosquitto", "-c", str(conf)], port):
        node = bridged(
            make_node,
            f"""
[[bridge]]
kind = "mqtt"
url = "mqtts://127.0.0.1:{port}"
ca_file = "{pki["ca"]}"
cert_file = "{mine.cert}"
key_file = "{mine.key}"
import = ["in/#"]
export = ["out/>"]
""",
        )
        (status,) = node.status()["bridges"]
        assert status["state"] == "up"
        sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), *tool_tls, "-t", "out/#",
             "-v", "-C", "1", "-W", "15"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
        )  # fmt: skip
        try:
            with connect(node.ipc) as c:
                mesh_sub = c.subscribe("in/>")
                deadline = time.monotonic() + 15
                while sub.poll() is None and time.monotonic() < deadline:
                    c.publish("out/report", b"from the mesh")  # until mosquitto_sub is in
                    c.flush()
                    time.sleep(0.3)
                out, err = sub.communicate(timeout=15)
                assert out.decode().splitlines() == ["out/report from the mesh"], err
                done = subprocess.run(
                    ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *tool_tls,
                     "-t", "in/cmd", "-m", "from the cloud"],
                    capture_output=True, timeout=15, check=False, env=cli_env(),
                )  # fmt: skip
                assert done.returncode == 0, done.stderr
                ev = mesh_sub.next(10)
                assert (ev.topic, ev.data) == ("in/cmd", b"from the cloud")
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.wait(5)


def test_nats_bridge_with_private_ca_and_client_certificate(
    make_node: NodeFactory, pki: dict[str, Any]
) -> None:
    import asyncio

    import nats

    need_binary("nats-server")
    port, server, mine, tool = free_tcp_port(), pki["server"], pki["client"], pki["tool"]
    argv = ["nats-server", "-a", "127.0.0.1", "-p", str(port), "--tlsverify",
            "--tlscert", str(server.cert), "--tlskey", str(server.key),
            "--tlscacert", str(pki["ca"])]  # fmt: skip
    with broker(argv, port):
        node = bridged(
            make_node,
            f"""
[[bridge]]
kind = "nats"
url = "tls://127.0.0.1:{port}"
ca_file = "{pki["ca"]}"
cert_file = "{mine.cert}"
key_file = "{mine.key}"
export = ["out/>"]
""",
        )

        async def receive() -> bytes:
            import ssl

            ctx = ssl.create_default_context(cafile=str(pki["ca"]))
            ctx.load_cert_chain(tool.cert, tool.key)
            nc = await nats.connect(f"tls://127.0.0.1:{port}", tls=ctx)
            sub = await nc.subscribe("out.>")
            await nc.flush()
            with connect(node.ipc) as c:
                c.publish("out/x", b"over tls")
            msg = await sub.next_msg(timeout=10)
            await nc.close()
            return bytes(msg.data)

        assert asyncio.run(receive()) == b"over tls"


def test_a_bridge_ca_file_that_is_missing_stops_up_with_one_line(tmp_path: Path) -> None:
    conf = tmp_path / "node.toml"
    conf.write_text(
        '[[bridge]]\nkind = "mqtt"\nurl = "mqtts://127.0.0.1:8883"\n'
        f'ca_file = "{tmp_path}/nope.pem"\nexport = ["a/>"]\n'
    )
    r = run_up_refused(conf, tmp_path / "d")
    assert r.returncode == 2, r.describe()
    assert len(r.err_lines) == 1, r.describe()
    assert f"{conf}: bridge[0].ca_file: cannot read" in r.stderr
