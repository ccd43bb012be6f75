"""Command line: ``kimiha demo`` runs the main job on the embedded in-process bus."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import kimiha
from kimiha import ChannelConfig, Event, EventBus, EventType

__all__ = ["main"]


class DemoEvent(EventType):
    TICKS = "Ticks"
    SIGNALS = "Signals"


class Tick(Event):
    seq: int
    price: float


class Signal(Event):
    seq: int
    ema: float
    side: str


async def _bus_demo(events: int, loop_name: str) -> int:
    bus = EventBus(
        [
            (DemoEvent.TICKS, ChannelConfig(4096, "synthetic prices", payload_type=Tick)),
            (DemoEvent.SIGNALS, ChannelConfig(1024, "EMA crossings", payload_type=Signal)),
        ]
    )
    state = {"ema": 100.0, "above": False}

    def on_tick(tick: Tick) -> None:  # a plain function: called straight from the compiled dispatch loop
        state["ema"] += 0.05 * (tick.price - state["ema"])
        above = tick.price > state["ema"]
        if above != state["above"]:
            state["above"] = above
            bus.publish(DemoEvent.SIGNALS, Signal(tick.seq, state["ema"], "BUY" if above else "SELL"))

    bus.subscribe(DemoEvent.TICKS, on_tick)
    signals = bus.subscribe(DemoEvent.SIGNALS)
    ticks = bus.channel(DemoEvent.TICKS)
    started = time.perf_counter()
    price, received = 100.0, 0
    for seq in range(events):
        price += ((seq * 7919) % 13 - 6) * 0.01
        await ticks.publish_async(Tick(seq, price))
        if seq % 1024 == 1023:
            await kimiha.runtime.asyncio.sleep(0)
            received += len(signals.drain())
    await kimiha.runtime.asyncio.sleep(0)
    received += len(signals.drain())
    elapsed = time.perf_counter() - started
    print(f"kimiha {kimiha.__version__} bus demo on {loop_name}: {events:,} ticks -> {received:,} signals "
          f"in {elapsed:.3f} s ({events / elapsed:,.0f} ticks/s)")
    print(bus.format_stats())
    bus.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimiha", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the main job on the embedded in-process bus")
    demo.add_argument("--events", type=int, default=200_000, help="number of ticks to publish")
    demo.add_argument("--loop", choices=kimiha.runtime.LOOPS, default="uvloop", help="event loop")
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.events < 1:
            parser.error(f"--events: expected a positive int, got {args.events}")
        return kimiha.run(_bus_demo(args.events, args.loop), loop=args.loop)
    return 2  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())
