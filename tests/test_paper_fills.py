"""Paper fills with a latency model: an order fills against the book as of its arrival at the venue."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from kimiha import EventBus
from kimiha.error import InvalidConfigurationError
from kimiha.trading.model import DepthDiff, DepthSnapshot, Order, OrderType, Quote, Side
from kimiha.trading.paper import FixedLatency, LogNormalLatency, as_latency_model
from kimiha.trading.tasks import PaperExecutorTask, TradingEvent, trading_channels

SNAPSHOT = DepthSnapshot(100, bids=((99.0, 1.0), (98.0, 5.0)), asks=((100.0, 1.0), (101.0, 5.0)), recv_ts_ns=1_000)


def moves(direction: int) -> list:
    """The market after the order (decided at t=2000): the best level on the order's side goes at t=2500."""
    if direction > 0:  # the offer at 100 is lifted: a buy now pays 101
        diff = DepthDiff(101, 101, bids=(), asks=((100.0, 0.0),), recv_ts_ns=2_500)
    else:  # the bid at 99 is hit: a sell now gets 98
        diff = DepthDiff(101, 101, bids=((99.0, 0.0),), asks=(), recv_ts_ns=2_500)
    return [diff, Quote(101, 98.0, 5.0, 101.0, 5.0, ts_ns=10_000)]


def run_executor(run, latency, side: Side):
    async def main():
        bus = EventBus(trading_channels(64))
        fills = bus.subscribe(TradingEvent.FILLS)
        executor = PaperExecutorTask(bus, latency=latency)
        order = Order(1, side, 0.5, OrderType.MARKET, None, 2_000, "", 100)
        for event in [SNAPSHOT, order, *moves(1 if side is Side.BUY else -1)]:
            await executor.handle_event(event)
        return order, fills.drain(), executor

    return run(main())


@pytest.mark.parametrize("side, before, after", [(Side.BUY, 100.0, 101.0), (Side.SELL, 99.0, 98.0)])
def test_latency_moves_the_fill_against_the_order_when_the_market_moved(run, side, before, after):
    _, [at_decision], _ = run_executor(run, None, side)
    _, [early], _ = run_executor(run, 100, side)    # arrives at 2100, before the move at 2500
    _, [late], _ = run_executor(run, 1_000, side)   # arrives at 3000, after it
    assert (at_decision.avg_price, at_decision.ts_ns) == (before, 2_000)
    assert (early.avg_price, early.ts_ns) == (before, 2_100)
    assert (late.avg_price, late.ts_ns) == (after, 3_000)
    assert late.qty == early.qty == 0.5


def test_an_order_waits_for_market_data_past_its_arrival(run):
    async def main():
        bus = EventBus(trading_channels(64))
        fills = bus.subscribe(TradingEvent.FILLS)
        executor = PaperExecutorTask(bus, latency=FixedLatency(5_000))
        await executor.handle_event(SNAPSHOT)
        await executor.handle_event(Order(1, Side.BUY, 0.5, OrderType.MARKET, None, 2_000, "", 100))
        await executor.handle_event(Quote(100, 99.0, 1.0, 100.0, 1.0, ts_ns=7_000))  # == arrival: not past it
        waiting = len(fills.drain())
        await executor.handle_event(Quote(100, 99.0, 1.0, 100.0, 1.0, ts_ns=7_001))
        return waiting, fills.drain()

    waiting, [fill] = run(main())
    assert waiting == 0
    assert fill.ts_ns == 7_000


def test_the_digest_is_the_documented_hash_of_orders_then_fills(run):
    order, fills, executor = run_executor(run, 1_000, Side.BUY)
    encode = msgspec.msgpack.encode
    expected = hashlib.sha256(hashlib.sha256(encode(order)).digest()
                              + hashlib.sha256(b"".join(encode(f) for f in fills)).digest()).hexdigest()
    assert executor.digest == expected
    _, _, other = run_executor(run, None, Side.BUY)
    assert other.digest != expected  # the fill's price and time differ


def test_seeded_latency_draws_the_same_sequence_and_respects_its_floor():
    order = Order(1, Side.BUY, 0.5)
    a = LogNormalLatency(1_000_000, 0.8, seed=7, floor_ns=200_000)
    b = LogNormalLatency(1_000_000, 0.8, seed=7, floor_ns=200_000)
    draws = [a.delay_ns(order) for _ in range(500)]
    assert draws == [b.delay_ns(order) for _ in range(500)]
    assert min(draws) >= 200_000 and len(set(draws)) > 400
    assert sorted(draws)[250] == pytest.approx(1_000_000, rel=0.2)  # the median it was given


@pytest.mark.parametrize("value, fragment", [(-1, "int of nanoseconds >= 0"), (1.5, "int of nanoseconds"),
                                             ("1ms", "int of nanoseconds")])
def test_bad_latency_is_refused_naming_it(value, fragment):
    with pytest.raises(InvalidConfigurationError, match=fragment):
        as_latency_model(value)
    assert as_latency_model(0) is None and as_latency_model(5).delay_ns(Order(1, Side.BUY, 1.0)) == 5
