"""Supervision: what a task's failure does (restart with backoff, skip, stop, escalate), and its logging."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kimiha.error import InvalidConfigurationError, TaskExecutionError
from kimiha.logs import fields, log_traceback
from kimiha.scheduling.registry import TaskState

if TYPE_CHECKING:
    from kimiha.scheduler import Scheduler
    from kimiha.scheduling.registry import TaskInfo

__all__ = ["OnError", "Supervision", "Supervisor", "log_failure", "cancel_requested"]

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


#: Errors of one task logged with their traceback; after that one line per ``_LOG_EVERY`` errors.
_LOG_FIRST = 10
_LOG_EVERY = 1000


def log_failure(task: str, where: str, exc: BaseException, count: int, channel: Any = None) -> None:
    """Log a task failure as text, rate-limited; the registry keeps the exact count either way.

    The traceback is the record's exception text (``exception`` in a JSON line), not the exception: a record
    holding a live traceback keeps every frame of the failing call (and the batch it was handling) alive in any
    handler that retains records. Nothing is formatted when ERROR records of the scheduler are not emitted.
    """
    if not logger.isEnabledFor(logging.ERROR):
        return
    extra = fields(task, channel)
    if count <= _LOG_FIRST:
        log_traceback(logger, logging.ERROR, exc, "task %r failed in %s (error %d)", task, where, count,
                      extra=extra)
        if count == _LOG_FIRST:
            logger.error("task %r: further errors are logged once per %d", task, _LOG_EVERY, extra=extra)
    elif count % _LOG_EVERY == 0:
        logger.error("task %r failed in %s: %s (%d errors so far)", task, where, repr(exc), count, extra=extra)


def cancel_requested() -> bool:
    """Whether somebody asked the current task to stop (``Task.cancelling()``).

    Tells a task's own cancellation from a *stray* ``CancelledError``: one that a cancelled task or future the
    code awaited passed on, or that the code raised itself. The first must propagate; the second is a failure
    like any other. Outside a task (a loop callback) no cancellation can have been asked for.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Supervisor:
    """Applies each task's :class:`Supervision` policy for one scheduler: counts, logs, restarts, stops."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def failed(self, info: TaskInfo, exc: BaseException, where: str) -> float | None:
        """Count and log ``exc``, apply the policy; return a backoff delay when the task should restart.

        A stray ``CancelledError`` (see :func:`cancel_requested`) arrives here too: it is counted and handled
        like any exception, reported as a :class:`~kimiha.TaskExecutionError` naming the task.
        """
        if isinstance(exc, asyncio.CancelledError):
            stray = exc
            exc = TaskExecutionError(
                f"task {info.name!r}: {where} raised CancelledError though the task was not being cancelled "
                f"(a cancelled task or future it awaited, or a CancelledError it raised); handled as a failure"
            )
            exc.__cause__ = stray
        info.errors += 1
        if info.kind == "event":
            # The compiled pump and sync handlers have no per-event success hook: a success happened since the
            # last failure if the handled count moved past it (a sync handler's count includes that failure).
            handled = info.handled()
            if handled - info.handled_at_failure > (0 if info.is_async_handler else 1):
                info.consecutive_failures = 0
            info.handled_at_failure = handled
        info.consecutive_failures += 1
        info.last_error = f"{where}: {exc!r}"
        policy = info.supervision
        log_failure(info.name, where, exc, info.errors, info.channels[0] if len(info.channels) == 1 else None)
        if self.scheduler._stopping or info.state not in (TaskState.RUNNING, TaskState.DEGRADED):
            return None
        if policy.on_error is OnError.SKIP:
            return None
        if policy.on_error is OnError.RESTART:
            if info.consecutive_failures > policy.max_restarts:
                self.fail_task(info, f"gave up after {policy.max_restarts} restart(s)")
                return None
            info.restarts += 1
            if info.state is TaskState.RUNNING:
                info.transition(TaskState.DEGRADED)
            delay = policy.backoff(info.consecutive_failures)
            if info.kind == "event":
                if not info.is_async_handler:
                    for sub in info.subscriptions:
                        sub.pause()
                # back to running once the backoff is over (a pump waits it out before its next event)
                asyncio.get_running_loop().call_later(delay, self.resume_handler, info)
            return delay
        if policy.on_error is OnError.STOP:
            self.fail_task(info, "stopped by its supervision policy")
            return None
        # ESCALATE
        self.fail_task(info, "escalated: shutting the scheduler down")
        self.scheduler._escalate(info, exc, where)
        return None

    def fail_task(self, info: TaskInfo, why: str) -> None:
        info.transition(TaskState.FAILED)
        logger.error("task %r is failed: %s", info.name, why, extra=fields(info.name))
        # A failed task unsubscribes: it must never hold a BLOCK channel's publishers back.
        for sub in info.subscriptions:
            sub.close()

    def resume_handler(self, info: TaskInfo) -> None:
        if info.state is TaskState.DEGRADED and not self.scheduler._stopping:
            info.transition(TaskState.RUNNING)
            for sub in info.subscriptions:
                sub.resume()

    def succeeded(self, info: TaskInfo) -> None:
        info.consecutive_failures = 0
        if info.state is TaskState.DEGRADED:
            info.transition(TaskState.RUNNING)
