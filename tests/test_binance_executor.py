"""The Binance executor's accounting when the exchange's answers are ambiguous.

* A ``5xx`` answer to a new order leaves its execution status unknown (Binance's API docs): the order may be on
  the book. The executor asks the server (by client id), as for an order that got no answer at all; an order
  the server took is settled by its execution reports, one it did not take is refused once.
"""

from __future__ import annotations

import asyncio
import gzip
import itertools
import math
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("picows")

import kimiha  # noqa: E402
from kimiha.event_bus import EventBus  # noqa: E402
from kimiha.trading.model import Fill, Order, OrderType, Side  # noqa: E402
from kimiha.trading.tasks import TradingEvent, trading_channels  # noqa: E402
from kimiha.venues.binance import iter_lines, recorded_tape  # noqa: E402
from kimiha.venues.binance.orders import BinanceExecutorTask, ExecutionReport  # noqa: E402
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


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tape's first 400 lines (the snapshot is line 8: the book is live after it)."""
    path = tmp_path_factory.mktemp("tape") / "excerpt.gz"
    with gzip.open(path, "wb") as f:
        for line in itertools.islice(iter_lines(recorded_tape()), 400):
            f.write(line + b"\n")
    return path


# ------------------------------------------------------------------------------------- 5xx to a new order
@pytest.mark.parametrize("first", ["answer", "report"], ids=["503-before-reports", "reports-before-503"])
def test_a_503_to_a_new_order_is_looked_up_not_counted_as_refused(excerpt: Path, first: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Order 1: the exchange takes it (it fills at once) and answers 503 (-1007, execution status unknown).
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
        faults = SimFaults(order_503=1, order_503_untaken=1)
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
                    await until(lambda: any(r.c == cid and r.X == "FILLED" for r in held), "order 1's reports")
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
    assert fill1.qty == pytest.approx(0.001) and fill1.avg_price == pytest.approx(taken.quote_qty / taken.executed)
    assert fill2 is not None and fill2.order_id == 2 and fill2.qty == 0.0 and math.isnan(fill2.avg_price)
    assert extra is None  # one answer per order: no refusal beside order 1's fill
    assert executor.unanswered == 2 and executor.rejected == 1 and executor.acked == 1 and executor.working == 0
    assert len(executor.errors) == 1 and "-1008 (HTTP 503)" in executor.errors[0]
    assert executor.foreign_reports == 0
    server = ex.accounts[ex.api_key]
    assert executor.account.position == pytest.approx(server.positions["BTCUSDT"], abs=1e-12)
    assert executor.account.cash == pytest.approx(server.cash, rel=1e-12)
