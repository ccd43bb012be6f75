"""Faults of the compiled core found in "Reliability round 2": each test failed on the code before its fix.

8  a payload that cannot be encoded, on a channel with frames subscribers (exporters, journals)
13 hostile raw frames and header timestamps into ``publish_raw``
14 coroutine handlers given to the synchronous dispatch loop
19 BLOCK fairness between waiting ``publish_async`` calls and synchronous publishers
20 backlog and high-water mark in ``Channel.stats()``
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import threading
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kimiha import (
    ChannelConfig,
    ChannelFull,
    Event,
    EventBus,
    EventType,
    Overflow,
    PayloadTypeError,
    SerializationError,
)


class Ev(EventType):
    MD = "MarketData"
    ANY = "Anything"


class Tick(Event):
    seq: int
    price: float = 1.0


class Note(Event):
    """A payload with a free-form field: what it holds decides whether it can be encoded."""

    seq: int
    data: Any = None


def make_bus(capacity: int = 256, overflow: Overflow = Overflow.LAG, payload_type: Any = Tick) -> EventBus:
    return EventBus([(Ev.MD, ChannelConfig(capacity, overflow=overflow, payload_type=payload_type))])


async def until(predicate, what: str, turns: int = 1000) -> None:
    """Give the loop turns until ``predicate()`` holds (a bounded condition wait, not a timing guess)."""
    for _ in range(turns):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"never happened within {turns} loop turns: {what}")


def seqs_of_frames(frames: list[tuple[int, int, bytes]]) -> list[int]:
    return [msgspec.msgpack.decode(frame, type=Note).seq for _, _, frame in frames]


UNENCODABLE = Note(50, object())  # msgspec cannot encode a bare object: TypeError inside the encoder


# --- 8. a payload that cannot be encoded -------------------------------------------------------------------------


def test_frames_drain_keeps_every_good_event_when_one_payload_cannot_be_encoded(run):
    async def main():
        bus = make_bus(payload_type=Note)
        ch = bus.channel(Ev.MD)
        frames = bus.subscribe(Ev.MD, frames=True)
        plain = bus.subscribe(Ev.MD)
        refused = []
        for i in range(100):
            try:
                ch.publish(UNENCODABLE if i == 50 else Note(i, {"n": i}))
            except SerializationError as exc:
                refused.append(str(exc))
        # Refused at publish, with what was expected and the channel's name; nothing was written.
        assert len(refused) == 1
        assert "MarketData" in refused[0] and "cannot be encoded" in refused[0] and "object" in refused[0]
        assert "nothing was written" in refused[0]
        good = [i for i in range(100) if i != 50]
        batch = frames.drain()
        assert seqs_of_frames(batch) == good                    # every neighbour of the bad one is there
        assert [seq for seq, _, _ in batch] == list(range(99))  # and the ring sequence has no hole
        assert [e.seq for e in plain.drain()] == good           # every subscriber sees the same stream
        stats = bus.stats(Ev.MD)
        assert stats["published"] == 99 and stats["encode_errors"] == 1
        assert frames.delivered == plain.delivered == 99

    run(main())


def test_frames_handler_and_async_publish_refuse_an_unencodable_payload_and_keep_flowing(run):
    async def main():
        bus = make_bus(capacity=4, overflow=Overflow.BLOCK, payload_type=Note)
        got: list[int] = []
        bus.subscribe(Ev.MD, lambda f: got.append(msgspec.msgpack.decode(f[2], type=Note).seq), frames=True)
        await bus.publish_async(Ev.MD, Note(1))
        with pytest.raises(SerializationError, match="MarketData"):
            await bus.publish_async(Ev.MD, Note(2, object()))
        await bus.publish_async(Ev.MD, Note(3))
        await until(lambda: got == [1, 3], "the frames handler got 1 and 3")
        stats = bus.stats(Ev.MD)
        assert stats["handler_errors"] == 0 and stats["encode_errors"] == 1 and stats["published"] == 2

    run(main())


def test_an_unencodable_payload_is_refused_before_it_waits_for_room(run):
    async def main():
        bus = make_bus(capacity=1, overflow=Overflow.BLOCK, payload_type=Note)
        frames = bus.subscribe(Ev.MD, frames=True)
        bus.publish(Ev.MD, Note(0))             # the ring is full
        with pytest.raises(SerializationError, match="cannot be encoded"):
            await bus.publish_async(Ev.MD, Note(1, object()))
        assert bus.stats(Ev.MD)["blocked"] == 0  # refused at once, not after waiting for the reader
        waiter = asyncio.ensure_future(bus.publish_async(Ev.MD, Note(2)))
        await until(lambda: bus.stats(Ev.MD)["blocked"] == 1, "the good one waits for room")
        assert seqs_of_frames(frames.drain()) == [0]
        await waiter
        assert seqs_of_frames(frames.drain()) == [2]

    run(main())


def test_a_thread_published_payload_that_cannot_be_encoded_is_counted_and_its_neighbours_arrive(run):
    async def main():
        bus = make_bus(payload_type=Note)
        ch = bus.channel(Ev.MD)
        frames = bus.subscribe(Ev.MD, frames=True)
        bus.bind_loop()

        def feed():
            for i in range(10):
                ch.publish_threadsafe(Note(i, object()) if i == 4 else Note(i))

        thread = threading.Thread(target=feed)
        thread.start()
        thread.join()
        got: list[int] = []
        while len(got) < 9:
            got += seqs_of_frames(await frames.recv_batch())
        assert got == [0, 1, 2, 3, 5, 6, 7, 8, 9]
        stats = bus.stats(Ev.MD)
        assert stats["encode_errors"] == 1 and stats["published"] == 9 and stats["pending_threadsafe"] == 0

    run(main())


def test_without_frames_subscribers_publish_does_not_encode(run):
    async def main():
        bus = make_bus(payload_type=Note)
        plain = bus.subscribe(Ev.MD)
        bus.publish(Ev.MD, UNENCODABLE)         # nobody asks for frames: in-process delivery needs none
        assert plain.try_recv() is UNENCODABLE
        frames = bus.subscribe(Ev.MD, frames=True)
        with pytest.raises(SerializationError):
            bus.publish(Ev.MD, UNENCODABLE)
        frames.close()                          # the last frames subscriber gone: no encoding again
        bus.publish(Ev.MD, UNENCODABLE)
        assert plain.try_recv() is UNENCODABLE

    run(main())


# --- 13. hostile frames ------------------------------------------------------------------------------------------


def nested(depth: int) -> bytes:
    return b"\x91" * depth + b"\x01"  # [[[...[1]...]]]: depth + 1 bytes


# Deeper than any CPython's C recursion limit (3.11 stops near 1,000, 3.12 at 1,500, 3.13 later): the decode
# fails on every version, so the frame is hostile everywhere (a 1 KB, 1,024-deep one decodes on 3.12).
HOSTILE_DEPTH = 100_000


def any_bus(capacity: int = 8) -> EventBus:
    return EventBus([
        (Ev.MD, ChannelConfig(capacity, payload_type=Note)),
        (Ev.ANY, ChannelConfig(capacity)),
    ])


@pytest.mark.parametrize("key", [Ev.MD, Ev.ANY])
def test_a_deeply_nested_frame_is_a_counted_bad_frame(key):
    bus = any_bus()
    sub = bus.subscribe(key)
    # Ev.ANY: [[[...[1]...]]]; Ev.MD: a Note whose free-form field nests as deep
    frame = nested(HOSTILE_DEPTH) if key is Ev.ANY else b"\x82\xa3seq\x01\xa4data" + nested(HOSTILE_DEPTH)
    assert len(frame) <= HOSTILE_DEPTH + 16  # small for what it does to a recursive decoder
    with pytest.raises(SerializationError, match=key.value) as info:
        bus.publish_raw(key, frame)
    assert "bad frame" in str(info.value) and "nothing was written" in str(info.value)
    assert bus.stats(key)["bad_frames"] == 1 and bus.stats(key)["published"] == 0
    ok = msgspec.msgpack.encode(Note(2))
    bus.publish_raw(key, ok)                    # the channel keeps flowing
    assert sub.try_recv() is not None


@pytest.mark.parametrize("publish_ns", [2**63, 2**64, 10**30, -(2**63) - 1])
def test_a_header_timestamp_out_of_range_is_a_counted_bad_frame(publish_ns):
    bus = make_bus()
    ch = bus.channel(Ev.MD)
    sub = bus.subscribe(Ev.MD)
    frame = msgspec.msgpack.encode(Tick(1))
    for publish in (ch.publish_raw, functools.partial(bus.publish_raw, Ev.MD)):
        with pytest.raises(SerializationError, match="MarketData") as info:
            publish(frame, publish_ns=publish_ns)
        assert str(publish_ns) in str(info.value) and "publish_ns" in str(info.value)
    assert bus.stats(Ev.MD)["bad_frames"] == 2 and bus.stats(Ev.MD)["published"] == 0
    ch.publish_raw(frame, publish_ns=2**63 - 1)  # the largest stamp there is: accepted
    assert sub.try_recv() == Tick(1)


def test_publish_raw_async_counts_the_same_bad_frames(run):
    async def main():
        bus = any_bus()
        sub = bus.subscribe(Ev.ANY)
        for frame, ns in [(nested(HOSTILE_DEPTH), 0), (msgspec.msgpack.encode(Note(1)), 2**63)]:
            with pytest.raises(SerializationError, match="Anything"):
                await bus.publish_raw_async(Ev.ANY, frame, publish_ns=ns)
        assert bus.stats(Ev.ANY)["bad_frames"] == 2
        await bus.publish_raw_async(Ev.ANY, msgspec.msgpack.encode(Note(3)))
        assert sub.try_recv() == {"seq": 3, "data": None}

    run(main())


def test_a_released_memoryview_is_a_counted_bad_frame():
    bus = make_bus()
    view = memoryview(msgspec.msgpack.encode(Tick(1)))
    view.release()
    with pytest.raises((SerializationError, PayloadTypeError), match="MarketData"):
        bus.publish_raw(Ev.MD, view)
    assert bus.stats(Ev.MD)["bad_frames"] == 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    frame=st.one_of(
        st.binary(max_size=64),
        st.integers(0, 4000).map(nested),
        st.integers(0, 4000).map(lambda d: b"\x81\xa1k" * d + b"\xc0"),  # maps nested in maps
        st.just(msgspec.msgpack.encode(Note(1))),
    ),
    publish_ns=st.one_of(st.integers(), st.integers(-(2**64), 2**64), st.just(2**63)),
)
def test_any_bytes_and_any_stamp_are_accepted_or_a_counted_bad_frame(frame, publish_ns):
    bus = any_bus()
    rejected = 0
    for key in (Ev.MD, Ev.ANY):
        try:
            bus.publish_raw(key, frame, publish_ns=publish_ns)
        except SerializationError as exc:
            assert key.value in str(exc)
            rejected += 1
        assert bus.stats(key)["bad_frames"] + bus.stats(key)["published"] == 1
    assert bus.stats(Ev.ANY)["bad_frames"] + bus.stats(Ev.MD)["bad_frames"] == rejected


# --- 14. coroutine handlers --------------------------------------------------------------------------------------


async def async_handler(event: Any) -> None:
    pass


class AsyncCallable:
    async def __call__(self, event: Any) -> None:
        pass


class WithAsyncMethod:
    async def on_event(self, event: Any) -> None:
        pass


def two_args(prefix: str, event: Any) -> None:
    pass


async def async_two_args(prefix: str, event: Any) -> None:
    pass


ASYNC_HANDLERS = {
    "async def": async_handler,
    "bound async method": WithAsyncMethod().on_event,
    "object with async __call__": AsyncCallable(),
    "partial of async def": functools.partial(async_two_args, "x"),
    "partial of an async __call__": functools.partial(AsyncCallable()),
}


@pytest.mark.parametrize("handler", list(ASYNC_HANDLERS.values()), ids=list(ASYNC_HANDLERS))
def test_a_coroutine_handler_is_refused_at_subscribe(run, handler):
    async def main():
        bus = make_bus()
        ch = bus.channel(Ev.MD)
        for subscribe in (lambda: bus.subscribe(Ev.MD, handler), lambda: ch.subscribe(handler)):
            with pytest.raises(TypeError) as info:
                subscribe()
            text = str(info.value)
            assert "MarketData" in text and "coroutine" in text
            assert "EventTask" in text and "pull" in text
        assert bus.stats(Ev.MD)["subscribers"] == 0
        bus.subscribe(Ev.MD, functools.partial(two_args, "x"))  # a sync partial is fine

    run(main())


def test_a_sync_handler_returning_a_coroutine_is_a_counted_handler_error(run):
    async def main():
        bus = make_bus()
        made: list[Any] = []
        errors: list[tuple[BaseException, Any]] = []
        seen: list[int] = []

        def sneaky(event):
            if event.seq == 1:
                coro = async_handler(event)
                made.append(coro)
                return coro
            seen.append(event.seq)
            return event.seq            # a non-None, non-coroutine result is simply ignored

        sub = bus.subscribe(Ev.MD, sneaky, on_error=lambda exc, ev: errors.append((exc, ev)))
        for i in range(3):
            bus.publish(Ev.MD, Tick(i))
        await until(lambda: sub.delivered == 3, "3 events dispatched")
        assert seen == [0, 2]
        assert len(errors) == 1 and errors[0][1] == Tick(1)
        text = str(errors[0][0])
        assert isinstance(errors[0][0], TypeError)
        assert "coroutine" in text and "MarketData" in text and "EventTask" in text
        assert inspect.getcoroutinestate(made[0]) == inspect.CORO_CLOSED  # closed: no "never awaited"
        assert sub.errors == 1 and bus.stats(Ev.MD)["handler_errors"] == 1

    run(main())


# --- 19. BLOCK fairness ------------------------------------------------------------------------------------------


def test_a_sync_publish_does_not_take_the_slot_a_woken_async_publisher_was_woken_for(run):
    async def main():
        bus = make_bus(capacity=1, overflow=Overflow.BLOCK)
        ch = bus.channel(Ev.MD)
        sub = bus.subscribe(Ev.MD)
        ch.publish(Tick(0))
        waiter = asyncio.ensure_future(ch.publish_async(Tick(1)))
        await until(lambda: ch.blocked == 1, "the async publisher waits for room")
        assert sub.try_recv() == Tick(0)        # room for one: the waiter is woken for it
        with pytest.raises(ChannelFull, match="MarketData"):
            ch.publish(Tick(99))                 # first come, first served: the waiter was first
        with pytest.raises(ChannelFull):
            ch.publish_raw(msgspec.msgpack.encode(Tick(98)))
        late = asyncio.ensure_future(ch.publish_async(Tick(2)))  # and a later async one queues behind
        assert await waiter == 1
        assert sub.try_recv() == Tick(1)
        assert await late == 1
        assert sub.try_recv() == Tick(2)
        assert ch.blocked == 2 and ch.full == 2

    run(main())


def test_a_woken_async_publisher_that_is_cancelled_passes_its_slot_on(run):
    async def main():
        bus = make_bus(capacity=1, overflow=Overflow.BLOCK)
        ch = bus.channel(Ev.MD)
        sub = bus.subscribe(Ev.MD)
        ch.publish(Tick(0))
        first = asyncio.ensure_future(ch.publish_async(Tick(1)))
        await until(lambda: ch.blocked == 1, "the first async publisher waits")
        second = asyncio.ensure_future(ch.publish_async(Tick(2)))
        await until(lambda: ch.blocked == 2, "the second async publisher waits")
        assert sub.try_recv() == Tick(0)        # the first is woken ...
        first.cancel()                          # ... and cancelled before it could write
        with pytest.raises(asyncio.CancelledError):
            await first
        assert await second == 1                # its slot went to the next in line
        assert sub.try_recv() == Tick(2)
        ch.publish(Tick(3))                     # and nothing stays reserved afterwards
        assert sub.try_recv() == Tick(3)

    run(main())


# --- 20. backlog and high-water mark -----------------------------------------------------------------------------


def test_stats_backlog_and_high_water_mark_are_bounded_by_capacity_on_a_lagging_channel():
    bus = make_bus(capacity=4)
    sub = bus.subscribe(Ev.MD)
    for i in range(10):
        bus.publish(Ev.MD, Tick(i))
    stats = bus.stats(Ev.MD)
    assert stats["backlog"] == 4 and stats["high_water_mark"] == 4
    assert stats["per_subscriber"][0]["backlog"] == 4
    assert "backlog=4" in repr(sub)


@pytest.mark.parametrize("looked_first", [True, False], ids=["stats-then-close", "close-unseen"])
def test_the_high_water_mark_never_goes_down(looked_first):
    bus = make_bus(capacity=8)
    sub = bus.subscribe(Ev.MD)
    for i in range(5):
        bus.publish(Ev.MD, Tick(i))
    if looked_first:
        assert bus.stats(Ev.MD)["high_water_mark"] == 5
    sub.close()                                 # the backlog went with the subscriber; its mark stays
    assert bus.stats(Ev.MD)["high_water_mark"] == 5 and bus.stats(Ev.MD)["backlog"] == 0
    assert bus.channel(Ev.MD).high_water_mark == 5


# -- found by the adversarial trial of 0.3.1's dispatch fast paths (the module's Ev.MD channel of Tick) --------

class _ClassCheckRaises:
    """A returned object whose class check raises (isinstance looks at ``__class__``)."""

    @property  # type: ignore[misc]
    def __class__(self):  # noqa: D401
        raise RuntimeError("boom __class__")


@pytest.mark.parametrize("dispatch", ["INLINE", "LOOP"])
def test_a_return_value_whose_class_check_raises_is_the_handlers_failure_not_the_publishers(dispatch):
    from kimiha import Dispatch

    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(8, payload_type=Tick, dispatch=Dispatch[dispatch]))])
        seen: list[int] = []

        def handler(event: Tick) -> object:
            seen.append(event.seq)
            return _ClassCheckRaises()

        bus.subscribe(Ev.MD, handler, on_error=lambda exc, ev: errors.append(repr(exc)))
        errors: list[str] = []
        for i in range(3):
            assert bus.publish(Ev.MD, Tick(i)) == 1      # the event was written: publish does not raise
        await asyncio.sleep(0)
        assert seen == [0, 1, 2] and len(errors) == 3 and "boom __class__" in errors[0]
        assert bus.stats(Ev.MD)["handler_errors"] == 3
        bus.close()

    asyncio.run(main())


def test_a_generator_function_is_refused_at_subscribe_and_a_returned_generator_is_an_error(caplog):
    import functools

    def gen_handler(event: Tick):
        yield event

    async def agen_handler(event: Tick):
        yield event

    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(8, payload_type=Tick))])
        for fn in (gen_handler, agen_handler, functools.partial(gen_handler)):
            with pytest.raises(TypeError, match="generator function .* runs none of its body"):
                bus.subscribe(Ev.MD, fn)
        bus.subscribe(Ev.MD, lambda e: gen_handler(e))    # hides the generator function from subscribe()
        with caplog.at_level(logging.ERROR, logger="kimiha"):
            bus.publish(Ev.MD, Tick(1))
            await asyncio.sleep(0)
        assert bus.stats(Ev.MD)["handler_errors"] == 1
        assert "returned a generator" in caplog.text
        bus.close()

    asyncio.run(main())


@pytest.mark.parametrize("dispatch", ["INLINE", "LOOP"])
@pytest.mark.parametrize("reader", ["handler", "waiting pull reader"])
def test_a_plain_publish_from_another_thread_is_refused_when_the_loop_serves_the_channel(dispatch, reader):
    """call_soon() from another thread does not wake the loop (the event sat in the ring until some timer
    fired), and an INLINE handler ran on the foreign thread beside the loop: refused, nothing written, and
    publish_threadsafe named."""
    import threading

    from kimiha import Dispatch, InvalidStateError

    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(8, payload_type=Tick, dispatch=Dispatch[dispatch]))])
        got: list[int] = []
        if reader == "handler":
            bus.subscribe(Ev.MD, lambda e: got.append(e.seq))
        else:
            sub = bus.subscribe(Ev.MD)
            pulling = asyncio.ensure_future(sub.recv())
            await asyncio.sleep(0)                       # parked on its waiter
        outcome: list[BaseException] = []

        def other_thread() -> None:
            try:
                bus.publish(Ev.MD, Tick(1))
            except BaseException as exc:                 # noqa: BLE001 - reported to the test below
                outcome.append(exc)

        t = threading.Thread(target=other_thread)
        t.start()
        t.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], InvalidStateError), outcome
        assert "publish_threadsafe" in str(outcome[0]) and "'MarketData'" in str(outcome[0])
        assert bus.channel(Ev.MD).published == 0          # nothing was written
        bus.publish_threadsafe(Ev.MD, Tick(2))           # the way from another thread still works
        if reader == "handler":
            for _ in range(100):
                if got:
                    break
                await asyncio.sleep(0)
            assert got == [2]
        else:
            assert (await asyncio.wait_for(pulling, 10)).seq == 2
        bus.close()

    asyncio.run(main())


def test_a_plain_publish_from_another_thread_with_nobody_served_by_the_loop_still_writes():
    import threading

    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(8, payload_type=Tick))])
        sub = bus.subscribe(Ev.MD)                        # a pull reader that is not waiting
        t = threading.Thread(target=lambda: bus.publish(Ev.MD, Tick(1)))
        t.start()
        t.join(10)
        assert [e.seq for e in sub.drain()] == [1]
        bus.close()

    asyncio.run(main())
