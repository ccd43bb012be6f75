"""The demo's digest: the same input gives the same orders and fills on every loop and at every replay speed."""

from __future__ import annotations

import pytest

import kimiha
from kimiha.apps.demo import format_summary, run_demo
from kimiha.venues.binance import iter_lines, recorded_tape

LINES = 25_000  # the first ~2.5 minutes of the shipped tape: a snapshot, dozens of orders, seconds to run


@pytest.fixture(scope="module")
def slice_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tape") / "slice.txt"
    lines = []
    for line in iter_lines(recorded_tape()):
        lines.append(line)
        if len(lines) == LINES:
            break
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def demo(path, loop="uvloop", **kwargs):
    return kimiha.run(run_demo([path], progress=None, **kwargs), loop=loop)


def test_same_digest_on_both_loops_and_when_paced(slice_path):
    fast = demo(slice_path)
    other_loop = demo(slice_path, loop="asyncio")
    paced = demo(slice_path, speed=3_000.0)  # real sleeps between lines: other interleavings of the stages
    assert fast["orders"] > 20 and fast["fills"] == fast["orders"]
    assert len(fast["digest"]) == 64 and int(fast["digest"], 16) >= 0
    for run in (other_loop, paced):
        for key in ("digest", "orders", "fills", "pnl", "position", "signals"):
            assert run[key] == fast[key], key
    # the strategy's cooldown is a clock alert: one ended per order (the last one's may still be pending)
    assert fast["orders"] - 1 <= fast["cooldowns_ended"] <= fast["orders"]
    assert f"digest {fast['digest']}" in format_summary(fast)


def test_latency_report_and_latency_change_the_fills_not_the_orders(slice_path):
    report = demo(slice_path, latency_report=True)
    by_latency = report["pnl_by_latency"]
    assert list(by_latency) == ["0 ms", "1 ms", "10 ms"]
    assert by_latency["0 ms"]["digest"] == report["digest"]  # the shadow at 0 ms is the executor itself
    assert by_latency["10 ms"]["digest"] != report["digest"]  # fills arrive later (their times differ)
    late = demo(slice_path, latency_ms=10.0)
    assert late["digest"] == by_latency["10 ms"]["digest"]  # the shadow and a real 10 ms executor agree
    assert late["orders"] == report["orders"]
    assert "PnL by order latency: 0 ms" in format_summary(report)


@pytest.mark.parametrize("argv, fragment", [
    (["demo", "--latency", "-1"], "milliseconds"),
    (["demo", "--latency", "soon"], "milliseconds"),
    (["demo", "--latency", "5", "--distributed"], "in-process demo only"),
    (["demo", "--journal", "x.kj", "--distributed"], "in-process demo only"),
    (["demo", "--journal-rotate-mb", "0"], "expected a number of MiB > 0"),
])
def test_bad_time_options_are_one_line_and_exit_2(argv, fragment, capsys):
    from kimiha.apps.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_replay_of_a_missing_journal_is_one_line_and_exit_2(tmp_path, capsys):
    from kimiha.apps.cli import main

    assert main(["replay", str(tmp_path / "nothing.kj")]) == 2
    err = capsys.readouterr().err
    assert err == f"kimiha replay: {tmp_path / 'nothing.kj'}: no such journal file\n"
