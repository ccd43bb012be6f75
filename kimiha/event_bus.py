"""The event bus: named broadcast channels over kimiha's compiled ring (see ``kimiha._core``)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kimiha._core import DEFAULT_BUDGET, Channel, EventBusCore, Subscription
from kimiha.channel_config import ChannelConfig
from kimiha.error import InvalidChannelError, InvalidConfigurationError

__all__ = ["EventBus", "Channel", "Subscription"]


def _channel_name(key: Any) -> str:
    value = getattr(key, "value", None)
    return value if isinstance(value, str) else str(key)


class EventBus(EventBusCore):
    """Broadcast channels keyed by :class:`~kimiha.EventType` members.

    Parameters
    ----------
    channels : iterable of (event_type, ChannelConfig)
        The channels to create; a duplicate key is an error.
    dispatch_budget : int
        Most events one handler receives per loop callback before the loop runs timers and I/O again.

    Examples
    --------
    >>> bus = EventBus([(Ev.MARKET_DATA, ChannelConfig(1024))])
    >>> bus.publish(Ev.MARKET_DATA, Tick(price=1.0))
    0
    """

    __slots__ = ()

    def __init__(
        self,
        channels: Iterable[tuple[Any, ChannelConfig]] = (),
        *,
        dispatch_budget: int = DEFAULT_BUDGET,
    ) -> None:
        if isinstance(dispatch_budget, bool) or not isinstance(dispatch_budget, int) or dispatch_budget < 1:
            raise InvalidConfigurationError(
                f"EventBus.dispatch_budget: expected an int >= 1, got {dispatch_budget!r}"
            )
        self._set_budget(dispatch_budget)
        if isinstance(channels, dict):
            channels = channels.items()
        for item in channels:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise InvalidConfigurationError(
                    f"EventBus channels: expected (event_type, ChannelConfig) pairs, got {item!r}"
                )
            self.add_channel(*item)

    def add_channel(self, event_type: Any, config: ChannelConfig) -> Channel:
        """Create the channel of ``event_type``.

        Raise ``InvalidChannelError`` if the key already has a channel, or if another key's channel has the
        same name (the member's value: two ``EventType`` classes with a ``"MarketData"`` member collide).
        """
        if not isinstance(config, ChannelConfig):
            raise InvalidConfigurationError(
                f"add_channel({event_type!r}): expected a ChannelConfig, got {type(config).__name__} {config!r}"
            )
        try:
            hash(event_type)
        except TypeError:
            raise InvalidChannelError(
                f"channel key must be hashable (an EventType member), got {type(event_type).__name__}"
            ) from None
        if event_type is None:
            raise InvalidChannelError("channel key must not be None")
        if self.has_channel(event_type):
            raise InvalidChannelError(
                f"channel {event_type!r} already exists ({self.channel(event_type).capacity} slots); "
                f"a channel is never replaced"
            )
        name = _channel_name(event_type)
        for ch in self._all_channels():
            if ch.name == name:
                raise InvalidChannelError(
                    f"channel {event_type!r} cannot be added: its name {name!r} is already the name of channel "
                    f"{ch.key!r}; channel names must be unique (stats, bridges and journals key channels by "
                    f"name), so give one of the two keys another value"
                )
        return self._add_channel_c(event_type, name, config)

    def has_channel(self, event_type: Any) -> bool:
        """Whether ``event_type`` has a channel on this bus."""
        try:
            self.channel(event_type)
        except InvalidChannelError:
            return False
        return True

    @property
    def channels(self) -> list[Any]:
        """The channel keys, in creation order."""
        return [ch.key for ch in self._all_channels()]

    def _all_channels(self) -> list[Channel]:
        return self._channels_list()

    def stats(self, event_type: Any = None) -> Any:
        """Return one channel's stats dict, or ``{channel name: stats}`` for every channel."""
        if event_type is not None:
            return self.channel(event_type).stats()
        return {ch.name: ch.stats() for ch in self._all_channels()}

    def format_stats(self) -> str:
        """Return the channels' counters and latency as a readable table."""
        header = (
            f"{'channel':<20} {'subs':>4} {'published':>11} {'delivered':>11} {'lagged':>8} "
            f"{'blocked':>7} {'hwm':>6} {'p50 us':>8} {'p99 us':>8} {'max us':>9}"
        )
        lines = [header, "-" * len(header)]
        for ch in self._all_channels():
            s = ch.stats()
            lat = s["latency_ns"]
            lines.append(
                f"{s['channel'][:20]:<20} {s['subscribers']:>4} {s['published']:>11} {s['delivered']:>11} "
                f"{s['lagged']:>8} {s['blocked']:>7} {s['high_water_mark']:>6} {lat['p50'] / 1e3:>8.2f} "
                f"{lat['p99'] / 1e3:>8.2f} {lat['max'] / 1e3:>9.2f}"
            )
        return "\n".join(lines)

    def __enter__(self) -> EventBus:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        names = ", ".join(ch.name for ch in self._all_channels())
        return f"<EventBus channels=[{names}]{' closed' if self.closed else ''}>"
