"""The main job: replay recorded Binance BTCUSDT data through the whole trading pipeline and summarize.

Connector (replay of the shipped tape, or ``--data``) -> Aggregator (typed decode, L2 book, book check)
-> imbalance Strategy -> paper Executor, on one in-process :class:`~kimiha.EventBus`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import stat
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import msgspec

from kimiha.clock import SimClock
from kimiha.error import InvalidConfigurationError, SerializationError
from kimiha.event_bus import EventBus
from kimiha.orchestrator import TradingOrchestratorBuilder
from kimiha.journal import JournalWriter, read_journal
from kimiha.logs import json_handler
from kimiha.scheduling.signals import on_stop_signals
from kimiha.trading.tasks import ImbalanceStrategyTask, PaperExecutorTask, RawMessage, TradingEvent, trading_channels
from kimiha.venues.binance.tasks import BinanceAggregator, BinanceConnector
from kimiha.venues.binance import (
    BAD_LINE,
    BAD_LINE_WARNINGS,
    BinanceParser,
    count_lines_by_stream,
    recorded_tape,
    replay_lines,
)

__all__ = ["REPORT_LATENCIES_MS", "RecordingError", "accounting", "channel_summary", "format_summary", "log_not_shown",
           "JOURNALED", "ms_to_ns", "pnl_of", "run_demo", "run_replay", "shadow_executors", "survey_journal",
           "survey_recordings"]

if TYPE_CHECKING:
    from kimiha.metrics import MetricsServer

logger = logging.getLogger("kimiha.apps.demo")

#: What a recording holds, for error messages.
EXPECTED_LINES = ("lines '<recv_ts_ns> <JSON>' of Binance market data (combined-stream messages or REST depth "
                  "snapshots), gzipped or plain")


class RecordingError(InvalidConfigurationError):
    """A ``--data`` recording cannot be replayed; the message names the file and says what is wrong with it."""


def _file_mode(path: Any, where: str, kind: str, hint: str) -> int:
    """``os.stat(path).st_mode``; a missing file, an unreadable one or a directory is a :class:`RecordingError`
    starting ``where`` (e.g. ``"--data PATH: "``) that names ``kind`` ("recording", "journal")."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise RecordingError(f"{where}no such {kind} file") from None
    except OSError as exc:
        raise RecordingError(f"{where}cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise RecordingError(f"{where}is a directory; expected a {kind} file ({hint})")
    return mode


def _survey_one(path: Any) -> collections.Counter[str]:
    name = str(path)
    if isinstance(path, (str, os.PathLike)):
        mode = _file_mode(path, f"--data {name}: ", "recording", "one --data per file")
        if not stat.S_ISREG(mode):  # a pipe or a device cannot be read twice (to count, then to replay)
            raise RecordingError(f"--data {name}: is not a regular file; expected a recording file")
        if _is_journal(path):
            raise RecordingError(f"--data {name}: this is a kimiha journal, not a recording: replay it with "
                                 f"`kimiha replay {name}`")
    parser = BinanceParser()
    try:
        counts = count_lines_by_stream(path, parser=parser)
    except SerializationError as exc:  # truncated or corrupt gzip data
        raise RecordingError(f"--data: {exc}") from None
    except OSError as exc:
        raise RecordingError(f"--data {name}: cannot read it ({exc.strerror or exc})") from None
    if not counts:
        raise RecordingError(f"--data {name}: the file holds no lines; expected {EXPECTED_LINES}")
    if set(counts) == {BAD_LINE}:
        example = _capped(str(parser.errors[0])) if parser.errors else ""
        raise RecordingError(f"--data {name}: expected {EXPECTED_LINES}, but none of its {counts[BAD_LINE]:,} "
                             f"line(s) is; e.g. {example}")
    return counts


#: The most characters of a file's content an error message quotes.
QUOTE_MAX = 160


def _capped(text: str, most: int = QUOTE_MAX) -> str:
    """``text``, cut to ``most`` characters with a note of how many were left out."""
    return text if len(text) <= most else f"{text[:most]}... ({len(text) - most:,} more characters)"


def _is_journal(path: Any) -> bool:
    from kimiha.journal import MAGIC

    try:
        with open(path, "rb") as file:
            return bool(file.read(len(MAGIC)) == MAGIC)
    except OSError:
        return False  # said by the census, which reads it next


def survey_recordings(paths: Iterable[Any]) -> collections.Counter[str]:
    """Check recordings and count their lines by stream, file by file (see
    :func:`~kimiha.venues.binance.count_lines_by_stream`).

    Parameters
    ----------
    paths : iterable of paths
        The recordings (``--data``).

    Returns
    -------
    collections.Counter
        The lines of all the files by stream, bad lines under :data:`~kimiha.venues.binance.BAD_LINE`.

    Raises
    ------
    RecordingError
        For the first file that is missing, a directory or not a regular file, unreadable, truncated or
        corrupt gzip data, empty, or in which no line parses. The message names the file (one line).
    """
    total: collections.Counter[str] = collections.Counter()
    for path in paths:
        total.update(_survey_one(path))
    return total


class Progress:
    """A progress bar on a stream: redrawn in place on a terminal, a line per 25 % otherwise."""

    def __init__(self, total: int, stream: TextIO | None, label: str = "replay") -> None:
        self.total = max(total, 1)
        # with --log-format json, stderr is one JSON object per line: no progress there
        self.stream = None if json_handler() is not None else stream
        self.label = label
        self.tty = bool(self.stream is not None and getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._next_mark = 0  # the first line right away: a run shows it is alive before 25 %
        self._last_line: int | None = None

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
        elif pct >= self._next_mark or (final and done != self._last_line):
            while self._next_mark <= pct:
                self._next_mark += 25
            self._last_line = done
            self.stream.write(f"{self.label}: {pct}% ({done:,}/{self.total:,} lines, {rate:,.0f}/s)\n")
            self.stream.flush()


#: The channels ``demo --journal`` records: the input (what ``replay`` publishes again) and the orders and
#: fills (what ``replay`` compares its own with).
JOURNALED = (TradingEvent.RAW_MARKET_DATA, TradingEvent.ORDERS, TradingEvent.FILLS)

#: The latencies (milliseconds) of the demo's ``--latency-report``: one shadow executor each.
REPORT_LATENCIES_MS = (0, 1, 10)


async def run_demo(data: Sequence[str | Path] | None = None, *, speed: float | None = None,
                   progress: TextIO | None = sys.stderr, capacity: int = 4096, latency_ms: float = 0.0,
                   latency_report: bool = False, journal: str | Path | None = None,
                   journal_fsync: str = "never", journal_rotate_bytes: int | None = None,
                   metrics: MetricsServer | None = None) -> dict[str, Any]:
    """Run the pipeline over ``data`` (default: the shipped tape) and return the summary as a dict.

    The replay runs on a :class:`~kimiha.clock.SimClock`: the connector sets it to each line's recorded
    receive time, every task's clock follows the market data it handles, so the orders, the fills and their
    ``digest`` are the same on every run, loop and replay speed. ``latency_ms``: the executor's order
    latency (:class:`~kimiha.trading.paper.FixedLatency`); ``latency_report``: also fill every order in
    shadow executors at :data:`REPORT_LATENCIES_MS` and report their PnL (``pnl_by_latency``).
    ``journal``: record :data:`JOURNALED` to that path (:class:`~kimiha.journal.JournalWriter`), for
    ``kimiha replay``. ``metrics``: a started :class:`~kimiha.metrics.MetricsServer` to report this run's bus
    and scheduler.
    """
    paths: list[Any] = list(data) if data else recorded_tape()
    expected = survey_recordings(paths)
    total = sum(expected.values())
    if journal is not None:
        _refuse_journal_over_data(Path(journal), paths)
        try:  # a journal that cannot be written is a bad option, said before anything runs
            with open(journal, "ab"):
                pass
        except OSError as exc:
            raise RecordingError(f"--journal {journal}: cannot write it ({exc.strerror or exc})") from None

    bus = EventBus(trading_channels(capacity))
    connector = BinanceConnector(bus, replay_lines(paths, speed))
    aggregator = BinanceAggregator(bus)
    strategy = ImbalanceStrategyTask(bus)
    executor = PaperExecutorTask(bus, latency=ms_to_ns(latency_ms))
    builder = (
        TradingOrchestratorBuilder(bus, clock=SimClock())
        .with_connector(connector)
        .with_aggregator(aggregator)
        .with_strategy(strategy)
        .with_executor(executor)
    )
    shadows = shadow_executors(bus) if latency_report else {}
    for shadow in shadows.values():
        builder.with_executor(shadow)
    orchestrator = builder.build()
    stop = asyncio.Event()
    writer = None
    if journal is not None:
        # a journal that cannot be written (a full disk) stops the run: recording it is the point of --journal
        # its end record says whether the run was cut short (`kimiha replay` reports it)
        writer = JournalWriter(bus, journal, JOURNALED, fsync=journal_fsync, rotate_bytes=journal_rotate_bytes,
                               on_failure=lambda exc: stop.set(), meta={"latency_ns": ms_to_ns(latency_ms)},
                               end_meta=lambda: {"interrupted": interrupted[0] if interrupted else None,
                                                 "lines_read": connector.lines, "lines_in_files": total})
        orchestrator.scheduler.register_background_task(writer)
    if metrics is not None:
        metrics.watch(bus, orchestrator.scheduler)
    bar = Progress(total, progress)
    started = time.perf_counter()
    interrupted: list[str] = []
    await _run_until_done(orchestrator, connector, bar, stop, interrupted)
    elapsed = time.perf_counter() - started
    bar.update(connector.lines, final=True)
    if writer is not None and writer.failed is not None:
        raise writer.failed
    summary = _summary(bus, orchestrator, connector, aggregator, strategy, executor, expected, elapsed, paths)
    summary["latency_ms"] = latency_ms
    if writer is not None:
        summary["journal"] = {"path": str(writer.path), "records": writer.records, "bytes": writer.bytes,
                              "segments": [str(p) for p in writer.segments], "fsync": writer.fsync}
    if shadows:
        summary["pnl_by_latency"] = {label: pnl_of(shadow) for label, shadow in shadows.items()}
    summary["interrupted"] = interrupted[0] if interrupted else None
    log_not_shown(aggregator)
    return summary


async def _run_until_done(orchestrator: Any, connector: Any, bar: Any, stop: asyncio.Event,
                          interrupted: list[str] | None = None) -> list[str]:
    """Start ``orchestrator``, wait until ``connector.finished``, ``stop`` or a failure, then shut it down;
    return the signals that stopped it (appended to ``interrupted`` as they come, so the shutdown hooks can
    read them). Ctrl-C and SIGTERM go through the same staged shutdown."""
    if interrupted is None:
        interrupted = []

    def on_signal(name: str) -> None:
        interrupted.append(name)
        stop.set()

    give_back = on_stop_signals(asyncio.get_running_loop(), on_signal)
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
        give_back()
    return interrupted


def _refuse_journal_over_data(journal: Path, paths: Sequence[Any]) -> None:
    """A journal replaces the file at its path and its ``PATH.N`` segments: never one of the run's inputs."""
    target = journal.resolve()
    for data in paths:
        source = Path(data).resolve()
        tail = source.name[len(target.name) + 1:] if source.name.startswith(target.name + ".") else ""
        if source == target or (source.parent == target.parent and tail.isdigit()):
            raise RecordingError(f"--journal {journal}: it would overwrite the recording {data} that this run "
                                 f"replays; journal to another path")


def survey_journal(path: str | Path) -> tuple[collections.Counter[str], str, dict[str, int], dict[str, Any] | None]:
    """Read a journal once: count its market-data lines by stream (as :func:`survey_recordings` does for a
    recording), compute the digest of its recorded orders and fills, count its records by channel, and return
    its end record (:func:`~kimiha.journal.journal_end`; None when the recording run did not close it).

    Raises
    ------
    RecordingError
        When the journal cannot be read, is corrupt (the offset is named), or holds no ``RawMarketData``.
    """
    import hashlib

    from kimiha.journal import META_CHANNEL, JournalCorrupt, end_record

    parser = BinanceParser()
    decode_raw = msgspec.msgpack.Decoder(RawMessage).decode
    orders_hash, fills_hash = hashlib.sha256(), hashlib.sha256()
    raw, order_name, fill_name = (TradingEvent.RAW_MARKET_DATA.value, TradingEvent.ORDERS.value,
                                  TradingEvent.FILLS.value)
    by_channel: collections.Counter[str] = collections.Counter()
    _file_mode(path, f"{path}: ", "journal", "`kimiha demo --journal PATH` writes one")
    end: dict[str, Any] | None = None
    try:
        for record in read_journal(path, channels=(raw, order_name, fill_name, META_CHANNEL)):
            if record.channel == META_CHANNEL:
                end = end_record(record.frame)  # the meta record first, the end record last (if the run closed it)
                continue
            by_channel[record.channel] += 1
            if record.channel == raw:
                try:
                    parser.parse(decode_raw(record.frame).line)
                except SerializationError:
                    pass
            elif record.channel == order_name:
                orders_hash.update(record.frame)
            elif record.channel == fill_name:
                fills_hash.update(record.frame)
    except (JournalCorrupt, InvalidConfigurationError) as exc:
        text = str(exc)
        prefix = f"journal {str(path)!r}: "
        raise RecordingError(f"{path}: {text[len(prefix):] if text.startswith(prefix) else text}") from None
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except msgspec.DecodeError as exc:
        raise RecordingError(f"{path}: a {raw} record is not a RawMessage frame: {exc}") from None
    if not by_channel[raw]:
        held = ", ".join(f"{n:,} {c}" for c, n in by_channel.items()) or "no records at all"
        raise RecordingError(f"{path}: the journal holds no {raw} records ({held}); record one with "
                             f"`kimiha demo --journal PATH`")
    counts = collections.Counter({k: v for k, v in parser.counts.items() if v})
    if parser.bad_lines:
        counts[BAD_LINE] = parser.bad_lines
    recorded = hashlib.sha256(orders_hash.digest() + fills_hash.digest()).hexdigest()
    return counts, recorded, dict(by_channel), end


def recorded_run(end: dict[str, Any] | None) -> dict[str, Any]:
    """What a journal's end record says of the run that recorded it: ``closed`` (its writer closed the journal:
    False after a crash, a failed write or an interrupt before the run was under way), ``interrupted`` (the
    signal that stopped it, or None), and the lines it read of those in its files when known."""
    if end is None:
        return {"closed": False, "interrupted": None}
    out: dict[str, Any] = {"closed": True, "interrupted": end.get("interrupted")}
    for key in ("lines_read", "lines_in_files"):
        if isinstance(end.get(key), int):
            out[key] = end[key]
    return out


async def run_replay(path: str | Path, *, progress: TextIO | None = sys.stderr,
                     capacity: int = 4096) -> dict[str, Any]:
    """Replay a journal written by ``demo --journal``: its ``RawMarketData`` records go into the stages
    downstream (aggregator, strategy, executor) on a :class:`~kimiha.clock.SimClock`, as fast as possible;
    return the demo's summary, plus ``recorded_digest`` (the digest of the journal's own orders and fills)
    and ``digest_matches_recording``."""
    from kimiha.journal import JournalReplayer, journal_meta

    expected, recorded, by_channel, end = survey_journal(path)
    # the settings the recording ran with (its order latency), or the orders and fills cannot be the same
    latency_ns = journal_meta(path).get("latency_ns", 0)
    if isinstance(latency_ns, bool) or not isinstance(latency_ns, int) or latency_ns < 0:
        raise RecordingError(f"{path}: the journal's meta has latency_ns {latency_ns!r}; expected an int >= 0")
    bus = EventBus(trading_channels(capacity))
    replayer = JournalReplayer(bus, path, [TradingEvent.RAW_MARKET_DATA], warn=False)  # survey_journal warned
    aggregator = BinanceAggregator(bus)
    strategy = ImbalanceStrategyTask(bus)
    executor = PaperExecutorTask(bus, latency=latency_ns)
    orchestrator = (TradingOrchestratorBuilder(bus, clock=SimClock()).with_connector(replayer)
                    .with_aggregator(aggregator).with_strategy(strategy).with_executor(executor).build())
    bar = Progress(sum(expected.values()), progress)
    started = time.perf_counter()
    interrupted = await _run_until_done(orchestrator, replayer, bar, asyncio.Event())
    elapsed = time.perf_counter() - started
    bar.update(replayer.lines, final=True)
    summary = _summary(bus, orchestrator, replayer, aggregator, strategy, executor, expected, elapsed, [Path(path)])
    summary["replay_of"] = str(path)
    summary["latency_ms"] = latency_ns / 1e6
    summary["journal_records"] = by_channel
    summary["recorded_digest"] = recorded
    summary["digest_matches_recording"] = recorded == summary["digest"]
    summary["recorded_run"] = recorded_run(end)
    summary["interrupted"] = interrupted[0] if interrupted else None
    log_not_shown(aggregator)
    return summary


def ms_to_ns(ms: float) -> int:
    """Return ``ms`` milliseconds as whole nanoseconds."""
    return int(round(ms * 1_000_000))


def shadow_executors(bus: EventBus, latencies_ms: Iterable[float] = REPORT_LATENCIES_MS) -> dict[str, PaperExecutorTask]:
    """Return one shadow executor (fills and accounts, publishes nothing) per latency, keyed ``"<ms> ms"``."""
    return {f"{ms:g} ms": PaperExecutorTask(bus, name=f"paper-executor-{ms:g}ms", latency=ms_to_ns(ms),
                                           publish_fills=False) for ms in latencies_ms}


def pnl_of(executor: PaperExecutorTask) -> dict[str, Any]:
    """Return an executor's fills and PnL as the summary shows them (marked to its last quote's mid)."""
    paper = executor.paper
    mark = executor.last_mid
    return {
        "fills": paper.fills,
        "position": round(paper.position, 8),
        "realized": round(paper.realized_pnl, 6),
        "unrealized": round(paper.unrealized_pnl(mark) if mark else 0.0, 6),
        "fees": round(paper.fees_paid, 6),
        "total": round(paper.total_pnl(mark) if mark else paper.realized_pnl - paper.fees_paid, 6),
        "digest": executor.digest,
    }


def log_not_shown(aggregator: BinanceAggregator) -> None:
    """Say how many bad lines and book gaps the aggregator counted without logging them one by one."""
    bad = aggregator.parser.bad_lines
    if bad > BAD_LINE_WARNINGS:
        logger.warning("%s: %d more bad line(s) were skipped and not shown (%d in all, each counted in the "
                       "summary)", aggregator.name, bad - BAD_LINE_WARNINGS, bad)
    gaps_not_shown = aggregator.gaps - len(aggregator.gap_errors)
    if gaps_not_shown > 0:
        logger.warning("%s: %d more book gap(s) were not shown (%d in all)", aggregator.name, gaps_not_shown,
                       aggregator.gaps)


def accounting(connector: BinanceConnector | Any, parser: BinanceParser, expected: Any) -> dict[str, bool]:
    """Return whether every line was accounted for: read by the connector, then parsed under its stream or
    counted bad by the parser, the same lines that the census of the files (``expected``) found.

    ``all_lines_accounted``: over the whole files; ``lines_read_accounted``: over the lines read so far
    (what an interrupted run can check).
    """
    by_stream = {k: v for k, v in parser.counts.items() if v}
    in_files = {k: v for k, v in expected.items() if k != BAD_LINE}
    read_ok = connector.lines == parser.lines == sum(by_stream.values()) + parser.bad_lines
    return {
        "all_lines_accounted": read_ok and connector.lines == sum(expected.values()) and by_stream == in_files
        and parser.bad_lines == expected.get(BAD_LINE, 0),
        "lines_read_accounted": read_ok,
    }


def channel_summary(bus: EventBus) -> dict[str, Any]:
    """Return each channel's counters and publish -> handler latency (us) as the summaries show them."""
    out = {}
    for name, st in bus.stats().items():
        lat = st["latency_ns"]
        out[name] = {
            "published": st["published"],
            "delivered": st["delivered"],
            "lagged": st["lagged"],
            "blocked": st["blocked"],
            "bad_frames": st["bad_frames"],
            "high_water_mark": st["high_water_mark"],
            "latency_us": {k: round(lat[k] / 1e3, 2) for k in ("p50", "p99", "max")},
        }
    return out


def _summary(bus: EventBus, orchestrator: Any, connector: Any, aggregator: BinanceAggregator,
             strategy: ImbalanceStrategyTask, executor: PaperExecutorTask, expected: Any, elapsed: float,
             paths: list[Any]) -> dict[str, Any]:
    parser = aggregator.parser
    by_stream = dict(sorted(parser.counts.items()))
    file_counts = {k: v for k, v in sorted(expected.items()) if k != BAD_LINE}
    channels = channel_summary(bus)
    pnl = pnl_of(executor)
    return {
        "data": [getattr(p, "name", str(p)) for p in paths],
        "lines_read": connector.lines,
        "lines_in_files": sum(expected.values()),
        "messages_by_stream": by_stream,
        "messages_by_stream_in_files": file_counts,
        "bad_lines": parser.bad_lines,
        "bad_lines_in_files": expected.get(BAD_LINE, 0),
        **accounting(connector, parser, expected),
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
        "fills": pnl["fills"],
        "rejected": executor.rejected,
        "position": pnl["position"],
        "pnl": {k: pnl[k] for k in ("realized", "unrealized", "fees", "total")},
        "digest": executor.digest,
        "cooldowns_ended": strategy.cooldowns_ended,
        "wall_time_s": round(elapsed, 3),
        "messages_per_s": round(connector.lines / elapsed, 1) if elapsed else 0.0,
        "channels": channels,
        "tasks": orchestrator.registry.snapshot(),
        "shutdown": orchestrator.scheduler.last_shutdown,
    }


def _fig(value: int | None) -> str:
    """A count of the summary, or "unknown" when the process that counts it did not report."""
    return "unknown" if value is None else f"{value:,}"


def _shown(text: str) -> str:
    """``text`` as a terminal may show it: control characters (a recording's stream names, file names) escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _cut_short(run: dict[str, Any]) -> str:
    """How the run that recorded a journal was cut short, from :func:`recorded_run`."""
    if not run["closed"]:
        return ("did not close its journal (it crashed, a write failed, or it was interrupted before it was "
                "under way)")
    lines = (f" after {run['lines_read']:,} of {run['lines_in_files']:,} lines"
             if "lines_read" in run and "lines_in_files" in run else "")
    if run["interrupted"]:
        return f"was interrupted by {run['interrupted']}{lines}"
    return f"stopped early{lines}"


def format_summary(s: dict[str, Any]) -> str:
    """Return the summary as the readable report ``python -m kimiha demo`` prints."""
    replay = "recorded_digest" in s  # `kimiha replay`: the lines come from a journal
    if replay:
        out = [f"kimiha replay: {_shown(s['replay_of'])}"]
    else:
        out = [f"kimiha demo: {', '.join(_shown(d) for d in s['data'])}"]
    where = "in the journal" if replay else "in the files"
    if s.get("interrupted"):
        # distributed: whether every event reached the next process is said below, per hop ("drained")
        stopped = (f"the processes stopped {(s['distributed'].get('stop') or {}).get('how') or 'at once'}"
                   if "distributed" in s else "every stage drained")
        out.append(f"  interrupted by {s['interrupted']}: replay stopped early, {stopped}, "
                   f"every shutdown hook run: {'yes' if s['hooks_run'] else 'NO'}")
    if s.get("interrupted"):
        ok = s.get("lines_read_accounted", s["all_lines_accounted"])
        # distributed: this is the feed process's reading; whether its events reached the other processes is
        # the "drained" line's (both can be true: every line read was parsed, and an event was lost later)
        scope = " by the feed process" if "distributed" in s else ""
        out.append(f"  lines: {s['lines_read']:,} read of {s['lines_in_files']:,} {where}{scope} before the stop, "
                   f"{s['bad_lines']:,} bad; every line read accounted for: {'yes' if ok else 'NO'}")
    else:
        out.append(f"  lines: {s['lines_read']:,} read of {s['lines_in_files']:,} {where}, "
                   f"{s['bad_lines']:,} bad; every line accounted for: {'yes' if s['all_lines_accounted'] else 'NO'}")
    if (run := s.get("recorded_run")) is not None and (not run["closed"] or run["interrupted"]
                                                       or run.get("lines_read") != run.get("lines_in_files")):
        out.append("  the recorded run " + _cut_short(run) + ": the journal holds only what it recorded")
    out.append("  messages by stream: " + ", ".join(f"{_shown(k)} {v:,}" for k, v in s["messages_by_stream"].items()))
    bc = s["book_check"]
    out.append(f"  book check: {bc['matched']:,} matched / {bc['compared']:,} compared "
               f"(gaps {bc['gaps']}, book {bc['book_state']})")
    # None: the process that counts it did not report (a distributed run whose process died).
    out.append(f"  trades {_fig(s['trades'])}  signals {_fig(s['signals'])}  orders {_fig(s['orders'])}  "
               f"fills {_fig(s['fills'])}  rejected {_fig(s['rejected'])}"
               + (f"  cooldowns ended {_fig(s['cooldowns_ended'])}" if "cooldowns_ended" in s else ""))
    pnl = s["pnl"]
    if pnl is None or s["position"] is None:
        out.append("  position unknown  PnL: unknown (the executor process did not report)")
    else:
        out.append(f"  position {s['position']:+.5f} BTC  PnL: realized {pnl['realized']:+.4f}  unrealized "
                   f"{pnl['unrealized']:+.4f}  fees {pnl['fees']:.4f}  total {pnl['total']:+.4f} USDT")
    if "pnl_by_latency" in s:
        out.append("  PnL by order latency: " + ", ".join(
            f"{label} {p['total']:+.4f} USDT ({p['fills']} fills)" for label, p in s["pnl_by_latency"].items()))
    if "digest" in s and s["digest"] is None:
        out.append("  digest unknown (the executor process did not report)")
    elif "digest" in s:
        latency = f", order latency {s['latency_ms']:g} ms" if s.get("latency_ms") else ""
        out.append(f"  digest {s['digest']} (orders and fills, sha256{latency})")
    if "recorded_digest" in s:
        same = "the same" if s["digest_matches_recording"] else f"DIFFERENT: {s['recorded_digest']}"
        out.append(f"  replay of {_shown(s['replay_of'])}: the recorded orders and fills have {same} digest")
    if "journal" in s:
        j = s["journal"]
        out.append(f"  journal {_shown(j['path'])}: {j['records']:,} records, {j['bytes']:,} bytes in "
                   f"{len(j['segments'])} segment(s) (their headers included), fsync {j['fsync']}")
    out.append(f"  wall time {s['wall_time_s']:.3f} s, {s['messages_per_s']:,.0f} messages/s")
    out.append(f"  {'channel':<15} {'published':>10} {'delivered':>10} {'lagged':>7} {'blocked':>8} "
               f"{'p50 us':>8} {'p99 us':>9} {'max us':>10}")
    for name, c in s["channels"].items():
        lat = c["latency_us"]
        out.append(f"  {name:<15} {c['published']:>10,} {c['delivered']:>10,} {c['lagged']:>7} {c['blocked']:>8} "
                   f"{lat['p50']:>8.2f} {lat['p99']:>9.2f} {lat['max']:>10.2f}")
    return "\n".join(out)
