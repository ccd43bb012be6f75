"""kimiha: low-latency event-driven orchestration for trading systems.

A compiled broadcast event bus (``kimiha._core``), a supervised scheduler and a trading pipeline builder
(Connectors -> Aggregator -> Strategies -> Executors), on uvloop.
"""

import importlib.machinery as _machinery
import os as _os
import sys as _sys


def _hand_over_to_an_installed_build() -> None:
    """Make ``import kimiha`` from a source tree without a compiled core load the installed build instead.

    ``python -m kimiha`` (and ``python -m pytest``, ``python -c``) put the current directory first on
    ``sys.path``; typed in a checkout after ``pip install .``, that finds this source tree, whose
    ``_core`` extension was built into the wheel, not here. Rather than fail, find the installed kimiha
    (the rest of ``sys.path``, or an import finder of an editable install) and put it in ``sys.modules``: the import system then returns it, and
    ``kimiha.<module>`` resolves through its ``__path__``. A tree with its own compiled core (an
    editable install, ``pip install -e .``) imports itself as usual.
    """
    here = _os.path.dirname(_os.path.realpath(__file__))

    def has_core(folder: str) -> bool:
        return any(_os.path.isfile(_os.path.join(folder, "_core" + suffix))
                   for suffix in _machinery.EXTENSION_SUFFIXES)

    if has_core(here):
        return
    tree = _os.path.dirname(here)
    saved = _sys.path
    spec = None
    try:
        # Each sys.path entry on its own, so that another uncompiled tree (or this one through a symlink) is
        # passed over rather than taken; then the other finders (an editable install of another tree has its own).
        for entries in [[entry] for entry in saved] + [[]]:
            _sys.path = entries
            for finder in _sys.meta_path:
                find_spec = getattr(finder, "find_spec", None)
                found = find_spec(__name__, None) if find_spec is not None else None
                if (found is not None and found.origin and found.loader is not None
                        and _os.path.dirname(_os.path.realpath(found.origin)) != here
                        and any(has_core(f) for f in found.submodule_search_locations or [])):
                    spec = found
                    break
            if spec is not None:
                break
    finally:
        _sys.path = saved
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if spec is None or spec.loader is None or not any(has_core(folder) for folder in locations):
        raise ImportError(
            f"kimiha: the compiled core (kimiha/_core) is not built in the source tree {tree}, and no installed "
            f"kimiha with a compiled core was found on sys.path; install it with `pip install .` (or "
            f"`pip install -e .` to build it in place for development)",
            name=f"{__name__}._core",
        )
    import importlib.util

    module = importlib.util.module_from_spec(spec)
    _sys.modules[__name__] = module
    spec.loader.exec_module(module)


_hand_over_to_an_installed_build()
# From here on, when the hand-over happened, ``kimiha`` in sys.modules is the installed build and the
# imports below bind its objects (this module object is then discarded by the import system).

from kimiha import _moved
from kimiha._core import LatencyHistogram, monotonic_ns
from kimiha.channel_config import ChannelConfig, Dispatch, Overflow
from kimiha.error import (
    ChannelClosed,
    ChannelFull,
    EventReceiveError,
    EventSendError,
    InvalidChannelError,
    InvalidConfigurationError,
    InvalidStateError,
    Lagged,
    MissingComponentError,
    OrchestratorError,
    PayloadTypeError,
    SerializationError,
    TaskExecutionError,
    TaskInitializationError,
    TaskNotFoundError,
    TaskShutdownError,
)
from kimiha.event_bus import Channel, EventBus, Subscription
from kimiha.logs import install_fallback as _install_fallback
from kimiha.orchestrator import BuildError, TradingOrchestrator, TradingOrchestratorBuilder
from kimiha.runtime import run
from kimiha.scheduler import OnError, Scheduler, SchedulerState, Supervision, TaskRegistry, TaskState
from kimiha.typed import typed_channel
from kimiha.types import (
    Aggregator,
    BackgroundTask,
    Connector,
    Event,
    EventTask,
    EventType,
    Executable,
    Executor,
    Strategy,
)

__version__ = "0.3.6"

_install_fallback()  # readable log lines for a process that configured no logging (kimiha.logs)
_moved.install()  # kimiha 0.1's module paths keep working for one release (see CHANGELOG.md)

__all__ = [
    "Aggregator",
    "BackgroundTask",
    "BuildError",
    "Channel",
    "ChannelClosed",
    "ChannelConfig",
    "ChannelFull",
    "Connector",
    "Dispatch",
    "Event",
    "EventBus",
    "EventReceiveError",
    "EventSendError",
    "EventTask",
    "EventType",
    "Executable",
    "Executor",
    "InvalidChannelError",
    "InvalidConfigurationError",
    "InvalidStateError",
    "LatencyHistogram",
    "Lagged",
    "MissingComponentError",
    "OnError",
    "OrchestratorError",
    "Overflow",
    "PayloadTypeError",
    "Scheduler",
    "SchedulerState",
    "SerializationError",
    "Strategy",
    "Subscription",
    "Supervision",
    "TaskExecutionError",
    "TaskInitializationError",
    "TaskNotFoundError",
    "TaskRegistry",
    "TaskShutdownError",
    "TaskState",
    "TradingOrchestrator",
    "TradingOrchestratorBuilder",
    "monotonic_ns",
    "run",
    "typed_channel",
]
