"""Binance spot market data: wire messages, a typed line parser, recorded-tape sources and a book rebuild.

What a Binance connector needs, without the event bus:

* wire Structs for the combined-stream messages (``trade``, ``bookTicker``, ``depthUpdate``) and the REST
  depth snapshot, decoded by ``msgspec`` with decoders built once;
* :class:`BinanceParser`, which turns one recorded or received line ``<recv_ts_ns> <JSON>`` into a
  venue-neutral event (:class:`~kimiha.venues.Trade`, :class:`~kimiha.venues.Quote`,
  :class:`~kimiha.venues.DepthDiff`, :class:`~kimiha.venues.DepthSnapshot`), counts lines per stream and
  reports bad lines with :class:`~kimiha.error.SerializationError`;
* :func:`iter_lines` / :func:`replay_lines`, sync and async sources over recording files (gzipped or not),
  the async one optionally paced at the recorded speed; :func:`count_lines_by_stream` to account for every
  line;
* :func:`rebuild_book`, a full replay through the parser and :class:`~kimiha.book.OrderBook` that checks the
  rebuilt book against ``bookTicker`` (see :class:`~kimiha.book.BookCheck`) and measures throughput;
* :func:`recorded_tape`, the recording shipped in ``kimiha/data`` (11 minutes of BTCUSDT, see its README).

Decimal strings are decoded straight into floats by ``msgspec`` (``strict=False`` lets a JSON string fill a
``float`` field): it is faster than ``float()`` on each value and gives the same float for the same string.
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
from typing import Any, Literal, Union

import msgspec
from msgspec import field

from kimiha.book import BookCheck, BookGap, OrderBook
from kimiha.error import InvalidConfigurationError, SerializationError
from kimiha.types import Event
from kimiha.venues import BookUpdate, DepthDiff, DepthSnapshot, MarketEvent, Quote, Side, Trade

__all__ = [
    "BAD_LINE",
    "BAD_LINE_WARNINGS",
    "SNAPSHOT",
    "BinanceParser",
    "BookReplayReport",
    "Envelope",
    "WireBookTicker",
    "WireDepthSnapshot",
    "WireDepthUpdate",
    "WireTrade",
    "count_lines_by_stream",
    "iter_lines",
    "log_bad_line",
    "open_recording",
    "parse_lines",
    "rebuild_book",
    "recorded_tape",
    "replay_lines",
]

logger = logging.getLogger(__name__)

#: Counter key of REST depth snapshot lines (they carry no stream name).
SNAPSHOT = "snapshot"
#: Counter key of bad lines (lines :meth:`BinanceParser.parse` rejects), in :func:`count_lines_by_stream`.
BAD_LINE = "bad"
#: How many bad lines are logged one by one before the rest are only counted (the count is reported at the end).
BAD_LINE_WARNINGS = 20

_Level = tuple[float, float]
_CHUNK = 1 << 18  # bytes read at a time from a recording
RecordingPath = Union[str, "os.PathLike[str]", Any]  # Any: an importlib.resources Traversable


# ---------------------------------------------------------------------------------------------- wire messages
class WireTrade(Event, frozen=True):
    """Binance ``<symbol>@trade`` payload.

    ``{"e":"trade","E":..,"s":..,"t":..,"p":..,"q":..,"T":..,"m":..,"M":..}``
    """

    event_type: Literal["trade"] = field(name="e")
    event_time_ms: int = field(name="E")
    symbol: str = field(name="s")
    trade_id: int = field(name="t")
    price: float = field(name="p")
    qty: float = field(name="q")
    trade_time_ms: int = field(name="T")
    buyer_is_maker: bool = field(name="m")
    best_match: bool = field(name="M", default=True)  # documented by Binance as "ignore"


class WireBookTicker(Event, frozen=True):
    """Binance ``<symbol>@bookTicker`` payload (``{"u":..,"s":..,"b":..,"B":..,"a":..,"A":..}``)."""

    update_id: int = field(name="u")
    symbol: str = field(name="s")
    bid_px: float = field(name="b")
    bid_qty: float = field(name="B")
    ask_px: float = field(name="a")
    ask_qty: float = field(name="A")


class WireDepthUpdate(Event, frozen=True):
    """Binance ``<symbol>@depth[@100ms]`` payload.

    ``{"e":"depthUpdate","E":..,"s":..,"U":..,"u":..,"b":[[px,qty],..],"a":[[px,qty],..]}``
    """

    event_type: Literal["depthUpdate"] = field(name="e")
    event_time_ms: int = field(name="E")
    symbol: str = field(name="s")
    first_update_id: int = field(name="U")
    final_update_id: int = field(name="u")
    bids: tuple[_Level, ...] = field(name="b")
    asks: tuple[_Level, ...] = field(name="a")


class WireDepthSnapshot(Event, frozen=True):
    """Binance REST ``GET /api/v3/depth`` answer (``{"lastUpdateId":..,"bids":[[p,q],..],"asks":[..]}``)."""

    last_update_id: int = field(name="lastUpdateId")
    bids: tuple[_Level, ...]
    asks: tuple[_Level, ...]


class Envelope(msgspec.Struct, frozen=True):
    """Binance combined-stream envelope ``{"stream": name, "data": payload}``; ``data`` is left undecoded.

    Both fields default so that a bare REST snapshot line (no envelope) decodes to ``stream=None``.
    """

    stream: str | None = None
    data: msgspec.Raw = msgspec.Raw()


_ENVELOPE_DECODER = msgspec.json.Decoder(Envelope)
_TRADE_DECODER = msgspec.json.Decoder(WireTrade, strict=False)
_BOOK_TICKER_DECODER = msgspec.json.Decoder(WireBookTicker, strict=False)
_DEPTH_DECODER = msgspec.json.Decoder(WireDepthUpdate, strict=False)
_SNAPSHOT_DECODER = msgspec.json.Decoder(WireDepthSnapshot, strict=False)


# --------------------------------------------------------------------------- wire -> venue-neutral events
def _trade_event(msg: WireTrade, recv_ts_ns: int) -> Trade:
    # m (buyer is maker) means the seller was the taker.
    return Trade(msg.trade_time_ms * 1_000_000, msg.price, msg.qty,
                 Side.SELL if msg.buyer_is_maker else Side.BUY, msg.trade_id, recv_ts_ns, msg.symbol)


def _quote_event(msg: WireBookTicker, recv_ts_ns: int) -> Quote:
    return Quote(msg.update_id, msg.bid_px, msg.bid_qty, msg.ask_px, msg.ask_qty, recv_ts_ns, msg.symbol)


def _depth_event(msg: WireDepthUpdate, recv_ts_ns: int) -> DepthDiff:
    return DepthDiff(msg.first_update_id, msg.final_update_id, msg.bids, msg.asks,
                     msg.event_time_ms * 1_000_000, recv_ts_ns, msg.symbol)


class _Route(msgspec.Struct, frozen=True):
    kind: str
    decoder: msgspec.json.Decoder
    convert: Callable[[Any, int], Any]


# Keyed by what follows "<symbol>@" in the stream name.
_ROUTES = {
    "trade": _Route("trade", _TRADE_DECODER, _trade_event),
    "bookTicker": _Route("bookTicker", _BOOK_TICKER_DECODER, _quote_event),
    "depth": _Route("depthUpdate", _DEPTH_DECODER, _depth_event),
    "depth@100ms": _Route("depthUpdate", _DEPTH_DECODER, _depth_event),
    "depth@1000ms": _Route("depthUpdate", _DEPTH_DECODER, _depth_event),
}


def _printable(value: Any, limit: int = 100) -> str:
    """Return ``value`` (part of a bad line, a stream name, a decoder's message) as a quoted, escaped and
    length-capped literal, safe to print: control characters, escape sequences and undecodable bytes are
    written as backslash escapes, never raw, and at most ``limit`` characters are kept."""
    if isinstance(value, (bytes, bytearray)):
        head = bytes(value[: 4 * limit + 4])
        cut = len(value) > len(head)
        try:
            text = head.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not (cut and exc.start >= len(head) - 3):  # binary, not a character cut in two by the cap
                return repr(head[:limit]) + ("..." if len(value) > limit else "")
            text = head[: exc.start].decode("utf-8")
        cut = cut or len(text) > limit
    elif isinstance(value, str):
        text = value
        cut = len(text) > limit
    else:
        text = repr(value)  # escaped already
        return text[:limit] + ("..." if len(text) > limit else "")
    text = text.rstrip("\r\n")
    return repr(text[:limit]) + ("..." if cut else "")


# ------------------------------------------------------------------------------------------------- parser
class BinanceParser:
    """Parse lines ``<recv_ts_ns> <JSON>`` of Binance spot market data into venue-neutral events.

    The JSON is either a combined-stream envelope ``{"stream": ..., "data": {...}}`` (``@trade``,
    ``@bookTicker``, ``@depth`` / ``@depth@100ms`` / ``@depth@1000ms``) or a bare REST depth snapshot
    ``{"lastUpdateId": ..., "bids": [...], "asks": [...]}``. One parser serves any number of symbols.

    Parameters
    ----------
    symbol : str, optional
        Symbol written into :class:`~kimiha.venues.DepthSnapshot` events (the REST answer does not name it).
        By default the symbol of the latest depth update is used.
    keep_errors : int, default 100
        How many of the latest parse errors :attr:`errors` keeps.

    Attributes
    ----------
    lines : int
        Lines seen (good and bad); error messages number lines by this count, starting at 1.
    counts : collections.Counter
        Lines parsed successfully, by stream name (REST snapshots under :data:`SNAPSHOT`).
    bad_lines : int
        Lines that raised. ``lines == sum(counts.values()) + bad_lines`` always holds.
    errors : collections.deque of SerializationError
        The latest errors.
    """

    __slots__ = ("_depth_symbol", "_routes", "bad_lines", "counts", "errors", "lines", "symbol")

    def __init__(self, *, symbol: str | None = None, keep_errors: int = 100) -> None:
        self.symbol = symbol
        self.lines = 0
        self.counts: collections.Counter[str] = collections.Counter()
        self.bad_lines = 0
        self.errors: collections.deque[SerializationError] = collections.deque(maxlen=keep_errors)
        self._routes: dict[str, _Route] = {}  # full stream name -> route, filled on first sight
        self._depth_symbol = ""

    def parse(self, line: bytes | str) -> MarketEvent:
        """Parse one line into a :class:`~kimiha.venues.Trade`, :class:`~kimiha.venues.Quote`,
        :class:`~kimiha.venues.DepthDiff` or :class:`~kimiha.venues.DepthSnapshot`.

        Parameters
        ----------
        line : bytes or str
            ``<recv_ts_ns> <JSON>``; a trailing newline is allowed.

        Returns
        -------
        Trade, Quote, DepthDiff or DepthSnapshot

        Raises
        ------
        SerializationError
            When the line is not of that form, the JSON is malformed or truncated, the stream is unknown, or
            the payload does not have the fields and types of its stream. The message gives the line number,
            the stream, what was expected (with msgspec's path to the bad field) and the start of the line;
            the error also carries ``line_no`` and ``stream`` attributes. The line is counted in
            :attr:`bad_lines`.
        """
        self.lines += 1
        ts_text: Any
        sep: Any
        body: Any
        if isinstance(line, (bytes, bytearray)):
            ts_text, sep, body = line.partition(b" ")
        elif isinstance(line, str):
            ts_text, sep, body = line.partition(" ")
        else:
            raise self._error(line, None, "a line as bytes or str",
                              f"got {type(line).__name__}")
        try:
            recv_ts_ns = int(ts_text)
        except ValueError:
            raise self._error(line, None, "'<recv_ts_ns> <JSON>' starting with an integer receive timestamp",
                              f"got {_printable(ts_text, 30)} before the first space") from None
        if not sep:
            raise self._error(line, None, "'<recv_ts_ns> <JSON>'", "the line has no JSON part")
        try:
            envelope = _ENVELOPE_DECODER.decode(body)
        except msgspec.DecodeError as exc:  # ValidationError is a DecodeError too
            raise self._error(line, None, "a JSON object (stream envelope or REST depth snapshot)",
                              f"JSON is malformed or truncated: {exc}") from None

        stream = envelope.stream
        if stream is None:
            return self._snapshot(line, body, recv_ts_ns)
        route = self._routes.get(stream)
        if route is None:
            route = self._route(line, stream)
        try:
            message = route.decoder.decode(envelope.data)
        except msgspec.DecodeError as exc:
            detail = "the envelope has no 'data'" if not envelope.data else str(exc)
            raise self._error(line, stream, f"a Binance {route.kind} payload in 'data'", detail) from None
        self.counts[stream] += 1
        if route.decoder is _DEPTH_DECODER:
            self._depth_symbol = message.symbol
        return route.convert(message, recv_ts_ns)

    def _snapshot(self, line: bytes | str, body: bytes | str, recv_ts_ns: int) -> DepthSnapshot:
        try:
            snap = _SNAPSHOT_DECODER.decode(body)
        except msgspec.DecodeError as exc:
            raise self._error(line, None,
                              'a combined-stream envelope {"stream": ..., "data": ...} or a REST depth '
                              'snapshot {"lastUpdateId": ..., "bids": ..., "asks": ...}', str(exc)) from None
        self.counts[SNAPSHOT] += 1
        symbol = self.symbol if self.symbol is not None else self._depth_symbol
        return DepthSnapshot(snap.last_update_id, snap.bids, snap.asks, recv_ts_ns, symbol)

    def _route(self, line: bytes | str, stream: str) -> _Route:
        _, at, kind = stream.partition("@")
        route = _ROUTES.get(kind) if at else None
        if route is None:
            raise self._error(line, stream,
                              "a stream named '<symbol>@trade', '<symbol>@bookTicker' or "
                              "'<symbol>@depth[@100ms|@1000ms]'", "this stream is not supported")
        self._routes[stream] = route
        return route

    def _error(self, line: Any, stream: str | None, expected: str, detail: str) -> SerializationError:
        self.bad_lines += 1
        where = f"line {self.lines}" + (f", stream {_printable(stream, 60)}" if stream else "")
        # a decoder's message may quote a value of the line, of any length and with any character
        detail = "".join(c if c.isprintable() else repr(c)[1:-1] for c in detail[:300]) + (
            "..." if len(detail) > 300 else "")
        err = SerializationError(
            f"Binance feed {where}: expected {expected}; {detail}; the line starts {_printable(line)}")
        err.line_no = self.lines  # type: ignore[attr-defined]
        err.stream = stream  # type: ignore[attr-defined]
        self.errors.append(err)
        return err

    def reset_counters(self) -> None:
        """Zero :attr:`lines`, :attr:`counts` and :attr:`bad_lines` and forget :attr:`errors`."""
        self.lines = 0
        self.counts.clear()
        self.bad_lines = 0
        self.errors.clear()

    def __repr__(self) -> str:
        return f"BinanceParser(lines={self.lines}, bad_lines={self.bad_lines}, counts={dict(self.counts)})"


def parse_lines(lines: Iterable[bytes | str], parser: BinanceParser | None = None, *,
                on_error: Callable[[SerializationError], None] | None = None) -> Iterator[MarketEvent]:
    """Parse lines, skipping the bad ones, and yield the events.

    Parameters
    ----------
    lines : iterable of bytes or str
        Lines ``<recv_ts_ns> <JSON>``.
    parser : BinanceParser, optional
        Parser to use (and whose counters to update); a new one by default.
    on_error : callable, optional
        Called with each :class:`~kimiha.error.SerializationError`. By default bad lines are logged as
        warnings by :func:`log_bad_line` (rate-limited), and once the lines are exhausted one more warning
        says how many were not shown. Either way the line is counted in ``parser.bad_lines`` and parsing
        continues.
    """
    parser = parser if parser is not None else BinanceParser()
    parse = parser.parse
    bad_before = parser.bad_lines
    for line in lines:
        try:
            event = parse(line)
        except SerializationError as exc:
            if on_error is not None:
                on_error(exc)
            else:
                log_bad_line(logger, parser.bad_lines - bad_before, exc)
            continue
        yield event
    bad = parser.bad_lines - bad_before
    if on_error is None and bad > BAD_LINE_WARNINGS:
        logger.warning("%d more bad line(s) were skipped and not shown (%d in all)", bad - BAD_LINE_WARNINGS, bad)


def log_bad_line(log: logging.Logger, bad: int, exc: SerializationError, who: str = "") -> None:
    """Log the ``bad``-th bad line of a feed, rate-limited: each of the first :data:`BAD_LINE_WARNINGS` with
    its error (the last of them says that further ones are not shown), then a count every 1000 bad lines.

    Parameters
    ----------
    log : logging.Logger
        Where to log (as warnings).
    bad : int
        How many bad lines the feed has had, this one included.
    exc : SerializationError
        This line's error (its message quotes the line escaped and capped, never raw).
    who : str, optional
        Name of the component, put in front of each message.
    """
    prefix = f"{who}: " if who else ""
    if bad < BAD_LINE_WARNINGS:
        log.warning("%sskipped a bad line (%d so far): %s", prefix, bad, str(exc))
    elif bad == BAD_LINE_WARNINGS:
        log.warning("%sskipped a bad line (%d so far; further ones are counted, not shown): %s", prefix, bad,
                    str(exc))
    elif bad % 1000 == 0:
        log.warning("%s%d bad lines skipped so far (%d not shown)", prefix, bad, bad - BAD_LINE_WARNINGS)


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
    if hasattr(path, "open") and not isinstance(path, (str, bytes)):
        raw = path.open("rb")
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


def iter_lines(paths: RecordingPath | Iterable[RecordingPath]) -> Iterator[bytes]:
    """Yield the lines of one or more recordings in order, as bytes without the line ending.

    Blank lines are skipped (they carry no message).

    Parameters
    ----------
    paths : path or iterable of paths
        Recording files, gzipped or plain; several files are read one after the other as one stream.

    Raises
    ------
    SerializationError
        When compressed data is truncated or corrupt (a recorder that crashed mid-write); the lines before
        the damage have been yielded, and the message names the file and how many lines it gave.
    """
    for path in _as_path_list(paths):
        with open_recording(path) as f:
            # Splitting large chunks is about a third faster than iterating the (gzip) file line by line.
            tail = b""
            given = 0
            while True:
                try:
                    chunk = f.read(_CHUNK)
                except (EOFError, OSError, zlib.error) as exc:  # BadGzipFile is an OSError
                    raise SerializationError(
                        f"recording {str(path)!r}: expected complete gzip data, but it is truncated or "
                        f"corrupt after {given} line(s): {exc}") from exc
                if not chunk:
                    break
                lines = (tail + chunk).split(b"\n") if tail else chunk.split(b"\n")
                tail = lines.pop()
                given += len(lines)
                for line in lines:
                    if line.endswith(b"\r"):
                        line = line[:-1]
                    if line and not line.isspace():
                        yield line
            if tail.endswith(b"\r"):
                tail = tail[:-1]
            if tail and not tail.isspace():
                yield tail


def _recv_ts(line: bytes) -> int | None:
    head = line[:24].partition(b" ")[0]
    try:
        return int(head)
    except ValueError:
        return None


async def replay_lines(paths: RecordingPath | Iterable[RecordingPath], speed: float | None = None, *,
                       yield_every: int = 256, clock: Callable[[], float] = time.monotonic,
                       sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> AsyncIterator[bytes]:
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
    paced = speed is not None
    ns_per_second = 1e9 * float(speed) if speed is not None else 0.0
    start_ts: int | None = None
    start_clock = 0.0
    since_pause = 0
    for line in iter_lines(paths):
        if paced:
            ts = _recv_ts(line)
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
                          parser: BinanceParser | None = None) -> collections.Counter[str]:
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

    Returns
    -------
    collections.Counter
        Lines by stream name; REST snapshots under :data:`SNAPSHOT`, bad lines under :data:`BAD_LINE` (only
        when there are some).

    Raises
    ------
    SerializationError
        When compressed data is truncated or corrupt (see :func:`iter_lines`).
    """
    parser = parser if parser is not None else BinanceParser()
    bad_before, counts_before = parser.bad_lines, collections.Counter(parser.counts)
    parse = parser.parse
    for line in iter_lines(path):
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
                 keep_gap_errors: int = 10) -> BookReplayReport:
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

    Returns
    -------
    BookReplayReport
    """
    paths = recorded_tape() if paths is None else paths
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
    for line in iter_lines(paths):
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
