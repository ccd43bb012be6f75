"""The trading pipeline's channels and its venue-neutral tasks: the strategy and the paper executor.

Channels (see :func:`trading_channels`), all ``BLOCK`` so a replay as fast as possible loses nothing:

``RawMarketData``  connector -> aggregator       :class:`RawMessage` (one wire line, untouched)
``MarketData``     aggregator -> strategies, executors   Trade | Quote | DepthSnapshot | DepthDiff | BookUpdate
``Signals``        strategies -> anyone          Signal
``Orders``         strategies -> executors       Order
``Fills``          executors -> strategies       Fill

A venue adapter (``kimiha.venues.binance.tasks``) brings the connector and the aggregator that fill the first
two channels. The components only talk through the bus, so the same classes run in one process or split
across several.
"""

from __future__ import annotations

import collections
import logging
import math
from typing import Any

from kimiha.channel_config import ChannelConfig, Overflow
from kimiha.event_bus import EventBus
from kimiha.trading.book import BookGap, BookNotReady, OrderBook
from kimiha.trading.model import BookUpdate, DepthDiff, DepthSnapshot, Fill, Order, Quote, Signal, Trade
from kimiha.trading.paper import OrderRejected, PaperExecutor
from kimiha.trading.strategy import ImbalanceStrategy
from kimiha.types import Event, EventType, Executor, Strategy

__all__ = [
    "TradingEvent",
    "RawMessage",
    "MarketData",
    "trading_channels",
    "ImbalanceStrategyTask",
    "PaperExecutorTask",
]

logger = logging.getLogger(__name__)


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
            if not self.book.has_plausible_ids(event):
                # The replica refuses it as the aggregator's book did (and leaves live); held back, it would
                # block the queue for good and move the watermark by whatever the corrupted id says.
                self._apply(event)
                return
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
