"""Operator views of a node, built from the Router's state: status, peers, mesh, routes.

Pure: JSON-ready dicts for ``meshctl status|peers|mesh|routes --json``; the CLI renders them.
"""

from __future__ import annotations

from itertools import islice
from typing import TYPE_CHECKING, Any, Final

from node.errors import TopicError
from node.topics import validate_topic

if TYPE_CHECKING:
    from node.router import Router

# Patterns listed by `status` (each client's count is always there). A node holding 60,000
# took 82 ms to list them all, into a 5.8 MB answer no one reads on a terminal;
# `meshctl routes TOPIC` explains any one topic.
STATUS_PATTERNS: Final = 1000


def view(router: Router, body: dict[str, Any], now: float) -> dict[str, Any]:
    """Answer a STATUS request: the node status, or the peers, mesh or routes view."""
    what = body.get("view", "status")
    if what == "peers":
        return {"peers": router.net.peers_view(now) + router.peers_extra(now)}
    if what == "mesh":
        return router.net.mesh_view(now)
    if what == "routes":
        topic = str(body.get("topic", ""))
        try:
            validate_topic(topic)
        except TopicError as e:
            return {"error": str(e)}
        local = router._route_for(topic)
        groups = {g.name: len(g.members) for g in local.groups}
        subs = [
            {
                "client": cl.client_id if (cl := router.clients.get(s.client)) else s.client.hex(),
                "name": cl.name if cl else "",
                "sid": s.sid,
                "group": s.group,
                "patterns": list(s.patterns),
                "requests": s.client not in router.mute,  # False: MQTT, takes events only
            }
            for s in router.trie.match(topic)
        ]
        durable = router.durable
        queues = [] if durable is None else sorted(q.name for q in durable.queues.trie.match(topic))
        view = router.net.explain(topic, subs)
        # A group with a member here takes every event here (round-robin among them):
        # the mesh's nearest nodes were shown as its target (exploratory test).
        view["groups"] = [
            {"group": g, "nearest": [router.net.name], "here": True} for g in sorted(groups)
        ] + [g | {"here": False} for g in view["groups"] if g["group"] not in groups]
        return view | {
            "local_groups": groups,
            "local_queues": queues,
            "answers": local.answers,  # False: a request gets "no responders" at once
        }
    if what != "status":  # answered with the status, a misspelt view looked like one
        return {"error": f"no view {str(what)[:40]!r}: status, peers, mesh or routes"}
    return status(router, now)


def status(router: Router, now: float) -> dict[str, Any]:
    """The node's state for ``meshctl status``; JSON-ready."""
    c = router.counters
    total = sum(len(s.patterns) for cl in router.clients.values() for s in cl.subs.values())
    return {
        "id": router.node_id,
        "name": router.name,
        "mesh": router.mesh_name,
        **router.status_extra(now),
        "clients": [
            {
                "id": cl.client_id,
                "name": cl.name,
                "connected_s": round(now - cl.connected_at, 3),
                "subscriptions": sum(len(s.patterns) for s in cl.subs.values()),
                "events_in": cl.events_in,
                "events_out": cl.events_out,
                "dropped": cl.drops.total,
                # the node's own actors (MQTT listener, bridges, uplink): no client's place
                "internal": cl.ident in router.internal,
            }
            for cl in router.clients.values()
        ],
        "subscriptions": list(
            islice(
                (
                    {"client": cl.client_id, "sid": s.sid, "pattern": p, "group": s.group}
                    for cl in router.clients.values()
                    for s in cl.subs.values()
                    for p in s.patterns
                ),
                STATUS_PATTERNS,
            )
        ),
        "subscriptions_total": total,
        "counters": {
            "events_in": c.events_in,
            "events_out": c.events_out,
            "no_interest": c.no_interest,
            "no_responders_withheld": c.no_responders_withheld,
            "clients_refused": c.clients_refused,
            "bad_frames": c.bad_frames,
            "bad_handshakes": c.bad_handshakes,
            "forwarded_in": c.forwarded_in,
            "forwarded_out": c.forwarded_out,
            "relayed_frames": c.relayed_frames,
            "internal_errors": c.internal_errors,
            "duplicates": c.duplicates,
            "dropped": dict(c.dropped),
            **router.net.counters,
        },
        "net": {
            "links": len(router.net.links),
            "nodes_known": len(router.net.table.states),
            "nodes_reachable": len(router.net.table.paths()),
            "version": router.net.version,
        },
        "store": router.durable.status() if router.durable is not None else None,
    }
