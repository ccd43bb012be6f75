"""The Prometheus exporter (kimiha.metrics, ``--metrics-port``): what it serves, read with prometheus-client's
own parser, against the counters the bus, the scheduler and the demo's summary report.

* the C histogram folded into Prometheus buckets: cumulative, never over-counting a bucket, count and sum kept;
* a bus and a scheduler scraped over HTTP: every channel counter and task counter as the engine has it;
* ``python -m kimiha demo --metrics-port 0`` scraped while it runs and after its summary (``--metrics-linger``):
  the final scrape agrees with the summary, value for value;
* a taken port, a missing prometheus-client: one line naming the cause.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

import kimiha  # noqa: E402
from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, LatencyHistogram, Scheduler  # noqa: E402
from kimiha.metrics import LATENCY_BUCKETS, MetricsServer, histogram_buckets, serve  # noqa: E402

#: Hang guard for a process or a wait that should end on its own (never a speed assertion).
TIMEOUT = 120


class Ev(EventType):
    TICKS = "Ticks"
    QUIET = "Quiet"


class Tick(Event):
    seq: int


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, keyed by (name, sorted labels), parsed by prometheus-client."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(found: dict[Any, float], name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        return response.read().decode()


# -- the histogram ---------------------------------------------------------------------------------------------


def test_histogram_buckets_are_cumulative_and_keep_count_and_sum():
    h = LatencyHistogram()
    values = [50, 900, 1_000, 2_000, 40_000, 3_000_000, 20_000_000_000]  # ns; the last is beyond 10 s
    for v in values:
        h.record(v)
    buckets, total, count = histogram_buckets(h)
    assert count == len(values)
    assert buckets[-1] == ("+Inf", float(len(values)))
    assert [float(le) for le, _ in buckets[:-1]] == pytest.approx(list(LATENCY_BUCKETS))
    counts = [c for _, c in buckets]
    assert counts == sorted(counts)  # cumulative
    for le, c in buckets[:-1]:
        # never more than the values truly at or below the bound (the fine buckets are ~1.6 % wide: a value
        # just under a bound may land in the next one, never the other way)
        assert c <= sum(1 for v in values if v <= float(le) * 1e9)
    by_le = dict(buckets)
    assert by_le["1e-06"] == 2.0  # 50 and 900 ns; 1000 ns sits in a fine bucket reaching above 1 us
    assert by_le["2.5e-06"] == 4.0
    assert by_le["0.005"] == 6.0
    assert by_le["10.0"] == 6.0  # 20 s only in +Inf
    assert total == pytest.approx(sum(values) / 1e9, rel=1e-9)


def test_empty_histogram():
    buckets, total, count = histogram_buckets(LatencyHistogram())
    assert count == 0 and total == 0.0
    assert all(c == 0 for _, c in buckets)


def test_a_channel_without_samples_exports_nan_quantiles():
    """Prometheus' convention: no observation, no quantile (NaN), not a latency of 0."""
    from kimiha.metrics import KimihaCollector

    bus = EventBus([(Ev.TICKS, ChannelConfig(16))])
    quantiles = {s.labels["quantile"]: s.value for f in KimihaCollector(bus).collect() for s in f.samples
                 if s.name == "kimiha_channel_latency_quantile_seconds"}
    assert {"0.5", "0.99", "1"} <= set(quantiles)
    assert all(v != v for v in quantiles.values()), quantiles


# -- a bus and a scheduler over HTTP ----------------------------------------------------------------------------


class Counter(EventTask):
    def __init__(self, fail_every: int = 0) -> None:
        self.seen = 0
        self.fail_every = fail_every

    def subscribed_event(self) -> Ev:
        return Ev.TICKS

    def handle_event(self, event: Tick) -> None:
        self.seen += 1
        if self.fail_every and event.seq % self.fail_every == 0:
            raise ValueError(f"tick {event.seq} refused")


def test_scrape_reports_the_bus_and_the_scheduler(caplog):
    async def main() -> tuple[str, dict[str, Any], list[dict[str, Any]], str]:
        bus = EventBus([(Ev.TICKS, ChannelConfig(64)), (Ev.QUIET, ChannelConfig(8))])
        scheduler = Scheduler(bus, name="sched")
        scheduler.register_event_task(Counter(fail_every=10))
        pull = bus.subscribe(Ev.TICKS)  # never read: it lags
        server = serve(bus, scheduler, 0)
        try:
            await scheduler.start()
            for i in range(1, 201):
                bus.publish(Ev.TICKS, Tick(i))
                if i % 32 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(0.01)
            with pytest.raises(kimiha.Lagged):
                pull.try_recv()
            running = await asyncio.to_thread(scrape, server.url)
            await scheduler.shutdown()
            stats = bus.stats()
            tasks = scheduler.registry.snapshot()
            stopped = await asyncio.to_thread(scrape, server.url)
        finally:
            server.close()
        return running, stats, tasks, stopped

    running, stats, tasks, stopped = kimiha.run(main())
    found = samples(stopped)
    for name, st in stats.items():
        for key, metric in [("published", "published_total"), ("delivered", "delivered_total"),
                            ("lagged", "lagged_total"), ("blocked", "blocked_total"),
                            ("bad_frames", "bad_frames_total"), ("handler_errors", "handler_errors_total"),
                            ("high_water_mark", "high_water_mark_events"), ("capacity", "capacity_events")]:
            assert value(found, f"kimiha_channel_{metric}", channel=name) == st[key], (name, key)
        assert value(found, "kimiha_channel_latency_seconds_count", channel=name) == st["latency_ns"]["count"]
        top = value(found, "kimiha_channel_latency_quantile_seconds", channel=name, quantile="1")
        if st["latency_ns"]["count"]:
            assert top == pytest.approx(st["latency_ns"]["max"] / 1e9)
        else:  # nothing measured: no quantile (NaN), not 0
            assert top != top
    assert stats["Ticks"]["lagged"] > 0 and stats["Ticks"]["published"] == 200
    (task,) = tasks
    labels = {"task": task["name"], "role": task["role"]}
    assert value(found, "kimiha_task_handled_total", **labels) == task["events_handled"] == 200
    assert value(found, "kimiha_task_errors_total", **labels) == task["errors"] == 20
    assert value(found, "kimiha_task_restarts_total", **labels) == task["restarts"]
    assert value(found, "kimiha_task_state", **labels, state="stopped") == 1
    assert value(found, "kimiha_task_state", **labels, state="running") == 0
    assert value(found, "kimiha_scheduler_state", scheduler="sched", state="stopped") == 1
    before = samples(running)
    assert value(before, "kimiha_scheduler_state", scheduler="sched", state="running") == 1
    assert value(before, "kimiha_task_state", **labels, state="running") == 1
    assert value(found, "kimiha_build_info", version=kimiha.__version__) == 1


def test_server_binds_loopback_by_default_and_closes():
    bus = EventBus([(Ev.TICKS, ChannelConfig(8))])
    server = serve(bus, port=0)  # the default port may be taken on a shared machine; the host is the default
    try:
        assert server.host == "127.0.0.1"
        assert server.port > 0
        assert server._sock is not None and server._sock.getsockname()[0] == "127.0.0.1"
    finally:
        server.close()
    server.close()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)


def test_before_watch_the_endpoint_says_so():
    with MetricsServer(0).start() as server:
        found = samples(scrape(server.url))
    assert value(found, "kimiha_watched") == 0
    assert not any(name.startswith("kimiha_channel") for name, _ in found)


def test_taken_port_is_one_clear_error():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"cannot serve metrics on 127.0.0.1:{port}"):
            MetricsServer(port).start()


@pytest.mark.parametrize("port", [-1, 65536, "9464", True, 1.5])
def test_bad_port_is_refused(port):
    with pytest.raises(kimiha.InvalidConfigurationError, match="metrics port"):
        MetricsServer(port)


def test_missing_client_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['prometheus_client'] = None\n"
            "import kimiha.metrics\n"
            "try:\n    kimiha.metrics.serve(kimiha.EventBus(), None, 0)\n"
            "except ImportError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert "pip install 'kimiha[metrics]'" in out.stdout, out.stderr


# -- the demo, scraped over HTTP --------------------------------------------------------------------------------


def read_url(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        m = re.match(r"metrics: serving (http://\S+)", line)
        if m:
            return m.group(1)
    raise AssertionError(f"the demo did not say where it serves metrics (exit {proc.poll()})")


def read_summary(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # the JSON summary, indented: it ends with a "}" line
        lines.append(line)
        if line.rstrip("\n") == "}":
            return dict(json.loads("".join(lines)))
    raise AssertionError(f"no summary on stdout: {''.join(lines)[:500]!r} (exit {proc.poll()})")


def test_demo_metrics_agree_with_its_summary(tmp_path, tape_slice):
    """Scrape a running demo, then after its summary: the last scrape is the summary's counters, exactly."""
    tape = tape_slice(2000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kimiha", "demo", "--data", str(tape), "--speed", "8", "--metrics-port", "0",
         "--metrics-linger", "60", "--json", "--no-progress"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = read_url(proc)
        # while it runs: counters only grow
        seen_running = []
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            found = samples(scrape(url))
            if value(found, "kimiha_watched") == 1:
                state = [labels for (name, labels), v in found.items() if name == "kimiha_scheduler_state" and v]
                if ("state", "running") in state[0]:
                    seen_running.append(found)
                elif seen_running:
                    break
            if len(seen_running) >= 3:
                break
            time.sleep(0.2)
        assert seen_running, "the demo was never seen running"
        summary = read_summary(proc)
        final = samples(scrape(url))
    finally:
        proc.send_signal(signal.SIGINT)  # ends the linger: an interrupted command, 130 (after its summary)
        proc.wait(TIMEOUT)
    assert proc.returncode == 130, proc.stderr.read() if proc.stderr else ""
    assert summary["all_lines_accounted"]
    assert value(final, "kimiha_scheduler_state", scheduler="trading-orchestrator", state="stopped") == 1
    for name, ch in summary["channels"].items():
        for key, metric in [("published", "published_total"), ("delivered", "delivered_total"),
                            ("lagged", "lagged_total"), ("blocked", "blocked_total"),
                            ("bad_frames", "bad_frames_total"), ("high_water_mark", "high_water_mark_events")]:
            assert value(final, f"kimiha_channel_{metric}", channel=name) == ch[key], (name, key)
            for running in seen_running:
                assert value(running, f"kimiha_channel_{metric}", channel=name) <= ch[key]
        top = value(final, "kimiha_channel_latency_quantile_seconds", channel=name, quantile="1")
        if value(final, "kimiha_channel_latency_seconds_count", channel=name):
            assert top * 1e6 == pytest.approx(ch["latency_us"]["max"], abs=0.01)
        else:  # nothing measured on this channel: NaN, and the summary's 0
            assert top != top and ch["latency_us"]["max"] == 0
    assert summary["channels"]["RawMarketData"]["published"] == 2000
    for task in summary["tasks"]:
        labels = {"task": task["name"], "role": task["role"]}
        assert value(final, "kimiha_task_handled_total", **labels) == task["events_handled"]
        assert value(final, "kimiha_task_errors_total", **labels) == task["errors"]
        assert value(final, "kimiha_task_restarts_total", **labels) == task["restarts"]
        assert value(final, "kimiha_task_state", **labels, state=task["state"]) == 1
    first = seen_running[0]
    assert value(first, "kimiha_channel_published_total", channel="RawMarketData") < 2000


def test_demo_metrics_port_taken_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--metrics-port", str(port)], cwd=tmp_path,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [f"kimiha demo: --metrics-port {port}: cannot serve metrics on "
                                               f"127.0.0.1:{port}: Address already in use"]
    assert out.stdout == ""


@pytest.mark.parametrize("bad", ["x", "-1", "70000"])
def test_demo_metrics_port_bad_value(tmp_path, bad):
    out = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--metrics-port", bad], cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2
    assert f"expected a TCP port number 0-65535, got {bad!r}" in out.stderr


def test_distributed_port_leaves_room_for_three(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--distributed", "--metrics-port", "65534"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2
    assert "PORT must be at most 65533" in out.stderr


def test_linger_is_for_the_in_process_demo(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--distributed", "--metrics-linger", "5"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT, env={**os.environ})
    assert out.returncode == 2
    assert "--metrics-linger applies to the in-process demo only" in out.stderr


def test_distributed_processes_serve_their_metrics(tmp_path, tape_slice):
    """``demo --distributed --metrics-port 0``: each process serves its bus, its tasks and its bridge."""
    pytest.importorskip("nats")
    tape = tape_slice(1500)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kimiha", "demo", "--distributed", "--data", str(tape), "--speed", "4",
         "--metrics-port", "0", "--json", "--no-progress"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = ""
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and not line.startswith("metrics: serving"):
            line = proc.stderr.readline()
            assert line, f"the distributed demo ended without serving metrics (exit {proc.poll()})"
        urls = dict(part.split(" ") for part in line.removeprefix("metrics: serving ").strip().split(", "))
        assert sorted(urls) == ["executor", "feed", "strategy"]
        scraped = {role: samples(scrape(url)) for role, url in urls.items()}
        summary = read_summary(proc)
    finally:
        proc.wait(TIMEOUT)
    assert proc.returncode == 0
    assert summary["all_lines_accounted"]
    feed, strategy, executor = scraped["feed"], scraped["strategy"], scraped["executor"]
    assert value(feed, "kimiha_scheduler_state", scheduler="kimiha-feed", state="running") == 1
    assert value(feed, "kimiha_channel_published_total", channel="RawMarketData") <= 1500
    assert any(name == "kimiha_bridge_export_sent_total" and ("channel", "MarketData") in labels
               for name, labels in feed)
    assert any(name == "kimiha_bridge_import_delivered_total" and ("channel", "MarketData") in labels
               for name, labels in strategy)
    assert any(name == "kimiha_bridge_import_delivered_total" and ("channel", "Orders") in labels
               for name, labels in executor)
    assert any(name == "kimiha_bridge_link_up" and v == 1 for (name, _), v in executor.items())


def test_the_loop_answers_while_it_runs_and_the_thread_after():
    bus = EventBus([(Ev.TICKS, ChannelConfig(8))])
    server = MetricsServer(0).start()

    async def main() -> tuple[int, int]:
        server.watch(bus)
        for _ in range(3):
            await asyncio.to_thread(scrape, server.url)
        return server.scrapes_on_loop, server.scrapes_in_thread

    try:
        during = kimiha.run(main())
        time.sleep(0.6)  # the thread looks twice a second whether the loop still runs
        after = samples(scrape(server.url))  # the loop is closed: the thread answers, with the final values
    finally:
        server.close()
    assert during == (3, 0)
    assert (server.scrapes_on_loop, server.scrapes_in_thread) == (3, 1)
    assert value(after, "kimiha_channel_capacity_events", channel="Ticks") == 8


def test_scrape_without_a_loop_reads_in_the_thread():
    bus = EventBus([(Ev.TICKS, ChannelConfig(8))])
    with serve(bus, None, 0) as server:  # called outside any loop
        found = samples(scrape(server.url))
        assert (server.scrapes_on_loop, server.scrapes_in_thread) == (0, 1)
    assert value(found, "kimiha_channel_capacity_events", channel="Ticks") == 8


def test_unknown_path_is_404_and_a_broken_collector_500(monkeypatch):
    bus = EventBus([(Ev.TICKS, ChannelConfig(8))])
    with serve(bus, None, 0) as server:
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url.replace("/metrics", "/nope"), timeout=10)
        assert err.value.code == 404 and b"/metrics" in err.value.read()

        def broken() -> Any:
            raise RuntimeError("collector broke")

        monkeypatch.setattr(server.collector, "families", broken)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(server.url, timeout=10)
        assert err.value.code == 500 and b"collector broke" in err.value.read()
        monkeypatch.undo()
        assert value(samples(scrape(server.url)), "kimiha_watched") == 1  # the server lives on


def test_the_server_text_and_the_collector_say_the_same(caplog):
    """The server writes the text itself (cheaper); prometheus-client's own writer, fed by the same collector
    through its Collector interface, gives the very same samples."""
    from prometheus_client import CollectorRegistry, generate_latest

    from kimiha.metrics import KimihaCollector, render_text

    async def main() -> tuple[str, str]:
        bus = EventBus([(Ev.TICKS, ChannelConfig(16)), (Ev.QUIET, ChannelConfig(8))])
        scheduler = Scheduler(bus, name='odd "name"\\with\nbreaks')  # label values that need escaping
        scheduler.register_event_task(Counter(fail_every=7))
        await scheduler.start()
        for i in range(1, 60):
            bus.publish(Ev.TICKS, Tick(i))
            await asyncio.sleep(0)
        await scheduler.shutdown()
        collector = KimihaCollector(bus, scheduler)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        return render_text(collector.families()), generate_latest(registry).decode()

    ours, theirs = kimiha.run(main())

    def comparable(found: dict[Any, float]) -> dict[Any, object]:  # NaN (an empty channel's quantile) != NaN
        return {key: "NaN" if v != v else v for key, v in found.items()}

    assert comparable(samples(ours)) == comparable(samples(theirs))
    assert len(samples(ours)) > 100
    assert value(samples(ours), "kimiha_scheduler_state", scheduler='odd "name"\\with\nbreaks', state="stopped") == 1


def test_live_sim_metrics_agree_with_its_summary(tmp_path):
    """`kimiha live --sim --metrics-port`: the endpoint reports the live pipeline; after the summary its counters
    are the summary's, exactly."""
    pytest.importorskip("picows")
    pytest.importorskip("aiohttp")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kimiha", "live", "--sim", "--speed", "20", "--duration", "4", "--metrics-port", "0",
         "--metrics-linger", "60", "--json", "--no-status"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = read_url(proc)
        summary = read_summary(proc)
        final = samples(scrape(url))
    finally:
        proc.send_signal(signal.SIGINT)  # ends the linger: an interrupted command, 130 (after its summary)
        proc.wait(TIMEOUT)
    assert proc.returncode == 130, proc.stderr.read() if proc.stderr else ""
    assert summary["channels"]["RawMarketData"]["published"] > 0
    for name, ch in summary["channels"].items():
        for key, metric in [("published", "published_total"), ("delivered", "delivered_total"),
                            ("lagged", "lagged_total")]:
            assert value(final, f"kimiha_channel_{metric}", channel=name) == ch[key], (name, key)


def test_live_metrics_port_with_several_symbols_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "kimiha", "live", "--sim", "--symbol", "BTCUSDT", "--symbol",
                           "ETHUSDT", "--metrics-port", "0"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT)
    assert proc.returncode == 2
    assert "--metrics-port reports one pipeline" in proc.stderr
# -- hostile clients ----------------------------------------------------------------------------------------------


def slow_client(port: int, byte_every: float, bytes_at_most: int) -> int:
    """Send a request head one byte at a time (slowloris); return how many bytes were sent before the server
    closed the connection (``bytes_at_most`` when it never did)."""
    import select

    request = b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * bytes_at_most
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        for sent in range(bytes_at_most):
            readable, _, _ = select.select([s], [], [], byte_every)
            if readable and s.recv(4096) == b"":
                return sent
            try:
                s.send(request[sent:sent + 1])
            except OSError:  # reset by the server: it closed
                return sent
    return bytes_at_most


def test_the_thread_drops_a_client_that_never_finishes_its_request(monkeypatch):
    """Answering in its thread (no loop running), the server gives a request head one deadline in all, not one
    per read: a client trickling a byte at a time is closed on, and the scrapes behind it are answered."""
    import kimiha.metrics as metrics

    monkeypatch.setattr(metrics, "_CLIENT_TIMEOUT", 0.5)
    bus = EventBus([(Ev.TICKS, ChannelConfig(8))])
    with serve(bus, None, 0) as server:  # outside any loop: the server's thread answers
        # a byte every 0.1 s: each read is well within the 0.5 s timeout, the whole head never is
        sent = slow_client(server.port, 0.1, 200)
        assert sent < 200, "the server kept reading a request that never ended"
        assert value(samples(scrape(server.url)), "kimiha_watched") == 1


def test_tasks_sharing_a_name_get_a_series_each():
    """Two instances of one task class (no ``name``) are two tasks: each gets its own series, never two samples
    with the same labels (which Prometheus drops as duplicates)."""
    async def main() -> tuple[str, list[int]]:
        bus = EventBus([(Ev.TICKS, ChannelConfig(16))])
        scheduler = Scheduler(bus)
        scheduler.register_event_task(Counter())
        scheduler.register_event_task(Counter(fail_every=2))
        await scheduler.start()
        for i in range(1, 11):
            bus.publish(Ev.TICKS, Tick(i))
        await asyncio.sleep(0.01)
        from kimiha.metrics import KimihaCollector, render_text

        text = render_text(KimihaCollector(bus, scheduler).families())
        await scheduler.shutdown()
        return text, [info.id for info in scheduler.registry]

    text, ids = kimiha.run(main())
    series = [line.rsplit(" ", 1)[0] for line in text.splitlines() if not line.startswith("#")]
    assert len(series) == len(set(series)), sorted(s for s in series if series.count(s) > 1)[:4]
    found = samples(text)
    assert value(found, "kimiha_task_errors_total", task="Counter", role="event") == 0
    assert value(found, "kimiha_task_errors_total", task=f"Counter#{ids[1]}", role="event") == 5


# -- the metrics options of the commands --------------------------------------------------------------------------


@pytest.mark.parametrize("args, message", [
    (["--metrics-host", "0.0.0.0"], "--metrics-host applies with --metrics-port only"),
    (["--metrics-linger", "5"], "--metrics-linger applies with --metrics-port only"),
    (["--metrics-port", "0", "--metrics-host", ""], "argument --metrics-host: expected a host name or an IP"),
    (["--metrics-port", "0", "--metrics-host", "a b"], "argument --metrics-host: expected a host name or an IP"),
])
@pytest.mark.parametrize("command", ["demo", "live"])
def test_metrics_options_are_usage_errors(tmp_path, command, args, message):
    out = subprocess.run([sys.executable, "-m", "kimiha", command, *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=TIMEOUT)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and out.stdout == ""


def test_metrics_host_brackets_are_taken_off():
    from kimiha.apps.observe import _host

    assert _host("[::1]") == "::1" and _host("::1") == "::1" and _host("localhost") == "localhost"


def test_a_host_that_cannot_be_served_names_the_host(tmp_path):
    out = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--metrics-port", "0", "--metrics-host",
                          "nosuch.invalid"], cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("kimiha demo: --metrics-host nosuch.invalid: not an address of this machine"), line
    assert "--metrics-port" not in line


def test_an_interrupt_during_the_linger_is_raised_on_after_closing(monkeypatch):
    """Ctrl-C while the final values linger ends the wait, closes the server, and is raised on: the command
    exits 130 like any interrupted run (it was swallowed: exit 0)."""
    import argparse

    from kimiha.apps import observe

    server = MetricsServer(0).start()
    server.watch(EventBus([(Ev.TICKS, ChannelConfig(16))]))

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    import types

    monkeypatch.setattr(observe, "time", types.SimpleNamespace(monotonic=time.monotonic, sleep=interrupted))
    with pytest.raises(KeyboardInterrupt):
        observe.close_metrics(server, argparse.Namespace(metrics_linger=30.0), announce=None)
    assert server._sock is None or server._sock.fileno() == -1  # closed


def test_ctrl_c_during_the_linger_is_130(tmp_path, tape_slice):
    tape = tape_slice(200)
    proc = subprocess.Popen([sys.executable, "-m", "kimiha", "demo", "--data", str(tape), "--no-progress",
                             "--metrics-port", "0", "--metrics-linger", "60"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "the final values stay at" in line:
                break
        else:
            raise AssertionError("no linger line")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT) == 130
        assert "accounted" in (proc.stdout.read() if proc.stdout else "")  # the summary came first
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)


def test_distributed_taken_port_is_found_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1] - 1  # the strategy's PORT+1 is taken
        if port < 1024:
            pytest.skip("the free port is too low to leave room below it")
        out = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--distributed", "--metrics-port", str(port)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        f"kimiha demo: --metrics-port {port}: cannot serve metrics on 127.0.0.1:{port + 1}: Address already in use "
        f"(the strategy process's PORT+1)"]
