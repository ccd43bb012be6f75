"""The libraries kimiha is compared with, loaded only if installed.

They come with ``pip install 'kimiha[bench]'`` (``pip install '.[bench]'`` in a checkout).

* **pyee** ``EventEmitter``: ``ee.on(name, handler)``, ``ee.emit(name, event)`` calls every handler inline.
* **NautilusTrader** ``MessageBus`` (``nautilus_trader.common.component``): ``subscribe(topic, handler)``,
  ``publish(topic, msg)`` calls every handler inline, then checks whether the message is of a type it could
  publish externally: ``isinstance(msg, <tuple of ~66 publishable types>)`` on every publish, whether or not
  a database or listener is configured. ``MessageBusConfig(types_filter=[...])`` removes types from that tuple;
  *tuned* here means a filter holding every publishable type, so the tuple is empty and the check costs
  nothing (plus ``external_pub=False`` on each publish). The type list is read from the installed
  ``nautilus_trader/serialization/base.pyx`` (it is a C-level set, not reachable from Python), so the filter
  matches whatever version is installed. The untuned default is measured too, for reference.

Each loader returns an :class:`Anchor`; one that cannot be used says why in ``reason`` and the comparison
prints it as "skipped: <reason>".
"""

from __future__ import annotations

import builtins
import importlib
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["NAUTILUS_TOPIC", "PYEE_EVENT", "Anchor", "load_nautilus", "load_pyee"]

NAUTILUS_TOPIC = "data.bench.ticks"
PYEE_EVENT = "tick"
BENCH_HINT = "pip install 'kimiha[bench]' (pip install '.[bench]' in a checkout)"


@dataclass
class Anchor:
    """One library to compare with: whether it can run here, its version, or why not."""

    name: str
    version: str | None = None
    reason: str | None = None  # set when the library cannot be used: the "skipped: <reason>" note
    detail: str = ""  # how it is configured, for the report
    factory: Any = None  # builds the object a case publishes through, see the loaders

    @property
    def available(self) -> bool:
        return self.reason is None


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------------------------
# pyee


def load_pyee() -> Anchor:
    """Return pyee's anchor; its factory ``(handlers) -> EventEmitter`` has every handler on ``PYEE_EVENT``."""
    try:
        from pyee import EventEmitter
    except ImportError as exc:
        return Anchor("pyee", reason=f"pyee is not installed ({exc}); {BENCH_HINT}")

    def factory(handlers: list[Callable[[Any], None]]) -> Any:
        ee = EventEmitter()
        for h in handlers:
            ee.on(PYEE_EVENT, h)
        return ee

    return Anchor(
        "pyee", version=_version("pyee"), detail="EventEmitter, ee.emit(name, event)", factory=factory
    )


# ---------------------------------------------------------------------------------------------------------------
# NautilusTrader


_SET_RE = re.compile(r"^_EXTERNAL_PUBLISHABLE_TYPES\s*=\s*\{(?P<body>.*?)^\}", re.DOTALL | re.MULTILINE)
_IMPORT_RE = re.compile(r"^from\s+(?P<module>[\w.]+)\s+c?import\s+(?P<name>\w+)\s*$", re.MULTILINE)


def nautilus_publishable_types() -> list[type]:
    """Return every type NautilusTrader's MessageBus would check for external publishing.

    Raise ``RuntimeError`` saying what is missing when the installed version does not ship the source this
    reads, or a name cannot be resolved (the filter would then be incomplete and the tuning not what it says).
    """
    from nautilus_trader.serialization import base

    source = Path(base.__file__).with_name("base.pyx")
    if not source.is_file():
        raise RuntimeError(f"cannot tune NautilusTrader's MessageBus: {source} is not installed")
    text = source.read_text()
    match = _SET_RE.search(text)
    if match is None:
        raise RuntimeError(
            f"cannot tune NautilusTrader's MessageBus: no _EXTERNAL_PUBLISHABLE_TYPES in {source}"
        )
    names = [n.strip() for n in match.group("body").replace("\n", " ").split(",") if n.strip()]
    modules = {m.group("name"): m.group("module") for m in _IMPORT_RE.finditer(text)}
    types: list[type] = []
    missing = []
    for name in names:
        if name in modules:
            try:
                types.append(getattr(importlib.import_module(modules[name]), name))
                continue
            except (ImportError, AttributeError):
                pass
        builtin = getattr(builtins, name, None)
        if isinstance(builtin, type):
            types.append(builtin)
        else:
            missing.append(name)
    if missing or not types:
        raise RuntimeError(
            f"cannot tune NautilusTrader's MessageBus: {len(missing)} of {len(names)} publishable types "
            f"not found ({', '.join(missing[:5])})"
        )
    return types


def load_nautilus(tuned: bool = True) -> Anchor:
    """Return NautilusTrader's anchor; its factory ``(handlers) -> MessageBus`` subscribes them to one topic.

    The caller publishes with ``bus.publish(NAUTILUS_TOPIC, event, False)`` when tuned (``external_pub=False``),
    ``bus.publish(NAUTILUS_TOPIC, event)`` otherwise; ``bus.pub_count`` counts publishes.
    """
    label = "NautilusTrader MessageBus" + ("" if tuned else " (default config)")
    try:
        from nautilus_trader.common.component import MessageBus, TestClock
        from nautilus_trader.common.config import MessageBusConfig
        from nautilus_trader.model.identifiers import TraderId
    except ImportError as exc:
        return Anchor(label, reason=f"nautilus_trader is not installed ({exc}); {BENCH_HINT}")
    version = _version("nautilus_trader")
    if tuned:
        try:
            types_filter = nautilus_publishable_types()
        except (RuntimeError, ImportError, OSError) as exc:
            return Anchor(label, version=version, reason=str(exc))
        detail = (
            f"MessageBusConfig(types_filter=<all {len(types_filter)} publishable types>), "
            f"publish(topic, msg, external_pub=False)"
        )
    else:
        types_filter = None
        detail = "MessageBusConfig() defaults, publish(topic, msg)"

    def factory(handlers: list[Callable[[Any], None]]) -> Any:
        config = MessageBusConfig(types_filter=list(types_filter)) if types_filter is not None else None
        bus = MessageBus(TraderId("BENCH-001"), TestClock(), config=config)
        for h in handlers:
            bus.subscribe(NAUTILUS_TOPIC, h)
        return bus

    return Anchor(label, version=version, detail=detail, factory=factory)
