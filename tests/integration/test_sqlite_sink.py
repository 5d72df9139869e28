"""The SQLite sink on real files, with real second connections."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import msgspec
import pytest

from k2stream.clock import FakeClock
from k2stream.records import AGG_TRADE, StreamKey, Trade
from k2stream.sinks.base import SinkError, SinkUnavailable
from k2stream.sinks.sqlite import SCHEMA_VERSION, Gap, SqliteSink


BTC = StreamKey("BINANCE", "BTCUSDT", "trade")
ETH = StreamKey("BINANCE", "ETHUSDT", "trade")


def trade(id_: int, key: StreamKey = BTC, **fields: object) -> Trade:
    """A trade of ``key`` with id ``id_`` and plausible values."""
    values: dict[str, object] = {
        "exchange": key.exchange,
        "symbol": key.symbol,
        "stream": key.stream,
        "id": id_,
        "price": f"65000.{id_ % 100:02d}000000",
        "quantity": "0.00100000",
        "trade_time_us": 1_700_000_000_000_000 + id_,
        "event_time_us": 1_700_000_000_000_100 + id_,
        "buyer_is_maker": id_ % 2 == 0,
        "best_match": True,
        "base_asset": key.symbol[:-4],
        "quote_asset": "USDT",
        "source": "ws",
        "endpoint": "127.0.0.1:9443",
        "received_us": 1_700_000_000_000_500 + id_,
    }
    values.update(fields)
    return Trade(**values)  # type: ignore[arg-type]


def read_trades(path: Path) -> list[Trade]:
    """Every stored trade, read back through a separate connection."""
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT exchange, symbol, stream, id, price, quantity, trade_time_us, "
            "event_time_us, buyer_is_maker, best_match, base_asset, quote_asset, "
            "source, endpoint, received_us, first_trade_id, last_trade_id "
            "FROM trades ORDER BY exchange, symbol, stream, id"
        ).fetchall()
    fields = Trade.__struct_fields__
    return [
        msgspec.convert(
            dict(
                zip(
                    fields,
                    (*row[:8], bool(row[8]), bool(row[9]), *row[10:]),
                    strict=True,
                )
            ),
            Trade,
        )
        for row in rows
    ]


def read_checkpoints(path: Path) -> dict[StreamKey, int]:
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute("SELECT exchange, symbol, stream, last_id FROM checkpoints")
        return {StreamKey(e, s, st): last_id for e, s, st, last_id in rows}


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "trades.db"


@pytest.fixture
def sink(path: Path) -> Iterator[SqliteSink]:
    sink = SqliteSink(path, busy_timeout=0.2, clock=FakeClock())
    sink.open()
    yield sink
    sink.close()


class TestRoundTrip:
    def test_open_creates_the_directory_and_an_empty_store(self, path: Path) -> None:
        """Opening a new path creates its directories and returns no checkpoints."""
        sink = SqliteSink(path)

        assert {} == sink.open()
        sink.close()

        assert path.is_file()

    def test_every_field_comes_back_exactly(self, sink: SqliteSink, path: Path) -> None:
        """Trades and aggregate trades are read back field for field, prices exact."""
        agg = StreamKey("BINANCE", "BTCUSDT", AGG_TRADE)
        trades = [
            trade(1, price="0.00000001", quantity="123456789.12345678"),
            trade(2, buyer_is_maker=True, best_match=False, source="rest"),
            trade(7, agg, first_trade_id=100, last_trade_id=104),
            trade(3, ETH, endpoint="127.0.0.1:443"),
        ]

        sink.write(trades, {BTC: 2})

        assert sorted(trades, key=lambda t: (t.key, t.id)) == read_trades(path)

    def test_many_rows_across_statement_boundaries(
        self, sink: SqliteSink, path: Path
    ) -> None:
        """A large mixed batch (many statements per group) is stored completely."""
        trades = [trade(i, BTC if i % 3 else ETH) for i in range(1, 1001)]

        sink.write(trades, {})

        assert sorted(trades, key=lambda t: (t.key, t.id)) == read_trades(path)

    def test_checkpoints_survive_a_reopen(self, path: Path) -> None:
        """Checkpoints written with a batch are what the next open returns."""
        sink = SqliteSink(path)
        sink.open()
        sink.write([trade(1), trade(2), trade(1, ETH)], {BTC: 2, ETH: 1})
        sink.close()

        reopened = SqliteSink(path)
        assert {BTC: 2, ETH: 1} == reopened.open()
        reopened.close()

    def test_checkpoints_never_go_back(self, sink: SqliteSink, path: Path) -> None:
        """A lower checkpoint than the stored one leaves the stored one in place."""
        sink.write([], {BTC: 10})
        sink.write([], {BTC: 5, ETH: 3})

        assert {BTC: 10, ETH: 3} == read_checkpoints(path)

    def test_a_second_connection_reads_while_the_sink_writes(self, path: Path) -> None:
        """WAL lets another connection read consistent counts during writes."""
        sink = SqliteSink(path)
        sink.open()
        seen: list[int] = []
        errors: list[BaseException] = []
        done = threading.Event()

        def reader() -> None:
            try:
                with closing(sqlite3.connect(path, timeout=0.2)) as conn:
                    while not done.is_set():
                        count = conn.execute("SELECT count(*) FROM trades").fetchone()
                        seen.append(count[0])
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for start in range(1, 20_001, 500):
                batch = [trade(i) for i in range(start, start + 500)]
                sink.write(batch, {BTC: start + 499})
        finally:
            done.set()
            thread.join()
            sink.close()

        assert [] == errors
        assert all(count % 500 == 0 for count in seen)
        assert seen == sorted(seen)
        assert 20_000 == len(read_trades(path))


class TestIdempotence:
    def test_the_same_batch_twice_stores_each_trade_once(
        self, sink: SqliteSink, path: Path
    ) -> None:
        """Writing a batch again ignores every trade already stored."""
        batch = [trade(i) for i in range(1, 101)]

        sink.write(batch, {BTC: 100})
        sink.write(batch, {BTC: 100})

        assert batch == read_trades(path)

    def test_a_replay_keeps_the_first_copy(self, sink: SqliteSink, path: Path) -> None:
        """A trade stored once is not replaced by a later copy from another source."""
        sink.write([trade(1, source="ws")], {})
        sink.write([trade(1, source="rest"), trade(2, source="rest")], {})

        assert ["ws", "rest"] == [t.source for t in read_trades(path)]


class TestAtomicity:
    def test_a_failing_batch_leaves_neither_rows_nor_checkpoint(
        self, sink: SqliteSink, path: Path
    ) -> None:
        """A batch that fails halfway is rolled back whole, checkpoint included."""
        sink.write([trade(1)], {BTC: 1})
        good = [trade(i) for i in range(2, 300)]
        unbindable = trade(300, price=["not", "a", "price"])

        with pytest.raises(SinkError, match="cannot be stored"):
            sink.write([*good, unbindable], {BTC: 300})

        assert [trade(1)] == read_trades(path)
        assert {BTC: 1} == read_checkpoints(path)

    def test_the_sink_keeps_working_after_a_failed_batch(
        self, sink: SqliteSink, path: Path
    ) -> None:
        """After a rolled-back batch the next one is written normally."""
        with pytest.raises(SinkError):
            sink.write([trade(1, price=object())], {BTC: 1})

        sink.write([trade(1)], {BTC: 1})

        assert {BTC: 1} == read_checkpoints(path)


class TestLocking:
    def test_a_locked_store_is_unavailable_not_fatal(
        self, sink: SqliteSink, path: Path
    ) -> None:
        """Another writer holding the lock makes write raise SinkUnavailable (busy)."""
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")

            with pytest.raises(SinkUnavailable) as raised:
                sink.write([trade(1)], {BTC: 1})

            other.execute("ROLLBACK")

        assert "busy" == raised.value.reason
        assert "another process holds its write lock" in str(raised.value)
        assert [] == read_trades(path)

    def test_the_write_succeeds_once_the_lock_is_released(
        self, sink: SqliteSink, path: Path
    ) -> None:
        """The same batch, retried after the lock is gone, is stored."""
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")
            with pytest.raises(SinkUnavailable):
                sink.write([trade(1)], {BTC: 1})
            other.execute("COMMIT")

        sink.write([trade(1)], {BTC: 1})

        assert ([trade(1)], {BTC: 1}) == (read_trades(path), read_checkpoints(path))

    def test_a_store_can_be_opened_while_another_writer_holds_the_lock(
        self, path: Path
    ) -> None:
        """Opening an existing store only reads, so a held write lock does not stop it."""
        first = SqliteSink(path)
        first.open()
        first.write([trade(1)], {BTC: 1})
        first.close()

        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("BEGIN EXCLUSIVE")
            second = SqliteSink(path, busy_timeout=0.2)
            checkpoints = second.open()
            other.execute("ROLLBACK")
            second.close()

        assert {BTC: 1} == checkpoints


class TestSchema:
    def test_the_store_is_in_wal_mode_with_a_schema_version(
        self, sink: SqliteSink, path: Path
    ) -> None:
        """A new store uses WAL and records its schema version in user_version."""
        with closing(sqlite3.connect(path)) as conn:
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]

        assert ("wal", SCHEMA_VERSION) == (mode, version)

    def test_a_newer_schema_is_refused(self, path: Path) -> None:
        """A store from a newer k2stream raises SinkError asking for an upgrade."""
        SqliteSink(path).open()
        with closing(sqlite3.connect(path)) as conn:
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")

        with pytest.raises(SinkError, match="upgrade k2stream"):
            SqliteSink(path).open()

    def test_a_foreign_database_is_refused(self, path: Path) -> None:
        """An SQLite file that is not a k2stream store is not written into."""
        path.parent.mkdir(parents=True)
        with closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE trades (anything)")

        with pytest.raises(SinkError, match="not a k2stream store"):
            SqliteSink(path).open()

    def test_a_file_that_is_not_a_database_is_fatal(self, path: Path) -> None:
        """Garbage at the path is a SinkError, not a retry."""
        path.parent.mkdir(parents=True)
        path.write_bytes(b"this is not sqlite" * 100)

        with pytest.raises(SinkError) as raised:
            SqliteSink(path).open()

        assert not isinstance(raised.value, SinkUnavailable)

    def test_write_before_open_says_so(self, path: Path) -> None:
        """Writing to a sink that was never opened raises SinkError with the fix."""
        with pytest.raises(SinkError, match="call open"):
            SqliteSink(path).write([trade(1)], {})

    def test_synchronous_must_be_normal_or_full(self, path: Path) -> None:
        """An unknown synchronous setting is refused when the sink is built."""
        with pytest.raises(ValueError, match="'normal' or 'full'"):
            SqliteSink(path, synchronous="off")  # type: ignore[arg-type]


class TestGaps:
    def test_recorded_gaps_are_listed(self, sink: SqliteSink) -> None:
        """record_gap stores a gap that list_gaps returns with its times."""
        sink.record_gap(BTC, 10, 20, reason="history_gone")

        assert [
            Gap(
                BTC,
                10,
                20,
                "unhealable",
                "history_gone",
                1_700_000_000_000_000,
                1_700_000_000_000_000,
            )
        ] == sink.list_gaps()

    def test_recording_a_gap_again_updates_its_status(self, path: Path) -> None:
        """The same range recorded again keeps detected_us and updates the rest."""
        clock = FakeClock()
        sink = SqliteSink(path, clock=clock)
        sink.open()
        sink.record_gap(BTC, 10, 20, reason="banned")
        clock.advance(5)
        sink.record_gap(BTC, 10, 20, status="healed", reason="manual_repair")
        sink.record_gap(ETH, 1, 2, reason="history_gone")

        gaps = sink.list_gaps()
        healed = sink.list_gaps(status="healed")
        sink.close()

        assert [(BTC, "healed"), (ETH, "unhealable")] == [
            (g.key, g.status) for g in gaps
        ]
        assert 5_000_000 == healed[0].updated_us - healed[0].detected_us
        assert "manual_repair" == healed[0].reason
