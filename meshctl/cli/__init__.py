"""The ``meshctl`` command: mounts each command group and maps errors to exit codes in one place.

Exit codes: 0 success, 1 operational failure (timeout, no responders, unreachable node),
2 usage or bad input. Errors are one line on stderr; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from types import FrameType
from typing import Annotated, NoReturn

import typer

from meshctl.cli import (
    mesh_cmds,
    mqtt_cmds,
    msg_cmds,
    node_cmds,
    queue_cmds,
    security_cmds,
    topic_cmds,
)
from meshctl.cli.output import err_console
from node import __version__
from node.errors import InputError, NodeError

app = typer.Typer(
    name="meshctl",
    help="An event mesh for single hosts and edge networks.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="markdown",
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
app.command()(security_cmds.init)
app.command()(security_cmds.invite)
app.command()(security_cmds.revoke)
app.add_typer(node_cmds.config_app, name="config")
app.add_typer(topic_cmds.topic_app, name="topic")
app.add_typer(queue_cmds.queue_app, name="queue")
app.add_typer(mqtt_cmds.mqtt_app, name="mqtt")
app.command()(msg_cmds.pub)
app.command()(msg_cmds.sub)
app.command()(msg_cmds.tail)
app.command()(msg_cmds.req)
app.command()(msg_cmds.reply)
app.command()(mesh_cmds.peers)
app.command()(mesh_cmds.mesh)
app.command()(mesh_cmds.routes)


def _register_bench() -> None:
    from meshctl.cli import bench_cmd  # noqa: PLC0415 - optional heavy module

    app.command()(bench_cmd.bench)


_register_bench()


def _click_class(name: str) -> type[Exception]:
    """A click exception class as typer uses it: newer typers vendor click (``typer._click``),
    older ones use the click package, so look it up from typer's own public classes."""
    for cls in (*typer.BadParameter.__mro__, *typer.Abort.__mro__):
        if cls.__name__ == name:
            return cls
    for mod_name in ("typer._click.exceptions", "click.exceptions"):
        try:
            mod = __import__(mod_name, fromlist=[name])
        except ImportError:
            continue
        if hasattr(mod, name):
            return getattr(mod, name)  # type: ignore[no-any-return]
    raise LookupError(name)


_USAGE = _click_class("UsageError")
_CLICK = _click_class("ClickException")
_ABORT = _click_class("Abort")
_NO_ARGS = _click_class("NoArgsIsHelpError")


def _fail(message: str, code: int) -> NoReturn:
    # Not just any value: MESHCTL_DEBUG=0 (or false, no) printed tracebacks too.
    if _debug or os.environ.get("MESHCTL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on"):
        traceback.print_exc()
    err_console.print(f"[red]error:[/] {message}", markup=True, highlight=False)
    sys.stdout.flush()
    sys.exit(code)


def _stop_as_interrupted(_signum: int, _frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP end a command as Ctrl-C does. Killed outright, `meshctl reply`
    left its queue-group place behind until the node noticed it gone, and requests sent
    there meanwhile were lost (exploratory test); and the command of `reply --command`,
    in a session of its own, outlived a closed terminal (review). `sub` and `tail` flush
    and say goodbye too. `meshctl up` sets its own handlers (the node stops)."""
    raise KeyboardInterrupt


def main() -> None:
    """Entry point: run the CLI; our errors and click's usage errors become one line."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_as_interrupted)
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except _NO_ARGS:
        sys.exit(2)  # the help has been printed already
    except _USAGE as e:
        ctx = getattr(e, "ctx", None)
        hint = f" (see `{ctx.command_path} --help`)" if ctx else ""
        _fail(_escape(f"{e.format_message()}{hint}"), 2)  # type: ignore[attr-defined]
    except _ABORT:
        _fail("interrupted", 130)
    except InputError as e:
        _fail(_escape(str(e)), 2)
    except NodeError as e:
        _fail(_escape(str(e)), 1)
    except _CLICK as e:
        _fail(_escape(e.format_message()), getattr(e, "exit_code", 1))  # type: ignore[attr-defined]
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (`| head`): not an error
        sys.exit(0)
    except SystemExit as e:
        # Typer catches the broken pipe first: it wraps stdout in click's PacifyFlushWrapper
        # and exits 1, so `meshctl sub ... | head -1` failed under pipefail (exploratory
        # test). That wrapper is the sign; the reader going away is still not an error.
        if e.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            sys.exit(0)
        raise
    except Exception as e:  # a bug of ours: still one line, the traceback with --debug
        _fail(_escape(f"internal error: {type(e).__name__}: {e} (run with --debug for details)"), 1)
    sys.exit(code if isinstance(code, int) else 0)


def _escape(text: str) -> str:
    from rich.markup import escape  # noqa: PLC0415

    return escape(text)
