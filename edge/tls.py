"""TLS contexts: the node's MQTT listener as a server (`[mqtt] tls_cert`, `tls_key`,
`tls_ca`, as mosquitto's `certfile`, `keyfile` and `cafile` + `require_certificate`), and
each bridge as a client (`[[bridge]] ca_file`, `cert_file`, `key_file`: a private CA, and
the client certificate that cloud brokers such as AWS IoT Core require).

Without the listener's, MQTT user names and passwords (`meshctl mqtt passwd`) cross the
network in clear. Every context is built, and its files read, before the node starts, so a
wrong path or a key that does not match its certificate stops `meshctl up` with one line
(exit 2) instead of a node that comes up without its MQTT port or with a bridge that can
never connect.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from node.bridge_config import BridgeConfig
from node.config import NodeConfig
from node.errors import ConfigError


def server_context(config: NodeConfig, source: str = "config") -> ssl.SSLContext | None:
    """The listener's TLS context, or None when ``[mqtt]`` names no certificate."""
    cert, key, ca = config.mqtt_tls_cert, config.mqtt_tls_key, config.mqtt_tls_ca
    if not cert:
        for name, value in (("tls_key", key), ("tls_ca", ca)):
            if value:
                raise ConfigError(source, f"mqtt.{name}", "needs mqtt.tls_cert as well")
        return None
    if not key:
        raise ConfigError(source, "mqtt.tls_key", "mqtt.tls_cert needs its private key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(_path(cert), _path(key), password=_no_passphrase)
    except (OSError, ssl.SSLError, ValueError, _Encrypted) as e:
        raise ConfigError(source, "mqtt.tls_cert", _why(e, cert, key)) from None
    if ca:
        try:
            ctx.load_verify_locations(cafile=_path(ca))
        except (OSError, ssl.SSLError, ValueError) as e:
            raise ConfigError(source, "mqtt.tls_ca", _why(e, ca)) from None
        ctx.verify_mode = ssl.CERT_REQUIRED  # clients must show a certificate this CA signed
    return ctx


def client_context(
    bridge: BridgeConfig, source: str = "config", where: str = "bridge"
) -> ssl.SSLContext | None:
    """A bridge's TLS context (the broker's certificate checked against ``ca_file`` or the
    system's CAs, and our ``cert_file`` shown if it asks), or None without TLS. ``where``
    names the bridge's table in errors, as ``bridge[0]``."""
    if not bridge.tls:
        return None
    try:
        ctx = ssl.create_default_context(cafile=_path(bridge.ca_file) if bridge.ca_file else None)
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ConfigError(source, f"{where}.ca_file", _why(e, bridge.ca_file)) from None
    if bridge.cert_file:
        try:
            ctx.load_cert_chain(
                _path(bridge.cert_file), _path(bridge.key_file), password=_no_passphrase
            )
        except (OSError, ssl.SSLError, ValueError, _Encrypted) as e:
            why = _why(e, bridge.cert_file, bridge.key_file)
            raise ConfigError(source, f"{where}.cert_file", why) from None
    return ctx


class _Encrypted(Exception):
    """The key file asks for a passphrase."""


def _no_passphrase() -> str:
    """OpenSSL's default would prompt on the terminal, and a background node has none."""
    raise _Encrypted


def _path(p: str) -> str:
    return str(Path(p).expanduser())


def _why(e: Exception, *paths: str) -> str:
    """One line: which file and what is wrong with it."""
    if isinstance(e, _Encrypted):
        return f"{paths[-1]} is encrypted: give the node an unencrypted key (it cannot ask)"
    if isinstance(e, ValueError):
        return f"cannot read {' / '.join(repr(p) for p in paths)}: {e}"
    if isinstance(e, ssl.SSLError):
        return f"cannot use {' / '.join(paths)}: {e.reason or e}"
    assert isinstance(e, OSError)
    where = e.filename or " / ".join(paths)
    return f"cannot read {where}: {(e.strerror or str(e)).lower()}"
