"""Faults in Binance recordings and wire lines (issue "Reliability round 2", items 12 and 17).

* item 12: prices and quantities that are not finite numbers, or are out of their range (negative, zero where
  zero means nothing), are bad lines: rejected by the parser with a message naming the stream, the field and
  the value, and counted like every other bad line (the census, the replay and the CLI agree);
* item 17: a recording without newlines is read in linear time, and a line longer than the maximum is a clear
  error naming the file, the line number and the limit (one line and exit 2 from the CLI).

Each process of the CLI tests runs with ``cwd=tmp_path`` so that it imports the installed kimiha.
"""

from __future__ import annotations

import gzip
import io
import json
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kimiha.error import SerializationError
from kimiha.trading.model import DepthDiff, DepthSnapshot
from kimiha.venues.binance import (
    BAD_LINE,
    BinanceParser,
    count_lines_by_stream,
    iter_lines,
    parse_lines,
    rebuild_book,
    recorded_tape,
)
from kimiha.venues.binance import recording

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

NON_FINITE = ['"NaN"', '"nan"', '"inf"', '"-inf"', '"Infinity"', '"-Infinity"']
NEGATIVE = ['"-1.5"', '"-0.00000001"', '-2']  # the last a JSON number, not a decimal string
ZERO = ['"0"', '"0.00000000"', '"-0.0"', '0']

# (line, wire text of the value to replace, name of the field in the message, its JSON path, stream)
FIELDS = {
    "trade price": (TRADE_LINE, b'"61837.63000000"', "price", "$.p", "'btcusdt@trade'"),
    "trade quantity": (TRADE_LINE, b'"0.02000000"', "qty", "$.q", "'btcusdt@trade'"),
    "bookTicker bid price": (TICKER_LINE, b'"61837.63000000"', "bid_px", "$.b", "'btcusdt@bookTicker'"),
    "bookTicker bid quantity": (TICKER_LINE, b'"3.78826000"', "bid_qty", "$.B", "'btcusdt@bookTicker'"),
    "bookTicker ask price": (TICKER_LINE, b'"61837.64000000"', "ask_px", "$.a", "'btcusdt@bookTicker'"),
    "bookTicker ask quantity": (TICKER_LINE, b'"1.54698000"', "ask_qty", "$.A", "'btcusdt@bookTicker'"),
    "depth bid price": (DEPTH_LINE, b'"55653.87000000"', "bids[0] price", "$.b[0][0]",
                        "'btcusdt@depth@100ms'"),
    "depth ask price": (DEPTH_LINE, b'"61838.04000000"', "asks[0] price", "$.a[0][0]",
                        "'btcusdt@depth@100ms'"),
    "depth ask quantity": (DEPTH_LINE, b'"0.16170000"', "asks[0] quantity", "$.a[0][1]",
                           "'btcusdt@depth@100ms'"),
    "snapshot bid price": (SNAPSHOT_LINE, b'"61837.63000000"', "bids[0] price", "$.bids[0][0]", "snapshot"),
    "snapshot bid quantity": (SNAPSHOT_LINE, b'"3.78826000"', "bids[0] quantity", "$.bids[0][1]", "snapshot"),
    "snapshot ask price": (SNAPSHOT_LINE, b'"61837.64000000"', "asks[0] price", "$.asks[0][0]", "snapshot"),
    "snapshot ask quantity": (SNAPSHOT_LINE, b'"1.54698000"', "asks[0] quantity", "$.asks[0][1]", "snapshot"),
}
# Zero is legal only for a depth diff's quantity (it removes the level); a zero price is never legal, and a
# trade, a best bid/ask or a snapshot level of zero quantity does not exist.
ZERO_IS_LEGAL = {"depth ask quantity"}


def _doctor(field: str, value: str) -> bytes:
    line, old, *_ = FIELDS[field]
    assert line.count(old) == 1, field
    return line.replace(old, value.encode())


def _cases(values: list[str], skip: set[str] = set()) -> list[Any]:
    return [pytest.param(f, v, id=f"{f}={v}") for f in FIELDS if f not in skip for v in values]


# ------------------------------------------------------------------------------ item 12: values out of range
@pytest.mark.parametrize(("field", "value"), _cases(NON_FINITE + NEGATIVE) + _cases(ZERO, ZERO_IS_LEGAL))
def test_a_price_or_quantity_out_of_range_is_a_bad_line_naming_stream_field_and_value(field, value):
    _, _, name, path, stream = FIELDS[field]
    parser = BinanceParser()
    with pytest.raises(SerializationError) as info:
        parser.parse(_doctor(field, value))
    message = str(info.value)
    assert stream in message, message
    assert f"{name} `{path}`" in message, message
    shown = repr(value[1:-1]) if value.startswith('"') else value  # a decimal string is quoted, a number not
    assert f"got {shown}" in message, message
    assert "expected" in message and "the line starts" in message
    assert parser.bad_lines == 1 and parser.lines == 1 and not parser.counts
    assert info.value.line_no == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", ZERO)
def test_zero_quantity_in_a_depth_diff_removes_the_level_and_is_legal(value):
    diff = BinanceParser().parse(_doctor("depth ask quantity", value))
    assert isinstance(diff, DepthDiff) and diff.asks == ((61838.04, 0.0),)
    assert BinanceParser().parse(DEPTH_LINE).bids == ((55653.87, 0.0),)  # the tape's own zero


def test_a_level_with_nan_anywhere_in_a_long_snapshot_is_found_and_named():
    levels = b",".join(b'["%d.5","1.0"]' % (60000 - i) for i in range(999))
    line = b'1 {"lastUpdateId":7,"bids":[' + levels + b',["59000.0","NaN"]],"asks":[["61000.0","2.0"]]}'
    assert isinstance(BinanceParser(symbol="BTCUSDT").parse(line.replace(b'"NaN"', b'"3"')), DepthSnapshot)
    with pytest.raises(SerializationError, match=r"bids\[999\] quantity `\$\.bids\[999\]\[1\]`.*got 'NaN'"):
        BinanceParser().parse(line)


def test_an_out_of_range_value_is_escaped_and_capped_in_the_message():
    # -0.000...1 with 5,000 zeros is a valid decimal, equal to -0.0: not a price; the message must stay short
    huge = '"-0.' + "0" * 5000 + '1"'
    with pytest.raises(SerializationError) as info:
        BinanceParser().parse(_doctor("trade price", huge))
    message = str(info.value)
    assert "price `$.p`" in message and "got '-0.0000" in message
    assert len(message) < 1000 and all(c.isprintable() for c in message)


def _doctored_tape(tmp_path: Path, n_good: int) -> tuple[Path, list[bytes], list[bytes]]:
    good: list[bytes] = []
    for line in iter_lines(recorded_tape()):
        good.append(line)
        if len(good) == n_good:
            break
    bad = [_doctor(field, value) for field, value in [
        ("trade price", '"NaN"'), ("trade quantity", '"-0.5"'), ("bookTicker bid price", '"inf"'),
        ("bookTicker ask quantity", '"-inf"'), ("depth bid price", '"0"'), ("depth ask quantity", '"-1"'),
        ("snapshot bid price", '"nan"'), ("snapshot ask quantity", '"0"'),
    ]]
    lines = good[: n_good // 2] + bad + good[n_good // 2:]
    path = tmp_path / "doctored.gz"
    path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", compresslevel=1))
    return path, good, bad


def test_out_of_range_lines_are_counted_alike_by_the_census_the_parser_and_the_replay(tmp_path):
    path, good, bad = _doctored_tape(tmp_path, 4000)
    census = count_lines_by_stream(path)
    assert census[BAD_LINE] == len(bad)
    assert sum(census.values()) == len(good) + len(bad)  # every line accounted for
    parser = BinanceParser()
    events = list(parse_lines(iter_lines(path), parser, on_error=lambda exc: None))
    assert len(events) == len(good) and parser.bad_lines == len(bad)
    report = rebuild_book(path)
    assert report.bad_lines == len(bad) and report.lines == len(good) + len(bad)
    assert report.crossed == 0 and report.matched == report.compared > 0


def _kimiha_cli(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "kimiha", *args], cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, check=False)


def test_the_demo_accounts_for_out_of_range_lines_as_bad_lines(tmp_path):
    path, good, bad = _doctored_tape(tmp_path, 3000)
    proc = _kimiha_cli("demo", "--json", "--no-progress", "--data", str(path), cwd=tmp_path)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    summary = json.loads(proc.stdout)
    assert summary["bad_lines"] == summary["bad_lines_in_files"] == len(bad)
    assert summary["lines_read"] == summary["lines_in_files"] == len(good) + len(bad)
    assert summary["all_lines_accounted"] is True
    assert err.count("skipped a bad line") == len(bad) and "got 'NaN'" in err


# --------------------------------------------------------------------- item 17: long lines, linear reading
def test_a_gzip_of_one_long_line_is_rejected_with_the_file_the_line_and_the_limit(tmp_path):
    path = tmp_path / "no-newlines.gz"
    path.write_bytes(gzip.compress(b"1 " + b"7" * (20 << 20), compresslevel=9))  # 20 MiB in ~20 KB
    with pytest.raises(recording.LineTooLongError) as info:
        count_lines_by_stream(path)
    message = str(info.value)
    assert isinstance(info.value, SerializationError)  # what the CLI's recording check turns into exit 2
    assert "no-newlines.gz" in message and "line 1 " in message and "16 MiB (16,777,216 bytes)" in message
    assert info.value.line_no == 1 and info.value.limit == 16 << 20
    with pytest.raises(recording.LineTooLongError):
        rebuild_book(path)


def test_the_maximum_line_length_is_configurable_and_counts_lines_of_the_file(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"a" * 10 + b"\r\n\n" + b"b" * 100 + b"\n" + b"c" * 100 + b"\r\n" + b"d" * 5)
    # the limit does not count the newline; a \r before it counts (it is a byte of the line as read)
    assert list(iter_lines(path, max_line_bytes=101)) == [b"a" * 10, b"b" * 100, b"c" * 100, b"d" * 5]
    too_long = r"mixed\.txt'.*at most 100 bytes \(max_line_bytes\), but line 4 is longer: 101 bytes"
    with pytest.raises(recording.LineTooLongError, match=too_long) as info:
        list(iter_lines([tmp_path / "mixed.txt", path], max_line_bytes=100))
    assert info.value.line_no == 4  # blank lines count: it is the file's line number, for an editor
    assert list(iter_lines(path, max_line_bytes=None))[-1] == b"d" * 5
    with pytest.raises(recording.LineTooLongError, match=r"line 3 "):
        list(iter_lines(path, max_line_bytes=50))
    for bad in (0, -1, 1.5, True, "16M"):
        with pytest.raises(ValueError, match="^iter_lines: max_line_bytes must be None .* or an int >= 1"):
            iter_lines(path, max_line_bytes=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="^count_lines_by_stream: max_line_bytes"):
        count_lines_by_stream(path, max_line_bytes=0)
    with pytest.raises(ValueError, match="^rebuild_book: max_line_bytes"):
        rebuild_book(path, max_line_bytes=-5)
    copy = pickle.loads(pickle.dumps(info.value))  # e.g. across processes
    assert str(copy) == str(info.value) and copy.line_no == 4


def test_a_long_last_line_without_newline_is_rejected_too(tmp_path):
    path = tmp_path / "tail.txt"
    path.write_bytes(b"x" * 10 + b"\n" + b"y" * 3000)
    with pytest.raises(recording.LineTooLongError, match="line 2 "):
        list(iter_lines(path, max_line_bytes=2999))
    assert list(iter_lines(path, max_line_bytes=3000)) == [b"x" * 10, b"y" * 3000]


def test_the_cli_rejects_a_recording_with_an_overlong_line_in_one_line_and_exit_2(tmp_path):
    path = tmp_path / "no-newlines.gz"
    path.write_bytes(gzip.compress(b"1 " + b"7" * (20 << 20), compresslevel=9))
    proc = _kimiha_cli("demo", "--data", str(path), cwd=tmp_path)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("kimiha demo: --data") and "no-newlines.gz" in err and "line 1 " in err
    assert "16 MiB" in err and "Traceback" not in err


class _Chunks(io.RawIOBase):
    """A file that returns ``data`` in reads of at most ``size`` bytes."""

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        end = len(self._data) if size < 0 else self._pos + size
        out = bytes(self._data[self._pos:end])
        self._pos += len(out)
        return out


class _FakePath:
    """An ``importlib.resources``-like path whose ``open`` gives a :class:`_Chunks` file."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def is_file(self) -> bool:
        return True

    def open(self, mode: str) -> _Chunks:
        return _Chunks(self.data)

    def __str__(self) -> str:
        return "fake-recording"


def _bytes_scanned(lines: Iterator[bytes]) -> tuple[int, int]:
    """Consume ``lines``; return how many lines, and the total length of the ``bytes`` / ``bytearray``
    objects whose methods recording.py called (``find``, ``split``, ``endswith`` ...): a bound on the work of
    splitting, counted rather than timed."""
    scanned = 0
    source = recording.__file__

    def profile(frame: Any, event: str, arg: Any) -> None:
        nonlocal scanned
        if event == "c_call" and frame.f_code.co_filename == source:
            owner = getattr(arg, "__self__", None)
            if isinstance(owner, (bytes, bytearray, memoryview)):
                scanned += len(owner)

    n = 0
    sys.setprofile(profile)
    try:
        for _ in lines:
            n += 1
    finally:
        sys.setprofile(None)
    return n, scanned


@pytest.mark.parametrize("shape", ["one line", "few long lines", "many short lines"])
def test_reading_a_recording_is_linear_in_its_size(shape):
    size = 12 << 20  # 48 of the 256 KiB chunks
    if shape == "one line":
        data = b"1 " + b"x" * size
    elif shape == "few long lines":
        data = (b"y" * (size // 3 - 1) + b"\n") * 3
    else:
        data = (b"z" * 99 + b"\n") * (size // 100)
    n, scanned = _bytes_scanned(iter_lines(_FakePath(data)))
    assert n == {"one line": 1, "few long lines": 3, "many short lines": size // 100}[shape]
    # Each byte is handed to a bounded number of methods (find the newline, split, check the line end and
    # blankness: 3 to 4 times here); the quadratic reader re-scanned the whole pending line for every chunk:
    # 27.5 times the size for one line, 10.5 for three.
    ratio = scanned / len(data)
    assert ratio <= 5, f"{scanned:,} bytes handed to bytes methods to split {len(data):,}: {ratio:.1f} times"
