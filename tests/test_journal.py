"""kimiha.journal: frames to a file and back, torn and corrupt records, rotation, replay into a bus and the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import subprocess
import sys

import msgspec
import pytest

from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Overflow, Scheduler
from kimiha.clock import SimClock
from kimiha.error import InvalidConfigurationError
from kimiha.journal import (MAGIC, JournalCorrupt, JournalReplayer, JournalWriter, journal_meta, journal_segments,
                            read_journal)
from kimiha.venues.binance import iter_lines, recorded_tape


class Ev(EventType):
    A = "A"
    B = "B"


class Tick(Event):
    n: int
    recv_ts_ns: int = 0


def bus_ab() -> EventBus:
    return EventBus([(Ev.A, ChannelConfig(256, payload_type=Tick, overflow=Overflow.BLOCK)),
                     (Ev.B, ChannelConfig(256, payload_type=Tick, overflow=Overflow.BLOCK))])


async def _journal_some(path, n=50, **options):
    bus = bus_ab()
    writer = JournalWriter(bus, path, [Ev.A, Ev.B], **options)
    async with Scheduler(bus, clock=SimClock(1_000)) as scheduler:
        scheduler.register_background_task(writer)
        await scheduler.start()
        for i in range(n):
            await bus.publish_async(Ev.A if i % 3 else Ev.B, Tick(i, 1_000 + i))
    return writer


def test_round_trip_keeps_channel_sequence_and_the_published_frames(run, tmp_path):
    path = tmp_path / "j"
    writer = run(_journal_some(path))
    records = list(read_journal(path))
    assert writer.records == len(records) == 50
    assert path.read_bytes()[:8] == MAGIC
    a = [r for r in records if r.channel == "A"]
    b = [r for r in records if r.channel == "B"]
    assert [r.sequence for r in a] == list(range(len(a))) and [r.sequence for r in b] == list(range(len(b)))
    # the frame is the event's msgpack, byte for byte: no re-encode on the way in, none needed on the way out
    # each channel in its publish order; across channels the file follows the dispatch (documented)
    assert [msgspec.msgpack.decode(r.frame, type=Tick).n for r in a] == [i for i in range(50) if i % 3]
    assert [msgspec.msgpack.decode(r.frame, type=Tick).n for r in b] == [i for i in range(50) if not i % 3]
    # the frame is the event's msgpack, byte for byte: no re-encode on the way in, none needed on the way out
    ticks = {msgspec.msgpack.decode(r.frame, type=Tick).n: r.frame for r in records}
    assert all(ticks[i] == msgspec.msgpack.encode(Tick(i, 1_000 + i)) for i in range(50))
    assert [r.channel for r in read_journal(path, channels=["B"])] == ["B"] * len(b)


def test_meta_comes_first_and_is_not_an_event(run, tmp_path):
    path = tmp_path / "j"

    async def main():
        bus = bus_ab()
        writer = JournalWriter(bus, path, [Ev.A], meta={"latency_ns": 5, "note": "x"})
        async with Scheduler(bus, clock=SimClock(1_000)) as scheduler:
            scheduler.register_background_task(writer)
            await scheduler.start()
            for i in range(5):
                await bus.publish_async(Ev.A, Tick(i, 1_000 + i))
        return writer

    writer = run(main())
    assert journal_meta(path) == {"latency_ns": 5, "note": "x"}
    assert writer.records == 5 and [r.channel for r in read_journal(path)] == ["A"] * 5
    run(_journal_some(path, n=3))  # a journal written without meta has none
    assert journal_meta(path) == {}
    with pytest.raises(InvalidConfigurationError, match="meta must be a dict msgpack can encode"):
        JournalWriter(bus_ab(), path, [Ev.A], meta={"x": object()})


def test_a_torn_last_record_is_skipped_with_a_warning_and_nothing_before_it_is_lost(run, tmp_path, caplog):
    path = tmp_path / "j"
    run(_journal_some(path))
    data = path.read_bytes()
    full = list(read_journal(path))
    for cut in (3, 9, 20):  # inside the header, inside the body, ... of the last record
        path.write_bytes(data[:-cut])
        with caplog.at_level(logging.WARNING, logger="kimiha.journal"):
            caplog.clear()
            records = list(read_journal(path))
        assert len(records) == 49 and records == full[:49]
        assert "torn" in caplog.text and "skipped" in caplog.text
    # a last record of the right length whose bytes were not all written (bad CRC at the very end): torn too
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    assert len(list(read_journal(path))) == 49


def test_a_corrupt_record_in_the_middle_is_an_error_naming_its_offset(run, tmp_path):
    path = tmp_path / "j"
    run(_journal_some(path))
    data = bytearray(path.read_bytes())
    offsets = [8]
    while offsets[-1] < len(data):
        length, _ = struct.unpack_from("<II", data, offsets[-1])
        offsets.append(offsets[-1] + 8 + length)
    victim = offsets[10]
    data[victim + 12] ^= 0x55  # a body byte of record 10
    path.write_bytes(bytes(data))
    with pytest.raises(JournalCorrupt, match=f"offset {victim} fails its CRC") as info:
        list(read_journal(path))
    assert info.value.offset == victim
    path.write_bytes(b"NOTAJRNL" + bytes(data[8:]))
    with pytest.raises(JournalCorrupt, match="not a kimiha journal"):
        list(read_journal(path))


def _offsets(data):
    offsets = [8]
    while offsets[-1] < len(data):
        length, _ = struct.unpack_from("<II", data, offsets[-1])
        offsets.append(offsets[-1] + 8 + length)
    return offsets[:-1]


def test_a_damaged_length_in_the_middle_of_the_last_segment_is_corruption_not_a_torn_tail(run, tmp_path):
    # A length field that now claims more bytes than the file holds (or fewer than any record) looked like a
    # crash mid-write: the reader warned "torn" and silently dropped every record after it. Records that
    # follow, whole and with their CRC, prove it is damage, not a torn tail.
    path = tmp_path / "j"
    run(_journal_some(path))
    data = path.read_bytes()
    victim = _offsets(data)[10]
    for byte in range(4):
        for new in (0x00, 0xFF):
            damaged = bytearray(data)
            if damaged[victim + byte] == new:
                continue
            damaged[victim + byte] = new
            path.write_bytes(bytes(damaged))
            with pytest.raises(JournalCorrupt, match=f"offset {victim} (is corrupt|fails its CRC)") as info:
                list(read_journal(path))
            assert info.value.offset == victim


def test_a_zero_filled_tail_is_a_torn_tail(run, tmp_path, caplog):
    # what a crash can leave after the last write on some filesystems: the size grew, the bytes did not land
    path = tmp_path / "j"
    run(_journal_some(path))
    data = path.read_bytes()
    path.write_bytes(data + bytes(4096))
    with caplog.at_level(logging.WARNING, logger="kimiha.journal"):
        assert len(list(read_journal(path))) == 50
    assert "torn" in caplog.text


def test_rotation_by_size_and_fsync_policies(run, tmp_path):
    for policy in ("never", "batch", "always"):
        path = tmp_path / f"j-{policy}"
        writer = run(_journal_some(path, n=400, rotate_bytes=4096, fsync=policy))
        segments = journal_segments(path)
        assert len(segments) > 3 and segments == writer.segments
        assert all(os.path.getsize(p) <= 4096 for p in segments)
        assert sorted(msgspec.msgpack.decode(r.frame, type=Tick).n for r in read_journal(path)) == list(range(400))
    with pytest.raises(InvalidConfigurationError, match="fsync must be one of"):
        JournalWriter(bus_ab(), tmp_path / "x", [Ev.A], fsync="sometimes")
    with pytest.raises(InvalidConfigurationError, match="channels is empty"):
        JournalWriter(bus_ab(), tmp_path / "x", [])


def test_a_torn_record_at_the_end_of_an_earlier_segment_is_corruption(run, tmp_path):
    path = tmp_path / "j"
    run(_journal_some(path, n=400, rotate_bytes=4096))
    first = path.read_bytes()
    path.write_bytes(first[:-5])
    with pytest.raises(JournalCorrupt, match="later segments follow"):
        list(read_journal(path))


def test_a_segment_missing_in_the_middle_is_an_error_naming_it(run, tmp_path):
    # before: the segments were PATH, PATH.1, ... up to the first missing one, so the records of every
    # segment after a hole were dropped without a word
    path = tmp_path / "j"
    run(_journal_some(path, n=400, rotate_bytes=4096))
    segments = journal_segments(path)
    assert len(segments) > 3
    segments[2].unlink()
    with pytest.raises(JournalCorrupt, match=f"segment '{segments[2]}' is missing") as info:
        list(read_journal(path))
    assert info.value.path == str(segments[2])
    # a new journal at the same path removes the old one's segments, those past the hole too
    run(_journal_some(path, n=10))
    assert journal_segments(path) == [path] and len(list(read_journal(path))) == 10


class Collect(EventTask):
    def __init__(self) -> None:
        self.seen: list[tuple[int, int]] = []

    def subscribed_event(self) -> Ev:
        return Ev.A

    def handle_event(self, event: Tick) -> None:
        self.seen.append((event.n, self.clock.now_ns()))


def test_replay_into_a_bus_on_the_sim_clock(run, tmp_path):
    path = tmp_path / "j"
    run(_journal_some(path))
    expected = [msgspec.msgpack.decode(r.frame, type=Tick) for r in read_journal(path, channels=["A"])]

    async def main():
        bus = bus_ab()
        replayer = JournalReplayer(bus, path, [Ev.A])
        collect = Collect()
        async with Scheduler(bus, clock=SimClock()) as scheduler:
            scheduler.register_event_task(collect)
            scheduler.register_background_task(replayer)
            await scheduler.start()
            await replayer.finished.wait()
        return collect.seen, replayer.published

    seen, published = run(main())
    assert seen == [(t.n, t.recv_ts_ns) for t in expected]  # the handler's clock is each event's time
    assert published == {"A": len(expected)}


def test_demo_journal_then_replay_gives_the_same_digest(tmp_path):
    lines = []
    for line in iter_lines(recorded_tape()):
        lines.append(line)
        if len(lines) == 15_000:
            break
    data = tmp_path / "slice.txt"
    data.write_bytes(b"\n".join(lines) + b"\n")
    journal = tmp_path / "run.kj"

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "kimiha", *args, "--json", "--no-progress"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    # with an order latency: the journal's meta carries it, so the replay fills the orders as the run did
    # (before, the replay ran without it and its digest differed from the recording's)
    recorded = cli("demo", "--data", str(data), "--journal", str(journal), "--journal-rotate-mb", "1",
                   "--latency", "1")
    replayed = cli("replay", str(journal), "--loop", "asyncio")
    assert journal_meta(journal) == {"latency_ns": 1_000_000} and replayed["latency_ms"] == 1.0
    assert recorded["orders"] > 10
    assert len(recorded["journal"]["segments"]) > 1
    assert replayed["digest"] == recorded["digest"] == replayed["recorded_digest"]
    assert replayed["digest_matches_recording"] is True
    for key in ("lines_read", "messages_by_stream", "book_check", "signals", "orders", "fills", "pnl",
                "all_lines_accounted"):
        assert replayed[key] == recorded[key], key
    assert set(recorded) - {"journal"} <= set(replayed)  # the same summary keys

    bad = tmp_path / "bad.kj"
    raw = journal.read_bytes()
    bad.write_bytes(raw[:100] + bytes([raw[100] ^ 1]) + raw[101:])
    proc = subprocess.run([sys.executable, "-m", "kimiha", "replay", str(bad)], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)
    assert proc.returncode == 2 and "offset" in proc.stderr and "Traceback" not in proc.stderr


class _DiskFills:
    """A raw file that takes ``room`` more bytes (a short write), then fails as a full disk does (ENOSPC)."""

    def __init__(self, file, room):
        self.file, self.room = file, room

    def write(self, data):
        if not self.room:
            raise OSError(28, "No space left on device")
        taken = self.file.write(bytes(data[:self.room]))  # what fits: a short write, as write(2) gives
        self.room -= taken
        return taken

    def fileno(self):
        return self.file.fileno()

    def close(self):
        self.file.close()


def test_a_full_disk_stops_the_journal_not_the_bus_and_keeps_every_whole_record(run, tmp_path):
    # before: each failed write raised in the dispatch loop (one handler error per event, the unwritten
    # buffer growing without bound), and the shutdown hook raised again
    path = tmp_path / "j"
    failures = []

    async def main():
        bus = bus_ab()
        writer = JournalWriter(bus, path, [Ev.A], on_failure=failures.append)
        collect = Collect()
        async with Scheduler(bus, clock=SimClock(1_000)) as scheduler:
            scheduler.register_background_task(writer)
            scheduler.register_event_task(collect)
            await scheduler.start()
            writer._file = _DiskFills(writer._file, 700)
            for i in range(200):
                await bus.publish_async(Ev.A, Tick(i, 1_000 + i))
                if i % 20 == 0:
                    writer.flush()
        return writer, collect, bus

    writer, collect, bus = run(main())
    assert len(collect.seen) == 200  # the bus and the other tasks carried on
    assert len(failures) == 1 and failures[0] is writer.failed
    assert "No space left on device" in str(writer.failed) and str(path) in str(writer.failed)
    records = list(read_journal(path))  # what reached the disk: whole records, a torn tail at most
    assert 0 < len(records) == writer.failed.records == writer.records < 200
    assert [msgspec.msgpack.decode(r.frame, type=Tick).n for r in records] == list(range(len(records)))


def test_demo_journal_on_a_full_disk_is_one_line_and_exit_1(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full")
    proc = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--no-progress", "--journal", "/dev/full"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert "/dev/full" in proc.stderr and "No space left on device" in proc.stderr and not proc.stdout


@pytest.mark.parametrize("journal_name", ["rec.txt", "rec"])
def test_demo_refuses_a_journal_that_would_overwrite_its_recording(tmp_path, journal_name):
    # before: `--data rec.txt --journal rec.txt` truncated the recording it was replaying and exited 0;
    # `--journal rec` deleted `rec.1` as an old segment
    lines = []
    for line in iter_lines(recorded_tape()):
        lines.append(line)
        if len(lines) == 200:
            break
    data = tmp_path / ("rec.txt" if journal_name == "rec.txt" else "rec.1")
    data.write_bytes(b"\n".join(lines) + b"\n")
    before = data.read_bytes()
    proc = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--no-progress", "--data", str(data),
                           "--journal", str(tmp_path / journal_name)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and "would overwrite the recording" in proc.stderr, proc.stderr
    assert data.read_bytes() == before


def test_replay_interrupted_by_sigint_stops_cleanly_and_says_so(run, tmp_path):
    # before: replay installed no signal handler: Ctrl-C unwound it as a KeyboardInterrupt, no summary
    import signal

    from kimiha.apps.demo import run_demo, run_replay

    lines = []
    for line in iter_lines(recorded_tape()):
        lines.append(line)
        if len(lines) == 3_000:
            break
    data = tmp_path / "slice.txt"
    data.write_bytes(b"\n".join(lines) + b"\n")
    journal = tmp_path / "run.kj"
    run(run_demo([data], progress=None, journal=journal))

    async def interrupted_replay():
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signal.SIGINT)  # once the replay waits
        return await run_replay(journal, progress=None)

    summary = run(interrupted_replay())
    assert summary["interrupted"] == "SIGINT"  # and the staged shutdown ran: a summary came back


# -- the replay as a person meets it (a reviewer's findings) ----------------------------------------------------

def _slice(tmp_path, n=3_000):
    lines = []
    for line in iter_lines(recorded_tape()):
        lines.append(line)
        if len(lines) == n:
            break
    data = tmp_path / "slice.txt"
    data.write_bytes(b"\n".join(lines) + b"\n")
    return data


def _kimiha(tmp_path, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kimiha", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=tmp_path)


def test_replay_of_a_later_segment_is_refused_naming_the_first(run, tmp_path):
    # before: `kimiha replay PATH.1` replayed the segment alone: rejects, and a different digest
    from kimiha.apps.demo import run_demo

    journal = tmp_path / "run.kj"
    run(run_demo([_slice(tmp_path, 15_000)], progress=None, journal=journal, journal_rotate_bytes=1 << 20))
    assert len(journal_segments(journal)) > 1
    proc = _kimiha(tmp_path, "replay", f"{journal}.1", "--no-progress")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"kimiha replay: {journal}.1: this is a later segment of the journal '{journal}'; expected the first "
        f"segment ('{journal}'), which reads them all in order"]
    with pytest.raises(InvalidConfigurationError, match="later segment"):
        list(read_journal(f"{journal}.1"))
    # a file that merely ends in .N, beside no journal, is a journal of its own
    alone = tmp_path / "other.3"
    alone.write_bytes(journal.read_bytes())
    assert len(list(read_journal(alone))) > 1_000


def test_replay_warns_once_of_a_torn_last_record(run, tmp_path):
    # before: the survey and the replayer each read the journal, and each warned
    from kimiha.apps.demo import run_demo

    journal = tmp_path / "run.kj"
    run(run_demo([_slice(tmp_path)], progress=None, journal=journal))
    journal.write_bytes(journal.read_bytes()[:-3])
    proc = _kimiha(tmp_path, "replay", str(journal), "--no-progress", "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("is torn") == 1, proc.stderr


@pytest.mark.parametrize("kind", ["missing", "directory", "header only", "not a journal"])
def test_replay_errors_have_one_shape(tmp_path, kind):
    # before: "kimiha replay: journal '/x': no such file", "kimiha replay /tmp: cannot read it (Is a
    # directory)", "... RawMarketData records (it has none)"
    path = {"missing": tmp_path / "absent.kj", "directory": tmp_path, "header only": tmp_path / "empty.kj",
            "not a journal": tmp_path / "text.kj"}[kind]
    if kind == "header only":
        path.write_bytes(MAGIC)
    elif kind == "not a journal":
        path.write_bytes(b"hello world\n" * 3)
    proc = _kimiha(tmp_path, "replay", str(path), "--no-progress")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kimiha replay: {path}: "), proc.stderr
    message = lines[0][len(f"kimiha replay: {path}: "):]
    assert {"missing": "no such journal file", "directory": "is a directory; expected a journal file",
            "header only": "the journal holds no RawMarketData records (no records at all)",
            "not a journal": "expected the magic"}[kind] in message, message
    assert "journal '" not in message or kind == "not a journal"


def test_replay_summary_says_replay_and_that_the_recording_was_interrupted(run, tmp_path):
    # before: "kimiha demo: ..." and "read of N in the files"; an interrupted recording replayed with no hint
    import signal

    from kimiha.apps.demo import format_summary, run_demo

    journal = tmp_path / "run.kj"
    data = _slice(tmp_path, 15_000)

    async def interrupted_demo():
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)
        return await run_demo([data], progress=None, journal=journal)

    recorded = run(interrupted_demo())
    assert recorded["interrupted"] == "SIGINT"
    proc = _kimiha(tmp_path, "replay", str(journal), "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"kimiha replay: {journal}\n")
    assert "in the journal" in proc.stdout and "in the files" not in proc.stdout
    lines_read = recorded["lines_read"]
    assert (f"the recorded run was interrupted by SIGINT after {lines_read:,} of 15,000 lines: the journal "
            f"holds only what it recorded") in proc.stdout
    replayed = json.loads(_kimiha(tmp_path, "replay", str(journal), "--no-progress", "--json").stdout)
    assert replayed["recorded_run"] == {"closed": True, "interrupted": "SIGINT", "lines_read": lines_read,
                                        "lines_in_files": 15_000}
    assert replayed["interrupted"] is None  # the replay itself ran to the end
    # a complete recording says nothing of the kind; a journal its writer never closed says that
    run(run_demo([data], progress=None, journal=journal))
    full = _kimiha(tmp_path, "replay", str(journal), "--no-progress").stdout
    assert "the recorded run" not in full and "cooldowns ended" in full
    data_bytes = journal.read_bytes()
    cut = tmp_path / "cut.kj"
    cut.write_bytes(data_bytes[:len(data_bytes) // 2])  # as a killed recorder leaves it
    text = _kimiha(tmp_path, "replay", str(cut), "--no-progress").stdout
    assert "the recorded run did not close its journal" in text
    assert "recorded_digest" not in format_summary(recorded)


def test_reported_journal_bytes_are_the_file_sizes(run, tmp_path):
    # before: each segment's 8-byte header was left out of `bytes`
    from kimiha.apps.demo import run_demo

    journal = tmp_path / "run.kj"
    summary = run(run_demo([_slice(tmp_path, 15_000)], progress=None, journal=journal,
                           journal_rotate_bytes=1 << 20))
    segments = summary["journal"]["segments"]
    assert len(segments) > 1
    assert summary["journal"]["bytes"] == sum(os.path.getsize(p) for p in segments)
    assert all(os.path.getsize(p) <= 1 << 20 for p in segments)  # --journal-rotate-mb counts MiB, headers in


def test_demo_data_given_a_journal_says_to_replay_it(run, tmp_path):
    # before: a line of several hundred characters of the journal's raw bytes
    from kimiha.apps.demo import run_demo

    journal = tmp_path / "run.kj"
    run(run_demo([_slice(tmp_path, 500)], progress=None, journal=journal))
    proc = _kimiha(tmp_path, "demo", "--data", str(journal), "--no-progress")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"kimiha demo: --data {journal}: this is a kimiha journal, not a "
                                        f"recording: replay it with `kimiha replay {journal}`"]
    junk = tmp_path / "junk.txt"
    junk.write_bytes(b"x" * 5_000 + b"\n")  # one long bad line: quoted, but not all of it
    err = _kimiha(tmp_path, "demo", "--data", str(junk), "--no-progress").stderr
    assert len(err.splitlines()) == 1 and len(err) < 600 and "more characters" in err, err


@pytest.mark.parametrize("args", [["--events", "0"], ["--events", "-5"], ["--repeat", "0"], ["--events", "x"]])
def test_journal_cost_benchmark_refuses_bad_counts_in_one_line(tmp_path, args):
    # before: --events 0 and -5 hung (waiting for the n-th event), --repeat 0 died of a traceback
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                          "journal_cost.py")
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60,
                          cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and f"argument {args[0]}: expected a whole number" in lines[0], proc.stderr
    assert repr(args[1]) in lines[0] and "Traceback" not in proc.stderr
