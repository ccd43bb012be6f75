"""``kimiha top URL``: a live terminal view of a running engine, read from its Prometheus endpoint.

Channels with their rates, lag, backlog and latency; tasks with their state and errors; the NATS bridge and
the shared-memory rings (written, read, lagged, dropped, readers attached) when there are. Redrawn in place every ``--interval`` seconds with rich; ``q`` or Ctrl-C quits. When the endpoint
does not answer, the view says so (with the reason) and keeps asking. Needs the ``metrics`` extra
(prometheus-client for its parser, rich for the terminal).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import io
import os
import re
import select
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kimiha.apps.observe import add_log_options

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

__all__ = ["Snapshot", "add_top_parser", "fetch", "main", "metrics_url", "parse", "render"]

_EXTRA = "pip install 'kimiha[metrics]' ('.[metrics]' in a checkout)"


#: What a host in the URL may be: a name, an IPv4 address, or an IPv6 address (brackets already removed).
_HOST = re.compile(r"[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(%[A-Za-z0-9_.-]+)?")


def metrics_url(text: str) -> str:
    """Return the scrape URL for ``text``: ``http://`` added when no scheme is given, ``/metrics`` when no path."""
    url = text.strip() if "://" in text else f"http://{text.strip()}"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = None
    if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
            or not _HOST.fullmatch(parts.hostname) or parts.hostname.isdigit()  # a bare port is not a host
            or any(ch.isspace() or not ch.isprintable() for ch in url)):  # http.client refuses these
        raise argparse.ArgumentTypeError(f"expected a metrics endpoint like http://127.0.0.1:9464, got {text!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path="/metrics")
    return urllib.parse.urlunsplit(parts)


def add_top_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Add the ``top`` subcommand to the CLI's subparsers."""
    from kimiha.apps.cli import _seconds
    top = sub.add_parser(
        "top", help="live view of a running engine from its metrics endpoint (--metrics-port)",
        description="Show a running engine's channels (rates, lag, backlog, latency) and tasks (state, errors), "
        "read from its Prometheus endpoint and redrawn in place. q or Ctrl-C quits.",
    )
    top.add_argument("url", type=metrics_url,
                     help="the engine's metrics endpoint, e.g. http://127.0.0.1:9464 (/metrics is added)")
    top.add_argument("--interval", type=_seconds, default=1.0, metavar="SECONDS",
                     help="seconds between two reads (default 1)")
    top.add_argument("--timeout", type=_seconds, default=2.0, metavar="SECONDS",
                     help="how long one read may take before the endpoint counts as not answering (default 2)")
    top.add_argument("--once", action="store_true",
                     help="print one view and exit (exit 1 if the endpoint does not answer, or answers but is "
                          "not kimiha's): for scripts")
    add_log_options(top, defaults=False)
    return top


# ---------------------------------------------------------------------------------------------------------------
# reading the endpoint


@dataclass
class Snapshot:
    """What one read of the endpoint said, keyed for the view."""

    at: float
    version: str | None = None
    watching: bool = False
    scheduler_state: dict[str, str] = field(default_factory=dict)
    channels: dict[str, dict[str, float]] = field(default_factory=dict)
    tasks: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    links: dict[str, dict[str, float]] = field(default_factory=dict)
    exports: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    imports: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    #: Shared-memory rings, keyed (bridge, channel, ring): what this process writes, and what it reads.
    shm_exports: dict[tuple[str, str, str], dict[str, float]] = field(default_factory=dict)
    shm_imports: dict[tuple[str, str, str], dict[str, float]] = field(default_factory=dict)


#: The largest answer read (a kimiha scrape is a few kB per channel): past it, the endpoint is not kimiha's.
MAX_BODY = 32 * 1024 * 1024


def fetch(url: str, timeout: float, max_bytes: int = MAX_BODY) -> str:
    """Return the endpoint's text; raise ``OSError`` (``urllib.error.URLError`` among them) when it does not
    answer, or answers with an HTTP error, and ``ValueError`` when the answer is not HTTP or larger than
    ``max_bytes``.

    ``timeout`` bounds the whole body, not each read: an endpoint trickling bytes counts as not answering.
    """
    deadline = time.monotonic() + timeout
    request = urllib.request.Request(url, headers={"Accept": "text/plain"})
    chunks: list[bytes] = []
    size = 0
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            while chunk := response.read1(65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise ValueError(f"the answer is over {max_bytes // (1024 * 1024)} MiB, not a kimiha scrape")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the answer took over {timeout:g} s")
            if response.length:  # read1 ends quietly at a close before Content-Length: a cut-short scrape
                raise http.client.IncompleteRead(b"".join(chunks), response.length)
    except http.client.HTTPException as exc:  # not HTTP, cut short, a header line too long
        raise ValueError(f"the answer is not HTTP ({type(exc).__name__}: {exc})") from None
    return b"".join(chunks).decode("utf-8", errors="replace")


def _require() -> None:
    for module in ("prometheus_client", "rich"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(f"kimiha top needs prometheus-client and rich: {_EXTRA}; import failed: {exc}") \
                from exc


_CHANNEL_FIELDS = {
    "kimiha_channel_published_total": "published",
    "kimiha_channel_delivered_total": "delivered",
    "kimiha_channel_lagged_total": "lagged",
    "kimiha_channel_blocked_total": "blocked",
    "kimiha_channel_bad_frames_total": "bad_frames",
    "kimiha_channel_handler_errors_total": "handler_errors",
    "kimiha_channel_backlog_events": "backlog",
    "kimiha_channel_high_water_mark_events": "high_water_mark",
    "kimiha_channel_capacity_events": "capacity",
    "kimiha_channel_subscribers": "subscribers",
    "kimiha_channel_latency_seconds_count": "latency_count",
}
_TASK_FIELDS = {
    "kimiha_task_handled_total": "handled",
    "kimiha_task_executions_total": "executions",
    "kimiha_task_errors_total": "errors",
    "kimiha_task_restarts_total": "restarts",
    "kimiha_task_lagged_total": "lagged",
}
_QUANTILE_FIELDS = {"0.5": "p50", "0.99": "p99", "1": "max"}


def parse(text: str, at: float | None = None) -> Snapshot:
    """Read a scrape (Prometheus text format, with prometheus-client's own parser) into a :class:`Snapshot`.

    Raises ``ValueError`` when the text is not the Prometheus format.
    """
    from prometheus_client.parser import text_string_to_metric_families

    snap = Snapshot(at=time.monotonic() if at is None else at)
    try:
        _read_families(snap, text_string_to_metric_families(text))
    except KeyError as exc:  # a kimiha_ name without kimiha's labels: another exporter's, or an older kimiha
        raise ValueError(f"a kimiha_ sample without its {exc.args[0]!r} label") from None
    return snap


def _read_families(snap: Snapshot, families: Iterable[Any]) -> None:
    for family in families:
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == "kimiha_build_info":
                snap.version = labels.get("version")
            elif name == "kimiha_watched":
                snap.watching = value == 1
            elif name in _CHANNEL_FIELDS:
                snap.channels.setdefault(labels["channel"], {})[_CHANNEL_FIELDS[name]] = value
            elif name == "kimiha_channel_latency_quantile_seconds":
                key = _QUANTILE_FIELDS.get(labels["quantile"])
                if key is not None:
                    snap.channels.setdefault(labels["channel"], {})[key] = value
            elif name in _TASK_FIELDS:
                snap.tasks.setdefault((labels["task"], labels["role"]), {})[_TASK_FIELDS[name]] = value
            elif name == "kimiha_task_state" and value == 1:
                snap.tasks.setdefault((labels["task"], labels["role"]), {})["state"] = labels["state"]
            elif name == "kimiha_scheduler_state" and value == 1:
                snap.scheduler_state[labels["scheduler"]] = labels["state"]
            elif name.startswith("kimiha_bridge_link_"):
                snap.links.setdefault(labels["bridge"], {})[name.removeprefix("kimiha_bridge_link_")] = value
            elif name.startswith("kimiha_bridge_export_"):
                key2 = (labels["bridge"], labels["channel"])
                snap.exports.setdefault(key2, {})[name.removeprefix("kimiha_bridge_export_")] = value
            elif name.startswith("kimiha_bridge_import_") and "latency" not in name:
                key2 = (labels["bridge"], labels["channel"])
                snap.imports.setdefault(key2, {})[name.removeprefix("kimiha_bridge_import_")] = value
            elif name.startswith("kimiha_shm_export_"):
                key3 = (labels["bridge"], labels["channel"], labels["ring"])
                snap.shm_exports.setdefault(key3, {})[name.removeprefix("kimiha_shm_export_")] = value
            elif name.startswith("kimiha_shm_import_") and "latency" not in name:
                key3 = (labels["bridge"], labels["channel"], labels["ring"])
                snap.shm_imports.setdefault(key3, {})[name.removeprefix("kimiha_shm_import_")] = value


# ---------------------------------------------------------------------------------------------------------------
# the view


def _rate(now: dict[str, Any], before: dict[str, Any] | None, key: str, dt: float) -> str:
    if before is None or dt <= 0 or key not in now or key not in before:
        return "-"
    delta = now[key] - before[key]
    return _short(max(delta, 0.0) / dt)


def _short(value: float, decimals: int = 0) -> str:
    """A number in at most 7 characters: ``12,345`` (or ``12.5`` with decimals), then ``123.4k``, ``1.23M``,
    ``12.3G``, ... (never cut: a column may be dropped on a narrow terminal, a number never truncated)."""
    if value != value:  # NaN
        return "-"
    size = abs(value)
    if size < 100_000:
        return f"{value:,.{decimals}f}" if size < 10_000 or not decimals else f"{value:,.0f}"
    for unit, scale in (("k", 1e3), ("M", 1e6), ("G", 1e9), ("T", 1e12)):
        scaled = value / scale
        if abs(scaled) < 999.95:
            return f"{scaled:.{1 if abs(scaled) >= 10 else 2}f}{unit}"
    return f"{value:.2e}"


def _count(value: Any) -> str:
    return "-" if value is None else _short(float(value))


def _us(value: Any) -> str:
    return "-" if value is None else _short(value * 1e6, 1)


#: Columns a narrow terminal drops first, in order (the names and the counts that matter most stay).
_CHANNEL_DROP = ("max us", "hwm/cap", "deliv/s", "bad", "p50 us", "backlog", "errors", "published")
_TASK_DROP = ("execs", "restarts", "lagged", "handled/s", "role")


def _fit(title: str, columns: list[tuple[str, str, int | None]], rows: list[list[Any]], width: int | None,
         drop: tuple[str, ...]) -> Table:
    """The table with as many columns as fit ``width`` (None: all), dropping them in ``drop`` order."""
    from rich import box
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    gone: set[str] = set()
    probe = Console(width=1 << 14, file=io.StringIO())  # measures the table's natural width, unclamped
    while True:
        table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, header_style="bold",
                      pad_edge=False, show_edge=False)
        kept = [i for i, (name, _, _) in enumerate(columns) if name not in gone]
        for i in kept:
            name, justify, min_width = columns[i]
            table.add_column(name, justify=justify, no_wrap=True, min_width=min_width)  # type: ignore[arg-type]
        for row in rows:
            table.add_row(*(row[i] for i in kept))
        left = [name for name in drop if name not in gone]
        if width is None or not left or Measurement.get(probe, probe.options, table).maximum <= width:
            return table
        gone.add(left[0])


def render(url: str, snap: Snapshot | None, prev: Snapshot | None, error: str | None,
           last_ok: float | None, interval: float | None, width: int | None = None) -> RenderableType:
    """Return the view of one read: a header line, the channels' and tasks' tables, the bridge's if any
    (``interval`` None: a single view, without the redraw hint). ``width``: the terminal's columns, which the
    tables fit by leaving out their less important columns (never by cutting a number)."""
    from rich.console import Group
    from rich.text import Text

    parts: list[Any] = []
    # The header's pieces, each kept whole: one that would not fit ``width`` starts a new line (a terminal
    # wrapping it would cut a URL or a scheduler's name in two).
    pieces = [Text.assemble(("kimiha top ", "bold"), url)]
    if snap is not None and snap.version:
        pieces.append(Text(f"kimiha {snap.version}"))
    for name, state in (snap.scheduler_state.items() if snap is not None else ()):
        pieces.append(Text.assemble(f"{name}: ", (state, "green" if state == "running" else "yellow")))
    if interval is not None:  # None: a single view (--once), nothing redraws and no key is read
        pieces.append(Text(f"every {interval:g} s, q quits", style="dim"))
    header = Text()
    used = 0
    for piece in pieces:
        if used and width is not None and used + 2 + piece.cell_len > width:
            header.append("\n")
            used = 0
        elif used:
            header.append("  ")
            used += 2
        header.append_text(piece)
        used += piece.cell_len  # screen columns: a wide character takes two
    parts.append(header)
    if error is not None:
        since = "" if last_ok is None else f"; last answer {time.monotonic() - last_ok:.0f} s ago, shown below"
        parts.append(Text(f"the endpoint does not answer: {error} (asking again every {interval:g} s{since})",
                          style="bold red"))
    if snap is None:
        return Group(*parts)
    if not snap.watching and not snap.channels:
        parts.append(Text("the endpoint answers, but reports no engine yet (kimiha_watched 0, or not kimiha)",
                          style="yellow"))
    dt = snap.at - prev.at if prev is not None else 0.0
    widest = max((len(name) for name in snap.channels), default=7)
    # names are never cut: on a narrow terminal the less important columns give way first
    columns: list[tuple[str, str, int | None]] = [("channel", "left", min(widest, 24))] + [
        (name, "right", None) for name in ("pub/s", "published", "deliv/s", "lagged", "backlog", "hwm/cap",
                                           "p50 us", "p99 us", "max us", "bad", "errors")]
    rows: list[list[Any]] = []
    for name, c in snap.channels.items():
        before = prev.channels.get(name) if prev is not None else None
        lagged = c.get("lagged", 0.0)
        measured = c.get("latency_count", 0.0) > 0  # nothing delivered yet: no latency (not 0 us)
        latency = [_us(c.get(k)) if measured else "-" for k in ("p50", "p99", "max")]
        rows.append([
            name, _rate(c, before, "published", dt), _count(c.get("published")), _rate(c, before, "delivered", dt),
            Text(_count(lagged), style="red" if lagged else ""), _count(c.get("backlog")),
            f"{_count(c.get('high_water_mark'))}/{_count(c.get('capacity'))}", *latency,
            _count(c.get("bad_frames")), _count(c.get("handler_errors")),
        ])
    parts.append(_fit("channels", columns, rows, width, _CHANNEL_DROP))
    if snap.tasks:
        widest = max(len(name) for name, _ in snap.tasks)
        columns = [("task", "left", min(widest, 24)), ("role", "left", None), ("state", "left", None)]
        columns += [
            (name, "right", None) for name in ("handled", "handled/s", "execs", "errors", "restarts", "lagged")]
        rows = []
        for (name, role), t in snap.tasks.items():
            before_t = prev.tasks.get((name, role)) if prev is not None else None
            state = str(t.get("state", "?"))
            errors = t.get("errors", 0.0)
            rows.append([name, role, Text(state, style=_STATE_STYLE.get(state, "")), _count(t.get("handled")),
                         _rate(t, before_t, "handled", dt), _count(t.get("executions")),
                         Text(_count(errors), style="red" if errors else ""), _count(t.get("restarts")),
                         _count(t.get("lagged"))])
        parts.append(_fit("tasks", columns, rows, width, _TASK_DROP))
    for bridge, link in snap.links.items():
        up = link.get("up") == 1
        line = Text(f"bridge {bridge}: ")
        line.append("up" if up else "DOWN", style="green" if up else "bold red")
        line.append(f"  reconnects {_count(link.get('reconnects_total'))}  slow consumers "
                    f"{_count(link.get('slow_consumers_total'))}  errors {_count(link.get('errors_total'))}")
        parts.append(line)
    for (bridge, channel), e in snap.exports.items():
        parts.append(Text(f"  export {channel}: sent {_count(e.get('sent_total'))}  resent "
                          f"{_count(e.get('resent_total'))}  dropped {_count(e.get('dropped_total'))}  lagged "
                          f"{_count(e.get('lagged_total'))}  buffered {_count(e.get('buffered_events'))}"))
    for (bridge, channel), i in snap.imports.items():
        parts.append(Text(f"  import {channel}: received {_count(i.get('received_total'))}  delivered "
                          f"{_count(i.get('delivered_total'))}  missing {_count(i.get('missing_total'))}  bad "
                          f"{_count(i.get('bad_frames_total'))}"))
    for (bridge, channel, ring), e in snap.shm_exports.items():
        before_e = prev.shm_exports.get((bridge, channel, ring)) if prev is not None else None
        dropped = e.get("dropped_total", 0.0)
        line = Text(f"shm {bridge} writes {channel} -> ring {ring}: written {_count(e.get('written_total'))} "
                    f"({_rate(e, before_e, 'written_total', dt)}/s)  readers {_count(e.get('readers_attached'))}  ")
        line.append(f"dropped {_count(dropped)}", style="red" if dropped else "")
        line.append(f"  lagged {_count(e.get('lagged_total'))}  waits {_count(e.get('blocked_waits_total'))}  "
                    f"readers lost {_count(e.get('readers_lost_total'))}")
        parts.append(line)
    for (bridge, channel, ring), i in snap.shm_imports.items():
        before_i = prev.shm_imports.get((bridge, channel, ring)) if prev is not None else None
        lost = i.get("lagged_total", 0.0) + i.get("dropped_by_writer_total", 0.0)
        line = Text(f"shm {bridge} reads ring {ring} -> {channel}: read {_count(i.get('read_total'))} "
                    f"({_rate(i, before_i, 'read_total', dt)}/s)  delivered {_count(i.get('delivered_total'))}  ")
        line.append(f"lagged {_count(i.get('lagged_total'))}  dropped by writer "
                    f"{_count(i.get('dropped_by_writer_total'))}", style="red" if lost else "")
        line.append(f"  bad {_count(i.get('bad_frames_total'))}  writer ")
        alive = i.get("writer_alive") == 1
        line.append("alive" if alive else "GONE", style="green" if alive else "bold red")
        parts.append(line)
    return Group(*parts)


_STATE_STYLE = {"running": "green", "degraded": "yellow", "failed": "bold red", "stopped": "dim",
                "stopping": "yellow"}


# ---------------------------------------------------------------------------------------------------------------
# the loop


class _Keys:
    """Single key presses from a terminal on stdin (cbreak mode: Ctrl-C still interrupts); none otherwise."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.saved: Any = None

    @contextlib.contextmanager
    def reading(self) -> Iterator[_Keys]:
        try:
            fd = sys.stdin.fileno()
        except (AttributeError, ValueError, OSError):
            fd = -1
        if fd >= 0 and os.isatty(fd):
            import termios
            import tty

            self.fd, self.saved = fd, termios.tcgetattr(fd)
            tty.setcbreak(fd)
        try:
            yield self
        finally:
            if self.fd is not None:
                import termios

                termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
                self.fd = None

    def wait(self, seconds: float) -> str | None:
        """Wait up to ``seconds`` for a key; return it (or None when the time is up)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.fd is None:
                time.sleep(left)
                return None
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 32)
                if not data:  # the terminal went away
                    self.fd = None
                    continue
                for ch in data.decode(errors="ignore"):
                    if ch in "qQ":
                        return "q"
        return None


def _describe(exc: BaseException, timeout: float) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        return getattr(reason, "strerror", None) or str(reason)
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s (--timeout)"
    return str(exc) or type(exc).__name__


def _read(url: str, timeout: float) -> tuple[Snapshot | None, str | None]:
    try:
        return parse(fetch(url, timeout)), None
    except (OSError, ValueError) as exc:  # URLError and HTTPError are OSErrors; ValueError: not the format
        if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, TimeoutError):
            return None, _describe(exc.reason, timeout)
        if isinstance(exc, ValueError) and not isinstance(exc, UnicodeError):
            text = str(exc)
            if text.startswith("the answer is"):  # fetch's own reason (not HTTP, too large)
                return None, text
            return None, f"the answer is not Prometheus text ({exc})"
        return None, _describe(exc, timeout)


def main(args: argparse.Namespace, console: Console | None = None) -> int:
    """Run ``kimiha top``; return the exit status (0 after q, 130 after Ctrl-C, 1 for ``--once`` without an
    answer or with one that is not kimiha's, 2 when the extra is missing)."""
    try:
        _require()
    except ImportError as exc:
        print(f"kimiha top: {exc}", file=sys.stderr)
        return 2
    from rich.console import Console
    from rich.live import Live

    if console is None:
        console = Console()
        if not console.is_terminal and "COLUMNS" not in os.environ:
            console = Console(width=132)  # a pipe or a file: wide enough for both tables
    url, interval = args.url, args.interval
    if args.once:
        snap, error = _read(url, args.timeout)
        if error is not None:
            print(f"kimiha top: {url} does not answer: {error}", file=sys.stderr)
            return 1
        assert snap is not None
        if snap.version is None and not snap.watching and not snap.channels:
            print(f"kimiha top: {url} answers, but is not a kimiha metrics endpoint (no kimiha_build_info "
                  f"sample; started with --metrics-port?)", file=sys.stderr)
            return 1
        console.print(render(url, snap, None, None, time.monotonic(), None, console.width))
        return 0
    prev: Snapshot | None = None
    shown: Snapshot | None = None
    last_ok: float | None = None
    terminal = console.is_terminal
    # On a terminal the view is redrawn in place on the alternate screen (the shell's screen comes back on
    # exit); to a pipe or a file each read is printed after the other.
    live = Live(console=console, screen=True, auto_refresh=False) if terminal else None
    try:
        with _Keys().reading() as keys, live if live is not None else contextlib.nullcontext():
            while True:
                snap, error = _read(url, args.timeout)
                if snap is not None:
                    prev, shown, last_ok = shown, snap, snap.at
                view = render(url, shown, prev, error, last_ok, interval, console.width)
                if live is not None:
                    live.update(view, refresh=True)
                else:
                    console.print(view)
                if keys.wait(interval) == "q":
                    return 0
    except KeyboardInterrupt as exc:  # Ctrl-C (or SIGTERM, which the CLI turns into one): quit, as q does
        return 128 + signal.Signals[getattr(exc, "signame", "SIGINT")].value
