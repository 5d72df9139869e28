"""Avro encoding of the TradeV2 record, for the Kafka sink's ``format=avro``.

Values are in Avro single-object encoding (marker, CRC-64-AVRO fingerprint of
the schema, body) with the schema in ``schemas/trade_v2.avsc``: prices and
quantities as ``decimal(18, 8)``, timestamps as ``timestamp-micros``. It is
kept apart from the delivery code in :mod:`k2stream.sinks.kafka`, and needs
fastavro but not confluent-kafka.
"""

from __future__ import annotations

import functools
import io
import json
from decimal import Decimal, InvalidOperation
from importlib import resources
from typing import Any, Final

from k2stream.sinks.base import SinkError


AVRO_MARKER: Final = b"\xc3\x01"
"""The two bytes that open an Avro single-object encoded value (Avro 1.8+ spec,
"Single-object encoding"); the schema's 8-byte CRC-64-AVRO fingerprint follows."""

TRADE_V2_SCHEMA: Final = "schemas/trade_v2.avsc"
"""The TradeV2 Avro schema, relative to the ``k2stream.sinks`` package."""


def trade_v2_schema() -> dict[str, Any]:
    """The TradeV2 Avro schema shipped with k2stream, as parsed JSON."""
    text = resources.files("k2stream.sinks").joinpath(TRADE_V2_SCHEMA).read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def encode_avro_value(record: dict[str, Any]) -> bytes:
    """A TradeV2 record (from :func:`~k2stream.records.to_trade_v2`) as the sink
    writes it with ``format=avro``. Raises ValueError for a price or quantity
    that ``decimal(18, 8)`` cannot hold exactly."""
    return _avro_values().encode(record)


def decode_avro_value(value: bytes) -> dict[str, Any]:
    """Read a value the sink wrote with ``format=avro`` back into a TradeV2 dict.

    fastavro reads the logical types: prices and quantities come back as
    :class:`~decimal.Decimal` with 8 places, timestamps as aware UTC
    datetimes and ``message_id`` as a :class:`~uuid.UUID`. Raises ValueError
    for a value written with another schema.
    """
    return _avro_values().decode(value)


class _AvroValues:
    """TradeV2 in Avro single-object encoding: marker, fingerprint, body.

    Values are written with the schema's physical types (the decimals turned
    into their two's-complement bytes here) and read with its logical types.
    Logical types change neither the bytes on the wire nor the fingerprint,
    which is taken over the parsing canonical form; writing without them
    halves fastavro's time per record.
    """

    def __init__(self) -> None:
        try:
            import fastavro
        except ImportError as exc:
            raise SinkError(
                "format=avro needs fastavro, which is not installed; "
                "pip install fastavro (or k2stream[kafka]), or use format=json"
            ) from exc

        self._fastavro = fastavro
        schema = trade_v2_schema()
        self._reader_schema = fastavro.parse_schema(schema)
        self._writer_schema = fastavro.parse_schema(_physical(schema))
        canonical = fastavro.schema.to_parsing_canonical_form(self._reader_schema)
        fingerprint = fastavro.schema.fingerprint(canonical, "CRC-64-AVRO")
        self.header = AVRO_MARKER + bytes.fromhex(fingerprint)

    def encode(self, record: dict[str, Any]) -> bytes:
        record = {
            **record,
            "price": _decimal_bytes(record["price"], "price"),
            "quantity": _decimal_bytes(record["quantity"], "quantity"),
        }
        body = io.BytesIO()
        body.write(self.header)
        self._fastavro.schemaless_writer(body, self._writer_schema, record)
        return body.getvalue()

    def decode(self, value: bytes) -> dict[str, Any]:
        if not value.startswith(self.header):
            raise ValueError(
                "the value is not TradeV2 in Avro single-object encoding: its "
                f"first bytes are {value[:10].hex()}, expected {self.header.hex()}"
            )

        body = io.BytesIO(value[len(self.header) :])
        record = self._fastavro.schemaless_reader(body, self._reader_schema, None)
        if not isinstance(record, dict):
            raise ValueError("the Avro value is not a TradeV2 record")
        return record


@functools.cache
def _avro_values() -> _AvroValues:
    return _AvroValues()


_LOGICAL_KEYS: Final = frozenset({"logicalType", "precision", "scale"})

_AVRO_SCALE: Final = 8
_AVRO_QUANTUM: Final = Decimal(1).scaleb(-_AVRO_SCALE)
_AVRO_PRECISION: Final = 18


def _physical(node: Any) -> Any:
    """A copy of the schema ``node`` without its logical-type annotations."""
    if isinstance(node, list):
        return [_physical(item) for item in node]
    if not isinstance(node, dict):
        return node

    kept = {k: _physical(v) for k, v in node.items() if k not in _LOGICAL_KEYS}
    # {"type": "long"} is "long"; fastavro writes the short form faster.
    return kept["type"] if kept.keys() == {"type"} else kept


def _decimal_bytes(text: str, name: str) -> bytes:
    """``text`` as Avro ``decimal(18, 8)`` bytes: the big-endian two's complement
    of the value times 10**8. ValueError when it does not fit exactly."""
    try:
        value = Decimal(text)
        scaled = value.quantize(_AVRO_QUANTUM)
    except InvalidOperation as exc:
        raise ValueError(f"{name}={text!r} is not a decimal number") from exc

    if scaled != value:
        raise ValueError(f"{name}={text} has more than {_AVRO_SCALE} decimal places")
    if len(scaled.as_tuple().digits) > _AVRO_PRECISION:
        raise ValueError(f"{name}={text} has more than {_AVRO_PRECISION} digits")

    unscaled = int(scaled.scaleb(_AVRO_SCALE))
    return unscaled.to_bytes((unscaled.bit_length() + 8) // 8, "big", signed=True)
