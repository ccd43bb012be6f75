"""A paper executor: fills orders against a live :class:`~kimiha.trading.book.OrderBook` and keeps the account.

:class:`PaperExecutor` is pure (no bus, no clock): give it an :class:`~kimiha.venues.Order`, it walks the
book's levels from the best price outward as a taker, and returns one :class:`~kimiha.venues.Fill` with the
volume-weighted average price, the fee, and how much could not be filled when the book was too thin. It tracks
position, cash, average entry price, realized PnL, fees, and unrealized PnL marked to the book's mid.

Simplifications, on purpose: the book is read, never modified (an order has no market impact on later market
data), and limit orders are immediate-or-cancel (they take what is at or better than their price; nothing
rests in the book). Fees are charged in the quote asset. Latency is the caller's: :class:`LatencyModel` says
how long an order takes to reach the venue, and the task (:class:`~kimiha.trading.tasks.PaperExecutorTask`)
fills it against the book as of its arrival.
"""

from __future__ import annotations

import math
import random
from typing import Any

from kimiha.trading.book import BookNotReady, OrderBook
from kimiha.error import InvalidConfigurationError, OrchestratorError
from kimiha.trading.model import Fill, Liquidity, Order, OrderType, Side

__all__ = ["FixedLatency", "LatencyModel", "LogNormalLatency", "OrderRejected", "PaperExecutor",
           "as_latency_model"]

_QTY_EPS = 1e-12  # positions closer to zero than this are flat (float sums of lot sizes are not exact)


class OrderRejected(OrchestratorError, ValueError):
    """An order was refused before execution; the message names the order and the offending field."""

    def __init__(self, message: str, *, order_id: Any = None, field: str | None = None) -> None:
        super().__init__(message)
        self.order_id = order_id
        self.field = field


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


class LatencyModel:
    """How long an order takes from its decision to the venue: :meth:`delay_ns` per order, in order."""

    def delay_ns(self, order: Order) -> int:
        raise NotImplementedError


class FixedLatency(LatencyModel):
    """The same latency for every order, ``ns`` nanoseconds (>= 0)."""

    def __init__(self, ns: int) -> None:
        if isinstance(ns, bool) or not isinstance(ns, int) or ns < 0:
            raise InvalidConfigurationError(f"FixedLatency: ns must be an int >= 0 (nanoseconds), got {ns!r}")
        self.ns = ns

    def delay_ns(self, order: Order) -> int:
        return self.ns

    def __repr__(self) -> str:
        return f"FixedLatency({self.ns})"


class LogNormalLatency(LatencyModel):
    """A latency drawn per order from a log-normal distribution: median ``median_ns``, shape ``sigma``, at least
    ``floor_ns``; seeded, so the same orders in the same order draw the same latencies."""

    def __init__(self, median_ns: int, sigma: float = 0.5, *, seed: int = 0, floor_ns: int = 0) -> None:
        if isinstance(median_ns, bool) or not isinstance(median_ns, int) or median_ns <= 0:
            raise InvalidConfigurationError(
                f"LogNormalLatency: median_ns must be an int > 0 (nanoseconds), got {median_ns!r}")
        if not _is_number(sigma) or not math.isfinite(sigma) or sigma < 0:
            raise InvalidConfigurationError(f"LogNormalLatency: sigma must be a finite number >= 0, got {sigma!r}")
        if isinstance(floor_ns, bool) or not isinstance(floor_ns, int) or floor_ns < 0:
            raise InvalidConfigurationError(f"LogNormalLatency: floor_ns must be an int >= 0, got {floor_ns!r}")
        self.median_ns = median_ns
        self.sigma = float(sigma)
        self.floor_ns = floor_ns
        self.seed = seed
        self._mu = math.log(median_ns)
        self._random = random.Random(seed)

    def delay_ns(self, order: Order) -> int:
        return max(self.floor_ns, int(self._random.lognormvariate(self._mu, self.sigma)))

    def __repr__(self) -> str:
        return f"LogNormalLatency({self.median_ns}, {self.sigma}, seed={self.seed}, floor_ns={self.floor_ns})"


def as_latency_model(latency: int | LatencyModel | None) -> LatencyModel | None:
    """Return ``latency`` as a model: None or 0 stays None (no latency: fill as of the decision), an int of
    nanoseconds becomes a :class:`FixedLatency`, a model is returned as is."""
    if latency is None or isinstance(latency, LatencyModel):
        return latency
    if isinstance(latency, bool) or not isinstance(latency, int) or latency < 0:
        raise InvalidConfigurationError(
            f"latency: expected None, an int of nanoseconds >= 0 or a LatencyModel, got {latency!r}")
    return FixedLatency(latency) if latency else None


class PaperExecutor:
    """Fill orders as a taker against an order book and track the resulting account.

    Parameters
    ----------
    book : OrderBook
        The book to trade against; it must be ``live`` when an order arrives.
    fee_bps : float, default 10.0
        Taker fee in basis points of the filled notional (10 bps = 0.1%, Binance's base spot rate).
    initial_cash : float, default 0.0
        Starting quote-asset balance (cash may go negative: the account is not margin-checked).
    symbol : str, optional
        When set, orders for another (non-empty) symbol are rejected.

    Attributes
    ----------
    position : float
        Signed base-asset position.
    avg_entry_price : float
        Average price of the open position (0.0 when flat).
    cash : float
        Quote-asset balance.
    realized_pnl : float
        PnL of closed quantity, before fees.
    fees_paid : float
        Total fees.
    orders, fills, partial_fills, unfilled : int
        Orders executed, orders with a non-zero fill, fills short of the requested quantity, orders that
        filled nothing.
    volume, notional : float
        Total filled base quantity and quote amount.
    """

    def __init__(self, book: OrderBook, *, fee_bps: float = 10.0, initial_cash: float = 0.0,
                 symbol: str = "") -> None:
        if not isinstance(book, OrderBook):
            raise InvalidConfigurationError(
                f"PaperExecutor: book must be an OrderBook, got {type(book).__name__}")
        if not _is_number(fee_bps) or not math.isfinite(fee_bps) or fee_bps < 0:
            raise InvalidConfigurationError(
                f"PaperExecutor: fee_bps must be a finite number >= 0, got {fee_bps!r}")
        if not _is_number(initial_cash) or not math.isfinite(initial_cash):
            raise InvalidConfigurationError(
                f"PaperExecutor: initial_cash must be a finite number, got {initial_cash!r}")
        self.book = book
        self.fee_bps = float(fee_bps)
        self.fee_rate = self.fee_bps / 10_000.0
        self.initial_cash = float(initial_cash)
        self.symbol = symbol
        self.position = 0.0
        self.avg_entry_price = 0.0
        self.cash = float(initial_cash)
        self.realized_pnl = 0.0
        self.fees_paid = 0.0
        self.orders = 0
        self.fills = 0
        self.partial_fills = 0
        self.unfilled = 0
        self.volume = 0.0
        self.notional = 0.0
        self._seen_ids: set[Any] = set()

    # ------------------------------------------------------------------ validation
    def _reject(self, order_id: Any, field: str, message: str) -> OrderRejected:
        return OrderRejected(f"Order {order_id!r}: field '{field}' {message}", order_id=order_id, field=field)

    def validate(self, order: Order) -> tuple[Side, OrderType]:
        """Check an order without executing it; return its side and type as enum members.

        Raises
        ------
        OrderRejected
            Naming the order id and the field: not an ``Order``, an id that is not an int or was already
            used, a side other than buy/sell, a quantity that is not a finite number > 0, an unknown order
            type, a limit order without a valid price, a market order with a price, a foreign symbol.
        """
        if not isinstance(order, Order):
            raise OrderRejected(f"expected an Order, got {type(order).__name__}: {order!r}")
        oid = order.order_id
        if isinstance(oid, bool) or not isinstance(oid, int):
            raise self._reject(oid, "order_id", f"must be an int, got {type(oid).__name__}")
        if oid in self._seen_ids:
            raise self._reject(oid, "order_id", "was already used by an executed order; ids must be unique")
        try:
            side = Side(order.side)
        except (ValueError, TypeError):
            side = None
        if side is None:
            raise self._reject(oid, "side",
                               f"must be Side.BUY or Side.SELL ('buy' / 'sell'), got {order.side!r}")
        qty = order.qty
        if not _is_number(qty) or not math.isfinite(qty) or qty <= 0:
            raise self._reject(oid, "qty", f"must be a finite number > 0, got {qty!r}")
        try:
            order_type = OrderType(order.order_type)
        except (ValueError, TypeError):
            order_type = None
        if order_type is None:
            raise self._reject(oid, "order_type", f"must be OrderType.MARKET or OrderType.LIMIT, got "
                                                  f"{order.order_type!r}")
        price: Any = order.price
        if order_type is OrderType.LIMIT:
            if not _is_number(price) or not math.isfinite(price) or price <= 0:
                raise self._reject(oid, "price",
                                   f"must be a finite number > 0 for a limit order, got {price!r}")
        elif price is not None:
            raise self._reject(oid, "price", f"must be None for a market order, got {price!r}")
        if self.symbol and order.symbol and order.symbol != self.symbol:
            raise self._reject(oid, "symbol", f"must be {self.symbol!r} (this executor's book), got "
                                              f"{order.symbol!r}")
        return side, order_type

    # ------------------------------------------------------------------ execution
    def execute(self, order: Order, *, ts_ns: int | None = None) -> Fill:
        """Fill an order against the current book and update the account.

        A buy takes the asks from the lowest price up, a sell takes the bids from the highest price down,
        until the quantity is filled, the book side is exhausted, or (limit orders) the next level is worse
        than the limit price. What is not filled is cancelled and reported in the fill.

        Parameters
        ----------
        order : Order
            The order; see :meth:`validate` for what is accepted.

        ts_ns : int, optional
            Time of the execution (the order's arrival at the venue); default ``order.ts_ns``.

        Returns
        -------
        Fill
            ``qty`` filled (possibly less than ``requested_qty``, possibly 0.0 with a NaN ``avg_price``),
            the VWAP, the fee, the number of levels consumed; timestamped with ``ts_ns``.

        Raises
        ------
        OrderRejected
            For invalid input, or when the book is not ``live`` (nothing is executed; the id stays free).
        """
        side, order_type = self.validate(order)
        qty = float(order.qty)
        limit = float(order.price) if order.price is not None and order_type is OrderType.LIMIT else None
        try:
            levels = self.book.iter_asks() if side is Side.BUY else self.book.iter_bids()
        except BookNotReady as exc:
            raise OrderRejected(f"Order {order.order_id!r}: cannot execute against the book: {exc}",
                                order_id=order.order_id, field=None) from exc

        remaining = qty
        filled = 0.0
        cost = 0.0
        used = 0
        for px, available in levels:
            if limit is not None and (px > limit if side is Side.BUY else px < limit):
                break
            used += 1
            if available >= remaining:
                cost += remaining * px
                filled = qty  # exact: no float residue left over from repeated subtraction
                remaining = 0.0
                break
            cost += available * px
            filled += available
            remaining -= available

        self._seen_ids.add(order.order_id)
        self.orders += 1
        at = order.ts_ns if ts_ns is None else ts_ns
        if filled == 0.0:
            self.unfilled += 1
            return Fill(order.order_id, side, 0.0, math.nan, 0.0, at, Liquidity.TAKER, qty, 0,
                        order.symbol or self.symbol)
        avg_price = cost / filled
        fee = cost * self.fee_rate
        self._book_fill(side, filled, avg_price, cost, fee)
        self.fills += 1
        if filled < qty:
            self.partial_fills += 1
        return Fill(order.order_id, side, filled, avg_price, fee, at, Liquidity.TAKER, qty, used,
                    order.symbol or self.symbol)

    def _book_fill(self, side: Side, qty: float, price: float, notional: float, fee: float) -> None:
        self.volume += qty
        self.notional += notional
        self.fees_paid += fee
        if side is Side.BUY:
            self.cash -= notional + fee
            signed = qty
        else:
            self.cash += notional - fee
            signed = -qty
        pos = self.position
        if pos == 0.0 or (pos > 0.0) == (signed > 0.0):
            # Opening or adding: the entry price becomes the quantity-weighted average.
            new_pos = pos + signed
            self.avg_entry_price = (abs(pos) * self.avg_entry_price + qty * price) / abs(new_pos)
            self.position = new_pos
            return
        # Reducing, closing or flipping: realize PnL on the closed part at the average entry.
        closed = min(qty, abs(pos))
        direction = 1.0 if pos > 0.0 else -1.0
        self.realized_pnl += closed * (price - self.avg_entry_price) * direction
        new_pos = pos + signed
        if abs(new_pos) < _QTY_EPS:
            self.position = 0.0
            self.avg_entry_price = 0.0
        elif qty > abs(pos):
            self.position = new_pos  # flipped: the remainder opened at this fill's price
            self.avg_entry_price = price
        else:
            self.position = new_pos

    # ------------------------------------------------------------------ marking
    def _mark(self, mark_price: float | None) -> float:
        if mark_price is not None:
            return mark_price
        mid = self.book.mid()
        if mid is None:
            raise OrderRejected("PaperExecutor: cannot mark to the mid: a side of the book is empty; pass "
                                "mark_price")
        return mid

    def unrealized_pnl(self, mark_price: float | None = None) -> float:
        """Return the open position's PnL at ``mark_price`` (the book's mid by default), before fees."""
        if self.position == 0.0:
            return 0.0
        return self.position * (self._mark(mark_price) - self.avg_entry_price)

    def total_pnl(self, mark_price: float | None = None) -> float:
        """Return realized + unrealized PnL minus fees (equals ``equity - initial_cash``)."""
        return self.realized_pnl + self.unrealized_pnl(mark_price) - self.fees_paid

    def equity(self, mark_price: float | None = None) -> float:
        """Return cash plus the position valued at ``mark_price`` (the book's mid by default)."""
        if self.position == 0.0:
            return self.cash
        return self.cash + self.position * self._mark(mark_price)

    def summary(self, mark_price: float | None = None) -> dict[str, float | int]:
        """Return the account and counters as a dict (marked to ``mark_price`` or the mid)."""
        return {
            "position": self.position,
            "avg_entry_price": self.avg_entry_price,
            "cash": self.cash,
            "realized_pnl": self.realized_pnl,
            "unrealized_pnl": self.unrealized_pnl(mark_price),
            "fees_paid": self.fees_paid,
            "total_pnl": self.total_pnl(mark_price),
            "equity": self.equity(mark_price),
            "orders": self.orders,
            "fills": self.fills,
            "partial_fills": self.partial_fills,
            "unfilled": self.unfilled,
            "volume": self.volume,
            "notional": self.notional,
        }

    def __repr__(self) -> str:
        return (f"PaperExecutor(position={self.position}, avg_entry_price={self.avg_entry_price}, "
                f"cash={self.cash}, realized_pnl={self.realized_pnl}, fees_paid={self.fees_paid})")
