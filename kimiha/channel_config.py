"""Channel configuration: capacity, overflow policy and payload type of one broadcast channel."""

from __future__ import annotations

import enum
import types
import typing
from typing import Any

import msgspec

from kimiha.error import InvalidConfigurationError
from kimiha.types import _msgspec_dec_hook

__all__ = ["ChannelConfig", "Dispatch", "Overflow", "MAX_CAPACITY", "DEFAULT_LATENCY_SAMPLE"]

#: Largest ring a channel may ask for. Each slot costs three pointers and a timestamp (32 bytes), so this
#: is half a GiB of slots -- far beyond any sensible ring, small enough to catch a typo such as ``10**12``.
MAX_CAPACITY = 1 << 24

#: Default of ``ChannelConfig.latency_sample``: the histogram records every 32nd event. Two clock reads on one
#: event in 32 keep latency tracking within a few percent of the cost of dispatch (benchmarks/README.md).
DEFAULT_LATENCY_SAMPLE = 32


class Overflow(enum.Enum):
    """What a channel does when a publisher catches up with its slowest subscriber."""

    #: Overwrite the oldest slot; the subscriber that had not read it gets ``Lagged(n)`` (Tokio broadcast).
    LAG = "lag"
    #: Never lose an event: ``publish`` raises ``ChannelFull``, ``publish_async`` waits for room (Disruptor).
    BLOCK = "block"


class Dispatch(enum.Enum):
    """Who calls a channel's handlers.

    ``LOOP`` (the default): ``publish`` writes the event and returns; the event loop calls the handlers soon
    after, in batches. The publisher never waits for its consumers. ``INLINE``: ``publish`` writes the event
    (pull, frames and bridge subscribers see it as usual) and then calls the channel's handlers itself, before
    it returns -- the lowest publish-to-handler latency, paid for by the publisher.
    """

    LOOP = "loop"
    INLINE = "inline"


_PROBE = msgspec.msgpack.encode(None)

_NONE_PAYLOAD = (
    "ChannelConfig.payload_type: expected payload types that exclude None, got {payload_type!r}: a payload "
    "is never None (try_recv() answers None for 'nothing ready', so a None event would be taken and lost); "
    "publish an Event with an optional field instead"
)


def _payload_classes(payload_type: Any) -> tuple[type, ...]:
    """Return the classes an ``isinstance`` check must accept for ``payload_type``."""
    if payload_type is typing.Any or payload_type is object:
        raise InvalidConfigurationError(
            f"ChannelConfig.payload_type: {payload_type!r} would accept every payload; leave payload_type=None "
            f"for any payload (which also refuses None, and carries frames of any msgspec-encodable value)")
    if payload_type is types.NoneType:
        raise InvalidConfigurationError(_NONE_PAYLOAD.format(payload_type=payload_type))
    if isinstance(payload_type, type):
        return (payload_type,)
    if typing.get_origin(payload_type) in (typing.Union, types.UnionType):
        members = typing.get_args(payload_type)
        if types.NoneType in members:
            raise InvalidConfigurationError(_NONE_PAYLOAD.format(payload_type=payload_type))
        for member in members:
            if member is typing.Any or member is object:
                raise InvalidConfigurationError(
                    f"ChannelConfig.payload_type: {payload_type!r} holds {member!r}, which would accept every "
                    f"payload; leave payload_type=None for any payload")
            if not isinstance(member, type):
                raise InvalidConfigurationError(
                    f"ChannelConfig.payload_type: expected a type or a Union of types, got member "
                    f"{member!r} in {payload_type!r}"
                )
        return tuple(members)
    raise InvalidConfigurationError(
        f"ChannelConfig.payload_type: expected a type (a msgspec.Struct, or int, str, ...), a Union of types, "
        f"or None (any payload); got {type(payload_type).__name__} {payload_type!r}"
    )


class ChannelConfig:
    """Configuration of one broadcast channel.

    Parameters
    ----------
    capacity : int
        Number of slots in the ring, ``1 <= capacity <= MAX_CAPACITY``.
    description : str
        Free text shown in stats and errors.
    overflow : Overflow
        ``Overflow.LAG`` (default) or ``Overflow.BLOCK``.
    payload_type : type or Union of types, optional
        Declared payload type. Publishing anything else raises ``PayloadTypeError``; raw frames are
        decoded and validated against it. ``None`` accepts any object except ``None``. While the channel has
        frames subscribers (exporters, journals), a payload msgspec cannot encode is refused at publish.
    track_latency : bool
        Record publish-to-delivery latency into the channel's histogram.
    dispatch : Dispatch
        ``Dispatch.LOOP`` (default: the event loop calls the handlers) or ``Dispatch.INLINE`` (``publish``
        calls them before it returns; only plain functions may subscribe as handlers).
    latency_sample : int
        Stamp and record the latency of every Nth event (by sequence number; 1 = every event). The counters
        stay exact; the histogram is a systematic 1-in-N sample of the deliveries, as is the handler time
        the Scheduler reports. Default ``DEFAULT_LATENCY_SAMPLE``.
    """

    __slots__ = ("capacity", "description", "overflow", "payload_type", "payload_classes", "track_latency",
                 "dispatch", "latency_sample")

    def __init__(
        self,
        capacity: int,
        description: str = "",
        *,
        overflow: Overflow = Overflow.LAG,
        payload_type: Any = None,
        track_latency: bool = True,
        dispatch: Dispatch = Dispatch.LOOP,
        latency_sample: int = DEFAULT_LATENCY_SAMPLE,
    ) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int):
            raise InvalidConfigurationError(
                f"ChannelConfig.capacity: expected an int between 1 and {MAX_CAPACITY}, "
                f"got {type(capacity).__name__} {capacity!r}"
            )
        if capacity < 1 or capacity > MAX_CAPACITY:
            raise InvalidConfigurationError(
                f"ChannelConfig.capacity: expected an int between 1 and {MAX_CAPACITY}, got {capacity}"
            )
        if not isinstance(description, str):
            raise InvalidConfigurationError(
                f"ChannelConfig.description: expected str, got {type(description).__name__} {description!r}"
            )
        if not isinstance(overflow, Overflow):
            raise InvalidConfigurationError(
                f"ChannelConfig.overflow: expected Overflow.LAG or Overflow.BLOCK, got {overflow!r}"
            )
        if not isinstance(dispatch, Dispatch):
            raise InvalidConfigurationError(
                f"ChannelConfig.dispatch: expected Dispatch.LOOP or Dispatch.INLINE, got {dispatch!r}"
            )
        if isinstance(latency_sample, bool) or not isinstance(latency_sample, int) or not (
            1 <= latency_sample <= MAX_CAPACITY
        ):
            raise InvalidConfigurationError(
                f"ChannelConfig.latency_sample: expected an int between 1 (every event) and {MAX_CAPACITY}, "
                f"got {type(latency_sample).__name__} {latency_sample!r}"
            )
        classes: tuple[type, ...] = ()
        if payload_type is not None:
            classes = _payload_classes(payload_type)
            try:
                decoder = msgspec.msgpack.Decoder(payload_type, dec_hook=_msgspec_dec_hook)
            except (TypeError, ValueError) as exc:
                raise InvalidConfigurationError(
                    f"ChannelConfig.payload_type: {payload_type!r} cannot be decoded by msgspec: {exc}"
                ) from None
            try:  # a type msgspec accepts only through the hook (object, an ABC ...) decodes no frame at all
                decoder.decode(_PROBE)
            except NotImplementedError:
                raise InvalidConfigurationError(
                    f"ChannelConfig.payload_type: msgspec cannot decode frames of {payload_type!r} (bridges, "
                    f"journals and publish_raw could not carry it); declare concrete types (msgspec.Struct, int, "
                    f"str ...), or None for any payload"
                ) from None
            except (msgspec.ValidationError, msgspec.DecodeError, ValueError, TypeError):
                pass  # the probe is no payload of the type: expected
        self.capacity = capacity
        self.description = description
        self.overflow = overflow
        self.payload_type = payload_type
        self.payload_classes = classes
        self.track_latency = bool(track_latency)
        self.dispatch = dispatch
        self.latency_sample = latency_sample

    def __repr__(self) -> str:
        parts = [repr(self.capacity)]
        if self.description:
            parts.append(repr(self.description))
        parts.append(f"overflow={self.overflow}")
        if self.payload_type is not None:
            name = getattr(self.payload_type, "__name__", None) or repr(self.payload_type)
            parts.append(f"payload_type={name}")
        if not self.track_latency:
            parts.append("track_latency=False")
        if self.dispatch is not Dispatch.LOOP:
            parts.append(f"dispatch={self.dispatch}")
        if self.latency_sample != DEFAULT_LATENCY_SAMPLE:
            parts.append(f"latency_sample={self.latency_sample}")
        return f"ChannelConfig({', '.join(parts)})"
