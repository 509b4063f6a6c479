"""The ``meshctl`` command: mounts each command group and maps errors to exit codes in one place.

Exit codes: 0 success, 1 operational failure (timeout, no responders, unreachable node),
2 usage or bad input. Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, NoReturn

import click
import typer

from meshctl.cli import msg_cmds, node_cmds
from meshctl.cli.output import err_console
from node import __version__
from node.errors import InputError, NodeError

app = typer.Typer(
    name="meshctl",
    help="An event mesh for single hosts and edge networks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_debug = False


def _version(value: bool) -> None:
    if value:
        print(f"meshctl {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    debug: Annotated[
        bool, typer.Option("--debug", envvar="MESHCTL_DEBUG", help="Show tracebacks on errors.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """An event mesh for single hosts and edge networks."""
    global _debug  # noqa: PLW0603 - one process, one CLI invocation
    _debug = debug


app.command()(node_cmds.up)
app.command()(node_cmds.down)
app.command()(node_cmds.status)
app.add_typer(node_cmds.config_app, name="config")
app.command()(msg_cmds.pub)
app.command()(msg_cmds.sub)
app.command()(msg_cmds.tail)
app.command()(msg_cmds.req)
app.command()(msg_cmds.reply)


def _register_bench() -> None:
    from meshctl.cli import bench_cmd  # noqa: PLC0415 - optional heavy module

    app.command()(bench_cmd.bench)


_register_bench()


def _fail(message: str, code: int) -> NoReturn:
    if _debug or os.environ.get("MESHCTL_DEBUG"):
        traceback.print_exc()
    err_console.print(f"[red]error:[/] {message}", markup=True, highlight=False)
    sys.stdout.flush()
    sys.exit(code)


def main() -> None:
    """Entry point: run the CLI; our errors and click's usage errors become one line."""
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(2)
    except click.UsageError as e:
        hint = f" (see `{e.ctx.command_path} --help`)" if e.ctx else ""
        _fail(f"{e.format_message()}{hint}", 2)
    except click.exceptions.Abort:
        _fail("interrupted", 130)
    except InputError as e:
        _fail(_escape(str(e)), 2)
    except NodeError as e:
        _fail(_escape(str(e)), 1)
    except click.ClickException as e:
        _fail(_escape(e.format_message()), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (`| head`): not an error
        sys.exit(0)
    except Exception as e:  # a bug of ours: still one line, the traceback with --debug
        _fail(_escape(f"internal error: {type(e).__name__}: {e} (run with --debug for details)"), 1)
    sys.exit(code if isinstance(code, int) else 0)


def _escape(text: str) -> str:
    from rich.markup import escape  # noqa: PLC0415

    return escape(text)
