"""Import a NATS subject into a local channel: validate each frame once, keep order, count what went wrong.

Each message's frame goes into the local ring with ``publish_raw``: decoded and validated once against the
channel's payload type, kept as is for anyone who forwards it again. A frame that does not decode is counted
(``bad_frames``, also in the channel's own stats) and skipped; the import keeps flowing.

Sequencing is per sender (sender id and sequence from the ``Kimiha`` header, see :mod:`kimiha.bridge.wire`):

* below the next expected sequence: a duplicate (a JetStream redelivery or resend), dropped and counted;
* above it, core NATS: the events in between were lost on the way; counted in ``missing`` and logged;
* above it, JetStream: held back until the missing ones arrive (a redelivery fills the hole), so handlers
  see the sender's order; only after ``reorder_timeout`` (or ``max_held`` held events) is the hole declared
  lost and counted in ``missing``.

Messages without kimiha headers (a foreign publisher) are validated and published the same way, unsequenced.
JetStream messages are acknowledged once published locally (or found bad or duplicate), never before.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from typing import Any

import msgspec

from kimiha._core import LatencyHistogram, monotonic_ns
from kimiha.bridge.link import NatsLink, _Waiters, wait_until
from kimiha.bridge.wire import HDR_META, Delivery, clock_domain
from kimiha.error import ChannelClosed, ChannelFull, PayloadTypeError, SerializationError
from kimiha.event_bus import EventBus
from kimiha.types import BackgroundTask

__all__ = ["ChannelImporter", "SenderState"]

logger = logging.getLogger("kimiha.bridge")


class SenderState:
    """What an importer knows about one sender: the next sequence it expects, and what went missing."""

    __slots__ = ("delivered", "duplicates", "expected", "first", "held", "held_since", "lost_at_sender",
                 "missing", "same_clock", "sender")

    def __init__(self, sender: str, first_seq: int) -> None:
        self.sender = sender
        self.expected = first_seq
        self.first = first_seq
        self.delivered = 0
        self.duplicates = 0
        self.missing = 0
        self.lost_at_sender = 0
        self.held: dict[int, Any] = {}
        self.held_since = 0.0
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
            "lost_at_sender": self.lost_at_sender,
            "held": len(self.held),
        }


class ChannelImporter(BackgroundTask):
    """Publish the events of a NATS subject into a local channel (role ``bridge-import``).

    Made by :meth:`NatsBridge.import_channel <kimiha.bridge.NatsBridge.import_channel>`, which documents the
    parameters. Messages are handled in nats-py's subscription callback (in arrival order, one at a time);
    ``execute`` only releases held JetStream events whose hole outlived ``reorder_timeout``.
    """

    role = "bridge-import"

    def __init__(self, link: NatsLink, bus: EventBus, event_type: Any, subject: str, *, delivery: Delivery,
                 replay: Any, durable: str | None, reset: bool, stream: str | None, schema: int, ack_wait: float,
                 max_ack_pending: int, reorder_timeout: float, pending_limit: int, name: str) -> None:
        self.name = name
        self._link = link
        self._channel = bus.channel(event_type)
        self.event_type = event_type
        self.type_name = self._channel.name
        self.subject = subject
        self.delivery = delivery
        self.replay = replay
        self.durable = durable
        self.reset = reset
        self.stream = stream
        self.schema = schema
        self.ack_wait = ack_wait
        self.max_ack_pending = max_ack_pending
        self.reorder_timeout = reorder_timeout
        self.max_held = max(2 * max_ack_pending, 1024)
        self.pending_limit = pending_limit
        self._js = delivery is Delivery.JETSTREAM
        self._schema_text = str(schema)
        self._senders: dict[str, SenderState] = {}
        self._nsub: Any = None
        self._stopping = False
        self._lock = asyncio.Lock()
        self._progress = _Waiters()
        self._held_signal = _Waiters()
        self._decoder: Any = None
        self._stamped: bool | None = None  # does publish_raw take the sender's timestamp? (see _publish)
        self._strict_start = False  # expect every sender from sequence 1 (see initialize)
        #: Sender publish -> local publish latency (ns) of events from senders on this machine's clock.
        self.latency = LatencyHistogram()
        # counters
        self.received = 0
        self.delivered = 0
        self.duplicates = 0
        self.missing = 0
        self.gaps = 0
        self.bad_frames = 0
        self.schema_mismatches = 0
        self.foreign = 0
        self.waits = 0
        self.refused_at_shutdown = 0
        self.last_bad: str | None = None
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
            "channel": self.type_name,
            "subject": self.subject,
            "delivery": self.delivery.value,
            "stream": self.stream,
            "durable": self.durable,
            "received": self.received,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "missing": self.missing,
            "gaps": self.gaps,
            "lost_at_senders": self.lost_at_senders,
            "bad_frames": self.bad_frames,
            "schema_mismatches": self.schema_mismatches,
            "foreign": self.foreign,
            "held": sum(len(st.held) for st in self._senders.values()),
            "channel_full_waits": self.waits,
            "refused_at_shutdown": self.refused_at_shutdown,
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
            from nats.js import api
            from nats.js.errors import NotFoundError

            assert self.stream is not None and self.durable is not None
            await link.ensure_stream(self.stream, [self.subject])
            fresh = True
            if self.reset:
                try:
                    await link.js.delete_consumer(self.stream, self.durable)
                except NotFoundError:
                    pass
            else:
                try:
                    await link.js.consumer_info(self.stream, self.durable)
                    fresh = False  # a durable that resumes: senders show up mid-sequence
                except NotFoundError:
                    pass
            # A new consumer replaying everything sees each sender from its first event: one that shows up
            # later in its sequence had its first events lost on the way (a broker crash), and they will be
            # redelivered -- so hold on (up to reorder_timeout) instead of starting that sender there.
            self._strict_start = fresh and (self.replay == "all" or self.replay is None)
            config = api.ConsumerConfig(
                durable_name=self.durable,
                ack_policy=api.AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_ack_pending=self.max_ack_pending,
                filter_subject=self.subject,
                **_deliver_policy(self.replay),
            )
            self._nsub = await link.js.subscribe(
                self.subject, stream=self.stream, durable=self.durable, cb=self._on_msg, manual_ack=True,
                config=config, flow_control=True, idle_heartbeat=5.0, pending_msgs_limit=self.pending_limit,
                pending_bytes_limit=0,
            )
        await nc.flush()  # the server has our interest before anything else happens

    async def execute(self) -> None:
        try:
            await self._expire_held()
        except asyncio.CancelledError:
            # The scheduler cancels background loops first when it shuts down: from now on nothing more is
            # published locally (JetStream events stay unacknowledged), so what local handlers drain is
            # exactly what was imported when shutdown began.
            self._stopping = True
            raise

    async def _expire_held(self) -> None:
        held = [st for st in self._senders.values() if st.held]
        if not held:
            await self._held_signal.wait()
            return
        now = time.monotonic()
        oldest = min(st.held_since for st in held)
        wait = oldest + self.reorder_timeout - now
        if wait > 0:
            await self._held_signal.wait(wait)
            return
        async with self._lock:
            for st in held:
                if st.held and now - st.held_since >= self.reorder_timeout:
                    await self._release(st, force=True)

    async def shutdown(self) -> None:
        """Stop importing. JetStream: events not yet published locally stay unacknowledged (redelivered)."""
        self._stopping = True
        async with self._lock:  # let the event being handled finish
            pass
        held = sum(len(st.held) for st in self._senders.values())
        if held:
            logger.warning("%s: %d held event(s) not published at shutdown (%s)", self.name, held,
                           "unacknowledged, JetStream redelivers them" if self._js else "dropped")
        nc = self._link.nc
        if self._nsub is not None and nc is not None and not nc.is_closed:
            try:
                await self._nsub.unsubscribe()
            except Exception as exc:  # pragma: no cover - best effort at shutdown
                logger.debug("%s: unsubscribe: %r", self.name, exc)

    # -- the message path -------------------------------------------------------------------------------------

    async def _on_msg(self, msg: Any) -> None:
        if self._stopping:
            self.refused_at_shutdown += 1
            return
        async with self._lock:
            await self._handle(msg)

    async def _handle(self, msg: Any) -> None:
        self.received += 1
        headers = msg.headers
        meta = headers.get(HDR_META) if headers else None
        if meta is None:
            self.foreign += 1
            await self._deliver(msg, None, 0)
            return
        try:  # parse_meta, inlined: this runs for every event
            seq_text, ts_text, sender, schema, lost_text, _ = meta.split(";", 5)
            seq = int(seq_text)
            ts = int(ts_text)
            lost = int(lost_text)
        except ValueError:
            self._bad(f"malformed {HDR_META} header {meta!r:.200}")
            await self._ack(msg)
            return
        if schema != self._schema_text:
            self.schema_mismatches += 1
            self._bad(f"schema version {schema!r} from {sender}, expected {self._schema_text!r}")
            await self._ack(msg)
            return
        st = self._senders.get(sender)
        if st is None:
            st = self._senders[sender] = SenderState(sender, 1 if self._strict_start else seq)
        st.lost_at_sender = max(st.lost_at_sender, lost)
        expected = st.expected
        if seq == expected:
            await self._deliver(msg, st, ts)
            st.expected = seq + 1
            if st.held:
                await self._release(st)
        elif seq < expected:
            self.duplicates += 1
            st.duplicates += 1
            await self._ack(msg)
        elif self._js:
            if seq in st.held:
                self.duplicates += 1
                st.duplicates += 1
            elif not st.held:
                st.held_since = time.monotonic()
                self._held_signal.notify()
            st.held[seq] = msg  # acknowledged when published, after the hole is filled
            if len(st.held) > self.max_held:
                await self._release(st, force=True)
        else:
            self._gap(st, seq - expected)
            await self._deliver(msg, st, ts)
            st.expected = seq + 1
        self._progress.notify()

    def _gap(self, st: SenderState, n: int) -> None:
        self.missing += n
        self.gaps += 1
        st.missing += n
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: %d event(s) of %r from %s missing before sequence %d (lost in transit); "
                           "%d missing so far", self.name, n, self.type_name, st.sender, st.expected + n,
                           self.missing)

    async def _release(self, st: SenderState, *, force: bool = False) -> None:
        held = st.held
        while held:
            msg = held.pop(st.expected, None)
            if msg is None:
                if not force:
                    break
                nxt = min(held)
                self._gap(st, nxt - st.expected)
                st.expected = nxt
                continue
            ts = int(msg.headers[HDR_META].split(";", 2)[1])  # parsed once already: well formed
            await self._deliver(msg, st, ts)
            st.expected += 1
        if not held:
            st.held_since = 0.0
        self._progress.notify()

    async def _deliver(self, msg: Any, st: SenderState | None, ts: int) -> None:
        data = msg.data
        if st is None or not st.same_clock:
            ts = 0  # another machine's monotonic clock: not comparable with ours
        try:
            self._publish(data, ts)
        except ChannelFull:
            await self._publish_waiting(data, ts)
        except (SerializationError, PayloadTypeError) as exc:
            self._bad(str(exc))
            await self._ack(msg)
            return
        except ChannelClosed:
            self._stopping = True
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
            self._decoder = msgspec.msgpack.Decoder(ptype) if ptype is not None else msgspec.msgpack.Decoder()
        obj = self._decoder.decode(data)
        await self._channel.publish_async(obj)

    def _bad(self, why: str) -> None:
        self.bad_frames += 1
        self.last_bad = why[:300]
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: skipped a bad frame on %r: %s", self.name, self.subject, why[:300])

    async def _ack(self, msg: Any) -> None:
        if self._js and msg.reply:
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
