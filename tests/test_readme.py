"""The README's Python blocks run as written, so the docs cannot rot; its commands are the real ones."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.S)
EXPECTED_OUTPUT = re.compile(r"print\((.*)\)\s+# (.+)$")


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text(encoding="utf-8"))


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 1


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs_and_prints_what_it_says(index, tmp_path):
    code = python_blocks()[index]
    script = tmp_path / f"readme_block_{index}.py"
    script.write_text(code, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # Lines like `print(x)  # value` promise an output: check the promise holds, line by line.
    promised = []
    for line in code.splitlines():
        match = EXPECTED_OUTPUT.search(line.strip())
        if match:
            promised.append(match.group(2).split(":")[0].strip())
    printed = proc.stdout.splitlines()
    assert len(printed) >= len(promised)
    for want, got in zip(promised, printed):
        assert got.strip() == want, f"README promises {want!r}, the code printed {got!r}"


def test_readme_names_the_two_commands():
    text = README.read_text(encoding="utf-8")
    assert "python -m kimiha demo" in text
    assert 'pip install ".[test]" && pytest' in text


EXAMPLE_MARKER = re.compile(r"<!-- example: (\S+) -->\n```python\n(.*?)```", re.S)


def test_readme_quick_starts_are_the_example_files_verbatim():
    text = README.read_text(encoding="utf-8")
    embedded = EXAMPLE_MARKER.findall(text)
    assert {path for path, _ in embedded} >= {"examples/trading_quickstart.py", "examples/task_orchestrator.py"}
    for path, code in embedded:
        source = (README.parent / path).read_text(encoding="utf-8")
        assert code.rstrip() == source.rstrip(), f"README copy of {path} differs from the file"
