"""Overhead of a scheduler event task over a bare bus subscription, sync and async handler (issue 3).

Same handler, same events, same loop, interleaved repetitions; reported as ns/event and the ratio
event-task / bare subscription (target <= 1.3x).

    python benchmarks/scheduler_overhead.py [--events N] [--repeat R] [--loop uvloop|asyncio] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import kimiha
from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Scheduler


class Ev(EventType):
    TICKS = "Ticks"


class Tick(Event, gc=False):
    seq: int
    price: float


class SyncTask(EventTask):
    def __init__(self) -> None:
        self.count = 0

    def subscribed_event(self):
        return Ev.TICKS

    def handle_event(self, event: Tick) -> None:
        self.count += 1


class AsyncTask(SyncTask):
    async def handle_event(self, event: Tick) -> None:  # type: ignore[override]
        self.count += 1


def new_bus(capacity: int) -> EventBus:
    return EventBus([(Ev.TICKS, ChannelConfig(capacity, payload_type=Tick))])


async def publish_all(bus: EventBus, events: list[Tick], task: SyncTask, chunk: int) -> None:
    channel = bus.channel(Ev.TICKS)
    for start in range(0, len(events), chunk):
        for event in events[start : start + chunk]:
            channel.publish(event)
        while task.count < start + min(chunk, len(events) - start):
            await asyncio.sleep(0)


async def bare(kind: str, events: list[Tick], capacity: int) -> float:
    bus = new_bus(capacity)
    task = AsyncTask() if kind == "async" else SyncTask()
    pump = None
    if kind == "sync":
        bus.subscribe(Ev.TICKS, task.handle_event)
    else:
        sub = bus.subscribe(Ev.TICKS)

        async def run_pump():
            handler = task.handle_event
            async for event in sub:
                await handler(event)

        pump = asyncio.create_task(run_pump())
    await asyncio.sleep(0)
    started = time.perf_counter_ns()
    await publish_all(bus, events, task, capacity)
    elapsed = time.perf_counter_ns() - started
    if pump is not None:
        pump.cancel()
    assert task.count == len(events)
    return elapsed / len(events)


async def scheduled(kind: str, events: list[Tick], capacity: int) -> float:
    bus = new_bus(capacity)
    task = AsyncTask() if kind == "async" else SyncTask()
    scheduler = Scheduler(bus)
    scheduler.register_event_task(task)
    await scheduler.start()
    await asyncio.sleep(0)
    started = time.perf_counter_ns()
    await publish_all(bus, events, task, capacity)
    elapsed = time.perf_counter_ns() - started
    await scheduler.shutdown()
    assert task.count == len(events)
    assert scheduler.registry.get(1).handled() == len(events)
    return elapsed / len(events)


async def measure(n: int, repeat: int) -> dict[str, dict[str, list[float]]]:
    events = [Tick(i, 100.0 + i % 7) for i in range(n)]
    results: dict[str, dict[str, list[float]]] = {
        "sync": {"bare": [], "task": []},
        "async": {"bare": [], "task": []},
    }
    for r in range(repeat):
        for kind in ("sync", "async"):
            results[kind]["bare"].append(await bare(kind, events, 4096))
            results[kind]["task"].append(await scheduled(kind, events, 4096))
        print(f"  repetition {r + 1}/{repeat} done", file=sys.stderr, flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--loop", choices=kimiha.runtime.LOOPS, default="uvloop")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    if args.events < 1 or args.repeat < 5:
        parser.error("--events must be >= 1 and --repeat >= 5 (medians of at least 5)")
    results = kimiha.run(measure(args.events, args.repeat), loop=args.loop)
    report = {}
    print(
        f"scheduler overhead, {args.events:,} events x {args.repeat} repetitions on {args.loop} (ns/event, median)"
    )
    print(f"{'handler':<8} {'bare sub':>10} {'event task':>11} {'ratio':>7}   (target <= 1.30)")
    for kind, r in results.items():
        bare_ns, task_ns = statistics.median(r["bare"]), statistics.median(r["task"])
        ratio = task_ns / bare_ns
        report[kind] = {
            "bare_ns": bare_ns,
            "task_ns": task_ns,
            "ratio": ratio,
            "bare_all": r["bare"],
            "task_all": r["task"],
        }
        print(f"{kind:<8} {bare_ns:>10.1f} {task_ns:>11.1f} {ratio:>7.2f}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"loop": args.loop, "events": args.events, "repeat": args.repeat, "results": report},
                fh,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
