"""Broker faults: nats-server killed mid-stream and restarted on the same port and store.

* JetStream: zero loss, and no handler sees an event twice (redeliveries and resends are dropped by sequence).
* Core NATS: what was lost shows as a gap in the sender's sequence, counted and logged; nothing else is lost
  (delivered + missing == sent), and what arrives is in order.
* While the broker is away the exporter's buffer follows its policy: DROP_OLDEST counts what it drops (and
  receivers learn it from the Kimiha-Lost header); BLOCK holds the channel's publishers back, losing nothing.

Each test has its own server (it gets killed). In the crash tests the receiver reconnects on a slow backoff, so
that the sender is back first and sends while the receiver is still away: the harshest order for both modes.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from kimiha import ChannelConfig, ChannelFull, Event, EventBus, EventTask, EventType, Overflow, Scheduler
from kimiha.bridge import Backoff, BufferPolicy, Delivery, NatsBridge, NatsServer

pytest.importorskip("nats")

WAIT = 20.0  # bound of every condition wait (a hang guard, never a speed assertion)


class Ev(EventType):
    MD = "MD"


class Tick(Event, frozen=True):
    seq: int
    price: float


def md(i: int) -> Tick:
    return Tick(i, 100.0 + i)


def make_bus(overflow: Overflow = Overflow.BLOCK, capacity: int = 1024) -> EventBus:
    return EventBus([(Ev.MD, ChannelConfig(capacity, payload_type=Tick, overflow=overflow))])


class Collect(EventTask):
    def __init__(self) -> None:
        self.events: list[Tick] = []

    def subscribed_event(self) -> Ev:
        return Ev.MD

    def handle_event(self, event: Tick) -> None:
        self.events.append(event)


async def until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    """Wait for ``predicate()`` by yielding to the loop; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.001)


#: The receiver's reconnect delay: long enough for the sender to be back and to have flushed first.
RECEIVER_HOLD_OFF = 2.0


@pytest.fixture
def server():
    with NatsServer() as srv:
        yield srv


async def pair(url: str, delivery: Delivery, *, export_kw=None, capacity: int = 1024, import_kw=None,
               hold_off: float = 0.05):
    a, b = make_bus(capacity=capacity), make_bus()
    sa, sb = Scheduler(a, name="sender"), Scheduler(b, name="receiver")
    ba = NatsBridge(a, url, name="sender")
    ba.export_channel(Ev.MD, "fault.md", delivery=delivery, **(export_kw or {}))
    bb = NatsBridge(b, url, name="receiver", backoff=Backoff(initial=hold_off, max=hold_off, jitter=0.0))
    bb.import_channel(Ev.MD, "fault.md", delivery=delivery, **(import_kw or {}))
    collect = Collect()
    sb.register_event_task(collect)
    bb.register(sb)
    ba.register(sa)
    await sb.start()
    await sa.start()
    return sa, ba, sb, bb, collect


async def kill_mid_stream(server: NatsServer, delivery: Delivery, n: int):
    """Publish n events; kill the broker once a quarter arrived, restart it once half were published."""
    import_kw = {"ack_wait": 1.0} if delivery is Delivery.JETSTREAM else {}
    sa, ba, sb, bb, collect = await pair(server.url, delivery, export_kw={"buffer": n}, import_kw=import_kw,
                                         hold_off=RECEIVER_HOLD_OFF)
    exporter, importer = ba.exporter(Ev.MD), bb.importer(Ev.MD)
    try:
        for i in range(1, n + 1):
            await sa.bus.publish_async(Ev.MD, md(i))
            if i % 25 == 0:
                await asyncio.sleep(0)  # let the bridge move events while we publish
            if i == n // 4:
                await until(lambda: len(collect.events) >= n // 8, what="events flowing before the kill")
                server.kill()
                await until(lambda: not ba.link.up and not bb.link.up, what="both links down")
            if i == n // 2:
                await asyncio.to_thread(server.start)
                await until(lambda: ba.link.up and exporter.pending == 0, what="the sender back and flushed")
                assert not bb.link.up, "precondition: the receiver reconnects after the sender has sent"
        assert await ba.flush(WAIT)
        await until(lambda: bb.link.up, what="the receiver back")
        # publish a tail once the receiver is back, so a core-NATS hole is followed by what reveals it
        for i in range(n + 1, n + 51):
            await sa.bus.publish_async(Ev.MD, md(i))
        assert await ba.flush(WAIT)
        assert await importer.wait_position(exporter.sender, n + 50, WAIT)
        await until(lambda: len(collect.events) == importer.delivered, what="handlers caught up")
    finally:
        await sa.shutdown()
        await sb.shutdown()
    return ba, bb, exporter, importer, [e.seq for e in collect.events]


def test_jetstream_survives_a_broker_crash_without_loss_or_duplicates(run, server):
    n = 2000

    async def main():
        ba, bb, exporter, importer, seen = await kill_mid_stream(server, Delivery.JETSTREAM, n)
        assert seen == list(range(1, n + 51))  # every event, once, in order
        s = importer.stats()
        assert s["missing"] == 0 and s["held"] == 0 and s["lost_at_senders"] == 0
        assert ba.link.reconnects == 1 and bb.link.reconnects == 1
        assert exporter.stats()["acked"] == n + 50 and exporter.stats()["unflushed"] == 0
        # the events travelled in batches (25 published per yield): resent and deduplicated as units
        assert exporter.stats()["batches"] > 0 and s["batches"] > 0, (exporter.stats(), s)

    run(main())


def test_core_nats_loss_is_detected_from_the_sequence_and_reported(run, server, caplog):
    n = 2000

    async def main():
        ba, _, exporter, importer, seen = await kill_mid_stream(server, Delivery.CORE, n)
        s = importer.stats()
        assert s["missing"] > 0 and s["gaps"] >= 1, s  # the sender sent while the receiver was away
        assert seen == sorted(set(seen))                # in order, no duplicates
        assert len(seen) + s["missing"] == n + 50       # everything accounted for: delivered or missing
        assert seen[-50:] == list(range(n + 1, n + 51))
        assert s["senders"][exporter.sender]["missing"] == s["missing"]
        assert ba.stats()["link"]["reconnects"] == 1

    with caplog.at_level(logging.WARNING, logger="kimiha.bridge"):
        run(main())
    assert any("missing before sequence" in r.getMessage() for r in caplog.records)


def test_drop_oldest_while_the_broker_is_away_is_counted_end_to_end(run, server):
    async def main():
        sa, ba, sb, bb, collect = await pair(
            server.url, Delivery.JETSTREAM, export_kw={"buffer": 100, "when_full": BufferPolicy.DROP_OLDEST})
        exporter, importer = ba.exporter(Ev.MD), bb.importer(Ev.MD)
        try:
            for i in range(1, 11):
                await sa.bus.publish_async(Ev.MD, md(i))
            assert await importer.wait_position(exporter.sender, 10, WAIT)
            server.kill()
            await until(lambda: not ba.link.up, what="the sender's link down")
            for i in range(11, 511):  # 500 events while away, into a buffer of 100
                await sa.bus.publish_async(Ev.MD, md(i))
            await until(lambda: exporter.stats()["buffered"] == 100 and sa.bus.channel(Ev.MD).stats()["backlog"] == 0,
                        what="the buffer full, the ring read")
            assert exporter.dropped == 400
            await asyncio.to_thread(server.start)
            assert await ba.flush(WAIT)
            assert await importer.wait_position(exporter.sender, exporter.last_seq, WAIT)
            await until(lambda: len(collect.events) == 110, what="handlers caught up")
        finally:
            await sa.shutdown()
            await sb.shutdown()
        seen = [e.seq for e in collect.events]
        assert seen == list(range(1, 11)) + list(range(411, 511))  # the oldest 400 of the outage dropped
        assert importer.lost_at_senders == 400 and importer.missing == 0

    run(main())


def test_block_policy_holds_publishers_back_while_the_broker_is_away(run, server):
    async def main():
        sa, ba, sb, bb, collect = await pair(server.url, Delivery.JETSTREAM, capacity=64,
                                             export_kw={"buffer": 100, "when_full": BufferPolicy.BLOCK})
        exporter, importer = ba.exporter(Ev.MD), bb.importer(Ev.MD)
        try:
            server.kill()
            await until(lambda: not ba.link.up, what="the sender's link down")
            accepted = 0
            with pytest.raises(ChannelFull):
                for i in range(1, 10_000):
                    sa.bus.publish(Ev.MD, md(i))  # never waits: raises once ring and buffer are full
                    accepted = i
                    await asyncio.sleep(0)
            assert 100 <= accepted <= 100 + 64
            assert exporter.dropped == 0 and exporter.stats()["buffered"] == 100
            await asyncio.to_thread(server.start)
            for i in range(accepted + 1, accepted + 201):
                await sa.bus.publish_async(Ev.MD, md(i))  # waits for room: the link is back
            assert await ba.flush(WAIT)
            assert await importer.wait_position(exporter.sender, accepted + 200, WAIT)
            await until(lambda: len(collect.events) == accepted + 200, what="handlers caught up")
        finally:
            await sa.shutdown()
            await sb.shutdown()
        assert [e.seq for e in collect.events] == list(range(1, accepted + 201))
        assert importer.missing == 0 and importer.lost_at_senders == 0

    run(main())


def test_lagging_exporter_on_a_lag_channel_reports_the_loss(run, server):
    """On a LAG channel a stalled exporter is overwritten; the loss is counted and told to receivers."""

    async def main():
        a, b = make_bus(Overflow.LAG, capacity=16), make_bus()
        sa, sb = Scheduler(a), Scheduler(b)
        ba = NatsBridge(a, server.url, name="lagger")
        exporter = ba.export_channel(Ev.MD, "lag.md", delivery=Delivery.JETSTREAM, buffer=10)
        bb = NatsBridge(b, server.url, name="lag-receiver")
        importer = bb.import_channel(Ev.MD, "lag.md", delivery=Delivery.JETSTREAM)
        ba.register(sa)
        bb.register(sb)
        await sb.start()
        await sa.start()
        try:
            server.kill()
            await until(lambda: not ba.link.up, what="link down")
            for i in range(1, 201):
                a.publish(Ev.MD, md(i))  # LAG: never blocks
            await asyncio.to_thread(server.start)
            a.publish(Ev.MD, md(201))
            assert await ba.flush(WAIT)
            assert await importer.wait_position(exporter.sender, exporter.last_seq, WAIT)
        finally:
            await sa.shutdown()
            await sb.shutdown()
        assert exporter.lagged > 0 and exporter.last_seq + exporter.lost == 201
        assert importer.lost_at_senders == exporter.lost

    run(main())
