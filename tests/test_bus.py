"""Semantics of the broadcast event bus (DESIGN.md, "Semantics the tests pin down")."""

from __future__ import annotations

import asyncio
import gc
import random
import threading

import msgspec
import numbers
import pytest
import typing

import kimiha
from kimiha import (
    ChannelClosed,
    ChannelConfig,
    ChannelFull,
    Event,
    EventBus,
    EventType,
    InvalidChannelError,
    Lagged,
    OrchestratorError,
    Overflow,
    PayloadTypeError,
    SerializationError,
)


class Ev(EventType):
    MD = "MarketData"
    ORDERS = "Orders"
    ANY = "Any"


class Tick(Event):
    seq: int
    price: float = 1.0


class Other(Event):
    x: int


def make_bus(capacity=64, overflow=Overflow.LAG, **kw) -> EventBus:
    return EventBus([(Ev.MD, ChannelConfig(capacity, overflow=overflow, payload_type=Tick, **kw))])


# --- order, duplicates, visibility -----------------------------------------------------------------------------


def test_order_and_no_duplicates_handlers_and_pull(run):
    async def main():
        bus = make_bus(capacity=4096)
        seen_a, seen_b = [], []
        bus.subscribe(Ev.MD, lambda e: seen_a.append(e.seq))
        bus.subscribe(Ev.MD, lambda e: seen_b.append(e.seq))
        pull = bus.subscribe(Ev.MD)
        pulled = []
        for i in range(3000):
            assert bus.publish(Ev.MD, Tick(i)) == 3
            if i % 7 == 0:
                pulled.extend(e.seq for e in pull.drain())
            if i % 500 == 0:
                await asyncio.sleep(0)
        pulled.extend(e.seq for e in pull.drain())
        await asyncio.sleep(0)
        expected = list(range(3000))
        assert seen_a == expected
        assert seen_b == expected
        assert pulled == expected

    run(main())


def test_subscriber_sees_only_events_after_subscribing(run):
    async def main():
        bus = make_bus()
        early = bus.subscribe(Ev.MD)
        for i in range(5):
            bus.publish(Ev.MD, Tick(i))
        late = bus.subscribe(Ev.MD)
        late_handler = []
        bus.subscribe(Ev.MD, lambda e: late_handler.append(e.seq))
        for i in range(5, 8):
            bus.publish(Ev.MD, Tick(i))
        await asyncio.sleep(0)
        assert [e.seq for e in early.drain()] == list(range(8))
        assert [e.seq for e in late.drain()] == [5, 6, 7]
        assert late_handler == [5, 6, 7]
        assert late.published_since_subscribed == 3

    run(main())


def test_in_process_subscribers_share_the_published_object(run):
    # No encode/decode between in-process publisher and subscribers: everyone gets the very object.
    async def main():
        bus = make_bus()
        a, b = bus.subscribe(Ev.MD), bus.subscribe(Ev.MD)
        tick = Tick(1)
        bus.publish(Ev.MD, tick)
        assert a.try_recv() is tick
        assert b.try_recv() is tick

    run(main())


def test_recv_waits_then_async_for_ends_on_close(run):
    async def main():
        bus = make_bus()
        sub = bus.subscribe(Ev.MD)

        async def consume():
            return [e.seq async for e in sub]

        task = asyncio.create_task(consume())
        await asyncio.sleep(0)
        for i in range(10):
            bus.publish(Ev.MD, Tick(i))
            await asyncio.sleep(0)
        bus.close()
        assert await task == list(range(10))
        with pytest.raises(ChannelClosed):
            await sub.recv()

    run(main())


def test_recv_batch_returns_every_ready_event(run):
    async def main():
        bus = make_bus()
        sub = bus.subscribe(Ev.MD)
        waiter = asyncio.create_task(sub.recv_batch())
        await asyncio.sleep(0)
        assert not waiter.done()
        for i in range(6):
            bus.publish(Ev.MD, Tick(i))
        assert [e.seq for e in await waiter] == list(range(6))
        for i in range(6, 9):
            bus.publish(Ev.MD, Tick(i))
        assert [e.seq for e in await sub.recv_batch(2)] == [6, 7]
        assert [e.seq for e in sub.drain()] == [8]

    run(main())


# --- LAG: conservation and exact Lagged(n) ----------------------------------------------------------------------


def test_lagged_is_exact_then_oldest_retained_follows(run):
    async def main():
        bus = make_bus(capacity=8)
        sub = bus.subscribe(Ev.MD)
        for i in range(20):
            bus.publish(Ev.MD, Tick(i))
        with pytest.raises(Lagged) as info:
            sub.try_recv()
        assert info.value.skipped == 12
        assert isinstance(info.value, OrchestratorError)
        assert "MarketData" in str(info.value)
        # Tokio semantics: the next receive returns the oldest retained event.
        assert (await sub.recv()).seq == 12
        assert [e.seq for e in sub.drain()] == list(range(13, 20))
        assert sub.try_recv() is None

    run(main())


@pytest.mark.parametrize("seed", range(5))
def test_conservation_on_lag_random_interleavings(run, seed):
    async def main():
        rng = random.Random(seed)
        bus = make_bus(capacity=rng.choice([1, 2, 3, 16, 64]))
        subs = []  # (subscription, delivered, reported_lag, published_before)
        published = 0
        for _ in range(4000):
            action = rng.random()
            if action < 0.55:
                bus.publish(Ev.MD, Tick(published))
                published += 1
            elif action < 0.6 or not subs:
                subs.append([bus.subscribe(Ev.MD), 0, 0, published, -1])
            else:
                entry = rng.choice(subs)
                try:
                    events = entry[0].drain(rng.randint(1, 5))
                except Lagged as lag:
                    entry[2] += lag.skipped
                    continue
                for e in events:  # order holds across lags: strictly increasing sequence numbers
                    assert e.seq > entry[4]
                    entry[4] = e.seq
                entry[1] += len(events)
        for entry in subs:
            while True:
                try:
                    events = entry[0].drain()
                except Lagged as lag:
                    entry[2] += lag.skipped
                    continue
                if not events:
                    break
                entry[1] += len(events)
            sub, delivered, lagged, before, _ = entry
            assert delivered + lagged == published - before
            assert sub.delivered == delivered and sub.lagged == lagged
        stats = bus.stats(Ev.MD)
        assert stats["published"] == published
        assert stats["delivered"] == sum(e[1] for e in subs)
        assert stats["lagged"] == sum(e[2] for e in subs)

    run(main())


def test_handler_lag_is_counted_and_reported_then_delivery_continues(run):
    async def main():
        bus = make_bus(capacity=4)
        seen, lags = [], []
        bus.subscribe(Ev.MD, lambda e: seen.append(e.seq), on_lag=lags.append)
        for i in range(10):  # no yield: the ring wraps before the handler runs
            bus.publish(Ev.MD, Tick(i))
        await asyncio.sleep(0)
        assert lags == [6]
        assert seen == [6, 7, 8, 9]
        bus.publish(Ev.MD, Tick(10))
        await asyncio.sleep(0)
        assert seen[-1] == 10
        s = bus.stats(Ev.MD)
        assert s["lagged"] == 6 and s["delivered"] == 5

    run(main())


# --- BLOCK: no loss, ChannelFull, publish_async, release -------------------------------------------------------


def test_block_zero_loss_with_slow_subscriber(run):
    async def main():
        bus = make_bus(capacity=8, overflow=Overflow.BLOCK)
        fast, slow = bus.subscribe(Ev.MD), bus.subscribe(Ev.MD)
        n = 2000

        async def producer():
            for i in range(n):
                await bus.publish_async(Ev.MD, Tick(i))

        async def consume(sub, pause_every):
            out = []
            while len(out) < n:
                out.append((await sub.recv()).seq)
                if pause_every and len(out) % pause_every == 0:
                    await asyncio.sleep(0.0005)
            return out

        _, a, b = await asyncio.gather(producer(), consume(fast, 0), consume(slow, 50))
        assert a == list(range(n)) and b == list(range(n))
        stats = bus.stats(Ev.MD)
        assert stats["lagged"] == 0
        assert stats["blocked"] > 0  # the producer really had to wait for the slow one
        assert stats["high_water_mark"] <= 8

    run(main())


def test_block_publish_raises_channel_full_and_writes_nothing(run):
    async def main():
        bus = make_bus(capacity=3, overflow=Overflow.BLOCK)
        sub = bus.subscribe(Ev.MD)
        for i in range(3):
            bus.publish(Ev.MD, Tick(i))
        with pytest.raises(ChannelFull) as info:
            bus.publish(Ev.MD, Tick(99))
        assert "MarketData" in str(info.value) and "capacity 3" in str(info.value)
        assert bus.stats(Ev.MD)["published"] == 3
        assert [e.seq for e in sub.drain()] == [0, 1, 2]
        assert bus.publish(Ev.MD, Tick(3)) == 1
        assert sub.try_recv().seq == 3

    run(main())


def test_block_publish_async_waits_for_room_in_order(run):
    async def main():
        bus = make_bus(capacity=2, overflow=Overflow.BLOCK)
        sub = bus.subscribe(Ev.MD)
        bus.publish(Ev.MD, Tick(0))
        bus.publish(Ev.MD, Tick(1))
        t2 = asyncio.create_task(bus.publish_async(Ev.MD, Tick(2)))
        t3 = asyncio.create_task(bus.publish_async(Ev.MD, Tick(3)))
        await asyncio.sleep(0)
        assert not t2.done() and not t3.done()
        with pytest.raises(ChannelFull):  # waiting publishers keep their turn
            bus.publish(Ev.MD, Tick(100))
        got = [(await sub.recv()).seq for _ in range(4)]
        await asyncio.gather(t2, t3)
        assert got == [0, 1, 2, 3]

    run(main())


def test_block_closing_slow_subscription_releases_the_channel(run):
    async def main():
        bus = make_bus(capacity=2, overflow=Overflow.BLOCK)
        slow = bus.subscribe(Ev.MD)
        seen = []
        bus.subscribe(Ev.MD, lambda e: seen.append(e.seq))
        bus.publish(Ev.MD, Tick(0))
        bus.publish(Ev.MD, Tick(1))
        waiting = asyncio.create_task(bus.publish_async(Ev.MD, Tick(2)))
        await asyncio.sleep(0)
        assert not waiting.done()
        slow.close()
        await asyncio.wait_for(waiting, 5)
        await asyncio.sleep(0)
        assert seen == [0, 1, 2]
        with pytest.raises(ChannelClosed):
            slow.try_recv()

    run(main())


def test_block_forgotten_subscription_does_not_stall_the_channel(run):
    async def main():
        bus = make_bus(capacity=2, overflow=Overflow.BLOCK)
        sub = bus.subscribe(Ev.MD)
        bus.publish(Ev.MD, Tick(0))
        bus.publish(Ev.MD, Tick(1))
        del sub  # dropped without close(): like Tokio, the receiver unsubscribes
        import gc

        gc.collect()
        assert bus.publish(Ev.MD, Tick(2)) == 0

    run(main())


def test_block_close_wakes_waiting_publisher_with_channel_closed(run):
    async def main():
        bus = make_bus(capacity=1, overflow=Overflow.BLOCK)
        _sub = bus.subscribe(Ev.MD)
        bus.publish(Ev.MD, Tick(0))
        waiting = asyncio.create_task(bus.publish_async(Ev.MD, Tick(1)))
        await asyncio.sleep(0)
        bus.close()
        with pytest.raises(ChannelClosed):
            await waiting

    run(main())


# --- threads ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overflow", [Overflow.LAG, Overflow.BLOCK])
@pytest.mark.parametrize("threads_n, per_thread", [(4, 20_000), (6, 50_000)])
def test_publish_threadsafe_from_many_threads_exactly_once_in_producer_order(run, overflow, threads_n, per_thread):

    class Msg(Event):
        producer: int
        seq: int

    async def main():
        capacity = threads_n * per_thread if overflow is Overflow.LAG else 256
        bus = EventBus([(Ev.MD, ChannelConfig(capacity, overflow=overflow, payload_type=Msg))])
        sub = bus.subscribe(Ev.MD)
        start = threading.Barrier(threads_n)

        def feed(producer):
            start.wait()
            for i in range(per_thread):
                bus.publish_threadsafe(Ev.MD, Msg(producer, i))

        workers = [threading.Thread(target=feed, args=(p,)) for p in range(threads_n)]
        for w in workers:
            w.start()
        last = [-1] * threads_n
        received = 0
        while received < threads_n * per_thread:
            for msg in await sub.recv_batch():
                assert msg.seq == last[msg.producer] + 1, "per-producer order broken or duplicate"
                last[msg.producer] = msg.seq
                received += 1
        for w in workers:
            w.join()
        assert last == [per_thread - 1] * threads_n
        assert sub.try_recv() is None
        stats = bus.stats(Ev.MD)
        assert stats["published"] == threads_n * per_thread and stats["lagged"] == 0

    run(main())


# --- frames: encode and decode at most once ---------------------------------------------------------------------


def test_frames_are_encoded_once_and_shared(run):
    async def main():
        bus = make_bus()
        f1 = bus.subscribe(Ev.MD, frames=True)
        f2 = bus.subscribe(Ev.MD, frames=True)
        tick = Tick(7, 2.5)
        bus.publish(Ev.MD, tick)
        seq1, ts1, frame1 = f1.try_recv()
        seq2, ts2, frame2 = f2.try_recv()
        assert frame1 is frame2  # made once, cached in the slot
        assert seq1 == seq2 == 0 and ts1 == ts2 > 0
        assert msgspec.msgpack.decode(frame1, type=Tick) == tick

    run(main())


def test_raw_frames_are_validated_decoded_once_and_forwarded_verbatim(run):
    async def main():
        bus = make_bus()
        a, b = bus.subscribe(Ev.MD), bus.subscribe(Ev.MD)
        frames = bus.subscribe(Ev.MD, frames=True)
        raw = msgspec.msgpack.encode(Tick(3, 9.5))
        assert bus.publish_raw(Ev.MD, raw) == 3
        ea, eb = a.try_recv(), b.try_recv()
        assert ea == Tick(3, 9.5) and ea is eb  # decoded once, shared
        assert frames.try_recv()[2] is raw  # the bridge forwards the very frame, no re-encode

    run(main())


# --- bad input --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [0, -1, 10**12, 2.5, "8", None, True])
def test_bad_capacity_is_rejected_naming_the_parameter(capacity):
    with pytest.raises(ValueError) as info:
        ChannelConfig(capacity)
    assert "capacity" in str(info.value)
    assert repr(capacity) in str(info.value) or str(capacity) in str(info.value)


def test_bad_config_values():
    with pytest.raises(ValueError, match="overflow"):
        ChannelConfig(4, overflow="lag")
    with pytest.raises(ValueError, match="payload_type"):
        ChannelConfig(4, payload_type=42)
    with pytest.raises(ValueError, match="add_channel"):
        EventBus([(Ev.MD, 16)])
    with pytest.raises(ValueError, match="dispatch_budget"):
        EventBus(dispatch_budget=0)


def test_duplicate_channel_is_an_error_and_keeps_the_original(run):
    async def main():
        bus = make_bus(capacity=8)
        sub = bus.subscribe(Ev.MD)
        with pytest.raises(InvalidChannelError, match="already exists"):
            bus.add_channel(Ev.MD, ChannelConfig(16))
        with pytest.raises(InvalidChannelError):
            EventBus([(Ev.MD, ChannelConfig(1)), (Ev.MD, ChannelConfig(2))])
        bus.publish(Ev.MD, Tick(1))
        assert sub.try_recv() == Tick(1)
        assert bus.channel(Ev.MD).capacity == 8

    run(main())


def test_unknown_channel_names_the_known_ones(run):
    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(8)), (Ev.ORDERS, ChannelConfig(8))])
        with pytest.raises(InvalidChannelError) as info:
            bus.publish(Ev.ANY, Tick(1))
        msg = str(info.value)
        assert "Ev.ANY" in msg and "Ev.MD" in msg and "Ev.ORDERS" in msg
        with pytest.raises(LookupError):
            bus.subscribe(Ev.ANY)
        with pytest.raises(InvalidChannelError, match="hashable"):
            bus.publish([1], Tick(1))
        sub = bus.subscribe(Ev.MD)
        bus.publish(Ev.MD, Tick(2))
        assert sub.try_recv() == Tick(2)

    run(main())


def test_wrong_payload_type_is_rejected_and_nothing_written(run):
    async def main():
        bus = make_bus()
        sub = bus.subscribe(Ev.MD)
        for bad in (Other(1), {"seq": 1}, None, 3):
            with pytest.raises(PayloadTypeError) as info:
                bus.publish(Ev.MD, bad)
            assert isinstance(info.value, TypeError)
            assert "Tick" in str(info.value) and "MarketData" in str(info.value)
            assert type(bad).__name__ in str(info.value)
        with pytest.raises(PayloadTypeError):
            await bus.publish_async(Ev.MD, Other(1))
        with pytest.raises(PayloadTypeError):
            bus.publish_threadsafe(Ev.MD, Other(1))
        assert bus.stats(Ev.MD)["published"] == 0
        bus.publish(Ev.MD, Tick(5))
        assert sub.drain() == [Tick(5)]

    run(main())


def test_union_payload_type(run):
    class A(Event, tag=True):
        a: int

    class B(Event, tag=True):
        b: str

    async def main():
        bus = EventBus([(Ev.ANY, ChannelConfig(8, payload_type=A | B))])
        sub = bus.subscribe(Ev.ANY)
        bus.publish(Ev.ANY, A(1))
        bus.publish_raw(Ev.ANY, msgspec.msgpack.encode(B("x")))
        with pytest.raises(PayloadTypeError, match="A | B"):
            bus.publish(Ev.ANY, Tick(1))
        assert sub.drain() == [A(1), B("x")]

    run(main())


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x81\xa3seq\xa3abc", msgspec.msgpack.encode({"price": 1.0}), b"\xff" * 50, "text"],
)
def test_garbage_raw_frame_is_counted_and_channel_keeps_working(run, frame):
    async def main():
        bus = make_bus()
        sub = bus.subscribe(Ev.MD)
        with pytest.raises(OrchestratorError) as info:
            bus.publish_raw(Ev.MD, frame)
        assert "MarketData" in str(info.value)
        assert isinstance(info.value, (SerializationError, PayloadTypeError))
        stats = bus.stats(Ev.MD)
        assert stats["bad_frames"] == 1 and stats["published"] == 0
        bus.publish_raw(Ev.MD, msgspec.msgpack.encode(Tick(1)))
        assert sub.try_recv() == Tick(1)

    run(main())


def test_failing_handler_is_isolated_counted_and_reported(run):
    async def main():
        bus = make_bus()
        good, errors = [], []

        def flaky(e):
            if e.seq % 3 == 0:
                raise RuntimeError(f"boom {e.seq}")

        bus.subscribe(Ev.MD, flaky, on_error=lambda exc, ev: errors.append((str(exc), ev.seq)))
        bus.subscribe(Ev.MD, lambda e: good.append(e.seq))
        for i in range(7):
            bus.publish(Ev.MD, Tick(i))
        await asyncio.sleep(0)
        assert good == list(range(7))
        assert errors == [("boom 0", 0), ("boom 3", 3), ("boom 6", 6)]
        assert bus.stats(Ev.MD)["handler_errors"] == 3

    run(main())


def test_misuse_gives_clear_errors(run):
    async def main():
        bus = make_bus()
        handled = bus.subscribe(Ev.MD, lambda e: None)
        with pytest.raises(OrchestratorError, match="handler"):
            handled.try_recv()
        with pytest.raises(TypeError, match="callable"):
            bus.subscribe(Ev.MD, 42)
        bus.close()
        with pytest.raises(ChannelClosed, match="closed"):
            bus.publish(Ev.MD, Tick(1))
        with pytest.raises(ChannelClosed):
            bus.subscribe(Ev.MD)
        with pytest.raises(TypeError):
            kimiha.Subscription()

    run(main())


# --- dispatch loop: coalescing and budget -----------------------------------------------------------------------


def test_dispatch_budget_lets_timers_run_during_a_burst(run):
    async def main():
        budget = 64
        bus = EventBus([(Ev.MD, ChannelConfig(10_000, payload_type=Tick))], dispatch_budget=budget)
        seen = []
        bus.subscribe(Ev.MD, lambda e: seen.append(e.seq))
        for i in range(10 * budget):
            bus.publish(Ev.MD, Tick(i))
        at_marker = []
        asyncio.get_running_loop().call_soon(lambda: at_marker.append(len(seen)))
        while len(seen) < 10 * budget:
            await asyncio.sleep(0)
        # the dispatch callback ran one budget, then yielded to the marker callback queued behind it
        assert at_marker == [budget]
        assert seen == list(range(10 * budget))

    run(main())


def test_wakeups_are_coalesced_not_one_callback_per_event():
    calls = {"n": 0}

    class CountingLoop(asyncio.SelectorEventLoop):
        def call_soon(self, *args, **kwargs):
            calls["n"] += 1
            return super().call_soon(*args, **kwargs)

    async def main():
        bus = make_bus(capacity=20_000)
        seen = []
        bus.subscribe(Ev.MD, lambda e: seen.append(1))
        pull = bus.subscribe(Ev.MD)
        waiter = asyncio.create_task(pull.recv_batch())
        await asyncio.sleep(0)
        before = calls["n"]
        for i in range(10_000):
            bus.publish(Ev.MD, Tick(i))
        scheduled = calls["n"] - before
        batch = await waiter
        while len(seen) < 10_000:
            await asyncio.sleep(0)
        assert len(batch) == 10_000 and len(seen) == 10_000
        return scheduled

    with asyncio.Runner(loop_factory=CountingLoop) as runner:
        scheduled = runner.run(main())
    assert scheduled <= 2  # publishing 10,000 events scheduled one dispatch and one wake-up, not 20,000


# --- stats and latency histogram --------------------------------------------------------------------------------


def test_latency_histogram_percentiles_are_within_bucket_precision():
    rng = random.Random(1)
    values = sorted(int(rng.lognormvariate(8, 1.5)) for _ in range(50_000))
    hist = kimiha.LatencyHistogram()
    for v in values:
        hist.record(v)
    assert hist.count == len(values)
    assert hist.min == values[0] and hist.max == values[-1]
    for q in (50, 90, 99, 99.9):
        exact = values[min(len(values) - 1, int(q / 100 * len(values)))]
        assert abs(hist.percentile(q) - exact) <= max(2, exact * 0.035), q
    with pytest.raises(ValueError, match="percentile"):
        hist.percentile(101)


def test_stats_count_every_delivery(run):
    async def main():
        bus = make_bus(capacity=16, latency_sample=1)  # every event in the histogram, not a 1-in-N sample
        bus.subscribe(Ev.MD, lambda e: None)
        sub = bus.subscribe(Ev.MD)
        for i in range(10):
            bus.publish(Ev.MD, Tick(i))
        sub.drain()
        await asyncio.sleep(0)
        s = bus.stats(Ev.MD)
        assert s["published"] == 10 and s["delivered"] == 20 and s["subscribers"] == 2
        assert s["latency_ns"]["count"] == 20 and s["latency_ns"]["max"] >= s["latency_ns"]["p50"] > 0
        assert s["high_water_mark"] == 10
        assert "MarketData" in bus.format_stats()

    run(main())


def test_run_defaults_to_uvloop():
    async def which():
        return type(asyncio.get_running_loop()).__module__

    assert kimiha.run(which()).startswith("uvloop")
    assert kimiha.run(which(), loop="asyncio").startswith("asyncio")
    with pytest.raises(ValueError, match="loop"):
        kimiha.run(which(), loop="trio")


# --- nothing leaves silently: unread events at a subscription's close, bools on int channels, lag names -------


def test_closing_a_subscription_counts_the_events_it_left_unread(run):
    """Before: ``sub.close()`` dropped its unread events with no counter anywhere."""

    async def main():
        bus = make_bus(capacity=8)
        kept = bus.subscribe(Ev.MD)
        left = bus.subscribe(Ev.MD)
        for i in range(3):
            bus.publish(Ev.MD, Tick(i))
        assert left.drain(1)[0].seq == 0
        left.close()
        assert left.unread_on_close == 2
        overrun = bus.subscribe(Ev.MD)
        for i in range(3, 20):  # 17 more on a ring of 8: `overrun` is lagged past its capacity
            bus.publish(Ev.MD, Tick(i))
        overrun.close()
        overrun.close()  # idempotent: counted once
        assert overrun.unread_on_close == 17  # still in the ring or overwritten alike: never received
        stats = bus.stats(Ev.MD)
        assert stats["unread_on_close"] == 19
        assert kept.backlog == 8 and kept.unread_on_close == 0  # a live subscription is not counted
        assert [s["unread_on_close"] for s in stats["per_subscriber"]] == [0]
        dropped = bus.subscribe(Ev.MD)
        bus.publish(Ev.MD, Tick(20))
        del dropped  # never closed: its unread event counts when it goes (adversarial trial)
        gc.collect()
        assert bus.stats(Ev.MD)["unread_on_close"] == 20

    run(main())


def test_a_bool_is_refused_on_an_int_channel_as_its_frame_would_be(run):
    """Before: ``publish(True)`` was accepted on a ``payload_type=int`` channel (isinstance(True, int)), while
    ``publish_raw`` of that very event's frame was refused: the two paths disagreed on what the channel holds."""

    class E(EventType):
        N = "N"
        B = "B"
        U = "U"

    async def main():
        bus = EventBus([(E.N, ChannelConfig(8, "counts", payload_type=int)),
                        (E.B, ChannelConfig(8, payload_type=bool)), (E.U, ChannelConfig(8, payload_type=int | bool))])
        refused = r"""channel 'N' \("counts"\): expected payload of type int, got bool: True"""
        with pytest.raises(PayloadTypeError, match=refused):
            bus.publish(E.N, True)
        with pytest.raises(PayloadTypeError, match="got bool"):
            bus.channel(E.N).publish(False)
        assert bus.stats(E.N)["published"] == 0
        assert bus.publish(E.N, 7) == 0
        with pytest.raises(SerializationError):
            bus.channel(E.N).publish_raw(msgspec.msgpack.encode(True))
        bus.publish(E.B, True)  # declared bool, or int | bool: a bool is what the channel holds
        bus.publish(E.U, True)
        bus.publish(E.U, 3)
        assert bus.stats(E.B)["published"] == 1 and bus.stats(E.U)["published"] == 2

    run(main())


def test_a_handler_lag_warning_names_the_channel_with_its_description_and_the_remedy(run, caplog):
    async def main():
        bus = EventBus([(Ev.MD, ChannelConfig(4, "market ticks", payload_type=Tick))])
        bus.subscribe(Ev.MD, lambda e: None)
        for i in range(10):  # the loop does not run during the burst: the handler falls 6 behind
            bus.publish(Ev.MD, Tick(i))
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    with caplog.at_level("WARNING", logger="kimiha.bus"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if "lagged" in r.getMessage()]
    assert len(lines) == 1, lines
    assert """on channel 'MarketData' ("market ticks") lagged: 6 event(s) skipped""" in lines[0]
    assert "capacity" in lines[0] and "Overflow.BLOCK" in lines[0]


@pytest.mark.parametrize("payload_type", [typing.Any, object, typing.Union[int, typing.Any], int | object])
def test_a_payload_type_that_accepts_everything_is_refused_for_none(payload_type):
    """Before: ``typing.Any`` was accepted, then every publish raised a bare TypeError from isinstance;
    ``object`` was accepted, then every raw frame was refused (bridges and journals could not carry it)."""
    with pytest.raises(kimiha.InvalidConfigurationError,
                       match=r"would accept every payload; leave payload_type=None for any payload"):
        ChannelConfig(8, payload_type=payload_type)


def test_a_payload_type_msgspec_cannot_decode_frames_of_is_refused_at_config():
    with pytest.raises(kimiha.InvalidConfigurationError,
                       match=r"msgspec cannot decode frames of <class 'numbers.Integral'>.*or None for any payload"):
        ChannelConfig(8, payload_type=numbers.Integral)
    ChannelConfig(8, payload_type=int | str)  # concrete types still pass
    ChannelConfig(8, payload_type=Tick)
