"""The paper executor (level walking, fees, account) and the imbalance strategy that feeds it."""

from __future__ import annotations

import gc
import itertools
import math
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kimiha.trading.book import OrderBook
from kimiha.error import InvalidConfigurationError
from kimiha.trading.paper import OrderRejected, PaperExecutor
from kimiha.trading.strategy import ImbalanceStrategy
from kimiha.trading.model import (
    BookUpdate,
    DepthDiff,
    DepthSnapshot,
    Fill,
    Liquidity,
    Order,
    OrderType,
    Quote,
    Side,
    Signal,
    Trade,
)
from kimiha.venues.binance import BinanceParser, iter_lines, parse_lines, recorded_tape

# Prices and sizes that are exact in binary floating point, so hand-computed figures compare exactly.
BIDS = [(99.0, 1.5), (98.0, 2.0), (95.0, 10.0)]
ASKS = [(100.0, 1.0), (101.0, 2.0), (103.0, 5.0)]


@pytest.fixture
def book() -> OrderBook:
    return OrderBook.from_levels(BIDS, ASKS, symbol="BTCUSDT")


def market(order_id, side, qty, ts=0):
    return Order(order_id, side, qty, OrderType.MARKET, None, ts, "BTCUSDT")


# ------------------------------------------------------------------------------------------- execution
def test_fills_walk_the_levels_and_the_account_follows_by_hand(book):
    ex = PaperExecutor(book, fee_bps=10.0)

    # Buy 2.5: 1.0 @ 100 + 1.5 @ 101 = 251.5 -> VWAP 100.6, fee 0.1% = 0.2515
    fill = ex.execute(market(1, Side.BUY, 2.5, ts=42))
    expected = Fill(1, Side.BUY, 2.5, 100.6, pytest.approx(0.2515), 42, Liquidity.TAKER, 2.5, 2, "BTCUSDT")
    assert fill == expected
    assert not fill.is_partial and fill.unfilled_qty == 0.0 and fill.notional == pytest.approx(251.5)
    assert ex.position == 2.5 and ex.avg_entry_price == pytest.approx(100.6)
    assert ex.cash == pytest.approx(-251.7515)
    # Marked to mid (99 + 100) / 2 = 99.5: 2.5 * (99.5 - 100.6) = -2.75
    assert ex.unrealized_pnl() == pytest.approx(-2.75)
    assert ex.total_pnl() == pytest.approx(-2.75 - 0.2515)
    assert ex.equity() - ex.initial_cash == pytest.approx(ex.total_pnl())

    # Sell 1.0 at the best bid 99: realized 1.0 * (99 - 100.6) = -1.6, fee 0.099; entry price unchanged
    fill = ex.execute(market(2, Side.SELL, 1.0))
    assert (fill.qty, fill.avg_price, fill.levels) == (1.0, 99.0, 1)
    assert fill.fee == pytest.approx(0.099)
    assert ex.position == 1.5 and ex.avg_entry_price == pytest.approx(100.6)
    assert ex.realized_pnl == pytest.approx(-1.6)

    # Sell 4.0 (the book is read, not consumed): 1.5 @ 99 + 2.0 @ 98 + 0.5 @ 95 = 392 -> VWAP 98.0
    # closes 1.5 (realized 1.5 * (98 - 100.6) = -3.9) and opens a 2.5 short at 98.0
    fill = ex.execute(market(3, Side.SELL, 4.0))
    assert (fill.qty, fill.avg_price, fill.levels) == (4.0, 98.0, 3)
    assert fill.fee == pytest.approx(0.392)
    assert ex.position == -2.5 and ex.avg_entry_price == 98.0
    assert ex.realized_pnl == pytest.approx(-5.5)
    assert ex.fees_paid == pytest.approx(0.2515 + 0.099 + 0.392)
    assert ex.cash == pytest.approx(-251.5 + 99.0 + 392.0 - ex.fees_paid)
    # short 2.5 from 98 marked at 99.5: -3.75
    assert ex.unrealized_pnl() == pytest.approx(-3.75)
    assert ex.unrealized_pnl(mark_price=97.0) == pytest.approx(2.5)
    assert ex.equity() - ex.initial_cash == pytest.approx(ex.total_pnl())

    # Buy 2.5 back at 100 (1.0) and 101 (1.5) = 251.5 -> VWAP 100.6: realized 2.5 * (98 - 100.6) = -6.5
    ex.execute(market(4, Side.BUY, 2.5))
    assert ex.position == 0.0 and ex.avg_entry_price == 0.0 and ex.unrealized_pnl() == 0.0
    assert ex.realized_pnl == pytest.approx(-12.0)
    assert ex.cash == pytest.approx(ex.realized_pnl - ex.fees_paid)  # flat: cash is exactly the net PnL
    summary = ex.summary()
    assert summary["orders"] == summary["fills"] == 4 and summary["volume"] == 10.0
    assert summary["notional"] == pytest.approx(251.5 + 99.0 + 392.0 + 251.5)


def test_insufficient_depth_gives_a_reported_partial_fill(book):
    ex = PaperExecutor(book, fee_bps=0.0)
    fill = ex.execute(market(1, Side.BUY, 10.0))
    # All 8.0 on offer: 100 + 202 + 515 = 817 -> VWAP 102.125; 2.0 unfilled and cancelled
    assert (fill.qty, fill.avg_price, fill.levels, fill.fee) == (8.0, 102.125, 3, 0.0)
    assert fill.requested_qty == 10.0 and fill.is_partial and fill.unfilled_qty == 2.0
    assert ex.partial_fills == 1 and ex.position == 8.0


def test_an_empty_side_fills_nothing_and_says_so():
    ex = PaperExecutor(OrderBook.from_levels(BIDS, []))
    fill = ex.execute(market(1, Side.BUY, 1.0))
    assert fill.qty == 0.0 and math.isnan(fill.avg_price) and fill.fee == 0.0 and fill.levels == 0
    assert fill.is_partial and fill.notional == 0.0
    assert ex.unfilled == 1 and ex.fills == 0 and ex.position == 0.0 and ex.cash == 0.0


def test_limit_orders_are_immediate_or_cancel_at_their_price(book):
    ex = PaperExecutor(book, fee_bps=0.0)
    fill = ex.execute(Order(1, Side.BUY, 5.0, OrderType.LIMIT, 101.0))
    assert (fill.qty, fill.avg_price, fill.levels, fill.unfilled_qty) == (3.0, pytest.approx(302 / 3), 2, 2.0)
    fill = ex.execute(Order(2, Side.SELL, 1.0, OrderType.LIMIT, 99.5))  # best bid 99 is below the limit
    assert fill.qty == 0.0 and fill.requested_qty == 1.0


def test_fee_is_configurable(book):
    fill = PaperExecutor(book, fee_bps=7.5).execute(market(1, Side.BUY, 1.0))
    assert fill.fee == pytest.approx(100.0 * 0.00075)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("order, field, fragment", [
    (Order(1, Side.BUY, 0.0), "qty", "must be a finite number > 0, got 0.0"),
    (Order(1, Side.BUY, -1.0), "qty", "got -1.0"),
    (Order(1, Side.BUY, math.nan), "qty", "got nan"),
    (Order(1, Side.BUY, math.inf), "qty", "got inf"),
    (Order(1, Side.BUY, "1"), "qty", "got '1'"),
    (Order(1, Side.BUY, True), "qty", "got True"),
    (Order(1, "BUY", 1.0), "side", "must be Side.BUY or Side.SELL ('buy' / 'sell'), got 'BUY'"),
    (Order(1, None, 1.0), "side", "got None"),
    (Order(1, Side.BUY, 1.0, "stop"), "order_type",
     "must be OrderType.MARKET or OrderType.LIMIT, got 'stop'"),
    (Order(1, Side.BUY, 1.0, OrderType.LIMIT), "price",
     "must be a finite number > 0 for a limit order, got None"),
    (Order(1, Side.BUY, 1.0, OrderType.LIMIT, -5.0), "price", "got -5.0"),
    (Order(1, Side.BUY, 1.0, OrderType.MARKET, 100.0), "price", "must be None for a market order, got 100.0"),
    (Order("a", Side.BUY, 1.0), "order_id", "must be an int, got str"),
    (Order(1, Side.BUY, 1.0, symbol="ETHUSDT"), "symbol", "must be 'BTCUSDT'"),
])
def test_bad_orders_are_rejected_naming_the_field(book, order, field, fragment):
    ex = PaperExecutor(book, symbol="BTCUSDT")
    with pytest.raises(OrderRejected) as info:
        ex.execute(order)
    err = info.value
    assert isinstance(err, ValueError)
    assert err.field == field
    assert f"field '{field}'" in str(err) and fragment in str(err)
    assert str(err).startswith(f"Order {order.order_id!r}:")
    assert ex.orders == 0 and ex.position == 0.0 and ex.cash == 0.0  # nothing happened


def test_plain_strings_for_side_and_type_are_accepted(book):
    fill = PaperExecutor(book).execute(Order(1, "sell", 1.0, "market"))
    assert fill.side is Side.SELL and fill.qty == 1.0


def test_duplicate_ids_and_non_orders_are_rejected(book):
    ex = PaperExecutor(book)
    ex.execute(market(7, Side.BUY, 1.0))
    with pytest.raises(OrderRejected, match="Order 7: field 'order_id' was already used"):
        ex.execute(market(7, Side.SELL, 1.0))
    with pytest.raises(OrderRejected, match="expected an Order, got dict"):
        ex.execute({"order_id": 8})  # type: ignore[arg-type]


def test_used_order_ids_take_no_memory_per_order(book):
    """0.3.0's soak leak: the executor kept every executed id in a set, an int and a table slot per order for
    its whole life (2 MiB after the 24,000 orders of the 10M soak). Consecutive ids now cost nothing per
    order, and every one of them is still refused when used again."""
    ex = PaperExecutor(book)
    sides = (Side.BUY, Side.SELL)
    for oid in range(1, 1_001):  # warm-up: whatever is built once
        ex.execute(market(oid, sides[oid % 2], 0.001))
    gc.collect()
    tracemalloc.start(1)
    try:
        before = tracemalloc.get_traced_memory()[0]
        for oid in range(1_001, 41_001):
            ex.execute(market(oid, sides[oid % 2], 0.001))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 16_384, f"{kept} bytes still held after 40,000 more orders (a set of their ids: ~3 MB)"
    for oid in (1, 1_000, 1_001, 20_000, 41_000):
        with pytest.raises(OrderRejected, match=f"Order {oid}: field 'order_id' was already used"):
            ex.execute(market(oid, Side.BUY, 0.001))
    assert ex.execute(market(41_001, Side.BUY, 0.001)).order_id == 41_001


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-6, 40), st.booleans()), max_size=120))
def test_an_id_is_refused_exactly_when_an_executed_order_used_it(steps):
    """Against a set of the executed ids: any order of ids, repeats, gaps, rejected orders (their id stays
    free). The kept runs are the model's maximal runs of consecutive ids, no more."""
    ex = PaperExecutor(OrderBook.from_levels(BIDS, ASKS, symbol="BTCUSDT"))
    executed: set[int] = set()
    for oid, valid in steps:
        order = market(oid, Side.BUY, 0.001 if valid else -1.0)  # qty -1: rejected before execution
        if oid in executed:
            with pytest.raises(OrderRejected, match="was already used"):
                ex.execute(order)
        elif not valid:
            with pytest.raises(OrderRejected, match="field 'qty'"):
                ex.execute(order)
        else:
            ex.execute(order)
            executed.add(oid)
    assert all((oid in ex._seen_ids) == (oid in executed) for oid in range(-8, 43))
    assert ex._seen_ids.runs == sum(1 for oid in executed if oid - 1 not in executed)


def test_an_order_against_a_book_that_is_not_live_is_rejected():
    ex = PaperExecutor(OrderBook("BTCUSDT"))
    with pytest.raises(OrderRejected, match="Order 1: cannot execute .* awaiting_snapshot"):
        ex.execute(market(1, Side.BUY, 1.0))
    assert ex.orders == 0


@pytest.mark.parametrize("kwargs, fragment", [
    ({"fee_bps": -1}, "fee_bps must be a finite number >= 0, got -1"),
    ({"fee_bps": math.nan}, "fee_bps must be a finite number >= 0"),
    ({"initial_cash": math.inf}, "initial_cash must be a finite number"),
])
def test_bad_executor_configuration_is_refused(book, kwargs, fragment):
    with pytest.raises(InvalidConfigurationError, match=fragment):
        PaperExecutor(book, **kwargs)
    with pytest.raises(InvalidConfigurationError, match="book must be an OrderBook"):
        PaperExecutor(None)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- strategy
def q(ts, bid_qty, ask_qty, bid=100.0, ask=101.0, uid=0):
    return Quote(uid, bid, bid_qty, ask, ask_qty, ts)


def test_strategy_fires_on_imbalance_with_hysteresis_and_cooldown():
    s = ImbalanceStrategy(order_qty=1.0, max_position=10.0, entry_threshold=0.5, rearm_threshold=0.1,
                          smoothing=1.0, cooldown_ns=1_000, symbol="BTCUSDT")
    assert s.on_quote(q(0, 1.0, 1.0)) == ()
    out = s.on_quote(q(10, 9.0, 1.0))  # imbalance 0.8 >= 0.5: buy
    assert out == (Signal(10, Side.BUY, 0.8, 100.5, "imbalance", "BTCUSDT"),
                   Order(1, Side.BUY, 1.0, OrderType.MARKET, None, 10, "BTCUSDT"))
    assert s.on_quote(q(2_000, 9.0, 1.0)) == ()  # still high, not re-armed: no new signal
    assert s.on_quote(q(2_010, 1.0, 1.0)) == ()  # back inside +-0.1: re-armed
    out = s.on_quote(q(2_020, 1.0, 9.0))  # sell signal, cooldown long over
    assert [type(e) for e in out] == [Signal, Order] and out[1].side is Side.SELL and out[1].order_id == 2
    s.on_quote(q(2_030, 1.0, 1.0))
    out = s.on_quote(q(2_040, 9.0, 1.0))  # 20 ns after the last order: signal only
    assert [type(e) for e in out] == [Signal] and s.suppressed_by_cooldown == 1
    assert (s.signals, s.orders) == (3, 2)


def test_strategy_respects_the_position_limit_including_orders_in_flight():
    s = ImbalanceStrategy(order_qty=0.004, max_position=0.01, entry_threshold=0.5, rearm_threshold=0.1,
                          smoothing=1.0, cooldown_ns=0)
    sizes = []
    for i in range(5):
        out = s.on_quote(q(2 * i, 9.0, 1.0))
        sizes.append(out[1].qty if len(out) == 2 else None)
        s.on_quote(q(2 * i + 1, 1.0, 1.0))
    # no fills yet: 0.004 + 0.004 + 0.002 fill the 0.01 limit, then nothing
    assert sizes == [0.004, 0.004, pytest.approx(0.002), None, None]
    assert s.exposure == pytest.approx(0.01) and s.suppressed_by_limit == 2
    s.on_fill(Fill(1, Side.BUY, 0.004, 100.0, 0.0, 0, requested_qty=0.004))
    s.on_fill(Fill(2, Side.BUY, 0.001, 100.0, 0.0, 0, requested_qty=0.004))  # partial: 0.003 cancelled
    s.on_fill(Fill(99, Side.BUY, 5.0, 100.0, 0.0, 0, requested_qty=5.0))  # not ours: ignored
    assert s.position == pytest.approx(0.005) and s.in_flight == pytest.approx(0.002)
    out = s.on_quote(q(20, 9.0, 1.0))
    assert out[1].qty == pytest.approx(0.003)  # room freed by the cancelled remainder


def test_strategy_ignores_empty_sides_and_accepts_book_updates():
    s = ImbalanceStrategy(smoothing=1.0, entry_threshold=0.5, rearm_threshold=0.1, cooldown_ns=0)
    assert s.on_book_update(BookUpdate(1, 2, None, None, 101.0, 1.0)) == ()
    assert s.imbalance is None
    out = s.on_book_update(BookUpdate(1, 2, 100.0, 3.0, 101.0, 1.0, ts_ns=5))  # 0.5
    assert out[0].side is Side.BUY and out[1].ts_ns == 5
    assert s.on_trade(Trade(1, 100.5, 0.1, Side.BUY, 1)) == () and s.last_trade_price == 100.5


@pytest.mark.parametrize("kwargs, fragment", [
    ({"order_qty": 0}, "order_qty must be > 0.0"),
    ({"max_position": -1}, "max_position must be > 0.0"),
    ({"entry_threshold": 1.5}, "entry_threshold must be > 0.0 and <= 1.0"),
    ({"entry_threshold": 0.3, "rearm_threshold": 0.3}, "rearm_threshold must be below entry_threshold"),
    ({"smoothing": 0}, "smoothing must be > 0.0 and <= 1.0"),
    ({"cooldown_ns": 1.5}, "cooldown_ns must be an int >= 0"),
    ({"order_qty": math.nan}, "order_qty must be a finite number"),
])
def test_bad_strategy_configuration_is_refused(kwargs, fragment):
    with pytest.raises(InvalidConfigurationError, match=fragment):
        ImbalanceStrategy(**kwargs)


def test_strategy_refuses_events_that_are_not_tops_of_book():
    with pytest.raises(TypeError, match="expected a Quote or a BookUpdate, got Trade"):
        ImbalanceStrategy().on_quote(Trade(1, 100.0, 1.0, Side.BUY, 1))  # type: ignore[arg-type]


def _run_tape(**params):
    book = OrderBook()
    strategy = ImbalanceStrategy(**params)
    ex = PaperExecutor(book, fee_bps=10.0, initial_cash=100_000.0)
    orders, fills, max_exposure = [], [], 0.0
    for event in parse_lines(iter_lines(recorded_tape()), BinanceParser()):
        cls = type(event)
        if cls is DepthDiff:
            book.apply_diff(event)
        elif cls is DepthSnapshot:
            book.apply_snapshot(event)
        elif cls is Trade:
            strategy.on_trade(event)
        elif cls is Quote and book.is_live:
            for out in strategy.on_quote(event):
                if isinstance(out, Order):
                    orders.append(out)
                    max_exposure = max(max_exposure, abs(strategy.exposure))
                    fill = ex.execute(out)
                    fills.append(fill)
                    strategy.on_fill(fill)
    return strategy, ex, orders, fills, max_exposure


def test_strategy_and_paper_executor_on_the_tape_are_deterministic_and_within_limits():
    strategy, ex, orders, fills, max_exposure = _run_tape()
    again = _run_tape()
    assert orders == again[2] and fills == again[3]  # same tape, same decisions, same fills
    assert len(orders) > 20
    assert max_exposure <= strategy.max_position + 1e-12
    gaps = [b.ts_ns - a.ts_ns for a, b in itertools.pairwise(orders)]
    assert min(gaps) >= strategy.cooldown_ns
    assert [o.order_id for o in orders] == list(range(1, len(orders) + 1))
    assert strategy.position == pytest.approx(ex.position) and strategy.in_flight == 0.0
    assert ex.fees_paid == pytest.approx(sum(f.fee for f in fills))
    assert ex.fees_paid == pytest.approx(ex.notional * 0.001)
    assert ex.equity() - ex.initial_cash == pytest.approx(ex.total_pnl())
