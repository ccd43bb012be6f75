"""``python -m kimiha live``: the trading pipeline on live Binance market data (or the local exchange).

BinanceLiveFeed (websocket + REST snapshot, resyncs, reconnects; optionally recorded) -> the same
BinanceConnector and BinanceAggregator as the demo's replay -> imbalance strategy -> the paper executor
(default) or the Binance executor (signed REST orders, fills from the user data stream). A status line on
stderr while it runs; at the end (``--duration`` over, the local exchange's recording played out, or Ctrl-C /
SIGTERM) the demo's summary plus the live counters and tick-to-trade latency.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

from kimiha._core import LatencyHistogram
from kimiha.error import InvalidConfigurationError
from kimiha.event_bus import EventBus
from kimiha.orchestrator import TradingOrchestratorBuilder
from kimiha.scheduling.signals import on_stop_signals
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

if TYPE_CHECKING:
    from kimiha.metrics import MetricsServer

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
        self.key = ""

    def update(self, text: str, final: bool = False, key: str = "") -> None:
        """Redraw (terminal), or print a line every 5 s, at the end, and whenever ``key`` (the books' states)
        changes."""
        if self.stream is None:
            return
        now = time.monotonic()
        changed = key != self.key
        self.key = key
        if self.tty:  # cut to the terminal's width (a wrapped line would not be redrawn in place)
            width = shutil.get_terminal_size().columns
            if len(text) >= width:
                text = text[:max(width - 1, 1)]
            self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
            self.stream.flush()
        elif final or changed or now - self.last >= 5.0:
            self.last = now
            self.stream.write(text + "\n")
            self.stream.flush()


async def run_live(symbols: Sequence[str], *, ws_url: str | None = None, rest_url: str | None = None,
                   sim: bool = False, speed: float = 1.0, duration: float | None = None,
                   record: str | None = None, executor: str = "paper", mainnet: bool = False,
                   status: TextIO | None = sys.stderr, sim_recording: Any = None, sim_process: bool = True,
                   capacity: int = 4096, metrics: MetricsServer | None = None,
                   drain_timeout: float = 10.0) -> dict[str, Any]:
    """Run the live pipeline and return its summary (a dict with the demo's keys and the live ones).

    At the stop the websocket is closed first, then the lines that had arrived and were still queued (a
    backlog: the pipeline slower than the stream) go through the pipeline, for up to ``drain_timeout``
    seconds; what is left then is counted in the summary's ``unprocessed_at_stop`` (and is in the recording,
    which holds every line as it arrived).

    ``metrics``: a started :class:`~kimiha.metrics.MetricsServer`; it reports the first symbol's pipeline.

    With ``sim``, the local exchange runs in a child process (``sim_process``, the default: its work does not
    share this event loop, so the latencies measured are the pipeline's) or in this one (``sim_process=False``).

    Raises
    ------
    BinanceUnavailable
        When the market-data server (REST or websocket) does not answer at the start.
    InvalidConfigurationError
        For a production URL with the Binance executor and no ``mainnet``, or missing keys.
    """
    from kimiha.venues.binance.orders import check_order_url
    from kimiha.venues.binance.rest import BinanceRest
    from kimiha.venues.binance.signing import HmacSigner, Signer, signer_from_env

    exchange: _Sim | None = None
    if sim:
        exchange = _SimProcess(speed, sim_recording) if sim_process else _SimInProcess(speed, sim_recording)
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
        signer: Signer | None = None
        if executor == "binance":
            signer = (HmacSigner(exchange.api_key, exchange.api_secret) if exchange is not None
                      else signer_from_env())
        recorder = TapeRecorder(record) if record else None
        feed = BinanceLiveFeed(symbols, ws_url=ws_url, rest_url=rest_url, recorder=recorder)
        split = _SymbolSplit(feed) if len(feed.symbols) > 1 else None
        pipelines = []
        for symbol in feed.symbols:
            source = split.lines[symbol] if split is not None else feed
            order_rest = BinanceRest(rest_url, signer=signer) if signer is not None else None
            pipelines.append(_Pipeline(symbol, source, order_rest, ws_url, mainnet, capacity))

        try:
            await feed.start()
        except BaseException:
            await feed.aclose()
            for pipe in pipelines:
                await pipe.close_rest()
            raise
        bar = _Status(status)
        started = time.perf_counter()
        stop = asyncio.Event()

        def on_signal(name: str) -> None:
            interrupted.append(name)
            stop.set()

        # Ctrl-C and SIGTERM stop the run through the same staged shutdown
        give_back = on_stop_signals(asyncio.get_running_loop(), on_signal)
        ended = "duration"
        error: str | None = None
        drained: float | None = None
        next_sim_check = 0.0
        stopped = asyncio.ensure_future(stop.wait())
        splitter = asyncio.ensure_future(split.run()) if split is not None else None
        try:
            for pipe in pipelines:
                await pipe.orchestrator.start()
            if metrics is not None:
                metrics.watch(pipelines[0].bus, pipelines[0].orchestrator.scheduler)
            deadline = None if duration is None else time.monotonic() + duration
            while not stop.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                await asyncio.wait([stopped], timeout=0.5 if remaining is None else min(0.5, remaining))
                bar.update(_status_text(time.perf_counter() - started, feed, pipelines, split),
                           key="/".join(p.aggregator.book.state.value for p in pipelines))
                if any(pipe.orchestrator.scheduler.failure is not None for pipe in pipelines):
                    ended = "failure"
                    break
                fatal = next((f for pipe in pipelines if (f := getattr(pipe.execution, "fatal", None))), None)
                if fatal is not None:  # the key or signature refused: every order would be; stop
                    ended = "failure"
                    error = str(fatal)
                    break
                if exchange is not None and time.monotonic() >= next_sim_check:
                    next_sim_check = time.monotonic() + 1.0
                    if await exchange.finished() and not feed.backlog and (split is None or split.empty()):
                        ended = "recording played out"
                        break
            if stop.is_set():
                ended = "signal"
        finally:
            stopped.cancel()
            try:
                if ended != "failure":  # what arrived goes through the pipeline, within the drain deadline
                    drained = await _drain(feed, split, splitter, pipelines, drain_timeout)
                if splitter is not None:
                    splitter.cancel()
                    await asyncio.gather(splitter, return_exceptions=True)
                    assert split is not None
                    split.close()
                for pipe in pipelines:
                    await pipe.orchestrator.shutdown(timeout=30)
            finally:
                give_back()
                await feed.aclose()
                for pipe in pipelines:
                    await pipe.close_rest()
        elapsed = time.perf_counter() - started
        bar.update(_status_text(elapsed, feed, pipelines, split), final=True)
        summary = _summary(pipelines, feed, split, elapsed, recorder, ws_url, rest_url, sim, ended)
        summary["drain_s"] = None if drained is None else round(drained, 3)
        summary["error"] = error
        if exchange is not None:
            state = await exchange.state()
            accounts = state.pop("accounts", {})
            account = accounts.get(exchange.api_key)
            summary["sim"] = {**state, "process": "child" if sim_process else "this one"}
            if executor == "binance":
                summary["sim"]["account"] = None if account is None else {
                    "cash": round(account["cash"], 6), "positions": account["positions"],
                    "fees": round(account["fees"], 6), "trades": account["trades"],
                    "pnl": round(account["pnl"], 6)}
                summary["sim_agreement"] = _compare_with_sim(pipelines, account)
        summary["interrupted"] = interrupted[0] if interrupted else None
        return summary
    finally:
        if exchange is not None:
            await exchange.stop()


async def _drain(feed: BinanceLiveFeed, split: _SymbolSplit | None, splitter: asyncio.Future[None] | None,
                 pipelines: list[_Pipeline], timeout: float) -> float | None:
    """Stop receiving, then wait until every pipeline's connector has taken the last queued line; return the
    seconds that took, or None when ``timeout`` passed first (the rest is counted as not processed)."""
    await feed.stop_receiving()
    t0 = time.monotonic()

    async def drained() -> None:
        if splitter is not None and split is not None:
            await asyncio.shield(splitter)  # it ends when the feed has handed out its last line
            split.close()
        await asyncio.gather(*(pipe.connector.finished.wait() for pipe in pipelines))

    try:
        await asyncio.wait_for(drained(), timeout)
    except asyncio.TimeoutError:
        logger.warning("live: the pipeline did not take the %d line(s) still queued within %.1f s of the stop; "
                       "they are counted as not processed", _backlog(feed, split), timeout)
        return None
    return time.monotonic() - t0


def _compare_with_sim(pipelines: list[_Pipeline], account: dict[str, Any] | None) -> dict[str, Any]:
    """Compare the executor's account (from the execution reports) with the local exchange's: cash, fees and
    positions (no mark involved), and the PnL with the sim's account valued at this run's marks (the sim's own
    ``pnl`` uses its marks, which may be later: it keeps playing after the stop)."""
    if account is None:
        return {"agrees": not any(p.account.fills for p in pipelines), "detail": "the exchange holds no account"}
    ours_cash = sum(p.account.cash for p in pipelines)
    ours_fees = sum(p.account.fees_paid for p in pipelines)
    positions = {p.symbol: p.account.position for p in pipelines}
    theirs = {s: float(q) for s, q in account["positions"].items() if q}
    marks = {p.symbol: p.mark() for p in pipelines}
    pnl_ours = sum(p.account.total_pnl(m) if (m := marks[p.symbol]) else 0.0 for p in pipelines)
    pnl_theirs = account["cash"] + sum(q * (marks.get(s) or 0.0) for s, q in theirs.items())
    same_positions = all(abs(positions.get(s, 0.0) - theirs.get(s, 0.0)) < 1e-9
                         for s in set(positions) | set(theirs))
    agrees = (abs(ours_cash - account["cash"]) < 1e-6 and abs(ours_fees - account["fees"]) < 1e-6
              and same_positions)
    return {"agrees": agrees, "cash": [round(ours_cash, 6), round(account["cash"], 6)],
            "fees": [round(ours_fees, 6), round(account["fees"], 6)],
            "positions": [{s: round(q, 8) for s, q in positions.items()}, theirs],
            "pnl_at_our_marks": [round(pnl_ours, 6), round(pnl_theirs, 6)]}


def _backlog(feed: BinanceLiveFeed, split: _SymbolSplit | None) -> int:
    """Lines received and not yet taken by a pipeline (the feed's queue and the symbols' queues)."""
    return feed.backlog + (sum(len(q.queue) for q in split.lines.values()) if split is not None else 0)


class _Sim:
    """The local exchange as :func:`run_live` uses it, in this process or in a child."""

    ws_url = rest_url = api_key = api_secret = ""

    async def start(self) -> None:
        raise NotImplementedError

    async def finished(self) -> bool:
        raise NotImplementedError

    async def state(self) -> dict[str, Any]:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError


class _SimInProcess(_Sim):
    def __init__(self, speed: float, recording: Any) -> None:
        from kimiha.venues.binance.sim import LocalExchange

        self.exchange = LocalExchange(recording, speed=speed)

    async def start(self) -> None:
        ex = self.exchange
        await ex.start()
        self.ws_url, self.rest_url, self.api_key, self.api_secret = ex.ws_url, ex.rest_url, ex.api_key, ex.api_secret

    async def finished(self) -> bool:
        return self.exchange.finished.is_set()

    async def state(self) -> dict[str, Any]:
        return self.exchange.state()

    async def stop(self) -> None:
        await self.exchange.stop()


class _SimProcess(_Sim):
    """``python -m kimiha.venues.binance.sim`` as a child process (its own session: a Ctrl-C reaches only us)."""

    def __init__(self, speed: float, recording: Any) -> None:
        self.speed = speed
        self.recording = [] if recording is None else (
            [recording] if isinstance(recording, (str, os.PathLike)) else list(recording))
        self.proc: asyncio.subprocess.Process | None = None
        self._session: Any = None

    async def start(self) -> None:
        import secrets

        self.api_key, self.api_secret = secrets.token_hex(16), secrets.token_hex(32)
        env = dict(os.environ, KIMIHA_SIM_API_KEY=self.api_key, KIMIHA_SIM_API_SECRET=self.api_secret)
        args = [sys.executable, "-m", "kimiha.venues.binance.sim", "--speed", repr(self.speed)]
        for path in self.recording:
            args += ["--recording", os.fspath(path)]
        self.proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.PIPE, env=env,
                                                         start_new_session=True)
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), 60.0)
            port = int(json.loads(line)["port"])
        except (asyncio.TimeoutError, ValueError, KeyError, TypeError):
            await self.stop()
            raise InvalidConfigurationError("--sim: the local exchange process did not start (it said nothing "
                                            "usable on stdout within 60 s)") from None
        self.ws_url, self.rest_url = f"ws://127.0.0.1:{port}", f"http://127.0.0.1:{port}"

    async def _get_state(self) -> dict[str, Any]:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        async with self._session.get(f"{self.rest_url}/sim/state") as resp:
            answer: dict[str, Any] = await resp.json()
            return answer

    async def finished(self) -> bool:
        try:
            return bool((await self._get_state())["finished"])
        except Exception:  # noqa: BLE001 - a child that went away has nothing more to play
            return self.proc is None or self.proc.returncode is not None

    async def state(self) -> dict[str, Any]:
        try:
            return await self._get_state()
        except Exception as exc:  # noqa: BLE001 - the summary says so instead
            return {"error": f"the local exchange process gave no state: {exc}"}

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()  # the child stops when its stdin closes
        try:
            await asyncio.wait_for(proc.wait(), 10.0)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()


class _Pipeline:
    """One symbol's pipeline: connector -> aggregator -> strategy -> executor (+ the latency probe)."""

    def __init__(self, symbol: str, source: Any, order_rest: Any, ws_url: str, mainnet: bool,
                 capacity: int) -> None:
        from kimiha.venues.binance.orders import BinanceExecutorTask

        self.symbol = symbol
        self.bus = EventBus(trading_channels(capacity))
        bus = self.bus
        self.connector = BinanceConnector(bus, source)
        self.aggregator = BinanceAggregator(bus)
        self.strategy = ImbalanceStrategyTask(bus, symbol=symbol)
        self.probe = OrderLatencyProbe()
        self.order_rest = order_rest
        self.execution: Any
        if order_rest is not None:
            self.execution = BinanceExecutorTask(bus, order_rest, ws_url, symbol=symbol, mainnet=mainnet)
            self.account = self.execution.account
            self.tick_to_trade = self.execution.tick_to_trade
        else:
            self.execution = PaperExecutorTask(bus)
            self.account = self.execution.paper
            self.tick_to_trade = self.probe.histogram
        builder = (TradingOrchestratorBuilder(bus).with_connector(self.connector).with_aggregator(self.aggregator)
                   .with_strategy(self.strategy).with_executor(self.execution))
        if order_rest is None:
            builder = builder.with_executor(self.probe)
        self.orchestrator = builder.build()

    async def close_rest(self) -> None:
        if self.order_rest is not None:
            await self.order_rest.close()

    def mark(self) -> float | None:
        mark = self.execution.last_mid if isinstance(self.execution, PaperExecutorTask) else None
        if mark is None and self.aggregator.book.is_live:
            mark = self.aggregator.book.mid()
        return mark


class _Lines:
    """An async iterator over lines pushed to it (one symbol's share of the feed)."""

    def __init__(self) -> None:
        self.queue: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.closed = False

    def push(self, line: bytes) -> None:
        self.queue.append(line)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def close(self) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def __aiter__(self) -> _Lines:
        return self

    async def __anext__(self) -> bytes:
        while not self.queue:
            if self.closed:
                raise StopAsyncIteration
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.queue.popleft()


class _SymbolSplit:
    """Split the feed's lines by symbol, one pipeline each. A REST snapshot (it names no symbol) goes with the
    latest depth line, as the parser names it, and the feed inserts it after a depth line of its symbol."""

    def __init__(self, feed: BinanceLiveFeed) -> None:
        self.feed = feed
        self.lines = {symbol: _Lines() for symbol in feed.symbols}
        self._by_prefix = {symbol.lower().encode(): self.lines[symbol] for symbol in feed.symbols}
        self.unrouted = 0

    async def run(self) -> None:
        last_depth: _Lines | None = None
        by_prefix = self._by_prefix
        async for line in self.feed:
            _, _, body = line.partition(b" ")
            if body.startswith(b'{"stream":"'):
                name = body[11:body.find(b'"', 11)]
                target = by_prefix.get(name.partition(b"@")[0])
                if target is not None and b"@depth" in name:
                    last_depth = target
            else:
                target = last_depth
            if target is None:
                self.unrouted += 1
                continue
            target.push(line)

    def empty(self) -> bool:
        return all(not lines.queue for lines in self.lines.values())

    def close(self) -> None:
        for lines in self.lines.values():
            lines.close()


def _status_text(elapsed: float, feed: BinanceLiveFeed, pipelines: list[_Pipeline],
                 split: _SymbolSplit | None = None) -> str:
    """The status line (each symbol's book state by name when there are several)."""
    matched = sum(p.aggregator.check.matched for p in pipelines)
    compared = sum(p.aggregator.check.compared for p in pipelines)
    if len(pipelines) == 1:
        states = pipelines[0].aggregator.book.state.value
    else:
        states = " ".join(f"{p.symbol}:{p.aggregator.book.state.value}" for p in pipelines)
    text = (f"live {elapsed:6.1f} s  lines {feed.lines_out:,}  backlog {_backlog(feed, split):,}  book {states}  "
            f"check {matched}/{compared}  resyncs {feed.resyncs}  reconnects {feed.reconnects}  orders "
            f"{sum(p.strategy.logic.orders for p in pipelines)}  fills {sum(p.account.fills for p in pipelines)}")
    return text


#: The Binance executor's counters of ambiguous answers and unusual reports, in the summary (see its docstring).
_REPORT_COUNTERS = ("reports", "unanswered", "reconciled", "late_reports", "duplicate_reports", "foreign_reports",
                    "overfills")

#: Tick-to-trade (p99) above this is reported as the pipeline falling behind the stream.
SLOW_TICK_TO_TRADE_US = 100_000.0


def _latency(h: LatencyHistogram) -> dict[str, Any]:
    if h.count == 0:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    return {"count": h.count, "p50": round(h.percentile(50) / 1e3, 1), "p99": round(h.percentile(99) / 1e3, 1),
            "max": round(h.max / 1e3, 1)}


def _pipeline_summary(p: _Pipeline) -> dict[str, Any]:
    from kimiha.apps.demo import channel_summary

    parser = p.aggregator.parser
    by_stream = dict(sorted(parser.counts.items()))
    account = p.account
    mark = p.mark()
    return {
        "lines_read": p.connector.lines,
        "messages_by_stream": by_stream,
        "bad_lines": parser.bad_lines,
        "lines_read_accounted": p.connector.lines == parser.lines == sum(by_stream.values()) + parser.bad_lines,
        "hooks_run": all(t["state"] == "stopped" for t in p.orchestrator.registry.snapshot()),
        "book_check": {
            "matched": p.aggregator.check.matched,
            "compared": p.aggregator.check.compared,
            "gaps": p.aggregator.gaps,
            "book_state": p.aggregator.book.state.value,
        },
        "trades": sum(v for k, v in by_stream.items() if k.endswith("@trade")),
        "signals": p.strategy.logic.signals,
        "orders": p.strategy.logic.orders,
        "fills": account.fills,
        "rejected": p.execution.rejected,
        # the Binance executor's view of the exchange's answers and reports (zeros for the paper executor)
        "order_reports": {k: getattr(p.execution, k, 0) for k in _REPORT_COUNTERS},
        "position": round(account.position, 8),
        "pnl": {
            "realized": round(account.realized_pnl, 6),
            "unrealized": round(account.unrealized_pnl(mark) if mark else 0.0, 6),
            "fees": round(account.fees_paid, 6),
            "total": round(account.total_pnl(mark) if mark else account.realized_pnl - account.fees_paid, 6),
        },
        "tick_to_trade_us": _latency(p.tick_to_trade),
        "channels": channel_summary(p.bus),
        "tasks": p.orchestrator.registry.snapshot(),
        "shutdown": p.orchestrator.scheduler.last_shutdown,
    }


def _summary(pipelines: list[_Pipeline], feed: BinanceLiveFeed, split: _SymbolSplit | None, elapsed: float,
             recorder: TapeRecorder | None, ws_url: str, rest_url: str, sim: bool, ended: str) -> dict[str, Any]:
    per = {p.symbol: _pipeline_summary(p) for p in pipelines}
    first = per[pipelines[0].symbol]
    if len(pipelines) == 1:
        out = dict(first)
    else:
        tick = LatencyHistogram()
        for p in pipelines:
            tick.merge(p.tick_to_trade)
        messages: dict[str, int] = {}
        for s in per.values():
            messages.update(s["messages_by_stream"])
        messages["snapshot"] = sum(s["messages_by_stream"].get("snapshot", 0) for s in per.values())
        out = {
            "lines_read": sum(s["lines_read"] for s in per.values()),
            "messages_by_stream": dict(sorted(messages.items())),
            "bad_lines": sum(s["bad_lines"] for s in per.values()),
            "lines_read_accounted": all(s["lines_read_accounted"] for s in per.values()),
            "hooks_run": all(s["hooks_run"] for s in per.values()),
            "book_check": {
                "matched": sum(s["book_check"]["matched"] for s in per.values()),
                "compared": sum(s["book_check"]["compared"] for s in per.values()),
                "gaps": sum(s["book_check"]["gaps"] for s in per.values()),
                "book_state": "/".join(s["book_check"]["book_state"] for s in per.values()),
            },
            **{k: sum(s[k] for s in per.values()) for k in ("trades", "signals", "orders", "fills", "rejected")},
            "order_reports": {k: sum(s["order_reports"][k] for s in per.values()) for k in _REPORT_COUNTERS},
            "position": first["position"],
            "pnl": {k: round(sum(s["pnl"][k] for s in per.values()), 6) for k in first["pnl"]},
            "tick_to_trade_us": _latency(tick),
            "channels": first["channels"],
            "tasks": [t for s in per.values() for t in s["tasks"]],
            "shutdown": first["shutdown"],
            "per_symbol": per,
        }
    # every line that arrived reached a pipeline, or was left queued at the stop (the feed's queue, a symbol's
    # queue): those are counted as not processed (the recording holds them: it is written on arrival)
    in_flight = sum(p.connector.taken - p.connector.lines for p in pipelines)  # the stop cut their publish
    pending = _backlog(feed, split) + in_flight
    taken = sum(p.connector.lines for p in pipelines) + pending + (split.unrouted if split is not None else 0)
    out["lines_read_accounted"] = out["lines_read_accounted"] and taken == feed.lines_in
    out["lines_arrived"] = feed.lines_in
    out["unprocessed_at_stop"] = pending
    out["all_processed"] = out["lines_read_accounted"] and pending == 0 and feed.dropped == 0
    return {
        "source": {"ws_url": ws_url, "rest_url": rest_url, "sim": sim, "symbols": feed.symbols},
        "ended": ended,
        **out,
        "resyncs": feed.resyncs,
        "reconnects": feed.reconnects,
        "feed": feed.stats(),
        "executor": "paper" if isinstance(pipelines[0].execution, PaperExecutorTask) else "binance",
        "digest": _digest(pipelines),
        "record": None if recorder is None else {"paths": [str(p) for p in recorder.paths],
                                                 "lines": recorder.lines, "lines_lost": recorder.lines_lost,
                                                 "error": recorder.error},
        "wall_time_s": round(elapsed, 3),
        "messages_per_s": round(feed.lines_out / elapsed, 1) if elapsed else 0.0,
    }


def _digest(pipelines: list[_Pipeline]) -> str:
    """The executor's digest of orders and fills (one symbol), or a sha256 over the symbols' digests in
    order."""
    digests = [p.execution.digest for p in pipelines]
    if len(digests) == 1:
        return str(digests[0])
    import hashlib

    return hashlib.sha256("".join(digests).encode()).hexdigest()


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
    if s.get("unprocessed_at_stop") or s["feed"]["dropped"]:
        out.append(f"  NOT PROCESSED: {s['unprocessed_at_stop']:,} of {s['lines_arrived']:,} line(s) that arrived "
                   f"were still queued at the stop, {s['feed']['dropped']:,} dropped (queue full): the pipeline "
                   f"fell behind the stream")
    out.append("  messages by stream: " + ", ".join(f"{k} {v:,}" for k, v in s["messages_by_stream"].items()))
    bc = s["book_check"]
    pct = f"{100.0 * bc['matched'] / bc['compared']:.1f} %" if bc["compared"] else "n/a"
    unsynced = [sym for sym, per in s.get("per_symbol", {}).items() if not per["book_check"]["compared"]]
    if unsynced and bc["compared"]:
        pct += f" over {len(s['per_symbol']) - len(unsynced)} of {len(s['per_symbol'])} symbols; no book for " \
               + ", ".join(unsynced)
    out.append(f"  book check: {bc['matched']:,} matched / {bc['compared']:,} compared ({pct}; gaps {bc['gaps']}, "
               f"book {bc['book_state']})")
    for symbol, per in s.get("per_symbol", {}).items():
        b = per["book_check"]
        out.append(f"    {symbol}: book check {b['matched']:,} / {b['compared']:,} (gaps {b['gaps']}, book "
                   f"{b['book_state']})  orders {per['orders']:,}  fills {per['fills']:,}  PnL total "
                   f"{per['pnl']['total']:+.4f}")
    f = s["feed"]
    out.append(f"  resyncs {s['resyncs']}  reconnects {s['reconnects']} (silent {f['silent_reconnects']}, closed by "
               f"server {f['closed_by_server']})  snapshots {f['snapshots']}  dropped {f['dropped']}")
    out.append(f"  trades {s['trades']:,}  signals {s['signals']:,}  orders {s['orders']:,}  "
               f"fills {s['fills']:,}  rejected {s['rejected']}  ({s['executor']} executor)")
    reports = s.get("order_reports") or {}
    if any(reports.get(k) for k in _REPORT_COUNTERS if k != "reports"):
        out.append("  order answers and reports: " + "  ".join(
            f"{k.replace('_reports', '').replace('_', ' ')} {reports[k]:,}" for k in _REPORT_COUNTERS))
    pnl = s["pnl"]
    out.append(f"  position {s['position']:+.5f}  PnL: realized {pnl['realized']:+.4f}  unrealized "
               f"{pnl['unrealized']:+.4f}  fees {pnl['fees']:.4f}  total {pnl['total']:+.4f} (quote asset)")
    t = s["tick_to_trade_us"]
    if t["count"]:
        out.append(f"  tick-to-trade (receive -> order sent): p50 {t['p50']:,.1f} us  p99 {t['p99']:,.1f} us  "
                   f"max {t['max']:,.1f} us  over {t['count']} order(s)")
        if t["p99"] > SLOW_TICK_TO_TRADE_US:
            out.append(f"  WARNING: tick-to-trade p99 {t['p99'] / 1e3:,.1f} ms (peak backlog "
                       f"{f.get('peak_backlog', 0):,} lines): the pipeline fell behind the stream; its orders "
                       f"acted on old data")
    else:
        out.append("  tick-to-trade: no order was sent")
    if s.get("digest"):
        what = "acknowledged orders and fills" if s["executor"] == "binance" else "orders and fills"
        out.append(f"  digest {s['digest']} ({what}, sha256)")
    agreement = s.get("sim_agreement")
    if agreement is not None:
        if "cash" in agreement:
            out.append(f"  the local exchange's account: {'agrees' if agreement['agrees'] else 'DIFFERS'} (cash "
                       f"{agreement['cash'][0]:+.6f} / {agreement['cash'][1]:+.6f}, fees {agreement['fees'][0]:.6f}"
                       f" / {agreement['fees'][1]:.6f}, PnL at this run's marks {agreement['pnl_at_our_marks'][0]:+.6f}"
                       f" / {agreement['pnl_at_our_marks'][1]:+.6f}: ours / the exchange's)")
        else:
            out.append(f"  the local exchange's account: {agreement['detail']}")
    if s["record"]:
        out.append(f"  recorded {s['record']['lines']:,} lines to {', '.join(s['record']['paths'])}")
        if s["record"]["error"]:
            out.append(f"  RECORDING STOPPED: {s['record']['error']}; {s['record']['lines_lost']:,} lines not recorded")
    out.append(f"  wall time {s['wall_time_s']:.3f} s, {s['messages_per_s']:,.0f} messages/s")
    out.append(f"  {'channel':<15} {'published':>10} {'delivered':>10} {'lagged':>7} {'blocked':>8} "
               f"{'p50 us':>8} {'p99 us':>9} {'max us':>10}")
    for name, c in s["channels"].items():
        lat = c["latency_us"]
        out.append(f"  {name:<15} {c['published']:>10,} {c['delivered']:>10,} {c['lagged']:>7} {c['blocked']:>8} "
                   f"{lat['p50']:>8.2f} {lat['p99']:>9.2f} {lat['max']:>10.2f}")
    return "\n".join(out)
