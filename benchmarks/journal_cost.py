"""What journaling a channel costs per event (issue 14): the same flood with and without a JournalWriter.

Each repetition publishes N pre-built events through one BLOCK channel to a counting sync handler, once bare
and once with a :class:`kimiha.journal.JournalWriter` on the channel (fsync "never", file in a temporary
directory, flushed every 50 ms by its loop and once more before the clock stops), interleaved; the table shows the medians in ns/event, the
difference (the journal's cost per event: the ring's one msgpack encode of the slot, the record header, CRC-32
and the buffered write) and the ratio, all from the same run.

    python benchmarks/journal_cost.py [--events N] [--repeat R] [--loop uvloop|asyncio] [--fsync POLICY]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import kimiha
from kimiha import ChannelConfig, Event, EventBus, EventType, Overflow, Scheduler
from kimiha.journal import JournalWriter


class Ev(EventType):
    TICKS = "Ticks"


class Tick(Event):
    price: float
    seq: int


async def flood(events: list[Tick], journal: Path | None, fsync: str) -> float:
    bus = EventBus([(Ev.TICKS, ChannelConfig(4096, overflow=Overflow.BLOCK, payload_type=Tick))])
    count = [0]
    done = asyncio.Event()
    n = len(events)

    def handler(event: Tick) -> None:
        count[0] += 1
        if count[0] == n:
            done.set()

    bus.subscribe(Ev.TICKS, handler)
    writer = None
    scheduler = Scheduler(bus)
    if journal is not None:
        writer = JournalWriter(bus, journal, [Ev.TICKS], fsync=fsync)  # flushed (and synced) every 50 ms
        scheduler.register_background_task(writer)
    await scheduler.start()
    channel = bus.channel(Ev.TICKS)
    publish = channel.publish_async
    start = time.perf_counter_ns()
    for event in events:
        await publish(event)
    await done.wait()
    if writer is not None:
        writer.flush()
    elapsed = time.perf_counter_ns() - start
    await scheduler.shutdown()
    if writer is not None:
        assert writer.records == n, (writer.records, n)
    return elapsed / n


def _at_least_one(what: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise argparse.ArgumentTypeError(f"expected a whole number of {what} >= 1, got {text!r}")
        return value

    return parse


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not the usage block (as the kimiha CLI does)
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def main() -> None:
    parser = _Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=_at_least_one("events"), default=200_000)
    parser.add_argument("--repeat", type=_at_least_one("repetitions"), default=7)
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--fsync", default="never", choices=("never", "batch"))
    args = parser.parse_args()
    events = [Tick(60_000.0 + i * 0.01, i) for i in range(args.events)]
    bare, journaled = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeat):
            bare.append(kimiha.run(flood(events, None, args.fsync), loop=args.loop))
            journaled.append(kimiha.run(flood(events, Path(tmp) / f"j{rep}", args.fsync), loop=args.loop))
    b, j = statistics.median(bare), statistics.median(journaled)
    print(f"journal cost, {args.events:,} events x {args.repeat} interleaved repetitions, {args.loop}, "
          f"fsync {args.fsync} (medians)")
    print(f"  {'case':<28} {'ns/event':>9}")
    print(f"  {'bare channel':<28} {b:>9.0f}")
    print(f"  {'channel + journal':<28} {j:>9.0f}")
    print(f"  {'journal cost per event':<28} {j - b:>9.0f}   ratio {j / b:.2f}x")


if __name__ == "__main__":
    main()
