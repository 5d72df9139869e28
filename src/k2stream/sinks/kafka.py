"""The K2 bus sink: trades to a Kafka topic, checkpoints to a compacted one.

Delivery. Every trade of a batch is produced, then the producer is flushed and
the delivery reports are read: only when the brokers acknowledged all of them
(``acks=all``) are the batch's checkpoints produced to the checkpoint topic,
and flushed and checked the same way. Any failure raises
:class:`SinkUnavailable`; the writer keeps the batch and sends it again.

Duplicates. Kafka cannot take a batch and its checkpoints atomically without
transactions, so a retried batch, two instances of one shard running hot-hot,
or a replay from an older checkpoint after a crash can put a trade on the
topic twice. The idempotent producer removes the duplicates its own internal
retries would cause; the rest are removed by the consumer, which upserts on
the ``k2-dedup-key`` header (docs/kafka.md states the rule).

Messages on the trade topic::

    key      the symbol, so that one symbol's trades stay in one partition
    value    TradeV2 as JSON (default) or Avro single-object encoding
             (k2stream.sinks.avro)
    headers  k2-dedup-key   exchange:symbol:stream:id
             k2-message-id  the TradeV2 message_id (a UUIDv5 of the same)
             k2-source      ws or rest
             k2-format      json or avro

Messages on the checkpoint topic: key ``exchange:symbol:stream``, value
``{"last_id": ..., "updated_us": ...}``; :meth:`KafkaSink.open` reads the
topic to its end and keeps the highest ``last_id`` per key.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal
from urllib.parse import parse_qs, urlsplit

import msgspec
import structlog
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic

from k2stream.clock import SYSTEM_CLOCK, Clock
from k2stream.records import StreamKey, Trade, to_trade_v2
from k2stream.sinks.avro import _avro_values
from k2stream.sinks.base import SinkError, SinkUnavailable, SinkUrl


if TYPE_CHECKING:
    from confluent_kafka.admin._metadata import ClusterMetadata

log = structlog.get_logger(__name__)

DEFAULT_TOPIC: Final = "market.crypto.trades.binance"
"""The K2 platform's topic for Binance trades."""

CHECKPOINT_SUFFIX: Final = ".checkpoints"
"""The checkpoint topic is ``<topic>.checkpoints`` unless the URL names one."""

ValueFormat = Literal["json", "avro"]
FORMATS: Final[tuple[ValueFormat, ...]] = ("json", "avro")

ACCEPTED_FORM: Final = (
    "kafka://host:port[,host:port...]/topic"
    "[?format=json|avro&checkpoint_topic=NAME&delivery_timeout=SECONDS"
    "&open_timeout=SECONDS]"
)

HEADER_DEDUP_KEY: Final = "k2-dedup-key"
HEADER_MESSAGE_ID: Final = "k2-message-id"
HEADER_SOURCE: Final = "k2-source"
HEADER_FORMAT: Final = "k2-format"

_QUERY_OPTIONS: Final = (
    "format",
    "checkpoint_topic",
    "delivery_timeout",
    "open_timeout",
)

_TOPIC_NAME: Final = re.compile(r"[A-Za-z0-9._-]{1,249}")
"""What Kafka accepts as a topic name."""

_FLUSH_MARGIN: Final = 5.0
"""Seconds a flush waits beyond ``delivery_timeout``: librdkafka checks for
expired messages about once a second, so every report is in by then."""

_QUEUE_FULL_WAIT: Final = 0.05
"""Seconds to serve delivery reports when the producer's local queue is full."""

_CHECKPOINT_READER_GROUP: Final = "k2stream-checkpoint-reader"
"""A group id the checkpoint reader names but never commits offsets for."""

_FATAL_CODES: Final = frozenset(
    {
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.CLUSTER_AUTHORIZATION_FAILED,
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.INVALID_REQUIRED_ACKS,
        KafkaError._INVALID_ARG,
    }
)
"""Delivery errors that a retry cannot fix: permissions, sizes, configuration."""


@dataclass(frozen=True, slots=True)
class KafkaUrl:
    """A parsed ``kafka://`` sink URL."""

    brokers: tuple[str, ...]
    topic: str
    checkpoint_topic: str
    value_format: ValueFormat
    options: dict[str, float] = field(default_factory=dict)
    """``delivery_timeout`` and ``open_timeout`` when the URL sets them."""


def parse_kafka_url(url: str) -> KafkaUrl:
    """Split a ``kafka://`` URL into brokers, topics, format and timeouts.

    Raises ValueError naming the URL and the accepted form when it is not one.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "kafka":
        raise _invalid(url, "the scheme is not kafka")

    if parts.fragment:
        raise _invalid(url, "it has a #fragment")

    brokers = tuple(_broker(url, item) for item in parts.netloc.split(","))
    topic = parts.path.removeprefix("/") or DEFAULT_TOPIC
    _check_topic(url, topic)

    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - set(_QUERY_OPTIONS)
    if unknown:
        raise _invalid(url, f"unknown option {', '.join(sorted(unknown))}")

    if any(len(values) > 1 for values in query.values()):
        raise _invalid(url, "an option is given twice")

    value_format = _one(query, "format") or "json"
    if value_format not in FORMATS:
        raise _invalid(url, f"format={value_format} is neither json nor avro")

    checkpoint_topic = _one(query, "checkpoint_topic") or topic + CHECKPOINT_SUFFIX
    _check_topic(url, checkpoint_topic)
    if checkpoint_topic == topic:
        raise _invalid(url, "the checkpoint topic must differ from the trade topic")

    options = {
        name: _seconds(url, name, text)
        for name in ("delivery_timeout", "open_timeout")
        if (text := _one(query, name)) is not None
    }
    return KafkaUrl(
        brokers,
        topic,
        checkpoint_topic,
        "avro" if value_format == "avro" else "json",
        options,
    )


class KafkaSink:
    """Trades to ``topic`` on the brokers, checkpoints to ``checkpoint_topic``."""

    name: str = "kafka"

    def __init__(
        self,
        brokers: Sequence[str],
        topic: str = DEFAULT_TOPIC,
        *,
        checkpoint_topic: str | None = None,
        value_format: ValueFormat = "json",
        delivery_timeout: float = 30.0,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        linger: float = 0.005,
        partitions: int = -1,
        replication_factor: int = -1,
        producer_config: Mapping[str, str | int | float | bool] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        """Describe the sink; nothing connects before :meth:`open`.

        ``delivery_timeout`` bounds how long a batch may wait for the brokers
        before :meth:`write` gives up on it (librdkafka's
        ``delivery.timeout.ms``). ``partitions`` and ``replication_factor``
        apply only to topics :meth:`open` creates; -1 takes the broker's
        defaults. ``producer_config`` adds or overrides librdkafka settings
        (security, say).
        """
        if not brokers:
            raise ValueError("the kafka sink needs at least one broker host:port")
        if value_format not in FORMATS:
            raise ValueError(f"value_format={value_format!r} is neither json nor avro")
        if min(delivery_timeout, open_timeout, close_timeout) <= 0 or linger < 0:
            raise ValueError(
                f"delivery_timeout={delivery_timeout}, open_timeout={open_timeout} "
                f"and close_timeout={close_timeout} must be > 0, linger={linger} >= 0"
            )

        self.brokers = tuple(brokers)
        self.topic = topic
        self.checkpoint_topic = checkpoint_topic or topic + CHECKPOINT_SUFFIX
        self.value_format = value_format
        self._delivery_timeout = delivery_timeout
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._linger = linger
        self._partitions = partitions
        self._replication_factor = replication_factor
        self._extra_config = dict(producer_config or {})
        self._clock = clock

        # Fails here, at start-up, rather than at the first batch.
        self._encode = _avro_values().encode if value_format == "avro" else _json_value
        self._format_header = value_format.encode()
        self._producer: Producer | None = None
        self._compression = ""
        self._fatal: KafkaError | None = None
        self._open_deadline = 0.0

    @property
    def bootstrap(self) -> str:
        """The brokers as librdkafka's ``bootstrap.servers``."""
        return ",".join(self.brokers)

    def open(self) -> dict[StreamKey, int]:
        """Reach the brokers, create missing topics, read the checkpoints.

        Raises :class:`SinkUnavailable` when the brokers cannot be reached or
        the checkpoint topic cannot be read to its end within ``open_timeout``.
        """
        if self._producer is not None:
            raise SinkError(f"the kafka sink for {self.topic} is already open")

        # Every step below shares one deadline, so open() is bounded as a whole.
        self._open_deadline = time.monotonic() + self._open_timeout
        admin = AdminClient(self._client_config())
        metadata = self._metadata(admin)
        if self._create_missing_topics(admin, metadata):
            metadata = self._metadata(admin)
        admin.poll(0)

        checkpoints = self._read_checkpoints(metadata)
        self._producer = self._new_producer()
        log.info(
            "kafka_sink_opened",
            brokers=self.bootstrap,
            topic=self.topic,
            checkpoint_topic=self.checkpoint_topic,
            format=self.value_format,
            compression=self._compression,
            sequences=len(checkpoints),
        )
        return checkpoints

    def write(
        self, trades: Sequence[Trade], checkpoints: Mapping[StreamKey, int]
    ) -> None:
        """Deliver ``trades``, then ``checkpoints``; both acknowledged on return."""
        producer = self._ready_producer()

        if trades:
            self._deliver(producer, self._trade_messages(trades), "trades", self.topic)

        if checkpoints:
            messages = self._checkpoint_messages(checkpoints)
            self._deliver(producer, messages, "checkpoints", self.checkpoint_topic)

    def close(self) -> None:
        """Flush what is still queued, for at most ``close_timeout`` seconds."""
        if self._producer is None:
            return

        producer, self._producer = self._producer, None
        try:
            left = producer.flush(self._close_timeout)
        except KafkaException as exc:
            log.warning("kafka_close_failed", topic=self.topic, error=str(exc))
            return

        if left:
            log.warning(
                "kafka_close_incomplete",
                topic=self.topic,
                undelivered=left,
                close_timeout=self._close_timeout,
            )

    def _client_config(self) -> dict[str, Any]:
        """Settings every client of this sink shares (admin, consumer, producer)."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap,
            "client.id": "k2stream",
            # librdkafka backs off up to 10 s between attempts to reach a
            # broker; 1 s (the Java client's default) resumes delivery sooner
            # after an outage, at the cost of a few more connection attempts.
            "reconnect.backoff.max.ms": 1000,
            "logger": _ClientLog(),
            "error_cb": self._on_client_error,
        }
        config.update(
            (key, value)
            for key, value in self._extra_config.items()
            if not key.startswith(_PRODUCER_ONLY)
        )
        return config

    def _producer_config(self, compression: str) -> dict[str, Any]:
        config = self._client_config()
        config.update(
            {
                "enable.idempotence": True,
                "acks": "all",
                "max.in.flight.requests.per.connection": 5,
                "compression.type": compression,
                "linger.ms": self._linger * 1000,
                "delivery.timeout.ms": int(self._delivery_timeout * 1000),
            }
        )
        config.update(self._extra_config)
        return config

    def _new_producer(self) -> Producer:
        """An idempotent producer, compressing with zstd or, lacking it, lz4."""
        try:
            producer = Producer(self._producer_config("zstd"))
            self._compression = "zstd"
        except KafkaException as exc:
            if "zstd" not in str(exc):
                raise SinkError(
                    f"the kafka producer for {self.bootstrap} cannot be configured "
                    f"({exc}); check the sink's producer settings"
                ) from exc
            producer = Producer(self._producer_config("lz4"))
            self._compression = "lz4"

        self._fatal = None
        return producer

    def _ready_producer(self) -> Producer:
        """The producer, replaced by a fresh one after a fatal idempotence error."""
        if self._producer is None:
            raise SinkError(
                f"the kafka sink for {self.topic} is not open; call open() first"
            )

        if self._fatal is not None:
            # A fatal error (say, a fenced producer epoch) leaves the producer
            # unusable; a new one gets a new producer id and carries on.
            log.warning(
                "kafka_producer_replaced",
                topic=self.topic,
                error=self._fatal.str(),
            )
            self._producer.flush(0)
            self._producer = self._new_producer()

        return self._producer

    def _metadata(self, admin: AdminClient) -> ClusterMetadata:
        try:
            return admin.list_topics(timeout=self._open_left())
        except KafkaException as exc:
            raise SinkUnavailable(
                f"cannot reach the kafka brokers {self.bootstrap} within "
                f"{self._open_timeout} s ({_describe(exc)}); check that they are up, "
                "that this host can connect to them, and that the sink URL lists "
                "their advertised host:port"
            ) from exc

    def _create_missing_topics(
        self, admin: AdminClient, metadata: ClusterMetadata
    ) -> bool:
        """Create the trade and checkpoint topics if missing; True if any was made.

        A broker that refuses (no permission, or no admin API) is logged and
        tolerated: the topics may be created by hand or auto-created on the
        first write.
        """
        wanted = {
            self.topic: NewTopic(
                self.topic, self._partitions, self._replication_factor
            ),
            self.checkpoint_topic: NewTopic(
                self.checkpoint_topic,
                1,
                self._replication_factor,
                config={"cleanup.policy": "compact"},
            ),
        }
        missing = [new for name, new in wanted.items() if not _exists(metadata, name)]
        if not missing:
            return False

        futures = admin.create_topics(
            missing,
            operation_timeout=self._open_left(),
            request_timeout=self._open_left(),
        )
        created = False
        for topic, future in futures.items():
            try:
                future.result(timeout=self._open_left())
            except KafkaException as exc:
                if _code(exc) != KafkaError.TOPIC_ALREADY_EXISTS:
                    _warn_not_created(topic, _describe(exc))
                continue
            except FutureTimeout:
                _warn_not_created(topic, f"no answer within {self._open_timeout} s")
                continue

            created = True
            log.info("kafka_topic_created", topic=topic)

        return created

    def _read_checkpoints(self, metadata: ClusterMetadata) -> dict[StreamKey, int]:
        """The highest ``last_id`` per key in the checkpoint topic, read to its end.

        The highest rather than the latest: with two instances hot-hot, one
        may record an older checkpoint after the other recorded a newer one,
        and every id up to the newer one is on the bus all the same.
        """
        topic = metadata.topics.get(self.checkpoint_topic)
        if topic is None or topic.error is not None:
            return {}

        config = {
            **self._client_config(),
            "group.id": _CHECKPOINT_READER_GROUP,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
        }
        consumer = Consumer(config)
        try:
            ends = self._checkpoint_ends(consumer, list(topic.partitions))
            return self._consume_checkpoints(consumer, ends)
        except KafkaException as exc:
            raise self._checkpoints_unreadable(_describe(exc)) from exc
        finally:
            consumer.close()

    def _checkpoint_ends(
        self, consumer: Consumer, partitions: list[int]
    ) -> dict[int, int]:
        """Assign every non-empty partition from its start; return its end offset."""
        ends: dict[int, int] = {}
        starts: list[TopicPartition] = []
        for partition in partitions:
            where = TopicPartition(self.checkpoint_topic, partition)
            low, high = consumer.get_watermark_offsets(where, self._open_left())
            if high > low:
                ends[partition] = high
                starts.append(TopicPartition(self.checkpoint_topic, partition, low))

        consumer.assign(starts)
        return ends

    def _consume_checkpoints(
        self, consumer: Consumer, ends: dict[int, int]
    ) -> dict[StreamKey, int]:
        checkpoints: dict[StreamKey, int] = {}
        while ends:
            if time.monotonic() > self._open_deadline:
                raise self._checkpoints_unreadable(
                    f"{len(ends)} partitions not read to the end"
                )

            for message in consumer.consume(500, timeout=0.1):
                error = message.error()
                if error is not None:
                    log.warning(
                        "kafka_checkpoint_read_error",
                        topic=self.checkpoint_topic,
                        error=error.str(),
                    )
                    continue
                _apply_checkpoint(checkpoints, message.key(), message.value())

            positions = consumer.position(
                [TopicPartition(self.checkpoint_topic, p) for p in ends]
            )
            for position in positions:
                if position.offset >= ends[position.partition]:
                    del ends[position.partition]

        return checkpoints

    def _open_left(self) -> float:
        """Seconds left of ``open_timeout``; a little even when none is left,
        so that a last request can still be answered."""
        return max(self._open_deadline - time.monotonic(), 0.1)

    def _checkpoints_unreadable(self, why: str) -> SinkUnavailable:
        return SinkUnavailable(
            f"cannot read the checkpoint topic {self.checkpoint_topic} on "
            f"{self.bootstrap} within {self._open_timeout} s ({why}); check the "
            "brokers and that this client may read the topic"
        )

    def _trade_messages(self, trades: Sequence[Trade]) -> Iterator[_Message]:
        encode = self._encode
        format_header = self._format_header
        for trade in trades:
            record = to_trade_v2(trade)
            dedup_key = f"{trade.exchange}:{trade.symbol}:{trade.stream}:{trade.id}"
            try:
                value = encode(record)
            except ValueError as exc:
                raise SinkError(
                    f"trade {dedup_key} cannot be encoded as {self.value_format} "
                    f"({exc}); use format=json or report the trade"
                ) from exc

            headers: _Headers = [
                (HEADER_DEDUP_KEY, dedup_key.encode()),
                (HEADER_MESSAGE_ID, record["message_id"].encode()),
                (HEADER_SOURCE, trade.source.encode()),
                (HEADER_FORMAT, format_header),
            ]
            yield self.topic, trade.symbol.encode(), value, headers

    def _checkpoint_messages(
        self, checkpoints: Mapping[StreamKey, int]
    ) -> Iterator[_Message]:
        updated_us = int(self._clock.time() * 1_000_000)
        for key, last_id in checkpoints.items():
            value = _CHECKPOINT_ENCODER.encode(_Checkpoint(last_id, updated_us))
            name = f"{key.exchange}:{key.symbol}:{key.stream}"
            yield self.checkpoint_topic, name.encode(), value, None

    def _deliver(
        self,
        producer: Producer,
        messages: Iterable[_Message],
        what: str,
        topic: str,
    ) -> None:
        """Produce ``messages``, flush, and raise unless every one was acknowledged."""
        reports = _DeliveryReports()
        deadline = time.monotonic() + self._delivery_timeout
        for message in messages:
            self._produce(producer, message, reports.on_delivery, deadline)
            reports.sent += 1

        left = producer.flush(self._delivery_timeout + _FLUSH_MARGIN)
        if reports.delivered == reports.sent:
            return

        error = reports.first_error
        why = error.str() if error is not None else f"{left} still queued"
        undelivered = reports.sent - reports.delivered
        if error is not None and error.code() in _FATAL_CODES:
            raise SinkError(
                f"{undelivered} of {reports.sent} {what} were refused by {topic} on "
                f"{self.bootstrap} ({why}); this will not pass by itself: check "
                "the topic's permissions and size limits"
            )

        raise SinkUnavailable(
            f"{undelivered} of {reports.sent} {what} were not delivered to {topic} "
            f"on {self.bootstrap} ({why}); k2stream retries the batch, check that "
            "the brokers are up and the topic is writable",
            reason="unavailable",
        )

    def _produce(
        self,
        producer: Producer,
        message: _Message,
        on_delivery: Callable[[KafkaError | None, Any], None],
        deadline: float,
    ) -> None:
        """Queue one message, waiting while the producer's local queue is full."""
        topic, key, value, headers = message
        while True:
            try:
                producer.produce(
                    topic, value, key, headers=headers, on_delivery=on_delivery
                )
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise SinkUnavailable(
                        f"the kafka producer queue for {topic} stayed full for "
                        f"{self._delivery_timeout} s; k2stream retries, check that "
                        f"the brokers {self.bootstrap} keep up"
                    ) from None
                producer.poll(_QUEUE_FULL_WAIT)
            except KafkaException as exc:
                if _code(exc) in _FATAL_CODES:
                    raise SinkError(
                        f"a message for {topic} is refused ({_describe(exc)}); "
                        "check the sink's producer settings and the topic's limits"
                    ) from exc
                raise SinkUnavailable(
                    f"cannot queue a message for {topic} ({_describe(exc)}); "
                    "k2stream retries the batch"
                ) from exc

    def _on_client_error(self, error: KafkaError) -> None:
        """librdkafka's error callback: note fatal errors, log the rest quietly."""
        if error.fatal():
            self._fatal = error
            log.error("kafka_client_fatal", code=error.name(), error=error.str())
            return

        log.info("kafka_client_error", code=error.name(), error=error.str())


def from_url(url: SinkUrl | str, **options: Any) -> KafkaSink:
    """The sink for a ``kafka://`` URL; ``options`` win over the URL's query.

    See :func:`k2stream.sinks.base.open_sink`.
    """
    text = url.url if isinstance(url, SinkUrl) else url
    parsed = parse_kafka_url(text)
    settings: dict[str, Any] = {
        "checkpoint_topic": parsed.checkpoint_topic,
        "value_format": parsed.value_format,
        **parsed.options,
        **options,
    }
    return KafkaSink(parsed.brokers, parsed.topic, **settings)


_Headers = list[tuple[str, str | bytes | None]]

_Message = tuple[str, bytes, bytes, _Headers | None]
"""Topic, key, value and headers of one message to produce."""

_PRODUCER_ONLY: Final = (
    "acks",
    "compression.",
    "delivery.",
    "enable.idempotence",
    "linger.",
    "max.in.flight",
    "message.",
    "queue.",
    "batch.",
    "retries",
)
"""Prefixes of producer settings that the admin client and consumer reject."""


class _Checkpoint(msgspec.Struct):
    last_id: int
    updated_us: int


_CHECKPOINT_ENCODER: Final = msgspec.json.Encoder()
_CHECKPOINT_DECODER: Final = msgspec.json.Decoder(_Checkpoint)
_JSON_ENCODER: Final = msgspec.json.Encoder()


def _json_value(record: dict[str, Any]) -> bytes:
    return _JSON_ENCODER.encode(record)


class _DeliveryReports:
    """Counts the delivery reports of one flush and keeps the first error."""

    def __init__(self) -> None:
        self.sent = 0
        self.delivered = 0
        self.first_error: KafkaError | None = None

    def on_delivery(self, error: KafkaError | None, message: Any) -> None:
        if error is None:
            self.delivered += 1
        elif self.first_error is None:
            self.first_error = error


class _ClientLog:
    """librdkafka's own log lines as structlog events.

    confluent-kafka calls ``log(level, "%s [%s] %s", facility, client, line)``.
    Its errors are capped at warning: a refused connection during an outage
    is expected, and the sink reports the outage itself.
    """

    def log(self, level: int, fmt: str, facility: str, client: str, line: str) -> None:
        log.log(
            min(level, logging.WARNING),
            "kafka_client_log",
            facility=facility,
            client=client,
            line=line,
        )


def _apply_checkpoint(
    checkpoints: dict[StreamKey, int], key: bytes | None, value: bytes | None
) -> None:
    """Fold one checkpoint record into ``checkpoints``; a tombstone forgets the key."""
    parts = (key or b"").decode(errors="replace").split(":")
    if len(parts) != 3 or not all(parts):
        log.warning("kafka_checkpoint_skipped", key=repr(key), why="malformed key")
        return

    stream_key = StreamKey(*parts)
    if value is None:
        checkpoints.pop(stream_key, None)
        return

    try:
        checkpoint = _CHECKPOINT_DECODER.decode(value)
    except msgspec.DecodeError as exc:
        log.warning("kafka_checkpoint_skipped", key=str(stream_key), why=str(exc))
        return

    known = checkpoints.get(stream_key)
    checkpoints[stream_key] = (
        checkpoint.last_id if known is None else max(known, checkpoint.last_id)
    )


def _exists(metadata: ClusterMetadata, topic: str) -> bool:
    found = metadata.topics.get(topic)
    return found is not None and found.error is None


def _warn_not_created(topic: str, why: str) -> None:
    log.warning(
        "kafka_topic_not_created",
        topic=topic,
        error=why,
        action="create it by hand (the checkpoint topic with cleanup.policy=compact) "
        "or let the brokers auto-create it",
    )


def _code(exc: KafkaException) -> int | None:
    error = exc.args[0] if exc.args else None
    return error.code() if isinstance(error, KafkaError) else None


def _describe(exc: KafkaException) -> str:
    error = exc.args[0] if exc.args else None
    return error.str() if isinstance(error, KafkaError) else str(exc)


def _broker(url: str, text: str) -> str:
    """Check one ``host:port`` (IPv6 hosts in brackets) and return it."""
    host, colon, port = text.rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _invalid(url, f"broker {text!r} is not host:port")

    if host.startswith("[") != host.endswith("]") or "/" in host:
        raise _invalid(url, f"broker {text!r} is not host:port")

    return text


def _check_topic(url: str, topic: str) -> None:
    if not _TOPIC_NAME.fullmatch(topic) or topic in (".", ".."):
        raise _invalid(
            url,
            f"{topic!r} is not a Kafka topic name (letters, digits, '.', '_', '-')",
        )


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[0] if values else None


def _seconds(url: str, name: str, text: str) -> float:
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise _invalid(url, f"{name}={text} is not a number of seconds > 0")
    return seconds


def _invalid(url: str, why: str) -> ValueError:
    return ValueError(f"sink URL {url!r} is not valid: {why}; use {ACCEPTED_FORM}")
