"""Channel keys, event payloads and the task traits (the original framework's ``types`` module).

* :class:`EventType` -- base Enum for channel keys: ``class Ev(EventType): MARKET_DATA = "MarketData"``.
* :class:`Event` -- base for payloads, a frozen ``msgspec.Struct``.
* :class:`Executable`, :class:`BackgroundTask`, :class:`EventTask` -- what the scheduler runs.
* :class:`Connector`, :class:`Aggregator`, :class:`Strategy`, :class:`Executor` -- the trading roles.
"""

from __future__ import annotations

import enum
import types
from typing import TYPE_CHECKING, Any, ClassVar, cast

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


class _EventTypeMeta(type):
    """Metaclass of :class:`EventType`: turns the class body's public attributes into singleton members.

    Members are stored as plain class attributes, so ``Ev.X`` is an ordinary class attribute read -- no
    ``__getattr__`` hook (``enum.EnumType`` has one on CPython 3.11, which makes every ``Ev.X`` run Python
    code) and no descriptor call. The metaclass only adds what the enum protocol needs beside that:
    iteration, ``len``, ``in``, ``Ev["NAME"]``, ``Ev(value)`` and ``__members__``.
    """

    _member_map_: dict[str, Any]
    _value2member_map_: dict[Any, Any]
    _member_names_: list[str]

    def __new__(mcs, cls_name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any) -> Any:
        for base in bases:
            if isinstance(base, _EventTypeMeta) and base._member_names_:
                raise TypeError(
                    f"class {cls_name}: cannot extend {base.__name__}, which has members "
                    f"({', '.join(base._member_names_)}); an EventType with members is final"
                )
        members: list[tuple[str, Any]] = []
        for key, value in list(namespace.items()):
            if key.startswith("_") or _is_descriptor(value):
                continue
            if key in _RESERVED_NAMES:
                raise TypeError(
                    f"class {cls_name}: a member cannot be called {key!r}: every member has .name and .value "
                    f"attributes, which it would hide; choose another name (e.g. {key.upper()} = {value!r})")
            if isinstance(value, enum.auto):
                raise TypeError(
                    f"class {cls_name}: member {key} = enum.auto() is not supported by EventType (its "
                    f"value names the channel in stats, bridges and journals); write it out: {key} = {key!r}")
            members.append((key, value))
            del namespace[key]
        namespace.setdefault("__slots__", ())  # members carry only name and value: no __dict__ each
        try:
            cls = super().__new__(mcs, cls_name, bases, namespace, **kwargs)
        except TypeError as exc:
            others = [b.__name__ for b in bases if not isinstance(b, _EventTypeMeta)]
            if not others:
                raise
            raise TypeError(
                f"class {cls_name}: cannot combine EventType with {', '.join(others)} ({exc}): EventType "
                f"members are singletons compared by identity, not str or int values (unlike a str Enum); "
                f"derive from EventType alone and read a member's value as member.value"
            ) from None
        member_map: dict[str, Any] = {}
        by_value: dict[Any, Any] = {}
        names: list[str] = []
        for key, value in members:
            try:
                existing = by_value.get(value)
            except TypeError:
                raise TypeError(
                    f"class {cls_name}: member {key} = {value!r}: expected a hashable value (a str, as in "
                    f"{key} = {key!r}), got {type(value).__name__}"
                ) from None
            if existing is not None:
                member = existing  # an alias, as in enum.Enum: a second name for the same member
            else:
                member = object.__new__(cast(type, cls))
                object.__setattr__(member, "name", key)
                object.__setattr__(member, "value", value)
                by_value[value] = member
                names.append(key)
            member_map[key] = member
            type.__setattr__(cls, key, member)
        type.__setattr__(cls, "_member_map_", member_map)
        type.__setattr__(cls, "_value2member_map_", by_value)
        type.__setattr__(cls, "_member_names_", names)
        return cls

    def __call__(cls, value: Any, *args: Any, **kwargs: Any) -> Any:
        """Return the member whose value is ``value`` (``Ev("MarketData") is Ev.MARKET_DATA``)."""
        if args or kwargs:
            raise TypeError(
                f"{cls.__qualname__}({value!r}, ...): EventType has no functional form (enum's "
                f"Enum('Name', [...])); {cls.__qualname__}(value) looks a member up by value. Define the "
                f"members in a class: class Ev(EventType): MARKET_DATA = \"MarketData\"")
        try:
            return cls._value2member_map_[value]
        except (KeyError, TypeError):
            pass
        if isinstance(value, cls):
            return value
        missing = getattr(cls, "_missing_", None)
        if missing is not None:        # the enum hook: a classmethod returning a member, or None
            found = missing(value)
            if isinstance(found, cls) and cls._member_map_.get(found.name) is found:
                return found
            if found is not None:
                raise TypeError(
                    f"{cls.__qualname__}._missing_({value!r}) returned {found!r}; expected a member of "
                    f"{cls.__qualname__} or None")
        known = ", ".join(repr(m.value) for m in cls) or "none"
        raise ValueError(f"{value!r} is not a valid {cls.__qualname__}; expected one of: {known}")

    def __getitem__(cls, name: str) -> Any:
        """Return the member called ``name`` (``Ev["MARKET_DATA"]``)."""
        try:
            return cls._member_map_[name]
        except KeyError:
            known = ", ".join(cls._member_names_) or "none"
            raise KeyError(f"{cls.__qualname__} has no member {name!r}; its members: {known}") from None

    def __iter__(cls) -> Any:
        return (cls._member_map_[name] for name in cls._member_names_)

    def __reversed__(cls) -> Any:
        return (cls._member_map_[name] for name in reversed(cls._member_names_))

    def __len__(cls) -> int:
        return len(cls._member_names_)

    def __contains__(cls, member: Any) -> bool:
        return isinstance(member, cls) and cls._member_map_.get(member.name) is member

    def __bool__(cls) -> bool:
        return True

    @property
    def __members__(cls) -> Any:
        """Name -> member, aliases included, in definition order (read-only)."""
        return types.MappingProxyType(cls._member_map_)

    def __setattr__(cls, key: str, value: Any) -> None:
        if key in cls.__dict__.get("_member_map_", ()):
            raise AttributeError(f"cannot reassign member {cls.__name__}.{key}")
        super().__setattr__(key, value)

    def __delattr__(cls, key: str) -> None:
        if key in cls.__dict__.get("_member_map_", ()):
            raise AttributeError(f"cannot delete member {cls.__name__}.{key}")
        super().__delattr__(key)

    def __repr__(cls) -> str:
        return f"<EventType {cls.__qualname__!r}>"


#: Member names that would hide a member's own ``name`` / ``value`` (slots of every member).
_RESERVED_NAMES = frozenset({"name", "value"})


def _is_descriptor(value: Any) -> bool:
    kind = type(value)
    return hasattr(kind, "__get__") or hasattr(kind, "__set__") or hasattr(kind, "__delete__")


if TYPE_CHECKING:
    # Type checkers see an Enum: members are typed ``Literal[Ev.X]`` and ``.name`` / ``.value`` as usual.
    class EventType(enum.Enum):
        """Base class of channel keys. Subclass it with members, e.g. ``MARKET_DATA = "MarketData"``."""

else:

    class EventType(metaclass=_EventTypeMeta):
        """Base class of channel keys. Subclass it with members, e.g. ``MARKET_DATA = "MarketData"``.

        It behaves like an ``enum.Enum`` (members are singletons with ``name`` and ``value``; the class
        iterates over them, ``Ev("MarketData")`` and ``Ev["MARKET_DATA"]`` look them up, members pickle by
        value and compare by identity) but is built for the hot path: ``Ev.X`` is a plain class attribute
        and members hash by identity in C, so ``bus.publish(Ev.X, payload)`` costs little more than a
        publish on a hoisted channel handle. It is not an ``enum.Enum`` subclass at run time (type checkers
        are told it is one, for ``Literal`` member types); ``isinstance(Ev.X, EventType)`` holds.
        """

        __slots__ = ("name", "value")
        __hash__ = object.__hash__
        name: str
        value: Any

        def __setattr__(self, key: str, value: Any) -> None:
            raise AttributeError(f"{self}: EventType members are read-only")

        def __delattr__(self, key: str) -> None:
            raise AttributeError(f"{self}: EventType members are read-only")

        def __reduce_ex__(self, protocol: Any) -> Any:
            return type(self), (self.value,)

        def __copy__(self) -> Any:
            return self

        def __deepcopy__(self, memo: Any) -> Any:
            return self

        @property
        def _name_(self) -> str:
            return self.name

        @property
        def _value_(self) -> Any:
            return self.value

        def __repr__(self) -> str:
            return f"<{type(self).__name__}.{self.name}: {self.value!r}>"

        def __str__(self) -> str:
            return f"{type(self).__name__}.{self.name}"

        def __format__(self, spec: str) -> str:
            return format(str(self), spec)   # as enum.Enum: f"{Ev.X:<20}" pads the str()

        def __dir__(self) -> list[str]:
            return ["__class__", "name", "value"]


def _msgspec_enc_hook(obj: Any) -> Any:
    """msgspec ``enc_hook``: an :class:`EventType` member in a payload encodes as its value (as an Enum's did)."""
    if isinstance(type(obj), _EventTypeMeta):
        return obj.value
    raise NotImplementedError(f"Encoding objects of type {type(obj).__name__} is unsupported")


def _msgspec_dec_hook(kind: Any, obj: Any) -> Any:
    """msgspec ``dec_hook``: a payload field typed with an :class:`EventType` decodes its value to the member."""
    if isinstance(kind, _EventTypeMeta):
        return kind(obj)             # a ValueError naming the known values; msgspec adds the field's path
    raise NotImplementedError(f"Decoding objects of type {kind!r} is unsupported")


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
