"""Trading logic as pure classes, independent of the event bus: feed them market events, get orders back.

:class:`ImbalanceStrategy` trades top-of-book imbalance: when resting bid quantity heavily outweighs the ask
quantity (or the reverse), the next price move tends to go that way. It smooths the imbalance, fires a
:class:`~kimiha.venues.Signal` when it crosses a threshold (then waits for it to calm down before firing
again), and turns a signal into a market :class:`~kimiha.venues.Order` unless the cooldown or the position
limit says no. Everything is driven by event timestamps, never the wall clock, so a replay always gives the
same orders.

A ``kimiha.Strategy`` task wraps it: ``handle_event`` passes each event to the matching ``on_*`` method and
publishes what comes back.
"""

from __future__ import annotations

import math
from typing import Any

from kimiha.error import InvalidConfigurationError
from kimiha.trading.model import BookUpdate, Fill, Order, OrderType, Quote, Side, Signal, Trade

__all__ = ["ImbalanceStrategy"]

_NOTHING: tuple[()] = ()  # returned when nothing happens: no allocation on the common path
_QTY_EPS = 1e-12  # quantities closer than this are equal (float sums of lot sizes are not exact)
_INF = math.inf


def _check_number(name: str, value: Any, *, low: float, low_inclusive: bool, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidConfigurationError(f"ImbalanceStrategy: {name} must be a finite number, got {value!r}")
    if (value < low if low_inclusive else value <= low) or value > high:
        bound = f"{'>=' if low_inclusive else '>'} {low}" + (f" and <= {high}" if high != math.inf else "")
        raise InvalidConfigurationError(f"ImbalanceStrategy: {name} must be {bound}, got {value!r}")
    return float(value)


class ImbalanceStrategy:
    """Top-of-book imbalance strategy with hysteresis, a cooldown and a position limit.

    The imbalance of a top of book is ``(bid_qty - ask_qty) / (bid_qty + ask_qty)``, in ``[-1, 1]``. It is
    smoothed with an exponential moving average. When the average reaches ``+entry_threshold`` a BUY signal
    fires (``-entry_threshold``: SELL); no further signal fires until the average has come back within
    ``±rearm_threshold``. Each signal becomes a market order of ``order_qty`` (less if only less fits under
    ``max_position``), unless an order was sent less than ``cooldown_ns`` ago (in event time).

    Position limits count filled quantity plus orders sent and not yet reported by a fill, so a burst of
    signals can never exceed ``max_position`` while fills are in flight.

    Parameters
    ----------
    order_qty : float, default 0.001
        Base-asset quantity per order.
    max_position : float, default 0.005
        Largest absolute position (filled + in flight) the strategy may reach.
    entry_threshold : float, default 0.6
        Smoothed imbalance that fires a signal, in ``(0, 1]``.
    rearm_threshold : float, default 0.2
        The smoothed imbalance must come back within ``±rearm_threshold`` before the next signal.
    smoothing : float, default 0.1
        EMA weight of the newest imbalance, in ``(0, 1]`` (1: no smoothing).
    cooldown_ns : int, default 1_000_000_000
        Minimum event time between two orders.
    cooldown_by_timer : bool, default False
        False: the cooldown compares event timestamps. True: placing an order sets :attr:`cooling_down`,
        and the owner ends it with :meth:`end_cooldown` (the task does so from a clock alert
        ``cooldown_ns`` after the order, see :class:`~kimiha.trading.tasks.ImbalanceStrategyTask`).
    symbol : str, optional
        Symbol written into signals and orders.
    first_order_id : int, default 1
        Id of the first order; ids then increase by one.

    Attributes
    ----------
    position : float
        Filled position (from :meth:`on_fill`).
    in_flight : float
        Signed quantity of orders sent and not yet reported filled.
    imbalance : float or None
        Current smoothed imbalance (None before the first quote).
    signals, orders, suppressed_by_cooldown, suppressed_by_limit : int
        Counters.
    skipped_quotes : int
        Tops of book that gave no imbalance and were ignored: a side empty, a quantity that is not a finite
        number > 0 (zero, negative, infinite or NaN: their sum may be zero, or the ratio meaningless), or a
        price that is not a finite number > 0.
    """

    def __init__(self, *, order_qty: float = 0.001, max_position: float = 0.005, entry_threshold: float = 0.6,
                 rearm_threshold: float = 0.2, smoothing: float = 0.1, cooldown_ns: int = 1_000_000_000,
                 symbol: str = "", first_order_id: int = 1, cooldown_by_timer: bool = False) -> None:
        self.order_qty = _check_number("order_qty", order_qty, low=0.0, low_inclusive=False)
        self.max_position = _check_number("max_position", max_position, low=0.0, low_inclusive=False)
        self.entry_threshold = _check_number("entry_threshold", entry_threshold, low=0.0, low_inclusive=False,
                                             high=1.0)
        self.rearm_threshold = _check_number("rearm_threshold", rearm_threshold, low=0.0, low_inclusive=True,
                                             high=1.0)
        if self.rearm_threshold >= self.entry_threshold:
            raise InvalidConfigurationError(
                f"ImbalanceStrategy: rearm_threshold must be below entry_threshold, got rearm_threshold="
                f"{rearm_threshold!r} and entry_threshold={entry_threshold!r}")
        self.smoothing = _check_number("smoothing", smoothing, low=0.0, low_inclusive=False, high=1.0)
        if isinstance(cooldown_ns, bool) or not isinstance(cooldown_ns, int) or cooldown_ns < 0:
            raise InvalidConfigurationError(
                f"ImbalanceStrategy: cooldown_ns must be an int >= 0 (nanoseconds), got {cooldown_ns!r}")
        if isinstance(first_order_id, bool) or not isinstance(first_order_id, int):
            raise InvalidConfigurationError(
                f"ImbalanceStrategy: first_order_id must be an int, got {first_order_id!r}")
        self.cooldown_ns = cooldown_ns
        self.cooldown_by_timer = bool(cooldown_by_timer)
        #: With ``cooldown_by_timer``: an order was placed and :meth:`end_cooldown` was not called since.
        self.cooling_down = False
        self.symbol = symbol
        self.position = 0.0
        self.in_flight = 0.0
        self.imbalance: float | None = None
        self.last_trade_price: float | None = None
        self.signals = 0
        self.orders = 0
        self.suppressed_by_cooldown = 0
        self.suppressed_by_limit = 0
        self.skipped_quotes = 0
        self._armed = True
        self._next_order_id = first_order_id
        self._last_order_ts: int | None = None
        self._open: dict[int, float] = {}  # order id -> signed requested qty, until its fill arrives

    # ------------------------------------------------------------------ inputs
    def on_quote(self, quote: Quote | BookUpdate) -> tuple[Signal] | tuple[Signal, Order] | tuple[()]:
        """Update the imbalance from a top of book; return the signal and order it causes, if any.

        Parameters
        ----------
        quote : Quote or BookUpdate
            Top of book; feed one kind consistently (their timestamps differ: a ``Quote`` carries the receive
            time, a ``BookUpdate`` the venue's event time). A top without a usable imbalance (a side empty,
            a size that is not a finite number > 0, a price that is not a finite number > 0) is ignored and
            counted in :attr:`skipped_quotes`; it never changes the smoothed imbalance.

        Returns
        -------
        tuple
            ``()``, ``(signal,)`` or ``(signal, order)``.
        """
        try:
            bid_qty = quote.bid_qty
            ask_qty = quote.ask_qty
            bid_px = quote.bid_px
            ask_px = quote.ask_px
        except AttributeError:
            raise TypeError(f"ImbalanceStrategy.on_quote: expected a Quote or a BookUpdate, got "
                            f"{type(quote).__name__}") from None
        if bid_qty is None or ask_qty is None or bid_px is None or ask_px is None:  # an empty side
            self.skipped_quotes += 1
            return _NOTHING
        try:
            # Both sizes > 0 keep the sum > 0 (no division by zero) and the ratio in [-1, 1]; one NaN would
            # make the average NaN for good (it never crosses a threshold again, nor re-arms).
            usable = (0.0 < bid_qty < _INF and 0.0 < ask_qty < _INF
                      and 0.0 < bid_px < _INF and 0.0 < ask_px < _INF)
        except TypeError:  # not numbers at all
            usable = False
        if not usable:
            self.skipped_quotes += 1
            return _NOTHING
        raw = (bid_qty - ask_qty) / (bid_qty + ask_qty)
        ema = self.imbalance
        ema = raw if ema is None else ema + self.smoothing * (raw - ema)
        self.imbalance = ema

        if not self._armed:
            if -self.rearm_threshold <= ema <= self.rearm_threshold:
                self._armed = True
            return _NOTHING
        if ema >= self.entry_threshold:
            side = Side.BUY
        elif ema <= -self.entry_threshold:
            side = Side.SELL
        else:
            return _NOTHING
        self._armed = False
        return self._on_signal(side, ema, quote)

    on_book_update = on_quote

    def on_trade(self, trade: Trade) -> tuple[()]:
        """Record the last trade price (trades do not drive this strategy); return ``()``."""
        self.last_trade_price = trade.price
        return _NOTHING

    def on_fill(self, fill: Fill) -> None:
        """Account for the execution report of one of this strategy's orders.

        A report with ``leaves_qty == 0`` closes the order (market orders are immediate-or-cancel, so an
        unfilled remainder is gone); one with ``leaves_qty > 0`` (a resting order's partial execution) keeps
        the rest in flight. Fills of orders this strategy did not send are ignored.
        """
        requested = self._open.get(fill.order_id)
        if requested is None:
            return
        if fill.leaves_qty > _QTY_EPS:  # a resting order's partial execution: the rest is still in flight
            signed = fill.qty if fill.side == Side.BUY else -fill.qty
            self._open[fill.order_id] = requested - signed
            requested = signed
        else:
            del self._open[fill.order_id]
        self.in_flight -= requested
        if abs(self.in_flight) < _QTY_EPS:
            self.in_flight = 0.0
        self.position += fill.qty if fill.side == Side.BUY else -fill.qty  # == also accepts "buy"
        if abs(self.position) < _QTY_EPS:
            self.position = 0.0

    # ------------------------------------------------------------------ decisions
    def _on_signal(self, side: Side, strength: float,
                   quote: Quote | BookUpdate) -> tuple[Signal] | tuple[Signal, Order] | tuple[()]:
        ts = quote.ts_ns
        bid_px = quote.bid_px
        ask_px = quote.ask_px
        mid = (bid_px + ask_px) * 0.5 if bid_px is not None and ask_px is not None else math.nan
        self.signals += 1
        signal = Signal(ts, side, strength, mid, "imbalance", self.symbol)

        if self.cooldown_by_timer:
            if self.cooling_down:
                self.suppressed_by_cooldown += 1
                return (signal,)
        elif self._last_order_ts is not None and ts - self._last_order_ts < self.cooldown_ns:
            self.suppressed_by_cooldown += 1
            return (signal,)
        exposure = self.position + self.in_flight
        room = self.max_position - exposure if side is Side.BUY else self.max_position + exposure
        qty = min(self.order_qty, room)
        if qty <= _QTY_EPS:
            self.suppressed_by_limit += 1
            return (signal,)
        order_id = self._next_order_id
        self._next_order_id += 1
        signed = qty if side is Side.BUY else -qty
        self._open[order_id] = signed
        self.in_flight += signed
        self._last_order_ts = ts
        self.cooling_down = self.cooldown_by_timer and self.cooldown_ns > 0
        self.orders += 1
        ref = quote.update_id if isinstance(quote, Quote) else quote.final_update_id
        return (signal, Order(order_id, side, qty, OrderType.MARKET, None, ts, self.symbol, ref))

    def end_cooldown(self) -> None:
        """End the cooldown of the last order (with ``cooldown_by_timer``): the next signal may trade."""
        self.cooling_down = False

    @property
    def exposure(self) -> float:
        """Return filled position plus orders in flight (what the position limit applies to)."""
        return self.position + self.in_flight

    def __repr__(self) -> str:
        imb = "None" if self.imbalance is None else f"{self.imbalance:.3f}"
        return (f"ImbalanceStrategy(position={self.position}, in_flight={self.in_flight}, imbalance={imb}, "
                f"signals={self.signals}, orders={self.orders})")
