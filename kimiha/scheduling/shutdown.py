"""The scheduler's stop sequence: tasks stop in the order data flows through them, then every hook; one deadline.

:func:`stop_phases` orders the stop by who publishes to whom, not by the kind of task:

1. ``stop`` -- background tasks that read no channel (the producers): cancel and await their loops.
2. ``drain`` -- event tasks, stage by stage (``Scheduler.drain_stages``), each to the sequence its channels had
   published when its stage began; what a stage publishes while it drains reaches the stages after it.
3. ``drain and stop`` -- background tasks that read channels (``consumes()``, or the subscriptions they opened
   in ``initialize``, e.g. a bridge exporter): they keep running while the stages drain, since any stage may
   publish to them (and on a ``BLOCK`` channel it would wait for them); then each subscription they opened is
   read up to what was published (for at most the task's ``drain_timeout`` seconds when it has one: a bridge
   exporter's ``flush_timeout``, whose readers may never make room), and their loops are cancelled and
   awaited.

Then the event tasks' subscriptions are closed and their pumps stopped, and every ``shutdown`` hook runs in
reverse registration order, even when some fail.

One deadline bounds the whole stop. A loop that ignores cancellation is given up at the deadline (cancelled
once more and granted a few loop turns) and listed under ``did_not_stop``; the stop goes on without it. A hook
gets what is left of the deadline; one that starts after it has passed still runs, up to its first wait. What
did not drain, did not stop or failed is written to the report that becomes ``Scheduler.last_shutdown``
(``not_drained``, ``did_not_stop``, ``hook_failures``, ``finished``: every step ran, ``seconds``).

Known limit: a background task that reads channels *and* feeds event tasks is stopped after the drains, so
what it publishes from then on is left unhandled; such a cycle has no order that drains everything.

:meth:`StopSequence.rollback` is the same hook step for a start that failed or was interrupted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from kimiha.error import TaskShutdownError
from kimiha.logs import fields, log_traceback
from kimiha.scheduling.registry import SchedulerState, TaskInfo, TaskState

if TYPE_CHECKING:
    from kimiha.scheduler import Scheduler

__all__ = ["StopSequence", "stop_phases"]

logger = logging.getLogger("kimiha.scheduler")

#: Loop turns a cancelled hook gets to finish before the stop leaves it behind.
_GRACE_TURNS = 8


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Take a left-behind hook's outcome, so that its end is not reported as never retrieved."""
    if not task.cancelled():
        task.exception()

#: The part of the stop's deadline a task's own drain bound (``drain_timeout``) leaves to the shutdown hooks.
HOOK_RESERVE = 0.2


def _drain_limit(info: TaskInfo) -> float | None:
    """``info``'s ``drain_timeout`` in seconds (0 or more), or None: none, or one that is not a finite number
    (said once in the log, and then ignored: a bad bound must not stop the stop)."""
    try:
        limit = getattr(info.task, "drain_timeout", None)
        if limit is None:
            return None
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise TypeError(f"expected a number of seconds, got {limit!r}")
        value = float(limit)
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"expected a finite number of seconds, got {limit!r}")
    except Exception as exc:
        logger.warning("shutdown: task %r: its drain_timeout is ignored (no bound of its own): %s", info.name, exc,
                       extra=fields(info.name))
        return None
    return max(0.0, value)


#: Loop turns granted past the deadline to tasks cancelled once more: enough for a task that honours the
#: cancellation to unwind (each turn runs every ready callback), never a wait of its own.
_GRACE_TURNS = 8
#: A background reader's progress has no wake-up to wait on: poll it, first turn by turn, then every millisecond.
_SPIN_TURNS = 64
_POLL_SECONDS = 0.001


def stop_phases(scheduler: Scheduler) -> list[tuple[str, list[TaskInfo]]]:
    """Return the phases of ``scheduler``'s stop, in order: ``(phase, tasks)`` with phase ``stop``, ``drain``
    or ``drain and stop`` (see the module's docstring); empty phases are left out."""
    background = [info for info in scheduler.registry if info.kind == "background"]
    events = [info for info in scheduler.registry if info.kind == "event"]
    phases: list[tuple[str, list[TaskInfo]]] = [("stop", [i for i in background if not i.reads()])]
    phases += [("drain", stage) for stage in _drain_groups(scheduler, events)]
    phases.append(("drain and stop", [i for i in background if i.reads()]))
    return [(phase, infos) for phase, infos in phases if infos]


def _drain_groups(scheduler: Scheduler, event_infos: list[TaskInfo]) -> list[list[TaskInfo]]:
    drain_stages = scheduler.drain_stages
    if not drain_stages:
        return [event_infos] if event_infos else []
    stages = [[scheduler.registry.get(task_id) for task_id in group] for group in drain_stages]
    staged = {info.id for group in stages for info in group}
    rest = [info for info in event_infos if info.id not in staged]
    return [group for group in stages if group] + ([rest] if rest else [])


class StopSequence:
    """One run of the stop sequence of ``scheduler``, bounded by ``timeout`` seconds from now."""

    def __init__(self, scheduler: Scheduler, timeout: float) -> None:
        self.scheduler = scheduler
        self.name = scheduler.name
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout
        self.report: dict[str, Any] = {"not_drained": {}, "did_not_stop": [], "hook_failures": [],
                                       "finished": False}

    def remaining(self) -> float:
        return self.deadline - self.loop.time()

    # -- the full stop ------------------------------------------------------------------------------------------

    async def run(self) -> None:
        sched = self.scheduler
        if sched.state is SchedulerState.STOPPED:
            return
        sched._set_state(SchedulerState.STOPPING)
        sched._stopping = True
        began = time.perf_counter()
        report = self.report
        failures: list[BaseException] = []
        try:
            for phase, infos in stop_phases(sched):
                if phase == "stop":
                    await self.stop_loops(infos)
                elif phase == "drain":
                    await self.drain_stage(infos)
                else:
                    await self.drain_readers(infos)
                    await self.stop_loops(infos)
            await self.stop_pumps([info for info in sched.registry if info.kind == "event"])
            sched.clock._close()  # no timer fires into a task whose hook is running or has run
            failures = await self.run_hooks()
            report["finished"] = True
        finally:  # even when the stop itself is cancelled: nobody waits for a stop that never ends
            self.finish(began)
        if failures:
            detail = "; ".join(report["hook_failures"])
            raise TaskShutdownError(f"{self.name}: {len(failures)} shutdown hook(s) failed: {detail}", failures)

    def finish(self, began: float) -> None:
        sched = self.scheduler
        if sched.state is not SchedulerState.STOPPED:
            sched._set_state(SchedulerState.STOPPED)
        self.report["seconds"] = time.perf_counter() - began
        sched.last_shutdown = self.report
        sched._stopped.set()

    async def stop_loops(self, infos: list[TaskInfo]) -> None:
        """Cancel the loops of background tasks ``infos`` and await them (within the deadline)."""
        runners = []
        for info in infos:
            info.stop_requested = True
            for runner in info.runners:
                if not runner.done():
                    runner.cancel()
                    runners.append(runner)
        await self.await_runners(runners)

    async def drain_stage(self, stage: list[TaskInfo]) -> None:
        for info in stage:
            info.drain_targets = [sub.channel.published for sub in info.subscriptions]
            if info.is_async_handler:
                for sub, target in zip(info.subscriptions, info.drain_targets):
                    sub.drain_target = target
        await self.drain(stage)

    async def stop_pumps(self, event_infos: list[TaskInfo]) -> None:
        pumps = []
        for info in event_infos:
            for sub in info.subscriptions:
                sub.close()
            pumps.extend(info.runners)
        for pump in pumps:
            pump.cancel()
        await self.await_runners(pumps)

    # -- awaiting what was cancelled ----------------------------------------------------------------------------

    def owner(self, runner: asyncio.Task[Any]) -> TaskInfo | None:
        for info in self.scheduler.registry:
            if runner in info.runners:
                return info
        return None

    async def await_runners(self, runners: list[asyncio.Task[Any]]) -> None:
        """Await cancelled ``runners`` until the deadline; give up on (and report) those that ignore it."""
        pending = {r for r in runners if not r.done()}
        if pending and self.remaining() > 0:
            _, pending = await asyncio.wait(pending, timeout=self.remaining())
        if pending:
            for runner in pending:
                runner.cancel()  # once more: a retry loop that ate the first request may give in to a second
            for _ in range(_GRACE_TURNS):
                await asyncio.sleep(0)
                pending = {r for r in pending if not r.done()}
                if not pending:
                    break
        for runner in runners:
            if runner in pending:
                self.did_not_stop(runner)
            elif not runner.cancelled() and runner.exception() is not None:
                logger.error("%s: %s ended with %r", self.name, runner.get_name(), runner.exception())

    def did_not_stop(self, runner: asyncio.Task[Any]) -> None:
        info = self.owner(runner)
        name = info.name if info is not None else runner.get_name()
        if name in self.report["did_not_stop"]:
            return
        self.report["did_not_stop"].append(name)
        if info is not None:
            info.errors += 1
            info.last_error = (f"shutdown: did not stop by the shutdown deadline ({self.timeout} s): it ignores "
                               f"cancellation and is still running")
        logger.error("%s: task %r ignores cancellation: still running at the shutdown deadline (%s s); the "
                     "stop goes on without it", self.name, name, self.timeout, extra=fields(name))

    # -- draining -----------------------------------------------------------------------------------------------

    async def drain(self, infos: list[TaskInfo]) -> None:
        loop = self.loop

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
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                for info in infos:
                    if behind(info):
                        self.report["not_drained"][info.name] = behind(info)
                        logger.warning("%s: shutdown deadline reached with %d event(s) unhandled by task %r",
                                       self.name, behind(info), info.name, extra=fields(info.name))
                return
            if handlers_behind:
                await asyncio.sleep(0)  # handlers run from dispatch callbacks: one loop turn each
            else:
                await asyncio.wait(active, timeout=remaining)

    async def drain_readers(self, infos: list[TaskInfo]) -> None:
        """Let background readers read what their subscriptions were published, up to the deadline.

        Only the subscriptions a task opened in ``initialize`` are known; a task that declared its channels
        but subscribed later has simply kept running through the drains, and its hook takes what is left.
        """
        targets = [(info, sub, sub.channel.published) for info in infos for sub in info.read_subscriptions()]
        # A task may bound its own drain (``drain_timeout``, seconds: a bridge exporter's flush_timeout, as its
        # readers may never make room); past it the task is left to its hook, which counts what is left. Such a
        # drain also ends HOOK_RESERVE before the stop's deadline, so that the hook still starts in time, and
        # a task with ``drain_started(deadline)`` is told the stop's deadline (its hook's flush shares it).
        now = self.loop.time()
        own_deadline: dict[str, float] = {}
        for info in infos:
            limit = _drain_limit(info)
            if limit is not None:
                own_deadline[info.name] = min(now + limit, self.deadline - HOOK_RESERVE)
            started = getattr(info.task, "drain_started", None)
            if callable(started):
                try:
                    started(self.deadline)
                except Exception as exc:
                    logger.warning("%s: drain_started() of task %r failed: %r", self.name, info.name, exc,
                                   extra=fields(info.name))
        given_up: set[str] = set()

        def behind() -> dict[str, int]:
            out: dict[str, int] = {}
            at = self.loop.time()
            for info, sub, target in targets:
                if info.state is TaskState.FAILED or sub.closed or all(r.done() for r in info.runners):
                    continue
                left = target - sub.cursor
                if left <= 0:
                    continue
                if info.name in own_deadline and at >= own_deadline[info.name]:
                    if info.name not in given_up:
                        given_up.add(info.name)
                        unread = sum(max(0, t - sb.cursor) for i, sb, t in targets if i is info)
                        self.report["not_drained"][info.name] = unread
                        logger.warning("%s: task %r stopped reading with %d event(s) unread at its own drain "
                                       "bound (drain_timeout); its shutdown hook takes what is left", self.name,
                                       info.name, unread, extra=fields(info.name))
                    continue
                out[info.name] = out.get(info.name, 0) + left
            return out

        turns = 0
        while left := behind():
            remaining = self.remaining()
            if remaining <= 0:
                for name, count in left.items():
                    self.report["not_drained"][name] = count
                    logger.warning("%s: shutdown deadline reached with %d event(s) unread by task %r",
                                   self.name, count, name, extra=fields(name))
                return
            turns += 1
            await asyncio.sleep(0 if turns < _SPIN_TURNS else min(_POLL_SECONDS, remaining))

    # -- hooks --------------------------------------------------------------------------------------------------

    async def run_hooks(self) -> list[BaseException]:
        failures: list[BaseException] = []
        for info in reversed(list(self.scheduler.registry)):
            if info.state is TaskState.REGISTERED:
                info.transition(TaskState.STOPPED)
                continue
            if info.state is not TaskState.STOPPED:
                info.transition(TaskState.STOPPING)
            error = await self.run_hook(info)
            if error is not None:
                failures.append(error)
            if info.state is not TaskState.STOPPED:
                info.transition(TaskState.STOPPED)
        return failures

    async def run_hook(self, info: TaskInfo) -> BaseException | None:
        """Run ``info``'s ``shutdown`` hook within the deadline; return its failure (also recorded), or None.

        The hook runs as a task of its own, so that one which swallows its cancellation cannot hold the stop
        past the deadline: it is cancelled at the deadline, given a few loop turns, then left behind (listed
        in ``did_not_stop``). A ``CancelledError`` out of the hook is the hook's failure (``t.cancel(); await
        t`` lets ``t``'s out); a cancellation of the stop itself propagates (and cancels the hook).
        """
        late = self.remaining() <= 0
        hook = asyncio.ensure_future(info.task.shutdown())
        own = self.scheduler._hook_tasks
        own.add(hook)
        hook.add_done_callback(own.discard)
        error: BaseException
        try:
            await asyncio.wait({hook}, timeout=max(self.remaining(), 0.0))
        except asyncio.CancelledError:
            hook.cancel()
            raise
        cut = not hook.done()
        if cut:
            hook.cancel()
            for _ in range(_GRACE_TURNS):
                if hook.done():
                    break
                await asyncio.sleep(0)
        if not hook.done():
            hook.add_done_callback(_retrieve)
            self.report["did_not_stop"].append(f"{info.name} (shutdown hook)")
            error = TimeoutError(f"shutdown hook of {info.name!r} did not finish by the shutdown deadline "
                                 f"({self.timeout} s) and ignores cancellation: left behind")
        elif cut:
            if hook.cancelled() or isinstance(hook.exception(), (asyncio.CancelledError, TimeoutError)):
                error = TimeoutError(
                    f"shutdown hook of {info.name!r} started after the shutdown deadline ({self.timeout} s) had "
                    f"passed: cancelled at its first wait" if late else
                    f"shutdown hook of {info.name!r} did not finish by the shutdown deadline ({self.timeout} s)")
            else:
                error = hook.exception() or TimeoutError(f"shutdown hook of {info.name!r} was cut at the deadline")
        elif hook.cancelled() or isinstance(hook.exception(), asyncio.CancelledError):
            error = TaskShutdownError(
                f"shutdown hook of {info.name!r} raised CancelledError though the shutdown was not cancelled "
                f"(a cancelled task or future it awaited?)"
            )
        else:
            exc = hook.exception()
            if exc is None:
                return None
            error = exc
        info.errors += 1
        info.last_error = f"shutdown(): {error!r}"
        self.report["hook_failures"].append(f"{info.name}: {error!r}")
        log_traceback(logger, logging.ERROR, error, "shutdown hook of task %r failed: %r", info.name, error,
                      extra=fields(info.name))
        return error

    # -- a start that failed or was interrupted -----------------------------------------------------------------

    async def rollback(self) -> list[BaseException]:
        """Undo a start: close every subscription, run the hooks of the tasks that finished ``initialize``
        (reverse order, each failure collected), and leave every task and the scheduler ``stopped``."""
        sched = self.scheduler
        began = time.perf_counter()
        failures: list[BaseException] = []
        for info in sched.registry:
            for sub in info.subscriptions:
                sub.close()
        sched.clock._close()
        try:
            for info in reversed(list(sched.registry)):
                if info.initialized:
                    info.transition(TaskState.STOPPING)
                    error = await self.run_hook(info)
                    if error is not None:
                        failures.append(error)
                    info.transition(TaskState.STOPPED)
                elif info.state is TaskState.INITIALIZING:  # interrupted: its initialize() never finished
                    info.transition(TaskState.STOPPING)
                    info.transition(TaskState.STOPPED)
                elif info.state is TaskState.REGISTERED or info.state is TaskState.FAILED:
                    info.transition(TaskState.STOPPED)
            self.report["finished"] = True
        finally:
            self.finish(began)
        return failures
