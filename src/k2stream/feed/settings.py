"""The feed's tunables, every duration in seconds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FeedSettings:
    """How the supervisor connects, waits, watches and rotates.

    Defaults follow Binance's rules (binance-spot-api-docs,
    web-socket-streams.md): connections live at most 24 h, the server pings
    every 20 s and drops clients that send more than 5 messages a second.
    """

    reconnect_delay: float = 5.0
    max_reconnect_delay: float = 60.0
    reconnect_jitter: float = 0.2
    max_reconnect_attempts: int = 10
    """Consecutive failed attempts before giving up; 0 never gives up."""
    stable_after: float = 30.0
    open_timeout: float = 10.0
    health_check_interval: float = 30.0
    health_check_timeout: float = 60.0
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 10.0
    watchdog_interval: float = 0.25
    min_silence: float = 2.0
    recovery_timeout: float = 30.0
    failure_threshold: int = 3
    failback_interval: float = 60.0
    rotate_after: float = 84_600.0
    """23 h 30 min: replaced well before Binance's 24 h cut."""
    rotate_jitter: float = 0.02
    switch_timeout: float = 10.0
    """How long a replacement connection may take to carry every stream."""
    overlap: float = 0.5
    """How long old and new connections both read after a switch."""
    connection_attempts: int = 300
    connection_window: float = 300.0
