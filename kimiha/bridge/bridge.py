"""The bridge between one process's event bus and NATS: which channels go out, which come in, and how."""

from __future__ import annotations

import re
import secrets
from typing import Any, cast

from kimiha.bridge.endpoint import BridgeTasks
from kimiha.bridge.exporter import ChannelExporter
from kimiha.bridge.importer import ChannelImporter
from kimiha.bridge.link import Backoff, NatsLink
from kimiha.bridge.wire import BufferPolicy, Delivery, check_subject, stream_name_for
from kimiha.error import InvalidConfigurationError, InvalidStateError
from kimiha.event_bus import EventBus

__all__ = ["NatsBridge"]

#: Seconds after which the server removes a default-named consumer nobody is bound to (its importer is gone
#: for good: a default name is never resumed). A live importer away longer gets its consumer back (see
#: ChannelImporter).
DEFAULT_CONSUMER_INACTIVE_THRESHOLD = 3600.0


def _positive_int(name: str, value: Any, *, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidConfigurationError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _seconds(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidConfigurationError(f"{name}: expected seconds > 0, got {value!r}")
    return float(value)


def _linger(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 0.01:
        raise InvalidConfigurationError(f"{name}: expected seconds in [0, 0.01] (a few hundred us), got {value!r}")
    return float(value)


def _enum(name: str, value: Any, cls: Any) -> Any:
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        options = ", ".join(repr(m.value) for m in cls)
        raise InvalidConfigurationError(f"{name}: expected one of {options}, got {value!r}") from None


class NatsBridge(BridgeTasks):
    """Export local channels to NATS subjects and import subjects into local channels.

    Parameters
    ----------
    bus : EventBus
        The local bus.
    servers : str or list of str
        NATS server URL(s), e.g. ``"nats://127.0.0.1:4222"``.
    name : str
        Names the connection (as the server sees it) and prefixes the bridge's task names.
    connect_timeout : float
        How long the first connection may take (retried with ``backoff``) before start fails.
    backoff : Backoff
        Delays between reconnection attempts.
    flush_timeout : float
        How long each exporter's shutdown may take to send what it still holds.
    token : str, optional
        Authentication token the server requires (:attr:`NatsServer.token <kimiha.bridge.NatsServer.token>`
        for a server started with ``auth=True``).
    user, password : str, optional
        User name and password the server requires, instead of a token.

    Credentials go to nats-py only: they are never part of :meth:`stats`, reprs or log messages.

    The bridge runs as scheduler tasks: a :class:`NatsLink` (the connection), one :class:`ChannelExporter`
    per exported channel and one :class:`ChannelImporter` per imported one. Register them with
    :meth:`register` before the scheduler starts; their counters are in :meth:`stats`.

    Examples
    --------
    >>> bridge = NatsBridge(bus, "nats://127.0.0.1:4222", name="feed")
    >>> bridge.export_channel(Ev.MARKET_DATA, "md", delivery=Delivery.JETSTREAM)
    >>> bridge.import_channel(Ev.ORDERS, "orders")
    >>> bridge.register(scheduler)      # or an orchestrator, before start()
    """

    def __init__(self, bus: EventBus, servers: str | list[str] = "nats://127.0.0.1:4222", *,
                 name: str = "kimiha", connect_timeout: float = 10.0, backoff: Backoff | None = None,
                 flush_timeout: float = 10.0, token: str | None = None, user: str | None = None,
                 password: str | None = None) -> None:
        if not isinstance(bus, EventBus):
            raise InvalidConfigurationError(f"NatsBridge(bus): expected an EventBus, got {type(bus).__name__}")
        urls = [servers] if isinstance(servers, str) else list(servers)
        if not urls or not all(isinstance(u, str) and re.match(r"^(nats|tls|ws|wss)://", u) for u in urls):
            raise InvalidConfigurationError(
                f"NatsBridge(servers): expected nats://host:port URL(s), got {servers!r}"
            )
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise InvalidConfigurationError(
                f"NatsBridge(name): expected letters, digits, '-' or '_', got {name!r}"
            )
        if backoff is not None and not isinstance(backoff, Backoff):
            raise InvalidConfigurationError(f"NatsBridge(backoff): expected a Backoff, got {backoff!r}")
        for what, value in (("token", token), ("user", user), ("password", password)):
            if value is not None and (not isinstance(value, str) or not value):
                # never echo the value: it may be a secret put in the wrong place
                raise InvalidConfigurationError(
                    f"NatsBridge({what}): expected a non-empty str or None, got a {type(value).__name__}")
        if (user is None) != (password is None):
            raise InvalidConfigurationError("NatsBridge(user, password): give both or neither")
        self.bus = bus
        self.name = name
        self.flush_timeout = _seconds("NatsBridge.flush_timeout", flush_timeout)
        self.link = NatsLink(urls, name=f"nats:{name}", client_name=f"kimiha-{name}",
                             connect_timeout=_seconds("NatsBridge.connect_timeout", connect_timeout),
                             backoff=backoff, token=token, user=user, password=password)
        self.exporters: list[ChannelExporter] = []
        self.importers: list[ChannelImporter] = []
        self._registered = False

    # -- configuration ----------------------------------------------------------------------------------------

    def _check_open(self, what: str) -> None:
        if self._registered:
            raise InvalidStateError(f"NatsBridge {self.name!r}: {what} after register(); configure it first")

    def _default_subject(self, event_type: Any) -> str:
        return f"kimiha.{self.bus.channel(event_type).name}"

    def export_channel(self, event_type: Any, subject: str | None = None, *,
                       delivery: Delivery | str = Delivery.CORE, buffer: int = 10_000,
                       when_full: BufferPolicy | str = BufferPolicy.BLOCK, stream: str | None = None,
                       schema: int = 1, max_in_flight: int = 1024, ack_timeout: float = 5.0,
                       batch: int = 256, max_batch_bytes: int = 65536, linger: float = 0.0002
                       ) -> ChannelExporter:
        """Send every event published on ``event_type``'s channel to ``subject`` (default ``kimiha.<name>``).

        Parameters
        ----------
        delivery : Delivery
            ``CORE`` (lowest latency; a loss is seen by receivers as a sequence gap) or ``JETSTREAM``
            (stored in ``stream``; resent until acknowledged).
        buffer : int
            Events held while the broker is unreachable.
        when_full : BufferPolicy
            ``BLOCK`` (stop reading the channel; its publishers wait) or ``DROP_OLDEST`` (counted).
        stream : str, optional
            JetStream stream (created if missing); default ``KIMIHA_<SUBJECT>``.
        schema : int
            Schema version sent in the ``Kimiha`` header; importers check it.
        max_in_flight : int
            JetStream: events sent and not yet acknowledged, at most.
        ack_timeout : float
            JetStream: seconds without an acknowledgement before everything in flight is sent again.
        batch : int
            Events taken from the ring per round (and at most per NATS message).
        max_batch_bytes : int
            Frames ready together travel as one NATS message of at most this many bytes (a batch, see
            :mod:`kimiha.bridge.wire`); 0 sends one frame per message (what importers before 0.3 read).
            JetStream stores a batch as one stream message: an importer's ``replay`` from a stream sequence,
            or ``"last"``, then starts at a batch boundary.
        linger : float
            Seconds (at most 0.01) a busy exporter waits for more frames to join a batch; it never waits when
            the ring is idle, so a lone event leaves at once. 0 never waits.
        """
        self._check_open("export_channel")
        channel = self.bus.channel(event_type)  # unknown channel: InvalidChannelError naming the known ones
        subject = check_subject(subject or self._default_subject(event_type), wildcards=False,
                                what=f"export_channel({channel.name})")
        mode: Delivery = _enum("export_channel.delivery", delivery, Delivery)
        policy: BufferPolicy = _enum("export_channel.when_full", when_full, BufferPolicy)
        if any(e.event_type == event_type for e in self.exporters):
            raise InvalidConfigurationError(f"channel {channel.name!r} is already exported by this bridge")
        if mode is Delivery.JETSTREAM:
            stream = stream or stream_name_for(subject)
            self.link.use_stream(stream, [subject])
        elif stream is not None:
            raise InvalidConfigurationError("export_channel: stream= applies to Delivery.JETSTREAM only")
        exporter = ChannelExporter(
            self.link, self.bus, event_type, subject, delivery=mode,
            buffer=_positive_int("export_channel.buffer", buffer), when_full=policy, stream=stream,
            schema=_positive_int("export_channel.schema", schema, low=0),
            max_in_flight=_positive_int("export_channel.max_in_flight", max_in_flight),
            ack_timeout=_seconds("export_channel.ack_timeout", ack_timeout),
            batch=_positive_int("export_channel.batch", batch), flush_timeout=self.flush_timeout,
            max_batch_bytes=_positive_int("export_channel.max_batch_bytes", max_batch_bytes, low=0),
            linger=_linger("export_channel.linger", linger),
            name=f"nats-export:{channel.name}",
        )
        self.exporters.append(exporter)
        return exporter

    def import_channel(self, event_type: Any, subject: str | None = None, *,
                       delivery: Delivery | str = Delivery.CORE, replay: Any = "all", durable: str | None = None,
                       reset: bool = False, stream: str | None = None, schema: int = 1, ack_wait: float = 5.0,
                       max_ack_pending: int = 4096, reorder_timeout: float | None = None,
                       pending_limit: int = 1_000_000, heartbeat: float = 5.0) -> ChannelImporter:
        """Publish the events arriving on ``subject`` (default ``kimiha.<name>``) into ``event_type``'s channel.

        Parameters
        ----------
        delivery : Delivery
            ``CORE`` or ``JETSTREAM`` (a durable push consumer on ``stream``, explicit acks).
        replay : "all", "new", "last", int or datetime
            JetStream: where a new consumer starts -- every stored event, only new ones, the last one, from
            a stream sequence, or from a time. An existing durable consumer resumes where it stopped.
        durable : str, optional
            JetStream consumer name. Name it to resume where a previous importer stopped (a restart): an
            existing durable resumes, events its previous importer left unacknowledged first, in order; a
            durable another subscriber is bound to is refused. By default each importer gets a consumer of
            its own, ``kimiha-<bridge name>-<channel>-<random>``, never resumed (``replay`` applies each
            time) and removed by the server an hour after its importer went away.
        reset : bool
            JetStream: delete the durable consumer first, so that ``replay`` applies again (refused while
            another subscriber is bound to it).
        schema : int
            Accepted schema version (``Kimiha`` header); events of another version are counted as bad, skipped.
        ack_wait, max_ack_pending : float, int
            JetStream consumer settings: redelivery delay of an unacknowledged event, and how many may be
            unacknowledged at once.
        reorder_timeout : float, optional
            JetStream: how long events after a hole wait for it before it is declared lost
            (default ``3 * ack_wait``).
        pending_limit : int
            Messages nats-py may queue for this subscription; beyond, core NATS drops (a slow consumer).
        heartbeat : float
            JetStream: the consumer's idle heartbeat, in seconds. After three silent intervals (and after
            each reconnection) the importer asks the server for its consumer: one that is gone (the broker
            came back with an empty store, someone deleted it) is created again where the import stopped;
            one that delivers elsewhere (another importer took the durable over) fails the importer.
        """
        self._check_open("import_channel")
        channel = self.bus.channel(event_type)
        mode: Delivery = _enum("import_channel.delivery", delivery, Delivery)
        subject = check_subject(subject or self._default_subject(event_type),
                                wildcards=True, what=f"import_channel({channel.name})")
        if any(i.event_type == event_type and i.subject == subject for i in self.importers):
            raise InvalidConfigurationError(
                f"subject {subject!r} is already imported into channel {channel.name!r} by this bridge")
        ack_wait = _seconds("import_channel.ack_wait", ack_wait)
        same = sum(1 for i in self.importers if i.event_type == event_type)
        inactive_threshold = None
        if mode is Delivery.JETSTREAM:
            from kimiha.bridge.importer import _deliver_policy

            try:
                _deliver_policy(replay)
            except ValueError as exc:
                raise InvalidConfigurationError(f"import_channel({channel.name}): {exc}") from None
            stream = stream or stream_name_for(subject)
            if durable is None:
                # Independent importers (two processes with the default bridge name, say) must never share a
                # consumer: each would take part of the events, and one's reset would delete the other's.
                # A name of our own is never resumed, so let the server remove it once we are gone.
                durable = (f"kimiha-{self.name}-{re.sub(r'[^A-Za-z0-9_-]', '_', channel.name)}-"
                           f"{secrets.token_hex(4)}")
                inactive_threshold = DEFAULT_CONSUMER_INACTIVE_THRESHOLD
            if not isinstance(durable, str) or not re.fullmatch(r"[A-Za-z0-9_-]+", durable):
                raise InvalidConfigurationError(f"import_channel.durable: invalid consumer name {durable!r}")
            self.link.use_stream(stream, [subject])
        else:
            if replay != "all" or durable is not None or reset or stream is not None:
                raise InvalidConfigurationError(
                    f"import_channel({channel.name}): replay/durable/reset/stream apply to Delivery.JETSTREAM "
                    f"only (core NATS delivers what is published while subscribed)")
        importer = ChannelImporter(
            self.link, self.bus, event_type, subject, delivery=mode, replay=replay, durable=durable,
            reset=bool(reset), stream=stream, schema=_positive_int("import_channel.schema", schema, low=0),
            ack_wait=ack_wait, max_ack_pending=_positive_int("import_channel.max_ack_pending", max_ack_pending),
            reorder_timeout=_seconds("import_channel.reorder_timeout", reorder_timeout)
            if reorder_timeout is not None else 3 * ack_wait,
            pending_limit=_positive_int("import_channel.pending_limit", pending_limit),
            name=f"nats-import:{channel.name}" + (f"#{same + 1}" if same else ""),
            heartbeat=_seconds("import_channel.heartbeat", heartbeat),
            inactive_threshold=inactive_threshold,
        )
        self.importers.append(importer)
        return importer

    # -- running ----------------------------------------------------------------------------------------------

    @property
    def tasks(self) -> list[Any]:
        """The bridge's tasks, in registration order: the link, the exporters, the importers."""
        return [self.link, *self.exporters, *self.importers]

    def register(self, target: Any) -> list[int]:
        """Register the bridge's tasks with a :class:`~kimiha.Scheduler` (or a built orchestrator).

        Call it before the scheduler starts. The link is registered first, so it connects before the others
        initialize and closes after every exporter flushed (hooks run in reverse order). Return the task ids.
        """
        return super().register(target)

    def exporter(self, event_type: Any) -> ChannelExporter:
        """Return the exporter of ``event_type``'s channel."""
        return cast(ChannelExporter, super().exporter(event_type))

    def importer(self, event_type: Any) -> ChannelImporter:
        """Return the (first) importer into ``event_type``'s channel."""
        return cast(ChannelImporter, super().importer(event_type))

    def stats(self) -> dict[str, Any]:
        """Return ``{"link": ..., "exports": {channel: ...}, "imports": {channel: ...}}`` (counters only)."""
        return {
            "link": self.link.stats(),
            "exports": {e.type_name: e.stats() for e in self.exporters},
            "imports": {i.name.removeprefix("nats-import:"): i.stats() for i in self.importers},
        }

    def format_stats(self) -> str:
        """Return the bridge's counters as a readable table."""
        link = self.link.stats()
        out = [(f"NATS link {self.name}: {link['state']}, {link['connected_url'] or '-'}; reconnects "
                f"{link['reconnects']}, disconnected {link['seconds_down']:.2f} s, slow consumers "
                f"{link['slow_consumers']}, errors {link['async_errors']}")]
        if self.exporters:
            out.append(f"  {'export':<14} {'delivery':<9} {'sent':>9} {'acked':>9} {'resent':>7} {'dropped':>7} "
                       f"{'lagged':>7} {'buffered':>8} {'unflushed':>9}")
            for e in self.exporters:
                s = e.stats()
                acked = "-" if s["acked"] is None else f"{s['acked']:,}"
                out.append(f"  {s['channel'][:14]:<14} {s['delivery']:<9} {s['sent']:>9,} {acked:>9} "
                           f"{s['resent']:>7} {s['dropped']:>7} {s['lagged']:>7} {s['buffered'] + s['in_flight']:>8} "
                           f"{s['unflushed']:>9}")
        if self.importers:
            out.append(f"  {'import':<14} {'delivery':<9} {'received':>9} {'delivered':>9} {'dupes':>7} "
                       f"{'missing':>7} {'bad':>5} {'p50 us':>8} {'p99 us':>9}")
            for i in self.importers:
                s = i.stats()
                lat = s["latency_ns"]
                out.append(f"  {s['channel'][:14]:<14} {s['delivery']:<9} {s['received']:>9,} {s['delivered']:>9,} "
                           f"{s['duplicates']:>7} {s['missing']:>7} {s['bad_frames']:>5} {lat['p50'] / 1e3:>8.1f} "
                           f"{lat['p99'] / 1e3:>9.1f}")
        return "\n".join(out)

    def __repr__(self) -> str:
        return (f"<NatsBridge {self.name!r} {self.link.state} exports={[e.type_name for e in self.exporters]} "
                f"imports={[i.type_name for i in self.importers]}>")
