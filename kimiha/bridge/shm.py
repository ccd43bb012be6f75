"""The same-host transport: a channel's frames through a broadcast ring in shared memory (``transport="shm"``).

:class:`ShmBridge` has the export/import API of :class:`~kimiha.bridge.NatsBridge`: ``export_channel`` makes
one process the writer of a ring named after the subject, ``import_channel`` attaches a reader in another
process (as many as ``max_readers``), ``register(scheduler)`` runs them as tasks. No broker, no socket: a
frame is copied into the ring once by the writer and once out of it by each reader.

Files, under ``directory`` (default ``/dev/shm/kimiha-<uid>``, mode 0700), one folder per subject::

    ring           the segment (kimiha.bridge._shm: header, reader slots, frame slots, data)
    w.lock         flock()ed by the writer while it lives;  r<i>.lock  by reader i while it lives
    w.fifo         wakes a writer waiting for room (BLOCK);  r<i>.fifo  wakes reader i waiting for frames

* **Overflow.** ``BLOCK`` (default): the writer never overwrites a frame an attached reader has not read;
  when the ring is full it stops reading its local channel, whose publishers then wait (nothing lost).
  ``LAG``: the writer never waits; a reader that falls more than the ring behind skips what was overwritten,
  counts it exactly (``missing``) and goes on from the oldest frame still there. An event larger than the
  ring's largest frame (a quarter of ``data_bytes``) is dropped by the writer (logged: channel, size, limit,
  ring position) but keeps its place in the ring's sequence as a *hole*, which every reader counts
  (``dropped_by_writer``) and names in a warning: nothing is lost silently on either ring.
* **Wake-ups.** A reader with nothing to read sets its waiting flag and sleeps on its FIFO (in the event loop,
  no thread, no spinning); the writer writes one byte to the FIFO of each reader that sleeps after a batch
  (the flag and the head are sequentially consistent: a frame written while a reader goes to sleep is never
  missed). ``busy_poll=True`` makes a reader poll the ring on every pass of its loop instead: lower latency,
  one core busy (an idle pass calls ``sched_yield`` so that, on a machine with fewer free cores than busy
  processes, the writer is not starved by its polling readers).
* **Batches.** A reader publishes what the ring holds in one compiled call per wake-up or pass
  (``Ring.pump``: copy out, validate by decoding, write into the local channel, record the latency; the checks
  of ``Channel.publish_raw``), a writer copies what its channel holds in one call (``Ring.write``) and wakes
  each sleeping reader once per batch.
* **Crashes.** Liveness is the kernel's: a lock held with ``flock`` goes when its process dies, however it
  dies. A BLOCK writer waiting for room checks its readers' locks (every ``liveness_interval`` s) and detaches
  a dead one (``readers_lost``), so a killed reader never blocks it for more than that. A reader sees a dead
  writer the same way (``writer_alive`` False in its stats, logged); frames written before the crash are still
  read. A writer started again on the same subject takes the ring over where it stopped (the readers go on,
  ``writer_restarts`` counted); a reader started again with the same ``durable`` name resumes at its saved
  cursor (nothing lost or repeated while the ring still holds its frames; what was overwritten meanwhile is
  counted as ``missing``). A ring file truncated under the mapping (by another process) is found by an
  ``fstat`` before each batch: the endpoint fails once with a clear error (``failed`` in its stats) instead
  of the process dying of SIGBUS.
* **Cleanup.** The last one out (writer or reader, at shutdown, when no other process holds a lock) removes
  the subject's folder; :func:`remove_stale` removes folders whose processes are all gone (after a crash).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import mmap
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from kimiha._core import LatencyHistogram, monotonic_ns
from kimiha.bridge.endpoint import BridgeTasks
from kimiha.bridge.link import _Waiters, wait_until
from kimiha.bridge.wire import new_sender_id
from kimiha.channel_config import Overflow
from kimiha.error import (
    ChannelClosed,
    ChannelFull,
    InvalidConfigurationError,
    InvalidStateError,
    OrchestratorError,
)
from kimiha.event_bus import EventBus
from kimiha.types import BackgroundTask

__all__ = ["ShmBridge", "ShmExporter", "ShmImporter", "default_directory", "remove_stale"]

logger = logging.getLogger("kimiha.bridge")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _ring_module() -> Any:
    try:
        from kimiha.bridge import _shm
    except ImportError as exc:  # pragma: no cover - a non-POSIX build
        raise InvalidConfigurationError(f"the shared-memory transport needs the compiled kimiha.bridge._shm "
                                        f"(POSIX builds only): {exc}") from None
    return _shm


#: How long a busy-polling importer spins on the ring's head per idle pass of the loop (microseconds).
DEFAULT_SPIN_US = 50.0
MAX_SPIN_US = 10_000


def _ignore_lag(skipped: int) -> None:
    """The eager exporter's handler does not count losses: its frames subscription does (``lagged``)."""


def default_directory() -> Path:
    """Return where segments live by default: ``/dev/shm/kimiha-<uid>`` (RAM), else the temporary directory."""
    base = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    return base / f"kimiha-{os.getuid()}"


def _check_name(what: str, value: Any) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value) or len(value) > 200:
        raise InvalidConfigurationError(f"{what}: expected letters, digits, '_', '.' or '-' (a file name, not "
                                        f"starting with '.' or '-'), got {value!r}")
    return value


def _positive_int(name: str, value: Any, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidConfigurationError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _pow2(name: str, value: Any) -> int:
    number = _positive_int(name, value, low=2)
    if number & (number - 1):
        raise InvalidConfigurationError(f"{name}: expected a power of two, got {value!r}")
    return number


def _lock(path: Path, flags: int, *, create: bool = True) -> int | None:
    """Open ``path`` and ``flock`` it with ``flags | LOCK_NB``; return the fd, or None if someone holds it
    (or, with ``create=False``, if it does not exist)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0), 0o600)
    except FileNotFoundError:
        if create:
            raise
        return None
    try:
        fcntl.flock(fd, flags | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _held(path: Path) -> bool:
    """Whether a live process holds ``path``'s lock (a missing file: no)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _fifo(path: Path) -> int:
    """Create (if needed) and open FIFO ``path`` for reading, without blocking and without EOF."""
    try:
        os.mkfifo(path, 0o600)
    except FileExistsError:
        pass
    return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)


def _drain_fd(fd: int) -> None:
    """Empty a wake-up FIFO: one read unless it was full (a short read took all it held)."""
    try:
        while len(os.read(fd, 4096)) == 4096:
            pass
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:
        pass


async def _sleep_on(waiters: _Waiters, fut: asyncio.Future[None], timeout: float) -> None:
    """Wait for ``fut`` (armed on ``waiters``) at most ``timeout`` s: a timer notifies ``waiters`` then. One
    future and one timer handle per wait: half what ``asyncio.timeout`` costs per wake-up (measured, uvloop)."""
    handle = asyncio.get_running_loop().call_later(timeout, waiters.notify)
    try:
        await fut
    finally:
        handle.cancel()
        waiters.disarm(fut)


def _private_dir(path: Path) -> None:
    """Make ``path`` (mode 0700) if missing; refuse one another user owns (its rings would not be ours)."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    owner = path.stat().st_uid
    if owner != os.getuid():
        raise InvalidConfigurationError(f"shared-memory directory {str(path)!r} belongs to uid {owner}, not to "
                                        f"this process (uid {os.getuid()}); give ShmBridge(directory=...) one of "
                                        f"your own")


def _allocate(fd: int, size: int, path: Path) -> None:
    """Give the segment file ``size`` bytes, reserved now: a sparse file on a full ``/dev/shm`` would kill
    the process with SIGBUS at its first write to a page the kernel cannot supply, instead of failing here."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
        else:  # pragma: no cover - macOS: no way to reserve; the size at least
            os.ftruncate(fd, size)
    except OSError as exc:
        raise InvalidStateError(f"shared-memory ring {str(path.parent)!r}: cannot reserve its {size} bytes in "
                                f"{str(path.parent.parent)!r} ({os.strerror(exc.errno or 0)}); free space there "
                                f"(df {path.parent.parent}) or give a smaller capacity/data_bytes") from exc


class _Segment:
    """One subject's folder and mapped ring (opened, or created with the given geometry if missing)."""

    def __init__(self, path: Path, *, capacity: int, data_bytes: int, max_readers: int, block: bool) -> None:
        shm = _ring_module()
        self.path = path
        _private_dir(path.parent)
        path.mkdir(mode=0o700, exist_ok=True)
        ring_path = path / "ring"
        self.created = False
        try:
            fd = os.open(ring_path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            size = shm.segment_size(capacity, data_bytes, max_readers)
            tmp = path / f"ring.{os.getpid()}.{secrets.token_hex(4)}.tmp"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            made = False
            try:
                _allocate(fd, size, tmp)
                with mmap.mmap(fd, size) as mm:
                    shm.init_segment(mm, capacity, data_bytes, max_readers, block)
                try:
                    os.link(tmp, ring_path)  # atomic: a concurrent creator's ring wins, ours is dropped
                    self.created = True
                except FileExistsError:
                    pass
                made = True
            finally:
                os.close(fd)
                os.unlink(tmp)
                if not made:
                    with contextlib.suppress(OSError):
                        path.rmdir()  # ours if empty (a folder another process uses is not)
            fd = os.open(ring_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self.mm = mmap.mmap(fd, os.fstat(fd).st_size)
            # the fd stays open: the ring fstat()s it before each batch, so a file truncated under the mapping
            # is an InvalidStateError, not a SIGBUS
            self.ring = shm.Ring(self.mm, fd)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def close(self) -> None:
        self.ring.release()
        try:
            self.mm.close()
        except BufferError:  # pragma: no cover - a frame view still alive
            pass
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def busy(self) -> bool:
        """Whether any live process still holds a lock in this folder."""
        return any(_held(p) for p in self.path.glob("*.lock"))


def remove_stale(directory: str | os.PathLike[str] | None = None) -> list[str]:
    """Remove the subject folders under ``directory`` whose writer and readers are all gone; return them."""
    base = Path(directory) if directory is not None else default_directory()
    removed: list[str] = []
    if not base.is_dir():
        return removed
    for path in base.iterdir():
        if path.is_dir() and (path / "ring").exists() and not any(_held(p) for p in path.glob("*.lock")):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


class _ShmEndpoint(BackgroundTask):
    def __init__(self, bus: EventBus, event_type: Any, subject: str, *, directory: Path, capacity: int,
                 data_bytes: int, max_readers: int, block: bool, batch: int, liveness_interval: float,
                 name: str, bridge: str = "kimiha") -> None:
        self.name = name
        self.bridge = bridge
        self._channel = bus.channel(event_type)
        self.event_type = event_type
        self.type_name = self._channel.name
        self.subject = subject
        self.path = directory / subject
        self.capacity = capacity
        self.data_bytes = data_bytes
        self.max_readers = max_readers
        self.block = block
        self.batch = batch
        self.liveness_interval = liveness_interval
        self._seg: _Segment | None = None
        self._ring: Any = None
        self._final: dict[str, int] = {"head": 0, "lost": 0, "readers": 0}  # the ring's figures once closed
        self._wake = _Waiters()
        self._fifo_fd = -1
        self._lock_fd = -1
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log_budget = 20
        #: Why this endpoint stopped working for good (its ring's file shrank under the mapping), or None.
        self.failed: str | None = None

    def _broke(self, exc: BaseException) -> None:
        """The ring is unusable (its file shrank): say so once, raise it for the scheduler; later rounds idle."""
        self.failed = f"{self.name}: ring {self.path}: {exc}"
        logger.error("%s", self.failed)
        raise InvalidStateError(self.failed) from None

    def _ring_figure(self, what: str) -> int:
        """``head`` or ``lost`` of the ring (its last known value once closed, or if its file shrank)."""
        if self._ring is not None:
            try:
                self._final[what] = int(getattr(self._ring, what))
            except InvalidStateError:
                pass
        return self._final[what]

    def attached_readers(self) -> int:
        """How many readers the ring has attached now (0 once closed)."""
        ring = self._ring
        if ring is None:
            return 0
        try:
            return sum(1 for i in range(ring.max_readers) if ring.reader(i)[0] == 1)
        except InvalidStateError:
            return 0

    def _identity(self) -> dict[str, Any]:
        return {"channel": self.type_name, "subject": self.subject, "delivery": "shm", "stream": None,
                "path": str(self.path)}

    def _open(self) -> None:
        self._seg = _Segment(self.path, capacity=self.capacity, data_bytes=self.data_bytes,
                             max_readers=self.max_readers, block=self.block)
        ring = self._ring = self._seg.ring
        found = (ring.capacity, ring.data_size, ring.max_readers, bool(ring.block))
        asked = (self.capacity, self.data_bytes, self.max_readers, self.block)
        if not self._seg.created and found != asked:  # the ring keeps its geometry: say so, once
            def show(g: tuple[int, int, int, bool]) -> str:
                return f"capacity {g[0]}, data_bytes {g[1]}, max_readers {g[2]}, overflow {'block' if g[3] else 'lag'}"
            logger.warning("%s: ring %s already exists with %s; this side asked for %s and uses the ring's "
                           "(remove the ring, or give the same settings on every side)", self.name, self.path,
                           show(found), show(asked))
            self.capacity, self.data_bytes, self.max_readers, self.block = found  # (what stats() reports)

    def _listen(self, fifo: Path) -> None:
        self._fifo_fd = _fifo(fifo)
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fifo_fd, self._on_fifo)

    def _on_fifo(self) -> None:
        _drain_fd(self._fifo_fd)
        self._wake.notify()

    def _close(self) -> None:
        if self._loop is not None and self._fifo_fd >= 0:
            try:
                self._loop.remove_reader(self._fifo_fd)
            except Exception:  # pragma: no cover - loop already closed
                pass
        for fd in (self._fifo_fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fifo_fd = self._lock_fd = -1
        seg, self._seg = self._seg, None
        if seg is not None:
            ring, self._ring = self._ring, None
            try:
                self._final = {"head": int(ring.head), "lost": int(ring.lost), "readers": 0}
            except InvalidStateError:  # the file shrank under the mapping: nothing more is read from it
                pass
            seg.close()
            try:
                if not seg.busy():  # the last one out removes the folder (another may just have done so)
                    shutil.rmtree(seg.path, ignore_errors=True)
            except OSError as exc:  # pragma: no cover - best effort
                logger.debug("%s: cleanup of %s: %r", self.name, seg.path, exc)


class ShmExporter(_ShmEndpoint):
    """Write every event of a local channel into a shared-memory ring (role ``bridge-export``).

    Made by :meth:`ShmBridge.export_channel`. Counters: :meth:`stats`.
    """

    role = "bridge-export"

    def __init__(self, bus: EventBus, event_type: Any, subject: str, *, flush_timeout: float, eager: bool = False,
                 **kw: Any) -> None:
        super().__init__(bus, event_type, subject, **kw)
        self.flush_timeout = flush_timeout
        self.drain_timeout = flush_timeout  # the scheduler's drain waits no longer than this for its readers
        self._flush_by: float | None = None  # (loop time) set when the stop's drain begins: see drain_started
        self.eager = eager
        self.sender = new_sender_id()
        self._sub: Any = None
        self._nudge_sub: Any = None
        self._broken: BaseException | None = None
        self._draining = False
        self.eager_writes = 0
        self._pending: list[Any] = []
        self._start = 0
        self._reader_fds: dict[int, int] = {}
        self._lock_fds: dict[int, int] = {}
        self._next_check = 0.0
        self._stopping = False
        self._progress = _Waiters()
        self.sent = 0
        self.dropped = 0
        self.lagged = 0
        self.waits = 0
        self.wakeups = 0
        self.readers_lost = 0
        self.writer_restart = False
        self.unflushed = 0
        self.errors = 0

    @property
    def last_seq(self) -> int:
        """The ring's position after the last frame written (its readers' ``position`` reaches it)."""
        return self._ring_figure("head")

    @property
    def lost(self) -> int:
        return self.lagged + self.dropped

    @property
    def pending(self) -> int:
        return len(self._pending) - self._start

    def stats(self) -> dict[str, Any]:
        """Return the exporter's counters.

        ``channel``, ``subject``, ``path``: what is exported where (``delivery`` "shm"); ``sender``: this
        writer's id in the ring; ``sent``: frames written into the ring (``eager_writes`` of them by the eager
        handler, with ``eager``); ``buffered``: taken from the channel, not yet written (the ring full);
        ``unflushed``: what the shutdown could not write (``buffered`` plus what stayed in the channel);
        ``head``: the ring's position after the last frame; ``readers``: readers attached now,
        ``readers_lost``: detached because their process was gone; ``took_over``: this writer took the ring
        over from a previous one; ``dropped``: events too large for a frame (a hole in the sequence that each
        reader counts); ``lagged``: events the channel (LAG) overwrote before they were taken;
        ``blocked_waits``: waits for room (BLOCK); ``wakeups_sent``: FIFO wake-ups to sleeping readers;
        ``errors``: dropped plus write errors; ``failed``: why the ring is unusable, or None. ``acked``,
        ``in_flight`` and ``resent`` keep the NATS exporter's shape (a ring has no acknowledgements).
        """
        readers = self.attached_readers()
        return {
            **self._identity(),
            "sender": self.sender,
            "sent": self.sent,
            "acked": None,
            "in_flight": 0,
            "buffered": self.pending,
            "head": self.last_seq,
            "overflow": "block" if self.block else "lag",
            "eager": self.eager,
            "eager_writes": self.eager_writes,
            "capacity": self.capacity,
            "readers": readers,
            "readers_lost": self.readers_lost,
            "took_over": self.writer_restart,
            "dropped": self.dropped,
            "lagged": self.lagged,
            "resent": 0,
            "blocked_waits": self.waits,
            "wakeups_sent": self.wakeups,
            "errors": self.errors,
            "unflushed": self.unflushed,
            "failed": self.failed,
        }

    async def initialize(self) -> None:
        self._open()
        fd = _lock(self.path / "w.lock", fcntl.LOCK_EX)
        if fd is None:
            pid = self._ring.writer_pid
            self._close()
            raise InvalidStateError(f"{self.name}: shared-memory ring {str(self.path)!r} already has a live writer "
                                    f"(pid {pid}); one writer per subject")
        self._lock_fd = fd
        ring = self._ring
        self.writer_restart = ring.generation != 0
        if self.writer_restart:
            logger.warning("%s: taking over ring %s from a previous writer (pid %d) at frame %d", self.name,
                           self.path, ring.writer_pid, ring.head)
        ring.set_writer(os.getpid(), int.from_bytes(secrets.token_bytes(8), "little") | 1, self.sender)
        self._listen(self.path / "w.fifo")
        self._sub = self._channel.subscribe(frames=True, on_lag=self._on_lag)
        if self.eager:
            # a handler that writes what the frames subscription holds as soon as an event is published (in
            # publish on an INLINE channel); the frames subscription keeps the accounting (cursor, BLOCK, lag)
            self._nudge_sub = self._channel.subscribe(self._nudge, on_lag=_ignore_lag)

    def _on_lag(self, skipped: int) -> None:
        self.lagged += skipped
        self._ring.set_lost(self.lagged + self.dropped)
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: fell behind channel %r: %d event(s) overwritten before export (lost; a channel "
                           "with overflow=Overflow.BLOCK holds its publishers instead, or give it more capacity)",
                           self.name,
                           self.type_name, skipped)

    def _take(self, items: list[Any]) -> None:
        # a channel that does not track latency hands out publish_ns 0: Ring.write stamps those with its own time
        if self._start < len(self._pending):
            self._pending = self._pending[self._start:] + items
        else:
            self._pending = items
        self._start = 0

    def _nudge(self, _event: Any) -> None:
        """Eager export: write what the frames subscription holds now, unless a backlog waits for room or a
        drain is under way (then :meth:`execute` writes it, in order, and this call only wakes it)."""
        if self._draining or self._start < len(self._pending) or self.failed is not None or self._stopping:
            # (a drain frees slots, which lets waiting publish_threadsafe payloads in: their publishes call
            # this handler from inside that drain, before its events are written -- they must wait their turn)
            self._wake.notify()
            return
        try:
            items = self._drain(self.batch)
        except ChannelClosed:
            return
        if not items:
            return
        self._take(items)
        sent = self.sent
        try:
            self._write_ready()
        except _ring_module().RingTruncated as exc:  # execute() reports it to the scheduler (see _broke)
            self._broken = exc
            self._wake.notify()
            return
        finally:
            self.eager_writes += self.sent - sent
        if self._start < len(self._pending):
            self._wake.notify()  # the ring is full: execute() waits for room

    def _drain(self, limit: int | None) -> list[Any]:
        """Take up to ``limit`` frames from the channel (the eager handler stays out while this runs)."""
        self._draining = True
        try:
            items: list[Any] = self._sub.drain(limit)
        finally:
            self._draining = False
        return items

    async def execute(self) -> None:
        if self._broken is not None:  # the eager handler found the ring's file shrunk
            exc, self._broken = self._broken, None
            self._broke(exc)
        if self.failed is not None:  # the ring is unusable: idle (see _broke)
            await self._wake.wait(self.liveness_interval)
            return
        if self._start >= len(self._pending):
            try:
                items = self._drain(self.batch)
                if not items:
                    if self.eager:  # the handler writes each event; this pass only takes a backlog left to it
                        await self._wake.wait(self.liveness_interval)
                        return
                    items = await self._sub.recv_batch(self.batch)
            except ChannelClosed:
                await self._wake.wait(self.liveness_interval)
                return
            self._take(items)
        try:
            if not await self._write_some():
                await self._wait_room(self.liveness_interval)
        except _ring_module().RingTruncated as exc:  # (evaluated only when something is raised)
            self._broke(exc)

    async def _write_some(self) -> bool:
        """Write what is pending, as much as fits; return False if nothing could be written (full)."""
        return self._write_ready()

    def _write_ready(self) -> bool:
        """:meth:`_write_some`, callable from a handler (it never waits)."""
        ring = self._ring
        pending = self._pending
        progressed = False
        while self._start < len(pending):
            n = ring.write(pending, self._start)
            if n:
                self._start += n
                self.sent += n
                progressed = True
                self._poke_readers()
                continue
            _, ts, frame = pending[self._start]
            if len(frame) > ring.max_frame:
                # dropped, but its place stays in the ring's sequence: every reader sees the hole and counts it
                position = ring.head
                if not ring.write_hole(ts, len(frame)):
                    break  # BLOCK and full: the hole waits for room like a frame
                self._start += 1
                self.dropped += 1
                self.errors += 1
                ring.set_lost(self.lagged + self.dropped)
                logger.error("%s: dropped an event of %d bytes on channel %r: it exceeds the largest frame of "
                             "ring %s (%d bytes, a quarter of data_bytes %d); its readers see a hole at frame %d",
                             self.name, len(frame), self.type_name, self.path, ring.max_frame, ring.data_size,
                             position)
                self._poke_readers()
                progressed = True
                continue
            break
        if progressed:
            self._progress.notify()
        return progressed or self._start >= len(pending)

    def _poke_readers(self) -> None:
        if self._ring.sleepers:  # (seen by the last write: no reader sleeps, no flags to take)
            for idx in self._ring.take_waiting():
                self._poke(idx)

    def _poke(self, idx: int) -> None:
        fd = self._reader_fds.get(idx)
        try:
            if fd is None:
                fd = self._reader_fds[idx] = os.open(self.path / f"r{idx}.fifo",
                                                     os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            os.write(fd, b"\0")
            self.wakeups += 1
        except BlockingIOError:  # its FIFO is full of wake-ups already
            pass
        except OSError as exc:  # gone (ENXIO, ENOENT, EPIPE): the liveness check detaches it
            if fd is not None:
                os.close(fd)
                self._reader_fds.pop(idx, None)
            if exc.errno not in (errno.ENXIO, errno.ENOENT, errno.EPIPE):
                logger.debug("%s: wake-up of reader %d: %r", self.name, idx, exc)

    async def _wait_room(self, timeout: float) -> None:
        """The ring is full (BLOCK): sleep until a reader moves, checking for dead readers now and then."""
        ring = self._ring
        self.waits += 1
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.liveness_interval
            if self.check_readers():
                return
        ring.set_writer_waiting()
        fut = self._wake.arm()
        try:
            if await self._write_some():  # a reader moved between the failed write and the flag
                return
            await _sleep_on(self._wake, fut, min(timeout, max(0.001, self._next_check - time.monotonic())))
        finally:
            self._wake.disarm(fut)
            ring.clear_writer_waiting()

    def check_readers(self) -> int:
        """Detach every attached reader whose process is gone; return how many."""
        ring = self._ring
        gone = 0
        for idx in range(ring.max_readers):
            if ring.reader(idx)[0] != 1:
                continue
            try:
                fd = _lock(self.path / f"r{idx}.lock", fcntl.LOCK_EX)
            except FileNotFoundError:  # the folder is gone (removed by hand): nothing to wait for
                fd = None
                ring.detach(idx)
            if fd is None:
                continue  # alive
            try:
                if ring.reader(idx)[0] == 1:
                    ring.detach(idx)
                    gone += 1
                    self.readers_lost += 1
                    _, pid, cursor, _, name = ring.reader(idx)
                    logger.warning("%s: reader %d (pid %d%s) of %s is gone at frame %d of %d: detached, the ring "
                                   "no longer waits for it", self.name, idx, pid, f", durable {name!r}" if name else "",
                                   self.path, cursor, ring.head)
            finally:
                os.close(fd)
            old = self._reader_fds.pop(idx, None)
            if old is not None:
                os.close(old)
        return gone

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event published on the channel so far is in the ring; False on timeout."""
        target = self._channel.published
        sub = self._sub
        if sub is None:
            return target == 0
        return await wait_until(lambda: sub.cursor >= target and self._start >= len(self._pending), self._progress,
                                timeout)

    def drain_started(self, deadline: float) -> None:
        """Called by the scheduler when its stop begins to drain this exporter (``deadline``: the stop's, in loop
        time). The drain and the flush in :meth:`shutdown` then share one ``flush_timeout``, and the flush ends
        before the stop's deadline leaves the hooks no time (a stuck reader or a dead broker never costs more)."""
        from kimiha.scheduling.shutdown import HOOK_RESERVE

        self._flush_by = min(asyncio.get_running_loop().time() + self.flush_timeout, deadline - HOOK_RESERVE)

    async def shutdown(self) -> None:
        """Write what the channel still holds (within ``flush_timeout``), end the stream, release the ring."""
        self._stopping = True
        if self._sub is None:
            if self._seg is not None:
                self._close()
            return
        loop = asyncio.get_running_loop()
        deadline = self._flush_by if self._flush_by is not None else loop.time() + self.flush_timeout
        self._flush_by = None  # (this stop's: a later one is told again)
        try:
            while self.failed is None:
                try:
                    items = self._drain(None)
                except ChannelClosed:
                    items = []
                if items:
                    self._take(items)
                if self._start >= len(self._pending):
                    break
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                if not await self._write_some():
                    await self._wait_room(min(remaining, self.liveness_interval))
        except _ring_module().RingTruncated as exc:  # nothing more can be written: count what is left
            self.failed = f"{self.name}: ring {self.path}: {exc}"
            logger.error("%s", self.failed)
        finally:
            try:
                untaken = self._sub.backlog  # still in the channel: never taken (a failed ring takes nothing)
            except Exception:
                untaken = 0
            self.unflushed = self.pending + untaken
            if self.unflushed:
                why = (f"the ring failed: {self.failed}" if self.failed is not None else
                       f"its readers did not make room within {self.flush_timeout:.1f} s")
                logger.error("%s: %d event(s) of channel %r not written to the ring at shutdown (%s)", self.name,
                             self.unflushed, self.type_name, why)
            self._sub.close()
            if self._nudge_sub is not None:
                self._nudge_sub.close()
            ring = self._ring
            try:
                if ring is not None:
                    ring.set_closed()
                    for idx in range(ring.max_readers):
                        if ring.reader(idx)[0] == 1:
                            self._poke(idx)
            except InvalidStateError as exc:  # the ring's file shrank: release the mapping all the same
                logger.error("%s: %s", self.name, exc)
            for fd in self._reader_fds.values():
                os.close(fd)
            self._reader_fds.clear()
            self._close()


class ShmImporter(_ShmEndpoint):
    """Publish the frames of a shared-memory ring into a local channel (role ``bridge-import``).

    Made by :meth:`ShmBridge.import_channel`. Each frame is validated once by ``publish_raw``; a bad one is
    counted and skipped. Frames a LAG ring overwrote before they were read are counted in ``missing``.
    """

    role = "bridge-import"

    def __init__(self, bus: EventBus, event_type: Any, subject: str, *, durable: str | None, replay: str,
                 busy_poll: bool, spin_us: float = 0.0, **kw: Any) -> None:
        super().__init__(bus, event_type, subject, **kw)
        self.durable = durable
        self.replay = replay
        self.busy_poll = busy_poll
        self.spin_us = spin_us
        self._spin_ns = int(spin_us * 1000) if busy_poll else 0
        self.spins_found = 0
        self._idx = -1
        self._cursor = 0
        self._first = 0
        self._generation = 0
        self._writer_alive = True
        self._next_check = 0.0
        self._progress = _Waiters()
        self.latency = LatencyHistogram()
        self.delivered = 0
        self.missing = 0
        self.bad_frames = 0
        self.dropped_by_writer = 0
        self.last_hole: str | None = None
        self.waits = 0
        self.sleeps = 0
        self.writer_restarts = 0
        self.writer_deaths = 0
        self.resumed = False
        self.last_bad: str | None = None
        self._same_clock = True

    def position(self, sender: str | None = None) -> int:
        """Return the ring position accounted for here: frames published locally, bad, counted missing, or
        holes (frames the writer dropped, ``dropped_by_writer``).

        ``sender`` is accepted for symmetry with :meth:`ChannelImporter.position`; a ring has one sequence
        whatever writer incarnation wrote it.
        """
        return self._cursor

    async def wait_position(self, sender: str | None, seq: int, timeout: float | None = None) -> bool:
        """Wait until the ring's frames up to ``seq`` are accounted for; False if ``timeout`` ran out."""
        return await wait_until(lambda: self._cursor >= seq, self._progress, timeout)

    @property
    def lost_at_senders(self) -> int:
        return self._ring_figure("lost")

    def stats(self) -> dict[str, Any]:
        """Return the importer's counters and latency summary.

        ``slot``: this reader's place in the ring (``durable``: its name, ``resumed``: it took up where a
        predecessor of that name stopped); ``position``: the next frame to read, ``first_position``: where it
        began; ``received`` = ``delivered`` (published into the channel) + ``bad_frames`` (refused by the
        channel's decoder, skipped); ``missing``: frames a LAG ring overwrote before they were read;
        ``dropped_by_writer``: holes, events the writer could not carry (``last_hole`` says which);
        ``lost_at_senders``: what the writer lost before the ring (its channel lagged);
        ``channel_full_waits``: waits for room in the local (BLOCK) channel; ``sleeps``: waits on the wake-up
        (not busy-polling); ``busy_poll``, ``spin_us``: the polling mode, ``spins_found``: spins that ended with
        a frame; ``writer_alive``, ``writer_deaths``, ``writer_restarts``: the writer's process as last seen;
        ``failed``: why the ring is unusable, or None; ``latency_ns``: publish (in the writer) to import (here),
        a summary of the histogram. ``duplicates``, ``late``, ``foreign`` and ``held`` keep the NATS importer's
        shape (always 0 here: a ring neither repeats nor reorders).
        """
        return {
            **self._identity(),
            "durable": self.durable,
            "slot": self._idx,
            "position": self._cursor,
            "first_position": self._first,
            "resumed": self.resumed,
            "received": self.delivered + self.bad_frames,
            "delivered": self.delivered,
            "duplicates": 0,
            "missing": self.missing,
            "dropped_by_writer": self.dropped_by_writer,
            "last_hole": self.last_hole,
            "late": 0,
            "lost_at_senders": self.lost_at_senders,
            "bad_frames": self.bad_frames,
            "foreign": 0,
            "held": 0,
            "channel_full_waits": self.waits,
            "sleeps": self.sleeps,
            "busy_poll": self.busy_poll,
            "spin_us": self.spin_us if self.busy_poll else 0.0,
            "spins_found": self.spins_found,
            "writer_alive": self._writer_alive,
            "writer_deaths": self.writer_deaths,
            "writer_restarts": self.writer_restarts,
            "failed": self.failed,
            "last_bad_frame": self.last_bad,
            "latency_ns": self.latency.summary(),
        }

    async def initialize(self) -> None:
        self._open()
        ring = self._ring
        chosen = None
        # this durable reader's own place first, then a free one; another durable reader's saved place (its
        # process gone) only when nothing else is left
        for want_name in ((self.durable,) if self.durable else ()) + ("", None):
            for idx in range(ring.max_readers):
                state, _, _, _, name = ring.reader(idx)
                if want_name is not None and name != want_name:
                    continue
                fd = _lock(self.path / f"r{idx}.lock", fcntl.LOCK_EX)
                if fd is None:
                    continue
                chosen = (idx, fd, name)
                break
            if chosen is not None:
                break
        if chosen is None:
            self._close()
            raise InvalidStateError(f"{self.name}: shared-memory ring {str(self.path)!r} has no free reader slot "
                                    f"(max_readers {ring.max_readers}, all held by live processes)")
        idx, self._lock_fd, name = chosen
        if name and name != self.durable:
            logger.warning("%s: every reader slot of %s is taken; reusing the saved place of durable reader %r "
                           "(its cursor is lost)", self.name, self.path, name)
        head = ring.head
        _, _, saved, _, _ = ring.reader(idx)
        if self.durable and name == self.durable:
            self._cursor = min(saved, head)
            self.resumed = True
        elif self.replay == "all":
            self._cursor = max(0, head - ring.capacity)
        else:
            self._cursor = head
        self._first = self._cursor
        self._idx = idx
        self._generation = ring.generation
        self._listen(self.path / f"r{idx}.fifo")
        ring.attach(idx, os.getpid(), self._cursor, self.durable or "")
        if self.resumed:
            logger.info("%s: resumed durable reader %r of %s at frame %d (head %d)", self.name, self.durable,
                        self.path, self._cursor, head)

    async def execute(self) -> None:
        if self.failed is not None:  # the ring is unusable: idle (see _broke)
            await self._wake.wait(self.liveness_interval)
            return
        try:
            if await self._pump_once(spin=True):
                # the busy-poll spin saw frames arrive: read them now, not after a pass of the loop (once, and
                # with no second spin: the loop gets its pass after that, whatever this round finds)
                await self._pump_once(spin=False)
        except _ring_module().RingTruncated as exc:  # (evaluated only when something is raised)
            self._broke(exc)

    async def _pump_once(self, spin: bool) -> bool:
        """One round: publish what the ring holds; with nothing there, wait (:meth:`_idle`). Return True when
        the busy-poll spin saw frames arrive (read them at once)."""
        ring = self._ring
        start = self._cursor
        # the frames' loop runs in the compiled ring: copy out, validate, write into the channel,
        # record the latency (Ring.pump), one call per batch
        # commit=True: the progress is published in the same call (one check of the ring's file per round)
        cursor, lagged, delivered, holes, failed = ring.pump(self._idx, start, self.batch, self._channel,
                                                             self.latency, True)
        self.delivered += delivered
        if holes:
            self._holes(holes)
        if lagged:
            self.missing += lagged
            if self._log_budget > 0:
                self._log_budget -= 1
                logger.warning("%s: fell behind ring %s: %d frame(s) overwritten before they were read "
                               "(missing); resuming at frame %d", self.name, self.path, lagged,
                               start + lagged)
        if cursor != start or lagged:  # (the pump committed it: what was published is accounted for)
            self._committed(cursor, ring.writer_waits)
        if failed is not None:
            after = await self._failed(failed, cursor)
            if after != cursor:
                self._commit(after, 0)
        elif cursor == start and not lagged:
            return await self._idle(spin)
        return False

    async def _failed(self, failed: tuple[BaseException, int, bytes], cursor: int) -> int:
        """Deal with the frame at ``cursor`` whose publish raised; return the cursor after it (or at it, if
        the channel closed)."""
        exc, ts, data = failed
        channel: Any = self._channel
        if isinstance(exc, ChannelFull):  # BLOCK and full: wait for room (the ring then waits for us)
            self.waits += 1
            try:
                await channel.publish_raw_async(data, ts)
            except ChannelClosed:
                return cursor
            except Exception as again:
                self._bad(again, data, cursor)
            else:
                self.delivered += 1
                if ts > 0:
                    self.latency.record(monotonic_ns() - ts)
            return cursor + 1
        if isinstance(exc, ChannelClosed):
            await self._wake.wait(self.liveness_interval)  # the bus is closing: nothing to publish into
            return cursor
        self._bad(exc, data, cursor)
        return cursor + 1

    def _holes(self, holes: list[tuple[int, int, int]]) -> None:
        """Count the frames the writer dropped (holes in the ring's sequence) and say which."""
        self.dropped_by_writer += len(holes)
        for position, _, size in holes:
            self.last_hole = (f"frame {position} of {self.path}: the writer dropped an event of {size} bytes on "
                              f"channel {self.type_name!r} (the ring's largest frame is {self._ring.max_frame} "
                              f"bytes)")
            if self._log_budget > 0:
                self._log_budget -= 1
                logger.warning("%s: hole at %s", self.name, self.last_hole)

    def _bad(self, exc: BaseException, data: bytes, seq: int) -> None:
        self.bad_frames += 1
        why = str(exc) if isinstance(exc, OrchestratorError) else (
            f"channel {self.type_name!r} refused a frame of {len(data)} bytes: {type(exc).__name__}: {exc}")
        self.last_bad = f"{why} [frame {seq} of {self.path}]"[:300]
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: skipped a bad frame: %s", self.name, self.last_bad)

    def _commit(self, cursor: int, lagged: int) -> None:
        self._committed(cursor, self._ring.commit(self._idx, cursor, lagged))

    def _committed(self, cursor: int, writer_waits: bool) -> None:
        self._cursor = cursor
        if writer_waits:
            self._poke_writer()
        self._progress.notify()

    def _poke_writer(self) -> None:
        try:
            fd = os.open(self.path / "w.fifo", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, b"\0")
        except OSError:
            pass
        finally:
            os.close(fd)

    async def _idle(self, spin: bool = True) -> bool:
        ring = self._ring
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.liveness_interval
            self._watch_writer()
        if self.busy_poll:
            # spin on the ring's head for up to spin_us (no system call, no pass of the loop between the write
            # and its discovery); then let a process waiting for this core run first (the writer, on a machine
            # with fewer free cores than busy processes) -- with a core to itself this returns at once -- and
            # give the loop its pass (the scheduler yields to it after each execute()).
            if spin and self._spin_ns and ring.spin_until(self._cursor, self._spin_ns):
                self.spins_found += 1
                return True
            os.sched_yield()
            return False
        if not ring.sleep_if_idle(self._idx, self._cursor):
            if ring.closed and ring.head <= self._cursor:
                await self._wake.wait(self.liveness_interval)  # the stream ended: wait for a new writer
            return False
        self.sleeps += 1
        try:
            await _sleep_on(self._wake, self._wake.arm(), max(0.001, self._next_check - time.monotonic()))
        finally:
            ring.clear_waiting(self._idx)
        return False

    def _watch_writer(self) -> None:
        ring = self._ring
        generation = ring.generation
        if generation != self._generation:
            if self._generation:
                self.writer_restarts += 1
                logger.warning("%s: ring %s has a new writer (pid %d), continuing at frame %d", self.name, self.path,
                               ring.writer_pid, self._cursor)
            self._generation = generation
            self._writer_alive = True
        alive = _held(self.path / "w.lock")
        if self._writer_alive and not alive and generation and not ring.closed:
            self.writer_deaths += 1
            logger.warning("%s: the writer (pid %d) of ring %s is gone without closing it, at frame %d; waiting "
                           "for a new one", self.name, ring.writer_pid, self.path, ring.head)
        self._writer_alive = alive

    async def shutdown(self) -> None:
        """Stop reading: detach from the ring (a durable reader's place and cursor stay for its restart)."""
        ring = self._ring
        try:
            if ring is not None and self._idx >= 0:
                self._watch_writer()  # a writer change since the last idle check counts in the final stats
                ring.detach(self._idx)
        except InvalidStateError as exc:  # the ring's file shrank: release the mapping all the same
            logger.error("%s: %s", self.name, exc)
        self._close()


class ShmBridge(BridgeTasks):
    """Export local channels to shared-memory rings and import rings into local channels (one host).

    The export/import API of :class:`~kimiha.bridge.NatsBridge` over :mod:`kimiha.bridge.shm`'s rings:
    ``export_channel(event_type, subject)`` in the writing process, ``import_channel(event_type, subject)`` in
    each reading one, then :meth:`register` before the scheduler starts.

    Parameters
    ----------
    bus : EventBus
        The local bus.
    directory : str or Path, optional
        Where the rings live (default :func:`default_directory`); every process of a link must use the same.
    name : str
        Prefixes the bridge's task names.
    flush_timeout : float
        How long each exporter's shutdown may take to write what its channel still holds.
    liveness_interval : float
        How often a waiting writer checks for dead readers, and an idle reader for a dead writer (seconds).
    """

    def __init__(self, bus: EventBus, directory: str | os.PathLike[str] | None = None, *, name: str = "kimiha",
                 flush_timeout: float = 10.0, liveness_interval: float = 0.2) -> None:
        if not isinstance(bus, EventBus):
            raise InvalidConfigurationError(f"ShmBridge(bus): expected an EventBus, got {type(bus).__name__}")
        _ring_module()
        self.bus = bus
        self.name = _check_name("ShmBridge(name)", name)
        self.directory = Path(directory) if directory is not None else default_directory()
        for what, value in (("flush_timeout", flush_timeout), ("liveness_interval", liveness_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidConfigurationError(f"ShmBridge({what}): expected seconds > 0, got {value!r}")
        self.flush_timeout = float(flush_timeout)
        self.liveness_interval = float(liveness_interval)
        self.exporters: list[ShmExporter] = []
        self.importers: list[ShmImporter] = []
        self._registered = False

    def _check_open(self, what: str) -> None:
        if self._registered:
            raise InvalidStateError(f"ShmBridge {self.name!r}: {what} after register(); configure it first")

    def _subject(self, event_type: Any, subject: str | None, what: str) -> str:
        return _check_name(f"{what}(subject)", subject or f"kimiha.{self.bus.channel(event_type).name}")

    def _geometry(self, what: str, overflow: Any, capacity: int, data_bytes: int | None, max_readers: int,
                  batch: int) -> dict[str, Any]:
        if overflow not in (Overflow.BLOCK, Overflow.LAG, "block", "lag"):
            raise InvalidConfigurationError(f"{what}.overflow: expected Overflow.BLOCK or Overflow.LAG, got "
                                            f"{overflow!r}")
        capacity = _pow2(f"{what}.capacity", capacity)
        data_bytes = _pow2(f"{what}.data_bytes", data_bytes if data_bytes is not None else capacity * 256)
        return {"directory": self.directory, "capacity": capacity, "data_bytes": max(data_bytes, 4096),
                "max_readers": _positive_int(f"{what}.max_readers", max_readers),
                "block": overflow in (Overflow.BLOCK, "block"), "batch": _positive_int(f"{what}.batch", batch),
                "liveness_interval": self.liveness_interval, "bridge": self.name}

    def export_channel(self, event_type: Any, subject: str | None = None, *, overflow: Any = Overflow.BLOCK,
                       capacity: int = 8192, data_bytes: int | None = None, max_readers: int = 8,
                       batch: int = 1024, eager: bool = False) -> ShmExporter:
        """Write every event published on ``event_type``'s channel into the ring ``subject``.

        Parameters
        ----------
        overflow : Overflow
            ``BLOCK`` (never overwrite what an attached reader has not read) or ``LAG`` (never wait).
        capacity, data_bytes, max_readers : int
            The ring's geometry if this side creates it (frames, bytes of frames, reader slots; powers of two
            for the first two, ``data_bytes`` defaults to 256 per frame). A frame may take at most a quarter
            of ``data_bytes``. An existing ring keeps its own geometry.
        batch : int
            Frames taken from the channel per round.
        eager : bool
            Write events into the ring as they are published, not on the exporter's next pass of the event
            loop: on a ``Dispatch.INLINE`` channel inside ``publish`` itself, one by one (the publisher pays for
            the write; the lowest cross-process latency, but several times the writer's CPU per event under a
            flood: benchmarks/README.md), on a ``Dispatch.LOOP`` channel in its dispatch, a dispatch batch at a
            time. It is a handler subscription on the channel (``bus.stats()`` shows it among the subscribers,
            and its deliveries in ``delivered``). While the ring is full (BLOCK), events wait in the channel as
            without ``eager`` -- held there only if the channel is ``Overflow.BLOCK`` too; a LAG channel
            overwrites them and the exporter counts them in ``lagged``. The exporter's ``eager_writes`` counts
            the frames the handler wrote (the rest went through its task).
        """
        self._check_open("export_channel")
        if not isinstance(eager, bool):
            raise InvalidConfigurationError(f"export_channel.eager: expected True or False, got {eager!r}")
        channel = self.bus.channel(event_type)
        subject = self._subject(event_type, subject, "export_channel")
        if any(e.event_type == event_type for e in self.exporters):
            raise InvalidConfigurationError(f"channel {channel.name!r} is already exported by this bridge")
        exporter = ShmExporter(self.bus, event_type, subject, flush_timeout=self.flush_timeout, eager=eager,
                               name=f"shm-export:{channel.name}",
                               **self._geometry("export_channel", overflow, capacity, data_bytes, max_readers, batch))
        self.exporters.append(exporter)
        return exporter

    def import_channel(self, event_type: Any, subject: str | None = None, *, durable: str | None = None,
                       replay: str = "new", busy_poll: bool = False, spin_us: float | None = None,
                       overflow: Any = Overflow.BLOCK, capacity: int = 8192, data_bytes: int | None = None,
                       max_readers: int = 8, batch: int = 1024) -> ShmImporter:
        """Publish the frames of ring ``subject`` into ``event_type``'s channel.

        Parameters
        ----------
        durable : str, optional
            Name of this reader's place in the ring: a reader started again under the same name resumes at
            the cursor its predecessor left (nothing lost or repeated while the ring still holds the frames).
        replay : "new" or "all"
            Where a reader without a saved place starts: at the next frame written, or at the oldest the ring
            still holds.
        busy_poll : bool
            Poll the ring instead of sleeping on a wake-up (lower latency, one core busy): on each pass of the
            event loop that finds nothing, spin on the ring for up to ``spin_us`` first.
        spin_us : float, optional
            With ``busy_poll`` (only), how long one idle pass spins on the ring's head (a CPU pause between
            checks, the GIL released) before it gives the loop its pass: a frame written meanwhile is read
            within about a microsecond, not after a pass of the loop. Every pass of the loop that finds the
            ring idle spins once, so the loop's other work waits: a timer that fires and the task it wakes take
            a pass each, about 2-3x ``spin_us`` late in all (measured), times the busy-polling importers on
            that loop. 0: no spin (one check per pass). Default 50; at most 10,000. The importer's
            ``spins_found`` counts the spins that ended with a frame. On a host with fewer free cores than
            busy processes (two busy-polling readers and their writer on two cores), a short spin such as 5
            does better: a long one holds the core that the writer needs (``benchmarks/README.md``, shared
            memory on quiet cores).
        overflow, capacity, data_bytes, max_readers :
            The ring's geometry if this side creates it first (see :meth:`export_channel`).
        batch : int
            Frames read per round.
        """
        self._check_open("import_channel")
        channel = self.bus.channel(event_type)
        subject = self._subject(event_type, subject, "import_channel")
        if durable is not None:
            _check_name("import_channel.durable", durable)
        if replay not in ("new", "all"):
            raise InvalidConfigurationError(f"import_channel.replay: expected 'new' or 'all' (a ring keeps no "
                                            f"history beyond what it holds), got {replay!r}")
        if any(i.event_type == event_type and i.subject == subject for i in self.importers):
            raise InvalidConfigurationError(
                f"subject {subject!r} is already imported into channel {channel.name!r} by this bridge")
        if not isinstance(busy_poll, bool):
            raise InvalidConfigurationError(f"import_channel.busy_poll: expected True or False, got {busy_poll!r}")
        if spin_us is None:
            spin_us = DEFAULT_SPIN_US if busy_poll else 0.0
        elif not busy_poll and spin_us != 0:
            raise InvalidConfigurationError(f"import_channel.spin_us: applies to a busy-polling reader only "
                                            f"(busy_poll=True); got spin_us={spin_us!r} with busy_poll=False")
        if (isinstance(spin_us, bool) or not isinstance(spin_us, (int, float)) or not 0 <= spin_us <= MAX_SPIN_US
                or spin_us != spin_us):
            raise InvalidConfigurationError(f"import_channel.spin_us: expected a number of microseconds from 0 to "
                                            f"{MAX_SPIN_US:,}, got {spin_us!r}")
        same = sum(1 for i in self.importers if i.event_type == event_type)
        importer = ShmImporter(self.bus, event_type, subject, durable=durable, replay=replay,
                               busy_poll=busy_poll, spin_us=float(spin_us),
                               name=f"shm-import:{channel.name}" + (f"#{same + 1}" if same else ""),
                               **self._geometry("import_channel", overflow, capacity, data_bytes, max_readers, batch))
        self.importers.append(importer)
        return importer

    def exporter(self, event_type: Any) -> ShmExporter:
        """Return the exporter of ``event_type``'s channel."""
        return cast(ShmExporter, super().exporter(event_type))

    def importer(self, event_type: Any) -> ShmImporter:
        """Return the (first) importer into ``event_type``'s channel."""
        return cast(ShmImporter, super().importer(event_type))

    def stats(self) -> dict[str, Any]:
        """Return ``{"link": ..., "exports": {channel: ...}, "imports": {channel: ...}}``."""
        return {
            "link": {"transport": "shm", "directory": str(self.directory), "reconnects": 0},
            "exports": {e.type_name: e.stats() for e in self.exporters},
            "imports": {i.name.removeprefix("shm-import:"): i.stats() for i in self.importers},
        }

    def __repr__(self) -> str:
        return (f"<ShmBridge {self.name!r} {self.directory} exports={[e.type_name for e in self.exporters]} "
                f"imports={[i.type_name for i in self.importers]}>")
