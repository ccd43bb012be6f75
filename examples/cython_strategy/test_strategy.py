"""The Cython strategy example: built against kimiha's C API, it trades exactly like its Python twin.

Build first (from the clone root): ``cythonize -i -3 examples/cython_strategy/strategy.pyx``; then
``python -m pytest examples/cython_strategy -q -p no:randomly``.
"""

from __future__ import annotations

import asyncio
import importlib.machinery
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import kimiha  # noqa: E402
from kimiha import ChannelConfig, Dispatch, EventBus  # noqa: E402
from kimiha._core import EMPTY, Handler  # noqa: E402

import strategy  # noqa: E402
from reference import PyBandStrategy, make_ticks  # noqa: E402
from strategy_events import Ev, Order, Tick  # noqa: E402


def new_bus(dispatch: Dispatch) -> EventBus:
    return EventBus([
        (Ev.TICKS, ChannelConfig(4096, payload_type=Tick, dispatch=dispatch)),
        (Ev.ORDERS, ChannelConfig(4096, payload_type=Order)),
    ])


def test_the_strategy_is_the_compiled_extension():
    assert isinstance(strategy.__loader__, importlib.machinery.ExtensionFileLoader), strategy.__file__
    assert issubclass(strategy.BandStrategy, Handler)


@pytest.mark.parametrize("dispatch", [Dispatch.INLINE, Dispatch.LOOP])
@pytest.mark.parametrize("producer", ["python", "cython"])
def test_cython_and_python_strategies_send_the_same_orders(dispatch, producer):
    ticks = make_ticks(5000)

    async def trade(make) -> tuple[list[Order], int]:
        bus = new_bus(dispatch)
        orders = bus.subscribe(Ev.ORDERS)
        strat = make(bus.channel(Ev.ORDERS))
        bus.subscribe(Ev.TICKS, strat)
        got: list[Order] = []
        for start in range(0, len(ticks), 1000):
            chunk = ticks[start:start + 1000]
            if producer == "cython":
                strategy.publish_ticks(bus.channel(Ev.TICKS), chunk)
            else:
                for tick in chunk:
                    bus.publish(Ev.TICKS, tick)
            await asyncio.sleep(0)
            got += strategy.drain_orders(orders)
        assert bus.stats(Ev.TICKS)["handler_errors"] == 0
        return got, strat.seen

    cy_orders, cy_seen = kimiha.run(trade(strategy.BandStrategy))
    py_orders, py_seen = kimiha.run(trade(PyBandStrategy))
    assert cy_seen == py_seen == len(ticks)
    assert len(cy_orders) > 10 and cy_orders == py_orders


def test_a_failing_on_event_is_isolated_and_counted():
    async def main() -> None:
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, dispatch=Dispatch.INLINE)),
                        (Ev.ORDERS, ChannelConfig(64, payload_type=Order))])
        errors: list[BaseException] = []
        strat = strategy.BandStrategy(bus.channel(Ev.ORDERS))
        bus.subscribe(Ev.TICKS, strat, on_error=lambda exc, event: errors.append(exc))
        bus.publish(Ev.TICKS, "not a tick")            # on_event reads .price: AttributeError
        bus.publish(Ev.TICKS, Tick(100.0, 1))
        assert strat.seen == 1 and bus.stats(Ev.TICKS)["handler_errors"] == 1
        assert isinstance(errors[0], AttributeError)

    kimiha.run(main())


def test_drain_orders_stops_at_the_empty_marker():
    bus = new_bus(Dispatch.LOOP)
    sub = bus.subscribe(Ev.ORDERS)
    assert strategy.drain_orders(sub) == []
    bus.publish(Ev.ORDERS, Order(1, 99.0, 3))
    assert strategy.drain_orders(sub) == [Order(1, 99.0, 3)]
    assert repr(EMPTY) == "kimiha._core.EMPTY"
