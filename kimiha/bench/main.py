"""``python -m kimiha bench``: kimiha's benchmarks, measured side by side with what users would use instead.

Three modes, each a function of this package so that an installed wheel runs them (``benchmarks/`` in the
source tree only wraps them):

* ``compare`` (the default): throughput of one flood of events, kimiha vs a direct call of the handler (the
  floor), ``asyncio.Queue`` fan-out on asyncio and uvloop, pyee and NautilusTrader's MessageBus; interleaved
  repetitions in one process, medians, ratios, an optional ratio gate for CI (see ``kimiha.bench.compare``).
* ``latency``: a publisher paced at a fixed rate stamps each event; the handler records publish-to-handler
  latency into an HDR-style histogram; percentiles for kimiha and ``asyncio.Queue``, a table, JSON and a PNG
  plot (see ``kimiha.bench.latency``).
* ``tick``: tick-to-trade on the shipped tape through LOOP and INLINE channels beside a hand-written floor
  (see ``kimiha.bench.tick``).
* ``memory``: RSS growth while millions of events go through a channel with 4 subscribers (see
  ``kimiha.bench.memory``).

Progress goes to stderr, tables to stdout; ``--json PATH`` writes every number. Ctrl-C (or SIGTERM) stops a
mode at once with one line on stderr and exit status 130 (143), as every ``kimiha`` command does.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kimiha

__all__ = ["MODES", "machine_info", "main", "progress", "write_json"]

#: The modes, each with the module that runs it and a one-line description.
MODES = {
    "compare": (
        "kimiha.bench.compare",
        "throughput side by side: floor, kimiha, asyncio.Queue, pyee, Nautilus",
    ),
    "latency": (
        "kimiha.bench.latency",
        "paced publisher, publish-to-handler latency percentiles and plot",
    ),
    "memory": ("kimiha.bench.memory", "RSS growth over millions of events through 4 subscribers"),
    "tick": ("kimiha.bench.tick", "tick-to-trade on the shipped tape: LOOP, INLINE and a hand-written floor"),
}

#: Medians need at least this many repetitions.
MIN_REPEAT = 5

USAGE = """\
usage: kimiha bench [MODE] [options]

modes:
{modes}

`kimiha bench` alone runs `compare`. `kimiha bench MODE --help` lists a mode's options.

examples:
  kimiha bench compare --quick                           compare, smoke run (well under a minute)
  kimiha bench compare --json bench/compare.json         compare, full run, every sample as JSON
  kimiha bench compare --quick --gate 0.6               CI: fail unless tuned Nautilus / README idiom >= 0.6x
  kimiha bench latency --plot latency.png               100k events/s for 200k events per case
  kimiha bench memory --events 10000000                  RSS growth over 10M events, 4 subscribers
  kimiha bench tick --quick                              tick-to-trade, LOOP vs INLINE vs no bus
"""


def usage() -> str:
    """Return the top-level help text of ``kimiha bench``."""
    modes = "\n".join(f"  {name:<9} {description}" for name, (_, description) in MODES.items())
    return USAGE.format(modes=modes)


def progress(msg: str, *, final: bool = False) -> None:
    """Show ``msg`` on stderr: redrawn in place on a terminal; elsewhere only ``final`` messages, one a line."""
    stream = sys.stderr
    if stream.isatty():
        stream.write("\r\x1b[K" + msg + ("\n" if final else ""))
    elif final:
        stream.write(msg + "\n")
    stream.flush()


def machine_info() -> dict[str, Any]:
    """Return what a reader needs to judge the numbers: CPU, clock source, versions."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"
    try:
        clock = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip()
    except OSError:
        clock = "unknown"
    versions = {}
    for mod in ("uvloop", "msgspec"):
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "?")
        except ImportError:
            versions[mod] = "missing"
    try:
        load: Any = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "clocksource": clock,
        "load_average": load,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "kimiha": getattr(kimiha, "__version__", "?"),
        "kimiha_core": kimiha._core.__file__,
        **versions,
    }


def machine_header(info: dict[str, Any]) -> list[str]:
    """Return the two header lines every mode prints above its table."""
    load = info.get("load_average")
    return [
        f"kimiha {info['kimiha']} | Python {info['python']} | uvloop {info['uvloop']} | msgspec {info['msgspec']}",
        f"{info['nproc']} CPU(s): {info['cpu']} | clocksource {info['clocksource']}"
        + (f" | load average {load[0]} {load[1]} {load[2]}" if load else ""),
    ]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kimiha bench [MODE] [options]``; return the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    mode = "compare"
    if args and not args[0].startswith("-"):
        mode = args.pop(0)
        if mode not in MODES:
            sys.stderr.write(f"kimiha bench: unknown mode {mode!r}; expected one of {', '.join(MODES)}\n\n")
            sys.stderr.write(usage())
            return 2
    module_name = MODES[mode][0]
    module = __import__(module_name, fromlist=["main"])
    try:
        return int(module.main(args))
    except KeyboardInterrupt as exc:  # the CLI reports it (kimiha.apps.cli): say which mode was stopped
        exc.bench_mode = mode  # type: ignore[attr-defined]
        raise


if __name__ == "__main__":
    sys.exit(main())
