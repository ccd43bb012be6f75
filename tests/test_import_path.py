"""`python -m kimiha ...` typed in a checkout runs the installed build, not the uncompiled source tree.

`python -m`, `python -c` and `python -m pytest` put the current directory first on sys.path, so in the clone
root `import kimiha` finds the source tree, whose compiled core lives in the installed wheel. The package
hands over to the installed build in that case (see `kimiha/__init__.py`).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import kimiha
import kimiha._core

REPO = pathlib.Path(__file__).resolve().parent.parent
SHOW = "import kimiha, kimiha._core as c; print(kimiha.__file__); print(c.__file__); print(kimiha.EventBus)"


def run_python(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_python_c_in_the_clone_root_imports_the_build_the_tests_use():
    proc = run_python(["-c", SHOW], REPO)
    assert proc.returncode == 0, proc.stderr
    package, core, bus = proc.stdout.splitlines()
    assert package == kimiha.__file__
    assert core == kimiha._core.__file__
    assert bus == repr(kimiha.EventBus) == "<class 'kimiha._core.EventBus'>"  # compiled since 0.3 (issue 13)


def test_python_m_kimiha_in_the_clone_root_runs():
    proc = run_python(["-m", "kimiha", "--help"], REPO)
    assert proc.returncode == 0, proc.stderr
    assert "demo" in proc.stdout


def source_tree_without_core(tmp_path: pathlib.Path) -> pathlib.Path:
    """A copy of the package's Python files, as a fresh clone has them: no compiled core."""
    installed = pathlib.Path(kimiha.__file__).resolve().parent
    tree = tmp_path / "clone"
    shutil.copytree(installed, tree / "kimiha", ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    assert not list((tree / "kimiha").glob("_core*.so"))
    return tree


def test_a_source_tree_without_core_hands_over_to_the_installed_build(tmp_path):
    tree = source_tree_without_core(tmp_path)
    proc = run_python(["-c", SHOW], tree)
    assert proc.returncode == 0, proc.stderr
    package, core, _ = proc.stdout.splitlines()
    assert package == kimiha.__file__ != str(tree / "kimiha" / "__init__.py")
    assert core == kimiha._core.__file__
    proc = run_python(["-m", "kimiha", "--help"], tree)
    assert proc.returncode == 0, proc.stderr


def test_no_installed_build_is_one_clear_import_error(tmp_path):
    tree = source_tree_without_core(tmp_path)
    # -S: no site-packages, so the source tree is the only kimiha there is
    proc = run_python(["-S", "-c", "import kimiha"], tree)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: kimiha: the compiled core (kimiha/_core) is not built"), proc.stderr
    assert "pip install ." in last and str(tree) in last


def test_another_uncompiled_tree_earlier_on_the_path_is_passed_over(tmp_path):
    # found by the adversarial review: a second checkout on PYTHONPATH (or this one through a symlink) was
    # taken as "the installed kimiha" and rejected, and the search stopped there
    tree = source_tree_without_core(tmp_path)
    other = source_tree_without_core(tmp_path / "other")
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "kimiha").symlink_to(tree / "kimiha")
    for cwd, extra in ((tree, other), (linked, other), (linked, tree)):
        proc = subprocess.run([sys.executable, "-c", SHOW], cwd=cwd, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(extra)})
        assert proc.returncode == 0, (cwd, extra, proc.stderr)
        assert proc.stdout.splitlines()[0] == kimiha.__file__
