"""Operator views of the mesh: peers, mesh, routes."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.tree import Tree

from meshctl.cli.options import JsonOpt, Seconds, ServerOpt, TimeoutOpt
from meshctl.cli.output import dumps, escaped, out_console
from meshctl.client import connect
from node.topics import validate_topic


def _fetch(server: str | None, timeout: float, view: str, **args: Any) -> dict[str, Any]:
    with connect(server, name=f"meshctl {view}", timeout=timeout, operator=True) as client:
        return client.view(view, **args)


def peers(
    server: ServerOpt = None, timeout: TimeoutOpt = Seconds(2), json_out: JsonOpt = False
) -> None:
    """The links of this node: peer, address, how it was found, state, round trip, age.
    A round trip shown as ">N s" is a heartbeat still unanswered (a congested link)."""
    rows = _fetch(server, timeout, "peers")["peers"]
    if json_out:
        for row in rows:
            print(dumps(row))
        return
    rows = escaped(rows)
    t = Table("peer", "id", "address", "found", "state", "rtt", "age / retry", box=None)
    for r in rows:
        rtt = "" if r.get("rtt_ms") is None else f"{r['rtt_ms']:.2f} ms"
        waiting = r.get("waiting_ms") or 0.0
        if waiting > max(r.get("rtt_ms") or 0.0, 1000.0):  # answers stuck behind data
            rtt = f"[yellow]>{waiting / 1000:.1f} s[/]"
        state = r["state"] if r["state"] == "up" else f"[yellow]{r['state']}[/]"
        if r.get("error"):
            state += f" [dim]({r['error']})[/]"
        if r.get("dropped"):
            state += f" [red](full: {r['dropped']} events dropped)[/]"
        if "age_s" in r:
            age = f"{r['age_s']:.0f}s"
        elif r.get("retry_in_s") is not None:
            age = f"retry in {r['retry_in_s']:.1f}s"
        else:
            age = ""  # rejected, or a revoked node that no longer dials
        t.add_row(
            r.get("name") or "?", r.get("id") or "?", r["address"], r["found"], state, rtt, age
        )
    out_console().print(t if rows else "no peers")


def mesh(
    server: ServerOpt = None, timeout: TimeoutOpt = Seconds(2), json_out: JsonOpt = False
) -> None:
    """Every node this node knows of and the links between them, as a tree."""
    view = _fetch(server, timeout, "mesh")
    if json_out:
        print(dumps(view))
        return
    view = escaped(view)
    nodes = {n["id"]: n for n in view["nodes"]}
    me = next(n for n in view["nodes"] if n["self"])
    tree = Tree(f"[bold]{me['name']}[/] [dim]{me['id']} (this node)[/]")
    seen = {me["id"]}
    frontier = [(me, tree)]
    while frontier:
        nxt = []
        for node, branch in frontier:
            for peer_id in node["links"]:
                peer = nodes.get(peer_id)
                if peer is None or peer_id in seen or not peer["reachable"]:
                    continue
                seen.add(peer_id)
                child = branch.add(
                    f"{peer['name']} [dim]{peer_id} · {peer['interest']} "
                    f"patterns · {', '.join(peer['endpoints'])}[/]"
                )
                nxt.append((peer, child))
        frontier = nxt
    out = out_console()
    out.print(tree)
    lost = [n for n in view["nodes"] if not n["reachable"]]
    for n in lost:
        out.print(f"[red]unreachable[/] {n['name']} [dim]{n['id']}[/]")
    if view.get("converging_s"):
        out.print(
            f"[yellow]converging[/]: the mesh changed lately; duplicate checks stay on for "
            f"{view['converging_s']:g} s more"
        )


def routes(
    topic: Annotated[str, typer.Argument(help="Topic to explain, e.g. plant1/line3/temp.")],
    server: ServerOpt = None,
    timeout: TimeoutOpt = Seconds(2),
    json_out: JsonOpt = False,
) -> None:
    """Explain routing for a topic: matching subscriptions, groups, and each copy's path."""
    validate_topic(topic)
    view = _fetch(server, timeout, "routes", topic=topic)
    if json_out:
        print(dumps(view))
        return
    view = escaped(view)
    out = out_console()
    out.print(f"[bold]{escape(topic)}[/]")
    queues = view.get("local_queues", [])
    nobody = not view["local"] and not any(not r.get("queues") for r in view["remote"])
    if nobody:
        stored = " but persistent ones are stored," if queues or view["remote"] else ""
        out.print(
            f"  no subscriber anywhere in the mesh: events are dropped,{stored} "
            "requests get 'no responders'"
        )
    for s in view["local"]:
        kind = f"group {s['group']}" if s["group"] else "plain"
        if s.get("requests") is False:
            kind += ", events only: cannot answer requests"
        who = f"{s['name']} ({s['client']})" if s.get("name") else s["client"]
        out.print(f"  this node: client {who} ({kind}) {', '.join(s['patterns'])}")
    for q in queues:
        out.print(f"  this node: queue {q} (persistent events)")
    for r in view["remote"]:
        kind = f"group {r['group']}" if r["group"] else "plain"
        if r.get("queues"):
            kind = "queues: persistent events"
        elif r.get("requests") is False:
            kind = "plain, events only: cannot answer requests"
        path = " → ".join(r["path"]) if r["reachable"] else "[red]unreachable[/]"
        out.print(f"  {r['name']} ({kind}): {path}")
    for c in view["copies"]:
        only = set(c.get("queues_only", ()))
        nodes = [f"{n} (persistent events only)" if n in only else n for n in c["nodes"]]
        out.print(f"  one copy via {c['next_hop']} for {', '.join(nodes)}")
    # Members here take every event (a node before "here" listed the mesh's nearest
    # for such a group, or nothing); the names escaped as the view's values are (review).
    here = {escape(k): n for k, n in view.get("local_groups", {}).items()}
    for name, n in here.items():
        among = f", round-robin among its {n} subscriptions here" if n > 1 else ""
        out.print(f"  group {name}: every event to a member on this node{among}")
    for g in view["groups"]:
        if g["group"] not in here:
            out.print(f"  group {g['group']}: one of {', '.join(g['nearest'])} (nearest)")
    if view.get("answers") is False and not nobody:
        out.print("  nothing that can answer a request: requests get 'no responders'")
