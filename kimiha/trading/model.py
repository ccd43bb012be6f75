"""The venue-neutral market and trading events every venue adapter maps into.

A venue module (``kimiha.venues.binance``) decodes its own wire format and returns these events, so the book,
the strategies and the executors never see a venue's field names. All of them are frozen ``msgspec`` Structs
derived from :class:`kimiha.types.Event`, tagged with their class name so that a channel may carry a union of
them (``Trade | Quote | BookUpdate``) and still decode it by type.

Prices and quantities are floats parsed from the venue's decimal strings: the same string always gives the
same float, so levels compare and hash exactly (a book keyed by price works). Times are integers in
nanoseconds: ``ts_ns`` is the venue's own event time when the message carries one, otherwise the receive time;
``recv_ts_ns`` is always the local receive time.

Nothing here knows a venue: adapters live in ``kimiha.venues.<venue>`` and import this module, never the
other way round.
"""

from __future__ import annotations

import enum
import math

from kimiha.types import Event

__all__ = [
    "BookUpdate",
    "DepthDiff",
    "DepthSnapshot",
    "Fill",
    "Liquidity",
    "MarketEvent",
    "Order",
    "OrderType",
    "Quote",
    "Side",
    "Signal",
    "TimeInForce",
    "Trade",
]


class Side(str, enum.Enum):
    """Side of an order, a fill or a signal; for a trade, the side of the aggressor (the taker)."""

    BUY = "buy"
    SELL = "sell"

    @property
    def sign(self) -> int:
        """Return +1 for BUY and -1 for SELL."""
        return 1 if self is Side.BUY else -1

    @property
    def opposite(self) -> Side:
        """Return the other side."""
        return Side.SELL if self is Side.BUY else Side.BUY


class OrderType(str, enum.Enum):
    """Order types the paper executor understands (limit orders are immediate-or-cancel there)."""

    MARKET = "market"
    LIMIT = "limit"


class TimeInForce(str, enum.Enum):
    """How long a limit order lives at the paper venue."""

    #: Immediate or cancel: take what is at or better than the limit, cancel the rest (the default).
    IOC = "ioc"
    #: Good till cancelled: the rest rests in the book, in the queue of its price level (see
    #: :class:`~kimiha.trading.paper.PaperExecutor`), until filled, cancelled, or ``cancel_after_ns`` passed.
    GTC = "gtc"


class Liquidity(str, enum.Enum):
    """Whether a fill took liquidity from the book or provided it."""

    TAKER = "taker"
    MAKER = "maker"


# gc=False: these events hold only numbers, strings and tuples of numbers, so they can never be part of a
# reference cycle; leaving them out of the cyclic GC saves work on every replayed message.


class Trade(Event, frozen=True, tag=True, gc=False):
    """A public trade.

    Parameters
    ----------
    ts_ns : int
        Trade time at the venue, in nanoseconds since the epoch.
    price, qty : float
        Price and base-asset quantity.
    aggressor : Side
        Side of the taker: ``BUY`` when a buyer lifted the offer, ``SELL`` when a seller hit the bid.
    trade_id : int
        Venue trade id (consecutive on Binance).
    recv_ts_ns : int
        Local receive time, in nanoseconds.
    symbol : str
        Venue symbol, e.g. ``"BTCUSDT"``.
    """

    ts_ns: int
    price: float
    qty: float
    aggressor: Side
    trade_id: int
    recv_ts_ns: int = 0
    symbol: str = ""


class Quote(Event, frozen=True, tag=True, gc=False):
    """Best bid and offer (Binance ``bookTicker``).

    Parameters
    ----------
    update_id : int
        Order-book update id this quote reflects (comparable with :attr:`BookUpdate.final_update_id`).
    bid_px, bid_qty, ask_px, ask_qty : float
        Top of book.
    ts_ns : int
        Receive time in nanoseconds (``bookTicker`` carries no venue timestamp).
    symbol : str
        Venue symbol.
    """

    update_id: int
    bid_px: float
    bid_qty: float
    ask_px: float
    ask_qty: float
    ts_ns: int = 0
    symbol: str = ""

    @property
    def mid(self) -> float:
        """Return the mid price."""
        return (self.bid_px + self.ask_px) * 0.5

    @property
    def recv_ts_ns(self) -> int:
        """Return the receive time (``ts_ns``: a bookTicker's only time), as the other market events name it."""
        return self.ts_ns


class DepthDiff(Event, frozen=True, tag=True, gc=False):
    """An incremental order-book update covering update ids ``first_update_id..final_update_id``.

    Parameters
    ----------
    first_update_id, final_update_id : int
        Update id range (Binance ``U`` and ``u``).
    bids, asks : tuple of (price, qty)
        Changed levels; ``qty`` is the new absolute quantity and ``0.0`` removes the level.
    ts_ns : int
        Venue event time in nanoseconds.
    recv_ts_ns : int
        Local receive time in nanoseconds.
    symbol : str
        Venue symbol.
    """

    first_update_id: int
    final_update_id: int
    bids: tuple[tuple[float, float], ...]
    asks: tuple[tuple[float, float], ...]
    ts_ns: int = 0
    recv_ts_ns: int = 0
    symbol: str = ""


class DepthSnapshot(Event, frozen=True, tag=True, gc=False):
    """A full order-book snapshot (Binance REST ``/api/v3/depth``).

    Parameters
    ----------
    last_update_id : int
        The book is exact as of this update id.
    bids, asks : tuple of (price, qty)
        Levels, best first as the venue sends them (order does not matter to :class:`kimiha.trading.book.OrderBook`).
    recv_ts_ns : int
        Local receive time in nanoseconds.
    symbol : str
        Venue symbol (the REST answer does not carry it; the parser fills it in).
    """

    last_update_id: int
    bids: tuple[tuple[float, float], ...]
    asks: tuple[tuple[float, float], ...]
    recv_ts_ns: int = 0
    symbol: str = ""


class BookUpdate(Event, frozen=True, tag=True, gc=False):
    """The state of a rebuilt book right after one depth diff was applied.

    Parameters
    ----------
    first_update_id, final_update_id : int
        Update id range of the diff that was applied.
    bid_px, bid_qty, ask_px, ask_qty : float or None
        Best levels after applying it (``None`` when that side of the book is empty).
    levels_changed : int
        Number of level entries the diff carried (bids + asks).
    ts_ns, recv_ts_ns : int
        Venue event time and receive time of the diff, in nanoseconds.
    symbol : str
        Venue symbol.
    """

    first_update_id: int
    final_update_id: int
    bid_px: float | None
    bid_qty: float | None
    ask_px: float | None
    ask_qty: float | None
    levels_changed: int = 0
    ts_ns: int = 0
    recv_ts_ns: int = 0
    symbol: str = ""

    @property
    def mid(self) -> float | None:
        """Return the mid price, or ``None`` when a side is empty."""
        if self.bid_px is None or self.ask_px is None:
            return None
        return (self.bid_px + self.ask_px) * 0.5


class Signal(Event, frozen=True, tag=True, gc=False):
    """A strategy's view that the price is about to move to one side.

    Parameters
    ----------
    ts_ns : int
        Time of the market event that triggered it.
    side : Side
        Expected direction (``BUY``: up).
    strength : float
        Strategy-specific score, e.g. a smoothed order-book imbalance in ``[-1, 1]``.
    mid : float
        Mid price when the signal fired.
    reason : str
        Short machine-readable cause, e.g. ``"imbalance"``.
    symbol : str
        Venue symbol.
    """

    ts_ns: int
    side: Side
    strength: float
    mid: float
    reason: str = ""
    symbol: str = ""


class Order(Event, frozen=True, tag=True, gc=False):
    """An order request.

    Parameters
    ----------
    order_id : int
        Caller-chosen id, unique per executor.
    side : Side
        ``BUY`` or ``SELL``.
    qty : float
        Base-asset quantity, > 0.
    order_type : OrderType
        ``MARKET`` (default) or ``LIMIT``.
    price : float or None
        Limit price; required for ``LIMIT``, must be ``None`` for ``MARKET``.
    ts_ns : int
        Time the order was decided, in nanoseconds (market time during a replay).
    symbol : str
        Venue symbol.
    ref_update_id : int
        Book update id the decision was based on (0: unknown). A paper executor fills the order against its
        book as of that id, so fills do not depend on how fast market data and orders travel.
    time_in_force : TimeInForce
        ``IOC`` (default) or ``GTC`` (limit orders only: the rest rests in the book).
    cancel_after_ns : int
        With ``GTC``: the venue cancels what is left this long after the order arrived (0: never).
    """

    order_id: int
    side: Side
    qty: float
    order_type: OrderType = OrderType.MARKET
    price: float | None = None
    ts_ns: int = 0
    symbol: str = ""
    ref_update_id: int = 0
    time_in_force: TimeInForce = TimeInForce.IOC
    cancel_after_ns: int = 0


class Fill(Event, frozen=True, tag=True, gc=False):
    """An execution report: for a market or IOC order, one event per order, aggregated across the levels it
    took; a resting (GTC) order gets one per execution, the last one with ``leaves_qty == 0`` (a cancel is a
    report with ``qty == 0`` and ``leaves_qty == 0``).

    Parameters
    ----------
    order_id : int
        Id of the order.
    side : Side
        Side of the order.
    qty : float
        Filled quantity (``0.0`` when nothing could be filled).
    avg_price : float
        Volume-weighted average price of the fill; NaN when ``qty == 0`` (there is no price).
    fee : float
        Fee charged, in the quote asset.
    ts_ns : int
        Time of the execution in nanoseconds.
    liquidity : Liquidity
        ``TAKER`` or ``MAKER``.
    requested_qty : float
        Quantity the order asked for; ``requested_qty - qty`` was not filled and is cancelled.
    levels : int
        Number of price levels the fill consumed.
    symbol : str
        Venue symbol.
    leaves_qty : float
        Quantity of the order still open after this report (0.0: the order is done).
    """

    order_id: int
    side: Side
    qty: float
    avg_price: float
    fee: float
    ts_ns: int
    liquidity: Liquidity = Liquidity.TAKER
    requested_qty: float = 0.0
    levels: int = 0
    symbol: str = ""
    leaves_qty: float = 0.0

    @property
    def unfilled_qty(self) -> float:
        """Return the quantity that was requested but not filled (cancelled)."""
        return max(self.requested_qty - self.qty, 0.0)

    @property
    def is_partial(self) -> bool:
        """Return True when less than the requested quantity was filled."""
        return self.qty < self.requested_qty

    @property
    def notional(self) -> float:
        """Return the filled quote amount (``qty * avg_price``), 0.0 when nothing filled."""
        return 0.0 if self.qty == 0.0 or math.isnan(self.avg_price) else self.qty * self.avg_price


#: What a venue parser returns for one line of market data.
MarketEvent = Trade | Quote | DepthDiff | DepthSnapshot
