"""``meshctl queue add|ls|info|rm|purge``: durable queues on a node."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from meshctl.cli.options import JsonOpt, Seconds, ServerOpt, TimeoutOpt, duration
from meshctl.cli.output import dumps, escaped, note, out_console
from meshctl.client import connect

queue_app = typer.Typer(
    help="Durable queues: stored events with explicit acks.", no_args_is_help=True
)
NameArg = Annotated[str, typer.Argument(help="Queue name.")]


def _call(server: str | None, timeout: float, op: str, **args: Any) -> dict[str, Any]:
    with connect(server, name=f"meshctl queue {op}", timeout=timeout, operator=True) as client:
        return client.queue(op, **args)


@queue_app.command("add")
def queue_add(
    name: NameArg,
    topic: Annotated[
        list[str],
        typer.Option("--topic", help="Pattern of persistent events to capture (repeat)."),
    ],
    ack_wait: Annotated[
        float | None,
        typer.Option(
            "--ack-wait",
            parser=duration,
            metavar="DURATION",
            show_default=False,
            help="Redeliver after this \\[default: 30s; an existing queue keeps its own].",
        ),
    ] = None,
    max_deliver: Annotated[
        int | None,
        typer.Option(
            "--max-deliver",
            min=1,
            show_default=False,
            help="Deliveries before dead-lettering "
            "\\[default: 5; an existing queue keeps its own].",
        ),
    ] = None,
    server: ServerOpt = None,
    timeout: TimeoutOpt = Seconds(2),
    json_out: JsonOpt = False,
) -> None:
    """Create a queue (or change its patterns, and what else is given); it captures
    matching persistent events from anywhere in the mesh, even with no consumer connected."""
    answer = _call(
        server,
        timeout,
        "add",
        name=name,
        patterns=topic,
        ack_wait=ack_wait,
        max_deliver=max_deliver,
    )
    if json_out:
        print(dumps(answer["queue"]))
    else:
        verb = "created" if answer.get("created") else "updated"
        note(f"{verb} queue {name}: {', '.join(topic)}")


@queue_app.command("ls")
def queue_ls(
    server: ServerOpt = None, timeout: TimeoutOpt = Seconds(2), json_out: JsonOpt = False
) -> None:
    """Every queue with its depth, consumers and redeliveries."""
    rows = _call(server, timeout, "ls")["queues"]
    if json_out:
        for row in rows:
            print(dumps(row))
        return
    rows = escaped(rows)
    t = Table(  # named as in --json (it said "redelivered" for "redeliveries")
        "queue", "patterns", "depth", "bytes", "oldest", "consumers", "redeliveries",
        "dead", box=None,
    )  # fmt: skip
    for r in rows:
        oldest = "" if r["oldest_age_s"] is None else f"{r['oldest_age_s']:.1f}s"
        t.add_row(
            r["name"],
            " ".join(r["patterns"]) or "(dead letters)",
            str(r["depth"]),
            str(r["bytes"]),
            oldest,
            str(r["consumers"]),
            str(r["redeliveries"]),
            str(r.get("dead_lettered", 0)),
        )
    out_console().print(t if rows else "no queues")


@queue_app.command("info")
def queue_info(
    name: NameArg,
    server: ServerOpt = None,
    timeout: TimeoutOpt = Seconds(2),
    json_out: JsonOpt = False,
) -> None:
    """Depth, oldest age, consumers, in flight, redeliveries and settings of one queue."""
    info = _call(server, timeout, "info", name=name)["queue"]
    if json_out:
        print(dumps(info))
        return
    for key, value in info.items():
        print(f"{key:>14}: {_shown(value)}")


def _shown(value: object) -> str:
    """A value as an operator reads it: lists joined, no Python reprs (found by an
    exploratory test: "['orders/>']", "None")."""
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    return str(value)


@queue_app.command("rm")
def queue_rm(name: NameArg, server: ServerOpt = None, timeout: TimeoutOpt = Seconds(2)) -> None:
    """Delete a queue and every event in it."""
    _call(server, timeout, "rm", name=name)
    note(f"removed queue {name}")


@queue_app.command("purge")
def queue_purge(name: NameArg, server: ServerOpt = None, timeout: TimeoutOpt = Seconds(2)) -> None:
    """Delete every event in a queue; the queue stays."""
    n = _call(server, timeout, "purge", name=name)["purged"]
    note(f"purged {n} event{'s' if n != 1 else ''} from {name}")
