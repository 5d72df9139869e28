"""Binance stream names, endpoint URLs and venues.

Facts from binance-spot-api-docs, web-socket-streams.md: stream names are
lowercase ``<symbol>@<stream>``; the combined form ``/stream?streams=a/b``
wraps every event in ``{"stream", "data"}``; ``timeUnit=MICROSECOND`` turns
event and trade times into microseconds; a connection carries at most 1024
streams, and a SUBSCRIBE frame over about 4 KiB is silently ignored.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Final
from urllib.parse import urlsplit

from k2stream.records import BINANCE, BINANCE_US, VENUES


MAX_STREAMS_PER_CONNECTION: Final = 1024
"""Binance's limit of streams on one connection."""

MAX_URL_STREAMS_LENGTH: Final = 3_000
"""Longest stream list we put in a URL; longer lists are subscribed by frames."""

MAX_SUBSCRIBE_NAMES: Final = 150
"""Names per SUBSCRIBE frame, keeping each frame well under 4 KiB."""

DEFAULT_ENDPOINTS: Final = (
    "wss://stream.binance.com:9443",
    "wss://stream.binance.com:443",
    "wss://data-stream.binance.vision",
    "wss://stream.binance.us:9443",
)

DEFAULT_REST_URLS: Final = {
    BINANCE: "https://api.binance.com",
    BINANCE_US: "https://api.binance.us",
}


def stream_name(symbol: str, stream: str) -> str:
    """``btcusdt@trade`` for (``BTCUSDT``, ``trade``)."""
    return f"{symbol.lower()}@{stream}"


def parse_stream_name(name: str) -> tuple[str, str]:
    """(``BTCUSDT``, ``trade``) for ``btcusdt@trade``."""
    symbol, _, stream = name.partition("@")
    return symbol.upper(), stream


def combined_url(endpoint: str, names: Sequence[str]) -> str:
    """The combined-stream URL for ``names`` on ``endpoint``, times in microseconds.

    When the list is too long for a URL, the URL carries no stream and the
    caller subscribes with :func:`subscribe_frames` after connecting.
    """
    base = endpoint.split("#", 1)[0].rstrip("/")
    joined = "/".join(names)
    if not names or len(joined) > MAX_URL_STREAMS_LENGTH:
        return f"{base}/stream?timeUnit=MICROSECOND"
    return f"{base}/stream?streams={joined}&timeUnit=MICROSECOND"


def url_carries_streams(url: str) -> bool:
    """Whether ``combined_url`` put the stream names in the URL itself."""
    return "streams=" in url


def subscribe_frames(
    names: Sequence[str], first_id: int
) -> Iterator[dict[str, object]]:
    """SUBSCRIBE requests for ``names``, split so that no frame is ignored for size."""
    for offset in range(0, len(names), MAX_SUBSCRIBE_NAMES):
        chunk = list(names[offset : offset + MAX_SUBSCRIBE_NAMES])
        yield {"method": "SUBSCRIBE", "params": chunk, "id": first_id + offset}


def split_streams(names: Sequence[str], per_connection: int) -> list[list[str]]:
    """Stream names split into groups that each fit on one connection."""
    size = min(per_connection, MAX_STREAMS_PER_CONNECTION)
    return [list(names[i : i + size]) for i in range(0, len(names), size)]


def venue_of(endpoint: str) -> str:
    """The venue an endpoint belongs to.

    Binance.US is a separate exchange with its own ids. Its hosts end in
    ``binance.us``; a test endpoint can say so with a ``#venue=BINANCE_US``
    fragment, which is never sent on the wire.
    """
    parts = urlsplit(endpoint)
    if parts.fragment.startswith("venue="):
        venue = parts.fragment.removeprefix("venue=")
        if venue not in VENUES:
            raise ValueError(
                f"endpoint {endpoint!r}: unknown venue {venue!r}; use one of {', '.join(VENUES)}"
            )
        return venue
    host = parts.hostname or ""
    return (
        BINANCE_US if host == "binance.us" or host.endswith(".binance.us") else BINANCE
    )


def endpoint_label(endpoint: str) -> str:
    """``host:port`` of an endpoint: the bounded value of the ``endpoint`` label."""
    parts = urlsplit(endpoint)
    port = parts.port or (443 if parts.scheme == "wss" else 80)
    return f"{parts.hostname}:{port}"


def names_for(symbols: Iterable[str], streams: Iterable[str]) -> list[str]:
    """Every stream name for every symbol, symbol-major."""
    stream_list = list(streams)
    return [stream_name(symbol, stream) for symbol in symbols for stream in stream_list]
