"""Every metric k2stream exports, defined in one place.

Names follow the K2 conventions: the four series operators already query
(``k2_binance_connection_status``, ``k2_binance_messages_received_total``,
``k2_binance_reconnects_total``, ``k2_binance_errors_total``) keep their names
exactly; everything else lives under ``k2_binance_`` (the feed) or
``k2_sink_`` (delivery), in base units, counters ending in ``_total``.

Labels are bounded: ``endpoint`` is a configured host:port, ``symbol`` a
configured symbol, ``stream`` one of trade/aggTrade, and every ``reason`` or
``kind`` comes from a short fixed list written next to the metric. Never an
id, a price, a URL path with parameters or an error message.

Each :class:`Metrics` owns its own registry, so tests can run several
services in one process; the service serves exactly one.
"""

from __future__ import annotations

import platform
from typing import Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)

from k2stream import __version__


BREAKER_STATES: Final = ("closed", "open", "half_open")

ERROR_KINDS: Final = (
    "connect",  # handshake or TCP/TLS failure
    "connection_lost",  # an open connection died (1006, reset, close frame)
    "malformed_frame",  # a frame that is not a valid Binance message
    "protocol",  # an error reply from the server to a control request
    "rate_limited",  # HTTP 429 on the handshake or REST
    "banned",  # HTTP 418: the IP is banned until Retry-After
    "rest",  # any other REST failure
    "stale",  # a connection declared stale and replaced
    "sink",  # a sink write failed (retried)
    "gap_unhealable",  # a gap REST could not fill
)

RECONNECT_REASONS: Final = (
    "connection_lost",
    "connect_failed",
    "stale",
    "heartbeat_timeout",
    "server_shutdown",
    "rotation",
    "failback",
    "rate_limited",
    "banned",
)

LAG_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
LATENCY_BUCKETS: Final = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class Metrics:
    """The registry and every series on it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

        self.build_info = Info(
            "k2_binance_build",
            "Version of k2stream and of the Python running it.",
            registry=r,
        )
        self.build_info.info(
            {"version": __version__, "python": platform.python_version()}
        )

        # The four series K2 operators already query: names and meaning fixed.
        self.connection_status = Gauge(
            "k2_binance_connection_status",
            "1 while a connection to Binance is open and subscribed, 0 otherwise.",
            registry=r,
        )
        self.messages_received = Counter(
            "k2_binance_messages_received_total",
            "Market data messages received over WebSocket.",
            ["symbol", "stream"],
            registry=r,
        )
        self.reconnects = Counter(
            "k2_binance_reconnects_total",
            "Connections replaced or re-established, by reason.",
            ["endpoint", "reason"],  # reason: RECONNECT_REASONS
            registry=r,
        )
        self.errors = Counter(
            "k2_binance_errors_total",
            "Errors seen by the feed, by kind.",
            ["kind"],  # kind: ERROR_KINDS
            registry=r,
        )

        # Endpoints, breakers, failover.
        self.endpoint_active = Gauge(
            "k2_binance_endpoint_active",
            "1 for each endpoint that currently carries a live connection.",
            ["endpoint"],
            registry=r,
        )
        self.failover_active = Gauge(
            "k2_binance_failover_active",
            "1 while no live connection is on the primary endpoint.",
            registry=r,
        )
        self.binanceus_active = Gauge(
            "k2_binance_binanceus_active",
            "1 while data is captured from Binance.US, a separate venue.",
            registry=r,
        )
        self.breaker_state = Gauge(
            "k2_binance_breaker_state",
            "Circuit breaker state per endpoint: 1 for the current state, 0 for the others.",
            ["endpoint", "state"],  # state: BREAKER_STATES
            registry=r,
        )
        self.breaker_transitions = Counter(
            "k2_binance_breaker_transitions_total",
            "Circuit breaker transitions per endpoint, by the state entered.",
            ["endpoint", "state"],
            registry=r,
        )
        self.connection_attempts = Counter(
            "k2_binance_connection_attempts_total",
            "Connection attempts per endpoint, by outcome (success or failure).",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.reconnect_delay = Gauge(
            "k2_binance_reconnect_delay_seconds",
            "Delay before the next scheduled connection attempt; 0 when connected.",
            registry=r,
        )

        # Connection health.
        self.connection_age = Gauge(
            "k2_binance_connection_age_seconds",
            "Age of the oldest live connection; 0 when there is none.",
            registry=r,
        )
        self.rotations = Counter(
            "k2_binance_rotations_total",
            "Make-before-break replacements of a live connection, by reason.",
            ["reason"],  # lifetime, server_shutdown, failback
            registry=r,
        )
        self.heartbeat_rtt = Histogram(
            "k2_binance_heartbeat_rtt_seconds",
            "Round trip of the client's heartbeat ping.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stale_detections = Counter(
            "k2_binance_stale_detections_total",
            "Connections or symbols found silent, by what noticed it.",
            ["reason"],  # heartbeat, data_timeout, rate_drop, symbol
            registry=r,
        )
        self.last_message = Gauge(
            "k2_binance_last_message_timestamp_seconds",
            "Wall time at which the last market data message for a symbol arrived.",
            ["symbol", "stream"],
            registry=r,
        )
        self.event_lag = Histogram(
            "k2_binance_event_lag_seconds",
            "Time from the exchange's event time to local receipt.",
            ["stream"],
            buckets=LAG_BUCKETS,
            registry=r,
        )
        self.subscribed_streams = Gauge(
            "k2_binance_subscribed_streams",
            "Streams subscribed on live connections.",
            registry=r,
        )
        self.duplicates = Counter(
            "k2_binance_duplicates_total",
            "Trades received again (overlap or redundancy) and dropped before the sink.",
            ["symbol", "stream"],
            registry=r,
        )

        # Gaps and backfill.
        self.gaps_detected = Counter(
            "k2_binance_gaps_detected_total",
            "Holes found in an id sequence.",
            ["symbol", "stream"],
            registry=r,
        )
        self.gaps_healed = Counter(
            "k2_binance_gaps_healed_total",
            "Holes filled, from REST or by a late arrival.",
            ["symbol", "stream"],
            registry=r,
        )
        self.gaps_unhealable = Counter(
            "k2_binance_gaps_unhealable_total",
            "Holes REST could not fill (history gone, banned, max_backfill exceeded).",
            ["symbol", "stream"],
            registry=r,
        )
        self.gaps_open = Gauge(
            "k2_binance_gaps_open",
            "Holes currently waiting to be healed.",
            ["symbol", "stream"],
            registry=r,
        )
        self.gap_trades_missing = Gauge(
            "k2_binance_gap_trades_missing",
            "Ids currently missing in open holes.",
            ["symbol", "stream"],
            registry=r,
        )
        self.backfilled = Counter(
            "k2_binance_backfilled_trades_total",
            "Trades fetched from REST to heal holes.",
            ["symbol", "stream"],
            registry=r,
        )

        # REST and rate limits.
        self.rest_requests = Counter(
            "k2_binance_rest_requests_total",
            "REST requests by API path and HTTP status class.",
            [
                "path",
                "status",
            ],  # path: /api/v3/...; status: 2xx, 4xx, 429, 418, 5xx, error
            registry=r,
        )
        self.rest_weight_used = Gauge(
            "k2_binance_rest_weight_used",
            "Request weight used in the current minute, as reported by X-MBX-USED-WEIGHT-1M.",
            registry=r,
        )
        self.rest_weight_limit = Gauge(
            "k2_binance_rest_weight_limit",
            "Request weight k2stream allows itself per minute (Binance's limit less a margin).",
            registry=r,
        )
        self.rate_limited = Counter(
            "k2_binance_rate_limited_total",
            "HTTP 429 answers, on the WebSocket handshake or REST.",
            ["kind"],  # ws, rest
            registry=r,
        )
        self.bans = Counter(
            "k2_binance_bans_total",
            "HTTP 418 answers: the IP is banned until Retry-After.",
            ["kind"],  # ws, rest
            registry=r,
        )
        self.banned_until = Gauge(
            "k2_binance_banned_until_timestamp_seconds",
            "Wall time at which the current ban ends; 0 when not banned.",
            registry=r,
        )

        # Delivery.
        self.sink_writes = Counter(
            "k2_sink_writes_total",
            "Batches written durably.",
            ["sink"],
            registry=r,
        )
        self.sink_trades = Counter(
            "k2_sink_trades_written_total",
            "Trades in batches written durably (duplicates ignored by the store included).",
            ["sink"],
            registry=r,
        )
        self.sink_latency = Histogram(
            "k2_sink_write_latency_seconds",
            "Time to write and commit one batch.",
            ["sink"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.sink_backlog = Gauge(
            "k2_sink_backlog_trades",
            "Trades accepted from the feed and not yet durable.",
            ["sink"],
            registry=r,
        )
        self.sink_errors = Counter(
            "k2_sink_errors_total",
            "Failed sink writes, by reason (busy, unavailable, error).",
            ["sink", "reason"],
            registry=r,
        )
        self.sink_dropped = Counter(
            "k2_sink_dropped_trades_total",
            "Trades refused because the backlog was full; each becomes a gap healed later.",
            ["sink"],
            registry=r,
        )
        self.sink_available = Gauge(
            "k2_sink_available",
            "1 while the last write succeeded, 0 while writes fail.",
            ["sink"],
            registry=r,
        )

    def set_breaker_state(self, endpoint: str, state: str) -> None:
        """Export ``state`` as the only current breaker state of ``endpoint``."""
        for name in BREAKER_STATES:
            self.breaker_state.labels(endpoint, name).set(1 if name == state else 0)
