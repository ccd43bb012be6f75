#!/usr/bin/env python
"""Where the time of the comparison's cases goes: per-event cost of each step, through the public API.

Default mode prints one line per step: median ns per event over ``--repeat`` samples (min..max beside it).
Each sample times ``--rounds`` rounds of one chunk of 1024 ready events, so a step's cost is read directly
instead of being inferred from a whole flood:

* Python references: an empty loop, a direct handler call (the floor), ``list.append``, a clock read.
* publishing: ``channel.publish`` / ``bus.publish`` with no subscriber, latency tracking on and off;
* push: one chunk published to 1 or 4 handler subscriptions, then the dispatch (timed as the
  ``await asyncio.sleep(0)`` that lets it run: one loop iteration, amortized over the chunk);
* pull, events already in the ring, consumed in the publishing task: ``async for``, ``await recv()``,
  ``try_recv()``, ``drain()``, ``await recv_batch()`` -- each with the handler call;
* asyncio.Queue: ``put_nowait``, ``await get()`` on a non-empty queue, ``get_nowait``.

``--spin CASE`` instead runs one comparison case over and over for ``--seconds``, for a sampling profiler:

    py-spy record --native -r 1000 -f raw -o /tmp/sync.txt -- python benchmarks/breakdown.py --spin sync
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

try:
    import kimiha
except ImportError:  # not installed: use the source tree this script lives in (built in place)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kimiha

from kimiha.bench import compare  # the comparison's cases, for --spin
from kimiha.bench.cases import SEED, Ev, Sink, Tick, chunked, make_events, new_bus  # its events, handler, bus
from kimiha.bench.runner import LOOPS, SUBSCRIBER_COUNTS

CHUNK = 1024
perf_counter_ns = time.perf_counter_ns

Sample = Callable[[], float]


def spread(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def python_refs(events: list[Tick], rounds: int) -> dict[str, Sample]:
    def loop_only() -> float:
        t = 0
        for _ in range(rounds):
            t0 = perf_counter_ns()
            for _e in events:
                pass
            t += perf_counter_ns() - t0
        return t / (rounds * len(events))

    def floor() -> float:
        h = Sink().handler
        t = 0
        for _ in range(rounds):
            t0 = perf_counter_ns()
            for e in events:
                h(e)
            t += perf_counter_ns() - t0
        return t / (rounds * len(events))

    def append() -> float:
        t = 0
        for _ in range(rounds):
            buf: list[Tick] = []
            ap = buf.append
            t0 = perf_counter_ns()
            for e in events:
                ap(e)
            t += perf_counter_ns() - t0
        return t / (rounds * len(events))

    def clock() -> float:
        pc = perf_counter_ns
        t = 0
        for _ in range(rounds):
            t0 = pc()
            for _e in events:
                pc()
            t += pc() - t0
        return t / (rounds * len(events))

    return {
        "python: for e in events: pass": loop_only,
        "python: floor, h(e) direct call (incl. loop)": floor,
        "python: list.append(e) (incl. loop)": append,
        "python: time.perf_counter_ns() (incl. loop)": clock,
    }


def publish_steps(events: list[Tick], rounds: int) -> dict[str, Sample]:
    def publish(track: bool, via_bus: bool) -> Sample:
        def run() -> float:
            bus = new_bus(4096, track)
            pub = bus.channel(Ev.MD).publish
            bus_pub = bus.publish
            key = Ev.MD
            t = 0
            for _ in range(rounds):
                if via_bus:
                    t0 = perf_counter_ns()
                    for e in events:
                        bus_pub(key, e)
                else:
                    t0 = perf_counter_ns()
                    for e in events:
                        pub(e)
                t += perf_counter_ns() - t0
            assert bus.channel(Ev.MD).published == rounds * len(events)
            return t / (rounds * len(events))

        return run

    out = {}
    for track in (False, True):
        lat = "on" if track else "off"
        out[f"publish: channel.publish, no subscriber, latency {lat}"] = publish(track, False)
        out[f"publish: bus.publish(key, e), no subscriber, latency {lat}"] = publish(track, True)
    return out


async def push_steps(
    events: list[Tick], rounds: int, repeat: int
) -> dict[str, tuple[list[float], list[float]]]:
    """Return {label: (publish samples, dispatch samples)} for 1 and 4 handler subscriptions."""

    async def one(track: bool, subs: int) -> tuple[float, float]:
        bus = new_bus(4096, track)
        sinks = [Sink() for _ in range(subs)]
        for s in sinks:
            bus.subscribe(Ev.MD, s.handler)
        pub = bus.channel(Ev.MD).publish
        sleep = asyncio.sleep
        tp = td = 0
        for _ in range(rounds):
            t0 = perf_counter_ns()
            for e in events:
                pub(e)
            t1 = perf_counter_ns()
            await sleep(0)  # the dispatch callback runs here
            td += perf_counter_ns() - t1
            tp += t1 - t0
        n = rounds * len(events)
        for s in sinks:
            assert s.seen()[0] == n, "dispatch did not deliver every event in one loop iteration"
        return tp / n, td / n

    out = {}
    for track in (False, True):
        for subs in (1, 4):
            rs = [await one(track, subs) for _ in range(repeat)]
            label = f"{subs} handler(s), latency {'on' if track else 'off'}"
            out[label] = ([r[0] for r in rs], [r[1] for r in rs])
    return out


async def pull_steps(events: list[Tick], rounds: int) -> dict[str, Callable[[], Awaitable[float]]]:
    async def measure(kind: str, track: bool) -> float:
        bus = new_bus(4096, track)
        sub = bus.subscribe(Ev.MD)
        pub = bus.channel(Ev.MD).publish
        sink = Sink()
        h, seen = sink.handler, sink.seen
        n = len(events)
        t = 0
        for _ in range(rounds):
            for e in events:
                pub(e)
            t0 = perf_counter_ns()
            if kind == "async for":
                i = 0
                async for ev in sub:
                    h(ev)
                    i += 1
                    if i == n:
                        break
            elif kind == "await recv()":
                recv = sub.recv
                for _ in range(n):
                    h(await recv())
            elif kind == "try_recv()":
                try_recv = sub.try_recv
                while (ev := try_recv()) is not None:
                    h(ev)
            elif kind == "drain()":
                for ev in sub.drain():
                    h(ev)
            else:
                for ev in await sub.recv_batch():
                    h(ev)
            t += perf_counter_ns() - t0
        assert seen()[0] == rounds * n
        return t / (rounds * n)

    out = {}
    for track in (False, True):
        for kind in ("async for", "await recv()", "try_recv()", "drain()", "await recv_batch()"):
            label = f"pull: {kind} + h(ev), events ready, latency {'on' if track else 'off'}"
            out[label] = lambda kind=kind, track=track: measure(kind, track)
    return out


async def queue_steps(events: list[Tick], rounds: int, repeat: int) -> dict[str, list[float]]:
    async def one(nowait: bool) -> tuple[float, float]:
        q: asyncio.Queue[Tick] = asyncio.Queue()
        sink = Sink()
        h, seen = sink.handler, sink.seen
        n = len(events)
        tp = tg = 0
        for _ in range(rounds):
            put = q.put_nowait
            t0 = perf_counter_ns()
            for e in events:
                put(e)
            t1 = perf_counter_ns()
            if nowait:
                get_nowait = q.get_nowait
                for _ in range(n):
                    h(get_nowait())
            else:
                get = q.get
                for _ in range(n):
                    h(await get())
            tg += perf_counter_ns() - t1
            tp += t1 - t0
        assert seen()[0] == rounds * n
        return tp / (rounds * n), tg / (rounds * n)

    waiting = [await one(False) for _ in range(repeat)]
    nowait = [await one(True) for _ in range(repeat)]

    async def noop() -> None:
        return None

    async def coro_ref() -> float:
        k = rounds * len(events)
        t0 = perf_counter_ns()
        for _ in range(k):
            await noop()
        return (perf_counter_ns() - t0) / k

    return {
        "queue: put_nowait(e) (incl. loop)": [r[0] for r in waiting],
        "queue: await get() + h(ev), queue not empty": [r[1] for r in waiting],
        "queue: get_nowait() + h(ev)": [r[1] for r in nowait],
        "python: await of a trivial coroutine": [await coro_ref() for _ in range(repeat)],
    }


def breakdown(args: argparse.Namespace) -> None:
    events = make_events(CHUNK, SEED)
    rows: list[tuple[str, list[float]]] = []

    def sample(fn: Sample) -> list[float]:
        return [fn() for _ in range(args.repeat)]

    for label, fn in python_refs(events, args.rounds).items():
        rows.append((label, sample(fn)))
    for label, fn in publish_steps(events, args.rounds).items():
        rows.append((label, sample(fn)))

    async def on_loop() -> None:
        for label, (pub, disp) in (await push_steps(events, args.rounds, args.repeat)).items():
            rows.append((f"push: publish to {label}", pub))
            rows.append((f"push: dispatch to {label}", disp))
        for label, afn in (await pull_steps(events, args.rounds)).items():
            rows.append((label, [await afn() for _ in range(args.repeat)]))
        rows.extend((await queue_steps(events, args.rounds, args.repeat)).items())

    kimiha.run(on_loop(), loop=args.loop)
    print(f"per-event cost on {args.loop}: median of {args.repeat} samples of {args.rounds} x {CHUNK} events")
    print(f"{'step':<72} {'median ns':>9} {'min..max':>15}")
    print("-" * 98)
    for label, xs in rows:
        med, lo, hi = spread(xs)
        print(f"{label:<72} {med:>9.1f} {f'{lo:.1f}..{hi:.1f}':>15}")


def spin(args: argparse.Namespace) -> None:
    """Run one comparison case back to back for ``args.seconds`` (setup included, a small share)."""
    kind, _, subs = args.spin.partition(":")
    if kind not in compare.KINDS or subs not in ("", *map(str, SUBSCRIBER_COUNTS)):
        raise SystemExit(
            f"--spin: expected one of {', '.join(compare.KINDS)}, optionally ':4', got {args.spin!r}"
        )
    anchor = compare.ANCHOR_KINDS[kind]() if kind in compare.ANCHOR_KINDS else None
    if anchor is not None and not anchor.available:
        raise SystemExit(f"--spin {kind}: skipped: {anchor.reason}")
    loopless = kind in ("floor", "bound") or anchor is not None
    case = compare.Case(kind, None if loopless else args.loop, int(subs or 1), anchor=anchor)
    n = 200_000
    events = make_events(n, SEED)
    setup = compare.Setup(n, 4096, events, chunked(events, compare.chunk_size(n, 4096)))
    end = time.monotonic() + args.seconds
    runs = 0
    while time.monotonic() < end:
        compare.run_case(case, setup)
        runs += 1
    print(f"{case.key}: {runs} verified runs of {n} events", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="breakdown.py",
        description="Per-step cost of kimiha's publish, dispatch and pull paths, with Python and asyncio.Queue "
        "references; or (--spin) one comparison case in a loop for a sampling profiler.",
    )
    parser.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop (default uvloop)")
    parser.add_argument("--repeat", type=int, default=9, help="samples per step, median reported (default 9)")
    parser.add_argument(
        "--rounds", type=int, default=200, help="chunks of 1024 events per sample (default 200)"
    )
    parser.add_argument(
        "--spin", metavar="CASE[:SUBS]", help="run a comparison case (e.g. sync, flood-iter:4) for --seconds"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="duration of --spin (default 20)")
    args = parser.parse_args(argv)
    if args.repeat < 5 or args.rounds < 1:
        parser.error("--repeat must be >= 5 and --rounds >= 1")
    if args.spin:
        spin(args)
    else:
        breakdown(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
