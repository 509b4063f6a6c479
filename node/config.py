"""Node configuration: TOML text in, a frozen NodeConfig out; errors name the file and key.

One table of fields (``FIELDS``) drives parsing, defaults, ``meshctl config init`` and
``meshctl config show``, so the three cannot drift apart. Only ``read_config`` touches disk.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final

from node.bridge_config import BridgeConfig, parse_bridges
from node.errors import ConfigError, InputError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised only on 3.10
    import tomli as tomllib

DEFAULT_PORT: Final = 4850
_MESH_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_SIZE: Final = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?\s*$")
_SIZE_UNITS: Final = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
}
LOG_LEVELS: Final = ("debug", "info", "warning", "error")
_DURATION: Final = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?\s*")
_UNIT: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}
# A static link may end in ``#KEY``: the peer's CurveZMQ public key (40 Z85 characters),
# which a secured node needs to dial it (mDNS peers advertise theirs).
_LINK_URL: Final = re.compile(
    r"tcp://(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})"
    r"(#[0-9A-Za-z.:+=^!/*?&<>()\[\]{}@%$#-]{40})?"
)


def parse_duration(text: str) -> float:
    """Seconds from ``500ms``, ``2s``, ``1m``, ``1h`` or plain seconds; ValueError otherwise."""
    m = _DURATION.fullmatch(text)
    if not m:
        raise ValueError(f"{text!r} is not a duration such as 500ms, 2s, 1m or 1.5")
    return float(m.group(1)) * _UNIT[m.group(2)]


def parse_size(value: object) -> int:
    """Bytes from an int or a string like ``512KiB`` / ``1MiB``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError('expected a size such as 1048576 or "1MiB"')
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str) and (m := _SIZE.match(value)):
        return int(m.group(1)) * _SIZE_UNITS[m.group(2)]
    raise ValueError(f'{value!r} is not a size such as 1048576 or "1MiB"')


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything a node needs to start; every field has a default."""

    name: str = ""
    mesh: str = "default"
    data_dir: str = ""
    listen: str = "0.0.0.0"  # noqa: S104 - a broker listens on the LAN by design
    port: int = DEFAULT_PORT
    ipc: bool = True
    max_payload: int = 1024 * 1024
    client_queue: int = 1000
    max_clients: int = 1024
    max_subscriptions: int = 10000
    log_level: str = "info"
    spin_us: int = 200
    heap_keep: int = 16 * 1024 * 1024
    links: tuple[str, ...] = ()
    discovery: bool = True
    interfaces: tuple[str, ...] = ()
    heartbeat: float = 1.0
    dead_after: float = 2.5
    backoff_max: float = 10.0
    mqtt_listen: str = ""  # [mqtt] listen = "HOST:PORT"; empty: no MQTT listener
    mqtt_max_inflight: int = 100
    mqtt_max_queued: int = 1000
    mqtt_max_queued_bytes: int = 16 * 1024 * 1024
    mqtt_max_sessions: int = 1000
    mqtt_autosave: float = 60.0
    mqtt_anonymous: str = "auto"  # auto: only in open mode; "true" / "false"
    mqtt_tls_cert: str = ""  # PEM certificate (chain): the listener speaks TLS
    mqtt_tls_key: str = ""
    mqtt_tls_ca: str = ""  # set: clients must present a certificate this CA signed
    store: bool = True
    store_sync: str = "normal"
    log_patterns: tuple[str, ...] = ()
    log_max_bytes: int = 256 * 1024 * 1024
    log_max_age: float = 7 * 24 * 3600.0
    uplink_url: str = ""
    uplink_export: tuple[str, ...] = ()
    uplink_import: tuple[str, ...] = ()
    spool_max_bytes: int = 256 * 1024 * 1024
    spool_overflow: str = "drop-oldest"
    uplink_creds: str = ""
    insecure: bool = False
    bridges: tuple[BridgeConfig, ...] = ()  # [[bridge]] tables, see bridge_config.py


def _str(v: object) -> str:
    if not isinstance(v, str):
        raise ValueError(f"expected a string, got {type(v).__name__}")
    return v


def _name(v: object) -> str:
    s = _str(v)
    if s and (len(s) > 63 or any(c in s for c in "/*> ") or not s.isprintable()):
        raise ValueError(
            f"{s!r} must be at most 63 characters without '/', '*', '>', spaces or control "
            "characters"
        )
    return s


def _mesh(v: object) -> str:
    s = _str(v)
    if not _MESH_NAME.fullmatch(s):
        raise ValueError(f"{s!r} must be 1-63 letters, digits, '.', '_' or '-'")
    return s


def _port(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 65535:
        raise ValueError(f"{v!r} is not a port number 0-65535 (0 picks a free port)")
    return v


def _bool(v: object) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"expected true or false, got {v!r}")
    return v


def _anonymous(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v in ("auto", "true", "false"):
        return str(v)
    raise ValueError(f'expected true, false or "auto", got {v!r}')


def _positive(limit: int) -> Callable[[object], int]:
    def check(v: object) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= limit:
            raise ValueError(f"{v!r} must be a whole number from 1 to {limit}")
        return v

    return check


def _payload(v: object) -> int:
    n = parse_size(v)
    if not 1 <= n <= 64 * 1024 * 1024:
        raise ValueError(f"{n} bytes is outside 1 byte to 64MiB")
    return n


def _spin(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 100_000:
        raise ValueError(f"{v!r} must be a whole number of microseconds from 0 to 100000")
    return v


def _duration(low: float, high: float) -> Callable[[object], float]:
    def check(v: object) -> float:
        if isinstance(v, bool):
            raise ValueError(f'{v!r} is not a duration such as "500ms" or "2s"')
        seconds = float(v) if isinstance(v, int | float) else parse_duration(_str(v))
        if not low <= seconds <= high:
            raise ValueError(f"{v!r} must be between {low:g}s and {high:g}s")
        return seconds

    return check


def _links(v: object) -> tuple[str, ...]:
    if not isinstance(v, list):
        raise ValueError('expected a list such as ["tcp://10.0.0.2:4850"]')
    out = []
    for i, item in enumerate(v):
        url = _str(item)
        base, hash_, key = url.partition("#")
        if hash_ and _link_ok(base) and not _link_ok(url):
            raise ValueError(
                f"[{i}] {url!r}: the key after '#' must be the node's CurveZMQ public key, "
                f"40 Z85 characters (`meshctl status` shows it); got {len(key)}"
            )
        if not _link_ok(url):
            # Suggest only a fix that holds: "tcp://host" once suggested "tcp://host".
            rest = url.split("://", 1)[1] if "://" in url else re.sub(r"^[a-z]*:/+", "", url)
            guess = "tcp://" + rest
            hint = f" (did you mean {guess!r}?)" if guess != url and _link_ok(guess) else ""
            raise ValueError(f"[{i}] {url!r} is not a tcp://host:port URL{hint}")
        out.append(url)
    return tuple(out)


def _link_ok(url: str) -> bool:
    m = _LINK_URL.fullmatch(url)
    return m is not None and 0 < int(m.group(2)) < 65536


def _names(v: object) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
        raise ValueError('expected a list of interface names or addresses such as ["eth0"]')
    return tuple(v)


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``) as (host, port); ValueError names the problem."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not HOST:PORT such as 127.0.0.1:1883 (port 0: a free one)")
    return host, int(port)


def _listen_or_off(v: object) -> str:
    s = _str(v).strip()
    if s:
        host_port(s)
    return s


def _sync(v: object) -> str:
    s = _str(v)
    if s not in ("normal", "full"):
        raise ValueError(f"{s!r} is not normal or full")
    return s


def _patterns(v: object) -> tuple[str, ...]:
    from node.topics import validate_pattern  # noqa: PLC0415 - config stays light to import

    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError('expected a list of topic patterns such as ["plant1/>"]')
    for p in v:
        try:
            validate_pattern(p)
        except InputError as e:
            raise ValueError(str(e)) from None
    return tuple(v)


def _uplink_url(v: object) -> str:
    url = _str(v)
    if url:
        _links([url])
    return url


def _overflow(v: object) -> str:
    s = _str(v)
    if s not in ("drop-oldest", "refuse"):
        raise ValueError(f"{s!r} is not drop-oldest or refuse")
    return s


def _heap_keep(v: object) -> int:
    n = parse_size(v)
    if n > 1024 * 1024 * 1024:
        raise ValueError(f"{n} bytes is above the maximum of 1GiB")
    return n


def _queued_bytes(v: object) -> int:
    n = parse_size(v)
    if not 1 <= n <= 1024 * 1024 * 1024:
        raise ValueError(f"{n} bytes is outside 1 byte to 1GiB")
    return n


def _log_bytes(v: object) -> int:
    n = parse_size(v)
    if n < 1024 * 1024:
        raise ValueError(f"{n} bytes is below the minimum of 1MiB")
    return n


def _level(v: object) -> str:
    s = _str(v)
    if s not in LOG_LEVELS:
        raise ValueError(f"{s!r} is not one of {', '.join(LOG_LEVELS)}")
    return s


@dataclass(frozen=True, slots=True)
class Field:
    """One config key: where it lives in TOML, which NodeConfig attribute it sets, and why."""

    section: str
    key: str
    attr: str
    check: Callable[[object], Any]
    help: str


FIELDS: Final = (
    Field("node", "name", "name", _name, "Node name shown to operators; empty: the host name."),
    Field("node", "mesh", "mesh", _mesh, "Mesh name; only nodes of the same mesh link."),
    Field(
        "node",
        "data_dir",
        "data_dir",
        _str,
        "Node id, pid file, ipc socket and stores; empty: $XDG_DATA_HOME/meshctl.",
    ),
    Field(
        "listen", "address", "listen", _str, "Address of the TCP listener (meshctl up --listen)."
    ),
    Field("listen", "port", "port", _port, "TCP port; 0 picks a free one (meshctl up --port)."),
    Field(
        "listen", "ipc", "ipc", _bool, "Also listen on ipc://DATA_DIR/node.sock for local clients."
    ),
    Field(
        "limits",
        "max_payload",
        "max_payload",
        _payload,
        'Largest payload accepted, in bytes or with a unit ("1MiB").',
    ),
    Field(
        "limits",
        "client_queue",
        "client_queue",
        _positive(1_000_000),
        "Frames queued per client before its direct events are dropped (slow consumer).",
    ),
    Field(
        "limits",
        "max_clients",
        "max_clients",
        _positive(1_000_000),
        "Clients connected at once; more are refused.",
    ),
    Field(
        "limits",
        "max_subscriptions",
        "max_subscriptions",
        _positive(10_000_000),
        "Subscription patterns per client.",
    ),
    Field("log", "level", "log_level", _level, "One of debug, info, warning, error."),
    Field(
        "mesh",
        "discovery",
        "discovery",
        _bool,
        "Advertise and find nodes of the same mesh on the LAN with mDNS.",
    ),
    Field(
        "mesh",
        "interfaces",
        "interfaces",
        _names,
        "Interfaces (names or IPv4 addresses) for mDNS; empty: that of the default route.",
    ),
    Field(
        "mesh",
        "links",
        "links",
        _links,
        "Static peers mDNS cannot reach, as tcp://host:port (another subnet, the cloud).",
    ),
    Field(
        "mesh",
        "heartbeat",
        "heartbeat",
        _duration(0.05, 60),
        "Interval of heartbeats on every link.",
    ),
    Field(
        "mesh",
        "dead_after",
        "dead_after",
        _duration(0.2, 600),
        "A link silent this long is dead: its interest is withdrawn and it is redialled.",
    ),
    Field(
        "mesh",
        "backoff_max",
        "backoff_max",
        _duration(0.1, 3600),
        "Longest wait between redials (the wait doubles from 0.2s, with jitter).",
    ),
    Field(
        "mqtt",
        "listen",
        "mqtt_listen",
        _listen_or_off,
        'MQTT 3.1.1 listener as "HOST:PORT" (meshctl up --mqtt); empty: off.',
    ),
    Field(
        "mqtt",
        "max_inflight",
        "mqtt_max_inflight",
        _positive(65_535),
        "QoS 1 messages sent to one MQTT client and not yet acknowledged.",
    ),
    Field(
        "mqtt",
        "max_queued",
        "mqtt_max_queued",
        _positive(1_000_000),
        "QoS 1 messages queued per MQTT session beyond those in flight (then dropped).",
    ),
    Field(
        "mqtt",
        "max_queued_bytes",
        "mqtt_max_queued_bytes",
        _queued_bytes,
        "Bytes of payload queued per MQTT session (then dropped), like mosquitto's "
        'max_queued_bytes (which is unbounded unless set); "16MiB" by default.',
    ),
    Field(
        "mqtt",
        "max_sessions",
        "mqtt_max_sessions",
        _positive(1_000_000),
        "Persistent MQTT sessions kept for absent clients (the longest absent goes first).",
    ),
    Field(
        "mqtt",
        "autosave",
        "mqtt_autosave",
        _duration(0, 86400),
        "How often the persistent MQTT sessions are saved while the node runs (the store on), "
        "so a power cut loses only what changed since, like mosquitto's autosave_interval; "
        '"60s" by default, 0: only at a clean stop.',
    ),
    Field(
        "mqtt",
        "allow_anonymous",
        "mqtt_anonymous",
        _anonymous,
        'MQTT clients without a user name: "auto" lets them in only in open mode (--insecure); '
        "users and their permissions come from `meshctl mqtt passwd`.",
    ),
    Field(
        "mqtt",
        "tls_cert",
        "mqtt_tls_cert",
        _str,
        "PEM certificate (chain) of the MQTT listener: clients connect with TLS (mqtts).",
    ),
    Field("mqtt", "tls_key", "mqtt_tls_key", _str, "PEM private key of tls_cert."),
    Field(
        "mqtt",
        "tls_ca",
        "mqtt_tls_ca",
        _str,
        "PEM CA bundle: MQTT clients must present a certificate it signed (empty: none asked).",
    ),
    Field(
        "security",
        "insecure",
        "insecure",
        _bool,
        "Open mode: no CurveZMQ, no membership; anyone who reaches the port or advertises "
        "the mesh name joins. Only for a first try on a trusted network (meshctl up --insecure).",
    ),
    Field(
        "tuning",
        "spin_us",
        "spin_us",
        _spin,
        "Microseconds the loop busy-waits for more input after a burst before sleeping; "
        "halves request-reply latency. 0 = never spin (lowest idle CPU).",
    ),
    Field(
        "tuning",
        "heap_keep",
        "heap_keep",
        _heap_keep,
        "Freed memory the node keeps for reuse instead of returning it to the kernel at once "
        "(glibc); saves a page fault every few events under load. 0 = the C library's default.",
    ),
    Field(
        "store",
        "enabled",
        "store",
        _bool,
        "Keep a store (SQLite in the data dir): persistent events, log, retained, queues.",
    ),
    Field(
        "store",
        "sync",
        "store_sync",
        _sync,
        "normal: acknowledged events survive a node crash; full: also a power loss "
        "(one fsync per commit).",
    ),
    Field(
        "store",
        "log",
        "log_patterns",
        _patterns,
        "Topic patterns whose direct events the log also keeps for replay "
        "(persistent events are always kept).",
    ),
    Field(
        "store",
        "log_max_bytes",
        "log_max_bytes",
        _log_bytes,
        'Log size bound; the oldest entries go first ("256MiB").',
    ),
    Field(
        "store",
        "log_max_age",
        "log_max_age",
        _duration(1, 10 * 365 * 86400),
        'Log age bound ("168h").',
    ),
    Field(
        "uplink",
        "url",
        "uplink_url",
        _uplink_url,
        "The cloud node this edge node forwards to, as tcp://host:port; empty: no uplink.",
    ),
    Field(
        "uplink",
        "export",
        "uplink_export",
        _patterns,
        "Patterns of events that must reach the cloud; spooled to disk while it is away.",
    ),
    Field(
        "uplink",
        "import",
        "uplink_import",
        _patterns,
        "Patterns of events from the cloud for this node (persistent ones wait for it there).",
    ),
    Field(
        "uplink",
        "creds",
        "uplink_creds",
        _str,
        "Client credentials for a secured cloud node (from `meshctl invite --client` there).",
    ),
    Field(
        "uplink",
        "spool_max_bytes",
        "spool_max_bytes",
        _log_bytes,
        'Bytes of unsent events kept while the cloud is away ("256MiB").',
    ),
    Field(
        "uplink",
        "overflow",
        "spool_overflow",
        _overflow,
        "When the spool is full: drop-oldest (count what is lost) or refuse (persistent "
        "publishers get an error; direct events are dropped and counted).",
    ),
)
_BY_PATH: Final = {(f.section, f.key): f for f in FIELDS}
_SECTIONS: Final = tuple(dict.fromkeys(f.section for f in FIELDS))


def load_config(text: str, *, source: str = "<string>") -> NodeConfig:
    """Parse TOML text into a NodeConfig; ConfigError names the key on any problem. A
    leading byte-order mark (Notepad writes one) is skipped: TOML parsers refuse it, as
    "Invalid statement (at line 1, column 1)" in a file that looks right."""
    try:
        doc = tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(source, "", f"not valid TOML: {e}") from None
    values: dict[str, Any] = {}
    for section, table in doc.items():
        if section == "bridge":
            values["bridges"] = parse_bridges(table, source)
            continue
        if section not in _SECTIONS:
            raise ConfigError(source, section, f"unknown section (known: {', '.join(_SECTIONS)})")
        if not isinstance(table, dict):
            raise ConfigError(source, section, f"must be a table, as in [{section}]")
        for key, raw in table.items():
            field = _BY_PATH.get((section, key))
            if field is None:
                known = ", ".join(f.key for f in FIELDS if f.section == section)
                raise ConfigError(source, f"{section}.{key}", f"unknown key (known: {known})")
            try:
                values[field.attr] = field.check(raw)
            except ValueError as e:
                raise ConfigError(source, f"{section}.{key}", str(e)) from None
    config = NodeConfig(**values)
    if config.dead_after <= config.heartbeat:
        raise ConfigError(
            source,
            "mesh.dead_after",
            f"{config.dead_after:g}s must be longer than mesh.heartbeat ({config.heartbeat:g}s): "
            "a live link would be declared dead between two of its heartbeats",
        )
    return config


def read_config(path: Path) -> NodeConfig:
    """Load a config file; a missing or unreadable file is a ConfigError too."""
    try:
        text = path.read_text("utf-8")
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "not UTF-8 text") from None
    return load_config(text, source=str(path))


def with_overrides(
    config: NodeConfig, overrides: Mapping[str, object], *, source: str
) -> NodeConfig:
    """Apply command-line options (attr -> value, None = not given), checked like the file."""
    by_attr = {f.attr: f for f in FIELDS}
    changes: dict[str, Any] = {}
    for attr, raw in overrides.items():
        if raw is None:
            continue
        field = by_attr[attr]
        try:
            changes[attr] = field.check(raw)
        except ValueError as e:
            option = _OPTIONS.get(attr, f"--{attr.replace('_', '-')}")
            raise ConfigError(source, option, str(e)) from None
    return replace(config, **changes)


_OPTIONS: Final = {"links": "--link"}  # options not named as their attribute is


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    # JSON's escapes are valid TOML escapes; TOML also wants DEL escaped, JSON does not.
    return json.dumps(str(value), ensure_ascii=False).replace("\x7f", "\\u007f")


def render_config(config: NodeConfig, *, comments: bool) -> str:
    """TOML for ``config``: with comments it is the ``config init`` template."""
    lines: list[str] = []
    if comments:
        lines += [
            "# meshctl node configuration. Every key is shown with its default.",
            "# Command-line options of `meshctl up` override these values.",
            "",
        ]
    for section in _SECTIONS:
        lines.append(f"[{section}]")
        for f in FIELDS:
            if f.section != section:
                continue
            if comments:
                lines.append(f"# {f.help}")
            lines.append(f"{f.key} = {_toml_value(getattr(config, f.attr))}")
        lines.append("")
    for b in config.bridges:
        lines += [
            "[[bridge]]",
            f"kind = {_toml_value(b.kind)}",
            f"name = {_toml_value(b.name)}",
            f"url = {_toml_value(b.url)}",
            f"tls = {_toml_value(b.tls)}",
            f"import = {_toml_value(b.imports)}",
            f"export = {_toml_value(b.exports)}",
            f"local_prefix = {_toml_value(b.local_prefix)}",
            f"remote_prefix = {_toml_value(b.remote_prefix)}",
            f"qos = {b.qos}",
        ]
        if b.username:
            lines += [f"username = {_toml_value(b.username)}", 'password = "***"']
        lines.append("")
    if comments and not config.bridges:
        lines += BRIDGE_EXAMPLE
    return "\n".join(lines)


BRIDGE_EXAMPLE: Final = [
    "# Bridges to external brokers: one [[bridge]] table each (none by default).",
    "# import: patterns in the remote dialect (MQTT filters, NATS subjects) brought in;",
    "# export: mesh patterns sent out. Imported events are never exported back.",
    "# [[bridge]]",
    '# kind = "mqtt"                 # or "nats"',
    '# url = "mqtt://broker:1883"    # nats://server:4222; mqtts:// or tls:// for TLS',
    '# import = ["sensors/#"]',
    '# export = ["commands/>"]',
    '# local_prefix = ""             # mesh side prefix, swapped for remote_prefix',
    '# remote_prefix = ""',
    "# qos = 0                       # MQTT: 0 or 1",
    '# username = ""',
    '# password = ""',
    '# ca_file = ""                  # TLS: PEM CA of a private broker ("": the system\'s)',
    '# cert_file = ""                # TLS: client certificate and its key, if asked for',
    '# key_file = ""',
    "",
]


def as_dict(config: NodeConfig) -> dict[str, Any]:
    """Nested {section: {key: value}} for ``config show --json`` (``bridge``: a list)."""
    out: dict[str, Any] = {s: {} for s in _SECTIONS}
    for f in FIELDS:
        value = getattr(config, f.attr)
        out[f.section][f.key] = list(value) if isinstance(value, tuple) else value
    if config.bridges:
        out["bridge"] = [
            {
                "kind": b.kind,
                "name": b.name,
                "url": b.url,
                "import": list(b.imports),
                "export": list(b.exports),
                "qos": b.qos,
                "tls": b.tls,
                **{
                    k: v
                    for k, v in (
                        ("ca_file", b.ca_file),
                        ("cert_file", b.cert_file),
                        ("key_file", b.key_file),
                    )
                    if v
                },
            }
            for b in config.bridges
        ]
    return out


assert {f.attr for f in FIELDS} | {"bridges"} == {f.name for f in fields(NodeConfig)}, (
    "FIELDS must cover NodeConfig"
)
