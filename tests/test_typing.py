"""Typing: the stub matches the compiled module, the docs type-check under ``mypy --strict``, typed handles
reveal the payload type, and ``kimiha.typed`` checks at runtime what it promises to the type checker."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import msgspec
import pytest

import kimiha
import kimiha._core
from kimiha import ChannelConfig, Event, EventBus, EventType, InvalidChannelError, InvalidConfigurationError
from kimiha.typed import typed_channel

ALLOWLIST = pathlib.Path(__file__).with_name("stubtest-allowlist.txt")
ROOT = pathlib.Path(__file__).resolve().parent.parent
README_BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _mypy_cwd(tmp_path: pathlib.Path) -> pathlib.Path:
    # An installed wheel is found by mypy as a PEP 561 package from anywhere; an editable install is
    # not, so there mypy has to run beside the source tree.
    package = pathlib.Path(kimiha.__file__).resolve().parent
    return tmp_path if "site-packages" in package.parts else package.parent


def _mypy_config(tmp_path: pathlib.Path) -> pathlib.Path:
    config = tmp_path / "mypy.ini"
    config.write_text(f"[mypy]\ncache_dir = {tmp_path / '.mypy_cache'}\n")
    return config


def _run_mypy(tmp_path: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(_mypy_config(tmp_path)), *args],
        capture_output=True, text=True, timeout=600, cwd=_mypy_cwd(tmp_path),
    )


def test_core_stub_matches_the_compiled_module(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "kimiha._core", "--allowlist", str(ALLOWLIST),
         "--mypy-config-file", str(_mypy_config(tmp_path))],
        capture_output=True, text=True, timeout=600, cwd=_mypy_cwd(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout


# stubtest cannot compare signatures here: the compiled methods (binding=False) have no __text_signature__, so
# it only checks that the names exist. Their docstrings do carry the Cython signature (embedsignature=True),
# e.g. "Channel.subscribe(self, handler=None, *, on_lag=None, bool frames=False)"; compare the stub with that.
_C_TYPE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*\s+)+(?=[A-Za-z_])")


def _runtime_signature(line: str) -> tuple[list[tuple[str, str, bool]], str] | None:
    """Parse an embedded signature into [(kind, name, has_default)], kinds as in inspect."""
    match = re.match(r"^[A-Za-z_][\w.]*\((.*)\)", line)
    if match is None:
        return None
    params: list[tuple[str, str, bool]] = []
    kind = "POSITIONAL_OR_KEYWORD"
    for token in [t.strip() for t in match.group(1).split(",") if t.strip()]:
        if token == "/":
            params = [("POSITIONAL_ONLY", n, d) for _, n, d in params]
        elif token == "*":
            kind = "KEYWORD_ONLY"
        elif token.startswith("**"):
            params.append(("VAR_KEYWORD", token[2:], False))
        elif token.startswith("*"):
            params.append(("VAR_POSITIONAL", token[1:], False))
            kind = "KEYWORD_ONLY"
        else:
            left, eq, _ = token.partition("=")
            left = re.sub(r"\s+(not|or)\s+None$", "", left.strip())
            params.append((kind, _C_TYPE.sub("", left).strip(), bool(eq)))
    return params, match.group(1)


def _stub_signature(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[tuple[str, str, bool]]:
    a = func.args
    positional = [("POSITIONAL_ONLY", p.arg) for p in a.posonlyargs] + [
        ("POSITIONAL_OR_KEYWORD", p.arg) for p in a.args]
    first_default = len(positional) - len(a.defaults)
    params = [(kind, name, i >= first_default) for i, (kind, name) in enumerate(positional)]
    if a.vararg:
        params.append(("VAR_POSITIONAL", a.vararg.arg, False))
    params += [("KEYWORD_ONLY", p.arg, d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        params.append(("VAR_KEYWORD", a.kwarg.arg, False))
    return params


def _is_decorated(func: ast.FunctionDef | ast.AsyncFunctionDef, name: str) -> bool:
    return any(isinstance(d, ast.Name) and d.id == name or isinstance(d, ast.Attribute) and d.attr == name
               for d in func.decorator_list)


def test_core_stub_signatures_match_the_compiled_signatures():
    stub = ast.parse(pathlib.Path(kimiha._core.__file__).with_name("_core.pyi").read_text(encoding="utf-8"))
    scopes: list[tuple[str, object, list[ast.stmt]]] = [("", kimiha._core, stub.body)]
    scopes += [(node.name + ".", getattr(kimiha._core, node.name), node.body)
               for node in stub.body if isinstance(node, ast.ClassDef)]
    compared, unreadable, problems = [], [], []
    for prefix, owner, body in scopes:
        funcs = [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        overloaded = {f.name for f in funcs if _is_decorated(f, "overload")}
        for func in funcs:
            if _is_decorated(func, "property"):
                continue                                  # stubtest checks properties
            where = prefix + func.name
            doc = (getattr(getattr(owner, func.name, None), "__doc__", None) or "").splitlines()
            parsed = _runtime_signature(doc[0]) if doc and doc[0].startswith(where + "(") else None
            if parsed is None:
                unreadable.append(where)
                continue
            runtime, text = parsed
            stubbed = _stub_signature(func)
            compared.append(where)
            if [(k, n) for k, n, _ in stubbed] != [(k, n) for k, n, _ in runtime]:
                problems.append(f"{where}: stub has {stubbed}, the compiled module ({text}) has {runtime}")
                continue
            for (_, name, stub_default), (_, _, runtime_default) in zip(stubbed, runtime):
                if stub_default and not runtime_default:
                    problems.append(f"{where}: the stub gives {name} a default, the compiled ({text}) not")
                # An overload may require what the runtime defaults (`frames: Literal[True]`), no plain stub.
                if runtime_default and not stub_default and func.name not in overloaded:
                    problems.append(f"{where}: the compiled ({text}) defaults {name}, the stub requires it")
    assert not problems, "\n".join(problems)
    # Slot methods carry no embedded signature; anything else unreadable means the check went blind.
    assert len(compared) > 40, compared
    assert [w for w in unreadable if not w.rsplit(".", 1)[-1].startswith("__")] == [], unreadable
    assert len(compared) >= 40, f"expected to compare every stubbed method, compared only {compared}"


def test_examples_and_readme_blocks_pass_mypy_strict(tmp_path):
    examples = sorted((ROOT / "examples").glob("*.py"))
    assert {"trading_quickstart.py", "task_orchestrator.py"} <= {p.name for p in examples}, examples
    files = []
    for path in examples:
        target = tmp_path / f"example_{path.name}"
        target.write_text(path.read_text(encoding="utf-8"), encoding="utf-8")
        files.append(target)
    blocks = README_BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    assert blocks, "README.md has no ```python block to check"
    for index, code in enumerate(blocks):
        target = tmp_path / f"readme_block_{index}.py"
        target.write_text(code, encoding="utf-8")
        files.append(target)
    proc = _run_mypy(tmp_path, "--strict", *map(str, files))
    assert proc.returncode == 0, f"mypy --strict rejected the documented code:\n{proc.stdout}{proc.stderr}"
    assert f"no issues found in {len(files)} source files" in proc.stdout, (
        f"expected mypy to check {len(files)} files, it said:\n{proc.stdout}"
    )


# Each line ending in `# T: <type>` must reveal exactly that type, each line ending in `# E: <code>` must get
# exactly that one error; nothing else may be reported.
SNIPPET = '''
from kimiha import ChannelConfig, Event, EventBus, EventType, Subscription
from kimiha.typed import typed_channel


class Ev(EventType):
    TICKS = "Ticks"


class Tick(Event):
    symbol: str
    price: float


class Order(Event):
    qty: float


def on_tick(tick: Tick) -> None: ...
def on_event(event: Event) -> None: ...
def on_order(order: Order) -> None: ...


async def main() -> None:
    bus = EventBus([(Ev.TICKS, ChannelConfig(8, payload_type=Tick))])
    tick = Tick("BTCUSDT", 1.0)
    reveal_type(tick)  # T: snippet.Tick
    tick.price = 2.0  # E: misc
    Tick("BTCUSDT")  # E: call-arg
    Tick(1, 2.0)  # E: arg-type
    ticks = typed_channel(bus, Ev.TICKS, Tick)
    reveal_type(ticks)  # T: kimiha._core.Channel[snippet.Tick]
    sub = ticks.subscribe()
    reveal_type(sub)  # T: kimiha._core.Subscription[snippet.Tick]
    reveal_type(await sub.recv())  # T: snippet.Tick
    reveal_type(sub.try_recv())  # T: snippet.Tick | None
    reveal_type(sub.drain())  # T: list[snippet.Tick]
    reveal_type(await sub.recv_batch())  # T: list[snippet.Tick]
    async for event in sub:
        reveal_type(event)  # T: snippet.Tick
    with ticks.subscribe() as managed:
        reveal_type(managed)  # T: kimiha._core.Subscription[snippet.Tick]
    reveal_type(ticks.subscribe(frames=True).try_recv())  # T: tuple[int, int, bytes] | None
    ticks.subscribe(on_tick)
    ticks.subscribe(on_event)
    ticks.subscribe(on_order)  # E: arg-type
    ticks.subscribe(lambda t: print(t.qty))  # E: attr-defined
    ticks.publish(tick)
    ticks.publish(Order(1.0))  # E: arg-type
    reveal_type(bus.subscribe(Ev.TICKS))  # T: kimiha._core.Subscription[Any]
    reveal_type(bus.subscribe(Ev.TICKS).try_recv())  # T: Any | None
    reveal_type(bus.subscribe(Ev.TICKS, frames=True))  # T: kimiha._core.Subscription[tuple[int, int, bytes]]
    annotated: Subscription[Tick] = bus.subscribe(Ev.TICKS)
    reveal_type(annotated.try_recv())  # T: snippet.Tick | None
    bare: Subscription = bus.subscribe(Ev.TICKS)
    reveal_type(bare)  # T: kimiha._core.Subscription[Any]
'''

def _modern_spelling(line: str) -> str:
    """Spell types as mypy 2 does: mypy 1.x writes ``builtins.int`` and ``Union[X, None]``."""
    return re.sub(r"Union\[(.*), None\]", r"\1 | None", line.replace("builtins.", ""))


MYPY_LINE = re.compile(r"^snippet\.py:(\d+): (error|note): (.*?)(?:  \[([a-z-]+)\])?$")


def test_typed_handles_reveal_the_payload_type_and_events_stay_frozen(tmp_path):
    (tmp_path / "snippet.py").write_text(SNIPPET, encoding="utf-8")
    proc = _run_mypy(tmp_path, "--strict", "--show-error-codes", "--no-pretty", str(tmp_path / "snippet.py"))
    expected: dict[int, list[str]] = {}
    for number, line in enumerate(SNIPPET.splitlines(), start=1):
        if "# T: " in line:
            expected[number] = [f'note: Revealed type is "{line.split("# T: ")[1].strip()}"']
        elif "# E: " in line:
            expected[number] = [f"error: [{line.split('# E: ')[1].strip()}]"]
    got: dict[int, list[str]] = {}
    for line in proc.stdout.splitlines():
        match = MYPY_LINE.match(_modern_spelling(line))
        if match is None:
            continue
        number, kind, text, code = match.groups()
        got.setdefault(int(number), []).append(f"note: {text}" if kind == "note" else f"error: [{code}]")
    assert "snippet.py" in proc.stdout, f"mypy did not report on the snippet:\n{proc.stdout}{proc.stderr}"
    wrong = {n: (expected.get(n), got.get(n)) for n in sorted(expected.keys() | got.keys())
             if expected.get(n) != got.get(n)}
    assert not wrong, "line: (expected, mypy said)\n" + "\n".join(
        f"{n}: {pair}" for n, pair in wrong.items()) + f"\n\nfull mypy output:\n{proc.stdout}"

# -- runtime: what the typing promises holds -------------------------------------------------------------


class Ev(EventType):
    TICKS = "Ticks"
    MIXED = "Mixed"
    UNTYPED = "Untyped"


class Tick(Event, tag=True):
    symbol: str
    price: float


class Trade(Event, tag=True):
    qty: float


def _bus() -> EventBus:
    return EventBus([
        (Ev.TICKS, ChannelConfig(8, payload_type=Tick)),
        (Ev.MIXED, ChannelConfig(8, payload_type=Tick | Trade)),
        (Ev.UNTYPED, ChannelConfig(8)),
    ])


def test_event_subclasses_are_frozen_without_saying_so():
    tick = Tick("BTCUSDT", 1.0)
    assert Tick.__struct_config__.frozen is True
    with pytest.raises(AttributeError):
        tick.price = 2.0  # type: ignore[misc]
    assert hash(tick) == hash(Tick("BTCUSDT", 1.0))
    # The type-checker-only decorator leaves the runtime class exactly what msgspec made.
    assert Event.__mro__ == (Event, msgspec.Struct, *msgspec.Struct.__mro__[1:])
    assert not hasattr(Event, "__dataclass_transform__")


def test_typed_channel_is_the_channel_itself_and_delivers_its_payloads():
    bus = _bus()
    ticks = typed_channel(bus, Ev.TICKS, Tick)
    assert ticks is bus.channel(Ev.TICKS)
    sub = ticks.subscribe()
    assert ticks.publish(Tick("BTCUSDT", 1.0)) == 1
    assert sub.try_recv() == Tick("BTCUSDT", 1.0)
    assert sub.try_recv() is None
    bus.close()


def test_typed_channel_accepts_a_common_base_of_a_union_channel():
    bus = _bus()
    assert typed_channel(bus, Ev.MIXED, Event) is bus.channel(Ev.MIXED)
    assert typed_channel(bus, Ev.TICKS, Event) is bus.channel(Ev.TICKS)


def test_typed_channel_refuses_a_type_the_channel_does_not_guarantee():
    bus = _bus()
    with pytest.raises(InvalidChannelError) as info:
        typed_channel(bus, Ev.TICKS, Trade)
    assert str(info.value) == (
        "channel 'Ticks' carries Tick, expected Trade (or subclasses of it); Tick is not a Trade"
    )
    with pytest.raises(InvalidChannelError) as info:
        typed_channel(bus, Ev.MIXED, Tick)
    assert str(info.value) == (
        "channel 'Mixed' carries Tick | Trade, expected Tick (or subclasses of it); Trade is not a Tick"
    )


def test_typed_channel_refuses_a_channel_without_a_declared_payload_type():
    with pytest.raises(InvalidChannelError) as info:
        typed_channel(_bus(), Ev.UNTYPED, Tick)
    assert str(info.value) == (
        "channel 'Untyped' declares no payload type, so it accepts any payload, not only Tick; "
        "give its ChannelConfig payload_type=Tick"
    )


def test_typed_channel_refuses_a_payload_type_that_is_not_a_class():
    with pytest.raises(InvalidConfigurationError, match=r"expected a payload class, got .*Tick \| .*Trade"):
        typed_channel(_bus(), Ev.MIXED, Tick | Trade)  # type: ignore[arg-type]


def test_typed_channel_of_an_unknown_channel_names_the_known_ones():
    bus = EventBus([(Ev.TICKS, ChannelConfig(8, payload_type=Tick))])
    with pytest.raises(InvalidChannelError, match=r"unknown channel .*MIXED.*known channels: Ev\.TICKS"):
        typed_channel(bus, Ev.MIXED, Tick)


def test_generic_handles_can_be_subscripted_at_runtime():
    assert kimiha.Subscription[Tick].__origin__ is kimiha.Subscription
    assert kimiha.Channel[Tick].__origin__ is kimiha.Channel


def test_the_package_itself_passes_mypy_strict(tmp_path):
    # the installed package, checked with the repository's mypy settings (optional libraries without types)
    config = pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", str(config), "--cache-dir",
         str(tmp_path / "cache"), "-p", "kimiha"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success: no issues found" in proc.stdout
