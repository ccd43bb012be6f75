"""A folder one run of a command owns (``kimiha demo --distributed``: its shared-memory rings, or its
nats-server's JetStream store and configuration), reaped by a later run once its owner is gone.

The owner holds an ``flock`` on ``owner.lock`` in the folder for as long as it lives (the file also says its
pid, for a person looking); the kernel lets go of the lock when the process dies, however it dies (SIGKILL
included), so liveness is never guessed from a pid that may have been reused. The lock's descriptor is
close-on-exec: the owner's children never hold it. :func:`reap_stale` removes the folders of owners that are
gone; a folder without the file (made by an older version, or a start cut short between the ``mkdir`` and
the lock) is reaped once it is :data:`UNOWNED_AGE` seconds old, so a folder being made is never taken.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

__all__ = ["OWNER_FILE", "UNOWNED_AGE", "RunDirectory", "owner_alive", "reap_stale"]

#: The file in a run's folder that its owner keeps locked.
OWNER_FILE = "owner.lock"
#: A run folder without an owner file is left alone until it is this old (seconds since its last change).
UNOWNED_AGE = 60.0


def _private_parent(parent: Path) -> None:
    """Make ``parent`` (mode 0700) if missing; refuse one another user owns or a symlink (the runs' folders
    in it would not be ours to make or to reap)."""
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = parent.lstat()
    if not parent.is_dir() or parent.is_symlink() or st.st_uid != os.getuid():
        raise OSError(f"run folder parent {str(parent)!r}: expected a directory of uid {os.getuid()}, found "
                      f"{'a symlink' if parent.is_symlink() else 'one of uid ' + str(st.st_uid)}")


def owner_alive(path: Path) -> bool | None:
    """Whether the owner of run folder ``path`` still lives: True, False, or None if it has no owner file."""
    from kimiha.bridge.shm import _held  # the rings' own liveness test: a lock someone holds

    owner = path / OWNER_FILE
    if not owner.exists():
        return None
    try:
        return _held(owner)
    except OSError:  # not ours to open: treat as alive (never remove what we cannot judge)
        return True


def reap_stale(parent: str | os.PathLike[str], prefix: str, *,
               busy: Callable[[Path], bool] | None = None) -> list[str]:
    """Remove the folders ``prefix*`` in ``parent`` whose owner is gone; return their names.

    ``busy(path)``, if given, is asked last about each of them: a folder it says is still in use (a live
    process of the dead owner's run holding a ring) is left for a later run.
    """
    base = Path(parent)
    removed: list[str] = []
    try:
        entries = list(base.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    for path in entries:
        if not path.name.startswith(prefix) or path.is_symlink() or not path.is_dir():
            continue
        alive = owner_alive(path)
        if alive:
            continue
        if alive is None:
            try:
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue
            if age < UNOWNED_AGE:
                continue
        if busy is not None and busy(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    return removed


class RunDirectory:
    """Make ``parent/name`` (mode 0700) and own it until :meth:`close`, which removes it.

    Use it as a context manager. ``parent`` is made if missing (mode 0700) and must belong to this user.
    """

    def __init__(self, parent: str | os.PathLike[str], name: str) -> None:
        base = Path(parent)
        _private_parent(base)
        self.path = base / name
        self.path.mkdir(mode=0o700)
        self._fd = -1
        try:
            self._fd = os.open(self.path / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.write(self._fd, f"{os.getpid()}\n".encode())
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Remove the folder and everything in it, then let go of it (idempotent)."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.path)!r})"
