"""Cost of the Cython strategy against its Python twin, through the bus and called directly.

Interleaved repetitions in one process; ns per tick (medians) and ratios of medians. Build the extension first:
``cythonize -i -3 examples/cython_strategy/strategy.pyx``.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import kimiha  # noqa: E402
from kimiha import ChannelConfig, Dispatch, EventBus  # noqa: E402

import strategy  # noqa: E402
from reference import PyBandStrategy, make_ticks  # noqa: E402
from strategy_events import Ev, Order, Tick  # noqa: E402


def new_bus() -> tuple[EventBus, object]:
    bus = EventBus([
        (Ev.TICKS, ChannelConfig(1 << 16, payload_type=Tick, dispatch=Dispatch.INLINE)),
        (Ev.ORDERS, ChannelConfig(1 << 16, payload_type=Order)),
    ])
    return bus, bus.subscribe(Ev.ORDERS)  # the orders are kept (a pull reader), as a venue gateway would


def direct(make: Callable[..., object], ticks: list[Tick]) -> int:
    bus, _ = new_bus()
    strat = make(bus.channel(Ev.ORDERS))
    call = strat  # Python calls the handler itself: the floor of a Python strategy
    t0 = time.perf_counter_ns()
    for tick in ticks:
        call(tick)  # type: ignore[operator]
    return time.perf_counter_ns() - t0


def via_bus(make: Callable[..., object], ticks: list[Tick], producer: str) -> int:
    bus, _ = new_bus()
    bus.subscribe(Ev.TICKS, make(bus.channel(Ev.ORDERS)))
    if producer == "cython":
        t0 = time.perf_counter_ns()
        strategy.publish_ticks(bus.channel(Ev.TICKS), ticks)
        return time.perf_counter_ns() - t0
    t0 = time.perf_counter_ns()
    for tick in ticks:
        bus.publish(Ev.TICKS, tick)
    return time.perf_counter_ns() - t0


CASES: dict[str, Callable[[list[Tick]], int]] = {
    "python strategy, called directly": lambda t: direct(PyBandStrategy, t),
    "python strategy, bus.publish -> INLINE": lambda t: via_bus(PyBandStrategy, t, "python"),
    "cython strategy, bus.publish -> INLINE": lambda t: via_bus(strategy.BandStrategy, t, "python"),
    "cython strategy, publish_c from C -> INLINE": lambda t: via_bus(strategy.BandStrategy, t, "cython"),
}


async def measure(args: argparse.Namespace) -> dict[str, list[float]]:
    ticks = make_ticks(args.events)
    samples: dict[str, list[float]] = {name: [] for name in CASES}
    for name, run in CASES.items():  # warm-up
        run(ticks[:2000])
    for _ in range(args.repeat):
        for name, run in CASES.items():
            gc.collect()
            samples[name].append(run(ticks) / len(ticks))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    samples = kimiha.run(measure(args))  # handler subscriptions live on a running loop
    base = statistics.median(samples["python strategy, called directly"])
    print(f"{args.events} ticks x {args.repeat} interleaved repetitions, Python {sys.version.split()[0]}")
    print(f"{'case':<46} {'ns/tick':>8} {'min':>8} {'max':>8} {'x direct python':>16}")
    for name, values in samples.items():
        med = statistics.median(values)
        print(f"{name:<46} {med:>8.1f} {min(values):>8.1f} {max(values):>8.1f} {med / base:>15.2f}x")


if __name__ == "__main__":
    main()
