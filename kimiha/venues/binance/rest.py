"""Binance spot REST: the depth snapshot, signed order requests, rate limits, errors mapped to kimiha errors.

:class:`BinanceRest` is a small client over one ``aiohttp`` session (the ``live`` extra):

* ``GET /api/v3/depth`` (the snapshot the local-book procedure needs), ``/api/v3/ping``, ``/api/v3/time``;
* signed requests (``timestamp`` + ``recvWindow`` + ``signature`` in the query string, the API key in the
  ``X-MBX-APIKEY`` header) with a :class:`~kimiha.venues.binance.signing.Signer`, the local clock corrected by
  the server-time offset (:meth:`BinanceRest.sync_time`); a ``-1021`` (timestamp outside the window) resyncs
  the offset and retries once;
* rate limits: the used request weight is read from ``X-MBX-USED-WEIGHT-1M`` on every answer and requests wait
  for the next minute when it nears the limit; a ``429`` is retried after its ``Retry-After`` (at most
  ``max_retries`` times); a ``418`` (the IP is banned) raises :class:`BinanceRateLimited` with the ban's length
  and is never retried blindly.

Binance answers an error with ``{"code": <negative int>, "msg": "..."}``; :func:`error_from_answer` maps the
codes to the classes below, so callers catch what they can act on (a bad key is not a rejected order).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import msgspec

from kimiha.error import OrchestratorError
from kimiha.venues.binance.signing import Signer

__all__ = [
    "BinanceAuthError",
    "BinanceBadRequest",
    "BinanceError",
    "BinanceOrderRejected",
    "BinanceRateLimited",
    "BinanceRest",
    "BinanceTimestampError",
    "BinanceUnavailable",
    "BinanceUnknownOrder",
    "backoff_delay",
    "error_from_answer",
]

logger = logging.getLogger(__name__)


class BinanceError(OrchestratorError):
    """An error answer of Binance (or of a server speaking its protocol), or no answer at all.

    Attributes
    ----------
    code : int or None
        Binance's error code (``-1022`` ...), None when there was no JSON error body.
    status : int or None
        HTTP status, None when no answer arrived.
    venue_message : str
        Binance's ``msg``.
    request : str
        ``METHOD /path`` of the request (never its query string: it may hold a signature).
    """

    def __init__(self, message: str, *, code: int | None = None, status: int | None = None,
                 venue_message: str = "", request: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.venue_message = venue_message
        self.request = request


class BinanceUnavailable(BinanceError):
    """The server could not be reached, or answered with a 5xx / something that is not Binance's JSON."""


class BinanceAuthError(BinanceError):
    """The request's API key or signature was refused (``-1002``, ``-1022``, ``-2014``, ``-2015``)."""


class BinanceTimestampError(BinanceError):
    """The request's timestamp was outside ``recvWindow`` (``-1021``) even after resyncing the clock offset."""


class BinanceBadRequest(BinanceError):
    """A parameter was missing, malformed or not allowed (``-1100`` ... ``-1199``, ``-1013`` filters)."""


class BinanceOrderRejected(BinanceError):
    """The order was refused (``-2010``: e.g. insufficient balance, or the market cannot take it)."""


class BinanceUnknownOrder(BinanceError):
    """The order to cancel or query does not exist (``-2011``, ``-2013``)."""


class BinanceRateLimited(BinanceError):
    """Too many requests: ``429`` still refused after the retries, or ``418`` (the IP is banned).

    Attributes
    ----------
    retry_after : float
        Seconds the server asked to wait (``Retry-After``).
    banned : bool
        True for a ``418``.
    """

    def __init__(self, message: str, *, retry_after: float, banned: bool, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after
        self.banned = banned


_AUTH_CODES = {-1002, -1022, -2014, -2015}
_UNKNOWN_ORDER_CODES = {-2011, -2013}
#: "Execution status unknown" (-1006 an unexpected answer from Binance's message bus, -1007 its backend's
#: timeout): whatever the HTTP status, the request may have been carried out.
STATUS_UNKNOWN_CODES = frozenset({-1006, -1007})


class _ErrorBody(msgspec.Struct):
    code: int
    msg: str = ""


_ERROR_DECODER = msgspec.json.Decoder(_ErrorBody)


def error_from_answer(status: int, body: bytes, request: str) -> BinanceError:
    """Return the kimiha error for an HTTP error answer of Binance.

    Parameters
    ----------
    status : int
        HTTP status (4xx, 5xx).
    body : bytes
        The answer's body, normally ``{"code": ..., "msg": ...}``.
    request : str
        ``METHOD /path``, for the message.
    """
    try:
        err = _ERROR_DECODER.decode(body)
    except msgspec.DecodeError:
        text = body[:200].decode("utf-8", "replace")
        cls = BinanceUnavailable if status >= 500 else BinanceBadRequest
        return cls(f"Binance {request}: HTTP {status}, expected a JSON error {{code, msg}}, got {text!r}",
                   status=status, request=request)
    code, msg = err.code, err.msg
    head = f"Binance {request}: error {code} (HTTP {status}): {msg}"
    kw: dict[str, Any] = {"code": code, "status": status, "venue_message": msg, "request": request}
    if code in _AUTH_CODES:
        return BinanceAuthError(f"{head} -- check the API key (BINANCE_API_KEY) and its secret or private key, "
                                f"and that they belong to this server", **kw)
    if code == -1021:
        return BinanceTimestampError(f"{head} -- the local clock and the server's differ by more than "
                                     f"recvWindow", **kw)
    if code in _UNKNOWN_ORDER_CODES:
        return BinanceUnknownOrder(head, **kw)
    if code == -2010:
        return BinanceOrderRejected(head, **kw)
    if code == -1003:
        return BinanceRateLimited(head, retry_after=60.0, banned=False, **kw)
    if -1199 <= code <= -1100 or code == -1013:
        return BinanceBadRequest(head, **kw)
    if status >= 500 or code in STATUS_UNKNOWN_CODES:
        return BinanceUnavailable(head, **kw)
    return BinanceError(head, **kw)


def backoff_delay(attempt: int, initial: float, cap: float) -> float:
    """Return the jittered delay before retry number ``attempt`` (1, 2 ...): ``initial`` doubled each time,
    capped at ``cap``, times a random factor in [0.5, 1) so that many clients do not come back together.
    Any ``attempt`` works (a days-long outage does not overflow the doubling)."""
    return min(cap, initial * 2.0 ** min(max(attempt - 1, 0), 60)) * random.uniform(0.5, 1.0)


#: The longest wait a ``Retry-After`` can ask for (Binance's longest IP ban is 3 days); more is a broken server.
MAX_RETRY_AFTER = 3 * 86400.0


def _retry_after(headers: Any, default: float) -> float:
    """Return the ``Retry-After`` seconds of an answer: ``default`` when it is missing or not a finite number,
    0 for a negative one, at most :data:`MAX_RETRY_AFTER`."""
    value = headers.get("Retry-After")
    try:
        seconds = float(value) if value is not None else default
    except ValueError:
        return default
    if not math.isfinite(seconds):
        return default
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def _used_weight(value: str | None) -> int | None:
    """Return the ``X-MBX-USED-WEIGHT-1M`` header's value, None when it is missing or not a plain integer."""
    if value is None or not (value.isascii() and value.isdigit()):
        return None
    return int(value)


class BinanceRest:
    """An async Binance spot REST client (public and signed endpoints).

    Parameters
    ----------
    base_url : str
        E.g. ``https://testnet.binance.vision`` or a local exchange ``http://127.0.0.1:PORT``.
    signer : Signer, optional
        Signs the requests of :meth:`signed`; needed for orders and the user data stream.
    recv_window_ms : int, default 5000
        ``recvWindow`` sent with signed requests.
    timeout : float, default 10.0
        Seconds for one request (connect + answer).
    max_retries : int, default 3
        ``429`` answers retried (after ``Retry-After``) before :class:`BinanceRateLimited` is raised.
    max_retry_wait : float, default 60.0
        The longest ``Retry-After`` of a ``429`` that :meth:`request` waits out itself; a longer one raises
        :class:`BinanceRateLimited` at once (with its ``retry_after``) so the caller decides.
    weight_limit : int, default 6000
        Request weight per minute (Binance spot's ``REQUEST_WEIGHT`` limit); requests wait for the next
        minute once ``X-MBX-USED-WEIGHT-1M`` reaches 95 % of it.

    Attributes
    ----------
    used_weight : int
        The latest ``X-MBX-USED-WEIGHT-1M``.
    time_offset_ms : int
        Server time minus local time, added to signed requests' timestamps.
    requests, retried_429, weight_waits : int
        Requests sent, 429 answers waited out, waits for the weight window.
    """

    def __init__(self, base_url: str, *, signer: Signer | None = None, recv_window_ms: int = 5000,
                 timeout: float = 10.0, max_retries: int = 3, weight_limit: int = 6000,
                 max_retry_wait: float = 60.0) -> None:
        import aiohttp  # the live extra

        self._aiohttp = aiohttp
        self.base_url = base_url.rstrip("/")
        self.signer = signer
        self.recv_window_ms = recv_window_ms
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.weight_limit = weight_limit
        self.used_weight = 0
        self.time_offset_ms = 0
        self.requests = 0
        self.retried_429 = 0
        self.weight_waits = 0
        self._weight_minute = 0
        self._session: Any = None

    def _get_session(self) -> Any:
        if self._session is None or self._session.closed:
            aiohttp = self._aiohttp
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=16, ttl_dns_cache=300))
        return self._session

    async def close(self) -> None:
        """Close the HTTP session (idempotent)."""
        if self._session is not None and not self._session.closed:
            await self._session.close()

    async def _respect_weight(self) -> None:
        minute = int(time.time() // 60)
        if minute != self._weight_minute:
            self._weight_minute = minute
            self.used_weight = 0
            return
        if self.used_weight >= 0.95 * self.weight_limit:
            self.weight_waits += 1
            wait = 60.0 - time.time() % 60 + 0.05
            logger.warning("Binance REST %s: used weight %d of %d this minute; waiting %.1f s for the next one",
                           self.base_url, self.used_weight, self.weight_limit, wait)
            await asyncio.sleep(wait)
            self._weight_minute = int(time.time() // 60)
            self.used_weight = 0

    async def request(self, method: str, path: str, params: dict[str, Any] | None = None, *,
                      signed: bool = False, api_key: bool = False,
                      on_send: Callable[[], None] | None = None) -> tuple[bytes, int]:
        """Send one request; return ``(body, recv_ts_ns)`` of a 2xx answer (receive time: ``time.time_ns()``).

        ``on_send`` is called right before each attempt goes to the HTTP client (signed, URL built): what
        tick-to-trade measures up to.

        Raises
        ------
        BinanceError
            The mapped error of an error answer (see :func:`error_from_answer`); :class:`BinanceUnavailable`
            when nothing answered within ``timeout``; :class:`BinanceRateLimited` for a ``418`` or too many
            ``429``.
        """
        what = f"{method} {path}"
        retried_time = False
        attempt = 0
        while True:
            await self._respect_weight()
            query = dict(params or {})
            headers = {}
            if signed or api_key:
                if self.signer is None:
                    raise BinanceAuthError(f"Binance {what}: needs an API key; none was given (set "
                                           f"BINANCE_API_KEY and BINANCE_API_SECRET or BINANCE_PRIVATE_KEY_FILE)",
                                           request=what)
                headers["X-MBX-APIKEY"] = self.signer.api_key
            if signed:
                assert self.signer is not None
                query["timestamp"] = time.time_ns() // 1_000_000 + self.time_offset_ms
                query["recvWindow"] = self.recv_window_ms
                payload = urllib.parse.urlencode(query)
                url = f"{self.base_url}{path}?{payload}&signature={urllib.parse.quote(self.signer.sign(payload))}"
            else:
                url = f"{self.base_url}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
            session = self._get_session()
            self.requests += 1
            if on_send is not None:
                on_send()
            try:
                # Never follow a redirect: it could lead off this host with the API key header and a signature.
                async with session.request(method, url, headers=headers, allow_redirects=False) as resp:
                    body = await resp.read()
                    recv_ts = time.time_ns()
                    status = resp.status
                    weight = _used_weight(resp.headers.get("X-MBX-USED-WEIGHT-1M"))
                    retry_after = _retry_after(resp.headers, 1.0)
                    location = resp.headers.get("Location", "")
            except asyncio.TimeoutError:
                raise BinanceUnavailable(f"Binance {what} at {self.base_url}: no answer within {self.timeout:g} s",
                                         request=what) from None
            except self._aiohttp.ClientError as exc:
                raise BinanceUnavailable(f"Binance {what} at {self.base_url}: cannot connect: {exc}",
                                         request=what) from None
            if weight is not None:
                self.used_weight = weight
                self._weight_minute = int(time.time() // 60)
            if status < 300:
                return body, recv_ts
            if status < 400:
                where = urllib.parse.urlsplit(location)
                raise BinanceUnavailable(f"Binance {what} at {self.base_url}: HTTP {status}, a redirect to "
                                         f"{where.scheme}://{where.hostname or '?'}{where.path}; a Binance API does "
                                         f"not redirect, so it was not followed (point the URL at the API itself)",
                                         status=status, request=what)
            if status == 418:
                raise BinanceRateLimited(f"Binance {what}: HTTP 418, this IP is banned for {retry_after:g} s "
                                         f"for ignoring 429 answers", retry_after=retry_after, banned=True,
                                         status=status, request=what)
            if status == 429:
                if attempt >= self.max_retries or retry_after > self.max_retry_wait:
                    why = (f"{attempt + 1} times; gave up" if attempt >= self.max_retries else
                           f"with Retry-After {retry_after:g} s, longer than max_retry_wait "
                           f"{self.max_retry_wait:g} s; not waited here")
                    raise BinanceRateLimited(f"Binance {what}: HTTP 429 (too many requests) {why}",
                                             retry_after=retry_after, banned=False, status=status, request=what)
                attempt += 1
                self.retried_429 += 1
                logger.warning("Binance %s: HTTP 429 (too many requests); waiting Retry-After %.1f s", what,
                               retry_after)
                await asyncio.sleep(retry_after)
                continue
            error = error_from_answer(status, body, what)
            if isinstance(error, BinanceTimestampError) and not retried_time:
                retried_time = True
                await self.sync_time()
                continue
            raise error

    async def json(self, method: str, path: str, params: dict[str, Any] | None = None, *,
                   signed: bool = False, api_key: bool = False, on_send: Callable[[], None] | None = None) -> Any:
        """Like :meth:`request`, decoding the JSON body."""
        body, _ = await self.request(method, path, params, signed=signed, api_key=api_key, on_send=on_send)
        try:
            return msgspec.json.decode(body)
        except msgspec.DecodeError:
            raise BinanceUnavailable(f"Binance {method} {path}: expected a JSON answer, got "
                                     f"{body[:100]!r}", request=f"{method} {path}") from None

    # ------------------------------------------------------------------ public endpoints
    async def ping(self) -> None:
        """``GET /api/v3/ping``: raise :class:`BinanceUnavailable` unless the server answers."""
        await self.request("GET", "/api/v3/ping")

    async def depth(self, symbol: str, limit: int = 1000) -> tuple[bytes, int]:
        """``GET /api/v3/depth``: return the snapshot's JSON body as received and its receive time (ns)."""
        return await self.request("GET", "/api/v3/depth", {"symbol": symbol.upper(), "limit": limit})

    async def sync_time(self) -> int:
        """Measure the server-time offset (``GET /api/v3/time``, midpoint of the round trip); return it (ms)."""
        t0 = time.time_ns()
        answer = await self.json("GET", "/api/v3/time")
        t1 = time.time_ns()
        try:
            server_ms = int(answer["serverTime"])
        except (KeyError, TypeError, ValueError):
            raise BinanceUnavailable(f"Binance GET /api/v3/time: expected {{\"serverTime\": ms}}, got "
                                     f"{str(answer)[:100]}", request="GET /api/v3/time") from None
        self.time_offset_ms = server_ms - (t0 + t1) // 2_000_000
        return self.time_offset_ms

    async def signed(self, method: str, path: str, params: dict[str, Any] | None = None, *,
                     on_send: Callable[[], None] | None = None) -> Any:
        """Send a signed request (``timestamp``, ``recvWindow``, ``signature``); return the decoded JSON."""
        return await self.json(method, path, params, signed=True, on_send=on_send)

    def __repr__(self) -> str:  # never the key or the secret
        return f"BinanceRest({self.base_url!r}, signed={self.signer is not None}, used_weight={self.used_weight})"
