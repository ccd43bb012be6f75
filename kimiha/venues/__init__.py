"""Venue adapters, one package per venue: its wire format, recordings and replay, and its tasks.

* ``kimiha.venues.binance`` -- Binance spot: combined-stream wire parsing, the recorded tape, the connector
  and aggregator tasks.

Each adapter translates its venue's wire into the venue-neutral model of :mod:`kimiha.trading.model`. The
model's names (``Trade``, ``Quote``, ``Order`` ...) were importable from ``kimiha.venues`` in kimiha 0.1; they
still are, for one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

__all__: list[str] = []


def __getattr__(name: str) -> Any:
    from kimiha.trading import model

    if name in model.__all__:
        warnings.warn(f"kimiha.venues.{name} moved to kimiha.trading.model.{name} in kimiha 0.2",
                      DeprecationWarning, stacklevel=2)
        return getattr(model, name)
    raise AttributeError(f"module 'kimiha.venues' has no attribute {name!r}")
