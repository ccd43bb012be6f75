"""The commands the docs tell a user to type, read from the docs themselves so that CI runs what they say.

* ``README.md``: the section "## The two commands" holds exactly two ```` ```bash ```` blocks: the main job, then the
  tests. ``python .ci/doc_commands.py readme main`` (or ``tests``) prints one of them.
* ``benchmarks/README.md``, ``RELIABILITY.md``: every line of every ```` ```bash ```` block is a command (blank
  lines and ``#`` comment lines aside; a trailing ``  # comment`` is dropped). ``python .ci/doc_commands.py
  run FILE ...`` runs each in bash from the repository root, in order, prints its wall time and stops at the
  first that fails. With ``--suite-ran``, a command that is nothing but ``pytest`` of test files (``-q`` /
  ``-s`` at most: no marker, no selection, no environment) is not run again: the README's test command ran the
  whole suite in this environment just before (CI on 3.11), those files included; the line says so.

Stdlib only: it runs before anything is installed.
"""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)


def readme_commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"^## The two commands\n(.*?)(?=^## )", text, re.S | re.M)
    if match is None:
        raise SystemExit("doc_commands: README.md has no '## The two commands' section")
    blocks = [body.strip() for lang, body in FENCE.findall(match.group(1)) if lang in ("bash", "sh")]
    if len(blocks) != 2 or any("\n" in b or not b for b in blocks):
        raise SystemExit(f"doc_commands: expected two one-line command blocks under 'The two commands', "
                         f"got {blocks!r}")
    return {"main": blocks[0], "tests": blocks[1]}


def bash_commands(path: pathlib.Path) -> list[str]:
    commands = []
    for lang, body in FENCE.findall(path.read_text(encoding="utf-8")):
        if lang not in ("bash", "sh"):
            continue
        for line in body.splitlines():
            line = re.split(r"\s{2,}#", line, maxsplit=1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


#: ``pytest tests/x.py [tests/y.py ...] [-q] [-s]``: what the whole suite already covers.
SUITE_SUBSET = re.compile(r"^pytest(\s+tests/[\w/]+\.py)+(\s+-[qs])*$")


def run(paths: list[str], suite_ran: bool = False) -> int:
    total = time.monotonic()
    for name in paths:
        path = (ROOT / name).resolve()
        commands = bash_commands(path)
        if not commands:
            print(f"doc_commands: {name} has no ```bash block: nothing it claims to run", file=sys.stderr)
            return 1
        for command in commands:
            if suite_ran and SUITE_SUBSET.match(command):
                print(f"\n-- {name}: $ {command}\n-- {name}: not run again: these test files ran in the whole "
                      f"suite (the README's test command) in this environment", flush=True)
                continue
            print(f"\n-- {name}: $ {command}", flush=True)
            started = time.monotonic()
            rc = subprocess.run(["bash", "-c", f"set -eo pipefail; {command}"], cwd=ROOT).returncode
            took = time.monotonic() - started
            print(f"-- {name}: exit {rc} in {took:.1f} s: {command}", flush=True)
            if rc != 0:
                print(f"doc_commands: {name}: `{command}` failed with exit {rc}", file=sys.stderr)
                return 1
    print(f"\ndoc_commands: every command of {', '.join(paths)} ran, {time.monotonic() - total:.0f} s in all")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["readme"] and len(argv) == 2 and argv[1] in ("main", "tests"):
        print(readme_commands()[argv[1]])
        return 0
    if argv[:1] == ["list"] and len(argv) > 1:
        for name in argv[1:]:
            print("\n".join(bash_commands(ROOT / name)))
        return 0
    if argv[:1] == ["run"] and len(argv) > 1:
        suite_ran = "--suite-ran" in argv[1:]
        files = [a for a in argv[1:] if a != "--suite-ran"]
        if files:
            return run(files, suite_ran)
    print("usage: doc_commands.py readme main|tests | list FILE... | run [--suite-ran] FILE...", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
