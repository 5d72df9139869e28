"""Binance stream payloads as typed structs, decoded and validated in one step.

Field names are Binance's one-letter keys mapped to readable names. Prices
and quantities stay strings: they are exact decimals and the sinks store them
as sent. See binance-spot-api-docs, web-socket-streams.md, "Trade Streams",
"Aggregate Trade Streams" and "Server Shutdown".
"""

from __future__ import annotations

from typing import Any

import msgspec


class TradeEvent(msgspec.Struct, tag_field="e", tag="trade", frozen=True, gc=False):
    """One fill, ``<symbol>@trade``."""

    event_time: int = msgspec.field(name="E")
    symbol: str = msgspec.field(name="s")
    id: int = msgspec.field(name="t")
    price: str = msgspec.field(name="p")
    quantity: str = msgspec.field(name="q")
    trade_time: int = msgspec.field(name="T")
    buyer_is_maker: bool = msgspec.field(name="m")
    best_match: bool = msgspec.field(name="M", default=True)


class AggTradeEvent(
    msgspec.Struct, tag_field="e", tag="aggTrade", frozen=True, gc=False
):
    """The fills of one taker order at one price, ``<symbol>@aggTrade``."""

    event_time: int = msgspec.field(name="E")
    symbol: str = msgspec.field(name="s")
    id: int = msgspec.field(name="a")
    price: str = msgspec.field(name="p")
    quantity: str = msgspec.field(name="q")
    first_trade_id: int = msgspec.field(name="f")
    last_trade_id: int = msgspec.field(name="l")
    trade_time: int = msgspec.field(name="T")
    buyer_is_maker: bool = msgspec.field(name="m")
    best_match: bool = msgspec.field(name="M", default=True)


class ServerShutdown(msgspec.Struct, tag_field="e", tag="serverShutdown", frozen=True):
    """The server is about to close this connection: reconnect now."""

    event_time: int = msgspec.field(name="E")


Event = TradeEvent | AggTradeEvent | ServerShutdown


class Envelope(msgspec.Struct, frozen=True, gc=False):
    """The combined-stream wrapper ``{"stream": name, "data": event}``."""

    stream: str
    data: Event


class ErrorBody(msgspec.Struct, frozen=True):
    code: int
    msg: str


class Reply(msgspec.Struct, frozen=True):
    """The answer to a control request (SUBSCRIBE, LIST_SUBSCRIPTIONS, ...)."""

    id: int | str | None
    result: Any = None
    error: ErrorBody | None = None


class RestTrade(msgspec.Struct, frozen=True, gc=False):
    """An item of /api/v3/trades and /api/v3/historicalTrades."""

    id: int
    price: str
    qty: str
    time: int
    isBuyerMaker: bool
    isBestMatch: bool = True
    quoteQty: str = ""


class RestAggTrade(msgspec.Struct, frozen=True, gc=False):
    """An item of /api/v3/aggTrades."""

    id: int = msgspec.field(name="a")
    price: str = msgspec.field(name="p")
    quantity: str = msgspec.field(name="q")
    first_trade_id: int = msgspec.field(name="f")
    last_trade_id: int = msgspec.field(name="l")
    trade_time: int = msgspec.field(name="T")
    buyer_is_maker: bool = msgspec.field(name="m")
    best_match: bool = msgspec.field(name="M", default=True)


class MalformedFrame(ValueError):
    """A frame that is neither a stream event nor a control reply."""

    def __init__(self, frame: bytes, reason: str) -> None:
        self.frame = frame
        self.reason = reason
        super().__init__(f"malformed frame ({reason}): {sample(frame)}")


def sample(frame: bytes, limit: int = 160) -> str:
    """A printable, truncated copy of ``frame`` for a log line."""
    text = frame[:limit].decode("utf-8", errors="replace")
    return text + ("..." if len(frame) > limit else "")


_envelope = msgspec.json.Decoder(Envelope)
_reply = msgspec.json.Decoder(Reply)


def decoder() -> msgspec.json.Decoder[Envelope]:
    """The decoder of stream events alone, for the hot path that tries it first."""
    return _envelope


def decode(frame: bytes) -> Envelope | Reply:
    """Decode one frame of a combined stream.

    Stream events are tried first because they are nearly every frame; a
    frame that is not an event is tried as a control reply, and one that is
    neither raises :class:`MalformedFrame`.
    """
    try:
        return _envelope.decode(frame)
    except (msgspec.ValidationError, msgspec.DecodeError) as event_error:
        try:
            return _reply.decode(frame)
        except (msgspec.ValidationError, msgspec.DecodeError):
            raise MalformedFrame(frame, str(event_error)) from None
