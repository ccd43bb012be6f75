"""Export one local channel to a NATS subject: a background task reading the channel's frames.

The exporter reads the ring through a frames subscription, so each event leaves as the msgpack frame the ring
already holds (encoded at most once, never decoded). Frames go through an outgoing buffer (``outbox``):
while the link is up it only stages a batch; while the broker is away it holds up to ``buffer`` events, and
when full either stops reading the channel (``BufferPolicy.BLOCK``: the channel's publishers wait) or drops
the oldest (``BufferPolicy.DROP_OLDEST``, counted). With JetStream each sent event stays ``in flight`` until
the stream acknowledges it; after a reconnect, a refused publish or an ack timeout, everything in flight is
sent again in order (same ``Nats-Msg-Id``, so the stream drops what it already stored).

Frames ready together leave together: each send packs what the outbox holds into one NATS message (a batch,
see :mod:`kimiha.bridge.wire`) of at most ``max_batch_bytes``. When the ring is busy (the last round found
frames waiting) the exporter lingers up to ``linger`` seconds, yielding to the loop, for more to join; when it
is idle (the frames woke it up) it sends at once, so a lone event is never delayed. A batch takes one
sequence per frame, is acknowledged by JetStream as one message and resent as the same message.

Frames taken from the ring always land in the outbox or in flight before any await, so a cancelled loop loses
nothing: the shutdown hook sends what is left, within ``flush_timeout``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, cast

from kimiha._core import monotonic_ns
from kimiha.bridge.endpoint import ChannelEndpoint
from kimiha.bridge.link import LinkState, NatsLink, _Waiters, wait_until
from kimiha.bridge.wire import (
    HDR_BATCH,
    HDR_META,
    HDR_MSG_ID,
    MAX_BATCH_FRAMES,
    BufferPolicy,
    Delivery,
    encode_batch,
    new_sender_id,
)
from kimiha.error import ChannelClosed
from kimiha.event_bus import EventBus
from kimiha.logs import fields

__all__ = ["ChannelExporter"]

logger = logging.getLogger("kimiha.bridge")

_Frame = tuple[int, int, bytes]  # (ring sequence, publish_ns, frame bytes) from a frames subscription

#: nats-py's MaxPayloadError, bound by the first ``initialize`` (nats-py is imported lazily; an empty tuple
#: in an ``except`` clause catches nothing).
_TOO_LARGE: tuple[type[BaseException], ...] = ()


class ChannelExporter(ChannelEndpoint):
    """Forward every event of a local channel to a NATS subject (role ``bridge-export``).

    Made by :meth:`NatsBridge.export_channel <kimiha.bridge.NatsBridge.export_channel>`, which documents the
    parameters. Counters: :meth:`stats`.
    """

    role = "bridge-export"

    def __init__(self, link: NatsLink, bus: EventBus, event_type: Any, subject: str, *, delivery: Delivery,
                 buffer: int, when_full: BufferPolicy, stream: str | None, schema: int, max_in_flight: int,
                 ack_timeout: float, batch: int, flush_timeout: float, name: str, max_batch_bytes: int = 65536,
                 linger: float = 0.0002) -> None:
        super().__init__(link, bus, event_type, subject, delivery=delivery, stream=stream, schema=schema,
                         name=name)
        self.buffer = buffer
        self.when_full = when_full
        self.max_in_flight = max_in_flight
        self.ack_timeout = ack_timeout
        self.batch = batch
        self.flush_timeout = flush_timeout
        self.drain_timeout = flush_timeout  # the scheduler's drain waits no longer than this for its readers
        self._flush_by: float | None = None  # (loop time) set when the stop's drain begins: see drain_started
        #: Bytes of frames one NATS message may carry (0: one frame per message, the format before batches).
        self.max_batch_bytes = max_batch_bytes
        #: Seconds a busy exporter waits for more frames to join a batch (0: never waits).
        self.linger = linger
        self._linger_ns = int(linger * 1e9)
        self._max_bytes = max_batch_bytes
        self._busy = False
        self._inflight_events = 0
        self.sender = new_sender_id()
        self._js = delivery is Delivery.JETSTREAM
        self._drop = when_full is BufferPolicy.DROP_OLDEST
        self._tail_lost = 0
        self._tail = f";{self.sender};{schema};0;{self.type_name}"
        self._outbox: collections.deque[_Frame] = collections.deque()
        # first seq -> [payload, headers, last sent (monotonic s), frames]: one entry per NATS message
        self._inflight: dict[int, list[Any]] = {}
        self._sub: Any = None
        self._ack_sub: Any = None
        self._ack_prefix = ""
        self._seq = 0
        self._epoch = 0
        self._resync = False
        self._retry_at = 0.0
        self._nack_streak = 0
        self._stopping = False
        self._progress = _Waiters()
        # counters
        self.taken = 0
        self.acked = 0
        self.resent = 0
        self.dropped = 0
        self.lagged = 0
        self.nacks = 0
        self.stream_duplicates = 0
        self.errors = 0
        self.unflushed = 0
        self.high_water = 0
        self.messages = 0
        self.batches = 0
        self._log_budget = 20

    # -- what other parts read --------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Sequence of the last event sent (0 before the first)."""
        return self._seq

    @property
    def lost(self) -> int:
        """Events that never left: skipped by a lagging ring read, or dropped from a full buffer."""
        return self.lagged + self.dropped

    @property
    def pending(self) -> int:
        """Events not yet handed to NATS (buffered), plus JetStream events not yet acknowledged."""
        return len(self._outbox) + self._inflight_events

    def stats(self) -> dict[str, Any]:
        """Return the exporter's counters (``sent`` is the last sequence number sent)."""
        return {
            **self._identity(),
            "sender": self.sender,
            "sent": self._seq,
            "acked": self.acked if self._js else None,
            "in_flight": self._inflight_events,
            "buffered": len(self._outbox),
            "buffer": self.buffer,
            "when_full": self.when_full.value,
            "buffer_high_water": self.high_water,
            "resent": self.resent,
            "dropped": self.dropped,
            "lagged": self.lagged,
            "nacks": self.nacks,
            "stream_duplicates": self.stream_duplicates,
            "errors": self.errors,
            "unflushed": self.unflushed,
            "messages": self.messages,
            "batches": self.batches,
            "max_batch_bytes": self.max_batch_bytes,
            "linger_us": round(self.linger * 1e6, 1),
        }

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def initialize(self) -> None:
        global _TOO_LARGE
        from nats.errors import MaxPayloadError

        _TOO_LARGE = (MaxPayloadError,)
        self._sub = self._channel.subscribe(frames=True, on_lag=self._on_lag)
        if self._js:
            assert self.stream is not None
            await self._link.ensure_stream(self.stream, [self.subject])
            nc = self._link.nc
            self._ack_prefix = nc.new_inbox() + "."
            self._ack_sub = await nc.subscribe(self._ack_prefix + "*", cb=self._on_ack)
        self._epoch = self._link.epoch
        # a batch must fit the server's max payload (1 MB by default), with room for the pairs' framing
        max_payload = getattr(self._link.nc, "max_payload", 0) or 1 << 20
        self._max_bytes = min(self.max_batch_bytes, max(0, max_payload - 4096))

    async def execute(self) -> None:
        link = self._link
        if not link.up:
            await self._while_down()
            return
        if self._js:
            if self._epoch != link.epoch:
                self._epoch = link.epoch
                if self._inflight:  # reconnected: what the stream did not acknowledge goes again, in order
                    self._resync = True
            if self._inflight and not self._resync:
                oldest = self._inflight[next(iter(self._inflight))]
                if time.monotonic() - oldest[2] > self.ack_timeout:
                    self._resync = True
            if self._resync:
                delay = self._retry_at - time.monotonic()
                if delay > 0:
                    await self._wait_change(delay)
                else:
                    await self._resend()
                return
            if self._inflight_events >= self.max_in_flight:
                await self._wait_change(self._ack_deadline())
                return
        outbox = self._outbox
        if len(outbox) < self.batch:
            self._take_ready(self.batch - len(outbox))
        if outbox:
            busy = self._busy
            self._busy = True
            if busy and self._linger_ns and self._max_bytes:
                await self._linger()
        else:
            self._busy = False
            if self._inflight:  # wait for the ring, but also for acks, a link change or the ack deadline
                await self._wait_ring(self._ack_deadline())
            else:
                try:
                    self._take(await self._sub.recv_batch(self.batch))
                except ChannelClosed:
                    await self._idle_closed()
                    return
        if self._outbox and link.up:
            await self._send_outbox()

    def drain_started(self, deadline: float) -> None:
        """Called by the scheduler when its stop begins to drain this exporter (``deadline``: the stop's, in loop
        time). The drain and the flush in :meth:`shutdown` then share one ``flush_timeout``, and the flush ends
        before the stop's deadline leaves the hooks no time (a stuck reader or a dead broker never costs more)."""
        from kimiha.scheduling.shutdown import HOOK_RESERVE

        self._flush_by = min(asyncio.get_running_loop().time() + self.flush_timeout, deadline - HOOK_RESERVE)

    async def shutdown(self) -> None:
        """Send what the ring and the buffer still hold (within ``flush_timeout``), then unsubscribe."""
        self._stopping = True
        if self._sub is None:  # never initialized
            return
        loop = asyncio.get_running_loop()
        deadline = self._flush_by if self._flush_by is not None else loop.time() + self.flush_timeout
        self._flush_by = None  # (this stop's: a later one is told again)
        link = self._link
        try:
            while True:
                self._take_ready(None, bounded=False)
                remaining = deadline - loop.time()
                if (not self._outbox and not self._inflight) or remaining <= 0 or link.state == LinkState.CLOSED:
                    break
                if not link.up:
                    await link.wait_up(remaining)
                    continue
                if self._js and (self._resync or self._epoch != link.epoch):
                    self._epoch = link.epoch
                    self._resync = False
                    await self._resend(force=True)
                if self._outbox and (not self._js or self._inflight_events < self.max_in_flight):
                    await self._send_outbox()
                elif self._inflight and not await self._progress.wait(min(remaining, self.ack_timeout)):
                    self._resync = True
            if link.up and not self._js and link.nc is not None:
                try:
                    await link.nc.flush(timeout=max(1, int(deadline - loop.time())))
                except Exception as exc:
                    logger.warning("%s: final flush: %r", self.name, exc)
        finally:
            self.unflushed = len(self._outbox) + self._inflight_events
            if self.unflushed:
                logger.error("%s: %d event(s) of channel %r not delivered to NATS at shutdown (%s)", self.name,
                             self.unflushed, self.type_name,
                             "not acknowledged by the stream" if self._inflight else "broker unreachable",
                             extra=fields(self.name, self.type_name))
            if self._sub is not None:
                self._sub.close()
            if self._ack_sub is not None and link.nc is not None and not link.nc.is_closed:
                try:
                    await self._ack_sub.unsubscribe()
                except Exception:
                    pass

    async def flush(self, timeout: float | None = None) -> bool:
        """Wait until every event published on the channel so far has left (JetStream: is stored).

        Return False if ``timeout`` seconds passed first. The exporter's loop does the sending, so the
        scheduler must be running.
        """
        target = self._channel.published
        sub = self._sub
        if sub is None:
            return target == 0
        loop = asyncio.get_running_loop()
        started = loop.time()
        done = await wait_until(lambda: sub.cursor >= target and not self._outbox and not self._inflight,
                                self._progress, timeout)
        nc = self._link.nc
        if done and nc is not None and self._link.up:
            left = None if timeout is None else max(0.0, timeout - (loop.time() - started))
            try:  # a PING/PONG round trip: the server has read everything sent before it
                await nc.flush(timeout=max(1, int(left)) if left is not None else 10)
            except Exception:
                return False
        return done

    # -- reading the ring -------------------------------------------------------------------------------------

    def _on_lag(self, skipped: int) -> None:
        self.lagged += skipped
        if self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: fell behind channel %r: %d event(s) overwritten before export (lost; receivers "
                           "learn it from the %s header)", self.name, self.type_name, skipped, HDR_META,
                           extra=fields(self.name, self.type_name))

    def _take(self, batch: list[_Frame], *, bounded: bool = True) -> None:
        if not batch:
            return
        self.taken += len(batch)
        outbox = self._outbox
        if self._channel.track_latency:
            outbox.extend(batch)
        else:  # the ring stamps slots only when it tracks latency: stamp on the way out instead
            now = monotonic_ns()
            outbox.extend((seq, now, frame) for seq, _, frame in batch)
        if bounded and self._drop:
            while len(outbox) > self.buffer:
                outbox.popleft()
                self.dropped += 1
        self.high_water = max(self.high_water, len(outbox))
        self._progress.notify()

    def _take_ready(self, limit: int | None, *, bounded: bool = True) -> list[_Frame]:
        try:
            batch = self._sub.drain(limit)
        except ChannelClosed:
            return []
        self._take(batch, bounded=bounded)
        return cast("list[_Frame]", batch)

    async def _linger(self) -> None:
        """Let the loop run (publishers among it) for up to ``linger`` while the batch is not full."""
        outbox = self._outbox
        deadline = monotonic_ns() + self._linger_ns
        while len(outbox) < self.batch and monotonic_ns() < deadline and self._link.up:
            await asyncio.sleep(0)
            if not self._take_ready(self.batch - len(outbox)):
                break  # nothing more came during one pass of the loop: the ring went idle

    async def _wait_ring(self, timeout: float | None, limit: int | None = None) -> None:
        """Wait for frames in the ring, a link change or progress (acks), whichever comes first."""
        link = self._link
        change = link.changed.arm()  # armed before anything can run: no notification slips between
        progress = self._progress.arm()
        recv = asyncio.ensure_future(self._sub.recv_batch(limit or self.batch))
        try:
            await asyncio.wait((recv, change, progress), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            link.changed.disarm(change)
            self._progress.disarm(progress)
            if not recv.done():
                recv.cancel()
                try:
                    await asyncio.wait((recv,))
                except asyncio.CancelledError:
                    recv.cancel()
                    raise
            if recv.done() and not recv.cancelled():
                exc = recv.exception()
                if exc is None:
                    self._take(recv.result())  # taken from the ring: into the outbox, even when cancelled
                elif isinstance(exc, ChannelClosed):
                    pass
                else:
                    raise exc

    async def _idle_closed(self) -> None:
        # the channel is closed and everything was read: nothing will come any more
        await self._link.changed.wait()

    async def _while_down(self) -> None:
        room = self.buffer - len(self._outbox)
        if room <= 0 and not self._drop:
            await self._link.wait_up()  # stop reading: a BLOCK channel now holds its publishers back
            return
        limit = room if not self._drop else self.batch
        if self._take_ready(limit):
            return
        await self._wait_ring(None, limit)

    # -- sending ----------------------------------------------------------------------------------------------

    def _headers(self, seq: int, ts: int, count: int = 0) -> dict[str, str]:
        # format_meta(seq, ts, sender, schema, lost, type), with the parts that rarely change cached; a batch
        # of ``count`` frames: first seq;count;sender;schema;lost;type
        lost = self.lagged + self.dropped
        if lost != self._tail_lost:
            self._tail_lost = lost
            self._tail = f";{self.sender};{self.schema};{lost};{self.type_name}"
        if count:
            meta = {HDR_BATCH: f"{seq};{count}{self._tail}"}
        else:
            meta = {HDR_META: f"{seq};{ts}{self._tail}"}
        if self._js:
            meta[HDR_MSG_ID] = f"{self.sender}:{seq}"
        return meta

    async def _send_outbox(self) -> None:
        link = self._link
        nc = link.nc
        outbox = self._outbox
        inflight = self._inflight
        subject = self.subject
        publish = nc.publish
        js = self._js
        window = self.max_in_flight
        max_bytes = self._max_bytes
        sent = 0
        now = time.monotonic()
        while outbox and sent < self.batch and link.up:
            room = window - self._inflight_events if js else self.batch
            if room <= 0:
                break
            chunk = [outbox.popleft()]
            if max_bytes:
                limit = min(self.batch - sent, room, MAX_BATCH_FRAMES)
                size = len(chunk[0][2])
                while outbox and len(chunk) < limit:
                    size += len(outbox[0][2]) + 12  # + the pair's framing, at most
                    if size > max_bytes:
                        break
                    chunk.append(outbox.popleft())
            n = len(chunk)
            first = self._seq + 1
            if n == 1:
                payload = chunk[0][2]
                headers = self._headers(first, chunk[0][1])
            else:
                payload = encode_batch([(item[1], item[2]) for item in chunk])
                headers = self._headers(first, 0, n)
            # Sequence and bookkeeping first: nats-py queues the message before its first await, so once the
            # call is made the message is out (a cancellation can only land after that point).
            self._seq = first + n - 1
            try:
                if js:
                    inflight[first] = [payload, headers, now, n]
                    self._inflight_events += n
                    await publish(subject, payload, reply=self._ack_prefix + str(first), headers=headers)
                else:
                    await publish(subject, payload, headers=headers)
            except _TOO_LARGE:
                if inflight.pop(first, None) is not None:
                    self._inflight_events -= n
                self._seq = first - 1
                if n > 1:  # the server's limit is lower than we knew: smaller batches from now on
                    outbox.extendleft(reversed(chunk))
                    self._max_bytes = max_bytes = max_bytes // 2
                    continue
                self.dropped += 1
                self.errors += 1
                logger.error("%s: an event of %d bytes exceeds the server's max payload; dropped", self.name,
                             len(payload))
                continue
            except Exception as exc:
                # not connected after all (the callback telling us has not run yet): back into the buffer
                if inflight.pop(first, None) is not None:
                    self._inflight_events -= n
                self._seq = first - 1
                outbox.extendleft(reversed(chunk))
                self.errors += 1
                if self._log_budget > 0:
                    self._log_budget -= 1
                    logger.warning("%s: publish failed, will retry: %r", self.name, exc)
                await self._link.changed.wait(0.05)
                break
            sent += n
            self.messages += 1
            if n > 1:
                self.batches += 1
        if sent:
            self._progress.notify()

    async def _resend(self, force: bool = False) -> None:
        """Send every unacknowledged event again, in sequence order (JetStream)."""
        link = self._link
        self._resync = False
        if not self._inflight:
            return
        nc = link.nc
        now = time.monotonic()
        n = 0
        for seq, entry in list(self._inflight.items()):
            if not link.up:
                self._resync = True
                break
            if seq not in self._inflight:  # acknowledged meanwhile
                continue
            entry[2] = now
            try:
                await nc.publish(self.subject, entry[0], reply=self._ack_prefix + str(seq), headers=entry[1])
            except Exception as exc:
                self._resync = True
                self.errors += 1
                logger.warning("%s: resend failed, will retry: %r", self.name, exc)
                await self._link.changed.wait(0.05)
                break
            n += entry[3]
        self.resent += n
        if n and self._log_budget > 0:
            self._log_budget -= 1
            logger.warning("%s: resent %d unacknowledged event(s) of channel %r to JetStream", self.name, n,
                           self.type_name)

    def _ack_deadline(self) -> float:
        if not self._inflight:
            return self.ack_timeout
        oldest = self._inflight[next(iter(self._inflight))]
        return max(0.001, float(oldest[2]) + self.ack_timeout - time.monotonic())

    async def _wait_change(self, timeout: float) -> None:
        change = self._link.changed.arm()
        progress = self._progress.arm()
        try:
            await asyncio.wait((change, progress), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._link.changed.disarm(change)
            self._progress.disarm(progress)

    def _on_ack_sync(self, subject: str, data: bytes, headers: dict[str, str] | None) -> None:
        try:
            seq = int(subject[len(self._ack_prefix):])
        except ValueError:
            return
        if not data or (headers and headers.get("Status") == "503") or b'"error"' in data:
            # no stream answered (not there, or still recovering), or the stream refused the event
            self.nacks += 1
            self._nack_streak += 1
            self._resync = True
            self._retry_at = time.monotonic() + self._link.backoff.delay(self._nack_streak - 1)
            if self._log_budget > 0:
                self._log_budget -= 1
                why = data.decode(errors="replace")[:200] if data else "no responders (503)"
                logger.warning("%s: JetStream refused event %d of %r: %s; will resend", self.name, seq,
                               self.type_name, why)
            self._progress.notify()
            return
        entry = self._inflight.pop(seq, None)
        if entry is not None:
            self._inflight_events -= entry[3]
            self.acked += entry[3]
            self._nack_streak = 0
            if b'"duplicate"' in data:
                self.stream_duplicates += 1
        self._progress.notify()

    async def _on_ack(self, msg: Any) -> None:
        self._on_ack_sync(msg.subject, msg.data, msg.headers)
