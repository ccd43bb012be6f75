"""Pull paths: ``async for batch in sub.batches()``, ``async for event in sub`` awaitables, the C API's Python face."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from kimiha import (
    ChannelConfig,
    Event,
    EventBus,
    EventType,
    InvalidConfigurationError,
    InvalidStateError,
    Lagged,
)
from kimiha._core import EMPTY, Empty, Handler


class Ev(EventType):
    MD = "MarketData"


class Tick(Event):
    seq: int


def make_bus(capacity: int = 64) -> EventBus:
    return EventBus([(Ev.MD, ChannelConfig(capacity, payload_type=Tick))])


def test_batches_hand_over_every_ready_event_in_order_and_end_at_close(run):
    async def main():
        bus = make_bus()
        sub = bus.subscribe(Ev.MD)
        got: list[list[int]] = []

        async def consume() -> None:
            async for batch in sub.batches():
                got.append([e.seq for e in batch])

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        for i in range(3):
            bus.publish(Ev.MD, Tick(i))
        await asyncio.sleep(0)
        for i in range(3, 5):
            bus.publish(Ev.MD, Tick(i))
        bus.close()
        await task
        assert [seq for batch in got for seq in batch] == [0, 1, 2, 3, 4]
        assert all(got) and got[0] == [0, 1, 2]  # never an empty batch; one wake-up takes all that is ready

    run(main())


def test_batches_respect_max_events_and_report_a_lag_once(run):
    async def main():
        bus = make_bus(capacity=4)
        sub = bus.subscribe(Ev.MD)
        it = sub.batches(max_events=2)
        for i in range(3):
            bus.publish(Ev.MD, Tick(i))
        assert [e.seq for e in await it.__anext__()] == [0, 1]
        for i in range(3, 10):
            bus.publish(Ev.MD, Tick(i))
        with pytest.raises(Lagged) as lag:
            await it.__anext__()
        assert lag.value.skipped == 4  # 2..5 were overwritten; 6..9 are still in the ring
        assert [e.seq for e in await it.__anext__()] == [6, 7]
        bus.close()

    run(main())


def test_async_for_awaitables_taken_out_of_order_keep_their_own_events(run):
    async def main():
        bus = make_bus()
        sub = bus.subscribe(Ev.MD)
        bus.publish(Ev.MD, Tick(0))
        bus.publish(Ev.MD, Tick(1))
        first, second = sub.__anext__(), sub.__anext__()  # both asked for before either is awaited
        assert (await first).seq == 0 and (await second).seq == 1
        bus.publish(Ev.MD, Tick(2))
        seen = []
        async for event in sub:
            seen.append(event.seq)
            if event.seq == 2:
                break
        assert seen == [2]
        bus.close()

    run(main())


def test_a_ready_await_ends_with_one_stopiteration_reused_unless_someone_keeps_it():
    """What ``await`` calls on CPython >= 3.12 (``tp_iternext``; 3.11 uses ``am_send``, which raises nothing):
    a ready event comes back as the StopIteration that ends the await. One instance is raised again while no
    one else holds it (a new one per event cost about 280 ns on 3.12); one that somebody kept is left alone,
    value and all, and a new one is made."""
    bus = make_bus()
    sub = bus.subscribe(Ev.MD)
    for i in range(4):
        bus.publish(Ev.MD, Tick(i))

    def take(awaitable):
        try:
            next(awaitable.__await__())
        except StopIteration as exc:
            return exc
        raise AssertionError("a ready awaitable did not end at once")

    aw = sub.__anext__()
    first = take(aw)
    assert first.value.seq == 0
    first_id = id(first)
    del first                      # now only the awaitable holds it
    decoy = StopIteration()        # takes the freed address if the first one was freed
    aw = sub.__anext__()           # the same awaitable, reused once its value was taken
    second = take(aw)
    assert second.value.seq == 1
    assert id(second) == first_id and second is not decoy
    kept = second                  # somebody keeps it: the next event must not overwrite its value
    third = take(sub.__anext__())
    assert third is not kept and third.value.seq == 2 and kept.value.seq == 1
    del third, kept
    assert (take(sub.__anext__())).value.seq == 3
    bus.close()


def test_the_c_api_marker_and_handler_base_from_python(run):
    assert repr(EMPTY) == "kimiha._core.EMPTY" and pickle.loads(pickle.dumps(EMPTY)) is EMPTY
    with pytest.raises(TypeError, match="one instance"):
        Empty()
    with pytest.raises(NotImplementedError, match="must override cdef int on_event"):
        Handler()(Tick(0))

    async def main():
        bus = make_bus()
        errors: list[BaseException] = []
        bus.subscribe(Ev.MD, Handler(), on_error=lambda exc, event: errors.append(exc))
        bus.publish(Ev.MD, Tick(0))
        await asyncio.sleep(0)
        assert len(errors) == 1 and isinstance(errors[0], NotImplementedError)
        assert bus.stats(Ev.MD)["handler_errors"] == 1
        bus.close()

    run(main())


@pytest.mark.parametrize("how", ["async for", "recv"])
def test_a_reader_cancelled_where_a_long_burst_yields_loses_no_event(run, how):
    # The burst yield (every dispatch budget of events) used to take the event first: a cancellation at that
    # await dropped it, neither received nor left in the ring.
    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(64, payload_type=Tick))], dispatch_budget=4)
        sub = bus.subscribe(Ev.MD)
        for i in range(10):
            bus.publish(Ev.MD, Tick(i))
        got: list[int] = []

        async def consume() -> None:
            if how == "async for":
                async for event in sub:
                    got.append(event.seq)
            else:
                while True:
                    got.append((await sub.recv()).seq)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)      # the reader runs until its first yield, at the end of a budget
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert got and got + [e.seq for e in sub.drain()] == list(range(10))
        bus.close()

    run(main())


def test_a_second_reader_waiting_on_one_subscription_is_refused_not_left_hanging(run):
    async def main():
        bus = make_bus()
        sub = bus.subscribe(Ev.MD)
        first = asyncio.create_task(sub.recv())
        await asyncio.sleep(0)
        with pytest.raises(InvalidStateError, match=r"channel 'MarketData' already has a reader waiting.*"
                                                    r"subscribe once per reader"):
            await sub.recv()
        bus.publish(Ev.MD, Tick(7))
        assert (await asyncio.wait_for(first, 5)).seq == 7  # the first reader is woken as before
        # A cancelled reader's place is free again.
        waiting = asyncio.create_task(sub.recv())
        await asyncio.sleep(0)
        waiting.cancel()
        again = asyncio.create_task(sub.recv())
        await asyncio.sleep(0)
        bus.publish(Ev.MD, Tick(8))
        assert (await asyncio.wait_for(again, 5)).seq == 8
        bus.close()

    run(main())


def test_a_none_payload_type_is_refused_at_config():
    # try_recv() answers None for "nothing ready": a None event would be taken and lost.
    for payload_type in (Tick | None, type(None)):
        with pytest.raises(InvalidConfigurationError,
                           match=r"ChannelConfig.payload_type: expected payload types that exclude None"):
            ChannelConfig(8, payload_type=payload_type)


def test_a_handler_with_a_python_on_event_is_refused_at_subscribe(run):
    class PyHandler(Handler):
        def on_event(self, event: object) -> int:
            return 0

    async def main():
        bus = make_bus()
        with pytest.raises(TypeError, match=r"PyHandler defines on_event in Python.*Override it in C"):
            bus.subscribe(Ev.MD, PyHandler())
        bus.close()

    run(main())


def test_anext_on_a_handler_subscription_is_refused_and_takes_nothing_from_the_handler(run):
    async def main():
        bus = make_bus()
        seen: list[int] = []
        sub = bus.subscribe(Ev.MD, lambda e: seen.append(e.seq))
        bus.publish(Ev.MD, Tick(1))
        with pytest.raises(InvalidStateError, match="delivers to handler .* cannot be received from"):
            await anext(sub)
        await asyncio.sleep(0)
        assert seen == [1]
        bus.close()

    run(main())


# --- max_events: a positive int or None, nothing else -----------------------------------------------------------


def test_batch_limits_refuse_what_is_not_a_positive_int_and_name_the_call_and_channel(run):
    """Before: 0 and negatives silently meant "every event", True meant 1, 10**30 raised a bare OverflowError."""

    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(64, "ticks", payload_type=Tick))])
        sub = bus.subscribe(Ev.MD)
        for i in range(5):
            bus.publish(Ev.MD, Tick(i))
        for bad in (0, -1, -(10**30)):
            with pytest.raises(ValueError, match=rf"""Subscription.drain\(max_events=...\) on channel 'MarketData' \("ticks"\): expected a positive int, or None for every ready event; got {bad}"""):
                sub.drain(bad)
            with pytest.raises(ValueError, match=r"Subscription.batches\(max_events=...\).*got"):
                sub.batches(bad)
            with pytest.raises(ValueError, match=r"Subscription.recv_batch\(max_events=...\).*got"):
                await sub.recv_batch(bad)
        for bad in (True, 2.0, "3"):
            with pytest.raises(TypeError, match=rf"drain\(max_events=...\).*got {type(bad).__name__}"):
                sub.drain(bad)
            with pytest.raises(TypeError, match=r"recv_batch\(max_events=...\)"):
                await sub.recv_batch(bad)
            with pytest.raises(TypeError, match=r"batches\(max_events=...\)"):
                sub.batches(bad)
        assert sub.backlog == 5  # every refusal took nothing
        assert [e.seq for e in sub.drain(2)] == [0, 1]
        assert [e.seq for e in sub.drain(10**30)] == [2, 3, 4]  # more than can be ready: all that is
        bus.publish(Ev.MD, Tick(5))
        assert [e.seq for e in sub.drain(None)] == [5]
        bus.publish(Ev.MD, Tick(6))
        assert [e.seq for e in await sub.recv_batch(None)] == [6]

    run(main())


def test_a_misbehaving_index_is_refused_with_the_call_and_a_handler_subscription_first(run):
    """Adversarial trial: ``__index__`` returning a float or a str gave bare TypeErrors naming neither the call nor
    the channel; and drain(0) on a handler subscription raised the limit's error where batches(0) raised the
    handler's."""

    class BadIndex:
        def __init__(self, value):
            self.value = value

        def __index__(self):
            return self.value

    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(64, "ticks", payload_type=Tick))])
        sub = bus.subscribe(Ev.MD)
        for bad in (BadIndex(2.5), BadIndex("x")):
            with pytest.raises(TypeError, match=r"Subscription.drain\(max_events=...\) on channel 'MarketData'.*got BadIndex"):
                sub.drain(bad)
        bus.publish(Ev.MD, Tick(0))
        assert [e.seq for e in sub.drain(BadIndex(3))] == [0]  # a well-behaved __index__ is an int
        handler = bus.subscribe(Ev.MD, lambda e: None)
        for call in (lambda: handler.drain(0), lambda: handler.batches(0)):
            with pytest.raises(InvalidStateError, match="cannot be received from"):
                call()
        with pytest.raises(InvalidStateError, match="cannot be received from"):
            await handler.recv_batch(0)

    run(main())
