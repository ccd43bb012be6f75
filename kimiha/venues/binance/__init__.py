"""Binance spot: the wire format (``wire``), recordings and the shipped tape (``recording``), and the
connector and aggregator tasks (``tasks``) that bring Binance data onto a kimiha bus.

The names of the 0.1 module ``kimiha.venues.binance`` import from here as before.
"""

from kimiha.venues.binance.recording import (
    MAX_LINE_BYTES,
    LineTooLongError,
    BookReplayReport,
    RecordingPath,
    count_lines_by_stream,
    iter_lines,
    open_recording,
    rebuild_book,
    recorded_tape,
    replay_lines,
)
from kimiha.venues.binance.tasks import BinanceAggregator, BinanceConnector
from kimiha.venues.binance.wire import (
    BAD_LINE,
    BAD_LINE_WARNINGS,
    SNAPSHOT,
    BinanceParser,
    Envelope,
    WireBookTicker,
    WireDepthSnapshot,
    WireDepthUpdate,
    WireTrade,
    log_bad_line,
    parse_lines,
)

__all__ = [
    "MAX_LINE_BYTES",
    "LineTooLongError",
    "BinanceAggregator",
    "BinanceConnector",
    "BAD_LINE",
    "BAD_LINE_WARNINGS",
    "BinanceParser",
    "BookReplayReport",
    "Envelope",
    "RecordingPath",
    "SNAPSHOT",
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
