"""Rendering: NDJSON for scripts, rich for people. JSON field names are a tested contract."""

from __future__ import annotations

import base64
import json
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.markup import escape

from node.events import Event

err_console = Console(stderr=True, highlight=False, soft_wrap=True)
PIPED_WIDTH = 400  # columns of tables written to a pipe or file


def out_console() -> Console:
    """The console for a command's output. Piped, rich assumes 80 columns and cut
    `peers`, `mesh` and `tail` lines short there (found by an exploratory test); a pipe
    gets wide tables and unwrapped lines instead, unless COLUMNS says otherwise."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return _Console(highlight=False)
    return _Console(highlight=False, width=PIPED_WIDTH, soft_wrap=True)


class _Console(Console):
    """rich's console, except that the reader going away (``| head``) is not an error:
    rich exits 1 there, and `meshctl status | head -1` failed under pipefail (review)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        raise SystemExit(0)


def dumps(obj: object) -> str:
    """Compact JSON on one line."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def iso_time(ns: int) -> str:
    """UTC ISO 8601 with milliseconds, the ``time`` field of every event."""
    secs, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{frac // 1_000_000:03d}Z"


def event_json(event: Event) -> dict[str, Any]:
    """The JSON form of an event: topic, data (text or base64), headers, id, time, size."""
    out: dict[str, Any] = {"topic": event.topic}
    try:
        out["data"] = event.data.decode("utf-8")
    except UnicodeDecodeError:
        out["data"] = base64.b64encode(event.data).decode()
        out["encoding"] = "base64"
    out["headers"] = dict(event.headers)
    if event.seq is not None:  # the node's own mark of a replayed event: it is "seq" below
        out["headers"].pop("log-seq", None)
    out["id"] = event.id
    out["time"] = iso_time(event.time_ns)
    out["size"] = len(event.data)
    if event.deliveries:
        out["deliveries"] = event.deliveries
    if event.retained:
        out["retained"] = True
    if event.is_error:  # a reply that reports the responder's failure (exit 1 says so too)
        out["error"] = True
    if event.seq is not None:
        out["seq"] = event.seq
    return out


def escaped(obj: Any) -> Any:
    """``obj`` with every string escaped for rich markup. What a node reports holds names
    and topics that clients chose: "x/[/]" ended `meshctl status` in a MarkupError for
    every operator, and "[bold]" in a topic vanished (exploratory test)."""
    if isinstance(obj, str):
        return escape(obj)
    if isinstance(obj, dict):
        return {k: escaped(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [escaped(v) for v in obj]
    return obj


def preview(data: bytes, width: int = 60) -> str:
    """A one-line printable preview of a payload."""
    text = data[: width * 4].decode("utf-8", "replace")
    text = "".join(ch if ch.isprintable() else "·" for ch in text)
    return text if len(text) <= width else text[: width - 1] + "…"


def write_line(text: str) -> None:
    """Print to stdout without rich (fast path for streams)."""
    sys.stdout.write(text + "\n")


def note(text: str) -> None:
    """A diagnostic line on stderr (never mixed into data on stdout)."""
    err_console.print(escape(text))
