"""The interleaved-repetition runner of ``kimiha bench compare`` and ``latency``, and what else they share.

Both modes run every case once per repetition, all cases of one repetition before the next (A, B, C, A, B,
C, ...), in one process, so that the drift of a noisy machine hits every case alike; each repetition's result
is a sample of its case, and the reports give medians (compare) or per-repetition ranges (latency) over them.
:func:`run_interleaved` is that loop; :class:`BenchCase` is what it runs (a kind, a loop, a subscriber count
and the samples collected so far). Beside them: the loops and subscriber counts the modes measure, the parsing
of ``--loops``, the table rows grouped by subscribers, the JSON of a paired ratio, and the argument parser and
JSON writing that ``kimiha bench memory`` uses too.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kimiha.bench.main import progress, write_json
from kimiha.runtime import LOOPS

__all__ = [
    "LOOPS",
    "SUBSCRIBER_COUNTS",
    "BenchCase",
    "freeze_setup",
    "new_parser",
    "paired_json",
    "parse_loops",
    "rows_by_subscribers",
    "run_interleaved",
    "save_json",
]

#: compare and latency measure each case with 1 and with 4 subscribers.
SUBSCRIBER_COUNTS = (1, 4)

C = TypeVar("C", bound="BenchCase")


@dataclass
class BenchCase:
    """One measured case: what it runs (``kind``), on which loop (``None``: no event loop), with how many
    subscribers, and one sample per repetition run so far."""

    kind: str
    loop: str | None
    subs: int
    samples: list[Any] = field(default_factory=list)

    #: kind -> the label of the report; set by each mode.
    LABELS: ClassVar[dict[str, str]] = {}

    @property
    def key(self) -> str:
        return f"{self.kind}/{self.loop or '-'}/{self.subs}"

    @property
    def label(self) -> str:
        return self.LABELS[self.kind]

    @property
    def median(self) -> float:
        return float(statistics.median(self.samples))

    def identity(self) -> dict[str, Any]:
        """Return the keys that name the case in the JSON output."""
        return {"case": self.kind, "label": self.label, "loop": self.loop, "subscribers": self.subs}


def freeze_setup() -> None:
    """Keep what setup built (imported libraries, the events) out of the collector's passes from now on.

    It stays alive to the end of the run, so that the size of one library's imports does not slow down the
    cases of another.
    """
    gc.collect()
    gc.freeze()


def run_interleaved(
    cases: Sequence[C],
    repeat: int,
    run: Callable[[C, int], Any],
    *,
    note: Callable[[int, int, C], str],
    done: Callable[[int, float], str],
    rotate: bool = False,
    keep: bool = True,
) -> None:
    """Run every case once per repetition, repetition after repetition; append each result to its samples.

    ``run(case, rep)`` runs one case in repetition ``rep`` (1-based) and returns the sample; ``keep=False``
    drops it (a warm-up pass). Progress: ``note(rep, i, case)`` before the ``i``-th case of a repetition
    (redrawn in place on a terminal), ``done(rep, seconds)`` after each repetition. ``rotate`` starts each
    repetition one case further on, so that no case always runs right after the same one.
    """
    for rep in range(1, repeat + 1):
        started = time.monotonic()
        order = list(cases)
        if rotate:
            order = order[rep % len(order) :] + order[: rep % len(order)]
        for i, case in enumerate(order, 1):
            progress(note(rep, i, case))
            sample = run(case, rep)
            if keep:
                case.samples.append(sample)
        progress(done(rep, time.monotonic() - started), final=True)


def new_parser(prog: str, description: str, epilog: str) -> argparse.ArgumentParser:
    """Return the argument parser of a mode; its help keeps the line breaks of the description and epilog."""
    return argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def parse_loops(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """Return the event loops named in ``--loops`` (comma-separated), or exit through ``parser.error``."""
    loops = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in loops if name not in LOOPS]
    if unknown or not loops:
        parser.error(
            f"--loops: expected a comma-separated subset of {','.join(LOOPS)}, got {unknown or 'none'}"
        )
    return loops


def rows_by_subscribers(cases: Sequence[C], row: Callable[[C], str]) -> list[str]:
    """Return the table rows of ``cases`` grouped by subscriber count, each group ending in a blank line."""
    lines = []
    for subs in SUBSCRIBER_COUNTS:
        lines += [row(c) for c in cases if c.subs == subs]
        lines.append("")
    return lines


def paired_json(value: float, paired: Sequence[float]) -> dict[str, float]:
    """Return the JSON of a ratio: its value and the range of the per-repetition (paired) ratios."""
    return {"value": value, "paired_min": min(paired), "paired_max": max(paired)}


def save_json(path: Path, data: dict[str, Any]) -> None:
    """Write the results to ``path`` and say so on stderr."""
    write_json(path, data)
    progress(f"wrote {path}", final=True)
