"""The discovery side of the node's loop: mDNS sightings become dialers (or refusals).

A mixin of node/loop.py's Node, split out to keep modules small; it works on the Node's
own state (the annotations below name what it uses). mDNS only says where a node may
be: whether it is a member, and alive, is the link's business.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import zmq

from node import discovery
from node.loop_security import POLLIN, events_of
from node.mesh import PROTO
from node.security import REVOKED_SELF

if TYPE_CHECKING:
    from node.config import NodeConfig
    from node.dialers import Dialers
    from node.router import Router
    from node.security import Security

log = logging.getLogger("meshctl.node")


class DiscoverySide:
    """Advertising, browsing, and what `meshctl peers` shows of nodes not linked."""

    # The Node's state this side works on (set in Node.__init__).
    config: NodeConfig
    ctx: zmq.Context[zmq.Socket[bytes]]
    identity: Any  # node.loop.Identity
    endpoints: list[str]
    router: Router
    security: Security | None
    dialers: Dialers
    discovery: discovery.Discovery | None
    discovered: dict[str, dict[str, Any]]
    _pins: dict[str, str]
    # This host's addresses and networks, read when discovery starts (pick_address).
    _local_nets: tuple[set[str], list[Any]] = ({"127.0.0.1"}, [])

    def start_discovery(self) -> None:
        """Advertise and browse with mDNS on the configured (or default-route) interfaces."""
        if not self.config.discovery:
            return
        addresses = discovery.choose_addresses(self.config.interfaces, self.config.listen)
        if not addresses:
            log.warning("mDNS discovery off: no IPv4 interface to use (set mesh.interfaces)")
            return
        port = int(self.endpoints[0].rsplit(":", 1)[1])
        self.discovery = discovery.Discovery(
            self.ctx,
            node_id=self.identity.node_id,
            name=self.identity.name,
            mesh=self.config.mesh,
            proto=PROTO,
            port=port,
            addresses=addresses,
            pk="" if self.security is None else self.security.creds.public_text,
        )
        self.discovery.start()
        self._local_nets = discovery.local_networks()
        self.dialers.changed = True  # re-poll with the discovery pipe

    def _read_discovery(self, now: float) -> None:
        if self.discovery is None:
            return
        pipe = self.discovery.pipe
        while events_of(pipe)(zmq.EVENTS) & POLLIN:
            msg = json.loads(pipe.recv())
            service = msg["service"]
            if msg["event"] == "removed":
                gone = self.discovered.pop(service, None)
                d = self.dialers.by_url.get(gone["url"]) if gone else None
                if d is not None and d.found == "mdns" and d.state != "up":
                    self.dialers.remove(d.url)
                continue
            same_port = msg["port"] == self.discovery.info.port
            address = discovery.pick_address(msg["addresses"], same_port, *self._local_nets)
            if address is None:  # every address it gives is this host's: ourselves, or a
                continue  # copy of this host's setup that cannot be told apart from it
            url = f"tcp://{address}:{msg['port']}"
            msg["url"] = url
            old = self.discovered.get(service)
            self.discovered[service] = msg
            peer = msg["id"]
            if msg["mesh"] != self.config.mesh or msg["proto"] != str(PROTO):
                if old is None:
                    log.info(
                        "mDNS: found %s (%s) of mesh %r, protocol %s: not linking",
                        msg["name"],
                        peer,
                        msg["mesh"],
                        msg["proto"],
                    )
                continue
            why = self._discovery_refusal(msg)
            if why:
                if old is None or old.get("pk") != msg.get("pk"):
                    log.info(
                        "mDNS: found %s (%s) at %s: not linking: %s", msg["name"], peer, url, why
                    )
                    if self.security is not None and msg.get("pk"):
                        self.security.reject(peer, msg["name"], url, msg.get("pk", ""), why)
                continue
            if old is not None and old["url"] != url and self.security is not None:
                # Never let an advertisement tear down a proven link: anyone can say
                # "node X is now here"; a new address is dialed, the old link stays.
                d = self.dialers.by_url.get(old["url"])
                if d is None or d.state != "up":
                    self.dialers.remove(old["url"])
            elif old is not None and old["url"] != url:
                if old["url"].split("//")[1].rsplit(":", 1)[0] in msg["addresses"] and old[
                    "url"
                ].rsplit(":", 1)[1] == str(msg["port"]):
                    msg["url"] = url = old["url"]  # same peer, addresses listed in another order
                else:
                    self.router.net.drop_via(old["url"], "peer moved", now)
                    self.dialers.remove(old["url"])
            known = self.dialers.by_url.get(url)
            if known is not None and known.found == "mdns" and known.state != "up":
                # Another node at that address now (restarted with a new data dir): its
                # old id made the dialer miss the new node's inbound link and dial again,
                # and the links were torn down and rebuilt (lab test). Not a static link's:
                # an advertisement naming a linked id there would stop it for good (review).
                known.peer_id = peer
            if url not in self.dialers.by_url:
                log.info("mDNS: found %s (%s) at %s", msg["name"], peer, url)
                # Both sides dial at once: a newcomer is advertised only after ~1.5 s of
                # probing, so waiting for the other side would slow joining; if both
                # links come up, the one dialed by the lower id survives (mesh.py).
                d = self.dialers.add(url, "mdns", now, msg.get("pk", ""))
                if d.found == "mdns":  # not a static link's, which dials that place already
                    d.peer_id = peer

    def _discovery_refusal(self, msg: dict[str, Any]) -> str:
        """Why a node of our mesh name found by mDNS is not dialed ("" if it is)."""
        pk = msg.get("pk", "")
        if self.security is None:
            return "secured node (this node runs --insecure)" if pk else ""
        if not pk:
            return "open node (runs --insecure)"
        if self.security.is_revoked(msg["id"]):
            return "membership revoked"
        pinned = self._pins.get(msg["id"])
        if pinned is not None and pinned != pk:
            return "key differs from the key proven for this node id (impersonation?)"
        return ""

    def _discovered_urls(self) -> set[str]:
        return {m["url"] for m in self.discovered.values()}

    def _known_name(self, peer_id: str | None) -> str | None:
        """A peer's name from its last state or its mDNS record: `peers` showed "?" for
        a link that was down, just when the operator wants to know which node it is."""
        if peer_id is None:
            return None
        state = self.router.net.table.states.get(peer_id)
        if state is not None:
            return state.name
        return next((m["name"] for m in self.discovered.values() if m["id"] == peer_id), None)

    def _dialer_view(self, now: float) -> list[dict[str, Any]]:
        """Outbound links that are not up, and nodes seen but not linked, for `meshctl peers`."""
        out = []
        linked = set(self.router.net.links)
        rejected = {} if self.security is None else dict(self.security.rejected)
        for msg in self.discovered.values():
            if msg["id"] in linked:
                continue
            if msg["mesh"] == self.config.mesh and (why := self._discovery_refusal(msg)):
                if msg["url"] not in rejected:
                    rejected[msg["url"]] = {
                        "id": msg["id"],
                        "name": msg["name"],
                        "address": msg["url"],
                        "found": "mdns",
                        "state": "rejected",
                        "error": why,
                        "rtt_ms": None,
                    }
                continue
            if msg["mesh"] != self.config.mesh or msg["proto"] != str(PROTO):
                why = (
                    f"other mesh {msg['mesh']!r}"
                    if msg["mesh"] != self.config.mesh
                    else f"protocol {msg['proto']}"
                )
                out.append(
                    {
                        "id": msg["id"],
                        "name": msg["name"],
                        "address": msg["url"],
                        "found": "mdns",
                        "state": "not linked",
                        "error": why,
                        "rtt_ms": None,
                    }
                )
        for d in self.dialers.by_url.values():
            if d.state == "up" or d.peer_id in linked or d.url in rejected:
                continue
            stopped = d.state == "stopped" or d.last_error == REVOKED_SELF  # never dials again
            out.append(
                {
                    "id": d.peer_id,
                    "name": self._known_name(d.peer_id),
                    "address": d.url,
                    "found": d.found,
                    "state": "stopped" if stopped else d.state,
                    "error": d.last_error,
                    "rtt_ms": None,
                    "retry_in_s": None if stopped else round(max(0.0, d.next_try - now), 3),
                }
            )
        out.extend(rejected.values())  # by address: an impersonator shares a linked id
        return out
