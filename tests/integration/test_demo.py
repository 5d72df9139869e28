"""`k2stream demo`: the bundled exchange, the service and scheduled faults, end to end.

The demo's default metrics port is 9090, Prometheus' own default, which may
be taken on a host that runs Prometheus; the test passes a free port.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import sys
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families


SRC = Path(__file__).resolve().parents[2] / "src"

OPERATOR_SERIES = (
    "k2_binance_connection_status",
    "k2_binance_messages_received_total",
    "k2_binance_reconnects_total",
    "k2_binance_errors_total",
)
"""The four names K2 operators already query; they must exist by these names."""

SUMMARY = re.compile(
    r"^generated (\d+), stored (\d+), missing (\d+), duplicates (\d+)$"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def samples(text: str) -> dict[str, list[float]]:
    """Sample values by sample name, from a /metrics body."""
    values: dict[str, list[float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values.setdefault(sample.name, []).append(sample.value)
    return values


async def scrape_while_running(
    process: asyncio.subprocess.Process, url: str
) -> list[dict[str, list[float]]]:
    """Every /metrics answer from the demo, twice a second, until it exits."""
    scrapes = []
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        while process.returncode is None:
            try:
                async with http.get(url) as response:
                    scrapes.append(samples(await response.text()))
            except (aiohttp.ClientError, TimeoutError):
                pass  # not serving yet, or already stopping
            await asyncio.sleep(0.5)
    return scrapes


async def test_demo_exports_the_operator_metrics_and_stores_every_trade_once(
    tmp_path,
):
    """The demo serves the four operator series live and ends with missing 0, duplicates 0."""
    port = free_port()
    db = tmp_path / "demo.db"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "k2stream",
        "demo",
        "--duration",
        "15",
        "--metrics-port",
        str(port),
        "--sink",
        f"sqlite:///{db}",
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(SRC)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        scraping = asyncio.create_task(
            scrape_while_running(process, f"http://127.0.0.1:{port}/metrics")
        )
        stdout, stderr = await asyncio.wait_for(process.communicate(), 75)
        scrapes = await scraping
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()

    assert 0 == process.returncode, stderr.decode()[-3000:]
    live = [s for s in scrapes if "k2_binance_connection_status" in s]
    assert len(live) >= 5, f"only {len(live)} scrapes answered"
    last = live[-1]
    assert [] == [name for name in OPERATOR_SERIES if name not in last]
    assert any(1.0 in s["k2_binance_connection_status"] for s in live)
    received = [sum(s.get("k2_binance_messages_received_total", [0.0])) for s in live]
    assert any(b > a for a, b in zip(received, received[1:], strict=False))
    assert sum(last["k2_binance_reconnects_total"]) > 0
    assert sum(last["k2_binance_errors_total"]) > 0

    summary = stdout.decode().strip().splitlines()[-1]
    match = SUMMARY.match(summary)
    assert match, f"unexpected last line: {summary!r}"
    generated, stored, missing, duplicates = map(int, match.groups())
    assert generated > 0
    assert (generated, 0, 0) == (stored, missing, duplicates)
