"""TLS for the node's MQTT listener (`[mqtt] tls_cert`, `tls_key`, `tls_ca`), as
mosquitto's `certfile`, `keyfile` and `cafile` + `require_certificate` do.

Without it, MQTT user names and passwords (`meshctl mqtt passwd`) cross the network in
clear. The context is built, and its files read, before the node starts, so a wrong path
or a key that does not match its certificate stops `meshctl up` with one line (exit 2)
instead of a node that comes up without its MQTT port.
"""

from __future__ import annotations

import ssl
from pathlib import Path

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
        ctx.load_cert_chain(_path(cert), _path(key))
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(source, "mqtt.tls_cert", _why(e, cert, key)) from None
    if ca:
        try:
            ctx.load_verify_locations(cafile=_path(ca))
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(source, "mqtt.tls_ca", _why(e, ca)) from None
        ctx.verify_mode = ssl.CERT_REQUIRED  # clients must show a certificate this CA signed
    return ctx


def _path(p: str) -> str:
    return str(Path(p).expanduser())


def _why(e: OSError | ssl.SSLError, *paths: str) -> str:
    """One line: which file and what is wrong with it."""
    if isinstance(e, ssl.SSLError):
        return f"cannot use {' / '.join(paths)}: {e.reason or e}"
    where = e.filename or " / ".join(paths)
    return f"cannot read {where}: {(e.strerror or str(e)).lower()}"
