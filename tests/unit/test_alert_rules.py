"""The Prometheus alert rules and the Alertmanager configuration.

promtool and amtool do the parsing (PyYAML is not a dependency); the
structural checks below read the rules file with regular expressions, which is
enough for a file whose layout we control.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from k2stream.observe.metrics import Metrics


ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/rules/k2stream.rules.yml"
RULE_TESTS = ROOT / "deploy/prometheus/tests/k2stream.rules.test.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy/alertmanager/alertmanager.yml"
RUNBOOK = ROOT / "docs/runbook.md"
ALERTS_TABLE = ROOT / "docs/alerts.md"
RUNBOOK_URL = "https://github.com/k2-platform/k2stream/blob/main/docs/runbook.md#"

REQUIRED_ALERTS = {
    "K2StreamTargetDown",
    "K2StreamTargetMissing",
    "K2BinanceDisconnected",
    "K2BinanceStaleData",
    "K2BinanceReconnectStorm",
    "K2BinanceCircuitOpen",
    "K2BinanceOnFallback",
    "K2BinanceUSVenueInUse",
    "K2BinanceGapOpen",
    "K2BinanceGapUnhealable",
    "K2BinanceRateLimited",
    "K2BinanceBanned",
    "K2BinanceHighLag",
    "K2SinkFailing",
    "K2SinkBacklogGrowing",
    "K2StreamMemoryGrowth",
}
"""Alerts the operators asked for by name."""

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


def tool(name: str) -> str:
    """The path of a Prometheus tool, or skip the test saying what is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} not installed "
            "(Debian packages prometheus, prometheus-alertmanager)"
        )
    return path


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)


def alert_blocks() -> dict[str, str]:
    """Each alert's name and the text of its rule, up to the next rule or group."""
    text = RULES.read_text()
    starts = [
        m.start() for m in re.finditer(r"^\s*- (?:alert|record|name): ", text, re.M)
    ]
    blocks = [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)], strict=True)]
    alerts = {}
    for block in blocks:
        match = re.match(r"\s*- alert: (\S+)", block)
        if match:
            alerts[match.group(1)] = block
    return alerts


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of ``markdown``."""
    headings = re.findall(r"^#{1,6} +(.+?) *$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def rule_test_cases() -> dict[str, str]:
    """Each promtool test case's name and its text."""
    text = RULE_TESTS.read_text()
    return {
        case.split("\n", 1)[0]: case
        for case in re.split(r"^  - name: ", text, flags=re.M)[1:]
    }


def firing_alerts(case: str) -> set[str]:
    """Alerts a test case expects to fire at some evaluation."""
    return set(re.findall(r"alertname: (\S+)\n\s+exp_alerts:\n\s+- exp_labels:", case))


def silent_alerts(case: str) -> set[str]:
    """Alerts a test case expects to stay silent at some evaluation."""
    return set(re.findall(r"alertname: (\S+)\n\s+exp_alerts: \[\]", case))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class TestPromtool:
    def test_rules_pass_check_rules(self) -> None:
        """promtool check rules accepts the rules file."""
        result = run(tool("promtool"), "check", "rules", str(RULES))

        assert 0 == result.returncode, result.stdout + result.stderr

    def test_prometheus_config_passes_check_config(self) -> None:
        """promtool check config accepts prometheus.yml and the rule file it names."""
        result = run(tool("promtool"), "check", "config", str(PROMETHEUS_CONFIG))

        assert 0 == result.returncode, result.stdout + result.stderr
        assert "1 rule files found" in result.stdout

    def test_rule_unit_tests_pass(self) -> None:
        """promtool test rules passes every case in the rule tests."""
        result = run(tool("promtool"), "test", "rules", str(RULE_TESTS))

        assert 0 == result.returncode, result.stdout + result.stderr


class TestRuleContent:
    def test_required_alerts_exist(self) -> None:
        """Every alert the operators asked for is defined."""
        assert set() == REQUIRED_ALERTS - set(alert_blocks())

    def test_every_alert_has_severity_and_annotations(self) -> None:
        """Each alert has a page or ticket severity, summary, description, runbook."""
        incomplete = {
            name: field
            for name, block in alert_blocks().items()
            for field in (
                r"severity: (page|ticket)$",
                r"summary: .+",
                r"description: .+",
                r"runbook_url: .+",
            )
            if not re.search(r"^\s+" + field, block, re.M)
        }

        assert {} == incomplete

    def test_runbook_urls_point_at_existing_headings(self) -> None:
        """Each runbook_url is the runbook's URL with an anchor the runbook has."""
        anchors = github_anchors(RUNBOOK.read_text())

        broken = {}
        for name, block in alert_blocks().items():
            match = re.search(r'^\s+runbook_url: "?([^"\s]+)"?$', block, re.M)
            url = match.group(1) if match else ""
            if (
                not url.startswith(RUNBOOK_URL)
                or url[len(RUNBOOK_URL) :] not in anchors
            ):
                broken[name] = url

        assert {} == broken

    def test_every_alert_is_in_the_alerts_table(self) -> None:
        """docs/alerts.md lists every alert."""
        table = ALERTS_TABLE.read_text()

        assert [] == [name for name in alert_blocks() if f"[{name}]" not in table]

    def test_rules_query_only_exported_metrics(self) -> None:
        """Every k2_* and process_* name in the rules and their tests is exported."""
        text = RULES.read_text() + RULE_TESTS.read_text()

        used = set(re.findall(r"\b(?:k2|process)_[a-z0-9_]+\b", text))

        assert used
        assert set() == used - exported_series_names()

    def test_every_alert_has_a_firing_and_a_silent_case(self) -> None:
        """The promtool tests make each alert fire in a case and stay silent in one."""
        cases = rule_test_cases().values()

        fires = {name for case in cases for name in firing_alerts(case)}
        silent = {name for case in cases for name in silent_alerts(case)}

        alerts = set(alert_blocks())
        assert (set(), set()) == (alerts - fires, alerts - silent)

    @pytest.mark.parametrize(
        "case",
        [
            "a dead target pages once for the instance while it stays dead",
            "a restart that loses a symbol's series pages for that symbol",
            "a target that vanished from discovery pages",
            "a live target that never connected pages",
        ],
    )
    def test_stale_data_fires_without_fresh_series(self, case: str) -> None:
        """K2BinanceStaleData has a firing case where the target has no live data."""
        assert "K2BinanceStaleData" in firing_alerts(rule_test_cases()[case])


class TestAlertmanagerConfig:
    def test_config_passes_amtool(self) -> None:
        """amtool check-config accepts alertmanager.yml."""
        result = run(tool("amtool"), "check-config", str(ALERTMANAGER_CONFIG))

        assert 0 == result.returncode, result.stdout + result.stderr

    @pytest.mark.parametrize(
        ("severity", "receiver"), [("page", "pager"), ("ticket", "ticket")]
    )
    def test_severity_selects_the_receiver(self, severity: str, receiver: str) -> None:
        """Pages go to the pager receiver and tickets to the ticket receiver."""
        result = run(
            tool("amtool"),
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_CONFIG}",
            f"--verify.receivers={receiver}",
            "alertname=K2BinanceStaleData",
            f"severity={severity}",
        )

        assert 0 == result.returncode, result.stdout + result.stderr


class Alertmanager:
    """A real Alertmanager on a free loopback port, fed alerts over its API."""

    def __init__(self, url: str) -> None:
        self.url = url

    def post(self, *alerts: dict[str, str]) -> None:
        body = json.dumps([{"labels": labels} for labels in alerts]).encode()
        request = urllib.request.Request(
            f"{self.url}/api/v2/alerts",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert 200 == response.status

    def states(self) -> dict[tuple[str, str], str]:
        """(alertname, instance) to active or suppressed."""
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:
            alerts: list[dict[str, Any]] = json.load(response)
        return {
            (a["labels"]["alertname"], a["labels"].get("instance", "")): a["status"][
                "state"
            ]
            for a in alerts
        }

    def wait_for(
        self, expected: dict[tuple[str, str], str]
    ) -> dict[tuple[str, str], str]:
        """The states once they match ``expected``, or the last seen after 10 s."""
        deadline = time.monotonic() + 10
        states = self.states()
        while states != expected and time.monotonic() < deadline:
            time.sleep(0.05)
            states = self.states()
        return states


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if binary is None:
        pytest.skip(
            "Alertmanager not installed (Debian package prometheus-alertmanager)"
        )
    url = f"http://127.0.0.1:{free_port()}"
    log = (tmp_path / "alertmanager.log").open("w")
    command = [
        binary,
        f"--config.file={ALERTMANAGER_CONFIG}",
        f"--storage.path={tmp_path}",
        f"--web.listen-address={url.removeprefix('http://')}",
        "--cluster.listen-address=",
    ]

    with (
        log,
        subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT) as process,
    ):
        try:
            deadline = time.monotonic() + 15
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/-/ready", timeout=1):
                        break
                except OSError:
                    if time.monotonic() > deadline or process.poll() is not None:
                        pytest.fail(f"Alertmanager did not start; see {log.name}")
                    time.sleep(0.05)
            yield Alertmanager(url)
        finally:
            process.terminate()
            process.wait(timeout=10)


def _alert(name: str, severity: str, **labels: str) -> dict[str, str]:
    return {"alertname": name, "severity": severity, "job": "k2stream", **labels}


@pytest.mark.e2e
class TestInhibition:
    def test_target_down_holds_back_its_instance_alerts_only(
        self, alertmanager: Alertmanager
    ) -> None:
        """K2StreamTargetDown suppresses the other alerts of its instance only."""
        alertmanager.post(
            _alert("K2StreamTargetDown", "page", instance="a:9090"),
            _alert("K2BinanceStaleData", "page", instance="a:9090", symbol="BTCUSDT"),
            _alert("K2SinkFailing", "page", instance="a:9090", sink="sqlite"),
            _alert("K2BinanceStaleData", "page", instance="b:9090", symbol="BTCUSDT"),
        )
        expected = {
            ("K2StreamTargetDown", "a:9090"): "active",
            ("K2BinanceStaleData", "a:9090"): "suppressed",
            ("K2SinkFailing", "a:9090"): "suppressed",
            ("K2BinanceStaleData", "b:9090"): "active",
        }

        assert expected == alertmanager.wait_for(expected)

    def test_target_missing_holds_back_the_job_stale_page(
        self, alertmanager: Alertmanager
    ) -> None:
        """K2StreamTargetMissing suppresses the job-wide K2BinanceStaleData page."""
        alertmanager.post(
            _alert("K2StreamTargetMissing", "page"),
            _alert("K2BinanceStaleData", "page"),
        )
        expected = {
            ("K2StreamTargetMissing", ""): "active",
            ("K2BinanceStaleData", ""): "suppressed",
        }

        assert expected == alertmanager.wait_for(expected)
