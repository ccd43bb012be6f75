"""``python -m kimiha top URL`` as a person meets it: in a pseudo-terminal (pexpect), against a live demo's metrics
endpoint; it shows the channels and tasks, says when the endpoint does not answer, and quits on q or Ctrl-C.
Plus the pieces without a terminal: the URL, the parse of a scrape, ``--once``.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("rich")
pexpect = pytest.importorskip("pexpect")

from kimiha.apps.top import metrics_url, parse  # noqa: E402

#: Hang guard for a process or a wait that should end on its own (never a speed assertion).
TIMEOUT = 60

#: The pseudo-terminal's size is what rich must use: no COLUMNS/LINES inherited from the test runner.
TERMINAL_ENV = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"TERM": "xterm"}

CHANNELS = ("RawMarketData", "MarketData", "Signals", "Orders", "Fills")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_demo(tmp_path: Path, tape_slice):
    """A demo replaying a slice of the tape slowly, serving metrics; yields its URL; stopped at the end."""
    tape = tape_slice(3000)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kimiha", "demo", "--data", str(tape), "--speed", "1", "--metrics-port", "0",
         "--no-progress", "--json"],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.match(r"metrics: serving (http://\S+)", line)
        assert m, line
        yield m.group(1).removesuffix("/metrics")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(TIMEOUT)


def spawn_top(*args: str, cwd: Path) -> pexpect.spawn:
    return pexpect.spawn(sys.executable, ["-m", "kimiha", "top", *args], cwd=str(cwd), dimensions=(40, 150),
                         timeout=TIMEOUT, encoding="utf-8", env=TERMINAL_ENV)


def test_top_shows_a_live_engine_and_quits_on_q(live_demo, tmp_path):
    top = spawn_top(live_demo, "--interval", "0.3", cwd=tmp_path)
    try:
        for name in CHANNELS:
            top.expect(name)
        top.expect("binance-connector")
        top.expect("running")
        # the counters move between two views: rates appear once two reads were made
        top.expect(re.compile(r"RawMarketData\s+[\d,]+\s+[\d,]+"))
        top.send("q")
        top.expect(pexpect.EOF)
    finally:
        top.close()
    assert top.exitstatus == 0


def test_top_says_when_the_endpoint_does_not_answer_and_quits_on_ctrl_c(tmp_path):
    port = free_port()  # nothing listens there
    top = spawn_top(f"http://127.0.0.1:{port}", "--interval", "0.2", cwd=tmp_path)
    try:
        top.expect("the endpoint does not answer: Connection refused")
        top.sendintr()
        top.expect(pexpect.EOF)
    finally:
        top.close()
    assert top.exitstatus == 130


def test_top_once_without_an_answer_is_one_line_and_exit_1(tmp_path):
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "kimiha", "top", f"127.0.0.1:{port}", "--once"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 1
    assert out.stderr.strip() == f"kimiha top: http://127.0.0.1:{port}/metrics does not answer: Connection refused"


def test_top_once_prints_the_engine(live_demo, tmp_path):
    out = subprocess.run([sys.executable, "-m", "kimiha", "top", live_demo, "--once"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    for name in CHANNELS + ("paper-executor", "imbalance-strategy", "binance-aggregator", "binance-connector"):
        assert name in out.stdout


@pytest.mark.parametrize("given, url", [
    ("127.0.0.1:9464", "http://127.0.0.1:9464/metrics"),
    ("http://127.0.0.1:9464", "http://127.0.0.1:9464/metrics"),
    ("http://127.0.0.1:9464/", "http://127.0.0.1:9464/metrics"),
    ("http://127.0.0.1:9464/custom", "http://127.0.0.1:9464/custom"),
])
def test_metrics_url(given, url):
    assert metrics_url(given) == url


@pytest.mark.parametrize("bad", ["nats://127.0.0.1:4222", "http://", "127.0.0.1:99999", "not a url", "9472",
                                 ":9472", "http://9472",
                                 "http://127.0.0.1:9464/a path"])
def test_metrics_url_refuses(bad):
    with pytest.raises(argparse.ArgumentTypeError, match="expected a metrics endpoint"):
        metrics_url(bad)


def test_parse_reads_the_exporter():
    text = "\n".join([
        '# TYPE kimiha_channel_published_total counter',
        'kimiha_channel_published_total{channel="A"} 10.0',
        '# TYPE kimiha_channel_lagged_total counter',
        'kimiha_channel_lagged_total{channel="A"} 3.0',
        '# TYPE kimiha_channel_latency_quantile_seconds gauge',
        'kimiha_channel_latency_quantile_seconds{channel="A",quantile="0.99"} 2.5e-05',
        '# TYPE kimiha_task_state gauge',
        'kimiha_task_state{task="t",role="strategy",state="running"} 1.0',
        'kimiha_task_state{task="t",role="strategy",state="failed"} 0.0',
        '# TYPE kimiha_task_errors_total counter',
        'kimiha_task_errors_total{task="t",role="strategy"} 2.0',
        "",
    ])
    snap = parse(text, at=1.0)
    assert snap.channels == {"A": {"published": 10.0, "lagged": 3.0, "p99": 2.5e-05}}
    assert snap.tasks == {("t", "strategy"): {"state": "running", "errors": 2.0}}


def test_parse_refuses_what_is_not_prometheus_text():
    with pytest.raises(ValueError):
        parse("<html>not metrics</html>\n")


@pytest.mark.parametrize("url", ["ftp://x", "not a url", "9472"])
def test_top_usage_error_is_exit_2(tmp_path, url):
    out = subprocess.run([sys.executable, "-m", "kimiha", "top", "--once", url], cwd=tmp_path,
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 2
    assert f"expected a metrics endpoint like http://127.0.0.1:9464, got {url!r}" in out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().splitlines()[-1].startswith("kimiha top: error:")


# -- endpoints that misbehave -------------------------------------------------------------------------------------


class HostileEndpoint:
    """A loopback server answering every connection with ``answer(conn)`` (in a thread of its own)."""

    def __init__(self, answer) -> None:
        import socket
        import threading

        self.answer = answer
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/metrics"
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.sock.settimeout(0.1)  # a close() does not wake a blocked accept(): look at the stop flag instead
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(TIMEOUT)
                try:
                    conn.recv(65536)
                    self.answer(conn, self.stop)
                except OSError:
                    pass

    def __enter__(self) -> HostileEndpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(TIMEOUT)
        self.sock.close()


def _send(data: bytes):
    return lambda conn, stop: conn.sendall(data)


@pytest.mark.parametrize("answer, reason", [
    (b"hello there\r\n\r\n", "the answer is not HTTP (BadStatusLine"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\nkimiha_watched 1\n", "the answer is not HTTP (IncompleteRead"),
    (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "the answer is not HTTP (LineTooLong"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 35\r\n\r\nkimiha_channel_published_total 3.0\n",
     "a kimiha_ sample without its 'channel' label"),
])
def test_top_reports_an_answer_that_is_not_a_scrape_instead_of_dying(answer, reason):
    from kimiha.apps.top import _read

    with HostileEndpoint(_send(answer)) as endpoint:
        snap, error = _read(endpoint.url, TIMEOUT)
    assert snap is None
    assert error is not None and reason in error


def test_top_timeout_bounds_the_whole_answer():
    """An endpoint trickling its body a line at a time, each well within the timeout: the read still ends."""
    from kimiha.apps.top import _read

    def trickle(conn, stop) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        for _ in range(100):  # 10 s at most, then the answer ends (a read that waits for it all fails below)
            if stop.wait(0.1):
                return
            conn.sendall(b"# still here\n")

    with HostileEndpoint(trickle) as endpoint:
        snap, error = _read(endpoint.url, 0.5)
    assert snap is None and error == "no answer within 0.5 s (--timeout)"


def test_top_refuses_an_enormous_answer():
    from kimiha.apps.top import fetch

    def flood(conn, stop) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
        line = b"# " + b"x" * 65534 + b"\n"
        for _ in range(64):  # 4 MiB
            conn.sendall(line)

    with HostileEndpoint(flood) as endpoint:
        with pytest.raises(ValueError, match="the answer is over 1 MiB, not a kimiha scrape"):
            fetch(endpoint.url, TIMEOUT, max_bytes=1024 * 1024)


def test_top_once_against_an_endpoint_that_is_not_kimiha_is_exit_1(tmp_path):
    body = b"# TYPE other_total counter\nother_total 3.0\n"
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    with HostileEndpoint(_send(answer)) as endpoint:
        out = subprocess.run([sys.executable, "-m", "kimiha", "top", "--once", endpoint.url], cwd=tmp_path,
                             capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 1, out.stdout
    assert "answers, but is not a kimiha metrics endpoint" in out.stderr and out.stdout == ""


def demo_snapshots():
    from kimiha.apps.top import Snapshot

    def channels(scale: float) -> dict[str, dict[str, float]]:
        return {name: {"published": 15_012_345 * scale, "delivered": 60_049_380 * scale, "lagged": 1_234_567 * scale,
                       "blocked": 0.0, "bad_frames": 12_345 * scale, "handler_errors": 98_765 * scale,
                       "backlog": 4096.0, "high_water_mark": 4096.0, "capacity": 4096.0, "subscribers": 2.0,
                       "latency_count": 1.0, "p50": 0.012345, "p99": 1.234567, "max": 9.87654}
                for name in CHANNELS}

    def tasks(scale: float) -> dict[tuple[str, str], dict[str, object]]:
        return {(name, role): {"state": "running", "handled": 15_012_345 * scale, "executions": 0.0,
                               "errors": 1_234 * scale, "restarts": 3.0, "lagged": 567_890 * scale}
                for name, role in (("binance-connector", "connector"), ("binance-aggregator", "aggregator"),
                                   ("imbalance-strategy", "strategy"), ("paper-executor", "executor"))}

    before = Snapshot(at=1.0, version="0.2.0", watching=True, scheduler_state={"scheduler": "running"},
                      channels=channels(0.5), tasks=tasks(0.5))
    now = Snapshot(at=2.0, version="0.2.0", watching=True, scheduler_state={"scheduler": "running"},
                   channels=channels(1.0), tasks=tasks(1.0))
    return now, before


def test_top_fits_80x24_without_cutting_a_number():
    """The demo's 5 channels and 4 tasks with large numbers in an 80x24 terminal: no ellipsis, no line past 80
    columns, at most 24 rows, and the numbers shown whole (shortened with a unit)."""
    from rich.console import Console

    from kimiha.apps.top import render

    now, before = demo_snapshots()
    console = Console(width=80, height=24, record=True, file=open(os.devnull, "w"), color_system=None)
    console.print(render("http://127.0.0.1:9464/metrics", now, before, None, 2.0, 1.0, console.width))
    text = console.export_text()
    lines = text.rstrip("\n").splitlines()
    assert "\u2026" not in text and "..." not in text
    assert max(len(line) for line in lines) <= 80 and len(lines) <= 24, text
    for name in CHANNELS + ("binance-connector", "paper-executor"):
        assert name in text
    assert "15.0M" in text and "1.23M" in text  # published, lagged: shortened, whole
    assert "7.51M" in text  # pub/s: (15.0M - 7.5M) / 1 s


def test_top_once_has_no_redraw_hint():
    from rich.console import Console

    from kimiha.apps.top import render

    now, _ = demo_snapshots()
    console = Console(width=132, record=True, file=open(os.devnull, "w"), color_system=None)
    console.print(render("http://127.0.0.1:9464/metrics", now, None, None, 2.0, None, console.width))
    assert "q quits" not in console.export_text()


def test_top_header_breaks_between_its_pieces_never_inside_one():
    """Before: at 80 columns the header was one text the terminal wrapped wherever it was full, cutting a
    scheduler's "name: state" (or the URL) in two."""
    from rich.cells import cell_len
    from rich.console import Console

    from kimiha.apps.top import render

    now, before = demo_snapshots()
    now.scheduler_state = {"connector-scheduler": "running", "strategy-scheduler": "stopping",
                           "executor-scheduler": "running", "取引スケジューラ": "running"}
    url = "http://127.0.0.1:9464/metrics"
    for width in (60, 80, 100):
        console = Console(width=width, record=True, file=open(os.devnull, "w"), color_system=None)
        console.print(render(url, now, before, None, 2.0, 1.0, console.width))
        lines = console.export_text().splitlines()
        assert max(cell_len(line) for line in lines) <= width  # screen columns: a wide character takes two
        for piece in (f"kimiha top {url}", "kimiha 0.2.0", "取引スケジューラ: running", "connector-scheduler: running",
                      "strategy-scheduler: stopping", "executor-scheduler: running", "every 1 s, q quits"):
            assert any(piece in line for line in lines), (width, piece, lines[:4])
