"""What the CLI's commands share for observability: ``--metrics-port`` and its server, ``--log-format``.

A command adds the options with :func:`add_metrics_options` / :func:`add_log_options`, opens the server with
:func:`open_metrics` before it runs (a port in use or a missing extra is one line, before anything starts), hands
it the engine with ``server.watch(bus, scheduler)``, and ends with :func:`close_metrics` after its summary.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO

from kimiha.logs import FORMATS, configure

if TYPE_CHECKING:
    from kimiha.metrics import MetricsServer

__all__ = ["MetricsUnavailable", "add_log_options", "add_metrics_options", "check_metrics_options", "close_metrics",
           "configure_logs", "open_metrics"]

_LEVELS = ("debug", "info", "warning", "error", "critical")


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


def add_metrics_options(parser: argparse.ArgumentParser, *, linger: bool = True) -> None:
    """Add ``--metrics-port``, ``--metrics-host`` (and ``--metrics-linger``) to a command's parser."""
    parser.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                        help="serve Prometheus metrics at http://HOST:PORT/metrics while the run lasts "
                             "(needs the metrics extra); 0 picks a free port")
    parser.add_argument("--metrics-host", default=None, metavar="HOST",
                        help="with --metrics-port: address the metrics server binds (default 127.0.0.1: this "
                             "machine only)")
    if linger:
        parser.add_argument("--metrics-linger", type=_linger, default=0.0, metavar="SECONDS",
                            help="with --metrics-port: keep serving the final metrics this long after the "
                                 "summary, for a last "
                                 "scrape (default 0; Ctrl-C ends it early)")


def check_metrics_options(args: argparse.Namespace, error: Callable[[str], Any]) -> None:
    """Refuse ``--metrics-host`` / ``--metrics-linger`` without ``--metrics-port`` (``error(message)``, the
    command parser's ``error``), then fill in the host's default."""
    if getattr(args, "metrics_port", None) is None:
        for option, given in (("--metrics-host", getattr(args, "metrics_host", None) is not None),
                              ("--metrics-linger", bool(getattr(args, "metrics_linger", 0.0)))):
            if given:
                error(f"{option} applies with --metrics-port only: add --metrics-port PORT, or leave out {option}")
    if getattr(args, "metrics_host", "") is None:
        args.metrics_host = "127.0.0.1"


def add_log_options(parser: argparse.ArgumentParser, *, defaults: bool = True) -> None:
    """Add ``--log-format`` and ``--log-level``; ``defaults=False`` for a subcommand under a parser that has them
    (then a value given after the subcommand wins, and one given before it is kept)."""
    parser.add_argument("--log-format", choices=FORMATS, default="text" if defaults else argparse.SUPPRESS,
                        help="log lines on stderr: text (default) or json (one object per line, with the task "
                             "and channel as fields)")
    parser.add_argument("--log-level", choices=_LEVELS, default="warning" if defaults else argparse.SUPPRESS,
                        help="least severe log level shown (default warning)")


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

    try:
        server = MetricsServer(port, getattr(args, "metrics_host", None) or "127.0.0.1").start()
    except ImportError as exc:
        raise MetricsUnavailable(f"--metrics-port: {exc}") from None
    except OSError as exc:
        raise MetricsUnavailable(f"--metrics-port {port}: {exc.strerror or exc}") from None
    if announce is not None:
        print(f"metrics: serving {server.url}", file=announce, flush=True)
    return server


def close_metrics(server: MetricsServer | None, args: argparse.Namespace,
                  announce: TextIO | None = sys.stderr) -> None:
    """After the summary: keep serving ``--metrics-linger`` seconds (Ctrl-C ends it early), then stop."""
    if server is None:
        return
    try:
        linger = float(getattr(args, "metrics_linger", 0.0) or 0.0)
        if linger > 0 and server.watching:  # a run happened (not a bad --data file refused before it)
            sys.stdout.flush()  # the summary first: a reader of stdout knows the values are final
            if announce is not None:
                print(f"metrics: the final values stay at {server.url} for {linger:g} s (Ctrl-C to stop)",
                      file=announce, flush=True)
            deadline = time.monotonic() + linger
            try:
                while (left := deadline - time.monotonic()) > 0:
                    time.sleep(min(left, 0.5))
            except KeyboardInterrupt:  # the run is over and reported: ending the wait early is not an error
                logging.getLogger("kimiha.apps").debug("metrics linger ended by an interrupt")
    finally:
        server.close()
