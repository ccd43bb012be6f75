"""What ``kimiha bench latency`` and ``compare`` print: built from made-up results, no timing measured here."""

from __future__ import annotations

import argparse
import asyncio
import re

import pytest

from kimiha.bench import compare, latency
from kimiha.bench.anchors import Anchor
from kimiha.bench.main import machine_info

INFO = machine_info()


class FakeClock:
    """``monotonic_ns`` that moves 1 ns per read, plus whatever a publisher's ``stall`` adds."""

    def __init__(self) -> None:
        self.t = 1_000_000

    def __call__(self) -> int:
        self.t += 1
        return self.t


def run_pace(monkeypatch, publish, n: int, interval: int, clock: FakeClock) -> latency.Pacing:
    monkeypatch.setattr(latency, "monotonic_ns", clock)
    return asyncio.run(latency.pace([publish], n, 0, interval))


def test_one_stall_is_one_stall_and_the_backlog_after_it_is_late(monkeypatch):
    clock = FakeClock()

    def publish(event: latency.Stamped) -> None:
        if event.seq == 100:
            clock.t += 20 * 1000  # held up for 20 intervals once

    stats = run_pace(monkeypatch, publish, 1000, 1000, clock)
    assert stats.stalls == 1
    # every event sent more than an interval behind the fixed schedule until caught up counts: 19 here
    assert 15 <= stats.late <= 20
    assert stats.end_lag_ns == 0  # caught up by the end


def test_a_publisher_slower_than_the_pace_never_catches_up(monkeypatch):
    clock = FakeClock()

    def publish(event: latency.Stamped) -> None:
        clock.t += 1500  # every send takes 1.5 intervals: the asked rate cannot be held

    stats = run_pace(monkeypatch, publish, 1000, 1000, clock)
    assert stats.late > 990 and stats.end_lag_ns > 100 * 1000
    assert stats.stalls == 0  # no send came two intervals after the one before: it is slow, not stalled
    assert stats.rate < 0.7 * 1e6


def latency_case(kind: str, subs: int, rate: float, late_share: float, base_ns: int = 1000) -> latency.LatencyCase:
    c = latency.LatencyCase(kind, "uvloop", subs)
    for i in range(1000):
        c.hist.record(base_ns + i)
    c.sent = 10_000
    c.elapsed_ns = int(c.sent * 1e9 / rate)
    c.late = int(late_share * c.sent)
    c.stalls = 10
    for _ in range(5):
        c.samples.append({"summary": c.hist.summary()})
    return c


def latency_args(rate: int = 100_000) -> argparse.Namespace:
    return argparse.Namespace(rate=rate, events=10_000, segments=5, warmup=100, loops=["uvloop"])


def latency_report(held: bool) -> list[str]:
    cases = latency.build_cases(["uvloop"])
    made = [
        latency_case(c.kind, c.subs, 99_000 if held else 22_468, 0.01 if held else 0.9, 200 if "inline" in c.kind else 1000)
        for c in cases
    ]
    return latency.format_report(made, latency_args(), INFO, 1.0).splitlines()


def test_latency_report_warns_and_measures_no_target_when_the_load_was_not_held():
    lines = latency_report(held=False)
    warning = next(i for i, line in enumerate(lines) if line.startswith("WARNING"))
    targets = next(i for i, line in enumerate(lines) if line.startswith("targets on uvloop"))
    assert warning < targets
    assert "did not hold the load of 100,000 events/s" in lines[warning]
    assert "kimiha/uvloop/1: 22,468 events/s (22% of asked)" in "\n".join(lines)
    target_lines = [line for line in lines[targets:] if "(target <=" in line]
    assert target_lines and all(line.endswith(latency.NOT_MEASURED) for line in target_lines)
    ratio_lines = [line for line in lines if line.startswith("* at p")]
    assert ratio_lines and all(line.endswith(latency.NOT_MEASURED) for line in ratio_lines)
    assert not any(re.search(r"\b(met|MET|MISSED|missed)$", line) for line in lines)


def test_latency_report_marks_targets_when_the_load_was_held_and_explains_its_columns():
    lines = latency_report(held=True)
    text = "\n".join(lines)
    assert "WARNING" not in text and latency.NOT_MEASURED not in text
    assert any(line.startswith("late   = events sent more than one interval behind") for line in lines)
    assert any(line.startswith("stalls = ") for line in lines)
    assert "* = the project's target" in text and "tracker" not in text
    assert "issue 13's" in text
    statuses = [line.rsplit(" ", 1)[1] for line in lines if "(target <=" in line]
    assert statuses and set(statuses) <= {"MET", "MISSED"}


@pytest.mark.parametrize("held", [True, False])
def test_latency_table_columns_align_for_the_longest_label_and_lines_fit(held):
    lines = latency_report(held)
    assert max(len(line) for line in lines) <= 110, max(lines, key=len)
    header = next(line for line in lines if line.startswith("case "))
    rows = [line for line in lines if line.startswith(tuple(label + " " for label in latency.KINDS.values()))]
    assert any(line.startswith("direct call (measurement floor) ") for line in rows)
    loop_at = header.index("loop")
    assert len(rows) == len(latency.build_cases(["uvloop"]))
    assert all(line[loop_at:loop_at + 6] == "uvloop" for line in rows)
    assert len({line.index("%") for line in rows}) == 1  # the late column ends in one place


def test_latency_progress_counts_events_per_case(monkeypatch, capsys):
    monkeypatch.setattr(latency, "run_latency_case", lambda case, n, warmup, rate: {})
    monkeypatch.setattr(latency, "format_report", lambda *a: "")
    latency.main(["--events", "100", "--segments", "5", "--no-plot"])
    err = capsys.readouterr().err
    assert "segment 1/5 done" in err
    assert "(20 of 100 events recorded so far in each of 10 cases)" in err
    assert "(100 of 100 events recorded so far in each of 10 cases)" in err


#: The other libraries as if installed (nothing of theirs runs here): their rows and ratio labels are the widest.
ANCHORS = {kind: Anchor(kind, "1.0", detail="made up") for kind in compare.ANCHOR_KINDS}


def compare_report(spread: float, clock: str = "wall") -> list[str]:
    cases = compare.build_cases(["uvloop"], ANCHORS)
    for c in cases:
        base = 100.0 if c.kind == "floor" else 24.0 if c.kind in compare.PUBLISH_KINDS else 150.0
        c.samples = [base, base, base, base, base * (1 + spread / 100)]
    args = argparse.Namespace(events=1000, repeat=5, capacity=4096, seed=1, clock=clock)
    ratios = compare.build_ratios(cases, ["uvloop"])
    return compare.format_report(cases, ratios, INFO, args, 1024, 1.0, ANCHORS).splitlines()


def test_compare_table_aligns_explains_its_markers_and_fits():
    lines = compare_report(spread=10)
    text = "\n".join(lines)
    assert max(len(line) for line in lines) <= 110, max(lines, key=len)
    header = next(line for line in lines if line.startswith("case "))
    loop_at = header.index("loop")
    rows = [line for line in lines if line.startswith(tuple(label + " " for label in compare.KINDS.values()))]
    assert len(rows) == len(compare.build_cases(["uvloop"], ANCHORS))
    assert any(line.startswith("* Nautilus, tuned / README idiom, LOOP ") for line in lines)
    assert any(line.startswith("kimiha README idiom, INLINE, no latency ") for line in rows)
    assert all(line[loop_at:loop_at + 7].strip() in ("uvloop", "-") for line in rows)
    assert len({line.index("x", loop_at) for line in rows}) == 1  # the last column ends in one place
    assert "tracker" not in text and "* = one of issue 13's targets" in text
    assert "MET / MISSED" in text
    assert "publish only: these rows call no handler" in text
    assert "--clock cpu" not in text


def test_compare_report_wraps_the_note_of_a_skipped_library():
    cases = compare.build_cases(["uvloop"])
    for c in cases:
        c.samples = [100.0] * 5
    args = argparse.Namespace(events=1000, repeat=5, capacity=4096, seed=20240601, clock="wall")
    reason = "x is not installed; pip install 'kimiha[bench]' " * 3
    skipped = {kind: Anchor(kind, reason=reason) for kind in compare.ANCHOR_KINDS}
    lines = compare.format_report(cases, compare.build_ratios(cases, ["uvloop"]), INFO, args, 1024, 1.0, skipped)
    assert max(len(line) for line in lines.splitlines()) <= 110
    assert "Nautilus MessageBus, tuned: skipped: x is not installed" in lines


def test_compare_suggests_the_cpu_clock_when_the_spread_is_large():
    assert any("--clock cpu" in line and "spread up to 141%" in line for line in compare_report(spread=141))
    assert not any("--clock cpu" in line for line in compare_report(spread=141, clock="cpu"))


def test_the_cpu_clock_counts_only_the_thread_that_runs_the_case():
    """``--clock cpu`` timed the process: a thread beside the case (uvloop's io_uring polling thread, any
    library's worker) made the case look slower by all of that thread's CPU. The clock must count the case's
    thread alone. Here the measuring thread only sleeps while another burns CPU: the clock must show (almost)
    none of it, and the other thread's own CPU time shows that it did burn."""
    import threading
    import time

    clock = compare.CLOCKS["cpu"]
    burned: list[int] = []
    started = threading.Event()

    def burn() -> None:
        t0 = time.thread_time_ns()
        started.set()
        while time.thread_time_ns() - t0 < 60_000_000:  # 60 ms of this thread's own CPU
            pass
        burned.append(time.thread_time_ns() - t0)

    worker = threading.Thread(target=burn)
    before = clock()
    worker.start()
    started.wait()
    worker.join()  # this thread waits (sleeps in join) while the worker burns
    measured = clock() - before
    assert burned and burned[0] >= 60_000_000
    assert measured < burned[0] / 4, (
        f"the cpu clock counted {measured / 1e6:.1f} ms while this thread only waited and another burned "
        f"{burned[0] / 1e6:.1f} ms"
    )
