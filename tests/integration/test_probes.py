"""/livez, /healthz, /readyz, /status and /metrics of a running service.

The probes are polled on a timeline while the bundled exchange freezes every
endpoint: readiness must follow the data, liveness must not, because a
restart does not bring an exchange back.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass

import aiohttp
import pytest

from conftest import settings_for, wait_for
from k2stream.exchange import Exchange


HEALTH_CHECK_TIMEOUT = 3.0
"""Seconds of silence after which /readyz must say no (shortened from 60)."""

MARGIN = 2.0
"""Slack for the watchdog tick, the poll period and a busy 2-core machine."""

FREEZE = 6.0
"""Seconds every endpoint sends no data (pings are still answered)."""

POLL = 0.15
"""Seconds between two rounds of the three probes."""

PROBES = ("/livez", "/healthz", "/readyz")

RUNBOOK_STATUS_KEYS = {
    "connected",
    "next_attempt_in",
    "endpoints",
    "connection",
    "streams",
    "backfill",
    "rest",
    "sink",
}
"""Top-level /status keys docs/runbook.md and `k2stream status` rely on."""


@dataclass(frozen=True, slots=True)
class Answer:
    """One probe answer on the loop clock."""

    at: float
    path: str
    status: int
    body: str


async def poll_probes(
    http: aiohttp.ClientSession, base: str, until: asyncio.Event
) -> list[Answer]:
    """Ask the three probes every POLL seconds until ``until`` is set."""
    loop = asyncio.get_running_loop()
    timeline: list[Answer] = []
    while not until.is_set():
        for path in PROBES:
            async with http.get(base + path) as response:
                body = await response.text()
            timeline.append(Answer(loop.time(), path, response.status, body))
        await asyncio.sleep(POLL)
    return timeline


def probe_url(run) -> str:
    return f"http://127.0.0.1:{run.service.probe.port}"


async def test_readiness_follows_the_data_and_liveness_stays_up(
    exchange: Exchange, start_service, tmp_path
):
    """/readyz follows a freeze (503 with a reason, then 200); /livez and /healthz stay 200."""
    settings = settings_for(
        exchange,
        tmp_path / "t.db",
        health_check_timeout=str(HEALTH_CHECK_TIMEOUT),
    )
    run = await start_service(settings)
    base = probe_url(run)
    loop = asyncio.get_running_loop()

    async with aiohttp.ClientSession() as http:
        await wait_for(lambda: run.service.delivered > 200, what="data flowing")
        stop = asyncio.Event()
        polling = asyncio.create_task(poll_probes(http, base, stop))

        await asyncio.sleep(1.0)
        frozen_at = loop.time()
        exchange.faults.freeze(FREEZE)
        thawed_at = frozen_at + FREEZE
        await asyncio.sleep(FREEZE)
        delivered = run.service.delivered
        await wait_for(
            lambda: run.service.delivered > delivered + 100,
            within=15,
            what="data flowing after the freeze",
        )
        await asyncio.sleep(1.0)
        stop.set()
        timeline = await polling

    ready = [a for a in timeline if a.path == "/readyz"]
    before = [a for a in ready if a.at < frozen_at]
    assert before and {200} == {a.status for a in before}

    first_no = next(a for a in ready if a.status == 503)
    assert frozen_at <= first_no.at <= frozen_at + HEALTH_CHECK_TIMEOUT + MARGIN
    assert first_no.body.startswith("not ok: ") and len(first_no.body) > 10

    surely_stale = [
        a
        for a in ready
        if frozen_at + HEALTH_CHECK_TIMEOUT + MARGIN <= a.at < thawed_at
    ]
    assert surely_stale and {503} == {a.status for a in surely_stale}
    assert all(a.body.startswith("not ok: ") for a in surely_stale)

    back = [a for a in ready if a.at >= thawed_at and a.status == 200]
    assert back, "/readyz never returned to 200 after the freeze"
    assert 200 == ready[-1].status

    live = [a for a in timeline if a.path in ("/livez", "/healthz")]
    assert {"/livez", "/healthz"} == {a.path for a in live}
    assert [] == [a for a in live if a.status != 200]


async def test_status_has_the_keys_the_runbook_uses(
    exchange: Exchange, start_service, tmp_path
):
    """/status is JSON with endpoints, connection, streams, backfill, REST and sink."""
    run = await start_service(settings_for(exchange, tmp_path / "t.db"))
    await wait_for(lambda: run.service.delivered > 100, what="data flowing")

    async with (
        aiohttp.ClientSession() as http,
        http.get(probe_url(run) + "/status") as response,
    ):
        status = await response.json()

    assert 200 == response.status
    assert set() == RUNBOOK_STATUS_KEYS - set(status)
    assert status["connected"] is True
    assert len(exchange.ws_urls) == len(status["endpoints"])
    assert {"label", "breaker", "active", "last_error"} <= set(status["endpoints"][0])
    assert {"key", "last_id", "silent_for", "open_gaps", "missing"} <= set(
        status["streams"][0]
    )
    assert {"busy", "healed_trades", "lost"} <= set(status["backfill"])
    assert {"weight_used", "weight_allowance"} <= set(status["rest"]["BINANCE"])
    assert {"url", "backlog", "available"} <= set(status["sink"])


async def test_a_live_scrape_passes_promtool_check_metrics(
    exchange: Exchange, start_service, tmp_path
):
    """`promtool check metrics` accepts what /metrics serves while data flows."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus)")
    run = await start_service(settings_for(exchange, tmp_path / "t.db"))
    await wait_for(lambda: run.service.delivered > 100, what="data flowing")

    async with (
        aiohttp.ClientSession() as http,
        http.get(probe_url(run) + "/metrics") as response,
    ):
        body = await response.read()
    check = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await check.communicate(body)

    assert b"k2_binance_messages_received_total" in body
    assert 0 == check.returncode, output.decode()
