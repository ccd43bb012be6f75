"""Live Binance spot orders: REST new / cancel / query, the user data stream, and the executor task.

* :class:`BinanceOrderClient` -- ``POST /api/v3/order`` (MARKET; LIMIT with GTC, IOC or FOK), ``DELETE`` (cancel)
  and ``GET`` (query), signed (see :mod:`kimiha.venues.binance.signing`), over a
  :class:`~kimiha.venues.binance.rest.BinanceRest` that maps Binance's error codes to kimiha errors;
* :class:`UserDataStream` -- a listen key (``POST /api/v3/userDataStream``, kept alive every 30 minutes) and the
  websocket ``<ws_url>/ws/<listenKey>`` whose ``executionReport`` events carry acknowledgements and fills
  (reconnected with backoff when it drops);
* :class:`BinanceExecutorTask` -- the executor beside the paper one: each :class:`~kimiha.trading.model.Order`
  of the ``Orders`` channel becomes a REST order, its execution reports are gathered per order, and when the
  order is done (filled, expired, cancelled, rejected) one :class:`~kimiha.trading.model.Fill` goes to the
  ``Fills`` channel, as the paper executor does. It keeps the account from the reports and measures
  tick-to-trade: from the receive time of the market data the order was decided on to the moment its request
  is written.

:func:`check_order_url` refuses Binance's production hosts unless ``mainnet=True`` (``--mainnet``): the
executor's defaults are the spot testnet's URLs.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import math
import re
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from kimiha._core import LatencyHistogram
from kimiha.error import InvalidConfigurationError
from kimiha.event_bus import EventBus
from kimiha.trading.book import OrderBook
from kimiha.trading.model import Fill, Liquidity, Order, OrderType, Side
from kimiha.trading.paper import PaperExecutor
from kimiha.trading.tasks import TradingEvent
from kimiha.types import Executor
from kimiha.venues.binance.rest import (STATUS_UNKNOWN_CODES, BinanceAuthError, BinanceError, BinanceRest,
                                        BinanceUnavailable, BinanceUnknownOrder, backoff_delay)

__all__ = [
    "MAINNET_HOSTS",
    "BinanceExecutorTask",
    "BinanceOrderClient",
    "ExecutionReport",
    "UserDataStream",
    "check_order_url",
]

logger = logging.getLogger(__name__)

#: Hosts of Binance's production spot API and streams: orders there are real money.
MAINNET_HOSTS = frozenset({
    "api.binance.com", "api1.binance.com", "api2.binance.com", "api3.binance.com", "api4.binance.com",
    "api-gcp.binance.com", "stream.binance.com", "ws-api.binance.com", "data-stream.binance.vision",
    "data-api.binance.vision", "binance.com", "www.binance.com",
})

_LISTEN_KEY = re.compile(r"[A-Za-z0-9_-]{1,256}")  # it becomes a URL path segment: nothing else is taken
_FINAL = frozenset({"FILLED", "CANCELED", "EXPIRED", "REJECTED", "EXPIRED_IN_MATCH"})
#: Settled orders the executor remembers, to tell a late or repeated report of one from another client's.
_SETTLED_KEPT = 1024


def _canonical_host(url: str) -> str:
    """Return the host of ``url`` as a resolver sees it: IDNA-mapped (fullwidth letters and dots folded), lower
    case, without the trailing dot of a fully qualified name."""
    host = urllib.parse.urlsplit(url.strip()).hostname or ""
    try:
        host = host.encode("idna").decode("ascii")
    except UnicodeError:
        pass  # not a name a resolver takes either; compared as it is
    return host.lower().rstrip(".")


def _is_mainnet_host(host: str) -> bool:
    if host in MAINNET_HOSTS or host == "binance.com" or host.endswith(".binance.com"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    # An address literal cannot be told apart from a production host without a DNS lookup: only loopback and
    # private addresses (a local exchange, a proxy on this network) pass without --mainnet.
    return not (address.is_loopback or address.is_private)


def check_order_url(url: str, *, mainnet: bool, what: str = "--rest-url") -> None:
    """Refuse an order URL on Binance's production hosts unless ``mainnet`` is True.

    Production means any ``binance.com`` host (and the others of :data:`MAINNET_HOSTS`), however it is
    spelled (case, a trailing dot, a ``user@`` part, IDNA look-alikes), and any public IP address literal
    (which cannot be told apart from a production host without resolving its name).

    Raises
    ------
    InvalidConfigurationError
        Naming the option and the host.
    """
    host = _canonical_host(url)
    if _is_mainnet_host(host) and not mainnet:
        raise InvalidConfigurationError(
            f"{what}: {host} is (or may be) Binance's production exchange, where orders trade real money; "
            f"the Binance executor refuses it unless --mainnet is given (its default is the spot testnet)")


class ExecutionReport(msgspec.Struct):
    """The fields of Binance's ``executionReport`` the executor reads (see Binance's user data stream docs)."""

    e: str
    E: int
    s: str
    c: str  # client order id
    S: str  # side
    o: str  # order type
    x: str  # execution type: NEW, TRADE, CANCELED, EXPIRED, REJECTED ...
    X: str  # order status
    i: int  # order id
    q: float  # order quantity
    l: float  # noqa: E741 - Binance's name: last executed quantity
    z: float  # cumulative filled quantity
    L: float  # last executed price
    n: float = 0.0  # commission of this trade
    N: str | None = None  # commission asset
    T: int = 0  # transaction time (ms)
    m: bool = False  # maker
    Z: float = 0.0  # cumulative quote quantity
    r: str = "NONE"  # reject reason
    t: int = -1  # trade id (-1 for reports that are not trades)


_REPORT = msgspec.json.Decoder(ExecutionReport, strict=False)


def _fee_in_quote(r: ExecutionReport) -> float:
    """Return a trade's commission in the quote asset: Binance charges the quote asset (as is), the base asset
    (a buyer's fee: times the price), or another asset such as BNB (counted as is: no price for it here)."""
    asset = r.N or ""
    if asset and r.s.startswith(asset) and not r.s.endswith(asset):
        return r.n * r.L
    return r.n


def _decimal(x: float) -> str:
    """Format a quantity or price for Binance (plain decimal, no exponent, at most 8 decimals)."""
    text = f"{x:.8f}".rstrip("0").rstrip(".")
    return text or "0"


class BinanceOrderClient:
    """Signed order requests (new, cancel, query) over a :class:`BinanceRest` that has a signer."""

    def __init__(self, rest: BinanceRest) -> None:
        if rest.signer is None:
            raise InvalidConfigurationError("BinanceOrderClient: the REST client needs a signer (an API key)")
        self.rest = rest

    async def new_order(self, symbol: str, side: str, order_type: str, quantity: float, *,
                        price: float | None = None, time_in_force: str | None = None,
                        client_order_id: str | None = None, resp_type: str = "RESULT",
                        on_send: Callable[[], None] | None = None) -> Any:
        """``POST /api/v3/order``; return Binance's answer (a dict). ``on_send``: see
        :meth:`BinanceRest.request`."""
        params: dict[str, Any] = {"symbol": symbol.upper(), "side": side.upper(), "type": order_type.upper(),
                                  "quantity": _decimal(quantity), "newOrderRespType": resp_type}
        if order_type.upper() == "LIMIT":
            if price is None:
                raise InvalidConfigurationError("new_order: a LIMIT order needs a price")
            params["price"] = _decimal(price)
            params["timeInForce"] = (time_in_force or "GTC").upper()
        if client_order_id:
            params["newClientOrderId"] = client_order_id
        return await self.rest.signed("POST", "/api/v3/order", params, on_send=on_send)

    async def cancel_order(self, symbol: str, *, order_id: int | None = None,
                           client_order_id: str | None = None) -> Any:
        """``DELETE /api/v3/order`` by exchange id or client id; return Binance's answer."""
        return await self.rest.signed("DELETE", "/api/v3/order", self._which(symbol, order_id, client_order_id))

    async def query_order(self, symbol: str, *, order_id: int | None = None,
                          client_order_id: str | None = None) -> Any:
        """``GET /api/v3/order``; return Binance's answer."""
        return await self.rest.signed("GET", "/api/v3/order", self._which(symbol, order_id, client_order_id))

    @staticmethod
    def _which(symbol: str, order_id: int | None, client_order_id: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {"symbol": symbol.upper()}
        if order_id is not None:
            params["orderId"] = order_id
        elif client_order_id:
            params["origClientOrderId"] = client_order_id
        else:
            raise InvalidConfigurationError("cancel/query: give order_id or client_order_id")
        return params


class _UserListener:
    """picows listener of the user data stream (mixed with ``picows.WSListener`` when picows is imported)."""

    def __init__(self, stream: UserDataStream) -> None:
        self.stream = stream

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        picows = self.stream._picows
        if frame.msg_type is picows.WSMsgType.TEXT:
            self.stream._on_text(frame.get_payload_as_bytes())
        elif frame.msg_type is picows.WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code(), frame.get_close_message())
            transport.disconnect()


class UserDataStream:
    """Binance's user data stream: a listen key and its websocket, calling ``on_report`` for each
    ``executionReport`` (other events are counted and ignored). The key is kept alive every ``keepalive_s``;
    when the server says it no longer exists (``-1125``: expired, closed) a new one is taken and the socket
    reconnected on it (counted in ``renewed_keys``)."""

    def __init__(self, rest: BinanceRest, ws_url: str, on_report: Any, *, keepalive_s: float = 1800.0,
                 connect_timeout: float = 10.0) -> None:
        import picows

        self._picows = picows
        self.rest = rest
        self.ws_url = ws_url.rstrip("/")
        self.on_report = on_report
        self.keepalive_s = keepalive_s
        self.connect_timeout = connect_timeout
        self.listen_key = ""
        self.reports = 0
        self.other_events = 0
        self.bad_events = 0
        self.reconnects = 0
        self.renewed_keys = 0
        self._transport: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    async def start(self) -> None:
        """Get a listen key and connect (raises :class:`BinanceError` when either fails)."""
        await self._new_listen_key()
        transport = await self._connect()
        self._task = asyncio.ensure_future(self._run(transport))

    async def _new_listen_key(self) -> None:
        answer = await self.rest.json("POST", "/api/v3/userDataStream", api_key=True)
        key = answer.get("listenKey") if isinstance(answer, dict) else None
        if not isinstance(key, str) or not _LISTEN_KEY.fullmatch(key):
            raise BinanceUnavailable(f"Binance POST /api/v3/userDataStream at {self.rest.base_url}: expected "
                                     f"{{\"listenKey\": \"<letters, digits, - or _>\"}}, got {str(answer)[:100]}",
                                     request="POST /api/v3/userDataStream")
        self.listen_key = key

    async def _connect(self) -> Any:
        picows = self._picows
        listener = type("_UserListener", (_UserListener, picows.WSListener), {})
        stream = self

        url = f"{self.ws_url}/ws/{self.listen_key}"
        try:
            transport, _ = await asyncio.wait_for(picows.ws_connect(lambda: listener(stream), url, enable_auto_pong=True),
                                                  self.connect_timeout)
        except (OSError, asyncio.TimeoutError, picows.WSError) as exc:
            raise BinanceUnavailable(f"Binance user data stream {self.ws_url}: cannot connect: "
                                     f"{exc or type(exc).__name__}") from None
        self._transport = transport
        return transport

    def _on_text(self, payload: bytes) -> None:
        if b'"executionReport"' not in payload:
            self.other_events += 1
            return
        try:
            report = _REPORT.decode(payload)
        except msgspec.DecodeError as exc:
            self.bad_events += 1
            if self.bad_events <= 5:
                logger.warning("Binance user data stream: skipped an executionReport that does not decode: %s", exc)
            return
        self.reports += 1
        self.on_report(report)

    async def _run(self, transport: Any) -> None:
        attempt = 0
        last_keepalive = time.monotonic()
        while not self._stopping:
            done = asyncio.ensure_future(transport.wait_disconnected())
            while not done.done():
                await asyncio.wait([done], timeout=min(self.keepalive_s, 60.0))
                if time.monotonic() - last_keepalive >= self.keepalive_s:
                    last_keepalive = time.monotonic()
                    try:
                        await self.rest.request("PUT", "/api/v3/userDataStream", {"listenKey": self.listen_key},
                                                api_key=True)
                    except BinanceError as exc:
                        logger.warning("Binance user data stream: keepalive failed: %s", exc)
                        if exc.code == -1125:  # the key expired (or was closed): get a new one, reconnect on it
                            try:
                                await self._new_listen_key()
                            except BinanceError as exc2:
                                logger.warning("Binance user data stream: cannot get a new listen key: %s", exc2)
                                continue
                            self.renewed_keys += 1
                            transport.disconnect()
            if self._stopping:
                return
            while not self._stopping:
                attempt += 1
                await asyncio.sleep(backoff_delay(attempt, 0.1, 30.0))
                try:
                    transport = await self._connect()
                except BinanceError as exc:
                    logger.warning("Binance user data stream: %s; retrying", exc)
                    continue
                self.reconnects += 1
                attempt = 0
                break

    async def close(self) -> None:
        """Disconnect and stop reconnecting."""
        self._stopping = True
        if self._transport is not None:
            self._transport.disconnect()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


class _Working:
    __slots__ = ("fee", "levels", "maker", "order", "quote_qty", "reports", "filled", "trade_ids", "unseen")

    def __init__(self, order: Order) -> None:
        self.order = order
        self.filled = 0.0
        self.quote_qty = 0.0
        self.fee = 0.0
        self.levels = 0
        self.maker = True
        self.reports: list[str] = []
        self.trade_ids: set[int] = set()
        self.unseen = 0.0  # quantity its final report settled whose trade reports had not arrived


class BinanceExecutorTask(Executor):
    """Send the pipeline's orders to Binance (or a server speaking its protocol) and report their fills.

    Parameters
    ----------
    bus : EventBus
        The trading bus (``Orders`` in, ``Fills`` out).
    rest : BinanceRest
        REST client with a signer (see :func:`~kimiha.venues.binance.signing.signer_from_env`).
    ws_url : str
        Websocket base URL of the user data stream.
    symbol : str
        Symbol for orders that name none.
    time_in_force : str, default "IOC"
        For LIMIT orders (``GTC``, ``IOC``, ``FOK``); IOC behaves as the paper executor does.
    mainnet : bool, default False
        Allow Binance's production hosts (see :func:`check_order_url`).

    Attributes
    ----------
    account : PaperExecutor
        The account kept from the execution reports (position, cash, realized PnL, fees; its book is unused).
    tick_to_trade : LatencyHistogram
        Receive time of the deciding market data -> the order's signed request handed to the HTTP client, ns.
    sent, acked, rejected, reports : int
        Orders sent, acknowledged (answered 2xx, or found by a query after no answer or a 5xx), refused (by
        the server or before sending), execution reports received.
    foreign_reports, duplicate_reports, late_reports, overfills : int
        Reports of orders this executor does not know (another client's, or of an order settled before the
        last 1,024 it remembers), trade reports received again (the same trade id, or a trade of a settled
        order whose quantity its final report did not leave unaccounted for; counted once in the fill),
        reports of an order that arrived after its final report (a trade the final report's cumulative
        quantity had already settled: its fee is booked then, its quantity never twice; other reports:
        nothing to book), trades that took an order past its quantity (booked as the server reports them).
        Each is logged the first time.
    reconciled : int
        Final reports whose cumulative quantity (``z``) exceeded the trades reported so far (an earlier trade
        report overtaken by the final one): the missing quantity is booked at once, in the account and in
        the order's fill (as one more level), at the missing cumulative quote (``Z``) over it (at the order's
        limit price, or the average of the trades seen, from a server that sends no ``Z``). The fee of those
        unseen trades is not known then: the fill's fee lacks it (and its liquidity is that of the trades
        seen); the account books the fee when their reports arrive (``late_reports``). Logged the first time.
    unanswered : int
        New orders that got no answer (a timeout) or a 5xx answer (the execution status is unknown: the
        order may have been taken): the server is asked by client id whether it has them; if it has (or
        their final execution report arrives meanwhile), they count as acknowledged and their execution
        reports settle them as usual, otherwise they are refused. A new order is never sent again after a 5xx
        or no answer (:class:`BinanceRest` resends a request only after a ``429`` or a ``-1021``, which the
        server refused without taking it, and with the same client order id).
    errors : list of str
        The first refusals' messages.
    digest : str
        ``sha256(sha256(O) + sha256(F)).hexdigest()`` as the paper executor's, where ``O`` is every order the
        server acknowledged (in the order acknowledged) and ``F`` every fill published (refusals included).
    fatal : BinanceAuthError or None
        Set when the server refused the key or the signature (``-1022``, ``-2015`` ...): a configuration error,
        not a per-order reject. Later orders are refused without being sent; the runner stops on it.
    """

    def __init__(self, bus: EventBus, rest: BinanceRest, ws_url: str, *, symbol: str = "",
                 time_in_force: str = "IOC", mainnet: bool = False, name: str = "binance-executor") -> None:
        check_order_url(rest.base_url, mainnet=mainnet, what="--rest-url")
        check_order_url(ws_url, mainnet=mainnet, what="--ws-url")
        if time_in_force not in ("GTC", "IOC", "FOK"):
            raise InvalidConfigurationError(f"BinanceExecutorTask: time_in_force must be GTC, IOC or FOK, got "
                                            f"{time_in_force!r}")
        self.name = name
        self.rest = rest
        self.client = BinanceOrderClient(rest)
        self.symbol = symbol.upper()
        self.time_in_force = time_in_force
        self.stream = UserDataStream(rest, ws_url, self._on_report)
        self.account = PaperExecutor(OrderBook(), fee_bps=0.0)
        self.tick_to_trade = LatencyHistogram()
        self.sent = 0
        self.acked = 0
        self.rejected = 0
        self.reports = 0
        self.foreign_reports = 0
        self.duplicate_reports = 0
        self.late_reports = 0
        self.overfills = 0
        self.reconciled = 0
        self.unanswered = 0
        self.errors: list[str] = []
        self.fatal: BinanceAuthError | None = None
        self._encode = msgspec.msgpack.Encoder().encode
        self._orders_hash = hashlib.sha256()
        self._fills_hash = hashlib.sha256()
        self.history: list[tuple[str, str, str]] = []  # (client order id, execution type, status), in order
        self._prefix = f"k{secrets.token_hex(3)}-"
        self._working: dict[str, _Working] = {}
        self._settled: OrderedDict[str, _Working] = OrderedDict()  # the last _SETTLED_KEPT orders settled
        self._fills = bus.channel(TradingEvent.FILLS)
        self._out: asyncio.Queue[Fill] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None

    def subscribed_event(self) -> TradingEvent:
        return TradingEvent.ORDERS

    async def initialize(self) -> None:
        await self.rest.sync_time()
        await self.stream.start()
        self._pump = asyncio.ensure_future(self._publish_fills())

    async def _publish_fills(self) -> None:
        while True:
            fill = await self._out.get()
            await self._fills.publish_async(fill)

    def client_order_id(self, order_id: int) -> str:
        """Return the ``newClientOrderId`` the executor sends for the pipeline's order ``order_id``."""
        return f"{self._prefix}{order_id}"

    async def handle_event(self, order: Order) -> None:
        cid = self.client_order_id(order.order_id)
        symbol = order.symbol or self.symbol
        work = _Working(order)
        self._working[cid] = work
        limit = OrderType(order.order_type) is OrderType.LIMIT
        measured: list[int] = []

        def sending() -> None:  # the first attempt only: a retry after a 429 or -1021 is not the tick's
            if not measured and order.ts_ns > 0:
                measured.append(1)
                self.tick_to_trade.record(max(time.time_ns() - order.ts_ns, 0))

        if self.fatal is not None:  # the key or signature was refused: sending more would only repeat it
            self._refused(cid, order, str(self.fatal), log=False)
            return
        self.sent += 1
        try:
            await self.client.new_order(symbol, "BUY" if order.side == Side.BUY else "SELL",
                                        "LIMIT" if limit else "MARKET", order.qty, price=order.price,
                                        time_in_force=self.time_in_force if limit else None, client_order_id=cid,
                                        on_send=sending)
        except BinanceAuthError as exc:
            if self.fatal is None:
                self.fatal = exc  # the runner stops on it and reports it (one line): not logged here too
                logger.debug("%s: fatal: %s", self.name, exc)
            self._refused(cid, order, str(exc), log=False)
            return
        except BinanceUnavailable as exc:
            # No answer at all, a 5xx, or -1006 / -1007 under any status: the problem is on the server's side and
            # the order's execution status is unknown (Binance's API docs): it may be on the book all the same. A 3xx (a redirect, not
            # followed) never reached the API: refused.
            if exc.status is None or exc.status >= 500 or exc.code in STATUS_UNKNOWN_CODES:
                await self._unanswered(cid, symbol, order, str(exc))
            else:
                self._refused(cid, order, str(exc))
            return
        except BinanceError as exc:
            self._refused(cid, order, str(exc))
            return
        self._acknowledged(order)

    def _acknowledged(self, order: Order) -> None:
        self.acked += 1
        self._orders_hash.update(self._encode(order))

    async def _unanswered(self, cid: str, symbol: str, order: Order, message: str) -> None:
        """A new order got no answer (timeout, dropped connection) or a 5xx (its execution status is unknown):
        ask the server whether it has it, by its client id. Known: its execution reports settle it as usual.
        Unknown: refused. No answer to the queries either: kept as working (counted in ``unanswered``;
        :meth:`shutdown` names what is left)."""
        self.unanswered += 1
        logger.warning("%s: order %s: %s; asking the server whether it took the order", self.name, order.order_id,
                       message)
        for attempt in range(1, 4):
            if cid not in self._working:
                # Its final execution report arrived meanwhile: the server had it (an order refused leaves
                # _working only on this path, which returns).
                self._acknowledged(order)
                return
            try:
                await self.client.query_order(symbol, client_order_id=cid)
            except BinanceUnknownOrder:
                self._refused(cid, order, message)
                return
            except BinanceError as exc:
                message = str(exc)
                await asyncio.sleep(backoff_delay(attempt, 0.2, 2.0))
                continue
            self._acknowledged(order)
            return
        logger.warning("%s: order %s: still no answer (%s); kept as working until an execution report settles it",
                       self.name, order.order_id, message)

    @property
    def digest(self) -> str:
        """Return the digest of the acknowledged orders and the fills published (see the class)."""
        return hashlib.sha256(self._orders_hash.digest() + self._fills_hash.digest()).hexdigest()

    def _emit(self, fill: Fill) -> None:
        self._fills_hash.update(self._encode(fill))
        self._out.put_nowait(fill)

    def _refused(self, cid: str, order: Order, message: str, log: bool = True) -> None:
        self.rejected += 1
        if len(self.errors) < 20:
            self.errors.append(message)
        if log and self.rejected <= 5:
            logger.warning("%s: order %s refused: %s", self.name, order.order_id, message)
        if self._working.pop(cid, None) is not None:
            # Always answer, as the paper executor does: the strategy releases the order's in-flight quantity.
            self._emit(Fill(order.order_id, order.side, 0.0, math.nan, 0.0, order.ts_ns,
                                      requested_qty=order.qty, symbol=order.symbol or self.symbol))

    def _on_report(self, r: ExecutionReport) -> None:
        self.reports += 1
        work = self._working.get(r.c)
        if work is None:
            settled = self._settled.get(r.c)
            if settled is not None:
                self._late_report(settled, r)
                return
            self.foreign_reports += 1
            if self.foreign_reports == 1:
                logger.warning("%s: an executionReport for an order it does not know (client id %r, %s %s); "
                               "ignored (counted in foreign_reports)", self.name, r.c, r.x, r.X)
            return
        if r.x == "TRADE" and r.l > 0:
            # A trade is counted once: by its id, or (a server that sends no ids) by the cumulative quantity.
            seen = r.t in work.trade_ids if r.t >= 0 else r.z <= work.filled
            if seen:
                self.duplicate_reports += 1
                if self.duplicate_reports == 1:
                    logger.warning("%s: order %s: trade %d (cumulative %g) reported again; counted once",
                                   self.name, r.c, r.t, r.z)
                return
            if r.t >= 0:
                work.trade_ids.add(r.t)
            if work.filled + r.l > work.order.qty * (1 + 1e-9):
                self.overfills += 1
                if self.overfills == 1:
                    logger.warning("%s: order %s: trades of %g take it past its quantity %g; booked as the server "
                                   "reports them", self.name, r.c, work.filled + r.l, work.order.qty)
        self.history.append((r.c, r.x, r.X))
        work.reports.append(r.x)
        if r.x == "TRADE" and r.l > 0:
            fee = _fee_in_quote(r)
            work.filled += r.l
            work.quote_qty += r.l * r.L
            work.fee += fee
            work.levels += 1
            work.maker = work.maker and r.m
            side = Side.BUY if r.S == "BUY" else Side.SELL
            self.account._book_fill(side, r.l, r.L, r.l * r.L, fee)
        if r.X in _FINAL:
            del self._working[r.c]
            self._reconcile(work, r)
            self._settled[r.c] = work
            if len(self._settled) > _SETTLED_KEPT:
                self._settled.popitem(last=False)
            order = work.order
            filled = work.filled
            if filled > 0:
                self.account.fills += 1
                if filled < order.qty:
                    self.account.partial_fills += 1
            else:
                self.account.unfilled += 1
            self.account.orders += 1
            self._emit(Fill(order.order_id, order.side, filled,
                                      work.quote_qty / filled if filled else math.nan, work.fee, r.T * 1_000_000,
                                      Liquidity.MAKER if filled and work.maker else Liquidity.TAKER, order.qty,
                                      work.levels, r.s))

    def _reconcile(self, work: _Working, r: ExecutionReport) -> None:
        """Book what a final report's cumulative quantities (``z``, ``Z``) hold beyond the trades reported so
        far: trades whose reports the final one overtook (see ``reconciled`` in the class docstring)."""
        missing = r.z - work.filled
        if not missing > 1e-9 * r.z:  # in order: the trades seen sum to z (up to rounding)
            return
        order = work.order
        missing_quote = r.Z - work.quote_qty
        if missing_quote > 0:
            price = missing_quote / missing
        else:  # a server that sends no cumulative quote quantity (Binance always does)
            price = order.price or (work.quote_qty / work.filled if work.filled else math.nan)
            missing_quote = missing * price
        if not (price > 0 and math.isfinite(price)):
            logger.warning("%s: order %s: its final report (%s, cumulative %g) came before trades of %g it "
                           "had not seen, and carries no cumulative quote quantity to price them: not booked",
                           self.name, r.c, r.X, r.z, missing)
            return
        self.reconciled += 1
        if self.reconciled == 1:
            logger.warning("%s: order %s: its final report (%s, cumulative %g) came before trades it had "
                           "not seen (it had seen %g): booked %g at %g (the reported cumulative quote); "
                           "their fee is booked when their reports arrive (counted in reconciled)", self.name,
                           r.c, r.X, r.z, work.filled, missing, price)
        if work.filled <= order.qty * (1 + 1e-9) < r.z:  # (trades seen past it were counted already)
            self.overfills += 1
            if self.overfills == 1:
                logger.warning("%s: order %s: trades of %g take it past its quantity %g; booked as the "
                               "server reports them", self.name, r.c, r.z, order.qty)
        work.filled = r.z
        work.quote_qty += missing_quote
        work.unseen = missing
        work.levels += 1
        self.account._book_fill(Side.BUY if r.S == "BUY" else Side.SELL, missing, price, missing_quote, 0.0)

    def _late_report(self, work: _Working, r: ExecutionReport) -> None:
        """A report of an order already settled: a trade its final report overtook (its quantity booked
        then: its fee is booked now), a repeated trade (counted once), or a stale status report (nothing to
        book). A trade past what is booked (its final report could not be priced, or a server reporting
        trades past the final cumulative quantity) is booked whole, as the server reports it."""
        trade = r.x == "TRADE" and r.l > 0
        covered = trade and r.l <= work.unseen * (1 + 1e-9) + 1e-12
        beyond = trade and not covered and r.z > work.filled * (1 + 1e-9)
        if trade and ((r.t >= 0 and r.t in work.trade_ids) or not (covered or beyond)):
            self.duplicate_reports += 1
            if self.duplicate_reports == 1:
                logger.warning("%s: order %s: trade %d (cumulative %g) reported again after its final "
                               "report; counted once", self.name, r.c, r.t, r.z)
            return
        self.late_reports += 1
        self.history.append((r.c, r.x, r.X))
        work.reports.append(r.x)
        fee = _fee_in_quote(r) if trade else 0.0
        if r.t >= 0 and trade:
            work.trade_ids.add(r.t)
        if covered:
            work.unseen = max(work.unseen - r.l, 0.0)
            self.account.fees_paid += fee  # the quantity and the quote were booked with the final report
            self.account.cash -= fee
            done = f"its quantity was booked with the final report, its fee {fee:g} now"
        elif beyond:
            if work.filled + r.l > work.order.qty * (1 + 1e-9):
                self.overfills += 1
                if self.overfills == 1:
                    logger.warning("%s: order %s: trades of %g take it past its quantity %g; booked as the "
                                   "server reports them", self.name, r.c, work.filled + r.l, work.order.qty)
            work.filled += r.l
            self.account._book_fill(Side.BUY if r.S == "BUY" else Side.SELL, r.l, r.L, r.l * r.L, fee)
            done = "its final report had not covered it: booked now (its fill was published without it)"
        else:
            done = "nothing to book"
        if self.late_reports == 1:
            what = f"trade {r.t} of {r.l:g} at {r.L:g} (cumulative {r.z:g})" if trade else f"a {r.x} report"
            logger.warning("%s: order %s: %s arrived after its final report; %s (counted in late_reports)",
                           self.name, r.c, what, done)

    @property
    def working(self) -> int:
        """Return the number of orders sent whose final report has not arrived."""
        return len(self._working)

    async def shutdown(self) -> None:
        deadline = time.monotonic() + 2.0
        while self._working and time.monotonic() < deadline:  # reports of the last orders still on their way
            await asyncio.sleep(0.02)
        while not self._out.empty():
            await self._fills.publish_async(self._out.get_nowait())
        if self._pump is not None:
            self._pump.cancel()
            await asyncio.gather(self._pump, return_exceptions=True)
        await self.stream.close()
        if self._working:
            logger.warning("%s: %d order(s) had no final execution report at shutdown", self.name, len(self._working))
