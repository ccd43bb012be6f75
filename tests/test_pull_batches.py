"""Pull paths: ``async for batch in sub.batches()``, ``async for event in sub`` awaitables, the C API's Python face."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from kimiha import ChannelConfig, Event, EventBus, EventType, Lagged
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
