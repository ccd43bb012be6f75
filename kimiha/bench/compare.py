"""``kimiha bench compare``: kimiha's event bus side by side with direct calls, asyncio.Queue, pyee and Nautilus.

Every case delivers the same N pre-built ``Tick`` events to the same trivial handler (it counts the event and
reads one attribute) once per subscriber, and every run is checked afterwards: each handler must have seen
exactly N events, the last one being the last published. Repetitions are interleaved (A, B, C, A, B, C, ...)
in one process so that drift of a noisy machine hits every case alike; the table shows the median, min and max
of the per-repetition ns per published event, and ratios of medians with the range of the per-repetition
(paired) ratios.

Every kimiha case publishes as the README teaches, ``bus.publish(Ev.MD, e)``, into ``EventTask`` objects run by a
``Scheduler`` (or, for the pull cases, into ``async for`` consumers); the same handler method
(``SinkTask.handle_event``, see :mod:`kimiha.bench.cases`) is called by every case, the floor and the other
libraries included. Cases, each with 1 and 4 subscribers:

* ``floor``          -- the producer calls the handler(s) itself: ``for e in events: h(e)``.
* ``bound``          -- the cheapest per-event deferred hand-off a Python producer can make: ``list.append``
                        every event (one C call), then call the handler(s) over the list.
* ``bound-inline``   -- the least any compiled bus can cost on the README idiom when it calls the handlers
                        inside ``publish``: ``bound.publish(Ev.MD, e)`` into a compiled object that calls each
                        handler as kimiha's dispatch loop does and does nothing else (no lookup, ring, counters
                        or fault isolation; :mod:`kimiha.bench._bounds`). INLINE, pyee and Nautilus have this
                        shape: a Python call into C, then a call from C into Python per handler.
* ``bound-loop``     -- the same least for a bus that defers: ``publish`` stores the event, and after each
                        chunk a compiled ``flush()`` calls the handlers over what was stored (LOOP's shape,
                        less its loop callback).
* ``sync``           -- the README idiom on a ``Dispatch.LOOP`` channel (the default): ``bus.publish(Ev.MD, e)``
                        in chunks, yielding to the loop between chunks; the compiled dispatch loop calls the
                        EventTasks. Latency tracking at its default (``sync-nolat``: off).
* ``inline``         -- the same on a ``Dispatch.INLINE`` channel: ``publish`` calls the EventTasks itself.
* ``*-hoisted``      -- the same with a hoisted ``channel = bus.channel(Ev.MD)`` and ``channel.publish(e)``.
* ``publish-idiom``  -- publish alone: ``bus.publish(Ev.MD, e)`` to pull subscriptions drained every 1024
                        events; ``publish-hoisted`` the same with the hoisted channel (``-nolat``: tracking off).
* ``flood-iter``     -- one consumer task per pull subscription doing ``async for ev in sub``.
* ``flood-batch``    -- the same with ``await sub.recv_batch()`` (a drain of every ready event per wake-up);
                        ``flood-batches`` with ``async for batch in sub.batches()``. ``-nolat``: tracking off.
* ``queue``          -- one ``asyncio.Queue`` per subscriber, ``put_nowait`` by the producer, ``await q.get()``
                        consumer tasks: the classic alternative to a broadcast bus.
* ``pyee``           -- pyee's ``EventEmitter``: ``emit`` calls the handlers inline.
* ``nautilus``       -- NautilusTrader's ``MessageBus``, tuned so that it skips its external-serialization
                        check (see ``kimiha.bench.anchors``); ``publish`` calls the handlers inline.
                        ``nautilus-default`` is the same bus with its default configuration.

pyee and NautilusTrader come with ``pip install 'kimiha[bench]'`` (``'.[bench]'`` in a checkout); without them their cases are skipped with a
note saying why.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
import textwrap
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kimiha
from kimiha import Dispatch, Scheduler
from kimiha.bench.main import MIN_REPEAT, machine_header, machine_info, progress
from kimiha.bench._bounds import InlineBound, LoopBound
from kimiha.bench.anchors import NAUTILUS_TOPIC, PYEE_EVENT, Anchor, load_nautilus, load_pyee
from kimiha.bench.cases import (
    SEED,
    Ev,
    Sink,
    SinkTask,
    Tick,
    call_direct,
    chunked,
    close_and_join,
    consume_batch,
    consume_batches,
    consume_iter,
    consume_queue,
    idiom_flood,
    make_events,
    new_bus,
    publish_idiom,
    push_flood,
    queue_flood,
    start_consumers,
)
from kimiha.bench.runner import LOOPS, SUBSCRIBER_COUNTS, BenchCase, freeze_setup, new_parser, parse_loops
from kimiha.bench.runner import paired_json, rows_by_subscribers, run_interleaved, save_json
from kimiha.channel_config import DEFAULT_LATENCY_SAMPLE, MAX_CAPACITY

__all__ = ["Case", "Ev", "Setup", "Sink", "SinkTask", "Tick", "main", "make_events", "new_bus", "run_case"]

DEFAULT_EVENTS = 200_000
DEFAULT_REPEAT = 9
QUICK_EVENTS = 50_000
QUICK_REPEAT = 5
WARMUP_EVENTS = 5_000

perf_counter_ns = time.perf_counter_ns  # the clock of every timed span; --clock cpu makes it thread_time_ns
#: ``cpu`` is the CPU time of the thread that runs the case (every case runs on the calling thread, its event loop
#: included), not of the process: the process's time also counts its other threads, such as the io_uring
#: submission-polling kernel thread that uvloop's libuv (1.48, in uvloop 0.22) starts for every event loop, which
#: spins beside a busy loop and added up to 80 % to the loop cases of a ``--clock cpu`` run.
CLOCKS = {"wall": time.perf_counter_ns, "cpu": time.thread_time_ns}


# ---------------------------------------------------------------------------------------------------------------
# The cases. Each returns (elapsed_ns, channel stats or None); setup and checks stay outside the timed span.
# The events, the handler, the bus and the floods come from kimiha.bench.cases, shared with benchmarks/.


def run_floor(events: list[Tick], handlers: list[Callable[[Tick], None]]) -> tuple[int, None]:
    t0 = perf_counter_ns()
    call_direct(events, handlers)
    return perf_counter_ns() - t0, None


def run_bound(events: list[Tick], handlers: list[Callable[[Tick], None]]) -> tuple[int, None]:
    buf: list[Tick] = []
    append = buf.append
    t0 = perf_counter_ns()
    for e in events:
        append(e)
    for h in handlers:
        call_direct(buf, (h,))
    return perf_counter_ns() - t0, None


def run_bound_inline(chunks: list[list[Tick]], handlers: list[Callable[[Tick], None]]) -> tuple[int, None]:
    bound = InlineBound(handlers)
    t0 = perf_counter_ns()
    for chunk in chunks:
        for e in chunk:
            bound.publish(Ev.MD, e)
    return perf_counter_ns() - t0, None


def run_bound_loop(chunks: list[list[Tick]], handlers: list[Callable[[Tick], None]]) -> tuple[int, None]:
    bound = LoopBound(handlers, max(len(c) for c in chunks))
    t0 = perf_counter_ns()
    for chunk in chunks:
        for e in chunk:
            bound.publish(Ev.MD, e)
        bound.flush()
    return perf_counter_ns() - t0, None


def run_pyee(anchor: Anchor, events: list[Tick], handlers: list[Callable[[Tick], None]]) -> tuple[int, None]:
    emit = anchor.factory(handlers).emit
    name = PYEE_EVENT
    t0 = perf_counter_ns()
    for e in events:
        emit(name, e)
    return perf_counter_ns() - t0, None


def run_nautilus(
    anchor: Anchor, events: list[Tick], handlers: list[Callable[[Tick], None]], tuned: bool
) -> tuple[int, dict[str, Any]]:
    bus = anchor.factory(handlers)
    publish = bus.publish
    topic = NAUTILUS_TOPIC
    if tuned:
        t0 = perf_counter_ns()
        for e in events:
            publish(topic, e, False)
    else:
        t0 = perf_counter_ns()
        for e in events:
            publish(topic, e)
    elapsed = perf_counter_ns() - t0
    return elapsed, {"published": bus.pub_count}


async def run_tasks(
    chunks: list[list[Tick]], sinks: list[SinkTask], capacity: int, track_latency: bool, dispatch: Dispatch,
    hoisted: bool,
) -> tuple[int, dict[str, Any]]:
    """EventTasks under a Scheduler fed by ``bus.publish(Ev.MD, e)`` (or a hoisted ``channel.publish``)."""
    bus = new_bus(capacity, track_latency, dispatch=dispatch)
    scheduler = Scheduler(bus)
    for sink in sinks:
        scheduler.register_event_task(sink)
    await scheduler.start()
    subs = bus.channel(Ev.MD).subscriptions()
    t0 = perf_counter_ns()
    if hoisted:
        await push_flood(bus.channel(Ev.MD).publish, subs, chunks)
    else:
        await idiom_flood(bus, subs, chunks)
    elapsed = perf_counter_ns() - t0
    stats = bus.stats(Ev.MD)
    stats["inline_direct"] = bus.channel(Ev.MD).inline_direct
    await scheduler.shutdown()
    return elapsed, stats


def run_publish(
    events: list[Tick], subs: int, capacity: int, track_latency: bool, hoisted: bool
) -> tuple[int, dict[str, Any]]:
    """Publish alone: every 1024 events the pull subscriptions drain what was published."""
    bus = new_bus(capacity, track_latency)
    drains = [bus.subscribe(Ev.MD).drain for _ in range(subs)]
    batches = chunked(events, min(1024, capacity))
    if hoisted:
        publish = bus.channel(Ev.MD).publish
        t0 = perf_counter_ns()
        for batch in batches:
            for e in batch:
                publish(e)
            for drain in drains:
                drain()
    else:
        t0 = perf_counter_ns()
        for batch in batches:
            for e in batch:
                bus.publish(Ev.MD, e)
            for drain in drains:
                drain()
    elapsed = perf_counter_ns() - t0
    return elapsed, bus.stats(Ev.MD)


async def run_flood(
    chunks: list[list[Tick]],
    handlers: list[Callable[[Tick], None]],
    capacity: int,
    consume: Callable[[Any, Any], Coroutine[Any, Any, None]],
    track_latency: bool,
) -> tuple[int, dict[str, Any]]:
    bus = new_bus(capacity, track_latency)
    tasks = start_consumers(consume, [(bus.subscribe(Ev.MD), h) for h in handlers])
    await asyncio.sleep(0)  # every consumer starts and parks before the clock starts
    t0 = perf_counter_ns()
    await publish_idiom(bus, chunks)
    await close_and_join(bus, tasks)
    elapsed = perf_counter_ns() - t0
    return elapsed, bus.stats(Ev.MD)


async def run_queue(chunks: list[list[Tick]], handlers: list[Callable[[Tick], None]]) -> tuple[int, None]:
    queues: list[asyncio.Queue[Tick | None]] = [asyncio.Queue() for _ in handlers]
    tasks = start_consumers(consume_queue, zip(queues, handlers))
    await asyncio.sleep(0)
    t0 = perf_counter_ns()
    await queue_flood(queues, tasks, chunks)
    return perf_counter_ns() - t0, None


# ---------------------------------------------------------------------------------------------------------------
# Case table, one measured run, verification.

KINDS = {
    "floor": "floor: direct calls",
    "bound": "bound: list.append + direct calls",
    "bound-inline": "bound: compiled, calls in publish",
    "bound-loop": "bound: compiled, calls per chunk",
    "sync": "kimiha README idiom, LOOP",
    "sync-nolat": "kimiha README idiom, LOOP, no latency",
    "inline": "kimiha README idiom, INLINE",
    "inline-nolat": "kimiha README idiom, INLINE, no latency",
    "sync-hoisted": "kimiha hoisted channel, LOOP",
    "inline-hoisted": "kimiha hoisted channel, INLINE",
    "flood-iter": "kimiha flood, async for",
    "flood-iter-nolat": "kimiha flood, async for, no latency",
    "flood-batch": "kimiha flood, recv_batch",
    "flood-batch-nolat": "kimiha flood, recv_batch, no latency",
    "flood-batches": "kimiha flood, async for batches()",
    "queue": "asyncio.Queue fan-out",
    "publish-idiom": "publish only: bus.publish(Ev.MD, e)",
    "publish-idiom-nolat": "publish only: bus.publish, no latency",
    "publish-hoisted": "publish only: channel.publish(e)",
    "publish-hoisted-nolat": "publish only: channel.publish, no latency",
    "pyee": "pyee EventEmitter.emit",
    "nautilus": "Nautilus MessageBus, tuned",
    "nautilus-default": "Nautilus MessageBus, default config",
}
LOOP_KINDS = (
    "sync",
    "sync-nolat",
    "inline",
    "inline-nolat",
    "sync-hoisted",
    "inline-hoisted",
    "flood-iter",
    "flood-iter-nolat",
    "flood-batch",
    "flood-batch-nolat",
    "flood-batches",
    "queue",
)
#: The lower bounds, no event loop.
BOUND_KINDS = ("bound", "bound-inline", "bound-loop")
#: Cases without an event loop: the publish path alone.
PUBLISH_KINDS = ("publish-idiom", "publish-idiom-nolat", "publish-hoisted", "publish-hoisted-nolat")
FLOOD_CONSUMERS: dict[str, Callable[[Any, Any], Coroutine[Any, Any, None]]] = {
    "flood-iter": consume_iter,
    "flood-batch": consume_batch,
    "flood-batches": consume_batches,
}
#: Cases of other libraries: kind -> loader. They call handlers inline, without an event loop.
ANCHOR_KINDS: dict[str, Callable[[], Anchor]] = {
    "pyee": load_pyee,
    "nautilus": lambda: load_nautilus(tuned=True),
    "nautilus-default": lambda: load_nautilus(tuned=False),
}


@dataclass
class Case(BenchCase):
    """A comparison case; its samples are ns per published event, one per repetition."""

    anchor: Anchor | None = None

    LABELS = KINDS


@dataclass
class Setup:
    n: int
    capacity: int
    events: list[Tick]
    chunks: list[list[Tick]]


def load_anchors(kinds: list[str]) -> dict[str, Anchor]:
    """Load the other libraries' cases among ``kinds``; unavailable ones come back with a ``reason``."""
    return {kind: ANCHOR_KINDS[kind]() for kind in kinds if kind in ANCHOR_KINDS}


def build_cases(loops: list[str], anchors: dict[str, Anchor] | None = None) -> list[Case]:
    anchors = anchors or {}
    cases = []
    for subs in SUBSCRIBER_COUNTS:
        cases.append(Case("floor", None, subs))
        for kind in BOUND_KINDS:
            cases.append(Case(kind, None, subs))
        for kind in PUBLISH_KINDS:
            cases.append(Case(kind, None, subs))
        for kind, anchor in anchors.items():
            if anchor.available:
                cases.append(Case(kind, None, subs, anchor=anchor))
        for loop in loops:
            for kind in LOOP_KINDS:
                cases.append(Case(kind, loop, subs))
    return cases


def run_on_loop(loop: str, coro: Coroutine[Any, Any, Any]) -> Any:
    return kimiha.run(coro, loop=loop)


def run_case(case: Case, setup: Setup) -> float:
    """Run ``case`` once on fresh handlers and a fresh bus/loop; verify it; return ns per published event."""
    sinks = [SinkTask() for _ in range(case.subs)]
    handlers: list[Callable[[Tick], None]] = [s.handle_event for s in sinks]
    n = setup.n
    gc.collect()
    stats: dict[str, Any] | None
    track_latency = not case.kind.endswith("-nolat")
    base = case.kind.removesuffix("-nolat")
    if case.kind == "floor":
        elapsed, stats = run_floor(setup.events, handlers)
    elif case.kind == "bound":
        elapsed, stats = run_bound(setup.events, handlers)
    elif case.kind == "bound-inline":
        elapsed, stats = run_bound_inline(setup.chunks, handlers)
    elif case.kind == "bound-loop":
        elapsed, stats = run_bound_loop(setup.chunks, handlers)
    elif case.kind == "pyee":
        assert case.anchor is not None
        elapsed, stats = run_pyee(case.anchor, setup.events, handlers)
    elif case.kind.startswith("nautilus"):
        assert case.anchor is not None
        elapsed, stats = run_nautilus(case.anchor, setup.events, handlers, tuned=case.kind == "nautilus")
    elif case.kind.startswith("publish-"):
        elapsed, stats = run_publish(
            setup.events, case.subs, setup.capacity, track_latency, base == "publish-hoisted"
        )
        verify(case, n, [], stats)
        return elapsed / n
    else:
        assert case.loop is not None
        coro: Coroutine[Any, Any, Any]
        if base in ("sync", "inline", "sync-hoisted", "inline-hoisted"):
            dispatch = Dispatch.INLINE if base.startswith("inline") else Dispatch.LOOP
            coro = run_tasks(
                setup.chunks, sinks, setup.capacity, track_latency, dispatch, base.endswith("-hoisted")
            )
        elif base in FLOOD_CONSUMERS:
            coro = run_flood(setup.chunks, handlers, setup.capacity, FLOOD_CONSUMERS[base], track_latency)
        else:
            coro = run_queue(setup.chunks, handlers)
        elapsed, stats = run_on_loop(case.loop, coro)
    verify(case, n, sinks, stats)
    return elapsed / n


def verify(case: Case, n: int, sinks: list[SinkTask], stats: dict[str, Any] | None) -> None:
    """Raise unless every handler saw exactly ``n`` events ending with the last one (and the bus agrees)."""
    problems = [f"subscriber {i} {p}" for i, s in enumerate(sinks) if (p := s.problem(n)) is not None]
    if stats is not None and "latency_ns" in stats:  # a kimiha channel: its counters must agree
        expect = {
            "published": n,
            "delivered": n * case.subs,
            "lagged": 0,
            "handler_errors": 0,
        }
        for name, want in expect.items():
            if stats[name] != want:
                problems.append(f"channel stats {name} = {stats[name]}, expected {want}")
        # the histogram records every DEFAULT_LATENCY_SAMPLE-th sequence number
        want_lat = 0 if case.kind.endswith("-nolat") else len(range(0, n, DEFAULT_LATENCY_SAMPLE)) * case.subs
        if stats["latency_ns"]["count"] != want_lat:
            problems.append(
                f"latency histogram holds {stats['latency_ns']['count']} records, expected {want_lat}"
            )
        if "inline_direct" in stats and case.kind.startswith("inline"):
            # INLINE: every event but the timed sample (the Scheduler times its handlers on it) goes straight
            # to the handlers (deliver_one / deliver_each): the case measures the fast path it names.
            want_direct = (n - len(range(0, n, DEFAULT_LATENCY_SAMPLE))) * case.subs
            if stats["inline_direct"] != want_direct:
                problems.append(
                    f"{stats['inline_direct']} handler calls took the inline fast path, expected {want_direct}"
                )
    elif stats is not None and stats.get("published") != n:
        problems.append(f"the bus counted {stats.get('published')} publishes, expected {n}")
    if problems:
        raise RuntimeError(f"case {case.key} did not deliver what it claims: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------------------------
# Ratios and the CI gate.


@dataclass
class Ratio:
    label: str
    num: Case
    den: Case
    target: str = ""  # "<= 1.5" or ">= 5"; empty: information only
    headline: bool = False  # one of issue 13's targets: default configuration (latency on), uvloop

    @property
    def value(self) -> float:
        return self.num.median / self.den.median

    @property
    def paired(self) -> list[float]:
        return [a / b for a, b in zip(self.num.samples, self.den.samples)]

    @property
    def loop(self) -> str:
        return self.num.loop or self.den.loop or "-"

    @property
    def met(self) -> bool | None:
        if not self.target:
            return None
        op, bound = self.target.split()
        return self.value <= float(bound) if op == "<=" else self.value >= float(bound)


#: Ratio labels kept short enough for a 110-column report.
NAUTILUS_SHORT = "Nautilus, tuned"  # KINDS["nautilus"]: "Nautilus MessageBus, tuned"
PUBLISH_RATIO = "publish only: bus.publish(Ev.MD, e) / channel.publish(e)"
PUBLISH_RATIO_NOLAT = "publish only, no latency: bus.publish / channel.publish"


def build_ratios(cases: list[Case], loops: list[str]) -> list[Ratio]:
    by_key = {c.key: c for c in cases}
    main_loop = "uvloop" if "uvloop" in loops else loops[0]
    ratios = []

    def add(label: str, num: str, den: str, target: str = "", headline: bool = False) -> None:
        if num in by_key and den in by_key:
            ratios.append(Ratio(label, by_key[num], by_key[den], target, headline))

    for subs in SUBSCRIBER_COUNTS:
        floor = f"floor/-/{subs}"
        add("bound / floor", f"bound/-/{subs}", floor)
        # What the targets ask of any compiled bus: the least it can cost (no work at all) against the targets.
        add(f"{KINDS['bound-inline']} / floor", f"bound-inline/-/{subs}", floor, "<= 1.6")
        add(f"{NAUTILUS_SHORT} / {KINDS['bound-inline']}", f"nautilus/-/{subs}", f"bound-inline/-/{subs}", ">= 1.6")
        add(f"{NAUTILUS_SHORT} / {KINDS['bound-loop']}", f"nautilus/-/{subs}", f"bound-loop/-/{subs}", ">= 1.3")
        for loop in loops:
            main = loop == main_loop
            add(f"{KINDS['sync']} / floor", f"sync/{loop}/{subs}", floor)
            add(f"{KINDS['inline']} / floor", f"inline/{loop}/{subs}", floor, "<= 1.6", headline=main)
            add(f"{KINDS['inline'].removeprefix('kimiha ')} / {KINDS['bound-inline']}",
                f"inline/{loop}/{subs}", f"bound-inline/-/{subs}")
            add(f"{KINDS['sync'].removeprefix('kimiha ')} / {KINDS['bound-loop']}",
                f"sync/{loop}/{subs}", f"bound-loop/-/{subs}")
            for kind in ("sync", "inline"):
                add(f"{KINDS[kind]} / {KINDS[kind + '-hoisted'].removeprefix('kimiha ')}",
                    f"{kind}/{loop}/{subs}", f"{kind}-hoisted/{loop}/{subs}", "<= 2")
                add(f"latency tracking cost: {KINDS[kind].removeprefix('kimiha ')} / no latency",
                    f"{kind}/{loop}/{subs}", f"{kind}-nolat/{loop}/{subs}", "<= 1.05" if subs == 1 else "",
                    headline=main and subs == 1)
        for lat, label in (("", PUBLISH_RATIO), ("-nolat", PUBLISH_RATIO_NOLAT)):
            add(label, f"publish-idiom{lat}/-/{subs}", f"publish-hoisted{lat}/-/{subs}", "<= 2", headline=True)
        for loop in loops:
            main = loop == main_loop
            add(f"{NAUTILUS_SHORT} / {KINDS['inline'].removeprefix('kimiha ')}",
                f"nautilus/-/{subs}", f"inline/{loop}/{subs}", ">= 1.6", headline=main)
            add(f"{NAUTILUS_SHORT} / {KINDS['sync'].removeprefix('kimiha ')}",
                f"nautilus/-/{subs}", f"sync/{loop}/{subs}", ">= 1.3", headline=main)
            for kind in ("inline-nolat", "sync-nolat", "inline-hoisted", "sync-hoisted"):
                add(f"{NAUTILUS_SHORT} / {KINDS[kind].removeprefix('kimiha ')}",
                    f"nautilus/-/{subs}", f"{kind}/{loop}/{subs}")
            for anchor, name in (("nautilus-default", "Nautilus, default config"), ("pyee", KINDS["pyee"])):
                add(f"{name} / {KINDS['sync'].removeprefix('kimiha ')}", f"{anchor}/-/{subs}", f"sync/{loop}/{subs}")
        for loop in loops:
            queue = f"queue/{loop}/{subs}"
            target = (">= 4" if subs == 1 else ">= 6") if loop == "uvloop" else ""
            for kind in ("flood-iter", "flood-iter-nolat", "flood-batch", "flood-batch-nolat", "flood-batches"):
                add("asyncio.Queue / " + KINDS[kind].removeprefix("kimiha "), queue, f"{kind}/{loop}/{subs}",
                    target if kind == "flood-iter" else "", headline=kind == "flood-iter" and loop == "uvloop")
    return ratios


#: The ratio CI gates on: tuned NautilusTrader over the README idiom on the default (LOOP) channel.
GATE_LABEL = "Nautilus MessageBus, tuned / kimiha README idiom, LOOP"


def gate_ratio(cases: list[Case]) -> Ratio | None:
    """Tuned Nautilus over kimiha's README idiom (LOOP, latency at its default), uvloop, 1 subscriber."""
    by_key = {c.key: c for c in cases}
    if "nautilus/-/1" not in by_key:
        return None
    return Ratio(GATE_LABEL, by_key["nautilus/-/1"], by_key["sync/uvloop/1"])


# ---------------------------------------------------------------------------------------------------------------
# Reporting.

#: Above this spread (%) the report suggests ``--clock cpu``.
SPREAD_HINT = 50.0


def spread(c: Case) -> float:
    """(max - min) / median of the case's samples, in %."""
    return float(max(c.samples) - min(c.samples)) / c.median * 100


def format_report(
    cases: list[Case],
    ratios: list[Ratio],
    info: dict[str, Any],
    args: argparse.Namespace,
    chunk: int,
    elapsed_s: float,
    anchors: dict[str, Anchor],
) -> str:
    lines = machine_header(info) + [
        f"{args.events} events/run, {args.repeat} interleaved repetitions, {args.clock} clock; total "
        f"{elapsed_s:.1f} s",
        f"capacity {args.capacity}, chunks of {chunk}, seed {args.seed}",
        f"ns/event = {args.clock} time of one run / events published (with 4 subscribers each event is handled "
        f"4 times)",
    ]
    for kind, anchor in anchors.items():
        if anchor.available:
            lines.append(f"{KINDS[kind]}: {anchor.name} {anchor.version}, {anchor.detail}")
        else:
            lines += textwrap.wrap(f"{KINDS[kind]}: skipped: {anchor.reason}", 110, subsequent_indent="  ")
    lines.append("")
    floors = {c.subs: c.median for c in cases if c.kind == "floor"}
    width = max([len("case")] + [len(c.label) for c in cases])

    def row(c: Case) -> str:
        med = c.median
        lo, hi = min(c.samples), max(c.samples)
        return (
            f"{c.label:<{width}} {c.loop or '-':<7} {c.subs:>4} {med:>9.1f} {lo:>9.1f} {hi:>9.1f} "
            f"{spread(c):>6.1f}% {med / floors[c.subs]:>7.2f}x"
        )

    header = (
        f"{'case':<{width}} {'loop':<7} {'subs':>4} {'median':>9} {'min':>9} {'max':>9} "
        f"{'spread':>7} {'x floor':>8}"
    )
    lines += [header, "-" * len(header)] + rows_by_subscribers(cases, row)
    if any(c.kind in PUBLISH_KINDS for c in cases):
        lines += [
            "publish only: these rows call no handler (pull subscriptions drained every 1024 events), so their",
            "  'x floor' (publishing alone / calling the handler directly) can be under 1x",
        ]
    widest = max(cases, key=spread, default=None)
    if widest is not None and spread(widest) > SPREAD_HINT and args.clock == "wall":
        lines += [
            f"spread up to {spread(widest):.0f}%: a noisy machine; --clock cpu times the CPU of the thread running "
            f"each case only",
            f"  (widest: {widest.label}, {widest.loop or 'no loop'}, {widest.subs} "
            f"subscriber{'s' if widest.subs > 1 else ''})",
        ]
    lines.append("")
    rwidth = max([len("ratio of medians")] + [len(r.label) for r in ratios])
    header = (
        f"  {'ratio of medians':<{rwidth}} {'loop':<7} {'subs':>4} {'ratio':>7} {'paired min..max':>15} "
        f"{'target':>7}"
    )
    lines += [header, "-" * (len(header) + 7)]
    for r in ratios:
        paired = r.paired
        status = "" if r.met is None else ("met" if r.met else "missed")
        lines.append(
            f"{'*' if r.headline else ' '} {r.label:<{rwidth}} {r.loop:<7} {r.num.subs:>4} {r.value:>6.2f}x "
            f"{min(paired):>6.2f}..{max(paired):<7.2f} {r.target:>7} {status.upper() if r.headline else status}"
        )
    lines += [
        "* = one of issue 13's targets (default configuration: latency tracking on; uvloop), its status in",
        "    capitals (MET / MISSED); rows without * show a target for reference (met / missed) or none.",
        "    Targets: benchmarks/README.md, 'Hot path round 2'. Nautilus, tuned = its MessageBus tuned (above).",
        "    bound: compiled = the least a compiled bus costs (it only calls the handlers): its rows carry the",
        "    targets they bound, so 'missed' there means no bus of that shape can meet them ('Counting",
        "    instructions' in benchmarks/README.md)",
        "    spread = (max - min) / median over the repetitions; paired = the ratio within each repetition",
    ]
    return "\n".join(line.rstrip() for line in lines)


def to_json(
    cases: list[Case],
    ratios: list[Ratio],
    info: dict[str, Any],
    args: argparse.Namespace,
    chunk: int,
    anchors: dict[str, Anchor],
    gate: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "mode": "compare",
        "machine": info,
        "settings": {
            "events": args.events,
            "repeat": args.repeat,
            "capacity": args.capacity,
            "chunk": chunk,
            "seed": args.seed,
            "clock": args.clock,
            "loops": args.loops,
            "command": " ".join(sys.argv),
        },
        "anchors": {
            kind: {"name": a.name, "version": a.version, "detail": a.detail, "skipped": a.reason}
            for kind, a in anchors.items()
        },
        "cases": [
            {
                **c.identity(),
                "ns_per_event": {
                    "median": c.median,
                    "min": min(c.samples),
                    "max": max(c.samples),
                    "samples": c.samples,
                },
            }
            for c in cases
        ],
        "ratios": [
            {
                "ratio": r.label,
                "numerator": r.num.key,
                "denominator": r.den.key,
                "subscribers": r.num.subs,
                "loop": r.loop,
                **paired_json(r.value, r.paired),
                "target": r.target or None,
                "met": r.met,
                "headline": r.headline,
            }
            for r in ratios
        ],
        "gate": gate,
    }


# ---------------------------------------------------------------------------------------------------------------
# Driver.


EPILOG = """\
cases (each with 1 and 4 subscribers; the loop-dependent ones on every loop of --loops):
  floor             the producer calls the handler(s) directly: for e in events: h(e)
  bound             list.append every event, then call the handler(s) over the list (cheapest deferred hand-off)
  bound-inline      the least a compiled bus costs on the README idiom, calling handlers inside publish: a
                    compiled publish(Ev.MD, e) that only calls each handler as kimiha does (no lookup, ring,
                    counters or fault isolation); INLINE, pyee and Nautilus have this shape
  bound-loop        the same least for a deferring bus: publish stores the event, and a compiled flush() after
                    each chunk calls the handlers over what was stored (rows: "bound: compiled, calls ...")
  sync              README idiom: bus.publish(Ev.MD, e) in chunks into EventTasks under a Scheduler (LOOP channel)
  inline            the same on a Dispatch.INLINE channel: publish calls the EventTasks before it returns
  *-hoisted         the same with channel = bus.channel(Ev.MD); channel.publish(e)
  publish-idiom     publish alone: bus.publish(Ev.MD, e) to pull subscriptions drained every 1024 events
  publish-hoisted   the same with the hoisted channel.publish(e)
  flood-iter        one consumer task per pull subscription: async for ev in sub (producer: bus.publish)
  flood-batch       the same with await sub.recv_batch()
  flood-batches     the same with async for batch in sub.batches()
  queue             one asyncio.Queue per subscriber: put_nowait by the producer, await q.get() consumer tasks
  -nolat            the same kimiha case with ChannelConfig(track_latency=False)
  pyee              pyee EventEmitter: ee.emit(name, e) calls the handlers inline
  nautilus          NautilusTrader MessageBus, external-serialization check tuned away: publish calls them inline
  nautilus-default  the same bus with MessageBusConfig() defaults

examples:
  kimiha bench compare --quick                         smoke run, well under a minute
  kimiha bench compare --json bench-results/compare.json
  kimiha bench compare --loops uvloop --events 500000 --repeat 11
  kimiha bench compare --quick --gate 0.6 --json /tmp/ci.json   the CI stage (the target is 1.3)
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = new_parser(
        "kimiha bench compare",
        (
            "Compare kimiha's event bus with direct handler calls (the floor), asyncio.Queue fan-out, pyee\n"
            "and NautilusTrader's MessageBus, on uvloop and asyncio, with 1 and 4 subscribers. Repetitions\n"
            "are interleaved in one process; the table reports median/min/max ns per published event and\n"
            "ratios of medians. Every run is verified: each handler saw exactly N events, the last one last,\n"
            "and the bus's counters agree."
        ),
        EPILOG,
    )
    parser.add_argument(
        "--events",
        type=int,
        metavar="N",
        help=f"events published per run (default {DEFAULT_EVENTS}; {QUICK_EVENTS} with --quick)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        metavar="R",
        help=f"interleaved repetitions, at least {MIN_REPEAT} (default {DEFAULT_REPEAT}; {QUICK_REPEAT} with --quick)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer events and repetitions: a smoke run")
    parser.add_argument("--json", metavar="PATH", type=Path, help="also write the results as JSON to PATH")
    parser.add_argument(
        "--loops",
        default=",".join(LOOPS),
        metavar="NAMES",
        help=f"comma-separated event loops for the loop-dependent cases (default {','.join(LOOPS)})",
    )
    parser.add_argument(
        "--capacity",
        type=int,
        default=4096,
        metavar="SLOTS",
        help="ring capacity of the channel (default 4096)",
    )
    parser.add_argument("--seed", type=int, default=SEED, help=f"seed of the event data (default {SEED})")
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="what a run's time is: wall (default, perf_counter) or cpu (the CPU time of the thread running "
        "the case, which runs its event loop too: on a shared, oversubscribed machine it leaves out the time "
        "other processes held the core, and it leaves out the process's other threads; every case here is "
        "busy from start to end, so on a quiet machine both agree)",
    )
    parser.add_argument(
        "--no-anchors",
        action="store_true",
        help="leave out pyee and NautilusTrader (kimiha, the floor and asyncio.Queue only)",
    )
    parser.add_argument(
        "--gate",
        type=float,
        metavar="X",
        help="exit 1 unless tuned NautilusTrader / kimiha's README idiom (bus.publish into EventTasks, LOOP "
        "channel) >= X on uvloop with 1 subscriber (ratio of medians of this run; needs uvloop in --loops and "
        "nautilus_trader installed)",
    )
    args = parser.parse_args(argv)
    if args.events is None:
        args.events = QUICK_EVENTS if args.quick else DEFAULT_EVENTS
    if args.repeat is None:
        args.repeat = QUICK_REPEAT if args.quick else DEFAULT_REPEAT
    if args.events < 1:
        parser.error(f"--events: expected >= 1, got {args.events}")
    if args.repeat < MIN_REPEAT:
        parser.error(
            f"--repeat: expected >= {MIN_REPEAT} (medians need at least that many), got {args.repeat}"
        )
    if not 1 <= args.capacity <= MAX_CAPACITY:
        parser.error(f"--capacity: expected between 1 and {MAX_CAPACITY}, got {args.capacity}")
    args.loops = parse_loops(parser, args.loops)
    if args.gate is not None and "uvloop" not in args.loops:
        parser.error("--gate compares the uvloop cases: add uvloop to --loops")
    if args.gate is not None and not args.gate > 0:
        parser.error(f"--gate: expected a ratio > 0, got {args.gate}")
    if args.gate is not None and args.no_anchors:
        parser.error("--gate compares kimiha with NautilusTrader: drop --no-anchors")
    return args


def chunk_size(n: int, capacity: int) -> int:
    # Publish everything at once when the ring holds it all; otherwise no more than one dispatch budget per
    # loop iteration, so neither the dispatch loop nor a pull consumer (which yields after `budget` events in a
    # row) can be lapped by the producer on a LAG channel.
    if capacity >= n:
        return n
    budget = getattr(kimiha._core, "DEFAULT_BUDGET", 1024)
    return max(1, min(capacity, budget))


def main(argv: list[str] | None = None) -> int:
    """Run the comparison; return 0, or 1 when ``--gate`` is given and the gated ratio falls short."""
    global perf_counter_ns
    args = parse_args(argv)
    perf_counter_ns = CLOCKS[args.clock]
    started = time.monotonic()
    anchors = {} if args.no_anchors else load_anchors(list(ANCHOR_KINDS))
    for kind, anchor in anchors.items():
        if not anchor.available:
            progress(f"{KINDS[kind]}: skipped: {anchor.reason}", final=True)
    chunk = chunk_size(args.events, args.capacity)
    events = make_events(args.events, args.seed)
    setup = Setup(args.events, args.capacity, events, chunked(events, chunk))
    cases = build_cases(args.loops, anchors)
    freeze_setup()

    warm_n = min(args.events, WARMUP_EVENTS)
    warm = Setup(
        warm_n, args.capacity, events[:warm_n], chunked(events[:warm_n], chunk_size(warm_n, args.capacity))
    )
    run_interleaved(
        cases,
        1,
        lambda case, _rep: run_case(case, warm),
        note=lambda _rep, i, case: f"warm-up {i}/{len(cases)} {case.key}",
        done=lambda _rep, _s: f"warm-up of {len(cases)} cases done ({time.monotonic() - started:.1f} s)",
        keep=False,
    )
    run_interleaved(
        cases,
        args.repeat,
        lambda case, _rep: run_case(case, setup),
        note=lambda rep, i, case: f"rep {rep}/{args.repeat} case {i}/{len(cases)} {case.key}",
        done=lambda rep, seconds: f"rep {rep}/{args.repeat} done in {seconds:.1f} s",
    )

    ratios = build_ratios(cases, args.loops)
    info = machine_info()
    print(format_report(cases, ratios, info, args, chunk, time.monotonic() - started, anchors))
    status = 0
    gate: dict[str, Any] | None = None
    if args.gate is not None:
        g = gate_ratio(cases)
        if g is None:
            reason = anchors["nautilus"].reason if "nautilus" in anchors else "not loaded"
            print(f"\ngate: {GATE_LABEL} cannot be measured: NautilusTrader is unavailable ({reason}); "
                  f"install it with pip install 'kimiha[bench]'. FAIL")
            return 1
        passed = g.value >= args.gate
        gate = {
            "ratio": g.label,
            "loop": "uvloop",
            "subscribers": 1,
            **paired_json(g.value, g.paired),
            "required": args.gate,
            "passed": passed,
        }
        print(
            f"\ngate: {g.label} (uvloop, 1 subscriber) = {g.value:.2f}x "
            f"(paired {min(g.paired):.2f}..{max(g.paired):.2f}), required >= {args.gate:g}x: "
            + ("PASS" if passed else "FAIL")
        )
        status = 0 if passed else 1
    if args.json:
        save_json(args.json, to_json(cases, ratios, info, args, chunk, anchors, gate))
    return status


if __name__ == "__main__":
    sys.exit(main())
