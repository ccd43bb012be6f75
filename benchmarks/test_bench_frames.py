"""pytest-benchmark suites of kimiha's frames: encode once at the first frame request, decode once at publish_raw.

* **encode**: objects published to subscribers that asked for frames (``subscribe(key, h, frames=True)`` hands
  ``(seq, publish_ns, frame)``): the first subscriber to reach a slot encodes it with the channel's reused
  encoder, the others get the same bytes. The baseline calls the same handlers directly (no bus, no loop) and
  encodes once per subscriber, as a bus without a shared frame would.
* **decode once**: frames from outside (a bridge, a journal) published with ``publish_raw``: decoded once,
  validated against the channel's payload type, and the decoded object shared by every object subscriber.
  The baseline calls the same handlers directly and decodes once per subscriber.

Run: ``python -m pytest benchmarks/test_bench_frames.py -q --benchmark-only``.
"""

from __future__ import annotations

import asyncio
import gc

import msgspec
import pytest

ROUNDS = 15
WARMUP_ROUNDS = 2
SUBSCRIBERS = [1, 4]

sleep = asyncio.sleep


def pedantic(benchmark, target, setup):  # type: ignore[no-untyped-def]
    def fresh():  # type: ignore[no-untyped-def]
        gc.collect()
        return setup()

    benchmark.pedantic(target, setup=fresh, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)


def frame_sink():  # type: ignore[no-untyped-def]
    """A frames=True handler: count deliveries, keep the last sequence number and the total frame bytes."""
    state = {"count": 0, "last": -1, "bytes": 0}

    def handler(item):  # type: ignore[no-untyped-def]
        seq, _publish_ns, frame = item
        state["count"] += 1
        state["last"] = seq
        state["bytes"] += len(frame)

    return handler, state


@pytest.mark.benchmark(group="frames: encode once")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_encode_shared_frame(benchmark, loop, chunks, make_bus, key, record_rate, subs):
    n = sum(map(len, chunks))
    rounds = []

    def setup():
        bus = make_bus()
        bus.bind_loop(loop)
        sinks = [frame_sink() for _ in range(subs)]
        rounds.append([state for _, state in sinks])
        return (bus.channel(key).publish, [bus.subscribe(key, h, frames=True) for h, _ in sinks]), {}

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
    for states in rounds:
        for state in states:
            assert (state["count"], state["last"]) == (n, n - 1), state
        assert len({state["bytes"] for state in states}) == 1
    record_rate(benchmark)


@pytest.mark.benchmark(group="frames: encode once")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_encode_per_subscriber_baseline(benchmark, events, record_rate, subs):
    """What kimiha saves: the same handlers called directly, each event encoded once per subscriber (no bus)."""
    encode = msgspec.msgpack.Encoder().encode
    sinks = [frame_sink() for _ in range(subs)]
    handlers = [h for h, _ in sinks]

    def target():
        for e in events:
            for h in handlers:
                h((e.seq, 0, encode(e)))

    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    n = len(events)
    for _, state in sinks:
        assert state["count"] > 0 and state["count"] % n == 0 and state["last"] == n - 1, state
    record_rate(benchmark)


@pytest.mark.benchmark(group="frames: decode once")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_publish_raw_decode_once(benchmark, loop, frames, make_bus, make_sinks, key, record_rate, subs):
    chunked = [frames[i : i + 1024] for i in range(0, len(frames), 1024)]
    rounds = []

    def setup():
        bus = make_bus()
        bus.bind_loop(loop)
        sinks = make_sinks(subs)
        rounds.append(sinks)
        return (bus, [bus.subscribe(key, s.handler) for s in sinks]), {}

    async def flood(bus, subscriptions):
        publish_raw = bus.channel(key).publish_raw
        for chunk in chunked:
            for frame in chunk:
                publish_raw(frame)
            await sleep(0)
        while any(s.backlog for s in subscriptions):
            await sleep(0)

    def target(bus, subscriptions):
        loop.run_until_complete(flood(bus, subscriptions))

    pedantic(benchmark, target, setup)
    for sinks in rounds:
        for sink in sinks:
            sink.check(len(frames))
    record_rate(benchmark, len(frames))


@pytest.mark.benchmark(group="frames: decode once")
@pytest.mark.parametrize("subs", SUBSCRIBERS)
def test_decode_per_subscriber_baseline(benchmark, frames, tick_type, make_sinks, record_rate, subs):
    """What kimiha saves: every subscriber decoding (and validating) the frame itself (no bus, no loop)."""
    decode = msgspec.msgpack.Decoder(tick_type).decode
    sinks = make_sinks(subs)
    handlers = [s.handler for s in sinks]

    def target():
        for frame in frames:
            for h in handlers:
                h(decode(frame))

    benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    for sink in sinks:
        count, last = sink.seen()
        assert count > 0 and count % len(frames) == 0 and last == len(frames) - 1  # one run when disabled
    record_rate(benchmark, len(frames))
