"""The benchmark behind ``meshctl bench``: real processes, a baseline measured in the same run.

Every figure is also given as a ratio to raw pyzmq PUSH->PULL between two processes (one
frame per message), because absolute numbers on shared machines are noisy. Each worker
runs in its own process (spawned, so no ZeroMQ state crosses a fork), is bounded in count
and time, and reports through a multiprocessing queue.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any, Final

import zmq

from meshctl.client import connect
from meshctl.errors import Timeout

IDLE_LIMIT = 3.0  # a receiver gives up after this long without a message


@dataclass(frozen=True, slots=True)
class Throughput:
    """One throughput measurement."""

    name: str
    size: int
    sent: int
    received: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds of each process

    @property
    def per_second(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0


# ---- workers (run in child processes) ---------------------------------------------------


def _raw_pull(transport: str, count: int, out: Queue[Any]) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PULL)
    s.setsockopt(zmq.RCVHWM, 100_000)
    s.setsockopt(zmq.RCVTIMEO, int(IDLE_LIMIT * 1000))
    endpoint = _endpoint(transport)
    s.bind(endpoint)
    out.put(("ready", s.getsockopt_string(zmq.LAST_ENDPOINT)))
    got = 0
    first = 0.0
    recv = s.recv
    try:
        while got < count:
            recv()
            if got == 0:
                first = time.perf_counter()
            got += 1
    except zmq.Again:
        pass
    out.put(("done", got, first, time.perf_counter()))
    s.close(linger=0)
    ctx.term()
    if endpoint.startswith("ipc://"):
        Path(endpoint[len("ipc://") :]).unlink(missing_ok=True)


def _raw_push(endpoint: str, count: int, size: int, out: Queue[Any]) -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.PUSH)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.connect(endpoint)
    payload = b"x" * size
    time.sleep(0.2)  # let the connection complete so the first messages are not queued
    start = time.perf_counter()
    send = s.send
    for _ in range(count):
        send(payload)
    out.put(("sent", start))
    s.close(linger=5000)
    ctx.term()


def _subscriber(server: str, pattern: str, count: int, out: Queue[Any]) -> None:
    with connect(server, name="bench sub") as client:
        sub = client.subscribe(pattern)
        out.put(("ready", 0))
        got = 0
        first = 0.0
        try:
            while got < count:
                sub.next(IDLE_LIMIT)
                if got == 0:
                    first = time.perf_counter()
                got += 1
        except Timeout:
            pass
        out.put(("done", got, first, time.perf_counter()))


def _publisher(
    server: str, topic: str, topics: int, count: int, size: int, out: Queue[Any]
) -> None:
    """Publish ``count`` events; with ``topics`` > 1 cycle over that many distinct topics
    (each first sighting is a route-cache miss at the node)."""
    with connect(server, name="bench pub") as client:
        payload = b"x" * size
        publish = client.publish
        names = [topic] if topics <= 1 else [f"{topic}/{i}" for i in range(topics)]
        n = len(names)
        start = time.perf_counter()
        with client.batch():
            for i in range(count):
                publish(names[i % n], payload)
        client.flush(30)
        out.put(("sent", start))


def _replier(server: str, topic: str, out: Queue[Any]) -> None:
    with connect(server, name="bench reply") as client:
        sub = client.subscribe(topic, group="bench")
        out.put(("ready", 0))
        try:
            while True:
                req = sub.next(IDLE_LIMIT * 3)
                client.reply(req, req.data)
        except Timeout:
            pass


def _persist_publisher(server: str, topic: str, count: int, size: int, out: Queue[Any]) -> None:
    """Publish ``count`` persistent events and wait until the node has stored them all."""
    with connect(server, name="bench persist", timeout=5) as client:
        payload = b"x" * size
        publish = client.publish
        start = time.perf_counter()
        with client.batch():
            for _ in range(count):
                publish(topic, payload, persistent=True)
        client.confirm(60)
        out.put(("sent", start))


def _queue_consumer(server: str, queue: str, count: int, out: Queue[Any]) -> None:
    """Consume a durable queue, acking every event; the end is when the acks are stored."""
    with connect(server, name="bench consume", timeout=5) as client:
        sub = client.consume(queue, max_inflight=4096)
        out.put(("ready", 0))
        got = 0
        first = 0.0
        try:
            while got < count:
                sub.ack(sub.next(IDLE_LIMIT))
                if got == 0:
                    first = time.perf_counter()
                got += 1
        except Timeout:
            pass
        client.confirm_acks(30)
        out.put(("done", got, first, time.perf_counter()))


# ---- orchestration ----------------------------------------------------------------------


def _expect(q: Queue[Any], tag: str, timeout: float = 60) -> tuple[Any, ...]:
    msg: tuple[Any, ...] = q.get(timeout=timeout)
    if msg[0] != tag:
        raise RuntimeError(f"benchmark worker sent {msg!r}, expected {tag!r}")
    return msg


def _pair(
    receiver: Any,
    rargs: tuple[Any, ...],
    sender: Any,
    sargs: tuple[Any, ...],
    name: str,
    size: int,
    count: int,
    *,
    pass_port: bool,
    when_ready: Callable[[], None] = lambda: None,
) -> Throughput:
    ctx = mp.get_context("spawn")
    rq: Queue[Any] = ctx.Queue()
    sq: Queue[Any] = ctx.Queue()
    r = ctx.Process(target=receiver, args=(*rargs, count, rq), daemon=True)
    r.start()
    try:
        _, port = _expect(rq, "ready")
        when_ready()
        s_args = (port, *sargs) if pass_port else sargs
        s = ctx.Process(target=sender, args=(*s_args, count, size, sq), daemon=True)
        s.start()
        (_, start) = _expect(sq, "sent")
        _, got, _first, end = _expect(rq, "done")
        cpu = {"sender": cpu_seconds(s.pid), "receiver": cpu_seconds(r.pid)}  # zombies count
        s.join(10)
    finally:
        r.join(10)
        for p in (r,):
            if p.is_alive():
                p.kill()
    return Throughput(name, size, count, got, end - start, cpu)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process so far (Linux /proc; 0.0 where unavailable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


NODE_PIDS: dict[str, int] = {}  # name -> pid of the nodes bench_mesh runs now


def _endpoint(transport: str) -> str:
    if transport == "tcp":
        return "tcp://127.0.0.1:*"
    return f"ipc://{tempfile.gettempdir()}/meshctl-bench-{os.getpid()}.sock"


def raw_baseline(transport: str, size: int, count: int) -> Throughput:
    """Raw pyzmq PUSH->PULL, one frame per message, two processes, same transport as the node."""
    return _pair(
        _raw_pull, (transport,), _raw_push, (), "raw push->pull", size, count, pass_port=True
    )


def pubsub(
    server: str,
    size: int,
    count: int,
    *,
    sub_server: str | None = None,
    topics: int = 1,
    when_ready: Callable[[], None] = lambda: None,
) -> Throughput:
    """One publisher process -> node(s) -> one subscriber process."""
    return _pair(
        _subscriber,
        (sub_server or server, "bench/>"),
        _publisher,
        (server, "bench/data", topics),
        "pub->node->sub",
        size,
        count,
        pass_port=False,
        when_ready=when_ready,
    )


def wait_interest(
    server: str, topic: str, nodes: int, timeout: float = 15, *, at_most: bool = False
) -> None:
    """Until the node at ``server`` routes ``topic`` to ``nodes`` other nodes (or more;
    with ``at_most``, or fewer)."""
    deadline = time.monotonic() + timeout
    with connect(server, timeout=5) as client:
        while True:
            view = client.view("routes", topic=topic)
            seen = sum(1 for r in view["remote"] if r["reachable"])
            if (seen <= nodes) if at_most else (seen >= nodes):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{server} never saw interest in {topic} on {nodes} nodes")
            time.sleep(0.02)


def wait_settled(servers: list[str], timeout: float = 30) -> None:
    """Until every node at ``servers`` holds the mesh stable: throughput is measured as a
    mesh runs, not in the 10 s after links come up, when each forwarded event is also
    checked against the duplicate window (node/mesh.py, CONVERGENCE_WINDOW)."""
    deadline = time.monotonic() + timeout
    for server in servers:
        with connect(server, timeout=5) as client:
            while (left := client.view("mesh").get("converging_s", 0)) > 0:
                if time.monotonic() + left > deadline:
                    raise RuntimeError(f"{server} did not settle within {timeout:g}s")
                time.sleep(min(left, 1.0) + 0.01)


@contextmanager
def bench_mesh(
    links: dict[str, list[str]],
    transport: str = "ipc",
    *,
    config: str = "",
    port: int = 0,
    secure: bool = False,
) -> Iterator[dict[str, str]]:
    """Start throwaway nodes (no discovery, loopback only) linked as ``links`` says, in
    order (a node links to nodes started before it); yields name -> URL of ``transport``.
    ``config`` is TOML every node reads; ``port`` fixes the TCP port (one node only).

    Open mode (--insecure) unless ``secure``: then the first node creates a mesh and the
    others join it with tokens, and links carry the peer's CurveZMQ key."""
    tmp = Path(tempfile.mkdtemp(prefix="meshctl-bench-"))
    procs: list[subprocess.Popen[bytes]] = []
    ipc: dict[str, str] = {}
    tcp: dict[str, str] = {}
    keys: dict[str, str] = {}
    first = next(iter(links))
    try:
        for name, peers in links.items():
            data = tmp / name
            data.mkdir()
            argv = [
                sys.executable,
                "-m",
                "meshctl",
                "up",
                "--port",
                str(port),
                "--listen",
                "127.0.0.1",
                "--data-dir",
                str(data),
                "--name",
                name,
                "--no-discovery",
            ]
            if not secure:
                argv.append("--insecure")
            elif name != first:
                argv += ["--join", _invite(tmp / first, tcp[first])]
            for peer in peers:
                if not secure:
                    argv += ["--link", tcp[peer]]
                elif peer != first:  # the join already links to the first node
                    argv += ["--link", f"{tcp[peer]}#{keys[peer]}"]
            if config:
                (data / "node.toml").write_text(config)
                argv += ["--config", str(data / "node.toml")]
            log = (data / "node.log").open("wb")
            procs.append(
                subprocess.Popen(  # noqa: S603 - our own interpreter and module
                    argv,
                    stdout=log,
                    stderr=log,
                    env={**os.environ, "MESHCTL_CONFIG": os.devnull},
                )
            )
            log.close()
            NODE_PIDS[name] = procs[-1].pid
            ipc[name] = f"ipc://{data / 'node.sock'}"
            tcp[name] = _wait_tcp(ipc[name], procs[-1], data)
            if secure:
                with connect(ipc[name], timeout=5) as c:
                    keys[name] = c.status()["security"]["public_key"]
        yield tcp if transport == "tcp" else ipc
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def _invite(data: Path, url: str) -> str:
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "meshctl", "invite", "--data-dir", str(data), "--url", url],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


def _wait_tcp(ipc: str, proc: subprocess.Popen[bytes], data: Path) -> str:
    deadline = time.monotonic() + 15
    while True:
        try:
            with connect(ipc, timeout=0.5) as c:
                return next(e for e in c.status()["endpoints"] if e.startswith("tcp://"))
        except Exception:
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError(f"bench node did not start; see {data / 'node.log'}") from None
            time.sleep(0.1)


def hold_subscriptions(servers: list[str], per_node: int) -> list[Any]:
    """Clients holding ``per_node`` patterns each (none matching bench topics)."""
    clients = []
    for i, server in enumerate(servers):
        c = connect(server, name="bench load", timeout=5)
        c.subscribe(*[f"load/n{i}/s{j}/*/x" for j in range(per_node)])
        clients.append(c)
    return clients


def request_latency(server: str, count: int, replier: str | None = None) -> list[float]:
    """Round trips in seconds for ``count`` sequential requests to an echo replier (on
    ``replier``'s node if given: across the mesh)."""
    ctx = mp.get_context("spawn")
    q: Queue[Any] = ctx.Queue()
    p = ctx.Process(target=_replier, args=(replier or server, "bench/echo", q), daemon=True)
    p.start()
    try:
        _expect(q, "ready")
        if replier:
            wait_interest(server, "bench/echo", 1)
        rtts: list[float] = []
        with connect(server, name="bench req") as client:
            payload = b"x" * 64
            for _ in range(min(100, count)):  # warm up caches and connections
                client.request("bench/echo", payload)
            for _ in range(count):
                t0 = time.perf_counter()
                client.request("bench/echo", payload)
                rtts.append(time.perf_counter() - t0)
        return rtts
    finally:
        p.kill()
        p.join(5)


@contextmanager
def bench_node(server: str | None, transport: str) -> Iterator[str]:
    """Use ``server``, or start a throwaway node (loopback tcp and ipc) for the run."""
    if server:
        yield server
        return
    with bench_mesh({"bench": []}, transport) as urls:
        yield urls["bench"]


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty list."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(pct / 100 * len(ordered) + 0.5) - 1))
    return ordered[k]


def summarize_latency(rtts: list[float]) -> dict[str, float]:
    """p50, p99 and mean in microseconds."""
    return {
        "p50_us": percentile(rtts, 50) * 1e6,
        "p99_us": percentile(rtts, 99) * 1e6,
        "mean_us": statistics.fmean(rtts) * 1e6,
    }


@dataclass(frozen=True, slots=True)
class MeshFigures:
    """The mesh benchmark: two hops vs one node, and routing cost under many subscriptions.
    Each figure is the median of ``rounds`` interleaved runs; the per-round lists show the
    spread (a 2-core machine running five processes is noisy)."""

    one_node: Throughput
    two_hops: Throughput
    few_subs: Throughput
    many_subs: Throughput
    subscriptions: int
    cpu_one: dict[str, float]  # CPU µs per event of each process, one node
    cpu_two: dict[str, float]  # the same through A -> B -> C
    rounds: list[dict[str, Throughput]]  # every run, round by round


MESH_ROUNDS: Final = 5  # three gave single figures 0.73-1.10 apart on a 2-core machine


def _median(runs: list[Throughput]) -> Throughput:
    return sorted(runs, key=lambda t: t.per_second)[len(runs) // 2]


def mesh_suite(
    size: int, count: int, *, topics: int = 20_000, rounds: int = MESH_ROUNDS
) -> MeshFigures:
    """Measure, in one run, ``rounds`` times each, interleaved:

    - pub on A, sub on C, through B (line A-B-C) vs pub and sub on one node;
    - a star of 10 nodes, pub on the hub, sub on a leaf, every event on a topic the hub
      has not seen for ``topics`` events (route-cache misses), with 10 subscriptions in
      the mesh vs 10,000 (1,000 per node) that the trie must sift through.
    """
    runs: list[dict[str, Throughput]] = [{} for _ in range(rounds)]
    per = 1e6 / count / rounds
    cpu_one = dict.fromkeys(("pub", "node", "sub"), 0.0)
    cpu_two = dict.fromkeys(("pub", "node A", "node B", "node C", "sub"), 0.0)
    with bench_mesh({"A": [], "B": ["A"], "C": ["B"]}) as ipc:
        wait_settled(list(ipc.values()))
        for r in runs:
            before = {n: cpu_seconds(NODE_PIDS[n]) for n in "ABC"}
            one = r["one_node"] = pubsub(ipc["A"], size, count)
            middle = {n: cpu_seconds(NODE_PIDS[n]) for n in "ABC"}
            two = r["two_hops"] = pubsub(
                ipc["A"],
                size,
                count,
                sub_server=ipc["C"],
                when_ready=lambda: wait_interest(ipc["A"], "bench/data", 1),
            )
            after = {n: cpu_seconds(NODE_PIDS[n]) for n in "ABC"}
            cpu_one["pub"] += one.cpu["sender"] * per
            cpu_one["node"] += (middle["A"] - before["A"]) * per
            cpu_one["sub"] += one.cpu["receiver"] * per
            cpu_two["pub"] += two.cpu["sender"] * per
            for n in "ABC":
                cpu_two[f"node {n}"] += (after[n] - middle[n]) * per
            cpu_two["sub"] += two.cpu["receiver"] * per
    star: dict[str, list[str]] = {"n0": []} | {f"n{i}": ["n0"] for i in range(1, 10)}
    with bench_mesh(star) as ipc:
        servers = [ipc[f"n{i}"] for i in range(10)]
        ready = lambda: wait_interest(ipc["n0"], "bench/data/0", 1)  # noqa: E731
        for r in runs:
            few_clients = hold_subscriptions(servers, 1)
            r["10_subs"] = pubsub(
                ipc["n0"], size, count, sub_server=ipc["n1"], topics=topics, when_ready=ready
            )
            for c in few_clients:
                c.close()
            many_clients = hold_subscriptions(servers, 1000)
            wait_interest(ipc["n0"], "load/n9/s999/a/x", 1)  # every node's load is known
            r["10k_subs"] = pubsub(
                ipc["n0"], size, count, sub_server=ipc["n1"], topics=topics, when_ready=ready
            )
            for c in many_clients:
                c.close()
            wait_interest(ipc["n0"], "load/n9/s999/a/x", 0, at_most=True)  # all withdrawn
    one, two, few, many = (
        _median([r[k] for r in runs]) for k in ("one_node", "two_hops", "10_subs", "10k_subs")
    )
    return MeshFigures(
        one,
        two,
        few,
        many,
        10_000,
        cpu_one,
        cpu_two,
        runs,
    )


@dataclass(frozen=True, slots=True)
class DurableFigures:
    """Persistent delivery through a durable queue vs direct delivery, and uplink drain."""

    direct: Throughput
    persistent: Throughput
    drain: Throughput


def durable_suite(size: int, count: int) -> DurableFigures:
    """Measure, in one run: direct pub->sub through a node; persistent pub (acknowledged
    after commit) -> durable queue -> consumer acking each event; and the rate at which an
    edge node's uplink drains ``count`` spooled events into a cloud node that comes back."""
    with bench_mesh({"n": []}) as ipc:
        direct = pubsub(ipc["n"], size, count)
        with connect(ipc["n"], timeout=5) as admin:
            admin.queue("add", "bench", patterns=["bench/persist"])
        persistent = _pair(
            _queue_consumer,
            (ipc["n"], "bench"),
            _persist_publisher,
            (ipc["n"], "bench/persist"),
            "persistent pub->queue->consumer",
            size,
            count,
            pass_port=False,
        )
    return DurableFigures(direct, persistent, uplink_drain(size, count))


def uplink_drain(size: int, count: int) -> Throughput:
    """Spool ``count`` events on an edge node whose cloud is down, start the cloud, and
    time the drain until the edge's spool is empty."""
    with socket_port() as port:
        config = f'[uplink]\nurl = "tcp://127.0.0.1:{port}"\nexport = ["bench/>"]\n'
        with bench_mesh({"edge": []}, config=config) as edge:
            payload = b"x" * size
            with connect(edge["edge"], timeout=5) as client:
                with client.batch():
                    for _ in range(count):
                        client.publish("bench/spool", payload)
                client.flush(30)
                _wait_spool(client, lambda s: s["entries"] >= count)
                with bench_mesh({"cloud": []}, port=port):
                    start = time.perf_counter()
                    _wait_spool(client, lambda s: s["entries"] == 0, timeout=120)
                    end = time.perf_counter()
                    sent = next(b for b in client.status()["bridges"] if b["kind"] == "uplink")
    return Throughput("uplink drain", size, count, int(sent["sent"]), end - start)


def _wait_spool(client: Any, done: Callable[[dict[str, Any]], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        up = next(b for b in client.status()["bridges"] if b["kind"] == "uplink")
        if done(up["spool"]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"uplink spool stuck at {up['spool']}")
        time.sleep(0.05)


@contextmanager
def socket_port() -> Iterator[int]:
    """A free TCP port on 127.0.0.1 (for a node that must come up at a known address)."""
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port


@dataclass(frozen=True, slots=True)
class CurveFigures:
    """One link between two nodes, open and CurveZMQ, measured in the same run."""

    open_link: Throughput
    curve_link: Throughput
    open_rtts: list[float]
    curve_rtts: list[float]


def curve_suite(size: int, count: int, requests: int) -> CurveFigures:
    """Pub on A, sub on B across one link, and request-reply across it: open mode vs
    secured (CURVE-encrypted link, membership checked), started and measured alike."""
    figures: dict[bool, tuple[Throughput, list[float]]] = {}
    for secure in (False, True):
        with bench_mesh({"A": [], "B": ["A"]}, secure=secure) as ipc:
            thr = pubsub(
                ipc["A"],
                size,
                count,
                sub_server=ipc["B"],
                when_ready=partial(wait_interest, ipc["A"], "bench/data", 1),
            )
            rtts = request_latency(ipc["A"], requests, replier=ipc["B"])
        figures[secure] = (thr, rtts)
    return CurveFigures(figures[False][0], figures[True][0], figures[False][1], figures[True][1])
