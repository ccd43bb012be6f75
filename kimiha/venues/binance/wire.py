"""Binance spot wire format: the combined-stream messages, a typed line parser, bad-line accounting.

* wire Structs for the combined-stream messages (``trade``, ``bookTicker``, ``depthUpdate``) and the REST
  depth snapshot, decoded by ``msgspec`` with decoders built once;
* :class:`BinanceParser`, which turns one recorded or received line ``<recv_ts_ns> <JSON>`` into a
  venue-neutral event (:class:`~kimiha.trading.model.Trade`, :class:`~kimiha.trading.model.Quote`,
  :class:`~kimiha.trading.model.DepthDiff`, :class:`~kimiha.trading.model.DepthSnapshot`), counts lines per
  stream and reports bad lines with :class:`~kimiha.error.SerializationError`.

Decimal strings are decoded straight into floats by ``msgspec`` (``strict=False`` lets a JSON string fill a
``float`` field): it is faster than ``float()`` on each value and gives the same float for the same string.

What a price or a quantity may be is checked by the same decoders, with ``msgspec.Meta`` constraints on the
fields (C code, once per value, while decoding; no second pass). Every value must be a finite number; the
``strict=False`` conversion would otherwise turn ``"NaN"``, ``"inf"`` or ``"-Infinity"`` into floats:

=================================  ===========  ====================================================
message                            price        quantity
=================================  ===========  ====================================================
``trade``                          > 0          > 0 (a trade of nothing did not happen)
``bookTicker`` (best bid and ask)  > 0          > 0 (the best level exists, so it holds something)
``depthUpdate`` levels             > 0          >= 0 (0 removes the level)
REST depth snapshot levels         > 0          > 0 (a snapshot lists the levels that exist)
=================================  ===========  ====================================================

A line breaking one of these is a bad line like any other (see :meth:`BinanceParser.parse`); the message
names the field, its JSON path and the value. ``-0.0`` counts as zero.
"""

from __future__ import annotations

import collections
import logging
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, Literal, get_args

import msgspec
from msgspec import field

from kimiha.error import SerializationError
from kimiha.trading.model import DepthDiff, DepthSnapshot, MarketEvent, Quote, Side, Trade
from kimiha.types import Event

__all__ = [
    "BAD_LINE",
    "BAD_LINE_WARNINGS",
    "SNAPSHOT",
    "BinanceParser",
    "Envelope",
    "WireBookTicker",
    "WireDepthSnapshot",
    "WireDepthUpdate",
    "WireTrade",
    "log_bad_line",
    "parse_lines",
]

logger = logging.getLogger(__name__)

#: Counter key of REST depth snapshot lines (they carry no stream name).
SNAPSHOT = "snapshot"
#: Counter key of bad lines (lines :meth:`BinanceParser.parse` rejects), in :func:`count_lines_by_stream`.
BAD_LINE = "bad"
#: How many bad lines are logged one by one before the rest are only counted (the count is reported at the end).
BAD_LINE_WARNINGS = 20

# Constraints checked by msgspec while decoding: ``gt`` / ``ge`` also reject NaN (it compares false), ``le``
# the infinities. The description is what a bad-line message says the value must be.
_FINITE_MAX = sys.float_info.max
_Price = Annotated[float, msgspec.Meta(gt=0.0, le=_FINITE_MAX, description="a finite number > 0")]
_Quantity = Annotated[float, msgspec.Meta(gt=0.0, le=_FINITE_MAX, description="a finite number > 0")]
_DiffQuantity = Annotated[float, msgspec.Meta(ge=0.0, le=_FINITE_MAX,
                                              description="a finite number >= 0 (0 removes the level)")]
_Level = tuple[_Price, _Quantity]
_DiffLevel = tuple[_Price, _DiffQuantity]


# ---------------------------------------------------------------------------------------------- wire messages
class WireTrade(Event, frozen=True):
    """Binance ``<symbol>@trade`` payload.

    ``{"e":"trade","E":..,"s":..,"t":..,"p":..,"q":..,"T":..,"m":..,"M":..}``
    """

    event_type: Literal["trade"] = field(name="e")
    event_time_ms: int = field(name="E")
    symbol: str = field(name="s")
    trade_id: int = field(name="t")
    price: _Price = field(name="p")
    qty: _Quantity = field(name="q")
    trade_time_ms: int = field(name="T")
    buyer_is_maker: bool = field(name="m")
    best_match: bool = field(name="M", default=True)  # documented by Binance as "ignore"


class WireBookTicker(Event, frozen=True):
    """Binance ``<symbol>@bookTicker`` payload (``{"u":..,"s":..,"b":..,"B":..,"a":..,"A":..}``)."""

    update_id: int = field(name="u")
    symbol: str = field(name="s")
    bid_px: _Price = field(name="b")
    bid_qty: _Quantity = field(name="B")
    ask_px: _Price = field(name="a")
    ask_qty: _Quantity = field(name="A")


class WireDepthUpdate(Event, frozen=True):
    """Binance ``<symbol>@depth[@100ms]`` payload.

    ``{"e":"depthUpdate","E":..,"s":..,"U":..,"u":..,"b":[[px,qty],..],"a":[[px,qty],..]}``
    """

    event_type: Literal["depthUpdate"] = field(name="e")
    event_time_ms: int = field(name="E")
    symbol: str = field(name="s")
    first_update_id: int = field(name="U")
    final_update_id: int = field(name="u")
    bids: tuple[_DiffLevel, ...] = field(name="b")
    asks: tuple[_DiffLevel, ...] = field(name="a")


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
    struct: type[msgspec.Struct]  # what the decoder decodes
    decoder: msgspec.json.Decoder[Any]
    convert: Callable[[Any, int], MarketEvent]


# Keyed by what follows "<symbol>@" in the stream name.
_ROUTES = {
    "trade": _Route("trade", WireTrade, _TRADE_DECODER, _trade_event),
    "bookTicker": _Route("bookTicker", WireBookTicker, _BOOK_TICKER_DECODER, _quote_event),
    "depth": _Route("depthUpdate", WireDepthUpdate, _DEPTH_DECODER, _depth_event),
    "depth@100ms": _Route("depthUpdate", WireDepthUpdate, _DEPTH_DECODER, _depth_event),
    "depth@1000ms": _Route("depthUpdate", WireDepthUpdate, _DEPTH_DECODER, _depth_event),
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


# msgspec's message for a value breaking its field's constraint, e.g. "Expected `float` > 0.0 - at `$.p`"
_CONSTRAINT_BROKEN = re.compile(r"Expected `float` [<>]=? \S+ - at `(\$[^`]*)`")
_PATH_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def _out_of_range(cls: type[msgspec.Struct], raw: bytes | str | msgspec.Raw,
                  exc: msgspec.ValidationError) -> str | None:
    """Explain a price or quantity that broke its constraint (see the module's table): the field, its JSON
    path, what it must be and the value that arrived. None when ``exc`` is about something else.

    Only called for a bad line, so it may decode the payload again (generically) to find the value."""
    match = _CONSTRAINT_BROKEN.fullmatch(str(exc))
    if match is None:
        return None
    path = match.group(1)
    steps = _PATH_STEP.findall(path[1:])
    try:
        info = next(f for f in msgspec.structs.fields(cls) if f.encode_name == steps[0][0])
        value: Any = msgspec.json.decode(raw)
        for key, index in steps:
            value = value[key] if key else value[int(index)]
    except (StopIteration, IndexError, KeyError, TypeError, ValueError, msgspec.DecodeError):
        return None
    name, kind = info.name, info.type
    if len(steps) == 3:  # a book level: [price, quantity]
        position = int(steps[2][1])
        name = f"{name}[{steps[1][1]}] {('price', 'quantity')[position]}"
        kind = get_args(get_args(kind)[0])[position]  # tuple[tuple[price, quantity], ...]
    metas = [m for m in get_args(kind)[1:] if isinstance(m, msgspec.Meta)]
    must = metas[0].description if metas and metas[0].description else "in range"
    return f"{name} `{path}` must be {must}, got {_printable(value, 40)}"


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
            When the line is not of that form, the JSON is malformed or truncated, the stream is unknown, the
            payload does not have the fields and types of its stream, or a price or quantity is not a finite
            number in its range (see the module's table). The message gives the line number,
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
        except msgspec.ValidationError as exc:
            detail = _out_of_range(route.struct, envelope.data, exc) or str(exc)
            raise self._error(line, stream, f"a Binance {route.kind} payload in 'data'", detail) from None
        except msgspec.DecodeError as exc:
            detail = "the envelope has no 'data'" if not envelope.data else str(exc)
            raise self._error(line, stream, f"a Binance {route.kind} payload in 'data'", detail) from None
        if route.decoder is _DEPTH_DECODER:
            if message.first_update_id > message.final_update_id or not stream.startswith(message.symbol.lower()):
                raise self._error(line, stream, f"a Binance {route.kind} payload in 'data'",
                                  f"U <= u and the stream's own symbol, got U={message.first_update_id} "
                                  f"u={message.final_update_id} s={_printable(message.symbol)}") from None
            self._depth_symbol = message.symbol
        self.counts[stream] += 1
        return route.convert(message, recv_ts_ns)

    def _snapshot(self, line: bytes | str, body: bytes | str, recv_ts_ns: int) -> DepthSnapshot:
        try:
            snap = _SNAPSHOT_DECODER.decode(body)
        except msgspec.ValidationError as exc:
            detail = _out_of_range(WireDepthSnapshot, body, exc)
            if detail is not None:  # a snapshot, with a price or quantity out of range
                raise self._error(line, None, "a Binance REST depth snapshot", detail) from None
            raise self._error(line, None,
                              'a combined-stream envelope {"stream": ..., "data": ...} or a REST depth '
                              'snapshot {"lastUpdateId": ..., "bids": ..., "asks": ...}', str(exc)) from None
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


def log_bad_line(log: logging.Logger, bad: int, exc: SerializationError, who: str = "",
                 extra: dict[str, Any] | None = None) -> None:
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
    extra : dict, optional
        The records' structured fields (:func:`kimiha.logs.fields`: the task and the channel it read).
    """
    prefix = f"{who}: " if who else ""
    if bad < BAD_LINE_WARNINGS:
        log.warning("%sskipped a bad line (%d so far): %s", prefix, bad, str(exc), extra=extra)
    elif bad == BAD_LINE_WARNINGS:
        log.warning("%sskipped a bad line (%d so far; further ones are counted, not shown): %s", prefix, bad,
                    str(exc), extra=extra)
    elif bad % 1000 == 0:
        log.warning("%s%d bad lines skipped so far (%d not shown)", prefix, bad, bad - BAD_LINE_WARNINGS,
                    extra=extra)
