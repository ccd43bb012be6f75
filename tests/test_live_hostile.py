"""The live Binance path against a hostile or broken peer on 127.0.0.1: garbage frames, odd closes, snapshots
that never bridge, redirects, garbage headers, absurd Retry-After values, duplicated execution reports, and
production URLs in disguise. The library must not die, hang, hammer the server, leak a key, or lose silently."""

from __future__ import annotations

import asyncio
import logging
import math
import types
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

pytest.importorskip("aiohttp")
picows = pytest.importorskip("picows")

from aiohttp import web  # noqa: E402

import kimiha  # noqa: E402
from kimiha.error import InvalidConfigurationError, SerializationError  # noqa: E402
from kimiha.event_bus import EventBus  # noqa: E402
from kimiha.trading.model import Order, OrderType, Side  # noqa: E402
from kimiha.trading.tasks import trading_channels  # noqa: E402
from kimiha.venues.binance import live as live_module  # noqa: E402
from kimiha.venues.binance.live import BinanceLiveFeed  # noqa: E402
from kimiha.venues.binance.orders import BinanceExecutorTask, ExecutionReport, _Working, check_order_url  # noqa: E402
from kimiha.venues.binance.rest import BinanceRateLimited, BinanceRest, BinanceUnavailable  # noqa: E402
from kimiha.venues.binance.signing import HmacSigner  # noqa: E402
from kimiha.venues.binance.wire import BinanceParser  # noqa: E402

HANG = 30.0
KEY, SECRET = "hostile-test-key-3f9a", "hostile-test-secret-8c1e"


def run(coro: Awaitable[Any]) -> Any:
    async def guarded() -> Any:
        async with asyncio.timeout(HANG):
            return await coro

    return kimiha.run(guarded())


async def until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Wait until ``condition()`` holds (a bounded wait on a condition, not a sleep that hides a race)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def read_until(feed: BinanceLiveFeed, condition: Callable[[list[bytes]], bool], what: str) -> list[bytes]:
    """Start ``feed``, read its lines until ``condition(lines)`` holds, close it; return the lines."""
    lines: list[bytes] = []

    async def consume() -> None:
        async for line in feed:
            lines.append(line)

    await feed.start()
    consumer = asyncio.ensure_future(consume())
    try:
        await until(lambda: condition(lines), what)
    finally:
        await feed.aclose()
        await consumer
    return lines


class Hostile:
    """A websocket server (picows: any frame, any fragmentation) and a REST app (aiohttp), both on 127.0.0.1.

    ``script(transport, connection_number)`` runs on each websocket connection; ``routes`` are the REST app's
    ``(method, path, handler)``; ``/api/v3/ping`` answers ``{}`` unless given.
    """

    def __init__(self, script: Callable[[Any, int], Awaitable[None]],
                 routes: list[tuple[str, str, Any]] | None = None) -> None:
        self.script = script
        self.routes = list(routes or [])
        self.connections = 0
        self.tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Hostile:
        hostile = self

        class Listener(picows.WSListener):  # type: ignore[misc]
            def on_ws_connected(self, transport: Any) -> None:
                hostile.connections += 1
                task = asyncio.ensure_future(hostile.script(transport, hostile.connections))
                hostile.tasks.add(task)

        self.ws_server = await picows.ws_create_server(lambda request: Listener(), "127.0.0.1", 0)
        self.ws_url = f"ws://127.0.0.1:{self.ws_server.sockets[0].getsockname()[1]}"
        app = web.Application()
        paths = {path for _, path, _ in self.routes}
        if "/api/v3/ping" not in paths:
            app.router.add_get("/api/v3/ping", _pong)
        for method, path, handler in self.routes:
            app.router.add_route(method, path, handler)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)  # handlers left hanging on purpose
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.rest_url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.ws_server.close()
        await self.runner.cleanup()


def text(transport: Any, body: str | bytes, fin: bool = True, cont: bool = False) -> None:
    data = body.encode() if isinstance(body, str) else body
    transport.send(picows.WSMsgType.CONTINUATION if cont else picows.WSMsgType.TEXT, data, fin)


TRADE = ('{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":%d,"p":"100.0","q":"1.0",'
         '"T":1,"m":false,"M":true}}')


def depth(first: int, last: int, symbol: str = "BTCUSDT") -> str:
    return ('{"stream":"%s@depth@100ms","data":{"e":"depthUpdate","E":1,"s":"%s","U":%d,"u":%d,'
            '"b":[["100.0","1.0"]],"a":[["101.0","1.0"]]}}' % (symbol.lower(), symbol, first, last))


async def _snapshot_1(request: web.Request) -> web.Response:
    return web.json_response({"lastUpdateId": 1, "bids": [], "asks": []})


async def _pong(request: web.Request) -> web.Response:
    return web.json_response({})


async def _idle(transport: Any, n: int) -> None:
    return None


# ---------------------------------------------------------------------------------------------- websocket
def test_garbage_frames_never_kill_the_feed_and_are_counted() -> None:
    garbage = ["not json at all", "[1, 2, 3]", '"a string"', '{"no":"envelope"}', '{"stream":"btcusdt@trade"}',
               '{"stream":"nosuch@stream","data":{}}', '{"stream":"btcusdt@depth@100ms","data":{"s":"BTCUSDT",'
               '"U":"x","u":[]}}', depth(10, 5), depth(1, 2, "ETHUSDT"),
               '{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"abc","q":"NaN",'
               '"T":1,"m":false,"M":true}}']

    async def script(transport: Any, n: int) -> None:
        transport.send(picows.WSMsgType.BINARY, b"\x00\x01binary")
        text(transport, "continuation with nothing to continue", cont=True)
        for g in garbage:
            text(transport, g)
        whole = TRADE % 7
        text(transport, whole[:20], fin=False)  # a fragmented message, reassembled
        text(transport, whole[20:40], fin=False, cont=True)
        text(transport, whole[40:], cont=True)
        text(transport, TRADE % 8)
        await asyncio.sleep(HANG)

    async def main() -> tuple[BinanceLiveFeed, list[bytes]]:
        async with Hostile(script, [("GET", "/api/v3/depth", _snapshot_1)]) as h:
            feed = BinanceLiveFeed(["BTCUSDT"], ws_url=h.ws_url, rest_url=h.rest_url, backoff_initial=0.05)
            lines = await read_until(feed, lambda lines: any(b'"t":8' in line for line in lines), "the last trade")
            return feed, lines

    feed, lines = run(main())
    assert feed.ignored_frames == 2  # the binary frame and the stray continuation
    assert feed.reconnects == 0 and feed.connects == 1  # nothing above broke the connection
    assert any(line.endswith((TRADE % 7).encode()) for line in lines)  # fragments joined into one line
    parser = BinanceParser()
    for line in lines:
        try:
            parser.parse(line)
        except SerializationError:
            pass  # the parser's documented answer to a bad line; anything else would escape this test
    assert parser.bad_lines >= len(garbage) - 3  # (a bad price/qty may decode as a float NaN; the book checks)


@pytest.mark.parametrize("closer", ["odd_code", "empty_close", "drop"])
def test_odd_closes_are_reconnected(closer: str, caplog: pytest.LogCaptureFixture) -> None:
    async def script(transport: Any, n: int) -> None:
        text(transport, TRADE % n)
        if n == 1:
            if closer == "odd_code":  # a reason that is not UTF-8 (a protocol error)
                transport.send(picows.WSMsgType.CLOSE, (4999).to_bytes(2, "big") + b"\xff\xfe not utf-8")
            elif closer == "empty_close":
                transport.send(picows.WSMsgType.CLOSE, b"")
            transport.disconnect(graceful=closer != "drop")
            return
        await asyncio.sleep(HANG)

    async def main() -> BinanceLiveFeed:
        async with Hostile(script) as h:
            feed = BinanceLiveFeed(["BTCUSDT"], ws_url=h.ws_url, rest_url=h.rest_url, backoff_initial=0.05)
            await read_until(feed, lambda lines: feed.reconnects >= 1 and feed.messages >= 2, "a reconnect")
            return feed

    with caplog.at_level(logging.WARNING, "kimiha.venues.binance.live"):
        feed = run(main())
    assert feed.connects == 2 and feed.error is None and feed.silent_reconnects == 0
    said = " ".join(r.getMessage() for r in caplog.records)
    if closer == "odd_code":
        # picows refuses the frame (a protocol error): the warning names it rather than "no close frame"
        assert "the connection was lost (WSProtocolError: Received CLOSE with invalid UTF-8" in said, said
    elif closer == "empty_close":
        assert "the server closed the connection (0 " in said, said


def test_a_snapshot_that_never_bridges_is_refetched_with_backoff_not_hammered(
        caplog: pytest.LogCaptureFixture) -> None:
    times: list[float] = []

    async def snapshot(request: web.Request) -> web.Response:
        times.append(asyncio.get_running_loop().time())
        return web.json_response({"lastUpdateId": 5, "bids": [["100.0", "1.0"]], "asks": [["101.0", "1.0"]]})

    async def script(transport: Any, n: int) -> None:
        u = 1000  # the diffs start far past the snapshot, which never catches up
        for _ in range(2000):
            text(transport, depth(u, u + 1))
            u += 2
            await asyncio.sleep(0.02)

    async def main() -> BinanceLiveFeed:
        async with Hostile(script, [("GET", "/api/v3/depth", snapshot)]) as h:
            feed = BinanceLiveFeed(["BTCUSDT"], ws_url=h.ws_url, rest_url=h.rest_url, backoff_initial=0.1,
                                   backoff_max=5.0)
            await read_until(feed, lambda lines: len(times) >= 4, "four snapshot requests")
            return feed

    with caplog.at_level(logging.WARNING, "kimiha.venues.binance.live"):
        feed = run(main())
    gaps = [b - a for a, b in zip(times, times[1:])]
    # Retry k waits at least backoff_initial * 2**(k-1) / 2 (jitter in [0.5, 1)): doubling, not a fixed poll.
    assert gaps[1] >= 0.1 and gaps[2] >= 0.2, gaps
    assert feed.refetches >= 3 and feed.snapshots == 0
    said = [r for r in caplog.records if "older than the first buffered diff" in r.getMessage()]
    assert len(said) == 1  # said once, not once per attempt


def test_reconnect_backoff_survives_a_days_long_outage(monkeypatch: pytest.MonkeyPatch) -> None:
    """After ~1,100 failed connects (hours at the 30 s cap) the doubling must not overflow and kill the
    supervisor: it keeps retrying and reconnects when the server is back."""
    real_sleep = asyncio.sleep
    delays: list[float] = []

    async def no_wait(delay: float, result: Any = None) -> Any:
        delays.append(delay)
        return await real_sleep(0, result)

    monkeypatch.setattr(live_module, "asyncio", types.SimpleNamespace(**{**vars(asyncio), "sleep": no_wait}))

    class Gone:
        async def wait_disconnected(self) -> None:
            return None

        def disconnect(self, graceful: bool = True) -> None:
            pass

    class Back(Gone):
        async def wait_disconnected(self) -> None:
            await real_sleep(HANG)

    async def main() -> BinanceLiveFeed:
        feed = BinanceLiveFeed(["BTCUSDT"], ws_url="ws://127.0.0.1:9", rest_url="http://127.0.0.1:9",
                               backoff_max=30.0)
        failures = 1100

        async def connect() -> Any:
            nonlocal failures
            if failures:
                failures -= 1
                raise BinanceUnavailable("Binance combined stream ws://127.0.0.1:9: cannot connect: refused")
            return Back()

        feed._connect = connect  # type: ignore[method-assign]
        feed._supervisor = asyncio.ensure_future(feed._supervise(Gone()))
        try:
            await until(lambda: feed.reconnects == 1 or feed._supervisor.done(), "the reconnect")  # type: ignore
            assert not feed._supervisor.done(), feed._supervisor.exception()  # type: ignore[union-attr]
        finally:
            await feed.aclose()
        return feed

    feed = run(main())
    assert feed.reconnects == 1
    assert len(delays) >= 1100 and max(delays) <= 30.0 and all(math.isfinite(d) for d in delays)


# ---------------------------------------------------------------------------------------------- REST
def test_a_redirect_is_not_followed_off_host_with_the_key() -> None:
    hits: list[dict[str, str]] = []

    async def elsewhere(request: web.Request) -> web.Response:
        hits.append(dict(request.headers))
        return web.json_response({"orderId": 1})

    async def main() -> BinanceUnavailable:
        async with Hostile(_idle, [("POST", "/api/v3/order", elsewhere)]) as other:
            target = other.rest_url.replace("127.0.0.1", "localhost") + "/api/v3/order"

            async def redirect(request: web.Request) -> web.Response:
                raise web.HTTPTemporaryRedirect(target)

            async with Hostile(_idle, [("POST", "/api/v3/order", redirect)]) as h:
                rest = BinanceRest(h.rest_url, signer=HmacSigner(KEY, SECRET))
                try:
                    with pytest.raises(BinanceUnavailable) as info:
                        await rest.signed("POST", "/api/v3/order", {"symbol": "BTCUSDT"})
                finally:
                    await rest.close()
                return info.value

    err = run(main())
    assert hits == []  # the key header and the signed query never left for the other host
    assert "redirect" in str(err) and err.status == 307
    assert KEY not in str(err) and SECRET not in str(err) and "signature" not in str(err)


async def _raw_http_server(answer: bytes) -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize("weight", ["\u00b2", "12abc", "-3", "", "9" * 40])
def test_garbage_weight_headers_are_ignored(weight: str) -> None:
    async def main() -> tuple[bytes, int]:
        body = b'{"lastUpdateId":1,"bids":[],"asks":[]}'
        server, url = await _raw_http_server(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-MBX-USED-WEIGHT-1M: " + weight.encode()
            + b"\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%b" % (len(body), body))
        rest = BinanceRest(url)
        try:
            got, _ = await rest.depth("BTCUSDT", 5)
            return got, rest.used_weight
        finally:
            await rest.close()
            server.close()

    body, used = run(main())
    assert body.startswith(b'{"lastUpdateId":1')
    assert used == (int(weight) if weight.isascii() and weight.isdigit() else 0)


@pytest.mark.parametrize("retry_after", ["inf", "nan", "1e9", "86400"])
def test_429_with_an_absurd_retry_after_raises_instead_of_sleeping_it(retry_after: str) -> None:
    async def too_many(request: web.Request) -> web.Response:
        return web.json_response({"code": -1003, "msg": "Too many requests"}, status=429,
                                 headers={"Retry-After": retry_after})

    async def main() -> BinanceRateLimited:
        async with Hostile(_idle, [("GET", "/api/v3/depth", too_many)]) as h:
            rest = BinanceRest(h.rest_url)
            try:
                with pytest.raises(BinanceRateLimited) as info:
                    # The guard is a hang detector (the request must answer by itself), not a speed goal.
                    await asyncio.wait_for(rest.depth("BTCUSDT", 5), HANG / 2)
            finally:
                await rest.close()
            return info.value

    err = run(main())
    assert math.isfinite(err.retry_after) and 0 <= err.retry_after <= 3 * 86400
    assert "Retry-After" in str(err) or "times" in str(err)


# ---------------------------------------------------------------------------------------------- orders
@pytest.mark.parametrize("url", [
    "https://api.binance.com.", "https://API.BINANCE.COM./", "https://user:pw@api.binance.com.:443",
    "https://\uff41\uff50\uff49.binance.com", "https://api\u3002binance\u3002com", "https://fapi.binance.com",
    "wss://stream.binance.com.:9443", "https://api-gcp.binance.com/", "https://52.84.150.1", "https://[2600:9000::1]",
    " https://api.binance.com",
])
def test_production_url_in_disguise_is_refused(url: str) -> None:
    with pytest.raises(InvalidConfigurationError, match="--mainnet") as info:
        check_order_url(url, mainnet=False)
    assert "pw" not in str(info.value)  # a user:password part is not repeated in the message


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080", "http://localhost:1", "https://testnet.binance.vision",
                                 "http://10.1.2.3:9000", "ws://[::1]:9"])
def test_local_and_testnet_urls_pass(url: str) -> None:
    check_order_url(url, mainnet=False)


def _report(cid: str, x: str, status: str, last: float, cum: float, trade_id: int) -> ExecutionReport:
    return ExecutionReport(e="executionReport", E=1, s="BTCUSDT", c=cid, S="BUY", o="LIMIT", x=x, X=status, i=1,
                           q=1.0, l=last, z=cum, L=100.0, T=1, t=trade_id)


def test_duplicated_and_foreign_execution_reports_are_counted_once(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> tuple[BinanceExecutorTask, list[Any]]:
        bus = EventBus(trading_channels())
        rest = BinanceRest("http://127.0.0.1:9", signer=HmacSigner(KEY, SECRET))
        ex = BinanceExecutorTask(bus, rest, "ws://127.0.0.1:9", symbol="BTCUSDT")
        order = Order(1, Side.BUY, 1.0, OrderType.LIMIT, 100.0, 1, symbol="BTCUSDT")
        cid = ex.client_order_id(1)
        ex._working[cid] = _Working(order)
        for r in [_report(cid, "NEW", "NEW", 0, 0, -1),
                  _report(cid, "TRADE", "PARTIALLY_FILLED", 0.4, 0.4, 11),
                  _report(cid, "TRADE", "PARTIALLY_FILLED", 0.4, 0.4, 11),  # the same trade again
                  _report("someone-else", "TRADE", "FILLED", 1.0, 1.0, 99),
                  _report(cid, "TRADE", "FILLED", 0.6, 1.0, 12),
                  _report(cid, "TRADE", "FILLED", 0.6, 1.0, 12)]:  # again, after the order is done: known
            ex._on_report(r)
        fills = [ex._out.get_nowait() for _ in range(ex._out.qsize())]
        await rest.close()
        return ex, fills

    with caplog.at_level(logging.WARNING, "kimiha.venues.binance.orders"):
        ex, fills = run(main())
    assert len(fills) == 1 and fills[0].qty == pytest.approx(1.0)
    assert ex.account.position == pytest.approx(1.0)
    assert ex.duplicate_reports == 2 and ex.foreign_reports == 1  # the repeat after the final report is known
    assert ex.late_reports == 0 and ex.reconciled == 0
    assert sum("does not know" in r.getMessage() for r in caplog.records) == 1
    for record in caplog.records:
        assert KEY not in record.getMessage() and SECRET not in record.getMessage()
    assert KEY not in repr(ex.rest) and SECRET not in repr(ex.rest.signer)


# ---------------------------------------------------------------------------------------------- recorder
def test_a_full_disk_stops_the_recording_loudly_without_killing_the_feed(caplog: pytest.LogCaptureFixture) -> None:
    import os

    from kimiha.venues.binance.recorder import TapeRecorder

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (writes fail with ENOSPC)")
    recorder = TapeRecorder("/dev/full", flush_lines=64, compresslevel=0)
    line = b"1 " + b'{"stream":"btcusdt@trade","data":{}}' * 40
    with caplog.at_level(logging.ERROR, "kimiha.venues.binance.recorder"):
        for _ in range(5000):  # ~7 MB: the gzip file's buffer reaches the device, which is full
            recorder.write(line)
        recorder.close()  # no raise either
    assert recorder.error and "No space left" in recorder.error
    assert recorder.lines_lost > 0 and recorder.lines + recorder.lines_lost == 5000
    assert sum("cannot write" in r.getMessage() for r in caplog.records) == 1
    assert "lines_lost" in repr(recorder)


@pytest.mark.parametrize("answer", [[], {"listenKey": None}, {"listenKey": "../../x?y"}, {"other": 1}])
def test_a_bad_listen_key_answer_is_one_clear_error(answer: Any) -> None:
    from kimiha.venues.binance.orders import UserDataStream

    async def listen_key(request: web.Request) -> web.Response:
        return web.json_response(answer)

    async def main() -> BinanceUnavailable:
        async with Hostile(_idle, [("POST", "/api/v3/userDataStream", listen_key)]) as h:
            rest = BinanceRest(h.rest_url, signer=HmacSigner(KEY, SECRET))
            stream = UserDataStream(rest, h.ws_url, lambda report: None)
            try:
                with pytest.raises(BinanceUnavailable) as info:
                    await stream.start()
            finally:
                await stream.close()
                await rest.close()
            return info.value

    err = run(main())
    assert "expected {\"listenKey\"" in str(err) and KEY not in str(err)


def test_a_diff_with_u_below_its_U_or_of_another_symbol_is_a_bad_line_not_a_gap() -> None:
    async def snapshot(request: web.Request) -> web.Response:
        return web.json_response({"lastUpdateId": 100, "bids": [["100.0", "1.0"]], "asks": [["101.0", "1.0"]]})

    async def script(transport: Any, n: int) -> None:
        text(transport, depth(100, 101))
        await asyncio.sleep(0.5)  # the snapshot is fetched and inserted meanwhile
        for first, last, symbol in [(102, 103, "BTCUSDT"), (104, 50, "BTCUSDT"), (104, 105, "ETHUSDT"),
                                    (104, 105, "BTCUSDT"), (106, 107, "BTCUSDT")]:
            body = depth(first, last, "BTCUSDT")
            text(transport, body.replace('"s":"BTCUSDT"', f'"s":"{symbol}"'))
        text(transport, TRADE % 9)
        await asyncio.sleep(HANG)

    async def main() -> tuple[BinanceLiveFeed, list[bytes]]:
        async with Hostile(script, [("GET", "/api/v3/depth", snapshot)]) as h:
            feed = BinanceLiveFeed(["BTCUSDT"], ws_url=h.ws_url, rest_url=h.rest_url)
            lines = await read_until(feed, lambda lines: any(b'"t":9' in line for line in lines), "the last trade")
            return feed, lines

    feed, lines = run(main())
    assert feed.snapshots == 1 and feed.gaps == 0 and feed.resyncs == 0
    parser = BinanceParser()
    rejected = []
    for line in lines:
        try:
            parser.parse(line)
        except SerializationError as exc:
            rejected.append(str(exc))
    assert len(rejected) == 2 and all("U <= u and the stream's own symbol" in r for r in rejected), rejected


def test_429_with_retry_after_zero_forever_is_backed_off_not_hammered() -> None:
    times: list[float] = []

    async def too_many(request: web.Request) -> web.Response:
        times.append(asyncio.get_running_loop().time())
        return web.json_response({"code": -1003, "msg": "Too many requests"}, status=429,
                                 headers={"Retry-After": "0"})

    async def script(transport: Any, n: int) -> None:
        text(transport, depth(100, 101))
        await asyncio.sleep(HANG)

    async def main() -> BinanceLiveFeed:
        async with Hostile(script, [("GET", "/api/v3/depth", too_many)]) as h:
            feed = BinanceLiveFeed(["BTCUSDT"], ws_url=h.ws_url, rest_url=h.rest_url, backoff_initial=0.1)
            await feed.start()
            try:
                await until(lambda: len(times) >= 16, "16 snapshot requests")
            finally:
                await feed.aclose()
            return feed

    run(main())
    # BinanceRest retries a 429 max_retries (3) times by itself; then the feed waits at least its backoff
    # (jitter >= 0.5): 0.05 + 0.1 + 0.2 s before the 13th request, not zero.
    assert times[12] - times[0] >= 0.35, [round(t - times[0], 3) for t in times]


def test_an_order_whose_answer_is_lost_is_looked_up_and_its_fill_still_counted(tmp_path: Any) -> None:
    """A proxy passes POST /api/v3/order to the local exchange but never returns the answer: the order traded
    there; the executor must find it (query by client id) and book its fill, not call it refused."""
    import gzip
    import itertools
    import time

    import aiohttp

    from kimiha.trading.tasks import TradingEvent
    from kimiha.venues.binance import iter_lines, recorded_tape
    from kimiha.venues.binance.sim import LocalExchange

    excerpt = tmp_path / "excerpt.gz"
    with gzip.open(excerpt, "wb") as f:
        for line in itertools.islice(iter_lines(recorded_tape()), 400):
            f.write(line + b"\n")

    async def main() -> tuple[BinanceExecutorTask, Any, Any]:
        async with LocalExchange(excerpt, speed=None, start_on_connect=False) as ex:
            await until(lambda: "BTCUSDT" in ex.books and ex.books["BTCUSDT"].is_live, "the exchange's book")
            session = aiohttp.ClientSession()

            async def forward(request: web.Request) -> web.Response:
                async with session.request(request.method, ex.rest_url + request.path_qs,
                                           headers={"X-MBX-APIKEY": request.headers.get("X-MBX-APIKEY", "")}) as r:
                    body = await r.read()
                if request.method == "POST" and request.path == "/api/v3/order":
                    await asyncio.sleep(HANG)  # taken by the exchange; the answer never comes back
                return web.Response(body=body, status=r.status, content_type="application/json")

            async with Hostile(_idle, [("*", "/{tail:.*}", forward)]) as proxy:
                bus = EventBus(trading_channels())
                fills = bus.subscribe(TradingEvent.FILLS)
                rest = BinanceRest(proxy.rest_url, signer=HmacSigner(ex.api_key, ex.api_secret), timeout=1.0)
                executor = BinanceExecutorTask(bus, rest, ex.ws_url, symbol="BTCUSDT")
                await executor.initialize()
                try:
                    await executor.handle_event(Order(1, Side.BUY, 0.001, OrderType.MARKET, None, time.time_ns(),
                                                      "BTCUSDT"))
                    fill = await asyncio.wait_for(fills.recv(), HANG / 2)
                finally:
                    await executor.shutdown()
                    await rest.close()
                    await session.close()
            return executor, ex, fill

    executor, ex, fill = run(main())
    assert executor.unanswered == 1 and executor.rejected == 0
    assert fill.qty == pytest.approx(0.001)
    assert executor.account.position == pytest.approx(ex.accounts[ex.api_key].positions["BTCUSDT"], abs=1e-12)


def test_pretty_printed_json_stays_one_line_of_the_recording(tmp_path: Any) -> None:
    from kimiha.venues.binance import iter_lines
    from kimiha.venues.binance.recorder import TapeRecorder

    async def snapshot(request: web.Request) -> web.Response:
        return web.Response(body=b'{\n  "lastUpdateId": 100,\r\n  "bids": [["100.0", "1.0"]],\n  "asks": []\n}\n',
                            content_type="application/json")

    async def script(transport: Any, n: int) -> None:
        text(transport, depth(100, 101).replace(",", ",\n  "))
        await asyncio.sleep(0.3)
        for t in range(3):
            text(transport, (TRADE % t).replace('{"e"', '{\r\n "e"'))
        await asyncio.sleep(HANG)

    path = tmp_path / "rec.gz"

    async def main() -> tuple[BinanceLiveFeed, list[bytes]]:
        async with Hostile(script, [("GET", "/api/v3/depth", snapshot)]) as h:
            feed = BinanceLiveFeed(["BTCUSDT"], ws_url=h.ws_url, rest_url=h.rest_url, recorder=TapeRecorder(path))
            lines = await read_until(feed, lambda lines: len(lines) >= 5, "the snapshot and four messages")
            return feed, lines

    feed, lines = run(main())
    recorded = list(iter_lines(path))
    assert recorded == lines and len(recorded) == 5 and feed.snapshots == 1
    parser = BinanceParser()
    for line in recorded:
        parser.parse(line)  # each is one whole message
    assert parser.bad_lines == 0


def test_an_expired_listen_key_is_renewed_and_reports_flow_again(tmp_path: Any) -> None:
    import gzip
    import itertools

    from kimiha.venues.binance import iter_lines, recorded_tape
    from kimiha.venues.binance.orders import BinanceOrderClient, UserDataStream
    from kimiha.venues.binance.sim import LocalExchange

    excerpt = tmp_path / "excerpt.gz"
    with gzip.open(excerpt, "wb") as f:
        for line in itertools.islice(iter_lines(recorded_tape()), 400):
            f.write(line + b"\n")

    async def main() -> tuple[UserDataStream, list[ExecutionReport]]:
        async with LocalExchange(excerpt, speed=None, start_on_connect=False) as ex:
            await until(lambda: "BTCUSDT" in ex.books and ex.books["BTCUSDT"].is_live, "the exchange's book")
            rest = BinanceRest(ex.rest_url, signer=HmacSigner(ex.api_key, ex.api_secret))
            reports: list[ExecutionReport] = []
            stream = UserDataStream(rest, ex.ws_url, reports.append, keepalive_s=0.2)
            await stream.start()
            try:
                first = stream.listen_key
                ex._listen_keys.pop(first)  # the server forgets it, as Binance does after 60 minutes
                await until(lambda: stream.renewed_keys == 1 and stream.reconnects == 1, "a new listen key")
                assert stream.listen_key != first
                await BinanceOrderClient(rest).new_order("BTCUSDT", "BUY", "MARKET", 0.001)
                await until(lambda: any(r.X == "FILLED" for r in reports), "the order's reports")
            finally:
                await stream.close()
                await rest.close()
            return stream, reports

    stream, reports = run(main())
    assert stream.renewed_keys == 1 and reports[-1].X == "FILLED"


def test_a_fragmented_message_past_the_size_limit_is_dropped_and_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(live_module, "_MAX_MESSAGE", 150)  # the real limit is 64 MiB: same code, small data
    whole = TRADE % 5
    assert len(whole) < 150

    async def script(transport: Any, n: int) -> None:
        text(transport, "x" * 60, fin=False)
        text(transport, "x" * 60, fin=False, cont=True)
        text(transport, "x" * 60, fin=False, cont=True)  # past 150 bytes: the message is dropped ...
        text(transport, "x" * 60, cont=True)  # ... with its remaining fragments
        text(transport, whole[:50], fin=False)
        text(transport, whole[50:], cont=True)  # the next message is whole again
        await asyncio.sleep(HANG)

    async def main() -> tuple[BinanceLiveFeed, list[bytes]]:
        async with Hostile(script, [("GET", "/api/v3/depth", _snapshot_1)]) as h:
            feed = BinanceLiveFeed(["BTCUSDT"], ws_url=h.ws_url, rest_url=h.rest_url)
            return feed, await read_until(feed, lambda lines: len(lines) >= 1, "the trade")

    feed, lines = run(main())
    assert feed.ignored_frames == 1 and feed.messages == 1
    assert len(lines) == 1 and lines[0].endswith(whole.encode())
