"""Live Binance spot market data: the combined stream over a websocket, the REST snapshot, the local-book
procedure, reconnects, and the tape lines that the replay's parser reads.

:class:`BinanceLiveFeed` is an async iterator of lines ``<recv_ts_ns> <JSON>`` -- exactly the shipped tape's
format -- so it plugs into the same :class:`~kimiha.venues.binance.tasks.BinanceConnector` and
:class:`~kimiha.venues.binance.tasks.BinanceAggregator` as a replay, and a :class:`TapeRecorder` writes what it
yields into a recording that ``python -m kimiha demo --data`` replays into the same book states.

It follows Binance's documented local-book procedure for each symbol: subscribe to ``<sym>@depth@100ms``
(with ``@trade`` and ``@bookTicker``) on one combined stream ``<ws_url>/stream?streams=...``; note the ``U`` of
the first diff; fetch ``<rest_url>/api/v3/depth``; if its ``lastUpdateId`` is below that ``U`` - 1 fetch again;
insert the snapshot into the line stream where it arrived (the book downstream buffers the diffs before it,
drops those with ``u`` <= ``lastUpdateId``, requires the first one it applies to straddle ``lastUpdateId`` + 1,
then ``U`` = previous ``u`` + 1). The feed checks the same rules on the diffs as they arrive (it decodes only
their ids): a diff that breaks them is a gap, and the feed fetches a fresh snapshot (a resync: counted and
logged once per gap). The book downstream sees the same gap and resyncs on that snapshot.

Connection: picows (a Cython websocket client; see ``benchmarks/ws_clients.py`` for why), pings from the
server answered automatically, reconnected with jittered exponential backoff when the server closes the
socket, when nothing arrives for ``silence_timeout`` seconds, and before Binance's 24-hour forced disconnect
(``max_connection_age``). After a reconnect the first diff tells whether anything was lost: if it continues the
sequence no snapshot is needed, otherwise that is a gap like any other.

Every line is stamped on arrival with ``time.time_ns()`` (the wall clock the tape uses), in the websocket's
frame callback, before anything else is done with it.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from kimiha.error import InvalidConfigurationError
from kimiha.venues.binance.recorder import TapeRecorder
from kimiha.venues.binance.rest import (BinanceError, BinanceRateLimited, BinanceRest, BinanceUnavailable,
                                        backoff_delay)

__all__ = [
    "MAINNET_REST_URL",
    "MAINNET_WS_URL",
    "TESTNET_REST_URL",
    "TESTNET_WS_URL",
    "BinanceLiveFeed",
    "stream_names",
]

logger = logging.getLogger(__name__)

#: Binance spot's public market-data endpoints (the feed's defaults; market data needs no key).
MAINNET_WS_URL = "wss://stream.binance.com:9443"
MAINNET_REST_URL = "https://api.binance.com"
#: Binance's spot testnet (the Binance executor's defaults).
TESTNET_WS_URL = "wss://stream.testnet.binance.vision"
TESTNET_REST_URL = "https://testnet.binance.vision"


def stream_names(symbols: Sequence[str], depth_speed: str = "100ms") -> list[str]:
    """Return the combined-stream names of ``symbols``: ``<sym>@trade``, ``<sym>@bookTicker``,
    ``<sym>@depth@<speed>`` each, lower case as Binance wants them."""
    out = []
    for symbol in symbols:
        s = symbol.lower()
        out += [f"{s}@trade", f"{s}@bookTicker", f"{s}@depth@{depth_speed}" if depth_speed else f"{s}@depth"]
    return out


class _DepthIds(msgspec.Struct):
    s: str
    U: int
    u: int


class _DepthEnvelope(msgspec.Struct):
    stream: str
    data: _DepthIds


class _SnapshotId(msgspec.Struct):
    lastUpdateId: int


_DEPTH_IDS = msgspec.json.Decoder(_DepthEnvelope)
_SNAPSHOT_ID = msgspec.json.Decoder(_SnapshotId)

# Where a symbol stands in the local-book procedure, as the feed sees it.
_NEED_SNAPSHOT = 0  # a snapshot is needed (first one, or after a gap); diffs are noted
_BRIDGING = 1  # snapshot inserted as of ``snapshot_id``; the next diff past it must straddle it
_SYNCED = 2  # every diff continues the previous one


class _SymbolState:
    __slots__ = ("fetching", "first_u", "last_u", "parked", "snapshot_id", "state", "symbol")

    def __init__(self, symbol: str) -> None:
        self.symbol = symbol
        self.state = _NEED_SNAPSHOT
        self.first_u: int | None = None  # U of the first diff since the snapshot became needed (after holes)
        self.last_u: int | None = None
        self.snapshot_id = -1
        self.fetching = False
        self.parked: bytes | None = None  # a snapshot line waiting for the next depth line of this symbol


_LISTENER: Any = None
_NO_LINE_BREAKS = bytes.maketrans(b"\r\n", b"  ")


def _one_line(payload: bytes) -> bytes:
    """Return ``payload`` with its CR and LF bytes made spaces: JSON allows them only as whitespace between
    tokens (never raw inside a string), so the message means the same and stays one line of the tape (a
    pretty-printing proxy would otherwise split it into several bad lines of a recording)."""
    return payload.translate(_NO_LINE_BREAKS)


#: The largest websocket frame or fragmented message taken (Binance's largest, a 5000-level depth, is < 1 MiB).
_MAX_MESSAGE = 64 << 20


def _listener_class() -> Any:
    """Return the picows listener class (built on first use: picows is imported only by the live path)."""
    global _LISTENER
    if _LISTENER is None:
        import picows

        _LISTENER = type("_Listener", (_ListenerMixin, picows.WSListener), {})
    return _LISTENER


class _ListenerMixin:
    """The picows listener: stamps each text frame on arrival and hands it to the feed."""

    def __init__(self, feed: BinanceLiveFeed) -> None:
        self.feed = feed
        self._parts: list[bytes] = []
        self._parts_size = 0
        self._continuing = False  # a fragmented message is under way
        self._skipping = False  # ... and it is being dropped (oversized)

    def on_ws_connected(self, transport: Any) -> None:
        pass

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        msg_type = frame.msg_type
        feed = self.feed
        if msg_type is feed._TEXT or msg_type is feed._CONTINUATION:
            ts = time.time_ns()
            if msg_type is feed._CONTINUATION and not self._continuing:
                feed._ignore("a continuation frame without a message to continue")
                return
            self._continuing = not frame.fin
            if self._skipping:  # the rest of an oversized fragmented message
                self._skipping = not frame.fin
                return
            payload = frame.get_payload_as_bytes()
            size = self._parts_size + len(payload)
            if size > _MAX_MESSAGE:  # fragments past the frame limit: not held in memory
                feed._ignore(f"a fragmented message of more than {_MAX_MESSAGE} bytes")
                self._parts.clear()
                self._parts_size = 0
                self._skipping = not frame.fin
                return
            if not frame.fin:  # a fragmented message (Binance does not fragment; a proxy may)
                self._parts.append(payload)
                self._parts_size = size
                return
            if self._parts:
                self._parts.append(payload)
                payload = b"".join(self._parts)
                self._parts.clear()
                self._parts_size = 0
            feed._on_message(ts, payload)
        elif msg_type is feed._CLOSE:
            feed.closed_by_server += 1
            feed._last_close = f"{frame.get_close_code()} {frame.get_close_reason()!r}"
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()
        elif msg_type is feed._PING:
            feed.pings += 1  # picows answers it (enable_auto_pong)
            feed._last_frame = time.monotonic()
        elif msg_type is not feed._PONG:
            feed._ignore(f"a {msg_type.name} frame (Binance sends text)")



class BinanceLiveFeed:
    """Binance spot market data for several symbols, as an async iterator of tape lines.

    Parameters
    ----------
    symbols : sequence of str
        Symbols (``"BTCUSDT"``); any case.
    ws_url, rest_url : str
        Base URLs: the combined stream is ``<ws_url>/stream?streams=...``, the snapshot
        ``<rest_url>/api/v3/depth``. Binance's public URLs by default.
    depth_limit : int, default 1000
        Levels per side of the REST snapshot (its weight is 50 at 1000).
    depth_speed : str, default "100ms"
        ``"100ms"`` or ``"1000ms"`` diffs.
    silence_timeout : float, default 10.0
        Reconnect when no frame (data or ping) arrived for this long.
    max_connection_age : float, default 23.5 hours
        Reconnect before Binance's 24-hour forced disconnect.
    backoff_initial, backoff_max : float, default 0.1 and 30.0
        Reconnect delays: doubling from the first, capped at the second, each multiplied by a random factor in
        [0.5, 1) so that many clients do not come back together.
    connect_timeout : float, default 10.0
        Seconds for the websocket handshake.
    recorder : TapeRecorder, optional
        Records every line as it arrives (the REST snapshots where they are inserted), in the order it is
        handed out: lines still queued at a stop are in the recording too. Lines dropped beyond ``max_queue``
        are not (``dropped`` counts them).
    rest : BinanceRest, optional
        REST client to use (a new one on ``rest_url`` by default; closed by :meth:`aclose` only if it is ours).
    max_queue : int, default 1_000_000
        Lines held when the consumer is slower than the stream; beyond it new lines are dropped (counted; a
        dropped diff is a gap, hence a resync).
    yield_every : int, default 256
        Lines handed out before the iterator gives the event loop a turn.

    Attributes
    ----------
    messages, snapshots, resyncs, reconnects, gaps, dropped : int
        Frames received, snapshots inserted, snapshots fetched after a gap, reconnects, gaps seen, lines dropped.
    silent_reconnects, age_reconnects, closed_by_server, pings, refetches : int
        Reconnects for silence / age, closes sent by the server, pings received, snapshots fetched again
        because they were older than the first buffered diff.
    lines_in, lines_out : int
        Lines queued for the consumer (frames received and snapshots inserted, less those dropped), lines
        handed to it; ``lines_in - lines_out`` are queued (:attr:`backlog`).
    ignored_frames : int
        Frames that carry no line: binary ones, a continuation with nothing to continue, a fragmented message
        past the 64 MiB limit (logged the first time).
    peak_backlog : int
        The most lines queued at once.
    reconnecting : bool
        A reconnect for silence or age was started and has not connected yet (at a stop:
        ``silent_reconnects + age_reconnects`` counts it, ``reconnects`` does not).
    """

    def __init__(self, symbols: Sequence[str], *, ws_url: str = MAINNET_WS_URL, rest_url: str = MAINNET_REST_URL,
                 depth_limit: int = 1000, depth_speed: str = "100ms", silence_timeout: float = 10.0,
                 max_connection_age: float = 23.5 * 3600, backoff_initial: float = 0.1, backoff_max: float = 30.0,
                 connect_timeout: float = 10.0, recorder: TapeRecorder | None = None,
                 rest: BinanceRest | None = None, max_queue: int = 1_000_000, yield_every: int = 256) -> None:
        import picows  # the live extra

        if isinstance(symbols, str) or not symbols:
            raise InvalidConfigurationError(f"BinanceLiveFeed: symbols must be a non-empty list of symbols, got "
                                            f"{symbols!r}")
        for name, value in (("silence_timeout", silence_timeout), ("max_connection_age", max_connection_age),
                            ("backoff_initial", backoff_initial), ("backoff_max", backoff_max),
                            ("connect_timeout", connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise InvalidConfigurationError(f"BinanceLiveFeed: {name} must be a number > 0, got {value!r}")
        self._picows = picows
        self._TEXT = picows.WSMsgType.TEXT
        self._CONTINUATION = picows.WSMsgType.CONTINUATION
        self._CLOSE = picows.WSMsgType.CLOSE
        self._PING = picows.WSMsgType.PING
        self._PONG = picows.WSMsgType.PONG
        self.symbols = [s.upper() for s in symbols]
        self.ws_url = ws_url.rstrip("/")
        self.rest_url = rest_url.rstrip("/")
        self.streams = stream_names(self.symbols, depth_speed)
        self.url = f"{self.ws_url}/stream?streams={'/'.join(self.streams)}"
        self.depth_limit = depth_limit
        self.silence_timeout = float(silence_timeout)
        self.max_connection_age = float(max_connection_age)
        self.backoff_initial = float(backoff_initial)
        self.backoff_max = float(backoff_max)
        self.connect_timeout = float(connect_timeout)
        self.recorder = recorder
        self._own_rest = rest is None
        self.rest = rest if rest is not None else BinanceRest(self.rest_url)
        self.max_queue = max_queue
        self.yield_every = yield_every
        self._states = {s: _SymbolState(s) for s in self.symbols}
        self._queue: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._last_depth_symbol = ""
        self._last_frame = 0.0
        self._last_close = ""
        self._transport: Any = None
        self._supervisor: asyncio.Task[None] | None = None
        self._fetches: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._closed = False
        self._since_yield = 0
        self.error: BaseException | None = None
        self.messages = 0
        self.snapshots = 0
        self.resyncs = 0
        self.reconnects = 0
        self.connects = 0
        self.gaps = 0
        self.dropped = 0
        self.silent_reconnects = 0
        self.age_reconnects = 0
        self.closed_by_server = 0
        self.pings = 0
        self.refetches = 0
        self.lines_in = 0
        self.lines_out = 0
        self.ignored_frames = 0
        self.peak_backlog = 0
        self.reconnecting = False

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Check the REST server, open the websocket, and start the supervisor that keeps it open.

        Raises
        ------
        BinanceUnavailable
            When the REST server does not answer ``/api/v3/ping`` or the websocket cannot be opened; the
            message names the URL. Later failures are retried (with backoff) by the supervisor instead.
        """
        await self.rest.ping()
        await self._check_symbols()
        transport = await self._connect()
        self._supervisor = asyncio.ensure_future(self._supervise(transport))

    async def _check_symbols(self) -> None:
        """Ask ``/api/v3/exchangeInfo`` whether the server lists the symbols: an unknown one would never send a
        line (Binance's stream accepts any name). A server without that endpoint is not held against us."""
        import json

        try:
            await self.rest.request("GET", "/api/v3/exchangeInfo",
                                    {"symbols": json.dumps(self.symbols, separators=(",", ":"))})
        except BinanceError as exc:
            if exc.code == -1121:
                unknown = self.symbols
                if len(self.symbols) > 1:  # Binance does not say which: ask for each
                    unknown = [s for s in self.symbols if not await self._listed(s)] or self.symbols
                it = "it" if len(unknown) == 1 else "them"
                raise InvalidConfigurationError(
                    f"symbol {', '.join(unknown)}: {self.rest_url} does not list {it} (Binance {exc.code} "
                    f"{exc.venue_message or 'Invalid symbol.'}); expected a symbol it trades, such as BTCUSDT"
                ) from None
            if isinstance(exc, BinanceUnavailable):
                raise
            logger.info("Binance exchangeInfo at %s: %s; the symbols are not checked", self.rest_url, exc)

    async def _listed(self, symbol: str) -> bool:
        try:
            await self.rest.request("GET", "/api/v3/exchangeInfo", {"symbol": symbol})
        except BinanceError as exc:
            return exc.code != -1121
        return True

    async def _connect(self) -> Any:
        try:
            transport, _ = await asyncio.wait_for(
                self._picows.ws_connect(lambda: _listener_class()(self), self.url, enable_auto_pong=True,
                                        websocket_handshake_timeout=self.connect_timeout,
                                        max_frame_size=_MAX_MESSAGE),
                self.connect_timeout + 1.0)
        except (OSError, asyncio.TimeoutError, self._picows.WSError) as exc:
            raise BinanceUnavailable(f"Binance combined stream {self.ws_url}: cannot connect: "
                                     f"{exc or type(exc).__name__}") from None
        self.connects += 1
        self.reconnecting = False
        self._transport = transport
        self._last_frame = time.monotonic()
        return transport

    async def _supervise(self, transport: Any) -> None:
        attempt = 0
        while not self._stopping:
            connected_at = time.monotonic()
            await self._watch(transport, connected_at)
            self._transport = None
            self.reconnecting = not self._stopping
            if self._stopping:
                return
            if time.monotonic() - connected_at > 10.0:
                attempt = 0  # it had been up: start the backoff again from the bottom
            while not self._stopping:
                attempt += 1
                await asyncio.sleep(self._backoff(attempt))
                try:
                    transport = await self._connect()
                except BinanceUnavailable as exc:
                    if attempt <= 3 or attempt % 20 == 0:
                        logger.warning("%s (attempt %d); retrying", exc, attempt)
                    continue
                self.reconnects += 1
                logger.warning("Binance combined stream: reconnected (%d reconnect(s) so far)", self.reconnects)
                break

    async def _watch(self, transport: Any, connected_at: float) -> None:
        """Wait until this connection ends (the server closed it, silence, age); close it ourselves if needed."""
        done = asyncio.ensure_future(transport.wait_disconnected())
        try:
            tick = min(self.silence_timeout / 4, 1.0)
            while not done.done():
                await asyncio.wait([done], timeout=tick)
                if done.done() or self._stopping:
                    break
                now = time.monotonic()
                if now - self._last_frame > self.silence_timeout:
                    self.silent_reconnects += 1
                    self.reconnecting = True
                    logger.warning("Binance combined stream: nothing for %.1f s (silence_timeout); reconnecting",
                                   now - self._last_frame)
                    transport.disconnect(graceful=False)
                    break
                if now - connected_at > self.max_connection_age:
                    self.age_reconnects += 1
                    self.reconnecting = True
                    logger.info("Binance combined stream: connection %.0f s old; reconnecting before the "
                                "server's 24-hour disconnect", now - connected_at)
                    transport.disconnect()
                    break
            if not self._stopping and self._last_close:
                logger.warning("Binance combined stream: the server closed the connection (%s)", self._last_close)
                self._last_close = ""
            elif not self._stopping and done.done():
                why = done.exception() if not done.cancelled() else None
                logger.warning("Binance combined stream: the connection was lost (%s)",
                               f"{type(why).__name__}: {why}" if why is not None else "no close frame")
        finally:
            if not done.done():
                try:
                    await asyncio.wait_for(done, 2.0)
                except asyncio.TimeoutError:
                    pass
            done.cancel()

    async def stop_receiving(self) -> None:
        """Close the websocket and cancel snapshot fetches: nothing more arrives, and the iterator ends once the
        lines already queued have been handed out (see :attr:`backlog`)."""
        if self._stopping:
            return
        self._stopping = True
        transport = self._transport
        if transport is not None:
            transport.disconnect()
        tasks = list(self._fetches) + ([self._supervisor] if self._supervisor is not None else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._wake()

    async def aclose(self) -> None:
        """Stop: :meth:`stop_receiving`, then close our REST client and flush the recorder. The iterator ends
        at once; lines still queued stay counted in :attr:`backlog` (and are in the recording)."""
        if self._closed:
            return
        self._closed = True
        await self.stop_receiving()
        if self._own_rest:
            await self.rest.close()
        if self.recorder is not None:
            self.recorder.close()
        self._wake()

    @property
    def backlog(self) -> int:
        """Lines received and not yet handed out."""
        return len(self._queue)

    # ------------------------------------------------------------------ receiving
    def _ignore(self, what: str) -> None:
        """Count a frame that carries no line (binary, stray continuation, oversized); say it once."""
        self.ignored_frames += 1
        if self.ignored_frames == 1:
            logger.warning("Binance combined stream %s: ignored %s (counted in ignored_frames)", self.ws_url, what)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _push(self, line: bytes) -> None:
        queue = self._queue
        queue.append(line)
        self.lines_in += 1
        if len(queue) > self.peak_backlog:
            self.peak_backlog = len(queue)
        if self.recorder is not None:
            self.recorder.write(line)  # on arrival: a line still queued at a stop is recorded too
        if self._waiter is not None:
            self._wake()

    def _on_message(self, ts: int, payload: bytes) -> None:
        self.messages += 1
        self._last_frame = time.monotonic()
        if b"\n" in payload or b"\r" in payload:
            payload = _one_line(payload)
        depth = b"@depth" in payload[:64]
        if len(self._queue) >= self.max_queue:
            self.dropped += 1  # a dropped diff is not seen by the checks below: the next one is a gap
            return
        line = b"%d %b" % (ts, payload)
        if not depth:
            self._push(line)
            return
        try:
            envelope = _DEPTH_IDS.decode(payload)
        except msgspec.DecodeError:
            self._push(line)  # the parser downstream reports it as a bad line
            return
        ids = envelope.data
        state = self._states.get(ids.s)
        self._push(line)
        if state is None or ids.U > ids.u or not envelope.stream.startswith(ids.s.lower()):
            return  # not a diff of ours, or one the parser rejects (so the book never sees it either)
        self._last_depth_symbol = ids.s
        self._check_sequence(state, ids.U, ids.u)
        if state.parked is not None:
            parked, state.parked = state.parked, None
            assert state.first_u is not None
            if state.state == _NEED_SNAPSHOT and state.snapshot_id >= state.first_u - 1:
                self._insert_snapshot(state, parked)
            elif state.state == _NEED_SNAPSHOT:  # a hole after it while it waited: it cannot bridge any more
                self.refetches += 1
                self._fetch(state)

    def _check_sequence(self, st: _SymbolState, first: int, final: int) -> None:
        if st.state == _SYNCED:
            assert st.last_u is not None
            if first != st.last_u + 1:
                self._gap(st, first, final, st.last_u + 1)
                return
            st.last_u = final
        elif st.state == _BRIDGING:
            if final <= st.snapshot_id:
                return  # stale: the book drops it too
            if first > st.snapshot_id + 1:
                self._gap(st, first, final, st.snapshot_id + 1)
                return
            st.state = _SYNCED
            st.last_u = final
        else:
            if st.first_u is None or (st.last_u is not None and first != st.last_u + 1):
                st.first_u = first  # the snapshot must reach past any hole among the buffered diffs
            st.last_u = final
            if not st.fetching and st.parked is None:
                self._fetch(st)

    def _gap(self, st: _SymbolState, first: int, final: int, expected: int) -> None:
        self.gaps += 1
        self.resyncs += 1
        logger.warning("Binance %s: gap in depth updates (expected U=%d, got %d..%d); resynchronizing with a "
                       "fresh snapshot (resync %d)", st.symbol, expected, first, final, self.resyncs)
        st.state = _NEED_SNAPSHOT
        st.first_u = first
        st.last_u = final
        if not st.fetching:
            self._fetch(st)

    # ------------------------------------------------------------------ snapshots
    def _fetch(self, st: _SymbolState) -> None:
        st.fetching = True
        task = asyncio.ensure_future(self._fetch_snapshot(st))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch_snapshot(self, st: _SymbolState) -> None:
        attempt = 0
        try:
            while not self._stopping:
                try:
                    body, ts = await self.rest.depth(st.symbol, self.depth_limit)
                    last = _SNAPSHOT_ID.decode(body).lastUpdateId
                except BinanceRateLimited as exc:
                    # At least the backoff: a server saying "Retry-After: 0" to every request is not hammered.
                    attempt += 1
                    delay = max(exc.retry_after, self._backoff(attempt))
                    logger.warning("Binance %s snapshot: %s; waiting %.1f s", st.symbol, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                except (BinanceError, msgspec.DecodeError) as exc:
                    attempt += 1
                    delay = self._backoff(attempt)
                    logger.warning("Binance %s snapshot failed (%s); retrying in %.2f s", st.symbol, exc, delay)
                    await asyncio.sleep(delay)
                    continue
                if st.state != _NEED_SNAPSHOT:
                    return
                assert st.first_u is not None
                if last < st.first_u - 1:
                    # Older than the first diff we hold: the diffs in between were never received. Binance's
                    # snapshot catches up within a request or two; one that never does is asked again with the
                    # backoff (never a hot loop on the REST weight), and said once per gap.
                    self.refetches += 1
                    attempt += 1
                    delay = self._backoff(attempt)
                    if attempt == 1 or attempt % 20 == 0:
                        logger.warning("Binance %s snapshot: lastUpdateId %d is older than the first buffered "
                                       "diff (U=%d); fetching it again in %.2f s (attempt %d)", st.symbol, last,
                                       st.first_u, delay, attempt)
                    await asyncio.sleep(delay)
                    continue
                line = b"%d %b" % (ts, _one_line(body.strip()))
                if self._last_depth_symbol == st.symbol or len(self.symbols) == 1:
                    self._insert_snapshot(st, line, last)
                else:
                    # The parser names a snapshot after the latest depth line: insert it after this symbol's.
                    st.parked = line
                    st.snapshot_id = last
                return
        finally:
            st.fetching = False

    def _backoff(self, attempt: int) -> float:
        """Return the jittered delay before retry number ``attempt`` (1, 2 ...): ``backoff_initial`` doubled
        each time, capped at ``backoff_max``, times a random factor in [0.5, 1)."""
        return backoff_delay(attempt, self.backoff_initial, self.backoff_max)

    def _insert_snapshot(self, st: _SymbolState, line: bytes, last: int | None = None) -> None:
        if last is None:
            last = st.snapshot_id
        self._push(line)
        self.snapshots += 1
        st.snapshot_id = last
        assert st.last_u is not None
        if st.last_u > last:
            st.state = _SYNCED  # the straddling diff was received already (checked when the hole was noted)
        else:
            st.state = _BRIDGING

    # ------------------------------------------------------------------ the async iterator
    def __aiter__(self) -> BinanceLiveFeed:
        return self

    async def __anext__(self) -> bytes:
        # Every await comes before the line leaves the queue: a cancel (a stop) at any await leaves it queued,
        # counted in the backlog, never taken and lost.
        queue = self._queue
        self._since_yield += 1
        if self._since_yield >= self.yield_every:  # a long backlog does not starve the loop
            self._since_yield = 0
            await asyncio.sleep(0)
        if self._closed:
            raise StopAsyncIteration
        while not queue:
            if self._stopping:
                raise StopAsyncIteration
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
            self._since_yield = 0
            if self._closed:
                raise StopAsyncIteration
        self.lines_out += 1
        return queue.popleft()

    def stats(self) -> dict[str, int]:
        """Return the feed's counters."""
        return {"messages": self.messages, "lines_in": self.lines_in, "lines_out": self.lines_out,
                "queued": len(self._queue), "peak_backlog": self.peak_backlog,
                "snapshots": self.snapshots, "resyncs": self.resyncs, "gaps": self.gaps,
                "reconnects": self.reconnects, "silent_reconnects": self.silent_reconnects,
                "age_reconnects": self.age_reconnects, "closed_by_server": self.closed_by_server,
                "pings": self.pings, "refetches": self.refetches, "dropped": self.dropped,
                "ignored_frames": self.ignored_frames}

    def __repr__(self) -> str:
        return f"BinanceLiveFeed({self.symbols}, {self.ws_url!r}, messages={self.messages}, resyncs={self.resyncs})"
