"""Taking a signal for the scheduler's run and giving the host application its handler back afterwards."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from typing import Any

__all__ = ["take_signal"]


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
