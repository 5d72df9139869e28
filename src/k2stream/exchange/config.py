"""Everything that shapes one bundled exchange, with Binance's values as defaults."""

from __future__ import annotations

from dataclasses import dataclass

from k2stream.exchange.market import SymbolSpec


@dataclass(frozen=True, slots=True)
class ExchangeConfig:
    """How the bundled exchange behaves. All durations are float seconds.

    Defaults are Binance's documented values (binance-spot-api-docs,
    web-socket-streams.md and rest-api.md); tests shorten the timings.
    """

    symbols: tuple[SymbolSpec, ...] = (
        SymbolSpec("BTCUSDT", base="BTC", quote="USDT", rate=10.0, price="50000.00"),
    )
    seed: int = 0
    host: str = "127.0.0.1"
    ws_ports: tuple[int, ...] = (0,)
    """One WebSocket listener ("endpoint") per entry; 0 picks a free port."""
    rest_port: int = 0
    control_port: int = 0

    ping_interval: float = 20.0
    """Server ping period (Binance: 20 s)."""
    pong_timeout: float = 60.0
    """Close when a ping stays unanswered this long (Binance: 1 minute)."""
    max_incoming_per_second: int = 5
    """Client pings, pongs and text frames allowed in any 1 s window (Binance: 5)."""
    max_streams: int = 1024
    """Streams per connection (Binance: 1024)."""
    lifetime: float = 86400.0
    """Connections are closed this long after they open (Binance: 24 h)."""
    handshake_limit: int | None = 300
    """Handshake attempts per endpoint within ``handshake_window`` before 429
    (Binance: 300 attempts per 5 minutes per IP); None turns the limit off."""
    handshake_window: float = 300.0
    close_timeout: float = 2.0
    """How long a closing handshake may take before the socket is dropped."""
    max_send_buffer: int = 16 * 1024 * 1024
    """Bytes a connection may have unsent before it is disconnected as too slow."""
    max_control_frame: int = 4096
    """Larger SUBSCRIBE-style text frames get no reply, as Binance does."""

    tick: float = 0.01
    """Market generation step."""

    weight_limit: int = 6000
    """REST request weight per minute (Binance: 6000)."""
    ban_after: int = 3
    """Requests refused with 429 in one minute before the IP is banned (418)."""
    ban_seconds: float = 120.0
    """Length of a 418 ban (Binance: from 2 minutes, growing to 3 days)."""
    history_limit: int | None = None
    """REST keeps only the newest N ids per symbol and stream; None keeps all."""

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ValueError("symbols is empty; list at least one SymbolSpec")
        if not self.ws_ports:
            raise ValueError("ws_ports is empty; give at least one port (0 = any)")
        if self.ping_interval <= 0 or self.pong_timeout <= 0 or self.lifetime <= 0:
            raise ValueError("ping_interval, pong_timeout and lifetime must be > 0")
        if self.max_incoming_per_second < 1 or self.max_streams < 1:
            raise ValueError("max_incoming_per_second and max_streams must be >= 1")
        if self.handshake_limit is not None and self.handshake_limit < 1:
            raise ValueError("handshake_limit must be >= 1, or None for no limit")
        if self.history_limit is not None and self.history_limit < 1:
            raise ValueError("history_limit must be >= 1, or None to keep all")
