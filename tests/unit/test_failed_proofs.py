"""node/failed_proofs.py: an address that keeps failing to prove membership is blocked for a
while; one that fails now and then never is; memory stays bounded."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node.failed_proofs import FailedProofs, source_of


def test_the_limit_within_the_window_blocks_for_a_while() -> None:
    p = FailedProofs(limit=20, window=60.0, block=60.0)
    assert not any(p.failed("10.0.0.9", 100.0 + i) for i in range(19))
    assert not p.blocked("10.0.0.9", 119.0)
    assert p.failed("10.0.0.9", 119.5)  # the 20th within 60 s
    assert p.blocked("10.0.0.9", 119.5)
    assert p.blocked("10.0.0.9", 179.0)
    assert p.listing(150.0) == {"10.0.0.9": 29.5}
    assert not p.blocked("10.0.0.10", 150.0)  # only that address
    assert not p.blocked("10.0.0.9", 179.6)  # over
    assert p.listing(180.0) == {}
    # After a block the count starts again from nothing.
    assert not p.failed("10.0.0.9", 180.0)


def test_failures_now_and_then_never_block() -> None:
    p = FailedProofs(limit=20, window=60.0)
    # One every 3.5 s: any 20 of them span 66.5 s, more than the window.
    assert not any(p.failed("a", i * 3.5) for i in range(1000))
    assert not p.blocked("a", 3500.0)


def test_memory_is_bounded() -> None:
    p = FailedProofs(limit=2, window=60.0, max_addresses=100)
    for i in range(10_000):
        p.failed(f"10.{i // 256}.{i % 256}.1", float(i) / 1000)
        p.failed(f"10.{i // 256}.{i % 256}.1", float(i) / 1000)
    assert len(p._failures) <= 100
    assert len(p._blocked) <= 100


@given(st.lists(st.floats(min_value=0, max_value=1e4, allow_nan=False), max_size=200))
def test_blocks_exactly_when_the_last_limit_failures_fit_the_window(gaps: list[float]) -> None:
    limit, window = 5, 60.0
    p = FailedProofs(limit=limit, window=window, block=1e-9)
    now = 0.0
    since_block: list[float] = []  # the model: failures since the last block
    for gap in gaps:
        now += gap % 40  # often several within a window, sometimes not
        since_block.append(now)
        expect = len(since_block) >= limit and now - since_block[-limit] <= window
        assert p.failed("x", now) is expect
        if expect:
            since_block = []


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert source_of("10.1.2.3") == "10.1.2.3"
    assert source_of("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert source_of("fe80::1%eth0") == "fe80::/64"
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"
    assert source_of("not an address") == "not an address"
    p = FailedProofs(limit=3, window=60.0)
    # Three fresh addresses of one /64 are one source.
    assert not p.failed("2001:db8:1:2::a", 1.0)
    assert not p.failed("2001:db8:1:2::b", 2.0)
    assert p.failed("2001:db8:1:2::c", 3.0)
    assert p.blocked("2001:db8:1:2:ffff::9", 4.0)
    assert not p.blocked("2001:db8:1:3::a", 4.0)
