"""The monitoring path end to end: service, Prometheus, Alertmanager, webhook.

A real Prometheus scrapes a real service that captures the bundled exchange,
evaluates a copy of deploy/prometheus/rules/k2stream.rules.yml and sends to a
real Alertmanager, configured from a copy of deploy/alertmanager/alertmanager.yml
whose receivers point at a webhook this test serves. Freezing every endpoint
must page through the pager receiver. Then every query of the Grafana
dashboard runs against that Prometheus and must return data.

Production clocks are minutes; the copies are rewritten here (see
``shortened_rules`` and ``webhook_routing``) so the whole path runs in well
under a minute. deploy/ keeps the production values.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from conftest import settings_for, wait_for
from k2stream.exchange import Exchange


pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy/prometheus/rules/k2stream.rules.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy/alertmanager/alertmanager.yml"
DASHBOARD = ROOT / "deploy/grafana/dashboards/k2stream.json"

ALERT = "K2BinanceStaleData"
"""The alert under test: market data stopped."""

STALE_AFTER = "5"
"""Seconds of silence that count as stale here; production says 60."""

STALE_FOR = "2s"
"""How long the silence must last before the alert fires; production says 2m."""

GROUP_WAIT = "1s"
"""Alertmanager's wait before the first notification of a group; production 30s/5m."""

RATE_INTERVAL = "1m"
"""What Grafana's $__rate_interval becomes: 60 scrapes at a 1 s interval."""

FREEZE = 90.0
"""Long enough to outlast the whole alert path; cleared when the test is done."""


# -- the copies of deploy/ ------------------------------------------------------


def shortened_rules(text: str) -> str:
    """The production rules with the stale-data alert's clocks shortened.

    In K2BinanceStaleData, "silent for more than 60 s" becomes STALE_AFTER
    seconds and ``for: 2m`` becomes STALE_FOR. Every other rule is copied
    unchanged. Each rewrite must match exactly once, so that a change to the
    rule in deploy/ fails here instead of silently testing production clocks.
    """
    start = text.index(f"- alert: {ALERT}\n")
    end = text.index("- alert: ", start + 1)
    block = text[start:end]

    block, silences = re.subn(
        r"(k2_binance_last_message_timestamp_seconds\[15m\]\) >) 60\b",
        rf"\1 {STALE_AFTER}",
        block,
    )
    block, holds = re.subn(r"(\n\s+for:) 2m\n", rf"\1 {STALE_FOR}\n", block)
    assert (1, 1) == (silences, holds), f"{ALERT} changed in {RULES}; adapt the test"
    return text[:start] + block + text[end:]


def webhook_routing(text: str, webhook: str) -> str:
    """The production routing with the receivers at ``webhook`` and group_wait shortened."""
    text, urls = re.subn(r"http://127\.0\.0\.1:5001", webhook, text)
    text, waits = re.subn(r"(\bgroup_wait:) \S+", rf"\1 {GROUP_WAIT}", text)
    assert urls == 2 and waits >= 1, f"{ALERTMANAGER_CONFIG} changed; adapt the test"
    return text


def prometheus_config(rules: Path, alertmanager: str, target: str) -> str:
    """One scrape job named as the rules expect, scraped and evaluated every second."""
    return json.dumps(
        {
            "global": {
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "evaluation_interval": "1s",
            },
            "rule_files": [str(rules)],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]
            },
            "scrape_configs": [
                {"job_name": "k2stream", "static_configs": [{"targets": [target]}]}
            ],
        },
        indent=2,
    )


# -- processes and the webhook ----------------------------------------------------


def binary(*names: str) -> str:
    """The first of ``names`` on PATH, or skip saying which package provides it."""
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    pytest.skip(
        f"{' or '.join(names)} not installed "
        "(Debian packages prometheus and prometheus-alertmanager)"
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@contextlib.asynccontextmanager
async def serving(
    command: list[str], ready: str, log: Path, http: aiohttp.ClientSession
) -> AsyncIterator[None]:
    """Run ``command`` until the block ends; enter once GET ``ready`` answers 200."""
    with log.open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=output, stderr=subprocess.STDOUT
        )
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while not await answers(http, ready):
                if process.returncode is not None:
                    raise AssertionError(f"{command[0]} exited; see {log}")
                if asyncio.get_running_loop().time() > deadline:
                    raise AssertionError(f"{command[0]} not ready in 20 s; see {log}")
                await asyncio.sleep(0.1)
            yield
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), 10)
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def answers(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


@dataclass
class Webhook:
    """Alertmanager's notifications as they arrived: (path, payload)."""

    url: str = ""
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def alerts(self, path: str) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(notification, alert) for every alert POSTed to ``path``."""
        return [
            (payload, alert)
            for at, payload in self.received
            if at == path
            for alert in payload.get("alerts", [])
        ]


@pytest.fixture
async def webhook() -> AsyncIterator[Webhook]:
    """A webhook receiver on a free loopback port that keeps every POST."""
    hook = Webhook()

    async def receive(request: web.Request) -> web.Response:
        hook.received.append((request.path, await request.json()))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{tail:.*}", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    hook.url = f"http://127.0.0.1:{port}"
    try:
        yield hook
    finally:
        await runner.cleanup()


# -- Prometheus and Alertmanager APIs ---------------------------------------------


async def get_json(http: aiohttp.ClientSession, url: str, **params: str) -> Any:
    async with http.get(url, params=params) as response:
        response.raise_for_status()
        return await response.json()


async def query(http: aiohttp.ClientSession, prometheus: str, promql: str) -> Any:
    """The answer of Prometheus' instant query API."""
    async with http.get(
        f"{prometheus}/api/v1/query", params={"query": promql}
    ) as response:
        return await response.json()


async def eventually(
    probe: Callable[[], Any], within: float, what: str, poll: float = 0.25
) -> Any:
    """Await ``probe()`` until it returns something truthy; fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        found = await probe()
        if found:
            return found
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(poll)


def stale_for_a_symbol(alert: dict[str, Any]) -> bool:
    """The freeze's alert: K2BinanceStaleData for one symbol (the first branch)."""
    labels = alert.get("labels", {})
    return labels.get("alertname") == ALERT and "symbol" in labels


# -- the dashboard ----------------------------------------------------------------


def dashboard_queries(substitutions: dict[str, str]) -> list[tuple[str, str]]:
    """(panel title and ref, PromQL) for every target of every panel, variables replaced."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                expr = target.get("expr")
                if not expr:
                    continue
                for name, value in substitutions.items():
                    expr = expr.replace("${" + name + "}", value)
                    expr = expr.replace("$" + name, value)
                assert "$" not in expr, f"unknown variable in {expr!r}"
                where = f"{panel.get('title')} [{target.get('refId', '?')}]"
                found.append((where, expr))

    walk(dashboard.get("panels", []))
    return found


def settled(run) -> bool:
    """True while the live link is on the primary endpoint and stable."""
    link = run.service.supervisor.link
    return link is not None and link.endpoint.primary and link.stable


def total(run, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` of the service whose labels include ``labels``."""
    return sum(
        sample.value
        for family in run.service.metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


# -- the test ---------------------------------------------------------------------


async def provoke_rare_panels(exchange: Exchange, run) -> None:
    """Make the events behind the rarer panels happen: heals, losses, 429s and 418s."""
    # A short silence on every endpoint leaves a hole REST heals.
    exchange.faults.freeze(1.0)
    await wait_for(
        lambda: total(run, "k2_binance_gaps_healed_total") >= 1, 15, "a healed gap"
    )
    await wait_for(
        lambda: total(run, "k2_binance_backfilled_trades_total") >= 1,
        5,
        "trades backfilled",
    )

    # A REST ban longer than the backfill waits for one (300 s): the next hole
    # is given up as lost.
    exchange.faults.rest_ban(400.0)
    exchange.faults.freeze(1.0)
    await wait_for(
        lambda: total(run, "k2_binance_gaps_unhealable_total") >= 1,
        15,
        "an unhealable gap",
    )
    assert total(run, "k2_binance_bans_total", kind="rest") >= 1

    # 429, then 418, on every handshake.
    exchange.faults.ratelimit(1.5, retry_after=1)
    exchange.faults.kill()
    await wait_for(
        lambda: total(run, "k2_binance_rate_limited_total", kind="ws") >= 1, 10, "a 429"
    )
    exchange.faults.ban(1.5)
    exchange.faults.kill()
    await wait_for(
        lambda: total(run, "k2_binance_bans_total", kind="ws") >= 1, 10, "a 418"
    )

    # Back on the primary, stable: a failback in progress would hold the
    # freeze's stale detection until its switch timeout.
    await wait_for(lambda: settled(run), 20, "a stable link on the primary")


async def test_a_frozen_feed_pages_and_every_dashboard_query_has_data(
    exchange: Exchange, start_service, webhook: Webhook, tmp_path: Path
):
    """A freeze pages through Alertmanager; every dashboard query has data."""
    prometheus_bin = binary("prometheus")
    alertmanager_bin = binary("prometheus-alertmanager", "alertmanager")

    run = await start_service(settings_for(exchange, tmp_path / "t.db"))
    target = f"127.0.0.1:{run.service.probe.port}"
    prometheus = f"http://127.0.0.1:{free_port()}"
    alertmanager = f"http://127.0.0.1:{free_port()}"

    rules = tmp_path / "k2stream.rules.yml"
    rules.write_text(shortened_rules(RULES.read_text()))
    am_config = tmp_path / "alertmanager.yml"
    am_config.write_text(webhook_routing(ALERTMANAGER_CONFIG.read_text(), webhook.url))
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(
        prometheus_config(rules, alertmanager.removeprefix("http://"), target)
    )

    timeout = aiohttp.ClientTimeout(total=5)
    async with (
        aiohttp.ClientSession(timeout=timeout) as http,
        serving(
            [
                alertmanager_bin,
                f"--config.file={am_config}",
                f"--storage.path={tmp_path / 'alertmanager'}",
                f"--web.listen-address={alertmanager.removeprefix('http://')}",
                "--cluster.listen-address=",
            ],
            f"{alertmanager}/-/ready",
            tmp_path / "alertmanager.log",
            http,
        ),
        serving(
            [
                prometheus_bin,
                f"--config.file={prom_config}",
                f"--storage.tsdb.path={tmp_path / 'prometheus'}",
                f"--web.listen-address={prometheus.removeprefix('http://')}",
            ],
            f"{prometheus}/-/ready",
            tmp_path / "prometheus.log",
            http,
        ),
    ):

        async def scraped() -> bool:
            answer = await query(http, prometheus, "k2_binance_messages_received_total")
            return bool(answer["data"]["result"])

        await eventually(scraped, 15, "Prometheus' first scrape of k2stream")
        await provoke_rare_panels(exchange, run)

        async def prometheus_alerts() -> list[dict[str, Any]]:
            answer = await get_json(http, f"{prometheus}/api/v1/alerts")
            return [a for a in answer["data"]["alerts"] if stale_for_a_symbol(a)]

        async def quiet() -> bool:
            return not await prometheus_alerts()

        await eventually(quiet, 15, f"no {ALERT} before the freeze")

        # The fault under test: no data on any endpoint, pings still answered.
        exchange.faults.freeze(FREEZE)

        async def firing() -> list[dict[str, Any]]:
            return [a for a in await prometheus_alerts() if a["state"] == "firing"]

        fired = await eventually(firing, 30, f"{ALERT} firing in Prometheus")
        assert {"page"} == {a["labels"]["severity"] for a in fired}
        assert {target} == {a["labels"]["instance"] for a in fired}

        async def routed() -> list[dict[str, Any]]:
            alerts = await get_json(http, f"{alertmanager}/api/v2/alerts")
            return [a for a in alerts if stale_for_a_symbol(a)]

        in_alertmanager = await eventually(routed, 15, f"{ALERT} in Alertmanager")
        assert {"active"} == {a["status"]["state"] for a in in_alertmanager}
        assert [["pager"]] * len(in_alertmanager) == [
            [r["name"] for r in a["receivers"]] for a in in_alertmanager
        ]

        async def paged() -> list[tuple[dict[str, Any], dict[str, Any]]]:
            return [
                (notification, alert)
                for notification, alert in webhook.alerts("/k2stream/page")
                if stale_for_a_symbol(alert)
            ]

        pages = await eventually(paged, 15, f"{ALERT} POSTed to the pager webhook")
        notification, alert = pages[0]
        assert "pager" == notification["receiver"]
        assert "firing" == alert["status"]
        assert (ALERT, "page") == (
            alert["labels"]["alertname"],
            alert["labels"]["severity"],
        )
        assert alert["labels"]["symbol"] in {s.symbol for s in exchange.config.symbols}
        for path, payload in webhook.received:
            severities = {a["labels"]["severity"] for a in payload["alerts"]}
            expected = {"/k2stream/page": "pager", "/k2stream/ticket": "ticket"}[path]
            assert (expected, {"page" if expected == "pager" else "ticket"}) == (
                payload["receiver"],
                severities,
            )
        assert webhook.alerts("/k2stream/ticket"), "no ticket reached its receiver"

        # Every panel of the dashboard, against the same Prometheus, once the
        # freeze's stale detection has been scraped.
        async def stale_detected() -> bool:
            answer = await query(http, prometheus, "k2_binance_stale_detections_total")
            return bool(answer["data"]["result"])

        await eventually(stale_detected, 15, "the stale detection in Prometheus")
        substitutions = {
            "__rate_interval": RATE_INTERVAL,
            "instance": target,
            "symbol": "|".join(s.symbol for s in exchange.config.symbols),
            "datasource": "prometheus",
        }
        empty = {}
        for where, promql in dashboard_queries(substitutions):
            answer = await query(http, prometheus, promql)
            if answer.get("status") != "success" or not answer["data"]["result"]:
                empty[where] = (promql, answer.get("error", "no series"))

        exchange.faults.clear()

    assert {} == empty
