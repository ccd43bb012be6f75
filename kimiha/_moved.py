"""Old module paths of kimiha 0.1 that moved in 0.2, kept importable for one release with a DeprecationWarning.

``import kimiha.pipeline`` (say) finds no file any more: a finder on ``sys.meta_path`` answers for the old
names listed in :data:`MOVED` with a module that re-exports the public names of their new homes, and warns
once per import. Nothing here runs unless an old path is imported. See CHANGELOG.md.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings
from collections.abc import Sequence

__all__ = ["MOVED", "install"]

#: old module path -> the modules that now hold its public names (first one wins on a clash)
MOVED: dict[str, tuple[str, ...]] = {
    "kimiha.pipeline": ("kimiha.trading.tasks", "kimiha.venues.binance.tasks"),
    "kimiha.book": ("kimiha.trading.book",),
    "kimiha.paper": ("kimiha.trading.paper",),
    "kimiha.strategy_logic": ("kimiha.trading.strategy",),
    "kimiha.cli": ("kimiha.apps.cli",),
    "kimiha.demo": ("kimiha.apps.demo",),
    "kimiha.distributed": ("kimiha.apps.distributed",),
    "kimiha.benchmark": ("kimiha.bench.main",),
    "kimiha.benchmark_anchors": ("kimiha.bench.anchors",),
    "kimiha.benchmark_compare": ("kimiha.bench.compare",),
    "kimiha.benchmark_latency": ("kimiha.bench.latency",),
    "kimiha.benchmark_memory": ("kimiha.bench.memory",),
}


def _public(module: types.ModuleType) -> list[str]:
    names = getattr(module, "__all__", None)
    return list(names) if names is not None else [n for n in vars(module) if not n.startswith("_")]


class _MovedLoader(importlib.abc.Loader):
    def __init__(self, targets: Sequence[str]) -> None:
        self.targets = tuple(targets)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None  # the default module object

    def exec_module(self, module: types.ModuleType) -> None:
        name = module.__name__
        where = " and ".join(self.targets)
        warnings.warn(f"{name} moved to {where} in kimiha 0.2; import it from there (the old path goes in 0.3)",
                      DeprecationWarning, stacklevel=2)
        exported: list[str] = []
        for target in reversed(self.targets):
            new = importlib.import_module(target)
            for attr in _public(new):
                setattr(module, attr, getattr(new, attr))
                if attr not in exported:
                    exported.append(attr)
        setattr(module, "__all__", exported)  # noqa: B010 - a module type has no __all__ to the checker
        module.__doc__ = f"Moved: this module's names now live in {where}."


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: types.ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        targets = MOVED.get(fullname)
        if targets is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _MovedLoader(targets))


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once); ``kimiha/__init__.py`` calls it."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
