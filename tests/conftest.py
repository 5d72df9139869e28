"""Fixtures shared by the integration and chaos tests: a bundled exchange and a service."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from k2stream.config import Settings, resolve
from k2stream.demo import drain
from k2stream.exchange import Exchange, ExchangeConfig, SymbolSpec
from k2stream.records import BINANCE, StreamKey
from k2stream.service import Service
from k2stream.sinks.store import count_ids, counts


SYMBOLS = (
    SymbolSpec("BTCUSDT", base="BTC", quote="USDT", rate=300.0, price="50000.00"),
    SymbolSpec("ETHUSDT", base="ETH", quote="USDT", rate=150.0, price="3000.00"),
)

FAST = {
    "reconnect_delay": "0.2",
    "max_reconnect_delay": "1",
    "stable_after": "0.5",
    "health_check_interval": "0.5",
    "health_check_timeout": "5",
    "heartbeat_interval": "1",
    "heartbeat_timeout": "1",
    "open_timeout": "2",
    "recovery_timeout": "1",
    "failback_interval": "1",
    "backfill_grace": "0.2",
    "batch_interval": "0.02",
    "metrics_port": "0",
    "max_reconnect_attempts": "0",
}
"""Every duration shortened, so the real code runs its schedules in a test's time."""


def exchange_config(**overrides: Any) -> ExchangeConfig:
    values: dict[str, Any] = {"symbols": SYMBOLS, "seed": 11, "ws_ports": (0, 0, 0)}
    values.update(overrides)
    return ExchangeConfig(**values)


@pytest.fixture
async def start_exchange(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[..., Any]]:
    """Start exchanges with the test module's ``SYMBOLS`` and test timings; stop them afterwards."""
    started: list[Exchange] = []

    async def start(**overrides: Any) -> Exchange:
        settings: dict[str, Any] = {
            "symbols": getattr(request.module, "SYMBOLS", SYMBOLS),
            "seed": 7,
            "ws_ports": (0, 0),
            "ping_interval": 20.0,
            "close_timeout": 0.5,
        }
        settings.update(overrides)
        running = Exchange(ExchangeConfig(**settings))
        await running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP and WebSocket client session."""
    async with aiohttp.ClientSession() as client_session:
        yield client_session


@pytest.fixture
async def exchange() -> AsyncIterator[Exchange]:
    """A bundled exchange with three endpoints and two symbols."""
    async with Exchange(exchange_config()) as running:
        yield running


def settings_for(exchange: Exchange, db: Path, **overrides: Any) -> Settings:
    flags: dict[str, Any] = {
        "endpoint": exchange.ws_urls,
        "rest_url": exchange.rest_url,
        "symbols": ",".join(s.symbol for s in exchange.config.symbols if s.trading),
        "sink": f"sqlite:///{db}",
        **FAST,
    }
    flags.update({k: v for k, v in overrides.items()})
    return resolve(flags, environ={})


class Running:
    """A service running in the test's event loop."""

    def __init__(self, service: Service, task: asyncio.Task[int]) -> None:
        self.service = service
        self.task = task

    async def stop(self, exchange: Exchange | None = None, within: float = 20.0) -> int:
        """Stop the market (when given), let the pipeline drain, stop the service."""
        if exchange is not None:
            exchange.market.stop()
            await drain(self.service, exchange, within=within)
        self.service.stop()
        return await asyncio.wait_for(self.task, 10.0)


@pytest.fixture
async def start_service() -> AsyncIterator[Callable[..., Any]]:
    """Start services; any left running are stopped at teardown."""
    running: list[Running] = []

    async def start(settings: Settings) -> Running:
        service = Service(settings)
        task = asyncio.create_task(service.run())
        started = asyncio.create_task(service.started.wait())
        await asyncio.wait(
            {task, started}, timeout=10, return_when=asyncio.FIRST_COMPLETED
        )
        started.cancel()
        if task.done():
            raise AssertionError(f"the service exited at start with {task.result()}")
        run = Running(service, task)
        running.append(run)
        return run

    yield start
    for run in running:
        if not run.task.done():
            run.service.stop()
            await asyncio.wait({run.task}, timeout=10)


async def wait_for(
    condition: Callable[[], bool], within: float = 10.0, what: str = ""
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` otherwise."""
    deadline = asyncio.get_running_loop().time() + within
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(
                f"timed out after {within} s waiting for {what or condition}"
            )
        await asyncio.sleep(0.05)


def metric_value(service: Service, name: str, **labels: str) -> float:
    """The current value of one sample of ``service``'s metrics; 0 when absent."""
    found = service.metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def assert_complete(
    exchange: Exchange,
    db: Path,
    streams: tuple[str, ...] = ("trade",),
    symbols: set[str] | None = None,
) -> dict[str, int]:
    """Every id from the first stored to the market's last is stored exactly once.

    ``symbols`` limits the check to some symbols (a shard's); all by default.
    """
    stored = counts(db)
    totals = {}
    for spec in exchange.config.symbols:
        if symbols is not None and spec.symbol not in symbols:
            continue
        for stream in streams:
            key = StreamKey(BINANCE, spec.symbol, stream)
            last = exchange.market.last_id(spec.symbol, stream)
            assert key in stored, f"nothing stored for {key}"
            rows, first, high = stored[key]
            assert last is not None
            assert high == last, f"{key}: stored up to {high}, market reached {last}"
            expected = last - first + 1
            assert expected == count_ids(db, key, first, last), f"{key}: ids missing"
            assert expected == rows, f"{key}: {rows} rows for {expected} ids"
            totals[f"{spec.symbol}@{stream}"] = rows
    return totals
