"""The control port: faults, the market switch and ground truth over HTTP.

Drills and the demo drive the exchange from outside the process with the
same calls :class:`~k2stream.exchange.faults.Faults` offers in Python:
``POST /faults/<name>`` with the arguments as a JSON object.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, Final

import structlog
from aiohttp import web

from k2stream.exchange.faults import Faults
from k2stream.exchange.market import STREAM_AGG_TRADE, STREAM_TRADE, Market


log = structlog.get_logger(__name__)

FAULT_NAMES: Final = (
    "kill",
    "close",
    "stall",
    "freeze",
    "refuse",
    "ratelimit",
    "ban",
    "garbage",
    "slow",
    "shutdown",
    "clear",
    "rest_error",
    "rest_ban",
)


class ControlApi:
    """The control application; ``status`` supplies the body of ``GET /status``."""

    def __init__(
        self, faults: Faults, market: Market, status: Callable[[], dict[str, Any]]
    ) -> None:
        self.faults = faults
        self.market = market
        self.status = status

        self.app = web.Application()
        self.app.router.add_post("/faults/{name}", self.fault)
        self.app.router.add_post("/market/stop", self.market_stop)
        self.app.router.add_post("/market/start", self.market_start)
        self.app.router.add_get("/truth/{symbol}", self.truth)
        self.app.router.add_get("/status", self.get_status)

    async def fault(self, request: web.Request) -> web.Response:
        """Apply one fault: ``{"endpoint": 0, "seconds": 5}`` and the like."""
        name = request.match_info["name"]
        if name not in FAULT_NAMES:
            return _error(404, f"fault {name!r} is unknown; use one of {FAULT_NAMES}")

        arguments: object = {}
        if request.can_read_body:
            try:
                arguments = await request.json()
            except ValueError:
                return _error(400, "the body must be a JSON object of arguments")
        if not isinstance(arguments, dict):
            return _error(400, "the body must be a JSON object of arguments")

        call = getattr(self.faults, name)
        try:
            inspect.signature(call).bind(**arguments)
        except TypeError as exc:
            return _error(400, f"bad arguments for {name}: {exc}")
        try:
            affected = call(**arguments)
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))

        return web.json_response(
            {"ok": True, "fault": name, "arguments": arguments, "affected": affected}
        )

    async def market_stop(self, request: web.Request) -> web.Response:
        self.market.stop()
        return web.json_response({"ok": True, "running": self.market.running})

    async def market_start(self, request: web.Request) -> web.Response:
        self.market.start()
        return web.json_response({"ok": True, "running": self.market.running})

    async def truth(self, request: web.Request) -> web.Response:
        """First and last id generated for a symbol and stream, and the count."""
        symbol = request.match_info["symbol"]
        stream = request.query.get("stream", STREAM_TRADE)
        if stream not in (STREAM_TRADE, STREAM_AGG_TRADE):
            return _error(400, f"stream {stream!r} is unknown; use trade or aggTrade")
        if not self.market.has_symbol(symbol):
            return _error(404, f"symbol {symbol!r} is not listed")

        return web.json_response(
            {
                "symbol": symbol,
                "stream": stream,
                "first_id": self.market.first_id(symbol, stream),
                "last_id": self.market.last_id(symbol, stream),
                "count": self.market.count(symbol, stream),
            }
        )

    async def get_status(self, request: web.Request) -> web.Response:
        return web.json_response(self.status())


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"ok": False, "error": message}, status=status)
