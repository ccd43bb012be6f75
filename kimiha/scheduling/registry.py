"""The task registry: each task's identity, state machine and counters, and the scheduler's own states."""

from __future__ import annotations

import asyncio
import enum
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kimiha._core import LatencyHistogram, Subscription
from kimiha.error import InvalidStateError, TaskNotFoundError

if TYPE_CHECKING:
    from kimiha.scheduling.supervision import Supervision

__all__ = ["TaskState", "SchedulerState", "TaskInfo", "TaskRegistry", "task_name"]


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


TASK_TRANSITIONS: dict[TaskState, frozenset[TaskState]] = {
    TaskState.REGISTERED: frozenset({TaskState.INITIALIZING, TaskState.STOPPED}),
    TaskState.INITIALIZING: frozenset({TaskState.RUNNING, TaskState.FAILED, TaskState.STOPPING}),
    TaskState.RUNNING: frozenset({TaskState.DEGRADED, TaskState.FAILED, TaskState.STOPPING}),
    TaskState.DEGRADED: frozenset({TaskState.RUNNING, TaskState.FAILED, TaskState.STOPPING}),
    TaskState.FAILED: frozenset({TaskState.STOPPING, TaskState.STOPPED}),
    TaskState.STOPPING: frozenset({TaskState.STOPPED}),
    TaskState.STOPPED: frozenset(),
}

SCHEDULER_TRANSITIONS: dict[SchedulerState, frozenset[SchedulerState]] = {
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
        self.name = task_name(task)
        self.role = getattr(task, "role", kind)
        self.kind = kind
        self.supervision = supervision
        self.interval = interval
        #: The channels the task reads: an event task's ``subscribed_event()``, a background task's
        #: ``consumes()``.
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
        #: Subscriptions a background task opened during its ``initialize`` (what it reads, found rather
        #: than declared). Weak: the task owns them, and a dropped one must not keep its cursor alive.
        self.found_subscriptions: list[weakref.ref[Subscription]] = []
        #: Set by the stop sequence when this task's turn to stop comes: its loop runs no further ``execute``.
        self.stop_requested = False
        #: The task's view of the scheduler's clock (``task.clock``), set at registration.
        self.clock: Any = None

    def transition(self, new: TaskState) -> None:
        if new not in TASK_TRANSITIONS[self.state]:
            raise InvalidStateError(
                f"task {self.name!r} (id {self.id}): cannot go from state {self.state.value!r} "
                f"to {new.value!r}"
            )
        self.state = new

    def read_subscriptions(self) -> list[Subscription]:
        """Return the live subscriptions this background task opened during ``initialize``."""
        subs = (ref() for ref in self.found_subscriptions)
        return [sub for sub in subs if sub is not None and not sub.closed]

    def reads(self) -> bool:
        """Whether the task reads channels (declared with ``consumes()`` or found from its subscriptions)."""
        return bool(self.channels) or bool(self.read_subscriptions())

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

    def __iter__(self) -> Iterator[TaskInfo]:
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


def _counters(stats: dict[str, Any] | None) -> str:
    """Render a task's non-zero integer counters compactly (the registry table's last column)."""
    if not stats:
        return ""
    return " ".join(f"{k}={v}" for k, v in stats.items() if type(v) is int and v)


def task_name(task: Any) -> str:
    name = getattr(task, "name", None)
    return name if isinstance(name, str) and name else type(task).__name__
