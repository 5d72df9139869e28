"""The REST calls k2stream makes: exchangeInfo at start-up, trades for backfill.

Every request first reserves its weight in the process-wide
:class:`~k2stream.feed.budget.WeightBudget`, which the server's
``X-MBX-USED-WEIGHT-1M`` header corrects. A 429 or 418 closes the budget
for ``Retry-After`` seconds, so that no request is sent before then: a 418
means the IP is banned and each further request lengthens the ban
(binance-spot-api-docs, rest-api.md, "LIMITS").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import aiohttp
import msgspec
import structlog

from k2stream.binance.messages import RestAggTrade, RestTrade
from k2stream.binance.normalize import Normalizer, SymbolInfo
from k2stream.clock import SYSTEM_CLOCK, Clock
from k2stream.feed.budget import WeightBudget
from k2stream.observe.metrics import Metrics
from k2stream.records import AGG_TRADE, StreamKey, Trade


log = structlog.get_logger(__name__)

WEIGHTS: Final = {
    "/api/v3/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 20,
    "/api/v3/trades": 25,
    "/api/v3/historicalTrades": 25,
    "/api/v3/aggTrades": 4,
}
"""Request weights as of 2025-03 (rest-api.md; aggTrades went from 2 to 4 on 2025-03-10)."""

MAX_LIMIT: Final = 1000
"""Most items one trades/aggTrades page returns."""


class RestError(Exception):
    """A REST call failed; ``retryable`` says whether trying later can help."""

    retryable = True

    def __init__(self, path: str, status: int, message: str) -> None:
        self.path = path
        self.status = status
        answer = f"HTTP {status}: {message}" if status else message
        super().__init__(f"GET {path} failed: {answer}")


class RestRateLimited(RestError):
    """HTTP 429: too much weight used; nothing may be sent for ``retry_after`` seconds."""

    def __init__(
        self, path: str, status: int, message: str, retry_after: float
    ) -> None:
        self.retry_after = retry_after
        super().__init__(path, status, message)


class RestBanned(RestRateLimited):
    """HTTP 418: the IP is banned for ``retry_after`` seconds."""


class UnknownSymbols(RestError):
    """Symbols Binance does not list, or lists but does not trade."""

    retryable = False

    def __init__(self, unknown: list[str], not_trading: Mapping[str, str]) -> None:
        self.unknown = unknown
        self.not_trading = dict(not_trading)
        parts = []
        if unknown:
            parts.append(f"unknown symbol(s): {', '.join(unknown)}")
        if not_trading:
            listed = ", ".join(f"{s} ({status})" for s, status in not_trading.items())
            parts.append(f"not trading: {listed}")
        message = (
            "; ".join(parts) + "; check --symbols against the venue's exchangeInfo"
        )
        super().__init__("/api/v3/exchangeInfo", 400, message)


class _ErrorBody(msgspec.Struct):
    code: int = 0
    msg: str = ""


class _ExchangeSymbol(msgspec.Struct):
    symbol: str
    status: str
    baseAsset: str
    quoteAsset: str


class _ExchangeInfo(msgspec.Struct):
    symbols: list[_ExchangeSymbol]


_trades = msgspec.json.Decoder(list[RestTrade])
_agg_trades = msgspec.json.Decoder(list[RestAggTrade])
_exchange_info = msgspec.json.Decoder(_ExchangeInfo)
_error_body = msgspec.json.Decoder(_ErrorBody)


class BinanceRest:
    """A thin client for one REST base URL, within the weight budget."""

    def __init__(
        self,
        base_url: str,
        *,
        session: aiohttp.ClientSession,
        budget: WeightBudget,
        metrics: Metrics,
        clock: Clock = SYSTEM_CLOCK,
        timeout: float = 10.0,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._budget = budget
        self._metrics = metrics
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    @property
    def budget(self) -> WeightBudget:
        return self._budget

    async def exchange_info(self, symbols: list[str]) -> dict[str, SymbolInfo]:
        """SymbolInfo for ``symbols``; :class:`UnknownSymbols` names the bad ones."""
        params = {"symbols": "[" + ",".join(f'"{s}"' for s in symbols) + "]"}
        try:
            body = await self._get("/api/v3/exchangeInfo", params)
        except RestError as exc:
            if exc.status != 400:
                raise
            # -1121 does not say which symbol is unknown: list them all and compare.
            body = await self._get("/api/v3/exchangeInfo", {})

        listed = {s.symbol: s for s in _exchange_info.decode(body).symbols}
        unknown = [s for s in symbols if s not in listed]
        not_trading = {
            s: listed[s].status
            for s in symbols
            if s in listed and listed[s].status != "TRADING"
        }
        if unknown or not_trading:
            raise UnknownSymbols(unknown, not_trading)

        return {
            s: SymbolInfo(
                s, listed[s].status, listed[s].baseAsset, listed[s].quoteAsset
            )
            for s in symbols
        }

    async def historical_trades(
        self, symbol: str, from_id: int, limit: int
    ) -> list[RestTrade]:
        """Trades with ids from ``from_id`` upwards, oldest first."""
        params = {
            "symbol": symbol,
            "fromId": str(from_id),
            "limit": str(min(limit, MAX_LIMIT)),
        }
        return _trades.decode(await self._get("/api/v3/historicalTrades", params))

    async def agg_trades(
        self, symbol: str, from_id: int | None, limit: int
    ) -> list[RestAggTrade]:
        """Aggregate trades from ``from_id`` upwards (the latest when None), oldest first."""
        params = {"symbol": symbol, "limit": str(min(limit, MAX_LIMIT))}
        if from_id is not None:
            params["fromId"] = str(from_id)
        return _agg_trades.decode(await self._get("/api/v3/aggTrades", params))

    async def recent_trades(self, symbol: str, limit: int) -> list[RestTrade]:
        """The latest ``limit`` trades, oldest first."""
        params = {"symbol": symbol, "limit": str(min(limit, MAX_LIMIT))}
        return _trades.decode(await self._get("/api/v3/trades", params))

    async def _get(self, path: str, params: dict[str, str]) -> bytes:
        await self._reserve(WEIGHTS[path])

        url = self.base_url + path
        headers = {"X-MBX-TIME-UNIT": "MICROSECOND"}
        try:
            async with self._session.get(
                url, params=params, headers=headers, timeout=self._timeout
            ) as response:
                body = await response.read()
                self._observe_weight(response.headers)
                status = response.status
                retry_after = _retry_after(response.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            self._metrics.rest_requests.labels(path, "error").inc()
            raise RestError(path, 0, f"{type(exc).__name__}: {exc}") from exc

        self._metrics.rest_requests.labels(path, _status_class(status)).inc()
        if status == 200:
            return body

        message = _error_message(body)
        if status in (418, 429):
            self._on_rate_limited(path, status, retry_after, message)
            cls = RestBanned if status == 418 else RestRateLimited
            raise cls(path, status, message, retry_after)
        error = RestError(path, status, message)
        if 400 <= status < 500:
            error.retryable = False
        raise error

    async def _reserve(self, weight: int) -> None:
        while (wait := self._budget.reserve(weight)) > 0:
            log.info("rest_budget_wait", seconds=round(wait, 2), weight=weight)
            await self._clock.sleep(wait)

    def _observe_weight(self, headers: Mapping[str, str]) -> None:
        used = headers.get("X-MBX-USED-WEIGHT-1M")
        if used is not None and used.isdigit():
            self._budget.observe(int(used))
            self._metrics.rest_weight_used.set(int(used))

    def _on_rate_limited(
        self, path: str, status: int, retry_after: float, message: str
    ) -> None:
        self._budget.block(retry_after, reason=f"HTTP {status}")
        if status == 418:
            self._metrics.bans.labels("rest").inc()
            self._metrics.errors.labels("banned").inc()
            self._metrics.banned_until.set(self._clock.time() + retry_after)
            log.error(
                "banned",
                kind="rest",
                path=path,
                retry_after=retry_after,
                message=message,
                action="no REST request is sent until the ban ends",
            )
            return
        self._metrics.rate_limited.labels("rest").inc()
        self._metrics.errors.labels("rate_limited").inc()
        log.warning("rate_limited", kind="rest", path=path, retry_after=retry_after)


async def fetch_page(
    rest: BinanceRest,
    normalizer: Normalizer,
    key: StreamKey,
    from_id: int,
    limit: int,
    received_us: int,
) -> list[Trade]:
    """Up to ``limit`` trades (or aggregate trades) of ``key`` from ``from_id`` on, as records."""
    label = rest.base_url.split("://", 1)[-1]
    if key.stream == AGG_TRADE:
        aggs = await rest.agg_trades(key.symbol, from_id, limit)
        return [
            normalizer.from_rest_agg(key.symbol, a, label, received_us) for a in aggs
        ]
    fills = await rest.historical_trades(key.symbol, from_id, limit)
    return [
        normalizer.from_rest_trade(key.symbol, t, label, received_us) for t in fills
    ]


def _retry_after(headers: Mapping[str, str]) -> float:
    value = headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 60.0


def _status_class(status: int) -> str:
    if status in (418, 429):
        return str(status)
    return f"{status // 100}xx"


def _error_message(body: bytes) -> str:
    try:
        error = _error_body.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return body[:200].decode("utf-8", errors="replace")
    return f"{error.code} {error.msg}"
