"""``[[bridge]]`` tables of the node config: which external brokers to bridge, and how.

Pure: TOML values in, frozen BridgeConfig out, ConfigError naming ``bridge[i].key``.
``import`` patterns are written in the remote dialect (MQTT filters, NATS subjects), since
they are subscribed there; ``export`` patterns are mesh patterns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote

from node.errors import ConfigError, TopicError
from node.topics import is_reserved, validate_pattern, validate_topic

KINDS: Final = ("mqtt", "nats")
_URL: Final = re.compile(
    r"(mqtt|mqtts|nats|tls)://(?:([^:@/\s]*)(?::([^@/\s]*))?@)?([^:/@\s]+)(?::([0-9]{1,5}))?"
)
_DEFAULT_PORT: Final = {"mqtt": 1883, "mqtts": 8883, "nats": 4222, "tls": 4222}
_FILES: Final = ("ca_file", "cert_file", "key_file")  # TLS files; any of them means TLS
_KEYS: Final = (
    "kind",
    "name",
    "url",
    "username",
    "password",
    "tls",
    "ca_file",
    "cert_file",
    "key_file",
    "import",
    "export",
    "local_prefix",
    "remote_prefix",
    "qos",
)


@dataclass(frozen=True, slots=True)
class BridgeConfig:
    """One bridge to an external MQTT broker or NATS server."""

    kind: str
    name: str
    host: str
    port: int
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""  # PEM CA bundle that signed the broker's certificate ("": the system's)
    cert_file: str = ""  # PEM client certificate shown to the broker (with key_file)
    key_file: str = ""
    imports: tuple[str, ...] = ()
    exports: tuple[str, ...] = ()
    local_prefix: str = ""
    remote_prefix: str = ""
    qos: int = 0

    @property
    def url(self) -> str:
        """Which broker: the mark on what the bridge imports (edge/port.py), so it does not
        change with TLS."""
        return f"{self.kind}://{self.host}:{self.port}"

    @property
    def shown_url(self) -> str:
        """The broker's URL as configured, for status and the log: ``mqtts://`` with TLS
        (it showed ``mqtt://``, which said the bridge ran in clear: exploratory test)."""
        scheme = {"mqtt": "mqtts", "nats": "tls"}[self.kind] if self.tls else self.kind
        return f"{scheme}://{self.host}:{self.port}"


def parse_bridges(raw: Any, source: str) -> tuple[BridgeConfig, ...]:
    """The ``[[bridge]]`` array; names must be unique."""
    if not isinstance(raw, list):
        raise ConfigError(source, "bridge", "must be an array of tables, as in [[bridge]]")
    out = [_one(item, f"bridge[{i}]", source) for i, item in enumerate(raw)]
    names = [b.name for b in out]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise ConfigError(source, f"bridge[{i}].name", f"{name!r} is used twice")
    return tuple(out)


def _one(item: Any, where: str, source: str) -> BridgeConfig:
    if not isinstance(item, dict):
        raise ConfigError(source, where, "must be a table")
    for key in item:
        if key not in _KEYS:
            raise ConfigError(source, f"{where}.{key}", f"unknown key (known: {', '.join(_KEYS)})")

    def fail(key: str, why: str) -> ConfigError:
        return ConfigError(source, f"{where}.{key}", why)

    kind = item.get("kind")
    if kind not in KINDS:
        raise fail("kind", f"{kind!r} is not one of {', '.join(KINDS)}")
    url = item.get("url")
    m = _URL.fullmatch(url) if isinstance(url, str) else None
    if m is None or (m.group(1) in ("mqtt", "mqtts")) != (kind == "mqtt"):
        example = "mqtt://broker:1883" if kind == "mqtt" else "nats://server:4222"
        raise fail("url", f"{url!r} is not a {kind} URL such as {example!r}")
    port = int(m.group(5) or _DEFAULT_PORT[m.group(1)])
    if not 0 < port < 65536:
        raise fail("url", f"port {port} is outside 1-65535")
    name = item.get("name", kind)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", name):
        raise fail("name", f"{name!r} must be 1-32 letters, digits, '.', '_' or '-'")
    strings = {}
    for key in ("username", "password", "local_prefix", "remote_prefix", *_FILES):
        value = item.get(key, "")
        if not isinstance(value, str):
            raise fail(key, "expected a string")
        strings[key] = value
    if m.group(2) is not None:  # nats://user:pass@host, as NATS and MQTT tools write it
        if strings["username"] or strings["password"]:
            raise fail("url", "credentials in the URL and in username/password: give one")
        strings["username"] = unquote(m.group(2))
        strings["password"] = unquote(m.group(3) or "")
    if strings["local_prefix"]:
        try:
            first = validate_topic(strings["local_prefix"])[0]
        except TopicError as e:
            raise fail("local_prefix", str(e)) from None
        if is_reserved(first):  # every import would be refused
            raise fail("local_prefix", f"{first!r} is reserved in the mesh")
    if strings["remote_prefix"]:
        prefix, why = _remote_prefix(kind, strings["remote_prefix"])
        if why:
            raise fail("remote_prefix", why)
        strings["remote_prefix"] = prefix
    files = [k for k in _FILES if strings[k]]
    tls = item.get("tls", m.group(1) in ("mqtts", "tls") or bool(files))
    if not isinstance(tls, bool):
        raise fail("tls", "expected true or false")
    if files and not tls:
        raise fail(files[0], "is a TLS setting, but tls = false")
    if bool(strings["cert_file"]) != bool(strings["key_file"]):
        missing = "key_file" if strings["cert_file"] else "cert_file"
        raise fail(missing, "cert_file and key_file go together")
    qos = item.get("qos", 0)
    if type(qos) is not int or qos not in (0, 1):  # 1.0 passed, and paho raised in its thread
        raise fail("qos", f"{qos!r} must be 0 or 1")
    if kind == "nats" and "qos" in item:  # accepted and ignored before (exploratory test)
        raise fail("qos", "applies to MQTT bridges; NATS has none")
    lists = {}
    for key in ("import", "export"):
        value = item.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise fail(key, "expected a list of patterns")
        lists[key] = tuple(value)
    for key in ("import", "export"):
        twice = [p for i, p in enumerate(lists[key]) if p in lists[key][:i]]
        if twice:  # MQTT keeps one subscription per filter: the second replaced the first
            raise fail(key, f"{twice[0]!r} is listed twice")
    local = strings["local_prefix"].split("/") if strings["local_prefix"] else []
    remote = strings["remote_prefix"].split("/") if strings["remote_prefix"] else []
    for pattern in lists["export"]:
        try:
            levels = validate_pattern(pattern)
        except TopicError as e:
            raise fail("export", str(e)) from None
        if local and not _under(levels, local, "*", ">"):
            # Accepted, every export it matched was refused (exploratory test)
            raise fail(
                "export", f"{pattern!r} matches nothing under local_prefix {'/'.join(local)!r}"
            )
        if local and levels[: len(local)] == local:
            levels = levels[len(local) :]  # the local prefix is not sent: its own form
        why = _no_remote_form(kind, levels)
        if why:  # it would match events, and every one would be refused
            raise fail("export", f"{pattern!r}: {why}")
    for pattern in lists["import"]:
        # Checked here, as exports are: a bad one passed, then its subscribe raised in the
        # client library's thread and the bridge stayed "starting" (exploratory test).
        why = _import_error(kind, pattern)
        levels = _levels(kind, pattern)
        one, rest = ("+", "#") if kind == "mqtt" else ("*", ">")
        if remote and not _under(levels, remote, one, rest):
            # Accepted, every message it brought was refused (exploratory test)
            shown = "/".join(remote) if kind == "mqtt" else ".".join(remote)
            why = why or f"matches nothing under remote_prefix {shown!r}"
        if not why and remote and not local and len(levels) <= len(remote) and levels[-1] != rest:
            why = "it matches only the remote_prefix itself: no mesh topic without a local_prefix"
        if not why:
            # The mesh's reserved first levels are what the prefixes make of it: with the
            # remote prefix "$aws/things" and the local one "aws", "$aws/things/+/shadow/#"
            # comes in under aws/ (it was refused for its "$": exploratory test).
            mesh = local + levels[len(remote) :]
            if mesh and mesh[0] not in (one, rest) and is_reserved(mesh[0]):
                why = f"{mesh[0]!r} is reserved in the mesh (its own events, replies)"
        if why:
            raise fail("import", f"{pattern!r}: {why}")
    if not lists["import"] and not lists["export"]:
        raise fail("import", "a bridge needs import or export patterns (or both)")
    return BridgeConfig(
        kind=kind,
        name=name,
        host=m.group(4),
        port=port,
        tls=tls,
        imports=lists["import"],
        exports=lists["export"],
        qos=qos,
        **strings,
    )


def _levels(kind: str, text: str) -> list[str]:
    return text.split("/" if kind == "mqtt" else ".")


def _import_error(kind: str, pattern: str) -> str:
    """Why ``pattern`` is no import pattern of ``kind`` that maps into the mesh ("": it
    is one). MQTT filters: ``+`` and ``#`` whole levels, ``#`` last; NATS subjects: ``*``
    and ``>`` whole tokens, ``>`` last, no whitespace. Empty levels, the other dialect's
    separator in a level have no mesh topic. (The mesh's reserved first levels are checked
    by the caller, after the prefixes.)"""
    one, rest = ("+", "#") if kind == "mqtt" else ("*", ">")
    levels = _levels(kind, pattern)
    if kind == "mqtt" and levels[0] == "$share":
        return "a bridge subscribes for itself: no $share"
    for i, level in enumerate(levels):
        if not level:
            return "empty levels do not exist in the mesh"
        if level == rest and i != len(levels) - 1:
            return f"{rest!r} must be the last level"
        if level not in (one, rest) and (one in level or rest in level):
            return f"wildcard inside level {i + 1} ({level!r})"
        if kind == "nats" and ("/" in level or any(ch.isspace() for ch in level)):
            return f"token {level!r} holds '/' or whitespace"
        if kind == "mqtt" and ("*" in level or ">" in level or "\x00" in level):
            return f"level {level!r} holds '*', '>' or NUL, which the mesh cannot carry"
    return ""


def _under(levels: list[str], prefix: list[str], one: str, rest: str) -> bool:
    """True if pattern ``levels`` may match a topic under ``prefix`` (or the prefix itself)."""
    for i, level in enumerate(prefix):
        if i >= len(levels):
            return False
        if levels[i] == rest:
            return True
        if levels[i] not in (one, level):
            return False
    return True


def _no_remote_form(kind: str, levels: list[str]) -> str:
    """Why mesh ``levels`` (a pattern or prefix) have no form in ``kind``'s dialect ("":
    they have one): '+' or '#' in an MQTT level; '.' or whitespace in a NATS token."""
    for level in levels:
        if level in ("*", ">"):
            continue
        if kind == "mqtt" and ("+" in level or "#" in level):
            return f"level {level!r} holds '+' or '#', wildcards in MQTT"
        if kind == "nats" and ("." in level or any(ch.isspace() for ch in level)):
            return f"level {level!r} holds '.' or whitespace, which a NATS token cannot"
    return ""


def _remote_prefix(kind: str, prefix: str) -> tuple[str, str]:
    """(the prefix in mesh form, why it is refused or ""). Written in the remote dialect,
    as ``import`` is (``plant.n`` for NATS; a NATS prefix written ``plant.n`` refused
    every event, since it was compared with mesh topics); ``plant/n`` is still read."""
    if kind == "nats" and "/" not in prefix:
        prefix = prefix.replace(".", "/")
    try:
        levels = validate_topic(prefix)
    except TopicError as e:
        return prefix, str(e)
    if any(ch in level for level in levels for ch in "+#*>"):
        return prefix, "a prefix holds no wildcards"
    return prefix, _no_remote_form(kind, levels)  # "a.b/c" for NATS: every export refused
