"""The Binance spot trading pipeline as kimiha tasks: connector, aggregator, strategy, paper executor.

Channels (see :func:`trading_channels`), all ``BLOCK`` so a replay as fast as possible loses nothing:

``RawMarketData``  connector -> aggregator       :class:`RawMessage` (one wire line, untouched)
``MarketData``     aggregator -> strategies, executors   Trade | Quote | DepthSnapshot | DepthDiff | BookUpdate
``Signals``        strategies -> anyone          Signal
``Orders``         strategies -> executors       Order
``Fills``          executors -> strategies       Fill

The components only talk through the bus, so the same classes run in one process or split across several.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
from collections.abc import AsyncIterator
from typing import Any

from kimiha.book import BookCheck, BookGap, BookNotReady, OrderBook
from kimiha.channel_config import ChannelConfig, Overflow
from kimiha.error import SerializationError
from kimiha.event_bus import EventBus
from kimiha.paper import OrderRejected, PaperExecutor
from kimiha.strategy_logic import ImbalanceStrategy
from kimiha.types import Aggregator, Connector, Event, EventType, Executor, Strategy
from kimiha.venues import BookUpdate, DepthDiff, DepthSnapshot, Fill, Order, Quote, Signal, Trade
from kimiha.venues.binance import BinanceParser, log_bad_line

__all__ = [
    "TradingEvent",
    "RawMessage",
    "MarketData",
    "trading_channels",
    "BinanceConnector",
    "BinanceAggregator",
    "ImbalanceStrategyTask",
    "PaperExecutorTask",
]

logger = logging.getLogger("kimiha.pipeline")


class TradingEvent(EventType):
    RAW_MARKET_DATA = "RawMarketData"
    MARKET_DATA = "MarketData"
    SIGNALS = "Signals"
    ORDERS = "Orders"
    FILLS = "Fills"


class RawMessage(Event, frozen=True, gc=False):
    """One line as the venue sent it (``<recv_ts_ns> <JSON>`` for the recorded Binance streams)."""

    line: bytes


MarketData = Trade | Quote | DepthSnapshot | DepthDiff | BookUpdate


def trading_channels(capacity: int = 4096) -> list[tuple[TradingEvent, ChannelConfig]]:
    """Return the pipeline's channels, every one ``Overflow.BLOCK`` (nothing is lost at any replay speed)."""
    block = Overflow.BLOCK
    return [
        (TradingEvent.RAW_MARKET_DATA,
         ChannelConfig(capacity, "venue wire lines", overflow=block, payload_type=RawMessage)),
        (TradingEvent.MARKET_DATA,
         ChannelConfig(capacity, "normalized market data", overflow=block, payload_type=MarketData)),
        (TradingEvent.SIGNALS, ChannelConfig(capacity, "strategy signals", overflow=block, payload_type=Signal)),
        (TradingEvent.ORDERS, ChannelConfig(capacity, "orders", overflow=block, payload_type=Order)),
        (TradingEvent.FILLS, ChannelConfig(capacity, "fills", overflow=block, payload_type=Fill)),
    ]


class BinanceConnector(Connector):
    """Publishes every line of an async line source (a replay, or a live websocket) as a :class:`RawMessage`.

    Each ``execute()`` forwards up to ``chunk`` lines, waiting for room (``publish_async``) so a fast source
    never outruns the pipeline. When the source ends, ``finished`` is set and the connector idles until
    shutdown.
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
        self.finished = asyncio.Event()

    async def execute(self) -> None:
        if self.finished.is_set():
            await asyncio.Event().wait()  # nothing left: idle until shutdown cancels us
        publish = self._channel.publish_async
        source = self._source
        for _ in range(self._chunk):
            try:
                line = await source.__anext__()
            except StopAsyncIteration:
                self.finished.set()
                return
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
            log_bad_line(logger, self.parser.bad_lines, exc, self.name)
            return
        publish = self._md.publish_async
        if type(message) is Quote:
            self.check.on_quote(message)
            await publish(message)
        elif type(message) is Trade:
            await publish(message)
        elif type(message) is DepthDiff:
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
            logger.error("%s: %s -- book out of sync until the next snapshot", self.name, str(gap))


class ImbalanceStrategyTask(Strategy):
    """Runs :class:`~kimiha.strategy_logic.ImbalanceStrategy` on quotes; publishes signals and orders."""

    def __init__(self, bus: EventBus, *, name: str = "imbalance-strategy", **params: Any) -> None:
        self.name = name
        self.logic = ImbalanceStrategy(**params)
        self.fills = 0
        self._signals = bus.channel(TradingEvent.SIGNALS)
        self._orders = bus.channel(TradingEvent.ORDERS)

    def subscribed_event(self) -> tuple[TradingEvent, TradingEvent]:
        return (TradingEvent.MARKET_DATA, TradingEvent.FILLS)

    async def handle_event(self, event: Any) -> None:
        kind = type(event)
        if kind is Quote:
            out = self.logic.on_quote(event)
            if out:
                await self._signals.publish_async(out[0])
                if len(out) > 1:
                    await self._orders.publish_async(out[1])
        elif kind is Fill:
            self.fills += 1
            self.logic.on_fill(event)
        elif kind is Trade:
            self.logic.on_trade(event)


class PaperExecutorTask(Executor):
    """Fills orders against a replica of the book, as of the update id each order was decided on.

    The replica is rebuilt from the aggregator's snapshot and diffs. Diffs are applied only up to the newest
    order's ``ref_update_id``, and an order waits until market data up to its reference has arrived, so the
    fills are the same whatever the relative speed of the market-data and order paths (one process or
    several). ``max_pending`` bounds the diffs held back when no order comes (about 3 minutes of Binance's
    100 ms diffs by default, so memory stays flat); past it the oldest are applied (``forced_applies``), and an
    order that refers to an older update id is filled against the newer book.
    """

    def __init__(self, bus: EventBus, *, name: str = "paper-executor", fee_bps: float = 10.0,
                 max_pending: int = 2048) -> None:
        self.name = name
        self.book = OrderBook(raise_on_gap=False)
        self.paper = PaperExecutor(self.book, fee_bps=fee_bps)
        self.rejected = 0
        self.forced_applies = 0
        self.market_position = -1  # newest update id seen on the market-data channel
        self.last_mid: float | None = None
        self._watermark = 0  # newest order reference: diffs up to it may be applied
        self._diffs: collections.deque[DepthDiff] = collections.deque()
        self._orders: collections.deque[Order] = collections.deque()
        self._max_pending = max_pending
        self._fills = bus.channel(TradingEvent.FILLS)

    def subscribed_event(self) -> tuple[TradingEvent, TradingEvent]:
        return (TradingEvent.MARKET_DATA, TradingEvent.ORDERS)

    async def handle_event(self, event: Any) -> None:
        kind = type(event)
        if kind is Order:
            self._orders.append(event)
        elif kind is DepthDiff:
            self._diffs.append(event)
            self.market_position = max(self.market_position, event.final_update_id)
            if len(self._diffs) > self._max_pending:
                self.forced_applies += 1
                self._apply(self._diffs.popleft())
        elif kind is Quote:
            self.market_position = max(self.market_position, event.update_id)
            self.last_mid = event.mid
        elif kind is DepthSnapshot:
            self.book.apply_snapshot(event)
            self.market_position = max(self.market_position, event.last_update_id)
        else:
            return
        await self._release()

    def _apply(self, diff: DepthDiff) -> None:
        try:
            self.book.apply_diff(diff)
        except (BookGap, BookNotReady) as exc:  # the aggregator reports gaps; keep the replica going
            logger.debug("%s: replica book: %s", self.name, exc)

    def _apply_upto(self, update_id: int) -> None:
        diffs = self._diffs
        while diffs and diffs[0].final_update_id <= update_id:
            self._apply(diffs.popleft())

    async def _release(self) -> None:
        orders = self._orders
        while orders and orders[0].ref_update_id <= self.market_position:
            order = orders.popleft()
            self._watermark = max(self._watermark, order.ref_update_id)
            self._apply_upto(self._watermark)
            try:
                fill = self.paper.execute(order)
            except (OrderRejected, BookNotReady) as exc:
                self.rejected += 1
                if self.rejected <= 5:
                    logger.warning("%s: order %s rejected: %s", self.name, order.order_id, str(exc))
                # Always answer: an execution report with nothing filled releases the strategy's in-flight
                # quantity (otherwise its position limit would stay taken by an order that will never fill).
                fill = Fill(order.order_id, order.side, 0.0, math.nan, 0.0, order.ts_ns,
                            requested_qty=order.qty, symbol=order.symbol)
            await self._fills.publish_async(fill)

    async def shutdown(self) -> None:
        if self._orders:
            logger.warning("%s: %d order(s) never saw their market data; not filled", self.name, len(self._orders))
