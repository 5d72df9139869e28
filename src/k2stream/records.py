"""The records that travel from the feed to the sinks.

A :class:`Trade` is what k2stream knows about one trade (or one aggregate
trade): small, immutable and cheap to create on the hot path. The K2 TradeV2
shape that downstream consumers read is produced from it by
:func:`to_trade_v2` at the edge of a sink, so the hot path never builds
dictionaries it may not need.
"""

from __future__ import annotations

import hashlib
import uuid
from typing import Any, Final, NamedTuple

import msgspec


BINANCE: Final = "BINANCE"
BINANCE_US: Final = "BINANCE_US"
VENUES: Final = (BINANCE, BINANCE_US)

TRADE: Final = "trade"
AGG_TRADE: Final = "aggTrade"
STREAMS: Final = (TRADE, AGG_TRADE)

SOURCE_WS: Final = "ws"
SOURCE_REST: Final = "rest"

_MESSAGE_ID_NAMESPACE: Final = uuid.UUID("6f1d3c2a-5b0e-4e8f-9a47-2d1f0c9b7e31")
"""Fixed namespace for message ids, so that a replay of a trade carries the same id."""
_NAMESPACE_BYTES: Final = _MESSAGE_ID_NAMESPACE.bytes


class StreamKey(NamedTuple):
    """One id sequence: ids are consecutive within a venue, symbol and stream."""

    exchange: str
    symbol: str
    stream: str

    def __str__(self) -> str:
        return f"{self.exchange}:{self.symbol}@{self.stream}"


class Trade(msgspec.Struct, frozen=True, gc=False):
    """One trade (``stream == "trade"``) or aggregate trade (``"aggTrade"``).

    Prices and quantities are the exchange's decimal strings, untouched: they
    are exact, and parsing them into ``Decimal`` on the hot path would halve
    the throughput for nothing. Times are microseconds since the epoch, UTC.
    """

    exchange: str
    symbol: str
    stream: str
    id: int
    """The exchange's id: ``t`` for trades, ``a`` for aggregate trades."""
    price: str
    quantity: str
    trade_time_us: int
    event_time_us: int
    buyer_is_maker: bool
    best_match: bool
    base_asset: str
    quote_asset: str
    source: str
    """``ws`` when it came from the stream, ``rest`` when it was backfilled."""
    endpoint: str
    """Host (and port) it came from."""
    received_us: int
    first_trade_id: int | None = None
    """For aggregate trades: the first trade id the aggregate covers."""
    last_trade_id: int | None = None

    @property
    def key(self) -> StreamKey:
        return StreamKey(self.exchange, self.symbol, self.stream)


def trade_id(trade: Trade) -> str:
    """The TradeV2 ``trade_id``: ``BINANCE-123`` for a trade, ``BINANCE-A123`` for an aggTrade."""
    if trade.stream == AGG_TRADE:
        return f"{trade.exchange}-A{trade.id}"
    return f"{trade.exchange}-{trade.id}"


def message_id(exchange: str, symbol: str, stream: str, id_: int) -> str:
    """A UUID derived from what identifies the trade, identical on every replay.

    It is ``uuid.uuid5(namespace, "exchange:symbol:stream:id")`` (RFC 4122,
    name-based, SHA-1), computed without building a ``UUID`` object, which
    costs several times the hash on the sinks' hot path.
    """
    name = f"{exchange}:{symbol}:{stream}:{id_}".encode()
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + name).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def to_trade_v2(trade: Trade) -> dict[str, Any]:
    """The K2 TradeV2 record for ``trade``, plus k2stream's ``source`` and ``endpoint``.

    ``side`` is the taker's side: Binance's ``m`` says whether the buyer was
    the maker, so ``m=false`` means the buyer took liquidity (``BUY``).
    ``platform_sequence`` is assigned downstream by the K2 platform and is
    null here.
    """
    vendor_data = {
        "event_type": trade.stream,
        "event_time": str(trade.event_time_us),
        "base_asset": trade.base_asset,
        "quote_asset": trade.quote_asset,
        "is_best_match": "true" if trade.best_match else "false",
        "is_buyer_maker": "true" if trade.buyer_is_maker else "false",
    }
    if trade.first_trade_id is not None:
        vendor_data["first_trade_id"] = str(trade.first_trade_id)
        vendor_data["last_trade_id"] = str(trade.last_trade_id)

    return {
        "message_id": message_id(trade.exchange, trade.symbol, trade.stream, trade.id),
        "trade_id": trade_id(trade),
        "symbol": trade.symbol,
        "exchange": trade.exchange,
        "asset_class": "crypto",
        "timestamp": trade.trade_time_us,
        "price": trade.price,
        "quantity": trade.quantity,
        "currency": trade.quote_asset,
        "side": "SELL" if trade.buyer_is_maker else "BUY",
        "trade_conditions": [],
        "source_sequence": trade.id,
        "ingestion_timestamp": trade.received_us,
        "platform_sequence": None,
        "vendor_data": vendor_data,
        "source": trade.source,
        "endpoint": trade.endpoint,
    }
