"""Stream events as ready-to-write WebSocket frames.

The hot path of the exchange is here. An event is encoded once per
*variant* (raw or combined envelope, milliseconds or microseconds) and the
complete frame - header and payload - is built once, then the same bytes go
to every connection that wants that variant. Servers do not mask frames
(RFC 6455 section 5.1), so an unmasked frame is the same for every client.

Frames are built as ``str`` whose characters are all below 256 and encoded
with latin-1 once per batch: the payload is ASCII (symbols are checked to be
ASCII), and the frame header bytes map one-to-one onto latin-1 characters.
One ``encode`` per batch is much cheaper than one per frame.
"""

from __future__ import annotations

import json
from typing import Final, NamedTuple

from k2stream.exchange.market import UNITS, Tape, fill_quantity, format_units


_FIN_TEXT: Final = 0x81
"""FIN bit plus the text opcode: every event is one unfragmented text frame."""

_SHORT_HEADERS: Final = [
    chr(_FIN_TEXT) + (chr(n) if n < 126 else "\x7e" + chr(n >> 8) + chr(n & 0xFF))
    for n in range(4096)
]
"""Frame headers by payload length, for every payload an event can have."""

_SIZE_TEXT: list[str] = []
"""Decimal text of every fill size code, built on first use (65536 strings)."""


class Variant(NamedTuple):
    """How a connection wants its events: with the envelope, and in which unit."""

    combined: bool
    micro: bool


class FrameBatch(NamedTuple):
    """Frames of one tick for one stream and variant, one by one and joined."""

    frames: list[str]
    """Each frame as latin-1 text; ``frame.encode("latin-1")`` is the wire form."""
    data: bytes
    """All frames, encoded, back to back: what a normal connection writes."""


def frame_text(payload: str) -> str:
    """One unmasked, unfragmented text frame carrying ASCII ``payload``."""
    size = len(payload)
    if size < 4096:
        return _SHORT_HEADERS[size] + payload
    if size < 65536:
        return "\x81\x7e" + chr(size >> 8) + chr(size & 0xFF) + payload
    return "\x81\x7f" + size.to_bytes(8, "big").decode("latin-1") + payload


def text_frame(payload: bytes) -> bytes:
    """One unmasked text frame as bytes, for rare events and control replies."""
    return frame_text(payload.decode("latin-1")).encode("latin-1")


def batch(frames: list[str]) -> FrameBatch:
    return FrameBatch(frames, "".join(frames).encode("latin-1"))


def stream_name(symbol: str, stream: str) -> str:
    """Binance's stream name: lower-case symbol, ``@``, stream type."""
    return f"{symbol.lower()}@{stream}"


def trade_frames(tape: Tape, lo: int, hi: int, variant: Variant) -> list[str]:
    """Frames of trades ``[lo, hi)`` of ``tape`` (indexes, not ids)."""
    if not _SIZE_TEXT:
        _SIZE_TEXT.extend(format_units(fill_quantity(code)) for code in range(65536))

    symbol = tape.symbol
    first_id = tape.first_id
    sizes = tape.trade_size
    aggs = tape.trade_agg
    divisor = 1 if variant.micro else 1000
    if variant.combined:
        head = f'{{"stream":"{symbol.lower()}@trade","data":{{"e":"trade","E":'
        tail = "}}"
    else:
        head = '{"e":"trade","E":'
        tail = "}"

    headers = _SHORT_HEADERS
    size_text = _SIZE_TEXT
    frames = []
    last_agg = -1
    agg_head = ""
    agg_price = ""
    agg_tail = ""
    for index in range(lo, hi):
        agg = aggs[index]
        if agg != last_agg:
            # Fills of one aggregate share price, times and side: format once.
            last_agg = agg
            whole, fraction = divmod(tape.agg_price[agg], UNITS)
            maker = "true" if tape.agg_maker[agg] else "false"
            agg_head = f'{head}{tape.agg_event[agg] // divisor},"s":"{symbol}","t":'
            agg_price = f',"p":"{whole}.{fraction:08d}","q":"'
            agg_tail = (
                f'","T":{tape.agg_time[agg] // divisor},"m":{maker},"M":true{tail}'
            )
        payload = (
            f"{agg_head}{first_id + index}{agg_price}"
            f"{size_text[sizes[index]]}{agg_tail}"
        )
        frames.append(headers[len(payload)] + payload)
    return frames


def agg_trade_frames(tape: Tape, lo: int, hi: int, variant: Variant) -> list[str]:
    """Frames of aggregate trades ``[lo, hi)`` of ``tape`` (indexes, not ids)."""
    symbol = tape.symbol
    divisor = 1 if variant.micro else 1000
    if variant.combined:
        head = f'{{"stream":"{symbol.lower()}@aggTrade","data":{{"e":"aggTrade","E":'
        tail = "}}"
    else:
        head = '{"e":"aggTrade","E":'
        tail = "}"

    frames = []
    for index in range(lo, hi):
        price_whole, price_fraction = divmod(tape.agg_price[index], UNITS)
        qty_whole, qty_fraction = divmod(tape.agg_qty[index], UNITS)
        first = tape.first_id + tape.agg_first[index]
        last = tape.first_id + tape.agg_last_index(index)
        maker = "true" if tape.agg_maker[index] else "false"
        payload = (
            f'{head}{tape.agg_event[index] // divisor},"s":"{symbol}",'
            f'"a":{tape.first_agg_id + index},'
            f'"p":"{price_whole}.{price_fraction:08d}",'
            f'"q":"{qty_whole}.{qty_fraction:08d}","f":{first},"l":{last},'
            f'"T":{tape.agg_time[index] // divisor},"m":{maker},"M":true{tail}'
        )
        frames.append(frame_text(payload))
    return frames


def server_shutdown_frame(time_us: int, variant: Variant) -> bytes:
    """The ``serverShutdown`` event, raw or in its ``!serverShutdown`` envelope."""
    event = {"e": "serverShutdown", "E": time_us if variant.micro else time_us // 1000}
    if variant.combined:
        wrapped = {"stream": "!serverShutdown", "data": event}
        return text_frame(json.dumps(wrapped, separators=(",", ":")).encode())
    return text_frame(json.dumps(event, separators=(",", ":")).encode())


def garbage_frames(symbol: str, variant: Variant) -> list[bytes]:
    """Malformed events of the kinds seen in the wild: bad JSON, bad types, cut short.

    They stay valid UTF-8 text frames, so a client sees a bad *message*, not a
    broken WebSocket.
    """
    name = stream_name(symbol, "trade")
    bad_types = (
        '{"e":"trade","E":"soon","s":7,"t":"x1","p":50000.1,'
        '"q":null,"T":[],"m":"no","M":1}'
    )
    cut_short = '{"e":"trade","E":1700000000000,"s":"' + symbol + '","t":12'
    if variant.combined:
        bad_types = f'{{"stream":"{name}","data":{bad_types}}}'
        cut_short = f'{{"stream":"{name}","data":{cut_short}'
    return [
        text_frame(b"{not json at all"),
        text_frame(bad_types.encode()),
        text_frame(cut_short.encode()),
    ]
