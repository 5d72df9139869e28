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

_HEADERS: Final = [
    chr(_FIN_TEXT) + (chr(n) if n < 126 else "\x7e" + chr(n >> 8) + chr(n & 0xFF))
    for n in range(4096)
]
"""Frame headers by payload length, for every payload an event can have."""

_SIZE_TEXT: list[str] = []
"""Decimal text of every fill size code, built on first use (65536 strings)."""

_SIZE_LENGTH: Final = len("0.65536000")
"""Every fill quantity is below 1 (size codes stop at 65535), so its text has
this length."""

_PRICE_TEXT: dict[int, tuple[str, int]] = {}
"""Text around a price, with its length, by price: walking prices repeat."""


class Variant(NamedTuple):
    """How a connection wants its events: with the envelope, and in which unit."""

    combined: bool
    micro: bool


class FrameBatch(NamedTuple):
    """Frames of one tick for one stream and variant, one by one and joined."""

    frames: list[str]
    """Each frame (header and payload) as latin-1 text."""
    data: bytes
    """All frames, encoded, back to back: what a normal connection writes."""


def frame_text(payload: str) -> str:
    """One unmasked, unfragmented text frame carrying ASCII ``payload``."""
    return frame_header(len(payload)) + payload


def frame_header(size: int) -> str:
    """The header of an unmasked text frame with a ``size``-byte payload."""
    if size < 4096:
        return _HEADERS[size]
    if size < 65536:
        return "\x81\x7e" + chr(size >> 8) + chr(size & 0xFF)
    return "\x81\x7f" + size.to_bytes(8, "big").decode("latin-1")


def text_frame(payload: bytes) -> bytes:
    """One unmasked text frame as bytes, for rare events and control replies."""
    return frame_text(payload.decode("latin-1")).encode("latin-1")


def batch(frames: list[str]) -> FrameBatch:
    return FrameBatch(frames, "".join(frames).encode("latin-1"))


def prepare() -> None:
    """Build the quantity text table (about 50 ms) before the first tick needs it."""
    if not _SIZE_TEXT:
        _SIZE_TEXT.extend(format_units(fill_quantity(code)) for code in range(65536))


def stream_name(symbol: str, stream: str) -> str:
    """Binance's stream name: lower-case symbol, ``@``, stream type."""
    return f"{symbol.lower()}@{stream}"


def trade_frames(tape: Tape, agg_lo: int, agg_hi: int, variant: Variant) -> list[str]:
    """Frames of the trades of aggregates ``[agg_lo, agg_hi)`` of ``tape``.

    This is the hottest loop of the exchange, and Python pays for every
    operation, so the work is arranged to happen as rarely as possible:

    - the fills of one aggregate share price, times and side, so only the id
      and the quantity are formatted per fill;
    - the text around the price, and around the trade time and side, is
      cached with its length, since neighbouring aggregates share them;
    - a fill's quantity text always has the same length (it is below 1), so
      one frame header serves a whole aggregate unless the id gains a digit
      inside it.
    """
    prepare()
    symbol = tape.symbol
    divisor = 1 if variant.micro else 1000
    if variant.combined:
        head = f'{{"stream":"{symbol.lower()}@trade","data":{{"e":"trade","E":'
        tail = "}}"
    else:
        head = '{"e":"trade","E":'
        tail = "}"

    headers = _HEADERS
    size_text = _SIZE_TEXT
    price_texts = _PRICE_TEXT
    after_texts: dict[int, tuple[str, int]] = {}
    sizes = tape.trade_size
    first_id = tape.first_id
    ends = tape.agg_first[agg_lo + 1 : agg_hi + 1].tolist()
    if len(ends) < agg_hi - agg_lo:
        ends.append(len(sizes))

    frames: list[str] = []
    add = frames.append
    last_event = -1
    event_text = ""
    event_length = 0
    digit_limit = 0
    digits = 0
    for price, event_us, time_us, maker, first, end in zip(
        tape.agg_price[agg_lo:agg_hi],
        tape.agg_event[agg_lo:agg_hi],
        tape.agg_time[agg_lo:agg_hi],
        tape.agg_maker[agg_lo:agg_hi],
        tape.agg_first[agg_lo:agg_hi],
        ends,
        strict=True,
    ):
        event = event_us // divisor
        if event != last_event:
            last_event = event
            event_text = f'{head}{event},"s":"{symbol}","t":'
            event_length = len(event_text)
        price_text, price_length = price_texts.get(price) or _price_text(price)
        key = time_us // divisor * 2 + maker
        after_text, after_length = after_texts.get(key) or _after_text(
            after_texts, key, tail
        )
        if first_id + end > digit_limit:
            digits = len(str(first_id + first))
            digit_limit = 10**digits

        if first_id + end - 1 < digit_limit:
            size = event_length + digits + price_length + _SIZE_LENGTH + after_length
            before_id = headers[size] + event_text
            for index in range(first, end):
                add(
                    f"{before_id}{first_id + index}{price_text}"
                    f"{size_text[sizes[index]]}{after_text}"
                )
        else:
            # The id gains a digit inside this aggregate: size each frame.
            for index in range(first, end):
                add(
                    frame_text(
                        f"{event_text}{first_id + index}{price_text}"
                        f"{size_text[sizes[index]]}{after_text}"
                    )
                )
    return frames


def _price_text(price: int) -> tuple[str, int]:
    """The text from after the id to the quantity, for ``price``; cached."""
    if len(_PRICE_TEXT) > 100_000:
        _PRICE_TEXT.clear()
    text = f',"p":"{format_units(price)}","q":"'
    _PRICE_TEXT[price] = text, len(text)
    return text, len(text)


def _after_text(
    cache: dict[int, tuple[str, int]], key: int, tail: str
) -> tuple[str, int]:
    """The text after the quantity, for a trade time and side packed in ``key``."""
    side = "true" if key & 1 else "false"
    text = f'","T":{key >> 1},"m":{side},"M":true{tail}'
    cache[key] = text, len(text)
    return text, len(text)


def agg_trade_frames(
    tape: Tape, agg_lo: int, agg_hi: int, variant: Variant
) -> list[str]:
    """Frame parts of aggregate trades ``[agg_lo, agg_hi)`` of ``tape``."""
    symbol = tape.symbol
    divisor = 1 if variant.micro else 1000
    if variant.combined:
        head = f'{{"stream":"{symbol.lower()}@aggTrade","data":{{"e":"aggTrade","E":'
        tail = "}}"
    else:
        head = '{"e":"aggTrade","E":'
        tail = "}"

    frames: list[str] = []
    for index in range(agg_lo, agg_hi):
        price_whole, price_fraction = divmod(tape.agg_price[index], UNITS)
        qty_whole, qty_fraction = divmod(tape.agg_quantity(index), UNITS)
        first = tape.first_id + tape.agg_first[index]
        last = tape.first_id + tape.agg_end(index) - 1
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
