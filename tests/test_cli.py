"""The command line as a person meets it: ``python -m kimiha`` started as a process, in a scratch directory.

* conventions shared by every mode: ``--version``; the exit status of an interrupted run (130 for SIGINT, 143
  for SIGTERM, after the summary); a closed stdout (``| head``) ends the run quietly with 141; options that
  only mean something with ``--distributed`` are errors without it;
* bad recordings given to ``--data``: one clear line and exit 2, never a traceback, never raw bytes on the
  terminal; every kind of bad line counted the same way; suppressed warnings counted;
* an unreachable NATS server: one line naming the URL, within the connect timeout.

Each process runs with ``cwd=tmp_path`` so that it imports the installed kimiha, not the source tree.
"""

from __future__ import annotations

import gzip
import json
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import kimiha
from kimiha.apps.cli import EXIT_STATUS
from kimiha.venues.binance import BAD_LINE_WARNINGS, iter_lines, recorded_tape

#: Hang guard for a process that should end on its own (never a speed assertion).
TIMEOUT = 120


def kimiha_cli(*args: str, cwd: Path, stdout: object = subprocess.PIPE,
               timeout: float = TIMEOUT) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kimiha", *args], cwd=cwd, stdout=stdout, stderr=subprocess.PIPE,
                          timeout=timeout, check=False)


def text_of(stream: bytes) -> str:
    return stream.decode("utf-8")  # strict: anything the CLI writes is text


def tape_lines(n: int) -> list[bytes]:
    lines = []
    for line in iter_lines(recorded_tape()):
        lines.append(line)
        if len(lines) == n:
            break
    return lines


TRADE_LINE = (b'1723161254087896568 {"stream":"btcusdt@trade","data":{"e":"trade","E":1723161255343,'
              b'"s":"BTCUSDT","t":3735683259,"p":"61837.63000000","q":"0.02000000","T":1723161255342,'
              b'"m":true,"M":true}}')

#: One line of every kind the parser rejects.
BAD_KINDS = {
    "corrupt payload": TRADE_LINE.replace(b'"p":"61837.63000000"', b'"p":"61837.6x"'),
    "truncated JSON": TRADE_LINE[:70],
    "no timestamp": b"abc " + TRADE_LINE.partition(b" ")[2],
    "unknown stream": TRADE_LINE.replace(b"btcusdt@trade", b"btcusdt@aggTrade"),
    "wrong payload for stream": TRADE_LINE.replace(b'"e":"trade"', b'"e":"depthUpdate"'),
    "neither envelope nor snapshot": b'1 {"hello":"world"}',
    "snapshot without levels": b'1 {"lastUpdateId":5}',
    "no json": b"1723161254087896568",
    "stream without data": b'1 {"stream":"btcusdt@bookTicker"}',
    "binary": b"\x1b[31m\xff\xfe\x00 \x9b2J",
    "escape in a JSON string": b'1 {"stream":"\\u001b[2J\\u001b[31m@trade","data":{}}',
}


def assert_printable(text: str) -> None:
    """Nothing but printable characters and newlines: no escape sequence, no raw byte reached the terminal."""
    bad = sorted({c for c in text if not (c.isprintable() or c == "\n")})
    assert not bad, f"unprintable characters {bad!r} in:\n{text}"


# ------------------------------------------------------------------------------------------------ conventions
def test_version(tmp_path):
    proc = kimiha_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert text_of(proc.stdout) == f"kimiha {kimiha.__version__}\n"


def test_console_script_version(tmp_path):
    script = Path(sys.executable).with_name("kimiha")
    if not script.exists():
        pytest.skip(f"no kimiha console script next to {sys.executable}")
    proc = subprocess.run([str(script), "--version"], cwd=tmp_path, capture_output=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0 and text_of(proc.stdout) == f"kimiha {kimiha.__version__}\n"


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"]])
def test_help_states_the_exit_status_rule(tmp_path, args):
    proc = kimiha_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0
    out = text_of(proc.stdout)
    assert "exit status" in out and "128+N" in out
    for fragment in ("130 for SIGINT", "143 for SIGTERM", "prints its summary", "141"):
        assert fragment in out and fragment in EXIT_STATUS


@pytest.mark.parametrize("option", [["--nats", "nats://127.0.0.1:4222"], ["--delivery", "core"],
                                    ["--connect-timeout", "3"]])
def test_distributed_only_options_need_distributed(tmp_path, option):
    proc = kimiha_cli("demo", "--no-progress", *option, cwd=tmp_path)
    err = text_of(proc.stderr)
    assert proc.returncode == 2, err
    assert f"error: {option[0]} applies to the distributed demo only" in err and "--distributed" in err
    assert proc.stdout == b""  # nothing ran


def test_a_nats_url_that_is_not_one_is_refused(tmp_path):
    proc = kimiha_cli("demo", "--distributed", "--nats", "http://127.0.0.1:4222", cwd=tmp_path)
    err = text_of(proc.stderr)
    assert proc.returncode == 2 and "--nats" in err and "nats://HOST:PORT" in err and "'http://127.0.0.1:4222'" in err


@pytest.mark.parametrize("args", [
    ["demo", "--no-progress"],
    ["demo", "--no-progress", "--json"],
    ["bench", "memory", "--events", "1024", "--warmup", "1024", "--checkpoints", "1"],
])
def test_a_closed_stdout_ends_the_run_quietly(tmp_path, args):
    # `kimiha demo | head -3` once head has exited: a pipe with no reader left
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = kimiha_cli(*args, cwd=tmp_path, stdout=write_end)
    finally:
        os.close(write_end)
    err = text_of(proc.stderr)
    assert proc.returncode == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


class Running:
    """A CLI process started in ``cwd``: stdout goes to a file, stderr is read line by line in a thread, so
    that waiting for a line or for the exit is always bounded by :data:`TIMEOUT`."""

    def __init__(self, *args: str, cwd: Path) -> None:
        self._out = open(cwd / "stdout.txt", "w+")  # noqa: SIM115 - closed in __exit__
        self.proc = subprocess.Popen([sys.executable, "-m", "kimiha", *args], cwd=cwd, text=True,
                                     stdout=self._out, stderr=subprocess.PIPE)
        self.seen: list[str] = []
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.put(line)
        self._lines.put(None)

    def wait_for(self, marker: str) -> None:
        """Read stderr until a line containing ``marker`` (the run shows that it is going)."""
        while True:
            line = self._lines.get(timeout=TIMEOUT)
            assert line is not None, f"the run ended before showing {marker!r}:\n{''.join(self.seen)}"
            self.seen.append(line)
            if marker in line:
                return

    def finish(self) -> tuple[int, str, str]:
        """Wait for the exit; return the exit status, stdout and the whole of stderr."""
        code = self.proc.wait(TIMEOUT)
        while (line := self._lines.get(timeout=TIMEOUT)) is not None:
            self.seen.append(line)
        self._out.seek(0)
        return code, self._out.read(), "".join(self.seen)

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


def test_ctrl_c_during_a_full_speed_replay_prints_the_summary_and_exits_130(tmp_path):
    tape = [str(p) for p in recorded_tape()]
    data = [arg for _ in range(5) for path in tape for arg in ("--data", path)]  # ~500k lines: a long replay
    with Running("demo", *data, cwd=tmp_path) as run:
        run.wait_for("replay:")  # the first progress line: the replay is running, at full speed
        run.proc.send_signal(signal.SIGINT)
        code, out, err = run.finish()
    assert code == 130, err
    assert "Traceback" not in err
    assert "interrupted by SIGINT: replay stopped early, every stage drained, every shutdown hook run: yes" in out
    assert "before the stop" in out and "every line read accounted for: yes" in out
    assert "wall time" in out  # the whole summary, to its end


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_bench_exits_128_plus_the_signal_without_a_traceback(tmp_path, signum):
    with Running("bench", "compare", "--no-anchors", "--loops", "uvloop", "--repeat", "5", "--events", "200000",
                 cwd=tmp_path) as run:
        run.wait_for("warm-up of")  # the measured repetitions start now, and take a while
        run.proc.send_signal(signum)
        code, _, err = run.finish()
    name = signal.Signals(signum).name
    assert code == 128 + signum, err
    assert "Traceback" not in err and f"kimiha bench compare: interrupted by {name}" in err


# --------------------------------------------------------------------------------------------- bad recordings
def _one_line(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = text_of(proc.stderr)
    assert_printable(err)
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert proc.stdout == b""  # no summary of nothing
    return err


def test_a_truncated_gzip_recording_is_one_line(tmp_path):
    data = gzip.compress(b"\n".join(tape_lines(5000)) + b"\n")
    path = tmp_path / "crashed-recorder.gz"
    path.write_bytes(data[: len(data) // 2])
    proc = kimiha_cli("demo", "--data", str(path), cwd=tmp_path)
    err = _one_line(proc)
    assert proc.returncode == 2
    assert err.startswith("kimiha demo: --data") and "crashed-recorder.gz" in err
    assert "expected complete gzip data, but it is truncated or corrupt after" in err


@pytest.mark.parametrize("kind", ["random bytes", "csv", "empty", "blank lines only", "gzipped junk"])
def test_a_recording_in_which_no_line_parses_is_an_error(tmp_path, kind):
    path = tmp_path / f"{kind.replace(' ', '-')}.data"
    if kind == "random bytes":
        path.write_bytes(bytes(range(256)) * 40 + b"\x1b[2J\x1b]0;owned\x07")
    elif kind == "csv":
        path.write_bytes(b"time,price,qty\n1723161254087896568,61837.63,0.02\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "blank lines only":
        path.write_bytes(b"\n \r\n\n")
    else:
        path.write_bytes(gzip.compress(b"hello\nworld\n"))
    proc = kimiha_cli("demo", "--data", str(path), cwd=tmp_path)
    err = _one_line(proc)
    assert proc.returncode == 2
    assert err.startswith(f"kimiha demo: --data {path}: ")
    assert "expected lines '<recv_ts_ns> <JSON>' of Binance market data" in err
    if kind in ("empty", "blank lines only"):
        assert "holds no lines" in err
    else:
        assert "none of its" in err and "e.g. Binance feed line 1: expected" in err


def _unreadable(tmp_path: Path) -> str:
    if sys.platform.startswith("linux"):
        return "/proc/self/mem"  # a regular file whose first bytes cannot be read, even by root
    path = tmp_path / "locked.gz"
    path.write_bytes(b"x")
    path.chmod(0)
    if os.access(path, os.R_OK):
        pytest.skip("running as a user who can read any file")
    return str(path)


@pytest.mark.parametrize("kind, message", [
    ("missing", "no such recording file"),
    ("directory", "is a directory; expected a recording file"),
    ("unreadable", "cannot read it"),
    ("device", "is not a regular file; expected a recording file"),
])
@pytest.mark.parametrize("distributed", [False, True])
def test_a_data_path_that_is_not_a_readable_file_is_one_line_and_exit_2(tmp_path, kind, message, distributed):
    path = {"missing": lambda: str(tmp_path / "absent.gz"), "directory": lambda: str(tmp_path),
            "unreadable": lambda: _unreadable(tmp_path), "device": lambda: os.devnull}[kind]()
    proc = kimiha_cli("demo", *(["--distributed"] if distributed else []), "--data", path, cwd=tmp_path)
    err = _one_line(proc)
    assert proc.returncode == 2
    assert err.startswith(f"kimiha demo: --data {path}: {message}")


def test_every_kind_of_bad_line_is_accounted_for_the_same_way_and_quoted_escaped(tmp_path):
    good = tape_lines(3000)
    lines = good[:1000] + list(BAD_KINDS.values()) + good[1000:]
    path = tmp_path / "doctored.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    proc = kimiha_cli("demo", "--json", "--no-progress", "--data", str(path), cwd=tmp_path)
    err = text_of(proc.stderr)
    assert proc.returncode == 0, err
    summary = json.loads(proc.stdout)
    assert summary["bad_lines"] == summary["bad_lines_in_files"] == len(BAD_KINDS)
    assert summary["lines_read"] == summary["lines_in_files"] == len(lines)
    assert summary["messages_by_stream"] == summary["messages_by_stream_in_files"]
    assert sum(summary["messages_by_stream"].values()) == len(good)
    assert summary["all_lines_accounted"] is True
    # each bad line is quoted in a warning, escaped: no raw byte or escape sequence reaches the terminal
    assert_printable(err)
    assert err.count("skipped a bad line") == len(BAD_KINDS)
    assert r"\x1b[31m\xff\xfe\x00" in err and r"'\x1b[2J\x1b[31m@trade'" in err


def test_warnings_past_the_limit_are_counted_not_shown(tmp_path):
    good = tape_lines(2000)
    junk = [b"junk %d" % i for i in range(BAD_LINE_WARNINGS + 37)]
    path = tmp_path / "noisy.txt"
    path.write_bytes(b"\n".join(good[:500] + junk + good[500:]) + b"\n")
    proc = kimiha_cli("demo", "--no-progress", "--data", str(path), cwd=tmp_path)
    err = text_of(proc.stderr)
    assert proc.returncode == 0, err
    assert err.count("skipped a bad line") == BAD_LINE_WARNINGS
    assert "further ones are counted, not shown" in err
    assert f"37 more bad line(s) were skipped and not shown ({BAD_LINE_WARNINGS + 37} in all" in err
    assert f"{BAD_LINE_WARNINGS + 37} bad; every line accounted for: yes" in text_of(proc.stdout)


# ------------------------------------------------------------------------------------------------------- NATS
def test_an_unreachable_nats_server_is_one_line_naming_the_url_within_the_connect_timeout(tmp_path):
    pytest.importorskip("nats")
    from kimiha.bridge.server import free_port

    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    proc = kimiha_cli("demo", "--distributed", "--nats", url, "--connect-timeout", "2", cwd=tmp_path, timeout=30)
    err = _one_line(proc)
    assert proc.returncode == 1
    assert err.startswith(f"kimiha demo --distributed: cannot connect to NATS at {url} within 2 s (")


def test_the_connect_deadline_holds_when_nats_py_swallows_a_cancellation(run, monkeypatch):
    # nats-py's retry loop of a refused first connection now and then swallows the cancellation that
    # asyncio.timeout relies on (Python 3.11): then a timeout around nats.connect never fires
    pytest.importorskip("nats")
    import asyncio

    from kimiha.bridge.link import NatsLink, connect_within

    cancels = []

    async def stubborn_connect(*_args: object, **_kwargs: object) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancels.append("swallowed")
        await asyncio.Event().wait()

    async def stubborn_client_connect(_client: object, *args: object, **kwargs: object) -> None:
        await stubborn_connect(*args, **kwargs)

    import nats
    import nats.aio.client

    monkeypatch.setattr(nats, "connect", stubborn_connect)
    # the bridge's link makes its own Client (so that a failed attempt can be closed) and connects it
    monkeypatch.setattr(nats.aio.client.Client, "connect", stubborn_client_connect)

    async def main() -> None:
        with pytest.raises(TimeoutError, match="no connection within 0.2 s"):
            await connect_within(0.2, "nats://127.0.0.1:9")
        # what every process of the distributed demo does first
        with pytest.raises(ConnectionError, match=r"cannot connect to NATS at nats://127.0.0.1:9 within 0.3 s"):
            await NatsLink("nats://127.0.0.1:9", connect_timeout=0.3).initialize()

    run(main())  # the fixture's hang guard fails the test if a deadline did not hold
    assert cancels == ["swallowed", "swallowed"]


def test_closed_standard_streams_and_a_full_disk_are_handled(tmp_path):
    # found by the adversarial review: `>&-` aborted uvloop (fd reuse), `> /dev/full` printed a traceback
    cmd = [sys.executable, "-m", "kimiha", "demo", "--no-progress", "--data", str(recorded_tape()[0])]
    closed = subprocess.run(cmd, cwd=tmp_path, capture_output=False, stdout=subprocess.DEVNULL,
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=120,
                            preexec_fn=lambda: os.close(1))
    assert closed.returncode == 0, closed.stderr
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            proc = subprocess.run(cmd, cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True, timeout=120)
        assert proc.returncode == 1
        assert proc.stderr.strip().splitlines()[-1] == "kimiha: cannot write the output: No space left on device"
        assert "Traceback" not in proc.stderr


def test_control_characters_in_stream_names_never_reach_the_terminal(tmp_path):
    line = (b'1723161254000000000 {"stream":"btc\\u001b]0;PWNED\\u0007\\u001b[2Jusdt@trade","data":{"e":"trade",'
            b'"E":1723161254000,"s":"BTCUSDT","t":1,"p":"61000.00","q":"0.001","T":1723161254000,"m":true}}\n')
    data = tmp_path / "evil.txt"
    data.write_bytes(line)
    proc = subprocess.run([sys.executable, "-m", "kimiha", "demo", "--no-progress", "--data", str(data)],
                          cwd=tmp_path, capture_output=True, timeout=120)
    assert b"\x1b" not in proc.stdout and b"\x07" not in proc.stdout
    assert b"\x1b" not in proc.stderr and b"\x07" not in proc.stderr


# -- usage errors: one line, every subcommand (the EXIT_STATUS rule) ------------------------------------------

@pytest.mark.parametrize("args, prog, fragment", [
    (["demo", "--speed", "fast"], "kimiha demo", "argument --speed: expected a number > 0"),
    (["demo", "--loop", "tokio"], "kimiha demo", "argument --loop: invalid choice: 'tokio'"),
    (["demo", "--latency", "70000"], "kimiha demo", "expected a number of milliseconds in [0, 60000]"),
    (["replay"], "kimiha replay", "the following arguments are required: PATH"),
    (["replay", "x.kj", "--loop", "tokio"], "kimiha replay", "argument --loop: invalid choice"),
    (["live", "--symbol", "!!"], "kimiha live", "expected a Binance symbol"),
    (["live", "--sim", "--ws-url", "wss://127.0.0.1:1"], "kimiha live", "--sim runs its own local exchange"),
    (["top", "http://127.0.0.1:1", "--interval", "0"], "kimiha top", "argument --interval"),
    (["--log-level", "loud", "demo"], "kimiha", "argument --log-level: invalid choice"),
    (["frobnicate"], "kimiha", "invalid choice: 'frobnicate'"),
])
def test_a_bad_option_is_one_line_and_exit_2_for_every_subcommand(tmp_path, args, prog, fragment):
    # before: argparse's usage block (several lines) and then the error
    proc = kimiha_cli(*args, cwd=tmp_path)
    err = text_of(proc.stderr)
    assert proc.returncode == 2 and proc.stdout == b""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: ") and fragment in err, err
    assert err.rstrip().endswith(f"(see {prog} --help)"), err


@pytest.mark.parametrize("option, needs", [
    (["--journal-fsync", "batch"], "--journal"), (["--journal-fsync", "never"], "--journal"),
    (["--journal-rotate-mb", "1"], "--journal"),
    (["--metrics-linger", "5"], "--metrics-port"), (["--metrics-host", "0.0.0.0"], "--metrics-port"),
])
def test_options_that_qualify_another_need_it(tmp_path, option, needs):
    # before: silently ignored (while --nats without --distributed was an error)
    proc = kimiha_cli("demo", "--no-progress", *option, cwd=tmp_path)
    err = text_of(proc.stderr)
    assert proc.returncode == 2 and proc.stdout == b"", err
    assert len(err.splitlines()) == 1
    assert f"error: {option[0]} applies with {needs} only: add {needs}" in err, err


def test_help_says_which_options_are_in_process_only_and_what_a_journal_replaces():
    from kimiha.apps.cli import _parser

    _, demo = _parser()
    helps = {a.option_strings[0]: a.help or "" for a in demo._actions if a.option_strings}
    for option in ("--latency", "--latency-report", "--journal"):
        assert helps[option].startswith("in-process demo only"), (option, helps[option])
    assert "0 to 60000" in helps["--latency"]
    assert "replaced" in helps["--journal"] and "PATH.1" in helps["--journal"] and "removed" in helps["--journal"]
    assert "MiB" in helps["--journal-rotate-mb"]
    assert "needs --metrics-port" in helps["--metrics-host"] and "needs --metrics-port" in helps["--metrics-linger"]
    # the exit status rule names replay's outcomes too
    assert "a digest that differs from the journal's" in EXIT_STATUS
    assert "a kimiha journal" in EXIT_STATUS and "not a\n         journal's first segment" in EXIT_STATUS


def test_an_early_interrupt_says_what_is_left_at_the_journal_path(run, tmp_path):
    # before: "nothing to summarize", though the path could hold part of the run that replayed with exit 0
    from kimiha.apps.cli import _journal_left
    from kimiha.apps.demo import run_demo
    from kimiha.journal import MAGIC

    assert _journal_left(None) == ""
    empty = tmp_path / "empty.kj"
    empty.write_bytes(b"")
    assert _journal_left(str(empty)) == f"; the journal {empty} is empty"
    data = tmp_path / "d.txt"
    data.write_bytes(b"\n".join(tape_lines(300)) + b"\n")
    journal = tmp_path / "run.kj"
    run(run_demo([data], progress=None, journal=journal))
    assert "left as it is" in _journal_left(str(journal))  # closed by its run
    cut = tmp_path / "cut.kj"
    cut.write_bytes(journal.read_bytes()[:len(MAGIC) + 2000])
    assert "no end record" in _journal_left(str(cut)) and "did not close it" in _journal_left(str(cut))
