"""The main job: replay recorded Binance BTCUSDT data through the whole trading pipeline and summarize.

Connector (replay of the shipped tape, or ``--data``) -> Aggregator (typed decode, L2 book, book check)
-> imbalance Strategy -> paper Executor, on one in-process :class:`~kimiha.EventBus`.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from kimiha.event_bus import EventBus
from kimiha.orchestrator import TradingOrchestratorBuilder
from kimiha.pipeline import (
    BinanceAggregator,
    BinanceConnector,
    ImbalanceStrategyTask,
    PaperExecutorTask,
    trading_channels,
)
from kimiha.venues.binance import BAD_LINE, count_lines_by_stream, recorded_tape, replay_lines

__all__ = ["run_demo", "format_summary"]


class Progress:
    """A progress bar on a stream: redrawn in place on a terminal, a line per 25 % otherwise."""

    def __init__(self, total: int, stream: TextIO | None, label: str = "replay") -> None:
        self.total = max(total, 1)
        self.stream = stream
        self.label = label
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._next_mark = 0  # the first line right away: a run shows it is alive before 25 %

    def update(self, done: int, final: bool = False) -> None:
        if self.stream is None:
            return
        pct = min(100, int(100 * done / self.total))
        rate = done / max(time.perf_counter() - self.started, 1e-9)
        if self.tty:
            bar = "#" * (pct // 4) + "." * (25 - pct // 4)
            self.stream.write(f"\r{self.label} [{bar}] {pct:3d}% {done:,}/{self.total:,} lines {rate:,.0f}/s")
            if final:
                self.stream.write("\n")
            self.stream.flush()
        elif pct >= self._next_mark or final:
            while self._next_mark <= pct:
                self._next_mark += 25
            self.stream.write(f"{self.label}: {pct}% ({done:,}/{self.total:,} lines, {rate:,.0f}/s)\n")
            self.stream.flush()


async def run_demo(data: Sequence[str | Path] | None = None, *, speed: float | None = None,
                   progress: TextIO | None = sys.stderr, capacity: int = 4096) -> dict[str, Any]:
    """Run the pipeline over ``data`` (default: the shipped tape) and return the summary as a dict."""
    paths: list[Any] = list(data) if data else recorded_tape()
    for path in paths:
        if isinstance(path, (str, Path)) and not Path(path).is_file():
            raise FileNotFoundError(f"--data: no such recording file: {path}")
    expected = count_lines_by_stream(paths)
    total = sum(expected.values())

    bus = EventBus(trading_channels(capacity))
    connector = BinanceConnector(bus, replay_lines(paths, speed))
    aggregator = BinanceAggregator(bus)
    strategy = ImbalanceStrategyTask(bus)
    executor = PaperExecutorTask(bus)
    orchestrator = (
        TradingOrchestratorBuilder(bus)
        .with_connector(connector)
        .with_aggregator(aggregator)
        .with_strategy(strategy)
        .with_executor(executor)
        .build()
    )
    bar = Progress(total, progress)
    started = time.perf_counter()
    interrupted: list[str] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:  # Ctrl-C and SIGTERM stop the replay and go through the same staged shutdown
            loop.add_signal_handler(signum, lambda s=signum: (interrupted.append(signal.Signals(s).name),
                                                               stop.set()))
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass
    await orchestrator.start()
    try:
        waiters = [asyncio.ensure_future(connector.finished.wait()), asyncio.ensure_future(stop.wait())]
        while not (connector.finished.is_set() or stop.is_set()):
            await asyncio.wait(waiters, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
            bar.update(connector.lines)
            if orchestrator.scheduler.failure is not None:
                break
        for waiter in waiters:
            waiter.cancel()
    finally:
        await orchestrator.shutdown(timeout=60)
        for signum in installed:
            loop.remove_signal_handler(signum)
    elapsed = time.perf_counter() - started
    bar.update(connector.lines, final=True)
    summary = _summary(bus, orchestrator, connector, aggregator, strategy, executor, expected, elapsed, paths)
    summary["interrupted"] = interrupted[0] if interrupted else None
    return summary


def _summary(bus: EventBus, orchestrator: Any, connector: BinanceConnector, aggregator: BinanceAggregator,
             strategy: ImbalanceStrategyTask, executor: PaperExecutorTask, expected: Any, elapsed: float,
             paths: list[Any]) -> dict[str, Any]:
    parser = aggregator.parser
    by_stream = dict(sorted(parser.counts.items()))
    file_counts = {k: v for k, v in sorted(expected.items()) if k != BAD_LINE}
    paper = executor.paper
    mark = executor.last_mid
    channels = {}
    for name, st in bus.stats().items():
        lat = st["latency_ns"]
        channels[name] = {
            "published": st["published"],
            "delivered": st["delivered"],
            "lagged": st["lagged"],
            "blocked": st["blocked"],
            "high_water_mark": st["high_water_mark"],
            "latency_us": {k: round(lat[k] / 1e3, 2) for k in ("p50", "p99", "max")},
        }
    return {
        "data": [getattr(p, "name", str(p)) for p in paths],
        "lines_read": connector.lines,
        "lines_in_files": sum(expected.values()),
        "messages_by_stream": by_stream,
        "messages_by_stream_in_files": file_counts,
        "bad_lines": parser.bad_lines,
        "all_lines_accounted": connector.lines == sum(expected.values()) == parser.lines
        and by_stream == file_counts,
        "hooks_run": all(t["state"] == "stopped" for t in orchestrator.registry.snapshot()),
        "book_check": {
            "matched": aggregator.check.matched,
            "compared": aggregator.check.compared,
            "gaps": aggregator.gaps,
            "book_state": aggregator.book.state.value,
        },
        "trades": by_stream.get("btcusdt@trade", 0),
        "signals": strategy.logic.signals,
        "orders": strategy.logic.orders,
        "fills": paper.fills,
        "rejected": executor.rejected,
        "position": round(paper.position, 8),
        "pnl": {
            "realized": round(paper.realized_pnl, 6),
            "unrealized": round(paper.unrealized_pnl(mark) if mark else 0.0, 6),
            "fees": round(paper.fees_paid, 6),
            "total": round(paper.total_pnl(mark) if mark else paper.realized_pnl - paper.fees_paid, 6),
        },
        "wall_time_s": round(elapsed, 3),
        "messages_per_s": round(connector.lines / elapsed, 1) if elapsed else 0.0,
        "channels": channels,
        "tasks": orchestrator.registry.snapshot(),
        "shutdown": orchestrator.scheduler.last_shutdown,
    }


def format_summary(s: dict[str, Any]) -> str:
    """Return the summary as the readable report ``python -m kimiha demo`` prints."""
    out = [f"kimiha demo: {', '.join(s['data'])}"]
    if s.get("interrupted"):
        out.append(f"  interrupted by {s['interrupted']}: replay stopped early, every stage drained, "
                   f"every shutdown hook run: {'yes' if s['hooks_run'] else 'NO'}")
    out.append(f"  lines: {s['lines_read']:,} read of {s['lines_in_files']:,} in the files, "
               f"{s['bad_lines']} bad; every line accounted for: {'yes' if s['all_lines_accounted'] else 'NO'}")
    out.append("  messages by stream: " + ", ".join(f"{k} {v:,}" for k, v in s["messages_by_stream"].items()))
    bc = s["book_check"]
    out.append(f"  book check: {bc['matched']:,} matched / {bc['compared']:,} compared "
               f"(gaps {bc['gaps']}, book {bc['book_state']})")
    out.append(f"  trades {s['trades']:,}  signals {s['signals']:,}  orders {s['orders']:,}  "
               f"fills {s['fills']:,}  rejected {s['rejected']}")
    pnl = s["pnl"]
    out.append(f"  position {s['position']:+.5f} BTC  PnL: realized {pnl['realized']:+.4f}  unrealized "
               f"{pnl['unrealized']:+.4f}  fees {pnl['fees']:.4f}  total {pnl['total']:+.4f} USDT")
    out.append(f"  wall time {s['wall_time_s']:.3f} s, {s['messages_per_s']:,.0f} messages/s")
    out.append(f"  {'channel':<15} {'published':>10} {'delivered':>10} {'lagged':>7} {'blocked':>8} "
               f"{'p50 us':>8} {'p99 us':>9} {'max us':>10}")
    for name, c in s["channels"].items():
        lat = c["latency_us"]
        out.append(f"  {name:<15} {c['published']:>10,} {c['delivered']:>10,} {c['lagged']:>7} {c['blocked']:>8} "
                   f"{lat['p50']:>8.2f} {lat['p99']:>9.2f} {lat['max']:>10.2f}")
    return "\n".join(out)
