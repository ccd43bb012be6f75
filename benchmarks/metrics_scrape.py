"""What a Prometheus scrape costs the hot path (issue 17): dispatch throughput with a scrape every 100 ms vs none.

One process, one loop: a bus shaped like the demo's (5 channels, latency tracked) with a scheduler of 4 event
tasks; a publisher floods channel 0 (chunks of 512, each handled before the next) for ``--seconds`` per run and
counts events handled per second. The metrics server (``kimiha.metrics.serve``) is up in every run; in the
"scrape" runs a separate process (as Prometheus would be) fetches ``/metrics`` every ``--every`` seconds.
Runs are interleaved (the order alternates each repetition) and the ratio is of the medians of this same run.
It also times one scrape in the process (``generate_latest`` on the server's registry): the CPU the loop's
thread can lose per scrape, since the server's thread holds the GIL while it reads.

    python benchmarks/metrics_scrape.py [--seconds 1] [--repeat 7] [--every 0.1] [--loop uvloop] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time

import kimiha
from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Scheduler
from kimiha.metrics import serve

SCRAPER = r"""
import sys, time, urllib.request
url, every = sys.argv[1], float(sys.argv[2])
n = 0
urllib.request.urlopen(url, timeout=10).read()
print("ready", flush=True)
import select
next_at = time.monotonic()
while True:
    next_at = max(next_at + every, time.monotonic())  # one scrape per interval at most: no catching up
    wait = max(0.0, next_at - time.monotonic())
    if select.select([sys.stdin], [], [], wait)[0]:
        break  # stdin closed: stop
    urllib.request.urlopen(url, timeout=10).read()
    n += 1
print(n, flush=True)
"""


class Ev(EventType):
    C0 = "Raw"
    C1 = "Market"
    C2 = "Signals"
    C3 = "Orders"
    C4 = "Fills"


class Tick(Event, gc=False):
    seq: int
    price: float


class Handler(EventTask):
    def __init__(self, channel: Ev) -> None:
        self.channel = channel
        self.name = f"handler-{channel.value}"
        self.count = 0

    def subscribed_event(self) -> Ev:
        return self.channel

    def handle_event(self, event: Tick) -> None:
        self.count += 1


async def flood(bus: EventBus, task: Handler, events: list[Tick], seconds: float) -> float:
    """Publish chunks of ``events`` for ``seconds``; return events handled per second."""
    channel = bus.channel(Ev.C0)
    start_count = task.count
    sent = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while True:
        for event in events:
            channel.publish(event)
        sent += len(events)
        while task.count - start_count < sent:
            await asyncio.sleep(0)
        if time.perf_counter() >= deadline:
            break
    return (task.count - start_count) / (time.perf_counter() - t0)


def start_scraper(url: str, every: float) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", SCRAPER, url, repr(every)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the scraper process could not read the metrics endpoint")
    return proc


def stop_scraper(proc: subprocess.Popen[str]) -> int:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.close()
    scrapes = int(proc.stdout.readline())
    proc.wait(30)
    return scrapes


async def main(opts: argparse.Namespace) -> dict[str, object]:
    from prometheus_client import generate_latest

    bus = EventBus([(ev, ChannelConfig(4096, payload_type=Tick)) for ev in Ev])
    scheduler = Scheduler(bus)
    tasks = [Handler(ev) for ev in (Ev.C0, Ev.C1, Ev.C3, Ev.C4)]
    for task in tasks:
        scheduler.register_event_task(task)
    events = [Tick(i, 100.0 + i * 0.01) for i in range(512)]
    server = serve(bus, scheduler, 0)
    samples: dict[str, list[float]] = {"none": [], "scrape": []}
    scrapes: list[int] = []
    try:
        await scheduler.start()
        await flood(bus, tasks[0], events, min(opts.seconds, 0.3))  # warm-up, not counted
        for rep in range(opts.repeat):
            order = ("none", "scrape") if rep % 2 == 0 else ("scrape", "none")
            for mode in order:
                scraper = start_scraper(server.url, opts.every) if mode == "scrape" else None
                try:
                    samples[mode].append(await flood(bus, tasks[0], events, opts.seconds))
                finally:
                    if scraper is not None:
                        scrapes.append(stop_scraper(scraper))
                print(f"  {mode:<6} rep {rep + 1}/{opts.repeat}: {samples[mode][-1]:,.0f} events/s",
                      file=sys.stderr, flush=True)
        one = []
        for _ in range(50):
            t0 = time.perf_counter()
            body = generate_latest(server.registry)
            one.append(time.perf_counter() - t0)
    finally:
        await scheduler.shutdown()
        server.close()
    none, scrape = statistics.median(samples["none"]), statistics.median(samples["scrape"])
    per_scrape = statistics.median(one)
    # each repetition's two runs are neighbours in time: their ratio cancels the machine's slow drift
    paired = [s / n for s, n in zip(samples["scrape"], samples["none"])]
    return {
        "loop": opts.loop, "seconds": opts.seconds, "repeat": opts.repeat, "every_s": opts.every,
        "events_per_s": samples, "median_none": none, "median_scrape": scrape, "ratio_scrape_vs_none": scrape / none,
        "paired_ratios": paired, "median_paired_ratio": statistics.median(paired),
        "scrapes_per_run": scrapes, "scrapes_per_s": statistics.mean(scrapes) / opts.seconds,
        "one_scrape_s": per_scrape, "scrape_bytes": len(body),
        "cpu_share_at_interval": per_scrape / opts.every,
    }


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="length of one timed run (default 1)")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved repetitions per mode (default 7)")
    parser.add_argument("--every", type=float, default=0.1, help="seconds between two scrapes (default 0.1)")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument("--json", metavar="PATH", help="write every sample as JSON")
    opts = parser.parse_args()
    result = kimiha.run(main(opts), loop=opts.loop)
    print(f"dispatch throughput, {opts.loop}, median of {opts.repeat} interleaved {opts.seconds:g} s runs "
          f"(5 channels, 4 event tasks, sync handler):")
    print(f"  no scrape                    {result['median_none']:>14,.0f} events/s")
    print(f"  scrape every {opts.every * 1e3:g} ms          {result['median_scrape']:>14,.0f} events/s   "
          f"ratio of medians {result['ratio_scrape_vs_none']:.3f}, median of paired ratios "
          f"{result['median_paired_ratio']:.3f}  ({result['scrapes_per_s']:.1f} scrapes/s done)")
    print(f"  one scrape in process: {result['one_scrape_s'] * 1e6:,.0f} us for {result['scrape_bytes']:,} bytes "
          f"= {result['cpu_share_at_interval'] * 100:.2f} % of one core at one scrape per {opts.every:g} s")
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    cli()
