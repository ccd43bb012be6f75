#!/usr/bin/env python
"""Publish -> handler latency and throughput through the shared-memory transport, against one process.

The event is ``bench_nats.py``'s: a frozen ``Tick(seq, t_ns, phase)``, ``t_ns = kimiha.monotonic_ns()`` at
publish; the handler records ``monotonic_ns() - t_ns`` into a :class:`kimiha.LatencyHistogram`
(``CLOCK_MONOTONIC`` is one clock for every process of a machine).

* **in-process**: publish on a ``BLOCK`` channel, a handler (scheduler event task) on the same bus;
* **shm**: this process exports the channel into a ring (``ShmBridge.export_channel``), ``--readers`` reader
  processes import it into their own bus (``import_channel``) where the same handler runs.

Two phases per path: **rate** (``--rate`` events/s, 100k by default: the latency of a stream that is busy but
not saturated; the publisher spins between events, yielding to the loop once per event) and **flood**
(``publish_async`` as fast as the path takes them: throughput = events / (last handler time in any reader -
first publish time), end to end into the readers' bus handlers; each reader receives every event). Readers
busy-poll by default (``--wake`` makes them sleep on the ring's FIFO wake-up instead). Each process's CPU time
over the flood per event is reported too (a busy-polling reader's includes its polling). ``--inline`` makes the
channel ``Dispatch.INLINE`` in every process (the in-process path too) and the exporter ``eager``: each event is
written into the ring inside ``publish``, and the reader's handler runs inside the import (the lowest-latency
configuration; events then cross one by one, not in batches). Every process moves what its setup built out of
the garbage collector's passes once it is ready (``gc.collect(); gc.freeze()``, as ``kimiha bench latency``
does): without it a full collection over the imported libraries stalls a process for milliseconds, which is
what the p99 then shows.

Then **ring-to-ring**, the transport alone (``--ring-frames``, 0 skips it): this process ``Ring.write``s ready
frames (the flood's ``Tick`` encoding) in batches of 256 into a BLOCK ring, ``--readers`` processes
``Ring.read`` them (each copied out into a ``bytes``) and count; no bus, no decode, no handler.

    python benchmarks/bench_shm.py                   # 20000 rate + 200000 flood events + 2M ring frames, 2 readers, x3
    python benchmarks/bench_shm.py --quick           # 5000 + 50000 + 500000, once, ~5 s
    python benchmarks/bench_shm.py --quick --wake    # readers sleep between frames (no busy core)
    python benchmarks/bench_shm.py --quick --inline --readers 1   # INLINE channels, eager export: latency
    python benchmarks/bench_shm.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

try:
    import kimiha
except ImportError:  # not installed: use the source tree this script lives in (built in place)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import kimiha

from kimiha import EventBus, Scheduler, monotonic_ns
from kimiha.bench.runner import freeze_setup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_nats import (  # noqa: E402  (the same event)
    Ev, Probe, Tick, _cell, _median, flood, make_bus, stdin_closed)


def _timed(probe: Probe) -> dict[str, Any]:
    """The probe's results, with the flood's first publish and last handler time (to merge readers)."""
    return {**probe.results(), "first_publish": probe.first_publish, "last_handled": probe.last_handled}


# -- a reader process ----------------------------------------------------------------------------------------------


async def reader(opts: argparse.Namespace) -> None:
    from kimiha.bridge import ShmBridge

    bus = make_bus(dispatch=_dispatch(opts))
    scheduler = Scheduler(bus)
    cpu = [0.0, 0.0]

    def phase_done(phase: int) -> None:
        cpu[phase] = time.process_time()  # the flood's CPU: from the end of the paced phase to its own end
        print(f"phase-done {phase}", flush=True)

    probe = Probe(opts.rate_events, opts.flood, phase_done)
    scheduler.register_event_task(probe)
    bridge = ShmBridge(bus, opts.dir, name="bench-reader")
    importer = bridge.import_channel(Ev.TICKS, opts.subject, busy_poll=not opts.wake,
                                      **({} if opts.spin_us is None else {"spin_us": opts.spin_us}))
    bridge.register(scheduler)
    await scheduler.start()
    closed = await stdin_closed()  # (on the loop, not a thread: see there)
    freeze_setup()
    print("ready", flush=True)
    await closed  # until the writer closes it
    results = _timed(probe)
    results["cpu_us_per_flood_event"] = (cpu[1] - cpu[0]) / opts.flood * 1e6
    results["importer"] = importer.stats()
    await scheduler.shutdown()
    print("results " + json.dumps(results), flush=True)


def ring_reader(opts: argparse.Namespace) -> None:
    """Ring-to-ring: read ``--ring-frames`` frames straight from the ring (``Ring.read``: each copied out into a
    bytes object), no bus, no decode; busy-polls (``sched_yield`` when empty)."""
    import mmap

    from kimiha.bridge import _shm

    fd = os.open(opts.dir, os.O_RDWR)
    ring = _shm.Ring(mmap.mmap(fd, os.fstat(fd).st_size), fd)
    ring.attach(opts.slot, os.getpid(), 0, "")
    print("ready", flush=True)
    cursor = got = 0
    cpu0 = time.process_time()
    while got < opts.ring_frames:
        frames, cursor, lagged, holes = ring.read(opts.slot, cursor, 1024)
        if frames:
            got += len(frames)
            ring.commit(opts.slot, cursor)
        else:
            os.sched_yield()
    done = monotonic_ns()
    print("results " + json.dumps({"done_ns": done, "frames": got, "lagged": lagged,
                                   "cpu_us_per_frame": (time.process_time() - cpu0) / got * 1e6}), flush=True)


async def ring_to_ring(opts: argparse.Namespace, directory: str) -> dict[str, Any]:
    """The transport alone: this process ``Ring.write``s ready frames (the flood's 27-byte ``Tick`` encoding)
    in batches of 256 into a BLOCK ring that ``--readers`` processes read with ``Ring.read``."""
    import mmap

    import msgspec

    from kimiha.bridge import _shm

    path = os.path.join(directory, f"ring.{time.monotonic_ns()}")
    capacity, data = 8192, 8192 * 256
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.ftruncate(fd, _shm.segment_size(capacity, data, 8))
    mm = mmap.mmap(fd, os.fstat(fd).st_size)
    _shm.init_segment(mm, capacity, data, 8, True)
    ring = _shm.Ring(mm, fd)
    frame = msgspec.msgpack.encode(Tick(1, monotonic_ns(), 1))
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "ring-reader", "--dir", path, "--slot", str(i), "--ring-frames",
        str(opts.ring_frames), stdout=asyncio.subprocess.PIPE) for i in range(opts.readers)]
    try:
        for p in procs:
            assert (await asyncio.wait_for(p.stdout.readline(), 60)).startswith(b"ready")
        cpu0 = time.process_time()
        start = monotonic_ns()
        sent = 0
        while sent < opts.ring_frames:
            batch = [(sent + i, start, frame) for i in range(min(256, opts.ring_frames - sent))]
            at = 0
            while at < len(batch):
                n = ring.write(batch, at)
                at += n
                if not n:
                    os.sched_yield()
            sent += len(batch)
        writer_cpu = (time.process_time() - cpu0) / sent * 1e6
        results = [json.loads((await asyncio.wait_for(p.stdout.readline(), 120))[len("results "):]) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
            await p.wait()
        ring.release()
        mm.close()
        os.close(fd)
        os.unlink(path)
    assert all(r["frames"] == opts.ring_frames for r in results), results
    return {"throughput": opts.ring_frames / ((max(r["done_ns"] for r in results) - start) / 1e9),
            "writer_cpu_us_per_frame": writer_cpu, "readers": results}


# -- the writing side ----------------------------------------------------------------------------------------------


async def at_rate(bus: EventBus, n: int, rate: float, pace: str = "spin") -> None:
    """Publish ``n`` events at ``rate`` per second, waiting for each one's time on the clock.

    ``pace="spin"`` waits on the loop alone (this process keeps its core); ``"yield"`` also gives the core to
    any other runnable process on it while it waits (``sched_yield``): what a producer that sleeps in its
    event loop between messages does, where a spinning one holds a core that a reader may need.
    """
    channel = bus.channel(Ev.TICKS)
    step = int(1e9 / rate)
    give_way = os.sched_yield if pace == "yield" else None
    due = monotonic_ns()
    for i in range(n):
        while monotonic_ns() < due:  # wait for the event's time, letting the exporter run meanwhile
            if give_way is not None:
                give_way()
            await asyncio.sleep(0)
        channel.publish(Tick(i, monotonic_ns(), 0))
        due += step
        await asyncio.sleep(0)


def _dispatch(opts: argparse.Namespace) -> Any:
    from kimiha import Dispatch

    return Dispatch.INLINE if opts.inline else Dispatch.LOOP


async def in_process(opts: argparse.Namespace) -> dict[str, Any]:
    bus = make_bus(dispatch=_dispatch(opts))
    done = [asyncio.Event(), asyncio.Event()]
    probe = Probe(opts.rate_events, opts.flood, lambda phase: done[phase].set())
    scheduler = Scheduler(bus)
    scheduler.register_event_task(probe)
    await scheduler.start()
    freeze_setup()
    try:
        await at_rate(bus, opts.rate_events, opts.rate, opts.pace)
        await asyncio.wait_for(done[0].wait(), 60)
        await flood(bus, opts.flood)
        await asyncio.wait_for(done[1].wait(), 120)
    finally:
        await scheduler.shutdown()
    return _timed(probe)


async def shm(opts: argparse.Namespace, directory: str) -> dict[str, Any]:
    from kimiha.bridge import ShmBridge

    subject = f"bench.{time.monotonic_ns()}"
    args = [sys.executable, __file__, "--role", "reader", "--dir", directory, "--subject", subject,
            "--rate-events", str(opts.rate_events), "--flood", str(opts.flood), "--loop", opts.loop]
    if opts.wake:
        args.append("--wake")
    if opts.inline:
        args.append("--inline")
    if opts.spin_us is not None:
        args += ["--spin-us", str(opts.spin_us)]
    procs = [await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.PIPE,
                                                  stdout=asyncio.subprocess.PIPE) for _ in range(opts.readers)]

    async def expect(proc: Any, prefix: str, timeout: float) -> str:
        async with asyncio.timeout(timeout):
            while True:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"a reader exited (code {await proc.wait()}) before {prefix!r}")
                if line.startswith(prefix):
                    return line

    async def expect_all(prefix: str, timeout: float) -> list[str]:
        return list(await asyncio.gather(*(expect(p, prefix, timeout) for p in procs)))

    bus = make_bus(dispatch=_dispatch(opts))
    scheduler = Scheduler(bus)
    bridge = ShmBridge(bus, directory, name="bench-writer")
    exporter = bridge.export_channel(Ev.TICKS, subject, eager=opts.inline)
    bridge.register(scheduler)
    try:
        await expect_all("ready", 60)
        await scheduler.start()
        freeze_setup()
        await at_rate(bus, opts.rate_events, opts.rate, opts.pace)
        await expect_all("phase-done 0", 120)
        cpu0 = time.process_time()
        await flood(bus, opts.flood)
        await expect_all("phase-done 1", 300)
        writer_cpu = (time.process_time() - cpu0) / opts.flood * 1e6
        for p in procs:
            p.stdin.close()
        readers = [json.loads(line[len("results "):]) for line in await expect_all("results ", 60)]
    finally:
        await scheduler.shutdown()
        for p in procs:
            if p.returncode is None:
                if not p.stdin.is_closing():
                    p.stdin.close()
                try:
                    async with asyncio.timeout(10):
                        await p.wait()
                except TimeoutError:
                    p.kill()
    first = min(r["first_publish"] for r in readers)
    last = max(r["last_handled"] for r in readers)
    merged = {}
    for phase in ("paced", "flood"):  # the worst reader's figures (each reader gets every event)
        merged[phase] = {k: max(r[phase][k] for r in readers) for k in readers[0][phase]}
    return {**merged, "throughput": opts.flood / ((last - first) / 1e9), "readers": readers,
            "exporter": exporter.stats(), "writer_cpu_us_per_flood_event": writer_cpu}


async def run_all(opts: argparse.Namespace) -> list[dict[str, Any]]:
    runs = []
    with tempfile.TemporaryDirectory(prefix="kimiha-bench-shm-") as directory:
        for _ in range(opts.repeat):
            run = {"in-process": await in_process(opts),
                   f"shm, 1 writer -> {opts.readers} reader processes": await shm(opts, directory)}
            if opts.ring_frames:
                run["ring-to-ring"] = await ring_to_ring(opts, directory)
            runs.append(run)
    return runs


def report(runs: list[dict[str, Any]], opts: argparse.Namespace, seconds: float) -> str:
    import msgspec

    mode = "wake-up (FIFO)" if opts.wake else "busy-poll" + (
        "" if opts.spin_us is None else f" (spin_us {opts.spin_us:g})")
    lines = [
        f"kimiha {kimiha.__version__} | Python {platform.python_version()} | {opts.loop} | msgspec "
        f"{msgspec.__version__} | readers: {mode} | channels: "
        f"{'INLINE, eager export' if opts.inline else 'LOOP (default), batched export'} | pace: {opts.pace}",
        f"{opts.rate_events} events at {opts.rate:,.0f}/s + {opts.flood} flood events per path, {len(runs)} "
        f"repetition(s), medians [min..max]; total {seconds:.1f} s",
        "",
        f"| path | at {opts.rate / 1e3:,.0f}k/s p50 us | p99 us | p99.9 us | max us | flood throughput (events/s) "
        f"| flood p50 us |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    for name in [n for n in runs[0] if n != "ring-to-ring"]:
        per = [run[name] for run in runs]
        row = [_cell([r["paced"][k] for r in per], 1e3, ",.1f") for k in ("p50", "p99", "p99_9", "max")]
        row.append(_cell([r["throughput"] for r in per], 1, ",.0f"))
        row.append(_cell([r["flood"]["p50"] for r in per], 1e3, ",.0f"))
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    lines.append("")
    for run in runs:
        for name, r in run.items():
            if "exporter" in r:
                counts = [rd["counts"] for rd in r["readers"]]
                missing = [rd["importer"]["missing"] for rd in r["readers"]]
                cpu = ", ".join(f"{rd['cpu_us_per_flood_event']:.2f}" for rd in r["readers"])
                lines.append(f"{name}: sent {r['exporter']['sent']:,}, handled per reader {counts}, missing "
                             f"{missing}, writer waits {r['exporter']['blocked_waits']}; CPU us per flood event: "
                             f"writer {r['writer_cpu_us_per_flood_event']:.2f}, readers {cpu}")
    ratio = [run[list(run)[1]]["throughput"] / run["in-process"]["throughput"] for run in runs]
    lines.append(f"shm flood throughput / in-process (same run): {_median(ratio):.2f}")
    if "ring-to-ring" in runs[0]:
        per = [run["ring-to-ring"] for run in runs]
        cpu = [statistics.median(rd["cpu_us_per_frame"] for r in per for rd in r["readers"])]
        lines.append(f"ring-to-ring, the transport alone (Ring.write of ready frames in batches of 256 -> Ring.read "
                     f"copies in each of {opts.readers} reader processes, no bus, no decode), {opts.ring_frames:,} "
                     f"frames: {_cell([r['throughput'] for r in per], 1, ',.0f')} frames/s per reader; CPU us per "
                     f"frame: writer {_median([r['writer_cpu_us_per_frame'] for r in per]):.3f}, reader "
                     f"{cpu[0]:.3f} (busy-polling)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["bench", "reader", "ring-reader"], default="bench")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--ring-frames", type=int, default=2_000_000,
                        help="frames of the ring-to-ring phase (0: skip it)")
    parser.add_argument("--dir", default=None)
    parser.add_argument("--subject", default="bench")
    parser.add_argument("--rate", type=float, default=100_000.0, help="events/s of the rate phase")
    parser.add_argument("--rate-events", type=int, default=20_000)
    parser.add_argument("--flood", type=int, default=200_000)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--wake", action="store_true", help="readers sleep on the wake-up instead of polling")
    parser.add_argument("--spin-us", type=float, default=None,
                        help="busy-polling readers' spin_us (default: import_channel's)")
    parser.add_argument("--pace", choices=["spin", "yield"], default="spin",
                        help="how the paced publisher waits for each event's time: on its loop alone (spin, "
                             "default), or also giving its core to other runnable processes (yield)")
    parser.add_argument("--inline", action="store_true",
                        help="Dispatch.INLINE channels and an eager exporter (each event into the ring in publish)")
    parser.add_argument("--quick", action="store_true", help="5000 + 50000 events, once")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--json", default=None, help="also write every run's figures here")
    opts = parser.parse_args()
    if opts.quick:
        opts.rate_events, opts.flood, opts.repeat = 5000, 50_000, 1
        opts.ring_frames = min(opts.ring_frames, 500_000)
    if opts.role == "reader":
        kimiha.run(reader(opts), loop=opts.loop)
        return 0
    if opts.role == "ring-reader":
        ring_reader(opts)
        return 0
    started = time.perf_counter()
    runs = kimiha.run(run_all(opts), loop=opts.loop)
    print(report(runs, opts, time.perf_counter() - started))
    if opts.json:
        Path(opts.json).parent.mkdir(parents=True, exist_ok=True)
        Path(opts.json).write_text(json.dumps(runs, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
