"""pytest-benchmark suite of the whole trading pipeline: the shipped Binance tape replayed as fast as possible.

Connector -> Aggregator (typed decode, L2 book, book check) -> imbalance Strategy -> paper Executor on one
in-process bus, started and shut down by the orchestrator: ``kimiha.apps.demo.run_demo`` (what ``python -m kimiha
demo`` runs). ``extra_info`` carries the messages per second and the per-channel latency of the last round.

Run: ``python -m pytest benchmarks/test_bench_pipeline.py -q --benchmark-only``.
"""

from __future__ import annotations

import gc

import pytest

from kimiha.apps.demo import run_demo

ROUNDS = 5


@pytest.mark.benchmark(group="pipeline replay")
def test_pipeline_replay(benchmark, loop):
    summaries = []

    def setup():  # type: ignore[no-untyped-def]
        gc.collect()
        return (), {}

    def target() -> None:
        summaries.append(loop.run_until_complete(run_demo(progress=None)))

    benchmark.pedantic(target, setup=setup, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    for summary in summaries:
        assert summary["all_lines_accounted"], summary
        assert summary["hooks_run"], summary
    last = summaries[-1]
    benchmark.extra_info["lines_per_round"] = last["lines_read"]
    stats = getattr(getattr(benchmark, "stats", None), "stats", None)
    if stats is not None:
        benchmark.extra_info["median_messages_per_s"] = round(last["lines_read"] / stats.median, 1)
    benchmark.extra_info["channel_latency_us"] = {
        name: channel["latency_us"] for name, channel in last["channels"].items()
    }
