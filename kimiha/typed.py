"""Typed handles on the bus: a channel whose payload type the type checker knows, checked at runtime.

Channel keys (``EventType`` members) carry no payload type, so ``bus.channel(key)`` and ``bus.subscribe(key)``
are typed ``Channel[Any]`` / ``Subscription[Any]``. :func:`typed_channel` names the payload type once, checks
it against the type the channel declared in its ``ChannelConfig``, and returns the same channel object typed
``Channel[T]``: from there ``publish`` takes a ``T``, ``subscribe()`` gives a ``Subscription[T]`` whose
``await recv()`` / ``async for`` give ``T``, ``try_recv()`` gives ``T | None`` and ``drain()`` ``list[T]``,
and a handler is checked as a ``Callable[[T], Any]``::

    ticks = typed_channel(bus, Ev.MARKET_DATA, Tick)
    sub = ticks.subscribe()
    tick = await sub.recv()          # a Tick, for mypy too

There is no cost per event: the check runs once, and the handle is the channel itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar, cast

from kimiha.channel_config import _payload_classes
from kimiha.error import InvalidChannelError, InvalidConfigurationError

if TYPE_CHECKING:
    from kimiha._core import Channel, EventBusCore

__all__ = ["typed_channel"]

T = TypeVar("T")


def _names(classes: tuple[type, ...]) -> str:
    return " | ".join(c.__name__ for c in classes)


def typed_channel(bus: EventBusCore, event_type: Any, payload_type: type[T], /) -> Channel[T]:
    """Return the channel of ``event_type``, typed as carrying ``payload_type``.

    Parameters
    ----------
    bus : EventBus
        The bus holding the channel.
    event_type : EventType member
        The channel's key.
    payload_type : type
        What every payload on the channel is an instance of: the class the channel declared, or a common
        base of the classes of its declared union (such as ``Event``).

    Raises
    ------
    InvalidChannelError
        The channel is unknown, declares no payload type (it then accepts any payload, so no type can be
        promised), or declares a type that is not ``payload_type`` nor a subclass of it.
    InvalidConfigurationError
        ``payload_type`` is not a class.
    """
    if not isinstance(payload_type, type):
        raise InvalidConfigurationError(
            f"typed_channel({event_type!r}): expected a payload class, got {payload_type!r}"
        )
    channel = bus.channel(event_type)
    declared = channel.payload_type
    if declared is None:
        raise InvalidChannelError(
            f"channel {channel.name!r} declares no payload type, so it accepts any payload, not only "
            f"{payload_type.__name__}; give its ChannelConfig payload_type={payload_type.__name__}"
        )
    classes = _payload_classes(declared)
    stray = tuple(c for c in classes if not issubclass(c, payload_type))
    if stray:
        raise InvalidChannelError(
            f"channel {channel.name!r} carries {_names(classes)}, expected {payload_type.__name__} "
            f"(or subclasses of it); {_names(stray)} is not a {payload_type.__name__}"
        )
    return cast("Channel[T]", channel)
