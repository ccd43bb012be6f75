"""``kimiha bench tick``: tick-to-trade on the shipped tape, through the bus and hand-written without one.

One pipeline, the demo's stages, built from the same domain objects in three ways:

* ``floor``  -- a hand-written loop: for each line, ``parse -> book -> strategy -> order -> fill`` as direct
                calls of the functions of :class:`Stages`; no bus, no tasks, no event loop hop.
* ``loop``   -- the same functions as sync ``EventTask`` objects under a ``Scheduler`` on ``Dispatch.LOOP``
                channels (the default), every hand-over the README idiom ``bus.publish(TradingEvent.X, e)``.
* ``inline`` -- the same on ``Dispatch.INLINE`` channels: the connector's publish runs the whole chain.

Two measurements:

* **Paced** (``--rate`` lines/s, 2,000 by default): the connector notes the time (a ReadStamp) when it has read a line;
  the executor records ``now - stamp`` when it handles an order (an order is caused by the line read last:
  at this pace the pipeline is idle again long before the next line). p50 / p99 / p99.9 over every order.
* **As fast as possible**: the whole tape (``--lines``), wall time per line; the ratio to the floor is the
  framework's throughput cost. Beside it, a breakdown of the floor by stage (parse alone, + book, +
  strategy, + executor), and what the bus adds on top (LOOP and INLINE minus the floor).

The strategy is the demo's :class:`~kimiha.trading.strategy.ImbalanceStrategy` made more active so that the
tape yields enough orders for tail percentiles (``STRATEGY``: no smoothing, thresholds 0.5 / 0.3, no
cooldown, no position limit: about one order per 100 lines); every run is checked to send the same orders,
in the same order, as the floor.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kimiha
from kimiha import ChannelConfig, Dispatch, EventBus, LatencyHistogram, Scheduler
from kimiha._core import monotonic_ns
from kimiha.bench.main import MIN_REPEAT, machine_header, machine_info
from kimiha.bench.runner import new_parser, save_json
from kimiha.error import SerializationError
from kimiha.trading.book import BookCheck, BookGap, BookNotReady, OrderBook
from kimiha.trading.model import DepthDiff, DepthSnapshot, Fill, Order, Quote, Signal, Trade
from kimiha.trading.paper import OrderRejected, PaperExecutor
from kimiha.trading.strategy import ImbalanceStrategy
from kimiha.trading.tasks import MarketData, RawMessage, TradingEvent
from kimiha.types import Aggregator, BackgroundTask, Executor, Strategy
from kimiha.venues.binance import recorded_tape
from kimiha.venues.binance.recording import iter_lines
from kimiha.venues.binance.wire import BinanceParser

__all__ = ["Stages", "main"]

DEFAULT_RATE = 2_000
DEFAULT_PACED_LINES = 6_000
DEFAULT_REPEAT = 5
QUICK_LINES = 20_000
QUICK_PACED_LINES = 2_000
QUICK_REPEAT = 3
CHUNK = 1024
#: The strategy's parameters here (the demo's defaults trade about once per 400 lines of the tape).
STRATEGY: dict[str, Any] = {"smoothing": 1.0, "entry_threshold": 0.5, "rearm_threshold": 0.3, "cooldown_ns": 0,
            "max_position": 1.0}

TE = TradingEvent


# ---------------------------------------------------------------------------------------------------------------
# The stages: the same functions for the floor and for the tasks.


@dataclass
class Stages:
    """The demo's pipeline as plain functions over its domain objects (parser, book, strategy, paper book)."""

    parser: BinanceParser = field(default_factory=BinanceParser)
    book: OrderBook = field(default_factory=lambda: OrderBook("", raise_on_gap=True))
    check: BookCheck = field(default_factory=BookCheck)
    replica: OrderBook = field(default_factory=lambda: OrderBook(raise_on_gap=False))
    strategy: ImbalanceStrategy = field(init=False)
    paper: PaperExecutor = field(init=False)
    bad_lines: int = 0
    orders: list[int] = field(default_factory=list)  # order ids, in the order the executor handled them

    def __post_init__(self) -> None:
        self.strategy = ImbalanceStrategy(**STRATEGY)
        self.paper = PaperExecutor(self.replica, fee_bps=10.0)

    def parse(self, line: bytes) -> Any:
        """Decode one wire line (``None`` for a bad one, counted)."""
        try:
            return self.parser.parse(line)
        except SerializationError:
            self.bad_lines += 1
            return None

    def aggregate(self, message: Any) -> list[Any]:
        """Apply a decoded message to the book; return the normalized events it gives, in publish order."""
        if isinstance(message, Quote):
            self.check.on_quote(message)
            return [message]
        if isinstance(message, Trade):
            return [message]
        if isinstance(message, DepthDiff):
            try:
                update = self.book.apply_diff(message)
            except BookGap:
                return [message]
            if update is None:
                return [message]
            self.check.on_update(update)
            return [message, update]
        out: list[Any] = [message]
        try:
            updates = self.book.apply_snapshot(message)
        except BookGap:
            return out
        for update in updates:
            self.check.on_update(update)
        return out + updates

    def decide(self, event: Any) -> tuple[Any, ...]:
        """The strategy's answer to one market event: ``()``, ``(signal,)`` or ``(signal, order)``."""
        kind = type(event)
        if kind is Quote:
            return self.strategy.on_quote(event)
        if kind is Trade:
            return self.strategy.on_trade(event)
        return ()

    def replicate(self, event: Any) -> None:
        """The executor's replica of the book follows the market data."""
        kind = type(event)
        try:
            if kind is DepthDiff:
                self.replica.apply_diff(event)
            elif kind is DepthSnapshot:
                self.replica.apply_snapshot(event)
        except (BookGap, BookNotReady):
            pass

    def execute(self, order: Order) -> Fill:
        """Fill ``order`` on the replica (an empty fill when rejected, as the demo's executor answers)."""
        self.orders.append(order.order_id)
        try:
            return self.paper.execute(order)
        except (OrderRejected, BookNotReady):
            return Fill(order.order_id, order.side, 0.0, math.nan, 0.0, order.ts_ns, requested_qty=order.qty,
                        symbol=order.symbol)


class ReadStamp:
    """When the connector last read a line; what the executor measures from."""

    __slots__ = ("read_ns", "hist")

    def __init__(self) -> None:
        self.read_ns = 0
        self.hist = LatencyHistogram()


# ---------------------------------------------------------------------------------------------------------------
# The floor: hand-written calls.


def floor_line(stages: Stages, line: bytes, stamp: ReadStamp | None) -> None:
    message = stages.parse(line)
    if message is None:
        return
    for event in stages.aggregate(message):
        stages.replicate(event)
        out = stages.decide(event)
        if len(out) > 1:
            order = out[1]
            if stamp is not None:
                stamp.hist.record(monotonic_ns() - stamp.read_ns)
            stages.strategy.on_fill(stages.execute(order))


def floor_fast(stages: Stages, lines: list[bytes]) -> None:
    for line in lines:
        floor_line(stages, line, None)


def breakdown(lines: list[bytes]) -> dict[str, float]:
    """Time the floor stage by stage over ``lines``; return ns per line of each stage."""
    now = time.perf_counter_ns
    stages = Stages()
    t0 = now()
    messages = [stages.parse(line) for line in lines]
    t1 = now()
    events = [stages.aggregate(m) for m in messages if m is not None]
    t2 = now()
    decisions = []
    for batch in events:
        for event in batch:
            stages.replicate(event)
    t3 = now()
    for batch in events:
        for event in batch:
            out = stages.decide(event)
            if len(out) > 1:
                decisions.append(out[1])
    t4 = now()
    for order in decisions:  # the fills go back to the strategy, as in the pipeline
        stages.strategy.on_fill(stages.execute(order))
    t5 = now()
    n = len(lines)
    return {
        "parse": (t1 - t0) / n,
        "book": (t2 - t1) / n,
        "replica": (t3 - t2) / n,
        "strategy": (t4 - t3) / n,
        "executor": (t5 - t4) / n,
    }


# ---------------------------------------------------------------------------------------------------------------
# The bus: the same functions as sync EventTasks, every hand-over bus.publish(TradingEvent.X, e).


class TapeConnector(BackgroundTask):
    """Publishes the lines (paced, or in chunks as fast as the loop allows); sets ``done`` at the end."""

    def __init__(self, bus: EventBus, lines: list[bytes], stamp: ReadStamp, interval_ns: int) -> None:
        self.bus = bus
        self.lines = lines
        self.stamp = stamp
        self.interval_ns = interval_ns
        self.done = asyncio.Event()

    async def execute(self) -> None:
        if self.done.is_set():
            await asyncio.Event().wait()
        bus, stamp, sleep = self.bus, self.stamp, asyncio.sleep
        if self.interval_ns:
            now = monotonic_ns
            due = now()
            for line in self.lines:
                due += self.interval_ns
                while now() < due:
                    await sleep(0)  # the loop runs (LOOP handlers among its callbacks) while we wait
                stamp.read_ns = now()
                bus.publish(TE.RAW_MARKET_DATA, RawMessage(line))
        else:
            for start in range(0, len(self.lines), CHUNK):
                for line in self.lines[start:start + CHUNK]:
                    bus.publish(TE.RAW_MARKET_DATA, RawMessage(line))
                await sleep(0)
        self.done.set()


class SyncAggregator(Aggregator):
    def __init__(self, bus: EventBus, stages: Stages) -> None:
        self.bus, self.stages = bus, stages

    def subscribed_event(self) -> TradingEvent:
        return TE.RAW_MARKET_DATA

    def handle_event(self, raw: RawMessage) -> None:
        message = self.stages.parse(raw.line)
        if message is None:
            return
        for event in self.stages.aggregate(message):
            self.bus.publish(TE.MARKET_DATA, event)


class SyncStrategy(Strategy):
    def __init__(self, bus: EventBus, stages: Stages) -> None:
        self.bus, self.stages = bus, stages

    def subscribed_event(self) -> tuple[TradingEvent, TradingEvent]:
        return (TE.MARKET_DATA, TE.FILLS)

    def handle_event(self, event: Any) -> None:
        if type(event) is Fill:
            self.stages.strategy.on_fill(event)
            return
        out = self.stages.decide(event)
        if out:
            self.bus.publish(TE.SIGNALS, out[0])
            if len(out) > 1:
                self.bus.publish(TE.ORDERS, out[1])


class SyncExecutor(Executor):
    def __init__(self, bus: EventBus, stages: Stages, stamp: ReadStamp, paced: bool) -> None:
        self.bus, self.stages, self.stamp, self.paced = bus, stages, stamp, paced

    def subscribed_event(self) -> tuple[TradingEvent, TradingEvent]:
        return (TE.MARKET_DATA, TE.ORDERS)

    def handle_event(self, event: Any) -> None:
        if type(event) is Order:
            if self.paced:
                self.stamp.hist.record(monotonic_ns() - self.stamp.read_ns)
            self.bus.publish(TE.FILLS, self.stages.execute(event))
        else:
            self.stages.replicate(event)


def pipeline_bus(dispatch: Dispatch) -> EventBus:
    capacity = 1 << 16
    return EventBus([
        (TE.RAW_MARKET_DATA, ChannelConfig(capacity, payload_type=RawMessage, dispatch=dispatch)),
        (TE.MARKET_DATA, ChannelConfig(capacity, payload_type=MarketData, dispatch=dispatch)),
        (TE.SIGNALS, ChannelConfig(capacity, payload_type=Signal, dispatch=dispatch)),
        (TE.ORDERS, ChannelConfig(capacity, payload_type=Order, dispatch=dispatch)),
        (TE.FILLS, ChannelConfig(capacity, payload_type=Fill, dispatch=dispatch)),
    ])


async def run_bus(dispatch: Dispatch, lines: list[bytes], stages: Stages, stamp: ReadStamp,
                  interval_ns: int) -> int:
    """Run the pipeline over ``lines``; return the wall time (ns) from the first publish to the last order."""
    bus = pipeline_bus(dispatch)
    scheduler = Scheduler(bus)
    # consumers first, as the orchestrator wires them: executor, strategy, aggregator, then the connector
    scheduler.register_event_task(SyncExecutor(bus, stages, stamp, paced=interval_ns > 0))
    scheduler.register_event_task(SyncStrategy(bus, stages))
    scheduler.register_event_task(SyncAggregator(bus, stages))
    connector = TapeConnector(bus, lines, stamp, interval_ns)
    scheduler.register_background_task(connector)
    t0 = time.perf_counter_ns()
    await scheduler.start()
    await connector.done.wait()
    while any(s.backlog for ch in bus._all_channels() for s in ch.subscriptions()):
        await asyncio.sleep(0)
    elapsed = time.perf_counter_ns() - t0
    stats = bus.stats()
    await scheduler.shutdown()
    lost = {name: s["lagged"] for name, s in stats.items() if s["lagged"] or s["handler_errors"]}
    if lost:
        raise RuntimeError(f"tick-to-trade {dispatch}: events lagged or handlers failed: {lost}")
    return elapsed


async def run_floor_paced(lines: list[bytes], stages: Stages, stamp: ReadStamp, interval_ns: int) -> int:
    now = monotonic_ns
    sleep = asyncio.sleep
    t0 = time.perf_counter_ns()
    due = now()
    for line in lines:
        due += interval_ns
        while now() < due:
            await sleep(0)  # the same pacing as the connector, on the same loop
        stamp.read_ns = now()
        floor_line(stages, line, stamp)
    return time.perf_counter_ns() - t0


# ---------------------------------------------------------------------------------------------------------------
# Driver.

KINDS = ("floor", "loop", "inline")


@dataclass
class Results:
    fast_ns_per_line: dict[str, list[float]] = field(default_factory=lambda: {k: [] for k in KINDS})
    paced: dict[str, LatencyHistogram] = field(default_factory=lambda: {k: LatencyHistogram() for k in KINDS})
    paced_p50: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in KINDS})
    stages: dict[str, list[float]] = field(default_factory=dict)
    orders: dict[str, int] = field(default_factory=dict)


def run_one(kind: str, lines: list[bytes], interval_ns: int, loop: str) -> tuple[int, Stages, ReadStamp]:
    stages = Stages()
    stamp = ReadStamp()
    gc.collect()
    coro: Coroutine[Any, Any, int]
    if kind == "floor":
        if interval_ns:
            coro = run_floor_paced(lines, stages, stamp, interval_ns)
        else:
            t0 = time.perf_counter_ns()
            floor_fast(stages, lines)
            return time.perf_counter_ns() - t0, stages, stamp
    else:
        coro = run_bus(Dispatch.INLINE if kind == "inline" else Dispatch.LOOP, lines, stages, stamp, interval_ns)
    return kimiha.run(coro, loop=loop), stages, stamp


def measure(args: argparse.Namespace, lines: list[bytes], note: Callable[[str], None]) -> Results:
    res = Results()
    paced_lines = lines[: args.paced_lines]
    interval_ns = round(1e9 / args.rate)
    reference: dict[str, list[int]] = {}
    for rep in range(1, args.repeat + 1):
        for kind in KINDS:
            note(f"rep {rep}/{args.repeat}: {kind}, as fast as possible")
            elapsed, stages, _ = run_one(kind, lines, 0, args.loop)
            res.fast_ns_per_line[kind].append(elapsed / len(lines))
            check(reference, "fast", kind, stages)
            note(f"rep {rep}/{args.repeat}: {kind}, paced at {args.rate} lines/s")
            _, stages, stamp = run_one(kind, paced_lines, interval_ns, args.loop)
            check(reference, "paced", kind, stages)
            res.paced[kind].merge(stamp.hist)
            res.paced_p50[kind].append(stamp.hist.percentile(50))
            res.orders[kind] = stamp.hist.count
        note(f"rep {rep}/{args.repeat}: floor stage by stage")
        for name, value in breakdown(lines).items():
            res.stages.setdefault(name, []).append(value)
    return res


def check(reference: dict[str, list[int]], what: str, kind: str, stages: Stages) -> None:
    """Every way of running the pipeline must send the same orders, in the same order."""
    want = reference.setdefault(what, stages.orders)
    if stages.orders != want or not want:
        raise RuntimeError(
            f"tick-to-trade {kind} ({what}): the executor handled {len(stages.orders)} orders, the floor "
            f"{len(want)}; they must be the same orders (and there must be some)")


def us(ns: float) -> str:
    return f"{ns / 1e3:.2f}"


def report(res: Results, args: argparse.Namespace, n_lines: int, elapsed_s: float) -> tuple[str, dict[str, Any]]:
    info = machine_info()
    lines = machine_header(info) + [
        f"tape: {n_lines} lines as fast as possible, the first {args.paced_lines} paced at {args.rate} lines/s; "
        f"{args.repeat} interleaved repetitions on {args.loop}; strategy {STRATEGY}; total {elapsed_s:.1f} s",
        "",
        "tick-to-trade, paced (connector read a line -> executor handles the order it caused), us:",
        f"{'case':<10} {'orders':>7} {'p50':>8} {'p99':>8} {'p99.9':>8} {'max':>8} {'p50 / floor':>12}",
    ]
    floor_p50 = res.paced["floor"].percentile(50)
    data: dict[str, Any] = {"mode": "tick", "machine": info, "settings": {
        "lines": n_lines, "paced_lines": args.paced_lines, "rate": args.rate, "repeat": args.repeat,
        "loop": args.loop, "strategy": STRATEGY, "command": " ".join(sys.argv)}, "paced": {},
        "fast": {}, "breakdown_ns_per_line": {}}
    for kind in KINDS:
        h = res.paced[kind]
        p50, p99, p999 = h.percentile(50), h.percentile(99), h.percentile(99.9)
        lines.append(f"{kind:<10} {h.count:>7} {us(p50):>8} {us(p99):>8} {us(p999):>8} {us(h.max):>8} "
                     f"{p50 / max(1, floor_p50):>11.2f}x")
        data["paced"][kind] = {"orders": h.count, "p50_ns": p50, "p99_ns": p99, "p99_9_ns": p999, "max_ns": h.max,
                               "p50_per_repetition_ns": res.paced_p50[kind]}
    lines += ["", "whole tape as fast as possible, ns per line (median, min..max of the repetitions):"]
    floor_med = statistics.median(res.fast_ns_per_line["floor"])
    for kind in KINDS:
        values = res.fast_ns_per_line[kind]
        med = statistics.median(values)
        lines.append(f"{kind:<10} {med:>9.0f} {min(values):>9.0f}..{max(values):<9.0f} {med / floor_med:>6.2f}x floor")
        data["fast"][kind] = {"median": med, "samples": values, "x_floor": med / floor_med}
    lines += ["", "where the time goes, ns per line (floor stage by stage, medians; bus = pipeline - floor):"]
    total = 0.0
    for name, values in res.stages.items():
        med = statistics.median(values)
        total += med
        lines.append(f"  {name:<10} {med:>8.0f}")
        data["breakdown_ns_per_line"][name] = med
    for kind in ("loop", "inline"):
        bus = statistics.median(res.fast_ns_per_line[kind]) - floor_med
        lines.append(f"  bus ({kind}) {bus:>6.0f}")
        data["breakdown_ns_per_line"][f"bus_{kind}"] = bus
    lines.append(f"  (stages sum {total:.0f}, the floor's loop {floor_med:.0f})")
    return "\n".join(lines), data


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser(
        "kimiha bench tick",
        "Tick-to-trade on the shipped Binance tape: the demo's parse -> book -> strategy -> order -> fill\n"
        "stages through kimiha's bus (LOOP and INLINE channels, sync EventTasks under a Scheduler, the README\n"
        "idiom) and hand-written without a bus. Paced latency percentiles and whole-tape throughput.",
        "examples:\n  kimiha bench tick --quick\n  kimiha bench tick --json /tmp/tick.json\n",
    )
    parser.add_argument("--lines", type=int, help="lines of the tape for the throughput runs (default: all)")
    parser.add_argument("--paced-lines", type=int, help=f"lines of the paced runs (default {DEFAULT_PACED_LINES})")
    parser.add_argument("--rate", type=int, default=DEFAULT_RATE, help="lines per second when paced (default 2000)")
    parser.add_argument("--repeat", type=int, help=f"interleaved repetitions (default {DEFAULT_REPEAT})")
    parser.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"], help="event loop (default uvloop)")
    parser.add_argument("--quick", action="store_true", help="fewer lines and repetitions: a smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = QUICK_REPEAT if args.quick else DEFAULT_REPEAT
    if args.paced_lines is None:
        args.paced_lines = QUICK_PACED_LINES if args.quick else DEFAULT_PACED_LINES
    if args.lines is None and args.quick:
        args.lines = QUICK_LINES
    if args.repeat < (1 if args.quick else MIN_REPEAT):
        parser.error(f"--repeat: expected >= {MIN_REPEAT}, got {args.repeat}")
    if not 1 <= args.rate <= 1_000_000:
        parser.error(f"--rate: expected 1 to 1,000,000 lines/s, got {args.rate}")
    for name in ("lines", "paced_lines"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')}: expected >= 1, got {value}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the tick-to-trade benchmark; print the tables; return 0 (targets are reported, not enforced)."""
    args = parse_args(argv)
    started = time.monotonic()
    lines = list(iter_lines(recorded_tape()))
    if args.lines is not None:
        lines = lines[: args.lines]
    args.paced_lines = min(args.paced_lines, len(lines))

    def note(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    res = measure(args, lines, note)
    text, data = report(res, args, len(lines), time.monotonic() - started)
    print(text)
    if args.json:
        save_json(args.json, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
