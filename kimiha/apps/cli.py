"""Command line: ``kimiha demo`` (the main job), ``kimiha replay`` (a journal), ``kimiha live`` (live Binance
data, or the local exchange), ``kimiha top`` (a live view of a running engine's metrics) and ``kimiha bench``
(side-by-side benchmarks).

One set of conventions for every mode (see :data:`EXIT_STATUS`): an interrupted run stops cleanly, prints its
summary and exits 128 + the signal's number; a closed stdout (``| head``) ends the run quietly with 141; a
bad option or an unusable ``--data`` file is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import signal
import sys
import threading
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, NoReturn, cast

import kimiha
from kimiha.apps.observe import (
    MetricsUnavailable,
    add_log_options,
    add_metrics_options,
    check_metrics_options,
    close_metrics,
    configure_logs,
    open_metrics,
)
from kimiha.runtime import LOOPS

if TYPE_CHECKING:
    from kimiha.metrics import MetricsServer

__all__ = ["EXIT_STATUS", "Interrupted", "main", "signal_exit_code", "sigterm_as_interrupt"]

EXIT_STATUS = """\
exit status (every mode):
  0      the run completed and its checks passed
  1      the run completed but a check failed (lines not accounted for, a process failed, events lost,
         a bench gate missed, `replay`: a digest that differs from the journal's), or it could not run
         (e.g. the NATS server is unreachable, the --metrics-port is taken)
  2      a bad option, a --data file that cannot be replayed (missing, a directory, unreadable,
         truncated gzip, no line of Binance data, a kimiha journal), or a `replay` PATH that is not a
         journal's first segment (missing, not a journal, corrupt, no market data): one line on stderr,
         nothing was run
  128+N  interrupted by signal N: 130 for SIGINT (Ctrl-C), 143 for SIGTERM; the run still stops
         cleanly (every stage drained, every shutdown hook run) and prints its summary first
         (`bench` names the mode it stopped: its tables need the whole run)
  141    stdout was closed early (e.g. `kimiha demo | head -3`): the output stops there, no traceback
"""

#: Exit status when stdout is closed before everything was written: 128 + SIGPIPE, as a killed writer gives.
EXIT_BROKEN_PIPE = 128 + 13


def signal_exit_code(signame: str | int) -> int:
    """Return the exit status of a run interrupted by ``signame`` (``"SIGINT"`` or a number): 128 + its number."""
    number = signame if isinstance(signame, int) else signal.Signals[signame].value
    return 128 + int(number)


class Interrupted(KeyboardInterrupt):
    """A SIGTERM turned into an exception by :func:`sigterm_as_interrupt`: it unwinds like a Ctrl-C
    (``finally`` blocks and shutdown hooks run); ``signame`` says which signal it was."""

    def __init__(self, signame: str = "SIGTERM") -> None:
        super().__init__(signame)
        self.signame = signame


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Interrupted` instead of killing the process at once, unless
    something else already handles SIGTERM (or this is not the main thread). Code that installs its own
    handlers (the demo's event loop) takes over while they are installed."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number > 0 (real-time factor), got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0 (real-time factor), got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _amount(unit: str, *, zero_ok: bool = False, most: float = math.inf) -> Callable[[str], float]:
    """An argparse type: a finite number of ``unit`` above 0 (or at 0 with ``zero_ok``), at most ``most``."""
    bounds = (f"in [0, {most:g}]" if most != math.inf else ">= 0") if zero_ok else "> 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok) or value > most:
            raise argparse.ArgumentTypeError(f"expected a number of {unit} {bounds}, got {text!r}")
        return value

    return parse


_milliseconds = _amount("milliseconds", zero_ok=True, most=60_000)
_megabytes = _amount("MiB")
_stop_seconds = _amount("seconds", zero_ok=True, most=3600)


def _nats_url(text: str) -> str:
    url = text.strip() if "://" in text else f"nats://{text.strip()}"  # nats-py's own default scheme
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        parts = None
    if parts is None or parts.scheme not in ("nats", "tls", "ws", "wss") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected a NATS server URL like nats://HOST:PORT, got {text!r}")
    return url


class _Parser(argparse.ArgumentParser):
    """argparse's parser with the CLI's usage errors: one line on stderr, ``kimiha CMD: error: ... (see
    --help)``, exit 2 (argparse itself prints the usage block first). Subcommands' parsers are of this class
    too (``add_subparsers`` makes them with the parent's class)."""

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split())  # argparse wraps some messages (choices) over lines
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> tuple[argparse.ArgumentParser, argparse.ArgumentParser]:
    from kimiha.apps.distributed import CONNECT_TIMEOUT, DRAIN_TIMEOUT

    parser = _Parser(prog="kimiha", description="kimiha: low-latency trading orchestration",
                                     epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kimiha {kimiha.__version__}")
    add_log_options(parser)
    # the subcommands' parsers are _Parser too (argparse makes them with the parent's class)
    sub = cast("argparse._SubParsersAction[argparse.ArgumentParser]",
               parser.add_subparsers(dest="command", required=True))
    demo = sub.add_parser(
        "demo",
        help="replay recorded Binance BTCUSDT data through connector -> aggregator -> strategy -> executor",
        description="Replay recorded Binance spot BTCUSDT market data (shipped with kimiha) through the whole "
        "trading pipeline on the in-process bus, then print a summary.",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--speed", type=_speed, default=None,
                      help="replay at the recorded pace times this factor (default: as fast as possible)")
    demo.add_argument("--data", action="append", metavar="PATH",
                      help="a recording in the same wire format, gzipped or not (repeat for several files)")
    demo.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    demo.add_argument("--no-progress", action="store_true", help="do not show the progress bar on stderr")
    demo.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop (default: uvloop)")
    demo.add_argument("--distributed", action="store_true",
                      help="run connector+aggregator, strategy and executor as three processes over NATS")
    demo.add_argument("--nats", metavar="URL", type=_nats_url,
                      help="with --distributed: the NATS server to use (default: start a local nats-server)")
    demo.add_argument("--delivery", choices=("jetstream", "core"), default=None,
                      help="with --distributed: JetStream (default, no loss) or core NATS (lowest latency)")
    demo.add_argument("--transport", choices=("nats", "shm"), default=None,
                      help="with --distributed: NATS (default) or shm (shared-memory rings: this host only, no "
                           "broker)")
    demo.add_argument("--connect-timeout", type=_seconds, default=None, metavar="SECONDS",
                      help=f"with --distributed: how long to wait for the NATS server to accept a connection "
                           f"before giving up (default {CONNECT_TIMEOUT:g})")
    demo.add_argument("--stop-timeout", type=_stop_seconds, default=None, metavar="SECONDS",
                      help=f"with --distributed: at Ctrl-C or SIGTERM, how long the processes get to stop in "
                           f"order (the feed ends its replay, each process hands on everything it received); "
                           f"past it every process stops at once, the summary counting what was not handed on "
                           f"(default {DRAIN_TIMEOUT:g}; 0: stop at once)")
    # -- time: the order latency of the paper executor, and the PnL at several latencies (issue 14) --
    demo.add_argument("--latency", type=_milliseconds, default=0.0, metavar="MS",
                      help="in-process demo only: the paper executor's order latency in milliseconds, 0 to "
                           "60000: an order fills against the book as of its arrival (default 0: as of the "
                           "decision)")
    demo.add_argument("--latency-report", action="store_true",
                      help="in-process demo only: also report the PnL at 0, 1 and 10 ms of order latency "
                           "(shadow executors)")
    demo.add_argument("--journal", metavar="PATH", default=None,
                      help="in-process demo only: record the run's RawMarketData, Orders and Fills frames to a "
                           "journal at PATH (replay it with `kimiha replay PATH`); a journal already at PATH is "
                           "replaced, its segments PATH.1, PATH.2, ... removed")
    demo.add_argument("--journal-fsync", choices=("never", "batch", "always"), default=None,
                      help="with --journal: when the journal is forced to disk (default never: at close only)")
    demo.add_argument("--journal-rotate-mb", type=_megabytes, default=None, metavar="MiB",
                      help="with --journal: start a new segment (PATH.1, PATH.2, ...) before one would pass "
                           "this many MiB (2**20 bytes, the 8-byte segment header included)")
    replay = sub.add_parser(
        "replay", help="replay a journal written by `kimiha demo --journal PATH` and print the demo's summary",
        description="Replay the RawMarketData records of a journal through aggregator -> strategy -> executor "
        "on a simulated clock, as fast as possible; print the demo's summary and digest, and whether the "
        "journal's recorded orders and fills have the same digest.",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    replay.add_argument("path", metavar="PATH", help="the journal (its first segment)")
    replay.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    replay.add_argument("--no-progress", action="store_true", help="do not show the progress bar on stderr")
    replay.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop (default: uvloop)")
    add_log_options(replay, defaults=False)
    add_metrics_options(demo)  # with --distributed: the feed on PORT, the strategy on PORT+1, the executor PORT+2
    add_log_options(demo, defaults=False)
    from kimiha.apps.top import add_top_parser

    add_top_parser(sub)
    _live_parser(sub)
    sub.add_parser("bench", help="side-by-side benchmarks (kimiha vs asyncio.Queue, pyee, NautilusTrader); "
                                 "`kimiha bench help` lists the modes")
    return parser, demo


def _symbol(text: str) -> str:
    value = text.strip().upper()
    if not value.isalnum() or not 2 <= len(value) <= 20:
        raise argparse.ArgumentTypeError(f"expected a Binance symbol such as BTCUSDT, got {text!r}")
    return value


def _base_url(text: str, schemes: tuple[str, str], example: str) -> str:
    url = text.strip()
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port  # raises ValueError for a port that is not a number in 0..65535
    except ValueError:
        port = 0
    if parts.scheme not in schemes or not parts.hostname or port == 0:
        raise argparse.ArgumentTypeError(f"expected a {example} (a port in 1..65535), got {text!r}")
    return url


def _ws_url(text: str) -> str:
    return _base_url(text, ("ws", "wss"), "websocket base URL like wss://HOST[:PORT]")


def _http_url(text: str) -> str:
    return _base_url(text, ("http", "https"), "REST base URL like https://HOST[:PORT]")


def _record_path(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a file to record to, got {text!r}")
    return text


def _live_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    live = sub.add_parser(
        "live",
        help="the trading pipeline on live Binance market data (or the local exchange with --sim)",
        description="Run connector -> aggregator -> strategy -> executor on Binance spot market data: the "
        "combined stream (<ws-url>/stream?streams=...) and the REST depth snapshot (<rest-url>/api/v3/depth), "
        "with Binance's local-book procedure, resyncs and reconnects. --sim runs a local exchange speaking "
        "Binance's protocol on 127.0.0.1 instead, playing the shipped recording. Needs the live extra.",
        epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    live.add_argument("--symbol", action="append", type=_symbol, metavar="S",
                      help="symbol to trade (default BTCUSDT)")
    live.add_argument("--ws-url", type=_ws_url, metavar="URL",
                      help="websocket base URL (default: Binance's public stream; the spot testnet with "
                           "--executor binance)")
    live.add_argument("--rest-url", type=_http_url, metavar="URL",
                      help="REST base URL (default: Binance's public API; the spot testnet with --executor binance)")
    live.add_argument("--sim", action="store_true",
                      help="run against a local exchange on 127.0.0.1 playing the shipped recording")
    live.add_argument("--speed", type=_speed, default=None,
                      help="with --sim: play the recording at its pace times this factor (default 1)")
    live.add_argument("--duration", type=_seconds, default=None, metavar="S",
                      help="stop after S seconds (default: until Ctrl-C, or the end of the --sim recording)")
    live.add_argument("--record", metavar="PATH", type=_record_path,
                      help="record what arrived in the tape format (gzip) for `kimiha demo --data PATH`; an "
                           "existing file is refused unless --overwrite")
    live.add_argument("--overwrite", action="store_true",
                      help="with --record: replace an existing recording (and its rotated files)")
    live.add_argument("--executor", choices=("paper", "binance"), default="paper",
                      help="paper (default) fills against the rebuilt book; binance sends signed orders "
                           "(keys from BINANCE_API_KEY + BINANCE_API_SECRET or BINANCE_PRIVATE_KEY_FILE)")
    live.add_argument("--mainnet", action="store_true",
                      help="with --executor binance: allow Binance's production exchange (real money)")
    live.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    live.add_argument("--no-status", action="store_true", help="do not show the status line on stderr")
    live.add_argument("--loop", choices=LOOPS, default="uvloop", help="event loop (default: uvloop)")
    add_metrics_options(live)  # one --symbol: a scrape reports that symbol's pipeline
    add_log_options(live, defaults=False)
    live.set_defaults(live_parser=live)  # for its own usage errors
    return live


def _run_live(args: argparse.Namespace, live: argparse.ArgumentParser) -> int:
    check_metrics_options(live, args)
    if args.sim and (args.ws_url or args.rest_url):
        live.error("--sim runs its own local exchange: leave out --ws-url / --rest-url, or leave out --sim")
    if bool(args.ws_url) != bool(args.rest_url):
        given, missing = ("--ws-url", "--rest-url") if args.ws_url else ("--rest-url", "--ws-url")
        live.error(f"{given} without {missing}: give both (one server's stream and REST API) or neither "
                   f"(Binance's)")
    if args.overwrite and not args.record:
        live.error("--overwrite applies to --record only")
    if args.record and not args.overwrite:
        from kimiha.venues.binance.recorder import rotated_path

        if os.path.lexists(args.record) or os.path.lexists(rotated_path(args.record, 1)):
            live.error(f"--record {args.record}: the file exists; give --overwrite to replace it, or another "
                       f"path")
    symbols = []
    for symbol in args.symbol or ["BTCUSDT"]:
        if symbol in symbols:
            live.error(f"--symbol {symbol} given twice (symbols are not case-sensitive)")
        symbols.append(symbol)
    args.symbol = symbols
    if args.speed is not None and not args.sim:
        live.error("--speed applies to --sim only (a live stream comes at its own pace)")
    if args.mainnet and args.executor != "binance":
        live.error("--mainnet applies to --executor binance only (market data needs no permission)")
    if args.metrics_port is not None and len(args.symbol or ["BTCUSDT"]) > 1:
        live.error(f"--metrics-port reports one pipeline, and {len(args.symbol)} symbols run one each: give one "
                   f"--symbol per process to watch each with its own --metrics-port")
    try:
        from kimiha.apps.live import format_live_summary, run_live
        from kimiha.venues.binance.rest import BinanceError
    except ImportError as exc:
        print(f"kimiha live: needs the live extra (pip install 'kimiha[live]'): {exc}", file=sys.stderr)
        return 2
    from kimiha.error import InvalidConfigurationError, OrchestratorError

    try:
        metrics = open_metrics(args)
    except MetricsUnavailable as exc:
        print(f"kimiha live: {exc}", file=sys.stderr)
        return 1
    try:
        summary = kimiha.run(
            run_live(args.symbol, ws_url=args.ws_url, rest_url=args.rest_url, sim=args.sim,
                     speed=args.speed or 1.0, duration=args.duration, record=args.record,
                     executor=args.executor, mainnet=args.mainnet,
                     status=None if args.no_status else sys.stderr, metrics=metrics),
            loop=args.loop,
        )
    except InvalidConfigurationError as exc:
        print(f"kimiha live: {exc}", file=sys.stderr)
        return 2
    except BinanceError as exc:
        print(f"kimiha live: {exc}", file=sys.stderr)
        return 1
    except OrchestratorError as exc:  # e.g. the executor's user data stream refused at its initialize()
        print(f"kimiha live: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # --record into a directory that does not exist, ...
        if exc.filename is None:
            raise
        print(f"kimiha live: cannot write {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        signame = getattr(exc, "signame", "SIGINT")
        print(f"kimiha live: interrupted by {signame} before the run started; nothing to summarize",
              file=sys.stderr)
        return signal_exit_code(signame)
    finally:
        if metrics is not None and not metrics.watching:
            metrics.close()  # no run to linger on
    if summary.get("error"):  # a configuration error found on the way (the signature refused ...)
        print(f"kimiha live: {summary['error']}", file=sys.stderr)
        close_metrics(metrics, args)
        return 1
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_live_summary(summary))
    close_metrics(metrics, args)
    if summary.get("interrupted"):
        return signal_exit_code(summary["interrupted"])
    return 0 if summary["lines_read_accounted"] and summary["ended"] != "failure" else 1


def _quiet_stdout() -> None:
    # Whatever is still buffered for the closed pipe would fail again at exit: send it nowhere instead.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _open_standard_streams() -> None:
    """Give a closed stdin, stdout or stderr (a supervisor's ``>&-``) ``/dev/null`` instead.

    Otherwise the next file the process opens takes fd 0, 1 or 2 (uvloop aborts on that), and Python has no
    ``sys.stdout`` to write the summary to.
    """
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False))  # noqa: SIM115 - lives as long as the process


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``kimiha ARGS`` (``sys.argv[1:]`` by default); return the exit status (see :data:`EXIT_STATUS`)."""
    _open_standard_streams()
    try:
        with sigterm_as_interrupt():
            code = _main(argv)
            sys.stdout.flush()  # a closed stdout shows up here rather than in the interpreter's exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # stdout on a full disk, a dead terminal: one line, not a traceback
        if exc.filename is not None or exc.errno not in (errno.ENOSPC, errno.EIO, errno.EDQUOT):
            raise
        _quiet_stdout()
        print(f"kimiha: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # a signal outside the run's own handling: before it started, or after
        signame = getattr(exc, "signame", "SIGINT")
        print(f"kimiha: interrupted by {signame}", file=sys.stderr)
        return signal_exit_code(signame)


def _main(argv: Sequence[str] | None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["bench"]:
        # everything after `bench` belongs to the benchmark's own parser (modes, --quick, --help, ...)
        from kimiha.bench.main import main as bench_main

        try:
            with sigterm_as_interrupt():
                return bench_main(args_list[1:])
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM: the measurements so far are incomplete, not shown
            signame = getattr(exc, "signame", "SIGINT")
            mode = getattr(exc, "bench_mode", "")
            sys.stderr.write(f"\nkimiha bench{' ' + mode if mode else ''}: interrupted by {signame}; no table "
                             f"(a benchmark's numbers need the whole run)\n")
            return signal_exit_code(signame)
    parser, demo = _parser()
    args = parser.parse_args(args_list)
    configure_logs(args)
    if args.command == "top":
        from kimiha.apps.top import main as top_main

        return top_main(args)
    if args.command == "replay":
        return _replay(args)
    if args.command == "live":
        return _run_live(args, args.live_parser)
    if args.command != "demo":  # pragma: no cover - argparse rejects unknown commands
        return 2
    if args.journal is None:
        for option, value in (("--journal-fsync", args.journal_fsync), ("--journal-rotate-mb", args.journal_rotate_mb)):
            if value is not None:
                demo.error(f"{option} applies with --journal only: add --journal PATH, or leave out {option}")
    if not args.distributed:
        for option, value in (("--nats", args.nats), ("--delivery", args.delivery),
                              ("--connect-timeout", args.connect_timeout), ("--transport", args.transport),
                              ("--stop-timeout", args.stop_timeout)):
            if value is not None:
                why = {"--nats": " (the in-process demo uses no NATS)", "--delivery": " (the in-process demo "
                       "uses no NATS)", "--transport": " (the in-process demo has one process: nothing to "
                       "carry between processes)", "--stop-timeout": " (it bounds the ordered stop of the "
                       "distributed demo's processes)", "--connect-timeout": " (the in-process demo connects "
                       "to nothing)"}[option]
                demo.error(f"{option} applies to the distributed demo only: add --distributed, or leave out "
                           f"{option}{why}")
    elif args.metrics_linger:
        demo.error("--metrics-linger applies to the in-process demo only: each process of the distributed demo "
                   "serves its metrics until it exits")
    elif args.metrics_port is not None and args.metrics_port > 65533:
        demo.error(f"--metrics-port {args.metrics_port}: with --distributed the three processes take PORT, PORT+1 "
                   f"and PORT+2, so PORT must be at most 65533 (or 0 for any free ports)")
    check_metrics_options(demo, args)

    if args.distributed:
        for option, given in (("--latency", args.latency), ("--latency-report", args.latency_report),
                              ("--journal", args.journal)):
            if given:
                demo.error(f"{option} applies to the in-process demo only: leave out --distributed or {option}")
        from kimiha.apps.distributed import main as distributed_main

        return distributed_main(args)

    try:
        metrics = open_metrics(args)
    except MetricsUnavailable as exc:
        print(f"kimiha demo: {exc}", file=sys.stderr)
        return 1
    try:
        return _demo(args, metrics)
    finally:
        close_metrics(metrics, args)


def _demo(args: argparse.Namespace, metrics: MetricsServer | None) -> int:
    from kimiha.apps.demo import RecordingError, format_summary, run_demo
    from kimiha.journal import JournalWriteError

    try:
        summary = kimiha.run(
            run_demo(args.data, speed=args.speed, progress=None if args.no_progress else sys.stderr,
                     latency_ms=args.latency, latency_report=args.latency_report, journal=args.journal,
                     journal_fsync=args.journal_fsync or "never",
                     journal_rotate_bytes=None if args.journal_rotate_mb is None
                     else max(int(args.journal_rotate_mb * (1 << 20)), 1024), metrics=metrics),
            loop=args.loop,
        )
    except RecordingError as exc:
        print(f"kimiha demo: {exc}", file=sys.stderr)
        return 2
    except JournalWriteError as exc:  # the run started, and stopped when its journal could not be written
        print(f"kimiha demo: --journal: {exc}; the run stopped there", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # the signal came before the replay's own handlers were installed
        signame = getattr(exc, "signame", "SIGINT")
        print(f"kimiha demo: interrupted by {signame} before the replay started; nothing to summarize"
              f"{_journal_left(args.journal)}", file=sys.stderr)
        return signal_exit_code(signame)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
    if summary.get("interrupted"):
        return signal_exit_code(summary["interrupted"])
    return 0 if summary["all_lines_accounted"] else 1


def _journal_left(path: str | None) -> str:
    """After an early interrupt: what is at ``--journal PATH`` (the tail of the one-line message)."""
    if path is None:
        return ""
    from kimiha.journal import JournalCorrupt, journal_end

    try:
        if os.path.getsize(path) == 0:
            return f"; the journal {path} is empty"
        end = journal_end(path)
    except (OSError, JournalCorrupt, kimiha.InvalidConfigurationError):
        return f"; the journal {path} is left as it is"
    if end is None:
        return (f"; the journal {path} holds what was recorded before the stop, and no end record "
                f"(`kimiha replay` says the recorded run did not close it)")
    return f"; the journal {path} is left as it is (`kimiha replay {path}` says what it holds)"


def _replay(args: argparse.Namespace) -> int:
    """``kimiha replay PATH``: exit 0 when every line was accounted for and the digest matches the journal's."""
    from kimiha.apps.demo import RecordingError, format_summary, run_replay

    try:
        summary = kimiha.run(run_replay(args.path, progress=None if args.no_progress else sys.stderr),
                             loop=args.loop)
    except RecordingError as exc:
        print(f"kimiha replay: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print(format_summary(summary))
    if summary.get("interrupted"):
        return signal_exit_code(summary["interrupted"])
    return 0 if summary["all_lines_accounted"] and summary["digest_matches_recording"] else 1


if __name__ == "__main__":
    sys.exit(main())
