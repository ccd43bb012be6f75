"""The building blocks of the throughput cases: the events, the handler, the bus, each way to deliver a flood.

``kimiha bench compare`` times them in one process run, the pytest-benchmark suites in ``benchmarks/`` round
by round; both take them from here, so that a case means the same thing in both. The flood functions run the
part that is timed: whoever calls them builds the bus, the subscriptions and the consumer tasks beforehand and
checks the handlers afterwards.

* The events: ``make_events`` builds ``Tick``s with sequence numbers ``0..n-1`` and seeded random prices,
  ``chunked`` cuts them into the chunks a producer publishes between two yields to the loop.
* The handler: a :class:`Sink` counts the events it is handed and keeps the last ``seq``; a
  :class:`SinkTask` is the same as an ``EventTask`` (what the README teaches), run by a ``Scheduler``.
* The bus: ``new_bus`` holds one channel, ``Ev.MD``, typed ``Tick`` (LAG unless told otherwise).
* The floods: ``call_direct`` (no bus: the floor), ``idiom_flood`` (``bus.publish(Ev.MD, e)`` as the README
  writes it, into whatever subscribed), ``push_flood`` (a hoisted ``channel.publish`` into handler
  subscriptions, called by the compiled dispatch loop), ``pull_flood`` (one consumer task per pull subscription, see ``consume_iter`` and
  ``consume_batch``), ``queue_flood`` (one ``asyncio.Queue`` per subscriber, see ``consume_queue``).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, TypeVar

import kimiha
from kimiha import ChannelClosed, ChannelConfig, Dispatch, Event, EventBus, EventTask, EventType, Overflow

__all__ = [
    "SEED",
    "Ev",
    "Sink",
    "SinkTask",
    "Tick",
    "call_direct",
    "chunked",
    "close_and_join",
    "consume_batch",
    "consume_batches",
    "idiom_flood",
    "publish_idiom",
    "consume_iter",
    "consume_queue",
    "make_events",
    "new_bus",
    "publish_chunks",
    "pull_flood",
    "push_flood",
    "queue_flood",
    "start_consumers",
    "stop_queues",
]

SEED = 20240601

Handler = Callable[[Any], None]
T = TypeVar("T")


class Ev(EventType):
    MD = "MarketData"


class Tick(Event, frozen=True):
    price: float
    seq: int


# ---------------------------------------------------------------------------------------------------------------
# Data, the one handler every case uses, the bus.


def make_events(n: int, seed: int = SEED) -> list[Tick]:
    """Return ``n`` ticks with sequence numbers ``0..n-1`` and seeded random prices."""
    rng = random.Random(seed)
    return [Tick(price=round(100.0 + rng.gauss(0.0, 1.0), 4), seq=i) for i in range(n)]


def chunked(items: list[T], size: int) -> list[list[T]]:
    """Cut ``items`` into consecutive slices of ``size`` (the last one shorter)."""
    return [items[i : i + size] for i in range(0, len(items), size)]


class Sink:
    """The trivial handler every case uses: ``handler`` counts the event and reads one attribute (``seq``);
    ``seen()`` returns ``(count, last seq)``."""

    __slots__ = ("handler", "seen")

    def __init__(self) -> None:
        count = 0
        last = -1

        def handler(event: Tick) -> None:
            nonlocal count, last
            count += 1
            last = event.seq

        def seen() -> tuple[int, int]:
            return count, last

        self.handler: Callable[[Tick], None] = handler
        self.seen: Callable[[], tuple[int, int]] = seen

    def problem(self, n: int) -> str | None:
        """Say what is wrong unless the handler saw exactly ``n`` events, the last one last; else ``None``."""
        count, last = self.seen()
        if count == n and last == n - 1:
            return None
        return f"saw {count} events (last seq {last}), expected {n} (last {n - 1})"

    def check(self, n: int) -> None:
        """Assert that the handler saw exactly ``n`` events, the last one last."""
        problem = self.problem(n)
        assert problem is None, f"handler {problem}"


class SinkTask(EventTask):
    """The same trivial handler as an ``EventTask`` of ``Ev.MD``: ``handle_event`` counts the event and keeps
    its ``seq``. Every case of ``kimiha bench compare`` calls this method, the floor and the other libraries
    included, so that the handler costs the same everywhere."""

    def __init__(self) -> None:
        self.count = 0
        self.last = -1

    def subscribed_event(self) -> Ev:
        return Ev.MD

    def handle_event(self, event: Tick) -> None:
        self.count += 1
        self.last = event.seq

    def problem(self, n: int) -> str | None:
        """Say what is wrong unless the task saw exactly ``n`` events, the last one last; else ``None``."""
        if self.count == n and self.last == n - 1:
            return None
        return f"saw {self.count} events (last seq {self.last}), expected {n} (last {n - 1})"


def new_bus(
    capacity: int,
    track_latency: bool = True,
    overflow: Overflow | str = Overflow.LAG,
    *,
    payload_type: type[Event] = Tick,
    dispatch: Dispatch = Dispatch.LOOP,
) -> EventBus:
    """Return a bus with one channel, ``Ev.MD``, of ``capacity`` slots typed ``payload_type``."""
    config = ChannelConfig(
        capacity,
        payload_type=payload_type,
        track_latency=track_latency,
        overflow=Overflow(overflow),
        dispatch=dispatch,
    )
    return EventBus([(Ev.MD, config)])


# ---------------------------------------------------------------------------------------------------------------
# The floods: the timed part of each case.


def call_direct(events: Iterable[Any], handlers: Sequence[Handler]) -> None:
    """The floor: the producer calls every handler itself, ``for e in events: h(e)``."""
    if len(handlers) == 1:
        (h,) = handlers
        for e in events:
            h(e)
    elif len(handlers) == 4:
        h0, h1, h2, h3 = handlers
        for e in events:
            h0(e)
            h1(e)
            h2(e)
            h3(e)
    else:
        for e in events:
            for h in handlers:
                h(e)


async def publish_chunks(publish: Callable[[Any], Any], chunks: Iterable[Iterable[Any]]) -> None:
    """Publish every event, yielding to the loop after each chunk so that the subscribers run."""
    sleep = asyncio.sleep
    for chunk in chunks:
        for e in chunk:
            publish(e)
        await sleep(0)


async def publish_idiom(bus: EventBus, chunks: Iterable[Iterable[Any]]) -> None:
    """Publish every event as the README writes it, ``bus.publish(Ev.MD, e)``, yielding after each chunk."""
    sleep = asyncio.sleep
    for chunk in chunks:
        for e in chunk:
            bus.publish(Ev.MD, e)
        await sleep(0)


async def idiom_flood(
    bus: EventBus, subscriptions: Iterable[kimiha.Subscription], chunks: Iterable[Iterable[Any]]
) -> None:
    """``publish_idiom`` into handler subscriptions (EventTasks); wait until every handler was handed all."""
    await publish_idiom(bus, chunks)
    while any(s.backlog for s in subscriptions):
        await asyncio.sleep(0)


async def push_flood(
    publish: Callable[[Any], Any],
    subscriptions: Iterable[kimiha.Subscription],
    chunks: Iterable[Iterable[Any]],
) -> None:
    """Publish the chunks to handler subscriptions; wait until the dispatch loop has handed them all."""
    await publish_chunks(publish, chunks)
    # Normally nothing is left: a chunk is at most one dispatch budget. Waiting on the backlog rather than on
    # the handlers' counts cannot hang if events were lost; the counts are checked afterwards.
    while any(s.backlog for s in subscriptions):
        await asyncio.sleep(0)


async def consume_iter(sub: kimiha.Subscription, h: Handler) -> None:
    async for ev in sub:
        h(ev)


async def consume_batch(sub: kimiha.Subscription, h: Handler) -> None:
    recv_batch = sub.recv_batch
    try:
        while True:
            for ev in await recv_batch():
                h(ev)
    except ChannelClosed:
        pass


async def consume_batches(sub: kimiha.Subscription, h: Handler) -> None:
    async for batch in sub.batches():
        for ev in batch:
            h(ev)


def start_consumers(
    consume: Callable[[Any, Any], Coroutine[Any, Any, None]], pairs: Iterable[tuple[Any, Any]]
) -> list[asyncio.Task[None]]:
    """Start a consumer task ``consume(source, handler)`` per pair (a subscription or a queue, a handler)."""
    return [asyncio.create_task(consume(source, h)) for source, h in pairs]


async def close_and_join(bus: EventBus, tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Close the bus and wait for the consumers: they receive everything published, then their loops end."""
    bus.close()
    for t in tasks:
        await t


async def pull_flood(
    publish: Callable[[Any], Any],
    bus: EventBus,
    tasks: Iterable[asyncio.Task[Any]],
    chunks: Iterable[Iterable[Any]],
) -> None:
    """Publish the chunks to pull subscriptions read by ``tasks`` (started and parked beforehand), then close
    ``bus`` and wait for the tasks."""
    await publish_chunks(publish, chunks)
    await close_and_join(bus, tasks)


async def consume_queue(q: asyncio.Queue[Any], h: Handler) -> None:
    get = q.get
    while True:
        ev = await get()
        if ev is None:
            return
        h(ev)


async def stop_queues(queues: Iterable[asyncio.Queue[Any]], tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Send each queue the end-of-stream sentinel (the idiomatic way to stop a queue consumer); join them."""
    for q in queues:
        q.put_nowait(None)
    for t in tasks:
        await t


async def queue_flood(
    queues: Sequence[asyncio.Queue[Any]], tasks: Iterable[asyncio.Task[Any]], chunks: Iterable[Iterable[Any]]
) -> None:
    """Put every event on every queue (read by ``tasks``, started and parked beforehand), yielding to the loop
    after each chunk; then stop the consumers."""
    sleep = asyncio.sleep
    if len(queues) == 1:
        put = queues[0].put_nowait
        for chunk in chunks:
            for e in chunk:
                put(e)
            await sleep(0)
    elif len(queues) == 4:
        p0, p1, p2, p3 = [q.put_nowait for q in queues]
        for chunk in chunks:
            for e in chunk:
                p0(e)
                p1(e)
                p2(e)
                p3(e)
            await sleep(0)
    else:
        puts = [q.put_nowait for q in queues]
        for chunk in chunks:
            for e in chunk:
                for put in puts:
                    put(e)
            await sleep(0)
    await stop_queues(queues, tasks)
