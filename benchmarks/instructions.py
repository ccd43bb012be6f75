"""Instructions per event of ``kimiha bench compare``'s cases, counted by valgrind: a measure noise cannot move.

Wall and CPU time on a shared machine drift by 1.5x and more between runs (on a bad day the spreads of
``bench compare`` reach 50-160 %); the number of machine instructions a case executes does not. This runs each
case, exactly as ``bench compare`` runs it (``kimiha.bench.compare.run_case``: the README idiom, the same
handler, the same checks), once under ``valgrind --tool=callgrind`` with N1 events and once with N2, and
reports (I(N2) - I(N1)) / (N2 - N1): the instructions per published event. Callgrind counts only inside the
run (it is called through ``operator.call``, whose C function is callgrind's ``--toggle-collect``), so start-up
and imports are not counted at all: NautilusTrader's import alone is 3.4 billion instructions, and it varies
by millions from one start to the next. Set-up and the interpreter's warm-up cancel out in the difference; the
events are made for N2 in both runs. A count repeats to within a few instructions.

Instructions are not time: a cache miss, a mispredicted branch or a slow instruction costs more than one, so
the ratios here can differ from the timed ones. They answer a narrower question without noise: how much work
each case does per event, next to the floor, the lower bounds and NautilusTrader.

    python benchmarks/instructions.py                         # the default cases, 1 and 4 subscribers
    python benchmarks/instructions.py --cases floor,inline --subs 1 --json /tmp/ir.json
    python benchmarks/instructions.py --tape      # ``bench tick``'s whole-tape replay: floor, loop, inline

With ``--tape`` the cases are ``kimiha bench tick``'s as-fast-as-possible replay of the shipped tape
(``kimiha.bench.tick.run_one``: the hand-written floor, and the demo's stages as EventTasks on LOOP and on
INLINE channels); N1 and N2 are then lines of the tape (default 4,000 and 12,000), and the result is the
instructions per line over lines N1..N2.

Needs valgrind (``apt-get install valgrind``) and, for the Nautilus case, ``pip install 'kimiha[bench]'``.
Each run takes about 10-60 s under valgrind; runs go two at a time.
"""

from __future__ import annotations

import argparse
import json
import operator
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

DEFAULT_CASES = "floor,bound-inline,bound-loop,inline,sync,nautilus,flood-iter,queue"
#: Below this many events between the two runs, the interpreter's warm-up and the loop's wake-ups are not
#: amortised and the difference says little.
MIN_SPAN = 1_000
IR = re.compile(r"Collected\s*:\s*(\d+)")
#: The C function behind ``operator.call`` in CPython: callgrind counts only what runs inside it.
TRAMPOLINE = "_operator_call"


def child_tape(kind: str, n: int, loop: str) -> None:
    """Replay the first ``n`` lines of the tape once, as ``bench tick`` does (its orders are checked there)."""
    from kimiha.bench.tick import run_one
    from kimiha.bench.runner import freeze_setup
    from kimiha.venues.binance import recorded_tape
    from kimiha.venues.binance.recording import iter_lines

    lines = list(iter_lines(recorded_tape()))
    if n > len(lines):
        sys.exit(f"--n2: the tape has {len(lines)} lines, asked for {n}")
    freeze_setup()
    operator.call(run_one, kind, lines[:n], 0, loop)
    sys.stdout.flush()
    os._exit(0)


def child(kind: str, subs: int, n: int, n_max: int, loop: str) -> None:
    """Run one case once with ``n`` events (of ``n_max`` made), as ``bench compare`` does."""
    from kimiha.bench.cases import chunked, make_events
    from kimiha.bench.compare import ANCHOR_KINDS, LOOP_KINDS, Case, Setup, chunk_size, run_case
    from kimiha.bench.runner import freeze_setup

    anchor = ANCHOR_KINDS[kind]() if kind in ANCHOR_KINDS else None
    if anchor is not None and not anchor.available:
        sys.exit(f"{kind}: unavailable: {anchor.reason}")
    capacity = 4096
    made = make_events(n_max)   # kept to the end: N1's run frees no more events than N2's
    events = made[:n]
    setup = Setup(n, capacity, events, chunked(events, chunk_size(n, capacity)))
    case = Case(kind, loop if kind.removesuffix("-nolat") in LOOP_KINDS else None, subs, anchor=anchor)
    freeze_setup()
    # operator.call is the trampoline that callgrind collects inside (--toggle-collect): only the run itself is
    # counted, not the imports, whose work varies from one start to the next (NautilusTrader's by millions).
    operator.call(run_case, case, setup)
    # Leave without tearing down: what finalization frees depends on which events the run referenced last,
    # and would add up to ~300 instructions an event to every case alike.
    sys.stdout.flush()
    os._exit(0 if len(made) == n_max else 1)


def tape(args: argparse.Namespace) -> int:
    """The ``--tape`` report: instructions per line of bench tick's floor, loop and inline replays."""
    from kimiha.bench.tick import KINDS

    jobs = [(k, n) for k in KINDS for n in (args.n1, args.n2)]
    print(f"{len(jobs)} valgrind runs, {args.jobs} at a time ...", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        counts = dict(zip(jobs, pool.map(lambda j: count(j[0], "tape", j[1], args.n2, args.loop), jobs)))
    per = {k: (counts[(k, args.n2)] - counts[(k, args.n1)]) / (args.n2 - args.n1) for k in KINDS}
    print(f"whole tape, lines {args.n1}..{args.n2}: instructions per line")
    for k in KINDS:
        print(f"{k:<8} {per[k]:>10.0f} {per[k] / per['floor']:>7.2f}x floor")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"tape": True, "n1": args.n1, "n2": args.n2, "loop": args.loop,
                       "python": sys.version.split()[0], "instructions_per_line": per}, f, indent=2)
    return 0


def count(kind: str, subs: int | str, n: int, n_max: int, loop: str) -> int:
    """Run the child under cachegrind; return the instructions it executed (and say so on stderr)."""
    cmd = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", "--collect-atstart=no",
        f"--toggle-collect={TRAMPOLINE}",
        sys.executable, __file__, "--child", kind, str(subs), str(n), str(n_max), loop,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = IR.search(proc.stderr)
    what = "tape" if subs == "tape" else f"{subs} subs"
    if proc.returncode != 0 or found is None:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"{kind} ({what}, {n}) failed under valgrind (exit {proc.returncode}):\n{tail}")
    instructions = int(found.group(1).replace(",", ""))
    if instructions == 0:
        raise RuntimeError(f"{kind} ({what}, {n}): callgrind counted nothing inside {TRAMPOLINE} (operator.call): "
                           f"this Python's operator.call has another C name")
    print(f"  {kind} ({what}, {n}): {instructions:,} instructions", file=sys.stderr, flush=True)
    return instructions


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Instructions per event of kimiha bench compare's cases, counted by valgrind (cachegrind): "
        "each case runs once with N1 and once with N2 events, and the difference is divided by N2 - N1. "
        "Needs valgrind; each run takes 10-60 s. The cases are described by `python -m kimiha bench compare "
        "--help`.")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated case kinds (default {DEFAULT_CASES})")
    parser.add_argument("--subs", default="1,4", help="subscriber counts (default 1,4)")
    parser.add_argument("--n1", type=int, help="events (lines with --tape) of the first run (default 10000; 4000)")
    parser.add_argument("--n2", type=int, help="events (lines with --tape) of the second run (default 30000; 12000)")
    parser.add_argument("--tape", action="store_true", help="bench tick's whole-tape cases (floor, loop, inline)")
    parser.add_argument("--loop", default="uvloop", help="event loop of the loop cases (default uvloop)")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time (default 2)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, subs, n, n_max, loop = args.child
        if subs == "tape":
            child_tape(kind, int(n), loop)
        child(kind, int(subs), int(n), int(n_max), loop)
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    if args.n1 is None:
        args.n1 = 4_000 if args.tape else 10_000
    if args.n2 is None:
        args.n2 = 12_000 if args.tape else 30_000
    if not 0 < args.n1 < args.n2:
        parser.error(f"expected 0 < --n1 < --n2, got --n1 {args.n1} --n2 {args.n2}")
    if args.n2 - args.n1 < MIN_SPAN:
        parser.error(f"expected --n2 - --n1 >= {MIN_SPAN} (fewer say little), got {args.n2} - {args.n1}")
    if args.jobs < 1:
        parser.error(f"--jobs: expected 1 or more valgrind runs at a time, got {args.jobs}")
    from kimiha.runtime import LOOPS

    if args.loop not in LOOPS:
        parser.error(f"--loop: expected one of {', '.join(LOOPS)}, got {args.loop!r}")
    if args.tape:
        return tape(args)
    from kimiha.bench.compare import KINDS

    kinds = [k for k in args.cases.split(",") if k]
    if not kinds:
        parser.error(f"--cases: expected one or more comma-separated case kinds, got {args.cases!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"--cases: unknown case(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    try:
        subs_list = [int(s) for s in args.subs.split(",")]
    except ValueError:
        parser.error(f"--subs: expected comma-separated integers, got {args.subs!r}")
    if any(s < 1 for s in subs_list):
        parser.error(f"--subs: expected subscriber counts of 1 or more, got {args.subs!r}")
    jobs = [(k, s, n) for s in subs_list for k in kinds for n in (args.n1, args.n2)]
    print(f"{len(jobs)} valgrind runs, {args.jobs} at a time ...", file=sys.stderr, flush=True)
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        counts = dict(zip(jobs, pool.map(lambda j: count(j[0], j[1], j[2], args.n2, args.loop), jobs)))
    rows: list[dict[str, Any]] = []
    for s in subs_list:
        per = {k: (counts[(k, s, args.n2)] - counts[(k, s, args.n1)]) / (args.n2 - args.n1) for k in kinds}
        floor = per.get("floor")
        for k in kinds:
            rows.append({"case": k, "label": KINDS[k], "subscribers": s, "instructions_per_event": per[k],
                         "x_floor": per[k] / floor if floor else None})
    width = max(len(r["label"]) for r in rows)
    print(f"{'case':<{width}} {'subs':>4} {'instr/event':>12} {'x floor':>8}")
    for r in rows:
        xf = f"{r['x_floor']:.2f}x" if r["x_floor"] else ""
        print(f"{r['label']:<{width}} {r['subscribers']:>4} {r['instructions_per_event']:>12.0f} {xf:>8}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n1": args.n1, "n2": args.n2, "loop": args.loop, "python": sys.version.split()[0],
                       "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
