"""pytest-benchmark suites of kimiha's event bus, with the direct-call floor and asyncio.Queue as baselines.

One round = ``EVENTS`` seeded events (built once per session) published in chunks of ``CHUNK`` and delivered
to 1, 4 or 16 subscribers (the fan-out) whose handler counts them and reads one attribute. Buses, subscriptions, queues and
handlers are made fresh for every round in ``setup`` (not timed); after the rounds, every handler of every round
is checked to have seen exactly ``EVENTS`` events, so a round that lost events cannot pass as a fast one.
``extra_info["median_ns_per_event"]`` holds the median round time divided by ``EVENTS``.

Run: ``python -m pytest benchmarks/ -q --benchmark-only`` (add ``-k sync`` etc. to pick a group).
"""

from __future__ import annotations

import asyncio
import gc

import pytest

from kimiha import ChannelClosed

ROUNDS = 15
WARMUP_ROUNDS = 2
SUBSCRIBERS = [1, 4, 16]
LATENCY = pytest.mark.parametrize("track_latency", [True, False], ids=["latency", "nolatency"])

sleep = asyncio.sleep


def pedantic(benchmark, target, setup):  # type: ignore[no-untyped-def]
    def fresh():  # type: ignore[no-untyped-def]
        gc.collect()  # start every round with empty GC generations, as compare.py does (not timed)
        return setup()

    benchmark.pedantic(target, setup=fresh, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


def check_all(rounds, n):  # type: ignore[no-untyped-def]
    for sinks in rounds:
        for sink in sinks:
            sink.check(n)


# ---------------------------------------------------------------------------------------------------------------
# Baseline: the producer calls the handlers itself.


@pytest.mark.benchmark(group="floor: direct calls")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_floor_direct_calls(benchmark, events, make_sinks, record_rate, subs):
    rounds = []

    def setup():
        sinks = make_sinks(subs)
        rounds.append(sinks)
        return tuple(s.handler for s in sinks), {}

    def one(h):
        for e in events:
            h(e)

    def four(h0, h1, h2, h3):
        for e in events:
            h0(e)
            h1(e)
            h2(e)
            h3(e)

    def many(*hs):
        for e in events:
            for h in hs:
                h(e)

    pedantic(benchmark, {1: one, 4: four}.get(subs, many), setup)
    check_all(rounds, len(events))
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# Publishing alone (no subscriber): the producer's share of every other case.


@pytest.mark.benchmark(group="publish, no subscriber")
@pytest.mark.parametrize("via", ["channel.publish", "bus.publish"])
@LATENCY
def test_publish_no_subscriber(benchmark, events, make_bus, key, record_rate, via, track_latency):
    bus = make_bus(track_latency)
    ch = bus.channel(key)

    if via == "channel.publish":
        publish = ch.publish

        def target():
            for e in events:
                publish(e)

    else:
        bus_publish = bus.publish

        def target():
            for e in events:
                bus_publish(key, e)

    before = ch.published
    benchmark(target)
    assert (ch.published - before) % len(events) == 0 and ch.published > before
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# Push: handler subscriptions called by the compiled dispatch loop.


@pytest.mark.benchmark(group="sync dispatch")
@LATENCY
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_sync_dispatch(benchmark, loop, chunks, make_bus, make_sinks, key, record_rate, subs, track_latency):
    rounds = []

    def setup():
        bus = make_bus(track_latency)
        bus.bind_loop(loop)
        sinks = make_sinks(subs)
        rounds.append(sinks)
        return (bus.channel(key).publish, [bus.subscribe(key, s.handler) for s in sinks]), {}

    async def flood(publish, subscriptions):
        for chunk in chunks:
            for e in chunk:
                publish(e)
            await sleep(0)
        while any(s.backlog for s in subscriptions):
            await sleep(0)

    def target(publish, subscriptions):
        loop.run_until_complete(flood(publish, subscriptions))

    pedantic(benchmark, target, setup)
    check_all(rounds, sum(map(len, chunks)))
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# Pull: one consumer task per subscription.


async def consume_async_for(sub, handler):
    async for ev in sub:
        handler(ev)


async def consume_recv_batch(sub, handler):
    try:
        while True:
            for ev in await sub.recv_batch():
                handler(ev)
    except ChannelClosed:
        pass


@pytest.mark.benchmark(group="pull flood")
@pytest.mark.parametrize("mode", ["async_for", "recv_batch"])
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_pull_flood(benchmark, loop, chunks, make_bus, make_sinks, key, record_rate, subs, mode):
    consume = consume_async_for if mode == "async_for" else consume_recv_batch
    rounds = []

    def setup():
        bus = make_bus()
        bus.bind_loop(loop)
        sinks = make_sinks(subs)
        rounds.append(sinks)
        return (bus, [(bus.subscribe(key), s.handler) for s in sinks]), {}

    async def flood(bus, pairs):
        tasks = [asyncio.ensure_future(consume(sub, h)) for sub, h in pairs]
        await sleep(0)  # consumers park first
        publish = bus.channel(key).publish
        for chunk in chunks:
            for e in chunk:
                publish(e)
            await sleep(0)
        bus.close()  # consumers get everything published, then their loops end
        for t in tasks:
            await t

    def target(bus, pairs):
        loop.run_until_complete(flood(bus, pairs))

    pedantic(benchmark, target, setup)
    check_all(rounds, sum(map(len, chunks)))
    record_rate(benchmark)


@pytest.mark.benchmark(group="pull drain, no loop")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_pull_drain_inline(benchmark, chunks, make_bus, make_sinks, key, record_rate, subs):
    """The producer drains each subscription after every chunk: the pull path without any task switch."""
    rounds = []

    def setup():
        bus = make_bus()
        sinks = make_sinks(subs)
        rounds.append(sinks)
        return (bus.channel(key).publish, [(bus.subscribe(key).drain, s.handler) for s in sinks]), {}

    def target(publish, pairs):
        for chunk in chunks:
            for e in chunk:
                publish(e)
            for drain, h in pairs:
                for ev in drain():
                    h(ev)

    pedantic(benchmark, target, setup)
    check_all(rounds, sum(map(len, chunks)))
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# The classic alternative: one asyncio.Queue per subscriber.


async def consume_queue(q, handler):
    get = q.get
    while True:
        ev = await get()
        if ev is None:
            return
        handler(ev)


@pytest.mark.benchmark(group="asyncio.Queue fan-out")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_queue_fanout(benchmark, loop, chunks, make_sinks, record_rate, subs):
    rounds = []

    def setup():
        sinks = make_sinks(subs)
        rounds.append(sinks)
        return ([(asyncio.Queue(), s.handler) for s in sinks],), {}

    async def flood(pairs):
        tasks = [asyncio.ensure_future(consume_queue(q, h)) for q, h in pairs]
        await sleep(0)
        if len(pairs) == 1:
            put = pairs[0][0].put_nowait
            for chunk in chunks:
                for e in chunk:
                    put(e)
                await sleep(0)
        elif len(pairs) != 4:
            puts = [q.put_nowait for q, _ in pairs]
            for chunk in chunks:
                for e in chunk:
                    for put in puts:
                        put(e)
                await sleep(0)
        else:
            p0, p1, p2, p3 = [q.put_nowait for q, _ in pairs]
            for chunk in chunks:
                for e in chunk:
                    p0(e)
                    p1(e)
                    p2(e)
                    p3(e)
                await sleep(0)
        for q, _ in pairs:
            q.put_nowait(None)
        for t in tasks:
            await t

    def target(pairs):
        loop.run_until_complete(flood(pairs))

    pedantic(benchmark, target, setup)
    check_all(rounds, sum(map(len, chunks)))
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# Coroutine handlers: an awaited handler per event, by hand and through the compiled pump the scheduler uses.


def make_async_handler(sink):
    handler = sink.handler

    async def async_handler(event):
        handler(event)

    return async_handler


async def consume_awaiting(sub, async_handler):
    async for ev in sub:
        await async_handler(ev)


def pump_error(exc, event):
    raise AssertionError(f"handler failed on {event!r}") from exc


@pytest.mark.benchmark(group="async handler")
@pytest.mark.parametrize("via", ["async_for_await", "run_handler"])
@pytest.mark.parametrize("subs", [1, 4])
def test_async_handler(benchmark, loop, chunks, make_bus, make_sinks, key, record_rate, subs, via):
    rounds = []

    def setup():
        bus = make_bus()
        bus.bind_loop(loop)
        sinks = make_sinks(subs)
        rounds.append(sinks)
        return (bus, [(bus.subscribe(key), make_async_handler(s)) for s in sinks]), {}

    async def flood(bus, pairs):
        if via == "run_handler":
            tasks = [asyncio.ensure_future(sub.run_handler(h, pump_error)) for sub, h in pairs]
        else:
            tasks = [asyncio.ensure_future(consume_awaiting(sub, h)) for sub, h in pairs]
        await sleep(0)
        publish = bus.channel(key).publish
        for chunk in chunks:
            for e in chunk:
                publish(e)
            await sleep(0)
        bus.close()
        for t in tasks:
            await t

    def target(bus, pairs):
        loop.run_until_complete(flood(bus, pairs))

    pedantic(benchmark, target, setup)
    check_all(rounds, sum(map(len, chunks)))
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# LAG (overwrite the oldest, report the lag) vs BLOCK (the publisher waits for the slowest subscriber).


@pytest.mark.benchmark(group="LAG vs BLOCK")
@pytest.mark.parametrize("overflow", ["lag", "block"])
@pytest.mark.parametrize("path", ["push", "pull"])
@pytest.mark.parametrize("subs", [1, 4])
def test_overflow(benchmark, loop, chunks, make_bus, make_sinks, key, record_rate, subs, path, overflow):
    """The same flood on a LAG and on a BLOCK channel; BLOCK pays the slowest-cursor bookkeeping."""
    rounds = []

    def setup():
        bus = make_bus(overflow=overflow)
        bus.bind_loop(loop)
        sinks = make_sinks(subs)
        rounds.append(sinks)
        if path == "push":
            return (bus, [bus.subscribe(key, s.handler) for s in sinks], []), {}
        return (bus, [], [(bus.subscribe(key), s.handler) for s in sinks]), {}

    async def flood(bus, push_subs, pull_pairs):
        tasks = [asyncio.ensure_future(consume_async_for(sub, h)) for sub, h in pull_pairs]
        await sleep(0)
        # channel.publish on both: a chunk fits the ring and is consumed before the next, so a BLOCK channel
        # is never full here and the difference is BLOCK's bookkeeping (slowest cursor, waiter checks).
        publish = bus.channel(key).publish
        for chunk in chunks:
            for e in chunk:
                publish(e)
            await sleep(0)
        while any(s.backlog for s in push_subs):
            await sleep(0)
        bus.close()
        for t in tasks:
            await t

    def target(bus, push_subs, pull_pairs):
        loop.run_until_complete(flood(bus, push_subs, pull_pairs))

    pedantic(benchmark, target, setup)
    check_all(rounds, sum(map(len, chunks)))
    record_rate(benchmark)
