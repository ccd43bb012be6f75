"""What an exporter and an importer have in common: one channel of a bus, one subject, one link."""

from __future__ import annotations

from typing import Any

from kimiha.bridge.link import NatsLink
from kimiha.bridge.wire import Delivery
from kimiha.event_bus import EventBus
from kimiha.types import BackgroundTask

__all__ = ["ChannelEndpoint"]


class ChannelEndpoint(BackgroundTask):
    """A bridge task tied to ``event_type``'s channel on ``bus`` and to ``subject`` over ``link``."""

    def __init__(self, link: NatsLink, bus: EventBus, event_type: Any, subject: str, *, delivery: Delivery,
                 stream: str | None, schema: int, name: str) -> None:
        self.name = name
        self._link = link
        self._channel = bus.channel(event_type)
        self.event_type = event_type
        self.type_name = self._channel.name
        self.subject = subject
        self.delivery = delivery
        self.stream = stream
        self.schema = schema

    def _identity(self) -> dict[str, Any]:
        """The first keys of ``stats()``: which channel, subject, delivery and stream this end serves."""
        return {"channel": self.type_name, "subject": self.subject, "delivery": self.delivery.value,
                "stream": self.stream}
