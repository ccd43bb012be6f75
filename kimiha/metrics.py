"""Prometheus metrics of a running engine: ``serve(bus, scheduler, port)`` serves ``/metrics``.

Needs the ``metrics`` extra (``pip install 'kimiha[metrics]'``, ``'.[metrics]'`` in a checkout: prometheus-client).

Nothing here runs per event. A custom collector reads the counters the compiled core and the scheduler keep
anyway (channel counters, the C latency histograms, the task registry, the bridges' tasks: NATS, and shared
memory per ring) when a scraper asks. While the watched event loop runs, that loop accepts and answers the
scrape between two of its callbacks (a consistent snapshot, no other thread taking the GIL from it); before and
after, the server's own thread answers. What a scrape costs the dispatch loop is measured in ``benchmarks/README.md``.

Names follow the Prometheus conventions: prefix ``kimiha_``, counters end in ``_total``, times are in seconds,
event counts in events. The latency histograms are the C histograms' buckets (about 1.6 % wide) folded into
fixed Prometheus buckets: a value is counted in the first bucket whose bound is at or above the top of its fine
bucket, so a bucket's count is never more than the values truly at or below its bound. The exact quantiles
(to the fine buckets' precision) are exported beside them as gauges.
"""

from __future__ import annotations

import asyncio
import functools
import math
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from kimiha._core import LatencyHistogram

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from kimiha.event_bus import EventBus
    from kimiha.scheduler import Scheduler

__all__ = ["CONTENT_TYPE", "DEFAULT_PORT", "LATENCY_BUCKETS", "Family", "KimihaCollector", "MetricsServer",
           "histogram_buckets", "render_text", "require_client", "serve"]

#: What the server answers: the Prometheus text format 0.0.4, which every Prometheus version reads.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: The port of ``--metrics-port`` examples (Prometheus' exporter registry has no entry for it).
DEFAULT_PORT = 9464

#: Upper bounds (seconds) of the exported latency histograms' buckets, 1-2.5-5 per decade from 1 us to 10 s.
LATENCY_BUCKETS: tuple[float, ...] = tuple(
    m * 10.0 ** e for e in range(-6, 1) for m in (1.0, 2.5, 5.0)
) + (10.0,)

#: Quantiles exported exactly from the C histograms (``1`` is the maximum), with their label text.
QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)
QUANTILE_LABELS = tuple((q, f"{q:g}") for q in QUANTILES)

_EXTRA_HINT = ("kimiha.metrics needs prometheus-client: pip install 'kimiha[metrics]' ('.[metrics]' in a "
               "checkout)")


def require_client() -> None:
    """Raise ``ImportError`` naming the ``metrics`` extra if prometheus-client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:
        raise ImportError(f"{_EXTRA_HINT}; import failed: {exc}") from exc


def histogram_buckets(hist: LatencyHistogram,
                      bounds: Iterable[float] = LATENCY_BUCKETS) -> tuple[list[tuple[str, int]], float, int]:
    """Fold ``hist``'s fine buckets into Prometheus buckets.

    Returns
    -------
    (buckets, sum_seconds, count)
        ``buckets`` as ``[(le, cumulative count), ..., ("+Inf", count)]`` with ``le`` in seconds; ``count`` is
        the total of the fine buckets read (one snapshot), ``sum_seconds`` the mean times that count.
    """
    fine = hist.buckets()  # one C call: a consistent snapshot of every bucket
    mean_ns = hist.mean
    out: list[tuple[str, int]] = []
    cumulative = 0
    i = 0
    for le, bound_ns in _bounds(tuple(bounds)):
        while i < len(fine) and fine[i][0] <= bound_ns:
            cumulative += fine[i][1]
            i += 1
        out.append((le, cumulative))
    count = cumulative + sum(c for _, c in fine[i:])
    out.append(("+Inf", count))
    return out, mean_ns * count / 1e9, count


@functools.lru_cache(maxsize=8)
def _bounds(bounds: tuple[float, ...]) -> tuple[tuple[str, int], ...]:
    return tuple((repr(float(f"{b:.6g}")), round(b * 1e9)) for b in bounds)


# ---------------------------------------------------------------------------------------------------------------
# What a scrape holds: plain families of samples, written as text by the server or handed to prometheus-client.

_Labels = tuple[tuple[str, str], ...]


class Family:
    """One metric family of a scrape: ``name`` (without the ``_total`` / ``_info`` of counters and infos),
    Prometheus ``kind``, ``help``, and ``samples`` as ``(sample name, labels, value)``."""

    __slots__ = ("help", "kind", "name", "samples")

    def __init__(self, name: str, kind: str, help: str) -> None:  # noqa: A002 - Prometheus' word
        self.name = name
        self.kind = kind
        self.help = help
        self.samples: list[tuple[str, _Labels, float]] = []

    @property
    def sample_name(self) -> str:
        """The name of a plain sample of this family (``x_total`` for a counter ``x``)."""
        return self.name + {"counter": "_total", "info": "_info"}.get(self.kind, "")

    def add(self, labels: _Labels, value: float) -> None:
        self.samples.append((self.sample_name, labels, value))

    def add_histogram(self, labels: _Labels, hist: LatencyHistogram) -> None:
        buckets, total, count = histogram_buckets(hist)
        bucket = self.name + "_bucket"
        for le, c in buckets:
            self.samples.append((bucket, (*labels, ("le", le)), c))
        self.samples.append((self.name + "_count", labels, count))
        self.samples.append((self.name + "_sum", labels, total))


class KimihaCollector:
    """What a scrape reads: one bus and (optionally) its scheduler, everything read at scrape time.

    ``watch`` sets what it reads, so a server can listen before the engine it reports on is built. It is also a
    prometheus-client collector (``collect()``): an application that runs its own prometheus-client registry can
    ``registry.register(KimihaCollector(bus, scheduler))`` instead of starting :class:`MetricsServer`.
    """

    def __init__(self, bus: EventBus | None = None, scheduler: Scheduler | None = None) -> None:
        self._lock = threading.Lock()
        self._bus = bus
        self._scheduler = scheduler

    @property
    def bus(self) -> EventBus | None:
        """The bus reported on (None before :meth:`watch`)."""
        return self._bus

    def watch(self, bus: EventBus | None, scheduler: Scheduler | None = None) -> None:
        """Report on ``bus`` and ``scheduler`` from the next scrape on."""
        with self._lock:
            self._bus = bus
            self._scheduler = scheduler

    def families(self) -> list[Family]:
        """Read everything now; return the families of one scrape."""
        import kimiha

        with self._lock:
            bus, scheduler = self._bus, self._scheduler
        info = Family("kimiha_build", "info", "kimiha's version")
        info.add((("version", kimiha.__version__),), 1)
        watched = Family("kimiha_watched", "gauge", "1 once the endpoint reports on a bus (0 before)")
        watched.add((), 1 if bus is not None else 0)
        out = [info, watched]
        if bus is not None:
            out += _channel_metrics(bus)
        if scheduler is not None:
            out += _scheduler_metrics(scheduler)
            out += _bridge_metrics(scheduler)
        return out

    def describe(self) -> list[Metric]:
        # An empty description: the registry then takes the metric names from collect() at registration,
        # which runs here before any bus is watched; every name is unique to this collector anyway.
        return []

    def collect(self) -> Iterator[Metric]:
        """The families as prometheus-client metrics (the ``Collector`` interface)."""
        from prometheus_client.metrics_core import Metric

        for family in self.families():
            metric = Metric(family.name, family.help, family.kind)
            for name, labels, value in family.samples:
                metric.add_sample(name, dict(labels), float(value))
            yield metric


_LABEL_TEXT: dict[_Labels, str] = {}


def _label_text(labels: _Labels) -> str:
    text = _LABEL_TEXT.get(labels)
    if text is None:
        if len(_LABEL_TEXT) > 50_000:  # label sets come from channel and task names: a handful, but bounded
            _LABEL_TEXT.clear()
        inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
        text = _LABEL_TEXT[labels] = "{" + inner + "}"
    return text


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if type(value) is int:
        return str(value)
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def render_text(families: Iterable[Family]) -> str:
    """Write ``families`` in the Prometheus text format 0.0.4 (what ``prometheus_client.parser`` reads).

    Written here rather than through prometheus-client's ``generate_latest``, which validates and escapes
    every sample again on each scrape: measured, that made a scrape of the demo's engine about three times the
    CPU, all of it taken from the dispatch loop (benchmarks/README.md).
    """
    out: list[str] = []
    for f in families:
        text_name = f.sample_name if f.kind in ("counter", "info") else f.name
        kind = "gauge" if f.kind == "info" else f.kind
        out.append(f"# HELP {text_name} {_escape_help(f.help)}\n# TYPE {text_name} {kind}\n")
        for name, labels, value in f.samples:
            out.append(f"{name}{_label_text(labels) if labels else ''} {_number(value)}\n")
    return "".join(out)


def _families(prefix: str, specs: Iterable[tuple[str, str, str]]) -> dict[str, Family]:
    out: dict[str, Family] = {}
    for key, kind, doc in specs:
        out[key] = Family(f"{prefix}_{key.removesuffix('_total')}", kind, doc)
    return out


_CHANNEL_COUNTERS = (
    ("published", "published_total", "events published on the channel"),
    ("delivered", "delivered_total", "events delivered to its subscribers (one per subscriber)"),
    ("lagged", "lagged_total", "events subscribers missed (LAG channels: overwritten before they read them)"),
    ("blocked", "blocked_total", "times a publisher waited for room (BLOCK channels)"),
    ("full", "full_total", "publishes refused with ChannelFull (BLOCK channels)"),
    ("bad_frames", "bad_frames_total", "raw frames refused as undecodable (counted and skipped)"),
    ("encode_errors", "encode_errors_total", "payloads refused because a frames subscriber could not encode them"),
    ("handler_errors", "handler_errors_total", "exceptions raised by the channel's handlers"),
    ("dropped_on_close", "dropped_on_close_total", "thread-safe publishes still pending when the bus closed"),
    ("unread_on_close", "unread_on_close_total", "events subscriptions left unread when they were closed"),
    ("inline_deferred", "inline_deferred_total",
     "times an INLINE channel handed its delivery over to the loop (nesting depth or dispatch budget reached)"),
)
_CHANNEL_GAUGES = (
    ("backlog", "backlog_events", "largest backlog of a live subscriber now"),
    ("high_water_mark", "high_water_mark_events", "largest backlog ever seen"),
    ("capacity", "capacity_events", "ring size"),
    ("subscribers", "subscribers", "live subscriptions"),
)




def _channel_metrics(bus: EventBus) -> list[Family]:
    fams = _families("kimiha_channel", [(name, "counter", doc) for _, name, doc in _CHANNEL_COUNTERS]
                     + [(name, "gauge", doc) for _, name, doc in _CHANNEL_GAUGES])
    latency = Family("kimiha_channel_latency_seconds", "histogram", "publish -> handler latency of the channel's events")
    quantiles = Family("kimiha_channel_latency_quantile_seconds", "gauge",
                       "publish -> handler latency quantile since start (1 = maximum)")
    for ch in bus._all_channels():
        labels = (("channel", ch.name),)
        # stats() is one C call: the counters of one channel come from the same moment
        s = ch.stats()
        for key, metric, _ in _CHANNEL_COUNTERS:
            fams[metric].add(labels, s[key])
        for key, metric, _ in _CHANNEL_GAUGES:
            fams[metric].add(labels, s[key])
        hist = ch.latency
        latency.add_histogram(labels, hist)
        _add_quantiles(quantiles, labels, hist)
    return [*fams.values(), latency, quantiles]


def _add_quantiles(family: Family, labels: _Labels, hist: LatencyHistogram) -> None:
    empty = hist.count == 0  # no sample: no quantile (NaN, Prometheus' convention), not a latency of 0
    for q, text in QUANTILE_LABELS:
        value = math.nan if empty else (hist.max if q >= 1.0 else hist.percentile(q * 100.0)) / 1e9
        family.add((*labels, ("quantile", text)), value)


_TASK_COUNTERS = (
    ("events_handled", "handled_total", "events the task handled"),
    ("executions", "executions_total", "execute() calls of a background task"),
    ("errors", "errors_total", "failures of the task (each one counted, logged rate-limited)"),
    ("restarts", "restarts_total", "restarts by the task's supervision"),
    ("lagged", "lagged_total", "events the task missed on LAG channels"),
)




def _scheduler_metrics(scheduler: Scheduler) -> list[Family]:
    from kimiha.scheduling.registry import SchedulerState, TaskState

    state = Family("kimiha_scheduler_state", "gauge", "1 for the scheduler's current state, 0 for the others")
    for st in SchedulerState:
        state.add((("scheduler", scheduler.name), ("state", st.value)), 1 if scheduler.state is st else 0)
    fams = _families("kimiha_task", [(name, "counter", doc) for _, name, doc in _TASK_COUNTERS])
    task_state = Family("kimiha_task_state", "gauge", "1 for the task's current state, 0 for the others")
    quantiles = Family("kimiha_task_latency_quantile_seconds", "gauge",
                       "time in the task's handler or execute() (when measured), quantile since start")
    seen: set[tuple[str, str]] = set()
    for info in scheduler.registry:
        snap = _task_snapshot(info)
        name, role = info.name, str(info.role)
        if (name, role) in seen:  # names need not be unique (two instances of one class): one series each
            name = f"{name}#{info.id}"
        seen.add((name, role))
        labels = (("task", name), ("role", role))
        for field, metric, _ in _TASK_COUNTERS:
            fams[metric].add(labels, snap[field])
        for task_st in TaskState:
            task_state.add((*labels, ("state", task_st.value)), 1 if info.state is task_st else 0)
        hist = info.handler_latency()
        if hist.count:
            _add_quantiles(quantiles, labels, hist)
    return [state, *fams.values(), task_state, quantiles]


def _task_snapshot(info: Any) -> dict[str, int]:
    return {"events_handled": info.handled(), "executions": info.executions, "errors": info.errors,
            "restarts": info.restarts, "lagged": info.lagged}


_LINK_COUNTERS = (
    ("connects", "connects_total", "connections made"),
    ("reconnects", "reconnects_total", "reconnections after a loss"),
    ("disconnects", "disconnects_total", "connections lost"),
    ("seconds_down", "down_seconds_total", "time spent disconnected"),
    ("slow_consumers", "slow_consumers_total", "NATS slow-consumer events (messages dropped by the client)"),
    ("async_errors", "errors_total", "errors reported by the NATS client"),
    ("out_msgs", "messages_sent_total", "NATS messages sent"),
    ("in_msgs", "messages_received_total", "NATS messages received"),
)
_EXPORT_COUNTERS = (
    ("sent", "sent_total", "events sent (the last sequence number)"),
    ("acked", "acked_total", "events JetStream acknowledged"),
    ("resent", "resent_total", "events sent again after a reconnect or a refusal"),
    ("dropped", "dropped_total", "events dropped from a full buffer (DROP_OLDEST)"),
    ("lagged", "lagged_total", "events overwritten in the channel before export (lost)"),
    ("nacks", "nacks_total", "refusals from JetStream"),
    ("errors", "errors_total", "publish errors"),
)
_EXPORT_GAUGES = (
    ("buffered", "buffered_events", "events waiting in the outgoing buffer"),
    ("in_flight", "in_flight_events", "events sent, not yet acknowledged"),
    ("buffer_high_water", "buffer_high_water_mark_events", "largest outgoing buffer seen"),
    ("unflushed", "unflushed_events", "events not flushed at shutdown"),
)
_IMPORT_COUNTERS = (
    ("received", "received_total", "messages received"),
    ("delivered", "delivered_total", "events published into the channel"),
    ("duplicates", "duplicates_total", "duplicates dropped"),
    ("missing", "missing_total", "events lost in transit (sequence gaps)"),
    ("gaps", "gaps_total", "sequence gaps seen"),
    ("late", "late_total", "events that arrived out of order"),
    ("suspect", "suspect_total", "events dropped as implausible sequences"),
    ("bad_frames", "bad_frames_total", "undecodable frames (counted and skipped)"),
    ("schema_mismatches", "schema_mismatches_total", "frames of another schema"),
    ("channel_full_waits", "channel_full_waits_total", "waits for room in a BLOCK channel"),
)




_SHM_EXPORT_COUNTERS = (
    ("sent", "written_total", "frames written into the shared-memory ring"),
    ("dropped", "dropped_total", "events dropped as larger than the ring's largest frame (holes its readers count)"),
    ("lagged", "lagged_total", "events overwritten in the local channel before export (lost)"),
    ("blocked_waits", "blocked_waits_total", "waits for room in a full BLOCK ring"),
    ("readers_lost", "readers_lost_total", "dead readers detached from the ring"),
    ("wakeups_sent", "wakeups_total", "wake-ups written to sleeping readers"),
)
_SHM_EXPORT_GAUGES = (
    ("readers", "readers_attached", "readers attached to the ring now"),
    ("head", "head_events", "the ring's position: frames and holes written by every writer so far"),
    ("buffered", "buffered_events", "events taken from the channel, not yet in the ring"),
    ("unflushed", "unflushed_events", "events not written at shutdown"),
)
_SHM_IMPORT_COUNTERS = (
    ("received", "read_total", "frames read from the shared-memory ring"),
    ("delivered", "delivered_total", "events published into the local channel"),
    ("missing", "lagged_total", "frames overwritten in a LAG ring before this reader read them (lost)"),
    ("dropped_by_writer", "dropped_by_writer_total", "holes: events the writer dropped as too large for the ring"),
    ("bad_frames", "bad_frames_total", "undecodable frames (counted and skipped)"),
    ("channel_full_waits", "channel_full_waits_total", "waits for room in a BLOCK local channel"),
)
_SHM_IMPORT_GAUGES = (
    ("position", "position_events", "ring position accounted for (delivered, bad, lagged or holes)"),
    ("writer_alive", "writer_alive", "1 while the ring's writer process lives"),
)


def _shm_metrics(exports: list[Any], imports: list[Any]) -> list[Family]:
    """The shared-memory transport's series, per ring (labels bridge, channel, ring = the subject)."""
    exp = _families("kimiha_shm_export", [(m, "counter", d) for _, m, d in _SHM_EXPORT_COUNTERS]
                    + [(m, "gauge", d) for _, m, d in _SHM_EXPORT_GAUGES])
    for e in exports:
        s = e.stats()
        labels: _Labels = (("bridge", e.bridge), ("channel", e.type_name), ("ring", e.subject))
        for field, metric, _ in _SHM_EXPORT_COUNTERS + _SHM_EXPORT_GAUGES:
            exp[metric].add(labels, s[field])
    imp = _families("kimiha_shm_import", [(m, "counter", d) for _, m, d in _SHM_IMPORT_COUNTERS]
                    + [(m, "gauge", d) for _, m, d in _SHM_IMPORT_GAUGES])
    latency = Family("kimiha_shm_import_latency_seconds", "histogram",
                     "writer-side publish -> local publish latency of events read from the ring")
    for i in imports:
        s = i.stats()
        labels = (("bridge", i.bridge), ("channel", i.type_name), ("ring", i.subject))
        for field, metric, _ in _SHM_IMPORT_COUNTERS + _SHM_IMPORT_GAUGES:
            imp[metric].add(labels, int(s[field]))
        latency.add_histogram(labels, i.latency)
    return [*exp.values(), *imp.values(), latency]


def _bridge_metrics(scheduler: Scheduler) -> list[Family]:
    from kimiha.bridge.exporter import ChannelExporter
    from kimiha.bridge.importer import ChannelImporter
    from kimiha.bridge.link import NatsLink
    from kimiha.bridge.shm import ShmExporter, ShmImporter

    links, exports, imports, shm_exports, shm_imports = [], [], [], [], []
    for info in scheduler.registry:
        task = info.task
        if isinstance(task, NatsLink):
            links.append(task)
        elif isinstance(task, ChannelExporter):
            exports.append(task)
        elif isinstance(task, ChannelImporter):
            imports.append(task)
        elif isinstance(task, ShmExporter):
            shm_exports.append(task)
        elif isinstance(task, ShmImporter):
            shm_imports.append(task)
    shm = _shm_metrics(shm_exports, shm_imports) if shm_exports or shm_imports else []
    if not (links or exports or imports):
        return shm
    link_fams = _families("kimiha_bridge_link", [(m, "counter", d) for _, m, d in _LINK_COUNTERS])
    up = Family("kimiha_bridge_link_up", "gauge", "1 while the NATS link is up")
    for link in links:
        s = link.stats()
        link_labels: _Labels = (("bridge", link.name),)
        up.add(link_labels, 1 if s["up"] else 0)
        for key, metric, _ in _LINK_COUNTERS:
            link_fams[metric].add(link_labels, s[key] or 0)
    exp = _families("kimiha_bridge_export", [(m, "counter", d) for _, m, d in _EXPORT_COUNTERS]
                    + [(m, "gauge", d) for _, m, d in _EXPORT_GAUGES])
    for e in exports:
        s = e.stats()
        labels = (("bridge", e._link.name), ("channel", e.type_name))
        for field, metric, _ in _EXPORT_COUNTERS + _EXPORT_GAUGES:
            if s[field] is not None:  # acked: JetStream only
                exp[metric].add(labels, s[field])
    imp = _families("kimiha_bridge_import", [(m, "counter", d) for _, m, d in _IMPORT_COUNTERS])
    latency = Family("kimiha_bridge_import_latency_seconds", "histogram",
                     "sender publish -> local publish latency of imported events")
    for i in imports:
        s = i.stats()
        labels = (("bridge", i._link.name), ("channel", i.type_name))
        for field, metric, _ in _IMPORT_COUNTERS:
            imp[metric].add(labels, s[field])
        latency.add_histogram(labels, i.latency)
    return [up, *link_fams.values(), *exp.values(), *imp.values(), latency, *shm]


#: The longest request head read (a scrape's is a few hundred bytes).
_HEAD_LIMIT = 16 * 1024
#: How long a client may take to send its request head.
_CLIENT_TIMEOUT = 10.0


def _request_path(head: bytes) -> tuple[str, str] | None:
    """Return (method, path) of an HTTP request head, None if it is not one."""
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    return parts[0], parts[1].split("?", 1)[0]


def _http(status: str, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    return (f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n").encode("latin-1") + body


class MetricsServer:
    """An HTTP endpoint for ``/metrics``; ``close()`` (or ``with``) stops it.

    While the event loop it watches runs (the loop running when :meth:`watch` was called), that loop serves:
    it accepts, reads the request, renders the scrape between two of its callbacks (every counter of one scrape
    from the same instant) and answers. A scrape then costs the loop its render and a few I/O callbacks, and no
    other thread takes the GIL from it: measured, a server thread trading the GIL with a busy dispatch loop
    cost it far more than the render itself. Before and after the loop runs (the CLI's ``--metrics-linger``),
    a thread of the server answers instead, looking twice a second whether the loop runs.

    The HTTP is the least a scraper needs (``GET /metrics``, ``Connection: close``), written here: the
    standard library's servers and prometheus-client's answer from a thread.

    Parameters
    ----------
    port : int
        TCP port; 0 picks a free one (read it back from :attr:`port`).
    host : str
        Address to bind: loopback by default, so nothing is exposed beyond the machine unless asked.
    process : bool
        Also export prometheus-client's ``process_*`` metrics (CPU, memory, file descriptors).
    """

    def __init__(self, port: int = DEFAULT_PORT, host: str = "127.0.0.1", *, process: bool = True) -> None:
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            from kimiha.error import InvalidConfigurationError

            raise InvalidConfigurationError(f"metrics port: expected an int between 0 and 65535, got {port!r}")
        require_client()
        from prometheus_client import CollectorRegistry
        from prometheus_client.process_collector import ProcessCollector

        self.host = host
        self.collector = KimihaCollector()
        self._process: CollectorRegistry | None = None
        if process:
            self._process = CollectorRegistry(auto_describe=False)
            ProcessCollector(registry=self._process)
        self._requested_port = port
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_sock: socket.socket | None = None  # the listening socket as the loop reads it (non-blocking)
        self._handlers: set[asyncio.Task[None]] = set()
        #: Scrapes answered on the loop, and by the server's thread (no loop running).
        self.scrapes_on_loop = 0
        self.scrapes_in_thread = 0
        #: Seconds the loop spent answering scrapes (what scraping took from it, besides its wake-ups).
        self.loop_seconds = 0.0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    def start(self) -> MetricsServer:
        """Listen and serve; raise ``OSError`` naming the address when it cannot listen (e.g. port in use)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._requested_port))
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot serve metrics on {self.host}:{self._requested_port}: "
                                     f"{exc.strerror or exc}") from exc
        sock.settimeout(0.5)  # the accept loop looks at the stop flag twice a second
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name=f"kimiha-metrics:{self.port}", daemon=True)
        self._thread.start()
        return self

    def watch(self, bus: EventBus | None, scheduler: Scheduler | None = None) -> MetricsServer:
        """Report on ``bus`` and ``scheduler`` from the next scrape on; called from a running loop, that loop
        serves while it runs. Return self."""
        self.collector.watch(bus, scheduler)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return self
        if self._sock is not None and loop is not self._loop:
            self._stop_loop_serving()
            self._loop_sock = self._sock.dup()
            self._loop_sock.setblocking(False)
            loop.add_reader(self._loop_sock.fileno(), self._accept_on_loop)
            self._loop = loop
        return self

    def _loop_serves(self) -> bool:
        loop = self._loop
        return loop is not None and loop.is_running() and not loop.is_closed()

    def _stop_loop_serving(self) -> None:
        loop, sock = self._loop, self._loop_sock
        self._loop = self._loop_sock = None
        if loop is not None and sock is not None and not loop.is_closed():
            try:
                if asyncio.get_running_loop() is loop:
                    loop.remove_reader(sock.fileno())
            except RuntimeError:  # another thread: the loop forgets the reader when it closes
                pass
        if sock is not None:
            sock.close()

    def close(self) -> None:
        """Stop serving and wait for the server's thread (idempotent)."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None
        self._stop_loop_serving()
        sock, self._sock = self._sock, None
        if sock is not None:
            self._requested_port = int(sock.getsockname()[1])
            sock.close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- rendering ----------------------------------------------------------------------------------------------

    def render(self) -> bytes:
        """Return one scrape in the Prometheus text format (what ``GET /metrics`` answers), read now."""
        text = render_text(self.collector.families())
        if self._process is not None:
            from prometheus_client import generate_latest

            text += generate_latest(self._process).decode()
        return text.encode()

    def _response(self, head: bytes) -> bytes:
        request = _request_path(head)
        if request is None:
            return _http("400 Bad Request", b"kimiha metrics: expected an HTTP request\n")
        method, path = request
        if method not in ("GET", "HEAD"):
            return _http("405 Method Not Allowed", b"kimiha metrics: only GET /metrics\n")
        if path not in ("/metrics", "/"):
            return _http("404 Not Found", f"kimiha metrics: no page {path}; the metrics are at /metrics\n".encode())
        try:
            body = self.render()
        except Exception as exc:  # a broken collector answers 500 with the reason, never kills the server
            return _http("500 Internal Server Error", f"kimiha metrics: the scrape failed: {exc!r}\n".encode())
        response = _http("200 OK", body, CONTENT_TYPE)
        return response[: len(response) - len(body)] if method == "HEAD" else response

    # -- the server's thread ------------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            if self._loop_serves():
                self._stopping.wait(0.5)  # the loop accepts; look again in a while
                continue
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. out of file descriptors: try again, without spinning
                continue
            loop = self._loop
            if loop is not None and self._loop_serves():  # accepted just as the loop began to serve
                try:
                    loop.call_soon_threadsafe(self._adopt, conn)
                    continue
                except RuntimeError:  # it closed in between
                    pass
            self._answer_here(conn)

    def _answer_here(self, conn: socket.socket) -> None:
        with conn:
            try:
                # One deadline for the whole request head, not a timeout per recv: a client sending a byte
                # now and then (slowloris) must not hold the thread, and every scrape behind it, for ever.
                deadline = time.monotonic() + _CLIENT_TIMEOUT
                head = b""
                while b"\r\n\r\n" not in head and len(head) < _HEAD_LIMIT:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return
                    conn.settimeout(left)
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    head += chunk
                response = self._response(head)
                self.scrapes_in_thread += 1
                conn.settimeout(max(deadline - time.monotonic(), 0.1))  # sendall: a total limit (Python >= 3.5)
                conn.sendall(response)
            except OSError:
                pass  # the client went away or stalled: nothing to tell it

    # -- on the loop ----------------------------------------------------------------------------------------------

    def _accept_on_loop(self) -> None:
        sock, loop = self._loop_sock, self._loop
        if sock is None or loop is None:
            return
        for _ in range(16):  # what is waiting, then back to the loop's other work
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. out of file descriptors: the next readiness tries again
                return
            self._adopt(conn)

    def _adopt(self, conn: socket.socket) -> None:
        loop = self._loop
        if loop is None:  # stopped serving in between
            conn.close()
            return
        conn.setblocking(False)
        task = loop.create_task(self._answer_on_loop(conn))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _answer_on_loop(self, conn: socket.socket) -> None:
        writer = None
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=_HEAD_LIMIT)
            async with asyncio.timeout(_CLIENT_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            t0 = time.perf_counter()
            response = self._response(head)
            self.loop_seconds += time.perf_counter() - t0
            self.scrapes_on_loop += 1
            writer.write(response)
            async with asyncio.timeout(_CLIENT_TIMEOUT):
                await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client went away, stalled, or sent no request: nothing to tell it
        finally:
            if writer is not None:
                writer.close()
            else:
                conn.close()

    # -- what it is ---------------------------------------------------------------------------------------------

    @property
    def watching(self) -> bool:
        """Whether a bus was given (:meth:`watch`)."""
        return self.collector.bus is not None

    @property
    def port(self) -> int:
        """The port it listens on (the one picked when asked for 0)."""
        if self._sock is None:
            return self._requested_port
        return int(self._sock.getsockname()[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def __repr__(self) -> str:
        return f"<MetricsServer {self.url}{'' if self._sock is not None else ' (closed)'}>"


def serve(bus: EventBus, scheduler: Scheduler | None = None, port: int = DEFAULT_PORT, *,
          host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``bus``'s and ``scheduler``'s metrics at ``http://host:port/metrics``; return the server.

    One line for an embedding application::

        server = kimiha.metrics.serve(bus, scheduler, 9464)   # ... server.close() at the end

    ``scheduler`` may be an orchestrator's (``engine.scheduler``); without it only the channels are reported.
    Binds to loopback unless ``host`` says otherwise. Raises ``ImportError`` naming the ``metrics`` extra when
    prometheus-client is missing, ``OSError`` naming the address when the port cannot be bound.
    """
    return MetricsServer(port, host).start().watch(bus, scheduler)
