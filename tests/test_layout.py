"""The package's rooms and the one rule between them: imports run down, never up (see ARCHITECTURE.md).

framework (kimiha/*.py, scheduling/, bridge/, the compiled core) < trading/ < venues/ < bench/ < apps/.
A module may import its own room and the rooms below it. Every import counts, function-local and
TYPE_CHECKING ones too, since each is a dependency somebody has to keep.
"""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

import kimiha

PACKAGE = pathlib.Path(kimiha.__file__).resolve().parent
ROOMS = ["framework", "trading", "venues", "bench", "apps"]


def room_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "kimiha":
        raise ValueError(module)
    if len(parts) == 1 or parts[1] in ("scheduling", "bridge") or parts[1].startswith("_core"):
        return "framework"
    if parts[1] in ("trading", "venues", "bench", "apps"):
        return parts[1]
    if parts[1] == "__main__":
        return "apps"  # `python -m kimiha` is the CLI
    return "framework"


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from kimiha import apps` imports a room as well
            if target == "kimiha":
                found += [(node.lineno, f"kimiha.{alias.name}") for alias in node.names]
    return [(line, target) for line, target in found if target == "kimiha" or target.startswith("kimiha.")]


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_is_in_a_room():
    assert SOURCES, PACKAGE
    for path in SOURCES:
        assert room_of(module_name(path)) in ROOMS


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_down_never_up(path):
    mine = room_of(module_name(path))
    upward = [
        f"line {line}: imports {target} ({room_of(target)})"
        for line, target in imports_of(path)
        if ROOMS.index(room_of(target)) > ROOMS.index(mine)
    ]
    assert not upward, f"{path.relative_to(PACKAGE)} is in room {mine!r} but " + "; ".join(upward)


def test_a_venue_imports_no_other_venue():
    for path in (PACKAGE / "venues").rglob("*.py"):
        parts = module_name(path).split(".")
        if len(parts) < 3:
            continue
        venue = parts[2]
        for line, target in imports_of(path):
            other = target.split(".")
            assert not (len(other) > 2 and other[1] == "venues" and other[2] != venue), (
                f"{path.relative_to(PACKAGE)} line {line}: venue {venue} imports {target}")


def test_import_kimiha_loads_only_the_framework():
    code = "import kimiha, sys; print('\\n'.join(sorted(m for m in sys.modules if m.startswith('kimiha'))))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=PACKAGE.parent.parent if "site-packages" not in PACKAGE.parts else "/")
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split()
    assert "kimiha.event_bus" in loaded
    assert [m for m in loaded if room_of(m) != "framework"] == []


def test_the_room_rule_is_checked_at_all():
    # the checker sees an upward import where there is one (a check that cannot fail is no check)
    fake = PACKAGE / "trading" / "book.py"
    assert room_of(module_name(fake)) == "trading"
    assert ROOMS.index(room_of("kimiha.apps.demo")) > ROOMS.index(room_of(module_name(fake)))
    assert room_of("kimiha.venues.binance.wire") == "venues"
    assert room_of("kimiha.scheduling.shutdown") == "framework"


@pytest.mark.parametrize("old", sorted(__import__("kimiha._moved", fromlist=["MOVED"]).MOVED))
def test_a_0_1_module_path_still_imports_with_a_deprecation_warning(old):
    import importlib

    from kimiha._moved import MOVED

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=rf"{old} moved to .*{MOVED[old][0]}"):
        module = importlib.import_module(old)
    new = importlib.import_module(MOVED[old][0])
    for name in new.__all__:
        assert getattr(module, name) is getattr(new, name)


def test_the_0_1_market_model_names_still_import_from_kimiha_venues():
    from kimiha.trading import model

    with pytest.warns(DeprecationWarning, match="kimiha.venues.Trade moved to kimiha.trading.model.Trade"):
        from kimiha.venues import Trade
    assert Trade is model.Trade
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        __import__("kimiha.venues", fromlist=["Nope"]).Nope
