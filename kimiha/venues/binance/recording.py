"""Binance recordings: line sources over recording files, the shipped tape, and a full book rebuild.

* :func:`iter_lines` / :func:`replay_lines`, sync and async sources over recording files (gzipped or not),
  the async one optionally paced at the recorded speed, reading in linear time with a maximum line length
  (:data:`MAX_LINE_BYTES`, :class:`LineTooLongError`); :func:`count_lines_by_stream` to account for every
  line, with the parser's own definition of a bad line;
* :func:`rebuild_book`, a full replay through the parser and :class:`~kimiha.trading.book.OrderBook` that
  checks the rebuilt book against ``bookTicker`` (see :class:`~kimiha.trading.book.BookCheck`) and measures
  throughput;
* :func:`recorded_tape`, the recording shipped in ``kimiha/data`` (11 minutes of BTCUSDT, see its README).
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import io
import logging
import math
import os
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from importlib import resources
from typing import Any, Union, cast

import msgspec

from kimiha.error import InvalidConfigurationError, SerializationError
from kimiha.trading.book import BookCheck, BookGap, OrderBook
from kimiha.trading.model import BookUpdate, DepthDiff, Quote, Trade
from kimiha.venues.binance.wire import (
    BAD_LINE,
    BinanceParser,
)

__all__ = [
    "MAX_LINE_BYTES",
    "BookReplayReport",
    "LineTooLongError",
    "RecordingPath",
    "count_lines_by_stream",
    "iter_lines",
    "open_recording",
    "rebuild_book",
    "recorded_tape",
    "recv_ts_of",
    "replay_lines",
]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 18  # bytes read at a time from a recording
RecordingPath = Union[str, "os.PathLike[str]", Any]  # Any: an importlib.resources Traversable

#: Default maximum length of a line of a recording, in bytes (its newline not counted). The longest line of
#: the shipped tape is a REST snapshot of about 50 KB; the limit bounds the memory a file without newlines
#: (a corrupt or wrong file) can take before it is rejected.
MAX_LINE_BYTES = 16 << 20


class LineTooLongError(SerializationError):
    """A line of a recording is longer than the maximum (see :func:`iter_lines`).

    Attributes
    ----------
    path : str
        The file.
    line_no : int
        The line's number in that file (from 1, blank lines included, as an editor numbers them).
    limit : int
        The maximum, in bytes.
    """

    def __init__(self, path: str, line_no: int, limit: int, seen: int) -> None:
        super().__init__(
            f"recording {path!r}: expected lines of at most {_size(limit)} (max_line_bytes), but line "
            f"{line_no} is longer: {seen:,} bytes without a newline")
        self.path = path
        self.line_no = line_no
        self.limit = limit
        self.seen = seen

    def __reduce__(self) -> tuple[type[LineTooLongError], tuple[str, int, int, int]]:
        return type(self), (self.path, self.line_no, self.limit, self.seen)  # the message is built from these


def _size(n: int) -> str:
    if n >= 1 << 20 and n % (1 << 20) == 0:
        return f"{n >> 20} MiB ({n:,} bytes)"
    return f"{n:,} bytes"


def _check_max_line_bytes(max_line_bytes: int | None, who: str) -> int | None:
    if max_line_bytes is not None and (isinstance(max_line_bytes, bool) or not isinstance(max_line_bytes, int)
                                       or max_line_bytes < 1):
        raise InvalidConfigurationError(
            f"{who}: max_line_bytes must be None (no limit) or an int >= 1, got {max_line_bytes!r}")
    return max_line_bytes


# ------------------------------------------------------------------------------------------- line sources
class _GzipRecording(gzip.GzipFile):
    """A GzipFile that also closes the file it reads from (GzipFile leaves a passed-in file open)."""

    def __init__(self, raw: Any) -> None:
        super().__init__(fileobj=raw, mode="rb")
        self._raw = raw

    def close(self) -> None:
        try:
            super().close()
        finally:
            self._raw.close()


def open_recording(path: RecordingPath) -> io.BufferedIOBase:
    """Open a recording for binary reading, decompressing it if it starts with the gzip magic bytes.

    Parameters
    ----------
    path : str, os.PathLike or importlib.resources Traversable
        The file. Closing the returned object closes the file.
    """
    raw: io.BufferedIOBase
    if hasattr(path, "open") and not isinstance(path, (str, bytes)):
        raw = cast(io.BufferedIOBase, path.open("rb"))
    else:
        raw = open(os.fspath(path), "rb")  # noqa: SIM115 - returned to the caller
    try:
        head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
        if head == b"\x1f\x8b":
            return _GzipRecording(raw)
    except BaseException:
        raw.close()
        raise
    return raw


def _as_path_list(paths: RecordingPath | Iterable[RecordingPath]) -> list[Any]:
    if isinstance(paths, (str, bytes, os.PathLike)) or hasattr(paths, "is_file"):
        return [paths]
    return list(paths)


def iter_lines(paths: RecordingPath | Iterable[RecordingPath], *,
               max_line_bytes: int | None = MAX_LINE_BYTES) -> Iterator[bytes]:
    """Yield the lines of one or more recordings in order, as bytes without the line ending.

    Blank lines are skipped (they carry no message). Reading takes time linear in the size of the files,
    however long their lines.

    Parameters
    ----------
    paths : path or iterable of paths
        Recording files, gzipped or plain; several files are read one after the other as one stream.
    max_line_bytes : int or None, default :data:`MAX_LINE_BYTES` (16 MiB)
        Longest line accepted, in bytes, not counting its newline (a ``\\r`` before it counts); None for no
        limit.

    Raises
    ------
    SerializationError
        When compressed data is truncated or corrupt (a recorder that crashed mid-write); the lines before
        the damage have been yielded, and the message names the file and how many lines it gave.
    LineTooLongError
        (a :class:`~kimiha.error.SerializationError`) as soon as a line is longer than ``max_line_bytes``,
        without reading the rest of it; the message names the file, the line number and the limit.
    InvalidConfigurationError
        For a ``max_line_bytes`` that is neither None nor an int >= 1 (a ``ValueError`` too).
    """
    return _lines(paths, max_line_bytes, "iter_lines")


def _lines(paths: RecordingPath | Iterable[RecordingPath], max_line_bytes: int | None,
           who: str) -> Iterator[bytes]:
    """Check ``max_line_bytes`` now (as ``who``'s parameter), then return the generator of the lines."""
    return _iter_lines(_as_path_list(paths), _check_max_line_bytes(max_line_bytes, who))


def _iter_lines(paths: list[Any], limit: int | None) -> Iterator[bytes]:
    # A line only ever exceeds a chunk when it continues over several; lines within one chunk need checking
    # only for a limit below the chunk size.
    check_each = limit is not None and limit < _CHUNK
    for path in paths:
        with open_recording(path) as f:
            # Splitting large chunks is about a third faster than iterating the (gzip) file line by line.
            # The unfinished line is kept as a list of pieces, joined once when its newline arrives: adding
            # each chunk to it instead would copy and re-scan it for every chunk (quadratic in its length).
            pending: list[bytes] = []
            pending_len = 0
            given = 0  # lines of this file ended so far, blank ones included
            while True:
                try:
                    chunk = f.read(_CHUNK)
                except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
                    raise SerializationError(
                        f"recording {str(path)!r}: expected complete gzip data, but it is truncated or "
                        f"corrupt after {given} line(s): {exc}") from exc
                if not chunk:
                    break
                if chunk.find(b"\n") < 0:
                    pending.append(chunk)
                    pending_len += len(chunk)
                    if limit is not None and pending_len > limit:
                        raise LineTooLongError(str(path), given + 1, limit, pending_len)
                    continue
                lines = chunk.split(b"\n")
                tail = lines.pop()
                if pending:
                    if limit is not None and pending_len + len(lines[0]) > limit:
                        raise LineTooLongError(str(path), given + 1, limit, pending_len + len(lines[0]))
                    pending.append(lines[0])
                    lines[0] = b"".join(pending)
                    pending.clear()
                if check_each and limit is not None:
                    for i, line in enumerate(lines):
                        if len(line) > limit:
                            raise LineTooLongError(str(path), given + i + 1, limit, len(line))
                given += len(lines)
                if tail:
                    pending.append(tail)
                pending_len = len(tail)
                if limit is not None and pending_len > limit:
                    raise LineTooLongError(str(path), given + 1, limit, pending_len)
                for line in lines:
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if line and not line.isspace():
                        yield line
            tail = b"".join(pending)
            if tail.endswith(b"\r"):
                tail = tail[:-1]
            if tail and not tail.isspace():
                yield tail


def recv_ts_of(line: bytes) -> int | None:
    """Return the recorded receive time of a line (``<recv_ts_ns> <JSON>``), or None when it has none."""
    head = line[:24].partition(b" ")[0]
    try:
        return int(head)
    except ValueError:
        return None


async def replay_lines(paths: RecordingPath | Iterable[RecordingPath], speed: float | None = None, *,
                       yield_every: int = 256, clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                       max_line_bytes: int | None = MAX_LINE_BYTES) -> AsyncIterator[bytes]:
    """Yield the lines of one or more recordings as an async stream, as fast as possible or paced.

    Parameters
    ----------
    paths : path or iterable of paths
        Recording files (gzipped or plain), read in order as one stream.
    speed : float, optional
        None: as fast as possible. Otherwise replay at the recorded pace (from each line's ``recv_ts_ns``)
        multiplied by ``speed`` (``10`` is ten times faster than real time). Lines whose timestamp cannot be
        read are not paced.
    yield_every : int, default 256
        Give the event loop a turn (``sleep(0)``) after this many lines without a pause, so a fast replay
        never starves timers and I/O.
    clock, sleep : callable, optional
        Monotonic clock in seconds and the coroutine used to wait; replaceable for deterministic tests.
    max_line_bytes : int or None, default :data:`MAX_LINE_BYTES`
        Longest line accepted (see :func:`iter_lines`, which raises :class:`LineTooLongError`).

    Yields
    ------
    bytes
        Each non-blank line, without its line ending.
    """
    if speed is not None and (isinstance(speed, bool) or not isinstance(speed, (int, float))
                              or not math.isfinite(speed) or speed <= 0):
        raise InvalidConfigurationError(
            f"replay_lines: speed must be None or a finite number > 0, got {speed!r}")
    if isinstance(yield_every, bool) or not isinstance(yield_every, int) or yield_every < 1:
        raise InvalidConfigurationError(f"replay_lines: yield_every must be an int >= 1, got {yield_every!r}")
    lines = _lines(paths, max_line_bytes, "replay_lines")
    paced = speed is not None
    ns_per_second = 1e9 * float(speed) if speed is not None else 0.0
    start_ts: int | None = None
    start_clock = 0.0
    since_pause = 0
    for line in lines:
        if paced:
            ts = recv_ts_of(line)
            if ts is not None:
                if start_ts is None:
                    start_ts = ts
                    start_clock = clock()
                else:
                    delay = start_clock + (ts - start_ts) / ns_per_second - clock()
                    if delay > 0.0:
                        await sleep(delay)
                        since_pause = 0
        since_pause += 1
        if since_pause >= yield_every:
            since_pause = 0
            await sleep(0)
        yield line


def count_lines_by_stream(path: RecordingPath | Iterable[RecordingPath], *,
                          parser: BinanceParser | None = None,
                          max_line_bytes: int | None = MAX_LINE_BYTES) -> collections.Counter[str]:
    """Count the lines of recordings by stream name, in a pass of their own, to check that a replay
    accounted for every line.

    A line counts under its stream exactly when :meth:`BinanceParser.parse` accepts it, and under
    :data:`BAD_LINE` exactly when the parser rejects it (whatever the reason: no timestamp, malformed JSON, an
    unknown stream, a payload without the fields of its stream): this census and a replay's parser agree on
    every kind of bad line. Blank lines are not lines (see :func:`iter_lines`).

    Parameters
    ----------
    path : path or iterable of paths
        Recording files.
    parser : BinanceParser, optional
        The parser to count with (a new one by default); pass one to read its :attr:`~BinanceParser.errors`
        afterwards.
    max_line_bytes : int or None, default :data:`MAX_LINE_BYTES`
        Longest line accepted (see :func:`iter_lines`).

    Returns
    -------
    collections.Counter
        Lines by stream name; REST snapshots under :data:`SNAPSHOT`, bad lines under :data:`BAD_LINE` (only
        when there are some).

    Raises
    ------
    SerializationError
        When compressed data is truncated or corrupt, or a line is longer than ``max_line_bytes``
        (:class:`LineTooLongError`); see :func:`iter_lines`.
    """
    lines = _lines(path, max_line_bytes, "count_lines_by_stream")
    parser = parser if parser is not None else BinanceParser()
    bad_before, counts_before = parser.bad_lines, collections.Counter(parser.counts)
    parse = parser.parse
    for line in lines:
        try:
            parse(line)
        except SerializationError:
            pass
    counts = parser.counts - counts_before
    if parser.bad_lines > bad_before:
        counts[BAD_LINE] = parser.bad_lines - bad_before
    return counts


def recorded_tape() -> list[Any]:
    """Return the shipped Binance BTCUSDT recording (two gzip files, one continuous stream), in order.

    The files live in ``kimiha/data`` (recorded by the hftbacktest data collector, MIT; see its README).
    """
    data = resources.files("kimiha") / "data"
    return sorted((p for p in data.iterdir() if p.name.endswith(".gz")), key=lambda p: p.name)


# ---------------------------------------------------------------------------------------------- book replay
class BookReplayReport(msgspec.Struct, kw_only=True):
    """Outcome of :func:`rebuild_book`.

    Attributes
    ----------
    lines, bad_lines : int
        Lines read and lines skipped as unparseable.
    counts : dict
        Parsed lines by stream name (snapshots under :data:`SNAPSHOT`).
    trades, quotes, diffs, snapshots : int
        Events by kind.
    applied, stale, gaps, resyncs : int
        Book counters: diffs applied, stale diffs dropped, gaps detected, resyncs after a gap.
    crossed : int
        Book updates where the best bid was at or above the best ask.
    compared, matched : int
        Book check: update ids where both the book and ``bookTicker`` reported the top of book, and how many
        agreed exactly.
    gap_errors : list of str
        Messages of the first gaps.
    final_state : str
        Book state at the end.
    elapsed_s : float
        Wall time of the whole replay (read, decompress, parse, book, check).
    """

    lines: int = 0
    bad_lines: int = 0
    counts: dict[str, int] = {}
    trades: int = 0
    quotes: int = 0
    diffs: int = 0
    snapshots: int = 0
    applied: int = 0
    stale: int = 0
    gaps: int = 0
    resyncs: int = 0
    crossed: int = 0
    compared: int = 0
    matched: int = 0
    gap_errors: list[str] = []
    final_state: str = ""
    elapsed_s: float = 0.0

    @property
    def messages_per_s(self) -> float:
        """Return lines processed per second of wall time."""
        return self.lines / self.elapsed_s if self.elapsed_s > 0 else math.inf


def rebuild_book(paths: RecordingPath | Iterable[RecordingPath] | None = None, *,
                 book: OrderBook | None = None, parser: BinanceParser | None = None,
                 keep_gap_errors: int = 10, max_line_bytes: int | None = MAX_LINE_BYTES) -> BookReplayReport:
    """Replay recordings through the parser and an order book, checking the book against ``bookTicker``.

    Bad lines are skipped (counted); gaps are counted and their messages kept, and the book resyncs on the
    next snapshot.

    Parameters
    ----------
    paths : path or iterable of paths, optional
        Recordings; the shipped tape (:func:`recorded_tape`) by default.
    book : OrderBook, optional
        Book to rebuild (left in its final state for inspection); a new one by default.
    parser : BinanceParser, optional
        Parser to use; a new one by default.
    keep_gap_errors : int, default 10
        Gap messages kept in the report.
    max_line_bytes : int or None, default :data:`MAX_LINE_BYTES`
        Longest line accepted (see :func:`iter_lines`).

    Returns
    -------
    BookReplayReport

    Raises
    ------
    SerializationError
        When compressed data is truncated or corrupt, or a line is longer than ``max_line_bytes``
        (:class:`LineTooLongError`); see :func:`iter_lines`.
    """
    lines = _lines(recorded_tape() if paths is None else paths, max_line_bytes, "rebuild_book")
    book = book if book is not None else OrderBook()
    parser = parser if parser is not None else BinanceParser()
    check = BookCheck()
    gap_errors: list[str] = []
    trades = quotes = diffs = snapshots = crossed = 0
    parse = parser.parse
    apply_diff = book.apply_diff
    on_quote = check.on_quote
    on_update = check.on_update
    lines_before, bad_before = parser.lines, parser.bad_lines

    start = time.perf_counter()
    for line in lines:
        try:
            event = parse(line)
        except SerializationError:
            continue
        # Most frequent first: quotes, then trades, then depth (about 73%, 20% and 7% of the tape).
        if isinstance(event, Quote):
            quotes += 1
            on_quote(event)
            continue
        if isinstance(event, Trade):
            trades += 1
            continue
        updates: list[BookUpdate] | tuple[BookUpdate, ...]
        try:
            if isinstance(event, DepthDiff):
                diffs += 1
                if not book.symbol:
                    book.symbol = event.symbol
                update = apply_diff(event)
                updates = () if update is None else (update,)
            else:
                snapshots += 1
                updates = book.apply_snapshot(event)
        except BookGap as exc:
            if len(gap_errors) < keep_gap_errors:
                gap_errors.append(str(exc))
            continue
        for update in updates:
            on_update(update)
            if update.bid_px is not None and update.ask_px is not None and update.bid_px >= update.ask_px:
                crossed += 1
    elapsed = time.perf_counter() - start

    return BookReplayReport(
        lines=parser.lines - lines_before, bad_lines=parser.bad_lines - bad_before,
        counts=dict(parser.counts), trades=trades, quotes=quotes, diffs=diffs, snapshots=snapshots,
        applied=book.applied, stale=book.stale,
        gaps=book.gaps, resyncs=book.resyncs, crossed=crossed, compared=check.compared, matched=check.matched,
        gap_errors=gap_errors, final_state=book.state.value, elapsed_s=elapsed,
    )
