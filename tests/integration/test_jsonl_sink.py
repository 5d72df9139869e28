"""The JSONL sink on real files and on stdout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from k2stream.records import AGG_TRADE, StreamKey, Trade, message_id
from k2stream.sinks.base import SinkError, SinkUnavailable
from k2stream.sinks.jsonl import JsonlSink


BTC = StreamKey("BINANCE", "BTCUSDT", "trade")
ETH = StreamKey("BINANCE", "ETHUSDT", "trade")

TRADE_V2_FIELDS = {
    "message_id",
    "trade_id",
    "symbol",
    "exchange",
    "asset_class",
    "timestamp",
    "price",
    "quantity",
    "currency",
    "side",
    "trade_conditions",
    "source_sequence",
    "ingestion_timestamp",
    "platform_sequence",
    "vendor_data",
    "source",
    "endpoint",
}
"""The TradeV2 fields of DESIGN.md, plus k2stream's source and endpoint."""


def trade(id_: int, key: StreamKey = BTC, **fields: object) -> Trade:
    """A trade of ``key`` with id ``id_`` and plausible values."""
    values: dict[str, object] = {
        "exchange": key.exchange,
        "symbol": key.symbol,
        "stream": key.stream,
        "id": id_,
        "price": "65000.10000000",
        "quantity": "0.00100000",
        "trade_time_us": 1_700_000_000_000_000 + id_,
        "event_time_us": 1_700_000_000_000_100 + id_,
        "buyer_is_maker": False,
        "best_match": True,
        "base_asset": key.symbol[:-4],
        "quote_asset": "USDT",
        "source": "ws",
        "endpoint": "127.0.0.1:9443",
        "received_us": 1_700_000_000_000_500 + id_,
    }
    values.update(fields)
    return Trade(**values)  # type: ignore[arg-type]


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "out" / "trades.jsonl"


class TestLines:
    def test_each_trade_is_one_trade_v2_line(self, path: Path) -> None:
        """Every line is a TradeV2 object with exactly the DESIGN.md field names."""
        sink = JsonlSink(path)
        sink.open()
        sink.write([trade(1), trade(2, buyer_is_maker=True)], {BTC: 2})
        sink.close()

        lines = read_lines(path)

        assert [TRADE_V2_FIELDS, TRADE_V2_FIELDS] == [set(line) for line in lines]
        first = lines[0]
        assert "BINANCE-1" == first["trade_id"]
        assert message_id("BINANCE", "BTCUSDT", "trade", 1) == first["message_id"]
        assert ("65000.10000000", "0.00100000") == (first["price"], first["quantity"])
        assert ("USDT", "crypto") == (first["currency"], first["asset_class"])
        assert ["BUY", "SELL"] == [line["side"] for line in lines]
        assert 1_700_000_000_000_001 == first["timestamp"]

    def test_aggregate_trades_carry_their_trade_range(self, path: Path) -> None:
        """An aggTrade line has the A-prefixed trade_id and its first/last trade ids."""
        agg = StreamKey("BINANCE", "BTCUSDT", AGG_TRADE)
        sink = JsonlSink(path)
        sink.open()
        sink.write([trade(5, agg, first_trade_id=10, last_trade_id=12)], {})
        sink.close()

        (line,) = read_lines(path)

        assert "BINANCE-A5" == line["trade_id"]
        assert ("10", "12") == (
            line["vendor_data"]["first_trade_id"],
            line["vendor_data"]["last_trade_id"],
        )

    def test_lines_are_appended_across_opens(self, path: Path) -> None:
        """A second run appends to the file instead of replacing it."""
        for ids in ((1, 2), (3,)):
            sink = JsonlSink(path)
            sink.open()
            sink.write([trade(i) for i in ids], {BTC: ids[-1]})
            sink.close()

        assert [1, 2, 3] == [line["source_sequence"] for line in read_lines(path)]

    def test_stdout_gets_lines_and_no_sidecar(
        self, capsysbinary: pytest.CaptureFixture[bytes], tmp_path: Path
    ) -> None:
        """jsonl:- writes the lines to stdout and starts with no checkpoints."""
        sink = JsonlSink(None)

        assert {} == sink.open()
        sink.write([trade(1), trade(2)], {BTC: 2})
        sink.close()

        out = capsysbinary.readouterr().out.splitlines()
        assert [1, 2] == [json.loads(line)["source_sequence"] for line in out]
        assert [] == list(tmp_path.iterdir())


class TestCheckpoints:
    def test_checkpoints_are_kept_in_a_sidecar(self, path: Path) -> None:
        """The sidecar next to the file holds the checkpoints and reopen returns them."""
        sink = JsonlSink(path)
        sink.open()
        sink.write([trade(1), trade(2), trade(1, ETH)], {BTC: 2, ETH: 1})
        sink.close()

        sidecar = path.with_name("trades.jsonl.checkpoints.json")
        stored = msgspec.json.decode(sidecar.read_bytes())
        reopened = JsonlSink(path)

        assert 1 == stored["version"]
        assert {BTC: 2, ETH: 1} == reopened.open()
        reopened.close()
        assert [] == list(path.parent.glob("*.tmp"))

    def test_a_replay_from_the_checkpoint_writes_each_trade_once(
        self, path: Path
    ) -> None:
        """Trades at or below the stored checkpoint are skipped on a replay."""
        sink = JsonlSink(path)
        sink.open()
        sink.write([trade(i) for i in range(1, 6)], {BTC: 5})
        sink.close()

        replay = JsonlSink(path)
        replay.open()
        replay.write([trade(i) for i in range(4, 9)], {BTC: 8})
        replay.close()

        assert [1, 2, 3, 4, 5, 6, 7, 8] == [
            line["source_sequence"] for line in read_lines(path)
        ]

    def test_checkpoints_never_go_back(self, path: Path) -> None:
        """A lower checkpoint than the stored one leaves the stored one in place."""
        sink = JsonlSink(path)
        sink.open()
        sink.write([], {BTC: 10})
        sink.write([], {BTC: 4, ETH: 2})
        sink.close()

        reopened = JsonlSink(path)
        assert {BTC: 10, ETH: 2} == reopened.open()
        reopened.close()

    def test_a_corrupt_sidecar_is_fatal_with_the_fix(self, path: Path) -> None:
        """An unreadable sidecar raises SinkError telling how to recover."""
        path.parent.mkdir(parents=True)
        path.with_name("trades.jsonl.checkpoints.json").write_text("{not json")

        with pytest.raises(SinkError, match="delete it to start"):
            JsonlSink(path).open()


class TestFailures:
    def test_a_full_disk_is_unavailable_and_retryable(self) -> None:
        """Writing to a full device raises SinkUnavailable, so the writer retries."""
        sink = JsonlSink("/dev/full")
        sink.open()
        try:
            with pytest.raises(SinkUnavailable, match="free disk space"):
                sink.write([trade(1)], {BTC: 1})
        finally:
            sink.close()

        assert not Path("/dev/full.checkpoints.json").exists()

    def test_a_sidecar_failure_does_not_duplicate_lines_on_retry(
        self, path: Path
    ) -> None:
        """When only the sidecar failed, the retried batch does not append again."""
        sink = JsonlSink(path)
        sink.open()
        batch = [trade(1), trade(2)]
        sidecar = path.with_name("trades.jsonl.checkpoints.json")
        sidecar.mkdir()  # a directory where the sidecar should go: replace fails

        with pytest.raises(SinkError):
            sink.write(batch, {BTC: 2})
        sidecar.rmdir()
        sink.write(batch, {BTC: 2})
        sink.close()

        assert [1, 2] == [line["source_sequence"] for line in read_lines(path)]

    def test_write_before_open_says_so(self, path: Path) -> None:
        """Writing to a sink that was never opened raises SinkError with the fix."""
        with pytest.raises(SinkError, match="call open"):
            JsonlSink(path).write([trade(1)], {})
