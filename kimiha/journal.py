"""A journal of the bus: channels' frames appended to files, read back, and replayed into a bus.

:class:`JournalWriter` (a background task) journals any channels: it subscribes to each with a frames handler,
so every event is written as the msgpack frame the ring already holds (no re-encode; the ring encodes a slot
once for all its frames readers, the NATS exporter included). :func:`read_journal` reads the records back;
:class:`JournalReplayer` (a connector) publishes them into a bus with ``publish_raw_async``, setting its
:class:`~kimiha.clock.SimClock` to each record's publish time first.

File format (every segment)::

    b"KIMIHAJ1"                                   8-byte magic, once at the start of each segment
    then records, each:
      u32 little-endian  length of the body
      u32 little-endian  CRC-32 (zlib) of the body
      body: a msgpack array [channel: str, sequence: uint64, publish_ns: uint64, frame: bin]

Records of one channel are in its publish order; records of different channels are in the order the
dispatch loop delivered them to the journal (batch by batch), which need not be the order they were published
in. ``channel`` is the channel's name (``EventType`` value), ``sequence`` the event's sequence in that
channel's ring (0-based, consecutive per channel unless the journal lagged), ``publish_ns`` the journal's clock when it
took the event (``Clock.now_ns()``: wall time under a :class:`~kimiha.clock.LiveClock`, the scheduler's
simulated time under a :class:`~kimiha.clock.SimClock`), ``frame`` the event's msgpack frame as published.

A writer given ``meta`` (a dict: the run's settings, e.g. the demo's order latency) writes it first, as a
record of the reserved channel ``""`` whose frame is the dict's msgpack; :func:`read_journal` skips it,
:func:`journal_meta` returns it (so a replay can run with the settings the recording ran with). A writer
given ``end_meta`` (a callable returning a dict) that closes cleanly (its shutdown hook, not after a failed
write or a crash) ends the journal with one more record of that channel, the end record: ``{"end": True}``
plus what ``end_meta()`` returns (the demo says whether the run was interrupted); :func:`journal_end` returns
it, or None for a journal without one (its writer never closed it, or was given no ``end_meta``).

Segments rotate by size: ``PATH``, then ``PATH.1``, ``PATH.2``, ... (``rotate_bytes``, the 8-byte magic
included); a writer removes the ``PATH.N`` files of an older journal at its path. A journal is read from its
first segment: reading a later one alone is refused. ``fsync`` says when
the file is forced to disk: ``"never"`` (the OS decides; closing a segment still flushes it), ``"batch"``
(every ``flush_interval`` seconds, when buffered records are written) or ``"always"`` (after every record:
slow, for tests of durability). A crash may leave the last record torn: the reader detects it (too short, or a
bad CRC at the very end of the last segment), warns and stops there; every record before it is read. A record
that fails its check anywhere else is :class:`JournalCorrupt`, naming the file and the offset.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from kimiha.clock import SimClock
from kimiha.error import InvalidConfigurationError, InvalidStateError, OrchestratorError, SerializationError
from kimiha.event_bus import EventBus
from kimiha.types import BackgroundTask, Connector

__all__ = ["FSYNC_POLICIES", "META_CHANNEL", "JournalCorrupt", "JournalRecord", "JournalReplayer", "JournalWriteError",
           "JournalWriter", "MAGIC", "end_record", "journal_end", "journal_meta", "journal_segments", "read_journal"]

logger = logging.getLogger("kimiha.journal")

MAGIC = b"KIMIHAJ1"
#: The channel name of the record that carries a writer's ``meta`` (no bus channel has an empty name).
META_CHANNEL = ""
FSYNC_POLICIES = ("never", "batch", "always")
_HEAD = struct.Struct("<II")
#: The msgpack prefix of a record body after the channel name: uint64 sequence, uint64 publish_ns, bin32.
_NUMS = struct.Struct(">BQBQBI")
_MAX_RECORD = 1 << 30
#: Records are gathered in memory and written out once this much is buffered (or at each flush).
_BUFFER_BYTES = 1 << 20


class JournalCorrupt(SerializationError):
    """A journal record fails its check before the end of the journal; ``path`` and ``offset`` say where."""

    def __init__(self, message: str, *, path: str, offset: int) -> None:
        super().__init__(message)
        self.path = path
        self.offset = offset


class JournalWriteError(OrchestratorError, OSError):
    """The journal could not be written (a full disk, an I/O error): journaling stopped there. ``path`` names
    the segment, ``records`` how many records the journal holds (every one before the failure, whole)."""

    def __init__(self, message: str, *, path: str, records: int) -> None:
        super().__init__(message)
        self.path = path
        self.records = records


@dataclasses.dataclass(frozen=True)
class JournalRecord:
    """One journaled event: its channel's name, sequence, publish time and msgpack frame."""

    channel: str
    sequence: int
    publish_ns: int
    frame: bytes


def _name_bytes(name: str) -> bytes:
    return msgspec.msgpack.encode(name)


def _numbered_segments(base: Path) -> dict[int, Path]:
    """The ``PATH.N`` files (N = 1, 2, ...) next to ``base``, by N."""
    prefix = base.name + "."
    try:
        siblings = list(base.parent.iterdir())
    except OSError:  # no such directory: no segments
        return {}
    return {int(tail): p for p in siblings
            if p.name.startswith(prefix) and (tail := p.name[len(prefix):]).isdigit() and tail[0] != "0"}


def journal_segments(path: str | os.PathLike[str]) -> list[Path]:
    """Return the segment files of the journal at ``path``, in order (``PATH``, ``PATH.1``, ...).

    Raises
    ------
    JournalCorrupt
        When a segment is missing between two that exist (``PATH.1`` and ``PATH.3`` but no ``PATH.2``):
        reading past the gap would lose records silently, stopping before it would too.
    """
    base = Path(path)
    numbered = _numbered_segments(base)
    missing = [n for n in range(1, max(numbered, default=0) + 1) if n not in numbered]
    if missing:
        gap = base.with_name(f"{base.name}.{missing[0]}")
        raise JournalCorrupt(f"journal {str(base)!r}: segment {str(gap)!r} is missing, though "
                             f"{str(numbered[max(numbered)])!r} exists; the journal has a hole "
                             f"(missing: {', '.join(str(n) for n in missing[:10])})", path=str(gap), offset=0)
    return [base, *(numbered[n] for n in sorted(numbered))]


# ------------------------------------------------------------------------------------------------ writing
class JournalWriter(BackgroundTask):
    """Journal the frames of ``channels`` of ``bus`` to ``path`` (see the module's docstring for the format).

    Register it with the scheduler that runs the bus (``scheduler.register_background_task(writer)``); it
    subscribes in ``initialize`` (before any producer starts), writes each frame from the dispatch loop into a
    buffered file, flushes every ``flush_interval`` seconds (``fsync="batch"`` forces it to disk then), and
    closes the file in its shutdown hook, after every stage drained.

    A file that cannot be written (a full disk, an I/O error) stops the journal, never the dispatch loop: the
    writer unsubscribes, keeps :attr:`failed` (a :class:`JournalWriteError`) and calls ``on_failure`` with it
    once (default: log it as an error). The journal then ends with its last whole write, which
    :func:`read_journal` reads up to a torn tail at most.

    Parameters
    ----------
    bus : EventBus
    path : path
        The first segment; later ones are ``PATH.1``, ``PATH.2``, ... An existing journal there is replaced.
    channels : iterable of channel keys
    fsync : {"never", "batch", "always"}, default "never"
    rotate_bytes : int, optional
        Start a new segment before a record would take the current one past this size.
    flush_interval : float, default 0.05
        Seconds between flushes of the buffer to the file.
    on_failure : callable, optional
        ``on_failure(JournalWriteError)``, called once when a write fails (e.g. to stop the run); default: the
        error is logged.
    meta : dict, optional
        Written first (see the module's docstring); :func:`journal_meta` reads it back.
    end_meta : callable, optional
        When given, a clean close writes the end record, ``{"end": True}`` plus the dict ``end_meta()`` returns
        (:func:`journal_end`): a reader can tell a journal its writer closed from one cut short.
    """

    def __init__(self, bus: EventBus, path: str | os.PathLike[str], channels: Iterable[Any], *,
                 fsync: str = "never", rotate_bytes: int | None = None, flush_interval: float = 0.05,
                 name: str = "journal", on_failure: Callable[[JournalWriteError], Any] | None = None,
                 meta: dict[str, Any] | None = None, end_meta: Callable[[], dict[str, Any]] | None = None) -> None:
        if fsync not in FSYNC_POLICIES:
            raise InvalidConfigurationError(f"JournalWriter: fsync must be one of {FSYNC_POLICIES}, got {fsync!r}")
        if rotate_bytes is not None and (isinstance(rotate_bytes, bool) or not isinstance(rotate_bytes, int)
                                         or rotate_bytes < 1024):
            raise InvalidConfigurationError(
                f"JournalWriter: rotate_bytes must be None or an int >= 1024, got {rotate_bytes!r}")
        if not isinstance(flush_interval, (int, float)) or flush_interval <= 0:
            raise InvalidConfigurationError(
                f"JournalWriter: flush_interval must be seconds > 0, got {flush_interval!r}")
        self.name = name
        self.bus = bus
        self.path = Path(path)
        self.channels = [bus.channel(key) for key in channels]  # an unknown channel fails here, named
        if not self.channels:
            raise InvalidConfigurationError("JournalWriter: channels is empty; name at least one channel to journal")
        if on_failure is not None and not callable(on_failure):
            raise InvalidConfigurationError(f"JournalWriter: on_failure must be callable or None, got {on_failure!r}")
        self.on_failure = on_failure
        if end_meta is not None and not callable(end_meta):
            raise InvalidConfigurationError(f"JournalWriter: end_meta must be callable or None, got {end_meta!r}")
        self.end_meta = end_meta
        try:
            self._meta = None if meta is None else msgspec.msgpack.encode(dict(meta))
        except (TypeError, ValueError) as exc:
            raise InvalidConfigurationError(f"JournalWriter: meta must be a dict msgpack can encode: {exc}") from None
        self.fsync = fsync
        self.rotate_bytes = rotate_bytes
        self.flush_interval = float(flush_interval)
        self.records = 0
        self.bytes = 0
        self.lagged = 0
        self.segments: list[Path] = []
        self._file: Any = None
        self._buf = bytearray()
        self._segment_bytes = 0
        self._subs: list[Any] = []
        self._clock_now: Any = None
        #: Set when a write failed: journaling stopped there (see the class docstring).
        self.failed: JournalWriteError | None = None
        self._pending = 0  # records in _buf, not yet written

    def consumes(self) -> Any:
        return ()  # reads through handlers, which the dispatch loop calls: nothing to drain at shutdown

    async def initialize(self) -> None:
        try:
            for stale in _numbered_segments(self.path).values():  # an older journal's segments, holes and all
                stale.unlink()
            self._open(self.path)
        except OSError as exc:
            self._fail(exc)
            return
        try:
            clock = self.clock
        except InvalidStateError:  # used without a scheduler: records carry no publish time (0)
            self._clock_now = None
        else:
            # a background task's SimClock view does not move by itself: take the scheduler's time
            self._clock_now = (clock.root if isinstance(clock, SimClock) else clock).now_ns
        if self._meta is not None:
            self._write_meta(self._meta)
        for channel in self.channels:
            self._subs.append(channel.subscribe(self._writer_for(channel.name), frames=True,
                                                on_lag=self._on_lag))

    def _write_meta(self, frame: bytes) -> None:
        self._writer_for(META_CHANNEL)((0, 0, frame))
        if self._file is not None:  # written (not refused by a failed rotation)
            self.records -= 1  # not an event
            self._pending -= 1
        self.flush()

    def _open(self, path: Path) -> None:
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed by _close_segment; _buf buffers
        self.segments.append(path)
        self._file.write(MAGIC)
        self._segment_bytes = len(MAGIC)
        self.bytes += len(MAGIC)

    def _close_segment(self) -> None:
        file = self._file
        if file is None:
            return
        self.flush()
        self._file = None
        file.close()

    def _fail(self, exc: OSError) -> None:
        """A write failed: stop journaling (unsubscribe, drop the unwritten buffer, close the file) and keep
        the error, once."""
        first = self.failed is None
        if first:
            where = self.segments[-1] if self.segments else self.path
            self.records -= self._pending  # appended to the buffer, never written: not in the journal
            self.failed = JournalWriteError(
                f"journal {str(where)!r}: cannot write it ({exc.strerror or exc}); journaling stopped after "
                f"{self.records:,} records" + (f" (the {self._pending:,} after them were not written)"
                                               if self._pending else ""), path=str(where), records=self.records)
            self._pending = 0
            self.failed.__cause__ = exc
        for sub in self._subs:
            sub.close()
        del self._buf[:]
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()
            except OSError:
                pass
        if not first or self.failed is None:
            return
        if self.on_failure is None:
            logger.error("%s: %s", self.name, self.failed)
            return
        try:
            self.on_failure(self.failed)
        except Exception as hook_exc:  # the hook's own failure must not hide the journal's
            logger.error("%s: %s (and on_failure raised %r)", self.name, self.failed, hook_exc)

    def _writer_for(self, channel_name: str) -> Any:
        prefix = b"\x94" + _name_bytes(channel_name)
        pack_nums = _NUMS.pack
        pack_head = _HEAD.pack
        crc32 = zlib.crc32
        fixed = len(prefix) + _NUMS.size
        rotate = self.rotate_bytes
        always = self.fsync == "always"
        buf = self._buf

        # Called from the dispatch loop with (sequence, stamp, frame) for each event: appends the record to
        # an in-memory buffer (one bytearray, no file call per event); flush() and rotation write it out.
        def write(item: tuple[int, int, bytes]) -> None:
            if self._file is None:  # failed (or closed): the subscription is closing
                return
            seq, _, frame = item
            clock_now = self._clock_now
            body_head = prefix + pack_nums(0xCF, seq, 0xCF, clock_now() if clock_now else 0, 0xC6, len(frame))
            size = 8 + fixed + len(frame)
            if rotate is not None and self._segment_bytes + size > rotate and self._segment_bytes > len(MAGIC):
                self._rotate()
                if self._file is None:
                    return
            buf.extend(pack_head(size - 8, crc32(frame, crc32(body_head))))
            buf.extend(body_head)
            buf.extend(frame)
            self._segment_bytes += size
            self.records += 1
            self._pending += 1
            self.bytes += size
            if always:
                self.flush(sync=True)
            elif len(buf) >= _BUFFER_BYTES:
                self.flush(sync=False)

        return write

    def _rotate(self) -> None:
        try:
            self._close_segment()
            self._open(self.path.with_name(f"{self.path.name}.{len(self.segments)}"))
        except OSError as exc:
            self._fail(exc)

    def _on_lag(self, skipped: int) -> None:
        self.lagged += skipped
        logger.warning("%s: the journal fell behind and lost %d event(s) (a LAG channel overwrote them)",
                       self.name, skipped)

    async def execute(self) -> None:
        await asyncio.sleep(self.flush_interval)
        self.flush(sync=self.fsync == "batch")  # nothing to do once failed: the file is closed

    def flush(self, *, sync: bool | None = None) -> None:
        """Write the buffered records to the file, and to disk when ``sync`` (default: ``fsync != "never"``)."""
        file = self._file
        if file is None:
            return
        buf = self._buf
        done = 0
        try:
            if buf:
                done = file.write(buf)
                while done < len(buf):  # a raw write may take part of it (a disk filling up): the rest, again
                    done += file.write(buf[done:])
                del buf[:]
                self._pending = 0
            if sync if sync is not None else self.fsync != "never":
                os.fsync(file.fileno())
        except OSError as exc:
            self._pending -= _whole_records(buf, done)  # those reached the file: the reader gets them
            self._fail(exc)

    async def shutdown(self) -> None:
        for sub in self._subs:
            sub.close()
        if self._file is not None and self.end_meta is not None:  # a clean close (not after a failed write)
            end: dict[str, Any] = {"end": True}
            try:
                end.update(self.end_meta())
            except Exception as exc:  # the hook's failure must not lose the journal's close
                logger.error("%s: end_meta() raised %r; the end record carries only end=True", self.name, exc)
            try:
                frame = msgspec.msgpack.encode(end)
            except (TypeError, ValueError) as exc:
                logger.error("%s: end_meta() returned what msgpack cannot encode (%s)", self.name, exc)
                frame = msgspec.msgpack.encode({"end": True})
            self._write_meta(frame)
        self._close_segment()


def _whole_records(buf: bytearray, written: int) -> int:
    """How many records of ``buf`` (back to back, as the writer buffers them) end within its first ``written``
    bytes."""
    count = offset = 0
    while offset + _HEAD.size <= written:
        offset += _HEAD.size + _HEAD.unpack_from(buf, offset)[0]
        if offset > written:
            break
        count += 1
    return count


# ------------------------------------------------------------------------------------------------ reading
_decode_body = msgspec.msgpack.Decoder(tuple[str, int, int, bytes]).decode
#: The smallest record body: the array header, a one-byte channel name, two uint64 and a bin32 header.
_MIN_BODY = 1 + 1 + _NUMS.size


def _next_record(data: bytes, start: int) -> int | None:
    """Return the offset of the first whole record (plausible length, matching CRC) at or after ``start``, or
    None: what tells a damaged record header (records follow it) from a torn last record (nothing does)."""
    size = len(data)
    pos = start + _HEAD.size
    while (pos := data.find(b"\x94", pos)) != -1:
        offset = pos - _HEAD.size
        length, crc = _HEAD.unpack_from(data, offset)
        if _MIN_BODY <= length <= _MAX_RECORD and pos + length <= size and zlib.crc32(data[pos:pos + length]) == crc:
            return offset
        pos += 1
    return None


def read_journal(path: str | os.PathLike[str], *, channels: Iterable[str] | None = None,
                 warn: bool = True) -> Iterator[JournalRecord]:
    """Yield the records of the journal at ``path`` (every segment, in order), of ``channels`` only if given.

    The writer's ``meta`` and end records are not among them (:func:`journal_meta`, :func:`journal_end`) unless
    ``channels`` names :data:`META_CHANNEL`. A torn last record is skipped with a warning (``warn=False``: silently,
    for a second pass over a journal already read once); a record that fails its check elsewhere raises
    :class:`JournalCorrupt` naming the file and the offset; a file that is not a journal raises it too, and
    ``path`` naming a later segment of a journal (``PATH.1`` next to ``PATH``) raises
    :class:`~kimiha.error.InvalidConfigurationError`.
    """
    records = _read(path, None if channels is None else set(channels), warn)
    return records if channels is not None else (r for r in records if r.channel != META_CHANNEL)


def _first_segment_of(path: Path) -> Path | None:
    """The first segment of the journal ``path`` is a later segment of (``run.kj`` for ``run.kj.2``), or None."""
    stem, dot, tail = path.name.rpartition(".")
    if not dot or not stem or not tail.isdigit() or tail[0] == "0":
        return None
    base = path.with_name(stem)
    try:
        with open(base, "rb") as file:
            return base if file.read(len(MAGIC)) == MAGIC else None
    except OSError:
        return None


def _read(path: str | os.PathLike[str], wanted: set[str] | None, warn: bool = True) -> Iterator[JournalRecord]:
    """:func:`read_journal`, the meta and end records included (when ``wanted`` is None or names them)."""
    first = _first_segment_of(Path(path))
    if first is not None:
        raise InvalidConfigurationError(
            f"journal {str(path)!r}: this is a later segment of the journal {str(first)!r}; expected the first "
            f"segment ({str(first)!r}), which reads them all in order")
    segments = journal_segments(path)
    if not segments[0].exists():
        raise InvalidConfigurationError(f"journal {str(path)!r}: no such file")
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        data = segment.read_bytes()
        name = str(segment)
        if index and last and len(data) < len(MAGIC) and MAGIC.startswith(data):
            if not warn:
                return
            logger.warning("journal %r: the last segment ends inside its magic (%d byte(s)), as a crash or a "
                           "full disk right after a rotation leaves it; skipped", name, len(data))
            return
        if data[:len(MAGIC)] != MAGIC:
            raise JournalCorrupt(f"journal {name!r}: expected the magic {MAGIC!r} at offset 0, got "
                                 f"{data[:len(MAGIC)]!r}: not a kimiha journal", path=name, offset=0)
        offset = len(MAGIC)
        size = len(data)
        while offset < size:
            torn = None
            if size - offset < _HEAD.size:
                torn = f"{size - offset} byte(s) where an 8-byte record header belongs"
            else:
                length, crc = _HEAD.unpack_from(data, offset)
                end = offset + _HEAD.size + length
                if not _MIN_BODY <= length <= _MAX_RECORD:
                    if not last:
                        raise JournalCorrupt(f"journal {name!r}: record at offset {offset} claims {length:,} "
                                             f"bytes (a record body is {_MIN_BODY} to {_MAX_RECORD:,})",
                                             path=name, offset=offset)
                    torn = f"a header claiming {length:,} bytes"
                elif end > size:
                    torn = f"{size - offset - _HEAD.size} of its {length} body byte(s)"
                elif zlib.crc32(data[offset + _HEAD.size:end]) != crc:
                    if not last or end != size:
                        raise JournalCorrupt(f"journal {name!r}: record at offset {offset} fails its CRC check "
                                             f"(corrupt; {size - end:,} byte(s) follow it)", path=name,
                                             offset=offset)
                    torn = "a body that fails its CRC check"
            if torn is not None and last and (later := _next_record(data, offset + 1)) is not None:
                # a whole record follows: this one was not cut short by a crash, its header is damaged
                raise JournalCorrupt(f"journal {name!r}: record at offset {offset} is corrupt ({torn}, but a "
                                     f"valid record follows at offset {later})", path=name, offset=offset)
            if torn is not None:
                if not last:
                    raise JournalCorrupt(f"journal {name!r}: segment ends inside a record at offset {offset} "
                                         f"({torn}) though later segments follow", path=name, offset=offset)
                if warn:
                    logger.warning("journal %r: the last record (offset %d) is torn (%s), as a crash mid-write "
                                   "leaves it; skipped, every record before it was read", name, offset, torn)
                return
            try:
                channel, seq, ts, frame = _decode_body(data[offset + _HEAD.size:end])
            except msgspec.DecodeError as exc:
                raise JournalCorrupt(f"journal {name!r}: record at offset {offset} passes its CRC but is not "
                                     f"[channel, sequence, publish_ns, frame]: {exc}", path=name,
                                     offset=offset) from None
            offset = end
            if wanted is None or channel in wanted:
                yield JournalRecord(channel, seq, ts, frame)


def journal_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the ``meta`` dict the journal at ``path`` was written with (``{}`` when it has none)."""
    first = next(_read(path, None, warn=False), None)  # the meta record comes first or not at all
    if first is None or first.channel != META_CHANNEL:
        return {}
    try:
        meta = msgspec.msgpack.decode(first.frame)
    except msgspec.DecodeError as exc:
        raise JournalCorrupt(f"journal {str(path)!r}: its meta record is not msgpack: {exc}", path=str(path),
                             offset=len(MAGIC)) from None
    return meta if isinstance(meta, dict) else {}


def journal_end(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """Return the end record of the journal at ``path`` (``{"end": True, ...}``, what its writer wrote when it
    closed cleanly), or None when it has none: its writer did not close it (a crash, a failed write, an
    interrupt before the run was under way)."""
    end: dict[str, Any] | None = None
    for record in _read(path, {META_CHANNEL}, warn=False):  # the meta record, then the end record if any
        end = end_record(record.frame)
    return end


def end_record(frame: bytes) -> dict[str, Any] | None:
    """Return the end record a :data:`META_CHANNEL` record's ``frame`` holds, or None when it is not one."""
    try:
        value = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    return value if isinstance(value, dict) and value.get("end") is True else None


# ------------------------------------------------------------------------------------------------ replay
class JournalReplayer(Connector):
    """Publish the journal's records of ``channels`` into ``bus`` (``publish_raw_async``, in file order).

    Under a :class:`~kimiha.clock.SimClock` it sets its clock to each record's ``publish_ns`` before
    publishing it. ``finished`` is set once every record was published; ``published`` counts them by channel.
    ``warn=False``: no second warning about a torn last record (a caller that read the journal once already).
    """

    def __init__(self, bus: EventBus, path: str | os.PathLike[str], channels: Iterable[Any], *,
                 chunk: int = 256, name: str = "journal-replayer", warn: bool = True) -> None:
        self.name = name
        self.path = Path(path)
        self._targets = {bus.channel(key).name: bus.channel(key) for key in channels}
        if not self._targets:
            raise InvalidConfigurationError("JournalReplayer: channels is empty; name at least one channel")
        self._records: Iterator[JournalRecord] = read_journal(path, channels=list(self._targets), warn=warn)
        self._chunk = chunk
        self.published: dict[str, int] = dict.fromkeys(self._targets, 0)
        self.finished = asyncio.Event()

    @property
    def lines(self) -> int:
        """Records published so far, all channels."""
        return sum(self.published.values())

    async def execute(self) -> None:
        if self.finished.is_set():
            await asyncio.Event().wait()  # nothing left: idle until shutdown cancels us
        try:
            clock = self.clock
        except InvalidStateError:
            clock = None
        sim = clock if isinstance(clock, SimClock) else None
        targets = self._targets
        for _ in range(self._chunk):
            record = next(self._records, None)
            if record is None:
                self.finished.set()
                return
            if sim is not None and record.publish_ns and not sim.set_time(record.publish_ns):
                await sim.advance_to(record.publish_ns)
            await targets[record.channel].publish_raw_async(record.frame)
            self.published[record.channel] += 1
        await asyncio.sleep(0)

