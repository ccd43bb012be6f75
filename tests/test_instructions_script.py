"""benchmarks/instructions.py: its arguments are checked before any valgrind run, and the child it runs under
valgrind runs each kind of case (here without valgrind: the counting itself is valgrind's)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "instructions.py"

pytestmark = pytest.mark.skipif(not SCRIPT.exists(), reason="benchmarks/ is not beside the tests")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--cases", ","], "--cases: expected one or more comma-separated case kinds, got ','"),
        (["--cases", "floor,bogus"], "--cases: unknown case(s) bogus; known: floor"),
        (["--loop", "bogus"], "--loop: expected one of uvloop, asyncio, got 'bogus'"),
        (["--subs", "abc"], "--subs: expected comma-separated integers, got 'abc'"),
        (["--subs", "1,0"], "--subs: expected subscriber counts of 1 or more, got '1,0'"),
        (["--jobs", "0"], "--jobs: expected 1 or more valgrind runs at a time, got 0"),
        (["--n1", "5", "--n2", "3"], "expected 0 < --n1 < --n2, got --n1 5 --n2 3"),
        (["--n1", "1", "--n2", "2"], "expected --n2 - --n1 >= 1000 (fewer say little), got 2 - 1"),
    ],
)
def test_bad_arguments_are_refused_with_what_was_expected(args, message):
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr


@pytest.mark.parametrize(("kind", "subs"), [("floor", "1"), ("bound-inline", "4"), ("inline", "1"), ("sync", "4")])
def test_the_child_runs_a_case_once_and_checks_it(kind, subs):
    proc = run("--child", kind, subs, "2000", "3000", "uvloop")
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_tape_child_replays_the_first_lines():
    proc = run("--child", "inline", "tape", "1500", "1500", "uvloop")
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_small_count_under_valgrind_reports_each_case_and_the_bound_above_the_floor(tmp_path):
    # Two calls (Python -> C -> Python) cost more instructions than the interpreter's one inlined call: the
    # bound must come out above the floor, or the counting is broken.
    out = tmp_path / "ir.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cases", "floor,bound-inline", "--subs", "1", "--n1", "1000", "--n2",
         "2000", "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["case"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"floor", "bound-inline"}
    assert 100 < rows["floor"]["instructions_per_event"] < rows["bound-inline"]["instructions_per_event"]
    assert "bound: compiled, calls in publish" in proc.stdout
