"""Fuzz the frame codec and the link handshake: a million generated inputs, no sockets.

Inputs are valid frames built by the node's own encoders (PUB, DELIVER, FWD with routing
headers, client and link control frames), mutated with knowledge of where the length
fields are, plus hostile JSON bodies for LINK, LINK_OK, STATES and BEAT, plus random bytes.
They go to the pure decoders, to a bridge's MeshPort and to a real sans-IO Router that holds
a client session, an inbound link and a dialed link. A failure is any exception but
CodecError from a decoder, anything raised by the Router or counted as its internal error,
or state that outgrows its bound. Run: ``python benchmarks/fuzz.py [--inputs N] [--seed S]``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge.port import MeshPort
from node.codec import (
    F_PERSISTENT,
    F_REQUEST,
    F_RETAIN,
    HEAD_DELIVER,
    HEAD_FWD,
    HEAD_PUB,
    RECORD_SIZE,
    RUN_BIT,
    RUN_HEAD,
    SID,
    Kind,
    decode_control,
    decode_headers,
    decode_targets,
    encode_control,
    encode_headers,
    encode_record,
    encode_targets,
    frame_kind,
    iter_deliveries,
    split_records,
)
from node.durable import Durable, DurableConfig
from node.errors import CodecError
from node.events import decode_deliveries, decode_event
from node.mesh import PROTO
from node.queues import MAX_QUEUES
from node.router import ROUTE_CACHE_SIZE, Router
from node.routing import NodeState
from node.store import open_store

NODE: Final = "0123456789abcdef"  # the fuzzed node
PEER: Final = "00000000000000aa"  # dialed us: an inbound link (lower id than NODE)
FAR: Final = "fedcba9876543210"  # we dialed it: an outbound link
MESH: Final = "fuzz"
PEER_IDENT: Final = b"peer-ident"
CLIENT: Final = b"client-1"
BRIDGE: Final = b"bridge-1"
DIALED_URL: Final = "tcp://10.0.0.2:4850"
SPARE_URL: Final = "tcp://10.0.0.3:4850"  # never linked: LINK_OK answers land here
TICK: Final = 0.01  # fake seconds per input: links time out and old nodes are forgotten
HOUSEKEEP_EVERY: Final = 64  # inputs between take_output/tick, as the loop drains a batch
CHECK_EVERY: Final = 10_000
HISTORY: Final = 10_000  # recent router inputs kept to rebuild the state a failure needed
MAX_FAILURES: Final = 20
MAX_KNOWN_NODES: Final = 5_000
MAX_PAYLOAD: Final = 4096

TOPICS: Final = [
    "a/b/c", "a/x/c", "sensors/t1", "_INBOX/0123456789abcdef/636c69656e742d31/1",
    "_INBOX/00000000000000aa/ff/1", "$mesh/x", "a//b", "a/*/c", "", "é/ü", "x" * 40,
]  # fmt: skip
PATTERNS: Final = ["a/*/c", "a/>", ">", "sensors/>", "$mesh/>", "*/t1", "x/y", "a/b/c"]
GROUPS: Final = [None, "g1", "g2", "workers"]
QUEUES: Final = ["q", "jobs", "q.dead", "bad name", "", "a" * 70]
NODE_IDS: Final = [NODE, PEER, FAR, "1111111111111111", "2222222222222222", "abcdefabcdef0123"]
_DEEP: Final = "@@deep@@"  # placeholder replaced by nested brackets after json.dumps
_SIZES: Final = {"I": 4, "H": 2, "B": 1}


EDGE_VALUES: Final[list[Any]] = [
    None, True, False, 0, -1, 1, 2**31, 2**32, 2**63, -(2**63), 2**64, 10**400,
    1e308, float("inf"), float("-inf"), float("nan"), -0.0, 0.5,
    "", "x", "\x00", "\u00e9" * 40, "a" * 70, "\U0001f642" * 20, ">", "*",
    "a/>", "$mesh/>", "_INBOX/>", "a//b", "0123456789ABCDEF", "0123456789abcde",
    [], {}, [[]], [None, None], ["a", "b", "c"], {"id": NODE}, *NODE_IDS,
]  # fmt: skip
SURROGATES: Final = ["\ud800", "a\udfffb", "g\udc80", "\ud83d"]  # valid JSON, not UTF-8


def edge_value(rng: random.Random) -> Any:
    """A JSON value a careless decoder trips on: wrong type, limit, odd unicode, depth."""
    r = rng.random()
    if r < 0.08:  # nested a little below the depth at which json.loads gives up
        limit = sys.getrecursionlimit()
        return _DEEP + str(rng.choice([10, 100, limit - rng.randint(0, 16)]))
    if r < 0.2:
        return rng.choice(SURROGATES)
    if r < 0.25:
        return [rng.choice(PATTERNS), rng.choice(SURROGATES)]
    return rng.choice(EDGE_VALUES)


def _render(body: Any, rng: random.Random) -> bytes:
    """JSON text of ``body``, deep-nesting placeholders expanded, in one of two encodings."""
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=rng.random() < 0.8)
    while _DEEP in text:
        i = text.index('"' + _DEEP)
        j = text.index('"', i + 1)
        depth = int(text[i + 1 + len(_DEEP) : j])
        text = text[:i] + "[" * depth + "]" * depth + text[j + 1 :]
    return text.encode("utf-8", "surrogatepass")  # lone surrogates: bytes that are not UTF-8


class Gen:
    """Structure-aware inputs from one seeded ``random.Random``."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seq = 0
        # Seeds: valid data frames with the (offset, struct code) of each length field.
        self.data: list[tuple[bytes, list[tuple[int, str]]]] = [
            self._data_frame() for _ in range(400)
        ]

    # ---- valid values -------------------------------------------------------------------

    def state(self, node_id: str | None = None) -> dict[str, Any]:
        rng = self.rng
        # Mostly the same few nodes; sometimes one never seen before (the table must not
        # keep every id a peer ever announced).
        node_id = node_id or (
            rng.choice(NODE_IDS) if rng.random() < 0.8 else rng.randbytes(8).hex()
        )
        links = rng.sample(NODE_IDS, rng.randint(0, 3))
        interest = [(rng.choice(PATTERNS), rng.choice(GROUPS)) for _ in range(rng.randint(0, 3))]
        return NodeState(
            node_id,
            f"n-{node_id[:4]}",
            rng.choice([1, 2, rng.getrandbits(40)]),
            rng.randint(0, 50),
            frozenset(links),
            frozenset(interest),
            (f"tcp://10.0.0.{rng.randint(1, 9)}:4850",),
        ).to_json()

    def body(self, kind: Kind) -> dict[str, Any]:
        """A valid body of a control frame of ``kind``."""
        rng = self.rng
        ref = rng.randint(0, 9)
        bodies: dict[Kind, Callable[[], dict[str, Any]]] = {
            Kind.HELLO: lambda: {"name": "fuzz", "version": "1"},
            Kind.SUB: lambda: {
                "ref": ref,
                "sid": rng.randint(1, 40),
                "patterns": rng.sample(PATTERNS, rng.randint(1, 3)),
                "group": rng.choice(GROUPS),
                **self.sub_options(),
            },
            Kind.ACK: lambda: {
                "sid": rng.randint(1, 40),
                "ids": [rng.randbytes(16).hex() for _ in range(rng.randint(0, 3))],
                **({"ref": ref} if rng.random() < 0.5 else {}),
            },
            Kind.QUEUE: lambda: {
                "ref": ref,
                "op": rng.choice(["add", "add", "rm", "purge", "ls", "info", "drop"]),
                "name": rng.choice(QUEUES),
                "patterns": rng.sample(PATTERNS, rng.randint(0, 2)),
                "ack_wait": rng.choice([None, 0.05, 1, "2s", "soon"]),
                "max_deliver": rng.choice([None, 1, 3, 0]),
            },
            Kind.UNSUB: lambda: {"ref": ref, "sid": rng.randint(1, 40)},
            Kind.STATUS: lambda: {
                "ref": ref,
                "view": rng.choice(["status", "peers", "mesh", "routes"]),
                "topic": rng.choice(TOPICS),
            },
            Kind.PING: lambda: {"ref": ref},
            Kind.LINK: lambda: {"mesh": MESH, "proto": PROTO, "node": self.state()},
            Kind.LINK_OK: lambda: {"node": self.state()},
            Kind.STATES: lambda: {"states": [self.state() for _ in range(rng.randint(1, 4))]},
            Kind.BEAT: lambda: {"t": rng.random() * 100},
            Kind.BEAT_ACK: lambda: {"t": rng.random() * 100},
            Kind.ERR: lambda: {"ref": ref, "error": "nope", "code": "input"},
            Kind.LINK_REFUSE: lambda: {"reason": "nope"},
        }
        make = bodies.get(kind)
        return make() if make else {}

    def sub_options(self) -> dict[str, Any]:
        """The durable side of SUB: a queue, a replay, retained values, or nothing."""
        rng = self.rng
        return rng.choice(
            [
                {},
                {},
                {"queue": rng.choice(QUEUES), "max_inflight": rng.choice([None, 1, 5, 0])},
                {"since_s": rng.choice([0, 1, 3600, -1])},
                {"from_seq": rng.choice([1, 5, 10**9, 0])},
                {"retained": True},
            ]
        )

    def record(self) -> tuple[bytes, list[tuple[int, str]]]:
        """A record and the offsets (within it) of its length fields."""
        rng = self.rng
        self.seq += 1
        topic = rng.choice(TOPICS).encode()
        headers = b""
        if rng.random() < 0.3:
            headers = encode_headers({"reply-to": "_INBOX/x/y/1", "k": "v" * rng.randint(0, 9)})
        payload = rng.randbytes(rng.choice([0, 1, 10, 100, MAX_PAYLOAD + 1]))
        flags = rng.choice([0, 0, F_REQUEST, 0xFF, F_PERSISTENT, F_RETAIN, F_PERSISTENT | F_RETAIN])
        origin = rng.choice([b"origin-a", b"origin-b", rng.randbytes(8)])
        rec = encode_record(topic, payload, headers, flags, 1, origin + self.seq.to_bytes(8, "big"))
        return rec, [(0, "I"), (4, "H"), (6, "H")]

    def _data_frame(self) -> tuple[bytes, list[tuple[int, str]]]:
        """A valid PUB, DELIVER or FWD frame and the offsets of its length fields."""
        rng = self.rng
        kind = rng.choice([Kind.PUB, Kind.DELIVER, Kind.FWD])
        if kind == Kind.FWD:
            targets = [
                (
                    bytes.fromhex(rng.choice(NODE_IDS)),
                    tuple(rng.sample(GROUPS[1:], rng.randint(0, 2))),
                )
                for _ in range(rng.randint(1, 3))
            ]
            head = HEAD_FWD + encode_targets(rng.randint(0, 17), targets)
            fields = [(2, "H"), (4, "B"), (5, "B")]
        else:
            head, fields = (HEAD_PUB if kind == Kind.PUB else HEAD_DELIVER), []
        out = bytearray(head)
        run = kind == Kind.DELIVER and rng.random() < 0.5  # the records as one run
        if run:
            at = len(out)
            fields += [(at, "I"), (at + 4, "I"), (at + 8, "I")]
            out += bytes(RUN_HEAD.size)
        records = rng.randint(1, 4)
        for _ in range(records):
            if kind == Kind.DELIVER and not run:
                fields.append((len(out), "I"))
                out += SID.pack(rng.randint(0, 3))
            rec, rec_fields = self.record()
            fields += [(len(out) + off, code) for off, code in rec_fields]
            out += rec
        if run:
            size = len(out) - at - RUN_HEAD.size
            out[at : at + RUN_HEAD.size] = RUN_HEAD.pack(RUN_BIT | rng.randint(0, 3), records, size)
        return bytes(out), fields

    # ---- mutations ----------------------------------------------------------------------

    def mutate(self, frame: bytes, fields: list[tuple[int, str]]) -> bytes:
        """One to four mutations: bit flips, boundary lengths, truncation, splices."""
        rng = self.rng
        buf = bytearray(frame)
        for _ in range(rng.choice([0, 1, 1, 1, 2, 2, 3, 4])):
            op = rng.randrange(9)
            n = len(buf)
            if op == 0 and n:
                buf[rng.randrange(n)] ^= 1 << rng.randrange(8)
            elif op == 1 and n:
                buf[rng.randrange(n)] = rng.choice([0, 1, 0x1F, 0x20, 0x7F, 0x80, 0xFF])
            elif op == 2 and fields:  # a length field set to a boundary value
                off, code = rng.choice(fields)
                size = _SIZES[code]
                value = rng.choice([0, 1, n, n - off, n - off + 1, (1 << 8 * size) - 1])
                value = min(max(value, 0), (1 << 8 * size) - 1)
                buf[off : off + size] = value.to_bytes(size, "little")
            elif op == 3:
                del buf[rng.randint(0, n) :]
            elif op == 4:
                i = rng.randint(0, n)
                buf[i:i] = rng.randbytes(rng.randint(1, 8))
            elif op == 5 and n:
                i = rng.randrange(n)
                del buf[i : i + rng.randint(1, 16)]
            elif op == 6:  # splice with another seed
                other = rng.choice(self.data)[0]
                buf = buf[: rng.randint(0, n)] + other[rng.randint(0, len(other)) :]
            elif op == 7 and n:  # repeat a range (extra records, repeated headers)
                i = rng.randrange(n)
                j = min(n, i + rng.randint(1, 64))
                buf[j:j] = buf[i:j] * rng.randint(1, 4)
            elif op == 8 and n >= 2:  # another kind, or another version
                buf[rng.choice([0, 1])] = rng.choice([*Kind, 0, 2, 0x30, 0xFF])
        return bytes(buf)

    def hostile(self, value: Any, depth: int = 0) -> Any:
        """``value`` with a few of its parts swapped for edge values, deleted or retyped."""
        rng = self.rng
        if depth > 4 or rng.random() < 0.15:
            return edge_value(rng)
        if isinstance(value, dict):
            out = {
                k: (self.hostile(v, depth + 1) if rng.random() < 0.4 else v)
                for k, v in value.items()
            }
            if out and rng.random() < 0.2:
                del out[rng.choice(list(out))]
            if rng.random() < 0.1:
                out[rng.choice(["extra", "", "\ud800", "id"])] = edge_value(rng)
            return out
        if isinstance(value, list):
            out_list = [self.hostile(v, depth + 1) if rng.random() < 0.4 else v for v in value]
            if depth < 2 and rng.random() < 0.1:  # long lists, bounded: 64 KiB is the limit
                out_list *= rng.choice([0, 2, 300])
            return out_list
        return value if rng.random() < 0.5 else edge_value(rng)

    # ---- inputs -------------------------------------------------------------------------

    def data_frame(self) -> bytes:
        frame, fields = self.rng.choice(self.data)
        return self.mutate(frame, fields)

    def control_frame(self, kinds: list[Kind]) -> bytes:
        """A control frame of one of ``kinds``: valid, hostile JSON, or mutated bytes."""
        rng = self.rng
        kind = rng.choice(kinds)
        body = self.body(kind)
        if rng.random() < 0.6:
            body = self.hostile(body)
        frame = bytes((1, kind)) + _render(body, rng)
        return self.mutate(frame, []) if rng.random() < 0.2 else frame

    def random_frame(self) -> bytes:
        rng = self.rng
        raw = rng.randbytes(rng.choice([0, 1, 2, 3, 8, RECORD_SIZE, 64, 300]))
        if rng.random() < 0.5 and len(raw) >= 2:
            raw = bytes((1, rng.choice(list(Kind)))) + raw[2:]
        return raw

    def any_frame(self, kinds: list[Kind]) -> bytes:
        r = self.rng.random()
        if r < 0.45:
            return self.data_frame()
        if r < 0.9:
            return self.control_frame(kinds)
        return self.random_frame()


# ---- targets ------------------------------------------------------------------------------


CLIENT_KINDS: Final = [
    Kind.HELLO, Kind.SUB, Kind.UNSUB, Kind.STATUS, Kind.PING, Kind.BYE, Kind.ACK, Kind.QUEUE,
]  # fmt: skip
LINK_KINDS: Final = [Kind.STATES, Kind.BEAT, Kind.BEAT_ACK, Kind.LINK, Kind.ERR]
HANDSHAKE_KINDS: Final = [Kind.LINK, Kind.LINK_OK, Kind.STATES, Kind.BEAT, Kind.BEAT_ACK]


def decode_all(frame: bytes, topics: dict[bytes, str], port: MeshPort) -> bool:
    """Every pure decoder on one frame (CodecError is the expected answer to garbage);
    True if the frame decoded as something."""
    ok = False
    for decode in (
        lambda: frame_kind(frame),
        lambda: decode_control(frame),
        lambda: decode_headers(frame[2:]),
        lambda: [decode_event(frame, s, e) for s, e in split_records(frame)],
        lambda: [decode_event(frame, s, e) for _, s, e in iter_deliveries(frame)],
        lambda: decode_event(frame, 2, len(frame)),
        lambda: decode_targets(frame[4 : 4 + int.from_bytes(frame[2:4], "little")]),
        lambda: decode_targets(frame[2:]),
        lambda: decode_deliveries(frame, topics),
    ):
        try:
            decode()
            ok = True
        except CodecError:
            pass
    port.handle(frame)  # swallows CodecError itself; anything else is a bug
    return ok


PEER_STATE: Final = NodeState(
    PEER, "peer", 1, 0, frozenset({NODE, FAR}), frozenset({(">", None), ("a/>", "g2")})
).to_json()
FAR_STATE: Final = NodeState(
    FAR, "far", 1, 0, frozenset({NODE, PEER}), frozenset({("sensors/>", None)})
).to_json()


class Harness:
    """A Router with a client, a bridge, an inbound and an outbound link, driven as the loop
    drives it: frames in, ``take_output`` drained, ``tick`` on a fake clock."""

    def __init__(self) -> None:
        self.now = 0.0
        self.logs: list[str] = []
        self.store_dir = Path(tempfile.mkdtemp(prefix="meshctl-fuzz-"))
        self.durable = Durable(open_store(self.store_dir), DurableConfig(), lambda: 1)
        self.router = Router(
            node_id=NODE,
            name="fuzz",
            mesh=MESH,
            max_payload=MAX_PAYLOAD,
            max_clients=16,
            max_subscriptions=64,
            wall_ns=lambda: 1,
            log=self._log,
            epoch=1,
            durable=self.durable,
        )
        self.router.internal.add(BRIDGE)
        self.topics: dict[bytes, str] = {}
        self.port = MeshPort("fuzz")
        self.decoded = 0  # decoder inputs that some decoder accepted
        self.restore()

    def close(self) -> None:
        """Close the store and remove its directory."""
        self.durable.close()
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def _log(self, msg: str) -> None:
        if msg.startswith("internal error"):
            self.logs.append(msg)

    def restore(self) -> None:
        """Bring back the sessions and links that hostile frames took down."""
        r = self.router
        for ident, patterns, group in ((CLIENT, [">", "$mesh/>"], None), (BRIDGE, ["a/>"], "g1")):
            if ident not in r.clients:
                r.handle(ident, encode_control(Kind.HELLO, {"name": "fuzz"}), self.now)
                body = {"ref": 0, "sid": 1, "patterns": patterns, "group": group}
                r.handle(ident, encode_control(Kind.SUB, body), self.now)
        if PEER_IDENT not in r.net.by_via:
            body = {"mesh": MESH, "proto": PROTO, "node": PEER_STATE}
            r.handle(PEER_IDENT, encode_control(Kind.LINK, body), self.now)
        if DIALED_URL not in r.net.by_via:
            ok = encode_control(Kind.LINK_OK, {"node": FAR_STATE})
            r.handle_dialed(DIALED_URL, "static", ok, self.now)

    def housekeep(self) -> None:
        """What the loop does around a batch: heartbeat, send (here: drop) output, close."""
        r = self.router
        r.net.tick(self.now, 1.0)
        r.tick(self.now)
        r.end_pass(self.now)
        self.restore()
        for _ in r.take_output():
            pass
        r.net.closed.clear()

    def bounds(self) -> list[str]:
        """State that must not grow with the number of inputs."""
        r = self.router
        net = r.net
        limits = {
            "route cache": (len(r._cache), ROUTE_CACHE_SIZE),
            "forward cache": (len(r._fwd_cache), 4097),
            "queue-group turns": (len(r._turns), 100_001),
            "clients": (len(r.clients), r.max_clients),
            "links": (len(net.links), 64),
            "known nodes": (len(net.table.states), MAX_KNOWN_NODES),
            "mesh route cache": (len(net.table._routes), 65_537),
            "refusals": (len(net.refusals), 64),
            "peer addresses": (len(net.peer_addresses), 1001),
            "dedup origins": (len(r._dedup), 65_536),
            "topic cache": (len(self.topics), 4096),
            "queue consumers": (len(self.durable.consumers), 16 * 40),
            "replays": (len(self.durable.replays), 16 * 40),
            "queues": (len(self.durable.queues.by_name), 2 * MAX_QUEUES),
            "retained bytes": (self.durable.retained_bytes, self.durable.config.retained_max_bytes),
        }
        out = [f"{name}: {n} > {limit}" for name, (n, limit) in limits.items() if n > limit]
        pending = {
            "control": len(r._control),
            "pending": len(r._pending),
            "link pending": len(r._link_pending),
            "mesh out": len(net.out),
        }
        out += [f"{k} holds {v} after take_output" for k, v in pending.items() if v]
        return out


@dataclass(frozen=True, slots=True)
class Input:
    """One generated input: which target, to whom (ROUTER identity or dialed URL), what."""

    target: str
    dest: bytes | str
    frame: bytes

    def __str__(self) -> str:
        return f"{self.target} {self.dest!r} {self.frame.hex()}"


def feed(h: Harness, inp: Input) -> str | None:
    """One input to its target; a description of the failure, or None."""
    r = h.router
    before = r.counters.internal_errors
    h.logs.clear()
    try:
        if inp.target == "decoders":
            h.decoded += decode_all(inp.frame, h.topics, h.port)
        elif isinstance(inp.dest, str):
            r.handle_dialed(inp.dest, "static", inp.frame, h.now)
        else:
            r.handle(inp.dest, inp.frame, h.now)
    except CodecError as e:
        if inp.target != "decoders":
            return f"Router raised {e!r}"
    except Exception as e:  # the point of the exercise: report, do not crash
        return f"raised {e!r}"
    if r.counters.internal_errors != before:
        return "; ".join(h.logs) or "internal error counted"
    return None


STRANGERS: Final[list[bytes | str]] = [b"stranger-%d" % i for i in range(4)]
TARGETS: Final[dict[str, tuple[Callable[[Gen], bytes], list[bytes | str]]]] = {
    "decoders": (lambda g: g.any_frame(CLIENT_KINDS + HANDSHAKE_KINDS + [Kind.NORESP]), [b""]),
    "router.stranger": (lambda g: g.any_frame(CLIENT_KINDS + LINK_KINDS), STRANGERS),
    "router.client": (lambda g: g.any_frame(CLIENT_KINDS), [CLIENT, BRIDGE]),
    "router.link": (lambda g: g.any_frame(LINK_KINDS), [PEER_IDENT]),
    "router.dialed": (
        lambda g: g.any_frame([*HANDSHAKE_KINDS, Kind.LINK_REFUSE, Kind.ERR]),
        [DIALED_URL, SPARE_URL],
    ),
    "handshake": (
        lambda g: g.control_frame(HANDSHAKE_KINDS),
        [PEER_IDENT, DIALED_URL, SPARE_URL, STRANGERS[0]],
    ),
}
WEIGHTS: Final = [3, 1, 3, 2, 1, 3]


def replay(inputs: list[Input]) -> bool:
    """True if ``inputs`` on a fresh harness make the last one fail."""
    h = Harness()
    try:
        for i, inp in enumerate(inputs):
            h.now += TICK
            if feed(h, inp) is not None:
                return i == len(inputs) - 1
            h.housekeep()
        return False
    finally:
        h.close()


def minimize(history: list[Input], failing: Input, budget: float) -> list[Input] | None:
    """The fewest recent inputs (then ``failing``) that reproduce a failure on a fresh
    router, by shortest suffix and then greedy chunk removal; None if even all do not."""
    if replay([failing]):
        return [failing]
    lo, hi = 1, len(history)  # the shortest failing suffix length lies in (lo - 1, hi]
    if not replay([*history, failing]):
        return None
    deadline = time.perf_counter() + budget
    while lo < hi and time.perf_counter() < deadline:
        mid = (lo + hi) // 2
        if replay([*history[-mid:], failing]):
            hi = mid
        else:
            lo = mid + 1
    kept = history[-hi:]
    chunk = max(1, len(kept) // 2)
    while chunk >= 1 and time.perf_counter() < deadline:
        i = 0
        while i < len(kept):
            trial = kept[:i] + kept[i + chunk :]
            if replay([*trial, failing]):
                kept = trial
            else:
                i += chunk
        chunk //= 2
    return [*kept, failing]


@dataclass
class Failure:
    what: str
    inp: Input | None = None
    history: list[Input] = field(default_factory=list)
    reproducer: list[Input] | None = None


@dataclass
class Stats:
    inputs: Counter[str] = field(default_factory=Counter)
    figures: Counter[str] = field(default_factory=Counter)
    failures: list[Failure] = field(default_factory=list)
    peak_rss_mb: float = 0.0  # sampled every CHECK_EVERY inputs
    start_rss_mb: float = 0.0
    process_peak_mb: float = 0.0  # the kernel's high-water mark, spikes included


def rss_mb() -> float:
    """Resident set size now, from /proc (Linux); 0 where it is not available."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0.0
    return pages * resource.getpagesize() / 2**20


def run(inputs: int, seed: int, max_seconds: float, max_rss_mb: float) -> tuple[Stats, float]:
    """Feed ``inputs`` generated inputs (or as many as ``max_seconds`` allow)."""
    rng = random.Random(seed)  # noqa: S311 - reproducible, not secret
    gen = Gen(rng)
    h = Harness()
    history: deque[Input] = deque(maxlen=HISTORY)
    stats = Stats(start_rss_mb=rss_mb())
    names = list(TARGETS)
    t0 = time.perf_counter()
    deadline = t0 + max_seconds
    for i in range(inputs):
        (target,) = rng.choices(names, WEIGHTS)
        make, dests = TARGETS[target]
        inp = Input(target, rng.choice(dests), make(gen))
        h.now += TICK
        stats.inputs[target] += 1
        what = feed(h, inp)
        if what is not None:
            stats.failures.append(Failure(what, inp, list(history)))
            if len(stats.failures) >= MAX_FAILURES:
                break
        elif target != "decoders":
            history.append(inp)
        if i % HOUSEKEEP_EVERY == 0:
            h.housekeep()
        if i % CHECK_EVERY == 0:
            h.housekeep()
            stats.peak_rss_mb = max(stats.peak_rss_mb, rss_mb())
            stats.failures += [Failure(problem) for problem in h.bounds()]
            if stats.peak_rss_mb > max_rss_mb:
                stats.failures.append(Failure(f"RSS {stats.peak_rss_mb:.0f} MB > {max_rss_mb}"))
            if len(stats.failures) >= MAX_FAILURES or time.perf_counter() > deadline:
                break
    elapsed = time.perf_counter() - t0
    h.housekeep()
    stats.failures += [Failure(problem) for problem in h.bounds()]
    stats.peak_rss_mb = max(stats.peak_rss_mb, rss_mb())
    stats.process_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB
    c = h.router.counters
    stats.figures.update(
        {
            "decoders accepted": h.decoded,
            "router bad_frames": c.bad_frames,
            "router events_in": c.events_in,
            "router forwarded_in": c.forwarded_in,
            "mesh links_refused": h.router.net.counters["links_refused"],
            "mesh bad_states": h.router.net.counters["bad_states"],
            "known nodes at end": len(h.router.net.table.states),
            "store commits": h.durable.store.commits,
            "store persisted": h.durable.persisted,
        }
    )
    h.close()
    return stats, elapsed


def report(stats: Stats, elapsed: float, wanted: int, seed: int) -> Iterator[str]:
    """The figures, then each distinct failure with its reproducer."""
    total = sum(stats.inputs.values())
    yield f"inputs      {total:,} of {wanted:,} in {elapsed:.1f} s ({total / elapsed:,.0f}/s)"
    yield (
        f"rss         start {stats.start_rss_mb:.1f} MB, sampled peak {stats.peak_rss_mb:.1f} MB,"
        f" process peak {stats.process_peak_mb:.1f} MB"
    )
    for name in TARGETS:
        yield f"  {name:<22} {stats.inputs[name]:>10,}"
    for name, n in sorted(stats.figures.items()):
        yield f"  {name:<22} {n:>10,}"
    yield f"failures    {len(stats.failures)} (seed {seed})"
    for f in stats.failures:
        yield f"  {f.what}"
        if f.reproducer:
            yield "    reproducer on a fresh router (target, destination, frame hex):"
            yield from (f"      {inp}" for inp in f.reproducer)
        elif f.reproducer is not None:
            yield f"    not reproduced on a fresh router from {len(f.history):,} inputs"
            yield f"    failing input: {f.inp}"
        elif f.inp is not None:
            yield f"    input: {str(f.inp)[:120]}..."
    if total < wanted:
        yield f"stopped at the time bound after {total:,} inputs"


def main(argv: list[str] | None = None) -> int:
    """Run the fuzz, print figures and failures; 1 if anything failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=900.0, help="stop by then")
    parser.add_argument("--max-rss-mb", type=float, default=512.0, help="fail above this")
    args = parser.parse_args(argv)
    stats, elapsed = run(args.inputs, args.seed, args.max_seconds, args.max_rss_mb)
    seen: set[str] = set()
    for f in stats.failures:
        kind = f.what.split("(", 1)[0]
        if f.inp is not None and kind not in seen:  # minimize one failure of each kind
            seen.add(kind)
            f.reproducer = minimize(f.history, f.inp, budget=60.0) or []
    for line in report(stats, max(elapsed, 1e-9), args.inputs, args.seed):
        print(line)
    return 1 if stats.failures else 0


if __name__ == "__main__":
    sys.exit(main())
