"""Channel keys, event payloads and the task traits (the original framework's ``types`` module).

* :class:`EventType` -- base Enum for channel keys: ``class Ev(EventType): MARKET_DATA = "MarketData"``.
* :class:`Event` -- base for payloads, a frozen ``msgspec.Struct``.
* :class:`Executable`, :class:`BackgroundTask`, :class:`EventTask` -- what the scheduler runs.
* :class:`Connector`, :class:`Aggregator`, :class:`Strategy`, :class:`Executor` -- the trading roles.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec

from kimiha.error import InvalidStateError

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform as _dataclass_transform

    from kimiha.clock import Clock
else:
    def _dataclass_transform(**_options: Any) -> Any:
        """Runtime stand-in: the decorator only informs type checkers, so the class is left untouched."""
        return lambda cls: cls

__all__ = [
    "EventType",
    "Event",
    "Executable",
    "BackgroundTask",
    "EventTask",
    "Connector",
    "Aggregator",
    "Strategy",
    "Executor",
]


class EventType(enum.Enum):
    """Base class of channel keys. Subclass it with members, e.g. ``MARKET_DATA = "MarketData"``.

    Members hash by identity (they are singletons), which keeps the bus's channel lookup in C.
    """

    __hash__ = object.__hash__

    def __str__(self) -> str:
        return f"{type(self).__name__}.{self.name}"


# msgspec passes ``frozen=True`` on to subclasses, but its stub declares ``Struct`` a dataclass transform with
# ``frozen`` defaulting to False, so mypy takes ``class Tick(Event): ...`` for a non-frozen dataclass deriving
# from a frozen one and rejects it. Declaring ``Event`` a transform of its own whose default is frozen tells
# type checkers what msgspec does at runtime; assigning to a field stays an error for them.
@_dataclass_transform(frozen_default=True, field_specifiers=(msgspec.field,))
class Event(msgspec.Struct, frozen=True):
    """Base class of event payloads: a frozen ``msgspec.Struct``, safe to share among subscribers.

    Subclasses are frozen too, with no ``frozen=True`` of their own: ``class Tick(Event): price: float``.
    """


class Executable:
    """Something the scheduler runs: it has a ``name`` and optional ``initialize`` / ``shutdown`` hooks.

    ``name`` defaults to the class name; set it as an attribute or a property to tell instances apart.
    """

    role: ClassVar[str] = "task"

    # Never touch ``self.__dict__`` here: on CPython 3.11+ that materializes the instance dict and
    # de-specializes every ``self.attr`` access in the user's handlers (measured: ~60 ns per event).
    @property
    def name(self) -> str:
        try:
            return self._kimiha_name
        except AttributeError:
            return type(self).__name__

    @name.setter
    def name(self, value: str) -> None:
        self._kimiha_name = value

    @property
    def clock(self) -> Clock:
        """The clock of the scheduler this task is registered with (``Scheduler(bus, clock=...)``).

        A view of that clock whose timers belong to this task: supervised with its policy, cancelled when it
        fails or the scheduler stops. See :mod:`kimiha.clock`.
        """
        try:
            return self._kimiha_clock
        except AttributeError:
            raise InvalidStateError(
                f"task {self.name!r} has no clock yet: its clock comes from the scheduler it is registered "
                f"with (Scheduler(bus, clock=...)); read self.clock from initialize() on, or assign one"
            ) from None

    @clock.setter
    def clock(self, value: Clock) -> None:
        self._kimiha_clock = value

    async def initialize(self) -> None:
        """Prepare the task; called once before it runs. Override as needed."""

    async def shutdown(self) -> None:
        """Release what ``initialize`` acquired; called once when the scheduler stops. Override as needed."""


class BackgroundTask(Executable):
    """A task whose ``execute()`` the scheduler calls in a loop until shutdown."""

    role: ClassVar[str] = "background"

    async def execute(self) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement async execute()")

    def consumes(self) -> Any:
        """Return the channel key (or a tuple of keys) this task reads; none by default. Optional.

        The scheduler stops tasks in the order data flows: a background task that reads nothing is a
        producer and stops first; one that reads channels keeps running while the event tasks drain (they
        may publish to it, and on a ``BLOCK`` channel they would wait for it), and stops after them. A
        subscription the task opens in ``initialize`` is found without this declaration; declare the
        channels a task subscribes to later (in ``execute``), or reads some other way.
        """
        return ()


class EventTask(Executable):
    """A task that handles the events of one channel (or several: return a tuple from ``subscribed_event``).

    ``handle_event`` may be a plain function (called straight from the dispatch loop, no coroutine per
    event) or a coroutine function (awaited, one event at a time, in order).
    """

    role: ClassVar[str] = "event"

    def subscribed_event(self) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement subscribed_event()")

    def handle_event(self, event: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} must implement handle_event(event)")


class Connector(BackgroundTask):
    """Brings external data in (a venue feed, a replay) and publishes it on the bus."""

    role: ClassVar[str] = "connector"


class Aggregator(EventTask):
    """Normalizes raw connector data into market events (books, trades, quotes)."""

    role: ClassVar[str] = "aggregator"


class Strategy(EventTask):
    """Turns market events into signals and orders."""

    role: ClassVar[str] = "strategy"


class Executor(EventTask):
    """Carries orders out (to a venue, or a paper book) and reports fills."""

    role: ClassVar[str] = "executor"
