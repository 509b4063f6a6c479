"""``meshctl topic check``: a pattern in MQTT or NATS terms, with what differs."""

from __future__ import annotations

from typing import Annotated

import typer

from edge.mapping import DIALECTS, check
from meshctl.cli.options import JsonOpt
from meshctl.cli.output import dumps, note

topic_app = typer.Typer(help="Topics and patterns across dialects.", no_args_is_help=True)


@topic_app.command("check")
def topic_check(
    pattern: Annotated[str, typer.Argument(help="Topic or pattern, e.g. plant1/*/temp.")],
    to: Annotated[str, typer.Option("--as", help="Dialect to show it in: mesh, mqtt or nats.")],
    source: Annotated[str, typer.Option("--from", help="Dialect PATTERN is written in.")] = "mesh",
    json_out: JsonOpt = False,
) -> None:
    """Show PATTERN's equivalent in another dialect; warns where matching differs."""
    for name, value in (("--as", to), ("--from", source)):
        if value not in DIALECTS:
            raise typer.BadParameter(
                f"{value!r} is not one of {', '.join(DIALECTS)}", param_hint=name
            )
    mapped = check(pattern, to, source)
    if json_out:
        print(
            dumps(
                {
                    "from": source,
                    "as": to,
                    "pattern": pattern,
                    "equivalent": list(mapped.patterns),
                    "warnings": list(mapped.warnings),
                }
            )
        )
        return
    for p in mapped.patterns:
        print(p)
    for w in mapped.warnings:
        note(f"warning: {w}")
