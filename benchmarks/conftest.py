"""Fixtures of the pytest-benchmark suites: seeded events, a fresh event loop of each kind, counting handlers.

The suites live outside ``testpaths`` so the default test run never collects them; run them with
``python -m pytest benchmarks/ -q --benchmark-only``. The events, the handler, the bus and the floods are
those of ``kimiha bench compare`` (``kimiha.bench.cases``), so that a suite and a comparison case mean the
same thing; the suites import the floods from there and get everything else through these fixtures (the
project runs pytest with ``--import-mode=importlib``, where test modules cannot import this one).
"""

from __future__ import annotations

import asyncio
import functools
import gc
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

try:
    import kimiha
except ImportError:  # not installed: benchmark the source tree (its compiled core is built in place)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kimiha

from kimiha.bench.cases import SEED, Ev, Sink, Tick, chunked, make_events, new_bus
from kimiha.runtime import new_event_loop

#: Events published per benchmark round; the pedantic rounds time one whole flood each.
EVENTS = 10_000
CAPACITY = 4096
#: At most one dispatch budget per loop iteration, so no reader is lapped on the LAG channel (see compare.py).
CHUNK = 1024
#: Timed rounds of a pedantic benchmark, after its warm-up rounds.
ROUNDS = 15
WARMUP_ROUNDS = 2


@pytest.fixture(scope="session")
def events() -> list[Tick]:
    return make_events(EVENTS, SEED)


@pytest.fixture(scope="session")
def chunks(events: list[Tick]) -> list[list[Tick]]:
    return chunked(events, CHUNK)


@pytest.fixture(params=["uvloop", "asyncio"])
def loop(request: pytest.FixtureRequest) -> Iterator[asyncio.AbstractEventLoop]:
    """A fresh, not running event loop of each kind; the benchmark drives it with ``run_until_complete``."""
    lp = new_event_loop(request.param)
    try:
        yield lp
    finally:
        pending = [t for t in asyncio.all_tasks(lp) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            lp.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        lp.run_until_complete(lp.shutdown_asyncgens())
        lp.close()


@pytest.fixture
def key() -> Ev:
    """The benchmarked channel's key."""
    return Ev.MD


@pytest.fixture
def make_bus() -> Callable[..., kimiha.EventBus]:
    """``make_bus(track_latency=True, overflow="lag")``: a bus with one channel of ``CAPACITY`` slots typed ``Tick``."""
    return functools.partial(new_bus, CAPACITY)


@pytest.fixture(scope="session")
def frames(events: list[Tick]) -> list[bytes]:
    """The events encoded as msgpack frames, as a bridge or a journal would hand them to ``publish_raw``."""
    encode = msgspec.msgpack.Encoder().encode
    return [encode(e) for e in events]


@pytest.fixture(scope="session")
def frame_chunks(frames: list[bytes]) -> list[list[bytes]]:
    return chunked(frames, CHUNK)


@pytest.fixture(scope="session")
def tick_type() -> type[Tick]:
    """The payload type of the benchmarked channel (for decoders built by the baselines)."""
    return Tick


class Sinks:
    """Every counting handler a benchmark made, round after round, to check them all at the end."""

    def __init__(self) -> None:
        self.rounds: list[list[Sink]] = []

    def __call__(self, k: int) -> list[Sink]:
        sinks = [Sink() for _ in range(k)]
        self.rounds.append(sinks)
        return sinks

    def check(self, n: int) -> None:
        """Assert that every handler of every round saw exactly ``n`` events, the last one last."""
        for sinks in self.rounds:
            for sink in sinks:
                sink.check(n)


@pytest.fixture
def make_sinks() -> Sinks:
    """``make_sinks(k)``: ``k`` fresh counting handlers; ``make_sinks.check(n)`` checks all made so far."""
    return Sinks()


@pytest.fixture
def pedantic(benchmark: Any) -> Callable[..., None]:
    """``pedantic(target, setup, teardown=None)``: ``ROUNDS`` timed rounds of ``target`` after
    ``WARMUP_ROUNDS``, each on what ``setup`` built for it after a ``gc.collect()`` (neither is timed)."""

    def _run(
        target: Callable[..., Any], setup: Callable[[], Any], teardown: Callable[..., Any] | None = None
    ) -> None:
        def fresh() -> Any:
            gc.collect()  # start every round with empty GC generations, as kimiha bench compare does
            return setup()

        benchmark.pedantic(
            target, setup=fresh, teardown=teardown, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1
        )

    return _run


@pytest.fixture
def record_rate() -> Callable[..., None]:
    """``record_rate(benchmark, n)``: add the median ns per published event to the benchmark's ``extra_info``."""

    def _record(benchmark, n: int = EVENTS) -> None:  # type: ignore[no-untyped-def]
        benchmark.extra_info["events_per_round"] = n
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None:
            benchmark.extra_info["median_ns_per_event"] = round(stats.median / n * 1e9, 1)

    return _record
