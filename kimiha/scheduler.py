"""The scheduler: runs background and event-driven tasks over an :class:`~kimiha.EventBus`, supervised.

Lifecycle (the original framework's shape, with its flaws fixed):

* ``register_background_task`` / ``register_event_task`` return a task id; nothing runs yet.
* ``await start()`` checks every event task's channels (one error listing all missing ones), subscribes
  every event task *before* anything can publish, initializes tasks in registration order (rolling back on
  failure), starts dispatch, then the background loops.
* ``await shutdown()`` stops tasks in the order data flows through them (producers, then the event tasks'
  drain stages, then background tasks that read channels), within one deadline; runs every ``shutdown`` hook
  in reverse order even when some fail, and raises one :class:`~kimiha.TaskShutdownError` carrying every
  failure. :meth:`Scheduler.stop_plan` shows that order; :mod:`kimiha.scheduling.shutdown` details it.

Failures inside ``execute`` / ``handle_event`` follow the task's :class:`Supervision` policy; so does a
``CancelledError`` the task was not asked for (``Task.cancelling()`` tells the two apart).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from kimiha._core import LatencyHistogram, Subscription, monotonic_ns
from kimiha.clock import Clock, LiveClock, SimClock
from kimiha.error import (
    ChannelClosed,
    InvalidChannelError,
    InvalidConfigurationError,
    InvalidStateError,
    TaskExecutionError,
    TaskInitializationError,
    TaskShutdownError,
)
from kimiha.event_bus import EventBus
from kimiha.logs import fields, safe_repr
from kimiha.scheduling.registry import (
    SCHEDULER_TRANSITIONS,
    SchedulerState,
    TaskInfo,
    TaskRegistry,
    TaskState,
    task_name,
)
from kimiha.scheduling.shutdown import StopSequence, stop_phases
from kimiha.scheduling.signals import take_signal
from kimiha.scheduling.supervision import OnError, Supervision, Supervisor, cancel_requested
from kimiha.types import BackgroundTask, EventTask, Executable

__all__ = [
    "OnError",
    "Supervision",
    "TaskState",
    "SchedulerState",
    "TaskInfo",
    "TaskRegistry",
    "Scheduler",
]

logger = logging.getLogger("kimiha.scheduler")


def _as_channels(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (tuple, list, set, frozenset)):
        return tuple(value)
    return (value,)


def _placeholder(task: Any, method: str, base: type) -> bool:
    """Whether ``task.method`` is still the placeholder ``base`` defines (no class in between wrote one)."""
    return getattr(getattr(task, method, None), "__func__", None) is base.__dict__[method]


class _UntimedWarning:
    """Say once when a task's events give its SimClock no time while timers wait on it (they never fire)."""

    __slots__ = ("info", "clock", "said")

    def __init__(self, info: TaskInfo, clock: SimClock) -> None:
        self.info = info
        self.clock = clock
        self.said = False

    def check(self, event: Any) -> None:
        if self.said or self.clock.started or not self.clock.timer_names():
            return
        self.said = True
        logger.warning(
            "task %r: its event %s gives its SimClock no time (time_of returned None: the default reads "
            "recv_ts_ns, which %s has not), so the task's clock does not move and its timers %s wait; give "
            "the events a recv_ts_ns or the clock a time_of= that reads their time",
            self.info.name, type(event).__name__, type(event).__name__,
            ", ".join(self.clock.timer_names()), extra=fields(self.info.name))


class Scheduler:
    """Runs background tasks and event tasks over ``bus``, supervised, with a clean shutdown.

    Parameters
    ----------
    bus : EventBus
        The bus whose channels event tasks subscribe to.
    shutdown_timeout : float
        Default deadline (seconds) of :meth:`shutdown` for stopping loops and draining event tasks.
    clock : Clock, optional
        The time of every task, reached as ``task.clock`` (:mod:`kimiha.clock`): a :class:`~kimiha.clock.LiveClock`
        by default; a :class:`~kimiha.clock.SimClock` for a replay, which moves each event task's clock to the
        time of each event (``SimClock.time_of``) before the task handles it.

    Use it as ``async with Scheduler(bus) as s:`` -- register tasks, ``await s.start()``; leaving the block
    shuts it down.
    """

    def __init__(self, bus: EventBus, *, shutdown_timeout: float = 10.0, name: str = "scheduler",
                 clock: Clock | None = None) -> None:
        if clock is None:
            clock = LiveClock()
        elif not isinstance(clock, Clock):
            raise InvalidConfigurationError(
                f"Scheduler(clock=...): expected a kimiha.clock.Clock (LiveClock or SimClock), got {clock!r}")
        if not isinstance(bus, EventBus):
            raise InvalidConfigurationError(f"Scheduler(bus): expected an EventBus, got {type(bus).__name__}")
        if not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout <= 0:
            raise InvalidConfigurationError(
                f"Scheduler.shutdown_timeout: expected seconds > 0, got {shutdown_timeout!r}"
            )
        self.bus = bus
        self.name = name
        self.clock = clock
        self.shutdown_timeout = float(shutdown_timeout)
        self.registry = TaskRegistry()
        self.state = SchedulerState.CREATED
        self.failure: BaseException | None = None
        self.last_shutdown: dict[str, Any] = {}
        self._next_id = 1
        self._stopping = False
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        #: the shutdown hooks the stop sequence is running (each in a task of its own)
        self._hook_tasks: set[asyncio.Future[Any]] = set()
        self._start_task: asyncio.Task[Any] | None = None  # the task running start(), while it runs
        self._start_cancelled = False  # shutdown() cancelled that task
        self._rolling_back = False
        self._rollback_timeout: float | None = None
        self._background: list[asyncio.Task[Any]] = []
        self._supervisor = Supervisor(self)
        #: Groups of event-task ids drained one after another at shutdown (what a stage publishes while it
        #: drains reaches the next stage). ``None``: every event task drains at once.
        self.drain_stages: list[list[int]] | None = None

    # -- state --------------------------------------------------------------------------------------------------

    def _set_state(self, new: SchedulerState) -> None:
        if new not in SCHEDULER_TRANSITIONS[self.state]:
            raise InvalidStateError(
                f"{self.name}: cannot go from state {self.state.value!r} to {new.value!r}"
            )
        old, self.state = self.state, new
        if logger.isEnabledFor(logging.INFO):  # what --log-level info / debug shows of a run's life
            logger.info("scheduler %r: %s -> %s (%d tasks)", self.name, old.value, new.value, len(self.registry))

    def __repr__(self) -> str:
        return f"<Scheduler {self.name!r} state={self.state.value} tasks={len(self.registry)}>"

    # -- registration -------------------------------------------------------------------------------------------

    def _register(self, task: Any, kind: str, supervision: Supervision | None, interval: float | None,
                  channels: tuple[Any, ...]) -> int:
        if self.state is not SchedulerState.CREATED:
            raise InvalidStateError(
                f"{self.name}: cannot register task {task_name(task)!r} in state {self.state.value!r}; "
                f"register every task before start()"
            )
        for info in self.registry:
            if info.task is task:
                raise InvalidConfigurationError(
                    f"{self.name}: task {info.name!r} is already registered (id {info.id}); register each task "
                    f"object once (another instance of {type(task).__name__} is a task of its own)"
                )
        if supervision is None:
            supervision = Supervision()
        elif not isinstance(supervision, Supervision):
            raise InvalidConfigurationError(
                f"task {task_name(task)!r}: supervision must be a Supervision, got {supervision!r}"
            )
        if supervision.on_error is None:
            default = OnError.RESTART if kind == "background" else OnError.SKIP
            supervision = Supervision(**{**supervision.__dict__, "on_error": default})
        info = TaskInfo(self._next_id, task, kind, supervision, interval, channels)
        self._next_id += 1
        info.clock = self.clock._for_task(info.id, self._timer_error_cb(info))
        info.clock._label = f"task {info.name!r}"  # what the clock's own warnings call this task's view
        if kind == "event" and isinstance(info.clock, SimClock) and \
                not inspect.iscoroutinefunction(getattr(task, "handle_event", None)):
            # its timers fire inside each event's dispatch: the clock refuses coroutine callbacks (kimiha.clock)
            info.clock._inline = f"task {task_name(task)!r}"
        if isinstance(task, Executable):  # a duck-typed task may have a `clock` of its own: left alone
            task.clock = info.clock
        self.registry._add(info)
        return info.id

    def register_background_task(self, task: BackgroundTask, *, interval: float | None = None,
                                 supervision: Supervision | None = None) -> int:
        """Register ``task``, whose ``execute()`` runs in a loop until shutdown; return its id.

        ``interval`` paces the loop (seconds between the end of one ``execute`` and the next); without it the
        loop still yields to the event loop after every ``execute``. A task that reads channels (its
        ``consumes()``, or the subscriptions it opens in ``initialize``) is stopped after the event tasks
        drained, not with the producers (see :meth:`stop_plan`).
        """
        if isinstance(task, BackgroundTask) and _placeholder(task, "execute", BackgroundTask):
            raise InvalidConfigurationError(
                f"register_background_task: task {task_name(task)!r} ({type(task).__qualname__}) does not "
                f"define execute(); a BackgroundTask must define `async def execute(self)`, which the scheduler "
                f"runs in a loop until shutdown"
            )
        execute = getattr(task, "execute", None)
        if not callable(execute) or not inspect.iscoroutinefunction(execute):
            raise InvalidConfigurationError(
                f"register_background_task: {task_name(task)!r} must have an `async def execute()`, "
                f"got {execute!r}"
            )
        if interval is not None and (not isinstance(interval, (int, float)) or interval < 0):
            raise InvalidConfigurationError(
                f"register_background_task({task_name(task)!r}): interval must be seconds >= 0, got {interval!r}"
            )
        consumes = getattr(task, "consumes", None)
        channels: tuple[Any, ...] = ()
        if callable(consumes):
            try:
                channels = _as_channels(consumes())
            except Exception as exc:
                raise InvalidConfigurationError(
                    f"register_background_task: {task_name(task)!r}.consumes() raised {exc!r}"
                ) from exc
        return self._register(task, "background", supervision, interval, channels)

    def register_event_task(self, task: EventTask, *, supervision: Supervision | None = None) -> int:
        """Register ``task``, which handles the events of ``task.subscribed_event()``; return its id."""
        if isinstance(task, EventTask):
            missing = [shown for method, shown in (("subscribed_event", "subscribed_event()"),
                                                   ("handle_event", "handle_event(event)"))
                       if _placeholder(task, method, EventTask)]
            if missing:
                raise InvalidConfigurationError(
                    f"register_event_task: task {task_name(task)!r} ({type(task).__qualname__}) does not define "
                    f"{' or '.join(missing)}; an EventTask must define subscribed_event() (the channel, or a "
                    f"tuple of channels, it handles) and handle_event(event)"
                )
        handler = getattr(task, "handle_event", None)
        subscribed = getattr(task, "subscribed_event", None)
        if not callable(handler) or not callable(subscribed):
            raise InvalidConfigurationError(
                f"register_event_task: {task_name(task)!r} must define subscribed_event() and "
                f"handle_event(event)"
            )
        try:
            channels = _as_channels(subscribed())
        except Exception as exc:
            raise InvalidConfigurationError(
                f"register_event_task: {task_name(task)!r}.subscribed_event() raised {exc!r}"
            ) from exc
        if not channels:
            raise InvalidConfigurationError(
                f"register_event_task: {task_name(task)!r}.subscribed_event() named no channel"
            )
        for i, channel in enumerate(channels):
            if channel in channels[:i]:
                raise InvalidConfigurationError(
                    f"register_event_task: task {task_name(task)!r}: subscribed_event() names channel {channel} "
                    f"twice ({', '.join(str(c) for c in channels)}); each channel must appear once, or the "
                    f"handler would get every event of that channel twice"
                )
        return self._register(task, "event", supervision, None, channels)

    # -- start --------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, initialize (in registration order), start dispatch, then the background loops.

        A failing ``initialize`` rolls back what was started (every hook of an initialized task runs, failures
        are added to the error as notes and to ``last_shutdown``). So does cancelling ``start()``, and
        ``shutdown()`` while it runs: the caller of ``start()`` then gets a
        :class:`~kimiha.TaskInitializationError` saying it was interrupted.
        """
        if self.state is not SchedulerState.CREATED:
            raise InvalidStateError(f"{self.name}: start() called in state {self.state.value!r}; start once")
        missing = [
            f"{info.name!r} -> {channel!r}"
            for info in self.registry
            for channel in info.channels
            if not self.bus.has_channel(channel)
        ]
        if missing:
            known = ", ".join(str(c) for c in self.bus.channels) or "none"
            raise InvalidChannelError(
                f"{self.name}: tasks read channels the bus does not have: {'; '.join(missing)}. "
                f"Known channels: {known}"
            )
        self._set_state(SchedulerState.STARTING)
        self.bus.bind_loop()
        me = asyncio.current_task()
        self._start_task = me
        current: TaskInfo | None = None
        try:
            for info in self.registry:  # every consumer has its cursor before anything can publish
                if info.kind == "event":
                    self._subscribe(info)
            for info in self.registry:
                if self._stopping:  # shutdown() came while an initialize() that ignored its cancel ran
                    raise self._interrupted(None)
                current = info
                info.transition(TaskState.INITIALIZING)
                before = self._pull_subscriptions() if info.kind == "background" else None
                try:
                    await info.task.initialize()
                except Exception as exc:
                    info.transition(TaskState.FAILED)
                    info.errors += 1
                    info.last_error = repr(exc)
                    raise TaskInitializationError(
                        f"{self.name}: task {info.name!r} (id {info.id}) failed to initialize: {exc!r}; "
                        f"started tasks were rolled back"
                    ) from exc
                if before is not None:
                    info.found_subscriptions = [weakref.ref(sub) for sub in self._pull_subscriptions()
                                                if not any(sub is old for old in before)]
                info.initialized = True
                info.transition(TaskState.RUNNING)
                info.started_at = time.time()
                current = None
            if self._stopping:
                raise self._interrupted(None)
        except BaseException as exc:
            error: BaseException = exc
            if self._start_cancelled and me is not None:
                self._start_cancelled = False
                # our own cancel, not the caller's: say what happened instead of passing a CancelledError on
                if me.uncancel() == 0 and isinstance(exc, asyncio.CancelledError):
                    error = self._interrupted(current)
            if current is not None and current.state is TaskState.INITIALIZING:
                current.last_error = f"initialize() interrupted: {error!r}"
            self._rolling_back = True
            timeout = self._rollback_timeout or self.shutdown_timeout
            failures = await StopSequence(self, timeout).rollback()
            for failure in failures:
                error.add_note(f"rollback: {failure!r}")
            if error is exc:
                raise
            raise error from None
        finally:
            self._start_task = None
        for info in self.registry:
            if info.kind == "event":
                self._start_dispatch(info)
        for info in self.registry:
            if info.kind == "background":
                runner = asyncio.create_task(self._background_loop(info), name=f"kimiha:{info.name}")
                info.runners.append(runner)
                self._background.append(runner)
        self._set_state(SchedulerState.RUNNING)

    def _interrupted(self, info: TaskInfo | None) -> TaskInitializationError:
        where = (f"while task {info.name!r} (id {info.id}) was initializing" if info is not None
                 else "before every task was initialized")
        return TaskInitializationError(
            f"{self.name}: start() was interrupted by shutdown() {where}; started tasks were rolled back"
        )

    def _pull_subscriptions(self) -> list[Subscription]:
        """Every live pull subscription on the bus (what a background task reads from its own loop)."""
        return [sub for channel in self.bus._all_channels() for sub in channel.subscriptions()
                if sub.handler is None]

    def _timed(self, info: TaskInfo, handler: Any, is_async: bool) -> Any:
        """``handler`` as the task's dispatch calls it: under a SimClock, behind a step that moves the task's
        clock to the event's time first, firing the task's timers due by then (before the event)."""
        clock = info.clock
        if not isinstance(clock, SimClock):
            return handler
        time_of = clock.time_of
        set_time = clock.set_time
        advance = clock.advance_to
        untimed = _UntimedWarning(info, clock)
        if is_async:
            async def timed_async(event: Any) -> Any:
                ts = time_of(event)
                if ts is None:
                    untimed.check(event)
                elif not set_time(ts):
                    await advance(ts)
                return await handler(event)

            return timed_async
        advance_now = clock.advance_now

        def timed(event: Any) -> Any:
            ts = time_of(event)
            if ts is None:
                untimed.check(event)
            elif not set_time(ts):
                advance_now(ts)
            return handler(event)

        return timed

    def _timer_error_cb(self, info: TaskInfo) -> Callable[[str, BaseException], None]:
        def on_error(name: str, exc: BaseException) -> None:
            self._supervisor.failed(info, exc, f"timer {name!r}")
            if info.state is TaskState.FAILED:
                info.clock.cancel_all()

        return on_error

    def _subscribe(self, info: TaskInfo) -> None:
        handler = info.task.handle_event
        info.is_async_handler = inspect.iscoroutinefunction(handler)
        handler = self._timed(info, handler, info.is_async_handler)
        for channel in info.channels:
            on_lag = self._lag_counter(info, channel)
            if info.is_async_handler:
                info.subscriptions.append(self.bus.subscribe(channel, on_lag=on_lag))
            else:
                info.subscriptions.append(
                    self.bus.subscribe(channel, handler, on_lag=on_lag, on_error=self._handler_error_cb(info),
                                       paused=True, measure=True)
                )

    def _start_dispatch(self, info: TaskInfo) -> None:
        if info.is_async_handler:
            lock = asyncio.Lock() if len(info.subscriptions) > 1 else None
            fast = lock is None and info.supervision.handler_timeout is None
            for sub in info.subscriptions:
                if fast:  # the compiled pump: no Python frame per event beyond the handler's own
                    handler = self._timed(info, info.task.handle_event, True)
                    pump = sub.run_handler(handler, self._pump_error_cb(info), info.latency)
                else:
                    pump = self._event_pump(info, sub, lock)
                info.runners.append(asyncio.create_task(pump, name=f"kimiha:{info.name}"))
        else:
            for sub in info.subscriptions:
                sub.resume()

    # -- running ------------------------------------------------------------------------------------------------

    def _escalate(self, info: TaskInfo, exc: BaseException, where: str) -> None:
        """A task escalated its failure: record it as the scheduler's failure and shut everything down."""
        self.failure = TaskExecutionError(f"{self.name}: task {info.name!r} failed in {where}: {exc!r}")
        self.failure.__cause__ = exc
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(
                StopSequence(self, self.shutdown_timeout).run(), name=f"kimiha:{self.name}:stop"
            )

    def _lag_counter(self, info: TaskInfo, channel: Any) -> Callable[[int], None]:
        def on_lag(skipped: int) -> None:
            info.lagged += skipped
            if logger.isEnabledFor(logging.WARNING):
                logger.warning("task %r lagged on channel %s: %d event(s) skipped; handling continues",
                               info.name, channel, skipped, extra=fields(info.name, channel))

        return on_lag

    def _handler_error_cb(self, info: TaskInfo) -> Callable[[BaseException, Any], None]:
        def on_error(exc: BaseException, event: Any) -> None:
            self._supervisor.failed(info, exc, f"handle_event({safe_repr(event, 120)})")

        return on_error

    def _pump_error_cb(self, info: TaskInfo) -> Callable[[BaseException, Any], float | None]:
        def on_error(exc: BaseException, event: Any) -> float | None:
            return self._supervisor.failed(info, exc, f"handle_event({safe_repr(event, 120)})")

        return on_error

    async def _background_loop(self, info: TaskInfo) -> None:
        execute = info.task.execute
        sleep = asyncio.sleep
        interval = info.interval or 0
        while not info.stop_requested:
            started = monotonic_ns()
            try:
                await execute()
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError) and cancel_requested():
                    raise  # the loop's own cancellation; any other CancelledError is execute()'s failure
                delay = self._supervisor.failed(info, exc, "execute()")
                if info.state is TaskState.FAILED:
                    return
                await sleep(delay if delay is not None else interval)
                continue
            info.executions += 1
            info.latency.record(monotonic_ns() - started)
            if info.consecutive_failures or info.state is TaskState.DEGRADED:
                self._supervisor.succeeded(info)
            await sleep(interval)  # yields every iteration, so an execute() that never awaits cannot starve

    async def _handle_one(self, info: TaskInfo, handler: Any, event: Any, timeout: float | None,
                          lock: asyncio.Lock | None, latency: LatencyHistogram | None) -> None:
        """Await one event's handler under the task's supervision; time it into ``latency`` unless None."""
        started = monotonic_ns() if latency is not None else 0
        deadline = None
        try:
            if lock is not None:
                await lock.acquire()
            try:
                if timeout is None:
                    await handler(event)
                else:
                    async with asyncio.timeout(timeout) as deadline:
                        await handler(event)
            finally:
                if lock is not None:
                    lock.release()
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError) and cancel_requested():
                raise  # the pump's own cancellation; any other CancelledError is the handler's failure
            error: BaseException = exc
            if deadline is not None and deadline.expired():
                error = TimeoutError(f"handle_event did not finish within {timeout} s")
            delay = self._supervisor.failed(info, error, f"handle_event({safe_repr(event, 120)})")
            if delay:
                await asyncio.sleep(delay)
            return
        info.events_handled += 1
        if latency is not None:
            latency.record(monotonic_ns() - started)
        if info.consecutive_failures:
            self._supervisor.succeeded(info)

    async def _event_pump(self, info: TaskInfo, sub: Subscription, lock: asyncio.Lock | None) -> None:
        """Python pump for coroutine handlers that need a timeout or share a lock across channels."""
        handler = self._timed(info, info.task.handle_event, True)
        timeout = info.supervision.handler_timeout
        latency = info.latency
        sample = max(1, sub.channel.latency_sample)
        while True:
            try:
                batch = await sub.recv_batch()
            except ChannelClosed:
                return
            sub.in_hand = len(batch)
            seq = sub.cursor - len(batch)  # timed on the channel's sample, as sync and compiled-pump handlers
            for event in batch:
                timed = latency if seq % sample == 0 else None
                seq += 1
                try:
                    if not sub.closed:
                        await self._handle_one(info, handler, event, timeout, lock, timed)
                finally:
                    sub.in_hand -= 1
            if 0 <= sub.drain_target <= sub.cursor:
                return

    # -- shutdown -----------------------------------------------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop everything; idempotent, and a no-op before ``start()``.

        Tasks stop in the order data flows (see :meth:`stop_plan`): producers are cancelled and awaited,
        event tasks then handle what was published up to the moment their stage began, background readers
        read what was published to them and are stopped; then every task's ``shutdown`` hook runs in reverse
        registration order even when some fail. ``timeout`` seconds (default ``shutdown_timeout``) bound the
        whole stop, hooks included; a task that ignores cancellation is left behind at the deadline and listed
        in ``last_shutdown["did_not_stop"]``. Raise :class:`~kimiha.TaskShutdownError` listing every hook
        failure.

        Called from inside a task this scheduler runs (a handler, ``execute()``, a hook), it schedules the
        stop and returns at once: waiting would wait for that very task's own drain. Use
        :meth:`wait_stopped` elsewhere to wait for the end. During ``start()`` it interrupts the start, which
        rolls back.
        """
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidConfigurationError(f"shutdown(timeout=...): expected seconds > 0, got {timeout!r}")
        if self.state is SchedulerState.CREATED:
            return
        if self.state is SchedulerState.STOPPED and (self._shutdown_task is None or self._shutdown_task.done()):
            return  # already stopped: idempotent, and the failures were reported by the call that stopped it
        seconds = self.shutdown_timeout if timeout is None else float(timeout)
        current = asyncio.current_task()
        if self.state is SchedulerState.STARTING:
            await self._interrupt_start(seconds, current)
            return
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(
                StopSequence(self, seconds).run(), name=f"kimiha:{self.name}:stop"
            )
        if current is not None and self._runs(current):
            return
        stop = self._shutdown_task
        try:
            await asyncio.shield(stop)
        except asyncio.CancelledError:
            if stop.cancelled() and not cancel_requested():  # the stop was cancelled, not its caller
                raise TaskShutdownError(
                    f"{self.name}: the stop sequence was cancelled before it finished; see last_shutdown"
                ) from None
            raise

    def _runs(self, task: asyncio.Task[Any]) -> bool:
        """Whether ``task`` is one this scheduler runs: a loop, a pump, the start or the stop sequence."""
        if task is self._shutdown_task or task is self._start_task or task in self._hook_tasks:
            return True
        return any(task in info.runners for info in self.registry)

    async def _interrupt_start(self, timeout: float, current: asyncio.Task[Any] | None) -> None:
        self._stopping = True  # start() checks it after every initialize()
        start = self._start_task
        if (start is not None and start is not current and not start.done() and not self._rolling_back
                and not self._start_cancelled):
            self._start_cancelled = True
            self._rollback_timeout = timeout
            start.cancel()
        if current is not None and self._runs(current):
            return
        try:
            async with asyncio.timeout(timeout):
                await self._stopped.wait()
        except TimeoutError:
            stuck = [info.name for info in self.registry if info.state is TaskState.INITIALIZING]
            self.last_shutdown = {"not_drained": {}, "did_not_stop": stuck, "hook_failures": [],
                                  "finished": False}
            logger.error("%s: start() did not stop within the shutdown deadline (%s s); still initializing: %s",
                         self.name, timeout, ", ".join(map(repr, stuck)) or "none")

    def stop_plan(self) -> list[tuple[str, list[str]]]:
        """Return the order in which :meth:`shutdown` stops the tasks: ``(phase, [task names])`` pairs.

        ``stop``: background tasks that read no channel (producers), cancelled first. ``drain``: one group of
        event tasks (``drain_stages``, in order; the rest last), drained to what was published when the group
        began. ``drain and stop``: background tasks that read channels -- declared with ``consumes()`` or
        found from the subscriptions they opened in ``initialize`` (known once started) -- kept running while
        the stages drain, then read up to what was published and stopped. Hooks run after all of them.
        """
        return [(phase, [info.name for info in infos]) for phase, infos in stop_phases(self)]

    # -- convenience --------------------------------------------------------------------------------------------

    async def wait_stopped(self) -> None:
        """Wait until the scheduler has stopped (by ``shutdown()`` or an escalated failure).

        Not from inside a task this scheduler runs (a handler, ``execute()``, a hook): the stop waits for
        that task, so it would wait for itself (:class:`~kimiha.InvalidStateError`).
        """
        current = asyncio.current_task()
        if current is not None and not self._stopped.is_set() and self._runs(current):
            raise InvalidStateError(
                f"{self.name}: wait_stopped() called from inside {current.get_name()!r}, a task this scheduler "
                f"runs and stops: it would wait for itself; call shutdown() there (it returns once the stop is "
                f"scheduled) and wait elsewhere"
            )
        await self._stopped.wait()
        if self._shutdown_task is not None:
            await asyncio.shield(self._shutdown_task)

    async def run_until_signal(self, signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM),
                               *, timeout: float | None = None) -> None:
        """Start (if needed), run until one of ``signals`` arrives or a task escalates, then shut down.

        Embedding-safe: the handlers the host had for ``signals`` are back in place when this returns. A
        handler installed with ``signal.signal`` is replaced while this waits; one installed with
        ``loop.add_signal_handler`` on this loop is left in place and runs too (a loop's handlers cannot be
        read back, so they are never replaced).
        """
        if self.state is SchedulerState.CREATED:
            await self.start()
        loop = asyncio.get_running_loop()
        got_signal = asyncio.Event()
        give_back: list[Callable[[], None]] = []
        for sig in signals:
            try:
                give_back.append(take_signal(loop, sig, got_signal.set))
            except (NotImplementedError, RuntimeError, ValueError, OSError):  # non-main thread / Windows
                logger.warning("%s: cannot install a handler for signal %s", self.name, sig)
        try:
            waiters = [asyncio.ensure_future(got_signal.wait()), asyncio.ensure_future(self._stopped.wait())]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            for w in waiters:
                w.cancel()
        finally:
            for restore in reversed(give_back):
                restore()
        await self.shutdown(timeout)
        if self.failure is not None:
            raise self.failure

    async def __aenter__(self) -> Scheduler:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.shutdown()
