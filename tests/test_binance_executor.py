"""The Binance executor's accounting when the exchange's answers are ambiguous or its reports come out of
order.

* A ``5xx`` answer to a new order leaves its execution status unknown (Binance's API docs): the order may be
  on the book. The executor asks the server (by client id), as for an order that got no answer at all; an
  order the server took is settled by its execution reports, one it did not take is refused once.
* Execution reports may arrive out of order: a final report (``FILLED``, ``CANCELED`` ...) before an earlier
  partial ``TRADE``. The final report's cumulative quantities (``z``, ``Z``) settle the order whole; the late
  trade is recognised (``late_reports``), never foreign, never booked twice.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("picows")

import kimiha  # noqa: E402
from kimiha.event_bus import EventBus  # noqa: E402
from kimiha.trading.model import Fill, Liquidity, Order, OrderType, Side  # noqa: E402
from kimiha.trading.tasks import TradingEvent, trading_channels  # noqa: E402
from kimiha.venues.binance.orders import BinanceExecutorTask, ExecutionReport, _Working  # noqa: E402
from kimiha.venues.binance.rest import BinanceRest  # noqa: E402
from kimiha.venues.binance.signing import HmacSigner  # noqa: E402
from kimiha.venues.binance.sim import LocalExchange, SimFaults  # noqa: E402

HANG = 30.0
KEY, SECRET = "executor-test-key-51c2", "executor-test-secret-0d7b"


def run(coro: Awaitable[Any]) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(HANG):
            return await coro

    return kimiha.run(guarded())


async def until(condition: Any, what: str, timeout: float = 20.0) -> None:
    """Wait until ``condition()`` holds (a bounded wait on a condition, not a sleep that hides a race)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
def excerpt(tape_slice: Any) -> Path:
    """The shipped tape's first 400 lines (the snapshot is line 8: the book is live after it)."""
    return cast(Path, tape_slice(400))


# ------------------------------------------------------------------------------------- 5xx to a new order
@pytest.mark.parametrize("status", [503, 400], ids=["http-503", "http-400"])
@pytest.mark.parametrize("first", ["answer", "report"], ids=["503-before-reports", "reports-before-503"])
def test_a_503_to_a_new_order_is_looked_up_not_counted_as_refused(excerpt: Path, first: str, status: int,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Order 1: the exchange takes it (it fills at once) and answers 503 (-1007, execution status unknown).
    ``status`` 400: the same -1007 under a 4xx status (Binance's docs: the status is unknown whatever the HTTP
    status; it was refused as a bad request before).
    Order 2: the exchange answers 503 (-1008) without taking it. Order 1 must be settled by its execution
    reports (its fill reaches the strategy, the account follows the exchange's), order 2 refused once.

    ``first``: whether the 503 reaches the executor before the order's execution reports (they are held until
    the executor has handled the answer) or after them (the exchange answers once the final report is in)."""
    executors: list[BinanceExecutorTask] = []
    if first == "report":
        new_order = LocalExchange._new_order

        async def answer_after_the_report(self: LocalExchange, request: Any) -> Any:
            response = await new_order(self, request)
            if request.query.get("newClientOrderId") == executors[0].client_order_id(1):
                await until(lambda: executors[0].working == 0, "order 1's final report at the executor")
            return response

        monkeypatch.setattr(LocalExchange, "_new_order", answer_after_the_report)

    async def main() -> tuple[BinanceExecutorTask, LocalExchange, list[Fill | None]]:
        faults = SimFaults(order_503=1, order_503_untaken=1, order_unknown_status=status)
        async with LocalExchange(excerpt, speed=None, start_on_connect=False, faults=faults) as ex:
            await until(lambda: "BTCUSDT" in ex.books and ex.books["BTCUSDT"].is_live, "the exchange's book")
            bus = EventBus(trading_channels())
            fills = bus.subscribe(TradingEvent.FILLS)
            rest = BinanceRest(ex.rest_url, signer=HmacSigner(ex.api_key, ex.api_secret))
            executor = BinanceExecutorTask(bus, rest, ex.ws_url, symbol="BTCUSDT")
            executors.append(executor)
            await executor.initialize()
            held: list[ExecutionReport] = []
            if first == "answer":
                executor.stream.on_report = held.append  # the reports wait until the 503 has been handled
            try:
                await executor.handle_event(Order(1, Side.BUY, 0.001, OrderType.MARKET, None, time.time_ns(),
                                                  "BTCUSDT"))
                if first == "answer":
                    cid = executor.client_order_id(1)
                    await until(lambda: any(r.c == cid and r.X == "FILLED" for r in held),
                                "order 1's reports")
                    executor.stream.on_report = executor._on_report
                    for report in held:
                        executor._on_report(report)
                fill1 = await asyncio.wait_for(fills.recv(), HANG / 2)
                await executor.handle_event(Order(2, Side.BUY, 0.001, OrderType.MARKET, None, time.time_ns(),
                                                  "BTCUSDT"))
                fill2 = await asyncio.wait_for(fills.recv(), HANG / 2)
            finally:
                await executor.shutdown()
                await rest.close()
            return executor, ex, [fill1, fill2, fills.try_recv()]

    executor, ex, (fill1, fill2, extra) = run(main())
    assert ex.order_503_sent == 1 and ex.order_503_untaken_sent == 1 and len(ex.orders) == 1
    taken = next(iter(ex.orders.values()))
    assert taken.status == "FILLED" and taken.client_order_id == executor.client_order_id(1)
    assert fill1 is not None and fill1.order_id == 1
    assert fill1.qty == pytest.approx(0.001)
    assert fill1.avg_price == pytest.approx(taken.quote_qty / taken.executed)
    assert fill2 is not None and fill2.order_id == 2 and fill2.qty == 0.0 and math.isnan(fill2.avg_price)
    assert extra is None  # one answer per order: no refusal beside order 1's fill
    assert executor.unanswered == 2 and executor.rejected == 1 and executor.acked == 1
    assert executor.working == 0
    assert len(executor.errors) == 1 and "-1008 (HTTP 503)" in executor.errors[0]
    assert executor.foreign_reports == 0 and executor.late_reports == 0
    server = ex.accounts[ex.api_key]
    assert executor.account.position == pytest.approx(server.positions["BTCUSDT"], abs=1e-12)
    assert executor.account.cash == pytest.approx(server.cash, rel=1e-12)


# --------------------------------------------------------------------------------- reports out of order
def _report(cid: str, x: str, status: str, *, side: str = "BUY", last: float = 0.0, px: float = 0.0,
            cum: float, cum_quote: float, fee: float = 0.0, trade_id: int = -1) -> ExecutionReport:
    return ExecutionReport(e="executionReport", E=1, s="BTCUSDT", c=cid, S=side, o="LIMIT", x=x, X=status,
                           i=7, q=1.0, l=last, z=cum, L=px, n=fee, N="USDT", T=1_700_000_000_000, Z=cum_quote,
                           t=trade_id)


def _executor() -> tuple[BinanceExecutorTask, BinanceRest]:
    bus = EventBus(trading_channels())
    rest = BinanceRest("http://127.0.0.1:9", signer=HmacSigner(KEY, SECRET))
    return BinanceExecutorTask(bus, rest, "ws://127.0.0.1:9", symbol="BTCUSDT"), rest


def _feed(ex: BinanceExecutorTask, order: Order, reports: list[ExecutionReport]) -> list[Fill]:
    ex._working[ex.client_order_id(order.order_id)] = _Working(order)
    for r in reports:
        ex._on_report(r)
    return [ex._out.get_nowait() for _ in range(ex._out.qsize())]


@pytest.mark.parametrize("side", ["BUY", "SELL"])
def test_a_final_report_before_an_earlier_trade_settles_the_whole_quantity_once(
        side: str, caplog: pytest.LogCaptureFixture) -> None:
    """Trades of 0.4 at 100 (fee 0.04) and 0.6 at 101 (fee 0.0606); the second, FILLED, arrives first."""
    async def main() -> tuple[BinanceExecutorTask, list[Fill]]:
        ex, rest = _executor()
        cid = ex.client_order_id(1)
        order = Order(1, Side.BUY if side == "BUY" else Side.SELL, 1.0, OrderType.LIMIT, 101.0, 1,
                      symbol="BTCUSDT")
        first = _report(cid, "TRADE", "PARTIALLY_FILLED", side=side, last=0.4, px=100.0, cum=0.4,
                        cum_quote=40.0, fee=0.04, trade_id=11)
        final = _report(cid, "TRADE", "FILLED", side=side, last=0.6, px=101.0, cum=1.0, cum_quote=100.6,
                        fee=0.0606, trade_id=12)
        fills = _feed(ex, order, [
            _report(cid, "NEW", "NEW", side=side, cum=0.0, cum_quote=0.0),
            final,
            first,  # late: already covered by the final report's cumulative quantities
            first,  # and again: a duplicate
            final,  # the final report again
        ])
        await rest.close()
        return ex, fills

    with caplog.at_level(logging.WARNING, "kimiha.venues.binance.orders"):
        ex, fills = run(main())
    assert len(fills) == 1
    fill = fills[0]
    assert fill.order_id == 1 and fill.qty == pytest.approx(1.0) and fill.avg_price == pytest.approx(100.6)
    assert fill.fee == pytest.approx(0.0606)  # the late trade's fee was not known when the fill was published
    assert fill.levels == 2 and fill.liquidity is Liquidity.TAKER
    acct = ex.account
    sign = 1.0 if side == "BUY" else -1.0
    assert acct.position == pytest.approx(sign * 1.0)
    assert acct.fees_paid == pytest.approx(0.1006)  # ... the account books it when the late report arrives
    assert acct.cash == pytest.approx(-sign * 100.6 - 0.1006)
    assert acct.notional == pytest.approx(100.6) and acct.volume == pytest.approx(1.0)
    assert acct.avg_entry_price == pytest.approx(100.6)
    assert acct.fills == 1 and acct.partial_fills == 0 and acct.orders == 1
    assert ex.reconciled == 1 and ex.late_reports == 1 and ex.duplicate_reports == 2
    assert ex.foreign_reports == 0 and ex.overfills == 0 and ex.working == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("does not know" in m for m in messages) == 0
    assert sum(cid_in(m, ex) and "cumulative 1" in m and "had seen 0.6" in m for m in messages) == 1, messages
    late = [m for m in messages if cid_in(m, ex) and "trade 11 of 0.4 at 100" in m and "arrived after" in m]
    assert len(late) == 1 and "fee 0.04 now" in late[0] and "counted in late_reports" in late[0], messages
    again = [m for m in messages if cid_in(m, ex) and "trade 11" in m and "reported again" in m]
    assert len(again) == 1, messages
    assert len(messages) == 3, messages  # each counter's first occurrence only


def cid_in(message: str, ex: BinanceExecutorTask) -> bool:
    return ex.client_order_id(1) in message


def test_a_cancel_before_the_partial_trade_it_follows_books_the_partial_once() -> None:
    """A GTC order partly filled (0.4 at 100, fee 0.04), then cancelled: the CANCELED report overtakes the
    trade."""
    async def main() -> tuple[BinanceExecutorTask, list[Fill]]:
        ex, rest = _executor()
        cid = ex.client_order_id(1)
        order = Order(1, Side.BUY, 1.0, OrderType.LIMIT, 100.0, 1, symbol="BTCUSDT")
        fills = _feed(ex, order, [
            _report(cid, "NEW", "NEW", cum=0.0, cum_quote=0.0),
            _report(cid, "CANCELED", "CANCELED", cum=0.4, cum_quote=40.0),
            _report(cid, "TRADE", "PARTIALLY_FILLED", last=0.4, px=100.0, cum=0.4, cum_quote=40.0, fee=0.04,
                    trade_id=11),
        ])
        await rest.close()
        return ex, fills

    ex, fills = run(main())
    assert len(fills) == 1
    fill = fills[0]
    assert fill.qty == pytest.approx(0.4) and fill.avg_price == pytest.approx(100.0) and fill.fee == 0.0
    assert fill.requested_qty == 1.0 and fill.levels == 1
    assert ex.account.position == pytest.approx(0.4) and ex.account.fees_paid == pytest.approx(0.04)
    assert ex.account.cash == pytest.approx(-40.04)
    assert ex.account.fills == 1 and ex.account.partial_fills == 1 and ex.account.unfilled == 0
    assert ex.reconciled == 1 and ex.late_reports == 1
    assert ex.duplicate_reports == 0 and ex.foreign_reports == 0


def test_a_server_without_cumulative_quote_is_reconciled_at_the_limit_price_or_booked_when_the_trade_comes(
        caplog: pytest.LogCaptureFixture) -> None:
    """No ``Z`` in the reports: the quantity a final report holds beyond the trades seen is priced at the
    order's limit price; a market order's cannot be priced (logged, not booked) and its late trade is booked
    whole when it arrives."""
    async def main() -> tuple[BinanceExecutorTask, list[Fill]]:
        ex, rest = _executor()
        limit, market = ex.client_order_id(1), ex.client_order_id(2)
        fills = _feed(ex, Order(1, Side.BUY, 1.0, OrderType.LIMIT, 100.0, 1, symbol="BTCUSDT"), [
            _report(limit, "CANCELED", "CANCELED", cum=0.4, cum_quote=0.0),
            _report(limit, "TRADE", "PARTIALLY_FILLED", last=0.4, px=100.0, cum=0.4, cum_quote=0.0, fee=0.04,
                    trade_id=11),
        ])
        fills += _feed(ex, Order(2, Side.BUY, 0.5, OrderType.MARKET, None, 1, symbol="BTCUSDT"), [
            _report(market, "EXPIRED", "EXPIRED", cum=0.2, cum_quote=0.0),
            _report(market, "TRADE", "PARTIALLY_FILLED", last=0.2, px=101.0, cum=0.2, cum_quote=0.0, fee=0.0202,
                    trade_id=21),
            _report(market, "TRADE", "PARTIALLY_FILLED", last=0.2, px=101.0, cum=0.2, cum_quote=0.0, fee=0.0202,
                    trade_id=21),
        ])
        await rest.close()
        return ex, fills

    with caplog.at_level(logging.WARNING, "kimiha.venues.binance.orders"):
        ex, fills = run(main())
    assert [(f.order_id, f.qty) for f in fills] == [(1, pytest.approx(0.4)), (2, 0.0)]
    assert fills[0].avg_price == pytest.approx(100.0)
    assert ex.account.position == pytest.approx(0.6)
    assert ex.account.cash == pytest.approx(-40.0 - 0.04 - 20.2 - 0.0202)
    assert ex.reconciled == 1 and ex.late_reports == 2 and ex.duplicate_reports == 1 and ex.foreign_reports == 0
    messages = [r.getMessage() for r in caplog.records]
    assert sum("no cumulative quote quantity to price them: not booked" in m for m in messages) == 1, messages
