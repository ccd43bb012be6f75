"""Fixtures of the pytest-benchmark suites: seeded events, a fresh event loop of each kind, counting handlers.

The suites live outside ``testpaths`` so the default test run never collects them; run them with
``python -m pytest benchmarks/ -q --benchmark-only``. Everything a suite needs comes through fixtures (the
project runs pytest with ``--import-mode=importlib``, where test modules cannot import this one).
"""

from __future__ import annotations

import asyncio
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest

try:
    import kimiha
except ImportError:  # not installed: benchmark the source tree (its compiled core is built in place)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kimiha

from kimiha import Event, EventType
from kimiha.runtime import new_event_loop

SEED = 20240601
#: Events published per benchmark round; the pedantic rounds time one whole flood each.
EVENTS = 10_000
CAPACITY = 4096
#: At most one dispatch budget per loop iteration, so no reader is lapped on the LAG channel (see compare.py).
CHUNK = 1024


class Ev(EventType):
    MD = "MarketData"


class Tick(Event):
    price: float
    seq: int


class Sink:
    """The trivial handler every benchmark uses: count the event, read one attribute."""

    __slots__ = ("handler", "seen")

    def __init__(self) -> None:
        count = 0
        last = -1

        def handler(event: Tick) -> None:
            nonlocal count, last
            count += 1
            last = event.seq

        def seen() -> tuple[int, int]:
            return count, last

        self.handler: Callable[[Tick], None] = handler
        self.seen: Callable[[], tuple[int, int]] = seen

    def check(self, n: int) -> None:
        count, last = self.seen()
        assert (count, last) == (n, n - 1), f"handler saw {count} events (last seq {last}), expected {n}"


@pytest.fixture(scope="session")
def events() -> list[Tick]:
    rng = random.Random(SEED)
    return [Tick(price=round(100.0 + rng.gauss(0.0, 1.0), 4), seq=i) for i in range(EVENTS)]


@pytest.fixture(scope="session")
def chunks(events: list[Tick]) -> list[list[Tick]]:
    return [events[i : i + CHUNK] for i in range(0, len(events), CHUNK)]


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

    def _make(track_latency: bool = True, overflow: str = "lag") -> kimiha.EventBus:
        config = kimiha.ChannelConfig(
            CAPACITY,
            payload_type=Tick,
            track_latency=track_latency,
            overflow=kimiha.Overflow.BLOCK if overflow == "block" else kimiha.Overflow.LAG,
        )
        return kimiha.EventBus([(Ev.MD, config)])

    return _make


@pytest.fixture(scope="session")
def frames(events: list[Tick]) -> list[bytes]:
    """The events encoded as msgpack frames, as a bridge or a journal would hand them to ``publish_raw``."""
    encode = msgspec.msgpack.Encoder().encode
    return [encode(e) for e in events]


@pytest.fixture(scope="session")
def tick_type() -> type[Tick]:
    """The payload type of the benchmarked channel (for decoders built by the baselines)."""
    return Tick


@pytest.fixture
def make_sinks() -> Callable[[int], list[Sink]]:
    """``make_sinks(k)``: ``k`` fresh counting handlers."""
    return lambda k: [Sink() for _ in range(k)]


@pytest.fixture
def record_rate() -> Callable[..., None]:
    """``record_rate(benchmark, n)``: add the median ns per published event to the benchmark's ``extra_info``."""

    def _record(benchmark, n: int = EVENTS) -> None:  # type: ignore[no-untyped-def]
        benchmark.extra_info["events_per_round"] = n
        stats = getattr(getattr(benchmark, "stats", None), "stats", None)
        if stats is not None:
            benchmark.extra_info["median_ns_per_event"] = round(stats.median / n * 1e9, 1)

    return _record
