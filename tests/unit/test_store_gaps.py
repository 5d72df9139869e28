"""Read-only audits of a SQLite store: holes, counts, ranges."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import pytest

from k2stream.records import StreamKey, Trade
from k2stream.sinks import store
from k2stream.sinks.sqlite import SqliteSink


BTC = StreamKey("BINANCE", "BTCUSDT", "trade")
ETH = StreamKey("BINANCE", "ETHUSDT", "trade")
ETH_AGG = StreamKey("BINANCE", "ETHUSDT", "aggTrade")
US_BTC = StreamKey("BINANCE_US", "BTCUSDT", "trade")


def trade(key: StreamKey, id_: int) -> Trade:
    return Trade(
        exchange=key.exchange,
        symbol=key.symbol,
        stream=key.stream,
        id=id_,
        price="1.0",
        quantity="2.0",
        trade_time_us=id_,
        event_time_us=id_,
        buyer_is_maker=False,
        best_match=True,
        base_asset=key.symbol[:-4],
        quote_asset="USDT",
        source="ws",
        endpoint="127.0.0.1:9443",
        received_us=id_,
    )


def make_store(path: Path, ids: dict[StreamKey, Iterable[int]]) -> Path:
    """A real store holding exactly ``ids`` per sequence."""
    sink = SqliteSink(path)
    sink.open()
    for key, key_ids in ids.items():
        trades = [trade(key, i) for i in key_ids]
        for start in range(0, len(trades), 20_000):
            sink.write(trades[start : start + 20_000], {})
    sink.close()
    return path


def holes_of(ids: set[int]) -> list[tuple[int, int]]:
    """The holes between min and max of ``ids``, the slow obvious way."""
    holes: list[tuple[int, int]] = []
    ordered = sorted(ids)
    for previous, current in zip(ordered, ordered[1:], strict=False):
        if current - previous > 1:
            holes.append((previous + 1, current - 1))
    return holes


class TestMissingRanges:
    def test_a_complete_store_has_no_holes(self, tmp_path: Path) -> None:
        """Consecutive ids in every sequence give an empty answer."""
        path = make_store(tmp_path / "t.db", {BTC: range(1, 50_001), ETH: range(7, 9)})

        assert {} == store.missing_ranges(path)

    def test_holes_are_inclusive_ranges_per_sequence(self, tmp_path: Path) -> None:
        """Each hole is reported as (first missing, last missing), per sequence."""
        btc = [1, 2, 5, 6, 7, 10]
        eth = [100, 102]
        path = make_store(tmp_path / "t.db", {BTC: btc, ETH: eth, ETH_AGG: [1, 2]})

        assert {BTC: [(3, 4), (8, 9)], ETH: [(101, 101)]} == store.missing_ranges(path)

    def test_holes_across_a_large_range_match_a_brute_force_count(
        self, tmp_path: Path
    ) -> None:
        """Holes of every size, wherever they fall, match the obvious computation."""
        rng = random.Random(20240601)
        ids = set(range(1_000_000, 1_090_000))
        ids -= set(range(1_030_000, 1_062_000))  # one hole wider than a search window
        ids -= {1_016_383, 1_016_384, 1_016_385}  # around a halving boundary
        for start in rng.sample(sorted(ids), 40):
            ids -= set(range(start, start + rng.randint(1, 300)))
        ids |= {1_000_000, 1_089_999}
        path = make_store(tmp_path / "t.db", {BTC: sorted(ids)})

        assert {BTC: holes_of(ids)} == store.missing_ranges(path)

    def test_filters_narrow_the_audit(self, tmp_path: Path) -> None:
        """exchange, symbol and stream restrict which sequences are audited."""
        path = make_store(
            tmp_path / "t.db",
            {BTC: [1, 3], ETH: [1, 3], ETH_AGG: [1, 3], US_BTC: [1, 3]},
        )

        assert [US_BTC] == list(store.missing_ranges(path, exchange="BINANCE_US"))
        assert [BTC, US_BTC] == sorted(store.missing_ranges(path, symbol="BTCUSDT"))
        assert [ETH] == list(
            store.missing_ranges(
                path, exchange="BINANCE", symbol="ETHUSDT", stream="trade"
            )
        )


class TestCounts:
    def test_counts_give_count_lowest_and_highest_per_sequence(
        self, tmp_path: Path
    ) -> None:
        """counts returns (count, min id, max id) for every sequence."""
        path = make_store(tmp_path / "t.db", {BTC: [5, 6, 9], ETH: [1]})

        assert {BTC: (3, 5, 9), ETH: (1, 1, 1)} == store.counts(path)

    def test_count_ids_counts_an_inclusive_range(self, tmp_path: Path) -> None:
        """count_ids counts only the ids of that sequence inside first..last."""
        path = make_store(tmp_path / "t.db", {BTC: range(1, 101), ETH: range(1, 101)})

        assert 11 == store.count_ids(path, BTC, 10, 20)
        assert 0 == store.count_ids(path, BTC, 200, 300)
        assert 100 == store.count_ids(path, ETH, -5, 1_000)

    def test_checkpoints_and_recorded_gaps_are_readable(self, tmp_path: Path) -> None:
        """The stored checkpoints and recorded gaps come back through store."""
        path = tmp_path / "t.db"
        sink = SqliteSink(path)
        sink.open()
        sink.write([trade(BTC, 1)], {BTC: 1})
        sink.record_gap(BTC, 2, 9, reason="history_gone")
        sink.close()

        assert {BTC: 1} == store.checkpoints(path)
        assert [(BTC, 2, 9)] == [
            (g.key, g.first_id, g.last_id) for g in store.recorded_gaps(path)
        ]
        assert [] == store.recorded_gaps(path, status="healed")


class TestReadOnly:
    def test_audits_run_while_a_writer_holds_the_lock(self, tmp_path: Path) -> None:
        """A held write lock does not block an audit (WAL readers never wait)."""
        path = make_store(tmp_path / "t.db", {BTC: [1, 2, 4]})

        with closing(sqlite3.connect(path, isolation_level=None)) as writer:
            writer.execute("BEGIN EXCLUSIVE")
            # Uncommitted, so the audit must not see it.
            writer.execute("DELETE FROM trades WHERE id = 2")
            holes = store.missing_ranges(path)
            writer.execute("ROLLBACK")

        assert {BTC: [(3, 3)]} == holes

    def test_audits_never_write(self, tmp_path: Path) -> None:
        """The audit connection is read-only, so the file cannot change under it."""
        path = make_store(tmp_path / "t.db", {BTC: [1, 3]})
        before = path.read_bytes()

        store.missing_ranges(path)
        store.counts(path)

        assert before == path.read_bytes()

    def test_a_missing_file_is_reported_with_its_path(self, tmp_path: Path) -> None:
        """Auditing a path with no store raises FileNotFoundError naming it."""
        with pytest.raises(FileNotFoundError, match="no SQLite store at"):
            store.counts(tmp_path / "absent.db")

    def test_a_foreign_database_is_refused(self, tmp_path: Path) -> None:
        """An SQLite file without k2stream's tables raises ValueError."""
        path = tmp_path / "other.db"
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE things (x)")

        with pytest.raises(ValueError, match="not a k2stream store"):
            store.missing_ranges(path)

    def test_a_file_that_is_not_a_database_is_refused(self, tmp_path: Path) -> None:
        """Garbage at the path raises ValueError, not a raw sqlite3 error."""
        path = tmp_path / "garbage.db"
        path.write_bytes(b"not a database at all" * 100)

        with pytest.raises(ValueError, match="not a k2stream store"):
            store.counts(path)
