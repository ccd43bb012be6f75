"""Command line: ``kimiha demo`` (the main job) and ``kimiha bench`` (side-by-side benchmarks)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence

import kimiha
from kimiha.runtime import LOOPS

__all__ = ["main"]


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 (real-time factor), got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 (real-time factor), got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:
        # everything after `bench` belongs to the benchmark's own parser (modes, --quick, --help, ...)
        from kimiha.benchmark import main as bench_main

        return bench_main(args_list[1:])
    parser = argparse.ArgumentParser(prog="kimiha", description="kimiha: low-latency trading orchestration")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="replay recorded Binance BTCUSDT data through connector -> aggregator -> strategy -> executor",
        description="Replay recorded Binance spot BTCUSDT market data (shipped with kimiha) through the whole "
        "trading pipeline on the in-process bus, then print a summary.",
    )
    demo.add_argument("--speed", type=_speed, default=None,
                      help="replay at the recorded pace times this factor (default: as fast as possible)")
    demo.add_argument("--data", action="append", metavar="PATH",
                      help="a recording in the same wire format, gzipped or not (repeat for several files)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    demo.add_argument("--no-progress", action="store_true", help="do not show the progress bar on stderr")
    demo.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop (default: uvloop)")
    demo.add_argument("--distributed", action="store_true",
                      help="run connector+aggregator, strategy and executor as three processes over NATS")
    demo.add_argument("--nats", metavar="URL",
                      help="NATS server for --distributed (default: start a local nats-server)")
    demo.add_argument("--delivery", choices=("jetstream", "core"), default=None,
                      help="--distributed: JetStream (default, no loss) or core NATS (lowest latency)")
    sub.add_parser("bench", help="side-by-side benchmarks (kimiha vs asyncio.Queue, pyee, NautilusTrader); "
                                 "`kimiha bench help` lists the modes")
    args = parser.parse_args(args_list)

    if args.command == "demo" and (args.distributed or args.nats):
        from kimiha.distributed import main as distributed_main

        return distributed_main(args)

    if args.command == "demo":
        from kimiha.demo import format_summary, run_demo

        try:
            summary = kimiha.run(
                run_demo(args.data, speed=args.speed, progress=None if args.no_progress else sys.stderr),
                loop=args.loop,
            )
        except FileNotFoundError as exc:
            parser.exit(2, f"kimiha demo: {exc}\n")
        if args.json:
            print(json.dumps(summary, indent=2, default=str))
        else:
            print(format_summary(summary))
        if summary.get("interrupted"):
            return 0 if summary["hooks_run"] else 1
        return 0 if summary["all_lines_accounted"] or args.data else 1
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
