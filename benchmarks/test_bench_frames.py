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

import msgspec
import pytest

from kimiha.bench.cases import push_flood

#: Timed rounds of the baselines (no setup: each round calls the same handlers again).
ROUNDS = 15
SUBSCRIBERS = [1, 4]


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
def test_encode_shared_frame(benchmark, pedantic, loop, chunks, make_bus, key, record_rate, subs):
    n = sum(map(len, chunks))
    rounds = []

    def setup():
        bus = make_bus()
        bus.bind_loop(loop)
        sinks = [frame_sink() for _ in range(subs)]
        rounds.append([state for _, state in sinks])
        return (bus.channel(key).publish, [bus.subscribe(key, h, frames=True) for h, _ in sinks]), {}

    def target(publish, subscriptions):
        loop.run_until_complete(push_flood(publish, subscriptions, chunks))

    pedantic(target, setup)
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
def test_publish_raw_decode_once(
    benchmark, pedantic, loop, frames, frame_chunks, make_bus, make_sinks, key, record_rate, subs
):
    def setup():
        bus = make_bus()
        bus.bind_loop(loop)
        return (bus.channel(key).publish_raw, [bus.subscribe(key, s.handler) for s in make_sinks(subs)]), {}

    def target(publish_raw, subscriptions):
        loop.run_until_complete(push_flood(publish_raw, subscriptions, frame_chunks))

    pedantic(target, setup)
    make_sinks.check(len(frames))
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
