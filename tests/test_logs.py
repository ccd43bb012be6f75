"""Logs a trader can read (kimiha.logs): structured ``task`` / ``channel`` fields, readable lines for a process
that configured nothing (and silence from kimiha's side as soon as the application configures logging), no
traceback formatted for a record nobody emits, ``--log-format json`` in the CLI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kimiha
from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Scheduler
from kimiha.logs import JsonFormatter, configure, fields
from kimiha import logs

#: Hang guard for a process that should end on its own (never a speed assertion).
TIMEOUT = 120

SCRIPT = textwrap.dedent('''
    import asyncio, logging, sys
    import kimiha
    from kimiha import ChannelConfig, Event, EventBus, EventTask, EventType, Scheduler

    class Ev(EventType):
        TICKS = "Ticks"

    class Tick(Event):
        seq: int

    class Slow(EventTask):
        name = "slow-reader"
        def subscribed_event(self):
            return Ev.TICKS
        def handle_event(self, event):
            pass

    async def main():
        bus = EventBus([(Ev.TICKS, ChannelConfig(4))])
        scheduler = Scheduler(bus)
        scheduler.register_event_task(Slow())
        await scheduler.start()
        for i in range(100):  # no yield in between: the reader falls 96 events behind a 4-slot ring
            bus.publish(Ev.TICKS, Tick(i))
        await asyncio.sleep(0.05)
        await scheduler.shutdown()

    mode = sys.argv[1]
    if mode == "basic":
        logging.basicConfig(format="APP %(levelname)s %(name)s %(message)s")
    elif mode == "own":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("OWN %(message)s"))
        logging.getLogger("kimiha").addHandler(handler)
    elif mode == "quiet":
        logging.getLogger("kimiha").setLevel(logging.ERROR)
    print("root handlers after import:", len(logging.getLogger().handlers), logging.getLogger().level)
    kimiha.run(main())
''')

LAG = "task 'slow-reader' lagged on channel Ev.TICKS: 96 event(s) skipped; handling continues"


def run_script(tmp_path: Path, mode: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "lagging.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), mode], cwd=tmp_path, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_unconfigured_process_gets_level_and_logger_name(tmp_path):
    out = run_script(tmp_path, "none")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "root handlers after import: 0 30"  # import kimiha left the root logger alone
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert re.fullmatch(r"\d\d:\d\d:\d\d\.\d{3} WARNING kimiha\.scheduler: " + re.escape(LAG), lines[0]), lines[0]


def test_application_logging_config_wins(tmp_path):
    out = run_script(tmp_path, "basic")
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines() == [f"APP WARNING kimiha.scheduler {LAG}"]  # once, in its format


def test_application_handler_on_the_kimiha_logger_wins(tmp_path):
    out = run_script(tmp_path, "own")
    assert out.returncode == 0, out.stderr
    assert out.stderr.strip().splitlines() == [f"OWN {LAG}"]


def test_application_level_is_respected(tmp_path):
    out = run_script(tmp_path, "quiet")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""


# -- structured fields ------------------------------------------------------------------------------------------


class Ev(EventType):
    TICKS = "Ticks"


class Tick(Event):
    seq: int


class Failing(EventTask):
    name = "failing-task"

    def subscribed_event(self) -> Ev:
        return Ev.TICKS

    def handle_event(self, event: Tick) -> None:
        raise ValueError(f"refused {event.seq}")


def run_failing(events: int, capacity: int = 64) -> Scheduler:
    async def main() -> Scheduler:
        bus = EventBus([(Ev.TICKS, ChannelConfig(capacity))])
        scheduler = Scheduler(bus)
        scheduler.register_event_task(Failing())
        await scheduler.start()
        for i in range(events):
            bus.publish(Ev.TICKS, Tick(i))
        await asyncio.sleep(0.01)
        await scheduler.shutdown()
        return scheduler

    return kimiha.run(main())


def test_failure_records_carry_task_and_channel(caplog):
    with caplog.at_level(logging.WARNING, logger="kimiha"):
        scheduler = run_failing(3)
    assert scheduler.registry.get("failing-task").errors == 3
    failures = [r for r in caplog.records if "failed in handle_event" in r.getMessage()]
    assert len(failures) == 3
    for record in failures:
        assert record.task == "failing-task"  # type: ignore[attr-defined]
        assert record.channel == "Ticks"  # type: ignore[attr-defined]


def test_lag_record_carries_task_and_channel(caplog):
    class Reader(EventTask):
        name = "reader"

        def subscribed_event(self) -> Ev:
            return Ev.TICKS

        def handle_event(self, event: Tick) -> None:
            pass

    async def main() -> None:
        bus = EventBus([(Ev.TICKS, ChannelConfig(4))])
        scheduler = Scheduler(bus)
        scheduler.register_event_task(Reader())
        await scheduler.start()
        for i in range(20):
            bus.publish(Ev.TICKS, Tick(i))
        await asyncio.sleep(0.01)
        await scheduler.shutdown()

    with caplog.at_level(logging.WARNING, logger="kimiha"):
        kimiha.run(main())
    (record,) = [r for r in caplog.records if "lagged" in r.getMessage()]
    assert (record.task, record.channel) == ("reader", "Ticks")  # type: ignore[attr-defined]


def test_no_traceback_is_formatted_for_a_record_nobody_emits(monkeypatch):
    """A failing handler with ERROR records off: the registry counts, nothing formats the traceback."""
    calls = []
    real = logs.traceback.format_exception

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(logs.traceback, "format_exception", counting)
    scheduler_logger = logging.getLogger("kimiha.scheduler")
    monkeypatch.setattr(scheduler_logger, "level", logging.CRITICAL)
    scheduler_logger.manager._clear_cache()
    try:
        scheduler = run_failing(5)
    finally:
        scheduler_logger.manager._clear_cache()
    assert scheduler.registry.get("failing-task").errors == 5
    assert calls == []


def test_fields_take_channel_keys_and_names():
    assert fields("t", Ev.TICKS) == {"task": "t", "channel": "Ticks"}
    assert fields(channel="Raw") == {"channel": "Raw"}
    assert fields() == {}


def test_json_formatter_keeps_the_fields_and_the_exception():
    logger = logging.getLogger("kimiha.test_logs")
    try:
        raise KeyError("boom")
    except KeyError:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "task %r failed", ("t",),
                                   sys.exc_info(), extra=fields("t", Ev.TICKS))
    line = JsonFormatter({"process": "feed"}).format(record)
    assert "\n" not in line
    data = json.loads(line)
    assert data["level"] == "ERROR" and data["logger"] == "kimiha.test_logs"
    assert data["message"] == "task 't' failed"
    assert (data["task"], data["channel"], data["process"]) == ("t", "Ticks", "feed")
    assert "KeyError: 'boom'" in data["exception"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])


def test_configure_replaces_only_its_own_handler():
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    theirs = logging.NullHandler()
    root.addHandler(theirs)
    try:
        first = configure("json")
        second = configure("text", "info")
        assert first not in root.handlers and second in root.handlers and theirs in root.handlers
        assert root.level == logging.INFO
        with pytest.raises(ValueError, match="expected one of text, json, got 'xml'"):
            configure("xml")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def test_configure_writes_to_the_stderr_of_the_moment_not_the_one_it_was_made_with(monkeypatch):
    """A harness (pytest's capture) or an application may replace sys.stderr after configure() and close the
    old stream; the handler must follow, not write to the closed file ("I/O operation on closed file")."""
    import io

    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    before, after = io.StringIO(), io.StringIO()
    try:
        monkeypatch.setattr(sys, "stderr", before)
        configure("text", "warning")
        before.close()
        monkeypatch.setattr(sys, "stderr", after)
        logging.getLogger("kimiha.test_logs").warning("after the swap")
        written = after.getvalue()
        assert "Logging error" not in written and written.rstrip("\n").endswith("after the swap")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


# -- the CLI ----------------------------------------------------------------------------------------------------


def bad_tape(tmp_path: Path) -> Path:
    from kimiha.venues.binance import iter_lines, recorded_tape

    path = tmp_path / "bad.txt"
    with path.open("wb") as f:
        for i, line in enumerate(iter_lines(recorded_tape())):
            if i == 300:
                break
            f.write(line + b"\n")
            if i % 50 == 10:
                f.write(b"123 {not json\n")
    return path


@pytest.mark.parametrize("where", ["after", "before"])
def test_cli_log_format_json(tmp_path, where):
    tape = bad_tape(tmp_path)
    demo = ["demo", "--data", str(tape), "--no-progress", "--json"]
    args = [*demo, "--log-format", "json"] if where == "after" else ["--log-format", "json", *demo]
    out = subprocess.run([sys.executable, "-m", "kimiha", *args], cwd=tmp_path, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    records = [json.loads(line) for line in out.stderr.splitlines()]  # every line on stderr is one JSON object
    bad = [r for r in records if "bad line" in r["message"]]
    assert len(bad) == summary["bad_lines"] == 6
    assert all(r["level"] == "WARNING" and r["logger"].startswith("kimiha.") for r in records)


def test_cli_text_logs_have_level_and_logger(tmp_path):
    tape = bad_tape(tmp_path)
    out = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--data", str(tape), "--no-progress", "--json"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 6
    assert all(re.match(r"\d\d:\d\d:\d\d\.\d{3} WARNING kimiha\.[\w.]+: ", line) for line in lines), lines


def test_failure_records_carry_the_traceback_as_their_exception(caplog):
    """A task failure's traceback is the record's exception (``exception`` in JSON, below the text line), not
    part of its message; the record holds text, not the exception."""
    with caplog.at_level(logging.WARNING, logger="kimiha"):
        run_failing(1)
    (record,) = [r for r in caplog.records if "failed in handle_event" in r.getMessage()]
    assert "Traceback" not in record.getMessage()
    assert record.exc_info is None and "ValueError: refused 0" in (record.exc_text or "")
    data = json.loads(JsonFormatter().format(record))
    assert data["message"] == "task 'failing-task' failed in handle_event(Tick(seq=0)) (error 1)"
    assert data["exception"].startswith("Traceback") and "ValueError: refused 0" in data["exception"]
    text = logs.TextFormatter().format(record)
    assert text.splitlines()[0].endswith("task 'failing-task' failed in handle_event(Tick(seq=0)) (error 1)")
    assert "ValueError: refused 0" in text


def test_bad_line_warning_carries_task_and_channel(caplog):
    from kimiha.trading.tasks import RawMessage, trading_channels
    from kimiha.venues.binance.tasks import BinanceAggregator

    aggregator = BinanceAggregator(EventBus(trading_channels(64)))
    with caplog.at_level(logging.WARNING, logger="kimiha"):
        kimiha.run(aggregator.handle_event(RawMessage(b"123 {not json")))
    (record,) = [r for r in caplog.records if "skipped a bad line" in r.getMessage()]
    assert (record.task, record.channel) == ("binance-aggregator", "RawMarketData")  # type: ignore[attr-defined]


class Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("no")


def test_json_formatter_never_raises():
    """Bad %-args, values JSON cannot hold (even ones whose str() fails), circular values: still one JSON line."""
    circular: list[object] = []
    circular.append(circular)
    logger = logging.getLogger("kimiha.test_logs")
    cases = [
        logger.makeRecord(logger.name, logging.INFO, __file__, 1, "%d", ("x",), None),
        logger.makeRecord(logger.name, logging.INFO, __file__, 1, "%s %s", ("one",), None),
        logger.makeRecord(logger.name, logging.INFO, __file__, 1, "m", (), None, extra={"obj": object()}),
        logger.makeRecord(logger.name, logging.INFO, __file__, 1, "m", (), None, extra={"bad": Unprintable()}),
        logger.makeRecord(logger.name, logging.INFO, __file__, 1, "m", (), None, extra={"loop": circular}),
        logger.makeRecord(logger.name, logging.INFO, __file__, 1, "m", (), None, extra={"keys": {(1, 2): 3}}),
    ]
    for record in cases:
        line = JsonFormatter().format(record)
        data = json.loads(line)
        assert "\n" not in line and data["logger"] == "kimiha.test_logs"
    assert "failed: TypeError" in json.loads(JsonFormatter().format(cases[0]))["message"]


def test_json_logging_of_bad_records_prints_no_logging_error(tmp_path):
    script = textwrap.dedent('''
        import logging
        from kimiha.logs import configure
        configure("json", "info")
        circular = []
        circular.append(circular)
        log = logging.getLogger("app")
        log.info("%d", "x")
        log.info("m", extra={"loop": circular, "obj": object()})
    ''')
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 2 and "Logging error" not in out.stderr
    assert all(json.loads(line)["logger"] == "app" for line in lines)


def test_say_is_a_json_record_once_json_is_configured(capsys):
    from kimiha.apps.demo import Progress
    from kimiha.apps.observe import say

    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    try:
        say("status before", sys.stderr)
        configure("json", "error", stream=sys.stderr)
        say("metrics: serving http://127.0.0.1:1/metrics", sys.stderr, process="feed")
        Progress(10, sys.stderr).update(10, final=True)  # left out: not a JSON object
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "status before"
    (record,) = [json.loads(line) for line in err[1:]]
    assert record["message"] == "metrics: serving http://127.0.0.1:1/metrics"
    assert (record["level"], record["logger"], record["process"]) == ("INFO", "kimiha.apps", "feed")


def test_scheduler_state_changes_are_info_records(caplog):
    with caplog.at_level(logging.INFO, logger="kimiha"):
        run_failing(0)
    changes = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO and "->" in r.getMessage()]
    assert any("created -> starting" in m for m in changes) and any("-> stopped" in m for m in changes)


def test_logging_configured_before_importing_kimiha_is_kept_and_lines_are_not_doubled(tmp_path):
    script = textwrap.dedent('''
        import logging
        logging.basicConfig(format="APP %(levelname)s %(name)s %(message)s")
        import kimiha
        from kimiha.scheduling.supervision import log_failure
        log_failure("t", "handle_event", ValueError("x"), 1)
        print(len(logging.getLogger().handlers))
    ''')
    out = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                         timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"
    lines = out.stderr.strip().splitlines()
    assert lines[0] == "APP ERROR kimiha.scheduler task 't' failed in handle_event (error 1)"
    assert lines[-1] == "ValueError: x" and sum("failed in handle_event" in line for line in lines) == 1


def test_a_failing_plain_handler_logs_its_traceback_as_exception_text_not_in_the_message(caplog):
    """The core's own report (no on_error callback): one line of message, the traceback in exc_text (a JSON
    line's ``exception`` field), and the channel as a structured field."""

    class Ev(EventType):
        A = "A"

    class Tick(Event):
        seq: int

    def handler(event: Tick) -> None:
        raise ValueError(f"bad tick {event.seq}")

    async def main() -> None:
        bus = EventBus([(Ev.A, ChannelConfig(8, payload_type=Tick))])
        bus.subscribe(Ev.A, handler)
        bus.publish(Ev.A, Tick(7))
        await asyncio.sleep(0)
        bus.close()

    with caplog.at_level(logging.ERROR, logger="kimiha"):
        asyncio.run(main())
    (record,) = [r for r in caplog.records if "raised on" in r.getMessage()]
    assert "\n" not in record.getMessage() and "Traceback" not in record.getMessage()
    assert "ValueError: bad tick 7" in record.exc_text and "Traceback" in record.exc_text
    assert record.channel == "A"
    line = json.loads(JsonFormatter().format(record))
    assert "ValueError: bad tick 7" in line["exception"] and line["channel"] == "A"


class _ReprRaises(Event):
    seq: int

    def __repr__(self) -> str:
        raise RuntimeError("broken repr")


def test_a_failing_handler_on_an_event_whose_repr_raises_is_still_reported_and_supervised(caplog):
    """Adversarial trial: the core's log line became '--- Logging error ---' and the Scheduler's on_error
    (which formats the event) failed itself, so the task's supervision never saw the failure."""

    class Ev(EventType):
        A = "A2"

    class Boom(EventTask):
        def subscribed_event(self):
            return Ev.A

        def handle_event(self, event) -> None:
            raise ValueError("handler failed")

    async def main() -> tuple[int, int]:
        bus = EventBus([(Ev.A, ChannelConfig(8, payload_type=_ReprRaises))])
        plain = bus.subscribe(Ev.A, lambda e: (_ for _ in ()).throw(ValueError("plain failed")))
        sched = Scheduler(bus)
        sched.register_event_task(Boom())
        await sched.start()
        bus.publish(Ev.A, _ReprRaises(1))
        for _ in range(100):
            if sched.registry.get("Boom").snapshot().get("errors", 0) or plain.errors:
                await asyncio.sleep(0)
                break
            await asyncio.sleep(0)
        errors = sched.registry.get("Boom").snapshot()["errors"]
        await sched.shutdown()
        bus.close()
        return errors, plain.errors

    with caplog.at_level(logging.ERROR, logger="kimiha"):
        task_errors, plain_errors = asyncio.run(main())
    assert task_errors == 1 and plain_errors == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "its repr raised RuntimeError" in text and "plain failed" in "".join(
        r.exc_text or "" for r in caplog.records)
