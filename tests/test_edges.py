"""Edges of the first five minutes: a bus that outlives its loop, embedding in a host that handles signals,
and mistakes that must fail at registration rather than at run time."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading

import msgspec
import pytest

import kimiha
from kimiha import (
    BackgroundTask,
    ChannelClosed,
    ChannelConfig,
    Connector,
    Event,
    EventBus,
    EventTask,
    EventType,
    InvalidChannelError,
    InvalidConfigurationError,
    InvalidStateError,
    Overflow,
    Scheduler,
    SchedulerState,
)

#: Generous ceiling so a deadlock fails the test instead of hanging CI; never a speed assertion.
HANG_TIMEOUT = 60.0


class Ev(EventType):
    MD = "MarketData"


class Tick(Event):
    seq: int


def make_bus() -> EventBus:
    return EventBus([(Ev.MD, ChannelConfig(64, payload_type=Tick))])


async def until(predicate, what: str, turns: int = 1000) -> None:
    """Give the loop turns until ``predicate()`` holds (a bounded condition wait, not a timing guess)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened within {turns} loop turns: {what}")


def in_loop(loop_name: str, coro):
    async def guarded():
        async with asyncio.timeout(HANG_TIMEOUT):
            return await coro

    return kimiha.run(guarded(), loop=loop_name)


# --- 7. a bus that outlives its loop -----------------------------------------------------------------------------


def test_handler_runs_again_when_the_bus_is_used_from_a_second_loop(loop_name):
    bus = make_bus()
    seen: list[int] = []

    async def first():
        bus.subscribe(Ev.MD, lambda e: seen.append(e.seq))
        assert bus.publish(Ev.MD, Tick(1)) == 1
        await until(lambda: seen == [1], "the handler got event 1 on the first loop")

    async def second():
        # no bind_loop(): the bus rebinds to the running loop on its own
        assert bus.publish(Ev.MD, Tick(2)) == 1
        await until(lambda: seen == [1, 2], "the handler got event 2 on the second loop")
        await bus.publish_async(Ev.MD, Tick(3))
        bus.publish_raw(Ev.MD, msgspec.msgpack.encode(Tick(4)))
        await until(lambda: seen == [1, 2, 3, 4], "the handler got events 3 and 4 on the second loop")

    in_loop(loop_name, first())
    in_loop(loop_name, second())
    assert bus.channel(Ev.MD).published == 4


@pytest.mark.parametrize("how", ["publish", "publish_raw", "publish_threadsafe", "publish_threadsafe_thread"])
def test_publish_with_no_running_loop_after_the_loop_closed_raises_and_writes_nothing(loop_name, how):
    bus = make_bus()
    seen: list[int] = []

    async def first():
        bus.subscribe(Ev.MD, lambda e: seen.append(e.seq))
        bus.publish(Ev.MD, Tick(1))
        await until(lambda: seen == [1], "the handler got event 1")

    in_loop(loop_name, first())
    ch = bus.channel(Ev.MD)
    errors: list[BaseException] = []

    def publish_now() -> None:
        try:
            if how == "publish":
                bus.publish(Ev.MD, Tick(99))
            elif how == "publish_raw":
                bus.publish_raw(Ev.MD, msgspec.msgpack.encode(Tick(99)))
            else:
                bus.publish_threadsafe(Ev.MD, Tick(99))
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever arrived
            errors.append(exc)

    if how == "publish_threadsafe_thread":
        feed = threading.Thread(target=publish_now)
        feed.start()
        feed.join()
    else:
        publish_now()
    assert len(errors) == 1, f"expected one error, got {errors!r}"
    err = errors[0]
    assert isinstance(err, InvalidStateError), f"expected InvalidStateError, got {type(err).__name__}: {err}"
    assert "MarketData" in str(err) and "closed" in str(err) and "nothing was written" in str(err)
    assert ch.published == 1, "a publish that raised must not have written the event"
    assert ch.pending_threadsafe == 0, "a publish that raised must not have queued the event"

    async def second():
        bus.publish(Ev.MD, Tick(2))
        await until(lambda: seen == [1, 2], "the handler got event 2 on the new loop")

    in_loop(loop_name, second())
    assert seen == [1, 2]  # the rejected event 99 never shows up


def test_a_dispatch_the_closed_loop_never_ran_is_delivered_on_the_next_loop(loop_name):
    bus = make_bus()
    seen: list[int] = []
    loop = kimiha.runtime.new_event_loop(loop_name)
    try:
        bus.bind_loop(loop)

        async def subscribe():
            bus.subscribe(Ev.MD, lambda e: seen.append(e.seq))

        loop.run_until_complete(subscribe())
        bus.publish(Ev.MD, Tick(1))  # the dispatch is scheduled on `loop`, which never runs again
    finally:
        loop.close()
    assert seen == []

    async def second():
        bus.bind_loop()
        await until(lambda: seen == [1], "event 1, published before the old loop closed, reached the handler")
        bus.publish(Ev.MD, Tick(2))
        await until(lambda: seen == [1, 2], "event 2 reached the handler on the new loop")

    in_loop(loop_name, second())


def test_thread_published_events_the_closed_loop_never_flushed_are_delivered_on_the_next_loop(loop_name):
    bus = make_bus()
    seen: list[int] = []
    loop = kimiha.runtime.new_event_loop(loop_name)
    try:
        bus.bind_loop(loop)

        async def subscribe():
            bus.subscribe(Ev.MD, lambda e: seen.append(e.seq))

        loop.run_until_complete(subscribe())
        feed = threading.Thread(target=bus.publish_threadsafe, args=(Ev.MD, Tick(1)))
        feed.start()
        feed.join()  # queued for the loop's thread, which never runs `loop` again
        assert bus.channel(Ev.MD).pending_threadsafe == 1
    finally:
        loop.close()

    async def second():
        bus.bind_loop()
        await until(lambda: seen == [1], "the queued event reached the handler on the new loop")
        feed = threading.Thread(target=bus.publish_threadsafe, args=(Ev.MD, Tick(2)))
        feed.start()
        feed.join()
        await until(lambda: seen == [1, 2], "a new thread-published event reached the handler")

    in_loop(loop_name, second())
    assert bus.channel(Ev.MD).pending_threadsafe == 0


def test_a_reader_parked_on_a_loop_that_was_closed_does_not_break_publishing(loop_name):
    bus = make_bus()
    loop = kimiha.runtime.new_event_loop(loop_name)
    try:
        async def park():
            sub = bus.subscribe(Ev.MD)
            reader = sub.recv()
            waiter = reader.send(None)  # the reader parks on a future of this loop...
            waiter.add_done_callback(lambda fut: None)  # ...and is woken through it, as a task would be
            return sub, reader

        sub, reader = loop.run_until_complete(park())
    finally:
        loop.close()  # the parked reader is never woken nor cancelled

    async def second():
        assert bus.publish(Ev.MD, Tick(1)) == 1
        assert await sub.recv() == Tick(1)

    try:
        in_loop(loop_name, second())
    finally:
        reader.close()


def test_a_new_scheduler_on_the_same_bus_runs_its_handlers_on_the_new_loop(loop_name):
    bus = make_bus()

    class Collector(EventTask):
        def __init__(self) -> None:
            self.seen: list[int] = []

        def subscribed_event(self):
            return Ev.MD

        def handle_event(self, event: Tick) -> None:
            self.seen.append(event.seq)

    async def session(first_seq: int) -> list[int]:
        sched = Scheduler(bus)
        collector = Collector()
        sched.register_event_task(collector)
        await sched.start()
        for i in range(first_seq, first_seq + 3):
            bus.publish(Ev.MD, Tick(i))
        await until(lambda: len(collector.seen) == 3, "three events handled")
        await sched.shutdown()
        return collector.seen

    assert in_loop(loop_name, session(0)) == [0, 1, 2]
    assert in_loop(loop_name, session(10)) == [10, 11, 12]


# --- 8. embedding: run_until_signal gives the host its signal handlers back -------------------------------------


@pytest.fixture
def saved_signals():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


class Idle(BackgroundTask):
    async def execute(self) -> None:
        await asyncio.sleep(3600)


async def run_scheduler_until(sig: int, installed, signals: tuple[int, ...] | None = None) -> None:
    """Run a scheduler with ``run_until_signal(signals)``; raise ``sig`` once ``installed()`` says it took over."""
    bus = make_bus()
    sched = Scheduler(bus)
    sched.register_background_task(Idle())

    async def send_when_installed():
        try:
            await until(installed, "run_until_signal installed its handler", turns=100_000)
        except AssertionError:
            await sched.shutdown()  # let run_until_signal return, so that the test fails instead of hanging
            raise
        signal.raise_signal(sig)

    sender = asyncio.ensure_future(send_when_installed())
    await sched.run_until_signal(signals or (sig,))
    await sender
    assert sched.state is SchedulerState.STOPPED


def test_run_until_signal_restores_a_python_level_host_handler(loop_name, saved_signals):
    calls: list[int] = []

    def host(signum, frame):
        calls.append(signum)

    signal.signal(signal.SIGUSR1, host)

    async def main():
        await run_scheduler_until(signal.SIGUSR1, lambda: signal.getsignal(signal.SIGUSR1) is not host)
        assert calls == [], "the scheduler owns the signal while run_until_signal waits"
        current = signal.getsignal(signal.SIGUSR1)
        assert current is host, f"expected the host's handler back after run_until_signal, got {current!r}"
        signal.raise_signal(signal.SIGUSR1)
        assert calls == [signal.SIGUSR1]

    in_loop(loop_name, main())


def test_run_until_signal_leaves_a_loop_level_host_handler_in_place(loop_name, saved_signals):
    async def main():
        loop = asyncio.get_running_loop()
        host_calls: list[str] = []
        host_event = asyncio.Event()

        def host(tag: str) -> None:
            host_calls.append(tag)
            host_event.set()

        loop.add_signal_handler(signal.SIGUSR2, host, "host")
        try:
            before = signal.getsignal(signal.SIGUSR2)
            await run_scheduler_until(signal.SIGUSR2, lambda: signal.getsignal(signal.SIGUSR2) is not before)
            current = signal.getsignal(signal.SIGUSR2)
            assert current is before, f"expected the loop's handler back after run_until_signal, got {current!r}"
            # the host's handler was chained, not replaced: it saw the scheduler's signal too
            await host_event.wait()
            assert host_calls == ["host"]
            host_event.clear()
            signal.raise_signal(signal.SIGUSR2)
            await host_event.wait()
            assert host_calls == ["host", "host"]
        finally:
            loop.remove_signal_handler(signal.SIGUSR2)

    in_loop(loop_name, main())


def test_run_until_signal_leaves_default_handlers_and_the_runners_ctrl_c_handler_as_they_were(
    loop_name, saved_signals
):
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)

    async def main():
        ctrl_c = signal.getsignal(signal.SIGINT)  # kimiha.run's own Ctrl-C handler (asyncio.Runner's)
        await run_scheduler_until(signal.SIGUSR1, lambda: signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL,
                                  signals=(signal.SIGUSR1, signal.SIGINT))
        assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
        current = signal.getsignal(signal.SIGINT)
        assert current is ctrl_c, f"expected the SIGINT handler {ctrl_c!r} back, got {current!r}"

    in_loop(loop_name, main())


# --- 9. late errors become early ----------------------------------------------------------------------------------


class NoExecute(BackgroundTask):
    pass


class FeedWithoutExecute(Connector):
    name = "binance-feed"


class NoHandler(EventTask):
    def subscribed_event(self):
        return Ev.MD


class NoSubscribedEvent(EventTask):
    def handle_event(self, event) -> None:
        pass


class Handles(EventTask):
    def __init__(self, channels=Ev.MD) -> None:
        self.channels = channels

    def subscribed_event(self):
        return self.channels

    def handle_event(self, event) -> None:
        pass


@pytest.mark.parametrize("task, name", [(NoExecute(), "NoExecute"), (FeedWithoutExecute(), "binance-feed")])
def test_background_task_without_its_own_execute_is_rejected_at_registration(task, name):
    sched = Scheduler(make_bus())
    with pytest.raises(InvalidConfigurationError) as info:
        sched.register_background_task(task)
    assert repr(name) in str(info.value) and "execute()" in str(info.value)
    assert len(sched.registry) == 0


@pytest.mark.parametrize(
    "task, missing", [(NoHandler(), "handle_event"), (NoSubscribedEvent(), "subscribed_event")]
)
def test_event_task_without_its_handler_or_channel_is_rejected_at_registration(task, missing):
    sched = Scheduler(make_bus())
    with pytest.raises(InvalidConfigurationError) as info:
        sched.register_event_task(task)
    assert repr(type(task).__name__) in str(info.value) and f"{missing}(" in str(info.value)
    assert len(sched.registry) == 0


def test_registering_the_same_task_object_twice_is_an_error_naming_it():
    sched = Scheduler(make_bus())
    task = Handles()
    task.name = "quoter"
    first = sched.register_event_task(task)
    with pytest.raises(InvalidConfigurationError, match=rf"task 'quoter' is already registered \(id {first}\)"):
        sched.register_event_task(task)
    # two instances of one class are two tasks
    assert sched.register_event_task(Handles()) == first + 1


def test_an_event_task_naming_one_channel_twice_is_rejected():
    sched = Scheduler(make_bus())
    with pytest.raises(InvalidConfigurationError) as info:
        sched.register_event_task(Handles((Ev.MD, Ev.MD)))
    assert "'Handles'" in str(info.value) and "Ev.MD" in str(info.value) and "twice" in str(info.value)


class Venue(EventType):
    MD = "MarketData"


def test_channels_whose_names_collide_are_rejected_naming_both_keys():
    with pytest.raises(InvalidChannelError) as info:
        EventBus([(Ev.MD, ChannelConfig(8)), (Venue.MD, ChannelConfig(8))])
    msg = str(info.value)
    assert "'MarketData'" in msg and "Ev.MD" in msg and "Venue.MD" in msg, msg
    bus = EventBus([(Ev.MD, ChannelConfig(8))])
    with pytest.raises(InvalidChannelError, match="Venue.MD"):
        bus.add_channel(Venue.MD, ChannelConfig(8))
    assert bus.channels == [Ev.MD]
    assert list(bus.stats()) == ["MarketData"]


def test_the_same_handler_subscribed_twice_is_two_independent_subscriptions(run):
    async def main():
        bus = make_bus()
        seen: list[int] = []
        handler = seen.append
        first = bus.subscribe(Ev.MD, handler)
        second = bus.subscribe(Ev.MD, handler)
        assert bus.publish(Ev.MD, Tick(1)) == 2
        await until(lambda: len(seen) == 2, "both subscriptions delivered event 1")
        first.close()
        assert bus.publish(Ev.MD, Tick(2)) == 1
        await until(lambda: len(seen) == 3, "the remaining subscription delivered event 2")
        assert seen == [Tick(1), Tick(1), Tick(2)]
        assert second.delivered == 2

    run(main())



def test_close_racing_thread_publishers_on_block_accounts_for_every_accepted_event(run):
    """Adversarial trial: close() woke the waiting threads, counted and cleared the queue, and only then set
    `closed`: woken threads queued after the count, returned normally, and their events were never published
    nor counted (12 of 30 runs: 64 lost each, pending_threadsafe 64 after close)."""

    async def trial() -> tuple[int, int, int]:
        bus = EventBus([(Ev.MD, ChannelConfig(64, overflow=Overflow.BLOCK))])
        bus.bind_loop()
        reader = bus.subscribe(Ev.MD)  # never reads: the ring fills, then the thread queue, then threads wait
        accepted = [0] * 4
        started = threading.Barrier(5)

        def feed(k: int) -> None:
            started.wait()
            while True:
                try:
                    bus.publish_threadsafe(Ev.MD, k)
                except ChannelClosed:
                    return
                accepted[k] += 1

        threads = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        started.wait()
        await asyncio.sleep(0.02)  # the threads publish, wait and are woken meanwhile: close() lands among them
        bus.close()
        for t in threads:
            t.join()
        st = bus.stats(Ev.MD)
        assert st["published"] == reader.backlog == 64  # BLOCK: the ring filled and nothing was overwritten
        return sum(accepted), st["published"] + st["dropped_on_close"], st["pending_threadsafe"]

    async def main() -> list[tuple[int, int, int]]:
        return [await trial() for _ in range(30)]

    # The window was a few lines of close() (a log call among them): switching threads every microsecond
    # instead of every 5 ms lets the woken threads run inside it, as a log handler writing to stderr did.
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        results = run(main())
    finally:
        sys.setswitchinterval(interval)
    for accepted, accounted, pending in results:
        assert (accepted, pending) == (accounted, 0), (accepted, accounted, pending)


def test_a_thread_waiting_for_room_is_told_when_the_loop_closes(loop_name):
    """Adversarial trial: a thread blocked in publish_threadsafe on a full BLOCK channel waited forever once
    the loop had closed (a non-daemon feed thread then hung the process at exit)."""
    bus = EventBus([(Ev.MD, ChannelConfig(2, overflow=Overflow.BLOCK))])
    outcome: list[object] = []

    def feed() -> None:
        for i in range(5):
            try:
                bus.publish_threadsafe(Ev.MD, i)
            except Exception as exc:  # noqa: BLE001 - the outcome is the test
                outcome.append(exc)
                return
            outcome.append(i)

    readers: list[object] = []
    loop = kimiha.runtime.new_event_loop(loop_name)
    try:
        bus.bind_loop(loop)

        async def start() -> threading.Thread:
            readers.append(bus.subscribe(Ev.MD))  # never reads (kept: a dropped subscription is unsubscribed)
            thread = threading.Thread(target=feed, daemon=True)
            thread.start()
            channel = bus.channel(Ev.MD)
            await until(lambda: bus.stats(Ev.MD)["published"] == 2 and channel.pending_threadsafe == 2,
                        "events 0 and 1 in the ring, 2 and 3 queued", turns=10**6)
            return thread

        thread = loop.run_until_complete(start())
    finally:
        loop.close()
    thread.join(10)
    assert not thread.is_alive(), "the feed thread still waits for room on a closed loop"
    assert outcome[:-1] == [0, 1, 2, 3] and isinstance(outcome[-1], InvalidStateError), outcome
    # waiting for room when the loop closed (or, had the thread not reached the wait by then, at the call)
    assert "closed" in str(outcome[-1]) and "nothing was written" in str(outcome[-1]), outcome
    assert bus.channel(Ev.MD).pending_threadsafe == 2  # what was queued stays queued for a next loop
