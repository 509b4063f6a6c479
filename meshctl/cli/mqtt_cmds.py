"""``meshctl mqtt passwd|users``: who may use the node's MQTT listener, and with what rules.

Like ``mosquitto_passwd``, these edit a file on the node's host (DATA_DIR/mqtt_users.json,
0600); a running listener picks the change up at the next CONNECT.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from meshctl.cli.options import ConfigOpt, DataDirOpt, JsonOpt
from meshctl.cli.output import dumps, note, out_console

mqtt_app = typer.Typer(
    help="Users of the node's MQTT listener (on secured nodes MQTT clients need one).",
    no_args_is_help=True,
)


def _users_path(config: Path | None, data_dir: Path | None) -> Path:
    from edge.mqtt_auth import USERS_FILE  # noqa: PLC0415 - keeps `meshctl --help` light
    from meshctl.cli.security_cmds import data_dir_of  # noqa: PLC0415

    return data_dir_of(config, data_dir) / USERS_FILE


@mqtt_app.command("passwd")
def passwd(
    name: Annotated[str, typer.Argument(help="MQTT user name (CONNECT's username).")],
    pub_allow: Annotated[list[str] | None, typer.Option(help="May publish (pattern).")] = None,
    pub_deny: Annotated[list[str] | None, typer.Option(help="May not publish.")] = None,
    sub_allow: Annotated[list[str] | None, typer.Option(help="May subscribe.")] = None,
    sub_deny: Annotated[list[str] | None, typer.Option(help="May not subscribe.")] = None,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from standard input.")
    ] = False,
    delete: Annotated[bool, typer.Option("--delete", help="Remove the user.")] = False,
    unrestricted: Annotated[
        bool, typer.Option("--unrestricted", help="Clear an existing user's rules.")
    ] = False,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Add a user or set its password and rules (mesh patterns; given none, an existing
    user keeps its rules, --unrestricted clears them); --delete removes it."""
    from edge import mqtt_auth  # noqa: PLC0415
    from node.membership import Permissions  # noqa: PLC0415
    from node.topics import validate_pattern  # noqa: PLC0415

    mqtt_auth.check_name(name)
    path = _users_path(config, data_dir)
    users = mqtt_auth.load_users(path)
    if delete:
        if users.pop(name, None) is None:
            raise typer.BadParameter(f"no MQTT user {name!r} in {path}", param_hint="NAME")
        mqtt_auth.save_users(path, users)
        note(f"removed MQTT user {name}")
        return
    rules = [*(pub_allow or []), *(pub_deny or []), *(sub_allow or []), *(sub_deny or [])]
    for pattern in rules:
        validate_pattern(pattern)  # a TopicError (exit 2) names the bad pattern
        _no_mqtt_wildcards(pattern)
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = typer.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    if not password:
        raise typer.BadParameter("the password is empty", param_hint="password")
    perms = Permissions(
        tuple(pub_allow or ()), tuple(pub_deny or ()), tuple(sub_allow or ()), tuple(sub_deny or ())
    )
    if rules and unrestricted:
        raise typer.BadParameter("rules and --unrestricted contradict each other")
    if not rules and not unrestricted and name in users:  # a new password, same rules
        perms = users[name].perms
    verb = "updated" if name in users else "added"
    users[name] = mqtt_auth.User(name, mqtt_auth.hash_password(password), perms)
    mqtt_auth.save_users(path, users)
    shown = "; ".join(f"{k} {', '.join(v)}" for k, v in perms.to_json().items() if v)
    note(f"{verb} MQTT user {name} ({'no restrictions' if perms.unrestricted else shown})")


def _no_mqtt_wildcards(pattern: str) -> None:
    """Rules are mesh patterns, in which a '+' or '#' level is a literal name: 'a/+/b'
    matched only a topic with a level named '+', which an MQTT client cannot publish
    (found by an exploratory test). Say what to write instead."""
    levels = pattern.split("/")
    if "+" in levels or "#" in levels:
        mesh = "/".join({"+": "*", "#": ">"}.get(x, x) for x in levels)
        raise typer.BadParameter(
            f"{pattern!r} uses MQTT wildcards; rules are mesh patterns: write {mesh!r}",
            param_hint="rule",
        )


@mqtt_app.command("users")
def users_cmd(
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """List the MQTT users and their permissions (never the password hashes)."""
    from edge import mqtt_auth  # noqa: PLC0415

    users = mqtt_auth.load_users(_users_path(config, data_dir))
    if as_json:
        for u in users.values():
            print(dumps({"name": u.name, **u.perms.to_json()}))
        return
    table = Table("user", "pub_allow", "pub_deny", "sub_allow", "sub_deny", box=None)
    for u in sorted(users.values(), key=lambda u: u.name):
        p = u.perms
        rules = (p.pub_allow, p.pub_deny, p.sub_allow, p.sub_deny)
        table.add_row(escape(u.name), *(escape(", ".join(r)) or "-" for r in rules))
    out_console().print(table)
