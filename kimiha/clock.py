"""Time as an input: one clock API for live runs and for replays (``self.clock`` of every task).

* :class:`Clock` -- what a task sees: :meth:`~Clock.now_ns`, :meth:`~Clock.set_timer`,
  :meth:`~Clock.set_time_alert`, :meth:`~Clock.cancel_timer`, :meth:`~Clock.timer_names`.
* :class:`LiveClock` -- real time (``time.time_ns()``, nanoseconds since the epoch) on the running loop. Each
  timer has an absolute deadline (a repeating timer's next deadline is its previous one plus the interval,
  never "now plus the interval", so it does not drift), and all the timers of a clock share one loop timer,
  armed for the earliest deadline. A timer that fell behind (a callback slower than its interval, a stalled
  loop) catches up one tick per pass of the loop: every tick still fires, in order, but other callbacks and
  tasks run between two of them, so a slow timer cannot starve the loop (or a shutdown).
* :class:`SimClock` -- simulated time, moved by the data (:meth:`SimClock.advance_to`). Timers due up to the
  new time fire in time order first; timers due at the same nanosecond fire in the order they were set (a
  repeating timer keeps its place). A timer set in the past fires at the next advance. The time never goes
  back: an earlier time is ignored.

Under a :class:`~kimiha.Scheduler` (``Scheduler(bus, clock=...)``, a :class:`LiveClock` by default) every
task reaches the clock as ``self.clock``: a view whose timers belong to that task, are supervised with its
policy (an exception in a callback is counted, logged and handled like one in ``handle_event``) and are
cancelled when the task fails or the scheduler stops. With a :class:`SimClock` each task has its own position
in time: an event task's clock is moved to each event's time (``SimClock(time_of=...)``; by default its
``recv_ts_ns``) right before the task handles it, so a task's timers due before an event fire before that
event reaches it, whatever the process topology or the event loop. A producer moves its own clock (the replay
connector sets it to each line's recorded receive time before publishing the line).

Callbacks receive a :class:`TimeEvent`; a callback may be a plain function or a coroutine function (awaited in
order by :meth:`SimClock.advance_to`; run as a task, supervised, by a :class:`LiveClock`). Under a scheduler
with a :class:`SimClock`, a task whose ``handle_event`` is a plain function handles each event inside the
dispatch of that event, where nothing can be awaited: its timers due before an event fire in that dispatch, so
a coroutine callback could only finish after the event (and when it did would depend on how fast events were
published). Its clock therefore refuses coroutine callbacks where they are set (an
:class:`~kimiha.error.InvalidConfigurationError` that says so), and a plain callback that returns an awaitable
there is reported as the timer's failure, never run late: make the callback plain, or ``handle_event``
``async def`` (then every coroutine callback due before an event completes before the event is handled).
Times are nanoseconds >= 0.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from kimiha.error import InvalidConfigurationError, InvalidStateError

#: SimClock's default bound on the ticks one periodic timer may owe at one advance (see ``max_catch_up``).
DEFAULT_MAX_CATCH_UP = 1_000_000

#: A LiveClock deadline this far behind the wall clock is reported (once per task): it almost always means
#: event time (a recording's ``ts_ns``) meeting real time, i.e. a replay that should run on a SimClock.
STALE_DEADLINE_NS = 60_000_000_000

__all__ = ["Clock", "LiveClock", "SimClock", "TimeEvent", "TimerCallback", "receive_time"]

logger = logging.getLogger("kimiha.clock")


class TimeEvent:
    """What a timer callback receives: the timer's ``name`` and the time it was due, ``ts_ns``."""

    __slots__ = ("name", "ts_ns")

    def __init__(self, name: str, ts_ns: int) -> None:
        self.name = name
        self.ts_ns = ts_ns

    def __repr__(self) -> str:
        return f"TimeEvent(name={self.name!r}, ts_ns={self.ts_ns})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TimeEvent) and (self.name, self.ts_ns) == (other.name, other.ts_ns)

    __hash__ = None  # type: ignore[assignment]


TimerCallback = Callable[[TimeEvent], Any]
ErrorHandler = Callable[[str, BaseException], Any]


def receive_time(event: Any) -> int | None:
    """Return an event's local receive time (its ``recv_ts_ns``), or None when it carries none (or 0)."""
    ts = getattr(event, "recv_ts_ns", None)
    return ts if ts else None


def _log_error(name: str, exc: BaseException) -> None:
    logger.error("timer %r: callback raised %r; the timer goes on", name, exc, exc_info=exc)


def _check_ns(who: str, field: str, value: Any, *, low: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidConfigurationError(f"{who}: {field} must be an int (nanoseconds), got {value!r}")
    if low is not None and value < low:
        raise InvalidConfigurationError(f"{who}: {field} must be >= {low} (nanoseconds), got {value!r}")
    return value


class _Timer:
    __slots__ = ("key", "name", "interval_ns", "callback", "next_ns", "stop_ns", "order", "on_error", "live")

    def __init__(self, key: Any, name: str, interval_ns: int, callback: TimerCallback, next_ns: int,
                 stop_ns: int | None, order: int, on_error: ErrorHandler) -> None:
        self.key = key
        self.name = name
        self.interval_ns = interval_ns  # 0: a one-off alert
        self.callback = callback
        self.next_ns = next_ns
        self.stop_ns = stop_ns
        self.order = order
        self.on_error = on_error
        self.live = True


class _Table:
    """Timers by key, and a heap of ``(due_ns, order, timer)`` with lazy removal (stale entries skipped)."""

    def __init__(self) -> None:
        self.timers: dict[Any, _Timer] = {}
        self.heap: list[tuple[int, int, _Timer]] = []
        self.order = 0

    def add(self, timer: _Timer) -> None:
        self.timers[timer.key] = timer
        heapq.heappush(self.heap, (timer.next_ns, timer.order, timer))

    def next_order(self) -> int:
        self.order += 1
        return self.order

    def remove(self, key: Any) -> bool:
        timer = self.timers.pop(key, None)
        if timer is None:
            return False
        timer.live = False
        return True

    def earliest(self) -> int | None:
        heap = self.heap
        while heap and (not heap[0][2].live or heap[0][2].next_ns != heap[0][0]):
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def pop_due(self, now: int) -> tuple[_Timer, int] | None:
        """Take the earliest timer due at or before ``now`` and move it to its next deadline (or remove it)."""
        if (due := self.earliest()) is None or due > now:
            return None
        timer = heapq.heappop(self.heap)[2]
        nxt = due + timer.interval_ns
        if timer.interval_ns and (timer.stop_ns is None or nxt <= timer.stop_ns):
            timer.next_ns = nxt
            heapq.heappush(self.heap, (nxt, timer.order, timer))
        else:
            self.remove(timer.key)
        return timer, due


def _is_coroutine_function(callback: Any) -> bool:
    return inspect.iscoroutinefunction(callback) or inspect.iscoroutinefunction(getattr(callback, "__call__", None))


def _call(timer: _Timer, due: int) -> Any:
    """Call ``timer``'s callback; return what it returned (an awaitable is the caller's), errors reported."""
    try:
        return timer.callback(TimeEvent(timer.name, due))
    except Exception as exc:
        timer.on_error(timer.name, exc)
        return None


async def _await_callback(timer: _Timer, result: Any) -> None:
    try:
        await result
    except (Exception, asyncio.CancelledError) as exc:
        task = asyncio.current_task()
        if isinstance(exc, asyncio.CancelledError) and task is not None and task.cancelling():
            raise
        timer.on_error(timer.name, exc)


def _spawn(timer: _Timer, result: Any, tasks: set[Any]) -> None:
    """Run a callback's awaitable as a supervised task kept in ``tasks``. A task cancelled before it started
    (the clock closed) closes the callback's coroutine: it never ran, and is not "never awaited"."""
    task = asyncio.ensure_future(_await_callback(timer, result))
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    if inspect.iscoroutine(result):
        task.add_done_callback(lambda done: result.close() if done.cancelled() else None)


class Clock:
    """The clock a task reads and sets timers on; see the module's docstring for the two kinds.

    Timer names are unique per clock view (per task under a scheduler): setting a name that is still
    active is an error; cancel it first.
    """

    #: True for a clock moved by the data (:class:`SimClock`), False for real time.
    simulated: bool = False

    def __init__(self) -> None:
        self._table = _Table()
        self._owner: Any = None  # views share their root's table and key their timers by owner
        self._label: str | None = None  # a task's view: "task 'name'" (set by the scheduler)
        self._on_error: ErrorHandler = _log_error

    # -- reading --------------------------------------------------------------------------------------------
    def now_ns(self) -> int:
        """Return the current time, in nanoseconds since the epoch (simulated time for a :class:`SimClock`)."""
        raise NotImplementedError

    # -- timers ---------------------------------------------------------------------------------------------
    def set_timer(self, name: str, interval_ns: int, callback: TimerCallback, *, start_ns: int | None = None,
                  stop_ns: int | None = None) -> None:
        """Call ``callback(TimeEvent)`` every ``interval_ns`` nanoseconds.

        The first call is due at ``(start_ns or now) + interval_ns``, then every ``interval_ns`` after that
        deadline (absolute: a late callback does not shift the next ones), the last one at or before
        ``stop_ns`` when given.
        """
        who = f"{type(self).__name__}.set_timer({name!r})"
        _check_ns(who, "interval_ns", interval_ns, low=1)
        start = self.now_ns() if start_ns is None else _check_ns(who, "start_ns", start_ns, low=0)
        if stop_ns is not None:
            _check_ns(who, "stop_ns", stop_ns, low=0)
            if stop_ns < start + interval_ns:
                raise InvalidConfigurationError(
                    f"{who}: stop_ns ({stop_ns}) is before the first deadline ({start + interval_ns}); the timer "
                    f"would never fire")
        self._add("set_timer", name, interval_ns, callback, start + interval_ns, stop_ns)

    def set_time_alert(self, name: str, at_ns: int, callback: TimerCallback) -> None:
        """Call ``callback(TimeEvent)`` once, at ``at_ns`` (as soon as possible when that is past)."""
        _check_ns(f"{type(self).__name__}.set_time_alert({name!r})", "at_ns", at_ns, low=0)
        self._add("set_time_alert", name, 0, callback, at_ns, None)

    def cancel_timer(self, name: str) -> bool:
        """Cancel the timer or alert ``name``; return False when no such timer is active."""
        found = self._table.remove((self._owner, name))
        if found:
            self._rearm()
        return found

    def cancel_all(self) -> None:
        """Cancel every timer of this clock (of this task's view under a scheduler)."""
        for key in [k for k in self._table.timers if k[0] == self._owner]:
            self._table.remove(key)
        self._rearm()

    def timer_names(self) -> list[str]:
        """Return the names of the active timers and alerts, in the order they were set."""
        own = [t for t in self._table.timers.values() if t.key[0] == self._owner]
        return [t.name for t in sorted(own, key=lambda t: t.order)]

    def next_deadline_ns(self) -> int | None:
        """Return the earliest deadline of any active timer of this clock (all views), or None."""
        return self._table.earliest()

    async def advance_to(self, ts_ns: int) -> None:
        """Move a simulated clock to ``ts_ns``, firing the timers due by then (see :class:`SimClock`)."""
        raise InvalidStateError(
            f"{type(self).__name__} follows real time: advance_to() is for a SimClock (Scheduler(bus, "
            f"clock=SimClock()))")

    # -- internals ------------------------------------------------------------------------------------------
    def _add(self, method: str, name: str, interval_ns: int, callback: TimerCallback, first_ns: int,
             stop_ns: int | None) -> None:
        who = f"{type(self).__name__}.{method}"
        if not isinstance(name, str) or not name:
            raise InvalidConfigurationError(f"{who}: name must be a non-empty str, got {name!r}")
        if not callable(callback):
            raise InvalidConfigurationError(f"{who}({name!r}): callback must be callable, got {callback!r}")
        inline = getattr(self, "_inline", None)
        if inline is not None and _is_coroutine_function(callback):
            raise InvalidConfigurationError(
                f"{who}({name!r}): the callback {callback!r} is a coroutine function, but {inline} has a plain "
                f"handle_event: under a SimClock its timers fire inside the dispatch of the event that passes "
                f"them, where a coroutine cannot be awaited, so it would finish after that event. Make the "
                f"callback a plain function, or make handle_event `async def`")
        key = (self._owner, name)
        if key in self._table.timers:
            raise InvalidConfigurationError(
                f"{who}({name!r}): a timer of that name is already active; cancel_timer({name!r}) first or pick "
                f"another name (active: {', '.join(self.timer_names())})")
        self._check_deadline(f"{who}({name!r})", first_ns, interval_ns)
        table = self._table
        table.add(_Timer(key, name, interval_ns, callback, first_ns, stop_ns, table.next_order(),
                         self._on_error))
        self._rearm()

    def _check_deadline(self, who: str, first_ns: int, interval_ns: int) -> None:
        """A new timer's first deadline is ``first_ns`` (a live clock reports one far in the past)."""

    def _rearm(self) -> None:
        """The earliest deadline may have changed (a live clock re-arms its loop timer)."""

    def _for_task(self, owner: Any, on_error: ErrorHandler,
                  time_of: Callable[[Any], int | None] | None = None) -> Clock:
        raise NotImplementedError

    def _close(self) -> None:
        """Cancel every timer (the scheduler stopped)."""


class LiveClock(Clock):
    """Real time on the running event loop; every timer of the clock shares one loop timer.

    ``now_ns()`` is ``time.time_ns()`` (the epoch base of recorded and live market data). A deadline is
    converted to the loop's own clock when the loop timer is armed, so a wall-clock step does not bunch up
    callbacks; a callback that runs late does not move the next deadline of a repeating timer.
    """

    simulated = False

    def __init__(self) -> None:
        super().__init__()
        self._root = self
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stale_warned: set[Any] = set()
        self.fired = 0

    def now_ns(self) -> int:
        return time.time_ns()

    def _check_deadline(self, who: str, first_ns: int, interval_ns: int) -> None:
        behind = time.time_ns() - first_ns
        if behind <= STALE_DEADLINE_NS:
            return
        warned = self._root._stale_warned
        if self._owner in warned:
            return
        warned.add(self._owner)
        task = f"{self._label}: " if self._label else ""
        then = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(first_ns / 1e9))
        late = ("it fires at once" if not interval_ns else
                f"it fires at once and then catches up every one of the {behind // interval_ns:,} ticks since")
        logger.warning(
            "%s%s: the first deadline (%d ns since the epoch, %s) is %.0f s behind the LiveClock's wall-clock "
            "time; %s. Times taken from recorded events (ts_ns, recv_ts_ns) are far behind real time: run a "
            "replay on a SimClock (TradingOrchestratorBuilder(bus, clock=SimClock()) or Scheduler(bus, "
            "clock=SimClock())), or base live deadlines on self.clock.now_ns(). Said once per task.",
            task, who, first_ns, then, behind / 1e9, late)

    def _rearm(self) -> None:
        root = self._root
        due = root._table.earliest()
        if due == root._armed_for and (due is None or root._handle is not None):
            return
        if root._handle is not None:
            root._handle.cancel()
            root._handle = None
        root._armed_for = due
        if due is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            root._armed_for = None
            raise InvalidStateError(
                "LiveClock: timers need a running event loop; set them from a coroutine, a handler or "
                "initialize()") from None
        root._loop = loop
        root._handle = loop.call_at(loop.time() + max(due - time.time_ns(), 0) / 1e9, root._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_for = None
        table = self._table
        now = time.time_ns()
        # Each timer fires at most once per pass: one that fell behind (a callback slower than its interval,
        # a stalled loop) catches up one tick per loop iteration, so other callbacks and tasks run between
        # its ticks instead of the pass growing without bound. Its deadlines stay on its absolute grid.
        fired: set[Any] = set()
        held: list[tuple[int, int, _Timer]] = []
        while (due := table.earliest()) is not None and due <= now:
            if table.heap[0][2].key in fired:
                held.append(heapq.heappop(table.heap))
                continue
            popped = table.pop_due(now)
            assert popped is not None
            timer, due = popped
            fired.add(timer.key)
            self.fired += 1
            result = _call(timer, due)
            if inspect.isawaitable(result):
                _spawn(timer, result, self._tasks)
        for entry in held:
            heapq.heappush(table.heap, entry)
        self._rearm()

    def _for_task(self, owner: Any, on_error: ErrorHandler,
                  time_of: Callable[[Any], int | None] | None = None) -> Clock:
        view = LiveClock.__new__(LiveClock)
        Clock.__init__(view)
        view._table = self._table
        view._root = self
        view._owner = owner
        view._on_error = on_error
        view._handle = None
        view._armed_for = None
        view._loop = None
        view._tasks = self._tasks
        view.fired = 0
        return view

    def _close(self) -> None:
        root = self._root
        for key in list(root._table.timers):
            root._table.remove(key)
        if root._handle is not None:
            root._handle.cancel()
            root._handle = None
        root._armed_for = None
        for task in list(root._tasks):
            task.cancel()


class SimClock(Clock):
    """Simulated time, moved by the data with :meth:`advance_to`.

    Parameters
    ----------
    start_ns : int, optional
        The time before the first advance. Left out, the clock has no time until the data gives it one:
        ``now_ns()`` is 0 and :attr:`started` False until then, and a periodic timer set before then without
        ``start_ns`` (in a task's ``initialize``, say) counts its first interval from that first time (its
        ``stop_ns`` stays absolute). Under a scheduler each task's view starts at the first time of the
        task's own events. From 0 instead, such a timer would fire once per interval over the decades up to
        the data's epoch timestamps.
    time_of : callable, optional
        Under a scheduler: ``time_of(event)`` gives the time an event task's clock moves to before the task
        handles ``event`` (None: the event does not move it). Default :func:`receive_time` (the event's
        ``recv_ts_ns``); pick the events that carry the data's own time, never ones whose arrival depends on
        how fast another task answered (a fill, say), or the replay stops being deterministic.
    max_catch_up : int or None, default 1,000,000
        Most ticks one periodic timer may owe at one advance. A timer further behind the data than that (a
        tiny interval across a gap in the data, an explicit ``start_ns`` far before it) fires once, at its
        last deadline before the new time, and the skipped ticks are reported as the timer's failure (with
        the task's supervision) instead of being called one by one for hours. None: every tick fires.
    """

    simulated = True

    def __init__(self, start_ns: int | None = None, *,
                 time_of: Callable[[Any], int | None] = receive_time,
                 max_catch_up: int | None = DEFAULT_MAX_CATCH_UP) -> None:
        super().__init__()
        if start_ns is not None:
            _check_ns("SimClock", "start_ns", start_ns, low=0)
        if not callable(time_of):
            raise InvalidConfigurationError(f"SimClock: time_of must be callable, got {time_of!r}")
        if max_catch_up is not None and (isinstance(max_catch_up, bool) or not isinstance(max_catch_up, int)
                                         or max_catch_up < 1):
            raise InvalidConfigurationError(
                f"SimClock: max_catch_up expected an int >= 1 (ticks) or None, got {max_catch_up!r}")
        self.max_catch_up = max_catch_up
        self._now = 0 if start_ns is None else start_ns
        #: Whether this clock (a task's view: its own events) has a time yet: start_ns given, or data moved it.
        self._started = start_ns is not None
        #: Periodic timers set before the clock had a time: their first interval counts from its first time.
        self._floating: list[_Timer] = []
        self.time_of = time_of
        self._parent: SimClock | None = None
        self._views: list[SimClock] = []
        self._tasks: set[asyncio.Future[Any]] = set()
        self.fired = 0
        #: Set by the scheduler on the view of a task with a plain handle_event ("task 'name'"): its timers
        #: fire inside an event's dispatch, so coroutine callbacks are refused (see the module's docstring).
        self._inline: str | None = None

    def now_ns(self) -> int:
        return self._now

    @property
    def root(self) -> SimClock:
        """The scheduler's clock this task view belongs to (itself when it is not a view): its time is the
        latest any of its views reached."""
        return self._parent if self._parent is not None else self

    @property
    def started(self) -> bool:
        """Whether this clock has a time: ``start_ns`` was given, or the data has moved it (a task's view:
        the task's own events)."""
        return self._started

    def set_timer(self, name: str, interval_ns: int, callback: TimerCallback, *, start_ns: int | None = None,
                  stop_ns: int | None = None) -> None:
        if not self._started and start_ns is None and stop_ns is not None:
            _check_ns(f"SimClock.set_timer({name!r})", "stop_ns", stop_ns, low=0)
            _check_ns(f"SimClock.set_timer({name!r})", "interval_ns", interval_ns, low=1)
            # No time yet: the first deadline is the first time + interval; stop_ns is checked against it then.
            self._add("set_timer", name, interval_ns, callback, interval_ns, stop_ns)
        else:
            super().set_timer(name, interval_ns, callback, start_ns=start_ns, stop_ns=stop_ns)
        if not self._started and start_ns is None:
            self._floating.append(self._table.timers[(self._owner, name)])

    def _start(self, ts_ns: int) -> None:
        """The data gives the clock its first time: anchor the timers set before it there."""
        self._started = True
        table = self._table
        for timer in self._floating:
            if not timer.live:
                continue
            timer.next_ns += ts_ns
            if timer.stop_ns is not None and timer.next_ns > timer.stop_ns:
                table.remove(timer.key)
                timer.on_error(timer.name, InvalidConfigurationError(
                    f"timer {timer.name!r}: its first deadline, the clock's first time {ts_ns} + interval "
                    f"{timer.interval_ns} ns, is after its stop_ns {timer.stop_ns}: it never fires (removed)"))
                continue
            heapq.heappush(table.heap, (timer.next_ns, timer.order, timer))
        self._floating.clear()
        parent = self._parent
        if parent is not None and not parent._started:
            parent._start(ts_ns)          # the scheduler's clock has a time once any task's view has one

    def due_by(self, ts_ns: int) -> bool:
        """Return whether a timer is due at or before ``ts_ns`` (an advance to it would fire one)."""
        due = self._table.earliest()
        return due is not None and due <= ts_ns

    def set_time(self, ts_ns: int) -> bool:
        """Move the clock to ``ts_ns`` when no timer is due by then and return True; else return False
        (call :meth:`advance_to`, which fires them). The cheap path of a producer setting the time per line."""
        if not self._started:
            self._start(ts_ns)
        if ts_ns <= self._now:
            return True
        due = self._table.earliest()
        if due is not None and due <= ts_ns:
            return False
        self._now = ts_ns
        parent = self._parent
        if parent is not None and ts_ns > parent._now:
            parent._now = ts_ns
        return True

    async def advance_to(self, ts_ns: int) -> None:
        """Fire, in time order (ties: the order they were set), every timer due at or before ``ts_ns``, each
        with the clock at its deadline; then set the clock to ``ts_ns``. An earlier time than now is ignored.

        A coroutine callback is awaited before the next one fires. Timers set by a callback are due in this
        same advance when their deadline is at or before ``ts_ns``.
        """
        for timer, pending in self._fire_due(ts_ns):
            await _await_callback(timer, pending)

    def advance_now(self, ts_ns: int) -> None:
        """:meth:`advance_to` for a caller that cannot await: coroutine callbacks are started as tasks instead
        of awaited, so they finish later, not before the next timer. On the view of a scheduler's task with a
        plain ``handle_event`` (which calls this before each event) an awaitable a callback returns is not run
        at all: it is closed and reported as the timer's failure, since it could only finish after the event."""
        inline = self._inline
        for timer, pending in self._fire_due(ts_ns):
            if inline is None:
                _spawn(timer, pending, self._tasks)
                continue
            if inspect.iscoroutine(pending):
                pending.close()
            timer.on_error(timer.name, InvalidStateError(
                f"timer {timer.name!r} of {inline}: the callback returned an awaitable ({type(pending).__name__}), "
                f"which cannot be awaited before the event that passed its deadline (handle_event is a plain "
                f"function); it was not run. Make the callback a plain function, or handle_event `async def`"))

    def _fire_due(self, ts_ns: int) -> Iterator[tuple[_Timer, Any]]:
        """Fire the timers due by ``ts_ns`` in order, yielding each awaitable a callback returned (the caller
        awaits or schedules it before the next timer fires); then move the clock to ``ts_ns``."""
        if not self._started:
            self._start(ts_ns)
        if ts_ns <= self._now:
            ts_ns = self._now
        table = self._table
        limit = self.max_catch_up
        while (popped := table.pop_due(ts_ns)) is not None:
            timer, due = popped
            if limit is not None and timer.interval_ns and (ts_ns - due) // timer.interval_ns > limit:
                due = self._skip_ticks(timer, due, ts_ns)
            if due > self._now:
                self._now = due
            self.fired += 1
            result = _call(timer, due)
            if inspect.isawaitable(result):
                yield timer, result
        self._now = ts_ns
        parent = self._parent
        if parent is not None and ts_ns > parent._now:
            parent._now = ts_ns

    def _skip_ticks(self, timer: _Timer, due: int, ts_ns: int) -> int:
        """``timer`` owes more than ``max_catch_up`` ticks by ``ts_ns``: move it to its last deadline at or
        before ``ts_ns`` (returned: it fires there once), report the skipped ticks as its failure."""
        interval = timer.interval_ns
        owed = (ts_ns - due) // interval
        last = due + owed * interval
        nxt = last + interval
        if timer.stop_ns is not None and last > timer.stop_ns:
            owed = (timer.stop_ns - due) // interval
            last = due + owed * interval
            nxt = timer.stop_ns + 1
        if timer.live:
            if timer.stop_ns is None or nxt <= timer.stop_ns:
                timer.next_ns = nxt
                heapq.heappush(self._table.heap, (nxt, timer.order, timer))  # the older entry goes stale
            else:
                self._table.remove(timer.key)
        timer.on_error(timer.name, InvalidStateError(
            f"timer {timer.name!r} (every {interval} ns) owed {owed + 1:,} ticks, from {due} to {ts_ns}, when the "
            f"clock moved (more than max_catch_up={self.max_catch_up:,}): {owed:,} were skipped and it fires "
            f"once, at {last}. A gap in the data, or a start of the clock or timer far before it? "
            f"SimClock(max_catch_up=None) fires every tick"))
        return last

    def _for_task(self, owner: Any, on_error: ErrorHandler,
                  time_of: Callable[[Any], int | None] | None = None) -> Clock:
        view = SimClock(self._now if self._started else None, time_of=time_of or self.time_of,
                        max_catch_up=self.max_catch_up)
        view._parent = self
        view._owner = owner
        view._on_error = on_error
        self._views.append(view)
        return view

    def _close(self) -> None:
        for clock in (self, *self._views):
            for key in list(clock._table.timers):
                clock._table.remove(key)
            for task in list(clock._tasks):
                task.cancel()
