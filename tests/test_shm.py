"""The shared-memory transport (kimiha.bridge.shm over the compiled kimiha.bridge._shm ring).

In one process: round trips through BLOCK and LAG rings with several readers, exact lag accounting, bad
frames, the wake-up after idling, cleanup. Across processes (tests/shm_child.py): a reader killed mid-stream
(the BLOCK writer goes on), a writer killed mid-stream (what it wrote is read, a new writer takes the ring
over), and a durable reader started again (resumes exactly where it stopped).
"""

from __future__ import annotations

import asyncio
import errno
import json
import mmap
import os
import pathlib
import signal
import struct
import subprocess
import sys
import threading

import msgspec
import pytest

from kimiha import (ChannelConfig, Dispatch, Event, EventBus, EventTask, EventType, InvalidConfigurationError,
                    Overflow, Scheduler)
from kimiha.error import SerializationError
from kimiha.bridge import ShmBridge, open_bridge, remove_stale
from kimiha.bridge import _shm

WAIT = 20.0  # bound of every condition wait (a hang guard, never a speed assertion)
CHILD = pathlib.Path(__file__).with_name("shm_child.py")


class Ev(EventType):
    MD = "MD"


class Tick(Event, frozen=True):
    seq: int
    price: float


def md(i: int) -> Tick:
    return Tick(i, 100.0 + i)


def make_bus(overflow: Overflow = Overflow.BLOCK, capacity: int = 256, dispatch: Dispatch = Dispatch.LOOP) -> EventBus:
    return EventBus([(Ev.MD, ChannelConfig(capacity, payload_type=Tick, overflow=overflow, dispatch=dispatch))])


class Collect(EventTask):
    def __init__(self) -> None:
        self.seqs: list[int] = []

    def subscribed_event(self) -> Ev:
        return Ev.MD

    def handle_event(self, event: Tick) -> None:
        self.seqs.append(event.seq)


async def until(predicate, timeout: float = WAIT, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.002)


class Node:
    """One 'process' (bus, scheduler, shm bridge) inside the test's own."""

    def __init__(self, directory, name: str, overflow: Overflow = Overflow.BLOCK,
                 dispatch: Dispatch = Dispatch.LOOP) -> None:
        self.bus = make_bus(overflow, dispatch=dispatch)
        self.scheduler = Scheduler(self.bus, name=name)
        self.bridge = ShmBridge(self.bus, directory, name=name, liveness_interval=0.05)
        self.collect = Collect()

    def reader(self, subject: str, **kw):
        importer = self.bridge.import_channel(Ev.MD, subject, **kw)
        self.scheduler.register_event_task(self.collect)
        return importer

    async def start(self):
        self.bridge.register(self.scheduler)
        await self.scheduler.start()
        return self

    async def stop(self) -> None:
        await self.scheduler.shutdown()


# -- the ring itself ----------------------------------------------------------------------------------------------


def ring(capacity=16, data=4096, readers=2, block=False):
    buf = mmap.mmap(-1, _shm.segment_size(capacity, data, readers))
    _shm.init_segment(buf, capacity, data, readers, block)
    return _shm.Ring(buf)


def items(lo, hi, size=8):
    return [(i, 1000 + i, i.to_bytes(4, "little") * (size // 4)) for i in range(lo, hi)]


def test_lag_ring_counts_exactly_what_was_overwritten():
    r = ring(capacity=16, data=4096)
    r.attach(0, os.getpid(), 0, "")
    assert r.write(items(0, 100)) == 100  # LAG: never waits
    frames, cursor, lagged, holes = r.read(0, 0, 1000)
    assert (lagged, cursor, len(frames)) == (84, 100, 16)
    assert frames == [(1000 + i, i.to_bytes(4, "little") * 2) for i in range(84, 100)]


def test_lag_ring_data_overwrite_is_detected_not_delivered_torn():
    # 64 slots but 4 KiB of data: frames of 1000 bytes overwrite each other's bytes long before their slots
    r = ring(capacity=64, data=4096)
    r.attach(0, os.getpid(), 0, "")
    assert r.write(items(0, 40, size=1000)) == 40
    frames, cursor, lagged, holes = r.read(0, 0, 1000)
    assert lagged + len(frames) == 40 and cursor == 40 and len(frames) <= 4
    start = 40 - len(frames)
    assert frames == [(1000 + i, i.to_bytes(4, "little") * 250) for i in range(start, 40)]


def test_block_ring_never_overwrites_an_attached_reader():
    r = ring(capacity=16, data=4096, block=True)
    r.attach(0, os.getpid(), 0, "")
    assert r.write(items(0, 100)) == 16
    assert r.write(items(0, 100), 16) == 0  # full until the reader moves
    frames, cursor, lagged, holes = r.read(0, 0, 10)
    assert (len(frames), cursor, lagged) == (10, 10, 0)
    r.set_writer_waiting()
    assert r.commit(0, cursor) is True  # the writer sleeps: the reader must wake it
    assert r.write(items(0, 100), 16) == 10
    r.detach(0)  # a detached (dead) reader no longer holds the writer back
    assert r.write(items(0, 100), 26) == 74


def test_sleeping_reader_is_found_by_the_writer():
    r = ring()
    r.attach(1, os.getpid(), 0, "")
    assert r.sleep_if_idle(1, 0) is True
    r.write(items(0, 1))
    assert r.take_waiting() == [1] and r.take_waiting() == []
    assert r.sleep_if_idle(1, 0) is False  # a frame is there: no sleep


def test_not_a_segment_is_refused():
    with pytest.raises(ValueError, match="magic"):
        _shm.Ring(bytearray(8192))
    with pytest.raises(ValueError, match="powers of two"):
        _shm.init_segment(bytearray(1 << 16), 10, 4096, 1, True)


def slot_at(r, readers, idx):
    return _shm.HEADER_SIZE + readers * _shm.READER_SIZE + idx * _shm.SLOT_SIZE


def test_a_corrupt_slot_is_never_copied_past_the_data_area():
    # another process scribbles on a published slot: an offset near the end of the data area and a length
    # that is legal on its own (a quarter of it); the reader must drop the frame, not copy past the segment
    buf = mmap.mmap(-1, _shm.segment_size(16, 1 << 16, 1))
    _shm.init_segment(buf, 16, 1 << 16, 1, False)
    r = _shm.Ring(buf)
    r.attach(0, os.getpid(), 0, "")
    assert r.write(items(0, 2)) == 2
    at = slot_at(r, 1, 0)
    seq, ts, _, _ = struct.unpack_from("<QqQQ", buf, at)
    bad_off = (1 << 16) - 8
    struct.pack_into("<QqQQ", buf, at, seq, ts, bad_off, r.max_frame)
    struct.pack_into("<Q", buf, 576, bad_off + 8)  # a data head that passes the seqlock recheck (both slots)
    frames, cursor, lagged, holes = r.read(0, 0, 10)
    assert all(len(f) == 8 for _, f in frames), [len(f) for _, f in frames]
    assert (cursor, lagged, holes) == (2, 1, [])  # dropped and counted; the reader goes on
    # the batch import's own loop: the same slot dropped and counted, the next frame copied whole (8 bytes,
    # which the channel then refuses: not msgpack of one value)
    bus = EventBus([(Ev.MD, ChannelConfig(16))])
    cursor, lagged, delivered, holes, failed = r.pump(0, 0, 10, bus.channel(Ev.MD))
    assert (cursor, lagged, delivered, holes) == (1, 1, 0, None)
    assert isinstance(failed[0], SerializationError) and len(failed[2]) == 8, failed


def test_a_corrupt_header_geometry_is_refused_without_overflow():
    buf = mmap.mmap(-1, _shm.segment_size(16, 4096, 1))
    _shm.init_segment(buf, 16, 4096, 1, False)
    struct.pack_into("<Q", buf, 16, 1 << 59)  # capacity * 32 wraps around 2**64 to 0 in the size check
    with pytest.raises(ValueError, match="corrupt geometry"):
        _shm.Ring(buf)


# -- the bridge, in one process ---------------------------------------------------------------------------------


@pytest.mark.parametrize("busy_poll", [False, True])
def test_block_round_trip_to_two_readers_in_order(run, tmp_path, busy_poll):
    n = 5000

    async def main():
        subject = "md.block"
        readers = [Node(tmp_path, f"r{i}") for i in range(2)]
        importers = [node.reader(subject, busy_poll=busy_poll, capacity=64) for node in readers]
        for node in readers:
            await node.start()
        writer = Node(tmp_path, "w")
        exporter = writer.bridge.export_channel(Ev.MD, subject, capacity=64)
        await writer.start()
        try:
            for i in range(1, n + 1):
                await writer.bus.publish_async(Ev.MD, md(i))
            assert await writer.bridge.flush(WAIT)
            for node, importer in zip(readers, importers):
                assert await importer.wait_position(exporter.sender, n, WAIT)
                await until(lambda: len(node.collect.seqs) == n, what="every event handled")
        finally:
            await writer.stop()
            for node in readers:
                await node.stop()
        for node, importer in zip(readers, importers):
            assert node.collect.seqs == list(range(1, n + 1))
            s = importer.stats()
            assert (s["delivered"], s["missing"], s["bad_frames"], s["latency_ns"]["count"]) == (n, 0, 0, n)
        e = exporter.stats()
        assert (e["sent"], e["dropped"], e["lagged"], e["unflushed"]) == (n, 0, 0, 0)
        if not busy_poll:  # busy-polling readers on the writer's own loop read after each of its rounds: the
            # ring need not fill up then (the BLOCK wait itself: this test's wake-up variant and the ring's own)
            assert e["blocked_waits"] > 0  # 5000 through 64 slots: the writer waited for its readers
        assert not (tmp_path / subject).exists()  # the last one out removed the ring's folder

    run(main())


@pytest.mark.parametrize("dispatch", [Dispatch.INLINE, Dispatch.LOOP])
def test_eager_export_round_trip_through_a_small_block_ring_in_order(run, tmp_path, dispatch):
    # eager: each event goes into the ring as it is published; a full ring leaves the rest in the channel
    # (BLOCK holds the publisher), written in order once the readers make room
    n = 3000

    async def main():
        subject = "md.eager"
        reader = Node(tmp_path, "r", dispatch=dispatch)
        importer = reader.reader(subject, busy_poll=True, capacity=64)
        await reader.start()
        writer = Node(tmp_path, "w", dispatch=dispatch)
        exporter = writer.bridge.export_channel(Ev.MD, subject, capacity=64, eager=True)
        await writer.start()
        try:
            for i in range(1, n + 1):
                await writer.bus.publish_async(Ev.MD, md(i))
            assert await writer.bridge.flush(WAIT)
            assert await importer.wait_position(exporter.sender, n, WAIT)
            await until(lambda: len(reader.collect.seqs) == n, what="every event handled")
        finally:
            await writer.stop()
            await reader.stop()
        assert reader.collect.seqs == list(range(1, n + 1))
        s = importer.stats()
        assert (s["delivered"], s["missing"], s["bad_frames"]) == (n, 0, 0)
        e = exporter.stats()
        assert (e["sent"], e["dropped"], e["lagged"], e["unflushed"], e["eager"]) == (n, 0, 0, 0, True)
        if dispatch is Dispatch.INLINE:  # (on LOOP the exporter's own pass may take them first, in a batch)
            assert e["eager_writes"] > 0

    run(main())


def test_eager_export_on_an_inline_channel_writes_the_ring_inside_publish(run, tmp_path):
    # the frame is in the ring when publish returns: no pass of the event loop in between (without eager the
    # exporter writes on its next pass, so the ring's head is still 0 here)
    async def main():
        results = {}
        for eager in (False, True):
            node = Node(tmp_path, f"w{eager}", dispatch=Dispatch.INLINE)
            exporter = node.bridge.export_channel(Ev.MD, f"md.inside.{eager}", eager=eager)
            await node.start()
            try:
                heads = []
                for i in range(1, 4):
                    node.bus.publish(Ev.MD, md(i))
                    heads.append(exporter.last_seq)
                results[eager] = heads
                assert await node.bridge.flush(WAIT)
            finally:
                await node.stop()
        return results

    results = run(main())
    assert results[True] == [1, 2, 3]
    assert results[False] == [0, 0, 0]


def test_eager_export_keeps_the_order_of_events_published_from_another_thread(run, tmp_path):
    # found by the adversarial trial: the exporter's drain freed slots of a full INLINE channel, which let
    # waiting publish_threadsafe payloads in; their publish ran the eager handler inside that drain, which
    # wrote them into the ring before the events the drain had just taken (..., 257, 259, ..., 258 later)
    n = 2000

    async def main():
        reader = Node(tmp_path, "r")
        importer = reader.reader("md.ts", capacity=64)
        await reader.start()
        writer = Node(tmp_path, "w", dispatch=Dispatch.INLINE)
        exporter = writer.bridge.export_channel(Ev.MD, "md.ts", capacity=64, eager=True)
        await writer.start()
        producer = threading.Thread(target=lambda: [writer.bus.publish_threadsafe(Ev.MD, md(i))
                                                    for i in range(1, n + 1)])
        producer.start()
        try:
            await until(lambda: not producer.is_alive(), what="the producer thread")
            assert await writer.bridge.flush(WAIT)
            assert await importer.wait_position(exporter.sender, n, WAIT)
            await until(lambda: len(reader.collect.seqs) == n, what="every event handled")
        finally:
            producer.join(WAIT)
            await writer.stop()
            await reader.stop()
        assert reader.collect.seqs == list(range(1, n + 1))

    run(main())


def stuck_reader(directory, subject: str):
    """A BLOCK ring of 16 frames with a reader that is alive (its lock held) and never reads; return the
    segment and the lock's descriptor (close both)."""
    import fcntl

    from kimiha.bridge.shm import _Segment

    seg = _Segment(directory / subject, capacity=16, data_bytes=4096, max_readers=2, block=True)
    lock = os.open(directory / subject / "r0.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)  # alive, as far as the writer can tell
    seg.ring.attach(0, os.getpid(), 0, "stuck")
    return seg, lock


@pytest.mark.parametrize("flush_timeout, stop_timeout", [(0.3, 5.0), (2.0, 2.0)])
def test_a_ring_that_never_makes_room_bounds_the_drain_by_flush_timeout_not_the_whole_stop(
        run, tmp_path, flush_timeout, stop_timeout):
    # found by the adversarial trial: with events still in the channel and a reader that never reads, the
    # scheduler's drain waited for the exporter until the stop's deadline, and the exporter's shutdown hook then
    # started too late to run (TaskShutdownError); flush_timeout is the exporter's own bound on its readers, drain
    # and flush together, and ends before the stop's deadline (the second case: both equal, as with the defaults)
    async def main():
        subject = "md.never"
        seg, lock = stuck_reader(tmp_path, subject)
        bus = make_bus(capacity=16)
        scheduler = Scheduler(bus)
        bridge = ShmBridge(bus, tmp_path, flush_timeout=flush_timeout, liveness_interval=0.05)
        exporter = bridge.export_channel(Ev.MD, subject, batch=4)
        bridge.register(scheduler)
        await scheduler.start()
        published = 0
        try:
            for i in range(1, 200):
                try:
                    bus.publish(Ev.MD, md(i))
                except Exception:  # ChannelFull: the channel holds what the ring could not take
                    await until(lambda: exporter.stats()["blocked_waits"] > 0, what="the writer waiting")
                    break
                published += 1
                await asyncio.sleep(0)
        finally:
            await scheduler.shutdown(timeout=stop_timeout)  # raised TaskShutdownError before the fix
            os.close(lock)
            seg.close()
        report = scheduler.last_shutdown
        assert report["finished"] and not report["hook_failures"], report
        e = exporter.stats()
        assert e["sent"] == 16 and e["sent"] + e["unflushed"] == published, (e, published)

    run(main())


def test_spin_until_sees_a_frame_written_by_another_thread_and_gives_up_after_its_bound():
    r = ring(block=False)
    assert r.spin_until(0, 0) is False and r.spin_until(0, 1_000) is False  # nothing written: gives up
    writer = threading.Timer(0.01, lambda: r.write(items(0, 1)))
    writer.start()
    try:
        assert r.spin_until(0, 10_000_000_000) is True  # the GIL is released while spinning: the thread writes
    finally:
        writer.join()
    assert r.head == 1 and r.spin_until(0, 0) is True and r.spin_until(1, 0) is False


def test_a_file_truncated_during_the_spin_raises_instead_of_killing_the_process(tmp_path):
    # the spin reads the ring's head for its whole bound: a file shrunk meanwhile makes that read fault
    # (SIGBUS); the fault is caught and reported like any other call's (before: the process died)
    path = tmp_path / "ring"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        size = _shm.segment_size(16, 4096, 2)
        os.ftruncate(fd, size)
        buf = mmap.mmap(fd, size)
        _shm.init_segment(buf, 16, 4096, 2, False)
        r = _shm.Ring(buf, fd)
        shrink = threading.Timer(0.02, lambda: os.truncate(path, 0))
        shrink.start()
        try:
            with pytest.raises(_shm.RingTruncated, match="truncated to 0 bytes under the mapping"):
                r.spin_until(0, 20_000_000_000)  # bounded: 20 s, if the truncation were never seen
        finally:
            shrink.join()
    finally:
        os.close(fd)


def test_lag_ring_reader_reports_exactly_what_it_missed(run, tmp_path):
    async def main():
        subject = "md.lag"
        node = Node(tmp_path, "r", Overflow.LAG)
        importer = node.reader(subject, overflow=Overflow.LAG, capacity=16)
        await node.start()
        seg = importer._seg  # write behind the reader's back, as a fast writer in another process would
        try:
            frames = [(i, 0, msgspec.msgpack.encode(md(i + 1))) for i in range(100)]
            assert seg.ring.write(frames) == 100  # all at once, before the reader's loop runs again
            await until(lambda: importer.position() == 100, what="100 frames accounted for")
            await until(lambda: len(node.collect.seqs) == 16, what="the 16 the ring held handled")
        finally:
            await node.stop()
        assert node.collect.seqs == list(range(85, 101))
        s = importer.stats()
        assert (s["delivered"], s["missing"]) == (16, 84)

    run(main())


def test_bad_frames_are_counted_and_skipped(run, tmp_path):
    async def main():
        subject = "md.bad"
        node = Node(tmp_path, "r")
        importer = node.reader(subject)
        await node.start()
        try:
            good = msgspec.msgpack.encode(md(1))
            frames = [(0, 0, good), (1, 0, b"\xc1garbage"), (2, 0, msgspec.msgpack.encode({"x": 1})),
                      (3, 0, msgspec.msgpack.encode(md(4)))]
            importer._seg.ring.write(frames)
            await until(lambda: importer.position() == 4 and len(node.collect.seqs) == 2, what="4 frames")
        finally:
            await node.stop()
        assert node.collect.seqs == [1, 4]
        s = importer.stats()
        assert (s["delivered"], s["bad_frames"], s["missing"]) == (2, 2, 0)
        assert "MD" in s["last_bad_frame"]

    run(main())


def test_settings_are_checked(tmp_path):
    bridge = ShmBridge(make_bus(), tmp_path)
    with pytest.raises(InvalidConfigurationError, match="power of two"):
        bridge.export_channel(Ev.MD, "x", capacity=1000)
    with pytest.raises(InvalidConfigurationError, match="subject"):
        bridge.export_channel(Ev.MD, "../escape")
    with pytest.raises(InvalidConfigurationError, match="replay"):
        bridge.import_channel(Ev.MD, "x", replay="last")
    for bad in (-1, 10_001, float("nan"), "50", True):
        with pytest.raises(InvalidConfigurationError, match=r"import_channel.spin_us: expected a number of "
                                                            r"microseconds from 0 to 10,000, got"):
            bridge.import_channel(Ev.MD, "x", busy_poll=True, spin_us=bad)
    # found by the new-user trial: busy_poll="false" turned busy-polling on; spin_us without it did nothing
    with pytest.raises(InvalidConfigurationError, match="import_channel.busy_poll: expected True or False, got 'false'"):
        bridge.import_channel(Ev.MD, "x", busy_poll="false")
    with pytest.raises(InvalidConfigurationError, match=r"spin_us: applies to a busy-polling reader only "
                                                        r"\(busy_poll=True\); got spin_us=100 with busy_poll=False"):
        bridge.import_channel(Ev.MD, "x", spin_us=100)
    with pytest.raises(InvalidConfigurationError, match="export_channel.eager: expected True or False, got 'yes'"):
        bridge.export_channel(Ev.MD, "x", eager="yes")
    with pytest.raises(InvalidConfigurationError, match="transport"):
        open_bridge(make_bus(), transport="carrier-pigeon")
    assert isinstance(open_bridge(make_bus(), transport="shm", directory=tmp_path), ShmBridge)


def test_a_ring_file_is_reserved_whole_and_a_full_directory_is_a_clear_error(run, tmp_path, monkeypatch):
    # a sparse segment on a full /dev/shm kills the writer with SIGBUS at its first write to an unbacked page;
    # reserved at creation, it fails there with a message instead
    async def main():
        node = Node(tmp_path, "w")
        node.bridge.export_channel(Ev.MD, "md.space", capacity=1024, data_bytes=1 << 20)
        await node.start()
        try:
            ring_file = tmp_path / "md.space" / "ring"
            size = _shm.segment_size(1024, 1 << 20, 8)
            assert os.stat(ring_file).st_blocks * 512 >= size
        finally:
            await node.stop()

        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
        node = Node(tmp_path, "w2")
        node.bridge.export_channel(Ev.MD, "md.full")
        with pytest.raises(Exception, match=r"md\.full.*cannot reserve its \d+ bytes.*No space left"):
            await node.start()
        assert not (tmp_path / "md.full").exists()  # no half-made ring or folder left behind

    run(main())


def test_a_ring_of_another_geometry_is_used_as_it_is_and_said_so(run, tmp_path, caplog):
    async def main():
        reader = Node(tmp_path, "r", Overflow.LAG)
        reader.reader("md.geom", overflow=Overflow.LAG, capacity=64)  # creates the ring
        await reader.start()
        writer = Node(tmp_path, "w")
        exporter = writer.bridge.export_channel(Ev.MD, "md.geom", capacity=1024)  # BLOCK, 1024 asked
        with caplog.at_level("WARNING", logger="kimiha.bridge"):
            await writer.start()
        try:
            assert (exporter.stats()["capacity"], exporter.stats()["overflow"]) == (64, "lag")  # the ring's own
        finally:
            await writer.stop()
            await reader.stop()
        text = caplog.text
        assert "already exists with capacity 64" in text and "overflow lag" in text, text
        assert "asked for capacity 1024" in text and "overflow block" in text, text

    run(main())


# -- across processes -------------------------------------------------------------------------------------------


class Child:
    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, str(CHILD), *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=str(CHILD.parent))
        self.lines: list[str] = []
        self.seqs: list[int] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                if line.startswith("seq "):
                    self.seqs.append(int(line.split()[1]))
                else:
                    self.lines.append(line.strip())
                self._cond.notify_all()

    def wait_for(self, predicate, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self) or self.proc.poll() is not None, timeout=WAIT):
                raise AssertionError(f"timed out waiting for {what}; lines {self.lines[-5:]}")
        assert predicate(self), f"child exited ({self.proc.returncode}) before {what}: {self.lines[-5:]}"

    def line(self, prefix: str) -> str | None:
        return next((ln for ln in self.lines if ln.startswith(prefix)), None)

    def stop(self) -> dict:
        if self.proc.poll() is None:
            self.proc.stdin.write("stop\n")
            self.proc.stdin.flush()
        self.proc.wait(WAIT)
        self._thread.join(WAIT)
        stats = self.line("stats ")
        return json.loads(stats[6:]) if stats else {}

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT)
        self._thread.join(WAIT)


@pytest.fixture
def shm_dir(tmp_path):
    yield tmp_path
    remove_stale(tmp_path)


def test_a_reader_killed_mid_stream_does_not_block_the_writer(shm_dir):
    n = 20_000
    a = Child("reader", str(shm_dir), "k.reader")
    b = Child("reader", str(shm_dir), "k.reader")
    for c in (a, b):
        c.wait_for(lambda c: c.line("ready"), "reader ready")
    w = Child("writer", str(shm_dir), "k.reader", str(n), "500")
    try:
        w.wait_for(lambda c: c.line("ready"), "writer ready")
        a.wait_for(lambda c: len(c.seqs) >= 2000, "reader a mid-stream")
        a.kill()  # its slot still says "attached": only its lock, gone with it, tells the writer
        w.wait_for(lambda c: c.line("done"), "the writer's end (not blocked by the dead reader)")
        b.wait_for(lambda c: len(c.seqs) == n, "every event at reader b")
    finally:
        ws, bs = w.stop(), b.stop()
    assert b.seqs == list(range(1, n + 1))
    assert a.seqs == list(range(1, len(a.seqs) + 1))  # in order up to its death
    exp = ws["exports"]["MD"]
    assert exp["readers_lost"] == 1 and exp["sent"] == n and exp["unflushed"] == 0, exp
    assert bs["imports"]["MD"]["missing"] == 0
    assert not (shm_dir / "k.reader").exists()  # cleaned up by the last one out


def test_a_writer_killed_mid_stream_then_a_new_writer_takes_over(shm_dir):
    r = Child("reader", str(shm_dir), "k.writer")
    r.wait_for(lambda c: c.line("ready"), "reader ready")
    w = Child("writer", str(shm_dir), "k.writer", "100000", "200")
    try:
        w.wait_for(lambda c: c.line("sent 1000"), "the writer mid-stream")
        w.kill()
        sent = max(int(ln.split()[1]) for ln in w.lines if ln.startswith("sent "))
        # everything it wrote before dying is read (at least what it had flushed into the ring)
        r.wait_for(lambda c: len(c.seqs) >= sent, f"the {sent} flushed events")
        w2 = Child("writer", str(shm_dir), "k.writer", "300")
        w2.wait_for(lambda c: c.line("done"), "the new writer's end")
        first = len(r.seqs)
        r.wait_for(lambda c: len(c.seqs) >= first and c.seqs[-1:] == [300] and len(c.seqs) >= 300,
                   "the new writer's 300 events")
        w2.stop()
    finally:
        rs = r.stop()
    imp = rs["imports"]["MD"]
    cut = r.seqs.index(1, 1)  # where the second writer's 1..300 begin
    assert r.seqs[:cut] == list(range(1, cut + 1)) and cut >= sent  # the dead writer's, in order, complete
    assert r.seqs[cut:] == list(range(1, 301))
    assert imp["writer_deaths"] == 1 and imp["writer_restarts"] == 1 and imp["missing"] == 0, imp


def test_a_durable_reader_started_again_resumes_where_it_stopped(shm_dir):
    n = 6000
    a = Child("reader", str(shm_dir), "k.durable", "keep")
    a.wait_for(lambda c: c.line("ready"), "reader ready")
    w = Child("writer", str(shm_dir), "k.durable", str(n), "300")
    try:
        w.wait_for(lambda c: c.line("ready"), "writer ready")
        a.wait_for(lambda c: len(c.seqs) >= 1500, "the reader mid-stream")
        a.kill()
        b = Child("reader", str(shm_dir), "k.durable", "keep")
        b.wait_for(lambda c: c.line("ready"), "the second reader ready")
        w.wait_for(lambda c: c.line("done"), "the writer's end")
        b.wait_for(lambda c: c.seqs[-1:] == [n], "the last event at the second reader")
    finally:
        w.stop()
        bs = b.stop()
    start = b.seqs[0]
    assert b.seqs == list(range(start, n + 1))  # in order, nothing missing after its start
    assert a.seqs == list(range(1, len(a.seqs) + 1))
    imp = bs["imports"]["MD"]
    # it resumed at the first reader's committed cursor: never before what that one handled (events published
    # into the dead process's bus but not yet handled died with it); what the writer overwrote while no reader
    # held the place (the dead one detached) is counted, exactly
    assert imp["resumed"] is True and imp["first_position"] >= len(a.seqs), imp
    assert start == imp["first_position"] + imp["missing"] + 1, imp


def test_a_live_reader_that_never_reads_bounds_the_writers_shutdown_by_its_flush_timeout(run, tmp_path):
    """BLOCK never overwrites a live reader's frames, so a stuck one holds the writer back, but its shutdown
    gives up after flush_timeout and counts what it could not write (nothing lost silently)."""
    async def main():
        subject = "md.stuck"
        seg, lock = stuck_reader(tmp_path, subject)
        bus = make_bus()
        scheduler = Scheduler(bus)
        bridge = ShmBridge(bus, tmp_path, flush_timeout=0.3, liveness_interval=0.05)
        exporter = bridge.export_channel(Ev.MD, subject)
        bridge.register(scheduler)
        await scheduler.start()
        try:
            for i in range(1, 101):
                await bus.publish_async(Ev.MD, md(i))
            await until(lambda: exporter.stats()["sent"] == 16, what="the ring full")
            assert not await bridge.flush(0.2)  # it cannot finish: the reader holds it back
        finally:
            await scheduler.shutdown()
            os.close(lock)
            seg.close()
        e = exporter.stats()
        assert (e["sent"], e["unflushed"], e["readers_lost"]) == (16, 84, 0), e
        assert e["blocked_waits"] > 0

    run(main())


def test_reader_slots_free_ones_first_and_a_clear_error_when_none_is_left(run, tmp_path, caplog):
    from kimiha import OrchestratorError

    async def main():
        subject = "md.slots"
        writer = Node(tmp_path, "w")  # holds the ring while readers come and go
        writer.bridge.export_channel(Ev.MD, subject, max_readers=2)
        await writer.start()
        durable = Node(tmp_path, "d")
        durable.reader(subject, durable="keep")
        await durable.start()
        await durable.stop()  # its place (slot 0, with its cursor) stays for its restart
        nodes = []
        try:
            plain = Node(tmp_path, "p")
            first = plain.reader(subject)
            await plain.start()
            nodes.append(plain)
            assert first.stats()["slot"] == 1  # a free slot, not the durable reader's saved place
            late = Node(tmp_path, "l")
            second = late.reader(subject)
            await late.start()  # nothing else left: the saved place, said in the log
            nodes.append(late)
            assert second.stats()["slot"] == 0
            assert "reusing the saved place of durable reader 'keep'" in caplog.text
            extra = Node(tmp_path, "x")
            extra.reader(subject)
            with pytest.raises(OrchestratorError, match="no free reader slot"):  # (failed to initialize)
                await extra.start()
        finally:
            for node in nodes:
                await node.stop()
            await writer.stop()

    run(main())


# -- holes, a shrunken file (review defects of 0.3.0) ----------------------------------------------------------


class Big(EventType):
    BLOBS = "Blobs"


class Blob(Event, frozen=True):
    seq: int
    data: str


class CollectBlobs(Collect):
    def subscribed_event(self) -> Big:
        return Big.BLOBS


def blob_node(directory, name):
    bus = EventBus([(Big.BLOBS, ChannelConfig(64, payload_type=Blob, overflow=Overflow.BLOCK))])
    return bus, Scheduler(bus, name=name), ShmBridge(bus, directory, name=name, liveness_interval=0.05)


def test_a_frame_too_large_for_the_ring_is_a_hole_every_reader_counts(run, tmp_path, caplog):
    # data_bytes 4096: the largest frame is 1024 bytes; the third event is about 2000
    async def main():
        rbus, rsched, rbridge = blob_node(tmp_path, "r")
        importer = rbridge.import_channel(Big.BLOBS, "blobs", capacity=16, data_bytes=4096)
        collect = CollectBlobs()
        rsched.register_event_task(collect)
        rbridge.register(rsched)
        await rsched.start()
        wbus, wsched, wbridge = blob_node(tmp_path, "w")
        exporter = wbridge.export_channel(Big.BLOBS, "blobs", capacity=16, data_bytes=4096)
        wbridge.register(wsched)
        await wsched.start()
        try:
            for i, size in enumerate([10, 10, 2000, 10], start=1):
                await wbus.publish_async(Big.BLOBS, Blob(i, "x" * size))
            assert await wbridge.flush(WAIT)
            assert await importer.wait_position(None, 4, WAIT)  # the hole takes its place in the sequence
            await until(lambda: len(collect.seqs) == 3, what="the 3 carried events handled")
        finally:
            await wsched.shutdown()
            await rsched.shutdown()
        assert collect.seqs == [1, 2, 4]
        s = importer.stats()
        assert (s["delivered"], s["dropped_by_writer"], s["missing"], s["lost_at_senders"]) == (3, 1, 0, 1)
        assert "frame 2 of" in s["last_hole"] and "'Blobs'" in s["last_hole"] and "1024 bytes" in s["last_hole"]
        e = exporter.stats()
        assert (e["sent"], e["dropped"]) == (3, 1)
        said = [r.getMessage() for r in caplog.records]
        assert any("dropped an event of" in m and "'Blobs'" in m and "1024 bytes" in m and "hole at frame 2" in m
                   for m in said), said
        assert any("hole at frame 2" in m and "shm-import:Blobs" in m for m in said), said

    run(main())


def test_a_hole_on_a_full_block_ring_waits_for_room_like_a_frame():
    r = ring(capacity=4, data=4096, block=True)
    r.attach(0, os.getpid(), 0, "")
    assert r.write(items(0, 4)) == 4
    assert r.write_hole(77, 5000) is False  # no free slot: the hole does not overwrite the reader's frames
    frames, cursor, lagged, holes = r.read(0, 0, 10)
    assert (len(frames), cursor, lagged, holes) == (4, 4, 0, [])
    r.commit(0, cursor)
    assert r.write_hole(77, 5000) is True and r.head == 5
    assert r.write(items(5, 6)) == 1
    frames, cursor, lagged, holes = r.read(0, 4, 10)
    assert (frames, cursor, lagged, holes) == ([(1005, (5).to_bytes(4, "little") * 2)], 6, 0, [(4, 77, 5000)])


SHRINK = r"""
import asyncio, os, sys
sys.path.insert(0, sys.argv[2])
import kimiha
from kimiha.error import InvalidStateError
from test_shm import Node, md, until

async def main(directory):
    node = Node(directory, "r")
    importer = node.reader("md.shrink", busy_poll=sys.argv[3] == "poll")
    await node.start()
    ring = importer._seg.ring
    import msgspec
    ring.write([(0, 0, msgspec.msgpack.encode(md(1)))])
    await until(lambda: node.collect.seqs == [1], what="the first event")
    os.truncate(os.path.join(directory, "md.shrink", "ring"), 0)  # another process shrinks the file
    try:
        ring.write([(1, 0, msgspec.msgpack.encode(md(2)))])
    except InvalidStateError as exc:
        print("writer:", exc, flush=True)
    await until(lambda: importer.failed or node.scheduler.registry.get(importer.name).errors, what="the error")
    info = node.scheduler.registry.get(importer.name)
    print("reader:", info.errors, repr(info.last_error)[:400], flush=True)
    print("importer failed:", importer.stats()["failed"] is not None, flush=True)
    await node.stop()
    print("alive", flush=True)

kimiha.run(main(sys.argv[1]))
"""


@pytest.mark.parametrize("mode", ["wake", "poll"])
def test_a_ring_file_truncated_under_the_mapping_is_an_error_not_sigbus(tmp_path, mode):
    script = tmp_path / "shrink.py"
    script.write_text(SHRINK)
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "rings"), str(CHILD.parent), mode],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, (done.returncode, done.stdout, done.stderr[-3000:])  # -7 was SIGBUS
    assert "writer: shm ring: its file was truncated to 0 bytes under the mapping" in done.stdout, done.stdout
    said = [line for line in done.stdout.splitlines() if line.startswith("reader: ")]
    assert said and "shm-import:MD: ring" in said[0] and "md.shrink" in said[0] and "truncated to 0 bytes" in said[0], \
        (done.stdout, done.stderr[-2000:])
    assert "exporter failed" not in done.stdout
    assert "importer failed: True" in done.stdout and "alive" in done.stdout


def test_shm_rings_are_in_the_metrics_and_in_top(run, tmp_path):
    pytest.importorskip("prometheus_client")
    pytest.importorskip("rich")
    from prometheus_client.parser import text_string_to_metric_families
    from rich.console import Console

    from kimiha.apps.top import parse, render
    from kimiha.metrics import KimihaCollector, render_text

    def scrape(bus, scheduler):
        text = render_text(KimihaCollector(bus, scheduler).families())
        found = {}
        for family in text_string_to_metric_families(text):  # prometheus-client's own parser
            for s in family.samples:
                found[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return text, found

    async def main():
        rbus, rsched, rbridge = blob_node(tmp_path, "rb")
        importer = rbridge.import_channel(Big.BLOBS, "blobs.m", capacity=16, data_bytes=4096)
        rsched.register_event_task(CollectBlobs())
        rbridge.register(rsched)
        await rsched.start()
        wbus, wsched, wbridge = blob_node(tmp_path, "wb")
        wbridge.export_channel(Big.BLOBS, "blobs.m", capacity=16, data_bytes=4096)
        wbridge.register(wsched)
        await wsched.start()
        try:
            for i in range(1, 101):
                await wbus.publish_async(Big.BLOBS, Blob(i, "x" * (3000 if i == 50 else 5)))
            assert await wbridge.flush(WAIT)
            assert await importer.wait_position(None, 100, WAIT)
            wtext, w = scrape(wbus, wsched)
            rtext, r = scrape(rbus, rsched)
        finally:
            await wsched.shutdown()
            await rsched.shutdown()
        wl = (("bridge", "wb"), ("channel", "Blobs"), ("ring", "blobs.m"))
        rl = (("bridge", "rb"), ("channel", "Blobs"), ("ring", "blobs.m"))
        assert w[("kimiha_shm_export_written_total", wl)] == 99
        assert w[("kimiha_shm_export_dropped_total", wl)] == 1
        assert w[("kimiha_shm_export_lagged_total", wl)] == 0
        assert w[("kimiha_shm_export_readers_attached", wl)] == 1
        assert w[("kimiha_shm_export_head_events", wl)] == 100
        assert r[("kimiha_shm_import_read_total", rl)] == 99
        assert r[("kimiha_shm_import_delivered_total", rl)] == 99
        assert r[("kimiha_shm_import_dropped_by_writer_total", rl)] == 1
        assert r[("kimiha_shm_import_lagged_total", rl)] == 0
        assert r[("kimiha_shm_import_position_events", rl)] == 100
        assert r[("kimiha_shm_import_writer_alive", rl)] == 1
        assert r[("kimiha_shm_import_latency_seconds_count", rl)] == 99
        console = Console(width=200, record=True, color_system=None)
        for text in (wtext, rtext):
            console.print(render("http://x", parse(text, at=1.0), None, None, None, None, width=200))
        shown = console.export_text()
        assert "shm wb writes Blobs -> ring blobs.m: written 99" in shown and "readers 1" in shown, shown
        assert "dropped 1" in shown, shown
        assert "shm rb reads ring blobs.m -> Blobs: read 99" in shown and "dropped by writer 1" in shown, shown
        assert "writer alive" in shown, shown

    run(main())


def test_a_full_local_channel_makes_the_reader_wait_not_lose(run, tmp_path):
    # the batch import stops at a full BLOCK channel and waits for room; nothing is skipped or repeated
    async def main():
        bus = make_bus(capacity=4)
        scheduler = Scheduler(bus, name="r")
        bridge = ShmBridge(bus, tmp_path, name="r", liveness_interval=0.05)
        importer = bridge.import_channel(Ev.MD, "md.full")
        sub = bus.subscribe(Ev.MD)  # a pull subscriber that reads only later: the channel fills up
        bridge.register(scheduler)
        await scheduler.start()
        try:
            frames = [(i, 0, msgspec.msgpack.encode(md(i + 1))) for i in range(20)]
            assert importer._seg.ring.write(frames) == 20
            await until(lambda: importer.stats()["channel_full_waits"] > 0, what="the reader waiting for room")
            assert importer.position() < 20
            got = []
            while len(got) < 20:
                got.append((await asyncio.wait_for(sub.recv(), WAIT)).seq)
            await until(lambda: importer.position() == 20, what="20 frames accounted for")
        finally:
            await scheduler.shutdown()
        assert got == list(range(1, 21))
        s = importer.stats()
        assert (s["delivered"], s["missing"], s["bad_frames"]) == (20, 0, 0)

    run(main())
