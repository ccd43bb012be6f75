"""Running coroutines on uvloop (the default) or asyncio."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from kimiha.error import InvalidConfigurationError

__all__ = ["run", "new_event_loop", "LOOPS"]

T = TypeVar("T")

#: Names accepted by ``run(..., loop=...)``.
LOOPS = ("uvloop", "asyncio")


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


def run(main: Coroutine[Any, Any, T], *, loop: str = "uvloop", debug: bool | None = None) -> T:
    """Run ``main`` to completion on a new uvloop event loop (or asyncio's with ``loop="asyncio"``).

    Like ``asyncio.run``: remaining tasks are cancelled and async generators closed at the end.
    """
    try:
        factory = _loop_factory(loop)
    except InvalidConfigurationError:
        if asyncio.iscoroutine(main):
            main.close()  # it will never run: do not leave a "never awaited" warning behind
        raise
    with asyncio.Runner(loop_factory=factory, debug=debug) as runner:
        return runner.run(main)
