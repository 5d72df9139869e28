"""The Grafana dashboard, checked without a Grafana server.

Structure is checked on the JSON; every query is parsed by promtool, after
Grafana's variables are replaced the way Grafana would, inside a throwaway
recording-rules file (JSON is valid YAML, so no YAML library is needed).
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from k2stream.observe.metrics import Metrics


ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "deploy/grafana/dashboards"
DASHBOARD = DASHBOARDS / "k2stream.json"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

# What Grafana puts in place of its variables, for promtool's sake.
SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$instance": ".*",
    "$symbol": ".*",
}

REQUIRED_METRICS = {
    "k2_binance_connection_status",
    "k2_binance_endpoint_active",
    "k2_binance_failover_active",
    "k2_binance_binanceus_active",
    "k2_binance_messages_received_total",
    "k2_binance_last_message_timestamp_seconds",
    "k2_binance_event_lag_seconds_bucket",
    "k2_binance_heartbeat_rtt_seconds_bucket",
    "k2_binance_reconnects_total",
    "k2_binance_breaker_state",
    "k2_binance_stale_detections_total",
    "k2_binance_errors_total",
    "k2_binance_gaps_open",
    "k2_binance_gaps_detected_total",
    "k2_binance_gaps_healed_total",
    "k2_binance_gaps_unhealable_total",
    "k2_binance_backfilled_trades_total",
    "k2_binance_rest_weight_used",
    "k2_binance_rest_weight_limit",
    "k2_binance_rate_limited_total",
    "k2_binance_bans_total",
    "k2_sink_trades_written_total",
    "k2_sink_write_latency_seconds_bucket",
    "k2_sink_backlog_trades",
    "k2_sink_dropped_trades_total",
    "process_resident_memory_bytes",
    "process_cpu_seconds_total",
}
"""Series the operators asked to see on the dashboard."""

_SAMPLE_SUFFIXES = {
    "counter": ("_total",),
    "info": ("_info",),
    "histogram": ("_bucket", "_count", "_sum"),
}


def exported_series_names() -> set[str]:
    """Every series name k2stream exports, as PromQL selects it."""
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in _SAMPLE_SUFFIXES.get(family.type, ("",))
    }


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def data_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels that query data: everything except row headers."""
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expr) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in data_panels(dashboard)
        for target in panel["targets"]
    ]


def substituted(expr: str) -> str:
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


class TestStructure:
    def test_every_dashboard_loads_with_a_unique_uid(self) -> None:
        """Each dashboard file is JSON with a uid no other dashboard uses."""
        uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS.glob("*.json")]

        assert uids
        assert all(uids)
        assert len(uids) == len(set(uids))

    def test_schema_title_and_panel_ids(self, dashboard: dict[str, Any]) -> None:
        """The dashboard has a title, schemaVersion 39 and unique panel ids."""
        ids = [panel["id"] for panel in dashboard["panels"]]

        assert ("k2stream", 39) == (dashboard["title"], dashboard["schemaVersion"])
        assert len(ids) == len(set(ids))

    def test_datasource_instance_and_symbol_variables(
        self, dashboard: dict[str, Any]
    ) -> None:
        """A datasource variable picks Prometheus; instance and symbol list labels."""
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}

        assert ("datasource", "prometheus") == (
            variables["datasource"]["type"],
            variables["datasource"]["query"],
        )
        for name in ("instance", "symbol"):
            assert "query" == variables[name]["type"]
            assert DATASOURCE == variables[name]["datasource"]
            assert variables[name]["definition"].startswith("label_values(")
            assert f", {name})" in variables[name]["definition"]

    def test_every_panel_and_query_uses_the_datasource_variable(
        self, dashboard: dict[str, Any]
    ) -> None:
        """Each panel and each of its queries names the ${datasource} variable."""
        wrong = [
            panel["title"]
            for panel in data_panels(dashboard)
            if panel["datasource"] != DATASOURCE
            or not panel["targets"]
            or any(
                t.get("datasource", DATASOURCE) != DATASOURCE for t in panel["targets"]
            )
        ]

        assert [] == wrong

    def test_every_panel_has_a_unit(self, dashboard: dict[str, Any]) -> None:
        """Each data panel sets a unit in its field defaults."""
        missing = [
            panel["title"]
            for panel in data_panels(dashboard)
            if not panel["fieldConfig"]["defaults"].get("unit")
        ]

        assert [] == missing

    def test_rows_hold_no_queries(self, dashboard: dict[str, Any]) -> None:
        """Row headers only group panels; they have no queries to check."""
        rows = [p for p in dashboard["panels"] if p["type"] == "row"]

        assert rows
        assert [] == [row["title"] for row in rows if row.get("targets")]

    def test_panels_sit_in_the_grid_without_overlapping(
        self, dashboard: dict[str, Any]
    ) -> None:
        """Every panel has a gridPos inside 24 columns, and no two overlap."""
        boxes = [(panel["title"], panel["gridPos"]) for panel in dashboard["panels"]]

        outside = [
            t for t, g in boxes if g["x"] < 0 or g["x"] + g["w"] > 24 or g["h"] < 1
        ]
        overlapping = [
            (a, b)
            for (a, g), (b, h) in itertools.combinations(boxes, 2)
            if g["x"] < h["x"] + h["w"]
            and h["x"] < g["x"] + g["w"]
            and g["y"] < h["y"] + h["h"]
            and h["y"] < g["y"] + g["h"]
        ]

        assert ([], []) == (outside, overlapping)

    def test_firing_alerts_table(self, dashboard: dict[str, Any]) -> None:
        """A table lists the firing k2stream alerts from Prometheus' ALERTS series."""
        tables = [
            target["expr"]
            for panel in data_panels(dashboard)
            if panel["type"] == "table"
            for target in panel["targets"]
        ]

        assert any(
            expr.startswith("ALERTS{") and 'alertstate="firing"' in expr
            for expr in tables
        )


class TestQueries:
    def test_ranges_use_rate_interval(self, dashboard: dict[str, Any]) -> None:
        """Every range is $__rate_interval, so rates follow the scrape interval."""
        ranges = {
            r for _, expr in exprs(dashboard) for r in re.findall(r"\[([^\]]*)\]", expr)
        }

        assert {"$__rate_interval"} == ranges

    def test_queries_filter_on_the_instance_variable(
        self, dashboard: dict[str, Any]
    ) -> None:
        """Every query except the alert list honours the instance variable."""
        unfiltered = [
            title
            for title, expr in exprs(dashboard)
            if not expr.startswith("ALERTS{") and 'instance=~"$instance"' not in expr
        ]

        assert [] == unfiltered

    def test_queries_pass_promtool(
        self, dashboard: dict[str, Any], tmp_path: Path
    ) -> None:
        """Every query, its variables replaced, parses as PromQL in promtool."""
        promtool = shutil.which("promtool")
        if promtool is None:
            pytest.skip("promtool not installed (Debian package prometheus)")
        rules = [
            {"record": f"k2stream_dashboard:query_{n}", "expr": substituted(expr)}
            for n, (_, expr) in enumerate(exprs(dashboard))
        ]
        assert not [r["expr"] for r in rules if "$" in r["expr"]]
        path = tmp_path / "dashboard.rules.yml"
        path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))

        result = subprocess.run(
            [promtool, "check", "rules", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert 0 == result.returncode, result.stdout + result.stderr
        assert f"{len(rules)} rules found" in result.stdout

    def test_queries_use_only_exported_metrics(self, dashboard: dict[str, Any]) -> None:
        """Every k2_* and process_* name the dashboard queries is exported."""
        queries = [expr for _, expr in exprs(dashboard)] + [
            v.get("definition", "") for v in dashboard["templating"]["list"]
        ]

        used = {
            m for q in queries for m in re.findall(r"\b(?:k2|process)_[a-z0-9_]+\b", q)
        }

        assert set() == used - exported_series_names()

    def test_required_metrics_are_shown(self, dashboard: dict[str, Any]) -> None:
        """The dashboard queries every series the operators asked to see."""
        text = " ".join(expr for _, expr in exprs(dashboard))

        assert set() == {
            m for m in REQUIRED_METRICS if not re.search(rf"\b{m}\b", text)
        }
