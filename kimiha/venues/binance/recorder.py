"""Record a live session in the tape format: ``<recv_ts_ns> <JSON>`` lines, gzip, rotated by size or time.

:class:`TapeRecorder` writes exactly the lines a :class:`~kimiha.venues.binance.live.BinanceLiveFeed` queues
for the pipeline, as they arrive and in the order it hands them out (lines still queued at a stop included),
the REST snapshots among them where they were applied: a recording replays
through :func:`~kimiha.venues.binance.replay_lines` (``python -m kimiha demo --data PATH``) into the same book
states the live run saw.

Rotation starts a new file when the current one has taken ``rotate_bytes`` of uncompressed lines or has been
open ``rotate_seconds``: ``rec.gz``, then ``rec.1.gz``, ``rec.2.gz`` ... (replay them in that order, as one
stream; :attr:`TapeRecorder.paths` lists them). Lines are buffered and compressed in batches so a burst costs
one ``write`` per batch, not one per line; :meth:`TapeRecorder.close` flushes everything and ends the gzip
member properly, so a recording is never left truncated by a clean stop.
"""

from __future__ import annotations

import gzip
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from kimiha.error import InvalidConfigurationError

__all__ = ["TapeRecorder", "rotated_path"]

logger = logging.getLogger(__name__)


def rotated_path(path: str | os.PathLike[str], index: int) -> Path:
    """Return the name of the ``index``-th file of a rotated recording (0: ``path`` itself).

    ``rec.gz`` -> ``rec.1.gz``; a name without ``.gz`` gets the number appended: ``rec`` -> ``rec.1``.
    """
    p = Path(path)
    if index == 0:
        return p
    if p.name.endswith(".gz"):
        return p.with_name(f"{p.name[:-3]}.{index}.gz")
    return p.with_name(f"{p.name}.{index}")


class TapeRecorder:
    """Write tape lines to gzip files, rotating by size or time.

    Parameters
    ----------
    path : str or os.PathLike
        First file; rotated files are named by :func:`rotated_path`. Compressed whatever the name says.
    rotate_bytes : int or None, default 256 MiB
        Start a new file after this many bytes of lines (uncompressed); None: never by size.
    rotate_seconds : float or None, default 3600
        Start a new file after this long; None: never by time.
    flush_lines : int, default 512
        Lines buffered before they are compressed and written.
    flush_seconds : float, default 1.0
        Also write the buffered lines once the oldest has waited this long (a quiet stream still reaches the
        file; the check is made when a line arrives).
    compresslevel : int, default 6
        gzip level (6: about 6 times smaller than the text at a third of level 9's cost).
    clock : callable, default time.monotonic
        Seconds, for the time rotation (replaceable in tests).

    Attributes
    ----------
    lines, bytes_written : int
        Lines recorded and their size (uncompressed, newlines included).
    paths : list of Path
        Files written so far, in order.
    lines_lost : int
        Lines not recorded because writing failed (a full disk, a vanished directory).
    error : str
        Why writing failed ("" while it works). A failure does not raise into the live feed: the recording
        stops there (what was written before stays readable), the failure is logged once, and every line
        after it is counted in ``lines_lost``.
    """

    def __init__(self, path: str | os.PathLike[str], *, rotate_bytes: int | None = 256 << 20,
                 rotate_seconds: float | None = 3600.0, flush_lines: int = 512, flush_seconds: float = 1.0,
                 compresslevel: int = 6,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rotate_bytes is not None and (isinstance(rotate_bytes, bool) or not isinstance(rotate_bytes, int)
                                         or rotate_bytes < 1):
            raise InvalidConfigurationError(f"TapeRecorder: rotate_bytes must be None or an int >= 1, got "
                                            f"{rotate_bytes!r}")
        if rotate_seconds is not None and (isinstance(rotate_seconds, bool)
                                           or not isinstance(rotate_seconds, (int, float))
                                           or not rotate_seconds > 0):
            raise InvalidConfigurationError(f"TapeRecorder: rotate_seconds must be None or a number > 0, got "
                                            f"{rotate_seconds!r}")
        if isinstance(flush_lines, bool) or not isinstance(flush_lines, int) or flush_lines < 1:
            raise InvalidConfigurationError(f"TapeRecorder: flush_lines must be an int >= 1, got {flush_lines!r}")
        if isinstance(flush_seconds, bool) or not isinstance(flush_seconds, (int, float)) or not flush_seconds > 0:
            raise InvalidConfigurationError(f"TapeRecorder: flush_seconds must be a number > 0, got {flush_seconds!r}")
        self.path = Path(path)
        self.rotate_bytes = rotate_bytes
        self.rotate_seconds = rotate_seconds
        self.flush_lines = flush_lines
        self.flush_seconds = flush_seconds
        self._first_pending = 0.0
        self.compresslevel = compresslevel
        self._clock = clock
        self.lines = 0
        self.bytes_written = 0
        self.paths: list[Path] = []
        self._pending: list[bytes] = []
        self._file: gzip.GzipFile | None = None
        self._file_bytes = 0
        self._opened_at = 0.0
        self._closed = False
        self.lines_lost = 0
        self.error = ""
        self._open_next()  # fail now (a directory that does not exist, no permission), not at the first line

    def _open_next(self) -> None:
        target = rotated_path(self.path, len(self.paths))
        self._file = gzip.GzipFile(target, "wb", compresslevel=self.compresslevel)
        self.paths.append(target)
        self._file_bytes = 0
        self._opened_at = self._clock()

    def write(self, line: bytes) -> None:
        """Record one line (without its newline)."""
        if self._closed:
            raise InvalidConfigurationError(f"TapeRecorder {str(self.path)!r}: write after close")
        if self.error:
            self.lines_lost += 1
            return
        pending = self._pending
        if not pending:
            self._first_pending = self._clock()
        pending.append(line)
        if len(pending) >= self.flush_lines or self._clock() - self._first_pending >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Compress and write the buffered lines (rotating first when the current file is full or old)."""
        pending = self._pending
        if not pending or self._file is None or self.error:
            return
        try:
            self._write_pending()
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        self.error = f"{exc.strerror or exc} ({rotated_path(self.path, len(self.paths) - 1)})"
        self.lines_lost += len(self._pending)
        self._pending.clear()
        logger.error("TapeRecorder %s: cannot write: %s; the recording stops here (%d lines recorded before; the "
                     "next ones are counted in lines_lost)", str(self.path), self.error, self.lines)
        file, self._file = self._file, None
        if file is not None:
            try:
                file.close()  # ends the gzip member if it can, so the lines before stay readable
            except OSError:
                pass

    def _write_pending(self) -> None:
        pending = self._pending
        assert self._file is not None
        if ((self.rotate_bytes is not None and self._file_bytes >= self.rotate_bytes)
                or (self.rotate_seconds is not None and self._clock() - self._opened_at >= self.rotate_seconds)):
            if self._file_bytes:
                self._file.close()
                self._open_next()
        data = b"\n".join(pending) + b"\n"
        self._file.write(data)
        self.lines += len(pending)
        self.bytes_written += len(data)
        self._file_bytes += len(data)
        pending.clear()

    def close(self) -> None:
        """Flush and close the current file (idempotent)."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            if self._file is not None:
                try:
                    self._file.close()
                except OSError as exc:
                    self._failed(exc)
                self._file = None

    def __repr__(self) -> str:
        lost = f", lines_lost={self.lines_lost}, error={self.error!r}" if self.error else ""
        return f"TapeRecorder({str(self.path)!r}, files={len(self.paths)}, lines={self.lines}{lost})"
