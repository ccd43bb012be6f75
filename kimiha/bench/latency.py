"""``kimiha bench latency``: publish-to-handler latency under a paced load, kimiha vs asyncio.Queue.

A publisher task on the event loop sends one event every ``1 / rate`` seconds (100k events/s by default). The
loop's timers are millisecond-grained, so it paces by busy-waiting on the clock, then stamps the event
(``Stamped(seq, ts=monotonic_ns())``), publishes it and yields to the loop once (``await asyncio.sleep(0)``)
so that the consumers run. Each consumer records ``monotonic_ns() - event.ts`` into a
:class:`kimiha.LatencyHistogram` (HDR-style, <= 1.6 % relative error) when its handler is reached. With 4
subscribers every delivery is recorded, so the 4th handler's wait counts as much as the 1st's.

Cases, each with 1 and 4 subscribers (the floors with 1):

* ``direct``         -- the publisher calls the handler itself (through the same one-line wrapper the INLINE case
                        publishes through): what stamping, making the event and reading the clock in the handler
                        cost, i.e. the floor of this measurement. INLINE's latency beyond it is kimiha's.
* ``call_soon``      -- ``loop.call_soon(handler, event)``: the cost of one pass through the event loop, the floor
                        of anything that hands an event from a task to a loop callback.
* ``kimiha``         -- kimiha handler subscriptions (``bus.subscribe(key, handler)``), called by the compiled
                        dispatch loop: the push path.
* ``kimiha-inline``  -- the README idiom ``bus.publish(Ev.MD, event)`` on a ``Dispatch.INLINE`` channel: publish
                        calls the handlers before it returns, no loop pass between publisher and handler.
* ``kimiha-pull``    -- one consumer task per subscription doing ``async for event in sub``: the pull path.
* ``queue``          -- one ``asyncio.Queue`` per subscriber, ``put_nowait`` by the publisher, a consumer task
                        per queue doing ``await q.get()``.

Every case runs ``--events`` recorded events, split into ``--segments`` interleaved segments (case A, B, C, ...
then again), each on a fresh event loop and preceded by unrecorded warm-up events; the table gives the
percentiles of all recorded events together, the JSON adds each segment's. The publisher cannot always keep
the pace (a handler slower than the interval, a preempted process on a shared machine). The schedule is fixed
(event n is due at start + n intervals), so after a stall the publisher sends back to back until it has caught
up: the "late" column counts the events sent more than one interval behind that schedule (the stall and the
backlog after it), "stalls" the sends held up by more than one interval (how often it happened). The
timestamp is the actual send time, so a publisher stall is not counted as latency (coordinated omission).
A case whose achieved rate is under 90 % of the asked rate, or whose events went out late for the most part,
did not hold the load: the report says so above the targets and does not mark its targets met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kimiha
from kimiha import Dispatch, Event, LatencyHistogram
from kimiha._core import monotonic_ns
from kimiha.bench.main import MIN_REPEAT, machine_header, machine_info
from kimiha.bench.cases import (
    Ev,
    close_and_join,
    consume_iter,
    consume_queue,
    new_bus,
    start_consumers,
    stop_queues,
)
from kimiha.bench.runner import LOOPS, SUBSCRIBER_COUNTS, BenchCase, freeze_setup, new_parser, parse_loops
from kimiha.bench.runner import paired_json, rows_by_subscribers, run_interleaved, save_json

__all__ = ["LatencyCase", "Stamped", "main", "run_latency_case"]

DEFAULT_RATE = 100_000
DEFAULT_EVENTS = 200_000
QUICK_EVENTS = 20_000
WARMUP_EVENTS = 2_000

KINDS = {
    "direct": "direct call (measurement floor)",
    "call_soon": "loop.call_soon hop (floor)",
    "kimiha": "kimiha handler",
    "kimiha-inline": "kimiha handler, INLINE",
    "kimiha-pull": "kimiha async for",
    "queue": "asyncio.Queue",
}

#: The project's first-round targets for the kimiha handler (LOOP) case on this machine class (ns), see
#: benchmarks/README.md, "Targets": subscribers -> (p50, p99, p99.9).
TARGETS_NS = {1: (1_200, 3_000, 10_000), 4: (2_000, 6_000, 20_000)}
#: The same for the INLINE case (issue 13: p50 <= 0.3 us, p99 <= 1 us); p99.9 is reported against 10x p99.
INLINE_TARGETS_NS = {1: (300, 1_000, 10_000), 4: (300, 1_000, 10_000)}
#: asyncio.Queue must be at least this many times slower than kimiha at p50 and p99.
QUEUE_RATIO_TARGET = 1.5
#: A case held the asked load when its achieved rate is at least this share of the asked rate ...
HELD_RATE = 0.9
#: ... and fewer than this share of its events went out late (more than one interval behind the schedule):
#: beyond it most events were sent back to back to catch up, a burst, not the asked pace.
HELD_LATE = 0.5


class Stamped(Event, frozen=True, gc=False):
    """The event of the latency run: its sequence number and the clock (``monotonic_ns``) when it was sent."""

    seq: int
    ts: int


# ---------------------------------------------------------------------------------------------------------------
# The paced publisher and the cases.


@dataclass
class Pacing:
    """How well the publisher held its schedule (``due`` = start + seq x interval, fixed in advance)."""

    sent: int = 0
    late: int = 0  # sent more than one interval behind the schedule: a stall and the backlog after it
    stalls: int = 0  # sends that came more than one interval after they could have (the publisher was held up)
    elapsed_ns: int = 0
    end_lag_ns: int = 0  # how far behind the schedule the last event went out (0: on time)

    @property
    def rate(self) -> float:
        return self.sent * 1e9 / self.elapsed_ns if self.elapsed_ns else 0.0


async def pace(pubs: list[Callable[[Stamped], Any]], n: int, warmup: int, interval_ns: int) -> Pacing:
    """Send ``warmup + n`` events, one every ``interval_ns``, yielding to the loop after each.

    The schedule is absolute (event ``k`` is due at start + ``k`` intervals): after a stall the publisher
    sends back to back, without waiting, until it has caught up, so one stall of ``k`` intervals makes ``k`` or
    more events ``late``. ``stalls`` counts the stalls themselves: the sends that came more than one interval
    later than the pace allows after the previous send (more than two intervals after it). The share of late
    events is the backlog; the share of stalls, how often the publisher was held up; ``end_lag_ns``, the
    backlog never caught up.
    """
    now = monotonic_ns
    sleep = asyncio.sleep
    stats = Pacing()
    single = pubs[0] if len(pubs) == 1 else None
    due = now()
    started = due
    last = due - interval_ns  # when the previous event was sent
    lag = 0
    for seq in range(warmup + n):
        if seq == warmup:
            stats.late = stats.stalls = 0
            started = due
        due += interval_ns
        t = now()
        while t < due:  # busy-wait: the loop's timers are millisecond-grained
            t = now()
        lag = t - due
        if lag > interval_ns:
            stats.late += 1
            if t - last > 2 * interval_ns:
                stats.stalls += 1
        last = t
        event = Stamped(seq, now())
        if single is not None:
            single(event)
        else:
            for pub in pubs:
                pub(event)
        await sleep(0)
    stats.elapsed_ns = now() - started
    stats.sent = n
    stats.end_lag_ns = max(0, lag)
    return stats


def make_recorder(hist: LatencyHistogram, warmup: int) -> Callable[[Stamped], None]:
    """Return the handler every case calls: record the event's latency unless it is a warm-up event."""
    record = hist.record
    now = monotonic_ns

    def handler(event: Stamped) -> None:
        if event.seq >= warmup:
            record(now() - event.ts)

    return handler


async def run_direct(hist: LatencyHistogram, subs: int, n: int, warmup: int, interval: int) -> dict[str, Any]:
    handler = make_recorder(hist, warmup)

    def publish(event: Stamped) -> None:
        handler(event)

    pacing = await pace([publish], n, warmup, interval)
    return {"pacing": pacing}


async def run_call_soon(
    hist: LatencyHistogram, subs: int, n: int, warmup: int, interval: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    handler = make_recorder(hist, warmup)
    call_soon = loop.call_soon

    def publish(event: Stamped) -> None:
        for _ in range(subs):
            call_soon(handler, event)

    pacing = await pace([publish], n, warmup, interval)
    await asyncio.sleep(0)
    return {"pacing": pacing}


async def run_kimiha(hist: LatencyHistogram, subs: int, n: int, warmup: int, interval: int) -> dict[str, Any]:
    bus = new_bus(4096, payload_type=Stamped)
    handler = make_recorder(hist, warmup)
    subscriptions = [bus.subscribe(Ev.MD, handler) for _ in range(subs)]
    pacing = await pace([bus.channel(Ev.MD).publish], n, warmup, interval)
    while any(s.backlog for s in subscriptions):
        await asyncio.sleep(0)
    return {"pacing": pacing, "bus": bus.stats(Ev.MD)}


async def run_kimiha_inline(
    hist: LatencyHistogram, subs: int, n: int, warmup: int, interval: int
) -> dict[str, Any]:
    bus = new_bus(4096, payload_type=Stamped, dispatch=Dispatch.INLINE)
    handler = make_recorder(hist, warmup)
    for _ in range(subs):
        bus.subscribe(Ev.MD, handler)

    def publish(event: Stamped) -> None:
        bus.publish(Ev.MD, event)

    pacing = await pace([publish], n, warmup, interval)
    return {"pacing": pacing, "bus": bus.stats(Ev.MD)}


async def run_kimiha_pull(
    hist: LatencyHistogram, subs: int, n: int, warmup: int, interval: int
) -> dict[str, Any]:
    bus = new_bus(4096, payload_type=Stamped)
    handler = make_recorder(hist, warmup)
    tasks = start_consumers(consume_iter, [(bus.subscribe(Ev.MD), handler) for _ in range(subs)])
    await asyncio.sleep(0)  # the consumers park before the first event
    pacing = await pace([bus.channel(Ev.MD).publish], n, warmup, interval)
    await close_and_join(bus, tasks)
    return {"pacing": pacing, "bus": bus.stats(Ev.MD)}


async def run_queue(hist: LatencyHistogram, subs: int, n: int, warmup: int, interval: int) -> dict[str, Any]:
    handler = make_recorder(hist, warmup)
    queues: list[asyncio.Queue[Stamped | None]] = [asyncio.Queue() for _ in range(subs)]
    tasks = start_consumers(consume_queue, [(q, handler) for q in queues])
    await asyncio.sleep(0)
    pacing = await pace([q.put_nowait for q in queues], n, warmup, interval)
    await stop_queues(queues, tasks)
    return {"pacing": pacing}


RUNNERS: dict[str, Callable[..., Coroutine[Any, Any, dict[str, Any]]]] = {
    "direct": run_direct,
    "call_soon": run_call_soon,
    "kimiha": run_kimiha,
    "kimiha-inline": run_kimiha_inline,
    "kimiha-pull": run_kimiha_pull,
    "queue": run_queue,
}


@dataclass
class LatencyCase(BenchCase):
    """A latency case; its samples are its segments (summary, pacing, bus latency), one per repetition."""

    loop: str  # every latency case runs on an event loop
    hist: LatencyHistogram = field(default_factory=LatencyHistogram)  # every recorded event of every segment
    late: int = 0
    stalls: int = 0
    sent: int = 0
    elapsed_ns: int = 0
    end_lag_ns: int = 0  # the largest backlog a segment ended with

    LABELS = KINDS

    @property
    def segments(self) -> list[dict[str, Any]]:
        return self.samples

    @property
    def rate(self) -> float:
        return self.sent * 1e9 / self.elapsed_ns if self.elapsed_ns else 0.0

    @property
    def late_share(self) -> float:
        return self.late / self.sent if self.sent else 0.0

    @property
    def stall_share(self) -> float:
        return self.stalls / self.sent if self.sent else 0.0

    def held(self, asked_rate: float) -> bool:
        """Whether the publisher held the asked load: see :data:`HELD_RATE` and :data:`HELD_LATE`."""
        return self.rate >= HELD_RATE * asked_rate and self.late_share < HELD_LATE

    def segment_values(self, name: str) -> list[float]:
        return [s["summary"][name] for s in self.segments]


def run_latency_case(case: LatencyCase, n: int, warmup: int, rate: int) -> dict[str, Any]:
    """Run one segment of ``case`` (``n`` recorded events) on a fresh loop and verify it; add its histogram
    and pacing to the case's totals; return the segment (the runner keeps it in ``case.samples``)."""
    hist = LatencyHistogram()
    interval = max(1, round(1e9 / rate))
    gc.collect()
    result = kimiha.run(RUNNERS[case.kind](hist, case.subs, n, warmup, interval), loop=case.loop)
    if hist.count != n * case.subs:
        raise RuntimeError(
            f"latency case {case.key}: {hist.count} latencies recorded, expected {n} events x {case.subs} "
            f"subscriber(s) = {n * case.subs}"
        )
    pacing: Pacing = result["pacing"]
    bus = result.get("bus")
    if bus is not None and (bus["lagged"] or bus["delivered"] != (n + warmup) * case.subs):
        raise RuntimeError(f"latency case {case.key}: the channel lagged or lost events: {bus}")
    case.hist.merge(hist)
    case.late += pacing.late
    case.stalls += pacing.stalls
    case.sent += pacing.sent
    case.elapsed_ns += pacing.elapsed_ns
    case.end_lag_ns = max(case.end_lag_ns, pacing.end_lag_ns)
    return {
        "summary": hist.summary(),
        "late": pacing.late,
        "stalls": pacing.stalls,
        "end_lag_ns": pacing.end_lag_ns,
        "rate": round(pacing.rate, 1),
        "bus_latency_ns": bus["latency_ns"] if bus is not None else None,
    }


# ---------------------------------------------------------------------------------------------------------------
# Percentile curves, the table and the plot.

#: Percentiles of the curves: 0 to 99.999 in steps even on a log scale of 1 / (1 - q).
CURVE_QS = [0.0] + [100.0 * (1.0 - 10 ** (-k / 50.0)) for k in range(1, 251)]


def curve(hist: LatencyHistogram) -> list[tuple[float, int]]:
    """Return ``[(percentile, ns), ...]`` up to the resolution the record count allows, then the maximum."""
    top = 100.0 * (1.0 - 1.0 / hist.count) if hist.count > 1 else 0.0
    points = [(q, hist.percentile(q)) for q in CURVE_QS if q <= top]
    points.append((100.0, hist.max))
    return points


@dataclass
class LatencyRatio:
    """asyncio.Queue's percentile over kimiha's, overall and per segment (paired)."""

    subs: int
    loop: str
    pct: str  # "p50" / "p99"
    queue: LatencyCase
    kimiha: LatencyCase

    @property
    def value(self) -> float:
        q = 50.0 if self.pct == "p50" else 99.0
        return self.queue.hist.percentile(q) / max(1, self.kimiha.hist.percentile(q))

    @property
    def paired(self) -> list[float]:
        return [
            a / max(1, b)
            for a, b in zip(self.queue.segment_values(self.pct), self.kimiha.segment_values(self.pct))
        ]

    @property
    def met(self) -> bool:
        return self.value >= QUEUE_RATIO_TARGET

    def held(self, asked_rate: float) -> bool:
        """Whether both cases held the asked load (else the ratio is not a measurement of it)."""
        return self.queue.held(asked_rate) and self.kimiha.held(asked_rate)


def build_ratios(cases: list[LatencyCase]) -> list[LatencyRatio]:
    by_key = {c.key: c for c in cases}
    out = []
    for c in cases:
        if c.kind != "kimiha":
            continue
        queue = by_key.get(f"queue/{c.loop}/{c.subs}")
        if queue is not None:
            out += [LatencyRatio(c.subs, c.loop, pct, queue, c) for pct in ("p50", "p99")]
    return out


#: What a target line says when its case did not hold the asked load.
NOT_MEASURED = "not measured (load not held)"


def target_rows(cases: list[LatencyCase], asked_rate: float) -> list[dict[str, Any]]:
    """The targets of the uvloop kimiha handler cases; ``met`` is ``None`` where the load was not held."""
    rows = []
    for c in cases:
        if c.kind not in ("kimiha", "kimiha-inline") or c.loop != "uvloop":
            continue
        targets = TARGETS_NS if c.kind == "kimiha" else INLINE_TARGETS_NS
        held = c.held(asked_rate)
        for name, q, bound in zip(("p50", "p99", "p99.9"), (50.0, 99.0, 99.9), targets[c.subs]):
            value = c.hist.percentile(q)
            rows.append(
                {
                    "case": c.kind,
                    "subscribers": c.subs,
                    "percentile": name,
                    "value_ns": value,
                    "target_ns": bound,
                    "load_held": held,
                    "met": value <= bound if held else None,
                }
            )
    return rows


def status(met: bool | None, counts: bool) -> str:
    """The status word of a target: capitals where it counts (uvloop), lower case for reference."""
    if met is None:
        return NOT_MEASURED
    word = "met" if met else "missed"
    return word.upper() if counts else word


def us(ns: float) -> str:
    return f"{ns / 1e3:.2f}"


def pct(share: float) -> str:
    return f"{100.0 * share:.1f}%"


def label_width(cases: list[LatencyCase]) -> int:
    """The width of the case column: the longest label among ``cases`` (at least the header's)."""
    return max([len("case")] + [len(c.label) for c in cases])


def table_row(c: LatencyCase, width: int, asked_rate: float) -> str:
    """Return the case's line of the table (``!`` at the end: the load was not held)."""
    s = c.hist.summary()
    return (
        f"{c.label:<{width}} {c.loop:<7} {c.subs:>4} {us(s['p50']):>7} {us(s['p90']):>7} {us(s['p99']):>7} "
        f"{us(s['p99_9']):>7} {us(s['max']):>8} {pct(c.late_share):>6} {pct(c.stall_share):>6} "
        f"{c.rate:>8,.0f}{'' if c.held(asked_rate) else ' !'}"
    )


def not_held_lines(cases: list[LatencyCase], asked_rate: float) -> list[str]:
    """The warning, one line per case, when a case did not hold the asked load; else nothing."""
    missed = [c for c in cases if not c.held(asked_rate)]
    if not missed:
        return []
    lines = [
        f"WARNING: {len(missed)} of {len(cases)} case(s) did not hold the load of {asked_rate:,.0f} events/s "
        f"(rows marked !): their",
        "  latency figures do not show that load, and their targets and ratios are not measured. Try a lower",
        "  --rate, or a quieter machine (another process on the core stalls the busy-waiting publisher).",
    ]
    for c in missed:
        lines.append(
            f"  {c.key}: {c.rate:,.0f} events/s ({c.rate / asked_rate:.0%} of asked), late "
            f"{pct(c.late_share)}, stalls {pct(c.stall_share)}, ended {c.end_lag_ns / 1e6:.2f} ms behind"
        )
    return lines


def format_report(
    cases: list[LatencyCase], args: argparse.Namespace, info: dict[str, Any], elapsed_s: float
) -> str:
    rate = float(args.rate)
    interval_us = 1e6 / args.rate
    lines = machine_header(info) + [
        f"publish -> handler latency, publisher paced at {args.rate:,} events/s (busy-wait, one event every "
        f"{interval_us:g} us);",
        f"{args.events:,} recorded events per case in {args.segments} interleaved segments (+{args.warmup:,} "
        f"warm-up each); total {elapsed_s:.1f} s",
        "percentiles in microseconds over every delivery (4 subscribers: 4 records per event)",
        "late   = events sent more than one interval behind the fixed schedule (start + n intervals): after a",
        "         stall the publisher sends back to back until it has caught up, and every event until then",
        "         counts, so late is the backlog, not the number of stalls",
        "stalls = sends more than one interval later than the pace allows after the previous send (the",
        "         publisher was held up); rate/s = events recorded / time taken (asked: the rate above)",
        f"a case holds the load when rate/s >= {HELD_RATE:.0%} of the asked rate and late < {HELD_LATE:.0%}; "
        f"'!' = it did not",
        "",
    ]
    width = label_width(cases)
    header = (
        f"{'case':<{width}} {'loop':<7} {'subs':>4} {'p50':>7} {'p90':>7} {'p99':>7} {'p99.9':>7} {'max':>8} "
        f"{'late':>6} {'stalls':>6} {'rate/s':>8}"
    )
    lines += [header, "-" * len(header)] + rows_by_subscribers(cases, lambda c: table_row(c, width, rate))
    ratios = build_ratios(cases)
    if ratios:
        header = (
            f"  {'asyncio.Queue / kimiha handler':<30} {'loop':<7} {'subs':>4} {'ratio':>7} "
            f"{'segments min..max':>18} {'target':>7}"
        )
        lines += [header, "-" * (len(header) + 7)]
        for r in ratios:
            paired = r.paired
            counts = r.loop == "uvloop"
            lines.append(
                f"{'*' if counts else ' '} {'at ' + r.pct:<30} {r.loop:<7} {r.subs:>4} {r.value:>6.2f}x "
                f"{min(paired):>8.2f}..{max(paired):<8.2f} {'>= ' + format(QUEUE_RATIO_TARGET, 'g'):>7} "
                f"{status(r.met if r.held(rate) else None, counts)}"
            )
        lines += [
            "* = the project's target for this ratio (uvloop): its status in capitals (MET / MISSED); rows",
            "    without * show the same target on another loop for reference (met / missed)",
            "",
        ]
    lines += not_held_lines(cases, rate)
    rows = target_rows(cases, rate)
    if rows:
        lines += [
            "targets on uvloop (status in capitals: these count). kimiha handler (LOOP): the project's first-round",
            "  targets for this machine class (benchmarks/README.md, Targets); INLINE: issue 13's (p99.9: 10x p99)",
        ]
        kind_width = max(len(KINDS[row["case"]]) for row in rows)
        for row in rows:
            lines.append(
                f"  {KINDS[row['case']]:<{kind_width}} {row['subscribers']} subscriber(s) {row['percentile']:<6} "
                f"{us(row['value_ns']):>7} us (target <= {us(row['target_ns'])} us) {status(row['met'], True)}"
            )
    by_key = {c.key: c for c in cases}
    floor = by_key.get("direct/uvloop/1")
    inline = by_key.get("kimiha-inline/uvloop/1")
    if floor is not None and inline is not None and floor.hist.count and inline.hist.count:
        lines.append("kimiha's share of the INLINE latency (uvloop, 1 subscriber): INLINE minus the direct-call floor")
        for name, q in (("p50", 50.0), ("p99", 99.0)):
            a, b = inline.hist.percentile(q), floor.hist.percentile(q)
            lines.append(f"  {name:<6} {us(a)} - {us(b)} = {us(a - b)} us")
    return "\n".join(line.rstrip() for line in lines)


def to_json(cases: list[LatencyCase], args: argparse.Namespace, info: dict[str, Any]) -> dict[str, Any]:
    return {
        "mode": "latency",
        "machine": info,
        "settings": {
            "rate": args.rate,
            "events": args.events,
            "segments": args.segments,
            "warmup": args.warmup,
            "loops": args.loops,
            "command": " ".join(sys.argv),
        },
        "cases": [
            {
                **c.identity(),
                "latency_ns": c.hist.summary(),
                "segments": c.segments,
                "late": c.late,
                "stalls": c.stalls,
                "sent": c.sent,
                "rate": round(c.rate, 1),
                "end_lag_ns": c.end_lag_ns,
                "load_held": c.held(args.rate),
                "curve": curve(c.hist),
                "buckets": c.hist.buckets(),
            }
            for c in cases
        ],
        "ratios": [
            {
                "ratio": f"asyncio.Queue / kimiha handler at {r.pct}",
                "loop": r.loop,
                "subscribers": r.subs,
                **paired_json(r.value, r.paired),
                "target": f">= {QUEUE_RATIO_TARGET:g}",
                "load_held": r.held(args.rate),
                "met": r.met if r.held(args.rate) else None,
            }
            for r in build_ratios(cases)
        ],
        "targets": target_rows(cases, args.rate),
    }


STYLE = {
    "direct": {"color": "0.3", "linestyle": ":", "linewidth": 1.3},
    "call_soon": {"color": "0.55", "linestyle": "--", "linewidth": 1.3},
    "kimiha": {"color": "#1f5fbf", "linestyle": "-", "linewidth": 2.4},
    "kimiha-inline": {"color": "#9467bd", "linestyle": "-", "linewidth": 2.0},
    "kimiha-pull": {"color": "#2ca02c", "linestyle": "-", "linewidth": 1.6},
    "queue": {"color": "#d62728", "linestyle": "-", "linewidth": 1.6},
}


def plot(cases: list[LatencyCase], path: Path, args: argparse.Namespace, info: dict[str, Any]) -> str | None:
    """Draw the percentile curves to ``path`` (PNG); return why not, or ``None`` once written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullLocator
    except ImportError as exc:
        return (f"matplotlib is not installed ({exc}); pip install 'kimiha[plot]' ('.[plot]' in a checkout) "
                f"for the PNG")

    fig, axes = plt.subplots(1, len(SUBSCRIBER_COUNTS), figsize=(12, 5), sharey=True, squeeze=False)
    ticks_q = [50.0, 90.0, 99.0, 99.9, 99.99, 99.999]
    lo = min((c.hist.min for c in cases if c.hist.count), default=100)
    hi = max((c.hist.max for c in cases if c.hist.count), default=100_000)
    for ax, subs in zip(axes[0], SUBSCRIBER_COUNTS):
        for c in cases:
            if c.subs != subs or not c.hist.count:
                continue
            pts = [(q, ns) for q, ns in curve(c.hist) if q < 100.0]
            xs = [1.0 / (1.0 - q / 100.0) for q, _ in pts]
            ys = [ns / 1e3 for _, ns in pts]
            style = dict(STYLE[c.kind])
            if c.loop != "uvloop":
                style["linestyle"] = ":"
            ax.plot(xs, ys, label=f"{c.label}" + ("" if len(args.loops) == 1 else f" ({c.loop})"), **style)
            ax.plot([xs[-1]], [c.hist.max / 1e3], marker="o", markersize=3.5, color=style["color"])
        if subs in TARGETS_NS:
            for q, bound in zip((50.0, 99.0, 99.9), TARGETS_NS[subs]):
                ax.plot(
                    [1.0 / (1.0 - q / 100.0)],
                    [bound / 1e3],
                    marker="x",
                    markersize=9,
                    mew=2,
                    color="black",
                    linestyle="none",
                    label="kimiha target (p50, p99, p99.9)" if q == 50.0 else None,
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator([1.0 / (1.0 - q / 100.0) for q in ticks_q]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _pos: f"{100.0 * (1.0 - 1.0 / x):g}%"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _pos: f"{y:g}"))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.set_ylim(max(0.1, lo / 1e3 * 0.8), hi / 1e3 * 1.25)
        ax.set_xlim(1.0, 1.0 / (1.0 - ticks_q[-1] / 100.0))
        ax.grid(True, which="major", alpha=0.35)
        ax.set_title(f"{subs} subscriber{'s' if subs > 1 else ''}")
        ax.set_xlabel("percentile (left edge: 0 %; dot: maximum)")
        ax.legend(loc="upper left", fontsize=8.5)
    axes[0][0].set_ylabel("publish -> handler latency (µs, log scale)")
    fig.suptitle(
        f"kimiha {info['kimiha']} vs asyncio.Queue: latency at {args.rate:,} events/s, {args.events:,} events "
        f"per case ({', '.join(args.loops)}; Python {info['python']}, {info['nproc']} CPUs)",
        fontsize=11,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Driver.

EPILOG = """\
examples:
  kimiha bench latency                                  200k events per case at 100k events/s, uvloop
  kimiha bench latency --json lat.json --plot lat.png   also JSON (with the histograms) and the PNG
  kimiha bench latency --loops uvloop,asyncio           the same on both loops
  kimiha bench latency --quick                          smoke run: 20k events per case
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser(
        "kimiha bench latency",
        (
            "Publish-to-handler latency under a paced load, kimiha vs asyncio.Queue: a publisher paced by\n"
            "busy-waiting, a timestamp in each event, an HDR-style histogram at the handler. Prints the\n"
            "percentiles, writes JSON (--json) and a PNG of the percentile curves (--plot, needs matplotlib).\n"
            "A case whose publisher did not hold the asked rate (under 90 %, or mostly late) is flagged and\n"
            "its targets are not marked met or missed."
        ),
        EPILOG,
    )
    parser.add_argument(
        "--rate",
        type=int,
        default=DEFAULT_RATE,
        metavar="PER_S",
        help=f"events per second the publisher sends (default {DEFAULT_RATE:,})",
    )
    parser.add_argument(
        "--events",
        type=int,
        metavar="N",
        help=f"recorded events per case (default {DEFAULT_EVENTS:,}; {QUICK_EVENTS:,} with --quick)",
    )
    parser.add_argument(
        "--segments",
        type=int,
        default=MIN_REPEAT,
        metavar="S",
        help=f"interleaved segments per case, at least {MIN_REPEAT} (default {MIN_REPEAT})",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=WARMUP_EVENTS,
        metavar="N",
        help=f"unrecorded events at the start of each segment (default {WARMUP_EVENTS:,})",
    )
    parser.add_argument(
        "--loops",
        default="uvloop",
        metavar="NAMES",
        help=f"comma-separated event loops among {','.join(LOOPS)} (default uvloop)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer events: a smoke run")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--plot",
        type=Path,
        metavar="PATH",
        default=Path("kimiha-latency.png"),
        help="PNG of the percentile curves (default ./kimiha-latency.png; needs matplotlib)",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the PNG")
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = QUICK_EVENTS if args.quick else DEFAULT_EVENTS
    if args.rate < 1 or args.rate > 10_000_000:
        parser.error(f"--rate: expected 1 to 10,000,000 events/s, got {args.rate}")
    if args.segments < MIN_REPEAT:
        parser.error(
            f"--segments: expected >= {MIN_REPEAT} (medians need at least that many), got {args.segments}"
        )
    if args.events < args.segments:
        parser.error(
            f"--events: expected at least one event per segment (>= {args.segments}), got {args.events}"
        )
    if args.warmup < 0:
        parser.error(f"--warmup: expected >= 0, got {args.warmup}")
    args.loops = parse_loops(parser, args.loops)
    return args


def build_cases(loops: list[str]) -> list[LatencyCase]:
    cases = []
    for subs in SUBSCRIBER_COUNTS:
        for loop in loops:
            for kind in KINDS:
                if kind in ("direct", "call_soon") and subs != 1:
                    continue
                cases.append(LatencyCase(kind, loop, subs))
    return cases


def main(argv: list[str] | None = None) -> int:
    """Run the latency mode; return 0 (targets are reported, not enforced)."""
    args = parse_args(argv)
    started = time.monotonic()
    cases = build_cases(args.loops)
    per_segment = [
        args.events // args.segments + (1 if i < args.events % args.segments else 0)
        for i in range(args.segments)
    ]
    freeze_setup()
    run_interleaved(
        cases,
        args.segments,
        lambda case, seg: run_latency_case(case, per_segment[seg - 1], args.warmup, args.rate),
        note=lambda seg, i, case: (
            f"latency: segment {seg}/{args.segments}, case {i}/{len(cases)} {case.key} "
            f"({per_segment[seg - 1]:,} events)"
        ),
        done=lambda seg, seconds: (
            f"latency: segment {seg}/{args.segments} done in {seconds:.1f} s "
            f"({sum(per_segment[:seg]):,} of {args.events:,} events recorded so far in each of {len(cases)} cases)"
        ),
        rotate=True,
    )
    info = machine_info()
    print(format_report(cases, args, info, time.monotonic() - started))
    if args.json:
        save_json(args.json, to_json(cases, args, info))
    if not args.no_plot:
        why_not = plot(cases, args.plot, args, info)
        if why_not is None:
            print(f"\nplot: {args.plot}")
        else:
            print(f"\nplot: skipped: {why_not}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
