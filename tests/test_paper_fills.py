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


# ------------------------------------------------------------------ resting orders and the queue model
from kimiha.trading.book import OrderBook  # noqa: E402
from kimiha.trading.model import Liquidity, TimeInForce, Trade  # noqa: E402
from kimiha.trading.paper import OrderRejected, PaperExecutor  # noqa: E402

BIDS = [(99.0, 1.5), (98.0, 2.0)]
ASKS = [(100.0, 1.0), (101.0, 2.0)]


def venue(**kwargs):
    book = OrderBook.from_levels(BIDS, ASKS, last_update_id=10)
    return book, PaperExecutor(book, fee_bps=10.0, maker_fee_bps=2.0, **kwargs)


def gtc(order_id, side, qty, price, ts=0, cancel_after_ns=0):
    return Order(order_id, side, qty, OrderType.LIMIT, price, ts, "", 0, TimeInForce.GTC, cancel_after_ns)


def trade(price, qty, aggressor, ts):
    return Trade(ts, price, qty, aggressor, ts, recv_ts_ns=ts)


def diff(uid, bids=(), asks=(), ts=0):
    return DepthDiff(uid, uid, tuple(bids), tuple(asks), recv_ts_ns=ts)


def test_a_resting_buy_waits_behind_the_level_then_fills_partially_as_a_maker():
    book, paper = venue()
    assert paper.place(gtc(1, Side.BUY, 1.0, 99.0, ts=5)) == []  # nothing crosses: it rests
    [resting] = paper.resting.values()
    assert resting.ahead == 1.5  # the whole level at 99 is ahead of it
    assert paper.on_trade(trade(99.0, 1.0, Side.SELL, 6)) == []  # the queue moves: 0.5 ahead
    assert paper.on_trade(trade(99.0, 5.0, Side.BUY, 7)) == []  # a buyer lifting offers does not touch bids
    [part] = paper.on_trade(trade(99.0, 0.8, Side.SELL, 8))  # 0.5 for the queue, 0.3 for us
    assert (part.qty, part.avg_price, part.liquidity, part.leaves_qty, part.ts_ns) == (
        pytest.approx(0.3), 99.0, Liquidity.MAKER, pytest.approx(0.7), 8)
    assert part.fee == pytest.approx(0.3 * 99.0 * 2.0 / 10_000)  # the maker rate, not the taker one
    [rest] = paper.on_trade(trade(98.5, 0.1, Side.SELL, 9))  # traded through 99: the level is gone, us too
    assert (rest.qty, rest.leaves_qty) == (pytest.approx(0.7), 0.0)
    assert paper.resting == {} and paper.position == pytest.approx(1.0) and paper.maker_fills == 2


def test_cancels_at_the_level_move_the_order_up_only_when_the_level_gets_smaller_than_the_queue():
    book, paper = venue()
    paper.place(gtc(1, Side.BUY, 1.0, 99.0))
    book.apply_diff(diff(11, bids=[(99.0, 3.0)]))  # orders join behind us
    assert paper.on_book(1) == [] and paper.resting[1].ahead == 1.5
    book.apply_diff(diff(12, bids=[(99.0, 2.0)]))  # cancels: assumed behind us, the queue ahead stays
    paper.on_book(2)
    assert paper.resting[1].ahead == 1.5
    book.apply_diff(diff(13, bids=[(99.0, 0.4)]))  # smaller than what was ahead: only 0.4 can be
    paper.on_book(3)
    assert paper.resting[1].ahead == 0.4
    [fill] = paper.on_trade(trade(99.0, 0.5, Side.SELL, 4))
    assert fill.qty == pytest.approx(0.1)


def test_the_other_side_reaching_the_price_fills_the_rest():
    book, paper = venue()
    paper.place(gtc(1, Side.SELL, 0.5, 100.5))
    book.apply_diff(diff(11, bids=[(100.5, 1.0)]))  # a bid at our offer: we trade with it
    [fill] = paper.on_book(7)
    assert (fill.side, fill.qty, fill.avg_price, fill.leaves_qty) == (Side.SELL, 0.5, 100.5, 0.0)


def test_the_crossing_part_takes_at_once_and_the_rest_rests():
    book, paper = venue()
    [taker] = paper.place(gtc(1, Side.BUY, 1.5, 100.5, ts=3))
    assert (taker.qty, taker.avg_price, taker.liquidity, taker.leaves_qty) == (1.0, 100.0, Liquidity.TAKER, 0.5)
    assert taker.fee == pytest.approx(100.0 * 10.0 / 10_000)
    assert paper.resting[1].remaining == pytest.approx(0.5) and paper.resting[1].ahead == 0.0


def test_the_rest_of_a_crossing_order_does_not_fill_again_from_what_it_took():
    # The book is read-only: after a GTC buy took the 1.0 offered at 100, the book still shows it. Before, the
    # next book change (anywhere) saw "best ask <= our price" and filled the 0.5 left as a maker at 100.5:
    # 1.5 filled against 1.0 offered. Only new quantity at or under the price may fill it.
    book, paper = venue()
    paper.place(gtc(1, Side.BUY, 1.5, 100.5, ts=3))
    book.apply_diff(diff(11, bids=[(98.0, 4.0)]))  # a change elsewhere
    assert paper.on_book(4) == [] and paper.resting[1].remaining == pytest.approx(0.5)
    assert paper.position == pytest.approx(1.0)
    book.apply_diff(diff(12, asks=[(100.0, 1.2)]))  # 0.2 more offered at 100 than it took: 0.2 fills
    [fill] = paper.on_book(5)
    assert (fill.qty, fill.leaves_qty) == (pytest.approx(0.2), pytest.approx(0.3))
    book.apply_diff(diff(13, asks=[(100.0, 0.0)]))  # the level went (traded or cancelled)...
    assert paper.on_book(6) == []
    book.apply_diff(diff(14, asks=[(100.0, 0.4)]))  # ...and came back: all of it is new
    [last] = paper.on_book(7)
    assert (last.qty, last.leaves_qty) == (pytest.approx(0.3), 0.0)
    assert paper.position == pytest.approx(1.5) and paper.resting == {}


@pytest.mark.parametrize("qty, price", [(float("nan"), 99.0), (-3.0, 99.0), (0.0, 99.0), (1.0, float("nan"))])
def test_a_bad_trade_moves_no_queue(qty, price):
    # before: a NaN size made the quantity ahead NaN (the order could never fill by trades again), a negative
    # one pushed the order back in its queue
    book, paper = venue()
    paper.place(gtc(1, Side.BUY, 1.0, 99.0))
    assert paper.on_trade(trade(price, qty, Side.SELL, 5)) == []
    assert paper.resting[1].ahead == 1.5 and paper.bad_trades == 1
    [fill] = paper.on_trade(trade(99.0, 2.0, Side.SELL, 6))
    assert fill.qty == pytest.approx(0.5)


@pytest.mark.parametrize("kwargs, fragment", [({"sigma": 50.0}, "sigma must be a number from 0 to 10"),
                                              ({"sigma": 1000.0}, "sigma must be"),
                                              ({"seed": None}, "seed must be an int"),
                                              ({"seed": "x"}, "seed must be an int")])
def test_lognormal_latency_refuses_a_shape_that_overflows_and_a_seed_that_is_not_one(kwargs, fragment):
    # before: sigma=1000 raised OverflowError at an order's draw; seed=None drew different latencies per run
    with pytest.raises(InvalidConfigurationError, match=fragment):
        LogNormalLatency(1_000_000, **kwargs)


def test_cancel_and_cancel_after():
    book, paper = venue()
    paper.place(gtc(1, Side.BUY, 1.0, 99.0, ts=10))
    paper.place(gtc(2, Side.BUY, 1.0, 98.0, ts=10, cancel_after_ns=100))
    [report] = [paper.cancel(1, 50)]
    assert (report.qty, report.leaves_qty, report.ts_ns) == (0.0, 0.0, 50)
    assert paper.cancel(1, 60) is None  # not resting any more: too late, nothing happens
    assert paper.expire(109) == [] and paper.next_expiry_ns() == 110
    [expired] = paper.expire(500)
    assert (expired.order_id, expired.ts_ns, expired.qty) == (2, 110, 0.0)
    assert paper.resting == {} and paper.cancelled == 2


def test_gtc_is_for_limit_orders_only():
    _, paper = venue()
    order = Order(1, Side.BUY, 1.0, time_in_force=TimeInForce.GTC)
    with pytest.raises(OrderRejected, match="time_in_force.*limit orders only"):
        paper.place(order)


def test_resting_orders_in_the_task_fill_the_same_whatever_the_order_of_arrival(run):
    """The executor sees market data and orders on two channels; a resting order's fills depend only on the
    market data after the order's time, not on which channel's events came first."""
    market = [SNAPSHOT,
              Quote(100, 99.0, 1.0, 100.0, 1.0, ts_ns=1_500),
              DepthDiff(101, 101, bids=((99.0, 0.6),), asks=(), recv_ts_ns=2_500),  # cancels at our level
              Trade(3_000, 99.0, 0.9, Side.SELL, 7, recv_ts_ns=3_000),  # 0.6 for the queue, 0.3 for us
              Quote(101, 99.0, 0.3, 100.0, 1.0, ts_ns=3_500),
              Trade(4_000, 98.0, 0.1, Side.SELL, 8, recv_ts_ns=4_000),  # through 99: the rest fills
              Quote(102, 98.0, 5.0, 100.0, 1.0, ts_ns=9_000)]
    order = Order(1, Side.BUY, 0.5, OrderType.LIMIT, 99.0, 2_000, "", 100, TimeInForce.GTC)
    # the next order (decided at 8000) moves the watermark: the market data up to it is played to order 1
    later = Order(2, Side.SELL, 0.1, OrderType.MARKET, None, 8_000, "", 101)

    async def main(position, later_position):
        bus = EventBus(trading_channels(64))
        fills = bus.subscribe(TradingEvent.FILLS)
        executor = PaperExecutorTask(bus)
        events = list(market)
        events.insert(later_position, later)
        events.insert(position, order)
        for event in events:
            await executor.handle_event(event)
        return [(f.order_id, f.qty, f.avg_price, f.ts_ns, f.leaves_qty) for f in fills.drain()], executor.digest

    runs = [run(main(position, later_position)) for position, later_position in
            ((2, 5), (4, 6), (len(market), len(market)), (2, len(market)))]
    assert all(r == runs[0] for r in runs)
    assert runs[0][0] == [(1, pytest.approx(0.3), 99.0, 3_000, pytest.approx(0.2)), (1, pytest.approx(0.2), 99.0, 4_000, 0.0),
                          (2, 0.1, 99.0, 8_000, 0.0)]  # the book: trades do not change it, diffs do
