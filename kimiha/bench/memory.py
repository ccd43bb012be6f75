"""``kimiha bench memory``: resident memory (RSS) growth while millions of events go through one channel.

One LAG channel of 4096 slots with 4 subscribers: 2 handler subscriptions (the compiled dispatch loop) and 2
pull subscriptions read by ``async for`` consumer tasks, so both delivery paths run. The publisher builds each
event as it goes (nothing is kept beyond the ring), publishes in chunks of 1024 and yields to the loop after
each chunk. RSS is read (psutil, else ``/proc/self/status``) after a warm-up, at every checkpoint and at the
end, each time after ``gc.collect()``; the growth is the final RSS minus the RSS after warm-up. Afterwards every
subscriber must have received every event and the channel must report no lag.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from pathlib import Path
from typing import Any

import kimiha
from kimiha.bench.main import machine_header, machine_info, progress
from kimiha.bench.cases import Ev, Tick, close_and_join, new_bus
from kimiha.bench.runner import new_parser, save_json

__all__ = ["main", "rss_bytes", "run_memory"]

DEFAULT_EVENTS = 10_000_000
QUICK_EVENTS = 500_000
CHUNK = 1024
CAPACITY = 4096
#: The project's target for the growth of the resident set (MB) over 10M events (benchmarks/README.md).
TARGET_MB = 2.0
MB = 1024 * 1024


def rss_bytes() -> int:
    """Return this process's resident set size in bytes."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.Process().memory_info().rss)
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    raise RuntimeError("cannot read the RSS: install psutil (pip install 'kimiha[bench]', or '.[bench]' in a "
                       "checkout) or run on Linux")


def measured_rss() -> int:
    gc.collect()
    return rss_bytes()


async def run_memory(n: int, warmup: int, checkpoints: int) -> dict[str, Any]:
    """Publish ``warmup + n`` events; return RSS samples (bytes) and the channel's stats."""
    bus = new_bus(CAPACITY)
    counts = [0, 0, 0, 0]

    def make_handler(i: int) -> Any:
        def handler(event: Tick) -> None:
            counts[i] += 1

        return handler

    async def consume(sub: kimiha.Subscription, i: int) -> None:
        async for _event in sub:
            counts[i] += 1

    handler_subs = [bus.subscribe(Ev.MD, make_handler(i)) for i in (0, 1)]
    tasks = [asyncio.ensure_future(consume(bus.subscribe(Ev.MD), i)) for i in (2, 3)]
    await asyncio.sleep(0)
    publish = bus.channel(Ev.MD).publish
    sleep = asyncio.sleep
    total = warmup + n
    every = max(CHUNK, (n // max(1, checkpoints)) // CHUNK * CHUNK)
    samples: list[dict[str, Any]] = []
    baseline = 0
    started = time.perf_counter()
    t_measured = started
    seq = 0
    while seq < total:
        end = min(seq + CHUNK, total)
        for i in range(seq, end):
            publish(Tick(100.0 + (i & 1023) * 0.01, i))
        seq = end
        await sleep(0)
        if seq == warmup or (seq > warmup and ((seq - warmup) % every == 0 or seq == total)):
            while any(s.backlog for s in handler_subs) or min(counts) < seq:
                await sleep(0)  # everything published so far is delivered before the reading
            rss = measured_rss()
            if seq == warmup:
                baseline = rss
                t_measured = time.perf_counter()
            done = seq - warmup
            samples.append({"events": done, "rss_bytes": rss, "growth_bytes": rss - baseline})
            rate = done / max(time.perf_counter() - t_measured, 1e-9)
            progress(
                f"memory: {done:,}/{n:,} events, RSS {rss / MB:.1f} MB ({(rss - baseline) / MB:+.2f} MB), "
                f"{rate:,.0f} events/s",
                final=seq == total,
            )
    elapsed = time.perf_counter() - t_measured
    await close_and_join(bus, tasks)
    stats = bus.stats(Ev.MD)
    return {"samples": samples, "stats": stats, "counts": counts, "elapsed_s": elapsed, "total": total}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser(
        "kimiha bench memory",
        (
            "Resident memory (RSS) growth while millions of events go through one channel with 4\n"
            "subscribers (2 handler subscriptions, 2 async-for consumers); every event is checked delivered."
        ),
        "examples:\n  kimiha bench memory                      10M events (about 10 s here)\n"
        "  kimiha bench memory --events 1000000     a shorter run, e.g. for CI\n",
    )
    parser.add_argument(
        "--events",
        type=int,
        metavar="N",
        help=f"events published after the warm-up (default {DEFAULT_EVENTS:,}; "
        f"{QUICK_EVENTS:,} with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=200_000,
        metavar="N",
        help="events published before the baseline reading, rounded up to whole chunks of 1024 "
        "(default 200,000)",
    )
    parser.add_argument(
        "--checkpoints", type=int, default=10, metavar="K", help="RSS readings during the run (default 10)"
    )
    parser.add_argument(
        "--loop", choices=("uvloop", "asyncio"), default="uvloop", help="event loop (default uvloop)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer events: a smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = QUICK_EVENTS if args.quick else DEFAULT_EVENTS
    if args.events < CHUNK:
        parser.error(f"--events: expected >= {CHUNK}, got {args.events}")
    if args.warmup < 1:
        parser.error(f"--warmup: expected >= 1, got {args.warmup}")
    args.warmup = -(-args.warmup // CHUNK) * CHUNK  # whole chunks: the baseline is read between two chunks
    if args.checkpoints < 1:
        parser.error(f"--checkpoints: expected >= 1, got {args.checkpoints}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the memory mode; return 0 (the target is reported, not enforced), 1 if events went missing."""
    args = parse_args(argv)
    gc.collect()
    result = kimiha.run(run_memory(args.events, args.warmup, args.checkpoints), loop=args.loop)
    samples = result["samples"]
    stats = result["stats"]
    total = result["total"]
    problems = []
    if result["counts"] != [total] * 4:
        problems.append(f"subscribers received {result['counts']}, expected {total} each")
    if stats["published"] != total or stats["delivered"] != 4 * total or stats["lagged"]:
        problems.append(
            f"channel counted published {stats['published']}, delivered {stats['delivered']}, "
            f"lagged {stats['lagged']}; expected {total}, {4 * total}, 0"
        )
    baseline = samples[0]["rss_bytes"]
    final = samples[-1]["rss_bytes"]
    peak = max(s["rss_bytes"] for s in samples)
    growth_mb = (final - baseline) / MB
    info = machine_info()
    lines = machine_header(info) + [
        (
            f"RSS over {args.events:,} events through one channel ({CAPACITY} slots, LAG) with 4 subscribers "
            f"(2 handlers, 2 async for), {args.loop}, after {args.warmup:,} warm-up events"
        ),
        "",
        f"{'events':>12} {'RSS MB':>9} {'growth MB':>10}",
    ]
    for s in samples:
        lines.append(f"{s['events']:>12,} {s['rss_bytes'] / MB:>9.2f} {s['growth_bytes'] / MB:>+10.2f}")
    lines += [
        "",
        (
            f"growth {growth_mb:+.2f} MB (baseline {baseline / MB:.2f} MB, final {final / MB:.2f} MB, peak "
            f"{peak / MB:.2f} MB); {args.events / result['elapsed_s']:,.0f} events/s, "
            f"{4 * args.events / result['elapsed_s']:,.0f} deliveries/s"
        ),
        f"target <= {TARGET_MB:g} MB over {DEFAULT_EVENTS:,} events"
        + ("" if args.events == DEFAULT_EVENTS else f" (this run is shorter: {args.events:,} events)")
        + f": {'met' if growth_mb <= TARGET_MB else 'MISSED'}",
    ]
    print("\n".join(lines))
    if problems:
        print("memory: events went missing: " + "; ".join(problems), file=sys.stderr)
    if args.json:
        save_json(
            args.json,
            {
                "mode": "memory",
                "machine": info,
                "settings": {
                    "events": args.events,
                    "warmup": args.warmup,
                    "loop": args.loop,
                    "capacity": CAPACITY,
                    "subscribers": {"handlers": 2, "async_for": 2},
                    "command": " ".join(sys.argv),
                },
                "samples": samples,
                "baseline_mb": baseline / MB,
                "final_mb": final / MB,
                "peak_mb": peak / MB,
                "growth_mb": growth_mb,
                "target_mb": TARGET_MB,
                "met": growth_mb <= TARGET_MB,
                "events_per_s": args.events / result["elapsed_s"],
                "channel": {k: stats[k] for k in ("published", "delivered", "lagged", "high_water_mark")},
                "problems": problems,
            },
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
