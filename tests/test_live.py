"""The live Binance path against the local exchange (127.0.0.1 only): the local-book procedure, resyncs,
reconnects, pings, silence, rate limits, signed orders and their execution reports, recording and replay."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import math
import socket
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("picows")

import kimiha  # noqa: E402
from kimiha import EventBus, TradingOrchestratorBuilder  # noqa: E402
from kimiha.trading.model import Fill, Order, OrderType, Side  # noqa: E402
from kimiha.trading.tasks import ImbalanceStrategyTask, PaperExecutorTask, TradingEvent, trading_channels  # noqa: E402
from kimiha.venues.binance import BinanceAggregator, BinanceConnector, iter_lines, recorded_tape  # noqa: E402
from kimiha.venues.binance.live import BinanceLiveFeed, stream_names  # noqa: E402
from kimiha.venues.binance.orders import BinanceExecutorTask, BinanceOrderClient, check_order_url  # noqa: E402
from kimiha.venues.binance.recorder import TapeRecorder, rotated_path  # noqa: E402
from kimiha.venues.binance.rest import (  # noqa: E402
    BinanceAuthError,
    BinanceBadRequest,
    BinanceOrderRejected,
    BinanceRest,
    BinanceTimestampError,
    BinanceUnavailable,
    BinanceUnknownOrder,
    error_from_answer,
)
from kimiha.venues.binance.signing import Ed25519Signer, HmacSigner, signer_from_env  # noqa: E402
from kimiha.venues.binance.sim import LocalExchange, SimFaults  # noqa: E402

HANG = 60.0


@pytest.fixture(scope="module")
def excerpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped tape's first 4,000 lines (about 25 s of BTCUSDT; the snapshot is line 8)."""
    path = tmp_path_factory.mktemp("tape") / "excerpt.gz"
    with gzip.open(path, "wb") as f:
        for line in itertools.islice(iter_lines(recorded_tape()), 4000):
            f.write(line + b"\n")
    return path


def run(coro):  # noqa: ANN001, ANN201
    async def guarded():  # noqa: ANN202
        async with asyncio.timeout(HANG):
            return await coro

    return kimiha.run(guarded())


async def until(condition, what: str, timeout: float = 20.0) -> None:  # noqa: ANN001
    """Wait until ``condition()`` holds (a bounded wait on a condition, not a sleep that hides a race)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class Pipeline:
    """Feed -> connector -> aggregator -> strategy -> paper executor on one bus."""

    def __init__(self, exchange: LocalExchange, **feed_kw) -> None:  # noqa: ANN003
        self.exchange = exchange
        self.lines: list[bytes] = []
        self.feed = BinanceLiveFeed(["BTCUSDT"], ws_url=exchange.ws_url, rest_url=exchange.rest_url, **feed_kw)
        self.bus = EventBus(trading_channels())
        self.connector = BinanceConnector(self.bus, self._tap())
        self.aggregator = BinanceAggregator(self.bus)
        self.executor = PaperExecutorTask(self.bus)
        self.engine = (TradingOrchestratorBuilder(self.bus).with_connector(self.connector)
                       .with_aggregator(self.aggregator).with_strategy(ImbalanceStrategyTask(self.bus))
                       .with_executor(self.executor).build())

    async def _tap(self):  # noqa: ANN202 - the feed's lines, kept for the test
        async for line in self.feed:
            self.lines.append(line)
            yield line

    async def run_to_end(self, *, all_arrive: bool = True) -> None:
        if self.feed._supervisor is None:
            await self.feed.start()
        await self.engine.start()
        try:
            ex, feed = self.exchange, self.feed
            await until(lambda: ex.finished.is_set(), "the recording to be played")
            if all_arrive:  # (a connection the client drops loses what was in flight)
                await until(lambda: feed.messages >= ex.messages_sent, "every message sent to arrive")
            await until(lambda: not feed._fetches and not feed._queue and self.connector.lines == feed.lines_out,
                        "the feed to hand out every line")
        finally:
            await self.engine.shutdown(timeout=20)
            await self.feed.aclose()


def test_stream_names_and_url() -> None:
    assert stream_names(["BTCUSDT", "ethusdt"]) == [
        "btcusdt@trade", "btcusdt@bookTicker", "btcusdt@depth@100ms",
        "ethusdt@trade", "ethusdt@bookTicker", "ethusdt@depth@100ms"]
    feed = BinanceLiveFeed(["btcusdt", "ETHUSDT"], ws_url="ws://127.0.0.1:1/", rest_url="http://127.0.0.1:1")
    assert feed.url == ("ws://127.0.0.1:1/stream?streams=btcusdt@trade/btcusdt@bookTicker/btcusdt@depth@100ms/"
                        "ethusdt@trade/ethusdt@bookTicker/ethusdt@depth@100ms")


def test_snapshot_after_first_diffs_and_full_book_check(excerpt: Path) -> None:
    async def main() -> Pipeline:
        async with LocalExchange(excerpt, speed=40.0) as ex:
            p = Pipeline(ex)
            await p.run_to_end()
            return p

    p = run(main())
    kinds = [b"snapshot" if b'"lastUpdateId"' in line[:40] else b"depth" if b"@depth" in line[:60] else b"x"
             for line in p.lines]
    assert kinds.count(b"snapshot") == 1
    assert kinds.index(b"depth") < kinds.index(b"snapshot")  # the diffs came first, as on Binance
    check = p.aggregator.check
    assert check.compared > 50 and check.matched == check.compared
    assert p.feed.resyncs == 0 and p.aggregator.gaps == 0 and p.aggregator.book.is_live
    assert p.feed.lines_out == len(p.lines) == p.connector.lines == p.aggregator.parser.lines
    assert p.feed.rest.used_weight > 0  # read from X-MBX-USED-WEIGHT-1M


def test_dropped_diff_resyncs_and_book_check_stays_exact(excerpt: Path) -> None:
    async def main() -> Pipeline:
        async with LocalExchange(excerpt, speed=40.0, faults=SimFaults(drop_diffs=[20])) as ex:
            p = Pipeline(ex)
            await p.run_to_end()
            assert ex.diffs_dropped == 1
            return p

    p = run(main())
    # The hole is seen either as a gap in a synced book (a resync), or -- when the first snapshot's answer came
    # after it (a loaded machine) -- among the diffs buffered for that snapshot, which then cannot bridge them
    # and is fetched again (a refetch). Which one depends on the REST answer's timing, not on the feed.
    feed, book = p.feed, p.aggregator.book
    if feed.resyncs:
        assert feed.gaps == 1 and feed.resyncs == 1 and feed.snapshots == 2
        assert p.aggregator.gaps == 1 and book.resyncs == 1
    else:
        assert feed.refetches >= 1 and feed.gaps == 0 and feed.snapshots == 1 and p.aggregator.gaps == 0
    assert book.is_live  # the last diffs were applied: after the resync (or the refetch) the book went on
    # (how many quotes are compared depends on how long the fresh snapshot took: out of sync meanwhile)
    check = p.aggregator.check
    assert check.compared > 0 and check.matched == check.compared


def test_server_closing_mid_stream_reconnects_and_resyncs(excerpt: Path) -> None:
    async def main() -> Pipeline:
        async with LocalExchange(excerpt, speed=20.0, faults=SimFaults(close_after=[1000])) as ex:
            p = Pipeline(ex, backoff_initial=0.2)
            await p.run_to_end()
            assert ex.closes == 1
            return p

    p = run(main())
    assert p.feed.closed_by_server == 1 and p.feed.reconnects == 1
    assert p.feed.resyncs == 1 and p.aggregator.book.resyncs == 1  # what was sent meanwhile was lost
    check = p.aggregator.check  # (how many are compared depends on the reconnect's and resync's timing)
    assert check.compared > 0 and check.matched == check.compared and p.aggregator.book.is_live


def test_server_pings_are_answered(excerpt: Path) -> None:
    async def main() -> tuple[int, int]:
        async with LocalExchange(excerpt, speed=20.0, faults=SimFaults(ping_interval=0.05)) as ex:
            p = Pipeline(ex)
            await p.run_to_end()
            return ex.pings_sent, ex.pongs

    sent, pongs = run(main())
    assert sent >= 3 and pongs >= 3


def test_silent_stream_is_reconnected(excerpt: Path) -> None:
    async def main() -> Pipeline:
        # the exchange holds the rest of the recording until the client has reconnected: the diffs after the
        # reconnect then follow a hole (what was played to the silent socket), whatever the machine's load
        # (pings keep the new socket from being silent while the exchange holds; the silent one gets none)
        faults = SimFaults(silent_after=800, hold_after=900, ping_interval=0.05)
        async with LocalExchange(excerpt, speed=40.0, faults=faults) as ex:
            p = Pipeline(ex, silence_timeout=1.0, backoff_initial=0.05)
            await p.feed.start()
            await until(lambda: ex.held.is_set() and p.feed.reconnects >= 1, "the reconnect while held",
                        timeout=HANG)
            ex.resume()
            await p.run_to_end()
            return p

    p = run(main())
    # a process stalled for longer than silence_timeout (a loaded machine) can look silent once more: counted
    # the same way; the reconnect forced by the fault is always there, and the hole it leaves is resynced
    feed = p.feed
    assert feed.silent_reconnects >= 1 and feed.reconnects + feed.reconnecting == feed.silent_reconnects
    assert feed.resyncs >= 1 and feed.resyncs == feed.gaps and p.aggregator.book.is_live
    check = p.aggregator.check
    assert check.matched == check.compared


def test_old_connection_is_replaced_before_the_24_hour_disconnect(excerpt: Path) -> None:
    async def main() -> Pipeline:
        async with LocalExchange(excerpt, speed=20.0) as ex:
            p = Pipeline(ex, max_connection_age=0.5, backoff_initial=0.05)
            await p.run_to_end(all_arrive=False)
            return p

    p = run(main())
    # one may have been under way at the stop: started (counted in age_reconnects), not connected yet
    assert p.feed.age_reconnects >= 1
    assert p.feed.reconnects + p.feed.reconnecting == p.feed.age_reconnects
    check = p.aggregator.check  # (how much is compared depends on how many reconnects lost data: not checked)
    assert check.compared > 0 and check.matched == check.compared


def test_429_retry_after_is_honoured(excerpt: Path) -> None:
    async def main() -> tuple[Pipeline, list[float]]:
        async with LocalExchange(excerpt, speed=8.0, faults=SimFaults(depth_429=1, retry_after=1)) as ex:
            p = Pipeline(ex)
            await p.run_to_end()
            return p, ex.depth_request_times

    p, times = run(main())
    assert p.feed.rest.retried_429 == 1
    assert len(times) == 2 and times[1] - times[0] >= 1.0  # waited the server's Retry-After
    assert p.aggregator.check.matched == p.aggregator.check.compared > 0


def test_418_ban_is_waited_out_and_never_hammered(excerpt: Path) -> None:
    async def main() -> tuple[Pipeline, list[float]]:
        async with LocalExchange(excerpt, speed=8.0, faults=SimFaults(depth_418=1, retry_after=1)) as ex:
            p = Pipeline(ex)
            await p.run_to_end()
            assert ex.depth_418_sent == 1
            return p, ex.depth_request_times

    p, times = run(main())
    assert len(times) == 2 and times[1] - times[0] >= 1.0  # one request during the ban, none until it ended
    assert p.feed.rest.retried_429 == 0
    assert p.aggregator.check.matched == p.aggregator.check.compared > 0


def test_clock_offset_outside_recv_window_is_resynced(excerpt: Path) -> None:
    async def main() -> tuple[dict, int]:
        async with LocalExchange(excerpt, speed=None, start_on_connect=False) as ex:
            await until(lambda: ex.finished.is_set(), "the book")
            rest = BinanceRest(ex.rest_url, signer=HmacSigner(ex.api_key, ex.api_secret))
            rest.time_offset_ms = -60_000  # as if the local clock ran a minute ahead of the server's
            try:
                answer = await BinanceOrderClient(rest).new_order("BTCUSDT", "BUY", "MARKET", 0.001)
            finally:
                await rest.close()
            return answer, rest.time_offset_ms

    answer, offset = run(main())
    assert answer["status"] == "FILLED"  # refused with -1021 once, then sent again after GET /api/v3/time
    assert abs(offset) < 5_000


def test_cli_against_any_binance_protocol_server(excerpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import subprocess
    import sys

    from kimiha.apps.cli import main

    server = subprocess.Popen([sys.executable, "-m", "kimiha.venues.binance.sim", "--speed", "10",
                               "--recording", str(excerpt)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        code = main(["live", "--ws-url", f"ws://127.0.0.1:{port}", "--rest-url", f"http://127.0.0.1:{port}",
                     "--duration", "1.5", "--json", "--no-status"])
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["source"]["sim"] is False
    assert out["book_check"]["compared"] > 0 and out["book_check"]["matched"] == out["book_check"]["compared"]


def test_cli_refused_api_key_is_one_line(excerpt: Path, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import json
    import subprocess
    import sys

    from kimiha.apps.cli import main

    monkeypatch.setenv("BINANCE_API_KEY", "not-a-key-of-this-server")
    monkeypatch.setenv("BINANCE_API_SECRET", "its-secret")
    server = subprocess.Popen([sys.executable, "-m", "kimiha.venues.binance.sim", "--recording", str(excerpt)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        port = json.loads(server.stdout.readline())["port"]
        code = main(["live", "--ws-url", f"ws://127.0.0.1:{port}", "--rest-url", f"http://127.0.0.1:{port}",
                     "--executor", "binance", "--duration", "5", "--no-status"])
    finally:
        assert server.stdin is not None
        server.stdin.close()
        server.wait(timeout=30)
    captured = capsys.readouterr()
    err = [line for line in captured.err.splitlines() if line.startswith("kimiha live")]
    assert code == 1 and len(err) == 1 and "-2015" in err[0] and "BINANCE_API_KEY" in err[0]
    assert "its-secret" not in captured.err + captured.out and "Traceback" not in captured.err


def test_unreachable_server_is_one_clear_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there

    async def main() -> None:
        feed = BinanceLiveFeed(["BTCUSDT"], ws_url=f"ws://127.0.0.1:{port}", rest_url=f"http://127.0.0.1:{port}")
        try:
            await feed.start()
        finally:
            await feed.aclose()

    with pytest.raises(BinanceUnavailable, match=f"127.0.0.1:{port}: cannot connect"):
        run(main())


def test_cli_unreachable_url_exits_1_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from kimiha.apps.cli import main

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = main(["live", "--ws-url", f"ws://127.0.0.1:{port}", "--rest-url", f"http://127.0.0.1:{port}",
                 "--no-status"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith("kimiha live: Binance") and f"127.0.0.1:{port}" in err[0]


# ---------------------------------------------------------------------------------------------- orders
def test_bad_signature_and_bad_key_are_clear_errors(excerpt: Path) -> None:
    async def main() -> list[BaseException]:
        async with LocalExchange(excerpt, speed=None, start_on_connect=False) as ex:
            await until(lambda: ex.finished.is_set(), "the book")
            errors: list[BaseException] = []
            for signer in (HmacSigner(ex.api_key, "not-the-secret"), HmacSigner("not-the-key", ex.api_secret)):
                rest = BinanceRest(ex.rest_url, signer=signer)
                try:
                    await BinanceOrderClient(rest).new_order("BTCUSDT", "BUY", "MARKET", 0.001)
                except BinanceAuthError as exc:
                    errors.append(exc)
                finally:
                    await rest.close()
            assert ex.bad_signatures == 1 and not ex.orders
            return errors

    bad_sig, bad_key = run(main())
    assert bad_sig.code == -1022 and "Signature for this request is not valid" in str(bad_sig)
    assert "POST /api/v3/order" in str(bad_sig) and "not-the-secret" not in str(bad_sig)
    assert bad_key.code == -2015 and bad_key.status == 401


def test_ed25519_signed_order_is_accepted(excerpt: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate()
    public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    async def main() -> dict:
        async with LocalExchange(excerpt, speed=None, start_on_connect=False, ed25519_public_key=public) as ex:
            await until(lambda: ex.finished.is_set(), "the book")
            rest = BinanceRest(ex.rest_url, signer=Ed25519Signer(ex.api_key, key))
            try:
                return await BinanceOrderClient(rest).new_order("BTCUSDT", "SELL", "MARKET", 0.002)
            finally:
                await rest.close()

    answer = run(main())
    assert answer["status"] == "FILLED" and float(answer["executedQty"]) == 0.002


def _orders_arrive_late(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the local exchange take each new LIMIT order at the worst moment a loaded machine could deliver it:
    once the book would fill it whole in one trade (a level at or below its price holding its quantity), or
    once the exchange is held or done playing. What the order meets is then no longer what the test read."""
    new_order = LocalExchange._new_order

    async def late(self: LocalExchange, request: Any) -> Any:
        query = request.query
        if query.get("type") == "LIMIT" and query.get("side") == "BUY":
            qty, price = float(query["quantity"]), float(query["price"])

            def fills_whole() -> bool:
                best = self.books[query["symbol"]].best_ask()
                return best is not None and best[0] <= price and best[1] >= qty

            await until(lambda: fills_whole() or self.held.is_set() or self.finished.is_set(),
                        "a book that fills the order whole, a hold or the recording's end")
        return await new_order(self, request)

    monkeypatch.setattr(LocalExchange, "_new_order", late)


@pytest.mark.parametrize("late", [False, True], ids=["prompt", "late-order"])
def test_order_life_new_partial_fill_via_user_stream_and_pnl_agrees(excerpt: Path, late: bool,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if late:
        _orders_arrive_late(monkeypatch)

    async def main() -> tuple[BinanceExecutorTask, LocalExchange, list[Fill], dict]:
        # The book stands still at message 100 (live by then) while the test reads it and the order travels:
        # an order sized on a book still playing could meet a larger best level or a lower ask and fill whole.
        async with LocalExchange(excerpt, speed=10.0, start_on_connect=False, faults=SimFaults(hold_at=100)) as ex:
            await until(ex.held.is_set, "the exchange held at message 100")
            bus = EventBus(trading_channels())
            fills = bus.subscribe(TradingEvent.FILLS)
            rest = BinanceRest(ex.rest_url, signer=HmacSigner(ex.api_key, ex.api_secret))
            executor = BinanceExecutorTask(bus, rest, ex.ws_url, symbol="BTCUSDT", time_in_force="GTC")
            await executor.initialize()
            try:
                ask_px, ask_qty = ex.books["BTCUSDT"].best_ask()
                qty = round(ask_qty + 0.001, 8)  # more than the best level: part now, the rest rests at ask_px
                order = Order(1, Side.BUY, qty, OrderType.LIMIT, ask_px, time.time_ns(), "BTCUSDT")
                await executor.handle_event(order)  # answered: matched against the held book
                ex.resume()  # the recording's later trades at ask_px fill the rest
                fill = await asyncio.wait_for(fills.recv(), 30)
                query = await executor.client.query_order("BTCUSDT", client_order_id=executor.client_order_id(1))
                # a market sell closes the position: the account has realized PnL and fees on both sides
                await executor.handle_event(Order(2, Side.SELL, qty, OrderType.MARKET, None, time.time_ns(),
                                                  "BTCUSDT"))
                fill2 = await asyncio.wait_for(fills.recv(), 30)
            finally:
                await executor.shutdown()
                await rest.close()
            return executor, ex, [fill, fill2], query

    executor, ex, (fill, fill2), query = run(main())
    statuses = [status for cid, x, status in executor.history if cid == executor.client_order_id(1)]
    assert statuses[0] == "NEW" and statuses[1] == "PARTIALLY_FILLED" and statuses[-1] == "FILLED"
    assert query["status"] == "FILLED"
    assert fill.order_id == 1 and math.isclose(fill.qty, fill.requested_qty) and fill.levels >= 2
    assert fill2.order_id == 2 and math.isclose(fill2.qty, fill.qty)
    server = ex.accounts[ex.api_key]
    acct = executor.account
    assert acct.position == pytest.approx(server.positions["BTCUSDT"], abs=1e-12)
    assert acct.fees_paid == pytest.approx(server.fees, rel=1e-12)
    assert acct.cash == pytest.approx(server.cash, rel=1e-9, abs=1e-9)
    marks = ex.marks()
    assert acct.total_pnl(marks["BTCUSDT"]) == pytest.approx(server.equity_change(marks), rel=1e-9, abs=1e-9)
    assert executor.tick_to_trade.count == 2


def test_fill_reported_before_the_rest_answer(excerpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order's final execution report arrives (and its fill is published) before its REST answer: the
    executor books the fill once, then counts the answer as an acknowledgement, not a second order."""
    executors: list[BinanceExecutorTask] = []
    new_order = LocalExchange._new_order

    async def answer_after_the_report(self: LocalExchange, request: Any) -> Any:
        response = await new_order(self, request)
        await until(lambda: executors[0].working == 0, "the order's final report at the executor")
        return response

    monkeypatch.setattr(LocalExchange, "_new_order", answer_after_the_report)

    async def main() -> tuple[BinanceExecutorTask, list[Fill | None], LocalExchange]:
        async with LocalExchange(excerpt, speed=None, start_on_connect=False) as ex:
            await until(ex.finished.is_set, "the book")
            bus = EventBus(trading_channels())
            fills = bus.subscribe(TradingEvent.FILLS)
            rest = BinanceRest(ex.rest_url, signer=HmacSigner(ex.api_key, ex.api_secret))
            executor = BinanceExecutorTask(bus, rest, ex.ws_url, symbol="BTCUSDT")
            executors.append(executor)
            await executor.initialize()
            try:
                await executor.handle_event(Order(1, Side.BUY, 0.002, OrderType.MARKET, None, time.time_ns(),
                                                  "BTCUSDT"))
                assert executor.working == 0 and executor.acked == 1  # reported first, answered after
                fill = await asyncio.wait_for(fills.recv(), 30)
            finally:
                await executor.shutdown()  # publishes whatever fill is still queued
                await rest.close()
            return executor, [fill, fills.try_recv()], ex

    executor, (fill, extra), ex = run(main())
    assert fill.order_id == 1 and fill.qty == pytest.approx(0.002) and extra is None
    assert executor.rejected == 0 and executor.foreign_reports == 0 and executor.duplicate_reports == 0
    assert executor.account.position == pytest.approx(ex.accounts[ex.api_key].positions["BTCUSDT"], abs=1e-12)


def test_cancel_and_query_unknown_order(excerpt: Path) -> None:
    async def main() -> tuple[dict, BaseException, BaseException]:
        async with LocalExchange(excerpt, speed=None, start_on_connect=False) as ex:
            await until(lambda: ex.finished.is_set(), "the book")
            rest = BinanceRest(ex.rest_url, signer=HmacSigner(ex.api_key, ex.api_secret))
            client = BinanceOrderClient(rest)
            try:
                bid_px, _ = ex.books["BTCUSDT"].best_bid()
                placed = await client.new_order("BTCUSDT", "BUY", "LIMIT", 0.01, price=bid_px * 0.9,
                                                time_in_force="GTC", client_order_id="resting-1")
                assert placed["status"] == "NEW"
                cancelled = await client.cancel_order("BTCUSDT", client_order_id="resting-1")
                with pytest.raises(BinanceUnknownOrder) as again:
                    await client.cancel_order("BTCUSDT", client_order_id="resting-1")
                with pytest.raises(BinanceUnknownOrder) as unknown:
                    await client.query_order("BTCUSDT", order_id=999_999)
            finally:
                await rest.close()
            return cancelled, again.value, unknown.value

    cancelled, again, unknown = run(main())
    assert cancelled["status"] == "CANCELED"
    assert again.code == -2011 and unknown.code == -2013


def test_error_codes_map_to_kimiha_errors() -> None:
    def err(code: int, status: int = 400):  # noqa: ANN202
        return error_from_answer(status, b'{"code":%d,"msg":"m"}' % code, "POST /api/v3/order")

    assert isinstance(err(-1022), BinanceAuthError) and isinstance(err(-2015, 401), BinanceAuthError)
    assert isinstance(err(-1021), BinanceTimestampError)
    assert isinstance(err(-2010), BinanceOrderRejected)
    assert isinstance(err(-2013), BinanceUnknownOrder) and isinstance(err(-2011), BinanceUnknownOrder)
    assert isinstance(err(-1100), BinanceBadRequest) and isinstance(err(-1013), BinanceBadRequest)
    # "execution status unknown" whatever the HTTP status says (a plain BinanceError under a 4xx before)
    assert isinstance(err(-1006), BinanceUnavailable) and isinstance(err(-1007, 400), BinanceUnavailable)
    garbage = error_from_answer(502, b"<html>bad gateway</html>", "GET /api/v3/depth")
    assert isinstance(garbage, BinanceUnavailable) and "expected a JSON error" in str(garbage)


def test_production_url_refused_without_mainnet() -> None:
    from kimiha.error import InvalidConfigurationError

    with pytest.raises(InvalidConfigurationError, match="--mainnet"):
        check_order_url("https://api.binance.com", mainnet=False)
    check_order_url("https://api.binance.com", mainnet=True)  # allowed when asked for (not contacted here)
    check_order_url("https://testnet.binance.vision", mainnet=False)
    check_order_url("http://127.0.0.1:8080", mainnet=False)


def test_cli_refuses_production_url_before_any_connection(capsys: pytest.CaptureFixture[str]) -> None:
    from kimiha.apps.cli import main

    code = main(["live", "--executor", "binance", "--rest-url", "https://api.binance.com", "--ws-url",
                 "wss://stream.binance.com:9443", "--no-status"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--mainnet" in err[0]


def test_signer_from_env_never_shows_the_secret(tmp_path: Path) -> None:
    from kimiha.error import InvalidConfigurationError

    signer = signer_from_env({"BINANCE_API_KEY": "k" * 64, "BINANCE_API_SECRET": "s3cr3t" * 8})
    assert isinstance(signer, HmacSigner) and "s3cr3t" not in repr(signer) and "k" * 16 not in repr(signer)
    with pytest.raises(InvalidConfigurationError, match="BINANCE_API_KEY"):
        signer_from_env({})
    with pytest.raises(InvalidConfigurationError, match="BINANCE_PRIVATE_KEY_FILE"):
        signer_from_env({"BINANCE_API_KEY": "k", "BINANCE_PRIVATE_KEY_FILE": str(tmp_path / "missing.pem")})


# ---------------------------------------------------------------------------------------------- recording
def test_recorder_rotates_by_size(tmp_path: Path) -> None:
    rec = TapeRecorder(tmp_path / "rec.gz", rotate_bytes=1000, flush_lines=10)
    lines = [b"%d {\"stream\":\"x\",\"data\":{}} %s" % (i, b"y" * 50) for i in range(200)]
    for line in lines:
        rec.write(line)
    rec.close()
    assert rec.paths[:2] == [tmp_path / "rec.gz", tmp_path / "rec.1.gz"] and len(rec.paths) > 5
    assert rotated_path("a/rec.gz", 3) == Path("a/rec.3.gz") and rotated_path("rec", 2) == Path("rec.2")
    assert list(iter_lines(rec.paths)) == lines


def test_recorder_flushes_a_quiet_stream_by_time_and_rotates_by_time(tmp_path: Path) -> None:
    now = [0.0]
    rec = TapeRecorder(tmp_path / "rec.gz", rotate_seconds=60.0, flush_lines=1000, flush_seconds=1.0,
                       clock=lambda: now[0])
    rec.write(b"1 {}")
    assert rec.lines == 0  # buffered
    now[0] = 1.5
    rec.write(b"2 {}")
    assert rec.lines == 2  # the oldest had waited 1.5 s: written
    now[0] = 61.0
    rec.write(b"3 {}")  # written after the rotation
    rec.close()
    assert rec.paths == [tmp_path / "rec.gz", tmp_path / "rec.1.gz"]
    assert list(iter_lines(rec.paths[0])) == [b"1 {}", b"2 {}"] and list(iter_lines(rec.paths[1])) == [b"3 {}"]


def test_live_recording_replays_with_the_same_book_check(excerpt: Path, tmp_path: Path) -> None:
    from kimiha.apps.demo import run_demo
    from kimiha.apps.live import run_live

    rec = tmp_path / "rec.gz"
    live = run(run_live(["BTCUSDT"], sim=True, speed=40.0, record=str(rec), status=None, sim_recording=excerpt,
                        duration=30.0, sim_process=False))
    assert live["ended"] == "recording played out" and live["lines_read_accounted"]
    replay = run(run_demo([rec], progress=None))
    assert live["book_check"]["compared"] > 50
    assert replay["book_check"]["matched"] == live["book_check"]["matched"] == live["book_check"]["compared"]
    assert replay["book_check"]["compared"] == live["book_check"]["compared"]
    assert replay["lines_read"] == live["lines_read"] and replay["all_lines_accounted"]
    assert replay["messages_by_stream"] == live["messages_by_stream"]


def test_cli_live_sim_with_binance_executor(excerpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from kimiha.apps.cli import main

    code = main(["live", "--sim", "--speed", "20", "--duration", "1.5", "--executor", "binance", "--json",
                 "--no-status"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0
    assert out["book_check"]["matched"] == out["book_check"]["compared"]
    assert out["executor"] == "binance" and out["fills"] == out["orders"]
    # the account from the execution reports is the exchange's: cash, fees, position (no mark involved; the
    # exchange's own "pnl" uses its marks, later than this run's: it plays on after the stop)
    agreement = out["sim_agreement"]
    assert agreement["agrees"], agreement
    ours, theirs = agreement["pnl_at_our_marks"]
    assert ours == pytest.approx(theirs, abs=1e-5) and out["pnl"]["total"] == pytest.approx(ours, abs=1e-5)
    assert len(out["digest"]) == 64
    # the executor's counters of ambiguous answers and unusual reports are in the summary; the text shows
    # them once one is not zero (before: neither showed, so a reconciled or late report left no trace there)
    from kimiha.apps.live import format_live_summary

    reports = out["order_reports"]
    assert reports["reports"] > 0 and reports["unanswered"] == reports["late_reports"] == 0, reports
    assert "order answers and reports" not in format_live_summary(out)
    out["order_reports"] = {**reports, "reconciled": 1, "late_reports": 2}
    text = format_live_summary(out)
    assert "order answers and reports: " in text and "reconciled 1" in text and "late 2" in text, text


# ---------------------------------------------------------------------------------------------- several symbols
@pytest.fixture(scope="module")
def two_symbols(excerpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The excerpt as two symbols: each line's ETHUSDT copy just before it, each snapshot right after a depth
    line of its symbol (a bare REST snapshot is named after the latest depth line)."""
    path = tmp_path_factory.mktemp("two") / "two.gz"
    out: list[bytes] = []
    waiting_eth: bytes | None = None
    for line in iter_lines(excerpt):
        if b'"lastUpdateId"' in line[:40]:
            out.append(line)  # follows a BTCUSDT depth line (the excerpt's snapshot does)
            waiting_eth = line
            continue
        eth = line.replace(b"btcusdt", b"ethusdt").replace(b"BTCUSDT", b"ETHUSDT")
        out.append(eth)
        if waiting_eth is not None and b"@depth" in eth[:60]:
            out.append(waiting_eth)
            waiting_eth = None
        out.append(line)
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join(out) + b"\n")
    return path


def test_several_symbols_one_stream_each_book_exact(two_symbols: Path, tmp_path: Path) -> None:
    from kimiha.apps.live import run_live

    rec = tmp_path / "two.gz"
    s = run(run_live(["BTCUSDT", "ETHUSDT"], sim=True, speed=40.0, record=str(rec), status=None,
                     sim_recording=two_symbols, duration=30.0, executor="binance", sim_process=False))
    assert s["ended"] == "recording played out" and s["lines_read_accounted"]
    assert s["feed"]["snapshots"] == 2 and s["resyncs"] == 0
    for symbol in ("BTCUSDT", "ETHUSDT"):
        check = s["per_symbol"][symbol]["book_check"]
        assert check["compared"] > 50 and check["matched"] == check["compared"] and check["book_state"] == "live"
    assert s["book_check"]["compared"] == sum(p["book_check"]["compared"] for p in s["per_symbol"].values())
    assert s["fills"] == s["orders"] > 0 and s["rejected"] == 0
    assert s["pnl"]["total"] == pytest.approx(s["sim"]["account"]["pnl"], abs=1e-5)
    # one recording of both, each snapshot after a depth line of its own symbol
    lines = list(iter_lines(rec))
    snaps = [i for i, line in enumerate(lines) if b'"lastUpdateId"' in line[:40]]
    assert len(snaps) == 2
    named = set()
    for i in snaps:
        before = next(line for line in reversed(lines[:i]) if b"@depth" in line[:60])
        named.add(b"btcusdt" if b"btcusdt" in before[:60] else b"ethusdt")
    assert named == {b"btcusdt", b"ethusdt"}


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_ctrl_c_or_sigterm_stops_a_live_run_cleanly_with_its_summary(signame: str, tmp_path: Path) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys

    signum = signal.Signals[signame]
    proc = subprocess.Popen([sys.executable, "-m", "kimiha", "live", "--sim", "--speed", "5", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the status line: the pipeline runs
            if line.startswith("live ") and "book live" in line:
                break
        else:
            raise AssertionError("no status line")
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err
    summary = json.loads(out)
    assert summary["interrupted"] == signame and summary["ended"] == "signal" and summary["hooks_run"]
    assert summary["lines_read_accounted"] and summary["book_check"]["matched"] == summary["book_check"]["compared"]


def test_sim_child_process_stops_by_itself_when_its_parent_lets_go(excerpt: Path) -> None:
    from kimiha.apps.live import _SimProcess

    async def main() -> int | None:
        sim = _SimProcess(5.0, excerpt)
        await sim.start()
        state = await sim.state()
        assert state["finished"] is False and "accounts" in state
        await sim.stop()  # closes the child's stdin: it must stop itself (a kill would give -9)
        assert sim.proc is not None
        return sim.proc.returncode

    assert run(main()) == 0


# ------------------------------------------------------------------------- backlog at the stop (issue 15 review)
def test_feed_records_each_line_on_arrival_and_counts_what_is_still_queued(tmp_path: Path) -> None:
    async def main() -> tuple[dict[str, int], int]:
        rec = TapeRecorder(tmp_path / "rec.gz")
        feed = BinanceLiveFeed(["BTCUSDT"], ws_url="ws://127.0.0.1:1", rest_url="http://127.0.0.1:1", recorder=rec)
        for i in range(3):  # three trades arrive; the consumer takes one before the stop
            feed._on_message(i + 1, b'{"stream":"btcusdt@trade","data":{"e":"trade","t":%d}}' % i)
        assert await feed.__anext__() == b'1 {"stream":"btcusdt@trade","data":{"e":"trade","t":0}}'
        await feed.aclose()
        return feed.stats(), feed.backlog

    stats, backlog = run(main())
    assert stats["lines_in"] == 3 and stats["lines_out"] == 1 and stats["queued"] == backlog == 2
    assert stats["peak_backlog"] == 3
    assert [line.partition(b" ")[0] for line in iter_lines(tmp_path / "rec.gz")] == [b"1", b"2", b"3"]


def test_a_stop_cancelling_the_feeds_yield_leaves_the_line_queued() -> None:
    """The feed yields to the loop every ``yield_every`` lines; a stop cancelling the consumer at that yield must
    not lose the line (it was taken from the queue before the yield: counted out, handed to nobody)."""
    async def main() -> tuple[dict[str, int], bytes]:
        feed = BinanceLiveFeed(["BTCUSDT"], ws_url="ws://127.0.0.1:1", rest_url="http://127.0.0.1:1",
                               yield_every=1)
        for i in range(2):
            feed._on_message(i + 1, b'{"stream":"btcusdt@trade","data":{"e":"trade","t":%d}}' % i)
        taker = asyncio.ensure_future(feed.__anext__())
        await asyncio.sleep(0)  # the taker runs up to its yield
        assert not taker.done()
        taker.cancel()
        await asyncio.gather(taker, return_exceptions=True)
        assert taker.cancelled()
        stats = feed.stats()
        first = await feed.__anext__()
        await feed.aclose()
        return stats, first

    stats, first = run(main())
    assert stats["lines_in"] == 2 and stats["lines_out"] == 0 and stats["queued"] == 2
    assert first == b'1 {"stream":"btcusdt@trade","data":{"e":"trade","t":0}}'


def _gate_connector_until_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipeline takes nothing until the feed stops receiving: everything that arrived is a backlog then."""
    import kimiha.apps.live as live_app

    class Gated(BinanceConnector):
        async def execute(self) -> None:
            await until(lambda: self._source._stopping, "the stop", timeout=HANG)
            await super().execute()

    monkeypatch.setattr(live_app, "BinanceConnector", Gated)


def test_backlog_at_the_stop_goes_through_the_pipeline_and_into_the_recording(
        excerpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kimiha.apps.demo import run_demo
    from kimiha.apps.live import format_live_summary, run_live

    _gate_connector_until_the_stop(monkeypatch)
    rec = tmp_path / "rec.gz"
    s = run(run_live(["BTCUSDT"], sim=True, speed=40.0, record=str(rec), status=None, sim_recording=excerpt,
                     duration=1.5, sim_process=False))
    assert s["ended"] == "duration"
    arrived = s["lines_arrived"]
    assert arrived > 100 and s["feed"]["peak_backlog"] == arrived  # all of it was queued at the stop
    assert s["lines_read"] == arrived and s["unprocessed_at_stop"] == 0 and s["all_processed"]
    assert s["lines_read_accounted"] and s["drain_s"] is not None
    assert "NOT PROCESSED" not in format_live_summary(s)
    assert s["record"]["lines"] == arrived == len(list(iter_lines(rec)))
    replay = run(run_demo([rec], progress=None))
    assert replay["messages_by_stream"] == s["messages_by_stream"]
    assert replay["book_check"]["compared"] == s["book_check"]["compared"] > 0


def test_backlog_left_at_the_drain_deadline_is_counted_as_not_processed(
        excerpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kimiha.apps.live import format_live_summary, run_live

    _gate_connector_until_the_stop(monkeypatch)
    rec = tmp_path / "rec.gz"
    s = run(run_live(["BTCUSDT"], sim=True, speed=40.0, record=str(rec), status=None, sim_recording=excerpt,
                     duration=1.5, sim_process=False, drain_timeout=0.0))
    arrived = s["lines_arrived"]
    assert s["drain_s"] is None and s["unprocessed_at_stop"] > 0 and not s["all_processed"]
    assert s["lines_read"] + s["unprocessed_at_stop"] == arrived and s["lines_read_accounted"]
    assert s["record"]["lines"] == arrived  # the recording holds what arrived, processed or not
    text = format_live_summary(s)
    assert f"NOT PROCESSED: {s['unprocessed_at_stop']:,} of {arrived:,}" in text


def test_cli_wrong_secret_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import kimiha.venues.binance.signing as signing
    from kimiha.apps.cli import main

    real = signing.HmacSigner
    monkeypatch.setattr(signing, "HmacSigner", lambda key, secret: real(key, "not-the-secret"))
    code = main(["live", "--sim", "--speed", "20", "--duration", "20", "--executor", "binance", "--no-status"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "-1022" in lines[0] and "Signature for this request is not valid" in lines[0]
    assert "not-the-secret" not in captured.err


def test_wrong_secret_stops_the_run_after_the_first_order(excerpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kimiha.venues.binance.signing as signing
    from kimiha.apps.live import run_live

    real = signing.HmacSigner
    monkeypatch.setattr(signing, "HmacSigner", lambda key, secret: real(key, "not-the-secret"))
    s = run(run_live(["BTCUSDT"], sim=True, speed=20.0, status=None, sim_recording=excerpt, duration=30.0,
                     executor="binance", sim_process=False))
    assert s["ended"] == "failure" and "-1022" in s["error"]
    assert s["fills"] == 0 and s["rejected"] >= 1 and s["orders"] >= 1


def test_cli_unknown_symbol_is_refused_at_the_start(capsys: pytest.CaptureFixture[str]) -> None:
    from kimiha.apps.cli import main

    code = main(["live", "--sim", "--duration", "30", "--symbol", "FOOBAR", "--symbol", "BTCUSDT", "--no-status"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "symbol FOOBAR:" in err[0] and "-1121" in err[0] and "BTCUSDT:" not in err[0]


@pytest.mark.parametrize(("argv", "says"), [
    (["--rest-url", "http://127.0.0.1:99999", "--ws-url", "ws://127.0.0.1:1"], "a port in 1..65535"),
    (["--ws-url", "ws://127.0.0.1:0", "--rest-url", "http://127.0.0.1:1"], "a port in 1..65535"),
    (["--ws-url", "ws://127.0.0.1:1"], "--ws-url without --rest-url"),
    (["--rest-url", "http://127.0.0.1:1"], "--rest-url without --ws-url"),
    (["--record", ""], "expected a file to record to"),
    (["--symbol", "BTCUSDT", "--symbol", "btcusdt"], "--symbol BTCUSDT given twice"),
    (["--overwrite"], "--overwrite applies to --record only"),
])
def test_cli_live_refuses_bad_options_in_one_line(argv: list[str], says: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from kimiha.apps.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["live", *argv])
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_cli_record_refuses_an_existing_file_unless_overwrite(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from kimiha.apps.cli import main

    rec = tmp_path / "rec.gz"
    rec.write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exc:
        main(["live", "--sim", "--duration", "1", "--record", str(rec)])
    assert exc.value.code == 2 and "the file exists; give --overwrite" in capsys.readouterr().err
    assert rec.read_bytes() == b"keep me"
    assert main(["live", "--sim", "--speed", "20", "--duration", "1", "--record", str(rec), "--overwrite",
                 "--no-status"]) == 0
    assert rec.read_bytes() != b"keep me" and list(iter_lines(rec))


def test_status_line_names_each_symbols_book_and_fits_the_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import os

    from kimiha.apps import live as live_app

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    feed = BinanceLiveFeed(["BTCUSDT", "ETHUSDT"], ws_url="ws://127.0.0.1:1", rest_url="http://127.0.0.1:1")
    pipes = [live_app._Pipeline(s, feed, None, "ws://127.0.0.1:1", False, 64) for s in feed.symbols]
    text = live_app._status_text(1.0, feed, pipes)
    assert "book BTCUSDT:awaiting_snapshot ETHUSDT:awaiting_snapshot" in text and "backlog 0" in text
    monkeypatch.setattr(live_app.shutil, "get_terminal_size", lambda: os.terminal_size((40, 24)))
    out = Tty()
    live_app._Status(out).update(text)
    drawn = out.getvalue()
    assert drawn.startswith("\r") and len(drawn.removeprefix("\r").removesuffix("\x1b[K")) == 39


def test_ws_clients_benchmark_skips_a_client_that_is_not_installed(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "ws_clients.py"
    spec = importlib.util.spec_from_file_location("ws_clients_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "websockets" else real(name, *a))
    assert bench.main(["--messages", "200", "--rounds", "1"]) == 0
    out, err = capsys.readouterr()
    assert "websockets is not installed: skipped (pip install websockets" in err
    assert "picows" in out and "websockets" not in out
