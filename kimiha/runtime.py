"""Running coroutines on uvloop (the default) or asyncio.

:func:`run` is ``asyncio.run`` with a choice of loop and one difference: the end is bounded. ``asyncio.run``
cancels the tasks left when ``main`` ends and then waits for them without a limit, so one task that swallows
its ``CancelledError`` in a loop keeps the process from ever exiting. Here they get ``shutdown_timeout``
seconds; a task still running then is named in an ERROR and left behind, and the loop closes. Closing async
generators and shutting the default executor down get the same deadline each. (A thread of that executor still
running at its deadline cannot be stopped: ``run`` returns, and the interpreter waits for the thread at exit,
as it always does for executor threads.)
"""

from __future__ import annotations

import asyncio
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kimiha.error import InvalidConfigurationError

__all__ = ["run", "new_event_loop", "LOOPS", "SHUTDOWN_TIMEOUT"]

T = TypeVar("T")

logger = logging.getLogger("kimiha.runtime")

#: Names accepted by ``run(..., loop=...)``.
LOOPS = ("uvloop", "asyncio")

#: Seconds :func:`run` gives the tasks left when ``main`` ends to finish once cancelled.
SHUTDOWN_TIMEOUT = 5.0


def _loop_factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if loop == "uvloop":
        try:
            import uvloop
        except ImportError as exc:  # pragma: no cover - uvloop is a dependency on POSIX
            raise InvalidConfigurationError(
                f"run(loop='uvloop'): uvloop is not importable ({exc}); pass loop='asyncio' to use asyncio"
            ) from None
        return uvloop.new_event_loop
    if loop == "asyncio":
        return asyncio.new_event_loop
    raise InvalidConfigurationError(f"run(loop=...): expected one of {LOOPS}, got {loop!r}")


def new_event_loop(loop: str = "uvloop") -> asyncio.AbstractEventLoop:
    """Return a new event loop of the named kind (``"uvloop"`` or ``"asyncio"``)."""
    return _loop_factory(loop)()


def _task_name(task: asyncio.Task[Any]) -> str:
    coro = task.get_coro()
    where = getattr(coro, "__qualname__", None) or type(coro).__name__
    return f"{task.get_name()} ({where})"


def _cancel_remaining(loop: asyncio.AbstractEventLoop, timeout: float) -> None:
    """Cancel every task still pending on ``loop`` and wait up to ``timeout`` s in all for them to end.

    Tasks started while the others unwind are cancelled too, within the same deadline.
    """
    deadline = time.monotonic() + timeout
    waited: set[asyncio.Task[Any]] = set()
    while True:
        pending = {t for t in asyncio.all_tasks(loop) if not t.done()}
        if not pending:
            break
        for task in pending - waited:
            task.cancel()
        waited |= pending
        remaining = deadline - time.monotonic()
        left: set[asyncio.Task[Any]] = pending
        if remaining > 0:
            _, left = loop.run_until_complete(asyncio.wait(pending, timeout=remaining))
        if left:
            names = ", ".join(sorted(_task_name(t) for t in left))
            logger.error(
                "kimiha.run(): %d task(s) did not finish within %.3g s of their cancellation (they ignore it, or "
                "clean up for longer; shutdown_timeout= gives more time); left behind so that the loop can "
                "close: %s", len(left), timeout, names)
            for task in left:
                _quiet(task)
            break
    for task in waited:
        if task.done() and not task.cancelled() and task.exception() is not None:
            loop.call_exception_handler({
                "message": "unhandled exception during kimiha.run() shutdown",
                "exception": task.exception(),
                "task": task,
            })


def _quiet(task: asyncio.Task[Any]) -> None:
    """A task left behind was named in an ERROR: no "Task was destroyed but it is pending!" for it too."""
    try:
        task._log_destroy_pending = False  # type: ignore[attr-defined]
    except AttributeError:  # pragma: no cover - a Task implementation without the flag
        pass


async def _bounded(aw: Coroutine[Any, Any, None], timeout: float, what: str) -> None:
    """Await ``aw`` for at most ``timeout`` s, then go on without it: it is left pending, not cancelled (an
    async generator that ignores cancellation would keep ``wait_for`` waiting forever, and a cancelled executor
    shutdown joins its thread on the loop's own thread)."""
    task = asyncio.ensure_future(aw)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task in done:
        task.result()
        return
    _quiet(task)
    logger.error("kimiha.run(): %s did not finish within %.3g s; the loop closes without waiting for it",
                 what, timeout)


def run(main: Coroutine[Any, Any, T], *, loop: str = "uvloop", debug: bool | None = None,
        shutdown_timeout: float = SHUTDOWN_TIMEOUT) -> T:
    """Run ``main`` to completion on a new uvloop event loop (or asyncio's with ``loop="asyncio"``).

    Like ``asyncio.run``: a first Ctrl-C cancels ``main`` (and then raises ``KeyboardInterrupt``), a second
    one interrupts at once; at the end the tasks still pending are cancelled and async generators closed. Unlike
    it, the end has a deadline: tasks that are still running ``shutdown_timeout`` seconds after their
    cancellation (a task that swallows ``CancelledError``) are named in an ERROR and left behind, and the
    loop closes, so the process can exit. Closing async generators and shutting the default executor down
    get ``shutdown_timeout`` each too (see the module's docstring for executor threads).
    """
    try:
        factory = _loop_factory(loop)
        try:
            if isinstance(shutdown_timeout, bool) or not isinstance(shutdown_timeout, (int, float)):
                raise TypeError
            bound = float(shutdown_timeout)
        except (TypeError, OverflowError):
            bound = math.nan
        if not bound > 0:
            raise InvalidConfigurationError(
                f"run(shutdown_timeout=...): expected seconds > 0 (a float or an int), got "
                f"{type(shutdown_timeout).__name__} {shutdown_timeout!r:.100}")
        if not asyncio.iscoroutine(main):
            raise TypeError(f"run(main): expected a coroutine, got {type(main).__name__} {main!r}")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("kimiha.run() cannot be called from a running event loop; await the coroutine "
                               "instead")
    except BaseException:
        if asyncio.iscoroutine(main):
            main.close()  # it will never run: do not leave a "never awaited" warning behind
        raise
    ev = factory()
    try:
        if debug is not None:
            ev.set_debug(debug)
        task = ev.create_task(main)
        interrupts = 0

        def on_sigint(signum: int, frame: Any) -> None:
            nonlocal interrupts
            interrupts += 1
            if interrupts == 1 and not task.done():
                task.cancel()
                ev.call_soon_threadsafe(lambda: None)  # wake the loop if it is waiting in select
                return
            raise KeyboardInterrupt()

        handler: Callable[[int, Any], None] | None = None
        if threading.current_thread() is threading.main_thread() and (
            signal.getsignal(signal.SIGINT) is signal.default_int_handler
        ):
            try:
                signal.signal(signal.SIGINT, on_sigint)
                handler = on_sigint
            except ValueError:  # an embedded interpreter without signal support
                pass
        try:
            return ev.run_until_complete(task)
        except asyncio.CancelledError:
            if interrupts > 0 and task.uncancel() == 0:
                raise KeyboardInterrupt() from None
            raise
        finally:
            if handler is not None and signal.getsignal(signal.SIGINT) is handler:
                signal.signal(signal.SIGINT, signal.default_int_handler)
    finally:
        try:
            _cancel_remaining(ev, bound)
            ev.run_until_complete(_bounded(ev.shutdown_asyncgens(), bound, "closing async generators"))
            ev.run_until_complete(_bounded(ev.shutdown_default_executor(), bound,
                                           "shutting down the default executor (a thread of run_in_executor "
                                           "still runs: the interpreter waits for it at exit)"))
        finally:
            ev.close()
