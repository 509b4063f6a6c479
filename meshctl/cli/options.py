"""Options shared by several commands, defined once with help text and environment variables."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from node.config import parse_duration


class Seconds(float):
    """A duration default in seconds that help shows as it is written: ``[default: 2s]``
    and ``15m``, where help said ``2.0`` and ``900.0`` beside examples of ``2s``."""

    __slots__ = ()

    def __str__(self) -> str:
        for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
            if self >= size and self % size == 0:
                return f"{int(self // size)}{unit}"
        return f"{self * 1000:g}ms"


def duration(text: str | float) -> float:
    """Typer parser for durations: a bad one is a usage error (exit 2)."""
    if isinstance(text, int | float):
        return float(text)  # a default, already in seconds
    try:
        return parse_duration(text)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None


ServerOpt = Annotated[
    str | None,
    typer.Option(
        "--server",
        "-s",
        envvar="MESHCTL_SERVER",
        show_default=False,
        help="Node to talk to: tcp://host:port, host:port, ipc:///path or a node's data dir "
        "\\[default: the local node]",
    ),
]


def positive_duration(text: str | float) -> float:
    """A duration above zero: ``-t 0`` said the node was unreachable (exploratory test)."""
    seconds = duration(text)
    if seconds <= 0:
        raise typer.BadParameter(f"{text!r} must be above zero")
    return seconds


TimeoutOpt = Annotated[
    float,
    typer.Option(
        "--timeout",
        "-t",
        parser=positive_duration,
        metavar="DURATION",
        help="How long to wait (500ms, 2s, 1m or seconds).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", "-j", help="One JSON object per line.")]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="MESHCTL_CONFIG",
        show_default=False,
        help="TOML config file \\[default: ~/.config/meshctl/meshctl.toml if present]",
    ),
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        "-d",
        envvar="MESHCTL_DATA_DIR",
        show_default=False,
        help="Node data directory \\[default: ~/.local/share/meshctl]",
    ),
]
HeaderOpt = Annotated[
    list[str] | None,
    typer.Option("--header", "-H", metavar="KEY=VALUE", help="Add a header (repeatable)."),
]


def parse_headers(items: list[str] | None) -> dict[str, str]:
    """``KEY=VALUE`` options to a dict; a malformed one is a usage error."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"header {item!r} is not KEY=VALUE", param_hint="--header")
        key = key.strip()
        # Found in an exploratory test: a newline went into a name, bytes that are not
        # UTF-8 got a raw codec message, and a second -H of one name won without a word.
        try:
            item.encode()
        except UnicodeEncodeError:
            raise typer.BadParameter(
                f"header {item!r} is not valid UTF-8", param_hint="--header"
            ) from None
        if not key.isprintable():
            raise typer.BadParameter(
                f"header name {key!r} has control characters", param_hint="--header"
            )
        if key in out:
            raise typer.BadParameter(f"header {key!r} given twice", param_hint="--header")
        out[key] = value
    return out
