"""Taking a signal for the scheduler's run and giving the host application its handler back afterwards."""

from __future__ import annotations

import asyncio
import functools
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["STOP_SIGNALS", "on_stop_signals", "take_signal"]

#: The signals that ask a run to stop: Ctrl-C and ``kill``'s default.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _loop_handles_signal(loop: asyncio.AbstractEventLoop, sig: int, current: Any) -> bool:
    """Whether ``loop`` holds a handler of its own for ``sig`` (one installed with ``loop.add_signal_handler``).

    No public API tells. asyncio's unix loop keeps them in its ``_signal_handlers`` dict; uvloop keeps that
    table in C, out of reach, but installs one of its own bound methods as the Python-level handler.
    """
    table = getattr(loop, "_signal_handlers", None)
    if isinstance(table, dict):
        return sig in table
    return getattr(current, "__self__", None) is loop


def take_signal(
    loop: asyncio.AbstractEventLoop, sig: int, notify: Callable[[], Any]
) -> Callable[[], None]:
    """Make ``sig`` call ``notify()`` on ``loop``; return the function that gives the host its handler back.

    A Python-level handler (``signal.signal``, the defaults, ``asyncio.Runner``'s Ctrl-C handler) is replaced
    through ``loop.add_signal_handler`` and put back afterwards. A handler in the loop's own table cannot be
    read back (there is no getter, and uvloop's table is not reachable from Python), so it is never replaced:
    the scheduler chains in front of it and the host's handler runs too.
    """
    previous = signal.getsignal(sig)
    if _loop_handles_signal(loop, sig, previous):
        def chained(signum: int, frame: Any) -> None:
            loop.call_soon_threadsafe(notify)
            if callable(previous):
                previous(signum, frame)  # the loop's own relay: its table still dispatches the host's handler

        signal.signal(sig, chained)

        def give_back_chained() -> None:
            # somebody who replaced it since keeps their handler; None: not installed from Python
            if signal.getsignal(sig) is chained and previous is not None:
                signal.signal(sig, previous)

        return give_back_chained

    loop.add_signal_handler(sig, notify)

    def give_back() -> None:
        loop.remove_signal_handler(sig)  # leaves SIG_DFL (default_int_handler for SIGINT) behind
        if previous is not None:  # None: not installed from Python, nothing that can be put back
            signal.signal(sig, previous)

    return give_back


def on_stop_signals(
    loop: asyncio.AbstractEventLoop, notify: Callable[[str], Any], signals: tuple[int, ...] = STOP_SIGNALS
) -> Callable[[], None]:
    """Make each of ``signals`` (default SIGINT and SIGTERM) call ``notify(name)`` on ``loop``, ``name`` being
    the signal's name (``"SIGINT"``); return the function that gives the host its handlers back.

    Each signal is taken with :func:`take_signal`. Where a handler cannot be installed (not the main thread,
    or no signals on this platform) that signal is left alone: the run then stops only in its other ways.
    """
    give_back: list[Callable[[], None]] = []
    for sig in signals:
        try:
            give_back.append(take_signal(loop, sig, functools.partial(notify, signal.Signals(sig).name)))
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass

    def restore() -> None:
        for back in reversed(give_back):
            back()
        give_back.clear()

    return restore
