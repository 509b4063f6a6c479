"""``meshctl bench``: throughput and latency through one node, as ratios to raw pyzmq."""

from __future__ import annotations

import os
import statistics
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from meshctl.cli.options import JsonOpt, ServerOpt
from meshctl.cli.output import dumps, note, out_console

TARGET_RATIO = 0.3
TARGET_P50_US = 250.0
TARGET_PERSISTENT = 20_000


def bench(
    count: Annotated[
        int,
        typer.Option("--count", "-n", min=1000, max=5_000_000, help="Events per throughput run."),
    ] = 200_000,
    sizes: Annotated[
        str, typer.Option("--sizes", help="Payload sizes in bytes, comma separated.")
    ] = "16,256,1024",
    requests: Annotated[
        int,
        typer.Option("--requests", min=10, max=100_000, help="Sequential requests for latency."),
    ] = 5000,
    transport: Annotated[
        str, typer.Option("--transport", help="ipc (how local clients connect) or tcp (loopback).")
    ] = "ipc",
    suite: Annotated[
        str,
        typer.Option(
            "--suite",
            help="node (one node), mesh (linked nodes), durable (persistent, uplink), "
            "curve (open vs CurveZMQ link) or all.",
        ),
    ] = "all",
    server: ServerOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure throughput and latency through one node, and across linked nodes.

    Starts throwaway nodes on 127.0.0.1 (no discovery) unless --server is given, and
    measures raw pyzmq PUSH->PULL (two processes, one frame per message) in the same run
    as the baseline. The mesh suite compares two hops to one node, and routing with
    10,000 subscriptions over 10 nodes to 10 subscriptions, in the same run.
    """
    from meshctl import bench as b  # noqa: PLC0415 - multiprocessing machinery on demand

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{sizes!r} is not a comma-separated list of sizes", param_hint="--sizes"
        ) from None
    if suite not in ("node", "mesh", "durable", "curve", "all"):
        raise typer.BadParameter(
            f"{suite!r} is not node, mesh, durable, curve or all", param_hint="--suite"
        )
    if transport not in ("ipc", "tcp"):
        raise typer.BadParameter(f"{transport!r} is not ipc or tcp", param_hint="--transport")
    if server:
        transport = server.split("://", 1)[0] if "://" in server else "tcp"
    result: dict[str, object] = {}
    if suite in ("node", "all"):
        result |= _node_suite(b, server, transport, count, size_list, requests)
    if suite in ("mesh", "all") and not server:
        result["mesh"] = _mesh_suite(b, count)
    if suite in ("durable", "all") and not server:
        result["durable"] = _durable_suite(b, min(count, 100_000))
    if suite in ("curve", "all") and not server:
        result["curve"] = _curve_suite(b, count, requests)
    if json_out:
        print(dumps(result))
        return
    _render(result, requests)


def _lost(**runs: Any) -> dict[str, int]:
    """Events sent but not received, per run."""
    return {name: run.sent - run.received for name, run in runs.items()}


def _curve_suite(b: Any, count: int, requests: int) -> dict[str, object]:
    note("curve: one link A-B, open (--insecure) vs CurveZMQ, 256 B events")
    f = b.curve_suite(256, count, requests)
    open_lat = b.summarize_latency(f.open_rtts)
    curve_lat = b.summarize_latency(f.curve_rtts)
    out = {
        "open_per_s": round(f.open_link.per_second),
        "curve_per_s": round(f.curve_link.per_second),
        "throughput_ratio": round(f.curve_link.per_second / f.open_link.per_second, 3),
        "open_p50_us": round(open_lat["p50_us"], 1),
        "curve_p50_us": round(curve_lat["p50_us"], 1),
        "open_p99_us": round(open_lat["p99_us"], 1),
        "curve_p99_us": round(curve_lat["p99_us"], 1),
        "lost": _lost(open=f.open_link, curve=f.curve_link),
    }
    note(
        f"  across one link: open {out['open_per_s']:,}/s, CurveZMQ {out['curve_per_s']:,}/s "
        f"({out['throughput_ratio']:.2f}x); request-reply p50 {out['open_p50_us']} µs open "
        f"vs {out['curve_p50_us']} µs CurveZMQ"
    )
    return out


def _mesh_suite(b: Any, count: int) -> dict[str, object]:
    note("mesh: line A-B-C and a 10-node star, 256 B events")
    m = b.mesh_suite(256, count)
    # Ratios are taken within a round (the two runs of a pair are seconds apart), and the
    # figure is their median: the machine's noise drifts between rounds.
    ratios = [r["two_hops"].per_second / r["one_node"].per_second for r in m.rounds]
    slowdowns = [1 - r["10k_subs"].per_second / r["10_subs"].per_second for r in m.rounds]
    out = {
        "one_node_per_s": round(m.one_node.per_second),
        "two_hops_per_s": round(m.two_hops.per_second),
        "two_hop_ratio": round(statistics.median(ratios), 3),
        "routing_10_subs_per_s": round(m.few_subs.per_second),
        "routing_10k_subs_per_s": round(m.many_subs.per_second),
        "routing_slowdown": round(statistics.median(slowdowns), 3),
        "two_hop_ratio_rounds": [round(x, 3) for x in ratios],
        "routing_slowdown_rounds": [round(x, 3) for x in slowdowns],
        "lost": {k: sum(r[k].sent - r[k].received for r in m.rounds) for k in m.rounds[0]},
        "targets": {"two_hop_ratio": 0.8, "routing_slowdown": 0.2},
        # Where the CPU goes: with more processes than cores the pipeline is bound by the
        # sum of these, not by its slowest stage; the ratio of the sums says what a
        # CPU-bound machine can reach at best.
        "cpu_us_per_event": {
            "one_node": {k: round(v, 2) for k, v in m.cpu_one.items()},
            "two_hops": {k: round(v, 2) for k, v in m.cpu_two.items()},
            "cpu_bound_ratio": round(
                sum(m.cpu_one.values()) / max(1e-9, sum(m.cpu_two.values())), 3
            ),
            "cores": os.cpu_count(),
        },
    }
    note(
        f"  two hops {out['two_hops_per_s']:,}/s vs one node {out['one_node_per_s']:,}/s "
        f"({out['two_hop_ratio']:.2f}x); routing 10k subs {out['routing_10k_subs_per_s']:,}/s "
        f"vs 10 subs {out['routing_10_subs_per_s']:,}/s ({out['routing_slowdown']:+.1%})"
    )
    return out


def _durable_suite(b: Any, count: int) -> dict[str, object]:
    note(f"durable: {count} events of 256 B, direct vs persistent, and an uplink drain")
    d = b.durable_suite(256, count)
    out = {
        "direct_per_s": round(d.direct.per_second),
        "persistent_per_s": round(d.persistent.per_second),
        "persistent_ratio": round(d.persistent.per_second / d.direct.per_second, 3),
        "uplink_drain_per_s": round(d.drain.per_second),
        "lost": _lost(direct=d.direct, persistent=d.persistent, uplink=d.drain),
        "targets": {"persistent_per_s": TARGET_PERSISTENT},
    }
    note(
        f"  persistent {out['persistent_per_s']:,}/s vs direct {out['direct_per_s']:,}/s "
        f"({out['persistent_ratio']:.2f}x); uplink drain {out['uplink_drain_per_s']:,}/s"
    )
    return out


def _node_suite(
    b: Any, server: str | None, transport: str, count: int, size_list: list[int], requests: int
) -> dict[str, object]:
    rows = []
    with b.bench_node(server, transport) as url:
        note(f"benchmarking through {url}: {count} events per run")
        for size in size_list:
            base = b.raw_baseline(transport, size, count)
            run = b.pubsub(url, size, count)
            rows.append((size, base, run))
            note(
                f"  {size:>5} B: raw {base.per_second:,.0f}/s, node {run.per_second:,.0f}/s "
                f"({run.per_second / base.per_second:.2f}x)"
            )
        lat = b.summarize_latency(b.request_latency(url, requests))
    return {
        "throughput": [
            {
                "size": size,
                "baseline_per_s": round(base.per_second),
                "node_per_s": round(run.per_second),
                "node_mb_per_s": round(run.per_second * size / 1e6, 2),
                "baseline_mb_per_s": round(base.per_second * size / 1e6, 2),
                "ratio": round(run.per_second / base.per_second, 3),
                "sent": run.sent,
                "received": run.received,
            }
            for size, base, run in rows
        ],
        "transport": transport,
        "request_reply": {k: round(v, 1) for k, v in lat.items()} | {"requests": requests},
        "targets": {"ratio_256B": TARGET_RATIO, "p50_us": TARGET_P50_US},
    }


def _render(result: dict[str, Any], requests: int) -> None:
    out = out_console()
    if "throughput" not in result:
        if "mesh" in result:
            _render_mesh(out, result["mesh"])
        if "durable" in result:
            _render_durable(out, result["durable"])
        if "curve" in result:
            _render_curve(out, result["curve"])
        return
    t = Table("payload", "raw push->pull", "via node", "MB/s", "ratio", "lost", box=None)
    for r in result["throughput"]:  # type: ignore[union-attr]
        t.add_row(
            f"{r['size']} B",
            f"{r['baseline_per_s']:,}/s",
            f"{r['node_per_s']:,}/s",
            f"{r['node_mb_per_s']}",
            f"{r['ratio']:.2f}x",
            str(r["sent"] - r["received"]),
        )
    out.print(t)
    rr = result["request_reply"]
    out.print(
        f"request-reply: p50 {rr['p50_us']:.0f} µs, p99 {rr['p99_us']:.0f} µs, "  # type: ignore[index]
        f"mean {rr['mean_us']:.0f} µs over {requests} requests"
    )  # type: ignore[index]
    out.print(f"targets: ratio ≥ {TARGET_RATIO} at 256 B, p50 ≤ {TARGET_P50_US:.0f} µs")
    if "mesh" in result:
        _render_mesh(out, result["mesh"])
    if "durable" in result:
        _render_durable(out, result["durable"])
    if "curve" in result:
        _render_curve(out, result["curve"])


def _render_durable(out: Console, d: dict[str, Any]) -> None:
    out.print(
        f"durable: persistent pub → queue → acking consumer {d['persistent_per_s']:,}/s vs "
        f"direct {d['direct_per_s']:,}/s: {d['persistent_ratio']:.2f}x "
        f"(target ≥ {TARGET_PERSISTENT:,}/s)"
    )
    out.print(f"durable: uplink drain after an outage {d['uplink_drain_per_s']:,}/s")
    out.print(f"durable: events lost {d['lost']}")


def _render_curve(out: Console, c: dict[str, Any]) -> None:
    out.print(
        f"curve: one link, CurveZMQ {c['curve_per_s']:,}/s vs open {c['open_per_s']:,}/s "
        f"({c['throughput_ratio']:.2f}x); request-reply p50 {c['curve_p50_us']} µs vs "
        f"{c['open_p50_us']} µs, p99 {c['curve_p99_us']} µs vs {c['open_p99_us']} µs; "
        f"lost {c['lost']}"
    )


def _render_mesh(out: Console, m: dict[str, Any]) -> None:
    out.print(
        f"mesh: pub A → B → sub C {m['two_hops_per_s']:,}/s vs one node "
        f"{m['one_node_per_s']:,}/s (medians, once the mesh settled); median ratio "
        f"within a round {m['two_hop_ratio']:.2f}x (target ≥ 0.8)"
    )
    out.print(
        f"mesh: routing with 10,000 subscriptions on 10 nodes {m['routing_10k_subs_per_s']:,}/s"
        f" vs 10 subscriptions {m['routing_10_subs_per_s']:,}/s: median "
        f"{m['routing_slowdown']:+.1%} slower (target ≤ 20%; every event a cache miss)"
    )
    rounds = ", ".join(f"{x:.2f}" for x in m["two_hop_ratio_rounds"])
    slow = ", ".join(f"{x:+.1%}" for x in m["routing_slowdown_rounds"])
    out.print(
        f"mesh: medians of {len(m['two_hop_ratio_rounds'])} interleaved rounds; "
        f"two-hop ratio per round {rounds}; routing slowdown per round {slow}"
    )
    out.print(f"mesh: events lost (all rounds) {m['lost']}")
    cpu = m["cpu_us_per_event"]
    for run in ("one_node", "two_hops"):
        parts = ", ".join(f"{k} {v:.2f}" for k, v in cpu[run].items())
        out.print(f"mesh: CPU µs per event, {run.replace('_', ' ')}: {parts}")
    out.print(
        f"mesh: on {cpu['cores']} cores the sum of CPU per event bounds two hops at "
        f"{cpu['cpu_bound_ratio']:.2f}x of one node"
    )
