"""Import a NATS subject into a local channel: validate each frame once, keep order, count what went wrong.

Each message's frame goes into the local ring with ``publish_raw``: decoded and validated once against the
channel's payload type, kept as is for anyone who forwards it again. A message that cannot be published --
its frame does not decode, its header is malformed or out of range, or ``publish_raw`` raises anything at
all -- is counted (``bad_frames``; frames the ring's decoder rejected also in the channel's own stats) and
skipped (JetStream: acknowledged, so it is not redelivered forever); the import keeps flowing.

Sequencing is per sender (sender id and sequence from the ``Kimiha`` header, see :mod:`kimiha.bridge.wire`):

* the next expected sequence: published;
* above it, core NATS: the events in between were lost on the way; counted in ``missing`` and logged;
* above it, JetStream: held back until the missing ones arrive (a redelivery fills the hole), so handlers
  see the sender's order; only after ``reorder_timeout`` (or ``max_held`` held events) is the hole declared
  lost and counted in ``missing``;
* far above it (more than ``max_jump``): *suspect* -- one forged header must not make every later genuine
  event look like a duplicate. A suspect event is held aside and moves nothing; it is accepted (as a hole, as
  above) only once the :data:`CONFIRM` sequences from it arrive consecutively before the expected one does.
  If the expected sequence shows up first, the suspects are dropped, counted in ``suspect`` and logged;
* below it: a duplicate only if this importer published that sequence itself. A sequence it declared missing
  earlier, or one older than the first it saw from that sender, was never published here: it is delivered
  (late, out of order, counted in ``late``; ``missing`` goes down again). Nothing is acknowledged that was not
  published locally, except bad frames and suspects.

Messages without kimiha headers (a foreign publisher) are validated and published the same way, unsequenced.

A batch (``Kimiha-Batch`` header: frames ``first .. first + count - 1`` in one message) that starts at the
expected sequence of its sender, with nothing held or suspect, is published frame by frame at once (each
frame validated by ``publish_raw`` as above, a bad one counted and skipped in its place) and, with JetStream,
acknowledged once all of it is published. Any other batch (a duplicate, one after a hole, an undecodable one)
is split into its frames, which go through the rules above one by one; the batch is acknowledged when the
last of them is (published, found duplicate or bad), so a held frame keeps its whole batch unacknowledged and
redelivered, and a redelivered batch's frames already published here are dropped as duplicates. An undecodable
batch's places only hold bad frames: a frame arriving in one later is delivered (late), never taken for a
duplicate; and the frames of one batch are one claim for the suspect check (a forged far-off batch does not
confirm itself).

JetStream: the importer manages its push consumer itself. It is acknowledged once published locally (or
found bad or duplicate), never before. A durable that resumes with events its previous importer left
unacknowledged (refused at shutdown, held) first collects their redeliveries, so each sender starts at its
oldest event (see ``_Barrier``). The consumer is checked after each reconnection and whenever it has been
silent for three idle heartbeats: a consumer that is gone (the broker came back with an empty store, someone
deleted it) is created again where the import stopped; one that now delivers elsewhere (another importer
took the durable over) fails the importer loudly.
"""

from __future__ import annotations

import asyncio
import bisect
import datetime as dt
import logging
import time
from typing import Any

import msgspec

from kimiha._core import LatencyHistogram, monotonic_ns
from kimiha.bridge.endpoint import ChannelEndpoint
from kimiha.bridge.link import NatsLink, _Waiters, wait_until
from kimiha.bridge.wire import HDR_BATCH, HDR_META, MAX_BATCH_FRAMES, Delivery, clock_domain, decode_batch
from kimiha.error import (
    ChannelClosed,
    ChannelFull,
    InvalidConfigurationError,
    InvalidStateError,
    OrchestratorError,
    PayloadTypeError,
)
from kimiha.event_bus import EventBus
from kimiha.logs import fields
from kimiha.types import _msgspec_dec_hook

__all__ = ["CONFIRM", "ChannelImporter", "SenderState"]

logger = logging.getLogger("kimiha.bridge")

#: Consecutive sequences, starting at a suspect (far-off) one, that confirm a sender's jump.
CONFIRM = 3
#: Sequences and timestamps travel as int64 (the ring's clock is CLOCK_MONOTONIC nanoseconds).
_INT64 = 1 << 63
#: Ranges of not-yet-published sequences remembered per sender (beyond, the oldest are forgotten).
MAX_HOLES = 1024
#: Stands for the timestamp of an event whose header is out of range: skipped as a bad frame when its turn comes.
_BAD = -1


class _Holes:
    """Sequences of one sender below its expected next that were never published here: declared missing
    (``counted``) or older than the first one seen (not counted). Sorted, disjoint ``[lo, hi, counted]``."""

    __slots__ = ("forgotten", "ranges")

    def __init__(self) -> None:
        self.ranges: list[list[Any]] = []
        self.forgotten = 0

    def add(self, lo: int, hi: int, counted: bool) -> None:
        bisect.insort(self.ranges, [lo, hi, counted])
        if len(self.ranges) > MAX_HOLES:
            lo, hi, _ = self.ranges.pop(0)
            self.forgotten += hi - lo + 1

    def take(self, seq: int) -> bool | None:
        """Remove ``seq``; return whether it was counted missing, or None if it is not in a hole."""
        ranges = self.ranges
        i = bisect.bisect_right(ranges, [seq, _INT64, True]) - 1
        if i < 0:
            return None
        lo, hi, counted = ranges[i]
        if seq > hi:
            return None
        if lo == hi:
            del ranges[i]
        elif seq == lo:
            ranges[i][0] = lo + 1
        elif seq == hi:
            ranges[i][1] = hi - 1
        else:
            ranges[i][1] = seq - 1
            ranges.insert(i + 1, [seq + 1, hi, counted])
        return bool(counted)

    def __len__(self) -> int:
        return sum(hi - lo + 1 for lo, hi, _ in self.ranges)


class SenderState:
    """What an importer knows about one sender: the next sequence it expects, and what went missing."""

    __slots__ = ("delivered", "duplicates", "expected", "first", "held", "held_since", "holes", "late",
                 "lost_at_sender", "missing", "probe", "same_clock", "sender", "suspect", "top")

    def __init__(self, sender: str, first_seq: int) -> None:
        self.sender = sender
        self.expected = first_seq
        #: The oldest sequence accounted for here: below it, nothing was published by this importer.
        self.first = first_seq
        #: The highest sequence accepted (published, or held behind a hole): the plausibility check's base.
        self.top = first_seq - 1
        self.delivered = 0
        self.duplicates = 0
        self.missing = 0
        self.late = 0
        self.suspect = 0
        self.lost_at_sender = 0
        self.held: dict[int, tuple[Any, int]] = {}  # seq -> (message, timestamp)
        self.held_since = 0.0
        self.holes = _Holes()
        #: Far-off consecutive sequences waiting for confirmation: [(seq, message, timestamp, lost)].
        self.probe: list[tuple[int, Any, int, int]] | None = None
        self.same_clock = sender.startswith(clock_domain() + ".")

    @property
    def position(self) -> int:
        """The sender's last sequence accounted for here (published locally, or declared missing)."""
        return self.expected - 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "position": self.expected - 1,
            "first_seq": self.first,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "late": self.late,
            "suspect": self.suspect,
            "unconfirmed": len(self.probe) if self.probe else 0,
            "lost_at_sender": self.lost_at_sender,
            "held": len(self.held),
        }


class _Barrier:
    """A resumed durable's first deliveries, held until the messages its previous importer left
    unacknowledged (``pending``, stream sequences up to ``upto``) have all been redelivered, or ``deadline``.

    The server redelivers those only after their ack wait, while new events flow at once: without the
    barrier, each sender would start at its first *new* event and the redeliveries would look like
    duplicates of it (and be acknowledged unpublished).
    """

    __slots__ = ("deadline", "messages", "old", "pending", "upto", "wait")

    def __init__(self, pending: int, upto: int, wait: float) -> None:
        self.pending = pending
        self.upto = upto
        self.wait = wait
        self.deadline = time.monotonic() + wait
        self.old: set[int] = set()
        self.messages: list[Any] = []

    def add(self, msg: Any) -> bool:
        """Keep ``msg``; return True once every old message came back."""
        self.messages.append(msg)
        sseq = _stream_seq(msg.reply)
        if sseq is not None and sseq <= self.upto:
            self.old.add(sseq)
        return len(self.old) >= self.pending


def _stream_seq(reply: str | None) -> int | None:
    """The stream sequence in a JetStream message's ack subject (v1 and v2 formats), or None."""
    if not reply:
        return None
    tokens = reply.split(".")
    try:
        if len(tokens) == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>
            return int(tokens[5])
        if len(tokens) >= 11:  # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>...
            return int(tokens[7])
    except ValueError:
        pass
    return None


class _Batch:
    """A batch message split into frames: acknowledged once every one of its ``left`` frames is."""

    __slots__ = ("left", "msg")

    def __init__(self, msg: Any, count: int) -> None:
        self.msg = msg
        self.left = count


class _Part:
    """One frame of a split batch, shaped like a single-frame message (its own ``Kimiha`` header)."""

    __slots__ = ("acked", "batch", "data", "headers", "reply", "subject")

    def __init__(self, batch: _Batch, data: bytes, meta: str) -> None:
        self.batch = batch
        self.data = data
        self.headers = {HDR_META: meta}
        self.reply = batch.msg.reply
        self.subject = batch.msg.subject
        self.acked = False


def _origin(msg: Any) -> Any:
    """The NATS message a frame came in: its batch's, for a frame of a split batch."""
    return msg.batch.msg if type(msg) is _Part else msg


def _claims(probe: list[tuple[int, Any, int, int]]) -> int:
    """How many messages the (consecutive) frames of ``probe`` came in."""
    return 1 + sum(1 for a, b in zip(probe, probe[1:]) if _origin(a[1]) is not _origin(b[1]))


def _peek(msg: Any) -> tuple[str, int] | None:
    """(sender, seq) of a well-formed ``Kimiha`` header (a batch: its first sequence), else None."""
    headers = msg.headers
    meta = headers.get(HDR_META) if headers else None
    if meta is None and headers:
        meta = headers.get(HDR_BATCH)
    if not isinstance(meta, str):
        return None
    parts = meta.split(";", 5)
    if len(parts) != 6:
        return None
    try:
        seq = int(parts[0])
    except ValueError:
        return None
    return (parts[2], seq) if 0 < seq < _INT64 and parts[2] else None


class ChannelImporter(ChannelEndpoint):
    """Publish the events of a NATS subject into a local channel (role ``bridge-import``).

    Made by :meth:`NatsBridge.import_channel <kimiha.bridge.NatsBridge.import_channel>`, which documents the
    parameters. Messages are handled in nats-py's subscription callback (in arrival order, one at a time);
    ``execute`` releases held JetStream events whose hole outlived ``reorder_timeout`` and watches the
    consumer.
    """

    role = "bridge-import"

    def __init__(self, link: NatsLink, bus: EventBus, event_type: Any, subject: str, *, delivery: Delivery,
                 replay: Any, durable: str | None, reset: bool, stream: str | None, schema: int, ack_wait: float,
                 max_ack_pending: int, reorder_timeout: float, pending_limit: int, name: str,
                 heartbeat: float = 5.0, inactive_threshold: float | None = None) -> None:
        super().__init__(link, bus, event_type, subject, delivery=delivery, stream=stream, schema=schema,
                         name=name)
        self.replay = replay
        self.durable = durable
        self.reset = reset
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.reorder_timeout = reorder_timeout
        self.max_held = max(2 * max_ack_pending, 1024)
        #: A sequence more than this beyond the expected next is suspect until confirmed (see the module doc).
        self.max_jump = self.max_held
        self.pending_limit = pending_limit
        self.heartbeat = heartbeat
        self.inactive_threshold = inactive_threshold
        self._js = delivery is Delivery.JETSTREAM
        self._schema_text = str(schema)
        self._senders: dict[str, SenderState] = {}
        self._nsub: Any = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self._progress = _Waiters()
        self._wake = _Waiters()
        self._decoder: Any = None
        self._stamped: bool | None = None  # does publish_raw take the sender's timestamp? (see _publish)
        self._strict_start = False  # expect every sender from sequence 1 (see _bind)
        # JetStream consumer
        self._deliver_subject: str | None = None
        self._stream_created: Any = None
        self._idle_heartbeat = heartbeat
        self._last_activity = time.monotonic()
        self._last_reply: str | None = None
        self._resume_from = 1
        self._epoch = 0
        self._barrier: _Barrier | None = None
        #: Sender publish -> local publish latency (ns) of events from senders on this machine's clock.
        self.latency = LatencyHistogram()
        # counters
        self.received = 0
        self.frames = 0
        self.batches = 0
        self.delivered = 0
        self.duplicates = 0
        self.missing = 0
        self.gaps = 0
        self.late = 0
        self.suspect = 0
        self.bad_frames = 0
        self.schema_mismatches = 0
        self.foreign = 0
        self.waits = 0
        self.refused_at_shutdown = 0
        self.consumer_checks = 0
        self.consumer_errors = 0
        self.consumers_recreated = 0
        self.resumed_pending = 0
        self.last_bad: str | None = None
        #: Why the import stopped for good (a JetStream durable taken over), else None.
        self.failed: str | None = None
        self._log_budget = 20

    # -- what other parts read --------------------------------------------------------------------------------

    def senders(self) -> dict[str, SenderState]:
        """Return the state of every sender seen, by sender id."""
        return dict(self._senders)

    def position(self, sender: str) -> int:
        """Return the last sequence of ``sender`` accounted for here (0 if never seen)."""
        st = self._senders.get(sender)
        return 0 if st is None else st.expected - 1

    async def wait_position(self, sender: str, seq: int, timeout: float | None = None) -> bool:
        """Wait until ``sender``'s events up to ``seq`` are accounted for; False if ``timeout`` ran out."""
        return await wait_until(lambda: self.position(sender) >= seq, self._progress, timeout)

    @property
    def lost_at_senders(self) -> int:
        return sum(st.lost_at_sender for st in self._senders.values())

    def stats(self) -> dict[str, Any]:
        """Return the importer's counters, per-sender state and latency summary."""
        return {
            **self._identity(),
            "durable": self.durable,
            "received": self.received,
            "frames": self.frames,
            "batches": self.batches,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "gaps": self.gaps,
            "late": self.late,
            "suspect": self.suspect,
            "lost_at_senders": self.lost_at_senders,
            "bad_frames": self.bad_frames,
            "schema_mismatches": self.schema_mismatches,
            "foreign": self.foreign,
            "held": sum(len(st.held) for st in self._senders.values()),
            "channel_full_waits": self.waits,
            "refused_at_shutdown": self.refused_at_shutdown,
            "resumed_pending": self.resumed_pending,
            "consumer_checks": self.consumer_checks,
            "consumers_recreated": self.consumers_recreated,
            "failed": self.failed,
            "last_bad_frame": self.last_bad,
            "senders": {sid: st.as_dict() for sid, st in self._senders.items()},
            "latency_ns": self.latency.summary(),
        }

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def initialize(self) -> None:
        link = self._link
        nc = link.nc
        if not self._js:
            self._nsub = await nc.subscribe(self.subject, cb=self._on_msg, pending_msgs_limit=self.pending_limit,
                                            pending_bytes_limit=0)
        else:
            await self._bind()
        self._epoch = link.epoch
        self._last_activity = time.monotonic()
        await nc.flush()  # the server has our interest before anything else happens

    async def _bind(self) -> None:
        """Find, reset or create the durable push consumer, then subscribe to its deliver subject."""
        from nats.js.errors import NotFoundError

        link = self._link
        js = link.js
        assert self.stream is not None and self.durable is not None
        where = f"JetStream consumer {self.durable!r} on stream {self.stream!r}"
        await link.ensure_stream(self.stream, [self.subject])
        self._stream_created = (await js.stream_info(self.stream)).created
        info = None
        try:
            info = await js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            pass
        if info is not None and info.push_bound:
            raise InvalidStateError(
                f"{self.name}: {where} is in use by another subscriber "
                + ("(reset=True would delete it under it)" if self.reset else
                   "(two importers on one durable would split its events)")
                + "; give this importer a durable name of its own")
        if info is not None and self.reset:
            await js.delete_consumer(self.stream, self.durable)
            info = None
        fresh = info is None
        if info is not None:
            config = info.config
            if not config.deliver_subject:
                raise InvalidConfigurationError(
                    f"{self.name}: {where} is a pull consumer; expected a push consumer (as kimiha makes them): "
                    f"use another durable name, or reset=True")
            if config.filter_subject and config.filter_subject != self.subject:
                raise InvalidConfigurationError(
                    f"{self.name}: {where} filters subject {config.filter_subject!r}, expected {self.subject!r}: "
                    f"use another durable name, or reset=True")
            self._deliver_subject = config.deliver_subject
            self._idle_heartbeat = config.idle_heartbeat or self.heartbeat
            self._resume_from = (info.ack_floor.stream_seq if info.ack_floor else 0) + 1
            if info.num_ack_pending:
                # The previous importer left these unacknowledged (refused at its shutdown, held): they come
                # back after their ack wait; collect what arrives until then (see _Barrier).
                self.resumed_pending = info.num_ack_pending
                wait = (config.ack_wait or self.ack_wait) + self.reorder_timeout
                self._barrier = _Barrier(info.num_ack_pending, info.delivered.stream_seq if info.delivered else 0,
                                         wait)
        else:
            self._deliver_subject = link.nc.new_inbox()
            info = await self._create_consumer(_deliver_policy(self.replay))
            self._resume_from = (info.delivered.stream_seq if info.delivered else 0) + 1
        # A new consumer replaying everything sees each sender from its first event: one that shows up
        # later in its sequence had its first events lost on the way (a broker crash), and they will be
        # redelivered -- so hold on (up to reorder_timeout) instead of starting that sender there.
        self._strict_start = fresh and (self.replay == "all" or self.replay is None)
        self._nsub = await link.nc.subscribe(self._deliver_subject, cb=self._on_msg,
                                             pending_msgs_limit=self.pending_limit, pending_bytes_limit=0)

    async def _create_consumer(self, policy: dict[str, Any]) -> Any:
        from nats.js import api

        config = api.ConsumerConfig(
            durable_name=self.durable,
            deliver_subject=self._deliver_subject,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.subject,
            flow_control=True,
            idle_heartbeat=self.heartbeat,
            inactive_threshold=self.inactive_threshold,
            **policy,
        )
        self._idle_heartbeat = self.heartbeat
        return await self._link.js.add_consumer(self.stream, config=config)

    async def execute(self) -> None:
        try:
            await self._watch()
        except asyncio.CancelledError:
            # The scheduler cancels background loops first when it shuts down: from now on nothing more is
            # published locally (JetStream events stay unacknowledged), so what local handlers drain is
            # exactly what was imported when shutdown began.
            self._stopping = True
            raise

    async def _watch(self) -> None:
        if self.failed is not None:
            raise InvalidStateError(self.failed)
        link = self._link
        now = time.monotonic()
        wake: list[float] = []
        if self._js and link.up:
            silence = 3 * self._idle_heartbeat  # heartbeats come every idle_heartbeat while nothing else does
            if self._epoch != link.epoch or now - self._last_activity > silence:
                await self._check_consumer()
                return
            wake.append(self._last_activity + silence)
        barrier = self._barrier
        if barrier is not None:
            if now >= barrier.deadline:
                async with self._lock:
                    if self._barrier is barrier:
                        logger.warning("%s: %d of the %d event(s) its durable %r had left unacknowledged came back "
                                       "within %.1f s; importing what arrived", self.name, len(barrier.old),
                                       barrier.pending, self.durable, barrier.wait)
                        await self._lift_barrier()
                return
            wake.append(barrier.deadline)
        held = [st for st in self._senders.values() if st.held]
        if held:
            due = min(st.held_since for st in held) + self.reorder_timeout
            if due <= now:
                async with self._lock:
                    for st in held:
                        if st.held and now - st.held_since >= self.reorder_timeout:
                            await self._release(st, force=True)
                return
            wake.append(due)
        signal = self._wake.arm()
        change = link.changed.arm()
        try:
            await asyncio.wait((signal, change), timeout=max(0.0, min(wake) - now) if wake else None,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._wake.disarm(signal)
            link.changed.disarm(change)

    async def _check_consumer(self) -> None:
        """Ask the server for our consumer: recreate it if gone, fail if someone else took it over."""
        from nats.js.errors import NotFoundError

        link = self._link
        self._epoch = link.epoch
        self._last_activity = time.monotonic()
        self.consumer_checks += 1
        try:
            info = await link.js.consumer_info(self.stream, self.durable)
        except NotFoundError:
            try:
                await self._recreate()
            except Exception as exc:  # JetStream not answering yet (a broker just back): try again soon
                self.consumer_errors += 1
                if self._log_budget > 0:
                    self._log_budget -= 1
                    logger.warning("%s: JetStream consumer %r on stream %r is gone and could not be created "
                                   "again yet: %r; retrying", self.name, self.durable, self.stream, exc)
                self._check_again_in(link.backoff.delay(min(self.consumer_errors, 8)))
            return
        except Exception as exc:  # not answered (the link is going down): checked again soon
            logger.debug("%s: consumer check: %r", self.name, exc)
            self._check_again_in(link.backoff.delay(3))
            return
        deliver = info.config.deliver_subject
        if deliver != self._deliver_subject:
            reason = (f"{self.name}: JetStream consumer {self.durable!r} on stream {self.stream!r} (subject "
                      f"{self.subject!r}) was taken over: it delivers to {deliver!r}, expected "
                      f"{self._deliver_subject!r} (another importer reset or created it again); this import stops "
                      f"-- give each importer a durable name of its own")
            await self._fail(reason)

    async def _recreate(self) -> None:
        from nats.js import api

        link = self._link
        async with self._lock:
            await link.ensure_stream(self.stream, [self.subject])  # type: ignore[arg-type]
            info = await link.js.stream_info(self.stream)
            start = self._resume_point()
            if info.created != self._stream_created or info.state.last_seq < start - 1:
                # another stream under the same name (the broker lost its store, or it was deleted): all of
                # it is new to us; what we already published is recognized by its sender sequence
                self._stream_created = info.created
                why = "the stream was created again"
                policy: dict[str, Any] = {"deliver_policy": api.DeliverPolicy.ALL}
                start = 1
            else:
                why = "the consumer was deleted"
                policy = {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": start}
            await self._create_consumer(policy)
            self._resume_from = start
            self._last_reply = None
            self.consumers_recreated += 1
        logger.warning("%s: JetStream consumer %r on stream %r was gone (%s); created it again from stream "
                       "sequence %d", self.name, self.durable, self.stream, why, start)

    def _check_again_in(self, seconds: float) -> None:
        # the next check is due once the consumer has been silent for 3 heartbeats: pretend it has been,
        # but for `seconds`
        self._last_activity = time.monotonic() - 3 * self._idle_heartbeat + min(seconds, 3 * self._idle_heartbeat)

    def _resume_point(self) -> int:
        """The stream sequence a new consumer must start at so that nothing unacknowledged is skipped."""
        replies = [msg.reply for st in self._senders.values() for msg, _ in st.held.values()]
        replies += [item[1].reply for st in self._senders.values() if st.probe for item in st.probe]
        if self._barrier is not None:
            replies += [msg.reply for msg in self._barrier.messages]
        pending = [s for s in map(_stream_seq, replies) if s is not None]
        if pending:
            return min(pending)
        last = _stream_seq(self._last_reply)
        return max(self._resume_from, last + 1 if last is not None else 1)

    async def _fail(self, reason: str) -> None:
        self.failed = reason
        logger.error("%s", reason)
        nsub, self._nsub = self._nsub, None
        nc = self._link.nc
        if nsub is not None and nc is not None and not nc.is_closed:
            try:
                await nsub.unsubscribe()
            except Exception as exc:  # pragma: no cover - best effort
                logger.debug("%s: unsubscribe: %r", self.name, exc)
        raise InvalidStateError(reason)

    async def shutdown(self) -> None:
        """Stop importing. JetStream: events not yet published locally stay unacknowledged (redelivered)."""
        self._stopping = True
        async with self._lock:  # let the event being handled finish
            pass
        held = sum(len(st.held) for st in self._senders.values())
        unconfirmed = sum(len(st.probe) for st in self._senders.values() if st.probe)
        waiting = len(self._barrier.messages) if self._barrier is not None else 0
        if held or unconfirmed or waiting:
            logger.warning("%s: %d held, %d unconfirmed (suspect) and %d resumed event(s) not published at "
                           "shutdown (%s)", self.name, held, unconfirmed, waiting,
                           "unacknowledged, JetStream redelivers them" if self._js else "dropped")
        nc = self._link.nc
        if self._nsub is not None and nc is not None and not nc.is_closed:
            try:
                await self._nsub.unsubscribe()
            except Exception as exc:  # pragma: no cover - best effort at shutdown
                logger.debug("%s: unsubscribe: %r", self.name, exc)

    # -- the message path -------------------------------------------------------------------------------------

    async def _on_msg(self, msg: Any) -> None:
        if self._js:
            self._last_activity = time.monotonic()
            if not msg.data and msg.headers and msg.headers.get("Status") == "100" and \
                    not (msg.reply or "").startswith("$JS.ACK."):  # (a stored message is never one)
                await self._on_control(msg)
                return
            self._last_reply = msg.reply
        if self._stopping:
            self.refused_at_shutdown += 1
            return
        async with self._lock:
            self.received += 1
            barrier = self._barrier
            if barrier is not None:
                if barrier.add(msg):
                    await self._lift_barrier()
                return
            await self._process(msg)

    async def _on_control(self, msg: Any) -> None:
        # A JetStream idle heartbeat (no reply; may name a stalled flow-control subject) or a flow-control
        # request (answered now: the callback runs in order, everything before it has been handled).
        if self._stopping:
            return  # let the consumer stall: what it would push now would only be refused
        reply = msg.reply or msg.headers.get("Nats-Consumer-Stalled")
        if reply:
            try:
                await self._link.nc.publish(reply)
            except Exception:  # not connected: the server asks again
                pass

    async def _process(self, msg: Any) -> None:
        try:
            await self._sequence(msg)
        except Exception as exc:
            # Never out of the callback (nats-py would only log it; JetStream would redeliver it forever).
            self._bad(f"{type(exc).__name__} while importing a message of {len(msg.data or b'')} bytes on "
                      f"{msg.subject!r} into channel {self.type_name!r}: {exc}")
            await self._ack(msg)
        self._progress.notify()

    async def _lift_barrier(self) -> None:
        """Import what a resumed durable delivered first, each sender from its oldest event."""
        barrier, self._barrier = self._barrier, None
        if barrier is None:
            return
        messages = sorted(barrier.messages, key=lambda m: _stream_seq(m.reply) or 0)
        oldest: dict[str, int] = {}
        for msg in messages:
            peek = _peek(msg)
            if peek is not None and (peek[0] not in oldest or peek[1] < oldest[peek[0]]):
                oldest[peek[0]] = peek[1]
        for sender, seq in oldest.items():
            if sender not in self._senders:
                self._senders[sender] = SenderState(sender, seq)
        for msg in messages:
            await self._process(msg)

    async def _sequence(self, msg: Any) -> None:
        headers = msg.headers
        meta = headers.get(HDR_META) if headers else None
        if meta is None:
            batch = headers.get(HDR_BATCH) if headers else None
            if batch is not None:
                await self._sequence_batch(msg, batch)
                return
            self.frames += 1
            self.foreign += 1
            await self._deliver(msg, None, 0, 0)
            return
        try:  # parse_meta, inlined: this runs for every event
            seq_text, ts_text, sender, schema, lost_text, _ = meta.split(";", 5)
            seq = int(seq_text)
            ts = int(ts_text)
            lost = int(lost_text)
        except ValueError:
            self.frames += 1
            self._bad(f"malformed {HDR_META} header {meta!r:.200} on {msg.subject!r}: expected "
                      f"seq;ts;sender;schema;lost;type")
            await self._ack(msg)
            return
        self.frames += 1
        if not 0 < seq < _INT64 or not sender:
            self._bad(f"{HDR_META} header out of range {meta!r:.200} on {msg.subject!r}: expected a sequence "
                      f"in [1, 2**63) and a sender id")
            await self._ack(msg)
            return
        if not (0 <= ts < _INT64 and 0 <= lost < _INT64):
            # the sender's event, but corrupt: it takes its place in the sequence (no hole), as a bad frame
            ts = _BAD
            lost = 0
        if schema != self._schema_text:
            self.schema_mismatches += 1
            self._bad(f"schema version {schema!r} from {sender} on {msg.subject!r}, expected {self._schema_text!r}")
            await self._ack(msg)
            return
        st = self._senders.get(sender)
        if st is None:
            st = self._senders[sender] = SenderState(sender, 1 if self._strict_start else seq)
        expected = st.expected
        if seq == expected and st.probe is None:  # the common case, inlined (_accept does the same)
            if lost > st.lost_at_sender:
                st.lost_at_sender = lost
            if seq > st.top:
                st.top = seq
            await self._deliver(msg, st, ts, seq)
            st.expected = seq + 1
            if st.held:
                await self._release(st)
        elif seq == expected:
            await self._accept(msg, st, seq, ts, lost)
        elif seq < expected:
            await self._behind(msg, st, seq, ts)
        elif seq - max(expected, st.top + 1) <= self.max_jump:
            await self._accept(msg, st, seq, ts, lost)
        else:
            await self._suspect(msg, st, seq, ts, lost)

    async def _sequence_batch(self, msg: Any, meta: str) -> None:
        """Import a batch: at once when it starts at its sender's expected sequence, else frame by frame."""
        self.batches += 1
        try:
            first_text, count_text, sender, schema, lost_text, type_name = meta.split(";", 5)
            first = int(first_text)
            count = int(count_text)
            lost = int(lost_text)
        except ValueError:
            self.frames += 1
            self._bad(f"malformed {HDR_BATCH} header {meta!r:.200} on {msg.subject!r}: expected "
                      f"first;count;sender;schema;lost;type")
            await self._ack(msg)
            return
        if not (0 < first and 1 <= count <= MAX_BATCH_FRAMES and first + count <= _INT64 and sender
                and 0 <= lost < _INT64):
            self.frames += 1
            self._bad(f"{HDR_BATCH} header out of range {meta!r:.200} on {msg.subject!r}: expected a first "
                      f"sequence in [1, 2**63), a count in [1, {MAX_BATCH_FRAMES}] and a sender id")
            await self._ack(msg)
            return
        try:
            items: list[tuple[int, bytes]] | None = decode_batch(msg.data)
        except ValueError:
            items = None
        if items is not None and len(items) != count:
            items = None
        st = self._senders.get(sender)
        if items is not None and schema == self._schema_text and (st is None or (
                first == st.expected and st.probe is None and not st.held)):
            if st is None:
                st = self._senders[sender] = SenderState(sender, 1 if self._strict_start else first)
            if first == st.expected:
                await self._deliver_batch(msg, st, first, items, lost)
                return
        # the general case, one frame at a time; an undecodable batch is `count` bad frames in their places
        undecodable = items is None
        if items is None:
            items = [(_BAD, b"")] * count
        group = _Batch(msg, count)
        tail = f";{sender};{schema};{lost};{type_name}"
        before = st.expected if st is not None else None
        for i, (ts, data) in enumerate(items):
            await self._sequence(_Part(group, data, f"{first + i};{ts}{tail}"))
        if undecodable:
            st = self._senders.get(sender)
            if st is not None:
                # the places it took were only claimed, by a header nobody can check: a frame that arrives
                # there later is delivered (late), not dropped as a duplicate of nothing
                lo = max(first, before if before is not None else st.first)
                hi = min(first + count, st.expected) - 1
                if lo <= hi:
                    st.holes.add(lo, hi, False)
            why = (f"undecodable {HDR_BATCH} payload of {len(msg.data or b'')} bytes on {msg.subject!r} (header "
                   f"{meta!r:.200}): expected a msgpack array of {count} [timestamp, frame] pairs; its {count} "
                   f"frame(s) counted as bad in their places")
            self.last_bad = why[:300]
            if self._log_budget > 0:
                self._log_budget -= 1
                logger.warning("%s: %s", self.name, why[:300])

    async def _deliver_batch(self, msg: Any, st: SenderState, first: int, items: list[tuple[int, bytes]],
                             lost: int) -> None:
        """Publish a batch that starts at ``st.expected`` (the common case: the frames' loop, inlined)."""
        n = len(items)
        self.frames += n
        if lost > st.lost_at_sender:
            st.lost_at_sender = lost
        last = first + n - 1
        if last > st.top:
            st.top = last
        same = st.same_clock
        record = self.latency.record
        stamped = self._stamped
        publish_raw = self._channel.publish_raw
        limit = _INT64
        seq = first
        delivered = 0
        try:
            for ts, data in items:
                if not 0 <= ts < limit:
                    self._bad(f"timestamp {ts} of frame {seq} in a {HDR_BATCH} batch from {st.sender} on "
                              f"{msg.subject!r} out of range, expected an integer in [0, 2**63)")
                    seq += 1
                    continue
                if not same:
                    ts = 0  # another machine's monotonic clock: not comparable with ours
                try:
                    try:
                        if stamped:
                            publish_raw(data, ts)
                        else:
                            self._publish(data, ts)
                            stamped = self._stamped
                    except ChannelFull:
                        st.expected = seq  # (what waiting callers see meanwhile)
                        await self._publish_waiting(data, ts)
                except ChannelClosed:
                    # the bus closed under us: the rest of the batch is not published; it stays unacknowledged
                    # (JetStream redelivers all of it to the next importer)
                    self._stopping = True
                    logger.warning("%s: the channel closed in the middle of a batch from %s (%d of %d frames "
                                   "published)", self.name, st.sender, seq - first, n)
                    return
                except Exception as exc:
                    why = str(exc) if isinstance(exc, OrchestratorError) else (
                        f"channel {self.type_name!r} refused a frame of {len(data)} bytes: "
                        f"{type(exc).__name__}: {exc}")
                    self._bad(f"{why} [from {st.sender} (sequence {seq}, in a batch) on {msg.subject!r}]")
                else:
                    delivered += 1
                    if ts:
                        record(monotonic_ns() - ts)
                seq += 1
        finally:
            st.expected = seq
            self.delivered += delivered
            st.delivered += delivered
        if self._js:
            await self._ack(msg)

    async def _accept(self, msg: Any, st: SenderState, seq: int, ts: int, lost: int) -> None:
        """Take a plausible sequence at or ahead of the expected one."""
        if lost > st.lost_at_sender:
            st.lost_at_sender = lost
        if seq > st.top:
            st.top = seq
        if st.probe is not None:  # the sender's own sequence went on: what was far ahead was not from it
            await self._drop_probe(st, seq)
        if seq == st.expected:
            await self._deliver(msg, st, ts, seq)
            st.expected = seq + 1
            if st.held:
                await self._release(st)
        elif self._js:
            if seq in st.held:
                self.duplicates += 1
                st.duplicates += 1
            elif not st.held:
                st.held_since = time.monotonic()
                self._wake.notify()
            st.held[seq] = (msg, ts)  # acknowledged when published, after the hole is filled
            if len(st.held) > self.max_held:
                await self._release(st, force=True)
        else:
            self._gap(st, st.expected, seq - 1)
            await self._deliver(msg, st, ts, seq)
            st.expected = seq + 1

    async def _behind(self, msg: Any, st: SenderState, seq: int, ts: int) -> None:
        """A sequence below the expected one: a duplicate if it was published here, else a late event."""
        if seq < st.first:
            # older than anything seen from this sender (a resumed durable, a replay from a point): never
            # published here
            if seq + 1 < st.first:
                st.holes.add(seq + 1, st.first - 1, False)
            st.first = seq
            counted: bool | None = False
        else:
            counted = st.holes.take(seq)
            if counted is None:
                self.duplicates += 1
                st.duplicates += 1
                await self._ack(msg)
                return
        if counted:
            self.missing -= 1
            st.missing -= 1
        self.late += 1
        st.late += 1
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: event %d of %r from %s arrived after %d (late, delivered out of order); %d "
                           "missing so far", self.name, seq, self.type_name, st.sender, st.expected - 1, self.missing,
                           extra=fields(self.name, self.type_name))
        await self._deliver(msg, st, ts, seq)

    async def _suspect(self, msg: Any, st: SenderState, seq: int, ts: int, lost: int) -> None:
        """A sequence far beyond the expected one: held aside until the next ones confirm it."""
        probe = st.probe
        if probe is not None:
            if seq == probe[-1][0] + 1:
                probe.append((seq, msg, ts, lost))
                # consecutive *messages* confirm: the frames of one batch are one claim, however many
                if len(probe) >= CONFIRM and _origin(msg) is not _origin(probe[-2][1]) and _claims(probe) >= CONFIRM:
                    st.probe = None
                    logger.warning("%s: sender %s of %r jumped from sequence %d to %d (confirmed by %d in a row)",
                                   self.name, st.sender, self.type_name, st.expected, probe[0][0], CONFIRM)
                    for item in probe:
                        await self._accept(item[1], st, item[0], item[2], item[3])
                return
            for i, item in enumerate(probe):
                if item[0] == seq:  # a redelivery of a suspect event
                    probe[i] = (seq, msg, ts, lost)
                    return
            await self._drop_probe(st, seq)
        st.probe = [(seq, msg, ts, lost)]

    async def _drop_probe(self, st: SenderState, seq: int) -> None:
        probe, st.probe = st.probe, None
        if not probe:
            return
        self.suspect += len(probe)
        st.suspect += len(probe)
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: dropped %d event(s) claiming to be from %s on %r with implausible sequence(s) "
                           "%d..%d: expected %d to %d, and a jump beyond must be confirmed by %d in a row "
                           "(sequence %d came instead); forged or corrupt", self.name, len(probe), st.sender,
                           self.subject, probe[0][0], probe[-1][0], st.expected,
                           max(st.expected, st.top + 1) + self.max_jump, CONFIRM, seq)
        for item in probe:
            await self._ack(item[1])

    def _gap(self, st: SenderState, lo: int, hi: int) -> None:
        n = hi - lo + 1
        if n <= 0:
            return
        self.missing += n
        self.gaps += 1
        st.missing += n
        st.holes.add(lo, hi, True)
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: %d event(s) of %r from %s missing before sequence %d (lost in transit); "
                           "%d missing so far", self.name, n, self.type_name, st.sender, hi + 1, self.missing,
                           extra=fields(self.name, self.type_name))

    async def _release(self, st: SenderState, *, force: bool = False) -> None:
        held = st.held
        while held:
            item = held.pop(st.expected, None)
            if item is None:
                if not force:
                    break
                nxt = min(held)
                self._gap(st, st.expected, nxt - 1)
                st.expected = nxt
                continue
            await self._deliver(item[0], st, item[1], st.expected)
            st.expected += 1
        if not held:
            st.held_since = 0.0
        self._progress.notify()

    async def _deliver(self, msg: Any, st: SenderState | None, ts: int, seq: int) -> None:
        data = msg.data
        if ts == _BAD:
            self._bad(f"{HDR_META} header {msg.headers[HDR_META]!r:.200} on {msg.subject!r}: timestamp or lost "
                      f"count out of range, expected integers in [0, 2**63)")
            await self._ack(msg)
            return
        if st is None or not st.same_clock:
            ts = 0  # another machine's monotonic clock: not comparable with ours
        try:
            try:
                self._publish(data, ts)
            except ChannelFull:
                await self._publish_waiting(data, ts)
        except ChannelClosed:
            self._stopping = True
            return
        except Exception as exc:
            # Whatever publish_raw raises on a frame -- a decode error, RecursionError on deep nesting, or
            # anything else -- the frame is bad: counted, skipped, acknowledged.
            origin = f"from {st.sender} (sequence {seq})" if st is not None else "from a foreign publisher"
            why = str(exc) if isinstance(exc, OrchestratorError) else (
                f"channel {self.type_name!r} refused a frame of {len(data)} bytes: {type(exc).__name__}: {exc}")
            self._bad(f"{why} [{origin} on {msg.subject!r}]")
            await self._ack(msg)
            return
        self.delivered += 1
        if st is not None:
            st.delivered += 1
            if ts:
                self.latency.record(monotonic_ns() - ts)
        if self._js:
            await self._ack(msg)

    def _publish(self, data: bytes, ts: int) -> None:
        # A core that lets publish_raw take the sender's publish time makes the channel's latency histogram
        # cross-process publish -> handler; older cores take the frame only (the importer's own histogram
        # then measures sender publish -> local publish).
        channel: Any = self._channel
        if self._stamped:
            channel.publish_raw(data, ts)
            return
        if self._stamped is None and ts:
            try:
                channel.publish_raw(data, ts)
                self._stamped = True
                return
            except PayloadTypeError:
                raise
            except TypeError:
                self._stamped = False
        channel.publish_raw(data)

    async def _publish_waiting(self, data: bytes, ts: int) -> None:
        # The ring is full: wait for room. With a core that has publish_raw_async the frame is kept in the
        # slot; otherwise this slow path decodes it itself and waits in publish_async (the slot then keeps no
        # frame: a re-export would encode it again).
        self.waits += 1
        channel: Any = self._channel
        if hasattr(channel, "publish_raw_async"):
            await channel.publish_raw_async(data, ts)
            return
        if self._decoder is None:
            ptype = self._channel.payload_type
            self._decoder = (msgspec.msgpack.Decoder(ptype, dec_hook=_msgspec_dec_hook) if ptype is not None
                             else msgspec.msgpack.Decoder())
        obj = self._decoder.decode(data)
        await self._channel.publish_async(obj)

    def _bad(self, why: str) -> None:
        self.bad_frames += 1
        self.last_bad = why[:300]
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: skipped a bad frame on %r: %s", self.name, self.subject, why[:300],
                           extra=fields(self.name, self.type_name))

    async def _ack(self, msg: Any) -> None:
        if not self._js:
            return
        if type(msg) is _Part:  # a frame of a split batch: the batch goes once all of its frames went
            if msg.acked:
                return
            msg.acked = True
            group = msg.batch
            group.left -= 1
            if group.left:
                return
            msg = group.msg
        if msg.reply:
            try:
                await self._link.nc.publish(msg.reply)
            except Exception:  # not connected: JetStream redelivers, and the duplicate is dropped here
                pass


def _deliver_policy(replay: Any) -> dict[str, Any]:
    """Map ``replay`` ("all", "new", "last", a stream sequence, or a datetime) to consumer settings."""
    from nats.js import api

    if replay == "all" or replay is None:
        return {"deliver_policy": api.DeliverPolicy.ALL}
    if replay == "new":
        return {"deliver_policy": api.DeliverPolicy.NEW}
    if replay == "last":
        return {"deliver_policy": api.DeliverPolicy.LAST}
    if isinstance(replay, int) and not isinstance(replay, bool) and replay >= 1:
        return {"deliver_policy": api.DeliverPolicy.BY_START_SEQUENCE, "opt_start_seq": replay}
    if isinstance(replay, dt.datetime):
        when = replay if replay.tzinfo is not None else replay.replace(tzinfo=dt.timezone.utc)
        return {"deliver_policy": api.DeliverPolicy.BY_START_TIME, "opt_start_time": when}
    raise ValueError(
        f"replay: expected 'all', 'new', 'last', a stream sequence >= 1 or a datetime, got {replay!r}"
    )
