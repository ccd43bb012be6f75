"""What bridges have in common: an exporter's and an importer's channel, subject and link
(:class:`ChannelEndpoint`), and a bridge's registration and lookups over its tasks (:class:`BridgeTasks`)."""

from __future__ import annotations

from typing import Any

import asyncio

from kimiha.bridge.link import NatsLink
from kimiha.bridge.wire import Delivery
from kimiha.error import InvalidConfigurationError, InvalidStateError
from kimiha.event_bus import EventBus
from kimiha.scheduler import Scheduler
from kimiha.types import BackgroundTask

__all__ = ["BridgeTasks", "ChannelEndpoint"]


class BridgeTasks:
    """A bridge's tasks once configured: ``register`` them, ``flush`` the exporters, find an endpoint.

    Subclasses (:class:`~kimiha.bridge.NatsBridge`, :class:`~kimiha.bridge.ShmBridge`) set ``name``,
    ``exporters`` and ``importers`` and define ``tasks`` (in registration order).
    """

    name: str
    exporters: list[Any]
    importers: list[Any]
    _registered: bool

    @property
    def tasks(self) -> list[Any]:
        return [*self.exporters, *self.importers]

    def register(self, target: Any) -> list[int]:
        """Register the bridge's tasks with a :class:`~kimiha.Scheduler` (or a built orchestrator).

        Call it before the scheduler starts; return the task ids.
        """
        kind = type(self).__name__
        scheduler = getattr(target, "scheduler", target)
        if not isinstance(scheduler, Scheduler):
            raise InvalidConfigurationError(
                f"{kind}.register: expected a Scheduler or a TradingOrchestrator, got {type(target).__name__}")
        if self._registered:
            raise InvalidStateError(f"{kind} {self.name!r} is already registered")
        self._registered = True
        return [scheduler.register_background_task(task) for task in self.tasks]

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every exporter has sent what its channel published so far (JetStream: stored).

        Return False if ``timeout`` seconds passed first.
        """
        if not self.exporters:
            return True
        return all(await asyncio.gather(*(e.flush(timeout) for e in self.exporters)))

    def exporter(self, event_type: Any) -> Any:
        """Return the exporter of ``event_type``'s channel."""
        for exporter in self.exporters:
            if exporter.event_type == event_type:
                return exporter
        raise InvalidConfigurationError(f"channel {event_type!r} is not exported by bridge {self.name!r}")

    def importer(self, event_type: Any) -> Any:
        """Return the (first) importer into ``event_type``'s channel."""
        for importer in self.importers:
            if importer.event_type == event_type:
                return importer
        raise InvalidConfigurationError(f"channel {event_type!r} is not imported by bridge {self.name!r}")


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
