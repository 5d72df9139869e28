"""The Kafka sink against a librdkafka mock cluster: real Kafka protocol over
real TCP on 127.0.0.1, brokers in this process.

The mock cluster is started through librdkafka's C API (ctypes), because
confluent-kafka's Python API does not expose the mock's bootstrap address nor
its controls; ``rd_kafka_mock_broker_set_down`` is how the tests take the
brokers away. The mock does not implement CreateTopics, so topics are made
with ``rd_kafka_mock_topic_create``, as an operator would make them by hand.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import json
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import structlog


confluent_kafka = pytest.importorskip("confluent_kafka")

from confluent_kafka import Consumer, Message, TopicPartition  # noqa: E402

from conftest import settings_for, wait_for  # noqa: E402
from k2stream.clock import FakeClock  # noqa: E402
from k2stream.records import (  # noqa: E402
    AGG_TRADE,
    BINANCE,
    StreamKey,
    Trade,
    message_id,
    to_trade_v2,
)
from k2stream.sinks.avro import (  # noqa: E402
    AVRO_MARKER,
    decode_avro_value,
    encode_avro_value,
    trade_v2_schema,
)
from k2stream.sinks.base import SinkError, SinkUnavailable, open_sink  # noqa: E402
from k2stream.sinks.kafka import (  # noqa: E402
    DEFAULT_TOPIC,
    KafkaSink,
    from_url,
    parse_kafka_url,
)


BTC = StreamKey(BINANCE, "BTCUSDT", "trade")
ETH = StreamKey(BINANCE, "ETHUSDT", "trade")
TOPIC = "trades"
CHECKPOINTS = "trades.checkpoints"
SHORT = {"delivery_timeout": 1.0, "open_timeout": 3.0, "close_timeout": 1.0}
"""Timeouts short enough that a failure costs the test about a second."""


def _librdkafka() -> ctypes.CDLL | None:
    """The librdkafka confluent-kafka runs on, with the mock API declared."""
    package = os.path.dirname(confluent_kafka.__file__)
    bundled = glob.glob(os.path.join(package, os.pardir, "confluent_kafka.libs", "*"))
    candidates = [p for p in bundled if "rdkafka" in p]
    candidates.append(ctypes.util.find_library("rdkafka") or "")
    for path in filter(None, candidates):
        lib = ctypes.CDLL(path)
        if hasattr(lib, "rd_kafka_mock_cluster_new"):
            break
    else:
        return None

    p, i32, text = ctypes.c_void_p, ctypes.c_int32, ctypes.c_char_p
    lib.rd_kafka_conf_new.restype = p
    lib.rd_kafka_conf_set.argtypes = [p, text, text, text, ctypes.c_size_t]
    lib.rd_kafka_new.restype = p
    lib.rd_kafka_new.argtypes = [ctypes.c_int, p, text, ctypes.c_size_t]
    lib.rd_kafka_destroy.argtypes = [p]
    lib.rd_kafka_mock_cluster_new.restype = p
    lib.rd_kafka_mock_cluster_new.argtypes = [p, ctypes.c_int]
    lib.rd_kafka_mock_cluster_destroy.argtypes = [p]
    lib.rd_kafka_mock_cluster_bootstraps.restype = text
    lib.rd_kafka_mock_cluster_bootstraps.argtypes = [p]
    lib.rd_kafka_mock_set_controller_id.argtypes = [p, i32]
    lib.rd_kafka_mock_topic_create.argtypes = [p, text, ctypes.c_int, ctypes.c_int]
    lib.rd_kafka_mock_broker_set_down.argtypes = [p, i32]
    lib.rd_kafka_mock_broker_set_up.argtypes = [p, i32]
    return lib


LIB = _librdkafka()


class MockCluster:
    """Three mock brokers on 127.0.0.1, owned by a bare librdkafka handle."""

    BROKERS = (1, 2, 3)

    def __init__(self) -> None:
        assert LIB is not None
        error = ctypes.create_string_buffer(512)
        conf = LIB.rd_kafka_conf_new()
        LIB.rd_kafka_conf_set(conf, b"log_level", b"0", error, len(error))
        self._handle = LIB.rd_kafka_new(0, conf, error, len(error))
        assert self._handle, error.value
        self._cluster = LIB.rd_kafka_mock_cluster_new(self._handle, len(self.BROKERS))
        # The mock names no controller (0); with broker 1 as controller an admin
        # request gets a prompt "unsupported" instead of waiting for its timeout.
        LIB.rd_kafka_mock_set_controller_id(self._cluster, 1)
        self.bootstrap: str = LIB.rd_kafka_mock_cluster_bootstraps(
            self._cluster
        ).decode()

    def create_topic(self, name: str, partitions: int = 4) -> None:
        assert 0 == LIB.rd_kafka_mock_topic_create(
            self._cluster, name.encode(), partitions, len(self.BROKERS)
        )

    def set_down(self) -> None:
        for broker in self.BROKERS:
            LIB.rd_kafka_mock_broker_set_down(self._cluster, broker)

    def set_up(self) -> None:
        for broker in self.BROKERS:
            LIB.rd_kafka_mock_broker_set_up(self._cluster, broker)

    def close(self) -> None:
        LIB.rd_kafka_mock_cluster_destroy(self._cluster)
        LIB.rd_kafka_destroy(self._handle)


@pytest.fixture
def cluster() -> Iterator[MockCluster]:
    """A fresh mock cluster with the trade and checkpoint topics created."""
    if LIB is None:
        pytest.skip("this librdkafka build has no mock cluster API")
    running = MockCluster()
    running.create_topic(TOPIC)
    running.create_topic(CHECKPOINTS, partitions=1)
    yield running
    running.close()


@pytest.fixture
def sinks() -> Iterator[list[KafkaSink]]:
    """Sinks a test opens; each is closed at teardown."""
    opened: list[KafkaSink] = []
    yield opened
    for sink in opened:
        sink.close()


def open_kafka_sink(
    cluster: MockCluster, sinks: list[KafkaSink], **options: Any
) -> tuple[KafkaSink, dict[StreamKey, int]]:
    sink = KafkaSink(
        cluster.bootstrap.split(","),
        TOPIC,
        checkpoint_topic=CHECKPOINTS,
        **{**SHORT, **options},
    )
    sinks.append(sink)
    return sink, sink.open()


def trade(id_: int, key: StreamKey = BTC, **fields: object) -> Trade:
    """A trade of ``key`` with id ``id_`` and plausible values."""
    values: dict[str, object] = {
        "exchange": key.exchange,
        "symbol": key.symbol,
        "stream": key.stream,
        "id": id_,
        "price": "50000.12000000",
        "quantity": "0.00150000",
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


def write_retrying(
    sink: KafkaSink,
    trades: list[Trade],
    checkpoints: dict[StreamKey, int],
    within: float = 15.0,
) -> int:
    """Write as the SinkWriter does, again after each SinkUnavailable; the attempts."""
    deadline = time.monotonic() + within
    attempts = 1
    while True:
        try:
            sink.write(trades, checkpoints)
            return attempts
        except SinkUnavailable:
            if time.monotonic() > deadline:
                raise
        attempts += 1
        time.sleep(0.2)


def consume_all(bootstrap: str, topic: str) -> list[Message]:
    """Every message of ``topic``, partition by partition, read to the end."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "test-reader",
            "enable.auto.commit": False,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=5)
        ends = {}
        for partition in metadata.topics[topic].partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=5
            )
            if high > low:
                ends[partition] = high
        consumer.assign([TopicPartition(topic, p, 0) for p in ends])

        messages: list[Message] = []
        deadline = time.monotonic() + 10
        while sum(ends.values()) > 0 and time.monotonic() < deadline:
            for message in consumer.consume(1000, timeout=0.2):
                assert message.error() is None, message.error()
                messages.append(message)
                if message.offset() + 1 >= ends[message.partition()]:
                    ends[message.partition()] = 0
        assert 0 == sum(ends.values()), f"{topic} not read to its end"
        return messages
    finally:
        consumer.close()


def end_offsets(bootstrap: str, topic: str) -> int:
    """The sum of the end offsets of ``topic``: how many messages it ever took."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "test-offsets"})
    try:
        metadata = consumer.list_topics(topic, timeout=5)
        return sum(
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5)[1]
            for p in metadata.topics[topic].partitions
        )
    finally:
        consumer.close()


def headers(message: Message) -> dict[str, bytes]:
    return dict(message.headers() or [])


def deduplicated(messages: list[Message]) -> dict[str, bytes]:
    """The consumer rule of docs/kafka.md: upsert on the dedup key, first value kept."""
    stored: dict[str, bytes] = {}
    for message in messages:
        key = headers(message)["k2-dedup-key"].decode()
        value = message.value()
        assert value is not None
        assert stored.setdefault(key, value) == value, f"{key} changed on replay"
    return stored


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class TestUrls:
    def test_a_url_names_the_brokers_and_the_topic(self) -> None:
        """Brokers come from the comma list, the topic from the path."""
        parsed = parse_kafka_url("kafka://127.0.0.1:9092,[::1]:9093/k2.trades")

        assert ("127.0.0.1:9092", "[::1]:9093") == parsed.brokers
        assert ("k2.trades", "k2.trades.checkpoints") == (
            parsed.topic,
            parsed.checkpoint_topic,
        )
        assert ("json", {}) == (parsed.value_format, parsed.options)

    @pytest.mark.parametrize("url", ["kafka://b:9092", "kafka://b:9092/"])
    def test_an_empty_path_means_the_k2_topic(self, url: str) -> None:
        """With no topic in the path the sink writes to the K2 platform's topic."""
        parsed = parse_kafka_url(url)

        assert DEFAULT_TOPIC == parsed.topic == "market.crypto.trades.binance"
        assert DEFAULT_TOPIC + ".checkpoints" == parsed.checkpoint_topic

    def test_the_query_sets_format_checkpoint_topic_and_timeouts(self) -> None:
        """format, checkpoint_topic, delivery_timeout and open_timeout are read."""
        parsed = parse_kafka_url(
            "kafka://b:1/t?format=avro&checkpoint_topic=cp&delivery_timeout=2.5"
            "&open_timeout=4"
        )

        assert ("avro", "cp") == (parsed.value_format, parsed.checkpoint_topic)
        assert {"delivery_timeout": 2.5, "open_timeout": 4.0} == parsed.options

    @pytest.mark.parametrize(
        ("url", "why"),
        [
            ("kafka:///trades", "is not host:port"),
            ("kafka://broker/trades", "is not host:port"),
            ("kafka://b:99999/trades", "is not host:port"),
            ("kafka://b:1,/trades", "is not host:port"),
            ("kafka://b:1/a/b", "is not a Kafka topic name"),
            ("kafka://b:1/t?format=xml", "neither json nor avro"),
            ("kafka://b:1/t?acks=1", "unknown option acks"),
            ("kafka://b:1/t?format=json&format=avro", "given twice"),
            ("kafka://b:1/t?delivery_timeout=0", "not a number of seconds"),
            ("kafka://b:1/t?checkpoint_topic=t", "must differ"),
            ("kafka://b:1/t#x", "fragment"),
        ],
    )
    def test_a_malformed_url_names_itself_and_the_accepted_form(
        self, url: str, why: str
    ) -> None:
        """A bad URL raises ValueError with the URL, the reason and the accepted form."""
        with pytest.raises(ValueError, match=why) as raised:
            parse_kafka_url(url)

        assert repr(url) in str(raised.value)
        assert "kafka://host:port[,host:port...]/topic" in str(raised.value)

    def test_open_sink_routes_kafka_urls_to_this_sink(self) -> None:
        """open_sink builds a KafkaSink from the URL without connecting."""
        sink = open_sink(f"kafka://127.0.0.1:{closed_port()}/t?format=avro")

        assert isinstance(sink, KafkaSink)
        assert ("kafka", "t", "t.checkpoints", "avro") == (
            sink.name,
            sink.topic,
            sink.checkpoint_topic,
            sink.value_format,
        )

    def test_constructor_options_win_over_the_query(self) -> None:
        """Options given to from_url override what the URL's query says."""
        sink = from_url("kafka://b:1/t?checkpoint_topic=a", checkpoint_topic="b")

        assert "b" == sink.checkpoint_topic


class TestAvroSchema:
    RECORDS = [
        trade(1),
        trade(2, price="0.00000001", quantity="99999999.99999999"),
        trade(3, source="rest", endpoint="api.binance.com"),
        trade(
            7,
            StreamKey(BINANCE, "BTCUSDT", AGG_TRADE),
            first_trade_id=10,
            last_trade_id=12,
        ),
        trade(9, StreamKey("BINANCE_US", "BTCUSD", "trade"), quote_asset="USD"),
    ]

    def test_the_schema_has_the_trade_v2_fields_in_order(self) -> None:
        """The schema's fields are to_trade_v2's keys, in the same order."""
        names = [field["name"] for field in trade_v2_schema()["fields"]]

        assert list(to_trade_v2(trade(1))) == names

    @pytest.mark.parametrize("record", RECORDS, ids=lambda t: f"{t.stream}-{t.id}")
    def test_every_record_round_trips_exactly(self, record: Trade) -> None:
        """A TradeV2 record read back from Avro equals the record, decimals exact."""
        pytest.importorskip("fastavro")
        expected = to_trade_v2(record)
        decoded = decode_avro_value(encode_avro_value(expected))

        assert Decimal(expected["price"]) == decoded["price"]
        assert Decimal(expected["quantity"]) == decoded["quantity"]
        assert 8 == -decoded["price"].as_tuple().exponent
        assert expected["message_id"] == str(decoded["message_id"])
        for name in ("timestamp", "ingestion_timestamp"):
            assert datetime.fromtimestamp(0, UTC) < decoded[name]
            micros = (decoded[name] - datetime.fromtimestamp(0, UTC)) // _MICROSECOND
            assert expected[name] == micros
        rest = {k: v for k, v in decoded.items() if k not in _CONVERTED}
        assert {k: v for k, v in expected.items() if k not in _CONVERTED} == rest

    def test_a_price_keeps_its_eight_places(self) -> None:
        """50000.12000000 comes back as exactly 50000.12000000."""
        pytest.importorskip("fastavro")
        decoded = decode_avro_value(encode_avro_value(to_trade_v2(trade(1))))

        assert "50000.12000000" == str(decoded["price"])
        assert "0.00150000" == str(decoded["quantity"])

    def test_values_use_avro_single_object_encoding(self) -> None:
        """A value opens with C3 01 and the schema's CRC-64-AVRO fingerprint."""
        fastavro = pytest.importorskip("fastavro")

        schema = fastavro.parse_schema(trade_v2_schema())
        canonical = fastavro.schema.to_parsing_canonical_form(schema)
        fingerprint = fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")

        value = encode_avro_value(to_trade_v2(trade(1)))

        assert AVRO_MARKER + bytes.fromhex(fingerprint) == value[:10]

    def test_a_value_of_another_schema_is_refused(self) -> None:
        """decode_avro_value names the bytes it expected when the header differs."""
        pytest.importorskip("fastavro")

        with pytest.raises(ValueError, match="single-object encoding"):
            decode_avro_value(b"\xc3\x01" + bytes(8) + b"body")


_MICROSECOND = datetime.fromtimestamp(1e-6, UTC) - datetime.fromtimestamp(0, UTC)
_CONVERTED = {"message_id", "price", "quantity", "timestamp", "ingestion_timestamp"}


class TestDelivery:
    def test_trades_are_consumed_back_with_keys_headers_and_values(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """Each trade is one message: key symbol, dedup headers, TradeV2 JSON value."""
        sink, checkpoints = open_kafka_sink(cluster, sinks)
        batch = [trade(i) for i in (1, 2, 3)] + [trade(1, ETH, source="rest")]

        sink.write(batch, {BTC: 3, ETH: 1})

        assert {} == checkpoints
        messages = consume_all(cluster.bootstrap, TOPIC)
        by_key = {headers(m)["k2-dedup-key"].decode(): m for m in messages}
        assert len(batch) == len(messages) == len(by_key)
        for sent in batch:
            message = by_key[f"BINANCE:{sent.symbol}:trade:{sent.id}"]
            assert sent.symbol.encode() == message.key()
            assert to_trade_v2(sent) == json.loads(message.value() or b"")
            assert {
                "k2-dedup-key": f"BINANCE:{sent.symbol}:trade:{sent.id}".encode(),
                "k2-message-id": message_id(
                    BINANCE, sent.symbol, "trade", sent.id
                ).encode(),
                "k2-source": sent.source.encode(),
                "k2-format": b"json",
            } == headers(message)

    def test_one_symbols_trades_stay_in_order_in_one_partition(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """Keyed by symbol, a symbol's trades land in one partition in id order."""
        sink, _ = open_kafka_sink(cluster, sinks)

        sink.write([trade(i) for i in range(1, 201)], {BTC: 200})

        messages = consume_all(cluster.bootstrap, TOPIC)
        assert 1 == len({m.partition() for m in messages})
        ids = [json.loads(m.value() or b"")["source_sequence"] for m in messages]
        assert list(range(1, 201)) == ids

    def test_avro_values_decode_to_the_trade_v2_record(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """With format=avro each value is the Avro form of the trade's TradeV2 record."""
        pytest.importorskip("fastavro")
        sink, _ = open_kafka_sink(cluster, sinks, value_format="avro")

        sink.write([trade(1), trade(2)], {BTC: 2})

        messages = consume_all(cluster.bootstrap, TOPIC)
        decoded = [decode_avro_value(m.value() or b"") for m in messages]
        assert ["BINANCE-1", "BINANCE-2"] == [d["trade_id"] for d in decoded]
        assert ["50000.12000000"] * 2 == [str(d["price"]) for d in decoded]
        assert [b"avro"] * 2 == [headers(m)["k2-format"] for m in messages]

    def test_a_trade_the_schema_cannot_hold_stops_the_sink(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """A price with nine places cannot be Avro decimal(18, 8): SinkError, nothing sent."""
        pytest.importorskip("fastavro")
        sink, _ = open_kafka_sink(cluster, sinks, value_format="avro")

        with pytest.raises(
            SinkError, match="BINANCE:BTCUSDT:trade:1 cannot be encoded"
        ):
            sink.write([trade(1, price="1.123456789")], {BTC: 1})

        assert 0 == end_offsets(cluster.bootstrap, TOPIC)


class TestCheckpoints:
    def test_checkpoints_are_read_back_by_a_new_sink(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """A new sink's open() returns the checkpoints the last one wrote."""
        first, _ = open_kafka_sink(cluster, sinks)
        first.write([trade(1), trade(2)], {BTC: 2})
        first.write([trade(3), trade(1, ETH)], {BTC: 3, ETH: 1})
        first.close()

        _, checkpoints = open_kafka_sink(cluster, sinks)

        assert {BTC: 3, ETH: 1} == checkpoints

    def test_a_checkpoint_is_a_keyed_json_record(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """Key exchange:symbol:stream, value last_id and updated_us in JSON."""
        sink, _ = open_kafka_sink(cluster, sinks, clock=FakeClock(wall=1_700_000_000.5))

        sink.write([trade(4)], {BTC: 4})

        (message,) = consume_all(cluster.bootstrap, CHECKPOINTS)
        assert b"BINANCE:BTCUSDT:trade" == message.key()
        assert {"last_id": 4, "updated_us": 1_700_000_000_500_000} == json.loads(
            message.value() or b""
        )

    def test_the_highest_checkpoint_wins_over_a_later_lower_one(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """A hot-hot twin writing an older checkpoint later does not move it back."""
        ahead, _ = open_kafka_sink(cluster, sinks)
        behind, _ = open_kafka_sink(cluster, sinks)
        ahead.write([trade(9)], {BTC: 9})
        behind.write([trade(5)], {BTC: 5})

        _, checkpoints = open_kafka_sink(cluster, sinks)

        assert {BTC: 9} == checkpoints

    def test_records_that_are_not_checkpoints_are_skipped(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """A foreign record is logged and skipped; the real checkpoints still load."""
        sink, _ = open_kafka_sink(cluster, sinks)
        sink.write([trade(2)], {BTC: 2})
        stray = confluent_kafka.Producer({"bootstrap.servers": cluster.bootstrap})
        stray.produce(CHECKPOINTS, b"not json", b"BINANCE:ETHUSDT:trade")
        stray.produce(CHECKPOINTS, b"{}", b"no-colons")
        assert 0 == stray.flush(5)

        with structlog.testing.capture_logs() as logs:
            _, checkpoints = open_kafka_sink(cluster, sinks)

        assert {BTC: 2} == checkpoints
        skipped = [e for e in logs if e["event"] == "kafka_checkpoint_skipped"]
        assert 2 == len(skipped)


class TestFailures:
    def test_a_failed_delivery_raises_and_the_checkpoint_stays(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """Brokers down: write raises SinkUnavailable and no checkpoint is written."""
        sink, _ = open_kafka_sink(cluster, sinks)
        sink.write([trade(1)], {BTC: 1})
        cluster.set_down()

        started = time.monotonic()
        with pytest.raises(SinkUnavailable, match="not delivered to trades") as raised:
            sink.write([trade(2), trade(3)], {BTC: 3})
        elapsed = time.monotonic() - started
        cluster.set_up()

        assert "unavailable" == raised.value.reason
        assert elapsed < SHORT["delivery_timeout"] + 3
        assert 1 == end_offsets(cluster.bootstrap, CHECKPOINTS)
        _, checkpoints = open_kafka_sink(cluster, sinks)
        assert {BTC: 1} == checkpoints

    def test_a_retried_batch_is_stored_once_per_dedup_key(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """The writer's retry after an outage leaves every dedup key once, unchanged."""
        sink, _ = open_kafka_sink(cluster, sinks)
        batch = [trade(i) for i in (1, 2, 3)]
        cluster.set_down()
        with pytest.raises(SinkUnavailable):
            sink.write(batch, {BTC: 3})
        cluster.set_up()

        write_retrying(sink, batch, {BTC: 3})

        stored = deduplicated(consume_all(cluster.bootstrap, TOPIC))
        assert {f"BINANCE:BTCUSDT:trade:{i}" for i in (1, 2, 3)} == set(stored)
        _, checkpoints = open_kafka_sink(cluster, sinks)
        assert {BTC: 3} == checkpoints

    def test_a_replayed_batch_is_removed_by_the_consumer_rule(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """A replay after a crash doubles messages on the topic, not dedup keys."""
        first, _ = open_kafka_sink(cluster, sinks)
        first.write([trade(1), trade(2)], {})
        replay, _ = open_kafka_sink(cluster, sinks)

        replay.write([trade(1), trade(2), trade(3)], {BTC: 3})

        messages = consume_all(cluster.bootstrap, TOPIC)
        assert 5 == len(messages)
        assert 3 == len(deduplicated(messages))

    def test_unreachable_brokers_fail_open_naming_them(self) -> None:
        """open() against a closed port raises SinkUnavailable within open_timeout."""
        broker = f"127.0.0.1:{closed_port()}"
        sink = KafkaSink([broker], TOPIC, open_timeout=1.0, close_timeout=0.5)

        started = time.monotonic()
        with pytest.raises(
            SinkUnavailable, match=f"cannot reach the kafka brokers {broker}"
        ):
            sink.open()

        assert time.monotonic() - started < 3.0
        sink.close()

    def test_close_after_the_brokers_went_away_returns_quietly(
        self, cluster: MockCluster, sinks: list[KafkaSink]
    ) -> None:
        """close() with undelivered messages and no brokers logs, raises nothing."""
        sink, _ = open_kafka_sink(cluster, sinks, delivery_timeout=30.0)
        cluster.set_down()
        assert sink._producer is not None
        sink._producer.produce(TOPIC, b"late", b"BTCUSDT")

        started = time.monotonic()
        with structlog.testing.capture_logs() as logs:
            sink.close()

        assert time.monotonic() - started < SHORT["close_timeout"] + 1
        assert ["kafka_close_incomplete"] == [
            e["event"] for e in logs if e["event"].startswith("kafka_close")
        ]

    def test_missing_topics_are_reported_and_auto_created(
        self, sinks: list[KafkaSink]
    ) -> None:
        """Topics the broker will not create are logged; the first write makes them."""
        if LIB is None:
            pytest.skip("this librdkafka build has no mock cluster API")
        bare = MockCluster()
        try:
            sink = KafkaSink(bare.bootstrap.split(","), "fresh", **SHORT)
            sinks.append(sink)
            with structlog.testing.capture_logs() as logs:
                checkpoints = sink.open()
            # The first write waits for the brokers to create the topic.
            write_retrying(sink, [trade(1)], {BTC: 1})
            sink.close()

            assert {} == checkpoints
            refused = [
                e["topic"] for e in logs if e["event"] == "kafka_topic_not_created"
            ]
            assert ["fresh", "fresh.checkpoints"] == sorted(refused)
            assert 1 == end_offsets(bare.bootstrap, "fresh")
        finally:
            bare.close()


class TestEndToEnd:
    async def test_the_bundled_exchange_reaches_kafka_as_published(
        self, exchange: Any, start_service: Any, cluster: MockCluster, tmp_path: Any
    ) -> None:
        """Exchange -> k2stream -> Kafka: every captured id once, fields as published."""
        cluster.create_topic(DEFAULT_TOPIC)
        cluster.create_topic(DEFAULT_TOPIC + ".checkpoints", partitions=1)
        url = f"kafka://{cluster.bootstrap}/?delivery_timeout=5"
        run = await start_service(
            settings_for(exchange, tmp_path / "unused.db", sink=url)
        )
        await wait_for(lambda: run.service.delivered > 300, what="trades delivered")

        assert 0 == await run.stop(exchange)

        messages = consume_all(cluster.bootstrap, DEFAULT_TOPIC)
        stored = deduplicated(messages)
        assert len(messages) == len(stored), "a clean run sends no duplicate"
        market = exchange.market
        for spec in exchange.config.symbols:
            records = [
                json.loads(v)
                for k, v in stored.items()
                if k.startswith(f"BINANCE:{spec.symbol}:trade:")
            ]
            ids = sorted(r["source_sequence"] for r in records)
            last = market.last_id(spec.symbol)
            assert ids and list(range(ids[0], last + 1)) == ids, spec.symbol
            for record in records:
                truth = market.trade(spec.symbol, record["source_sequence"])
                assert (truth.price, truth.quantity, truth.trade_time_us) == (
                    record["price"],
                    record["quantity"],
                    record["timestamp"],
                )
                assert ("SELL" if truth.buyer_is_maker else "BUY") == record["side"]

        sink = from_url(url, open_timeout=3.0, close_timeout=1.0)
        try:
            checkpoints = sink.open()
        finally:
            sink.close()
        expected = {
            StreamKey(BINANCE, s.symbol, "trade"): market.last_id(s.symbol)
            for s in exchange.config.symbols
        }
        assert expected == checkpoints
