"""One grammar, other dialects: mesh topics and patterns to and from MQTT and NATS, sans-IO.

The mesh: levels separated by ``/``; ``*`` one level, ``>`` one or more trailing levels.

MQTT (3.1.1): levels separated by ``/``; in filters ``+`` is one level and ``#`` the rest,
where ``a/#`` matches ``a`` too (zero levels) and ``a/>`` here does not. MQTT allows empty
levels (``a//b``, ``/a``) and any character but ``+``, ``#`` and NUL in a topic name.

NATS: tokens separated by ``.``; ``*`` one token and ``>`` one or more, exactly as here.
Tokens may contain ``/`` and may not contain whitespace.

The rule for what cannot be mapped is the same everywhere: it is **refused** with a
MappingError naming the topic and the reason, and a bridge counts it and drops the event.
Nothing is escaped or rewritten silently, because a rewritten topic could collide with a
real one (``a.b`` as one level and ``a/b`` as two would both become ``a.b`` in NATS).

Refused:
- to the mesh: empty MQTT levels; ``*`` or ``>`` inside a level name; NATS tokens with
  ``/``; ``+`` or ``#`` used as anything but a whole filter level;
- to MQTT: mesh levels containing ``+`` or ``#``; a ``>`` pattern in the first level is
  fine (``#``) but note the zero-level difference below;
- to NATS: mesh levels containing ``.`` or whitespace.

The zero-level difference: MQTT ``a/#`` also matches ``a``. Mapping an MQTT filter into
the mesh therefore gives two patterns (``a`` and ``a/>``); mapping a mesh pattern out to
MQTT gives ``a/#`` with a warning that events on ``a`` itself come along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from node.errors import InputError
from node.topics import validate_pattern, validate_topic

DIALECTS: Final = ("mesh", "mqtt", "nats")


class MappingError(InputError):
    """A topic or pattern has no equivalent in the other dialect."""

    def __init__(self, text: str, dialect: str, reason: str) -> None:
        self.text = text
        self.dialect = dialect
        self.reason = reason
        super().__init__(f"cannot map {text!r} to {dialect}: {reason}")


@dataclass(frozen=True, slots=True)
class Mapped:
    """The equivalent pattern(s) in the target dialect, and what the operator should know."""

    patterns: tuple[str, ...]
    warnings: tuple[str, ...] = field(default=())


# ---- MQTT ------------------------------------------------------------------------------


def mqtt_topic_to_mesh(topic: str) -> str:
    """An MQTT topic name as a mesh topic (same levels)."""
    if not topic:
        raise MappingError(topic, "mesh", "empty topic")
    if "\x00" in topic or "+" in topic or "#" in topic:
        raise MappingError(topic, "mesh", "an MQTT topic name has no '+', '#' or NUL")
    if "" in topic.split("/"):
        raise MappingError(topic, "mesh", "empty levels ('a//b', '/a', 'a/') do not exist here")
    try:
        validate_topic(topic)
    except InputError as e:
        raise MappingError(topic, "mesh", str(e)) from None
    return topic


def mesh_topic_to_mqtt(topic: str) -> str:
    """A mesh topic as an MQTT topic name."""
    validate_topic(topic)
    if "+" in topic or "#" in topic:
        raise MappingError(topic, "mqtt", "'+' and '#' are wildcards in MQTT, not characters")
    return topic


def mqtt_filter_to_mesh(filt: str) -> Mapped:
    """An MQTT filter as mesh patterns: ``a/#`` becomes ``a`` and ``a/>``."""
    if not filt:
        raise MappingError(filt, "mesh", "empty filter")
    levels = filt.split("/")
    out: list[str] = []
    for i, level in enumerate(levels):
        if level == "+":
            out.append("*")
        elif level == "#":
            if i != len(levels) - 1:
                raise MappingError(filt, "mesh", "'#' must be the last level")
            out.append(">")
        elif "+" in level or "#" in level:
            raise MappingError(filt, "mesh", f"wildcard inside level {i + 1} ({level!r})")
        elif not level:
            raise MappingError(filt, "mesh", "empty levels do not exist here")
        elif "*" in level or ">" in level:
            raise MappingError(filt, "mesh", f"'*' and '>' are wildcards here (level {i + 1})")
        else:
            out.append(level)
    pattern = "/".join(out)
    try:
        validate_pattern(pattern)
    except InputError as e:
        raise MappingError(filt, "mesh", str(e)) from None
    if out[-1] == ">" and len(out) > 1:
        parent = "/".join(out[:-1])
        note = (
            f"MQTT {filt!r} also matches {parent!r}: subscribing to both {parent!r} and {pattern!r}"
        )
        return Mapped((parent, pattern), (note,))
    return Mapped((pattern,))


def mesh_pattern_to_mqtt(pattern: str) -> Mapped:
    """A mesh pattern as an MQTT filter; warns where MQTT matches more."""
    levels = validate_pattern(pattern)
    out = []
    for level in levels:
        if level == "*":
            out.append("+")
        elif level == ">":
            out.append("#")
        elif "+" in level or "#" in level:
            raise MappingError(pattern, "mqtt", f"level {level!r} holds an MQTT wildcard character")
        else:
            out.append(level)
    filt = "/".join(out)
    warnings: tuple[str, ...] = ()
    if levels[-1] == ">" and len(levels) > 1:
        parent = "/".join(out[:-1])
        warnings = (
            f"zero-level difference: MQTT {filt!r} also matches {parent!r}, which "
            f"{pattern!r} does not",
        )
    return Mapped((filt,), warnings)


def mqtt_filter_error(filt: str) -> str | None:
    """Why ``filt`` is no MQTT 3.1.1 topic filter at all (section 4.7.1: ``#`` is a whole
    last level, ``+`` a whole level, never empty), else None. A client that sends one
    breaks the protocol and its connection is closed [MQTT-4.8.0-1], as mosquitto does;
    a valid filter the mesh cannot take gets SUBACK 0x80 instead (``mqtt_subscription``).
    Both got 0x80 (conformance review)."""
    if not filt:
        return "an empty filter"
    levels = filt.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            return f"'#' is not a whole last level in {filt[:80]!r}"
        if "+" in level and level != "+":
            return f"'+' is not a whole level in {filt[:80]!r}"
    return None


def mqtt_subscription(filt: str) -> tuple[str | None, str, Mapped]:
    """An MQTT client's SUBSCRIBE filter as the listener takes it: (queue group of a
    ``$share/GROUP/filter``, the filter without that prefix, the mesh patterns);
    MappingError for what it refuses (SUBACK
    0x80). One rule for the listener and ``meshctl topic check``, which had said "fine"
    to filters the listener refused (exploratory test)."""
    group, plain = mqtt_shared(filt)
    if plain.startswith("$") and plain.split("/", 1)[0] != "$mesh":
        # Granted, $SYS/# stayed silent (exploratory test): no such events here.
        raise MappingError(filt, "mesh", "the only '$' topics here are $mesh/...")
    mapped = mqtt_filter_to_mesh(plain)
    if group is not None and any(c in group for c in " */>+#"):
        raise MappingError(filt, "mesh", f"queue group {group!r} holds a wildcard")
    return group, plain, mapped


def mqtt_shared(filt: str) -> tuple[str | None, str]:
    """Split ``$share/GROUP/filter`` into (queue group, filter); (None, filter) otherwise."""
    if filt.startswith("$share/"):
        parts = filt.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise MappingError(filt, "mesh", "a shared subscription is $share/GROUP/filter")
        return parts[1], parts[2]
    return None, filt


# ---- NATS ------------------------------------------------------------------------------


def _nats_levels(subject: str) -> list[str]:
    if not subject:
        raise MappingError(subject, "mesh", "empty subject")
    tokens = subject.split(".")
    for i, token in enumerate(tokens):
        if not token:
            raise MappingError(subject, "mesh", f"empty token at position {i + 1}")
        if "/" in token:
            raise MappingError(
                subject, "mesh", f"token {token!r} holds '/', a level separator here"
            )
        if any(ch.isspace() for ch in token):
            raise MappingError(subject, "mesh", "whitespace is not allowed in NATS subjects")
    return tokens


def nats_to_mesh(subject: str, *, pattern: bool = False) -> str:
    """A NATS subject (or, with ``pattern``, a subscription subject) as a mesh topic/pattern."""
    mapped = "/".join(_nats_levels(subject))
    try:
        validate_pattern(mapped) if pattern else validate_topic(mapped)
    except InputError as e:
        raise MappingError(subject, "mesh", str(e)) from None
    return mapped


def mesh_to_nats(topic: str, *, pattern: bool = False) -> str:
    """A mesh topic (or pattern) as a NATS subject: same wildcards, ``/`` becomes ``.``."""
    levels = validate_pattern(topic) if pattern else validate_topic(topic)
    for level in levels:
        if "." in level:
            raise MappingError(topic, "nats", f"level {level!r} holds '.', a NATS separator")
        if any(ch.isspace() for ch in level):
            raise MappingError(topic, "nats", f"level {level!r} holds whitespace")
    return ".".join(levels)


# ---- prefixes --------------------------------------------------------------------------


def swap_prefix(topic: str, old: str, new: str) -> str | None:
    """Replace a leading ``old`` prefix (whole levels) with ``new``; None if it is absent.

    Bridges use it for their local/remote prefixes: ``swap_prefix("site1/a", "site1", "")``
    is ``"a"``; an empty ``old`` always matches.
    """
    if old:
        if topic == old:
            return new or None
        if not topic.startswith(old + "/"):
            return None
        topic = topic[len(old) + 1 :]
    return f"{new}/{topic}" if new else topic


def check(pattern: str, to: str, source: str = "mesh") -> Mapped:
    """What ``meshctl topic check`` shows: ``pattern`` in ``source`` as seen in ``to``."""
    if source not in DIALECTS or to not in DIALECTS:
        raise InputError(f"dialects are {', '.join(DIALECTS)}")
    # Read in its own dialect first, also when it is shown in the same one ("a//b" as
    # mesh was echoed back, rc 0), with the rules that apply where it is used.
    try:
        if source == "mqtt":
            group, _plain, mesh = mqtt_subscription(pattern)
            notes = mesh.warnings + (
                (f"shared subscription: queue group {group!r}",) if group else ()
            )
        elif source == "nats":
            mesh = Mapped((nats_to_mesh(pattern, pattern=True),))
            notes = ()
            first = mesh.patterns[0].split("/", 1)[0]
            if first.startswith("$") or first == "_INBOX":  # as bridge_config refuses it
                raise MappingError(pattern, "mesh", f"{first!r} is reserved in the mesh")
        else:
            validate_pattern(pattern)
            mesh, notes = Mapped((pattern,)), ()
    except MappingError as e:  # said "cannot map ... to mesh" for --from nats --as mqtt
        raise InputError(f"{pattern!r} as a {source} pattern: {e.reason}") from None
    if source == to:
        return Mapped((pattern,), notes)
    if to == "mesh":
        return Mapped(mesh.patterns, notes)
    if to == "nats":
        return Mapped(tuple(mesh_to_nats(p, pattern=True) for p in mesh.patterns), notes)
    if source == "mesh":
        return mesh_pattern_to_mqtt(pattern)
    out = [mesh_pattern_to_mqtt(p) for p in mesh.patterns]
    return Mapped(tuple(q for m in out for q in m.patterns), notes + out[0].warnings)
