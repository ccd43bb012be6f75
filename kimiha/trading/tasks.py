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
import hashlib
import logging
import math
from typing import Any

import msgspec

from kimiha.channel_config import ChannelConfig, Overflow
from kimiha.clock import TimeEvent
from kimiha.event_bus import EventBus
from kimiha.trading.book import BookGap, BookNotReady, OrderBook
from kimiha.trading.model import BookUpdate, DepthDiff, DepthSnapshot, Fill, Order, Quote, Signal, Trade
from kimiha.trading.paper import LatencyModel, OrderRejected, PaperExecutor, as_latency_model
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
    """Runs :class:`~kimiha.trading.strategy.ImbalanceStrategy` on quotes; publishes signals and orders.

    The cooldown between orders is a clock alert (``cooldown_by_timer``, the default here): each order sets
    ``self.clock.set_time_alert("cooldown", order.ts_ns + cooldown_ns, ...)`` and signals are not traded until
    it fires. Under a :class:`~kimiha.clock.SimClock` the task's clock follows the market data it handles, so
    the alert fires before the first event at or after the deadline, in every topology; under a
    :class:`~kimiha.clock.LiveClock`, at that wall-clock time.
    """

    def __init__(self, bus: EventBus, *, name: str = "imbalance-strategy", **params: Any) -> None:
        self.name = name
        params.setdefault("cooldown_by_timer", True)
        self.logic = ImbalanceStrategy(**params)
        self.fills = 0
        #: Cooldown alerts that fired (each ended a cooldown).
        self.cooldowns_ended = 0
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
                    order = out[1]
                    if self.logic.cooling_down:
                        self.clock.set_time_alert("cooldown", order.ts_ns + self.logic.cooldown_ns,
                                                  self._cooldown_over)
                    await self._orders.publish_async(order)
        elif kind is Fill:
            self.fills += 1
            self.logic.on_fill(event)
        elif kind is Trade:
            self.logic.on_trade(event)


    def _cooldown_over(self, event: TimeEvent) -> None:
        self.cooldowns_ended += 1
        self.logic.end_cooldown()


class PaperExecutorTask(Executor):
    """Fills orders against a replica of the book, as of the update id each order was decided on, or as of
    its arrival at the simulated venue when a latency model is given.

    The replica is rebuilt from the aggregator's snapshot and diffs. Diffs are applied only up to the newest
    order's ``ref_update_id``, and an order waits until market data up to its reference has arrived, so the
    fills are the same whatever the relative speed of the market-data and order paths (one process or
    several). ``max_pending`` bounds the diffs held back when no order comes (about 3 minutes of Binance's
    100 ms diffs by default, so memory stays flat); past it the oldest are applied (``forced_applies``), and an
    order that refers to an older update id is filled against the newer book.

    With ``latency`` (nanoseconds, or a :class:`~kimiha.trading.paper.LatencyModel`) an order reaches the venue
    at ``order.ts_ns + latency``: it waits until market data received after that time has arrived, then
    fills against the replica with every diff received up to its arrival applied (and at least those up to
    its reference id); the fill is stamped with the arrival time. ``latency=None`` or ``0``: as of the
    reference id, stamped with the order's time.

    GTC limit orders (``Order(..., OrderType.LIMIT, price, time_in_force=TimeInForce.GTC,
    cancel_after_ns=...)``) rest at the paper venue with a queue position (the model is in
    :mod:`kimiha.trading.paper`): the replica's diffs and the public trades are played to them in receive-time
    order as far as the newest released order's time (the same watermark as the book's), so their maker fills,
    partial fills and expiries are reported in the same order in every topology.

    ``digest`` is a sha256 over every order received and every fill sent, in order (see :attr:`digest`);
    ``publish_fills=False`` makes a shadow executor that fills and accounts without publishing (the demo's
    PnL at several latencies).
    """

    def __init__(self, bus: EventBus, *, name: str = "paper-executor", fee_bps: float = 10.0,
                 max_pending: int = 2048, latency: int | LatencyModel | None = None,
                 publish_fills: bool = True, maker_fee_bps: float | None = None) -> None:
        self.name = name
        self.book = OrderBook(raise_on_gap=False)
        self.paper = PaperExecutor(self.book, fee_bps=fee_bps, maker_fee_bps=maker_fee_bps)
        self.latency = as_latency_model(latency)
        self.rejected = 0
        self.forced_applies = 0
        self.market_position = -1  # newest update id seen on the market-data channel
        self.market_time = 0  # newest receive time seen on the market-data channel
        self.last_mid: float | None = None
        self._watermark = 0  # newest order reference: diffs up to it may be applied
        self._time_mark = 0  # newest order arrival: diffs received up to it may be applied
        self._trade_mark = 0  # newest released order's time (arrival, or decision): trades up to it are played
        self._diffs: collections.deque[DepthDiff] = collections.deque()
        self._trades: collections.deque[Trade] = collections.deque()
        self._reports: list[Fill] = []  # reports made while applying market data, published in order
        self._orders: collections.deque[tuple[Order, int | None]] = collections.deque()
        self._max_pending = max_pending
        self._fills = bus.channel(TradingEvent.FILLS)
        self._publish_fills = publish_fills
        self._encode = msgspec.msgpack.Encoder().encode
        self._orders_hash = hashlib.sha256()
        self._fills_hash = hashlib.sha256()

    @property
    def digest(self) -> str:
        """Return ``sha256(sha256(O) + sha256(F)).hexdigest()``, where ``O`` is the concatenated msgpack
        encoding (``msgspec.msgpack.encode``) of every :class:`Order` this executor received, in the order it
        received them (the channel's publish order), and ``F`` that of every :class:`Fill` it produced, in
        order (rejections and unfilled orders included). Every field counts: ids, sides, quantities, prices
        (float bits), fees, timestamps (market time, never the wall clock)."""
        return hashlib.sha256(self._orders_hash.digest() + self._fills_hash.digest()).hexdigest()

    def subscribed_event(self) -> tuple[TradingEvent, TradingEvent]:
        return (TradingEvent.MARKET_DATA, TradingEvent.ORDERS)

    async def handle_event(self, event: Any) -> None:
        kind = type(event)
        if kind is Order:
            self._orders_hash.update(self._encode(event))
            latency = self.latency
            self._orders.append((event, None if latency is None else event.ts_ns + latency.delay_ns(event)))
        elif kind is DepthDiff:
            if event.recv_ts_ns > self.market_time:
                self.market_time = event.recv_ts_ns
            if not self.book.has_plausible_ids(event):
                # The replica refuses it as the aggregator's book did (and leaves live); held back, it would
                # block the queue for good and move the watermark by whatever the corrupted id says.
                self._apply(event)
                await self._publish_reports()
                return
            self._diffs.append(event)
            self.market_position = max(self.market_position, event.final_update_id)
            if len(self._diffs) > self._max_pending:
                self.forced_applies += 1
                self._apply(self._diffs.popleft())
        elif kind is Quote:
            self.market_position = max(self.market_position, event.update_id)
            if event.ts_ns > self.market_time:
                self.market_time = event.ts_ns
            self.last_mid = event.mid
        elif kind is DepthSnapshot:
            self.book.apply_snapshot(event)
            self.market_position = max(self.market_position, event.last_update_id)
            if event.recv_ts_ns > self.market_time:
                self.market_time = event.recv_ts_ns
        elif kind is Trade:
            self._trades.append(event)  # played to resting orders once the watermark passes it
            if len(self._trades) > self._max_pending:
                self.forced_applies += 1
                self._reports.extend(self.paper.on_trade(self._trades.popleft()))
            if event.recv_ts_ns > self.market_time:
                self.market_time = event.recv_ts_ns
            if event.recv_ts_ns <= self._trade_mark:  # late for the watermark it is under: play it now
                self._apply_upto(self._watermark, self._time_mark)
            if self.latency is None and not self._reports:
                return  # moves no reference id: nothing to release
        elif kind is BookUpdate:
            if self.latency is None:
                return
            if event.recv_ts_ns > self.market_time:
                self.market_time = event.recv_ts_ns
        else:
            return
        await self._release()

    def _apply(self, diff: DepthDiff) -> None:
        paper = self.paper
        if paper.resting:
            self._reports.extend(paper.expire(diff.recv_ts_ns))
        try:
            self.book.apply_diff(diff)
        except (BookGap, BookNotReady) as exc:  # the aggregator reports gaps; keep the replica going
            logger.debug("%s: replica book: %s", self.name, exc)
            return
        if paper.resting:
            self._reports.extend(paper.on_book(diff.recv_ts_ns))

    def _play(self, trade: Trade) -> None:
        paper = self.paper
        if paper.resting:
            self._reports.extend(paper.expire(trade.recv_ts_ns))
            self._reports.extend(paper.on_trade(trade))

    def _apply_upto(self, update_id: int, time_ns: int) -> None:
        """Apply the held diffs up to ``update_id`` (or received by ``time_ns``) and play the held trades up to
        the trade watermark, merged in receive-time order (a diff first on a tie)."""
        diffs, trades = self._diffs, self._trades
        trade_mark = self._trade_mark
        while True:
            diff_ok = bool(diffs) and (diffs[0].final_update_id <= update_id or diffs[0].recv_ts_ns <= time_ns)
            trade_ok = bool(trades) and trades[0].recv_ts_ns <= trade_mark
            if diff_ok and (not trade_ok or diffs[0].recv_ts_ns <= trades[0].recv_ts_ns):
                self._apply(diffs.popleft())
            elif trade_ok:
                self._play(trades.popleft())
            else:
                break
        if self.paper.resting:
            self._reports.extend(self.paper.expire(trade_mark))

    async def _release(self) -> None:
        orders = self._orders
        while orders:
            order, arrival = orders[0]
            if order.ref_update_id > self.market_position or order.ts_ns > self.market_time:
                break  # the market data the order was decided on has not all arrived yet
            if arrival is not None:
                # Every diff received up to the arrival is in once something received after it is.
                if self.market_time <= arrival:
                    break
                self._time_mark = max(self._time_mark, arrival)
            orders.popleft()
            self._watermark = max(self._watermark, order.ref_update_id)
            self._trade_mark = max(self._trade_mark, order.ts_ns if arrival is None else arrival)
            self._apply_upto(self._watermark, self._time_mark)
            await self._publish_reports()
            try:
                fills = self.paper.place(order, ts_ns=arrival)
            except (OrderRejected, BookNotReady) as exc:
                self.rejected += 1
                if self.rejected <= 5:
                    logger.warning("%s: order %s rejected: %s", self.name, order.order_id, str(exc))
                # Always answer: an execution report with nothing filled releases the strategy's in-flight
                # quantity (otherwise its position limit would stay taken by an order that will never fill).
                fills = [Fill(order.order_id, order.side, 0.0, math.nan, 0.0,
                              order.ts_ns if arrival is None else arrival, requested_qty=order.qty,
                              symbol=order.symbol)]
            self._reports.extend(fills)
            await self._publish_reports()
        await self._publish_reports()

    async def _publish_reports(self) -> None:
        reports = self._reports
        while reports:
            self._reports = []
            for fill in reports:
                self._fills_hash.update(self._encode(fill))
                if self._publish_fills:
                    await self._fills.publish_async(fill)
            reports = self._reports

    async def shutdown(self) -> None:
        if self._orders:
            logger.warning("%s: %d order(s) never saw their market data; not filled", self.name, len(self._orders))
