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

import pytest

from kimiha.bench.cases import (
    call_direct,
    close_and_join,
    consume_batch,
    consume_iter,
    consume_queue,
    pull_flood,
    push_flood,
    queue_flood,
    start_consumers,
)

SUBSCRIBERS = [1, 4, 16]
LATENCY = pytest.mark.parametrize("track_latency", [True, False], ids=["latency", "nolatency"])

sleep = asyncio.sleep


# ---------------------------------------------------------------------------------------------------------------
# Baseline: the producer calls the handlers itself.


@pytest.mark.benchmark(group="floor: direct calls")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_floor_direct_calls(benchmark, pedantic, events, make_sinks, record_rate, subs):
    def setup():
        return ([s.handler for s in make_sinks(subs)],), {}

    def target(handlers):
        call_direct(events, handlers)

    pedantic(target, setup)
    make_sinks.check(len(events))
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
def test_sync_dispatch(
    benchmark, pedantic, loop, chunks, make_bus, make_sinks, key, record_rate, subs, track_latency
):
    def setup():
        bus = make_bus(track_latency)
        bus.bind_loop(loop)
        return (bus.channel(key).publish, [bus.subscribe(key, s.handler) for s in make_sinks(subs)]), {}

    def target(publish, subscriptions):
        loop.run_until_complete(push_flood(publish, subscriptions, chunks))

    pedantic(target, setup)
    make_sinks.check(sum(map(len, chunks)))
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# Pull: one consumer task per subscription.


def pull_round(loop, consume, key, chunks):  # type: ignore[no-untyped-def]
    """Return the target of a pull benchmark: start ``consume(sub, handler)`` tasks, let them park, flood."""

    async def flood(bus, pairs):  # type: ignore[no-untyped-def]
        tasks = start_consumers(consume, pairs)
        await sleep(0)  # consumers park first
        await pull_flood(bus.channel(key).publish, bus, tasks, chunks)

    def target(bus, pairs):  # type: ignore[no-untyped-def]
        loop.run_until_complete(flood(bus, pairs))

    return target


@pytest.mark.benchmark(group="pull flood")
@pytest.mark.parametrize("mode", ["async_for", "recv_batch"])
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_pull_flood(benchmark, pedantic, loop, chunks, make_bus, make_sinks, key, record_rate, subs, mode):
    consume = consume_iter if mode == "async_for" else consume_batch

    def setup():
        bus = make_bus()
        bus.bind_loop(loop)
        return (bus, [(bus.subscribe(key), s.handler) for s in make_sinks(subs)]), {}

    pedantic(pull_round(loop, consume, key, chunks), setup)
    make_sinks.check(sum(map(len, chunks)))
    record_rate(benchmark)


@pytest.mark.benchmark(group="pull drain, no loop")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_pull_drain_inline(benchmark, pedantic, chunks, make_bus, make_sinks, key, record_rate, subs):
    """The producer drains each subscription after every chunk: the pull path without any task switch."""

    def setup():
        bus = make_bus()
        pairs = [(bus.subscribe(key).drain, s.handler) for s in make_sinks(subs)]
        return (bus.channel(key).publish, pairs), {}

    def target(publish, pairs):
        for chunk in chunks:
            for e in chunk:
                publish(e)
            for drain, h in pairs:
                for ev in drain():
                    h(ev)

    pedantic(target, setup)
    make_sinks.check(sum(map(len, chunks)))
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# The classic alternative: one asyncio.Queue per subscriber.


@pytest.mark.benchmark(group="asyncio.Queue fan-out")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_queue_fanout(benchmark, pedantic, loop, chunks, make_sinks, record_rate, subs):
    def setup():
        return ([(asyncio.Queue(), s.handler) for s in make_sinks(subs)],), {}

    async def flood(pairs):
        tasks = start_consumers(consume_queue, pairs)
        await sleep(0)
        await queue_flood([q for q, _ in pairs], tasks, chunks)

    def target(pairs):
        loop.run_until_complete(flood(pairs))

    pedantic(target, setup)
    make_sinks.check(sum(map(len, chunks)))
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


def run_handler(sub, async_handler):
    """The compiled pump the scheduler runs for a coroutine handler."""
    return sub.run_handler(async_handler, pump_error)


@pytest.mark.benchmark(group="async handler")
@pytest.mark.parametrize("via", ["async_for_await", "run_handler"])
@pytest.mark.parametrize("subs", [1, 4])
def test_async_handler(benchmark, pedantic, loop, chunks, make_bus, make_sinks, key, record_rate, subs, via):
    consume = run_handler if via == "run_handler" else consume_awaiting

    def setup():
        bus = make_bus()
        bus.bind_loop(loop)
        return (bus, [(bus.subscribe(key), make_async_handler(s)) for s in make_sinks(subs)]), {}

    pedantic(pull_round(loop, consume, key, chunks), setup)
    make_sinks.check(sum(map(len, chunks)))
    record_rate(benchmark)


# ---------------------------------------------------------------------------------------------------------------
# LAG (overwrite the oldest, report the lag) vs BLOCK (the publisher waits for the slowest subscriber).


@pytest.mark.benchmark(group="LAG vs BLOCK")
@pytest.mark.parametrize("overflow", ["lag", "block"])
@pytest.mark.parametrize("path", ["push", "pull"])
@pytest.mark.parametrize("subs", [1, 4])
def test_overflow(
    benchmark, pedantic, loop, chunks, make_bus, make_sinks, key, record_rate, subs, path, overflow
):
    """The same flood on a LAG and on a BLOCK channel; BLOCK pays the slowest-cursor bookkeeping."""

    def setup():
        bus = make_bus(overflow=overflow)
        bus.bind_loop(loop)
        sinks = make_sinks(subs)
        if path == "push":
            return (bus, [bus.subscribe(key, s.handler) for s in sinks], []), {}
        return (bus, [], [(bus.subscribe(key), s.handler) for s in sinks]), {}

    async def flood(bus, push_subs, pull_pairs):
        tasks = start_consumers(consume_iter, pull_pairs)
        await sleep(0)
        # channel.publish on both: a chunk fits the ring and is consumed before the next, so a BLOCK channel
        # is never full here and the difference is BLOCK's bookkeeping (slowest cursor, waiter checks).
        await push_flood(bus.channel(key).publish, push_subs, chunks)
        await close_and_join(bus, tasks)

    def target(bus, push_subs, pull_pairs):
        loop.run_until_complete(flood(bus, push_subs, pull_pairs))

    pedantic(target, setup)
    make_sinks.check(sum(map(len, chunks)))
    record_rate(benchmark)
