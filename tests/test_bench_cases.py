"""The benchmark cases deliver what they claim (each run is verified); no timing is asserted here."""

from __future__ import annotations

import pytest

from kimiha.bench import compare, tick
from kimiha.venues.binance import recorded_tape
from kimiha.venues.binance.recording import iter_lines

N = 3000


@pytest.fixture(scope="module")
def setup() -> compare.Setup:
    events = compare.make_events(N)
    return compare.Setup(N, 1024, events, compare.chunked(events, 1024))


KIMIHA_KINDS = [k for k in compare.KINDS if k not in compare.ANCHOR_KINDS]


@pytest.mark.parametrize("subs", [1, 4])
@pytest.mark.parametrize("kind", KIMIHA_KINDS)
def test_every_kimiha_case_runs_and_passes_its_own_check(setup, kind, subs):
    case = compare.Case(kind, "uvloop" if kind in compare.LOOP_KINDS else None, subs)
    assert compare.run_case(case, setup) > 0  # run_case raises unless every handler saw all N events


def test_the_verification_catches_a_case_that_loses_events(setup):
    case = compare.Case("sync", "uvloop", 1)
    sinks = [compare.SinkTask()]
    sinks[0].handle_event(setup.events[0])
    with pytest.raises(RuntimeError, match="saw 1 events"):
        compare.verify(case, N, sinks, None)


def test_the_readme_idiom_cases_publish_with_bus_publish_into_event_tasks():
    import inspect

    from kimiha.bench import cases

    assert "bus.publish(Ev.MD, e)" in inspect.getsource(cases.publish_idiom)
    assert "register_event_task" in inspect.getsource(compare.run_tasks)


@pytest.mark.parametrize("kind", tick.KINDS)
def test_tick_to_trade_pipelines_send_the_floors_orders(kind):
    lines = list(iter_lines(recorded_tape()))[:3000]
    _, floor, _ = tick.run_one("floor", lines, 0, "uvloop")
    elapsed, stages, _ = tick.run_one(kind, lines, 0, "uvloop")
    assert elapsed > 0 and len(floor.orders) > 5 and stages.orders == floor.orders
    _, paced, clock = tick.run_one(kind, lines[:300], 50_000, "uvloop")  # 20k lines/s: 15 ms
    assert clock.hist.count == len(paced.orders) > 0


def test_the_verification_catches_an_inline_case_that_missed_the_fast_path(setup):
    case = compare.Case("inline", "uvloop", 1)
    sinks = [compare.SinkTask()]
    for e in setup.events:
        sinks[0].handle_event(e)
    n_sampled = len(range(0, N, compare.DEFAULT_LATENCY_SAMPLE))
    stats = {"published": N, "delivered": N, "lagged": 0, "handler_errors": 0,
             "latency_ns": {"count": n_sampled}, "inline_direct": 0}
    with pytest.raises(RuntimeError, match=r"0 handler calls took the inline fast path, expected \d+"):
        compare.verify(case, N, sinks, stats)
    stats["inline_direct"] = N - n_sampled
    compare.verify(case, N, sinks, stats)
