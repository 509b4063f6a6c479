"""The MQTT listener over TLS (`[mqtt] tls_cert`, `tls_key`, `tls_ca`) with unmodified
clients: mosquitto_pub and mosquitto_sub with --cafile (and --cert/--key when the node
asks for client certificates). Certificates are made per test (tests/tls_certs.py)."""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import (
    Background,
    NodeFactory,
    NodeProcess,
    cli_env,
    need_binary,
    run_cli,
    run_up_refused,
    wait_for,
)
from tls_certs import Authority, Pair, encrypted_key

pytestmark = [pytest.mark.e2e]

CONNECT = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"  # clean session, empty id


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Any]:
    """A CA with a server certificate for 127.0.0.1 and a client certificate, and a client
    certificate from another CA that the node does not trust."""
    ca = Authority(tmp_path)
    other = (
        Authority(tmp_path / "other", "other CA") if (tmp_path / "other").mkdir() is None else None
    )
    assert other is not None
    return {
        "ca": ca.pem,
        "server": ca.issue("server", "localhost", server=True),
        "client": ca.issue("client", "sensor-1", server=False),
        "stranger": other.issue("stranger", "stranger", server=False),
    }


def tls_config(server: Pair, ca: Path | None = None) -> str:
    text = f'[mqtt]\nlisten = "127.0.0.1:0"\ntls_cert = "{server.cert}"\ntls_key = "{server.key}"\n'
    return text + (f'tls_ca = "{ca}"\n' if ca else "")


def mqtt_port(node: NodeProcess) -> int:
    return int(node.status()["mqtt"]["listen"].rsplit(":", 1)[1])


def secured_node_with_a_user(make_node: NodeFactory, pki: dict[str, Any]) -> NodeProcess:
    """A secured node on an mqtts port with MQTT user ``sensor``, password ``s3cret``."""
    node = make_node(config_text=tls_config(pki["server"]), secure=True)
    done = run_cli(
        "mqtt", "passwd", "sensor", "--password-stdin", "--data-dir", str(node.data_dir),
        input="s3cret\n",
    )  # fmt: skip
    assert done.returncode == 0, done.describe()
    return node


def mosquitto_pub(
    port: int, topic: str, message: str, *tls: str
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-q", "1", "-t", topic,
         "-m", message, *tls],
        capture_output=True, timeout=15, check=False, env=cli_env(),
    )  # fmt: skip


def test_mosquitto_clients_over_tls_both_ways(
    make_node: NodeFactory, pki: dict[str, Any], bg: Background
) -> None:
    need_binary("mosquitto_pub")
    node = make_node(config_text=tls_config(pki["server"]))
    port = mqtt_port(node)
    status = node.status()["mqtt"]
    assert status["tls"] is True
    assert status["client_certs"] is False
    assert "(TLS)" in run_cli("status", server=node.ipc).stdout
    sub = bg.start("sub", "sensors/>", "--json", server=node.ipc)
    done = mosquitto_pub(port, "sensors/t", "over tls", "--cafile", str(pki["ca"]))
    assert done.returncode == 0, done.stderr
    sub.wait_lines(1)
    assert [(e["topic"], e["data"]) for e in sub.json_lines()] == [("sensors/t", "over tls")]
    # And the other way: a mesh publish reaches mosquitto_sub over TLS.
    proc = subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(pki["ca"]),
         "-t", "cmd/#", "-v", "-C", "1", "-W", "15"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=cli_env(),
    )  # fmt: skip
    try:
        wait_for(
            lambda: "cmd/>" in {s["pattern"] for s in node.status()["subscriptions"]},
            timeout=10,
            what="mosquitto_sub's subscription at the node",
        )
        assert run_cli("pub", "cmd/light", "on", server=node.ipc).returncode == 0
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert out.decode().splitlines() == ["cmd/light on"], err


def test_connect_sent_with_the_last_handshake_message_is_answered_over_tls(
    make_node: NodeFactory, pki: dict[str, Any]
) -> None:
    """A TLS 1.3 client may send its Finished and its CONNECT in one segment: the node
    reads the CONNECT before its side of the handshake is handed over, and must still
    answer through TLS (it once wrote the CONNACK in clear into the TLS stream)."""
    node = make_node(config_text=tls_config(pki["server"]))
    port = mqtt_port(node)
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    for _ in range(5):
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    raw.sendall(outgoing.read())
                    incoming.write(raw.recv(65536))
            tls.write(CONNECT)
            raw.sendall(outgoing.read())  # Finished and CONNECT together
            answer = b""
            while not answer:
                data = raw.recv(65536)
                assert data, "the node closed the connection"
                incoming.write(data)
                with contextlib.suppress(ssl.SSLWantReadError):
                    answer = tls.read(4)
            assert answer == b"\x20\x02\x00\x00"  # CONNACK, accepted


def client_context(pki: dict[str, Any]) -> ssl.SSLContext:
    """A TLS client context trusting the test CA (the server certificate names localhost)."""
    ctx = ssl.create_default_context(cafile=str(pki["ca"]))
    ctx.check_hostname = False
    return ctx


def expect_all_and_no_will(sub: Any, n: int) -> None:
    """``sub`` (on b/>) gets the n publishes to b/x, then nothing: no will on b/will."""
    from meshctl.errors import Timeout

    assert [sub.next(timeout=10).topic for _ in range(n)] == ["b/x"] * n
    with pytest.raises(Timeout):
        sub.next(timeout=0.5)


def test_a_tls_client_that_sends_more_than_a_step_then_disconnects_loses_nothing(
    make_node: NodeFactory, pki: dict[str, Any]
) -> None:
    """A step handles at most STEP_PACKETS packets; the rest waits with the socket paused.
    Python's TLS transport closes on the client's EOF even while paused: the packets left
    over (its DISCONNECT among them) were lost and its will was published, and after a
    DISCONNECT the connection never closed (found in review)."""
    from edge.mqtt_codec import Connect, Disconnect, Publish, Will, encode
    from meshctl import connect

    node = make_node(config_text=tls_config(pki["server"]))
    port = mqtt_port(node)
    ctx = client_context(pki)
    n = 3000
    with connect(node.ipc, name="counter", timeout=10) as client:
        sub = client.subscribe("b/>")
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            will = Will("b/will", b"WILL")
            body = b"".join(encode(Publish("b/x", str(i).encode(), 0)) for i in range(n))
            tls.sendall(encode(Connect("p", True, 0, will)) + body + encode(Disconnect()))
            tls.shutdown(socket.SHUT_WR)  # FIN after the DISCONNECT
            while tls.recv(65536):  # the CONNACK, then the node's close
                pass
        expect_all_and_no_will(sub, n)
    status = node.status()["mqtt"]
    assert status["clients"] == 0
    assert status["wills"] == 0


def test_a_tls_client_that_leaves_during_its_password_check_is_still_heard(
    make_node: NodeFactory, pki: dict[str, Any]
) -> None:
    """CONNECT with a password, publishes and DISCONNECT in one write, then close_notify:
    TLS closes the transport at once, while the password is still being hashed. What the
    client sent is handled once the check is done, as if it had stayed: every publish,
    and no will (all was lost before; found in review). Wrong-password connections keep
    the hashing worker busy so that the close always comes first."""
    from edge.mqtt_codec import Connect, Disconnect, Publish, Will, encode
    from meshctl import connect

    node = secured_node_with_a_user(make_node, pki)
    port = mqtt_port(node)
    ctx = client_context(pki)

    def tls() -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        return ctx.wrap_socket(raw, server_hostname="localhost")

    n = 300
    with connect(node.ipc, name="counter", timeout=10) as client:
        sub = client.subscribe("b/>")
        jam = [tls() for _ in range(6)]
        for i, s in enumerate(jam):
            s.sendall(encode(Connect(f"j{i}", True, 0, None, "sensor", b"wrong")))
        s = tls()
        body = b"".join(encode(Publish("b/x", str(i).encode(), 0)) for i in range(n))
        hello = encode(Connect("p", True, 0, Will("b/will", b"WILL"), "sensor", b"s3cret"))
        s.sendall(hello + body + encode(Disconnect()))
        with contextlib.suppress(OSError):
            s.unwrap()  # close_notify
        s.close()
        expect_all_and_no_will(sub, n)
        for j in jam:
            j.close()
    status = node.status()["mqtt"]
    assert status["wills"] == 0
    assert status["protocol_errors"] == 0


def test_plain_mqtt_and_garbage_on_the_tls_port_are_refused_in_one_line_each(
    make_node: NodeFactory, pki: dict[str, Any]
) -> None:
    need_binary("mosquitto_pub")
    node = make_node(config_text=tls_config(pki["server"]))
    port = mqtt_port(node)
    plain = mosquitto_pub(port, "sensors/t", "in clear")  # no TLS: the handshake fails
    assert plain.returncode != 0
    for garbage in (CONNECT, b"GET / HTTP/1.1\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as bad:
            bad.sendall(garbage)
            while bad.recv(4096):  # a TLS alert at most; then the node closes
                pass
    wait_for(lambda: node.status()["mqtt"]["tls_failures"] >= 3, timeout=10, what="3 TLS failures")
    # A TLS client is not disturbed, and the log has one line per failure, no traceback.
    done = mosquitto_pub(port, "sensors/t", "fine", "--cafile", str(pki["ca"]))
    assert done.returncode == 0, done.stderr
    log = node.log_text()
    assert "TLS handshake failed" in log
    assert "Traceback" not in log


def test_client_certificates_when_the_node_asks_for_them(
    make_node: NodeFactory, pki: dict[str, Any]
) -> None:
    need_binary("mosquitto_pub")
    node = make_node(config_text=tls_config(pki["server"], pki["ca"]))
    port = mqtt_port(node)
    assert node.status()["mqtt"]["client_certs"] is True
    shown = " ".join(run_cli("status", server=node.ipc).stdout.split())
    assert "(TLS, client certificates)" in shown
    ca = ["--cafile", str(pki["ca"])]
    mine, stranger = pki["client"], pki["stranger"]
    signed = mosquitto_pub(port, "t/x", "1", *ca, "--cert", str(mine.cert), "--key", str(mine.key))
    assert signed.returncode == 0, signed.stderr
    assert mosquitto_pub(port, "t/x", "2", *ca).returncode != 0  # no certificate
    untrusted = ["--cert", str(stranger.cert), "--key", str(stranger.key)]
    assert mosquitto_pub(port, "t/x", "3", *ca, *untrusted).returncode != 0
    wait_for(lambda: node.status()["mqtt"]["tls_failures"] >= 2, timeout=10, what="2 refusals")
    # The same from Python's ssl (what a paho client uses): refused without a certificate.
    assert tls_answer(port, ssl.create_default_context(cafile=str(pki["ca"]))) == "refused"
    with_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    with_cert.load_cert_chain(mine.cert, mine.key)
    assert tls_answer(port, with_cert) == "CONNACK"


def tls_answer(port: int, ctx: ssl.SSLContext) -> str:
    """Send CONNECT over TLS; "CONNACK" if the node answered, "refused" if TLS failed
    (with TLS 1.3 the client's side of the handshake may finish first: then the node's
    refusal shows as the connection closing)."""
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
        ):
            s.sendall(CONNECT)
            got = s.recv(4)
    except (ssl.SSLError, ConnectionError):
        return "refused"
    if not got:
        return "refused"
    return "CONNACK" if got[:1] == b"\x20" else f"other: {got!r}"


@pytest.mark.parametrize(
    ("settings", "key", "why"),
    [
        ('tls_cert = "{dir}/nope.crt"\ntls_key = "{dir}/nope.key"', "mqtt.tls_cert", "cannot read"),
        ('tls_key = "{server_key}"', "mqtt.tls_key", "needs mqtt.tls_cert"),
        ('tls_cert = "{server_cert}"', "mqtt.tls_key", "private key"),
        ('tls_cert = "{server_cert}"\ntls_key = "{client_key}"', "mqtt.tls_cert", "cannot use"),
        (
            'tls_cert = "{server_cert}"\ntls_key = "{server_key}"\ntls_ca = "{server_key}"',
            "mqtt.tls_ca",
            "cannot use",
        ),
        ('tls_cert = "{server_cert}"\ntls_key = "{encrypted_key}"', "mqtt.tls_cert", "encrypted"),
        ('tls_cert = "{server_cert}"\ntls_key = "a\\u0000b"', "mqtt.tls_cert", "null"),
    ],
    ids=[
        "missing-files",
        "key-without-cert",
        "cert-without-key",
        "wrong-key",
        "ca-not-a-cert",
        "encrypted-key",
        "nul-in-path",
    ],
)
def test_bad_tls_settings_stop_up_with_one_line(
    tmp_path: Path, pki: dict[str, Any], settings: str, key: str, why: str
) -> None:
    text = settings.format(
        dir=tmp_path,
        server_cert=pki["server"].cert,
        server_key=pki["server"].key,
        client_key=pki["client"].key,
        encrypted_key=encrypted_key(pki["server"]),
    )
    conf = tmp_path / "node.toml"
    conf.write_text(f'[mqtt]\nlisten = "127.0.0.1:0"\n{text}\n')
    r = run_up_refused(conf, tmp_path / "d")
    assert r.returncode == 2, r.describe()
    assert len(r.err_lines) == 1, r.describe()
    assert f"{conf}: {key}: " in r.stderr
    assert why in r.stderr


def test_users_and_passwords_over_tls_on_a_secured_node(
    make_node: NodeFactory, pki: dict[str, Any], bg: Background
) -> None:
    """What TLS is for: a password CONNECT (checked on a worker thread while the client's
    reading waits) over the TLS transport, then traffic both ways on the same connection."""
    need_binary("mosquitto_pub")
    node = secured_node_with_a_user(make_node, pki)
    port = mqtt_port(node)
    sub = bg.start("sub", "sensors/>", "--json", server=node.ipc)
    ca = ["--cafile", str(pki["ca"])]
    for i in range(3):  # again and again: each one reads on after its password check
        ok = mosquitto_pub(port, "sensors/t", f"m{i}", *ca, "-u", "sensor", "-P", "s3cret")
        assert ok.returncode == 0, ok.stderr
    wrong = mosquitto_pub(port, "sensors/t", "no", *ca, "-u", "sensor", "-P", "guess")
    assert wrong.returncode != 0
    sub.wait_lines(3)
    assert [e["data"] for e in sub.json_lines()] == ["m0", "m1", "m2"]
    assert node.status()["mqtt"]["auth_failures"] == 1
