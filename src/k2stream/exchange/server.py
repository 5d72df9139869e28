"""The bundled exchange as one object: market, WebSocket endpoints, REST, control."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

import structlog
from aiohttp import web

from k2stream.clock import SYSTEM_CLOCK, Clock
from k2stream.exchange.config import ExchangeConfig
from k2stream.exchange.control import ControlApi
from k2stream.exchange.faults import Faults, RestFaults
from k2stream.exchange.market import Market
from k2stream.exchange.rest import RestApi
from k2stream.exchange.ws import Hub, WsEndpoint


log = structlog.get_logger(__name__)


class ExchangeStats:
    """Counters per endpoint, in ``ws_urls`` order."""

    def __init__(self, endpoints: list[WsEndpoint]) -> None:
        self._endpoints = endpoints

    @property
    def handshakes(self) -> list[int]:
        """Handshake attempts, refused ones included: what "never hammering" counts."""
        return [endpoint.handshakes for endpoint in self._endpoints]

    @property
    def accepted(self) -> list[int]:
        """Handshakes that became connections."""
        return [endpoint.accepted for endpoint in self._endpoints]

    @property
    def connections(self) -> list[int]:
        """Connections open now."""
        return [len(endpoint.connections) for endpoint in self._endpoints]


class Exchange:
    """A Binance-compatible exchange on loopback, for tests, demos and drills.

    ``start`` binds every listener and starts the market; ``stop`` closes
    connections (1001), stops the market and unbinds, and may be called
    twice. An exchange runs once: make a new one to start again. Also an
    async context manager.
    """

    def __init__(self, config: ExchangeConfig, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.config = config
        self.market = Market(
            config.symbols, seed=config.seed, tick=config.tick, clock=clock
        )
        self._hub = Hub(self.market)
        self._endpoints = [
            WsEndpoint(index, config, self._hub)
            for index in range(len(config.ws_ports))
        ]
        self._rest_faults = RestFaults()
        self.faults = Faults(self._endpoints, self._rest_faults)
        self.rest = RestApi(config, self.market, self._rest_faults, clock)
        self.control = ControlApi(self.faults, self.market, self.status)
        self.stats = ExchangeStats(self._endpoints)

        self.ws_urls: list[str] = []
        self.rest_url = ""
        self.control_url = ""
        self._runners: list[web.AppRunner] = []
        self._started = False
        self._stopped = False

    async def start(self) -> None:
        """Bind the listeners (ws_ports order, then REST, then control); start the market."""
        if self._stopped:
            raise RuntimeError("this Exchange was stopped; create a new one to restart")
        if self._started:
            return
        self._started = True

        try:
            for endpoint, port in zip(
                self._endpoints, self.config.ws_ports, strict=True
            ):
                self.ws_urls.append("ws://" + await self._serve(endpoint.app, port))
            self.rest_url = "http://" + await self._serve(
                self.rest.app, self.config.rest_port
            )
            self.control_url = "http://" + await self._serve(
                self.control.app, self.config.control_port
            )
        except OSError:
            await self.stop()
            raise

        self.market.start()
        log.info(
            "exchange_started",
            ws_urls=self.ws_urls,
            rest_url=self.rest_url,
            control_url=self.control_url,
        )

    async def _serve(self, app: web.Application, port: int) -> str:
        """Run ``app`` on the configured host and ``port``; return ``host:port``."""
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.config.host, port)
        await site.start()
        host, bound_port = runner.addresses[-1][:2]
        return f"{host}:{bound_port}"

    async def stop(self) -> None:
        """Close every connection, stop the market and unbind; idempotent."""
        if not self._started or self._stopped:
            return
        self._stopped = True

        self.market.stop()
        self.faults.cancel_timers()
        await asyncio.gather(*(endpoint.close_all() for endpoint in self._endpoints))
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        log.info("exchange_stopped")

    async def __aenter__(self) -> Exchange:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    def status(self) -> dict[str, Any]:
        """What ``GET /status`` shows: the market, each endpoint, the REST weight."""
        now = asyncio.get_running_loop().time()
        return {
            "market": {
                "running": self.market.running,
                "symbols": {
                    spec.symbol: {
                        "status": spec.status,
                        "trades": self.market.count(spec.symbol),
                        "last_id": self.market.last_id(spec.symbol),
                    }
                    for spec in self.market.symbols
                },
            },
            "endpoints": [
                {
                    "index": endpoint.index,
                    "url": url,
                    "connections": len(endpoint.connections),
                    "handshakes": endpoint.handshakes,
                    "accepted": endpoint.accepted,
                    "faults": endpoint.faults.active(now),
                }
                for endpoint, url in zip(self._endpoints, self.ws_urls, strict=False)
            ],
            "rest": {
                "used_weight_1m": self.rest.weight.current(),
                "weight_limit": self.config.weight_limit,
            },
        }
