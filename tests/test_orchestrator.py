"""Trading orchestrator: builder checks, start/shutdown order, and the real pipeline on the recorded tape."""

from __future__ import annotations

import asyncio
import gzip
import json
import pathlib
import subprocess
import sys

import pytest

from kimiha import (
    Aggregator,
    BuildError,
    ChannelConfig,
    Connector,
    Event,
    EventBus,
    EventType,
    Executor,
    MissingComponentError,
    OrchestratorError,
    Strategy,
    TradingOrchestratorBuilder,
)
from kimiha.apps.demo import run_demo
from kimiha.venues.binance import count_lines_by_stream, iter_lines, recorded_tape

ROOT = pathlib.Path(__file__).resolve().parent.parent


class Ev(EventType):
    RAW = "Raw"
    MD = "MD"
    ORDERS = "Orders"
    NOWHERE = "Nowhere"


class Msg(Event):
    n: int


def make_bus() -> EventBus:
    return EventBus([(Ev.RAW, ChannelConfig(256, payload_type=Msg)), (Ev.MD, ChannelConfig(256, payload_type=Msg)),
                     (Ev.ORDERS, ChannelConfig(256, payload_type=Msg))])


class LogMixin:
    def __init__(self, log: list[str], name: str) -> None:
        self.log = log
        self.name = name

    async def initialize(self) -> None:
        self.log.append(f"init {self.name}")

    async def shutdown(self) -> None:
        self.log.append(f"shutdown {self.name}")


class Feed(LogMixin, Connector):
    def __init__(self, log, bus, count=50, name="feed"):
        super().__init__(log, name)
        self.bus, self.count, self.sent = bus, count, 0

    async def execute(self):
        if self.sent < self.count:
            await self.bus.publish_async(Ev.RAW, Msg(self.sent))
            self.sent += 1
        else:
            await asyncio.sleep(0.001)


class Relay(LogMixin):
    """An event task that republishes what it gets on ``source`` to ``target`` (async, so it can wait)."""

    def __init__(self, log, bus, source, target, name):
        super().__init__(log, name)
        self.bus, self.source, self.target, self.seen = bus, source, target, []

    def subscribed_event(self):
        return self.source

    async def handle_event(self, event):
        await asyncio.sleep(0)
        self.seen.append(event.n)
        if self.target is not None:
            await self.bus.publish_async(self.target, event)


class Agg(Relay, Aggregator):
    pass


class Strat(Relay, Strategy):
    pass


class Exe(Relay, Executor):
    pass


def full_builder(log, bus):
    return (TradingOrchestratorBuilder(bus)
            .with_connector(Feed(log, bus))
            .with_aggregator(Agg(log, bus, Ev.RAW, Ev.MD, "agg"))
            .with_strategy(Strat(log, bus, Ev.MD, Ev.ORDERS, "strat"))
            .with_executor(Exe(log, bus, Ev.ORDERS, None, "exe")))


# --- builder checks --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "omit, expected",
    [
        ("connector", "no connector"),
        ("aggregator", "no aggregator"),
        ("strategy", "no strategy"),
        ("executor", "no executor"),
    ],
)
def test_each_missing_component_alone(omit, expected):
    log: list[str] = []
    bus = make_bus()
    builder = TradingOrchestratorBuilder(bus)
    if omit != "connector":
        builder.with_connector(Feed(log, bus))
    if omit != "aggregator":
        builder.with_aggregator(Agg(log, bus, Ev.RAW, Ev.MD, "agg"))
    if omit != "strategy":
        builder.with_strategy(Strat(log, bus, Ev.MD, Ev.ORDERS, "strat"))
    if omit != "executor":
        builder.with_executor(Exe(log, bus, Ev.ORDERS, None, "exe"))
    with pytest.raises(BuildError) as info:
        builder.build()
    assert isinstance(info.value, MissingComponentError) and isinstance(info.value, OrchestratorError)
    assert len(info.value.problems) == 1 and expected in info.value.problems[0]


def test_second_aggregator_is_an_error_and_nothing_is_left_running():
    log: list[str] = []
    bus = make_bus()
    builder = full_builder(log, bus).with_aggregator(Agg(log, bus, Ev.RAW, Ev.MD, "agg2"))
    with pytest.raises(BuildError) as info:
        builder.build()
    assert info.value.problems == ["exactly one aggregator is allowed, got 2: 'agg', 'agg2'"]
    assert all(bus.channel(c).subscribers == 0 for c in (Ev.RAW, Ev.MD, Ev.ORDERS))  # registered nothing
    assert log == []


def test_wrong_role_missing_methods_and_missing_channel_alone():
    log: list[str] = []
    bus = make_bus()
    strat = Strat(log, bus, Ev.MD, Ev.ORDERS, "strat")
    cases = {
        "is a Strategy, passed to with_executor()": lambda b: b.with_executor(strat),
        "lacks subscribed_event, handle_event()": lambda b: b.with_executor(object()),
        "has no `async def execute()`": lambda b: b.with_connector(object()),
        "which the bus does not have": lambda b: b.with_executor(Exe(log, bus, Ev.NOWHERE, None, "lost")),
        "is added twice": lambda b: b.with_strategy(b._strategies[0][0]),
    }
    for expected, mutate in cases.items():
        builder = full_builder(log, bus)
        mutate(builder)
        with pytest.raises(BuildError) as info:
            builder.build()
        assert len(info.value.problems) == 1, info.value.problems
        assert expected in info.value.problems[0], info.value.problems


def test_several_problems_reported_at_once():
    log: list[str] = []
    bus = make_bus()
    builder = (TradingOrchestratorBuilder(bus)
               .with_aggregator(Agg(log, bus, Ev.NOWHERE, Ev.MD, "agg"))
               .with_aggregator(Agg(log, bus, Ev.RAW, Ev.MD, "agg2"))
               .with_executor(object()))
    with pytest.raises(BuildError) as info:
        builder.build()
    problems = info.value.problems
    assert len(problems) == 5, problems
    text = str(info.value)
    for fragment in ("no connector", "exactly one aggregator", "no strategy", "lacks subscribed_event",
                     "Ev.NOWHERE"):
        assert fragment in text


def test_build_twice_is_an_error():
    log: list[str] = []
    builder = full_builder(log, make_bus())
    builder.build()
    with pytest.raises(OrchestratorError, match="already called"):
        builder.build()


# --- lifecycle order -------------------------------------------------------------------------------------------


def test_start_consumers_first_shutdown_in_reverse_with_stages_drained(run):
    async def main():
        log: list[str] = []
        bus = make_bus()
        engine = full_builder(log, bus).build()
        await engine.start()
        assert log == ["init exe", "init strat", "init agg", "init feed"]
        feed = engine.connectors[0]
        while feed.sent < 50:
            await asyncio.sleep(0)
        await engine.shutdown()
        assert log[4:] == ["shutdown feed", "shutdown agg", "shutdown strat", "shutdown exe"]
        # every event the connector published went through all three stages
        assert engine.aggregator.seen == list(range(50))
        assert engine.strategies[0].seen == list(range(50))
        assert engine.executors[0].seen == list(range(50))
        assert engine.scheduler.last_shutdown["not_drained"] == {}
        assert {s["state"] for s in engine.registry.snapshot()} == {"stopped"}

    run(main())


# --- the real pipeline on the recorded tape --------------------------------------------------------------------


def test_pipeline_on_shipped_tape_book_check_and_every_line(run):
    summary = run(run_demo(progress=None))
    expected = count_lines_by_stream(recorded_tape())
    assert summary["all_lines_accounted"] is True
    assert summary["lines_read"] == sum(expected.values()) == 99_574
    assert summary["messages_by_stream"] == dict(expected)
    assert summary["bad_lines"] == 0
    book = summary["book_check"]
    assert book["compared"] >= 1000 and book["matched"] == book["compared"]
    assert book["gaps"] == 0 and book["book_state"] == "live"
    assert summary["orders"] > 0 and summary["fills"] == summary["orders"] and summary["rejected"] == 0
    assert summary["channels"]["RawMarketData"]["published"] == 99_574
    assert all(c["lagged"] == 0 for c in summary["channels"].values())


def tape_head(n: int) -> list[bytes]:
    lines = []
    for line in iter_lines(recorded_tape()):
        lines.append(line)
        if len(lines) == n:
            break
    return lines


def test_corrupt_and_truncated_lines_are_reported_and_skipped(run, tmp_path):
    lines = tape_head(3000)
    truncated = lines[2000][: len(lines[2000]) // 2]
    doctored = lines[:1000] + [b"1723161300000000000 {this is not json"] + lines[1000:2000] + [truncated] + lines[2001:]
    path = tmp_path / "doctored.txt"  # plain text: --data accepts uncompressed recordings too
    path.write_bytes(b"\n".join(doctored) + b"\n")
    summary = run(run_demo([path], progress=None))
    assert summary["bad_lines"] == 2
    assert summary["lines_read"] == len(doctored)
    good = count_lines_by_stream([path])
    assert sum(summary["messages_by_stream"].values()) == len(doctored) - 2
    assert summary["messages_by_stream"] == {k: v for k, v in good.items() if k != "bad"}
    assert summary["book_check"]["compared"] > 0  # the run went on past both bad lines


def test_recording_with_an_update_id_gap_is_detected(run, tmp_path):
    lines = tape_head(4000)
    depth = [i for i, line in enumerate(lines) if b"depth@100ms" in line]
    victim = depth[len(depth) // 2]  # well after the snapshot
    path = tmp_path / "gap.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(b"\n".join(lines[:victim] + lines[victim + 1:]) + b"\n")
    summary = run(run_demo([path], progress=None))
    assert summary["book_check"]["gaps"] >= 1
    assert summary["book_check"]["book_state"] == "out_of_sync"
    assert summary["book_check"]["matched"] == summary["book_check"]["compared"]  # never a silently wrong book


# --- examples and the CLI --------------------------------------------------------------------------------------


def run_python(*args: str) -> subprocess.CompletedProcess[str]:
    # cwd outside the source tree: `python -m kimiha` must import the installed package, not ./kimiha
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT / "examples")


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(example):
    proc = run_python(str(ROOT / "examples" / example))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_trading_quickstart_output():
    proc = run_python(str(ROOT / "examples" / "trading_quickstart.py"))
    assert proc.returncode == 0, proc.stderr
    assert "book check 1072/1072" in proc.stdout


def test_trading_quickstart_trades_as_the_demo_does():
    """The quick start replays the demo's tape through the same tasks: it must make the same fills. On the
    default LiveClock the strategy's cooldown alerts (the tape's 2024 time + 1 s) fired at once: 206 fills and a
    short position, silently."""
    quick = run_python(str(ROOT / "examples" / "trading_quickstart.py"))
    demo = run_python("-m", "kimiha", "demo", "--json", "--no-progress")
    assert quick.returncode == 0 and demo.returncode == 0, (quick.stderr, demo.stderr)
    summary = json.loads(demo.stdout)
    assert f"fills {summary['fills']}, position {summary['position']:+.5f} BTC" in quick.stdout, quick.stdout
    assert "WARNING" not in quick.stderr, quick.stderr


def test_cli_demo_json_and_bad_arguments(tmp_path):
    proc = run_python("-m", "kimiha", "demo", "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["book_check"]["matched"] == summary["book_check"]["compared"] >= 1000
    missing = run_python("-m", "kimiha", "demo", "--data", str(tmp_path / "absent.gz"))
    assert missing.returncode == 2 and "no such recording file" in missing.stderr
    bad_speed = run_python("-m", "kimiha", "demo", "--speed", "0")
    assert bad_speed.returncode == 2 and "--speed" in bad_speed.stderr


# --- partial pipelines -----------------------------------------------------------------------------------------


def test_partial_pipeline_wiring_is_checked(tmp_path):
    from kimiha.bridge import ShmBridge

    log: list[str] = []
    bus = make_bus()
    # nothing held, no bridge
    with pytest.raises(BuildError) as err:
        TradingOrchestratorBuilder(bus, partial=True).build()
    assert err.value.problems == ["a partial pipeline holds nothing: add at least one component"]
    # a strategy alone, without a bridge: who feeds it?
    with pytest.raises(BuildError) as err:
        TradingOrchestratorBuilder(bus, partial=True).with_strategy(Strat(log, bus, Ev.MD, Ev.ORDERS, "s")).build()
    assert any("needs a bridge" in p for p in err.value.problems), err.value.problems
    # a bridge that imports only what nobody here reads, exports orders: both problems at once
    bridge = ShmBridge(bus, tmp_path, name="strategy")
    bridge.import_channel(Ev.RAW, "raw")
    bridge.export_channel(Ev.ORDERS, "orders")
    with pytest.raises(BuildError) as err:
        (TradingOrchestratorBuilder(bus, partial=True).with_strategy(Strat(log, bus, Ev.MD, Ev.ORDERS, "s"))
         .with_bridge(bridge).build())
    assert err.value.problems == ["channel 'Raw' is imported, but no component here reads it (and it is not "
                                  "exported again): subscribe a component to it, or do not import it"]
    # without partial=True the missing roles are still reported, bridge or not
    with pytest.raises(BuildError) as err:
        TradingOrchestratorBuilder(bus).with_bridge(bridge).build()
    assert {"no connector", "no aggregator", "no strategy", "no executor"} <= {
        p.split(":")[0] for p in err.value.problems}
    with pytest.raises(BuildError, match="takes a NatsBridge or ShmBridge"):
        TradingOrchestratorBuilder(bus, partial=True).with_connector(Feed(log, bus)).with_bridge(object()).build()


def test_a_pipeline_split_over_two_partial_processes_runs_in_order(run, tmp_path):
    """Connector + aggregator in one 'process', strategy + executor in another, MD between them over shm."""
    from kimiha.bridge import ShmBridge

    async def main():
        log: list[str] = []
        up, down = make_bus(), make_bus()
        upstream = ShmBridge(up, tmp_path, name="up")
        upstream.export_channel(Ev.MD, "md")
        downstream = ShmBridge(down, tmp_path, name="down")
        downstream.import_channel(Ev.MD, "md")
        feed = Feed(log, up, count=200)
        agg = Agg(log, up, Ev.RAW, Ev.MD, "agg")
        strat = Strat(log, down, Ev.MD, Ev.ORDERS, "strat")
        exe = Exe(log, down, Ev.ORDERS, None, "exe")
        b = (TradingOrchestratorBuilder(down, partial=True, name="down").with_strategy(strat).with_executor(exe)
             .with_bridge(downstream).build())
        a = (TradingOrchestratorBuilder(up, partial=True, name="up").with_connector(feed).with_aggregator(agg)
             .with_bridge(upstream).build())
        assert a.bridges == [upstream] and a.scheduler.name == "up"
        await b.start()
        await a.start()
        try:
            async with asyncio.timeout(20):
                while len(exe.seen) < 200:
                    await asyncio.sleep(0.005)
        finally:
            await a.shutdown()
            await b.shutdown()
        assert agg.seen == strat.seen == exe.seen == list(range(200))
        assert downstream.importer(Ev.MD).stats()["missing"] == 0

    run(main())
