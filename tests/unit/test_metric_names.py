"""The metric names k2stream exports, pinned.

Alert rules, the Grafana dashboard and the operators' own queries name these
series. A rename must fail here first, so that it is made in all of them at once.
"""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from prometheus_client import generate_latest

from k2stream.observe.metrics import (
    BREAKER_STATES,
    ERROR_KINDS,
    RECONNECT_REASONS,
    Metrics,
)


EXPORTED: dict[str, str] = {
    "k2_binance_backfilled_trades_total": "counter",
    "k2_binance_banned_until_timestamp_seconds": "gauge",
    "k2_binance_bans_total": "counter",
    "k2_binance_breaker_state": "gauge",
    "k2_binance_breaker_transitions_total": "counter",
    "k2_binance_build_info": "info",
    "k2_binance_connection_age_seconds": "gauge",
    "k2_binance_connection_attempts_total": "counter",
    "k2_binance_connection_status": "gauge",
    "k2_binance_duplicates_total": "counter",
    "k2_binance_endpoint_active": "gauge",
    "k2_binance_errors_total": "counter",
    "k2_binance_event_lag_seconds": "histogram",
    "k2_binance_failover_active": "gauge",
    "k2_binance_gap_trades_missing": "gauge",
    "k2_binance_gaps_detected_total": "counter",
    "k2_binance_gaps_healed_total": "counter",
    "k2_binance_gaps_open": "gauge",
    "k2_binance_gaps_unhealable_total": "counter",
    "k2_binance_heartbeat_rtt_seconds": "histogram",
    "k2_binance_last_message_timestamp_seconds": "gauge",
    "k2_binance_messages_received_total": "counter",
    "k2_binance_rate_limited_total": "counter",
    "k2_binance_reconnect_delay_seconds": "gauge",
    "k2_binance_reconnects_total": "counter",
    "k2_binance_rest_requests_total": "counter",
    "k2_binance_rest_weight_limit": "gauge",
    "k2_binance_rest_weight_used": "gauge",
    "k2_binance_rotations_total": "counter",
    "k2_binance_stale_detections_total": "counter",
    "k2_binance_subscribed_streams": "gauge",
    "k2_binance_binanceus_active": "gauge",
    "k2_sink_available": "gauge",
    "k2_sink_backlog_trades": "gauge",
    "k2_sink_dropped_trades_total": "counter",
    "k2_sink_errors_total": "counter",
    "k2_sink_trades_written_total": "counter",
    "k2_sink_write_latency_seconds": "histogram",
    "k2_sink_writes_total": "counter",
}
"""Every k2_* family as operators query it (counters with _total), and its type."""

OPERATOR_NAMES: dict[str, str] = {
    "k2_binance_connection_status": "gauge",
    "k2_binance_messages_received_total": "counter",
    "k2_binance_reconnects_total": "counter",
    "k2_binance_errors_total": "counter",
}
"""The four series K2 operators queried before k2stream existed."""

PROMTOOL_FALSE_POSITIVES: frozenset[str] = frozenset()
"""Findings of promtool check metrics that are known to be wrong."""

# The text format names counters with _total and Info with _info.
_EXPOSED_SUFFIX = {"counter": "_total", "info": "_info"}

ENDPOINT = "stream.binance.com:9443"


def exported_families(metrics: Metrics) -> dict[str, str]:
    """The k2_* families of ``metrics``, by exposed name, with their type."""
    return {
        family.name + _EXPOSED_SUFFIX.get(family.type, ""): family.type
        for family in metrics.registry.collect()
        if family.name.startswith("k2_")
    }


def populated_metrics() -> Metrics:
    """A registry in which every labelled series has a sample.

    Labelled series only appear once a label set is used, so without this the
    exposition would hold little more than HELP and TYPE lines.
    """
    metrics = Metrics()

    for per_symbol in (
        metrics.messages_received,
        metrics.duplicates,
        metrics.gaps_detected,
        metrics.gaps_healed,
        metrics.gaps_unhealable,
        metrics.backfilled,
    ):
        per_symbol.labels("BTCUSDT", "trade").inc()
    metrics.last_message.labels("BTCUSDT", "trade").set(1_767_225_600.0)
    metrics.gaps_open.labels("BTCUSDT", "trade").set(1)
    metrics.gap_trades_missing.labels("BTCUSDT", "trade").set(42)
    metrics.event_lag.labels("trade").observe(0.03)

    for reason in RECONNECT_REASONS:
        metrics.reconnects.labels(ENDPOINT, reason).inc()
    for kind in ERROR_KINDS:
        metrics.errors.labels(kind).inc()
    metrics.set_breaker_state(ENDPOINT, "closed")
    metrics.breaker_transitions.labels(ENDPOINT, "closed").inc()
    metrics.endpoint_active.labels(ENDPOINT).set(1)
    metrics.connection_attempts.labels(ENDPOINT, "success").inc()
    metrics.rotations.labels("lifetime").inc()
    metrics.stale_detections.labels("heartbeat").inc()
    metrics.heartbeat_rtt.observe(0.004)

    metrics.rest_requests.labels("/api/v3/historicalTrades", "2xx").inc()
    metrics.rate_limited.labels("rest").inc()
    metrics.bans.labels("ws").inc()

    metrics.sink_writes.labels("sqlite").inc()
    metrics.sink_trades.labels("sqlite").inc(500)
    metrics.sink_latency.labels("sqlite").observe(0.002)
    metrics.sink_backlog.labels("sqlite").set(0)
    metrics.sink_errors.labels("sqlite", "busy").inc()
    metrics.sink_dropped.labels("sqlite").inc()
    metrics.sink_available.labels("sqlite").set(1)
    return metrics


def exposition_families(text: str) -> dict[str, int]:
    """Family name (from TYPE lines) to the number of its samples in ``text``."""
    families = dict.fromkeys(re.findall(r"^# TYPE (\S+) \S+$", text, re.M), 0)
    for sample in re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M):
        owner = max((f for f in families if sample.startswith(f)), key=len)
        families[owner] += 1
    return families


class TestPinnedNames:
    def test_exported_k2_families_are_exactly_the_pinned_list(self) -> None:
        """Metrics() exports exactly the pinned k2_* families, with their types."""
        assert EXPORTED == exported_families(Metrics())

    def test_operator_names_exist_exactly(self) -> None:
        """The four names K2 operators already query exist with the same type."""
        families = exported_families(Metrics())

        assert OPERATOR_NAMES == {name: families.get(name) for name in OPERATOR_NAMES}

    def test_exposition_names_match_the_pin(self) -> None:
        """The text exposition names each pinned family as the pin does."""
        text = generate_latest(Metrics().registry).decode()

        exposed = {f for f in exposition_families(text) if f.startswith("k2_")}

        assert set(EXPORTED) <= exposed

    def test_breaker_state_labels_cover_every_state(self) -> None:
        """Dashboards encode breaker states; the exported states are the known three."""
        assert ("closed", "open", "half_open") == BREAKER_STATES


class TestExposition:
    def test_every_family_has_a_sample_once_populated(self) -> None:
        """The populated registry has a sample in every family for lints to see."""
        text = generate_latest(populated_metrics().registry).decode()

        empty = [name for name, count in exposition_families(text).items() if not count]

        assert [] == empty

    def test_promtool_check_metrics_is_clean(self) -> None:
        """promtool check metrics finds no problem beyond the known false positive."""
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool not installed (Debian package prometheus)")
        text = generate_latest(populated_metrics().registry).decode()

        result = subprocess.run(
            [promtool, "check", "metrics"],
            input=text,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

        findings = set((result.stdout + result.stderr).splitlines())
        assert set() == findings - PROMTOOL_FALSE_POSITIVES
        assert result.returncode in (0, 3)  # 3: lint findings, all known above
