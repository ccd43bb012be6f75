"""Instructions per event of ``kimiha bench compare``'s cases, counted by valgrind: a measure noise cannot move.

Wall and CPU time on a shared machine drift by 1.5x and more between runs (on a bad day the spreads of
``bench compare`` reach 50-160 %); the number of machine instructions a case executes does not. This runs each
case, exactly as ``bench compare`` runs it (``kimiha.bench.compare.run_case``: the README idiom, the same
handler, the same checks), once under ``valgrind --tool=cachegrind`` with N1 events and once with N2, and
reports (I(N2) - I(N1)) / (N2 - N1): the instructions per published event, with start-up, imports, set-up and
the interpreter's warm-up cancelled out. The events are made for N2 in both runs, so their making cancels too.

Instructions are not time: a cache miss, a mispredicted branch or a slow instruction costs more than one, so
the ratios here can differ from the timed ones. They answer a narrower question without noise: how much work
each case does per event, next to the floor, the lower bounds and NautilusTrader.

    python benchmarks/instructions.py                         # the default cases, 1 and 4 subscribers
    python benchmarks/instructions.py --cases floor,inline --subs 1 --json /tmp/ir.json

Needs valgrind (``apt-get install valgrind``) and, for the Nautilus case, ``pip install 'kimiha[bench]'``.
Each run takes about 10-60 s under valgrind; runs go two at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

DEFAULT_CASES = "floor,bound-inline,bound-loop,inline,sync,nautilus,flood-iter,queue"
IR = re.compile(r"I\s+refs:\s+([\d,]+)")


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
    run_case(case, setup)
    # Leave without tearing down: what finalization frees depends on which events the run referenced last,
    # and would add up to ~300 instructions an event to every case alike.
    sys.stdout.flush()
    os._exit(0 if len(made) == n_max else 1)


def count(kind: str, subs: int, n: int, n_max: int, loop: str) -> int:
    """Run the child under cachegrind; return the instructions it executed."""
    cmd = [
        "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
        sys.executable, __file__, "--child", kind, str(subs), str(n), str(n_max), loop,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = IR.search(proc.stderr)
    if proc.returncode != 0 or found is None:
        tail = "\n".join(proc.stderr.splitlines()[-15:])
        raise RuntimeError(f"{kind} ({subs} subs, {n} events) failed under valgrind (exit {proc.returncode}):\n{tail}")
    return int(found.group(1).replace(",", ""))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated case kinds (default {DEFAULT_CASES})")
    parser.add_argument("--subs", default="1,4", help="subscriber counts (default 1,4)")
    parser.add_argument("--n1", type=int, default=10_000, help="events of the first run (default 10000)")
    parser.add_argument("--n2", type=int, default=30_000, help="events of the second run (default 30000)")
    parser.add_argument("--loop", default="uvloop", help="event loop of the loop cases (default uvloop)")
    parser.add_argument("--jobs", type=int, default=2, help="valgrind runs at a time (default 2)")
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, subs, n, n_max, loop = args.child
        child(kind, int(subs), int(n), int(n_max), loop)
        return 0
    if shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (apt-get install valgrind)")
    if not 0 < args.n1 < args.n2:
        parser.error(f"expected 0 < --n1 < --n2, got --n1 {args.n1} --n2 {args.n2}")
    from kimiha.bench.compare import KINDS

    kinds = [k for k in args.cases.split(",") if k]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        parser.error(f"--cases: unknown case(s) {', '.join(unknown)}; known: {', '.join(KINDS)}")
    try:
        subs_list = [int(s) for s in args.subs.split(",")]
    except ValueError:
        parser.error(f"--subs: expected comma-separated integers, got {args.subs!r}")
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
