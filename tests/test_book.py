"""The L2 order book: Binance sequencing rules, gap detection and resync, and the end-to-end book check."""

from __future__ import annotations

import gzip
import json
import pickle
import random
from importlib import resources

import pytest

from kimiha.trading.book import BookCheck, BookGap, BookNotReady, BookState, OrderBook
from kimiha.error import InvalidConfigurationError, OrchestratorError
from kimiha.trading.model import BookUpdate, DepthDiff, DepthSnapshot, Quote
from kimiha.venues.binance import BinanceParser, iter_lines, parse_lines, rebuild_book, recorded_tape

DATA = resources.files("kimiha") / "data"
FILES = ("hftbacktest_examples_spot_btcusdt_20240808.gz", "hftbacktest_examples_spot_btcusdt_20240809.gz")


def snap(last, bids=((100.0, 1.0), (99.0, 2.0)), asks=((101.0, 1.5), (102.0, 3.0))):
    return DepthSnapshot(last, tuple(bids), tuple(asks))


def diff(first, final, bids=(), asks=()):
    return DepthDiff(first, final, tuple(bids), tuple(asks))


# ------------------------------------------------------------------------------------- the shipped tape
def test_book_check_on_the_shipped_tape_matches_bookticker_everywhere():
    report = rebuild_book()
    print(f"\nbook check: {report.matched} matched of {report.compared} compared; "
          f"{report.lines} lines in {report.elapsed_s:.3f} s = {report.messages_per_s:,.0f} messages/s")
    assert report.compared >= 1000
    assert report.compared == 1072  # the figure the data README gives
    assert report.matched == report.compared
    assert report.lines == 99_574 and report.bad_lines == 0
    assert report.diffs == 6_495 and report.snapshots == 1
    assert report.applied == 6_493 and report.stale == 2  # two diffs predate the snapshot
    assert report.gaps == 0 and report.gap_errors == [] and report.resyncs == 0
    assert report.crossed == 0
    assert report.final_state == "live"


def _reference_book():
    """Rebuild the final book with the json module, plain dicts and max/min: nothing shared with kimiha."""
    bids, asks, pending, last = {}, {}, [], None
    for name in FILES:
        with (DATA / name).open("rb") as f:
            for line in gzip.decompress(f.read()).splitlines():
                msg = json.loads(line.partition(b" ")[2])
                if "lastUpdateId" in msg:
                    last = msg["lastUpdateId"]
                    bids = {float(p): float(q) for p, q in msg["bids"]}
                    asks = {float(p): float(q) for p, q in msg["asks"]}
                    todo, pending = pending, []
                elif "depth" in msg["stream"]:
                    todo = [msg["data"]] if last is not None else pending.append(msg["data"]) or []
                else:
                    continue
                for d in todo:
                    if d["u"] <= last:
                        continue
                    for side, levels in ((bids, d["b"]), (asks, d["a"])):
                        for p, q in levels:
                            if float(q) == 0:
                                side.pop(float(p), None)
                            else:
                                side[float(p)] = float(q)
                    last = d["u"]
    return bids, asks, last


def test_rebuilt_book_equals_an_independent_rebuild_at_the_end_of_the_tape():
    book = OrderBook("BTCUSDT")
    rebuild_book(book=book)
    bids, asks, last = _reference_book()
    assert book.last_update_id == last
    assert len(book) == len(bids) + len(asks)
    top_bids, top_asks = book.depth(50)
    assert top_bids == sorted(bids.items(), reverse=True)[:50]
    assert top_asks == sorted(asks.items())[:50]
    assert list(book.iter_bids()) == sorted(bids.items(), reverse=True)
    assert list(book.iter_asks()) == sorted(asks.items())
    assert book.best_bid() == max(bids.items()) and book.best_ask() == min(asks.items())
    assert not book.is_crossed()


def test_a_removed_depth_update_is_detected_as_a_gap_and_never_yields_a_wrong_book(tmp_path):
    paths = []
    removed = None
    for name in FILES:
        with (DATA / name).open("rb") as f:
            lines = gzip.decompress(f.read()).splitlines()
        if removed is None:
            depth_at = [i for i, line in enumerate(lines) if b"@depth" in line]
            index = depth_at[1000]  # well after the snapshot
            removed = json.loads(lines[index].partition(b" ")[2])["data"]
            del lines[index]
        path = tmp_path / name
        path.write_bytes(gzip.compress(b"\n".join(lines) + b"\n", compresslevel=1))
        paths.append(path)

    book = OrderBook()
    report = rebuild_book(paths, book=book)
    assert report.gaps == 1 and book.gaps == 1
    assert report.final_state == "out_of_sync"  # the tape has no second snapshot to resync with
    gap = report.gap_errors[0]
    assert f"expected first_update_id == {removed['U']}" in gap
    assert f"got a diff covering {removed['u'] + 1}.." in gap
    assert f"({removed['u'] - removed['U'] + 1} update id(s) missing)" in gap
    # Up to the gap the book was checked and exact; after it, nothing was compared because nothing was
    # published: no comparison ever failed.
    assert 0 < report.compared < 1072 and report.matched == report.compared
    assert report.applied < 6_493
    with pytest.raises(BookNotReady, match="out_of_sync"):
        book.best_bid()


# ------------------------------------------------------------------------------------ sequencing rules
def test_diffs_before_the_snapshot_are_buffered_then_applied_in_order():
    book = OrderBook("X")
    assert book.state is BookState.AWAITING_SNAPSHOT
    assert book.apply_diff(diff(1, 5, bids=[(98.0, 1.0)])) is None  # stale once the snapshot (10) comes
    assert book.apply_diff(diff(6, 12, bids=[(100.0, 0.0)])) is None  # straddles 11
    assert book.apply_diff(diff(13, 15, asks=[(100.5, 0.25)])) is None
    assert book.buffered == 3
    with pytest.raises(BookNotReady, match="awaiting_snapshot.*no snapshot"):
        book.best_bid()

    updates = book.apply_snapshot(snap(10))
    assert book.state is BookState.LIVE and book.buffered == 0
    assert [(u.first_update_id, u.final_update_id) for u in updates] == [(6, 12), (13, 15)]
    assert book.stale == 1 and book.applied == 2 and book.last_update_id == 15
    assert updates[0] == BookUpdate(6, 12, 99.0, 2.0, 101.0, 1.5, 1, symbol="X")
    assert updates[1] == BookUpdate(13, 15, 99.0, 2.0, 100.5, 0.25, 1, symbol="X")
    assert book.best_bid() == (99.0, 2.0) and book.best_ask() == (100.5, 0.25)
    assert 98.0 not in dict(book.depth(10)[0])  # the stale diff's level was never applied


def test_live_diffs_must_continue_exactly():
    book = OrderBook()
    book.apply_snapshot(snap(10))
    assert book.apply_diff(diff(5, 10, bids=[(1.0, 1.0)])) is None  # stale: final <= lastUpdateId
    assert book.stale == 1
    up = book.apply_diff(diff(11, 11, bids=[(100.0, 4.0)]))  # first diff may start exactly at last + 1
    assert up.bid_qty == 4.0 and up.levels_changed == 1
    assert book.apply_diff(diff(12, 20, asks=[(101.0, 0.0), (101.5, 7.0)])).ask_px == 101.5
    assert book.apply_diff(diff(15, 20)) is None and book.stale == 2  # a replayed diff is stale, not a gap


def test_first_diff_after_the_snapshot_must_straddle_it():
    book = OrderBook("BTCUSDT")
    book.apply_snapshot(snap(10))
    with pytest.raises(BookGap) as info:
        book.apply_diff(diff(12, 20))  # update 11 is missing
    err = info.value
    assert isinstance(err, OrchestratorError)
    assert (err.expected_first_update_id, err.first_update_id, err.final_update_id) == (11, 12, 20)
    assert "BTCUSDT order book" in str(err) and "first_update_id <= 11 <= final_update_id" in str(err)
    assert book.state is BookState.OUT_OF_SYNC and book.gaps == 1


def test_a_gap_empties_the_book_flags_it_and_a_new_snapshot_resyncs():
    book = OrderBook("BTCUSDT")
    book.apply_snapshot(snap(10))
    book.apply_diff(diff(11, 12))
    with pytest.raises(BookGap, match=r"expected first_update_id == 13 .* covering 15\.\.16 \(2 update id"):
        book.apply_diff(diff(15, 16, bids=[(100.0, 9.0)]))
    assert book.state is BookState.OUT_OF_SYNC and book.gaps == 1 and len(book) == 0
    for read in (book.best_bid, book.best_ask, book.mid, book.is_crossed, book.iter_bids, book.iter_asks,
                 lambda: book.depth(5)):
        with pytest.raises(BookNotReady, match="BTCUSDT order book is out_of_sync, expected live"):
            read()
    # Diffs keep arriving while out of sync: buffered, no further error.
    assert book.apply_diff(diff(17, 18, asks=[(101.0, 0.5)])) is None
    assert book.buffered == 2

    # A snapshot newer than the gap resyncs; buffered diffs it already covers are dropped as stale.
    updates = book.apply_snapshot(snap(16, bids=[(100.0, 9.0)], asks=[(101.0, 1.0)]))
    assert book.state is BookState.LIVE and book.resyncs == 1
    assert [(u.first_update_id, u.final_update_id) for u in updates] == [(17, 18)]
    assert book.best_bid() == (100.0, 9.0) and book.best_ask() == (101.0, 0.5)


def test_a_snapshot_that_cannot_bridge_the_buffer_is_itself_a_gap():
    book = OrderBook()
    book.apply_diff(diff(20, 25))
    book.apply_diff(diff(26, 30))
    with pytest.raises(BookGap, match="first_update_id <= 11"):
        book.apply_snapshot(snap(10))  # 11..19 are missing between the snapshot and the buffered diffs
    assert book.state is BookState.OUT_OF_SYNC and book.buffered == 2  # both kept for the next snapshot
    assert [(u.first_update_id, u.final_update_id) for u in book.apply_snapshot(snap(27))] == [(26, 30)]
    assert book.state is BookState.LIVE


def test_without_raising_a_gap_is_flagged_and_counted():
    book = OrderBook(raise_on_gap=False)
    book.apply_snapshot(snap(10))
    assert book.apply_diff(diff(11, 12)) is not None
    assert book.apply_diff(diff(14, 15)) is None
    assert book.state is BookState.OUT_OF_SYNC and book.gaps == 1 and not book.is_live
    assert book.apply_snapshot(snap(9)) == []  # older than the buffered diff: still a gap
    assert book.state is BookState.OUT_OF_SYNC and book.gaps == 2


def test_buffer_overflow_drops_oldest_and_is_reported_as_a_gap_at_snapshot():
    book = OrderBook(max_buffer=2)
    for first in (11, 13, 15):
        book.apply_diff(diff(first, first + 1))
    assert book.buffer_dropped == 1 and book.buffered == 2
    with pytest.raises(BookGap):
        book.apply_snapshot(snap(10))  # the diff 11..12 was dropped


def test_book_gap_pickles():
    err = BookGap("BTCUSDT", 13, 15, 16)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) and copy.final_update_id == 16


# ------------------------------------------------------------------------------------ levels and reads
def test_quantities_are_absolute_and_zero_removes_the_level():
    book = OrderBook.from_levels([(100.0, 1.0), (99.0, 2.0)], [(101.0, 1.5), (102.0, 3.0)])
    book.apply_diff(diff(1, 1, bids=[(100.0, 0.4), (99.5, 1.0), (50.0, 0.0)], asks=[(101.0, 0.0)]))
    assert book.depth(3) == ([(100.0, 0.4), (99.5, 1.0), (99.0, 2.0)], [(102.0, 3.0)])
    assert book.mid() == 101.0 and book.spread() == 2.0
    assert book.depth(0) == ([], [])
    with pytest.raises(ValueError, match="n must be an int >= 0"):
        book.depth(-1)
    book.apply_diff(diff(2, 2, bids=[(100.0, 0.0), (99.5, 0.0), (99.0, 0.0)]))
    assert book.best_bid() is None and book.mid() is None and not book.is_crossed()


def test_crossed_book_is_detected():
    book = OrderBook.from_levels([(100.0, 1.0)], [(101.0, 1.0)])
    assert not book.is_crossed()
    book.apply_diff(diff(1, 1, bids=[(101.0, 2.0)]))
    assert book.is_crossed()  # a locked book (bid == ask) cannot be right either


def test_random_diffs_match_a_brute_force_book():
    rng = random.Random(7)
    prices = [round(100 + 0.01 * i, 2) for i in range(-300, 300)]
    bids = {p: 1.0 for p in prices if p < 100}
    asks = {p: 1.0 for p in prices if p > 100}
    book = OrderBook.from_levels(bids.items(), asks.items())
    for uid in range(1, 3000):
        b, a = [], []
        for _ in range(rng.randint(1, 20)):
            p = rng.choice(prices)
            q = 0.0 if rng.random() < 0.4 else round(rng.random(), 5)
            (b if p < 100 else a).append((p, q))
            side = bids if p < 100 else asks
            if q == 0.0:
                side.pop(p, None)
            else:
                side[p] = q
        up = book.apply_diff(diff(uid, uid, b, a))
        best_bid = max(bids) if bids else None
        best_ask = min(asks) if asks else None
        assert (up.bid_px, up.ask_px) == (best_bid, best_ask)
        assert up.bid_qty == (bids[best_bid] if bids else None)
    assert book.depth(700) == (sorted(bids.items(), reverse=True), sorted(asks.items()))


def test_bad_arguments_are_refused():
    with pytest.raises(InvalidConfigurationError, match="max_buffer must be an int >= 1"):
        OrderBook(max_buffer=0)
    with pytest.raises(TypeError, match="expected a DepthSnapshot, got DepthDiff"):
        OrderBook().apply_snapshot(diff(1, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="expected a DepthDiff, got Quote"):
        OrderBook().apply_diff(Quote(1, 1.0, 1.0, 2.0, 1.0))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------- book check
def _quote(uid, bid=(100.0, 1.0), ask=(101.0, 2.0)):
    return Quote(uid, bid[0], bid[1], ask[0], ask[1])


def _update(uid, bid=(100.0, 1.0), ask=(101.0, 2.0)):
    return BookUpdate(uid - 3, uid, bid[0], bid[1], ask[0], ask[1])


def test_book_check_pairs_by_update_id_in_either_order_and_reports_mismatches():
    check = BookCheck()
    assert check.on_quote(_quote(5)) is None
    assert check.on_quote(_quote(7)) is None
    assert check.on_update(_update(7)) is True  # quote first (the usual order on Binance)
    assert check.on_update(_update(9, bid=(100.0, 3.0))) is None
    assert check.on_quote(_quote(9)) is False  # quote after the update, and the bid qty differs
    assert check.on_quote(_quote(8)) is None  # older than the last update: can never be compared
    assert check.on_update(_update(12)) is None
    assert (check.compared, check.matched) == (2, 1)
    uid, quote, update = check.mismatches[0]
    assert uid == 9 and quote.bid_qty == 1.0 and update.bid_qty == 3.0
    assert check.match_ratio == 0.5
    assert not check._quotes  # quotes 5 and 8 were pruned once update ids passed them


def test_parsed_quote_and_book_update_compare_equal_through_float_parsing():
    # Identical decimal strings give identical floats, so a rebuilt level equals the bookTicker value.
    parser = BinanceParser()
    events = list(parse_lines(iter_lines(recorded_tape()), parser))
    quotes = {e.update_id: e for e in events if isinstance(e, Quote)}
    book = OrderBook()
    hits = 0
    for e in events:
        if isinstance(e, DepthSnapshot):
            book.apply_snapshot(e)
        elif isinstance(e, DepthDiff):
            up = book.apply_diff(e)
            if up is None or up.final_update_id not in quotes:
                continue
            q = quotes[up.final_update_id]
            assert (up.bid_px, up.bid_qty) == (q.bid_px, q.bid_qty)
            assert (up.ask_px, up.ask_qty) == (q.ask_px, q.ask_qty)
            hits += 1
    assert hits == 1072
