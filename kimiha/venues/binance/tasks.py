"""The Binance tasks of the trading pipeline: the connector (wire lines onto ``RawMarketData``) and the
aggregator (typed decode, the L2 book, the book check, normalized events onto ``MarketData``).

The channels and the venue-neutral strategy and executor tasks are in :mod:`kimiha.trading.tasks`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from kimiha.clock import SimClock
from kimiha.error import InvalidStateError, SerializationError
from kimiha.event_bus import EventBus
from kimiha.logs import fields
from kimiha.trading.book import BookCheck, BookGap, OrderBook
from kimiha.trading.model import DepthDiff, Quote, Trade
from kimiha.trading.tasks import RawMessage, TradingEvent
from kimiha.types import Aggregator, Connector
from kimiha.venues.binance.recording import recv_ts_of
from kimiha.venues.binance.wire import BinanceParser, log_bad_line

__all__ = [
    "BinanceConnector",
    "BinanceAggregator",
]

logger = logging.getLogger(__name__)


class BinanceConnector(Connector):
    """Publishes every line of an async line source (a replay, or a live websocket) as a :class:`RawMessage`.

    Each ``execute()`` forwards up to ``chunk`` lines, waiting for room (``publish_async``) so a fast source
    never outruns the pipeline (``taken`` counts the lines taken from the source, ``lines`` those published).
    When the source ends, ``finished`` is set and the connector idles until
    shutdown. Under a :class:`~kimiha.clock.SimClock` it sets its clock to each line's recorded receive time
    before publishing the line (firing its own timers due by then first).
    """

    def __init__(self, bus: EventBus, source: AsyncIterator[bytes], *, chunk: int = 256,
                 name: str = "binance-connector") -> None:
        if not hasattr(source, "__anext__"):
            raise TypeError(f"BinanceConnector: source must be an async iterator of lines, got {source!r}")
        self.name = name
        self._source = source
        self._channel = bus.channel(TradingEvent.RAW_MARKET_DATA)
        self._chunk = chunk
        self.lines = 0
        self.taken = 0
        self.finished = asyncio.Event()

    async def execute(self) -> None:
        if self.finished.is_set():
            await asyncio.Event().wait()  # nothing left: idle until shutdown cancels us
        publish = self._channel.publish_async
        source = self._source
        try:
            clock = self.clock
        except InvalidStateError:  # run by hand, outside a scheduler
            clock = None
        sim = clock if isinstance(clock, SimClock) else None
        for _ in range(self._chunk):
            try:
                line = await source.__anext__()
            except StopAsyncIteration:
                self.finished.set()
                return
            self.taken += 1  # (``taken - lines``: taken, not published: a stop cancelled the publish)
            if sim is not None and (ts := recv_ts_of(line)) is not None and not sim.set_time(ts):
                await sim.advance_to(ts)
            await publish(RawMessage(line))
            self.lines += 1

    async def shutdown(self) -> None:
        closer = getattr(self._source, "aclose", None)
        if closer is not None:
            await closer()


class BinanceAggregator(Aggregator):
    """Decodes wire lines with typed msgspec Structs, rebuilds the L2 book, publishes normalized events.

    Per line: a trade becomes a :class:`Trade`; a bookTicker a :class:`Quote` (checked against the rebuilt
    book at every common update id); a depth diff is applied to the book (Binance's snapshot + diff rules)
    and published with the resulting :class:`BookUpdate`; the REST snapshot (re)starts the book. A corrupt
    line is counted and skipped; a sequence gap is counted, logged loudly and the book waits for a snapshot.
    """

    def __init__(self, bus: EventBus, *, name: str = "binance-aggregator", symbol: str | None = None) -> None:
        self.name = name
        self.parser = BinanceParser(symbol=symbol)
        self.book = OrderBook(symbol or "", raise_on_gap=True)
        self.check = BookCheck()
        self.gaps = 0
        self.gap_errors: list[str] = []
        self.published = 0
        self._md = bus.channel(TradingEvent.MARKET_DATA)

    def subscribed_event(self) -> TradingEvent:
        return TradingEvent.RAW_MARKET_DATA

    async def handle_event(self, raw: RawMessage) -> None:
        try:
            message = self.parser.parse(raw.line)
        except SerializationError as exc:
            log_bad_line(logger, self.parser.bad_lines, exc, self.name,
                         fields(self.name, TradingEvent.RAW_MARKET_DATA))
            return
        publish = self._md.publish_async
        # isinstance, not type(...) is: as fast here, and it narrows the union for the type checker
        if isinstance(message, Quote):
            self.check.on_quote(message)
            await publish(message)
        elif isinstance(message, Trade):
            await publish(message)
        elif isinstance(message, DepthDiff):
            # Replicas downstream apply the same rules, so they get every diff, buffered or stale ones too.
            await publish(message)
            try:
                update = self.book.apply_diff(message)
            except BookGap as gap:
                self._gap(gap)
                return
            if update is not None:
                self.check.on_update(update)
                await publish(update)
        else:  # DepthSnapshot
            await publish(message)
            try:
                updates = self.book.apply_snapshot(message)
            except BookGap as gap:  # the diffs buffered before it do not line up with it
                self._gap(gap)
                return
            for update in updates:
                self.check.on_update(update)
                await publish(update)
        self.published += 1

    def _gap(self, gap: BookGap) -> None:
        self.gaps += 1
        if len(self.gap_errors) < 20:
            self.gap_errors.append(str(gap))
        if self.gaps <= 20:  # text only: a log record holding the exception would keep its frames alive
            logger.error("%s: %s -- book out of sync until the next snapshot", self.name, str(gap),
                         extra=fields(self.name, TradingEvent.MARKET_DATA))
