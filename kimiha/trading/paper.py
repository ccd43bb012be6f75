"""A paper executor: fills orders against a live :class:`~kimiha.trading.book.OrderBook` and keeps the account.

:class:`PaperExecutor` is pure (no bus, no clock): give it an :class:`~kimiha.venues.Order`, it walks the
book's levels from the best price outward as a taker, and returns one :class:`~kimiha.venues.Fill` with the
volume-weighted average price, the fee, and how much could not be filled when the book was too thin. It tracks
position, cash, average entry price, realized PnL, fees, and unrealized PnL marked to the book's mid.

Simplifications, on purpose: the book is read, never modified (an order has no market impact on later market
data). Limit orders are immediate-or-cancel by default (they take what is at or better than their price).
Fees are charged in the quote asset: ``fee_bps`` for taker fills, ``maker_fee_bps`` for maker fills.

Resting orders (``LIMIT`` with ``time_in_force=GTC``, :meth:`PaperExecutor.place`): what crosses the book at
arrival fills at once as a taker; the rest rests at its price with a queue position, hftbacktest's
"risk-averse" queue model:

* at placement, the quantity ahead is the whole size of the book's level at that price on the order's side
  (every order already there is ahead; 0 when the level is empty);
* a trade at that price whose aggressor is on the other side (a sell hitting bids, for a resting buy) takes
  the queue first: the quantity ahead drops by the trade's size, and what the trade has beyond it fills the
  order (partially, possibly) as a maker (:meth:`PaperExecutor.on_trade`);
* a trade through the price (a sell below a resting buy's price) means the whole level traded: the order fills;
* when the level shrinks in the book (cancels, or trades not seen), the order only moves up if the level
  becomes smaller than the quantity ahead (``ahead = min(ahead, level)``): a cancel is assumed to come from
  behind the order unless it cannot (:meth:`PaperExecutor.on_book`). Growth of the level queues behind it;
* when the other side of the book reaches the price (best ask at or below a resting buy), the order fills
  against what that side shows at or better than its price, less what the order itself took there (the book
  is read-only: the liquidity a GTC order took as a taker at placement is still shown until the market data
  removes it, and cannot fill it a second time; a level that shrank below what it took frees the difference);
* our own resting orders are not queued behind one another (each has its own queue).

A resting order ends filled, cancelled (:meth:`PaperExecutor.cancel`) or expired (``cancel_after_ns``,
:meth:`PaperExecutor.expire`); every execution is one :class:`~kimiha.trading.model.Fill` (``leaves_qty``:
what is still open), a cancel is a report with ``qty == 0`` and ``leaves_qty == 0``. Latency is the caller's: :class:`LatencyModel` says
how long an order takes to reach the venue, and the task (:class:`~kimiha.trading.tasks.PaperExecutorTask`)
fills it against the book as of its arrival.
"""

from __future__ import annotations

import math
import random
from bisect import bisect_right
from typing import Any

from kimiha.trading.book import BookNotReady, OrderBook
from kimiha.error import InvalidConfigurationError, OrchestratorError
from kimiha.trading.model import Fill, Liquidity, Order, OrderType, Side, TimeInForce, Trade

__all__ = ["FixedLatency", "LatencyModel", "LogNormalLatency", "OrderRejected", "PaperExecutor",
           "RestingOrder", "as_latency_model"]

_QTY_EPS = 1e-12  # positions closer to zero than this are flat (float sums of lot sizes are not exact)


class OrderRejected(OrchestratorError, ValueError):
    """An order was refused before execution; the message names the order and the offending field."""

    def __init__(self, message: str, *, order_id: Any = None, field: str | None = None) -> None:
        super().__init__(message)
        self.order_id = order_id
        self.field = field


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float))


def _walk(levels: Any, side: Side, qty: float, limit: float | None,
          taken: dict[float, float] | None = None) -> tuple[float, float, int]:
    """Take ``qty`` from ``levels`` (best first) up to ``limit``; return (filled, cost, levels used).

    ``taken``: what this order already took at each price (read-only book: those quantities are still shown);
    only the rest of a level is available, and what is taken now is added to it."""
    remaining = qty
    filled = 0.0
    cost = 0.0
    used = 0
    for px, shown in levels:
        if limit is not None and (px > limit if side is Side.BUY else px < limit):
            break
        available = shown if taken is None else shown - taken.get(px, 0.0)
        if available <= _QTY_EPS:
            continue
        used += 1
        if available >= remaining:
            cost += remaining * px
            if taken is not None:
                taken[px] = taken.get(px, 0.0) + remaining
            filled = qty  # exact: no float residue left over from repeated subtraction
            break
        cost += available * px
        filled += available
        remaining -= available
        if taken is not None:
            taken[px] = taken.get(px, 0.0) + available
    return filled, cost, used


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


#: The widest log-normal shape :class:`LogNormalLatency` takes (already a factor of e**10 per standard deviation).
_MAX_SIGMA = 10.0


class LogNormalLatency(LatencyModel):
    """A latency drawn per order from a log-normal distribution: median ``median_ns``, shape ``sigma``, at least
    ``floor_ns``; seeded, so the same orders in the same order draw the same latencies."""

    def __init__(self, median_ns: int, sigma: float = 0.5, *, seed: int = 0, floor_ns: int = 0) -> None:
        if isinstance(median_ns, bool) or not isinstance(median_ns, int) or median_ns <= 0:
            raise InvalidConfigurationError(
                f"LogNormalLatency: median_ns must be an int > 0 (nanoseconds), got {median_ns!r}")
        if not _is_number(sigma) or not math.isfinite(sigma) or not 0 <= sigma <= _MAX_SIGMA:
            raise InvalidConfigurationError(
                f"LogNormalLatency: sigma must be a number from 0 to {_MAX_SIGMA} (a wider shape draws latencies of "
                f"years and overflows), got {sigma!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise InvalidConfigurationError(
                f"LogNormalLatency: seed must be an int (the same seed draws the same latencies), got {seed!r}")
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


class RestingOrder:
    """A GTC limit order resting at the paper venue: what is left of it and its place in its level's queue."""

    __slots__ = ("order", "side", "price", "remaining", "ahead", "expire_ns", "symbol", "taken")

    def __init__(self, order: Order, side: Side, remaining: float, ahead: float, expire_ns: int | None,
                 symbol: str, taken: dict[float, float] | None = None) -> None:
        self.order = order
        self.side = side
        self.price = float(order.price)  # type: ignore[arg-type]  # validated: a limit order has a price
        self.remaining = remaining
        self.ahead = ahead
        self.expire_ns = expire_ns
        self.symbol = symbol
        #: The other side's quantity this order took, by price, still shown by the (read-only) book.
        self.taken: dict[float, float] = {} if taken is None else taken

    def __repr__(self) -> str:
        return (f"RestingOrder(id={self.order.order_id}, {self.side.value} {self.remaining} @ {self.price}, "
                f"ahead={self.ahead})")


class _UsedIds:
    """The order ids already executed, kept exactly as runs of consecutive ints.

    A strategy numbers its orders one after the other, so the ids used form a few runs whatever their
    number: memory grows with the number of gaps between used ids (an id never executed, a rejected one
    say), not with the number of orders. A ``set`` of every id grew by an int and a slot per order for the
    life of the executor (0.3.0's soak leak: 24,000 ids and a 2 MiB table after 102 tapes). Hand-written
    (bisect over two lists) because it is on every order's path and small.
    """

    __slots__ = ("starts", "ends")

    def __init__(self) -> None:
        self.starts: list[int] = []  # first id of each run, ascending
        self.ends: list[int] = []  # last id of each run (inclusive)

    def __contains__(self, oid: int) -> bool:
        ends = self.ends
        if not ends or oid > ends[-1]:  # a new id past every used one: the usual case
            return False
        i = bisect_right(self.starts, oid) - 1
        return i >= 0 and oid <= ends[i]

    def add(self, oid: int) -> None:
        starts, ends = self.starts, self.ends
        if ends and oid == ends[-1] + 1:  # the next id of the newest run: the usual case
            ends[-1] = oid
            return
        i = bisect_right(starts, oid) - 1  # the run starting at or before oid, or -1
        if i >= 0 and oid <= ends[i]:
            return
        joins_left = i >= 0 and ends[i] == oid - 1
        joins_right = i + 1 < len(starts) and starts[i + 1] == oid + 1
        if joins_left and joins_right:  # fills the only hole between two runs: one run
            ends[i] = ends[i + 1]
            del starts[i + 1], ends[i + 1]
        elif joins_left:
            ends[i] = oid
        elif joins_right:
            starts[i + 1] = oid
        else:
            starts.insert(i + 1, oid)
            ends.insert(i + 1, oid)

    @property
    def runs(self) -> int:
        """Return how many runs of consecutive ids are kept (what the memory grows with)."""
        return len(self.starts)


class PaperExecutor:
    """Fill orders as a taker against an order book and track the resulting account.

    Parameters
    ----------
    book : OrderBook
        The book to trade against; it must be ``live`` when an order arrives.
    fee_bps : float, default 10.0
        Taker fee in basis points of the filled notional (10 bps = 0.1%, Binance's base spot rate).
    maker_fee_bps : float, optional
        Fee of maker fills (resting orders), in basis points; default ``fee_bps`` (Binance's base rate is the
        same for both).
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
                 symbol: str = "", maker_fee_bps: float | None = None) -> None:
        if not isinstance(book, OrderBook):
            raise InvalidConfigurationError(
                f"PaperExecutor: book must be an OrderBook, got {type(book).__name__}")
        if not _is_number(fee_bps) or not math.isfinite(fee_bps) or fee_bps < 0:
            raise InvalidConfigurationError(
                f"PaperExecutor: fee_bps must be a finite number >= 0, got {fee_bps!r}")
        if not _is_number(initial_cash) or not math.isfinite(initial_cash):
            raise InvalidConfigurationError(
                f"PaperExecutor: initial_cash must be a finite number, got {initial_cash!r}")
        if maker_fee_bps is not None and (not _is_number(maker_fee_bps) or not math.isfinite(maker_fee_bps)):
            raise InvalidConfigurationError(
                f"PaperExecutor: maker_fee_bps must be a finite number (negative: a rebate), got {maker_fee_bps!r}")
        self.book = book
        self.fee_bps = float(fee_bps)
        self.fee_rate = self.fee_bps / 10_000.0
        self.maker_fee_bps = self.fee_bps if maker_fee_bps is None else float(maker_fee_bps)
        self.maker_fee_rate = self.maker_fee_bps / 10_000.0
        #: GTC limit orders resting at the venue, by order id, in placement order.
        self.resting: dict[int, RestingOrder] = {}
        self.maker_fills = 0
        self.cancelled = 0
        #: Trades :meth:`on_trade` ignored: a quantity or price that is not a finite number > 0.
        self.bad_trades = 0
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
        # The ids already executed (exact: a reused id is always refused), kept as runs of consecutive ids,
        # so memory stays flat for a strategy numbering its orders (see _UsedIds).
        self._seen_ids = _UsedIds()

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
        try:
            tif = TimeInForce(order.time_in_force)
        except (ValueError, TypeError):
            raise self._reject(oid, "time_in_force", f"must be TimeInForce.IOC or TimeInForce.GTC, got "
                                                     f"{order.time_in_force!r}") from None
        if tif is TimeInForce.GTC and order_type is not OrderType.LIMIT:
            raise self._reject(oid, "time_in_force", "GTC applies to limit orders only (a market order takes "
                                                     "what is there and never rests)")
        after = order.cancel_after_ns
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise self._reject(oid, "cancel_after_ns", f"must be an int >= 0 (nanoseconds), got {after!r}")
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

        filled, cost, used = _walk(levels, side, qty, limit)
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

    # ------------------------------------------------------------------ resting orders (GTC limit)
    def place(self, order: Order, *, ts_ns: int | None = None) -> list[Fill]:
        """Execute ``order`` at ``ts_ns`` (default ``order.ts_ns``); return its execution reports.

        A market or IOC order: ``[execute(order)]``. A GTC limit order: the part that crosses the book fills
        at once as a taker (one report, with ``leaves_qty`` the rest), the rest rests with the whole level at
        its price ahead of it (see the module's docstring); nothing more is reported until a trade, a book
        change, a cancel or its expiry.

        Raises
        ------
        OrderRejected
            As :meth:`execute`.
        """
        if order.time_in_force != TimeInForce.GTC:
            return [self.execute(order, ts_ns=ts_ns)]
        side, _ = self.validate(order)
        at = order.ts_ns if ts_ns is None else ts_ns
        qty = float(order.qty)
        limit = float(order.price)  # type: ignore[arg-type]  # validated
        taken: dict[float, float] = {}
        try:
            levels = self.book.iter_asks() if side is Side.BUY else self.book.iter_bids()
            filled, cost, used = _walk(levels, side, qty, limit, taken)
            ahead = self.book.qty_at(side.value, limit)
        except BookNotReady as exc:
            raise OrderRejected(f"Order {order.order_id!r}: cannot execute against the book: {exc}",
                                order_id=order.order_id, field=None) from exc
        self._seen_ids.add(order.order_id)
        self.orders += 1
        symbol = order.symbol or self.symbol
        remaining = 0.0 if filled >= qty else qty - filled
        reports = []
        if filled:
            avg = cost / filled
            fee = cost * self.fee_rate
            self._book_fill(side, filled, avg, cost, fee)
            self.fills += 1
            reports.append(Fill(order.order_id, side, filled, avg, fee, at, Liquidity.TAKER, qty, used, symbol,
                                remaining))
        if remaining > _QTY_EPS:
            expire = at + order.cancel_after_ns if order.cancel_after_ns else None
            self.resting[order.order_id] = RestingOrder(order, side, remaining, ahead, expire, symbol, taken)
        return reports

    def _maker_fill(self, resting: RestingOrder, qty: float, ts_ns: int) -> Fill:
        price = resting.price
        if qty >= resting.remaining - _QTY_EPS:
            qty = resting.remaining
            resting.remaining = 0.0
            del self.resting[resting.order.order_id]
        else:
            resting.remaining -= qty
        notional = qty * price
        fee = notional * self.maker_fee_rate
        self._book_fill(resting.side, qty, price, notional, fee)
        self.fills += 1
        self.maker_fills += 1
        return Fill(resting.order.order_id, resting.side, qty, price, fee, ts_ns, Liquidity.MAKER,
                    float(resting.order.qty), 1, resting.symbol, resting.remaining)

    def on_trade(self, trade: Trade) -> list[Fill]:
        """Advance the resting orders' queues by a public trade; return the maker fills it causes."""
        if not self.resting:
            return []
        if not (_is_number(trade.qty) and _is_number(trade.price) and math.isfinite(trade.qty)
                and math.isfinite(trade.price) and trade.qty > 0 and trade.price > 0):
            self.bad_trades += 1  # NaN, negative: no queue may move by it (a NaN would stall it for good)
            return []
        fills = []
        ts = trade.recv_ts_ns or trade.ts_ns
        for resting in list(self.resting.values()):
            if resting.side is Side.BUY:
                if trade.aggressor != Side.SELL or trade.price > resting.price:
                    continue
            elif trade.aggressor != Side.BUY or trade.price < resting.price:
                continue
            if trade.price != resting.price:  # traded through the price: the whole level went, the order too
                fills.append(self._maker_fill(resting, resting.remaining, ts))
                continue
            beyond = trade.qty - resting.ahead
            resting.ahead = max(resting.ahead - trade.qty, 0.0)
            if beyond > _QTY_EPS:
                fills.append(self._maker_fill(resting, min(beyond, resting.remaining), ts))
        return fills

    def on_book(self, ts_ns: int) -> list[Fill]:
        """Re-read the resting orders' levels after a book change; return the fills of orders the other side
        reached. A level smaller than the quantity ahead of an order moves the order up to it."""
        if not self.resting:
            return []
        fills = []
        book = self.book
        try:
            best_bid, best_ask = book.best_bid(), book.best_ask()
            for resting in list(self.resting.values()):
                if resting.taken:  # what it took is at most what is still shown (the rest traded or went)
                    other = Side.SELL.value if resting.side is Side.BUY else Side.BUY.value
                    resting.taken = {px: left for px, qty in resting.taken.items()
                                     if (left := min(qty, book.qty_at(other, px))) > _QTY_EPS}
                if resting.side is Side.BUY:
                    crossed = best_ask is not None and best_ask[0] <= resting.price
                else:
                    crossed = best_bid is not None and best_bid[0] >= resting.price
                if crossed:
                    if (fill := self._crossed_fill(resting, ts_ns)) is not None:
                        fills.append(fill)
                    continue
                level = book.qty_at(resting.side.value, resting.price)
                if level < resting.ahead:
                    resting.ahead = level
        except BookNotReady:  # a gap: the queues wait for the book to come back
            return fills
        return fills

    def _crossed_fill(self, resting: RestingOrder, ts_ns: int) -> Fill | None:
        """The other side reached a resting order's price: fill it from what that side shows at or better than
        the price, less what the order took there before."""
        book = self.book
        levels = book.iter_asks() if resting.side is Side.BUY else book.iter_bids()
        filled, _, _ = _walk(levels, resting.side, resting.remaining, resting.price, resting.taken)
        if filled <= _QTY_EPS:
            return None
        return self._maker_fill(resting, filled, ts_ns)

    def cancel(self, order_id: int, ts_ns: int) -> Fill | None:
        """Cancel a resting order at ``ts_ns``; return its final report, or None when it is not resting (it
        filled already, or never rested: a cancel that arrives too late does nothing)."""
        resting = self.resting.pop(order_id, None)
        if resting is None:
            return None
        self.cancelled += 1
        return Fill(order_id, resting.side, 0.0, math.nan, 0.0, ts_ns, Liquidity.MAKER, float(resting.order.qty),
                    0, resting.symbol, 0.0)

    def expire(self, ts_ns: int) -> list[Fill]:
        """Cancel the resting orders whose ``cancel_after_ns`` ran out at or before ``ts_ns``, earliest first."""
        due = sorted((r.expire_ns, r.order.order_id) for r in self.resting.values()
                     if r.expire_ns is not None and r.expire_ns <= ts_ns)
        return [fill for at, oid in due if (fill := self.cancel(oid, at)) is not None]

    def next_expiry_ns(self) -> int | None:
        """Return the earliest expiry of a resting order, or None."""
        times = [r.expire_ns for r in self.resting.values() if r.expire_ns is not None]
        return min(times) if times else None

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
