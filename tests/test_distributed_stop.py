"""How ``kimiha demo --distributed`` stops: each child's stop order and deadlines, the coordinator's wait, its
control-line reader and its escalation ladder.

* Each role's scheduler stops its bridge exporters after the stages that publish to them (the exporters are
  found as readers from the subscriptions they open in ``initialize``), within the children's deadline
  constants, and a feed stopped in the middle of a fast replay drains and flushes everything.
* The coordinator's wait for the next event keeps a cancellation that arrives in the same loop turn as an
  event or as its own timeout (``asyncio.wait_for`` on CPython 3.11 returned the event and lost it).
* A malformed control line is counted, shown escaped, and skipped; the reader goes on.
* A process that does not stop gets SIGTERM after ``STOP_GRACE``, then SIGKILL; the summary says so.

The coordinator runs in this process against scripted children (``FAKE_CHILD``); the bridge tests start their own
nats-server on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import signal
import sys
import textwrap
import time
import types

import pytest

from kimiha.apps import distributed
from kimiha.apps.distributed import (
    CHILD_EXIT_MARGIN,
    CHILD_FLUSH_TIMEOUT,
    CHILD_SHUTDOWN_TIMEOUT,
    ROLES,
    STOP_GRACE,
    _Child,
    _next_event,
    _Process,
    _read_control,
)

HANG = 60.0  # hang guard only


# -- the children's stop order and deadlines --------------------------------------------------------------------


@pytest.fixture(scope="module")
def nats_server():
    pytest.importorskip("nats")
    from kimiha.bridge import NatsServer

    with NatsServer() as server:
        yield server


def child_opts(role: str, url: str, run: str) -> argparse.Namespace:
    return distributed._child_parser().parse_args(["--role", role, "--nats", url, "--run", run,
                                                   "--delivery", "jetstream"])


@pytest.mark.parametrize("role", sorted(ROLES))
def test_each_role_stops_its_exporters_after_the_stages_that_feed_them(run, nats_server, role, loop_name):
    async def main():
        proc = _Process(child_opts(role, nats_server.url, f"plan{role}{loop_name}"), asyncio.Event())
        scheduler = proc.scheduler
        assert scheduler.shutdown_timeout == CHILD_SHUTDOWN_TIMEOUT
        assert proc.bridge.flush_timeout == CHILD_FLUSH_TIMEOUT
        await scheduler.start()
        try:
            plan = scheduler.stop_plan()
        finally:
            await scheduler.shutdown()
        phases = [phase for phase, _ in plan]
        exporters = sorted(e.name for e in proc.bridge.exporters)
        assert len(exporters) == len(ROLES[role].exports)
        # the exporters read channels the event tasks publish to: after every drain stage, never with the
        # producers (stopping them first is the deadlock of a stage blocked on a channel nobody reads)
        assert phases[-1] == "drain and stop", plan
        assert sorted(plan[-1][1]) == exporters, plan
        assert "drain" in phases and phases.index("drain") < phases.index("drain and stop"), plan
        assert not any(name in exporters for phase, names in plan[:-1] for name in names), plan
        report = scheduler.last_shutdown
        assert report["finished"] and not report["did_not_stop"] and not report["hook_failures"], report

    run(main())


def test_the_coordinator_outwaits_the_children_deadlines():
    # the ladder is derived from the children's constants: their whole stop, the flush counted on top even
    # though it runs within the deadline, and the time to report and exit
    assert STOP_GRACE >= CHILD_SHUTDOWN_TIMEOUT + CHILD_FLUSH_TIMEOUT + CHILD_EXIT_MARGIN
    assert CHILD_FLUSH_TIMEOUT < CHILD_SHUTDOWN_TIMEOUT and CHILD_EXIT_MARGIN > 0


def test_a_feed_stopped_mid_replay_drains_and_flushes_everything(run, nats_server, loop_name):
    # what Ctrl-C does to the feed, in one process: the connector at full speed, the aggregator publishing
    # MarketData (BLOCK) that the exporter reads; the stop has to drain all of it and flush it to JetStream
    async def main():
        go = asyncio.Event()
        proc = _Process(child_opts("feed", nats_server.url, f"midstop{loop_name}"), go)
        scheduler = proc.scheduler
        await scheduler.start()
        try:
            go.set()
            async with asyncio.timeout(HANG):
                while proc.connector.lines < 2 * 4096:  # well into the tape, every stage busy
                    await asyncio.sleep(0.01)
        finally:
            await scheduler.shutdown()
        report = scheduler.last_shutdown
        assert report["finished"], report
        assert report["not_drained"] == {} and report["did_not_stop"] == [] and report["hook_failures"] == [], report
        assert [s["state"] for s in scheduler.registry.snapshot()] == ["stopped"] * len(scheduler.registry)
        md = proc.bus.stats()["MarketData"]
        export = proc.bridge.exporter(distributed.MD).stats()
        assert md["published"] > 0
        assert export["sent"] == md["published"] and export["acked"] == md["published"], (md, export)
        assert export["unflushed"] == 0 and export["lagged"] == 0 and export["dropped"] == 0, export

    run(main())


# -- the coordinator's wait cannot lose a cancellation ----------------------------------------------------------


def test_a_finish_before_go_ends_the_feeds_source_with_no_line(run):
    # found by the adversarial trial: two signals to a child before every process was ready started an ordered
    # stop (the feed told to finish) before "go"; the feed's source waited for a go that never came, and the
    # run sat idle to the end of --stop-timeout
    async def main():
        go, finish = asyncio.Event(), asyncio.Event()

        async def source():
            for line in (b"a", b"b"):
                yield line

        finish.set()
        got = []
        async with asyncio.timeout(HANG):
            async for line in distributed._after_go(go, source(), finish):
                got.append(line)
        return got

    assert run(main()) == []


def test_a_cancellation_in_the_turn_an_event_arrives_is_kept(run):
    async def main():
        events: asyncio.Queue = asyncio.Queue()
        waiter = asyncio.ensure_future(_next_event(events, HANG))
        for _ in range(3):
            await asyncio.sleep(0)  # parked in its get
        events.put_nowait(("feed", "event"))  # wakes the get ...
        waiter.cancel()                        # ... and cancels the wait, in the same turn
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert events.get_nowait() == ("feed", "event")  # not taken by a wait that was cancelled

    run(main())


class FakeClockLoop(asyncio.SelectorEventLoop):
    """An event loop whose clock only moves when the test moves it: a timer fires on the turn chosen."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def run_on_fake_clock(main):
    with asyncio.Runner(loop_factory=FakeClockLoop) as runner:
        return runner.run(main())


@pytest.mark.parametrize("with_event", [False, True])
def test_a_cancellation_in_the_turn_the_timeout_fires_is_kept(with_event):
    async def main():
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        waiter = asyncio.ensure_future(_next_event(events, 5.0))
        for _ in range(3):
            await asyncio.sleep(0)
        loop.now += 5.0
        await asyncio.sleep(0)  # this turn runs the wait's timeout too, after this step ...
        if with_event:
            events.put_nowait(("strategy", "event"))  # ... as an event arrives ...
        waiter.cancel()  # ... and the wait is cancelled
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert events.qsize() == int(with_event)

    run_on_fake_clock(main)


def test_a_timeout_returns_none_and_never_takes_an_event_it_does_not_return():
    async def main():
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        waiter = asyncio.ensure_future(_next_event(events, 5.0))
        await asyncio.sleep(0)
        loop.now += 5.0
        assert await waiter is None
        waiter = asyncio.ensure_future(_next_event(events, 5.0))
        for _ in range(3):
            await asyncio.sleep(0)
        loop.now += 5.0
        await asyncio.sleep(0)
        events.put_nowait(("executor", "event"))  # in the turn the timeout fires
        got = await waiter
        assert got == ("executor", "event") or (got is None and events.get_nowait() == ("executor", "event"))

    run_on_fake_clock(main)


# -- the control-line reader ------------------------------------------------------------------------------------


class _Proc:
    pid = 0
    returncode = None


class Err:
    def __init__(self) -> None:
        self.text = ""

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def ctl(kind: str, **fields) -> bytes:
    return ("@kimiha " + json.dumps({"type": kind, **fields}) + "\n").encode()


def test_a_malformed_control_line_is_counted_shown_escaped_and_skipped(run):
    async def main():
        child = _Child("strategy", _Proc())
        stream = asyncio.StreamReader(limit=4096)
        err = Err()
        events: asyncio.Queue = asyncio.Queue()
        stream.feed_data(ctl("ready", role="strategy", pid=1, total=None, senders={}))
        stream.feed_data(b"@kimiha {\"type\": \"progress\", \"lines\n")          # cut short
        stream.feed_data(b"@kimiha [1, 2]\n")                                   # not an object
        stream.feed_data(ctl("progress", lines="many"))                         # a field of the wrong type
        stream.feed_data(ctl("hello"))                                          # an unknown type
        stream.feed_data(ctl("eos", channels={"Orders": {"sender": "s"}}))      # no last_seq
        stream.feed_data(b"@kimiha \x1b[2J{\"type\": \"done\"}\n")              # a terminal escape
        stream.feed_data(b"@kimiha " + b"x" * 8192 + b"\n")                     # longer than the reader's limit
        stream.feed_data(b"a plain line \x07\n")
        stream.feed_data(ctl("done", role="strategy"))
        stream.feed_eof()
        async with asyncio.timeout(HANG):
            await _read_control(child, stream, events, err)
        got = []
        while not events.empty():
            got.append(events.get_nowait())
        assert [msg["type"] if msg else None for _, msg in got] == ["ready", "done", None]
        assert all(c is child for c, _ in got)
        assert child.malformed == 7, err.text
        shown = [line for line in err.text.splitlines() if "malformed control line" in line]
        assert len(shown) == 7 and all("from the strategy process" in line for line in shown), err.text
        assert "not JSON" in shown[0] and "expected a JSON object, got list" in shown[1]
        assert "'progress' message: field 'lines' must be int, got 'many'" in shown[2]
        assert "unknown message type 'hello'" in shown[3] and "channel 'Orders' needs" in shown[4]
        assert "\\x1b[2J" in shown[5] and "longer than the line limit" in shown[6]
        assert "[strategy] a plain line \\x07" in err.text
        assert "\x1b" not in err.text and "\x07" not in err.text  # escaped: nothing reaches the terminal raw

    run(main())


# -- the coordinator against scripted children ------------------------------------------------------------------

FAKE_CHILD = textwrap.dedent('''
    import json, os, signal, sys, time
    role, mode = sys.argv[1], sys.argv[2]

    def send(kind, **fields):
        sys.stdout.write("@kimiha " + json.dumps({"type": kind, **fields}) + "\\n")
        sys.stdout.flush()

    if mode == "stubborn":  # ignores the stop line and SIGTERM: only SIGKILL ends it
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    send("ready", role=role, pid=os.getpid(), total=10 if role == "feed" else None, senders={})
    if mode == "crash":  # dies without a summary
        os._exit(3)
    if mode in ("interrupting", "slow-finish", "interrupting-crash", "interrupting-twice", "finishing"):
        # a signal to this process, forwarded to the coordinator (what the real children do); then it
        # reports what it heard: "finish" first (ends its stream, "done"), "stop" only after
        # ("finishing": no signal of its own, it ends its stream when told to finish)
        heard = []
        ends = mode in ("interrupting", "interrupting-twice", "finishing")
        if mode != "finishing":
            send("interrupt", role=role, signal="SIGINT")
        if mode == "interrupting-crash":
            os._exit(3)
        if ends and role != "feed":  # its upstream (the feed) is what ends the stream
            send("done", role=role)
        for line in sys.stdin:
            kind = json.loads(line)["type"]
            heard.append(kind)
            if kind == "finish" and ends:
                send("done", role=role)
            if kind == "stop":
                if mode == "interrupting-twice":  # a second signal, once the run drained (told to stop)
                    send("interrupt", role=role, signal="SIGTERM")
                break
        send("summary", role=role, parts={"heard": heard}, channels={}, tasks=[],
             bridge={"imports": {}, "link": {"reconnects": 0}}, failed=None,
             shutdown={"seconds": 0.0, "finished": True, "not_drained": {}, "did_not_stop": [],
                       "hook_failures": []})
        sys.exit(0)
    if mode == "stopped-by-signal":  # two signals to it: forwarded once, then it stops on its own and reports
        send("interrupt", role=role, signal="SIGTERM")
        send("summary", role=role, parts={}, channels={}, tasks=[], stopped_by="SIGTERM",
             bridge={"imports": {}, "link": {"reconnects": 0}}, failed=None,
             shutdown={"seconds": 0.0, "finished": True, "not_drained": {}, "did_not_stop": [],
                       "hook_failures": []})
        sys.exit(0)
    if mode == "malformed":
        sys.stdout.write("@kimiha {not json\\n@kimiha \\x1b[31m\\n")
        sys.stdout.flush()

    def summary():
        send("summary", role=role, parts={}, channels={}, tasks=[],
             bridge={"imports": {}, "link": {"reconnects": 0}}, failed=None,
             shutdown={"seconds": 0.0, "finished": True, "not_drained": {}, "did_not_stop": [],
                       "hook_failures": []})

    if mode in ("ok", "malformed"):  # reported before the stop: whatever the ladder does next, it is in
        summary()
    if mode != "idle":
        send("done", role=role)
    for line in sys.stdin:
        if json.loads(line)["type"] == "stop":
            break
    if mode == "stubborn":
        while True:
            time.sleep(1)
    if mode == "idle":
        summary()
''')


@pytest.fixture
def scripted(monkeypatch):
    """Make the coordinator spawn FAKE_CHILD for each role, in the mode given by role (default "ok")."""
    modes: dict[str, str] = {}

    async def spawn(role, url, run, delivery, args, token=None):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FAKE_CHILD, role, modes.get(role, "ok"), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, start_new_session=True)
        return _Child(role, proc)

    monkeypatch.setattr(distributed, "_spawn", spawn)
    return modes


def coordinator_args(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"no_progress": True, "json": True, "loop": "asyncio", "speed": None,
                                 "data": None, "connect_timeout": None, **kw})


def test_malformed_control_lines_do_not_stop_the_run(run, scripted, capsys):
    scripted["executor"] = "malformed"
    summary = run(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    assert d["control_lines_malformed"] == {"executor": 2} and not d["failed"] and not d["escalated"], d
    err = capsys.readouterr().err
    assert "malformed control line #1 from the executor process" in err and "\\x1b[31m" in err, err
    assert "malformed control lines (skipped): executor 2" in distributed.format_distributed(summary)


def test_a_process_that_ignores_the_stop_gets_sigterm_then_sigkill(run, scripted, monkeypatch, capsys):
    # short rungs for the test (the others reported before the stop: a slow exit of theirs changes nothing)
    monkeypatch.setattr(distributed, "STOP_GRACE", 0.5)
    monkeypatch.setattr(distributed, "TERM_GRACE", 0.5)
    scripted["strategy"] = "stubborn"
    summary = run(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    assert d["escalated"]["strategy"] == "SIGKILL", d
    assert "SIGKILL" not in [sig for role, sig in d["escalated"].items() if role != "strategy"], d
    assert d["failed"] == {"strategy": "no summary (terminated by the coordinator's SIGKILL)"}, d
    assert set(d["shutdown"]) == {"feed", "executor"}
    err = capsys.readouterr().err
    assert "the strategy process (pid" in err, err
    assert "did not stop within 0.5 s of the stop request; sending SIGTERM" in err, err
    assert "did not stop within 0.5 s of SIGTERM; sending SIGKILL" in err, err


def test_a_cancelled_coordinator_stops_every_process(run, scripted, monkeypatch):
    for role in ROLES:
        scripted[role] = "idle"  # ready, then waiting for the stop line
    readies = []
    all_ready = asyncio.Event()
    real = distributed._next_event

    async def next_event(events, timeout):
        event = await real(events, timeout)
        if event is not None and event[1] is not None and event[1].get("type") == "ready":
            readies.append(event[0])
            if len(readies) == len(ROLES):
                all_ready.set()
        return event

    monkeypatch.setattr(distributed, "_next_event", next_event)

    async def main():
        coordinator = asyncio.ensure_future(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t",
                                                                    "core"))
        await all_ready.wait()
        coordinator.cancel()
        with pytest.raises(asyncio.CancelledError):
            await coordinator
        assert [c.proc.returncode for c in readies] == [0, 0, 0]  # each stopped by its stop line, and reaped
        assert not any(c.escalated for c in readies)

    run(main())


# -- the ordered stop and a dead process, against scripted children -------------------------------------------


def test_a_stop_runs_in_order_the_feed_finishes_before_anyone_is_told_to_stop(run, scripted, monkeypatch):
    # the feed gets a signal (forwarded); the coordinator asks it to finish its stream, and only once every
    # process said "done" tells them to stop: no process stops while its upstream still publishes
    heard: dict[str, list[str] | None] = {}
    real = distributed._assemble

    def assemble(children, *args):
        for c in children:
            heard[c.role] = (c.summary or {}).get("parts", {}).get("heard")
        return real(children, *args)

    monkeypatch.setattr(distributed, "_assemble", assemble)
    scripted["feed"] = "interrupting"
    summary = run(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    assert heard["feed"] is not None and heard["feed"][-2:] == ["finish", "stop"], heard
    assert heard["feed"].count("stop") == 1, heard
    assert d["stop"] == {"how": "in order", "why": None, "timeout_s": distributed.DRAIN_TIMEOUT,
                         "signal_to": "feed"}, d["stop"]
    assert summary["interrupted"] == "SIGINT" and not d["died"] and not d["failed"], d
    assert set(d["shutdown"]) == set(ROLES) and not d["escalated"], d


def test_an_ordered_stop_past_its_deadline_stops_everyone_at_once_and_says_so(run, scripted, capsys):
    scripted["feed"] = "slow-finish"  # hears "finish" but never ends its stream
    args = coordinator_args(stop_timeout=0.2)
    summary = run(distributed._coordinate(args, "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    assert d["stop"]["how"] == "at once" and "did not end within 0.2 s" in d["stop"]["why"], d["stop"]
    assert set(d["shutdown"]) == set(ROLES) and not d["escalated"] and not d["died"], d
    assert "the ordered stop did not end within 0.2 s (--stop-timeout)" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["crash", "interrupting-crash"])
def test_a_process_that_dies_is_named_and_the_others_report(run, scripted, capsys, mode):
    # before: the coordinator raised at the closed output, and the others' summaries were never read
    scripted["executor"] = mode  # dies at once, or in the middle of the ordered stop it started
    summary = run(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    assert d["died"] == {"executor": "exited with code 3 before reporting"}, d
    assert set(d["shutdown"]) == {"feed", "strategy"} and not d["escalated"], d
    assert d["stop"]["how"] == "at once" and "executor" in d["stop"]["why"], d["stop"]
    assert "the executor process (pid" in capsys.readouterr().err
    text = distributed.format_distributed(summary)
    assert "processes that died: executor: exited with code 3 before reporting" in text, text
    assert "NOT drained" in text and "unknown, since the executor process did not report: " in text, text
    assert "at least 0" not in text, text
    # new-user trial: the dead executor's figures read 0 (fills 0, PnL +0.0000, an empty digest) as if known
    assert summary["fills"] is None and summary["pnl"] is None and summary["digest"] is None, summary
    assert summary["orders"] is not None     # the strategy reported
    assert "fills unknown" in text and "PnL: unknown (the executor process did not report)" in text, text
    assert "digest unknown (the executor process did not report)" in text, text


def test_a_process_stopped_by_its_own_second_signal_stops_the_others_at_once(run, scripted):
    # found by the adversarial trial: two signals to the strategy (before every process was ready) stopped it
    # before the end of its stream; the ordered stop could not end (the executor waited for that end) and the
    # run sat idle to the end of --stop-timeout, then said "the ordered stop did not end"
    scripted["strategy"] = "stopped-by-signal"
    summary = run(distributed._coordinate(coordinator_args(stop_timeout=3.0), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    assert d["stop"]["how"] == "at once", d["stop"]
    assert d["stop"]["why"] == "a second SIGTERM to the strategy process stopped it", d["stop"]
    assert set(d["shutdown"]) == set(ROLES) and not d["died"], d


def test_one_signal_reaching_every_process_is_one_ordered_stop(run, scripted):
    # `kill` of all of them at once (or pkill): one stop, in order; only a second signal to the same process
    # escalates it
    for role in ROLES:
        scripted[role] = "interrupting"
    summary = run(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    assert d["stop"]["how"] == "in order" and d["stop"]["why"] is None, d["stop"]
    assert set(d["shutdown"]) == set(ROLES) and not d["escalated"] and not d["died"], d


# -- signals are counted; one after the run drained never terminates it ----------------------------------------


def test_a_second_signal_to_a_process_after_the_run_drained_is_not_taken_for_a_third(run, scripted, capsys):
    # before: the end of the ordered stop and an escalated stop were the same phase, and any repeated signal
    # in it was "a third": every process was SIGTERMed, a summary lost, "NOT drained", exit 1
    scripted["feed"] = "interrupting-twice"  # its second signal arrives once every process said "done"
    summary = run(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    err = capsys.readouterr().err
    assert d["stop"]["how"] == "in order" and d["stop"]["signal_to"] == "feed", d["stop"]
    assert not d["escalated"] and not d["failed"] and not d["died"], d
    assert set(d["shutdown"]) == set(ROLES), d  # every summary is in
    assert summary["interrupted"] == "SIGINT"
    assert "a second SIGTERM to the feed process after the run drained" in err and "not escalated" in err, err
    assert "third" not in err and "sending SIGTERM" not in err, err


def _signal_coordinator(monkeypatch, at: dict[str, int]):
    """SIGTERM this process (the coordinator's) when the n-th event of a kind was taken: ``at`` maps a kind to
    (n, how many signals). The signals are handled after the coordinator handled that event."""
    real = distributed._next_event
    seen: dict[str, int] = {}

    async def next_event(events, timeout):
        event = await real(events, timeout)
        if event is not None and event[1] is not None:
            kind = event[1]["type"]
            seen[kind] = seen.get(kind, 0) + 1
            n, signals = at.get(kind, (0, 0))
            if seen[kind] == n:
                for _ in range(signals):
                    os.kill(os.getpid(), signal.SIGTERM)
        return event

    monkeypatch.setattr(distributed, "_next_event", next_event)


@pytest.mark.parametrize("after", [1, 2])
def test_signals_to_the_coordinator_after_the_run_drained_never_terminate_it(run, scripted, monkeypatch, capsys,
                                                                             after):
    for role in ROLES:
        scripted[role] = "finishing"  # the feed ends its stream once told to finish
    # the first SIGTERM once all are ready (the ordered stop); then `after` more once the last "done" is in
    _signal_coordinator(monkeypatch, {"ready": (3, 1), "done": (3, after)})
    summary = run(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    err = capsys.readouterr().err
    assert d["stop"]["how"] == "in order" and d["stop"]["signal_to"] == "coordinator", d["stop"]
    assert not d["escalated"] and not d["failed"] and not d["died"] and set(d["shutdown"]) == set(ROLES), d
    assert summary["interrupted"] == "SIGTERM"
    for n in range(2, 2 + after):  # each said with its true count
        assert f"a {distributed._nth(n)} SIGTERM to the coordinator after the run drained" in err, err
    assert "sending SIGTERM" not in err and "did not stop" not in err, err


def test_the_third_signal_terminates_and_says_which_it_was(run, scripted, monkeypatch, capsys):
    monkeypatch.setattr(distributed, "TERM_GRACE", 0.5)
    scripted["feed"] = "slow-finish"   # never ends its stream: the run cannot drain
    scripted["strategy"] = "stubborn"  # ignores the stop line and SIGTERM
    _signal_coordinator(monkeypatch, {"ready": (3, 3)})  # ordered stop, at once, terminate
    summary = run(distributed._coordinate(coordinator_args(), "nats://127.0.0.1:1", "t", "core"))
    d = summary["distributed"]
    err = capsys.readouterr().err
    assert d["stop"]["how"] == "at once" and d["stop"]["why"] == "a second SIGTERM to the coordinator", d["stop"]
    assert "did not stop before the third signal to the coordinator (SIGTERM); sending SIGTERM" in err, err
    assert d["escalated"]["strategy"] == "SIGKILL", d
    assert d["failed"]["strategy"] == "no summary (terminated by the coordinator's SIGKILL)", d
    text = distributed.format_distributed(summary)
    assert "NOT drained" in text and "at least 0" not in text, text


def test_a_process_that_did_not_report_is_never_at_least_zero_events_lost():
    hop = {"route": "strategy -> executor", "channel": "Orders", "published": None, "received": 5, "delivered": 5,
           "not_delivered": None, "in_transit": None, "missing": 0, "bad_frames": 0, "lost_at_sender": 0}
    summary = {"distributed": {"processes": {"feed": 1, "strategy": 2, "executor": 3}, "events_lost": 0,
                               "hops": [hop], "drained": False, "failed": {"strategy": "no summary (exited with "
                                                                                       "code 1)"},
                               "events_not_handled": {}}}
    line = next(line for line in _not_drained(summary).splitlines() if "NOT drained" in line)
    assert "at least 0" not in line, line
    assert ("NOT drained: no event is known to be lost; unknown, since the strategy process did not "
            "report: strategy -> executor Orders (published, not delivered)") == line.strip(), line


def _not_drained(summary):
    """The summary's stop lines only (format_distributed's tail), for a summary of the distributed part."""
    d = summary["distributed"]
    return distributed._drain_line(d)


# -- a child notices its coordinator's death from its first moment ---------------------------------------------


def child_stuck_connecting(then):
    """Start a real strategy process whose NATS server accepts and never speaks (it is stuck in its connect),
    call ``then(proc)`` once it connected; return its exit code, stdout and stderr."""
    import socket
    import subprocess

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(HANG)
        proc = subprocess.Popen(
            [sys.executable, "-m", "kimiha.apps.distributed", "--role", "strategy", "--run", "gone", "--nats",
             f"nats://127.0.0.1:{server.getsockname()[1]}", "--loop", "asyncio", "--connect-timeout", "30"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            conn, _ = server.accept()  # the child is in its connect now
            with conn:
                then(proc)
                out, err = proc.communicate(timeout=HANG)  # (closes its stdin)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, out, err.decode()


def test_a_sigterm_while_a_child_still_imports_is_taken_as_its_first_stop_signal(tmp_path):
    # before: a child installed its signal handlers once its loop ran, about a second after it started (its
    # imports); a SIGTERM in that second ended it by the default action, nothing reported. The imports are held
    # here (a msgspec.py first on the path waits for a go file), so the signal lands in them every time.
    import socket
    import subprocess

    marker, go = tmp_path / "importing", tmp_path / "go"
    (tmp_path / "msgspec.py").write_text(
        "import importlib, os, sys, time\n"
        f"open({str(marker)!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}):\n"
        "    time.sleep(0.01)\n"
        "sys.path.remove(os.path.dirname(os.path.abspath(__file__)))\n"
        "del sys.modules['msgspec']\n"
        "sys.modules['msgspec'] = importlib.import_module('msgspec')\n")
    root = str(pathlib.Path(distributed.__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), root])}
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(HANG)
        proc = subprocess.Popen(
            [*distributed.child_command(), "--role", "strategy", "--run", "early", "--nats",
             f"nats://127.0.0.1:{server.getsockname()[1]}", "--loop", "asyncio", "--connect-timeout", "30"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + HANG
            while not marker.exists():  # the child is in its imports (a hang guard, not a speed check)
                assert proc.poll() is None and time.monotonic() < deadline, proc.poll()
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            go.touch()
            conn, _ = server.accept()  # it lived on: it connects
            with conn:
                out, err = proc.communicate(timeout=HANG)  # (closes its stdin: the coordinator is gone)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode != -signal.SIGTERM, err
    prefix = distributed._CTL.encode()
    control = [json.loads(line[len(prefix):]) for line in out.splitlines() if line.startswith(prefix)]
    assert [c["signal"] for c in control if c["type"] == "interrupt"] == ["SIGTERM"], (out, err)


def test_a_child_told_to_terminate_is_ended_by_sigterm_whatever_it_was_doing():
    # the coordinator's rung before SIGTERM; before: a child with a running loop took the SIGTERM for a user's
    # first signal (forwarded it, and went on), so only SIGKILL ended it
    def terminate(proc):
        proc.stdin.write(b'{"type": "terminate"}\n')
        proc.stdin.flush()

    code, out, err = child_stuck_connecting(terminate)
    assert code == -signal.SIGTERM, (code, err)
    assert "[strategy] kimiha demo --distributed: told to terminate by the coordinator: the strategy process " \
           "terminates now" in err, err


def test_a_child_whose_coordinator_dies_while_it_connects_says_so_and_exits():
    # before: the child watched its stdin only once started; it sat in the connect retry to a server that had
    # died with the coordinator (15-30 s), then said "cannot connect to NATS"
    code, out, text = child_stuck_connecting(lambda proc: None)  # communicate() closes its stdin: the
    # coordinator dies
    assert "[strategy] kimiha demo --distributed: the coordinator is gone (this process's stdin closed while it " \
           "started); the strategy process stops" in text, text
    assert "cannot connect" not in text and "Traceback" not in text, text
    assert code == 1 and b"@kimiha" not in out, (code, out)


@pytest.mark.parametrize("as_json", [False, True])
def test_an_interrupt_before_any_line_says_nothing_to_summarize_as_the_one_process_demo_does(capsys, as_json):
    # new-user trial: Ctrl-C at 0.5 s printed a whole summary of nothing (empty tables, "wall time 0.000 s", a
    # digest of no orders, "drained: yes") where the one-process demo says one line
    summary = {"interrupted": "SIGINT", "lines_read": 0, "all_lines_accounted": True,
               "distributed": {"died": {}, "failed": {}, "events_lost": 0}}
    code = distributed._finish(summary, types.SimpleNamespace(json=as_json), lossless=True)
    out, err = capsys.readouterr()
    assert code == 130 and out == "", (code, out)
    assert "interrupted by SIGINT before the replay started (no line was read)" in err
    assert "nothing to summarize" in err, err
