"""``meshctl bench``: throughput and latency through one node, as ratios to raw pyzmq."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from meshctl.cli.options import JsonOpt, ServerOpt
from meshctl.cli.output import dumps, note

TARGET_RATIO = 0.3
TARGET_P50_US = 250.0


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
    server: ServerOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Measure pub->sub throughput and request-reply latency through one node.

    Starts a throwaway node on 127.0.0.1 unless --server is given, and measures raw pyzmq
    PUSH->PULL (two processes, one frame per message) in the same run as the baseline.
    """
    from meshctl import bench as b  # noqa: PLC0415 - multiprocessing machinery on demand

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"{sizes!r} is not a comma-separated list of sizes", param_hint="--sizes"
        ) from None
    if transport not in ("ipc", "tcp"):
        raise typer.BadParameter(f"{transport!r} is not ipc or tcp", param_hint="--transport")
    if server:
        transport = server.split("://", 1)[0] if "://" in server else "tcp"
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
    result = {
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
    if json_out:
        print(dumps(result))
        return
    out = Console(highlight=False)
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
