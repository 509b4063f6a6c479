"""Subscription churn on a node that holds many patterns: what it costs the mesh.

Two throwaway nodes, A and B, linked (loopback, discovery off). A client on A subscribes
and unsubscribes one pattern ``--changes`` times at ``--rate`` per second, first while A
holds no other patterns (the baseline, same run), then while clients on A hold
``--patterns`` more. Printed for each phase: the CPU each node spent (as a share of one
core over the churn), and how long a new subscription on A takes to become routable
from B (median of 5). Bounded in count and time; the nodes are stopped by their PIDs.
Run: ``python benchmarks/interest_churn.py [--patterns N] [--changes N] [--rate N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from meshctl import connect
from meshctl.bench import NODE_PIDS, bench_mesh, cpu_seconds, wait_interest, wait_settled

PER_CLIENT = 9_000  # under a node's limit of 10,000 patterns per client


def hold(server: str, patterns: int) -> list[Any]:
    """Clients on ``server`` holding ``patterns`` device-style patterns between them."""
    clients: list[Any] = []
    for first in range(0, patterns, 1_000):
        if first % PER_CLIENT == 0:
            clients.append(connect(server, name="churn load", timeout=10))
        last = min(patterns, first + 1_000)
        clients[-1].subscribe(*(f"dev/{j}/cmd" for j in range(first, last)), retained=False)
    return clients


def churn(ipc: dict[str, str], changes: int, rate: float) -> dict[str, float]:
    """CPU share of A and B while a client subscribes and unsubscribes, and the time for a
    new subscription on A to be routable from B."""
    a, b = NODE_PIDS["A"], NODE_PIDS["B"]
    with connect(ipc["A"], name="churn", timeout=10) as c:
        a0, b0, t0 = cpu_seconds(a), cpu_seconds(b), time.monotonic()
        for k in range(changes):
            c.unsubscribe(c.subscribe(f"churn/{k}", retained=False))
            time.sleep(1 / rate)
        time.sleep(0.5)  # what the last changes cost, too
        took = time.monotonic() - t0
        a_cpu, b_cpu = (cpu_seconds(a) - a0) / took, (cpu_seconds(b) - b0) / took
        waits = []
        for k in range(5):
            start = time.monotonic()
            sub = c.subscribe(f"late/{k}", retained=False)
            wait_interest(ipc["B"], f"late/{k}", 1, timeout=30)
            waits.append(time.monotonic() - start)
            c.unsubscribe(sub)
    return {"A": a_cpu, "B": b_cpu, "routable_ms": statistics.median(waits) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--patterns", type=int, default=50_000)
    parser.add_argument("--changes", type=int, default=200, help="subscribe+unsubscribe pairs")
    parser.add_argument("--rate", type=float, default=50.0, help="pairs per second")
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="skip the ~10 s wait for the mesh to settle (figures then include its duplicate "
        "checks; for the suite's check that the script runs)",
    )
    args = parser.parse_args()
    with bench_mesh({"A": [], "B": ["A"]}) as ipc:
        if not args.no_settle:
            wait_settled(list(ipc.values()))
        base = churn(ipc, args.changes, args.rate)
        load = hold(ipc["A"], args.patterns)
        try:
            wait_interest(ipc["B"], f"dev/{args.patterns - 1}/cmd", 1, timeout=60)
            held = churn(ipc, args.changes, args.rate)
        finally:
            for c in load:
                c.close()
    for name, r in (("no other patterns", base), (f"{args.patterns:,} patterns held", held)):
        print(
            f"churn ({2 * args.changes} changes at {2 * args.rate:.0f}/s), {name}: "
            f"A {r['A']:.1%} of a core, B {r['B']:.1%}; a new subscription routable "
            f"from B in {r['routable_ms']:.0f} ms",
            flush=True,
        )
    print(
        f"ratio held/baseline: A {held['A'] / max(base['A'], 1e-9):.1f}x, "
        f"B {held['B'] / max(base['B'], 1e-9):.1f}x CPU; routable "
        f"{held['routable_ms'] / max(base['routable_ms'], 1e-9):.1f}x"
    )


if __name__ == "__main__":
    main()
