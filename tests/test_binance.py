"""Binance wire decoding, the line parser and the recording sources, checked against the shipped tape."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import json
import math
from importlib import resources

import msgspec
import pytest

from kimiha.error import InvalidConfigurationError, SerializationError
from kimiha.types import Event
from kimiha.trading.model import (
    BookUpdate,
    DepthDiff,
    DepthSnapshot,
    Fill,
    Order,
    Quote,
    Side,
    Signal,
    Trade,
)
from kimiha.venues import binance
from kimiha.venues.binance import (
    BAD_LINE,
    SNAPSHOT,
    BinanceParser,
    count_lines_by_stream,
    iter_lines,
    parse_lines,
    rebuild_book,
    recorded_tape,
    replay_lines,
)

DATA = resources.files("kimiha") / "data"
FILE_0808 = "hftbacktest_examples_spot_btcusdt_20240808.gz"
FILE_0809 = "hftbacktest_examples_spot_btcusdt_20240809.gz"
SHA256 = {
    FILE_0808: "5d263f4c5379cfc27379ef0e22779aa33804463d1b69c292e9c0714e31f2e1b4",
    FILE_0809: "2981a27474b8903133cc66e25f4da561140dd061c942b84801b9d8c60e4b3599",
}
STREAMS = ("btcusdt@trade", "btcusdt@bookTicker", "btcusdt@depth@100ms")

TRADE_LINE = (b'1723161254087896568 {"stream":"btcusdt@trade","data":{"e":"trade","E":1723161255343,'
              b'"s":"BTCUSDT","t":3735683259,"p":"61837.63000000","q":"0.02000000","T":1723161255342,'
              b'"m":true,"M":true}}')
TICKER_LINE = (b'1723161254087891268 {"stream":"btcusdt@bookTicker","data":{"u":50093239212,"s":"BTCUSDT",'
               b'"b":"61837.63000000","B":"3.78826000","a":"61837.64000000","A":"1.54698000"}}')
DEPTH_LINE = (b'1723161254036059768 {"stream":"btcusdt@depth@100ms","data":{"e":"depthUpdate",'
              b'"E":1723161255308,"s":"BTCUSDT","U":50093239203,"u":50093239207,'
              b'"b":[["55653.87000000","0.00000000"]],"a":[["61838.04000000","0.16170000"]]}}')
SNAPSHOT_LINE = (b'1723161254206652067 {"lastUpdateId":50093239218,"bids":[["61837.63000000","3.78826000"]],'
                 b'"asks":[["61837.64000000","1.54698000"]]}')


def _raw_lines(name: str) -> list[bytes]:
    with (DATA / name).open("rb") as f:
        return gzip.decompress(f.read()).splitlines()


@pytest.fixture(scope="module")
def tape_lines() -> list[bytes]:
    return _raw_lines(FILE_0808) + _raw_lines(FILE_0809)


# ----------------------------------------------------------------------------------------------- the data
def test_shipped_recording_is_byte_identical_and_licensed():
    for name, digest in SHA256.items():
        assert hashlib.sha256((DATA / name).read_bytes()).hexdigest() == digest
    license_text = (DATA / "LICENSE-hftbacktest-MIT.txt").read_text()
    assert "MIT License" in license_text
    readme = (DATA / "README.md").read_text()
    assert "hftbacktest" in readme and "MIT" in readme and "Binance" in readme
    assert [p.name for p in recorded_tape()] == [FILE_0808, FILE_0809]


def test_every_line_of_the_tape_is_accounted_for(tape_lines):
    # Independent census: a plain substring scan of the decompressed bytes.
    expected = {s: sum(1 for line in tape_lines if b'"stream":"%s"' % s.encode() in line) for s in STREAMS}
    expected[SNAPSHOT] = sum(1 for line in tape_lines
                             if b'"lastUpdateId"' in line and b'"stream"' not in line)
    assert sum(expected.values()) == len(tape_lines) == 41_249 + 58_325
    assert expected == {"btcusdt@trade": 19_904, "btcusdt@bookTicker": 73_174, "btcusdt@depth@100ms": 6_495,
                        SNAPSHOT: 1}

    # The envelope-only census agrees, file by file.
    census = count_lines_by_stream(recorded_tape())
    assert dict(census) == expected and census[BAD_LINE] == 0
    assert sum(count_lines_by_stream(DATA / FILE_0808).values()) == 41_249
    assert sum(count_lines_by_stream(DATA / FILE_0809).values()) == 58_325

    # The full parser sees every line, parses every one, and counts by stream the same way.
    parser = BinanceParser()
    kinds = {Trade: 0, Quote: 0, DepthDiff: 0, DepthSnapshot: 0}
    for event in parse_lines(iter_lines(recorded_tape()), parser):
        kinds[type(event)] += 1
    assert parser.lines == len(tape_lines) and parser.bad_lines == 0
    assert dict(parser.counts) == expected
    assert kinds == {Trade: 19_904, Quote: 73_174, DepthDiff: 6_495, DepthSnapshot: 1}
    assert parser.lines == sum(parser.counts.values()) + parser.bad_lines


def test_snapshot_sits_on_line_8_after_the_first_depth_updates(tape_lines):
    parser = BinanceParser()
    events = [parser.parse(line) for line in tape_lines[:8]]
    assert [type(e) for e in events] == [DepthDiff, DepthDiff, Quote, Trade, Quote, DepthDiff, Quote,
                                         DepthSnapshot]
    snap = events[-1]
    assert snap.last_update_id == 50_093_239_218
    assert len(snap.bids) == len(snap.asks) == 1000
    assert snap.bids[0] == (61837.63, 3.78826) and snap.asks[0] == (61837.64, 1.54698)
    assert snap.symbol == "BTCUSDT"  # the REST answer has no symbol: taken from the depth stream
    assert snap.recv_ts_ns == 1_723_161_254_206_652_067


# ------------------------------------------------------------------------------------------ typed decoding
def test_each_stream_decodes_to_its_event_with_exact_values():
    parser = BinanceParser()
    trade = parser.parse(TRADE_LINE)
    assert trade == Trade(ts_ns=1_723_161_255_342_000_000, price=61837.63, qty=0.02, aggressor=Side.SELL,
                          trade_id=3_735_683_259, recv_ts_ns=1_723_161_254_087_896_568, symbol="BTCUSDT")
    quote = parser.parse(TICKER_LINE)
    assert quote == Quote(update_id=50_093_239_212, bid_px=61837.63, bid_qty=3.78826, ask_px=61837.64,
                          ask_qty=1.54698, ts_ns=1_723_161_254_087_891_268, symbol="BTCUSDT")
    assert quote.mid == pytest.approx(61837.635)
    diff = parser.parse(DEPTH_LINE)
    assert diff == DepthDiff(first_update_id=50_093_239_203, final_update_id=50_093_239_207,
                             bids=((55653.87, 0.0),), asks=((61838.04, 0.1617),),
                             ts_ns=1_723_161_255_308_000_000, recv_ts_ns=1_723_161_254_036_059_768,
                             symbol="BTCUSDT")
    snap = parser.parse(SNAPSHOT_LINE)
    assert snap == DepthSnapshot(50_093_239_218, ((61837.63, 3.78826),), ((61837.64, 1.54698),),
                                 1_723_161_254_206_652_067, "BTCUSDT")
    # str lines parse exactly like bytes lines
    assert parser.parse(TRADE_LINE.decode()) == trade
    assert parser.parse(TICKER_LINE.decode() + "\n") == quote
    assert dict(parser.counts) == {"btcusdt@trade": 2, "btcusdt@bookTicker": 2, "btcusdt@depth@100ms": 1,
                                   SNAPSHOT: 1}


def test_buyer_is_maker_false_means_the_buyer_was_the_aggressor():
    line = TRADE_LINE.replace(b'"m":true', b'"m":false')
    assert BinanceParser().parse(line).aggressor is Side.BUY


def test_msgspec_floats_equal_python_floats_of_the_same_strings(tape_lines):
    # Every price and quantity of every depth and trade message, decoded by the parser, must equal float() of
    # the wire's decimal string (checked with the json module, independently of msgspec).
    parser = BinanceParser()
    checked = 0
    for line in tape_lines:
        if b"@depth" not in line and b"@trade" not in line:
            continue
        event = parser.parse(line)
        data = json.loads(line.partition(b" ")[2])["data"]
        if isinstance(event, Trade):
            assert (event.price, event.qty) == (float(data["p"]), float(data["q"]))
            checked += 2
        else:
            assert event.bids == tuple((float(p), float(q)) for p, q in data["b"])
            assert event.asks == tuple((float(p), float(q)) for p, q in data["a"])
            checked += 2 * (len(data["b"]) + len(data["a"]))
    assert checked > 600_000


def test_wire_and_event_structs_are_frozen_kimiha_events():
    for cls in (binance.WireTrade, binance.WireBookTicker, binance.WireDepthUpdate, binance.WireDepthSnapshot,
                Trade, Quote, DepthDiff, DepthSnapshot, BookUpdate, Signal, Order, Fill):
        assert issubclass(cls, Event)
        assert cls.__struct_config__.frozen
    trade = BinanceParser().parse(TRADE_LINE)
    with pytest.raises(AttributeError):
        trade.price = 1.0  # type: ignore[misc]
    # Tagged: a channel can carry a union of them and decode each back to its own type.
    union = Trade | Quote | DepthDiff | DepthSnapshot | BookUpdate | Signal | Order | Fill
    decoder = msgspec.msgpack.Decoder(union)
    parser = BinanceParser()
    for line in (TRADE_LINE, TICKER_LINE, DEPTH_LINE, SNAPSHOT_LINE):
        event = parser.parse(line)
        assert decoder.decode(msgspec.msgpack.encode(event)) == event


# --------------------------------------------------------------------------------------------- bad lines
BAD_LINES = {
    "corrupt": (TRADE_LINE.replace(b'"p":"61837.63000000"', b'"p":"61837.6x"'),
                ["line 2", "'btcusdt@trade'", "expected a Binance trade payload", "$.p"]),
    "truncated": (TICKER_LINE[:70], ["line 3", "malformed or truncated"]),
    "no timestamp": (b"abc " + TICKER_LINE.partition(b" ")[2], ["line 4", "integer receive timestamp"]),
    "unknown stream": (TRADE_LINE.replace(b"btcusdt@trade", b"btcusdt@aggTrade"),
                       ["line 5", "'btcusdt@aggTrade'", "not supported"]),
    "wrong payload for stream": (TRADE_LINE.replace(b'"e":"trade"', b'"e":"depthUpdate"'),
                                 ["line 6", "expected a Binance trade payload", "$.e"]),
    "neither envelope nor snapshot": (b'1 {"hello":"world"}', ["line 7", "REST depth snapshot"]),
    "no json": (b"1723161254087896568", ["line 8", "no JSON part"]),
}


def test_bad_lines_are_reported_with_line_stream_and_expectation_and_skipped():
    lines = [TRADE_LINE] + [bad for bad, _ in BAD_LINES.values()] + [TICKER_LINE]
    errors: list[SerializationError] = []
    parser = BinanceParser()
    events = list(parse_lines(lines, parser, on_error=errors.append))

    assert [type(e) for e in events] == [Trade, Quote]  # parsing continued past every bad line
    assert parser.lines == len(lines) and parser.bad_lines == len(BAD_LINES)
    assert dict(parser.counts) == {"btcusdt@trade": 1, "btcusdt@bookTicker": 1}
    assert len(errors) == len(BAD_LINES) and list(parser.errors) == errors
    for line_no, err, (name, (_, fragments)) in zip(range(2, 9), errors, BAD_LINES.items(), strict=True):
        assert isinstance(err, SerializationError)
        assert err.line_no == line_no
        for fragment in fragments:
            assert fragment in str(err), (name, str(err))
        assert "the line starts" in str(err)


def test_the_census_and_the_parser_agree_on_every_kind_of_bad_line(tmp_path):
    lines = [TRADE_LINE, TICKER_LINE] + [bad for bad, _ in BAD_LINES.values()] + [DEPTH_LINE, SNAPSHOT_LINE]
    lines += [b'1 {"lastUpdateId":5}', b'1 {"stream":"btcusdt@bookTicker"}', b"1 [1, 2]"]
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"\n".join(lines) + b"\n")
    parser = BinanceParser()
    list(parse_lines(iter_lines(path), parser, on_error=lambda exc: None))
    census = count_lines_by_stream(path)
    # one definition: a line is bad exactly when the parser rejects it, whatever the reason
    assert census[BAD_LINE] == parser.bad_lines == len(BAD_LINES) + 3
    assert {k: v for k, v in census.items() if k != BAD_LINE} == dict(parser.counts)
    assert sum(census.values()) == parser.lines == len(lines)


@pytest.mark.parametrize("line", [
    b"\x1b[31m\xff\xfe\x00 \x9b2J\x07",  # raw control bytes and invalid UTF-8
    "\x1b]0;title\x07 {}",  # a str line
    b'1 {"stream":"\\u001b[2J@trade","data":{"e":"\\u001b[31m"}}',  # escapes decoded from JSON strings
    b'1 {"stream":"' + b"\\u0007" * 5000 + b'@trade"}',  # a huge stream name
    b"1 " + b"\x00" * 100_000,
])
def test_bad_line_messages_are_escaped_and_capped(line):
    with pytest.raises(SerializationError) as info:
        BinanceParser().parse(line)
    message = str(info.value)
    assert all(c.isprintable() for c in message), message
    assert len(message) < 1500
    assert "the line starts" in message


def test_bad_line_snippets_keep_undecodable_bytes_visible():
    with pytest.raises(SerializationError, match=r"the line starts b'junk \\xff'"):
        BinanceParser().parse(b"junk \xff")


def test_parse_lines_says_how_many_bad_lines_it_did_not_show(caplog):
    lines = [b"junk %d" % i for i in range(binance.BAD_LINE_WARNINGS + 7)] + [TRADE_LINE]
    with caplog.at_level("WARNING", logger="kimiha.venues.binance"):
        assert len(list(parse_lines(lines))) == 1
    shown = [r for r in caplog.records if "skipped a bad line" in r.getMessage()]
    assert len(shown) == binance.BAD_LINE_WARNINGS
    assert "further ones are counted, not shown" in shown[-1].getMessage()
    assert caplog.records[-1].getMessage() == (
        f"7 more bad line(s) were skipped and not shown ({binance.BAD_LINE_WARNINGS + 7} in all)")


def test_parse_raises_serialization_error_and_logs_when_skipping(caplog):
    parser = BinanceParser()
    with pytest.raises(SerializationError, match=r"line 1, stream 'btcusdt@bookTicker'.*\$\.b"):
        parser.parse(TICKER_LINE.replace(b'"b":"61837.63000000"', b'"b":[1]'))
    with pytest.raises(SerializationError, match="expected a line as bytes or str"):
        parser.parse(12345)  # type: ignore[arg-type]
    assert parser.bad_lines == 2 and parser.lines == 2
    with caplog.at_level("WARNING", logger="kimiha.venues.binance"):
        assert list(parse_lines([TICKER_LINE[:50]], parser)) == []
    assert "skipped a bad line" in caplog.text and "line 3" in caplog.text


def test_corrupt_and_truncated_lines_in_a_recording_are_skipped_and_the_replay_stays_exact(tmp_path):
    lines = _raw_lines(FILE_0808)
    corrupt = lines[100].replace(b'"s":"BTCUSDT"', b'"s":BTCUSDT')  # invalid JSON
    truncated = lines[200][: len(lines[200]) // 2]
    damaged = lines[:150] + [corrupt] + lines[150:300] + [truncated] + lines[300:]
    path = tmp_path / "damaged.gz"
    path.write_bytes(gzip.compress(b"\n".join(damaged) + b"\n", compresslevel=1))

    assert count_lines_by_stream(path)[BAD_LINE] == 2
    report = rebuild_book(path)
    assert report.lines == len(damaged) and report.bad_lines == 2
    assert sum(report.counts.values()) == len(lines)
    assert report.gaps == 0 and report.matched == report.compared > 0


# --------------------------------------------------------------------------------------------- sources
def test_plain_and_gzipped_recordings_are_detected_by_magic_bytes(tmp_path):
    lines = _raw_lines(FILE_0808)[:500]
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"\n".join(lines) + b"\n\n")  # a trailing blank line is not a message
    packed = tmp_path / "packed.data"  # no .gz suffix: detection must not rely on the name
    packed.write_bytes(gzip.compress(b"\r\n".join(lines)))
    assert list(iter_lines(plain)) == lines
    assert list(iter_lines(packed)) == lines
    assert list(iter_lines([plain, str(packed)])) == lines + lines


def test_a_truncated_gzip_recording_fails_loudly_after_the_lines_it_holds(tmp_path):
    lines = _raw_lines(FILE_0808)[:3000]
    data = gzip.compress(b"\n".join(lines) + b"\n", compresslevel=1)
    path = tmp_path / "crashed-recorder.gz"
    path.write_bytes(data[: len(data) // 2])
    seen = []
    with pytest.raises(SerializationError, match=r"crashed-recorder\.gz.*truncated or corrupt after \d+ "):
        seen.extend(iter_lines(path))  # keeps what was yielded before the error
    assert 0 < len(seen) < 3000 and seen == lines[: len(seen)]


class FakeTime:
    """A clock that only moves when the code under test sleeps; records every sleep and every line."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.log: list[tuple[str, object]] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.log.append(("sleep", seconds))
        self.now += seconds


def _synthetic(tmp_path, stamps):
    path = tmp_path / "paced.txt"
    path.write_bytes(b"".join(b"%d " % ts + TICKER_LINE.partition(b" ")[2] + b"\n" for ts in stamps))
    return path


@pytest.mark.asyncio
async def test_replay_paces_by_recorded_time_divided_by_speed(tmp_path):
    path = _synthetic(tmp_path, [0, 100_000_000, 200_000_000])
    fake = FakeTime()
    async for line in replay_lines(path, speed=10, clock=fake.clock, sleep=fake.sleep):
        fake.log.append(("line", int(line.partition(b" ")[0])))
    # 0.1 s apart in the recording, replayed ten times faster: a 10 ms wait before each later line.
    assert [kind for kind, _ in fake.log] == ["line", "sleep", "line", "sleep", "line"]
    assert [v for k, v in fake.log if k == "line"] == [0, 100_000_000, 200_000_000]
    assert [v for k, v in fake.log if k == "sleep"] == [pytest.approx(0.01), pytest.approx(0.01)]


@pytest.mark.asyncio
async def test_replay_does_not_sleep_when_already_late_and_keeps_the_schedule(tmp_path):
    path = _synthetic(tmp_path, [0, 100_000_000, 200_000_000, 300_000_000, 500_000_000])
    fake = FakeTime()
    seen = []
    async for line in replay_lines(path, speed=1.0, clock=fake.clock, sleep=fake.sleep):
        seen.append(line)
        if len(seen) == 2:
            fake.now += 0.25  # a slow consumer: at t=0.35 s, lines 3 (0.2 s) and 4 (0.3 s) are late
    # Line 2 waits 0.1 s; lines 3 and 4 go out at once; line 5 waits until its slot on the original
    # schedule (0.5 s after the start), not 0.2 s after line 4.
    assert [v for k, v in fake.log if k == "sleep"] == [pytest.approx(0.1), pytest.approx(0.15)]
    assert len(seen) == 5


@pytest.mark.asyncio
async def test_unpaced_replay_yields_to_the_loop_every_few_hundred_lines(tmp_path):
    path = _synthetic(tmp_path, range(1000))
    fake = FakeTime()
    count = 0
    async for _ in replay_lines(path, clock=fake.clock, sleep=fake.sleep, yield_every=256):
        count += 1
    assert count == 1000
    assert fake.log == [("sleep", 0)] * 3  # after lines 256, 512, 768: a turn for the loop, no delay


@pytest.mark.asyncio
async def test_unpaced_replay_of_the_tape_lets_other_tasks_run():
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    parser = BinanceParser()
    async for line in replay_lines(recorded_tape()):
        parser.parse(line)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert parser.lines == 99_574 and parser.bad_lines == 0
    assert ticks >= 99_574 // 256  # the other task ran at least once per yield


@pytest.mark.asyncio
@pytest.mark.parametrize("speed", [0, -1, math.inf, math.nan, "fast", True])
async def test_replay_rejects_bad_speed(speed, tmp_path):
    path = _synthetic(tmp_path, [0])
    with pytest.raises(InvalidConfigurationError, match="speed must be None or a finite number > 0"):
        async for _ in replay_lines(path, speed=speed):
            pass
