"""pytest-benchmark suite of the scheduler's event-task overhead over a bare bus subscription.

The same handler (sync or coroutine) reached through ``bus.subscribe`` (a handler subscription for the sync
handler, an ``async for`` pump for the coroutine) and through ``Scheduler.register_event_task`` (supervision,
per-handler timing into the task registry). ``benchmarks/scheduler_overhead.py`` prints the ratio; these suites
track both sides over time.

Run: ``python -m pytest benchmarks/test_bench_scheduler.py -q --benchmark-only``.
"""

from __future__ import annotations

import asyncio

import pytest

from kimiha import EventTask, Scheduler

sleep = asyncio.sleep


class CountingTask(EventTask):
    def __init__(self, key) -> None:  # type: ignore[no-untyped-def]
        self.key = key
        self.count = 0
        self.last = -1

    def subscribed_event(self):  # type: ignore[no-untyped-def]
        return self.key

    def handle_event(self, event) -> None:  # type: ignore[no-untyped-def]
        self.count += 1
        self.last = event.seq


class AsyncCountingTask(CountingTask):
    async def handle_event(self, event) -> None:  # type: ignore[no-untyped-def,override]
        self.count += 1
        self.last = event.seq


async def publish_all(bus, key, chunks, task) -> None:  # type: ignore[no-untyped-def]
    publish = bus.channel(key).publish
    sent = 0
    for chunk in chunks:
        for e in chunk:
            publish(e)
        sent += len(chunk)
        while task.count < sent:  # every event handled before the next chunk, on either path
            await sleep(0)


@pytest.mark.benchmark(group="scheduler event task")
@pytest.mark.parametrize("handler", ["sync", "async"])
@pytest.mark.parametrize("via", ["bare subscription", "event task"])
def test_event_task_overhead(benchmark, pedantic, loop, chunks, make_bus, key, record_rate, handler, via):
    n = sum(map(len, chunks))
    tasks = []

    async def start(bus, task):  # type: ignore[no-untyped-def]
        if via == "event task":
            scheduler = Scheduler(bus)
            scheduler.register_event_task(task)
            await scheduler.start()
            return scheduler
        if handler == "sync":
            bus.subscribe(key, task.handle_event)
            return None
        sub = bus.subscribe(key)

        async def pump() -> None:
            handle = task.handle_event
            async for event in sub:
                await handle(event)

        return asyncio.ensure_future(pump())

    def setup():  # type: ignore[no-untyped-def]
        bus = make_bus()
        bus.bind_loop(loop)
        task = AsyncCountingTask(key) if handler == "async" else CountingTask(key)
        tasks.append(task)
        runner = loop.run_until_complete(start(bus, task))
        return (bus, task, runner), {}

    async def stop(bus, runner) -> None:  # type: ignore[no-untyped-def]
        if isinstance(runner, Scheduler):
            await runner.shutdown()
        elif runner is not None:
            bus.close()
            await runner

    def target(bus, task, runner):  # type: ignore[no-untyped-def]
        loop.run_until_complete(publish_all(bus, key, chunks, task))

    def teardown(bus, task, runner):  # type: ignore[no-untyped-def]
        loop.run_until_complete(stop(bus, runner))

    pedantic(target, setup, teardown)
    for task in tasks:
        assert (task.count, task.last) == (n, n - 1)
    record_rate(benchmark)
