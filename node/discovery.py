"""mDNS discovery: advertise this node as ``_meshctl._tcp.local.`` and report others.

An actor: a thread that owns python-zeroconf and talks to the loop only through an inproc
PAIR socket, one JSON message per resolved or removed service. Discovery is a hint about
*where* a node is; whether it is alive, and whether it may link, is the link's business.

The TXT record carries the mesh name, node id, protocol version, node name and room for a
public key (``pk``: the node's CurveZMQ key, empty for an open node). ``pk`` is a hint for
dialing only: a node proves membership in the link handshake, never by advertising.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import queue
import socket
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Final

import ifaddr
import zmq
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

from node.resolving import Resolutions

log = logging.getLogger("meshctl.node")

SERVICE_TYPE: Final = "_meshctl._tcp.local."
RESOLVE_TIMEOUT_MS: Final = 2000
RESOLVERS: Final = 8  # resolutions at once: services that do not answer must not queue the rest


def default_route_interface(route_table: Path = Path("/proc/net/route")) -> str | None:
    """Name of the interface of the IPv4 default route, if there is one."""
    try:
        lines = route_table.read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 2 and fields[1] == "00000000":
            return fields[0]
    return None


def choose_addresses(wanted: tuple[str, ...], listen: str = "0.0.0.0") -> list[str]:  # noqa: S104
    """IPv4 addresses to advertise and listen for mDNS on.

    ``wanted`` names interfaces or addresses. Empty means: the listen address when the node
    listens on one address only (advertising any other would point peers at a closed door;
    ``--listen 127.0.0.1`` keeps mDNS on loopback); else the default route's interface
    (multi-homed hosts and docker bridges would otherwise advertise unreachable addresses),
    or every non-loopback interface when there is no default route (an isolated LAN).
    """
    if not wanted and listen not in ("0.0.0.0", "*", ""):  # noqa: S104
        return [listen]
    adapters = ifaddr.get_adapters()
    by_name = {a.nice_name: [ip.ip for ip in a.ips if ip.is_IPv4] for a in adapters}
    all_v4 = {ip for ips in by_name.values() for ip in ips}
    if wanted:
        out: list[str] = []
        for item in wanted:
            if item in by_name:
                out += [str(ip) for ip in by_name[item]]
            elif item in all_v4 or item.startswith("127."):
                out.append(item)
            else:
                log.warning("mDNS interface %r not found; known: %s", item, ", ".join(by_name))
        return out
    default = default_route_interface()
    if default and by_name.get(default):
        return [str(ip) for ip in by_name[default]]
    return sorted(str(ip) for ip in all_v4 if not str(ip).startswith("127."))


def local_networks() -> tuple[set[str], list[ipaddress.IPv4Network]]:
    """This host's IPv4 addresses, and the networks they are on."""
    own: set[str] = {"127.0.0.1"}
    nets: list[ipaddress.IPv4Network] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4:
                own.add(str(ip.ip))
                nets.append(ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False))
    return own, nets


def pick_address(
    addresses: list[str], same_port: bool, own: set[str], nets: list[ipaddress.IPv4Network]
) -> str | None:
    """Which of a peer's advertised addresses to dial: not one of this host's when the
    peer listens on this node's port (two gateways with the same address on a second
    card dialed themselves and never linked: lab test), one on a network this host is on
    if any, else the first; None if every address is this node's own."""
    theirs = [a for a in addresses if not (same_port and a in own)]
    for a in theirs:
        try:
            ip = ipaddress.IPv4Address(a)
        except ValueError:
            continue
        if any(ip in net for net in nets):
            return a
    return theirs[0] if theirs else None


def wildcard_to_address(endpoint: str, wanted: tuple[str, ...] = ()) -> str:
    """``endpoint`` with a wildcard host (0.0.0.0) replaced by an address other hosts can
    dial: the one mDNS would advertise. The host name went into join tokens and link
    addresses, and on a LAN it resolves to nothing or to the joiner itself (lab test)."""
    if "://0.0.0.0:" not in endpoint:
        return endpoint
    try:
        ours = choose_addresses(wanted)
    except OSError:
        ours = []
    return endpoint.replace("0.0.0.0", ours[0] if ours else socket.gethostname())  # noqa: S104


def instance_label(name: str) -> str:
    """The node's name as the start of its mDNS instance label, which DNS holds to 63
    bytes without control characters (with "-" and 8 hex digits of the id after it): a
    name of 55-63 characters, or a long host name as the default, ended `meshctl up` in
    zeroconf's BadTypeInNameException (exploratory test)."""
    clean = "".join(ch for ch in name if ch.isprintable()) or "node"
    return clean.encode()[:54].decode(errors="ignore")


class Discovery:
    """The zeroconf actor: ``start()`` it, poll ``pipe``, ``stop()`` joins the thread."""

    def __init__(
        self,
        ctx: zmq.Context[zmq.Socket[bytes]],
        *,
        node_id: str,
        name: str,
        mesh: str,
        proto: int,
        port: int,
        addresses: list[str],
        pk: str = "",
    ) -> None:
        self.node_id = node_id
        self.addresses = addresses
        self.info = ServiceInfo(
            SERVICE_TYPE,
            f"{instance_label(name)}-{node_id[:8]}.{SERVICE_TYPE}",
            port=port,
            properties={"mesh": mesh, "id": node_id, "proto": str(proto), "name": name, "pk": pk},
            server=f"meshctl-{node_id}.local.",
            parsed_addresses=addresses,
        )
        endpoint = f"inproc://discovery-{node_id}"
        self.pipe = ctx.socket(zmq.PAIR)
        self.pipe.bind(endpoint)
        self._actor_pipe = ctx.socket(zmq.PAIR)
        self._actor_pipe.connect(endpoint)
        # From zeroconf's thread: ("added" | "removed", name, None), and ("resolved", name,
        # the "found" message, {} for nothing to report, or None when the service did not
        # answer) as a resolution ends.
        self._inbox: queue.Queue[tuple[str, str, dict[str, Any] | None]] = queue.Queue()
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshctl-discovery", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Unregister (mDNS goodbye), close zeroconf and join the thread."""
        self._stop.set()
        self._thread.join(timeout=5)
        self.pipe.close(linger=0)  # the actor closes its own end, on its own thread

    def _send(self, msg: dict[str, Any]) -> None:
        self._actor_pipe.send(json.dumps(msg).encode())

    def _run(self) -> None:
        try:
            zc = Zeroconf(interfaces=self.addresses, ip_version=IPVersion.V4Only)
        except OSError as e:
            log.error("mDNS discovery off: cannot open zeroconf on %s: %s", self.addresses, e)
            self._actor_pipe.close(linger=0)
            return
        # Probing before the first announcement takes about a second: do it on a thread of
        # its own so that finding the others (and linking to them) starts at once.
        registrar = threading.Thread(
            target=self._register, args=(zc,), daemon=True, name="meshctl-mdns-register"
        )
        browser: ServiceBrowser | None = None
        requests: dict[str, Future[bool]] = {}  # resolutions running on zeroconf's loop
        try:
            browser = ServiceBrowser(zc, SERVICE_TYPE, handlers=[self._on_change])
            registrar.start()
            resolving = Resolutions(RESOLVERS)
            while not self._stop.is_set():
                try:
                    event, name, found = self._inbox.get(timeout=0.1)
                except queue.Empty:
                    event = ""
                now = time.monotonic()
                if event == "added":
                    resolving.added(name, now)
                elif event == "removed":
                    resolving.removed(name)
                    self._send({"event": "removed", "service": name})
                elif event == "resolved":
                    requests.pop(name, None)
                    report = resolving.finished(name, found is not None, now)
                    if report and found:  # found == {}: our own node, nothing to say
                        self._send(found)
                for due in resolving.start(now):
                    request = self._lookup(zc, due)
                    if request is not None:
                        requests[due] = request
            # Stopping must stay well under 2 s: a registration still probing is abandoned
            # (its thread dies with zeroconf); close() says goodbye for a finished one.
        except Exception:  # an actor must report, not die silently
            log.exception("mDNS discovery failed")
        finally:
            for request in requests.values():  # left pending, asyncio logs each as an error
                request.cancel()
            if browser is not None:
                browser.cancel()  # its thread is not a daemon: it would hold up exit
            zc.close()
            self._actor_pipe.close(linger=0)

    def _register(self, zc: Zeroconf) -> None:
        try:
            zc.register_service(self.info, allow_name_change=True)
        except Exception as e:  # reported, and browsing goes on
            if not self._stop.is_set():
                log.error("mDNS: cannot advertise %s: %s", self.info.name, e)
            return
        self._registered.set()
        log.info("mDNS: advertising %s on %s", self.info.name, ", ".join(self.addresses))

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # Runs on zeroconf's thread: only hand the name over; _run schedules its resolution.
        if name != self.info.name:
            removed = state_change is ServiceStateChange.Removed
            self._inbox.put(("removed" if removed else "added", name, None))

    def _lookup(self, zc: Zeroconf, name: str) -> Future[bool] | None:
        """Resolve ``name`` on zeroconf's own loop (the cache first, then the network, for
        up to RESOLVE_TIMEOUT_MS); the outcome comes back through ``_inbox``."""
        try:
            info = ServiceInfo(SERVICE_TYPE, name)
        except Exception as e:  # a malformed name from the LAN: a failed try, not our end
            log.warning("mDNS: cannot resolve %r: %s", name, e)
            self._inbox.put(("resolved", name, None))
            return None
        assert zc.loop is not None  # a started Zeroconf has its loop
        request = asyncio.run_coroutine_threadsafe(
            info.async_request(zc, RESOLVE_TIMEOUT_MS), zc.loop
        )

        def done(f: Future[bool]) -> None:  # on zeroconf's loop (on ours when cancelled)
            found = None
            try:
                if not f.cancelled() and f.exception() is None and f.result():
                    found = self._found(info)
            except Exception as e:  # a bad record: a failed try, and the slot is freed
                log.warning("mDNS: cannot read the records of %s: %s", name, e)
            self._inbox.put(("resolved", name, found))

        request.add_done_callback(done)
        return request

    def _found(self, info: ServiceInfo) -> dict[str, Any] | None:
        """The "found" message for a resolved service; {} for our own node; None if it
        answered without a port or an IPv4 address."""
        if info.port is None:
            return None
        props = {
            k.decode(errors="replace"): (v or b"").decode(errors="replace")
            for k, v in info.properties.items()
        }
        addresses = list(info.parsed_addresses(IPVersion.V4Only))
        if props.get("id") == self.node_id:
            return {}
        if not addresses:
            return None
        return {
            "event": "found",
            "service": info.name,
            "id": props.get("id", ""),
            "name": props.get("name", ""),
            "mesh": props.get("mesh", ""),
            "proto": props.get("proto", ""),
            "pk": props.get("pk", ""),
            "addresses": addresses,
            "port": info.port,
        }
