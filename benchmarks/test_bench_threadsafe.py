"""pytest-benchmark suite of thread-safe publishing: a feed thread outside the loop, a handler on the loop.

A thread publishes ``EVENTS`` events with ``channel.publish_threadsafe`` to a BLOCK channel (its queue of
cross-thread payloads is bounded by the capacity, so the thread waits instead of losing events) while the loop
dispatches them to the handler; one round ends when the handler has seen the last event. The baseline is the
asyncio primitive for the same hop: ``loop.call_soon_threadsafe(handler, event)`` per event.

Run: ``python -m pytest benchmarks/test_bench_threadsafe.py -q --benchmark-only``.
"""

from __future__ import annotations

import asyncio
import threading

import pytest


@pytest.mark.benchmark(group="thread-safe publish")
@pytest.mark.parametrize("via", ["kimiha publish_threadsafe", "loop.call_soon_threadsafe"])
def test_threadsafe_publish(benchmark, pedantic, loop, events, make_bus, make_sinks, key, record_rate, via):
    n = len(events)

    def setup():  # type: ignore[no-untyped-def]
        (sink,) = make_sinks(1)
        finished = threading.Event()
        count = sink.handler

        def handler(event):  # type: ignore[no-untyped-def]
            count(event)
            if event.seq == n - 1:
                finished.set()

        if via == "kimiha publish_threadsafe":
            bus = make_bus(overflow="block")
            bus.bind_loop(loop)
            bus.subscribe(key, handler)
            publish = bus.channel(key).publish_threadsafe
        else:
            call_soon_threadsafe = loop.call_soon_threadsafe

            def publish(event):  # type: ignore[no-untyped-def]
                call_soon_threadsafe(handler, event)

        return (publish, finished), {}

    async def wait_for(finished: threading.Event) -> None:
        while not finished.is_set():
            await asyncio.sleep(0)

    def target(publish, finished):  # type: ignore[no-untyped-def]
        def feed() -> None:
            for e in events:
                publish(e)

        thread = threading.Thread(target=feed, name="feed")
        thread.start()
        loop.run_until_complete(wait_for(finished))
        thread.join()

    pedantic(target, setup)
    make_sinks.check(n)
    record_rate(benchmark)
