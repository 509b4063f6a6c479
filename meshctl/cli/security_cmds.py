"""Commands that create and manage a mesh's credentials: init, invite, revoke; and the
credential step of ``meshctl up`` (auto-initialise, or enroll with ``--join``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Final

import typer

from meshctl.cli.options import ConfigOpt, DataDirOpt, Seconds, duration
from meshctl.cli.output import note
from meshctl.errors import OperationalError
from meshctl.url import resolve_server
from node import datadir, membership, renewal
from node import security as sec
from node.clock import clock_is_set, unset_clock_error
from node.codec import Kind
from node.config import NodeConfig
from node.errors import InputError


def data_dir_of(config: Path | None, data_dir: Path | None) -> Path:
    from meshctl.cli.node_cmds import effective_config  # noqa: PLC0415 - avoids an import cycle

    cfg = effective_config(config, data_dir=None if data_dir is None else str(data_dir))
    where = datadir.resolve_data_dir(cfg.data_dir)
    if (tightened := datadir.prepare(where)) is not None:
        note(tightened)
    return where


def init(
    mesh: Annotated[str, typer.Option("--mesh", "-m", help="Name of the new mesh.")] = "default",
    name: Annotated[
        str | None, typer.Option(help="This node's name (default: host name).", show_default=False)
    ] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Create a mesh on this node: its signing key, this node's CurveZMQ keys and record."""
    from node.config import _mesh  # noqa: PLC0415 - the one mesh-name rule

    try:
        _mesh(mesh)
    except ValueError as e:
        raise InputError(f"--mesh: {e}") from None
    _clock_must_be_set()
    where = data_dir_of(config, data_dir)
    node_id = datadir.load_or_create_node_id(where)
    creds = sec.init_mesh(
        where, mesh=mesh, node_id=node_id, name=name or socket.gethostname(), now=time.time()
    )
    note(
        f"mesh {mesh!r} created in {where} (mesh key {creds.mesh_pk.hex()[:16]}…); "
        "start it with `meshctl up`, add devices with `meshctl invite`"
    )


MAX_TTL: Final = 30 * 86400.0  # a join token is short-lived: 99999999h was accepted
MAX_DAYS: Final = 100 * 365.0  # client credentials


def invite(
    url: Annotated[
        str | None,
        typer.Option(
            help="Address joiners dial, tcp://HOST:PORT \\[default: the local node's endpoint]",
            show_default=False,
        ),
    ] = None,
    ttl: Annotated[
        float,
        typer.Option(
            parser=duration, metavar="DURATION", help="How long the token is valid (10m, 1h)."
        ),
    ] = Seconds(900),
    uses: Annotated[int, typer.Option(min=1, max=1000, help="Devices it may enroll.")] = 1,
    client: Annotated[
        str | None,
        typer.Option(
            "--client",
            metavar="NAME",
            help="Instead of a join token, write credentials for a client identity.",
            show_default=False,
        ),
    ] = None,
    pub_allow: Annotated[
        list[str] | None, typer.Option(help="Client may publish (pattern).")
    ] = None,
    pub_deny: Annotated[list[str] | None, typer.Option(help="Client may not publish.")] = None,
    sub_allow: Annotated[list[str] | None, typer.Option(help="Client may subscribe.")] = None,
    sub_deny: Annotated[list[str] | None, typer.Option(help="Client may not subscribe.")] = None,
    days: Annotated[float, typer.Option(help="Client credentials validity in days.")] = 365,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Client credentials file ('-' for stdout)."),
    ] = None,
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print a join token for `meshctl up --join TOKEN` (short-lived, single-use), or with
    --client write a client credentials file with publish/subscribe permissions."""
    where = data_dir_of(config, data_dir)
    # Found in review: --ttl 0 and --days -1 issued what could never be used, and an
    # http:// URL went into the token, failing only at `up --join` with a ZeroMQ error.
    if not 0 < ttl <= MAX_TTL:
        raise InputError(
            f"--ttl must be positive and at most {MAX_TTL // 86400:.0f} days, e.g. 10m"
        )
    if not 0 < days <= MAX_DAYS:  # inf ended in an OverflowError (exploratory test)
        raise InputError(f"--days must be from more than 0 to {MAX_DAYS:.0f}")
    perms_given = pub_allow or pub_deny or sub_allow or sub_deny
    if client is None and perms_given:  # were ignored without a word
        raise InputError("--pub-allow/--pub-deny/--sub-allow/--sub-deny go with --client")
    _clock_must_be_set()
    if client is not None:
        if not client or len(client) > 63 or not client.isprintable() or " " in client:
            # '' and ' a b ' were issued, and `revoke ''` said "revoked client  ()".
            raise InputError(
                f"--client {client!r}: 1-63 characters, no spaces or control characters"
            )
        _client_creds(where, client, pub_allow, pub_deny, sub_allow, sub_deny, days, output)
        return
    if url is not None:
        url = resolve_server(url)
        if not url.startswith("tcp://"):
            raise InputError(f"--url {url!r}: joiners dial tcp://HOST:PORT")
    url = url or _local_url(where)
    token = sec.issue_token(where, url=url, ttl=ttl, uses=uses, now=time.time())
    note(
        f"join token {token.token_id} for mesh {token.mesh!r} via {url}: valid {ttl:g}s, "
        f"{uses} use(s) (`meshctl revoke {token.token_id}` cancels it)"
    )
    print(token.encode())


def _clock_must_be_set() -> None:
    """Refuse to sign with a clock that is not set (a device at 1970 before NTP): its
    tokens and records were valid for the wrong period, an authority's enrolled members
    expired at once after NTP (clock faults)."""
    if not clock_is_set():
        raise OperationalError(unset_clock_error())


def _client_creds(
    where: Path,
    name: str,
    pub_allow: list[str] | None,
    pub_deny: list[str] | None,
    sub_allow: list[str] | None,
    sub_deny: list[str] | None,
    days: float,
    output: Path | None,
) -> None:
    from node.topics import validate_pattern  # noqa: PLC0415

    for p in [*(pub_allow or []), *(pub_deny or []), *(sub_allow or []), *(sub_deny or [])]:
        validate_pattern(p)  # a TopicError (exit 2) names the bad pattern
    revoked = {r.get("rec", {}).get("key") for r in _revocations(where)}
    for m in _members(where):
        if m.get("key") in revoked or name not in (m.get("name"), m.get("node")):
            continue
        # A second credential was issued without a word, and `revoke NAME` then revoked
        # both (a secured plant's review). As `nsc add user` refuses a name in use. A
        # node's name or id too: `revoke NAME` could then tell neither apart (review).
        held = "already has credentials" if m.get("role") == "client" else "is a node's"
        raise InputError(
            f"{name!r} {held} from this data dir: revoke it first (meshctl revoke "
            f"{m.get('node')}) or choose another name"
        )
    perms = membership.Permissions(
        tuple(pub_allow or ()), tuple(pub_deny or ()), tuple(sub_allow or ()), tuple(sub_deny or ())
    )
    doc = sec.client_credentials(where, name=name, perms=perms, days=days, now=time.time())
    text = json.dumps(doc, indent=1) + "\n"
    target = output if output is not None and str(output) != "-" else None  # None: stdout
    # Written (and flushed) before the member is remembered: credentials that did not
    # reach their file (a full disk, a missing directory) took the name for good, and
    # the error was an internal one (review).
    if target is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        created = not os.path.lexists(target)
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                # The mode of open() applies only to a new file: an existing 0644 one kept
                # it, with the secret key inside (exploratory test). Before any byte.
                os.fchmod(f.fileno(), 0o600)
                f.write(text)
                f.flush()
        except OSError as e:
            if created:
                with contextlib.suppress(OSError):
                    target.unlink()  # no half-written secret left behind
            raise OperationalError(f"cannot write {output}: {e.strerror}") from None
    try:
        sec.remember_member(where, node=name, name=name, key=doc["public"], role="client")
    except BaseException:
        # Not recorded, so `revoke` could never find them: valid credentials nobody can
        # take back (review). The file goes; on stdout, the error says not to use them.
        if target is not None:
            with contextlib.suppress(OSError):
                target.unlink()
        else:
            note("the credentials printed above were not recorded: do not use them")
        raise
    if target is not None:
        note(f"wrote client credentials {output} for {name!r} (use with MESHCTL_CREDS)")


def _local_url(where: Path) -> str:
    """The running local node's TCP endpoint, for the token."""
    from meshctl.client import connect  # noqa: PLC0415

    try:
        with connect(
            f"ipc://{where / datadir.IPC_FILE}", name="meshctl invite", operator=True
        ) as c:
            # As the node gives them to the mesh: 0.0.0.0 already made an address on its
            # mDNS interfaces (the CLI's own guess ignored mesh.interfaces: review).
            nodes = c.view("mesh").get("nodes", [])
            endpoints: list[str] = next(
                (n.get("endpoints", []) for n in nodes if n.get("self")), []
            )
    except Exception:
        endpoints = []
    tcp = [e for e in endpoints if e.startswith("tcp://")]
    if not tcp:
        raise InputError(
            "no running node here to take the address from; pass --url tcp://HOST:PORT"
        )
    from node.discovery import wildcard_to_address  # noqa: PLC0415 - ifaddr, only here

    return wildcard_to_address(tcp[0])


def revoke(
    who: Annotated[
        str,
        typer.Argument(help="Node id, node name, client name, or a join token or its id."),
    ],
    data_dir: DataDirOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Revoke a member (the local node floods the signed revocation and every node drops
    its links and sessions), or an unused join token (by the token or its id)."""
    where = data_dir_of(config, data_dir)
    token_id = who
    if who.startswith("mtk1."):
        try:
            token_id = membership.Token.decode(who).token_id
        except membership.MembershipError as e:
            raise InputError(f"{who[:20]}...: not a join token ({e})") from None
    if sec.revoke_token(where, token_id):
        note(f"revoked join token {token_id}: it can no longer enroll anyone")
        return
    members = _members(where)
    # A node by its id, else every member of that name (a client's "node" is its name, so
    # matching ids first took client pi alone where node pi shared the name: review), or
    # a client by the public key in its credentials file.
    found = [m for m in members if m.get("role") == "node" and who == m.get("node")] or [
        m for m in members if who in (m.get("name"), m.get("key"))
    ]
    # One revocation per key: an older members.json lists a node once per enrolment.
    found = list({(m.get("node"), m.get("key")): m for m in found}.values())
    if not found:
        if not (where / sec.SIGNING_FILE).exists():
            raise InputError(
                f"no mesh signing key in {where}: run `meshctl revoke` on the node where "
                "`meshctl init` ran (or pass its --data-dir)"
            )
        raise InputError(f"{who!r} is not a member enrolled from this data dir ({where})")
    done = {r.get("rec", {}).get("key") for r in _revocations(where)}
    live = [m for m in found if m.get("key") not in done]
    if not live:
        m = found[-1]
        note(f"{m['role']} {m['name']} ({m['node']}) is already revoked")
        return
    if len({(m["role"], m["node"]) for m in live}) > 1:
        # Devices cloned from one image share a host name, the default node name: one
        # `revoke pi` revoked them all, and a client named pi (exploratory test). Those
        # revoked already do not count: `revoke pi` refused for good once one was (review).
        listed = ", ".join(f"{m['role']} {m['node']}" for m in live)
        raise InputError(
            f"{who!r} names {len(live)} members ({listed}): revoke one by its id (a "
            "client by the public key in its credentials file)"
        )
    for m in live:
        sec.revoke(where, node=m["node"], key=m["key"], now=time.time(), role=m["role"])
        note(f"revoked {m['role']} {m['name']} ({m['node']})")


def _members(where: Path) -> list[dict[str, Any]]:
    """What this data dir's authority issued (none if the file is missing or unreadable)."""
    try:
        items = json.loads((where / sec.MEMBERS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [m for m in items if isinstance(m, dict)] if isinstance(items, list) else []


def _revocations(where: Path) -> list[dict[str, Any]]:
    """The signed revocations in the data dir (none if the file is missing or unreadable:
    revoking again then only adds a duplicate, which every node skips)."""
    try:
        items = json.loads((where / sec.REVOKED_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [r for r in items if isinstance(r, dict)] if isinstance(items, list) else []


def credentials_for_up(
    where: Path, cfg: NodeConfig, node_id: str, name: str, join: str | None, timeout: float = 10.0
) -> tuple[NodeConfig, sec.Security]:
    """The credentials ``meshctl up`` runs with: enroll with ``--join``, else those in the
    data dir, else a new one-node mesh (so `meshctl up` on a fresh machine just works,
    secured, and `meshctl invite` grows it)."""
    from dataclasses import replace  # noqa: PLC0415

    creds = sec.load_credentials(where)
    if join is not None:
        try:
            token = membership.Token.decode(join)
        except membership.MembershipError as e:
            raise InputError(f"--join: {e}") from None
        if creds is not None and creds.mesh_pk.hex() != token.mesh_pk:
            raise InputError(
                f"--join: {where} already belongs to mesh {creds.mesh!r}; use another --data-dir"
            )
        if creds is not None and renewal.expires(creds.member) > time.time():
            note(f"already a member of mesh {creds.mesh!r}; --join ignored")
        else:  # a new member, or one whose record expired: the token enrolls its keys
            _enroll(where, token, node_id, name, timeout)
            creds = sec.load_credentials(where)
            note(f"joined mesh {token.mesh!r} via {token.url}")
    if creds is None:
        _clock_must_be_set()
        creds = sec.init_mesh(where, mesh=cfg.mesh, node_id=node_id, name=name, now=time.time())
        note(
            f"created a new one-node mesh {cfg.mesh!r} in {where}; "
            "add devices with `meshctl invite` (or run open with --insecure)"
        )
    assert creds is not None
    if cfg.mesh != creds.mesh:
        if cfg.mesh != NodeConfig().mesh:
            raise InputError(
                f"this data dir belongs to mesh {creds.mesh!r}, not {cfg.mesh!r}; "
                "drop --mesh or use another --data-dir"
            )
        cfg = replace(cfg, mesh=creds.mesh)
    return cfg, sec.Security(creds, where, node_id, logging.getLogger("meshctl.node").info)


def _enroll(where: Path, token: membership.Token, node_id: str, name: str, timeout: float) -> None:
    """Redeem ``token`` at the node that issued it, over CURVE to the key in the token."""
    if token.expires <= time.time():
        raise InputError("--join: the join token has expired; ask for a new one (meshctl invite)")
    public, secret = sec.curve_keys(where)
    body: dict[str, Any] = {
        "ref": 1,
        "token": token.token_id,
        "secret": token.secret,
        "node": node_id,
        "name": name,
    }
    try:
        kind, answer = renewal.ask(token.url, token.server_key, (public, secret), body, timeout)
    except renewal.BadAddress as e:
        raise InputError(f"--join: the token is unusable: {e}") from None
    except renewal.RenewalError as e:
        raise OperationalError(str(e)) from None
    if kind != Kind.OK:
        raise OperationalError(f"enrollment refused by {token.url}: {answer.get('error')}")
    try:
        membership.check_member(
            answer.get("member"),
            mesh=token.mesh,
            mesh_pk=bytes.fromhex(token.mesh_pk),
            now=time.time(),
            curve_key=public.decode(),
            node=node_id,
        )
    except membership.MembershipError as e:
        raise OperationalError(f"enrollment answer does not hold: {e}") from None
    sec.save_enrollment(where, token, answer)
