"""The event bus: named broadcast channels over kimiha's compiled ring (see ``kimiha._core``).

:class:`EventBus` itself is compiled: CPython specializes ``bus.publish(Ev.X, payload)`` only when the bus's
type is the type that defines ``publish``, so a Python subclass here would cost every publish a generic call.
"""

from __future__ import annotations

from kimiha._core import Channel, EventBus, Subscription

__all__ = ["EventBus", "Channel", "Subscription"]
