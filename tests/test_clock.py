"""kimiha.clock: SimClock and LiveClock timers, alone and under a Scheduler, on asyncio and uvloop."""

from __future__ import annotations

import asyncio
import time

import pytest

from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Scheduler, Supervision
from kimiha.clock import LiveClock, SimClock, TimeEvent
from kimiha.error import InvalidConfigurationError, InvalidStateError, TaskInitializationError
from kimiha.scheduler import OnError, TaskState


class Ev(EventType):
    TICKS = "Ticks"


class Tick(Event):
    n: int
    recv_ts_ns: int


# -- SimClock alone -------------------------------------------------------------------------------------------

def test_sim_timer_fires_at_each_deadline_and_stops(run):
    async def main():
        clock = SimClock(1_000)
        fired = []
        clock.set_timer("t", 100, lambda e: fired.append((e.name, e.ts_ns, clock.now_ns())), stop_ns=1_350)
        await clock.advance_to(1_099)
        assert fired == []
        await clock.advance_to(1_400)
        assert clock.now_ns() == 1_400
        return fired, clock.timer_names()

    fired, names = run(main())
    # each callback sees the clock at its own deadline; the last deadline <= stop_ns is 1_300
    assert fired == [("t", 1_100, 1_100), ("t", 1_200, 1_200), ("t", 1_300, 1_300)]
    assert names == []  # past its stop: gone


def test_sim_ties_fire_in_the_order_set_and_repeating_timers_keep_their_place(run):
    async def main():
        clock = SimClock(0)
        fired = []
        clock.set_timer("b", 10, lambda e: fired.append((e.ts_ns, e.name)))
        clock.set_time_alert("a", 20, lambda e: fired.append((e.ts_ns, e.name)))
        clock.set_timer("c", 5, lambda e: fired.append((e.ts_ns, e.name)), stop_ns=20)
        await clock.advance_to(20)
        return fired

    assert run(main()) == [(5, "c"), (10, "b"), (10, "c"), (15, "c"), (20, "b"), (20, "a"), (20, "c")]


def test_sim_alert_in_the_past_fires_at_the_next_advance_and_time_never_goes_back(run):
    async def main():
        clock = SimClock(500)
        fired = []
        clock.set_time_alert("late", 100, lambda e: fired.append(e))
        assert fired == []
        await clock.advance_to(400)  # earlier than now: ignored as a time, but the due alert fires
        return fired, clock.now_ns()

    fired, now = run(main())
    assert fired == [TimeEvent("late", 100)]
    assert now == 500


def test_sim_coroutine_callbacks_are_awaited_in_order_and_may_set_timers(run):
    async def main():
        clock = SimClock(0)
        order = []

        async def slow(event):
            await asyncio.sleep(0)
            order.append(("slow", event.ts_ns))
            clock.set_time_alert("chained", event.ts_ns + 1, lambda e: order.append(("chained", e.ts_ns)))

        clock.set_time_alert("slow", 10, slow)
        clock.set_time_alert("fast", 11, lambda e: order.append(("fast", e.ts_ns)))
        await clock.advance_to(100)
        return order

    # "chained" (due 11) was set while "slow" ran: it fires in this same advance, after "fast" (set first)
    assert run(main()) == [("slow", 10), ("fast", 11), ("chained", 11)]


def test_sim_cancel_and_name_reuse():
    clock = SimClock(0)
    clock.set_timer("x", 10, lambda e: None)
    with pytest.raises(InvalidConfigurationError, match="'x'.*already active"):
        clock.set_timer("x", 10, lambda e: None)
    assert clock.timer_names() == ["x"]
    assert clock.cancel_timer("x") is True
    assert clock.cancel_timer("x") is False
    clock.set_time_alert("x", 5, lambda e: None)  # the name is free again
    assert clock.next_deadline_ns() == 5


@pytest.mark.parametrize("kwargs, match", [
    ({"interval_ns": 0}, "interval_ns must be >= 1"),
    ({"interval_ns": 1.5}, "interval_ns must be an int"),
    ({"interval_ns": 10, "stop_ns": 5}, "never fire"),
])
def test_sim_bad_timer_arguments_name_the_parameter(kwargs, match):
    clock = SimClock(0)
    with pytest.raises(InvalidConfigurationError, match=match):
        clock.set_timer("t", callback=lambda e: None, **kwargs)
    with pytest.raises(InvalidConfigurationError, match="callback must be callable"):
        clock.set_time_alert("t", 1, None)  # type: ignore[arg-type]
    assert clock.timer_names() == []


def test_a_failing_callback_is_reported_and_the_timer_goes_on(run, caplog):
    async def main():
        clock = SimClock(0)
        seen = []

        def boom(event):
            seen.append(event.ts_ns)
            raise RuntimeError("boom")

        clock.set_timer("t", 10, boom)
        await clock.advance_to(30)
        return seen

    assert run(main()) == [10, 20, 30]
    assert sum("boom" in r.getMessage() for r in caplog.records) == 3


def test_live_clock_refuses_advance_to(run):
    async def main():
        await LiveClock().advance_to(1)

    with pytest.raises(InvalidStateError, match="advance_to"):
        run(main())


# -- LiveClock alone -----------------------------------------------------------------------------------------

def test_live_timers_fire_on_absolute_deadlines_in_order(run):
    async def main():
        clock = LiveClock()
        done = asyncio.Event()
        fired = []
        start = clock.now_ns()

        def on_tick(event):
            fired.append((event.name, event.ts_ns, time.time_ns()))
            if len([f for f in fired if f[0] == "tick"]) == 5:
                clock.cancel_timer("tick")
                done.set()

        clock.set_timer("tick", 2_000_000, on_tick, start_ns=start)
        clock.set_time_alert("once", start + 3_000_000, lambda e: fired.append((e.name, e.ts_ns, time.time_ns())))
        await done.wait()
        return start, fired, clock.timer_names()

    start, fired, names = run(main())
    ticks = [f for f in fired if f[0] == "tick"]
    # deadlines are absolute: start + k * interval exactly, however late each callback ran
    assert [ts for _, ts, _ in ticks] == [start + k * 2_000_000 for k in range(1, 6)]
    assert all(at >= due for _, due, at in fired)  # never early
    assert [name for name, _, _ in fired][:3] == ["tick", "once", "tick"]  # 2 ms, 3 ms, 4 ms
    assert names == []


def test_live_clock_coalesces_timers_into_one_loop_timer():
    async def main():
        loop = asyncio.get_running_loop()
        before = len(loop._scheduled)  # type: ignore[attr-defined]
        clock = LiveClock()
        now = clock.now_ns()
        for i in range(100):
            clock.set_time_alert(f"a{i}", now + 10_000_000_000 + i, lambda e: None)
        during = len(loop._scheduled)  # type: ignore[attr-defined]
        clock._close()
        return before, during

    before, during = asyncio.run(main())  # asyncio: its scheduled heap is readable
    assert during - before == 1


def test_live_clock_warns_once_per_task_of_a_deadline_far_behind_the_wall_clock(run, caplog):
    """A replay's event time (2024) on the default LiveClock: alerts fire at once and repeating timers owe every
    tick since. The trading quick start lost its cooldown that way without a word; now the clock says so."""
    recorded = 1_723_161_259_298_259_467  # a ts_ns of the shipped tape

    class Watch(Recorder):
        async def initialize(self) -> None:  # no timer of its own (Recorder's starts at 0 ns)
            pass

        def handle_event(self, tick: Tick) -> None:
            self.clock.cancel_timer("quiet")
            self.clock.set_time_alert("quiet", tick.recv_ts_ns + 5_000_000_000, self.on_timer)

        def on_timer(self, event: TimeEvent) -> None:
            self.seen.append((event.name, event.ts_ns))

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
        watch = Watch(use_async=False)
        scheduler = Scheduler(bus)
        scheduler.register_event_task(watch)
        await scheduler.start()
        for i in range(3):
            bus.publish(Ev.TICKS, Tick(i, recorded + i))
            await _wait_for(lambda: len(watch.seen) > i, turns=10**6)
        clock = LiveClock()  # alone (no task): a repeating timer started in the past, and a recent alert
        clock.set_timer("beat", 1_000_000_000, lambda e: None, start_ns=clock.now_ns() - 3_600_000_000_000)
        clock.set_time_alert("recent", clock.now_ns() - 1_000_000_000, lambda e: None)
        clock._close()
        await scheduler.shutdown()
        return watch.seen

    with caplog.at_level("WARNING", logger="kimiha.clock"):
        seen = run(main())
    assert [name for name, _ in seen] == ["quiet"] * 3  # fired at once, as before: only the warning is new
    stale = [r.getMessage() for r in caplog.records if "behind the LiveClock" in r.getMessage()]
    assert len(stale) == 2, stale  # once for the task (not per alert), once for the repeating timer
    assert "task 'Watch'" in stale[0] and "set_time_alert('quiet')" in stale[0] and "SimClock" in stale[0]
    assert "2024-08-0" in stale[0]
    assert "set_timer('beat')" in stale[1] and "catches up every one of the 3,5" in stale[1]


def test_live_clock_needs_a_running_loop():
    with pytest.raises(InvalidStateError, match="running event loop"):
        LiveClock().set_time_alert("a", 1, lambda e: None)


# -- under a Scheduler ----------------------------------------------------------------------------------------

class Recorder(EventTask):
    """Records its events and the timers it set, interleaved, as it sees them."""

    def __init__(self, *, use_async: bool, alert_every: int = 0) -> None:
        self.seen: list[tuple[str, int]] = []
        self.alert_every = alert_every
        if use_async:
            self.handle_event = self._handle_async  # type: ignore[method-assign]

    def subscribed_event(self) -> Ev:
        return Ev.TICKS

    async def initialize(self) -> None:
        self.clock.set_timer("every-25", 25, self.on_timer, start_ns=0)

    def on_timer(self, event: TimeEvent) -> None:
        self.seen.append((event.name, event.ts_ns))
        assert self.clock.now_ns() == event.ts_ns

    def handle_event(self, event: Tick) -> None:
        self._record(event)

    def _record(self, event: Tick) -> None:
        assert self.clock.now_ns() == event.recv_ts_ns
        self.seen.append(("tick", event.recv_ts_ns))

    async def _handle_async(self, event: Tick) -> None:
        await asyncio.sleep(0)
        self._record(event)


async def _wait_for(predicate, turns: int = 10_000) -> None:
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never held")


@pytest.mark.parametrize("use_async", [False, True], ids=["sync-handler", "async-handler"])
def test_sim_timers_of_an_event_task_fire_before_the_event_that_passes_them(run, use_async):
    times = [10, 30, 30, 50, 51, 120]

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
        task = Recorder(use_async=use_async)
        async with Scheduler(bus, clock=SimClock(0)) as scheduler:
            scheduler.register_event_task(task)
            await scheduler.start()
            for n, ts in enumerate(times):  # published all at once: the task's clock follows its own handling
                bus.publish(Ev.TICKS, Tick(n, ts))
            await _wait_for(lambda: sum(1 for kind, _ in task.seen if kind == "tick") == len(times))
        return task.seen

    assert run(main()) == [("tick", 10), ("every-25", 25), ("tick", 30), ("tick", 30), ("every-25", 50),
                           ("tick", 50), ("tick", 51), ("every-25", 75), ("every-25", 100), ("tick", 120)]


def test_executable_clock_before_registration_says_where_it_comes_from():
    task = Recorder(use_async=False)
    with pytest.raises(InvalidStateError, match="Scheduler\\(bus, clock=...\\)"):
        task.clock  # noqa: B018


def test_each_task_gets_its_own_view_of_the_scheduler_clock():
    bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
    a, b = Recorder(use_async=False), Recorder(use_async=False)
    scheduler = Scheduler(bus, clock=SimClock(0))
    scheduler.register_event_task(a)
    scheduler.register_event_task(b)
    a.clock.set_time_alert("same-name", 5, lambda e: None)
    b.clock.set_time_alert("same-name", 5, lambda e: None)  # names are per task
    assert a.clock.timer_names() == b.clock.timer_names() == ["same-name"]
    assert a.clock is not b.clock


@pytest.mark.parametrize("clock_kind", ["sim", "live"])
def test_timer_failures_follow_the_task_supervision(run, clock_kind):
    class Failing(Recorder):
        async def initialize(self) -> None:
            self.calls = 0
            self.clock.set_timer("fails", 1_000 if clock_kind == "sim" else 1_000_000, self.fail,
                                 start_ns=0 if clock_kind == "sim" else None)

        def fail(self, event: TimeEvent) -> None:
            self.calls += 1
            raise ValueError(f"timer failure {self.calls}")

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
        failing = Failing(use_async=False)
        async with Scheduler(bus, clock=SimClock(0) if clock_kind == "sim" else None) as scheduler:
            task_id = scheduler.register_event_task(failing, supervision=Supervision(on_error=OnError.STOP))
            await scheduler.start()
            if clock_kind == "sim":
                bus.publish(Ev.TICKS, Tick(0, 5_500))  # passes five deadlines
            await _wait_for(lambda: scheduler.registry.get(task_id).state is TaskState.FAILED, turns=10**6)
            info = scheduler.registry.get(task_id)
            return failing.calls, info.errors, info.last_error, failing.clock.timer_names()

    calls, errors, last_error, names = run(main())
    # STOP: the first failure fails the task and cancels its timers, so the callback ran once
    assert (calls, errors) == (1, 1)
    assert "timer 'fails'" in last_error and "timer failure 1" in last_error
    assert names == []


def test_live_timers_of_a_task_run_and_stop_with_the_scheduler(run):
    class Ticker(Recorder):
        async def initialize(self) -> None:
            self.clock.set_timer("beat", 1_000_000, self.on_timer)

        def on_timer(self, event: TimeEvent) -> None:
            self.seen.append((event.name, event.ts_ns))

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
        ticker = Ticker(use_async=False)
        scheduler = Scheduler(bus)
        assert isinstance(scheduler.clock, LiveClock)
        scheduler.register_event_task(ticker)
        await scheduler.start()
        await _wait_for(lambda: len(ticker.seen) >= 3, turns=10**7)
        await scheduler.shutdown()
        after = len(ticker.seen)
        names = ticker.clock.timer_names()
        await asyncio.sleep(0.01)  # ten intervals: a timer still armed would have fired
        return after, len(ticker.seen), names

    after, later, names = run(main())
    assert after >= 3
    assert later == after
    assert names == []


def test_scheduler_rejects_a_clock_that_is_not_one():
    bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
    with pytest.raises(InvalidConfigurationError, match="Scheduler\\(clock=...\\)"):
        Scheduler(bus, clock=time.time)  # type: ignore[arg-type]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_live_timer_slower_than_its_interval_catches_up_without_starving_the_loop(loop):
    # A callback that takes longer than the interval: each pass of the loop fires the timer at most once, so a
    # task that yields gets a turn between any two ticks (before: one pass fired every tick missed meanwhile,
    # the passes grew without bound and the loop starved); the ticks stay on the absolute grid.
    from kimiha.runtime import run as run_on

    async def main():
        clock = LiveClock()
        turns = 0
        ticks = []
        done = asyncio.Event()

        async def other():
            nonlocal turns
            while True:
                turns += 1
                await asyncio.sleep(0)

        def slow(event):
            ticks.append((event.ts_ns, turns))
            time.sleep(0.003)  # three intervals: the timer falls behind on purpose
            if len(ticks) == 8:
                clock.cancel_timer("slow")
                done.set()

        task = asyncio.ensure_future(other())
        await asyncio.sleep(0)
        start = clock.now_ns()
        clock.set_timer("slow", 1_000_000, slow, start_ns=start)
        await done.wait()
        task.cancel()
        return start, ticks

    start, ticks = run_on(main(), loop=loop)
    assert [ts for ts, _ in ticks] == [start + k * 1_000_000 for k in range(1, 9)]
    seen = [n for _, n in ticks]
    assert all(b > a for a, b in zip(seen, seen[1:])), seen


def test_a_coroutine_callback_cancelled_before_it_ran_is_closed_not_left_unawaited(run):
    # before: closing the clock cancelled the task before its first step, and the callback's coroutine was
    # garbage-collected with "coroutine ... was never awaited"
    import gc
    import warnings

    ran = []

    async def callback(event):
        ran.append(event)

    async def main():
        clock = SimClock(1_000)
        clock.set_time_alert("a", 1_500, callback)
        clock.advance_now(2_000)  # starts the callback as a task
        clock._close()  # the scheduler stopped before the task's first step
        await asyncio.sleep(0)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(main())
        gc.collect()
    assert ran == []
    assert not [w for w in caught if "never awaited" in str(w.message)]


# -- coroutine callbacks of a task with a plain handle_event (which cannot await them before an event) --------

class SyncWithAsyncAlert(EventTask):
    """The reported case: a plain handle_event, a plain 1 us timer and a coroutine alert at 2,500."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def subscribed_event(self) -> Ev:
        return Ev.TICKS

    async def initialize(self) -> None:
        self.clock.set_timer("us", 1_000, lambda e: None, start_ns=0)
        self.clock.set_time_alert("alert", 2_500, self.on_alert)

    async def on_alert(self, event: TimeEvent) -> None:
        self.seen.append(("alert", self.clock.now_ns()))

    def handle_event(self, event: Tick) -> None:
        self.seen.append(("tick", event.recv_ts_ns))


def test_a_coroutine_callback_on_a_task_with_a_plain_handle_event_is_refused_where_it_is_set(run):
    # before: accepted, and run as a task after the event that passed its deadline (here after the event at
    # 7,000, reading now_ns() == 7,000): the order depended on how fast the events were published
    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
        task = SyncWithAsyncAlert()
        async with Scheduler(bus, clock=SimClock(0)) as scheduler:
            scheduler.register_event_task(task)
            with pytest.raises(TaskInitializationError) as caught:  # set in initialize(): it failed there
                await scheduler.start()
        return task, caught.value

    task, error = run(main())
    assert isinstance(error.__cause__, InvalidConfigurationError)
    text = str(error.__cause__)
    assert "set_time_alert('alert')" in text and "coroutine" in text and "handle_event" in text
    assert "async def" in text


def test_a_coroutine_callback_on_a_task_with_an_async_handle_event_fires_before_the_event(run):
    class AsyncHandler(SyncWithAsyncAlert):
        async def handle_event(self, event: Tick) -> None:  # type: ignore[override]
            self.seen.append(("tick", event.recv_ts_ns))

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
        task = AsyncHandler()
        async with Scheduler(bus, clock=SimClock(0)) as scheduler:
            scheduler.register_event_task(task)
            await scheduler.start()
            for n, ts in enumerate((500, 1_000, 3_200, 3_200, 7_000)):
                bus.publish(Ev.TICKS, Tick(n, ts))
            await _wait_for(lambda: len(task.seen) == 6)
        return task.seen

    assert run(main()) == [("tick", 500), ("tick", 1_000), ("alert", 2_500), ("tick", 3_200), ("tick", 3_200),
                           ("tick", 7_000)]


def test_a_callback_returning_an_awaitable_on_a_plain_handler_task_is_reported_not_run_late(run):
    # a plain function that returns a coroutine cannot be told apart where it is set: refused when it fires
    import gc
    import warnings

    class Sneaky(SyncWithAsyncAlert):
        async def initialize(self) -> None:
            self.clock.set_time_alert("alert", 2_500, lambda e: self.on_alert(e))

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
        task = Sneaky()
        async with Scheduler(bus, clock=SimClock(0)) as scheduler:
            task_id = scheduler.register_event_task(task)
            await scheduler.start()
            for n, ts in enumerate((500, 3_200, 7_000)):
                bus.publish(Ev.TICKS, Tick(n, ts))
            await _wait_for(lambda: len(task.seen) == 3)
            for _ in range(10):
                await asyncio.sleep(0)
            info = scheduler.registry.get(task_id)
            return task.seen, info.errors, info.last_error

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen, errors, last_error = run(main())
        gc.collect()
    assert seen == [("tick", 500), ("tick", 3_200), ("tick", 7_000)]  # the alert never ran after its events
    assert errors == 1 and "timer 'alert'" in last_error and "awaitable" in last_error
    assert not [w for w in caught if "never awaited" in str(w.message)]


def test_negative_times_are_refused():
    with pytest.raises(InvalidConfigurationError, match=r"SimClock: start_ns must be >= 0.*got -1"):
        SimClock(-1)
    clock = SimClock(0)
    with pytest.raises(InvalidConfigurationError, match=r"set_time_alert\('k'\): at_ns must be >= 0.*got -1"):
        clock.set_time_alert("k", -1, lambda e: None)
    with pytest.raises(InvalidConfigurationError, match=r"set_timer\('t'\): start_ns must be >= 0.*got -5"):
        clock.set_timer("t", 10, lambda e: None, start_ns=-5)
    assert clock.timer_names() == []


def test_a_name_in_use_names_the_method_called():
    clock = SimClock(0)
    clock.set_timer("g", 10, lambda e: None)
    with pytest.raises(InvalidConfigurationError, match=r"SimClock.set_time_alert\('g'\): a timer of that name"):
        clock.set_time_alert("g", 5, lambda e: None)
    with pytest.raises(InvalidConfigurationError, match=r"SimClock.set_timer\('g'\): a timer of that name"):
        clock.set_timer("g", 5, lambda e: None)


@pytest.mark.parametrize("use_async", [False, True], ids=["sync-handler", "async-handler"])
def test_a_periodic_timer_set_in_initialize_counts_from_the_datas_first_time(run, use_async):
    """SimClock() with no start_ns has no time until the data gives it one: a timer a task sets in
    initialize() counts its first interval from the first event's time, instead of firing once per interval
    from 0 up to the data's epoch timestamps (a million times here, 1e9 per second of epoch in real data)."""
    epoch = 1_000 * 10**9                     # the data starts 1,000 s after 0
    ms = 10**6

    class Periodic(EventTask):
        def __init__(self) -> None:
            self.seen: list[tuple[str, int]] = []

        def subscribed_event(self) -> Ev:
            return Ev.TICKS

        async def initialize(self) -> None:
            assert not self.clock.started and self.clock.now_ns() == 0
            self.clock.set_timer("every-ms", ms, lambda e: self.seen.append(("timer", e.ts_ns)))

        def on_tick(self, event: Tick) -> None:
            self.seen.append(("tick", event.recv_ts_ns))

        if use_async:
            async def handle_event(self, event: Tick) -> None:
                self.on_tick(event)
        else:
            def handle_event(self, event: Tick) -> None:
                self.on_tick(event)

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(64, payload_type=Tick))])
        task = Periodic()
        clock = SimClock()
        async with Scheduler(bus, clock=clock) as scheduler:
            scheduler.register_event_task(task)
            await scheduler.start()
            for n, ts in enumerate([epoch, epoch + ms // 2, epoch + 2 * ms + 1]):
                bus.publish(Ev.TICKS, Tick(n, ts))
            await _wait_for(lambda: sum(1 for kind, _ in task.seen if kind == "tick") == 3)
            assert clock.started
        return task.seen

    seen = run(main())
    assert seen == [("tick", epoch), ("tick", epoch + ms // 2), ("timer", epoch + ms), ("timer", epoch + 2 * ms),
                    ("tick", epoch + 2 * ms + 1)]


def test_an_explicit_start_keeps_timers_anchored_there(run):
    async def main():
        clock = SimClock(0)
        fired = []
        clock.set_timer("t", 10, lambda e: fired.append(e.ts_ns))
        await clock.advance_to(35)
        return fired

    assert run(main()) == [10, 20, 30]


# -- found by the adversarial and new-user trials of 0.3.1's SimClock start ----------------------------------------

def test_a_timer_with_stop_ns_set_before_the_first_time_is_anchored_there_too(run):
    """set_timer(..., stop_ns=T0 + 1 h) before any data: it fired once per interval from 0 (1.7M calls and
    counting at 60 s bars from 1970); now its first deadline is the first time + interval, stop_ns absolute."""
    t0 = 1_700_000_000 * 10**9
    minute = 60 * 10**9

    async def main():
        clock = SimClock()
        fired: list[int] = []
        clock.set_timer("bar", minute, lambda e: fired.append(e.ts_ns), stop_ns=t0 + 3 * minute)
        await clock.advance_to(t0)
        assert fired == [] and clock.started
        await clock.advance_to(t0 + 10 * minute)
        return fired

    assert run(main()) == [t0 + minute, t0 + 2 * minute, t0 + 3 * minute]


def test_a_stop_before_the_anchored_first_deadline_is_reported_not_silent(run):
    errors: list[tuple[str, BaseException]] = []

    async def main():
        clock = SimClock()
        clock._on_error = lambda name, exc: errors.append((name, exc))  # what a scheduler's view reports to
        clock.set_timer("late", 10, lambda e: None, stop_ns=5_000)
        await clock.advance_to(1_000_000)
        return clock.timer_names()

    assert run(main()) == []
    assert errors and errors[0][0] == "late" and "never fires" in str(errors[0][1])


def test_a_timer_far_behind_the_data_fires_once_and_reports_the_skipped_ticks(run):
    """A 1 us timer across a 1-day gap owed 8.64e10 calls in one advance (about 20 h); with max_catch_up it
    fires once at its last deadline and says how many it skipped; max_catch_up=None keeps every tick."""
    day = 86_400 * 10**9
    errors: list[BaseException] = []

    async def main(limit):
        clock = SimClock(0, max_catch_up=limit)
        clock._on_error = lambda name, exc: errors.append(exc)
        fired: list[int] = []
        clock.set_timer("us", 1_000, lambda e: fired.append(e.ts_ns))
        await clock.advance_to(day)
        await clock.advance_to(day + 2_500)
        return fired

    assert run(main(1_000_000)) == [day, day + 1_000, day + 2_000]
    assert len(errors) == 1 and "skipped" in str(errors[0]) and "86,399,999,999" in str(errors[0])


def test_max_catch_up_sets_the_bound_and_none_fires_every_tick(run):
    async def main(limit):
        clock = SimClock(0, max_catch_up=limit)
        clock._on_error = lambda name, exc: None
        fired: list[int] = []
        clock.set_timer("t", 10, lambda e: fired.append(e.ts_ns))
        await clock.advance_to(10 * 5_000)           # 5,000 ticks owed
        return len(fired)

    assert run(main(100)) == 1
    assert run(main(5_000)) == 5_000
    assert run(main(None)) == 5_000


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "10"])
def test_max_catch_up_is_checked(bad):
    with pytest.raises(InvalidConfigurationError, match="max_catch_up expected an int >= 1"):
        SimClock(max_catch_up=bad)


def test_each_tasks_view_starts_at_its_own_first_timed_event(run):
    """A task whose first events carry no time (fills, say) got timers counted from 0 once another task had
    started the clock (1,002,000 calls instead of about 2,000): each view starts at its own first time."""
    epoch = 1_000 * 10**9
    ms = 10**6

    class Untimed(Event):
        n: int

    class Ev2(EventType):
        TICKS = "Ticks2"
        FILLS = "Fills2"

    class Late(EventTask):
        def __init__(self) -> None:
            self.timer_at: list[int] = []

        def subscribed_event(self):
            return (Ev2.TICKS, Ev2.FILLS)

        async def initialize(self) -> None:
            pass

        def handle_event(self, event) -> None:
            if isinstance(event, Untimed) and not self.clock.timer_names():
                self.clock.set_timer("ms", ms, lambda e: self.timer_at.append(e.ts_ns))

    class Feed(EventTask):
        def subscribed_event(self):
            return Ev2.TICKS

        def handle_event(self, event) -> None:
            pass

    async def main():
        bus = EventBus([(Ev2.TICKS, ChannelConfig(64, payload_type=Tick)),
                        (Ev2.FILLS, ChannelConfig(64, payload_type=Untimed))])
        late = Late()
        async with Scheduler(bus, clock=SimClock()) as scheduler:
            scheduler.register_event_task(Feed())
            scheduler.register_event_task(late)
            await scheduler.start()
            bus.publish(Ev2.FILLS, Untimed(1))            # no time: the view has none yet
            await _wait_for(lambda: late.clock.timer_names() == ["ms"])
            bus.publish(Ev2.TICKS, Tick(0, epoch))
            bus.publish(Ev2.TICKS, Tick(1, epoch + 2 * ms + 1))
            await _wait_for(lambda: len(late.timer_at) >= 2)
            await asyncio.sleep(0)
        return late.timer_at

    assert run(main()) == [epoch + ms, epoch + 2 * ms]


def test_a_task_whose_events_give_its_clock_no_time_is_told_once(run, caplog):
    import logging

    class Untimed(Event):
        px: float

    class Ev3(EventType):
        P = "P3"

    class Waiting(EventTask):
        def subscribed_event(self):
            return Ev3.P

        async def initialize(self) -> None:
            self.clock.set_timer("beat", 10**9, lambda e: None)

        def handle_event(self, event) -> None:
            pass

    async def main():
        bus = EventBus([(Ev3.P, ChannelConfig(64, payload_type=Untimed))])
        task = Waiting()
        async with Scheduler(bus, clock=SimClock()) as scheduler:
            scheduler.register_event_task(task)
            await scheduler.start()
            for i in range(3):
                bus.publish(Ev3.P, Untimed(float(i)))
            await _wait_for(lambda: scheduler.registry.get("Waiting").handled() == 3)

    with caplog.at_level(logging.WARNING, logger="kimiha"):
        run(main())
    said = [r.getMessage() for r in caplog.records if "gives its SimClock no time" in r.getMessage()]
    assert len(said) == 1 and "'Waiting'" in said[0] and "Untimed" in said[0] and "beat" in said[0]
