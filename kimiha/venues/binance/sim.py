"""A local exchange speaking Binance spot's protocol, to test the live path against (loopback only).

:class:`LocalExchange` is an ``aiohttp`` server (the ``live`` extra) that

* plays a recording (the shipped tape by default, or any recording in the tape format) at a chosen speed and
  serves it as Binance's combined stream ``/stream?streams=...`` (each client gets the streams it asked for);
* keeps the book of every symbol from that recording (its snapshot, then every diff it plays) and answers
  ``GET /api/v3/depth`` from it, as of the last diff played: the first snapshot is served only once the
  recording's own snapshot has been reached, i.e. after the first diffs, as on Binance;
* accepts signed orders (``POST/DELETE/GET /api/v3/order``, HMAC-SHA256 or Ed25519), checks the API key, the
  signature and the timestamp, and rejects bad ones with Binance's error codes and format; matches MARKET and
  LIMIT (IOC, FOK, GTC) orders against its book (taking liquidity; a resting GTC order fills when a recorded
  trade reaches its price) and sends ``executionReport`` events on a user data stream (``POST
  /api/v3/userDataStream`` for a listen key, then ``/ws/<listenKey>``); keeps each key's account;
* injects faults on demand (:class:`SimFaults`): a diff not sent, the socket closed mid-stream, a stream gone
  silent, server pings, ``429`` answers with ``Retry-After``, ``503`` answers to new orders it took (or not).

It binds 127.0.0.1 only. ``python -m kimiha live --sim`` runs it with the whole live path; tests start their own
on a free port. Simplifications: no market impact (the recording's book is what orders trade against; a fill
does not remove liquidity later diffs still show), fees are charged in the quote asset, no filters (tick / lot
size), balances are not checked.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import itertools
import logging
import math
import secrets
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

import msgspec

from kimiha.trading.book import BookGap, OrderBook
from kimiha.trading.model import DepthDiff, DepthSnapshot, Quote, Trade
from kimiha.venues.binance.recording import RecordingPath, iter_lines, recorded_tape, replay_lines
from kimiha.venues.binance.wire import BinanceParser, Envelope

__all__ = ["LocalExchange", "SimAccount", "SimFaults", "SimOrder"]

logger = logging.getLogger(__name__)

_QTY_EPS = 1e-12


class SimFaults(msgspec.Struct, kw_only=True):
    """Faults the local exchange injects.

    The counts start (from 1) once the first depth snapshot has been served, so that a fault always hits a
    client whose book is live, however long that first snapshot took on a loaded machine.

    Attributes
    ----------
    drop_diffs : list of int
        Numbers of depth diffs (counted over all symbols, from 1) that are applied to the exchange's book but
        not sent to any client: the clients see a gap.
    close_after : list of int
        After playing this many messages, close every market-data socket (each number once).
    silent_after : int or None
        After this many messages, stop sending on the sockets open at that moment (no data, no pings, the
        socket stays open); sockets opened later get data again.
    ping_interval : float or None
        Send a ping to every market-data socket this often (seconds); pongs are counted.
    depth_429 : int
        Answer the first this-many depth requests with ``429`` and ``Retry-After: retry_after``.
    depth_418 : int
        Then answer this many with ``418`` (the IP is banned) and the same ``Retry-After``.
    retry_after : int
        Seconds in those ``Retry-After`` headers.
    hold_after : int or None
        After playing this many messages, wait for :meth:`LocalExchange.resume` before playing on (a test
        makes what happens meanwhile -- a reconnect -- come before the rest, whatever the machine's load).
    hold_at : int or None
        After playing this many messages of the recording (counted from its first, snapshots not counted, with
        or without a client), wait for :meth:`LocalExchange.resume`: the book stands still at a known point of
        the recording while a test reads it and sends orders against it, however slowly the orders travel.
        :meth:`~LocalExchange.resume` releases both holds (an exchange resumed does not hold again).
    order_503 : int
        Take the first this-many new orders (matched, reported on the user data stream, kept) and then answer
        them ``503`` with ``-1007`` ("execution status unknown"), as Binance does when its backend's answer
        is late: the client cannot tell from the answer whether the order exists.
    order_503_untaken : int
        Then answer this many new orders ``503`` with ``-1008`` (server busy) without taking them.
    order_unknown_status : int
        The HTTP status of the ``order_503`` answers (default 503): ``-1007`` leaves the execution status unknown
        whatever the status says.
    """

    drop_diffs: list[int] = []
    close_after: list[int] = []
    silent_after: int | None = None
    hold_after: int | None = None
    hold_at: int | None = None
    ping_interval: float | None = None
    depth_429: int = 0
    depth_418: int = 0
    retry_after: int = 1
    order_503: int = 0
    order_503_untaken: int = 0
    order_unknown_status: int = 503


class SimOrder(msgspec.Struct, kw_only=True):
    """An order as the local exchange keeps it."""

    order_id: int
    client_order_id: str
    symbol: str
    side: str  # BUY / SELL
    type: str  # MARKET / LIMIT
    time_in_force: str
    qty: float
    price: float
    executed: float = 0.0
    quote_qty: float = 0.0
    status: str = "NEW"
    api_key: str = ""
    created_ms: int = 0
    updated_ms: int = 0


class SimAccount(msgspec.Struct, kw_only=True):
    """The exchange's view of one API key's account (quote-asset cash, base positions, fees)."""

    cash: float = 0.0
    positions: dict[str, float] = {}
    fees: float = 0.0
    trades: int = 0

    def equity_change(self, marks: dict[str, float]) -> float:
        """Return cash plus every position valued at ``marks`` (the account's PnL, fees included)."""
        return self.cash + sum(qty * marks[s] for s, qty in self.positions.items() if qty)


def _fmt(x: float) -> str:
    return repr(float(x))


def _error(code: int, msg: str, status: int = 400) -> Any:
    from aiohttp import web

    return web.Response(status=status, body=msgspec.json.encode({"code": code, "msg": msg}),
                        content_type="application/json")


class _Client:
    __slots__ = ("silenced", "streams", "ws")

    def __init__(self, ws: Any, streams: set[str]) -> None:
        self.ws = ws
        self.streams = streams
        self.silenced = False


class LocalExchange:
    """A Binance-protocol server on 127.0.0.1 for tests and ``live --sim``.

    Parameters
    ----------
    recording : path or list of paths, optional
        What to play (the shipped tape by default).
    speed : float or None, default 1.0
        Playback speed against the recording's receive times; None: as fast as possible.
    port : int, default 0
        Port on 127.0.0.1 (0: a free one; read :attr:`port` after :meth:`start`).
    api_key : str, optional
        The one API key accepted (a random one by default; read :attr:`api_key`).
    api_secret : str, optional
        Its HMAC secret (random by default).
    ed25519_public_key : bytes, optional
        Raw 32-byte Ed25519 public key: signatures that verify with it are accepted too.
    fee_bps : float, default 10.0
        Fee in basis points of the notional, in the quote asset.
    faults : SimFaults, optional
        Faults to inject.
    start_on_connect : bool, default True
        Start playing when the first market-data client connects (False: at :meth:`start`).
    snapshot_wait : float, default 30.0
        Longest a depth request waits for the book to exist before an error answer.

    Attributes
    ----------
    finished : asyncio.Event
        Set when the recording has been played to its end.
    played, messages_sent, diffs_sent, diffs_dropped, closes, pongs, depth_requests, depth_429_sent : int
        Counters of what the server did.
    order_503_sent, order_503_untaken_sent : int
        New orders answered ``503`` after being taken, and without being taken (see :class:`SimFaults`).
    depth_request_times : list of float
        ``time.monotonic()`` of each depth request (what tests of ``Retry-After`` compare).
    orders : dict
        Every order by id.
    accounts : dict
        :class:`SimAccount` by API key.
    """

    def __init__(self, recording: RecordingPath | Iterable[RecordingPath] | None = None, *,
                 speed: float | None = 1.0, port: int = 0, api_key: str | None = None,
                 api_secret: str | None = None, ed25519_public_key: bytes | None = None, fee_bps: float = 10.0,
                 faults: SimFaults | None = None, start_on_connect: bool = True,
                 snapshot_wait: float = 30.0) -> None:
        self.recording = recorded_tape() if recording is None else recording
        self.speed = speed
        self.requested_port = port
        self.api_key = api_key or secrets.token_hex(16)
        self.api_secret = api_secret or secrets.token_hex(32)
        self._ed25519 = ed25519_public_key
        self.fee_rate = fee_bps / 10_000.0
        self.faults = faults or SimFaults()
        self.start_on_connect = start_on_connect
        self.snapshot_wait = snapshot_wait
        self.port = 0
        self.finished = asyncio.Event()
        self._resumed = asyncio.Event()
        self.held = asyncio.Event()
        self.books: dict[str, OrderBook] = {}
        self._book_live: dict[str, asyncio.Event] = {}
        self._last_trade: dict[str, float] = {}
        self._clients: list[_Client] = []
        self._user_clients: dict[str, list[Any]] = {}
        self._listen_keys: dict[str, str] = {}  # listen key -> api key
        self._runner: Any = None
        self._player: asyncio.Task[None] | None = None
        self._pinger: asyncio.Task[None] | None = None
        self._closing = False
        self._order_ids = itertools.count(1)
        self._trade_ids = itertools.count(1)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.orders: dict[int, SimOrder] = {}
        self._resting: list[SimOrder] = []
        self.accounts: dict[str, SimAccount] = {}
        self.played = 0
        self.diffs_played = 0
        self.diffs_sent = 0
        self.messages_sent = 0
        self.diffs_dropped = 0
        self.closes = 0
        self.pings_sent = 0
        self.pongs = 0
        self.depth_requests = 0
        self.depth_429_sent = 0
        self.depth_418_sent = 0
        self.order_503_sent = 0
        self.order_503_untaken_sent = 0
        self._snapshot_served = False
        self.depth_request_times: list[float] = []
        self.bad_signatures = 0
        self._symbols: set[str] | None = None
        self.weight_used = 0
        self._weight_minute = 0

    # ------------------------------------------------------------------ lifecycle
    @property
    def ws_url(self) -> str:
        """Return the websocket base URL (``ws://127.0.0.1:PORT``)."""
        return f"ws://127.0.0.1:{self.port}"

    @property
    def rest_url(self) -> str:
        """Return the REST base URL (``http://127.0.0.1:PORT``)."""
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        """Bind 127.0.0.1 and start serving (and playing, unless ``start_on_connect``)."""
        from aiohttp import web

        app = web.Application()
        r = app.router
        r.add_get("/stream", self._market_ws)
        r.add_get("/ws/{listen_key}", self._user_ws)
        r.add_get("/api/v3/ping", self._ping)
        r.add_get("/api/v3/time", self._time)
        r.add_get("/api/v3/depth", self._depth)
        r.add_get("/api/v3/exchangeInfo", self._exchange_info)
        r.add_post("/api/v3/order", self._new_order)
        r.add_delete("/api/v3/order", self._cancel_order)
        r.add_get("/api/v3/order", self._query_order)
        r.add_post("/api/v3/userDataStream", self._new_listen_key)
        r.add_put("/api/v3/userDataStream", self._keepalive_listen_key)
        r.add_delete("/api/v3/userDataStream", self._keepalive_listen_key)
        r.add_get("/sim/state", self._state)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.requested_port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        if not self.start_on_connect:
            self._start_playing()
        if self.faults.ping_interval:
            self._pinger = asyncio.ensure_future(self._ping_loop(self.faults.ping_interval))

    async def stop(self) -> None:
        """Stop playing, close every socket, stop the server (idempotent)."""
        if self._closing:
            return
        self._closing = True
        for task in [t for t in (self._player, self._pinger) if t is not None] + list(self._tasks):
            task.cancel()
        for client in list(self._clients):
            await client.ws.close()
        for sockets in self._user_clients.values():
            for ws in list(sockets):
                await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> LocalExchange:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def resume(self) -> None:
        """Play on after ``SimFaults.hold_after`` or ``SimFaults.hold_at`` (see :attr:`held`)."""
        self._resumed.set()

    def _start_playing(self) -> None:
        if self._player is None:
            self._player = asyncio.ensure_future(self._play())

    # ------------------------------------------------------------------ market data
    async def _play(self) -> None:
        parser = BinanceParser()
        faults = self.faults
        drop = set(faults.drop_diffs)
        close_after = sorted(faults.close_after)
        played_since = diffs_since = 0  # messages and diffs played since the first snapshot was served
        try:
            async for line in replay_lines(self.recording, self.speed):
                body = line.partition(b" ")[2]
                try:
                    event = parser.parse(line)
                except Exception:  # noqa: BLE001 - a bad line of the recording is passed on as it is
                    event = None
                if isinstance(event, DepthSnapshot):
                    self._apply_snapshot(event)
                    continue  # snapshots are served over REST, never streamed
                self.played += 1
                synced = self._snapshot_served
                played_since += synced
                send = True
                if isinstance(event, DepthDiff):
                    self.diffs_played += 1
                    diffs_since += synced
                    self._apply_diff(event)
                    if synced and diffs_since in drop:
                        self.diffs_dropped += 1
                        send = False
                elif isinstance(event, Trade):
                    self._last_trade[event.symbol] = event.price
                    self._match_resting(event)
                elif isinstance(event, Quote):
                    pass
                if send:
                    await self._broadcast(body, event)
                while synced and close_after and played_since >= close_after[0]:
                    close_after.pop(0)
                    await self._close_market_sockets()
                if synced and faults.silent_after is not None and played_since == faults.silent_after:
                    for client in self._clients:
                        client.silenced = True
                if (synced and faults.hold_after is not None and played_since == faults.hold_after
                        or faults.hold_at is not None and self.played == faults.hold_at):
                    self.held.set()
                    await self._resumed.wait()
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("local exchange: playing the recording failed")
        finally:
            self.finished.set()

    def _apply_snapshot(self, snap: DepthSnapshot) -> None:
        book = self._book(snap.symbol)
        try:
            book.apply_snapshot(snap)
        except BookGap as exc:
            logger.warning("local exchange: recording's snapshot does not line up: %s", exc)
        if book.is_live:
            self._book_live[snap.symbol].set()

    def _apply_diff(self, diff: DepthDiff) -> None:
        book = self._book(diff.symbol)
        try:
            book.apply_diff(diff)
        except BookGap as exc:
            logger.warning("local exchange: recording has a gap: %s", exc)

    def _book(self, symbol: str) -> OrderBook:
        book = self.books.get(symbol)
        if book is None:
            book = self.books[symbol] = OrderBook(symbol)
            self._book_live.setdefault(symbol, asyncio.Event())
        return book

    async def _broadcast(self, body: bytes, event: Any) -> None:
        if not self._clients:
            return
        try:
            stream = msgspec.json.decode(body, type=Envelope).stream
        except msgspec.DecodeError:
            stream = None
        text = body.decode("utf-8", "replace")
        for client in list(self._clients):
            if client.silenced or (stream is not None and stream not in client.streams):
                continue
            try:
                await client.ws.send_str(text)
            except (ConnectionError, RuntimeError):
                continue
            self.messages_sent += 1
            if isinstance(event, DepthDiff):
                self.diffs_sent += 1

    async def _close_market_sockets(self) -> None:
        for client in list(self._clients):
            self.closes += 1
            await client.ws.close(code=1001, message=b"local exchange: closing mid-stream (fault injection)")

    async def _ping_loop(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            for client in list(self._clients):
                if client.silenced:
                    continue
                try:
                    await client.ws.ping(b"kimiha-sim")
                    self.pings_sent += 1
                except (ConnectionError, RuntimeError):
                    pass

    async def _market_ws(self, request: Any) -> Any:
        from aiohttp import WSMsgType, web

        streams = {s for s in request.query.get("streams", "").split("/") if s}
        if not streams:
            return _error(-1100, "Illegal characters found in parameter 'streams'; expected "
                                 "<symbol>@<stream>/<symbol>@<stream>...")
        ws = web.WebSocketResponse(autoping=False, heartbeat=None)  # pongs are counted here, pings answered
        await ws.prepare(request)
        client = _Client(ws, streams)
        self._clients.append(client)
        if self.start_on_connect:
            self._start_playing()
        try:
            async for msg in ws:
                if msg.type is WSMsgType.PONG:
                    self.pongs += 1
                elif msg.type is WSMsgType.PING:
                    await ws.pong(msg.data)
                elif msg.type is WSMsgType.CLOSE:
                    await ws.close()
        finally:
            if client in self._clients:
                self._clients.remove(client)
        return ws

    # ------------------------------------------------------------------ public REST
    def _weight(self, n: int) -> dict[str, str]:
        minute = int(time.time() // 60)
        if minute != self._weight_minute:
            self._weight_minute = minute
            self.weight_used = 0
        self.weight_used += n
        return {"X-MBX-USED-WEIGHT-1M": str(self.weight_used)}

    async def _ping(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({}, headers=self._weight(1))

    async def _time(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"serverTime": time.time_ns() // 1_000_000}, headers=self._weight(1))

    #: Lines of the recording read to learn its symbols (a symbol that first appears later is not listed).
    SYMBOL_SCAN_LINES = 20_000

    @property
    def symbols(self) -> set[str]:
        """The symbols of the recording (upper case): those named in its first :attr:`SYMBOL_SCAN_LINES`
        lines' streams. ``GET /api/v3/exchangeInfo`` and ``/api/v3/depth`` refuse others (``-1121``)."""
        if self._symbols is None:
            found = set()
            for line in itertools.islice(iter_lines(self.recording), self.SYMBOL_SCAN_LINES):
                at = line.find(b'{"stream":"')
                if at >= 0:
                    name = line[at + 11:line.find(b"@", at + 11)]
                    found.add(name.decode("ascii", "replace").upper())
            self._symbols = found
        return self._symbols

    async def _exchange_info(self, request: Any) -> Any:
        from aiohttp import web

        query = request.query
        try:
            wanted = ([query["symbol"]] if "symbol" in query else
                      msgspec.json.decode(query["symbols"], type=list[str]) if "symbols" in query else
                      sorted(self.symbols))
        except msgspec.ValidationError:
            return _error(-1100, "Illegal characters found in parameter 'symbols'.")
        if any(s.upper() not in self.symbols for s in wanted):
            return _error(-1121, "Invalid symbol.")
        body = {"timezone": "UTC", "serverTime": time.time_ns() // 1_000_000,
                "symbols": [{"symbol": s.upper(), "status": "TRADING"} for s in wanted]}
        return web.Response(body=msgspec.json.encode(body), content_type="application/json",
                            headers=self._weight(20))

    async def _depth(self, request: Any) -> Any:
        from aiohttp import web

        self.depth_requests += 1
        self.depth_request_times.append(time.monotonic())
        if self.depth_429_sent < self.faults.depth_429:
            self.depth_429_sent += 1
            resp = _error(-1003, "Too many requests; current limit of IP is 6000 requests per minute.", 429)
            resp.headers["Retry-After"] = str(self.faults.retry_after)
            return resp
        if self.depth_418_sent < self.faults.depth_418:
            self.depth_418_sent += 1
            resp = _error(-1003, "Way too many requests; IP banned until later.", 418)
            resp.headers["Retry-After"] = str(self.faults.retry_after)
            return resp
        symbol = request.query.get("symbol", "").upper()
        try:
            limit = int(request.query.get("limit", "100"))
        except ValueError:
            return _error(-1100, "Illegal characters found in parameter 'limit'; legal range is '^[0-9]{1,20}$'.")
        if not symbol:
            return _error(-1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        if not 1 <= limit <= 5000:
            return _error(-1100, "Illegal characters found in parameter 'limit'; legal range is 1..5000.")
        if symbol not in self.symbols:
            return _error(-1121, "Invalid symbol.")
        self._book(symbol)
        if self.start_on_connect and self._player is None:
            self._start_playing()
        try:
            await asyncio.wait_for(self._book_live[symbol].wait(), self.snapshot_wait)
        except asyncio.TimeoutError:
            return _error(-1121, "Invalid symbol.")
        book = self.books[symbol]
        if not book.is_live:  # the recording had a gap and its book waits for a snapshot
            return _error(-1000, "An unknown error occurred while processing the request.", 503)
        bids, asks = book.depth(limit)
        weight = 5 if limit <= 100 else 25 if limit <= 500 else 50 if limit <= 1000 else 250
        self._snapshot_served = True
        body = msgspec.json.encode({"lastUpdateId": book.last_update_id,
                                    "bids": [[_fmt(p), _fmt(q)] for p, q in bids],
                                    "asks": [[_fmt(p), _fmt(q)] for p, q in asks]})
        return web.Response(body=body, content_type="application/json", headers=self._weight(weight))

    # ------------------------------------------------------------------ authentication
    def _check_key(self, request: Any) -> Any:
        key = request.headers.get("X-MBX-APIKEY", "")
        if key != self.api_key:
            return _error(-2015, "Invalid API-key, IP, or permissions for action.", 401)
        return None

    def _verify(self, request: Any) -> tuple[dict[str, str], Any]:
        """Check key, signature and timestamp; return (params, None) or ({}, an error answer)."""
        bad = self._check_key(request)
        if bad is not None:
            return {}, bad
        raw = request.query_string
        payload, sep, signature = raw.rpartition("&signature=")
        if not sep:
            return {}, _error(-1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed.")
        signature = urllib.parse.unquote(signature)
        if not self._signature_ok(payload, signature):
            self.bad_signatures += 1
            return {}, _error(-1022, "Signature for this request is not valid.")
        params = dict(urllib.parse.parse_qsl(payload, keep_blank_values=True))
        try:
            ts = int(params["timestamp"])
            window = int(params.get("recvWindow", "5000"))
        except (KeyError, ValueError):
            return {}, _error(-1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed.")
        now = time.time_ns() // 1_000_000
        if ts > now + 1000 or now - ts > window:
            return {}, _error(-1021, "Timestamp for this request is outside of the recvWindow.")
        return params, None

    def _signature_ok(self, payload: str, signature: str) -> bool:
        expected = hmac.new(self.api_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if hmac.compare_digest(expected, signature):
            return True
        if self._ed25519 is not None:
            from cryptography.exceptions import InvalidSignature
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

            try:
                Ed25519PublicKey.from_public_bytes(self._ed25519).verify(base64.b64decode(signature),
                                                                         payload.encode())
                return True
            except (InvalidSignature, ValueError, binascii.Error):
                return False
        return False

    # ------------------------------------------------------------------ orders
    def _order_json(self, o: SimOrder) -> dict[str, Any]:
        return {"symbol": o.symbol, "orderId": o.order_id, "orderListId": -1, "clientOrderId": o.client_order_id,
                "transactTime": o.updated_ms, "price": _fmt(o.price), "origQty": _fmt(o.qty),
                "executedQty": _fmt(o.executed), "cummulativeQuoteQty": _fmt(o.quote_qty), "status": o.status,
                "timeInForce": o.time_in_force, "type": o.type, "side": o.side, "time": o.created_ms,
                "updateTime": o.updated_ms}

    async def _new_order(self, request: Any) -> Any:
        from aiohttp import web

        params, bad = self._verify(request)
        if bad is not None:
            return bad
        symbol = params.get("symbol", "").upper()
        side = params.get("side", "")
        otype = params.get("type", "")
        if side not in ("BUY", "SELL"):
            return _error(-1102, "Mandatory parameter 'side' was not sent, was empty/null, or malformed.")
        if otype not in ("MARKET", "LIMIT"):
            return _error(-1116, "Invalid orderType.")
        try:
            qty = float(params["quantity"])
        except (KeyError, ValueError):
            return _error(-1102, "Mandatory parameter 'quantity' was not sent, was empty/null, or malformed.")
        if not (qty > 0 and math.isfinite(qty)):
            return _error(-1013, "Filter failure: LOT_SIZE")
        tif = params.get("timeInForce", "GTC" if otype == "LIMIT" else "")
        price = 0.0
        if otype == "LIMIT":
            if tif not in ("GTC", "IOC", "FOK"):
                return _error(-1102, "Mandatory parameter 'timeInForce' was not sent, was empty/null, or malformed.")
            try:
                price = float(params["price"])
            except (KeyError, ValueError):
                return _error(-1102, "Mandatory parameter 'price' was not sent, was empty/null, or malformed.")
            if not (price > 0 and math.isfinite(price)):
                return _error(-1013, "Filter failure: PRICE_FILTER")
        book = self.books.get(symbol)
        if book is None or not book.is_live:
            return _error(-1121, "Invalid symbol.")
        faults = self.faults
        if self.order_503_sent >= faults.order_503 and self.order_503_untaken_sent < faults.order_503_untaken:
            self.order_503_untaken_sent += 1
            return _error(-1008, "Server is currently overloaded with other requests. Please try again in a "
                                 "few minutes.", 503)
        now = time.time_ns() // 1_000_000
        cid = params.get("newClientOrderId") or f"sim-{secrets.token_hex(8)}"
        order = SimOrder(order_id=next(self._order_ids), client_order_id=cid, symbol=symbol, side=side,
                         type=otype, time_in_force=tif, qty=qty, price=price, api_key=self.api_key,
                         created_ms=now, updated_ms=now)
        levels = list(book.iter_asks() if side == "BUY" else book.iter_bids())
        takeable = []
        remaining = qty
        for px, avail in levels:
            if remaining <= _QTY_EPS:
                break
            if otype == "LIMIT" and (px > price if side == "BUY" else px < price):
                break
            take = min(avail, remaining)
            takeable.append((px, take))
            remaining -= take
        if tif == "FOK" and remaining > _QTY_EPS:
            takeable = []
        self.orders[order.order_id] = order
        self._report(order, "NEW")
        for px, take in takeable:
            self._fill(order, px, take, maker=False)
        if order.status != "FILLED":
            if otype == "MARKET" or tif in ("IOC", "FOK"):
                order.status = "EXPIRED"
                self._report(order, "EXPIRED")
            else:
                self._resting.append(order)
        if self.order_503_sent < faults.order_503:  # taken, reported, kept: only the answer is lost
            self.order_503_sent += 1
            return _error(-1007, "Timeout waiting for response from backend server. Send status unknown; "
                                 "execution status unknown.", faults.order_unknown_status)
        return web.json_response(self._order_json(order), headers=self._weight(1))

    def _fill(self, order: SimOrder, px: float, qty: float, *, maker: bool) -> None:
        if order.qty - (order.executed + qty) < _QTY_EPS:
            qty = order.qty - order.executed
            order.executed = order.qty
        else:
            order.executed += qty
        notional = px * qty
        order.quote_qty += notional
        fee = notional * self.fee_rate
        order.status = "FILLED" if order.executed >= order.qty else "PARTIALLY_FILLED"
        order.updated_ms = time.time_ns() // 1_000_000
        account = self.accounts.setdefault(order.api_key, SimAccount())
        sign = 1.0 if order.side == "BUY" else -1.0
        account.positions[order.symbol] = account.positions.get(order.symbol, 0.0) + sign * qty
        account.cash -= sign * notional + fee
        account.fees += fee
        account.trades += 1
        self._report(order, "TRADE", last_qty=qty, last_px=px, fee=fee, maker=maker)

    def _match_resting(self, trade: Trade) -> None:
        if not self._resting:
            return
        still = []
        for order in self._resting:
            if order.status not in ("NEW", "PARTIALLY_FILLED") or order.symbol != trade.symbol:
                if order.status in ("NEW", "PARTIALLY_FILLED"):
                    still.append(order)
                continue
            crosses = trade.price <= order.price if order.side == "BUY" else trade.price >= order.price
            if crosses:
                self._fill(order, order.price, min(trade.qty, order.qty - order.executed), maker=True)
            if order.status != "FILLED":
                still.append(order)
        self._resting = still

    async def _cancel_order(self, request: Any) -> Any:
        from aiohttp import web

        params, bad = self._verify(request)
        if bad is not None:
            return bad
        order = self._find(params)
        if order is None or order.status not in ("NEW", "PARTIALLY_FILLED"):
            return _error(-2011, "Unknown order sent.")
        order.status = "CANCELED"
        order.updated_ms = time.time_ns() // 1_000_000
        self._resting = [o for o in self._resting if o is not order]
        self._report(order, "CANCELED")
        return web.json_response(self._order_json(order), headers=self._weight(1))

    async def _query_order(self, request: Any) -> Any:
        from aiohttp import web

        params, bad = self._verify(request)
        if bad is not None:
            return bad
        order = self._find(params)
        if order is None:
            return _error(-2013, "Order does not exist.")
        return web.json_response(self._order_json(order), headers=self._weight(4))

    def _find(self, params: dict[str, str]) -> SimOrder | None:
        if "orderId" in params:
            try:
                return self.orders.get(int(params["orderId"]))
            except ValueError:
                return None
        cid = params.get("origClientOrderId")
        if cid:
            for order in self.orders.values():
                if order.client_order_id == cid:
                    return order
        return None

    # ------------------------------------------------------------------ user data stream
    async def _new_listen_key(self, request: Any) -> Any:
        from aiohttp import web

        bad = self._check_key(request)
        if bad is not None:
            return bad
        key = secrets.token_urlsafe(24)
        self._listen_keys[key] = request.headers["X-MBX-APIKEY"]
        return web.json_response({"listenKey": key}, headers=self._weight(2))

    async def _keepalive_listen_key(self, request: Any) -> Any:
        from aiohttp import web

        bad = self._check_key(request)
        if bad is not None:
            return bad
        if request.query.get("listenKey") not in self._listen_keys:
            return _error(-1125, "This listenKey does not exist.")
        return web.json_response({}, headers=self._weight(2))

    async def _user_ws(self, request: Any) -> Any:
        from aiohttp import web

        key = request.match_info["listen_key"]
        api_key = self._listen_keys.get(key)
        if api_key is None:
            return _error(-1125, "This listenKey does not exist.")
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._user_clients.setdefault(api_key, []).append(ws)
        try:
            async for _ in ws:
                pass
        finally:
            self._user_clients[api_key].remove(ws)
        return ws

    def _report(self, o: SimOrder, exec_type: str, *, last_qty: float = 0.0, last_px: float = 0.0,
                fee: float = 0.0, maker: bool = False) -> None:
        now = time.time_ns() // 1_000_000
        trade_id = next(self._trade_ids) if exec_type == "TRADE" else -1
        event = {"e": "executionReport", "E": now, "s": o.symbol, "c": o.client_order_id, "S": o.side,
                 "o": o.type, "f": o.time_in_force or "GTC", "q": _fmt(o.qty), "p": _fmt(o.price), "P": "0.0",
                 "F": "0.0", "g": -1, "C": "", "x": exec_type, "X": o.status, "r": "NONE", "i": o.order_id,
                 "l": _fmt(last_qty), "z": _fmt(o.executed), "L": _fmt(last_px), "n": _fmt(fee), "N": "USDT",
                 "T": now, "t": trade_id, "w": o.status in ("NEW", "PARTIALLY_FILLED"), "m": maker, "M": False,
                 "O": o.created_ms, "Z": _fmt(o.quote_qty), "Y": _fmt(last_px * last_qty), "Q": "0.0"}
        text = msgspec.json.encode(event).decode()
        for ws in list(self._user_clients.get(o.api_key, ())):
            task = asyncio.ensure_future(ws.send_str(text))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ views
    def state(self) -> dict[str, Any]:
        """Return what the exchange did and its accounts (``GET /sim/state`` serves this as JSON)."""
        marks = self.marks()
        return {"finished": self.finished.is_set(), "speed": self.speed, "played": self.played,
                "messages_sent": self.messages_sent, "diffs_played": self.diffs_played,
                "depth_requests": self.depth_requests, "orders": len(self.orders),
                "accounts": {key: {"cash": a.cash, "positions": a.positions, "fees": a.fees, "trades": a.trades,
                                   "pnl": a.equity_change(marks)}
                             for key, a in self.accounts.items() if key == self.api_key}}

    async def _state(self, request: Any) -> Any:
        from aiohttp import web

        return web.Response(body=msgspec.json.encode(self.state()), content_type="application/json")

    def marks(self) -> dict[str, float]:
        """Return each symbol's mid (the last trade price when a side is empty)."""
        out = {}
        for symbol, book in self.books.items():
            mid = book.mid() if book.is_live else None
            out[symbol] = mid if mid is not None else self._last_trade.get(symbol, math.nan)
        return out

    def __repr__(self) -> str:
        return f"LocalExchange(port={self.port}, played={self.played}, orders={len(self.orders)})"




def main(argv: list[str] | None = None) -> int:
    """Run a local exchange until SIGTERM / SIGINT or until stdin closes (the parent went away).

    ``python -m kimiha.venues.binance.sim [--recording PATH ...] [--speed X] [--port N]``; the API key and
    secret come from ``KIMIHA_SIM_API_KEY`` / ``KIMIHA_SIM_API_SECRET`` (random otherwise). When it listens it
    prints one JSON line ``{"port": N}`` on stdout.
    """
    import argparse
    import os
    import signal
    import stat
    import sys

    import kimiha

    ap = argparse.ArgumentParser(prog="python -m kimiha.venues.binance.sim", description=main.__doc__)
    ap.add_argument("--recording", action="append", help="recording to play (default: the shipped tape)")
    ap.add_argument("--speed", type=float, default=1.0, help="playback speed (default 1; 0: as fast as possible)")
    ap.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    args = ap.parse_args(argv)

    async def serve() -> None:
        exchange = LocalExchange(args.recording, speed=args.speed or None, port=args.port,
                                 api_key=os.environ.get("KIMIHA_SIM_API_KEY"),
                                 api_secret=os.environ.get("KIMIHA_SIM_API_SECRET"))
        await exchange.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:  # a parent holding our stdin pipe: its end closing stops us (not for /dev/null or a file)
            mode = os.fstat(sys.stdin.fileno()).st_mode
            if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):  # a pipe, or the socket pair uvloop gives a child
                fd = sys.stdin.fileno()
                loop.add_reader(fd, lambda: stop.set() if not os.read(fd, 4096) else None)
        except (OSError, ValueError):
            pass
        sys.stdout.write(msgspec.json.encode({"port": exchange.port}).decode() + "\n")
        sys.stdout.flush()
        try:
            await stop.wait()
        finally:
            await exchange.stop()

    kimiha.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
