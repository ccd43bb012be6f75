"""What the CLI's commands share for observability: ``--metrics-port`` and its server, ``--log-format``.

A command adds the options with :func:`add_metrics_options` / :func:`add_log_options`, opens the server with
:func:`open_metrics` before it runs (a port in use or a missing extra is one line, before anything starts), hands
it the engine with ``server.watch(bus, scheduler)``, and ends with :func:`close_metrics` after its summary.
"""

from __future__ import annotations

import argparse
import errno
import logging
import re
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, TextIO

from kimiha.logs import FORMATS, configure, json_handler

if TYPE_CHECKING:
    from kimiha.metrics import MetricsServer

__all__ = ["MetricsUnavailable", "add_log_options", "add_metrics_options", "check_metrics_options", "close_metrics",
           "configure_logs", "open_metrics", "probe_metrics_ports", "say"]

_LEVELS = ("debug", "info", "warning", "error", "critical")


def say(text: str, stream: TextIO | None = sys.stderr, **extra: Any) -> None:
    """Show a status line of a command (``metrics: serving URL``, ``started nats-server ...``).

    As a line on ``stream`` (None: nowhere), or, when ``--log-format json`` configured logging, as an INFO
    record of ``kimiha.apps`` through that handler whatever ``--log-level`` says (status lines show at any
    level, as in text): stderr stays one JSON object per line. ``extra`` adds fields to the JSON record.
    """
    handler = json_handler()
    if handler is None:
        if stream is not None:
            print(text, file=stream, flush=True)
        return
    frame = sys._getframe(1)
    record = logging.getLogger("kimiha.apps").makeRecord(
        "kimiha.apps", logging.INFO, frame.f_code.co_filename, frame.f_lineno, "%s", (text,), None,
        frame.f_code.co_name)
    record._kimiha_fields = extra  # may be named like a LogRecord attribute (``process``)
    handler.handle(record)


class MetricsUnavailable(Exception):
    """``--metrics-port`` cannot be served (prometheus-client missing, the port taken); the message says why."""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a TCP port number 0-65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"expected a TCP port number 0-65535, got {text!r}")
    return value


def _linger(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


#: A host the metrics server may bind: a name or an IPv4 address, or an IPv6 address (brackets are taken off).
_HOST = re.compile(r"[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*(%[A-Za-z0-9_.-]+)?")
_DEFAULT_HOST = "127.0.0.1"


def _host(text: str) -> str:
    host = text.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not _HOST.fullmatch(host):
        raise argparse.ArgumentTypeError(f"expected a host name or an IP address to bind (e.g. 127.0.0.1 or ::1), "
                                         f"got {text!r}")
    return host


def add_metrics_options(parser: argparse.ArgumentParser, *, linger: bool = True) -> None:
    """Add ``--metrics-port``, ``--metrics-host`` (and ``--metrics-linger``) to a command's parser."""
    parser.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics while the run lasts "
                             "(needs the metrics extra); 0 picks a free port")
    parser.add_argument("--metrics-host", type=_host, default=None, metavar="HOST",
                        help="address the metrics server binds (default 127.0.0.1: this machine only; "
                             "needs --metrics-port)")
    if linger:
        parser.add_argument("--metrics-linger", type=_linger, default=None, metavar="SECONDS",
                            help="keep serving the final metrics this long after the summary, for a last "
                                 "scrape (default 0; needs --metrics-port; Ctrl-C ends it with exit 130)")


def check_metrics_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse (``parser.error``: exit 2) ``--metrics-host`` or ``--metrics-linger`` without ``--metrics-port``:
    they would be silently ignored."""
    if getattr(args, "metrics_port", None) is not None:
        return
    for option, value in (("--metrics-host", getattr(args, "metrics_host", None)),
                          ("--metrics-linger", getattr(args, "metrics_linger", None))):
        if value is not None:
            parser.error(f"{option} applies with --metrics-port only: add --metrics-port PORT, or leave out "
                         f"{option}")


def add_log_options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """Add ``--log-format`` and ``--log-level``; ``defaults=False`` for a subcommand under a parser that has them
    (then a value given after the subcommand wins, and one given before it is kept)."""
    parser.add_argument("--log-format", choices=FORMATS, default="text" if defaults else argparse.SUPPRESS,
                        help="log lines on stderr: text (default) or json (one object per line, with the task "
                             "and channel as fields)")
    parser.add_argument("--log-level", type=str.lower, choices=_LEVELS,
                        default="warning" if defaults else argparse.SUPPRESS,
                        help="least severe log level shown (default warning; any case)")


def configure_logs(args: argparse.Namespace, *, prefix: str = "", static: dict[str, Any] | None = None) -> None:
    """Configure the process's logging from ``--log-format`` / ``--log-level`` (the CLI owns the process)."""
    configure(getattr(args, "log_format", "text"), getattr(args, "log_level", "warning").upper(), prefix=prefix,
              static=static)


def open_metrics(args: argparse.Namespace, *, announce: TextIO | None = sys.stderr) -> MetricsServer | None:
    """Start the metrics server ``--metrics-port`` asks for (None without the option).

    Raises :class:`MetricsUnavailable` when prometheus-client is missing or the port cannot be bound.
    """
    port = getattr(args, "metrics_port", None)
    if port is None:
        return None
    from kimiha.metrics import MetricsServer

    host = getattr(args, "metrics_host", None) or _DEFAULT_HOST
    try:
        server = MetricsServer(port, host).start()
    except ImportError as exc:
        raise MetricsUnavailable(f"--metrics-port: {exc}") from None
    except OSError as exc:
        raise MetricsUnavailable(_bind_error(exc, port, host)) from None
    if announce is not None:
        say(f"metrics: serving {server.url}", announce)
    return server


def probe_metrics_ports(args: argparse.Namespace, names: tuple[str, ...]) -> None:
    """Check that ``--metrics-port`` PORT, PORT+1, ... (one per name in ``names``) can be served, before any
    process starts; raise :class:`MetricsUnavailable` with the same line :func:`open_metrics` gives, naming the
    process whose port is taken. Nothing to check without the option or with port 0 (any free port)."""
    port = getattr(args, "metrics_port", None)
    if not port:
        return
    from kimiha.metrics import MetricsServer

    host = getattr(args, "metrics_host", None) or _DEFAULT_HOST
    for offset, name in enumerate(names):
        try:
            MetricsServer(port + offset, host).start().close()
        except ImportError as exc:
            raise MetricsUnavailable(f"--metrics-port: {exc}") from None
        except OSError as exc:
            which = f" (the {name} process's PORT+{offset})" if offset else f" (the {name} process's)"
            raise MetricsUnavailable(_bind_error(exc, port, host) + which) from None


def _bind_error(exc: OSError, port: int, host: str) -> str:
    """The one line for a server that could not listen: the port when it is taken, else the host."""
    cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
    if isinstance(cause, socket.gaierror):
        return f"--metrics-host {host}: not an address of this machine ({cause.strerror or cause})"
    if cause.errno in (errno.EADDRINUSE, errno.EACCES):
        return f"--metrics-port {port}: {exc.strerror or exc}"
    return f"--metrics-host {host}: {exc.strerror or exc}"


def close_metrics(server: MetricsServer | None, args: argparse.Namespace,
                  announce: TextIO | None = sys.stderr) -> None:
    """After the summary: keep serving ``--metrics-linger`` seconds, then stop.

    Ctrl-C (or SIGTERM) during the wait ends it and is raised on, after the server is closed: the command exits
    128+N like any interrupted run (130 for Ctrl-C)."""
    if server is None:
        return
    try:
        linger = float(getattr(args, "metrics_linger", 0.0) or 0.0)
        if linger > 0 and server.watching:  # a run happened (not a bad --data file refused before it)
            sys.stdout.flush()  # the summary first: a reader of stdout knows the values are final
            if announce is not None:
                say(f"metrics: the final values stay at {server.url} for {linger:g} s (Ctrl-C to stop)", announce)
            deadline = time.monotonic() + linger
            while (left := deadline - time.monotonic()) > 0:
                time.sleep(min(left, 0.5))
    finally:
        server.close()
