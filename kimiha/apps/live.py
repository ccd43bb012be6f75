"""``python -m kimiha live``: the trading pipeline on live Binance market data (or the local exchange).

BinanceLiveFeed (websocket + REST snapshot, resyncs, reconnects; optionally recorded) -> the same
BinanceConnector and BinanceAggregator as the demo's replay -> imbalance strategy -> the paper executor
(default) or the Binance executor (signed REST orders, fills from the user data stream). A status line on
stderr while it runs; at the end (``--duration`` over, the local exchange's recording played out, or Ctrl-C /
SIGTERM) the demo's summary plus the live counters and tick-to-trade latency.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from kimiha._core import LatencyHistogram
from kimiha.event_bus import EventBus
from kimiha.orchestrator import TradingOrchestratorBuilder
from kimiha.trading.model import Order
from kimiha.trading.tasks import ImbalanceStrategyTask, PaperExecutorTask, TradingEvent, trading_channels
from kimiha.types import Executor
from kimiha.venues.binance.live import (
    MAINNET_REST_URL,
    MAINNET_WS_URL,
    TESTNET_REST_URL,
    TESTNET_WS_URL,
    BinanceLiveFeed,
)
from kimiha.venues.binance.recorder import TapeRecorder
from kimiha.venues.binance.tasks import BinanceAggregator, BinanceConnector

__all__ = ["OrderLatencyProbe", "default_urls", "format_live_summary", "run_live"]

logger = logging.getLogger("kimiha.apps.live")


class OrderLatencyProbe(Executor):
    """Tick-to-trade of the paper executor: receive time of the deciding market data -> the order reaching the
    executors (the paper executor fills it in the same dispatch)."""

    def __init__(self, name: str = "tick-to-trade") -> None:
        self.name = name
        self.histogram = LatencyHistogram()

    def subscribed_event(self) -> TradingEvent:
        return TradingEvent.ORDERS

    def handle_event(self, order: Order) -> None:
        if order.ts_ns > 0:
            self.histogram.record(max(time.time_ns() - order.ts_ns, 0))


def default_urls(executor: str, mainnet: bool) -> tuple[str, str]:
    """Return the default (ws_url, rest_url): Binance's public market data, or the spot testnet for the Binance
    executor unless ``mainnet``."""
    if executor == "binance" and not mainnet:
        return TESTNET_WS_URL, TESTNET_REST_URL
    return MAINNET_WS_URL, MAINNET_REST_URL


class _Status:
    def __init__(self, stream: TextIO | None) -> None:
        self.stream = stream
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.last = 0.0

    def update(self, text: str, final: bool = False) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if self.tty:
            self.stream.write("\r" + text + ("\n" if final else ""))
            self.stream.flush()
        elif final or now - self.last >= 5.0:
            self.last = now
            self.stream.write(text + "\n")
            self.stream.flush()


async def run_live(symbols: Sequence[str], *, ws_url: str | None = None, rest_url: str | None = None,
                   sim: bool = False, speed: float = 1.0, duration: float | None = None,
                   record: str | None = None, executor: str = "paper", mainnet: bool = False,
                   status: TextIO | None = sys.stderr, sim_recording: Any = None,
                   capacity: int = 4096) -> dict[str, Any]:
    """Run the live pipeline and return its summary (a dict with the demo's keys and the live ones).

    Raises
    ------
    BinanceUnavailable
        When the market-data server (REST or websocket) does not answer at the start.
    InvalidConfigurationError
        For a production URL with the Binance executor and no ``mainnet``, or missing keys.
    """
    from kimiha.venues.binance.orders import BinanceExecutorTask, check_order_url
    from kimiha.venues.binance.rest import BinanceRest
    from kimiha.venues.binance.signing import HmacSigner, Signer, signer_from_env

    exchange = None
    if sim:
        from kimiha.venues.binance.sim import LocalExchange

        exchange = LocalExchange(sim_recording, speed=speed)
        await exchange.start()
        ws_url, rest_url = exchange.ws_url, exchange.rest_url
    default_ws, default_rest = default_urls(executor, mainnet)
    ws_url = ws_url or default_ws
    rest_url = rest_url or default_rest
    interrupted: list[str] = []
    try:
        if executor == "binance":
            check_order_url(rest_url, mainnet=mainnet, what="--rest-url")
            check_order_url(ws_url, mainnet=mainnet, what="--ws-url")
        recorder = TapeRecorder(record) if record else None
        feed = BinanceLiveFeed(symbols, ws_url=ws_url, rest_url=rest_url, recorder=recorder)
        bus = EventBus(trading_channels(capacity))
        connector = BinanceConnector(bus, feed)
        aggregator = BinanceAggregator(bus)
        strategy = ImbalanceStrategyTask(bus, symbol=feed.symbols[0])
        probe = OrderLatencyProbe()
        execution: PaperExecutorTask | BinanceExecutorTask
        order_rest = None
        if executor == "binance":
            signer: Signer
            if exchange is not None:
                signer = HmacSigner(exchange.api_key, exchange.api_secret)
            else:
                signer = signer_from_env()
            order_rest = BinanceRest(rest_url, signer=signer)
            execution = BinanceExecutorTask(bus, order_rest, ws_url, symbol=feed.symbols[0], mainnet=mainnet)
        else:
            execution = PaperExecutorTask(bus)
        builder = (TradingOrchestratorBuilder(bus).with_connector(connector).with_aggregator(aggregator)
                   .with_strategy(strategy).with_executor(execution))
        if executor != "binance":
            builder = builder.with_executor(probe)
        orchestrator = builder.build()

        try:
            await feed.start()
        except BaseException:
            await feed.aclose()
            if order_rest is not None:
                await order_rest.close()
            raise
        bar = _Status(status)
        started = time.perf_counter()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        installed = []

        def on_signal(signum: int) -> None:
            interrupted.append(signal.Signals(signum).name)
            stop.set()

        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, on_signal, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass
        ended = "duration"
        try:
            await orchestrator.start()
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                await asyncio.wait([asyncio.ensure_future(stop.wait())],
                                   timeout=0.5 if remaining is None else min(0.5, remaining))
                bar.update(_status_text(time.perf_counter() - started, feed, aggregator, strategy, execution))
                if orchestrator.scheduler.failure is not None:
                    ended = "failure"
                    break
                if exchange is not None and exchange.finished.is_set() and not feed._queue:
                    ended = "recording played out"
                    break
            if stop.is_set():
                ended = "signal"
        finally:
            try:
                await orchestrator.shutdown(timeout=30)
            finally:
                for signum in installed:
                    loop.remove_signal_handler(signum)
                await feed.aclose()
                if order_rest is not None:
                    await order_rest.close()
        elapsed = time.perf_counter() - started
        bar.update(_status_text(elapsed, feed, aggregator, strategy, execution), final=True)
        summary = _summary(bus, orchestrator, connector, feed, aggregator, strategy, execution, probe, elapsed,
                           recorder, ws_url, rest_url, sim, ended)
        if exchange is not None:
            summary["sim"] = {"speed": speed, "played": exchange.played, "diffs_played": exchange.diffs_played,
                              "depth_requests": exchange.depth_requests}
            if executor == "binance":
                account = exchange.accounts.get(exchange.api_key)
                marks = exchange.marks()
                summary["sim"]["account"] = None if account is None else {
                    "cash": round(account.cash, 6), "positions": account.positions, "fees": round(account.fees, 6),
                    "trades": account.trades, "pnl": round(account.equity_change(marks), 6)}
        summary["interrupted"] = interrupted[0] if interrupted else None
        return summary
    finally:
        if exchange is not None:
            await exchange.stop()


def _status_text(elapsed: float, feed: BinanceLiveFeed, aggregator: BinanceAggregator,
                 strategy: ImbalanceStrategyTask, execution: Any) -> str:
    check = aggregator.check
    fills = execution.paper.fills if isinstance(execution, PaperExecutorTask) else execution.account.fills
    return (f"live {elapsed:6.1f} s  lines {feed.lines_out:,}  book {aggregator.book.state.value}  check "
            f"{check.matched}/{check.compared}  resyncs {feed.resyncs}  reconnects {feed.reconnects}  orders "
            f"{strategy.logic.orders}  fills {fills}")


def _latency(h: LatencyHistogram) -> dict[str, Any]:
    if h.count == 0:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {"count": h.count, "p50": round(h.percentile(50) / 1e3, 1), "p99": round(h.percentile(99) / 1e3, 1),
            "max": round(h.max / 1e3, 1)}


def _summary(bus: EventBus, orchestrator: Any, connector: BinanceConnector, feed: BinanceLiveFeed,
             aggregator: BinanceAggregator, strategy: ImbalanceStrategyTask, execution: Any,
             probe: OrderLatencyProbe, elapsed: float, recorder: TapeRecorder | None, ws_url: str, rest_url: str,
             sim: bool, ended: str) -> dict[str, Any]:
    from kimiha.apps.demo import channel_summary

    parser = aggregator.parser
    by_stream = dict(sorted(parser.counts.items()))
    read_ok = (connector.lines == parser.lines == sum(by_stream.values()) + parser.bad_lines
               and connector.lines == feed.lines_out)
    paper = execution.paper if isinstance(execution, PaperExecutorTask) else execution.account
    mark = execution.last_mid if isinstance(execution, PaperExecutorTask) else None
    if mark is None and aggregator.book.is_live:
        mark = aggregator.book.mid()
    tick = probe.histogram if isinstance(execution, PaperExecutorTask) else execution.tick_to_trade
    trades = sum(v for k, v in by_stream.items() if k.endswith("@trade"))
    return {
        "source": {"ws_url": ws_url, "rest_url": rest_url, "sim": sim, "symbols": feed.symbols},
        "ended": ended,
        "lines_read": connector.lines,
        "messages_by_stream": by_stream,
        "bad_lines": parser.bad_lines,
        "lines_read_accounted": read_ok,
        "hooks_run": all(t["state"] == "stopped" for t in orchestrator.registry.snapshot()),
        "book_check": {
            "matched": aggregator.check.matched,
            "compared": aggregator.check.compared,
            "gaps": aggregator.gaps,
            "book_state": aggregator.book.state.value,
        },
        "resyncs": feed.resyncs,
        "reconnects": feed.reconnects,
        "feed": feed.stats(),
        "trades": trades,
        "signals": strategy.logic.signals,
        "orders": strategy.logic.orders,
        "fills": paper.fills,
        "rejected": execution.rejected,
        "executor": "paper" if isinstance(execution, PaperExecutorTask) else "binance",
        "position": round(paper.position, 8),
        "pnl": {
            "realized": round(paper.realized_pnl, 6),
            "unrealized": round(paper.unrealized_pnl(mark) if mark else 0.0, 6),
            "fees": round(paper.fees_paid, 6),
            "total": round(paper.total_pnl(mark) if mark else paper.realized_pnl - paper.fees_paid, 6),
        },
        "tick_to_trade_us": _latency(tick),
        "record": None if recorder is None else {"paths": [str(p) for p in recorder.paths],
                                                 "lines": recorder.lines},
        "wall_time_s": round(elapsed, 3),
        "messages_per_s": round(connector.lines / elapsed, 1) if elapsed else 0.0,
        "channels": channel_summary(bus),
        "tasks": orchestrator.registry.snapshot(),
        "shutdown": orchestrator.scheduler.last_shutdown,
    }


def format_live_summary(s: dict[str, Any]) -> str:
    """Return the summary as ``python -m kimiha live`` prints it (the demo's report, plus the live lines)."""
    src = s["source"]
    where = "the local exchange " + src["rest_url"] if src["sim"] else f"{src['ws_url']} + {src['rest_url']}"
    out = [f"kimiha live: {', '.join(src['symbols'])} from {where} ({s['ended']})"]
    if s.get("interrupted"):
        out.append(f"  interrupted by {s['interrupted']}: every stage drained, every shutdown hook run: "
                   f"{'yes' if s['hooks_run'] else 'NO'}")
    out.append(f"  lines: {s['lines_read']:,} received, {s['bad_lines']:,} bad; every line accounted for: "
               f"{'yes' if s['lines_read_accounted'] else 'NO'}")
    out.append("  messages by stream: " + ", ".join(f"{k} {v:,}" for k, v in s["messages_by_stream"].items()))
    bc = s["book_check"]
    pct = f"{100.0 * bc['matched'] / bc['compared']:.1f} %" if bc["compared"] else "n/a"
    out.append(f"  book check: {bc['matched']:,} matched / {bc['compared']:,} compared ({pct}; gaps {bc['gaps']}, "
               f"book {bc['book_state']})")
    f = s["feed"]
    out.append(f"  resyncs {s['resyncs']}  reconnects {s['reconnects']} (silent {f['silent_reconnects']}, closed by "
               f"server {f['closed_by_server']})  snapshots {f['snapshots']}  dropped {f['dropped']}")
    out.append(f"  trades {s['trades']:,}  signals {s['signals']:,}  orders {s['orders']:,}  "
               f"fills {s['fills']:,}  rejected {s['rejected']}  ({s['executor']} executor)")
    pnl = s["pnl"]
    out.append(f"  position {s['position']:+.5f}  PnL: realized {pnl['realized']:+.4f}  unrealized "
               f"{pnl['unrealized']:+.4f}  fees {pnl['fees']:.4f}  total {pnl['total']:+.4f} (quote asset)")
    t = s["tick_to_trade_us"]
    if t["count"]:
        out.append(f"  tick-to-trade (receive -> order sent): p50 {t['p50']:,.1f} us  p99 {t['p99']:,.1f} us  "
                   f"max {t['max']:,.1f} us  over {t['count']} order(s)")
    else:
        out.append("  tick-to-trade: no order was sent")
    if s["record"]:
        out.append(f"  recorded {s['record']['lines']:,} lines to {', '.join(s['record']['paths'])}")
    out.append(f"  wall time {s['wall_time_s']:.3f} s, {s['messages_per_s']:,.0f} messages/s")
    out.append(f"  {'channel':<15} {'published':>10} {'delivered':>10} {'lagged':>7} {'blocked':>8} "
               f"{'p50 us':>8} {'p99 us':>9} {'max us':>10}")
    for name, c in s["channels"].items():
        lat = c["latency_us"]
        out.append(f"  {name:<15} {c['published']:>10,} {c['delivered']:>10,} {c['lagged']:>7} {c['blocked']:>8} "
                   f"{lat['p50']:>8.2f} {lat['p99']:>9.2f} {lat['max']:>10.2f}")
    return "\n".join(out)
