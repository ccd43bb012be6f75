"""The scheduler: runs background and event-driven tasks over an :class:`~kimiha.EventBus`, supervised.

Lifecycle (the original framework's shape, with its flaws fixed):

* ``register_background_task`` / ``register_event_task`` return a task id; nothing runs yet.
* ``await start()`` checks every event task's channels (one error listing all missing ones), subscribes
  every event task *before* anything can publish, initializes tasks in registration order (rolling back on
  failure), starts dispatch, then the background loops.
* ``await shutdown()`` stops producers first (cancel and await), drains event tasks up to what was
  published when shutdown began (within a deadline), runs every ``shutdown`` hook in reverse order even when
  some fail, and raises one :class:`~kimiha.TaskShutdownError` carrying every failure.

Failures inside ``execute`` / ``handle_event`` follow the task's :class:`Supervision` policy.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import logging
import signal
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from kimiha._core import LatencyHistogram, Subscription, monotonic_ns
from kimiha.error import (
    ChannelClosed,
    InvalidChannelError,
    InvalidConfigurationError,
    InvalidStateError,
    TaskExecutionError,
    TaskInitializationError,
    TaskNotFoundError,
    TaskShutdownError,
)
from kimiha.event_bus import EventBus
from kimiha.types import BackgroundTask, EventTask

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


class OnError(enum.Enum):
    """What a task does when ``execute`` or ``handle_event`` raises."""

    #: Run again after an exponential backoff; after ``max_restarts`` consecutive failures the task fails.
    RESTART = "restart"
    #: Count and log the error, skip the event (or execution) and carry on. Default for event handlers.
    SKIP = "skip"
    #: Stop this task (state ``failed``); the others keep running.
    STOP = "stop"
    #: Shut the whole scheduler down.
    ESCALATE = "escalate"


@dataclass(frozen=True)
class Supervision:
    """A task's policy for exceptions in ``execute`` / ``handle_event``.

    Parameters
    ----------
    on_error : OnError
        The reaction; default ``RESTART`` for background tasks and ``SKIP`` for event tasks.
    max_restarts : int
        Consecutive failures tolerated under ``RESTART`` before the task is failed (a success resets it).
    backoff_initial, backoff_max, backoff_factor : float
        Exponential backoff between restarts, in seconds.
    handler_timeout : float, optional
        Bound on one ``await handle_event(event)`` of a coroutine handler; a timeout counts as an error.
    """

    on_error: OnError | None = None
    max_restarts: int = 5
    backoff_initial: float = 0.05
    backoff_max: float = 5.0
    backoff_factor: float = 2.0
    handler_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.on_error is not None and not isinstance(self.on_error, OnError):
            raise InvalidConfigurationError(f"Supervision.on_error: expected an OnError, got {self.on_error!r}")
        if isinstance(self.max_restarts, bool) or not isinstance(self.max_restarts, int) or self.max_restarts < 0:
            raise InvalidConfigurationError(
                f"Supervision.max_restarts: expected an int >= 0, got {self.max_restarts!r}"
            )
        for field in ("backoff_initial", "backoff_max"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or value < 0:
                raise InvalidConfigurationError(f"Supervision.{field}: expected seconds >= 0, got {value!r}")
        if not isinstance(self.backoff_factor, (int, float)) or self.backoff_factor < 1:
            raise InvalidConfigurationError(
                f"Supervision.backoff_factor: expected a number >= 1, got {self.backoff_factor!r}"
            )
        if self.handler_timeout is not None and (
            not isinstance(self.handler_timeout, (int, float)) or self.handler_timeout <= 0
        ):
            raise InvalidConfigurationError(
                f"Supervision.handler_timeout: expected seconds > 0 or None, got {self.handler_timeout!r}"
            )

    def backoff(self, attempt: int) -> float:
        """Return the delay before restart number ``attempt`` (1-based)."""
        return min(self.backoff_max, self.backoff_initial * self.backoff_factor ** (attempt - 1))


class TaskState(enum.Enum):
    REGISTERED = "registered"
    INITIALIZING = "initializing"
    RUNNING = "running"
    DEGRADED = "degraded"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


class SchedulerState(enum.Enum):
    CREATED = "created"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


_TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.REGISTERED: frozenset({TaskState.INITIALIZING, TaskState.STOPPED}),
    TaskState.INITIALIZING: frozenset({TaskState.RUNNING, TaskState.FAILED, TaskState.STOPPING}),
    TaskState.RUNNING: frozenset({TaskState.DEGRADED, TaskState.FAILED, TaskState.STOPPING}),
    TaskState.DEGRADED: frozenset({TaskState.RUNNING, TaskState.FAILED, TaskState.STOPPING}),
    TaskState.FAILED: frozenset({TaskState.STOPPING, TaskState.STOPPED}),
    TaskState.STOPPING: frozenset({TaskState.STOPPED}),
    TaskState.STOPPED: frozenset(),
}

_SCHEDULER_TRANSITIONS: dict[SchedulerState, frozenset[SchedulerState]] = {
    SchedulerState.CREATED: frozenset({SchedulerState.STARTING, SchedulerState.STOPPED}),
    SchedulerState.STARTING: frozenset({SchedulerState.RUNNING, SchedulerState.STOPPED}),
    SchedulerState.RUNNING: frozenset({SchedulerState.STOPPING}),
    SchedulerState.STOPPING: frozenset({SchedulerState.STOPPED}),
    SchedulerState.STOPPED: frozenset(),
}


class TaskInfo:
    """Registry entry of one task: identity, state and counters. Read it through :class:`TaskRegistry`."""

    def __init__(self, task_id: int, task: Any, kind: str, supervision: Supervision,
                 interval: float | None, channels: tuple[Any, ...]) -> None:
        self.id = task_id
        self.task = task
        self.name = _task_name(task)
        self.role = getattr(task, "role", kind)
        self.kind = kind
        self.supervision = supervision
        self.interval = interval
        self.channels = channels
        self.state = TaskState.REGISTERED
        self.started_at: float | None = None
        self.executions = 0
        self.events_handled = 0
        self.lagged = 0
        self.errors = 0
        self.restarts = 0
        self.consecutive_failures = 0
        self.last_error: str | None = None
        self.latency = LatencyHistogram()
        self.subscriptions: list[Subscription] = []
        self.runners: list[asyncio.Task[Any]] = []
        self.initialized = False
        self.is_async_handler = False
        self.drain_targets: list[int] | None = None  # per subscription, set when shutdown begins
        self.handled_at_failure = 0

    def transition(self, new: TaskState) -> None:
        if new not in _TASK_TRANSITIONS[self.state]:
            raise InvalidStateError(
                f"task {self.name!r} (id {self.id}): cannot go from state {self.state.value!r} "
                f"to {new.value!r}"
            )
        self.state = new

    def handled(self) -> int:
        if self.is_async_handler:
            return self.events_handled + sum(sub.handled for sub in self.subscriptions)
        return sum(sub.delivered for sub in self.subscriptions)

    def handler_latency(self) -> LatencyHistogram:
        if self.is_async_handler or self.kind == "background":
            return self.latency
        merged = LatencyHistogram()
        for sub in self.subscriptions:
            if sub.handler_time is not None:
                merged.merge(sub.handler_time)
        return merged

    def task_stats(self) -> dict[str, Any] | None:
        """Return the task's own counters (its ``stats()`` method, if it has one), or None."""
        stats = getattr(self.task, "stats", None)
        if not callable(stats):
            return None
        try:
            return dict(stats())
        except Exception as exc:  # a broken stats() must never break monitoring
            return {"stats_error": repr(exc)}

    def snapshot(self) -> dict[str, Any]:
        lat = self.handler_latency()
        return {
            "id": self.id,
            "name": self.name,
            "role": self.role,
            "state": self.state.value,
            "started_at": self.started_at,
            "channels": [str(c) for c in self.channels],
            "executions": self.executions,
            "events_handled": self.handled(),
            "lagged": self.lagged,
            "errors": self.errors,
            "restarts": self.restarts,
            "last_error": self.last_error,
            "latency_ns": {"p50": lat.percentile(50), "p99": lat.percentile(99), "max": lat.max},
            "stats": self.task_stats(),
        }


class TaskRegistry:
    """Every task of a scheduler with its state and counters; ``str()`` gives a readable table."""

    def __init__(self) -> None:
        self._tasks: dict[int, TaskInfo] = {}

    def _add(self, info: TaskInfo) -> None:
        self._tasks[info.id] = info

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self):
        return iter(list(self._tasks.values()))

    def get(self, key: int | str) -> TaskInfo:
        """Return the entry of task id ``key`` or of the task named ``key``."""
        if isinstance(key, int) and key in self._tasks:
            return self._tasks[key]
        for info in self._tasks.values():
            if info.name == key:
                return info
        known = ", ".join(f"{i.id}:{i.name}" for i in self._tasks.values()) or "none"
        raise TaskNotFoundError(f"no task with id or name {key!r}; registered: {known}")

    def snapshot(self) -> list[dict[str, Any]]:
        """Return one dict per task (see :meth:`TaskInfo.snapshot`), in registration order."""
        return [info.snapshot() for info in self._tasks.values()]

    def __str__(self) -> str:
        header = (f"{'id':>3} {'name':<24} {'role':<11} {'state':<12} {'execs':>8} {'events':>9} "
                  f"{'lagged':>7} {'errors':>6} {'restarts':>8} {'p50 us':>8} {'p99 us':>8} {'max us':>9}  "
                  f"last error / counters")
        lines = [header, "-" * len(header)]
        for s in self.snapshot():
            lat = s["latency_ns"]
            lines.append(
                f"{s['id']:>3} {s['name'][:24]:<24} {s['role'][:11]:<11} {s['state']:<12} {s['executions']:>8} "
                f"{s['events_handled']:>9} {s['lagged']:>7} {s['errors']:>6} {s['restarts']:>8} "
                f"{lat['p50'] / 1e3:>8.2f} {lat['p99'] / 1e3:>8.2f} {lat['max'] / 1e3:>9.2f}  "
                f"{(s['last_error'] or _counters(s['stats']))[:60]}"
            )
        return "\n".join(lines)


#: Errors of one task logged with their traceback; after that one line per ``_LOG_EVERY`` errors.
_LOG_FIRST = 10
_LOG_EVERY = 1000


def _log_failure(task: str, where: str, exc: BaseException, count: int) -> None:
    """Log a task failure as text, rate-limited; the registry keeps the exact count either way.

    The record carries formatted text, not the exception: a record holding a live traceback keeps every frame
    of the failing call (and the batch it was handling) alive in any handler that retains records.
    """
    if count <= _LOG_FIRST:
        detail = "".join(traceback.format_exception(exc)).rstrip()
        logger.error("task %r failed in %s (error %d)\n%s", task, where, count, detail)
        if count == _LOG_FIRST:
            logger.error("task %r: further errors are logged once per %d", task, _LOG_EVERY)
    elif count % _LOG_EVERY == 0:
        logger.error("task %r failed in %s: %s (%d errors so far)", task, where, repr(exc), count)


def _counters(stats: dict[str, Any] | None) -> str:
    """Render a task's non-zero integer counters compactly (the registry table's last column)."""
    if not stats:
        return ""
    return " ".join(f"{k}={v}" for k, v in stats.items() if type(v) is int and v)


def _task_name(task: Any) -> str:
    name = getattr(task, "name", None)
    return name if isinstance(name, str) and name else type(task).__name__


def _as_channels(value: Any) -> tuple[Any, ...]:
    if isinstance(value, (tuple, list, set, frozenset)):
        return tuple(value)
    return (value,)


def _placeholder(task: Any, method: str, base: type) -> bool:
    """Whether ``task.method`` is still the placeholder ``base`` defines (no class in between wrote one)."""
    return getattr(getattr(task, method, None), "__func__", None) is base.__dict__[method]


def _loop_handles_signal(loop: asyncio.AbstractEventLoop, sig: int, current: Any) -> bool:
    """Whether ``loop`` holds a handler of its own for ``sig`` (one installed with ``loop.add_signal_handler``).

    No public API tells. asyncio's unix loop keeps them in its ``_signal_handlers`` dict; uvloop keeps that
    table in C, out of reach, but installs one of its own bound methods as the Python-level handler.
    """
    table = getattr(loop, "_signal_handlers", None)
    if isinstance(table, dict):
        return sig in table
    return getattr(current, "__self__", None) is loop


def _take_signal(
    loop: asyncio.AbstractEventLoop, sig: int, notify: Callable[[], Any]
) -> Callable[[], None]:
    """Make ``sig`` call ``notify()`` on ``loop``; return the function that gives the host its handler back.

    A Python-level handler (``signal.signal``, the defaults, ``asyncio.Runner``'s Ctrl-C handler) is replaced
    through ``loop.add_signal_handler`` and put back afterwards. A handler in the loop's own table cannot be
    read back (there is no getter, and uvloop's table is not reachable from Python), so it is never replaced:
    the scheduler chains in front of it and the host's handler runs too.
    """
    previous = signal.getsignal(sig)
    if _loop_handles_signal(loop, sig, previous):
        def chained(signum: int, frame: Any) -> None:
            loop.call_soon_threadsafe(notify)
            if callable(previous):
                previous(signum, frame)  # the loop's own relay: its table still dispatches the host's handler

        signal.signal(sig, chained)

        def give_back_chained() -> None:
            # somebody who replaced it since keeps their handler; None: not installed from Python
            if signal.getsignal(sig) is chained and previous is not None:
                signal.signal(sig, previous)

        return give_back_chained

    loop.add_signal_handler(sig, notify)

    def give_back() -> None:
        loop.remove_signal_handler(sig)  # leaves SIG_DFL (default_int_handler for SIGINT) behind
        if previous is not None:  # None: not installed from Python, nothing that can be put back
            signal.signal(sig, previous)

    return give_back


class Scheduler:
    """Runs background tasks and event tasks over ``bus``, supervised, with a clean shutdown.

    Parameters
    ----------
    bus : EventBus
        The bus whose channels event tasks subscribe to.
    shutdown_timeout : float
        Default deadline (seconds) of :meth:`shutdown` for stopping loops and draining event tasks.

    Use it as ``async with Scheduler(bus) as s:`` -- register tasks, ``await s.start()``; leaving the block
    shuts it down.
    """

    def __init__(self, bus: EventBus, *, shutdown_timeout: float = 10.0, name: str = "scheduler") -> None:
        if not isinstance(bus, EventBus):
            raise InvalidConfigurationError(f"Scheduler(bus): expected an EventBus, got {type(bus).__name__}")
        if not isinstance(shutdown_timeout, (int, float)) or shutdown_timeout <= 0:
            raise InvalidConfigurationError(
                f"Scheduler.shutdown_timeout: expected seconds > 0, got {shutdown_timeout!r}"
            )
        self.bus = bus
        self.name = name
        self.shutdown_timeout = float(shutdown_timeout)
        self.registry = TaskRegistry()
        self.state = SchedulerState.CREATED
        self.failure: BaseException | None = None
        self.last_shutdown: dict[str, Any] = {}
        self._next_id = 1
        self._stopping = False
        self._stopped = asyncio.Event()
        self._shutdown_task: asyncio.Task[None] | None = None
        self._background: list[asyncio.Task[Any]] = []
        #: Groups of event-task ids drained one after another at shutdown (what a stage publishes while it
        #: drains reaches the next stage). ``None``: every event task drains at once.
        self.drain_stages: list[list[int]] | None = None

    # -- state --------------------------------------------------------------------------------------------------

    def _set_state(self, new: SchedulerState) -> None:
        if new not in _SCHEDULER_TRANSITIONS[self.state]:
            raise InvalidStateError(
                f"{self.name}: cannot go from state {self.state.value!r} to {new.value!r}"
            )
        self.state = new

    def __repr__(self) -> str:
        return f"<Scheduler {self.name!r} state={self.state.value} tasks={len(self.registry)}>"

    # -- registration -------------------------------------------------------------------------------------------

    def _register(self, task: Any, kind: str, supervision: Supervision | None, interval: float | None,
                  channels: tuple[Any, ...]) -> int:
        if self.state is not SchedulerState.CREATED:
            raise InvalidStateError(
                f"{self.name}: cannot register task {_task_name(task)!r} in state {self.state.value!r}; "
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
                f"task {_task_name(task)!r}: supervision must be a Supervision, got {supervision!r}"
            )
        if supervision.on_error is None:
            default = OnError.RESTART if kind == "background" else OnError.SKIP
            supervision = Supervision(**{**supervision.__dict__, "on_error": default})
        info = TaskInfo(self._next_id, task, kind, supervision, interval, channels)
        self._next_id += 1
        self.registry._add(info)
        return info.id

    def register_background_task(self, task: BackgroundTask, *, interval: float | None = None,
                                 supervision: Supervision | None = None) -> int:
        """Register ``task``, whose ``execute()`` runs in a loop until shutdown; return its id.

        ``interval`` paces the loop (seconds between the end of one ``execute`` and the next); without it the
        loop still yields to the event loop after every ``execute``.
        """
        if isinstance(task, BackgroundTask) and _placeholder(task, "execute", BackgroundTask):
            raise InvalidConfigurationError(
                f"register_background_task: task {_task_name(task)!r} ({type(task).__qualname__}) does not "
                f"define execute(); a BackgroundTask must define `async def execute(self)`, which the scheduler "
                f"runs in a loop until shutdown"
            )
        execute = getattr(task, "execute", None)
        if not callable(execute) or not inspect.iscoroutinefunction(execute):
            raise InvalidConfigurationError(
                f"register_background_task: {_task_name(task)!r} must have an `async def execute()`, "
                f"got {execute!r}"
            )
        if interval is not None and (not isinstance(interval, (int, float)) or interval < 0):
            raise InvalidConfigurationError(
                f"register_background_task({_task_name(task)!r}): interval must be seconds >= 0, got {interval!r}"
            )
        return self._register(task, "background", supervision, interval, ())

    def register_event_task(self, task: EventTask, *, supervision: Supervision | None = None) -> int:
        """Register ``task``, which handles the events of ``task.subscribed_event()``; return its id."""
        if isinstance(task, EventTask):
            missing = [shown for method, shown in (("subscribed_event", "subscribed_event()"),
                                                   ("handle_event", "handle_event(event)"))
                       if _placeholder(task, method, EventTask)]
            if missing:
                raise InvalidConfigurationError(
                    f"register_event_task: task {_task_name(task)!r} ({type(task).__qualname__}) does not define "
                    f"{' or '.join(missing)}; an EventTask must define subscribed_event() (the channel, or a "
                    f"tuple of channels, it handles) and handle_event(event)"
                )
        handler = getattr(task, "handle_event", None)
        subscribed = getattr(task, "subscribed_event", None)
        if not callable(handler) or not callable(subscribed):
            raise InvalidConfigurationError(
                f"register_event_task: {_task_name(task)!r} must define subscribed_event() and "
                f"handle_event(event)"
            )
        try:
            channels = _as_channels(subscribed())
        except Exception as exc:
            raise InvalidConfigurationError(
                f"register_event_task: {_task_name(task)!r}.subscribed_event() raised {exc!r}"
            ) from exc
        if not channels:
            raise InvalidConfigurationError(
                f"register_event_task: {_task_name(task)!r}.subscribed_event() named no channel"
            )
        for i, channel in enumerate(channels):
            if channel in channels[:i]:
                raise InvalidConfigurationError(
                    f"register_event_task: task {_task_name(task)!r}: subscribed_event() names channel {channel} "
                    f"twice ({', '.join(str(c) for c in channels)}); each channel must appear once, or the "
                    f"handler would get every event of that channel twice"
                )
        return self._register(task, "event", supervision, None, channels)

    # -- start --------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe, initialize (in registration order), start dispatch, then the background loops."""
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
                f"{self.name}: event tasks subscribe to channels the bus does not have: {'; '.join(missing)}. "
                f"Known channels: {known}"
            )
        self._set_state(SchedulerState.STARTING)
        self.bus.bind_loop()
        try:
            for info in self.registry:  # every consumer has its cursor before anything can publish
                if info.kind == "event":
                    self._subscribe(info)
            for info in self.registry:
                info.transition(TaskState.INITIALIZING)
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
                info.initialized = True
                info.transition(TaskState.RUNNING)
                info.started_at = time.time()
        except BaseException:
            await self._rollback()
            raise
        for info in self.registry:
            if info.kind == "event":
                self._start_dispatch(info)
        for info in self.registry:
            if info.kind == "background":
                runner = asyncio.create_task(self._background_loop(info), name=f"kimiha:{info.name}")
                info.runners.append(runner)
                self._background.append(runner)
        self._set_state(SchedulerState.RUNNING)

    def _subscribe(self, info: TaskInfo) -> None:
        handler = info.task.handle_event
        info.is_async_handler = inspect.iscoroutinefunction(handler)
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
                    pump = sub.run_handler(info.task.handle_event, self._pump_error_cb(info), info.latency)
                else:
                    pump = self._event_pump(info, sub, lock)
                info.runners.append(asyncio.create_task(pump, name=f"kimiha:{info.name}"))
        else:
            for sub in info.subscriptions:
                sub.resume()

    async def _rollback(self) -> None:
        for info in self.registry:
            for sub in info.subscriptions:
                sub.close()
        for info in reversed(list(self.registry)):
            if info.initialized:
                info.transition(TaskState.STOPPING)
                try:
                    await info.task.shutdown()
                except Exception as exc:
                    logger.error("rollback: shutdown hook of task %r failed: %s", info.name, repr(exc))
                info.transition(TaskState.STOPPED)
            elif info.state is TaskState.REGISTERED or info.state is TaskState.FAILED:
                info.transition(TaskState.STOPPED)
        self._set_state(SchedulerState.STOPPED)
        self._stopped.set()

    # -- running ------------------------------------------------------------------------------------------------

    def _lag_counter(self, info: TaskInfo, channel: Any):
        def on_lag(skipped: int) -> None:
            info.lagged += skipped
            logger.warning("task %r lagged on channel %s: %d event(s) skipped; handling continues",
                           info.name, channel, skipped)

        return on_lag

    def _handler_error_cb(self, info: TaskInfo):
        def on_error(exc: BaseException, event: Any) -> None:
            self._task_failed(info, exc, f"handle_event({event!r:.120})")

        return on_error

    def _pump_error_cb(self, info: TaskInfo):
        def on_error(exc: BaseException, event: Any) -> float | None:
            return self._task_failed(info, exc, f"handle_event({event!r:.120})")

        return on_error

    def _task_failed(self, info: TaskInfo, exc: BaseException, where: str) -> float | None:
        """Count and log ``exc``, apply the policy; return a backoff delay when the task should restart."""
        info.errors += 1
        if info.kind == "event" and not info.is_async_handler:
            # sync handlers have no per-event success hook: a success happened if more than one event went by
            handled = info.handled()
            if handled - info.handled_at_failure > 1:
                info.consecutive_failures = 0
            info.handled_at_failure = handled
        info.consecutive_failures += 1
        info.last_error = f"{where}: {exc!r}"
        policy = info.supervision
        _log_failure(info.name, where, exc, info.errors)
        if self._stopping or info.state not in (TaskState.RUNNING, TaskState.DEGRADED):
            return None
        if policy.on_error is OnError.SKIP:
            return None
        if policy.on_error is OnError.RESTART:
            if info.consecutive_failures > policy.max_restarts:
                self._fail_task(info, f"gave up after {policy.max_restarts} restart(s)")
                return None
            info.restarts += 1
            if info.state is TaskState.RUNNING:
                info.transition(TaskState.DEGRADED)
            delay = policy.backoff(info.consecutive_failures)
            if info.kind == "event" and not info.is_async_handler:
                for sub in info.subscriptions:
                    sub.pause()
                asyncio.get_running_loop().call_later(delay, self._resume_handler, info)
            return delay
        if policy.on_error is OnError.STOP:
            self._fail_task(info, "stopped by its supervision policy")
            return None
        # ESCALATE
        self._fail_task(info, "escalated: shutting the scheduler down")
        self.failure = TaskExecutionError(f"{self.name}: task {info.name!r} failed in {where}: {exc!r}")
        self.failure.__cause__ = exc
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(self._shutdown(self.shutdown_timeout))
        return None

    def _fail_task(self, info: TaskInfo, why: str) -> None:
        info.transition(TaskState.FAILED)
        logger.error("task %r is failed: %s", info.name, why)
        # A failed task unsubscribes: it must never hold a BLOCK channel's publishers back.
        for sub in info.subscriptions:
            sub.close()

    def _resume_handler(self, info: TaskInfo) -> None:
        if info.state is TaskState.DEGRADED and not self._stopping:
            info.transition(TaskState.RUNNING)
            for sub in info.subscriptions:
                sub.resume()

    def _succeeded(self, info: TaskInfo) -> None:
        info.consecutive_failures = 0
        if info.state is TaskState.DEGRADED:
            info.transition(TaskState.RUNNING)

    async def _background_loop(self, info: TaskInfo) -> None:
        execute = info.task.execute
        sleep = asyncio.sleep
        interval = info.interval or 0
        while not self._stopping:
            started = monotonic_ns()
            try:
                await execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._task_failed(info, exc, "execute()")
                if info.state is TaskState.FAILED:
                    return
                await sleep(delay if delay is not None else interval)
                continue
            info.executions += 1
            info.latency.record(monotonic_ns() - started)
            if info.consecutive_failures or info.state is TaskState.DEGRADED:
                self._succeeded(info)
            await sleep(interval)  # yields every iteration, so an execute() that never awaits cannot starve

    async def _handle_one(self, info: TaskInfo, handler: Any, event: Any, timeout: float | None,
                          lock: asyncio.Lock | None, latency: LatencyHistogram) -> None:
        started = monotonic_ns()
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
        except Exception as exc:
            error: BaseException = exc
            if deadline is not None and deadline.expired():
                error = TimeoutError(f"handle_event did not finish within {timeout} s")
            delay = self._task_failed(info, error, f"handle_event({event!r:.120})")
            if delay:
                await asyncio.sleep(delay)
            return
        info.events_handled += 1
        latency.record(monotonic_ns() - started)
        if info.consecutive_failures:
            self._succeeded(info)

    async def _event_pump(self, info: TaskInfo, sub: Subscription, lock: asyncio.Lock | None) -> None:
        """Python pump for coroutine handlers that need a timeout or share a lock across channels."""
        handler = info.task.handle_event
        timeout = info.supervision.handler_timeout
        latency = info.latency
        while True:
            try:
                batch = await sub.recv_batch()
            except ChannelClosed:
                return
            sub.in_hand = len(batch)
            for event in batch:
                try:
                    if not sub.closed:
                        await self._handle_one(info, handler, event, timeout, lock, latency)
                finally:
                    sub.in_hand -= 1
            if 0 <= sub.drain_target <= sub.cursor:
                return

    # -- shutdown -----------------------------------------------------------------------------------------------

    async def shutdown(self, timeout: float | None = None) -> None:
        """Stop everything; idempotent, and a no-op before ``start()``.

        Background loops are cancelled and awaited first; event tasks then handle what was published up to
        the moment shutdown began (within ``timeout`` seconds, default ``shutdown_timeout``); every task's
        ``shutdown`` hook runs in reverse registration order even when some fail. Raise
        :class:`~kimiha.TaskShutdownError` listing every hook failure.
        """
        if timeout is not None and (not isinstance(timeout, (int, float)) or timeout <= 0):
            raise InvalidConfigurationError(f"shutdown(timeout=...): expected seconds > 0, got {timeout!r}")
        if self.state is SchedulerState.CREATED:
            return
        if self.state is SchedulerState.STOPPED and (self._shutdown_task is None or self._shutdown_task.done()):
            return  # already stopped: idempotent, and the failures were reported by the call that stopped it
        if self.state is SchedulerState.STARTING:
            raise InvalidStateError(f"{self.name}: shutdown() called while start() is in progress")
        if self._shutdown_task is None:
            self._shutdown_task = asyncio.get_running_loop().create_task(
                self._shutdown(self.shutdown_timeout if timeout is None else float(timeout))
            )
        await asyncio.shield(self._shutdown_task)

    async def _shutdown(self, timeout: float) -> None:
        if self.state is SchedulerState.STOPPED:
            return
        self._set_state(SchedulerState.STOPPING)
        self._stopping = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        began = time.perf_counter()
        report: dict[str, Any] = {"not_drained": {}, "did_not_stop": [], "hook_failures": []}

        # 1. producers first: cancel and await every background loop
        for runner in self._background:
            runner.cancel()
        await self._await_runners(self._background, deadline, report)

        # 2. drain event tasks to the sequence published when (their stage of) shutdown began
        event_infos = [info for info in self.registry if info.kind == "event"]
        for stage in self._stages(event_infos):
            for info in stage:
                info.drain_targets = [sub.channel.published for sub in info.subscriptions]
                if info.is_async_handler:
                    for sub, target in zip(info.subscriptions, info.drain_targets):
                        sub.drain_target = target
            await self._drain(stage, deadline, report)

        # 3. close subscriptions, stop pumps
        pumps = []
        for info in event_infos:
            for sub in info.subscriptions:
                sub.close()
            pumps.extend(info.runners)
        for pump in pumps:
            pump.cancel()
        await self._await_runners(pumps, deadline, report)

        # 4. every shutdown hook, in reverse registration order, even when some fail
        failures: list[BaseException] = []
        for info in reversed(list(self.registry)):
            if info.state is TaskState.REGISTERED:
                info.transition(TaskState.STOPPED)
                continue
            if info.state is not TaskState.STOPPED:
                info.transition(TaskState.STOPPING)
            try:
                async with asyncio.timeout(max(deadline - loop.time(), min(timeout, 1.0))):
                    await info.task.shutdown()
            except (Exception, TimeoutError) as exc:
                err = exc if str(exc) else TimeoutError(f"shutdown hook of {info.name!r} timed out")
                failures.append(err)
                info.errors += 1
                info.last_error = f"shutdown(): {err!r}"
                report["hook_failures"].append(f"{info.name}: {err!r}")
                logger.error("shutdown hook of task %r failed: %s", info.name,
                             "".join(traceback.format_exception(err)).rstrip())
            if info.state is not TaskState.STOPPED:
                info.transition(TaskState.STOPPED)

        self._set_state(SchedulerState.STOPPED)
        report["seconds"] = time.perf_counter() - began
        self.last_shutdown = report
        self._stopped.set()
        if failures:
            detail = "; ".join(report["hook_failures"])
            raise TaskShutdownError(f"{self.name}: {len(failures)} shutdown hook(s) failed: {detail}", failures)

    def _stages(self, event_infos: list[TaskInfo]) -> list[list[TaskInfo]]:
        if not self.drain_stages:
            return [event_infos]
        stages = [[self.registry.get(task_id) for task_id in group] for group in self.drain_stages]
        staged = {info.id for group in stages for info in group}
        rest = [info for info in event_infos if info.id not in staged]
        return [group for group in stages if group] + ([rest] if rest else [])

    async def _await_runners(self, runners: list[asyncio.Task[Any]], deadline: float,
                             report: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        pending = [r for r in runners if not r.done()]
        while pending:
            remaining = deadline - loop.time()
            done, still = await asyncio.wait(pending, timeout=max(remaining, 0.05))
            pending = list(still)
            if pending and loop.time() >= deadline:
                # a task that swallows cancellation: keep cancelling, and say so
                for runner in pending:
                    runner.cancel()
                    name = runner.get_name()
                    if name not in report["did_not_stop"]:
                        report["did_not_stop"].append(name)
                        logger.error("%s: %s ignores cancellation past the shutdown deadline", self.name, name)
        for runner in runners:
            if runner.done() and not runner.cancelled() and runner.exception() is not None:
                logger.error("%s: %s ended with %r", self.name, runner.get_name(), runner.exception())

    async def _drain(self, infos: list[TaskInfo], deadline: float, report: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()

        def behind(info: TaskInfo) -> int:
            if info.state is TaskState.FAILED or info.drain_targets is None:
                return 0
            return sum(
                max(0, target - (sub.cursor - sub.in_hand))
                for sub, target in zip(info.subscriptions, info.drain_targets)
            )

        pumps: list[asyncio.Task[Any]] = []
        for info in infos:
            if info.is_async_handler:
                for sub, target, runner in zip(info.subscriptions, info.drain_targets or (), info.runners):
                    idle = sub.in_hand == 0 and sub.cursor >= target
                    if idle or info.state is TaskState.FAILED:
                        runner.cancel()  # parked on recv_batch with nothing left to handle
                    else:
                        pumps.append(runner)  # returns by itself once it reaches its target
            elif info.state is not TaskState.FAILED:
                for sub in info.subscriptions:
                    sub.resume()  # a handler paused for a restart backoff still drains
        while True:
            handlers_behind = [i for i in infos if not i.is_async_handler and behind(i)]
            active = [p for p in pumps if not p.done()]
            if not handlers_behind and not active:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                for info in infos:
                    if behind(info):
                        report["not_drained"][info.name] = behind(info)
                        logger.warning("%s: shutdown deadline reached with %d event(s) unhandled by task %r",
                                       self.name, behind(info), info.name)
                return
            if handlers_behind:
                await asyncio.sleep(0)  # handlers run from dispatch callbacks: one loop turn each
            else:
                await asyncio.wait(active, timeout=remaining)

    # -- convenience --------------------------------------------------------------------------------------------

    async def wait_stopped(self) -> None:
        """Wait until the scheduler has stopped (by ``shutdown()`` or an escalated failure)."""
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
                give_back.append(_take_signal(loop, sig, got_signal.set))
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
