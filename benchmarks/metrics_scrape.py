"""What a Prometheus scrape costs the hot path (issue 17): dispatch throughput with a scrape every 100 ms vs none.

One process, one loop: a bus shaped like the demo's (5 channels, latency tracked) with a scheduler of 4 event
tasks; a publisher floods channel 0 (chunks of 512, each handled before the next) for ``--seconds`` per run and
counts events handled per second. The metrics server (``kimiha.metrics.serve``) is up in every run; in the
"scrape" runs a separate process (as Prometheus would be) fetches ``/metrics`` every ``--every`` seconds.
A third mode is the control for the machine: the same scraper process, at the same rate, fetching a copy of
the same text from a server in its own process (its CPU on the machine, none in the engine's process); on a
machine whose cores are shared, "scrape vs control" is the engine's own cost and "scrape vs none" includes the
scraper's. Runs are interleaved (the order rotates each repetition); ratios are of this same run's medians.
It also times one scrape rendered in the process (``MetricsServer.render``, which a real scrape runs on the loop):
what one scrape takes from the loop.

    python benchmarks/metrics_scrape.py [--seconds 1] [--repeat 7] [--every 0.1] [--loop uvloop] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import kimiha
from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Scheduler
from kimiha.metrics import serve

SCRAPER = r"""
import sys, time, urllib.request
url, every = sys.argv[1], float(sys.argv[2])
n = 0
if url.startswith("self:"):  # the control: the same client work against a copy served in this process
    import http.server, threading
    body = open(url[5:], "rb").read()
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def log_message(self, *args):
            pass
    own = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=own.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{own.server_address[1]}/metrics"
urllib.request.urlopen(url, timeout=10).read()
print("ready", flush=True)
import select
next_at = time.monotonic()
while True:
    next_at += every  # a fixed cadence, as Prometheus keeps; after a stall it resumes from now, no burst
    if next_at < time.monotonic() - every:
        next_at = time.monotonic()
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
    bus = EventBus([(ev, ChannelConfig(4096, payload_type=Tick)) for ev in Ev])
    scheduler = Scheduler(bus)
    tasks = [Handler(ev) for ev in (Ev.C0, Ev.C1, Ev.C3, Ev.C4)]
    for task in tasks:
        scheduler.register_event_task(task)
    events = [Tick(i, 100.0 + i * 0.01) for i in range(512)]
    server = serve(bus, scheduler, 0)
    samples: dict[str, list[float]] = {"none": [], "control": [], "scrape": []}
    scrapes: list[int] = []
    loop_share: list[float] = []  # per scrape run: the share of its time the loop spent rendering scrapes
    copy = os.path.join(tempfile.mkdtemp(prefix="kimiha-scrape-"), "metrics.txt")
    try:
        await scheduler.start()
        await flood(bus, tasks[0], events, min(opts.seconds, 0.3))  # warm-up, not counted
        with open(copy, "wb") as f:
            f.write(await asyncio.to_thread(server.render))
        modes = list(samples)
        for rep in range(opts.repeat):
            order = modes[rep % 3:] + modes[:rep % 3]
            for mode in order:
                target = {"none": None, "control": f"self:{copy}", "scrape": server.url}[mode]
                # (in a thread: the loop itself answers the scraper's first request)
                scraper = await asyncio.to_thread(start_scraper, target, opts.every) if target is not None else None
                loop_before = server.loop_seconds
                try:
                    samples[mode].append(await flood(bus, tasks[0], events, opts.seconds))
                    if mode == "scrape":
                        loop_share.append((server.loop_seconds - loop_before) / opts.seconds)
                finally:
                    if scraper is not None:
                        done = await asyncio.to_thread(stop_scraper, scraper)
                        if mode == "scrape":
                            scrapes.append(done)
                print(f"  {mode:<6} rep {rep + 1}/{opts.repeat}: {samples[mode][-1]:,.0f} events/s",
                      file=sys.stderr, flush=True)
        one = []
        for _ in range(50):
            t0 = time.perf_counter()
            body = server.render()
            one.append(time.perf_counter() - t0)
    finally:
        await scheduler.shutdown()
        server.close()
    none, scrape = statistics.median(samples["none"]), statistics.median(samples["scrape"])
    control = statistics.median(samples["control"])
    per_scrape = statistics.median(one)
    # each repetition's runs are neighbours in time: their ratio cancels the machine's slow drift
    paired = [s / n for s, n in zip(samples["scrape"], samples["none"])]
    paired_control = [s / c for s, c in zip(samples["scrape"], samples["control"])]
    return {
        "loop": opts.loop, "seconds": opts.seconds, "repeat": opts.repeat, "every_s": opts.every,
        "events_per_s": samples, "median_none": none, "median_control": control, "median_scrape": scrape,
        "ratio_scrape_vs_none": scrape / none, "ratio_scrape_vs_control": scrape / control,
        "paired_ratios": paired, "median_paired_ratio": statistics.median(paired),
        "median_paired_ratio_vs_control": statistics.median(paired_control),
        "loop_share_rendering": loop_share, "median_loop_share_rendering": statistics.median(loop_share),
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
    print(f"  control (scraper elsewhere)  {result['median_control']:>14,.0f} events/s")
    print(f"  scrape every {opts.every * 1e3:g} ms          {result['median_scrape']:>14,.0f} events/s   "
          f"ratio of medians {result['ratio_scrape_vs_none']:.3f}, median of paired ratios "
          f"{result['median_paired_ratio']:.3f}  ({result['scrapes_per_s']:.1f} scrapes/s done)")
    print(f"  scrape vs control: ratio of medians {result['ratio_scrape_vs_control']:.3f}, median of paired ratios "
          f"{result['median_paired_ratio_vs_control']:.3f}")
    print(f"  the loop spent {result['median_loop_share_rendering'] * 100:.2f} % of each scrape run rendering "
          f"the scrapes (median over the runs)")
    print(f"  one scrape in process: {result['one_scrape_s'] * 1e6:,.0f} us for {result['scrape_bytes']:,} bytes "
          f"= {result['cpu_share_at_interval'] * 100:.2f} % of one core at one scrape per {opts.every:g} s")
    if opts.json:
        with open(opts.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    cli()
