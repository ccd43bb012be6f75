"""An L2 order book rebuilt from a snapshot and incremental depth diffs, with Binance spot sequencing rules.

:class:`OrderBook` starts from a :class:`~kimiha.venues.DepthSnapshot` and applies
:class:`~kimiha.venues.DepthDiff` messages under the rules Binance documents for spot
("How to manage a local order book correctly"):

1. diffs that arrive before the snapshot are buffered;
2. a diff whose ``final_update_id <= lastUpdateId`` is stale and dropped;
3. the first diff applied must straddle the snapshot:
   ``first_update_id <= lastUpdateId + 1 <= final_update_id``;
4. after that, every diff must start right after the previous one: ``first_update_id == previous final + 1``.

A diff that breaks rule 3 or 4 is a gap. A gap never leaves a wrong book behind: the book empties itself,
moves to the ``out_of_sync`` state (where reading it raises :class:`BookNotReady`), counts the gap, raises
:class:`BookGap` (unless built with ``raise_on_gap=False``) and buffers the diffs that follow until a new
snapshot arrives, which resynchronizes it.

Input no book can hold is refused whole, counted in :attr:`OrderBook.rejected` and named in a
:class:`BookInputError` (a :class:`BookGap`, so whoever handles gaps handles it): a price that is not a finite
number > 0, a quantity that is not a finite number >= 0, update ids that are not ints, a diff whose
``first_update_id`` is above its ``final_update_id``, or one covering more than ``max_update_span`` update ids
(Binance's rules only look at ``first_update_id``: without this bound a ``final_update_id`` corrupted by +1e9
was applied, and every later diff looked stale to a book that still said ``live``). Nothing of a refused
message is applied and a refused diff is never buffered; a refused diff the live book needed leaves it without
those updates, so the book goes ``out_of_sync`` like after any gap. A snapshot that is not newer than a live
book is dropped (counted in :attr:`OrderBook.stale_snapshots`): replaying it would rewind the book.

Levels live in a dict (price -> qty) per side plus a sorted list of keys per side kept with ``bisect``. Both
lists are ordered so that the best level is at the end (bids by price, asks by negated price): most updates
touch prices near the top, and inserting or deleting near the end of a Python list moves little memory.
One method writes levels, and it checks the whole message first: ``bisect`` needs keys that compare in a total
order, and a single NaN key made it delete the wrong entry, after which the dict and the key list disagreed.

:class:`BookCheck` compares the rebuilt top of book with the venue's own best bid/offer stream at every update
id both of them report: an end-to-end test of the parser and the book.
"""

from __future__ import annotations

import enum
import math
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Iterable, Iterator

from kimiha.error import InvalidConfigurationError, InvalidStateError, OrchestratorError
from kimiha.trading.model import BookUpdate, DepthDiff, DepthSnapshot, Quote

__all__ = ["BookCheck", "BookGap", "BookInputError", "BookNotReady", "BookState", "OrderBook"]

_INF = math.inf
_MAX_ID = 2**63  # update ids travel in int64 fields (msgspec encodes BookUpdate)
_ID_EXPECTED = "an int in [0, 2**63)"
_MAX_INT_LEVEL = 2**53  # ints up to this are exactly floats: as keys they equal the float of the same value
_NUMBER_EXPECTED = "a number (a float, or an int within +-2**53)"


class BookState(str, enum.Enum):
    """Where an :class:`OrderBook` stands in the snapshot/diff protocol."""

    AWAITING_SNAPSHOT = "awaiting_snapshot"  #: no snapshot yet; diffs are buffered
    LIVE = "live"  #: snapshot loaded and every diff since applied in sequence; safe to read
    OUT_OF_SYNC = "out_of_sync"  #: a gap was seen (or a diff it needed was refused); empty until a new snapshot


class BookGap(OrchestratorError):
    """A depth diff does not continue the sequence: update ids are missing, the book needs a new snapshot.

    Attributes
    ----------
    symbol : str
        Symbol of the book.
    expected_first_update_id : int
        The ``first_update_id`` the book needed (previous final + 1, or one inside the snapshot's range).
    first_update_id, final_update_id : int
        Range of the diff that arrived.
    """

    def __init__(self, symbol: str, expected_first_update_id: int, first_update_id: int,
                 final_update_id: int, after_snapshot: bool = False) -> None:
        self.symbol = symbol
        self.expected_first_update_id = expected_first_update_id
        self.first_update_id = first_update_id
        self.final_update_id = final_update_id
        self.after_snapshot = after_snapshot
        name = f"{symbol} order book" if symbol else "order book"
        if after_snapshot:
            rule = (f"the first diff after the snapshot must satisfy first_update_id <= "
                    f"{expected_first_update_id} <= final_update_id")
        else:
            rule = f"expected first_update_id == {expected_first_update_id} (previous final_update_id + 1)"
        missing = first_update_id - expected_first_update_id
        super().__init__(
            f"{name}: gap in depth updates: {rule}, got a diff covering {first_update_id}..{final_update_id} "
            f"({missing} update id(s) missing); the book is now out_of_sync, emptied and buffering diffs "
            f"until a new snapshot arrives"
        )

    def __reduce__(self) -> tuple[type[BookGap], tuple[object, ...]]:  # keep it picklable (custom signature)
        return (type(self), (self.symbol, self.expected_first_update_id, self.first_update_id,
                             self.final_update_id, self.after_snapshot))


class BookInputError(BookGap, ValueError):
    """A depth message was refused whole: a level or an update id no order book can hold.

    Nothing of the message was applied, and a refused diff is not buffered. When the book was ``live`` and
    needed the diff, it is now without those updates and therefore ``out_of_sync``, like after any gap (hence a
    :class:`BookGap`: code that handles gaps handles this too); otherwise the message says the book is
    unchanged. Also a ``ValueError``.

    Attributes
    ----------
    symbol : str
        Symbol of the book.
    kind : str
        ``"diff"`` or ``"snapshot"``.
    field : str
        What was wrong, e.g. ``"bids[3].price"``, ``"final_update_id"``.
    value : object
        The value that arrived there.
    first_update_id, final_update_id : object
        Range of the refused diff (a snapshot's ``last_update_id`` for both), as they arrived.
    """

    def __init__(self, symbol: str, kind: str, first_update_id: object, final_update_id: object, field: str,
                 value: object, shown: str, expected: str, outcome: str, expected_first_update_id: int = 0,
                 after_snapshot: bool = False) -> None:
        self.symbol = symbol
        self.kind = kind
        self.field = field
        self.value = value
        self.first_update_id = first_update_id  # type: ignore[assignment]
        self.final_update_id = final_update_id  # type: ignore[assignment]
        self.expected_first_update_id = expected_first_update_id
        self.after_snapshot = after_snapshot
        self._args = (symbol, kind, first_update_id, final_update_id, field, value, shown, expected, outcome,
                      expected_first_update_id, after_snapshot)
        name = f"{symbol} order book" if symbol else "order book"
        what = (f"a depth diff covering {first_update_id}..{final_update_id}" if kind == "diff"
                else f"a depth snapshot as of update id {first_update_id}")
        OrchestratorError.__init__(
            self, f"{name}: refused {what}: {field} is {shown}, expected {expected}; nothing of it was applied; "
                  f"{outcome}")

    def __reduce__(self) -> tuple[type[BookInputError], tuple[object, ...]]:
        return (type(self), self._args)


def _typed(value: object) -> str:
    """Return a short repr of a value of the wrong type, with its type."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _valid_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _MAX_ID


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return True
    return isinstance(value, int) and not isinstance(value, bool) and -_MAX_INT_LEVEL <= value <= _MAX_INT_LEVEL


def _level_problem(bids: object, asks: object, _float: type = float,
                   _inf: float = _INF) -> tuple[str, object, str, str] | None:
    """Return ``(field, value, shown, expected)`` for the first level no book can hold, or None.

    A price must be a finite number > 0 and a quantity a finite number >= 0 (0 removes the level): NaN
    compares false with everything, so a NaN key breaks the sorted key lists.
    """
    for name, levels in (("bids", bids), ("asks", asks)):
        try:
            if levels.__class__ is not tuple and not isinstance(levels, (tuple, list)):
                raise TypeError  # a generator would be used up here, before the levels are written
            for px, qty in levels:
                # The fast path (locals, comparisons first): what parsers and decoders produce, exact floats.
                if (not (0.0 < px < _inf and 0.0 <= qty < _inf)
                        or px.__class__ is not _float or qty.__class__ is not _float):
                    break
            else:
                continue
        except (TypeError, ValueError, ArithmeticError):  # not a pair, not comparable (a Decimal NaN ...)
            pass
        problem = _describe_levels(name, levels)
        if problem is not None:
            return problem
    return None


def _describe_levels(name: str, levels: object) -> tuple[str, object, str, str] | None:
    if not isinstance(levels, (tuple, list)):
        return name, levels, _typed(levels), "a tuple of (price, quantity) pairs"
    for i, level in enumerate(levels):
        try:
            px, qty = level
        except (TypeError, ValueError):
            return f"{name}[{i}]", level, _typed(level), "a (price, quantity) pair"
        where = f"{name}[{i}]"
        if not _is_number(px):
            return f"{where}.price", px, _typed(px), _NUMBER_EXPECTED
        if not 0.0 < px < _INF:
            return f"{where}.price", px, repr(px), "a finite number > 0"
        if not _is_number(qty):
            return f"{where}.quantity", qty, _typed(qty), _NUMBER_EXPECTED
        if not 0.0 <= qty < _INF:
            return f"{where}.quantity", qty, repr(qty), "a finite number >= 0"
    return None


class BookNotReady(InvalidStateError):
    """The book was read (or traded against) while it is not ``live``; the message names the state."""


class OrderBook:
    """An L2 order book for one symbol, kept exact by Binance spot sequencing rules.

    Parameters
    ----------
    symbol : str, optional
        Symbol, used in messages and copied into the :class:`~kimiha.venues.BookUpdate` events.
    raise_on_gap : bool, default True
        Raise :class:`BookGap` when a gap is detected, and :class:`BookInputError` (one) when a message is
        refused. With False both are only counted and flagged through :attr:`state` (``out_of_sync``),
        :attr:`gaps` and :attr:`rejected`; either way the book never holds wrong levels.
    max_buffer : int, default 1_000
        Diffs kept while waiting for a snapshot; the oldest are dropped beyond it (counted in
        :attr:`buffer_dropped`, and a snapshot that cannot bridge the remaining diffs is reported as a gap).
    max_update_span : int, default 100_000
        Largest plausible ``final_update_id - first_update_id`` of one diff; a diff covering more is refused.
        Binance spot BTCUSDT diffs of 100 ms cover about 70 update ids on average and 1,465 at most on the
        shipped tape (1000 ms diffs cover about ten times as many): the default leaves a wide margin while a
        ``final_update_id`` corrupted by +1e9 can never freeze the book.

    Attributes
    ----------
    state : BookState
        Protocol state; the book is readable only when ``LIVE``.
    last_update_id : int
        Update id the book is exact as of (-1 before the first snapshot).
    applied, stale, gaps, resyncs, buffer_dropped : int
        Diffs applied, stale diffs dropped, gaps detected, snapshots that ended an ``out_of_sync`` period,
        buffered diffs dropped for lack of room.
    rejected : int
        Messages (diffs and snapshots) refused as input no book can hold (see :class:`BookInputError`).
    stale_snapshots : int
        Snapshots dropped because they were not newer than the live book.
    """

    __slots__ = (
        "_ask_keys",
        "_asks",
        "_bid_keys",
        "_bids",
        "_bridged",
        "_buffer",
        "applied",
        "buffer_dropped",
        "gaps",
        "last_update_id",
        "max_buffer",
        "max_update_span",
        "raise_on_gap",
        "rejected",
        "resyncs",
        "stale",
        "stale_snapshots",
        "state",
        "symbol",
    )

    def __init__(self, symbol: str = "", *, raise_on_gap: bool = True, max_buffer: int = 1_000,
                 max_update_span: int = 100_000) -> None:
        if not isinstance(max_buffer, int) or isinstance(max_buffer, bool) or max_buffer < 1:
            raise InvalidConfigurationError(f"OrderBook: max_buffer must be an int >= 1, got {max_buffer!r}")
        if not isinstance(max_update_span, int) or isinstance(max_update_span, bool) or max_update_span < 1:
            raise InvalidConfigurationError(
                f"OrderBook: max_update_span must be an int >= 1, got {max_update_span!r}")
        self.symbol = symbol
        self.raise_on_gap = bool(raise_on_gap)
        self.max_buffer = max_buffer
        self.max_update_span = max_update_span
        self.state = BookState.AWAITING_SNAPSHOT
        self.last_update_id = -1
        self.applied = 0
        self.stale = 0
        self.gaps = 0
        self.resyncs = 0
        self.buffer_dropped = 0
        self.rejected = 0
        self.stale_snapshots = 0
        self._bridged = False  # rule 3 (straddle) applies until the first diff after a snapshot is applied
        self._buffer: deque[DepthDiff] = deque()
        self._bids: dict[float, float] = {}
        self._asks: dict[float, float] = {}
        self._bid_keys: list[float] = []  # bid prices ascending: best bid last
        self._ask_keys: list[float] = []  # negated ask prices ascending: best (lowest) ask last

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_levels(cls, bids: Iterable[tuple[float, float]], asks: Iterable[tuple[float, float]], *,
                    symbol: str = "", last_update_id: int = 0) -> OrderBook:
        """Return a ``live`` book holding the given levels (for tests, simulations and examples).

        Parameters
        ----------
        bids, asks : iterable of (price, qty)
            Levels in any order; zero quantities are ignored; impossible ones raise :class:`BookInputError`.
        symbol : str, optional
            Symbol of the book.
        last_update_id : int, default 0
            Update id the levels are exact as of.
        """
        book = cls(symbol)
        book.apply_snapshot(DepthSnapshot(last_update_id, tuple(bids), tuple(asks), symbol=symbol))
        return book

    # ------------------------------------------------------------------ protocol
    def apply_snapshot(self, snapshot: DepthSnapshot) -> list[BookUpdate]:
        """Load a snapshot, then apply the buffered diffs that follow it.

        This is also the resync path after a gap. Levels with a zero quantity are ignored. A snapshot that is
        not newer than a ``live`` book (``last_update_id`` at most the book's) is dropped and counted in
        :attr:`stale_snapshots`: loading it would rewind the book, and the diffs that follow would be a gap.

        Parameters
        ----------
        snapshot : DepthSnapshot
            The full book as of ``snapshot.last_update_id``.

        Returns
        -------
        list of BookUpdate
            One update per buffered diff that was applied, in order (empty when none was).

        Raises
        ------
        BookGap
            When the buffered diffs do not continue from the snapshot (``raise_on_gap``); the book is then
            ``out_of_sync`` and keeps the diffs buffered for the next snapshot.
        BookInputError
            When the snapshot holds a level or an update id no book can hold (``raise_on_gap``); nothing of it
            was loaded and the book is unchanged.
        """
        if not isinstance(snapshot, DepthSnapshot):
            raise TypeError(
                f"OrderBook.apply_snapshot: expected a DepthSnapshot, got {type(snapshot).__name__}")
        last = snapshot.last_update_id
        if not _valid_id(last):
            shown = repr(last) if isinstance(last, int) and not isinstance(last, bool) else _typed(last)
            return self._refuse_snapshot(snapshot, ("last_update_id", last, shown, _ID_EXPECTED))
        if self.state is BookState.LIVE and last <= self.last_update_id:
            self.stale_snapshots += 1
            return []
        was_out_of_sync = self.state is BookState.OUT_OF_SYNC
        problem = self._write_levels(snapshot.bids, snapshot.asks, replace=True)
        if problem is not None:
            return self._refuse_snapshot(snapshot, problem)
        self.last_update_id = last
        self._bridged = False
        self.state = BookState.LIVE
        pending = self._buffer
        self._buffer = deque()
        updates: list[BookUpdate] = []
        while pending:
            diff = pending.popleft()
            try:
                update = self._apply_live(diff)
            except BookGap:
                # A gap diff was buffered by _go_out_of_sync (a refused one was not); later ones must
                # follow it, in order.
                self._buffer.extend(pending)
                raise
            if update is not None:
                updates.append(update)
            elif self.state is BookState.OUT_OF_SYNC:
                self._buffer.extend(pending)
                break
        if was_out_of_sync and self.state is BookState.LIVE:
            self.resyncs += 1
        return updates

    def apply_diff(self, diff: DepthDiff) -> BookUpdate | None:
        """Apply one depth diff if it is next in sequence.

        Parameters
        ----------
        diff : DepthDiff
            The incremental update.

        Returns
        -------
        BookUpdate or None
            The new top of book, or None when the diff was buffered (no snapshot yet, or out of sync),
            dropped as stale, or (with ``raise_on_gap=False``) revealed a gap.

        Raises
        ------
        BookGap
            When update ids are missing (``raise_on_gap``). The book is then ``out_of_sync``.
        BookInputError
            When the diff holds a level or update ids no book can hold (``raise_on_gap``): nothing of it was
            applied or buffered; a ``live`` book that needed it is then ``out_of_sync``.
        """
        if diff.__class__ is not DepthDiff and not isinstance(diff, DepthDiff):
            raise TypeError(f"OrderBook.apply_diff: expected a DepthDiff, got {type(diff).__name__}")
        first = diff.first_update_id
        final = diff.final_update_id
        if not (first.__class__ is int and final.__class__ is int and 0 <= first <= final < _MAX_ID
                and final - first <= self.max_update_span):
            problem = self._id_problem(first, final)
            if problem is not None:
                self._refuse_diff(diff, problem)
                return None
        if self.state is BookState.LIVE:
            return self._apply_live(diff)
        problem = _level_problem(diff.bids, diff.asks)
        if problem is not None:  # the buffer only holds diffs the resync can apply
            self._refuse_diff(diff, problem)
            return None
        self._buffer_diff(diff)
        return None

    def has_plausible_ids(self, diff: DepthDiff) -> bool:
        """Whether ``diff``'s update ids pass the checks :meth:`apply_diff` makes before anything else."""
        return self._id_problem(diff.first_update_id, diff.final_update_id) is None

    def _id_problem(self, first: object, final: object) -> tuple[str, object, str, str] | None:
        for field, value in (("first_update_id", first), ("final_update_id", final)):
            if not isinstance(value, int) or isinstance(value, bool):
                return field, value, _typed(value), _ID_EXPECTED
            if not 0 <= value < _MAX_ID:
                return field, value, repr(value), _ID_EXPECTED
        assert isinstance(first, int) and isinstance(final, int)
        if first > final:
            return "first_update_id", first, repr(first), f"at most final_update_id {final}"
        span = self.max_update_span
        if final - first > span:
            expected = (f"at most first_update_id + max_update_span = {first + span} (a diff covering more "
                        f"than {span + 1} update ids is implausible)")
            return "final_update_id", final, repr(final), expected
        return None

    def _buffer_diff(self, diff: DepthDiff) -> None:
        if len(self._buffer) >= self.max_buffer:
            self._buffer.popleft()
            self.buffer_dropped += 1
        self._buffer.append(diff)

    def _apply_live(self, diff: DepthDiff) -> BookUpdate | None:
        final = diff.final_update_id
        last = self.last_update_id
        if final <= last:
            problem = _level_problem(diff.bids, diff.asks)  # bad input is refused even when it is old
            if problem is not None:
                self._refuse_diff(diff, problem)
                return None
            self.stale += 1
            return None
        first = diff.first_update_id
        if self._bridged:
            if first != last + 1:
                self._go_out_of_sync(diff, after_snapshot=False)
                return None
        elif first > last + 1:
            self._go_out_of_sync(diff, after_snapshot=True)
            return None

        problem = self._write_levels(diff.bids, diff.asks, replace=False)
        if problem is not None:
            self._refuse_diff(diff, problem)
            return None

        self.last_update_id = final
        self._bridged = True
        self.applied += 1
        bid_px: float | None
        bid_qty: float | None
        ask_px: float | None
        ask_qty: float | None
        if self._bid_keys:
            bid_px = self._bid_keys[-1]
            bid_qty = self._bids[bid_px]
        else:
            bid_px = bid_qty = None
        if self._ask_keys:
            ask_px = -self._ask_keys[-1]
            ask_qty = self._asks[ask_px]
        else:
            ask_px = ask_qty = None
        return BookUpdate(first, final, bid_px, bid_qty, ask_px, ask_qty,
                          len(diff.bids) + len(diff.asks), diff.ts_ns, diff.recv_ts_ns, self.symbol)

    def _write_levels(self, bids: object, asks: object, *, replace: bool) -> tuple[str, object, str, str] | None:
        """Write a message's levels; return the problem instead, writing nothing, if one is impossible.

        The only code that puts levels into the book. Every level is checked before the first is written, so
        a message is applied whole or not at all, and the keys always compare in a total order: the dicts and
        the sorted key lists cannot diverge, whatever arrives.
        """
        problem = _level_problem(bids, asks)
        if problem is not None:
            return problem
        if replace:  # a snapshot
            bid_book = {px: qty for px, qty in bids if qty != 0.0}  # type: ignore[attr-defined]
            ask_book = {px: qty for px, qty in asks if qty != 0.0}  # type: ignore[attr-defined]
            self._bids = bid_book
            self._asks = ask_book
            self._bid_keys = sorted(bid_book)
            self._ask_keys = sorted(-px for px in ask_book)
            return None
        # Hot loop: quantities are absolute; 0 removes the level (removing an absent level is legal:
        # it may lie outside the snapshot's depth).
        book = self._bids
        keys = self._bid_keys
        for px, qty in bids:  # type: ignore[attr-defined]
            if qty == 0.0:
                if book.pop(px, None) is not None:
                    del keys[bisect_left(keys, px)]
            else:
                if px not in book:
                    insort(keys, px)
                book[px] = qty
        book = self._asks
        keys = self._ask_keys
        for px, qty in asks:  # type: ignore[attr-defined]
            if qty == 0.0:
                if book.pop(px, None) is not None:
                    del keys[bisect_left(keys, -px)]
            else:
                if px not in book:
                    insort(keys, -px)
                book[px] = qty
        return None

    def _lose_sync(self) -> None:
        self.state = BookState.OUT_OF_SYNC
        self.gaps += 1
        # Empty the book so that nothing can read levels that are known to be incomplete.
        self._bids = {}
        self._asks = {}
        self._bid_keys = []
        self._ask_keys = []
        self._bridged = False
        self._buffer.clear()

    def _go_out_of_sync(self, diff: DepthDiff, *, after_snapshot: bool) -> None:
        problem = _level_problem(diff.bids, diff.asks)
        if problem is not None:  # never buffer a diff the resync would refuse
            self._refuse_diff(diff, problem)
            return
        expected = self.last_update_id + 1
        self._lose_sync()
        self._buffer_diff(diff)
        if self.raise_on_gap:
            raise BookGap(self.symbol, expected, diff.first_update_id, diff.final_update_id, after_snapshot)

    def _where(self) -> str:
        if self.state is BookState.LIVE:
            return f"live as of update id {self.last_update_id}"
        if self.state is BookState.AWAITING_SNAPSHOT:
            return f"awaiting_snapshot, {len(self._buffer)} diff(s) buffered"
        return f"out_of_sync after update id {self.last_update_id}, {len(self._buffer)} diff(s) buffered"

    def _refuse_diff(self, diff: DepthDiff, problem: tuple[str, object, str, str]) -> None:
        field, value, shown, expected = problem
        self.rejected += 1
        first = diff.first_update_id
        final = diff.final_update_id
        expected_first = self.last_update_id + 1
        after_snapshot = not self._bridged
        # A live book loses sync unless the diff was plainly older than the book (nothing it needed).
        if self.state is BookState.LIVE and not (
                _valid_id(first) and _valid_id(final) and first <= final <= self.last_update_id):
            self._lose_sync()
            outcome = ("the book missed these updates, so it is now out_of_sync, emptied and buffering diffs "
                       "until a new snapshot arrives")
        else:
            outcome = f"the book is unchanged ({self._where()})"
        if self.raise_on_gap:
            raise BookInputError(self.symbol, "diff", first, final, field, value, shown, expected, outcome,
                                 expected_first, after_snapshot)

    def _refuse_snapshot(self, snapshot: DepthSnapshot,
                         problem: tuple[str, object, str, str]) -> list[BookUpdate]:
        field, value, shown, expected = problem
        self.rejected += 1
        if self.raise_on_gap:
            last = snapshot.last_update_id
            raise BookInputError(self.symbol, "snapshot", last, last, field, value, shown, expected,
                                 f"the book is unchanged ({self._where()})", self.last_update_id + 1, True)
        return []

    # ------------------------------------------------------------------ reading
    def _not_ready(self) -> BookNotReady:
        name = f"{self.symbol} order book" if self.symbol else "order book"
        if self.state is BookState.AWAITING_SNAPSHOT:
            why = "no snapshot has been applied yet"
        else:
            why = f"a gap was detected after update id {self.last_update_id}; waiting for a new snapshot"
        return BookNotReady(f"{name} is {self.state.value}, expected live: {why}")

    @property
    def is_live(self) -> bool:
        """Return True when the book is ``live`` (safe to read)."""
        return self.state is BookState.LIVE

    @property
    def buffered(self) -> int:
        """Return the number of diffs waiting for a snapshot."""
        return len(self._buffer)

    def best_bid(self) -> tuple[float, float] | None:
        """Return the best bid as ``(price, qty)``, or None when there are no bids.

        Raises
        ------
        BookNotReady
            When the book is not ``live``.
        """
        if self.state is not BookState.LIVE:
            raise self._not_ready()
        if not self._bid_keys:
            return None
        px = self._bid_keys[-1]
        return px, self._bids[px]

    def best_ask(self) -> tuple[float, float] | None:
        """Return the best ask as ``(price, qty)``, or None when there are no asks.

        Raises
        ------
        BookNotReady
            When the book is not ``live``.
        """
        if self.state is not BookState.LIVE:
            raise self._not_ready()
        if not self._ask_keys:
            return None
        px = -self._ask_keys[-1]
        return px, self._asks[px]

    def qty_at(self, side: str, price: float) -> float:
        """Return the quantity resting at ``price`` on ``side`` (``"buy"``: bids, ``"sell"``: asks), 0.0 if none.

        Raises
        ------
        BookNotReady
            When the book is not ``live``.
        """
        if self.state is not BookState.LIVE:
            raise self._not_ready()
        return (self._bids if side == "buy" else self._asks).get(price, 0.0)

    def mid(self) -> float | None:
        """Return the mid price, or None when a side is empty (raises :class:`BookNotReady` if not live)."""
        bid = self.best_bid()
        ask = self.best_ask()
        if bid is None or ask is None:
            return None
        return (bid[0] + ask[0]) * 0.5

    def spread(self) -> float | None:
        """Return best ask minus best bid, or None when a side is empty."""
        bid = self.best_bid()
        ask = self.best_ask()
        if bid is None or ask is None:
            return None
        return ask[0] - bid[0]

    def is_crossed(self) -> bool:
        """Return True when the best bid is at or above the best ask (a book that cannot be right)."""
        if self.state is not BookState.LIVE:
            raise self._not_ready()
        if not self._bid_keys or not self._ask_keys:
            return False
        return self._bid_keys[-1] >= -self._ask_keys[-1]

    def depth(self, n: int = 10) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
        """Return the top ``n`` levels of each side, best first, as ``(bids, asks)`` lists of (price, qty).

        Raises
        ------
        BookNotReady
            When the book is not ``live``.
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"OrderBook.depth: n must be an int >= 0, got {n!r}")
        if self.state is not BookState.LIVE:
            raise self._not_ready()
        if n == 0:
            return [], []
        bids = self._bids
        asks = self._asks
        return ([(px, bids[px]) for px in reversed(self._bid_keys[-n:])],
                [(-k, asks[-k]) for k in reversed(self._ask_keys[-n:])])

    def iter_bids(self) -> Iterator[tuple[float, float]]:
        """Return an iterator over bid levels, best first, as (price, qty).

        Do not apply updates to the book while iterating.

        Raises
        ------
        BookNotReady
            At the call (not at the first ``next``) when the book is not ``live``.
        """
        if self.state is not BookState.LIVE:
            raise self._not_ready()
        bids = self._bids
        return ((px, bids[px]) for px in reversed(self._bid_keys))

    def iter_asks(self) -> Iterator[tuple[float, float]]:
        """Return an iterator over ask levels, best first, as (price, qty).

        Do not apply updates to the book while iterating.

        Raises
        ------
        BookNotReady
            At the call (not at the first ``next``) when the book is not ``live``.
        """
        if self.state is not BookState.LIVE:
            raise self._not_ready()
        asks = self._asks
        return ((-k, asks[-k]) for k in reversed(self._ask_keys))

    def __len__(self) -> int:
        """Return the number of price levels held (both sides)."""
        return len(self._bids) + len(self._asks)

    def __repr__(self) -> str:
        return (f"OrderBook(symbol={self.symbol!r}, state={self.state.value}, "
                f"last_update_id={self.last_update_id}, bids={len(self._bids)}, asks={len(self._asks)}, "
                f"applied={self.applied}, gaps={self.gaps})")


class BookCheck:
    """Compare a rebuilt book with the venue's best bid/offer stream at every update id both report.

    Feed it every :class:`~kimiha.venues.Quote` (``on_quote``) and every
    :class:`~kimiha.venues.BookUpdate` (``on_update``) in arrival order, whichever comes first: a quote
    whose ``update_id`` equals an update's ``final_update_id`` describes the same book state, so their best
    bid and ask (price and quantity) must be equal.

    Parameters
    ----------
    keep_updates : int, default 256
        Recent book updates kept for quotes that arrive after the diff they match.
    keep_mismatches : int, default 20
        Mismatches kept (as ``(update_id, quote, update)``) for the report.
    keep_quotes : int, default 4096
        Quotes kept while they wait for the update they describe; the oldest are dropped beyond it. Quotes
        are pruned when an update passes them, which assumes update ids that grow: one quote whose id was
        corrupted far ahead, or a book that publishes no update (out of sync), would otherwise keep every
        later quote. The shipped tape never has more than 187 quotes between two depth diffs.

    Attributes
    ----------
    compared, matched : int
        Update ids compared, and those where all four values were equal.
    mismatches : list
        The first ``keep_mismatches`` mismatches.
    quotes_dropped : int
        Waiting quotes dropped for lack of room.
    """

    __slots__ = (
        "_last_final",
        "_quotes",
        "_updates",
        "compared",
        "keep_mismatches",
        "keep_quotes",
        "keep_updates",
        "matched",
        "mismatches",
        "quotes_dropped",
    )

    def __init__(self, *, keep_updates: int = 256, keep_mismatches: int = 20, keep_quotes: int = 4096) -> None:
        for name, value, low in (("keep_updates", keep_updates, 0), ("keep_mismatches", keep_mismatches, 0),
                                 ("keep_quotes", keep_quotes, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidConfigurationError(f"BookCheck: {name} must be an int >= {low}, got {value!r}")
        self.keep_updates = keep_updates
        self.keep_mismatches = keep_mismatches
        self.keep_quotes = keep_quotes
        self.quotes_dropped = 0
        self.compared = 0
        self.matched = 0
        self.mismatches: list[tuple[int, Quote, BookUpdate]] = []
        self._quotes: dict[int, Quote] = {}  # quotes newer than the last update, by update id (ascending)
        self._updates: dict[int, BookUpdate] = {}  # recent updates by final update id (ascending)
        self._last_final = -1

    def on_quote(self, quote: Quote) -> bool | None:
        """Record a quote; return whether it matched the book, or None when there is nothing to compare."""
        update = self._updates.pop(quote.update_id, None)
        if update is not None:
            return self._compare(quote, update)
        if quote.update_id > self._last_final:
            quotes = self._quotes
            quotes[quote.update_id] = quote
            if len(quotes) > self.keep_quotes:
                del quotes[next(iter(quotes))]
                self.quotes_dropped += 1
        return None

    def on_update(self, update: BookUpdate) -> bool | None:
        """Record a book update; return whether it matched a quote, or None when there is none (yet)."""
        final = update.final_update_id
        self._last_final = final
        quotes = self._quotes
        quote = quotes.pop(final, None)
        # Quotes older than this update can no longer meet one: update ids only grow.
        while quotes:
            oldest = next(iter(quotes))
            if oldest >= final:
                break
            del quotes[oldest]
        if quote is not None:
            return self._compare(quote, update)
        updates = self._updates
        updates[final] = update
        if len(updates) > self.keep_updates:
            del updates[next(iter(updates))]
        return None

    def _compare(self, quote: Quote, update: BookUpdate) -> bool:
        self.compared += 1
        ok = (quote.bid_px == update.bid_px and quote.bid_qty == update.bid_qty
              and quote.ask_px == update.ask_px and quote.ask_qty == update.ask_qty)
        if ok:
            self.matched += 1
        elif len(self.mismatches) < self.keep_mismatches:
            self.mismatches.append((quote.update_id, quote, update))
        return ok

    @property
    def match_ratio(self) -> float:
        """Return matched / compared (1.0 when nothing was compared yet)."""
        return self.matched / self.compared if self.compared else 1.0

    def __repr__(self) -> str:
        return f"BookCheck(compared={self.compared}, matched={self.matched})"
