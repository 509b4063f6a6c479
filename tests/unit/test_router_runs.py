"""Forwarding a client's frame: records bound for the same links go on as one run.

The node slices a run of consecutive records out of the publisher's frame instead of one
slice per record, and delivers one to a subscriber that reads runs (codec.py) as one
slice too. These tests hold the result to the simple model: every link gets exactly the
records meant for it, byte for byte, in publish order, and local subscribers too,
whatever the mix of topics, refusals and frame sizes, and whether they read runs.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from node.codec import (
    F_REPLICA,
    F_REQUEST,
    HEAD_PUB,
    RECORD,
    RECORD_SIZE,
    RUN_BIT,
    RUN_HEAD,
    SID,
    Kind,
    decode_targets,
    encode_control,
    encode_headers,
    encode_record,
    frame_kind,
    iter_deliveries,
    split_records,
)
from node.dedup import MAX_ORIGINS, WINDOW
from node.events import Event, decode_event
from node.framing import MAX_FRAME_BYTES, MAX_RUN_BYTES
from node.router import Router
from node.router_mesh import _stream
from tests.unit.test_dedup import Reference
from tests.unit.test_router import NODE_ID as NODE
from tests.unit.test_router import (
    controls,
    deliveries,
    hello,
    make_router,
    record,
    sub_ok,
    subscribe,
)

P, Q = "00000000000000aa", "00000000000000bb"  # two neighbours, each with its interest
CLIENT, SUB = b"client-pub", b"client-sub"
TOPICS = ("far/1", "far/2", "q/1", "both/1", "near/1", "none/1", "bad//topic")


def linked_router(runs: bool = False) -> Router:
    """A node linked to P and Q, with a publisher and a subscriber (reading ``runs``)."""
    r = make_router(max_payload=100_000, max_clients=4, max_subscriptions=8)
    for peer, interest in ((P, [["far/>", None], ["both/>", None]]), (Q, [["q/>", None]])):
        state = {"id": peer, "name": peer, "epoch": 1, "version": 1, "links": [NODE]}
        state |= {"interest": interest, "endpoints": []}
        body = {"mesh": "m", "proto": 1, "node": state}
        r.handle(peer.encode(), encode_control(Kind.LINK, body), 0.0)
    list(r.take_output())
    hello(r, CLIENT)
    hello(r, SUB, runs=runs)
    sub_ok(r, SUB, 1, "near/>", "both/>")
    return r


def wants(topic: str) -> tuple[set[str], bool]:
    """(peers that should get an event on ``topic``, whether the local subscriber should)."""
    peers = {P} if topic.startswith(("far/", "both/")) else {Q} if topic.startswith("q/") else set()
    return peers, topic.startswith(("near/", "both/"))


def forwarded(out: list[tuple[bytes, bytes, int]]) -> dict[str, list[bytes]]:
    """Records each peer was sent, in order, and each frame's targets checked."""
    got: dict[str, list[bytes]] = {P: [], Q: []}
    for via, frame, _ in out:
        if not isinstance(via, bytes) or frame_kind(frame) != Kind.FWD:
            continue
        h1 = 4 + int.from_bytes(frame[2:4], "little")
        _hops, targets = decode_targets(frame[4:h1])
        assert [t.hex() for t, _ in targets] == [via.decode()]
        got[via.decode()] += [frame[h1 + s : h1 + e] for s, e in split_records(frame[h1:], 0)]
    return got


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(TOPICS), st.sampled_from((1, 300, 9_000, 40_000))),
        min_size=1,
        max_size=40,
    ),
    st.booleans(),
)
def test_each_link_and_subscriber_gets_its_records_in_order(
    events: list[tuple[str, int]], runs: bool
) -> None:
    r = linked_router(runs)
    records = [
        encode_record(t.encode(), bytes([i % 256]) * size, b"", 0, 7, bytes(8) + i.to_bytes(8))
        for i, (t, size) in enumerate(events)
    ]
    r.handle(CLIENT, HEAD_PUB + b"".join(records), 0.0)
    out = list(r.take_output())
    got = forwarded(out)
    pairs = list(zip(records, (t for t, _ in events), strict=True))
    for peer in (P, Q):
        assert got[peer] == [rec for rec, t in pairs if peer in wants(t)[0]]
    local = [ev.id for _, ev in deliveries(out, SUB)]
    assert local == [rec[20:36].hex() for rec, t in pairs if wants(t)[1]]
    for _, frame, _ in out:  # past the bound by one record or run (review: runs made 2x)
        assert len(frame) <= MAX_FRAME_BYTES + max(MAX_RUN_BYTES, *(s + 99 for _, s in events))
    assert r.counters.forwarded_out == sum(len(wants(t)[0]) for t, _ in events if "//" not in t)


GOOD_HEADERS = (b"", encode_headers({"k": "v"}), encode_headers({"k": "w"}))
BAD_HEADERS = b"\x01k\x01\x00\xff"  # as long as {"k": "v"}, yet not UTF-8: refused


KINDS = st.tuples(  # (topic, flags, headers) of a stream
    st.sampled_from(TOPICS), st.sampled_from((0, F_REQUEST)), st.sampled_from(GOOD_HEADERS)
)


@settings(deadline=None)
@given(
    st.lists(KINDS, min_size=1, max_size=3),
    st.lists(  # runs of records of one of those kinds, each run of one size
        st.tuples(
            st.integers(0, 2),
            st.sampled_from((1, 300, 200_000)),  # 200,000: over the payload limit, refused
            st.booleans(),  # headers that do not decode, instead of the kind's: refused
            st.integers(1, 4),
        ),
        min_size=1,
        max_size=12,
    ),
    st.booleans(),
)
def test_repeated_records_go_exactly_where_each_alone_would(
    kinds: list[tuple[str, int, bytes]], runs: list[tuple[int, int, bool, int]], reads: bool
) -> None:
    """A stream's records (the same topic, flags and headers as the one before) skip the
    node's per-record checks and lookups. Each must still go where it would alone: to
    the links and subscribers that want it, refused with the same answers, requests that
    nothing answers answered "no responders" one by one."""
    r = linked_router(reads)
    records: list[tuple[bytes, str, bool]] = []
    expect_error, expect_noresp = 0, []
    for k, size, garbled, times in runs:
        topic, flags, headers = kinds[k % len(kinds)]
        for _ in range(times):
            i = len(records)
            eid = bytes(8) + i.to_bytes(8)
            block = BAD_HEADERS if garbled else headers
            rec = encode_record(topic.encode(), bytes([i % 256]) * size, block, flags, 7, eid)
            records.append((rec, topic, garbled or size > 100_000))
            if "//" in topic or records[-1][2]:
                expect_error += 1
            elif flags and wants(topic) == (set(), False):
                expect_noresp.append(eid.hex())
    r.handle(CLIENT, HEAD_PUB + b"".join(rec for rec, _, _ in records), 0.0)
    out = list(r.take_output())
    good = [(rec, t) for rec, t, bad in records if not bad and "//" not in t]
    got = forwarded(out)
    for peer in (P, Q):
        assert got[peer] == [rec for rec, t in good if peer in wants(t)[0]]
    local = [ev.id for _, ev in deliveries(out, SUB)]
    assert local == [rec[20:36].hex() for rec, t in good if wants(t)[1]]
    answers = controls(out, CLIENT)
    assert sum(1 for kind, _ in answers if kind is Kind.ERR) == expect_error
    assert [b["id"] for kind, b in answers if kind is Kind.NORESP] == expect_noresp
    assert r.counters.no_interest == sum(1 for _, t in good if wants(t) == (set(), False))


def test_a_long_stream_to_one_link_goes_as_few_frames() -> None:
    r = linked_router()
    records = [encode_record(b"far/1", b"x" * 256, b"", 0, 7, bytes(16)) for _ in range(2_000)]
    r.handle(CLIENT, HEAD_PUB + b"".join(records), 0.0)
    out = [f for via, f, _ in r.take_output() if via == P.encode()]
    assert sum(len(f) for f in out) > 2_000 * 256
    assert len(out) <= 2_000 * 300 // MAX_FRAME_BYTES + 1


def test_a_request_nobody_wants_still_gets_no_responders() -> None:
    r = linked_router()
    rec = encode_record(b"none/1", b"?", b"", F_REQUEST, 7, bytes(8) + (5).to_bytes(8))
    far = encode_record(b"far/1", b"x", b"", 0, 7, bytes(16))
    r.handle(CLIENT, HEAD_PUB + far + rec + far, 0.0)
    out = list(r.take_output())
    noresp = [f for i, f, _ in out if i == CLIENT and frame_kind(f) == Kind.NORESP]
    assert len(noresp) == 1
    assert (bytes(8) + (5).to_bytes(8)).hex().encode() in noresp[0]
    assert forwarded(out)[P] == [far, far]


# ---- the duplicate window over forwarded frames, while the mesh converges -----------------


@settings(deadline=None)
@given(
    st.lists(  # frames, each a list of (origin, step): mostly in order, as on a link
        st.lists(
            st.tuples(
                st.sampled_from((b"origin-1", b"origin-2")),
                st.sampled_from((1, 1, 1, 0, -3, 2, 9000)),
            ),
            max_size=30,
        ),
        max_size=6,
    ),
    st.booleans(),
)
def test_forwarded_records_are_delivered_once_each_while_converging(
    frames: list[list[tuple[bytes, int]]], runs: bool
) -> None:
    """The in-order shortcut of ``_deliver_forwarded`` delivers exactly what asking the
    window about every record would: each (origin, seq) once, repeats and stale ones not."""

    r = linked_router(runs)
    ref = Reference(WINDOW, MAX_ORIGINS)
    at = {b"origin-1": 10_000, b"origin-2": 10_000}
    for frame in frames:
        body, expect = b"", []
        for origin, step in frame:
            at[origin] = max(0, at[origin] + step)
            eid = origin + at[origin].to_bytes(8, "big")
            body += encode_record(b"near/x", eid, b"", 0, 7, eid)
            if not ref.seen(origin, at[origin]):
                expect.append(eid)
        r._deliver_forwarded(body, (), True)
        got = [ev.data for _, ev in deliveries(list(r.take_output()), SUB)]
        assert got == expect


# ---- runs to subscribers here (HELLO "runs": true, node/codec.py) ---------------------------

FWD_TOPICS = ("near/1", "near/2", "both/1", "none/1", "bad//topic")


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(FWD_TOPICS),
            st.sampled_from((0, F_REQUEST, F_REPLICA)),
            st.sampled_from((1, 300, 30_000)),
            st.integers(1, 5),
        ),
        max_size=12,
    ),
    st.booleans(),
)
def test_forwarded_records_reach_subscribers_here_in_order(
    streams: list[tuple[str, int, int, int]], runs: bool
) -> None:
    """Records from another node, gathered into runs by topic: each one this node's
    subscriber wants arrives once, byte for byte, in order, and frames stay bounded."""
    r = linked_router(runs)
    body, want = b"", []
    for topic, flags, size, times in streams:
        for _ in range(times):
            eid = bytes(8) + len(body).to_bytes(8)
            rec = encode_record(topic.encode(), bytes([len(body) % 256]) * size, b"", flags, 7, eid)
            body += rec
            if wants(topic)[1] and not flags & F_REPLICA:
                want.append(rec)
    r._deliver_forwarded(body, (), False)
    out = list(r.take_output())
    got = [(ev.topic, ev.data, ev.raw_id, ev.flags) for _, ev in deliveries(out, SUB)]
    assert got == [(e.topic, e.data, e.raw_id, e.flags) for e in map(as_event, want)]
    for _, frame, _ in out:
        assert len(frame) <= MAX_FRAME_BYTES + max(MAX_RUN_BYTES, 30_099)


def test_an_answer_to_a_bad_record_comes_after_the_events_before_it() -> None:
    """Review: a publisher that subscribes to its own topics got the ERR for a record in
    the middle of its frame before the events that came before it (held in a run)."""
    r = linked_router(True)
    hello(r, CLIENT, runs=True)
    sub_ok(r, CLIENT, 1, "near/>")
    good = [record("near/a") for _ in range(5)]
    frame = HEAD_PUB + b"".join(good) + record("near//bad") + record("near/a")
    r.handle(CLIENT, frame, 0.0)
    kinds = []
    for ident, f, _ in r.take_output():
        if ident == CLIENT:
            kind = frame_kind(f)
            count = len(list(iter_deliveries(f))) if kind is Kind.DELIVER else 0
            kinds.append((kind, count))
    assert kinds == [(Kind.DELIVER, 5), (Kind.ERR, 0), (Kind.DELIVER, 1)]


def as_event(rec: bytes) -> Event:
    return decode_event(rec, 0, len(rec))


def run_heads_in(out: list[tuple[bytes, bytes, int]], ident: bytes) -> int:
    """Run heads in the DELIVER frames to ``ident``, read the way a client before runs
    would: it took every prefix for a sid."""
    heads = 0
    for i, frame, _ in out:
        if i != ident or frame_kind(frame) != Kind.DELIVER:
            continue
        off = 2
        while off < len(frame):
            (sid,) = SID.unpack_from(frame, off)
            if sid & RUN_BIT:
                heads += 1
                off += RUN_HEAD.size + RUN_HEAD.unpack_from(frame, off)[2]
            else:
                plen, tlen, hlen = RECORD.unpack_from(frame, off + 4)[:3]
                off += 4 + RECORD_SIZE + tlen + hlen + plen
    return heads


def test_a_stream_goes_to_a_subscriber_that_reads_runs_as_runs() -> None:
    for runs in (True, False):
        r = linked_router(runs)
        stream = b"".join(record("near/1", b"x" * 256) for _ in range(1_000))
        r.handle(CLIENT, HEAD_PUB + stream, 0.0)
        r._deliver_forwarded(stream, (), False)
        out = list(r.take_output())
        assert len(deliveries(out, SUB)) == 2_000
        heads = run_heads_in(out, SUB)
        # One head per MAX_RUN_BYTES each way when it reads runs; none when not.
        assert (0 < heads <= 2 * (1_000 * 300 // MAX_RUN_BYTES + 1)) if runs else heads == 0


def test_runs_go_only_where_each_copy_of_an_event_stays_with_the_others() -> None:
    """A subscriber that does not read runs, two subscriptions of one client, or a queue
    group on the topic: records go one by one, each event's copies together (the MQTT
    listener sends one message per event of a client's overlapping subscriptions)."""
    r = linked_router(True)
    old = b"client-old"
    hello(r, old)
    sub_ok(r, old, 1, "near/1")
    sub_ok(r, SUB, 2, "near/>")  # a second subscription of SUB's on near/1
    sub_ok(r, CLIENT, 1, "near/2", group="g")
    stream = [record("near/1") for _ in range(5)] + [record("near/2") for _ in range(5)]
    r.handle(CLIENT, HEAD_PUB + b"".join(stream), 0.0)
    out = list(r.take_output())
    assert run_heads_in(out, SUB) == run_heads_in(out, old) == 0
    ids = [as_event(rec).id for rec in stream]
    got = [(sid, ev.id) for sid, ev in deliveries(out, SUB)]
    assert [i for _, i in got] == [i for i in ids for _ in (1, 2)]  # copies together
    assert all({got[k][0], got[k + 1][0]} == {1, 2} for k in range(0, len(got), 2))
    assert [ev.id for _, ev in deliveries(out, old)] == ids[:5]
    assert [ev.id for _, ev in deliveries(out, CLIENT)] == ids[5:]


def test_a_client_that_reads_runs_takes_subscription_ids_below_the_run_bit() -> None:
    r = linked_router(True)
    assert subscribe(r, SUB, RUN_BIT, ["a/b"])[0] is Kind.ERR
    sub_ok(r, SUB, RUN_BIT - 1, "a/b")
    hello(r, b"client-old")
    sub_ok(r, b"client-old", RUN_BIT, "a/b")  # one that does not: as before runs


def plain_stream(body: bytes, off: int, flags: int, topic: bytes, limit: int) -> tuple[int, int]:
    """``_stream`` as a plain loop over the records, one by one (the model)."""
    n = min(len(body), limit)
    k = 0
    while off + RECORD_SIZE <= n:
        plen, tlen, hlen, fl = RECORD.unpack_from(body, off)[:4]
        end = off + RECORD_SIZE + tlen + hlen + plen
        if fl != flags or body[off + RECORD_SIZE : off + RECORD_SIZE + tlen] != topic or end > n:
            break
        off, k = end, k + 1
    return off, k


@settings(deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from((b"s/1", b"s/2", b"s/11")),
            st.sampled_from((0, F_REQUEST)),
            st.sampled_from((10, 11, 300)),
            st.integers(1, 30),
        ),
        min_size=1,
        max_size=5,
    ),
    st.integers(0, 40),
    st.sampled_from((b"s/1", b"s/2")),
    st.sampled_from((0, F_REQUEST)),
    st.sampled_from((2_000, 9_000, 1_000_000)),
    st.integers(0, 50),
)
def test_a_stream_is_read_as_one_by_one(
    runs: list[tuple[bytes, int, int, int]],
    first: int,
    topic: bytes,
    flags: int,
    limit: int,
    cut: int,
) -> None:
    """The fixed-size shortcut (``_same_size``, slices across records) takes exactly the
    records the plain loop does, whatever the mix of sizes, topics, flags, bounds and a
    frame cut short."""
    records = [
        encode_record(t, bytes([i % 256]) * size, b"", f, 7, bytes(8) + i.to_bytes(8))
        for i, (t, f, size, times) in enumerate(runs)
        for _ in range(times)
    ]
    body = b"".join(records)
    body = body[: len(body) - cut]
    off = sum(len(r) for r in records[: min(first, len(records))])
    assert _stream(body, off, flags, topic, off + limit) == plain_stream(
        body, off, flags, topic, off + limit
    )
