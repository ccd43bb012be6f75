"""Scheduler: the original's scenarios plus one test per flaw of the original that kimiha fixes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from kimiha import (
    BackgroundTask,
    ChannelConfig,
    Event,
    EventBus,
    EventTask,
    EventType,
    InvalidChannelError,
    InvalidStateError,
    OnError,
    OrchestratorError,
    Overflow,
    Scheduler,
    SchedulerState,
    Supervision,
    TaskInitializationError,
    TaskShutdownError,
    TaskState,
)


class Ev(EventType):
    MARKET_DATA = "MarketData"
    ORDERS = "Orders"
    MISSING = "Missing"
    ALSO_MISSING = "AlsoMissing"


class Tick(Event):
    seq: int


def make_bus(capacity: int = 1024, overflow: Overflow = Overflow.LAG) -> EventBus:
    return EventBus(
        [
            (Ev.MARKET_DATA, ChannelConfig(capacity, overflow=overflow, payload_type=Tick)),
            (Ev.ORDERS, ChannelConfig(capacity, payload_type=Tick)),
        ]
    )


class Producer(BackgroundTask):
    """Publishes ``count`` ticks, one per execute, then idles."""

    def __init__(self, bus: EventBus, count: int, log: list[str] | None = None) -> None:
        self.bus, self.count, self.sent, self.log = bus, count, 0, log

    async def execute(self) -> None:
        if self.sent < self.count:
            self.bus.publish(Ev.MARKET_DATA, Tick(self.sent))
            self.sent += 1
        else:
            await asyncio.sleep(0.001)

    async def shutdown(self) -> None:
        if self.log is not None:
            self.log.append("producer.shutdown")


class Collector(EventTask):
    def __init__(self, log: list[str] | None = None, channel: EventType = Ev.MARKET_DATA) -> None:
        self.seen: list[int] = []
        self.log = log
        self.channel = channel

    def subscribed_event(self):
        return self.channel

    def handle_event(self, event: Tick) -> None:
        self.seen.append(event.seq)

    async def initialize(self) -> None:
        if self.log is not None:
            self.log.append("collector.initialize")

    async def shutdown(self) -> None:
        if self.log is not None:
            self.log.append("collector.shutdown")


class AsyncCollector(Collector):
    async def handle_event(self, event: Tick) -> None:
        await asyncio.sleep(0)
        self.seen.append(event.seq)


async def wait_until(predicate, what: str, turns: int = 100_000) -> None:
    """Give the loop turns until ``predicate()`` holds (a bounded condition wait, not a timing guess)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


# --- the original's scenarios ----------------------------------------------------------------------------------


def test_register_start_and_event_reaches_its_task(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        collector = Collector()
        producer = Producer(bus, 10)
        ids = [sched.register_event_task(collector), sched.register_background_task(producer)]
        assert ids == [1, 2]
        await sched.start()
        assert sched.state is SchedulerState.RUNNING
        await wait_until(lambda: len(collector.seen) == 10, "10 events handled")
        await sched.shutdown()
        assert collector.seen == list(range(10))
        assert sched.state is SchedulerState.STOPPED
        snap = {s["name"]: s for s in sched.registry.snapshot()}
        assert snap["Collector"]["events_handled"] == 10
        assert snap["Producer"]["executions"] >= 10
        assert all(s["state"] == "stopped" for s in snap.values())

    run(main())


@pytest.mark.parametrize("handler_kind", [Collector, AsyncCollector])
def test_handlers_get_events_in_order(run, handler_kind):
    async def main():
        bus = make_bus(capacity=4096)
        async with Scheduler(bus) as sched:
            collector = handler_kind()
            sched.register_event_task(collector)
            await sched.start()
            for i in range(3000):
                bus.publish(Ev.MARKET_DATA, Tick(i))
        # leaving the block shut down and drained everything published before
        assert collector.seen == list(range(3000))

    run(main())


# --- fixed flaws -----------------------------------------------------------------------------------------------


def test_missing_channels_are_reported_together(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        sched.register_event_task(Collector(channel=Ev.MISSING))
        sched.register_event_task(Collector(channel=Ev.ALSO_MISSING))
        sched.register_event_task(Collector())
        with pytest.raises(InvalidChannelError) as info:
            await sched.start()
        msg = str(info.value)
        assert "Missing" in msg and "AlsoMissing" in msg and "Known channels" in msg
        assert sched.state is SchedulerState.CREATED  # nothing was started

    run(main())


def test_event_from_the_first_execute_is_delivered(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        producer = Producer(bus, 1)
        collector = AsyncCollector()
        sched.register_background_task(producer)  # registered first: must still not race the subscriber
        sched.register_event_task(collector)
        await sched.start()
        await wait_until(lambda: collector.seen, "the very first event handled")
        await sched.shutdown()
        assert collector.seen == [0]

    run(main())


def test_lagging_handler_keeps_working_and_lag_is_counted(run):
    async def main():
        bus = make_bus(capacity=8)
        sched = Scheduler(bus)
        collector = Collector()
        sched.register_event_task(collector)
        await sched.start()
        for i in range(100):  # no yield: the ring wraps 12 times before the handler runs
            bus.publish(Ev.MARKET_DATA, Tick(i))
        await wait_until(lambda: collector.seen and collector.seen[-1] == 99, "tail handled")
        bus.publish(Ev.MARKET_DATA, Tick(100))
        await wait_until(lambda: collector.seen[-1] == 100, "handling continues after the lag")
        info = sched.registry.get("Collector")
        assert info.lagged == 92
        assert info.state is TaskState.RUNNING
        await sched.shutdown()

    run(main())


def test_nothing_runs_after_shutdown_returns(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        calls = {"execute": 0, "handle": 0}

        class Busy(BackgroundTask):
            async def execute(self):
                calls["execute"] += 1
                bus.publish(Ev.MARKET_DATA, Tick(calls["execute"]))
                await asyncio.sleep(0)

        class Count(EventTask):
            def subscribed_event(self):
                return Ev.MARKET_DATA

            async def handle_event(self, event):
                calls["handle"] += 1

        sched.register_background_task(Busy())
        sched.register_event_task(Count())
        await sched.start()
        await wait_until(lambda: calls["handle"] > 50, "work under way")
        await sched.shutdown()
        frozen = dict(calls)
        for _ in range(200):
            await asyncio.sleep(0)
        bus.publish(Ev.MARKET_DATA, Tick(-1))
        for _ in range(50):
            await asyncio.sleep(0)
        assert calls == frozen
        current = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not current and t.get_name().startswith("kimiha:")]
        assert leftovers == []
        # everything published before shutdown began was handled (drained)
        assert frozen["handle"] >= frozen["execute"] - 1

    run(main())


def test_failed_initialize_rolls_back_and_names_the_task(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        log: list[str] = []

        class Boom(BackgroundTask):
            name = "boom-task"

            async def initialize(self):
                raise RuntimeError("no connection")

            async def execute(self):
                log.append("boom.execute")

        producer = Producer(bus, 5, log)
        sched.register_event_task(Collector(log))
        sched.register_background_task(producer)
        sched.register_background_task(Boom())
        with pytest.raises(TaskInitializationError) as info:
            await sched.start()
        assert "boom-task" in str(info.value) and "no connection" in str(info.value)
        assert isinstance(info.value.__cause__, RuntimeError)
        assert log == ["collector.initialize", "producer.shutdown", "collector.shutdown"]
        assert sched.state is SchedulerState.STOPPED
        assert producer.sent == 0  # no background loop ever ran
        assert bus.channel(Ev.MARKET_DATA).subscribers == 0
        current = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not current] == []
        with pytest.raises(InvalidStateError, match="stopped"):
            await sched.start()

    run(main())


def test_failing_hooks_do_not_stop_the_others_and_are_reported_together(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        ran: list[str] = []

        def task(name: str, fail: bool):
            class T(BackgroundTask):
                async def execute(self):
                    await asyncio.sleep(0.001)

                async def shutdown(self):
                    ran.append(name)
                    if fail:
                        raise ValueError(f"{name} hook failed")

            t = T()
            t.name = name
            return t

        for name, fail in [("a", False), ("b", True), ("c", False), ("d", True)]:
            sched.register_background_task(task(name, fail))
        await sched.start()
        with pytest.raises(TaskShutdownError) as info:
            await sched.shutdown()
        assert ran == ["d", "c", "b", "a"]  # reverse order, every hook
        assert len(info.value.errors) == 2
        assert "b hook failed" in str(info.value) and "d hook failed" in str(info.value)
        await sched.shutdown()  # idempotent: no second run of the hooks, no error
        assert ran == ["d", "c", "b", "a"]

    run(main())


def test_never_awaiting_execute_does_not_starve_event_task(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)

        class Spinner(BackgroundTask):
            spins = 0

            async def execute(self):  # never awaits anything
                Spinner.spins += 1

        collector = AsyncCollector()
        sched.register_background_task(Spinner())
        sched.register_event_task(collector)
        await sched.start()
        for i in range(20):
            bus.publish(Ev.MARKET_DATA, Tick(i))
            await asyncio.sleep(0)
        await wait_until(lambda: len(collector.seen) == 20, "event task progressed beside the spinner")
        assert Spinner.spins > 0
        await sched.shutdown()

    run(main())


def test_restart_backoff_and_maximum_then_failed(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        loop = asyncio.get_running_loop()
        attempts: list[float] = []

        class Broken(BackgroundTask):
            async def execute(self):
                attempts.append(loop.time())
                raise ConnectionError("venue down")

        policy = Supervision(on_error=OnError.RESTART, max_restarts=3, backoff_initial=0.02, backoff_factor=2)
        tid = sched.register_background_task(Broken(), supervision=policy)
        await sched.start()
        info = sched.registry.get(tid)
        await wait_until(lambda: info.state is TaskState.FAILED, "task failed after max restarts", 10**7)
        assert len(attempts) == 4  # first try + 3 restarts
        assert info.restarts == 3 and info.errors == 4
        assert "venue down" in info.last_error
        gaps = [b - a for a, b in zip(attempts, attempts[1:])]
        for gap, backoff in zip(gaps, (0.02, 0.04, 0.08)):
            assert gap >= backoff * 0.75, (gaps, "restarted before its backoff elapsed")
        assert [policy.backoff(n) for n in (1, 2, 3)] == [0.02, 0.04, 0.08]
        assert sched.state is SchedulerState.RUNNING  # one failed task does not stop the others
        await sched.shutdown()
        assert info.state is TaskState.STOPPED

    run(main())


def test_skip_policy_for_handlers_counts_and_continues(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)

        class Picky(Collector):
            def handle_event(self, event):
                if event.seq % 4 == 0:
                    raise ValueError(f"bad tick {event.seq}")
                self.seen.append(event.seq)

        picky = Picky()
        sched.register_event_task(picky)
        await sched.start()
        for i in range(12):
            bus.publish(Ev.MARKET_DATA, Tick(i))
        await wait_until(lambda: len(picky.seen) == 9, "non-failing events handled")
        info = sched.registry.get("Picky")
        assert info.errors == 3 and info.state is TaskState.RUNNING
        assert "bad tick 8" in info.last_error
        await sched.shutdown()

    run(main())


def test_stop_policy_fails_only_that_task(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)

        class Fragile(AsyncCollector):
            async def handle_event(self, event):
                raise RuntimeError("fragile")

        good = Collector()
        sched.register_event_task(Fragile(), supervision=Supervision(on_error=OnError.STOP))
        sched.register_event_task(good)
        await sched.start()
        for i in range(5):
            bus.publish(Ev.MARKET_DATA, Tick(i))
        await wait_until(lambda: len(good.seen) == 5, "the healthy task keeps going")
        await wait_until(lambda: sched.registry.get("Fragile").state is TaskState.FAILED, "fragile failed")
        assert sched.registry.get("Fragile").errors == 1
        await sched.shutdown()

    run(main())


def test_escalate_stops_everything(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        log: list[str] = []

        class Fatal(BackgroundTask):
            async def execute(self):
                raise RuntimeError("risk limit breached")

        sched.register_background_task(Producer(bus, 10**9, log))
        sched.register_event_task(Collector(log))
        sched.register_background_task(Fatal(), supervision=Supervision(on_error=OnError.ESCALATE))
        await sched.start()
        await sched.wait_stopped()
        assert sched.state is SchedulerState.STOPPED
        assert "risk limit breached" in str(sched.failure)
        assert "producer.shutdown" in log and "collector.shutdown" in log
        current = asyncio.current_task()
        assert [t for t in asyncio.all_tasks() if t is not current and t.get_name().startswith("kimiha:")] == []

    run(main())


def test_hanging_async_handler_is_bounded_by_timeout(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        handled: list[int] = []

        class Hangs(EventTask):
            def subscribed_event(self):
                return Ev.MARKET_DATA

            async def handle_event(self, event):
                if event.seq == 1:
                    await asyncio.Event().wait()  # never set
                handled.append(event.seq)

        sched.register_event_task(Hangs(), supervision=Supervision(handler_timeout=0.05))
        await sched.start()
        for i in range(4):
            bus.publish(Ev.MARKET_DATA, Tick(i))
        await wait_until(lambda: len(handled) == 3, "events after the hung one handled", 10**7)
        assert handled == [0, 2, 3]
        info = sched.registry.get("Hangs")
        assert info.errors == 1 and "within 0.05 s" in info.last_error
        await sched.shutdown()

    run(main())


def test_multi_channel_task(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)

        class Both(AsyncCollector):
            def subscribed_event(self):
                return (Ev.MARKET_DATA, Ev.ORDERS)

        both = Both()
        sched.register_event_task(both)
        await sched.start()
        bus.publish(Ev.MARKET_DATA, Tick(1))
        bus.publish(Ev.ORDERS, Tick(2))
        await wait_until(lambda: len(both.seen) == 2, "both channels handled")
        assert sorted(both.seen) == [1, 2]
        assert sched.registry.get("Both").snapshot()["channels"] == ["Ev.MARKET_DATA", "Ev.ORDERS"]
        await sched.shutdown()

    run(main())


def test_shutdown_drains_to_what_was_published_with_a_deadline(run):
    async def main():
        bus = make_bus(capacity=10_000)
        sched = Scheduler(bus)

        class Slow(AsyncCollector):
            async def handle_event(self, event):
                await asyncio.sleep(0)
                self.seen.append(event.seq)

        slow = Slow()
        sched.register_event_task(slow)
        await sched.start()
        for i in range(2000):
            bus.publish(Ev.MARKET_DATA, Tick(i))
        await sched.shutdown(timeout=30)
        assert slow.seen == list(range(2000))
        assert sched.last_shutdown["not_drained"] == {}

    run(main())


def test_shutdown_deadline_reports_what_was_not_drained(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)

        class Stuck(AsyncCollector):
            async def handle_event(self, event):
                await asyncio.Event().wait()

        sched.register_event_task(Stuck())
        await sched.start()
        for i in range(5):
            bus.publish(Ev.MARKET_DATA, Tick(i))
        await asyncio.sleep(0)
        await sched.shutdown(timeout=0.1)
        assert sched.last_shutdown["not_drained"] == {"Stuck": 5}
        assert sched.state is SchedulerState.STOPPED

    run(main())


# --- misuse and states -----------------------------------------------------------------------------------------


def test_misuse_errors(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        await sched.shutdown()  # no-op before start
        assert sched.state is SchedulerState.CREATED
        collector = Collector()
        sched.register_event_task(collector)
        with pytest.raises(OrchestratorError, match="already registered"):
            sched.register_event_task(collector)
        with pytest.raises(ValueError, match="execute"):
            sched.register_background_task(Collector())
        with pytest.raises(ValueError, match="interval"):
            sched.register_background_task(Producer(bus, 1), interval=-1)
        with pytest.raises(ValueError, match="max_restarts"):
            Supervision(max_restarts=-1)
        with pytest.raises(ValueError, match="EventBus"):
            Scheduler("not a bus")
        await sched.start()
        with pytest.raises(InvalidStateError, match="running"):
            await sched.start()
        with pytest.raises(InvalidStateError, match="running"):
            sched.register_background_task(Producer(bus, 1))
        info = sched.registry.get(1)
        with pytest.raises(InvalidStateError, match="'running' to 'registered'"):
            info.transition(TaskState.REGISTERED)
        with pytest.raises(LookupError, match="nope"):
            sched.registry.get("nope")
        await sched.shutdown()

    run(main())


def test_registry_table_is_readable(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        sched.register_event_task(Collector())
        sched.register_background_task(Producer(bus, 3), interval=0.001)
        await sched.start()
        await wait_until(lambda: sched.registry.get("Collector").handled() == 3, "3 handled", 10**7)
        table = str(sched.registry)
        assert "Collector" in table and "Producer" in table and "running" in table
        snap = sched.registry.get("Collector").snapshot()
        assert snap["events_handled"] == 3 and snap["latency_ns"]["max"] > 0
        await sched.shutdown()

    run(main())


SIGNAL_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    import kimiha
    from kimiha import BackgroundTask, ChannelConfig, Event, EventBus, EventTask, EventType, Scheduler

    class Ev(EventType):
        TICKS = "Ticks"

    class Tick(Event):
        seq: int

    log = open(sys.argv[1], "a", buffering=1)

    class Feed(BackgroundTask):
        def __init__(self, bus):
            self.bus, self.n = bus, 0
        async def execute(self):
            self.n += 1
            self.bus.publish(Ev.TICKS, Tick(self.n))
            if self.n == 100:
                print("READY", flush=True)
            await asyncio.sleep(0.001)
        async def shutdown(self):
            log.write("feed.shutdown\\n")

    class Sink(EventTask):
        def subscribed_event(self):
            return Ev.TICKS
        def handle_event(self, event):
            pass
        async def shutdown(self):
            log.write("sink.shutdown\\n")

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(1024, payload_type=Tick))])
        sched = Scheduler(bus)
        sched.register_event_task(Sink())
        sched.register_background_task(Feed(bus))
        await sched.run_until_signal()
        log.write("exited cleanly\\n")

    kimiha.run(main())
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_a_subprocess_runs_every_hook_and_exits_zero(tmp_path, signum):
    script = tmp_path / "svc.py"
    script.write_text(SIGNAL_SCRIPT)
    log = tmp_path / "hooks.log"
    proc = subprocess.Popen([sys.executable, str(script), str(log)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout.readline().strip() == "READY"
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert log.read_text().splitlines() == ["feed.shutdown", "sink.shutdown", "exited cleanly"]  # reverse order


@pytest.mark.parametrize("timeout", [None, 5.0], ids=["compiled pump", "python pump (handler_timeout)"])
@pytest.mark.parametrize("handler_kind", ["sync", "async"])
def test_handler_times_are_the_channels_sample_for_every_kind_of_handler(run, timeout, handler_kind):
    """README: the handler times in the registry are a 1-in-latency_sample sample of the deliveries, for
    sync handlers, the compiled pump of async handlers and the Python pump (a timeout) alike."""

    class SyncTask(EventTask):
        def subscribed_event(self):
            return Ev.MARKET_DATA

        def handle_event(self, event):
            pass

    class AsyncTask(SyncTask):
        async def handle_event(self, event):
            pass

    async def main():
        bus = EventBus([(Ev.MARKET_DATA, ChannelConfig(64, payload_type=Tick, latency_sample=4))])
        sched = Scheduler(bus)
        supervision = Supervision(handler_timeout=timeout) if timeout else None
        task = SyncTask() if handler_kind == "sync" else AsyncTask()
        if supervision is None:
            sched.register_event_task(task)
        else:
            sched.register_event_task(task, supervision=supervision)
        await sched.start()
        for i in range(20):
            bus.publish(Ev.MARKET_DATA, Tick(i))
            if i % 7 == 6:
                await asyncio.sleep(0)
        info = sched.registry.get(type(task).__name__)
        await wait_until(lambda: info.handled() == 20, "20 handled")
        assert info.handler_latency().count == 5      # seq 0, 4, 8, 12, 16
        await sched.shutdown()

    run(main())
