"""The scheduler's stop sequence: producers, then staged drains, then pumps, then every hook, in one deadline.

1. Cancel and await every background loop (the producers).
2. Drain event tasks, stage by stage, to the sequence each channel had published when its stage began.
3. Close the subscriptions and stop the pumps.
4. Run every ``shutdown`` hook in reverse registration order, even when some fail.

What did not drain, did not stop or failed is written to the report that becomes ``Scheduler.last_shutdown``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import TYPE_CHECKING, Any

from kimiha.error import TaskShutdownError
from kimiha.scheduling.registry import SchedulerState, TaskInfo, TaskState

if TYPE_CHECKING:
    from kimiha.scheduler import Scheduler

__all__ = ["StopSequence"]

logger = logging.getLogger("kimiha.scheduler")


class StopSequence:
    """One run of the stop sequence of ``scheduler``, bounded by ``timeout`` seconds."""

    def __init__(self, scheduler: Scheduler, timeout: float) -> None:
        self.scheduler = scheduler
        self.name = scheduler.name
        self.timeout = timeout
        self.loop = asyncio.get_running_loop()
        self.deadline = self.loop.time() + timeout
        self.report: dict[str, Any] = {"not_drained": {}, "did_not_stop": [], "hook_failures": []}

    async def run(self) -> None:
        sched = self.scheduler
        if sched.state is SchedulerState.STOPPED:
            return
        sched._set_state(SchedulerState.STOPPING)
        sched._stopping = True
        began = time.perf_counter()
        report = self.report

        # 1. producers first: cancel and await every background loop
        for runner in sched._background:
            runner.cancel()
        await self.await_runners(sched._background)

        # 2. drain event tasks to the sequence published when (their stage of) shutdown began
        event_infos = [info for info in sched.registry if info.kind == "event"]
        for stage in self.stages(event_infos):
            for info in stage:
                info.drain_targets = [sub.channel.published for sub in info.subscriptions]
                if info.is_async_handler:
                    for sub, target in zip(info.subscriptions, info.drain_targets):
                        sub.drain_target = target
            await self.drain(stage)

        # 3. close subscriptions, stop pumps
        pumps = []
        for info in event_infos:
            for sub in info.subscriptions:
                sub.close()
            pumps.extend(info.runners)
        for pump in pumps:
            pump.cancel()
        await self.await_runners(pumps)

        # 4. every shutdown hook, in reverse registration order, even when some fail
        failures = await self.run_hooks()

        sched._set_state(SchedulerState.STOPPED)
        report["seconds"] = time.perf_counter() - began
        sched.last_shutdown = report
        sched._stopped.set()
        if failures:
            detail = "; ".join(report["hook_failures"])
            raise TaskShutdownError(f"{self.name}: {len(failures)} shutdown hook(s) failed: {detail}", failures)

    async def run_hooks(self) -> list[BaseException]:
        failures: list[BaseException] = []
        for info in reversed(list(self.scheduler.registry)):
            if info.state is TaskState.REGISTERED:
                info.transition(TaskState.STOPPED)
                continue
            if info.state is not TaskState.STOPPED:
                info.transition(TaskState.STOPPING)
            try:
                async with asyncio.timeout(max(self.deadline - self.loop.time(), min(self.timeout, 1.0))):
                    await info.task.shutdown()
            except (Exception, TimeoutError) as exc:
                err = exc if str(exc) else TimeoutError(f"shutdown hook of {info.name!r} timed out")
                failures.append(err)
                info.errors += 1
                info.last_error = f"shutdown(): {err!r}"
                self.report["hook_failures"].append(f"{info.name}: {err!r}")
                logger.error("shutdown hook of task %r failed: %s", info.name,
                             "".join(traceback.format_exception(err)).rstrip())
            if info.state is not TaskState.STOPPED:
                info.transition(TaskState.STOPPED)
        return failures

    def stages(self, event_infos: list[TaskInfo]) -> list[list[TaskInfo]]:
        drain_stages = self.scheduler.drain_stages
        if not drain_stages:
            return [event_infos]
        stages = [[self.scheduler.registry.get(task_id) for task_id in group] for group in drain_stages]
        staged = {info.id for group in stages for info in group}
        rest = [info for info in event_infos if info.id not in staged]
        return [group for group in stages if group] + ([rest] if rest else [])

    async def await_runners(self, runners: list[asyncio.Task[Any]]) -> None:
        loop, report = self.loop, self.report
        pending = [r for r in runners if not r.done()]
        while pending:
            remaining = self.deadline - loop.time()
            done, still = await asyncio.wait(pending, timeout=max(remaining, 0.05))
            pending = list(still)
            if pending and loop.time() >= self.deadline:
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
                                       self.name, behind(info), info.name)
                return
            if handlers_behind:
                await asyncio.sleep(0)  # handlers run from dispatch callbacks: one loop turn each
            else:
                await asyncio.wait(active, timeout=remaining)
