"""SinkWriter against a real SQLite store: batching, outages, failures, close."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import cast

import pytest
import structlog

from k2stream.clock import FakeClock
from k2stream.observe.metrics import Metrics
from k2stream.records import StreamKey, Trade
from k2stream.sinks import store
from k2stream.sinks.base import SinkError
from k2stream.sinks.sqlite import SqliteSink
from k2stream.sinks.writer import SinkWriter


BTC = StreamKey("BINANCE", "BTCUSDT", "trade")


def trade(id_: int, price: object = "65000.10") -> Trade:
    return Trade(
        exchange=BTC.exchange,
        symbol=BTC.symbol,
        stream=BTC.stream,
        id=id_,
        price=price,  # type: ignore[arg-type]
        quantity="0.001",
        trade_time_us=1_700_000_000_000_000 + id_,
        event_time_us=1_700_000_000_000_100 + id_,
        buyer_is_maker=False,
        best_match=True,
        base_asset="BTC",
        quote_asset="USDT",
        source="ws",
        endpoint="127.0.0.1:9443",
        received_us=1_700_000_000_000_500 + id_,
    )


class Feed:
    """Stands in for the sequencer: offers trades and keeps the watermark.

    As the sequencer does, it advances the watermark only over accepted
    trades: a refused id stays a gap.
    """

    def __init__(self) -> None:
        self.watermark: dict[StreamKey, int] = {}
        self.refused: list[int] = []

    def checkpoints(self) -> Mapping[StreamKey, int]:
        return self.watermark

    def offer(self, writer: SinkWriter, ids: range) -> None:
        for id_ in ids:
            if not writer.offer(trade(id_)):
                self.refused.append(id_)
            elif not self.refused:
                self.watermark[BTC] = id_


class RecordingSink(SqliteSink):
    """A real SQLite sink that remembers what each successful write carried."""

    def __init__(self, path: Path, **options: object) -> None:
        super().__init__(path, **options)  # type: ignore[arg-type]
        self.writes: list[tuple[int, dict[StreamKey, int]]] = []

    def write(
        self, trades: Sequence[Trade], checkpoints: Mapping[StreamKey, int]
    ) -> None:
        super().write(trades, checkpoints)
        self.writes.append((len(trades), dict(checkpoints)))


async def eventually(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Wait until ``condition()`` holds, polling briefly; fail after ``within`` s."""
    async with asyncio.timeout(within):
        # Polling on purpose: the state changes on the writer's thread.
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


@contextmanager
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Hold the store's write lock from a second connection, as another process would."""
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        try:
            yield other
        finally:
            if other.in_transaction:
                other.execute("ROLLBACK")


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, {"sink": "sqlite", **labels})
    return 0.0 if value is None else value


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "trades.db"


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def feed() -> Feed:
    return Feed()


@pytest.fixture
async def writer(path: Path, metrics: Metrics, feed: Feed) -> AsyncIterator[SinkWriter]:
    writer = SinkWriter(
        SqliteSink(path, busy_timeout=0.05),
        metrics,
        checkpoints=feed.checkpoints,
        batch_size=100,
        batch_interval=0.01,
        max_backlog=300,
        retry_delay=0.01,
        max_retry_delay=0.04,
    )
    await writer.start()
    yield writer
    await writer.close(drain_timeout=5)


class TestDelivery:
    async def test_offered_trades_become_rows_with_their_checkpoint(
        self, writer: SinkWriter, feed: Feed, path: Path, metrics: Metrics
    ) -> None:
        """Everything offered is stored once drained, with the watermark as checkpoint."""
        feed.offer(writer, range(1, 251))

        assert await writer.drain(timeout=5)

        assert {BTC: (250, 1, 250)} == store.counts(path)
        assert {BTC: 250} == store.checkpoints(path) == writer.durable_checkpoints
        assert (0, True) == (writer.backlog, writer.available)
        assert 250 == sample(metrics, "k2_sink_trades_written_total")
        assert 3 == sample(metrics, "k2_sink_writes_total")
        assert 3 == sample(metrics, "k2_sink_write_latency_seconds_count")
        assert (0, 1) == (
            sample(metrics, "k2_sink_backlog_trades"),
            sample(metrics, "k2_sink_available"),
        )

    async def test_a_full_batch_is_cut_without_waiting_for_the_interval(
        self, path: Path, feed: Feed
    ) -> None:
        """batch_size pending trades are written at once even with a long interval."""
        writer = SinkWriter(
            SqliteSink(path),
            Metrics(),
            checkpoints=feed.checkpoints,
            batch_size=50,
            batch_interval=30.0,
        )
        await writer.start()

        feed.offer(writer, range(1, 51))
        await eventually(lambda: writer.backlog == 0)
        await writer.close()

        assert {BTC: 50} == store.checkpoints(path)

    async def test_a_partial_batch_is_cut_after_the_interval(
        self, path: Path, feed: Feed
    ) -> None:
        """A few trades are written batch_interval after the first, without a drain."""
        writer = SinkWriter(
            SqliteSink(path),
            Metrics(),
            checkpoints=feed.checkpoints,
            batch_size=5000,
            batch_interval=0.02,
        )
        await writer.start()

        feed.offer(writer, range(1, 4))
        await eventually(lambda: writer.durable_checkpoints == {BTC: 3})
        await writer.close()

        assert {BTC: (3, 1, 3)} == store.counts(path)

    async def test_start_returns_the_stored_checkpoints(self, path: Path) -> None:
        """A restarted writer reports the checkpoints its store already holds."""
        sink = SqliteSink(path)
        sink.open()
        sink.write([trade(1), trade(2)], {BTC: 2})
        sink.close()
        writer = SinkWriter(SqliteSink(path), Metrics(), checkpoints=dict)

        checkpoints = await writer.start()
        await writer.close()

        assert {BTC: 2} == checkpoints == writer.durable_checkpoints

    async def test_close_stores_the_final_checkpoints(
        self, path: Path, feed: Feed
    ) -> None:
        """A watermark that moved after the last batch is stored by close."""
        writer = SinkWriter(SqliteSink(path), Metrics(), checkpoints=feed.checkpoints)
        await writer.start()
        feed.offer(writer, range(1, 11))
        assert await writer.drain(timeout=5)

        feed.watermark[BTC] = 12  # ids 11 and 12 given up on, say
        await writer.close()

        assert {BTC: 12} == store.checkpoints(path)

    async def test_offers_after_close_are_refused(self, writer: SinkWriter) -> None:
        """A closed writer accepts nothing more."""
        await writer.close()

        assert not writer.offer(trade(1))

    async def test_run_in_sink_runs_on_the_writer_thread(
        self, writer: SinkWriter, path: Path
    ) -> None:
        """A gap recorded through run_in_sink lands in the store."""

        def record(sink: object) -> None:
            cast(SqliteSink, sink).record_gap(BTC, 5, 9, reason="history_gone")

        await writer.run_in_sink(record)

        assert [(BTC, 5, 9)] == [
            (g.key, g.first_id, g.last_id) for g in store.recorded_gaps(path)
        ]


class TestOutage:
    async def test_a_locked_store_buffers_then_refuses_and_loses_nothing(
        self, writer: SinkWriter, feed: Feed, path: Path, metrics: Metrics
    ) -> None:
        """A locked store acknowledges nothing, caps the backlog, then stores it all."""
        with structlog.testing.capture_logs() as logs:
            with write_lock(path):
                feed.offer(writer, range(1, 101))
                await eventually(lambda: not writer.available)
                assert {} == writer.durable_checkpoints

                feed.offer(writer, range(101, 401))
                await eventually(
                    lambda: sample(metrics, "k2_sink_errors_total", reason="busy") >= 3
                )

                assert {} == writer.durable_checkpoints
                assert 300 == writer.backlog
                assert list(range(301, 401)) == feed.refused
                assert 100 == sample(metrics, "k2_sink_dropped_trades_total")
                assert 0 == sample(metrics, "k2_sink_available")
                assert not await writer.drain(timeout=0.05)

            assert await writer.drain(timeout=5)

        assert {BTC: (300, 1, 300)} == store.counts(path)
        assert {BTC: 300} == writer.durable_checkpoints == store.checkpoints(path)
        assert (True, 1) == (writer.available, sample(metrics, "k2_sink_available"))
        events = [e["event"] for e in logs if e["event"].startswith("sink_")]
        assert ["sink_write_failed", "sink_backlog_full", "sink_write_recovered"] == (
            sorted(set(events), key=events.index)
        )
        assert 1 == events.count("sink_write_failed")

    async def test_after_an_outage_only_the_last_chunk_carries_the_checkpoint(
        self, path: Path, feed: Feed, metrics: Metrics
    ) -> None:
        """A backlog larger than a batch is split, and no chunk acknowledges a later one."""
        sink = RecordingSink(path, busy_timeout=0.05)
        writer = SinkWriter(
            sink,
            metrics,
            checkpoints=feed.checkpoints,
            batch_size=100,
            batch_interval=0.0,
            retry_delay=0.01,
            max_retry_delay=0.02,
        )
        await writer.start()

        with write_lock(path):
            feed.offer(writer, range(1, 101))
            await eventually(lambda: not writer.available)
            feed.offer(writer, range(101, 301))
        assert await writer.drain(timeout=5)
        await writer.close()

        assert [(100, {BTC: 100}), (100, {}), (100, {BTC: 300})] == sink.writes

    async def test_retries_back_off_by_doubling_up_to_the_maximum(
        self, path: Path, feed: Feed
    ) -> None:
        """Retry delays double from retry_delay and stay at max_retry_delay."""
        clock = FakeClock()
        writer = SinkWriter(
            SqliteSink(path, busy_timeout=0.02),
            Metrics(),
            checkpoints=feed.checkpoints,
            batch_interval=0.0,
            retry_delay=0.2,
            max_retry_delay=1.0,
            clock=clock,
        )
        await writer.start()

        with write_lock(path):
            feed.offer(writer, range(1, 11))
            await eventually(lambda: len(clock.sleeps) >= 5)
        assert await writer.drain(timeout=5)
        await writer.close()

        assert [0.2, 0.4, 0.8, 1.0, 1.0] == clock.sleeps[:5]
        assert {BTC: 10} == store.checkpoints(path)

    async def test_start_waits_for_a_store_that_is_locked(self, path: Path) -> None:
        """Opening is retried while another process holds a brand-new store's lock."""
        metrics = Metrics()
        writer = SinkWriter(
            SqliteSink(path, busy_timeout=0.02),
            metrics,
            checkpoints=dict,
            retry_delay=0.01,
            max_retry_delay=0.02,
        )

        with write_lock(path):
            starting = asyncio.create_task(writer.start())
            await eventually(
                lambda: sample(metrics, "k2_sink_errors_total", reason="busy") >= 2
            )
            assert not starting.done()

        assert {} == await starting
        await writer.close()

    async def test_close_with_a_timeout_gives_up_without_acknowledging(
        self, writer: SinkWriter, feed: Feed, path: Path
    ) -> None:
        """close(drain_timeout) while locked returns and stores no checkpoint."""
        with structlog.testing.capture_logs() as logs, write_lock(path):
            feed.offer(writer, range(1, 51))
            await writer.close(drain_timeout=0.05)

        assert {} == store.checkpoints(path)
        assert "sink_close_incomplete" in [e["event"] for e in logs]


class TestFatal:
    async def test_a_fatal_error_stops_the_writer_and_is_raised(
        self, path: Path, metrics: Metrics
    ) -> None:
        """A SinkError stops writing; drain and close raise it; offers are refused."""
        writer = SinkWriter(SqliteSink(path), metrics, checkpoints=dict)
        await writer.start()

        with structlog.testing.capture_logs() as logs:
            writer.offer(trade(1, price=["not", "a", "price"]))
            with pytest.raises(SinkError, match="cannot be stored"):
                await writer.drain(timeout=5)

        assert not writer.offer(trade(2))
        assert not writer.available
        assert 1 == sample(metrics, "k2_sink_errors_total", reason="error")
        assert (
            "error" == next(e for e in logs if e["event"] == "sink_failed")["log_level"]
        )
        with pytest.raises(SinkError, match="cannot be stored"):
            await writer.close()
        assert {} == store.counts(path)

    async def test_a_store_that_cannot_be_opened_fails_start(
        self, tmp_path: Path
    ) -> None:
        """A path that cannot hold a store (a directory) makes start raise SinkError."""
        writer = SinkWriter(SqliteSink(tmp_path), Metrics(), checkpoints=dict)

        with pytest.raises(SinkError, match="choose another --sink path"):
            await writer.start()

        assert not writer.offer(trade(1))


class TestConfiguration:
    def test_nonsensical_settings_are_refused(self, path: Path) -> None:
        """A zero batch size or a maximum delay below the first is a ValueError."""
        with pytest.raises(ValueError, match="batch_size=0"):
            SinkWriter(SqliteSink(path), Metrics(), checkpoints=dict, batch_size=0)
        with pytest.raises(ValueError, match="max_retry_delay=0.1"):
            SinkWriter(
                SqliteSink(path),
                Metrics(),
                checkpoints=dict,
                retry_delay=1.0,
                max_retry_delay=0.1,
            )
