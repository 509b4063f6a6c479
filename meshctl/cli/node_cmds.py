"""Commands that run and inspect a node: up, down, status, config."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer
from rich.console import Console
from rich.table import Table

from meshctl.cli.options import ConfigOpt, DataDirOpt, JsonOpt, Seconds, ServerOpt, TimeoutOpt
from meshctl.cli.output import dumps, escaped, note, out_console
from meshctl.client import connect
from meshctl.errors import OperationalError
from node import datadir
from node.config import NodeConfig, as_dict, read_config, render_config, with_overrides
from node.errors import ConfigError, InputError

if TYPE_CHECKING:
    import ssl

config_app = typer.Typer(help="Write or show the node configuration.", no_args_is_help=True)


def default_config_path() -> Path:
    """``$XDG_CONFIG_HOME/meshctl/meshctl.toml`` or ``~/.config/meshctl/meshctl.toml``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "meshctl" / "meshctl.toml"


def config_file(config: Path | None) -> Path | None:
    """The config file a command reads: the explicit one, else the default path if present."""
    if config is not None:
        return config
    default = default_config_path()
    return default if default.exists() else None


def effective_config(config: Path | None, **overrides: object) -> NodeConfig:
    """Defaults, then the config file (explicit or the default path if present), then options."""
    path = config_file(config)
    base = NodeConfig() if path is None else read_config(path)
    return with_overrides(base, overrides, source="command line")


def up(
    port: Annotated[
        int | None,
        typer.Option(
            help="TCP port (listen.port, default 4850; 0 = free port).", show_default=False
        ),
    ] = None,
    listen: Annotated[
        str | None,
        typer.Option(
            help="TCP listen address (listen.address, default 0.0.0.0).", show_default=False
        ),
    ] = None,
    data_dir: DataDirOpt = None,
    name: Annotated[
        str | None,
        typer.Option(help="Node name (node.name, default: host name).", show_default=False),
    ] = None,
    mesh: Annotated[
        str | None,
        typer.Option(help="Mesh name (node.mesh, default 'default').", show_default=False),
    ] = None,
    discovery: Annotated[
        bool | None,
        typer.Option(
            "--discovery/--no-discovery",
            help="Find nodes of the mesh with mDNS (mesh.discovery, default on).",
            show_default=False,
        ),
    ] = None,
    link: Annotated[
        list[str] | None,
        typer.Option(
            "--link",
            metavar="tcp://HOST:PORT",
            help="Static peer, repeatable (adds to mesh.links).",
            show_default=False,
        ),
    ] = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            metavar="HOST:PORT",
            help="Accept MQTT 3.1.1 clients here (mqtt.listen, default off; port 0: free).",
            show_default=False,
        ),
    ] = None,
    config: ConfigOpt = None,
    detach: Annotated[
        bool, typer.Option("--detach", help="Run in the background; stop it with `meshctl down`.")
    ] = False,
    insecure: Annotated[
        bool | None,
        typer.Option(
            "--insecure",
            help="Open mode: no encryption or membership (security.insecure). Trusted LANs only.",
            show_default=False,
        ),
    ] = None,
    join: Annotated[
        str | None,
        typer.Option(
            "--join",
            metavar="TOKEN",
            help="Join the mesh of a `meshctl invite` token (once; kept in the data dir).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Start a node in the foreground (Ctrl-C stops it) or, with --detach, in the background."""
    cfg = effective_config(
        config,
        port=port,
        listen=listen,
        data_dir=None if data_dir is None else str(data_dir),
        name=name,
        mesh=mesh,
        discovery=discovery,
        insecure=insecure,
    )
    if join is not None and cfg.insecure:
        raise InputError("--join and --insecure exclude each other: a joined node is secured")
    if join is not None:  # before the data dir is made: a typo left one with a node id
        from node import membership  # noqa: PLC0415 - only with --join

        try:
            membership.Token.decode(join)
        except membership.MembershipError as e:
            raise InputError(f"--join: {e}") from None
    if link:
        cfg = with_overrides(cfg, {"links": [*cfg.links, *link]}, source="command line")
    if mqtt is not None:
        try:
            cfg = with_overrides(cfg, {"mqtt_listen": mqtt}, source="command line")
        except ConfigError as e:
            raise ConfigError("command line", "--mqtt", e.reason) from None
    if cfg.uplink_url and not cfg.store:
        raise InputError("an uplink spools to the store: set store.enabled = true")
    if cfg.uplink_url and cfg.uplink_creds:
        from meshctl.client import load_creds  # noqa: PLC0415 - only with an uplink

        try:  # now, as a bridge's TLS files are: it only logged 'down' (found in review)
            load_creds(cfg.uplink_creds)
        except InputError as e:
            raise ConfigError(str(config or "config"), "uplink.creds", str(e)) from None
    mqtt_tls, bridge_tls = _tls_contexts(cfg, config)
    where = datadir.resolve_data_dir(cfg.data_dir)
    if (tightened := datadir.prepare(where)) is not None:
        note(tightened)
    if cfg.ipc:
        datadir.ipc_endpoint(where)  # fail now, in the foreground, if the path is too long
    running = datadir.read_pid(where)
    if running is not None:
        raise InputError(
            f"a node is already running in {where} (pid {running}); "
            "stop it with `meshctl down` or use another --data-dir"
        )
    if detach:
        _detach(where)
        return
    from node.loop import Identity, Node, serve  # noqa: PLC0415 - keeps zmq off the CLI's start path

    logging.basicConfig(
        level=cfg.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s.%(msecs)03d %(levelname)s %(message)s",
        datefmt="%Y-%m-%dT%H:%M:%S",
    )
    identity = Identity(
        node_id=datadir.load_or_create_node_id(where),
        name=cfg.name or socket.gethostname(),
        data_dir=where,
    )
    security = None
    if not cfg.insecure:
        from meshctl.cli.security_cmds import credentials_for_up  # noqa: PLC0415

        cfg, security = credentials_for_up(where, cfg, identity.node_id, identity.name, join)

    def plugins(node: Node) -> list[Any]:
        started: list[Any] = []
        register = node.router.internal.add
        try:
            if cfg.uplink_url:
                from edge.uplink import UplinkSettings, start_uplink  # noqa: PLC0415

                settings = UplinkSettings(
                    url=cfg.uplink_url,
                    export=cfg.uplink_export,
                    imports=cfg.uplink_import,
                    data_dir=where,
                    cursor_path=datadir.uplink_cursor_path(where),
                    node_id=identity.node_id,
                    node_name=identity.name,
                    creds=cfg.uplink_creds,
                )
                started.append(start_uplink(settings, node.ctx, node.inproc, register))
            if cfg.bridges:
                from edge.bridges import start_bridges  # noqa: PLC0415 - paho/nats when used

                spool_dir = where if cfg.store else None  # the store holds their spool
                states = node.router.net.table.states  # the nodes of this mesh, by id
                started += start_bridges(
                    cfg.bridges, node.ctx, node.inproc, register, spool_dir, bridge_tls,
                    identity.node_id, states.__contains__,
                )  # fmt: skip
            if cfg.mqtt_listen:
                from edge.mqtt_listener import start_listener  # noqa: PLC0415 - when used

                listener = start_listener(cfg, data_dir=where, tls=mqtt_tls)
                started.append(listener)
                node.attach(listener)
        except OSError:  # e.g. the MQTT port is taken: stop what already started
            for plugin in started:
                plugin.stop()
            raise
        return started

    detached = bool(os.environ.get(DETACHED))
    if detached:  # logrotate's "postrotate kill -HUP": reopen the log, do not die
        log_path = where / datadir.LOG_FILE
        signal.signal(signal.SIGHUP, lambda *_: _reopen_log(log_path))
    else:  # its terminal closed: it ends as it always did (the CLI's handler is for commands)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        serve(cfg, identity, plugins, security, _ready_line if detached else None)
    except OSError as e:
        raise OperationalError(str(e)) from None


def _reopen_log(log_path: Path) -> None:
    """Point stdout and stderr (a detached node's log) at ``log_path`` anew: after a
    rotation moved the file away, the node went on writing to the moved one, and SIGHUP,
    the usual way to say so, ended it (exploratory test)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    finally:
        os.close(fd)


def _tls_contexts(
    cfg: NodeConfig, config: Path | None
) -> tuple[ssl.SSLContext | None, dict[str, ssl.SSLContext]]:
    """Read every TLS file the config names now, in the foreground, so that a wrong one is
    one line (exit 2) rather than a node without its MQTT port or a bridge that never
    connects: the MQTT listener's context, and each TLS bridge's by name."""
    if not (cfg.mqtt_listen or any(b.tls for b in cfg.bridges)):
        return None, {}
    from edge.tls import client_context, server_context  # noqa: PLC0415 - when used

    source = str(config_file(config) or "config")
    bridges = {}
    for i, bridge in enumerate(cfg.bridges):
        context = client_context(bridge, source, f"bridge[{i}]")
        if context is not None:
            bridges[bridge.name] = context
    return (server_context(cfg, source) if cfg.mqtt_listen else None), bridges


def _mqtt_tls(m: dict[str, Any]) -> str:
    if not m.get("tls"):
        return ""
    return " (TLS, client certificates)" if m.get("client_certs") else " (TLS)"


DETACHED: Final = "MESHCTL_DETACHED"  # set for the node `up --detach` starts
READY: Final = "node ready: every listener is bound"


def _ready_line() -> None:
    """What `up --detach` waits for in the log, whatever the log level: "listening on" is
    INFO, and at level warning the parent waited 10 s and failed a node that ran (review)."""
    print(READY, file=sys.stderr, flush=True)


def _detach(where: Path) -> None:
    """Re-run this command without --detach as a session leader logging to the data dir."""
    argv = [a for a in sys.argv[1:] if a != "--detach"]
    log_path = where / datadir.LOG_FILE
    try:
        logf = log_path.open("ab")
    except OSError as e:  # a directory in its place was an internal error
        raise OperationalError(f"cannot open the node's log {log_path}: {e.strerror}") from None
    with logf:
        start = logf.tell()  # this run's lines only: an older run's said "listening on" too
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
            [sys.executable, "-m", "meshctl", *argv],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            start_new_session=True,
            env={**os.environ, DETACHED: "1"},
        )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            # This run's lines only (an earlier run's "received SIGTERM" read as the
            # cause), and its exit code: 2 for a usage error stays 2 (exploratory test).
            said = _said(log_path, start)[-3:] or ["(nothing in the log)"]
            error = InputError if proc.returncode == 2 else OperationalError
            raise error(f"node exited with code {proc.returncode}: " + " | ".join(said))
        if datadir.read_pid(where) == proc.pid and _listening(log_path, start):
            for line in _said(log_path, start):  # as the foreground shows them
                note(line)
            note(f"node started in the background (pid {proc.pid}); log: {log_path}")
            return
        time.sleep(0.05)
    proc.terminate()  # not left running behind an error that says it failed (review)
    raise OperationalError(
        f"node (pid {proc.pid}) did not become ready within 10s: stopped it; see {log_path}"
    )


def _said(log_path: Path, start: int) -> list[str]:
    """What this run's start told the operator, bar routine INFO lines: the notice of a
    new one-node mesh, warnings (open mode). Detached, it went to the log alone."""
    with log_path.open("rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    return [line for line in lines if line.strip() and " INFO " not in line and line != READY]


def _listening(log_path: Path, start: int) -> bool:
    """True once the node said, after ``start``, that it is ready: every listener is
    bound by then. Its ipc socket exists earlier, before the MQTT listener binds, so a
    busy MQTT port ended the node after "node started in the background" (exploratory
    test), and the log of an earlier run said "listening on" already."""
    with log_path.open("rb") as f:
        f.seek(start)
        return READY.encode() in f.read()


def down(
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
    timeout: TimeoutOpt = Seconds(5),
) -> None:
    """Stop the node running in the data directory (SIGTERM, then wait)."""
    cfg = effective_config(config, data_dir=None if data_dir is None else str(data_dir))
    where = datadir.resolve_data_dir(cfg.data_dir)
    pid = datadir.read_pid(where)
    if pid is None:
        raise OperationalError(f"no node is running in {where}")
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:  # another user's node: it ended in an internal error
        raise OperationalError(f"not allowed to stop the node in {where} (pid {pid})") from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            note(f"node stopped (pid {pid})")
            return
        if datadir.read_pid(where) != pid:  # it let go of the data dir (its parent may
            note(f"node stopped (pid {pid})")  # not have reaped it yet: a zombie)
            return
        time.sleep(0.05)
    raise OperationalError(f"node (pid {pid}) did not stop within {timeout:g}s")


def status(
    server: ServerOpt = None, timeout: TimeoutOpt = Seconds(2), json_out: JsonOpt = False
) -> None:
    """Show the node: id, endpoints, uptime, clients, subscriptions and counters."""
    with connect(server, name="meshctl status", timeout=timeout, operator=True) as client:
        info = client.status()
    if json_out:
        print(dumps(info))
        return
    _render_status(escaped(info))


def _render_status(s: dict[str, Any]) -> None:
    out = out_console()
    c = s["counters"]
    out.print(
        f"[bold]{s['name']}[/] [dim]id[/] {s['id']}  [dim]mesh[/] {s['mesh']}  "
        f"[dim]version[/] {s.get('version', '?')}  [dim]pid[/] {s.get('pid', '?')}"
    )
    out.print(f"[dim]endpoints[/] {', '.join(s.get('endpoints', []))}")
    security = s.get("security") or {}
    if security.get("mode") == "insecure":
        out.print("[bold red]WARNING: open mode (--insecure): no encryption, no membership[/]")
    elif security:
        if security.get("revoked"):
            out.print("[bold red]this node's membership was revoked: it no longer links[/]")
        out.print(
            f"[dim]security[/] CurveZMQ  [dim]links rejected[/] {security['links_rejected']}  "
            f"[dim]clients rejected[/] {security['clients_rejected']}  "
            f"[dim]permission denied[/] {c['dropped'].get('permission', 0)}  "
            f"[dim]revocations[/] {security['revocations']}"
        )
        for address, left in (security.get("blocked_addresses") or {}).items():
            out.print(
                f"[yellow]blocked[/] {address}: too many failed proofs, its handshakes are "
                f"dropped for {left:g}s more"
            )
    limit = s.get("limits", {}).get("max_clients")
    refused = c.get("clients_refused", 0)
    full = ""
    places = sum(1 for cl in s["clients"] if not cl.get("internal"))  # under the limit
    if limit is not None and (refused or places >= limit):
        full = f" [red](limit {limit}" + (f", {refused} refused" if refused else "") + ")[/]"
    out.print(
        f"[dim]uptime[/] {_ago(s.get('uptime_s', 0))}  [dim]clients[/] {len(s['clients'])}{full}"
        f"  [dim]subscriptions[/] {s.get('subscriptions_total', len(s['subscriptions']))}"
    )
    drops = ", ".join(f"{k} {v}" for k, v in c["dropped"].items() if v) or "none"
    out.print(
        f"[dim]events[/] in {c['events_in']}  out {c['events_out']}  "
        f"no interest {c['no_interest']}  [dim]dropped[/] {drops}  "
        f"[dim]bad frames[/] {c['bad_frames']}  [dim]bad handshakes[/] {c['bad_handshakes']}"
    )
    _render_durable(out, s)
    m = s.get("mqtt")
    if m:
        out.print(
            f"[dim]mqtt[/] {m['listen']}{_mqtt_tls(m)}  [dim]clients[/] {m['clients']}  "
            f"[dim]sessions[/] {m['sessions']} ({m['offline_sessions']} away)  "
            f"[dim]retained[/] {'in node' if m['retained'] is None else m['retained']}  "
            f"[dim]qos1[/] {m.get('qos1', '?')}  "
            f"[dim]published[/] {m['published']}  "
            f"[dim]delivered[/] {m['delivered']}  [dim]refused topics[/] {m['refused_topics']}  "
            f"[dim]protocol errors[/] {m['protocol_errors']}"
            + (f"  [dim]store refused[/] {m['store_refused']}" if m.get("store_refused") else "")
            + (f"  [dim]TLS failures[/] {m['tls_failures']}" if m.get("tls_failures") else "")
        )
    bridges = [b for b in s.get("bridges") or [] if b.get("kind") != "uplink"]
    if bridges:
        t = Table(
            "bridge",
            "kind",
            "url",
            "state",
            "imported",
            "exported",
            "refused",
            "dropped (remote down)",
            "spool",  # persistent exports waiting for the broker: only --json showed them
            box=None,
        )
        for b in bridges:
            state = b["state"] if b["state"] == "up" else f"[red]{b['state']}[/]"
            if b.get("detail"):
                state += f" ({b['detail'][:60]})"  # escaped with the rest
            spool = b.get("spool") or {}
            waiting = f"{spool['entries']} events" if "entries" in spool else ""
            t.add_row(
                b["name"],
                b["kind"],
                b["url"],
                state,
                str(b["imported"]),
                str(b["exported"]),
                str(b["refused"]),
                str(b["dropped_remote_down"]),
                waiting,
            )
        out.print(t)
    if s["clients"]:
        t = Table("client", "name", "connected", "subs", "in", "out", "dropped", box=None)
        for cl in s["clients"]:
            t.add_row(
                cl["id"],
                cl["name"],
                _ago(cl["connected_s"]),
                str(cl["subscriptions"]),
                str(cl["events_in"]),
                str(cl["events_out"]),
                f"[red]{cl['dropped']}[/]" if cl["dropped"] else "0",
            )
        out.print(t)
    if s["subscriptions"]:
        t = Table("pattern", "group", "client", box=None)
        for sub in s["subscriptions"]:
            t.add_row(sub["pattern"], sub["group"] or "", sub["client"])
        out.print(t)
        more = s.get("subscriptions_total", 0) - len(s["subscriptions"])
        if more > 0:
            out.print(f"[dim]... and {more} more patterns (meshctl routes TOPIC explains one)[/]")


def _render_durable(out: Console, s: dict[str, Any]) -> None:
    """The store line and, with an uplink, its state and spool."""
    st = s.get("store")
    if st is None:
        out.print("[dim]store[/] off (no persistence)")
        return
    log = st["log"]
    errors = f"[red]{st['errors']} ({st['last_error']})[/]" if st["errors"] else "0"
    out.print(
        f"[dim]store[/] sync {st['sync']}  persisted {st['persisted']}  "
        f"duplicates {st['duplicates']}  log {log['entries']} entries, {log['bytes']} B  "
        f"queues {st['queues']}  retained {st['retained']}  errors {errors}"
    )
    for up in (b for b in s.get("bridges") or [] if b.get("kind") == "uplink"):
        state = up["state"] if up["state"] == "up" else f"[red]{up['state']}[/]"
        if up["state"] != "up" and up.get("error"):  # it said only "down" (secured scenario)
            state += f" ({str(up['error'])[:200]})"
        spool = up["spool"]
        over = ">" if spool.get("oldest_at_least") else ""
        age = (
            "" if spool["oldest_age_s"] is None else f", oldest {over}{_ago(spool['oldest_age_s'])}"
        )
        node_spool = st.get("spool") or {}
        mine = (node_spool.get("readers") or {}).get("uplink", {})
        # Said apart (exploratory test): events drop-oldest took, lost; publishers' events
        # the full spool refused, which they were told of (node-wide: bridges' too); full.
        dropped, refused = mine.get("dropped", 0), node_spool.get("refused", 0)
        notes = "".join(
            (
                f"  [red]lost to overflow {dropped}[/]" if dropped else "",
                f"  [yellow]refused {refused} (publishers told)[/]" if refused else "",
                "  [red]FULL: refusing[/]" if mine.get("full") else "",
            )
        )
        out.print(
            f"[dim]uplink[/] {up['url']} {state}  sent {up['sent']}  received "
            f"{up['received']}  [dim]spool[/] {spool['entries']} events, {spool['bytes']} B"
            f"{age}{notes}"
        )


def _ago(seconds: float) -> str:
    seconds = max(0, int(seconds))  # a negative age (a clock stepped back) printed -1h00m05s
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


@config_app.command("init")
def config_init(
    path: Annotated[
        Path | None,
        typer.Argument(
            help="Where to write; '-' for stdout \\[default: ~/.config/meshctl/meshctl.toml]",
            show_default=False,
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented config file with every key and its default."""
    text = render_config(NodeConfig(), comments=True)
    if path is not None and str(path) == "-":
        sys.stdout.write(text)
        return
    target = path or default_config_path()
    if target.is_dir():  # '' arrives as '.': "exists; use --force" led nowhere
        raise InputError(f"{target} is a directory: give the config file's path")
    if target.exists() and not force:
        raise InputError(f"{target} exists; use --force to overwrite it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    except OSError as e:
        raise ConfigError(str(target), "", f"cannot write: {e.strerror}") from None
    note(f"wrote {target}")


@config_app.command("show")
def config_show(config: ConfigOpt = None, json_out: JsonOpt = False) -> None:
    """Print the effective configuration (defaults, then the file)."""
    cfg = effective_config(config)
    if json_out:
        print(json.dumps(as_dict(cfg), separators=(",", ":")))
    else:
        sys.stdout.write(render_config(cfg, comments=False))
