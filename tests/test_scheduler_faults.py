"""Scheduler faults: tasks that swallow or leak cancellation, hooks that raise it, a stop bounded by one
deadline, an interrupted start, and a stop ordered by the data flow (background readers of a channel are
stopped after the stages that publish to it).

Every test waits on observable state (registry states, counters, events); time only appears as the scheduler's
deadline and as generous hang guards, never as a speed claim.
"""

from __future__ import annotations

import asyncio

import pytest

from kimiha import (
    Aggregator,
    BackgroundTask,
    BuildError,
    ChannelConfig,
    Connector,
    Event,
    EventBus,
    EventTask,
    EventType,
    Executor,
    InvalidStateError,
    OnError,
    Overflow,
    Scheduler,
    SchedulerState,
    Strategy,
    Supervision,
    TaskInitializationError,
    TaskShutdownError,
    TaskState,
    TradingOrchestratorBuilder,
)


class Ev(EventType):
    IN = "In"
    OUT = "Out"
    ORDERS = "Orders"
    NOWHERE = "Nowhere"


class Tick(Event):
    seq: int


def make_bus(*, in_capacity: int = 1024, out_capacity: int = 1024,
             overflow: Overflow = Overflow.LAG) -> EventBus:
    return EventBus([
        (Ev.IN, ChannelConfig(in_capacity, overflow=overflow, payload_type=Tick)),
        (Ev.OUT, ChannelConfig(out_capacity, overflow=overflow, payload_type=Tick)),
        (Ev.ORDERS, ChannelConfig(64, payload_type=Tick)),
    ])


async def wait_until(predicate, what: str, turns: int = 1_000_000) -> None:
    """Give the loop turns until ``predicate()`` holds (a bounded condition wait, not a timing guess)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened: {what}")


def states(sched: Scheduler) -> set[str]:
    return {s["state"] for s in sched.registry.snapshot()}


class Hooked:
    """Mixin: record each hook call in a shared log."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name = name
        self.log = log

    async def shutdown(self) -> None:
        self.log.append(self.name)


class Sink(Hooked, EventTask):
    def __init__(self, name: str, log: list[str], channel: EventType = Ev.IN) -> None:
        super().__init__(name, log)
        self.channel = channel
        self.seen: list[int] = []

    def subscribed_event(self):
        return self.channel

    def handle_event(self, event: Tick) -> None:
        self.seen.append(event.seq)


class Idle(Hooked, BackgroundTask):
    async def execute(self) -> None:
        await asyncio.Event().wait()


# --- 3. a task that swallows cancellation is given up at the deadline ------------------------------------------


def test_background_task_swallowing_cancellation_is_given_up_at_the_deadline(run):
    deadline = 0.2

    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus, shutdown_timeout=deadline)
        release = asyncio.Event()
        swallowed = []
        finished = asyncio.Event()

        class Stubborn(Hooked, BackgroundTask):
            async def execute(self):
                try:
                    while not release.is_set():  # the retry loop that eats its own cancellation
                        try:
                            await release.wait()
                        except asyncio.CancelledError:
                            swallowed.append(1)
                finally:
                    finished.set()

        sink = Sink("sink", log)
        sched.register_event_task(sink)
        sched.register_background_task(Stubborn("stubborn", log))
        await sched.start()
        bus.publish(Ev.IN, Tick(0))
        await wait_until(lambda: sink.seen == [0], "the event handled")
        try:
            async with asyncio.timeout(deadline * 10):  # hang guard: today it re-cancels forever
                await sched.shutdown()
            report = sched.last_shutdown
            assert report["did_not_stop"] == ["stubborn"]
            assert report["not_drained"] == {}
            assert log == ["stubborn", "sink"]  # the drain and every hook went on
            assert sched.state is SchedulerState.STOPPED
            assert swallowed  # it really was cancelled, and ate it
            info = sched.registry.get("stubborn")
            assert "did not stop" in info.last_error
        finally:
            release.set()  # the task is still running: let it end, or the loop could never close
            await finished.wait()

    run(main())


def test_async_handler_swallowing_cancellation_is_given_up_at_the_deadline(run):
    deadline = 0.2

    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus, shutdown_timeout=deadline)
        release = asyncio.Event()
        entered = asyncio.Event()
        finished = asyncio.Event()

        class Stubborn(Sink):
            async def handle_event(self, event):
                entered.set()
                try:
                    while not release.is_set():
                        try:
                            await release.wait()
                        except asyncio.CancelledError:
                            pass
                finally:
                    finished.set()

        sched.register_event_task(Stubborn("stubborn", log))
        sched.register_event_task(Sink("other", log))
        await sched.start()
        bus.publish(Ev.IN, Tick(0))
        await entered.wait()
        try:
            async with asyncio.timeout(deadline * 10):
                await sched.shutdown()
            report = sched.last_shutdown
            assert report["did_not_stop"] == ["stubborn"]
            assert report["not_drained"] == {"stubborn": 1}
            assert log == ["other", "stubborn"]
            assert states(sched) == {"stopped"}
        finally:
            release.set()
            await finished.wait()

    run(main())


# --- 4. a hook raising CancelledError is a failure, not a cancellation of the stop -----------------------------


class CancelsInHook(Hooked, BackgroundTask):
    """The common ``t.cancel(); await t`` inside a hook: the CancelledError of ``t`` comes out of the hook."""

    async def execute(self) -> None:
        await asyncio.Event().wait()

    async def shutdown(self) -> None:
        self.log.append(self.name)
        helper = asyncio.ensure_future(asyncio.Event().wait())
        await asyncio.sleep(0)
        helper.cancel()
        await helper


def test_hook_raising_cancelled_error_is_collected_and_every_hook_runs(run):
    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus)
        sched.register_event_task(Sink("first", log))
        sched.register_background_task(CancelsInHook("canceller", log))
        sched.register_background_task(Idle("last", log))
        await sched.start()
        with pytest.raises(TaskShutdownError) as raised:
            await sched.shutdown()
        assert log == ["last", "canceller", "first"]
        assert "canceller" in str(raised.value) and "CancelledError" in str(raised.value)
        assert len(raised.value.errors) == 1
        assert sched.state is SchedulerState.STOPPED
        assert states(sched) == {"stopped"}
        assert [f.split(":")[0] for f in sched.last_shutdown["hook_failures"]] == ["canceller"]
        async with asyncio.timeout(10):  # hang guard: wait_stopped() hung while the state stayed `stopping`
            with pytest.raises(TaskShutdownError):
                await sched.wait_stopped()

    run(main())


def test_rollback_runs_every_hook_when_one_raises_cancelled_error(run):
    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus)

        class Broken(Idle):
            async def initialize(self):
                raise RuntimeError("venue refused the login")

        sched.register_event_task(Sink("first", log))
        sched.register_background_task(CancelsInHook("canceller", log))
        sched.register_background_task(Broken("broken", log))
        with pytest.raises(TaskInitializationError, match="broken") as raised:
            await sched.start()
        assert log == ["canceller", "first"]  # the failed task's own hook does not run; every other one does
        assert sched.state is SchedulerState.STOPPED
        assert states(sched) == {"stopped"}
        assert [f.split(":")[0] for f in sched.last_shutdown["hook_failures"]] == ["canceller"]
        assert any("canceller" in note for note in getattr(raised.value, "__notes__", []))

    run(main())


def test_shutdown_caller_really_cancelled_still_gets_cancelled_and_the_stop_completes(run):
    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus)
        gate = asyncio.Event()
        in_hook = asyncio.Event()

        class SlowHook(Idle):
            async def shutdown(self):
                in_hook.set()
                await gate.wait()
                self.log.append(self.name)

        sched.register_event_task(Sink("first", log))
        sched.register_background_task(SlowHook("slow", log))
        await sched.start()
        caller = asyncio.ensure_future(sched.shutdown())
        await in_hook.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        gate.set()
        await sched.wait_stopped()  # the stop itself was not cancelled: every hook ran
        assert log == ["slow", "first"]
        assert sched.last_shutdown["hook_failures"] == []

    run(main())


# --- 5. a stray CancelledError is a failure under the task's policy --------------------------------------------


def test_stray_cancelled_error_from_execute_is_a_failure_and_the_loop_restarts(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)

        class Flaky(BackgroundTask):
            def __init__(self):
                self.calls = 0

            async def execute(self):
                self.calls += 1
                if self.calls == 1:
                    helper = asyncio.ensure_future(asyncio.Event().wait())
                    await asyncio.sleep(0)
                    helper.cancel()
                    await helper  # CancelledError of another task, not of this loop
                await asyncio.sleep(0)

        flaky = Flaky()
        sched.register_background_task(flaky, supervision=Supervision(backoff_initial=0))
        await sched.start()
        info = sched.registry.get("Flaky")
        await wait_until(lambda: info.executions >= 3, "the loop ran again after the failure")
        assert info.errors == 1 and info.restarts == 1
        assert "CancelledError" in info.last_error and "Flaky" in info.last_error
        assert info.state is TaskState.RUNNING
        await sched.shutdown()

    run(main())


@pytest.mark.parametrize("pump", ["compiled", "python"])
def test_stray_cancelled_error_from_async_handler_is_counted_and_a_block_channel_keeps_flowing(run, pump):
    async def main():
        bus = make_bus(in_capacity=4, overflow=Overflow.BLOCK)
        sched = Scheduler(bus)
        seen: list[int] = []

        class Leaky(EventTask):
            def subscribed_event(self):
                return Ev.IN

            async def handle_event(self, event):
                if event.seq == 1:
                    helper = asyncio.ensure_future(asyncio.Event().wait())
                    await asyncio.sleep(0)
                    helper.cancel()
                    await helper
                seen.append(event.seq)

        # handler_timeout routes the task through the Python pump; without it, the compiled pump runs it
        supervision = Supervision(handler_timeout=30.0) if pump == "python" else None
        sched.register_event_task(Leaky(), supervision=supervision)
        await sched.start()
        n = 50
        async with asyncio.timeout(30):  # hang guard: today the publisher stalls on the full ring forever
            for i in range(n):
                await bus.publish_async(Ev.IN, Tick(i))
            await wait_until(lambda: len(seen) == n - 1, "every other event handled")
        assert seen == [i for i in range(n) if i != 1]
        info = sched.registry.get("Leaky")
        assert info.errors == 1 and "CancelledError" in info.last_error
        assert info.state is TaskState.RUNNING
        await sched.shutdown()
        assert sched.last_shutdown["not_drained"] == {}

    run(main())


def test_stray_cancelled_error_from_async_handler_restarts_under_restart_policy(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        seen: list[int] = []

        class Leaky(EventTask):
            def subscribed_event(self):
                return Ev.IN

            async def handle_event(self, event):
                if event.seq == 0:
                    raise asyncio.CancelledError("leaked")
                seen.append(event.seq)

        sched.register_event_task(Leaky(), supervision=Supervision(on_error=OnError.RESTART, backoff_initial=0))
        await sched.start()
        for i in range(3):
            bus.publish(Ev.IN, Tick(i))
        info = sched.registry.get("Leaky")
        await wait_until(lambda: seen == [1, 2] and info.state is TaskState.RUNNING,
                         "the events after the failure handled, and the task back to running after its backoff")
        assert info.errors == 1 and info.restarts == 1
        await sched.shutdown()

    run(main())


def test_sync_handler_raising_cancelled_error_is_counted(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)
        seen: list[int] = []

        class Leaky(EventTask):
            def subscribed_event(self):
                return Ev.IN

            def handle_event(self, event):
                if event.seq == 1:
                    raise asyncio.CancelledError("leaked")
                seen.append(event.seq)

        sched.register_event_task(Leaky())
        await sched.start()
        for i in range(5):
            bus.publish(Ev.IN, Tick(i))
        await wait_until(lambda: len(seen) == 4, "every other event handled")
        info = sched.registry.get("Leaky")
        assert seen == [0, 2, 3, 4]
        assert info.errors == 1 and "CancelledError" in info.last_error
        assert info.state is TaskState.RUNNING
        await sched.shutdown()

    run(main())


# --- 16. one deadline for the whole stop; shutdown requested from inside a task --------------------------------


def test_many_hanging_hooks_share_one_deadline(run):
    deadline = 0.2
    hooks = 30

    async def main():
        bus = make_bus()
        sched = Scheduler(bus, shutdown_timeout=deadline)
        entered: list[str] = []

        class Hangs(BackgroundTask):
            def __init__(self, name):
                self.name = name

            async def execute(self):
                await asyncio.Event().wait()

            async def shutdown(self):
                entered.append(self.name)
                await asyncio.Event().wait()

        for i in range(hooks):
            sched.register_background_task(Hangs(f"hangs-{i}"))
        await sched.start()
        # Hang guard, not a speed claim: with a share of its own per hook this stop takes hooks x deadline.
        async with asyncio.timeout(deadline * 10):
            with pytest.raises(TaskShutdownError) as raised:
                await sched.shutdown()
        assert len(entered) == hooks  # every hook ran
        assert len(raised.value.errors) == hooks
        failures = sched.last_shutdown["hook_failures"]
        assert [f.split(":")[0] for f in failures] == [f"hangs-{i}" for i in reversed(range(hooks))]
        assert all("deadline" in f for f in failures)
        assert states(sched) == {"stopped"}

    run(main())


def test_shutdown_awaited_from_inside_a_handler_returns_and_the_stop_drains(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus, shutdown_timeout=2.0)
        seen: list[int] = []
        returned: list[int] = []

        class Quitter(EventTask):
            def subscribed_event(self):
                return Ev.IN

            async def handle_event(self, event):
                seen.append(event.seq)
                if event.seq == 3:
                    with pytest.raises(InvalidStateError, match="wait for itself"):
                        await sched.wait_stopped()
                    await sched.shutdown()  # must not wait for this very handler's drain
                    returned.append(event.seq)

        sched.register_event_task(Quitter())
        await sched.start()
        for i in range(10):
            bus.publish(Ev.IN, Tick(i))
        async with asyncio.timeout(20):
            await sched.wait_stopped()
        assert returned == [3]
        assert seen == list(range(10))  # what was published when the stop began was drained
        assert sched.last_shutdown["not_drained"] == {}
        assert sched.last_shutdown["did_not_stop"] == []
        assert states(sched) == {"stopped"}

    run(main())


def test_shutdown_awaited_from_execute_and_from_a_hook_returns(run):
    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus, shutdown_timeout=2.0)

        class Quits(Hooked, BackgroundTask):
            async def execute(self):
                await sched.shutdown()
                self.log.append("execute returned")
                await asyncio.Event().wait()

            async def shutdown(self):
                await sched.shutdown()  # from the stop sequence itself
                self.log.append(self.name)

        sched.register_background_task(Quits("quits", log))
        await sched.start()
        async with asyncio.timeout(20):
            await sched.wait_stopped()
        assert log == ["execute returned", "quits"]
        assert sched.last_shutdown["hook_failures"] == []
        assert sched.state is SchedulerState.STOPPED

    run(main())


# --- 18. a hanging initialize(): cancelling start() and shutdown() during start() ------------------------------


class HangsInInit(Idle):
    def __init__(self, name: str, log: list[str], entered: asyncio.Event) -> None:
        super().__init__(name, log)
        self.entered = entered

    async def initialize(self) -> None:
        self.entered.set()
        await asyncio.Event().wait()


def test_cancelling_start_during_a_hanging_initialize_rolls_back(run):
    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus)
        entered = asyncio.Event()
        sched.register_event_task(Sink("first", log))
        sched.register_background_task(HangsInInit("hangs", log, entered))
        sched.register_background_task(Idle("never", log))
        starting = asyncio.ensure_future(sched.start())
        await entered.wait()
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert sched.state is SchedulerState.STOPPED
        assert states(sched) == {"stopped"}
        assert log == ["first"]  # the initialized task is shut down; the interrupted one never finished init
        async with asyncio.timeout(10):
            await sched.wait_stopped()

    run(main())


def test_shutdown_during_a_hanging_start_cancels_it_within_the_deadline(run):
    deadline = 0.5

    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus, shutdown_timeout=deadline)
        entered = asyncio.Event()
        sched.register_event_task(Sink("first", log))
        sched.register_background_task(HangsInInit("hangs", log, entered))
        starting = asyncio.ensure_future(sched.start())
        await entered.wait()
        async with asyncio.timeout(deadline * 10):
            await sched.shutdown()
        assert sched.state is SchedulerState.STOPPED
        assert states(sched) == {"stopped"}
        assert log == ["first"]
        with pytest.raises(TaskInitializationError, match="interrupted by shutdown"):
            await starting
        assert sched.last_shutdown["did_not_stop"] == []

    run(main())


def test_shutdown_during_a_start_whose_initialize_ignores_cancellation_gives_up_at_the_deadline(run):
    deadline = 0.2

    async def main():
        log: list[str] = []
        bus = make_bus()
        sched = Scheduler(bus, shutdown_timeout=deadline)
        entered = asyncio.Event()
        release = asyncio.Event()

        class Stubborn(Idle):
            async def initialize(self):
                entered.set()
                while not release.is_set():
                    try:
                        await release.wait()
                    except asyncio.CancelledError:
                        pass

        sched.register_event_task(Sink("first", log))
        sched.register_background_task(Stubborn("stubborn", log))
        sched.register_background_task(Idle("never", log))
        starting = asyncio.ensure_future(sched.start())
        await entered.wait()
        try:
            async with asyncio.timeout(deadline * 10):
                await sched.shutdown()
            assert sched.last_shutdown["did_not_stop"] == ["stubborn"]
        finally:
            release.set()
        # once its initialize() returns, start() sees the stop was asked for and rolls back
        with pytest.raises(TaskInitializationError, match="interrupted by shutdown"):
            await starting
        assert states(sched) == {"stopped"}
        assert log == ["stubborn", "first"]  # its initialize() did finish: its hook runs; "never" never started

    run(main())


# --- 6. the stop follows the data flow: background readers stop after the stages publishing to them ------------


class Relay(EventTask):
    """A stage: forwards every event of ``IN`` to ``OUT`` with ``publish_async`` (waits for room)."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.relayed = 0

    def subscribed_event(self):
        return Ev.IN

    async def handle_event(self, event: Tick) -> None:
        await self.bus.publish_async(Ev.OUT, event)
        self.relayed += 1


class Exporter(BackgroundTask):
    """Reads ``OUT`` through a subscription opened in ``initialize`` (what the bridge's exporter does)."""

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus
        self.got: list[int] = []
        self.sub = None

    async def initialize(self) -> None:
        self.sub = self.bus.subscribe(Ev.OUT)

    async def execute(self) -> None:
        for event in await self.sub.recv_batch():
            self.got.append(event.seq)

    async def shutdown(self) -> None:
        self.sub.close()


class LazyExporter(Exporter):
    """Declares what it reads (``consumes``) and subscribes only once it runs; its hook takes what is left."""

    def __init__(self, bus: EventBus) -> None:
        super().__init__(bus)
        self.subscribed = asyncio.Event()

    async def initialize(self) -> None:
        pass

    def consumes(self):
        return Ev.OUT

    async def execute(self) -> None:
        if self.sub is None:
            self.sub = self.bus.subscribe(Ev.OUT)
            self.subscribed.set()
        await super().execute()

    async def shutdown(self) -> None:
        for event in self.sub.drain():
            self.got.append(event.seq)
        self.sub.close()


@pytest.mark.parametrize("exporter_kind", [Exporter, LazyExporter])
def test_background_reader_of_a_block_channel_is_stopped_after_the_stage_publishing_to_it(run, exporter_kind):
    deadline = 1.0

    async def main():
        bus = make_bus(out_capacity=4, overflow=Overflow.BLOCK)
        sched = Scheduler(bus, shutdown_timeout=deadline)
        relay = Relay(bus)
        exporter = exporter_kind(bus)
        relay_id = sched.register_event_task(relay)
        sched.register_background_task(exporter)
        sched.drain_stages = [[relay_id]]
        await sched.start()
        if isinstance(exporter, LazyExporter):
            await exporter.subscribed.wait()
        n = 50
        for i in range(n):
            bus.publish(Ev.IN, Tick(i))  # the stage has all of it still to do when the stop begins
        async with asyncio.timeout(deadline * 10):
            await sched.shutdown()
        assert relay.relayed == n
        assert exporter.got == list(range(n))  # nothing lost
        assert sched.last_shutdown["not_drained"] == {}
        assert sched.last_shutdown["did_not_stop"] == []
        assert states(sched) == {"stopped"}

    run(main())


def test_stop_plan_orders_tasks_by_the_data_flow(run):
    async def main():
        bus = make_bus(out_capacity=4, overflow=Overflow.BLOCK)
        sched = Scheduler(bus)
        relay_id = sched.register_event_task(Relay(bus))
        sched.register_background_task(Exporter(bus))
        sched.register_background_task(Idle("feed", []))
        sched.drain_stages = [[relay_id]]
        await sched.start()  # the exporter's reading is learnt from the subscription it opens in initialize
        assert sched.stop_plan() == [
            ("stop", ["feed"]),
            ("drain", ["Relay"]),
            ("drain and stop", ["Exporter"]),
        ]
        await sched.shutdown()

    run(main())


def test_declared_channel_the_bus_lacks_is_an_error_naming_the_task(run):
    async def main():
        bus = make_bus()
        sched = Scheduler(bus)

        class Reads(Idle):
            def consumes(self):
                return (Ev.OUT, Ev.NOWHERE)

        sched.register_background_task(Reads("reader", []))
        with pytest.raises(LookupError, match="'reader'.*Ev.NOWHERE"):
            await sched.start()

    run(main())


def test_orchestrator_stops_a_bridge_style_reader_after_the_stages(run):
    deadline = 1.0

    class Feed(Connector):
        async def execute(self):
            await asyncio.Event().wait()

    class Agg(Aggregator, Relay):
        pass

    class Strat(Strategy):
        def __init__(self):
            self.seen = 0

        def subscribed_event(self):
            return Ev.OUT

        def handle_event(self, event):
            self.seen += 1

    class Exe(Executor):
        def subscribed_event(self):
            return Ev.ORDERS

        def handle_event(self, event):
            pass

    async def main():
        bus = make_bus(out_capacity=4, overflow=Overflow.BLOCK)
        agg, strat, exporter = Agg(bus), Strat(), Exporter(bus)
        engine = (TradingOrchestratorBuilder(bus, shutdown_timeout=deadline)
                  .with_connector(Feed()).with_aggregator(agg).with_strategy(strat).with_executor(Exe()).build())
        engine.scheduler.register_background_task(exporter)  # what NatsBridge.register(engine) does
        await engine.start()
        assert [phase for phase, _ in engine.scheduler.stop_plan()] == [
            "stop", "drain", "drain", "drain", "drain and stop"]
        n = 50
        for i in range(n):
            bus.publish(Ev.IN, Tick(i))
        async with asyncio.timeout(deadline * 10):
            await engine.shutdown()
        assert agg.relayed == n and strat.seen == n and exporter.got == list(range(n))
        assert engine.scheduler.last_shutdown["not_drained"] == {}
        assert states(engine.scheduler) == {"stopped"}

    run(main())


def test_orchestrator_build_reports_a_connector_reading_an_unknown_channel():
    class Reads(Connector):
        async def execute(self):
            pass

        def consumes(self):
            return Ev.NOWHERE

    class ReadsIn:
        def subscribed_event(self):
            return Ev.IN

        def handle_event(self, event):
            pass

    class Agg(ReadsIn, Aggregator):
        pass

    class Strat(ReadsIn, Strategy):
        pass

    class Exe(ReadsIn, Executor):
        pass

    builder = (TradingOrchestratorBuilder(make_bus()).with_connector(Reads()).with_aggregator(Agg())
               .with_strategy(Strat()).with_executor(Exe()))
    with pytest.raises(BuildError, match="Reads.*consumes.*Ev.NOWHERE"):
        builder.build()


def test_a_hook_that_swallows_its_cancellation_is_left_behind_at_the_deadline(run):
    # found by the adversarial review of round 2: the hook ate the deadline's cancellation and the stop hung
    release = asyncio.Event()

    class StubbornHook(BackgroundTask):
        async def execute(self) -> None:
            await asyncio.sleep(0.01)

        async def shutdown(self) -> None:
            while not release.is_set():
                try:
                    await asyncio.sleep(0.01)
                except asyncio.CancelledError:
                    pass

    class After(BackgroundTask):
        ran = False

        async def execute(self) -> None:
            await asyncio.sleep(0.01)

        async def shutdown(self) -> None:
            After.ran = True

    async def main() -> None:
        bus = EventBus([])
        sched = Scheduler(bus, shutdown_timeout=0.3)
        sched.register_background_task(After())
        sched.register_background_task(StubbornHook())
        await sched.start()
        async with asyncio.timeout(10):  # hang guard, not a speed claim
            with pytest.raises(TaskShutdownError, match="StubbornHook.*ignores cancellation: left behind"):
                await sched.shutdown()
        assert sched.state is SchedulerState.STOPPED
        assert After.ran  # the hooks after it still ran
        assert "StubbornHook (shutdown hook)" in sched.last_shutdown["did_not_stop"]
        release.set()
        await asyncio.sleep(0.05)

    run(main())


# -- found by the adversarial trial of 0.3.2's drain bound (drain_timeout) ------------------------------------------


class NeverReads(BackgroundTask):
    """Opens a subscription in ``initialize`` and never reads it: the drain would wait for it to the deadline."""

    def __init__(self, bus: EventBus, drain_timeout) -> None:
        self.bus = bus
        self._limit = drain_timeout
        self.sub = None
        self.hook_ran = False

    @property
    def drain_timeout(self):
        if isinstance(self._limit, BaseException):
            raise self._limit
        return self._limit

    async def initialize(self) -> None:
        self.sub = self.bus.subscribe(Ev.OUT)

    async def execute(self) -> None:
        await asyncio.sleep(3600)

    async def shutdown(self) -> None:
        self.hook_ran = True
        self.sub.close()


@pytest.mark.parametrize("limit", [RuntimeError("broken property"), 10**400, "1", float("nan"), True, -5, 0],
                         ids=["raises", "overflows", "str", "nan", "bool", "negative", "zero"])
def test_a_bad_or_odd_drain_timeout_never_stops_the_stop_and_what_is_left_is_reported(run, limit):
    # before: a drain_timeout that raised (or did not convert to float: 10**400) aborted the stop with no hook
    # run and the scheduler left STOPPED (a second shutdown() returned at once)
    async def main():
        bus = make_bus()
        sched = Scheduler(bus, shutdown_timeout=1.0)
        task = NeverReads(bus, limit)
        sched.register_background_task(task)
        await sched.start()
        for i in range(10):
            bus.publish(Ev.OUT, Tick(i))
        await sched.shutdown()
        return sched.last_shutdown, task.hook_ran

    report, hook_ran = run(main())
    assert hook_ran and report["finished"] and not report["hook_failures"], report
    assert report["not_drained"] == {"NeverReads": 10}, report  # given up at its bound or at the deadline
