"""The REST side: the market-data endpoints a backfill uses, with Binance's limits.

Shapes, weights and error codes follow binance-spot-api-docs/rest-api.md and
errors.md (protocol section 5): every response carries
``X-MBX-USED-WEIGHT-1M``; past the minute's weight limit requests get 429
with ``Retry-After`` and -1003; after ``ban_after`` such refusals in the same
minute the IP is banned with 418 for ``ban_seconds``.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web

from k2stream.clock import Clock
from k2stream.exchange.config import ExchangeConfig
from k2stream.exchange.faults import RestFaults
from k2stream.exchange.market import (
    QUANTITY_STEP,
    STREAM_AGG_TRADE,
    STREAM_TRADE,
    UNITS,
    Market,
    SymbolSpec,
    Tape,
    fill_quantity,
    format_units,
)


log = structlog.get_logger(__name__)

WEIGHTS: Final = {
    "/api/v3/ping": 1,
    "/api/v3/time": 1,
    "/api/v3/exchangeInfo": 20,
    "/api/v3/trades": 25,
    "/api/v3/historicalTrades": 25,
    "/api/v3/aggTrades": 4,
}
"""Request weights as of 2025-03 (rest-api.md; aggTrades went 2 -> 4 on 2025-03-10)."""

DEFAULT_LIMIT: Final = 500
MAX_LIMIT: Final = 1000
USED_WEIGHT_HEADER: Final = "X-MBX-USED-WEIGHT-1M"
_MICROSECOND_PARAMETER: Final = 10**14
"""Time parameters this large are microseconds; smaller ones are milliseconds."""


class BinanceError(Exception):
    """A request Binance would refuse, with the HTTP status and its error body."""

    def __init__(
        self, status: int, code: int, msg: str, retry_after: int | None = None
    ) -> None:
        super().__init__(msg)
        self.status = status
        self.code = code
        self.msg = msg
        self.retry_after = retry_after


def _bad_symbol() -> BinanceError:
    return BinanceError(400, -1121, "Invalid symbol.")


class RequestWeight:
    """The IP's request weight in the current minute, and the ban it can earn.

    Binance counts weight in calendar minutes per IP; the exchange serves
    one IP (loopback), so there is one counter. Refused requests add no
    weight. Times come from the clock's wall time so tests can pin the minute.
    """

    def __init__(
        self, limit: int, ban_after: int, ban_seconds: float, clock: Clock
    ) -> None:
        self.limit = limit
        self.ban_after = ban_after
        self.ban_seconds = ban_seconds
        self._clock = clock
        self._minute = -1
        self.used = 0
        self.refusals = 0
        self.banned_until = 0.0

    def admit(self, weight: int) -> None:
        """Charge ``weight`` or raise the 429 or 418 that Binance would send."""
        now = self._clock.time()
        minute = int(now // 60)
        if minute != self._minute:
            self._minute = minute
            self.used = 0
            self.refusals = 0

        if now < self.banned_until:
            raise _banned(self.banned_until - now)

        if self.used + weight <= self.limit:
            self.used += weight
            return

        if self.refusals >= self.ban_after:
            self.banned_until = now + self.ban_seconds
            log.warning("rest_ip_banned", seconds=self.ban_seconds, used=self.used)
            raise _banned(self.ban_seconds)

        self.refusals += 1
        retry_after = max(1, math.ceil(60 - now % 60))
        log.info("rest_rate_limited", used=self.used, limit=self.limit)
        raise BinanceError(
            429,
            -1003,
            f"Too much request weight used; current limit is {self.limit} request "
            "weight per 1 MINUTE. Please use WebSocket Streams for live updates to "
            "avoid polling the API.",
            retry_after,
        )

    def current(self) -> int:
        """Weight used in this minute (0 once the minute has rolled over)."""
        if int(self._clock.time() // 60) != self._minute:
            return 0
        return self.used


def _banned(seconds: float) -> BinanceError:
    return BinanceError(
        418,
        -1003,
        "Way too much request weight used; IP banned for the Retry-After seconds. "
        "Please use WebSocket Streams for live updates to avoid bans.",
        max(1, math.ceil(seconds)),
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RestApi:
    """The REST application: market data from the tapes, guarded by weight and faults."""

    def __init__(
        self,
        config: ExchangeConfig,
        market: Market,
        faults: RestFaults,
        clock: Clock,
    ) -> None:
        self.config = config
        self.market = market
        self.faults = faults
        self.clock = clock
        self.weight = RequestWeight(
            config.weight_limit, config.ban_after, config.ban_seconds, clock
        )

        self.app = web.Application(middlewares=[self._guard])
        routes = {
            "/api/v3/ping": self.ping,
            "/api/v3/time": self.time,
            "/api/v3/exchangeInfo": self.exchange_info,
            "/api/v3/trades": self.trades,
            "/api/v3/historicalTrades": self.historical_trades,
            "/api/v3/aggTrades": self.agg_trades,
        }
        for path, handler in routes.items():
            self.app.router.add_get(path, handler)

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Handler
    ) -> web.StreamResponse:
        """Faults first, then weight; every answer carries the used weight."""
        try:
            fault = self.faults.take(asyncio.get_running_loop().time())
            if fault is not None:
                raise _injected(*fault)
            self.weight.admit(WEIGHTS.get(request.path, 1))
            response = await handler(request)
        except BinanceError as exc:
            response = _json({"code": exc.code, "msg": exc.msg}, status=exc.status)
            if exc.retry_after is not None:
                response.headers["Retry-After"] = str(exc.retry_after)
        except web.HTTPException as exc:
            response = _json({"code": -1000, "msg": exc.reason}, status=exc.status)
        response.headers[USED_WEIGHT_HEADER] = str(self.weight.current())
        return response

    # -- general --------------------------------------------------------------------

    async def ping(self, request: web.Request) -> web.Response:
        return _json({})

    async def time(self, request: web.Request) -> web.Response:
        return _json({"serverTime": self._now(request)})

    async def exchange_info(self, request: web.Request) -> web.Response:
        """exchangeInfo for all symbols, ``symbol``, ``symbols`` or ``symbolStatus``."""
        wanted = _wanted_symbols(request)
        status = request.query.get("symbolStatus")
        if status is not None and wanted is not None:
            raise BinanceError(
                400, -1128, "Combination of optional parameters invalid."
            )

        specs = self.market.symbols
        if wanted is not None:
            listed = {spec.symbol: spec for spec in specs}
            if any(symbol not in listed for symbol in wanted):
                raise _bad_symbol()
            specs = [listed[symbol] for symbol in wanted]
        if status is not None:
            specs = [spec for spec in specs if spec.status == status]

        return _json(
            {
                "timezone": "UTC",
                "serverTime": self._now(request),
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": self.config.weight_limit,
                    },
                    {
                        "rateLimitType": "RAW_REQUESTS",
                        "interval": "MINUTE",
                        "intervalNum": 5,
                        "limit": 300000,
                    },
                ],
                "exchangeFilters": [],
                "symbols": [_symbol_info(spec) for spec in specs],
            }
        )

    # -- trades ---------------------------------------------------------------------

    async def trades(self, request: web.Request) -> web.Response:
        """The most recent ``limit`` trades, oldest first."""
        tape = self._tape(request)
        limit = _limit(request)
        lo = max(self._oldest(tape, STREAM_TRADE), tape.trade_count - limit)
        return _json(_trade_items(tape, lo, tape.trade_count, _micro(request)))

    async def historical_trades(self, request: web.Request) -> web.Response:
        """Trades from ``fromId`` (or the most recent), ascending.

        A ``fromId`` older than the retained history starts at the oldest
        retained trade, without an error, as Binance does.
        """
        tape = self._tape(request)
        limit = _limit(request)
        from_id = _integer(request, "fromId")
        oldest = self._oldest(tape, STREAM_TRADE)
        if from_id is None:
            lo = max(oldest, tape.trade_count - limit)
        else:
            lo = min(max(oldest, from_id - tape.first_id), tape.trade_count)
        hi = min(tape.trade_count, lo + limit)
        return _json(_trade_items(tape, lo, hi, _micro(request)))

    async def agg_trades(self, request: web.Request) -> web.Response:
        """Aggregate trades by ``fromId``, by time window, or the most recent."""
        tape = self._tape(request)
        limit = _limit(request)
        from_id = _integer(request, "fromId")
        start = _time_parameter(request, "startTime", end=False)
        end = _time_parameter(request, "endTime", end=True)
        oldest = self._oldest(tape, STREAM_AGG_TRADE)
        count = tape.agg_count

        if from_id is not None and (start is not None or end is not None):
            raise BinanceError(
                400, -1128, "Combination of optional parameters invalid."
            )

        if from_id is not None:
            lo = min(max(oldest, from_id - tape.first_agg_id), count)
            hi = min(count, lo + limit)
        elif start is not None:
            lo = bisect.bisect_left(tape.agg_time, start, oldest, count)
            stop = (
                count
                if end is None
                else bisect.bisect_right(tape.agg_time, end, lo, count)
            )
            hi = min(stop, lo + limit)
        elif end is not None:
            hi = bisect.bisect_right(tape.agg_time, end, oldest, count)
            lo = max(oldest, hi - limit)
        else:
            hi = count
            lo = max(oldest, hi - limit)
        return _json(_agg_items(tape, lo, hi, _micro(request)))

    # -- helpers --------------------------------------------------------------------

    def _tape(self, request: web.Request) -> Tape:
        symbol = request.query.get("symbol")
        if not symbol:
            raise BinanceError(
                400,
                -1102,
                "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.",
            )
        if not self.market.has_symbol(symbol):
            raise _bad_symbol()
        return self.market.tape(symbol)

    def _oldest(self, tape: Tape, stream: str) -> int:
        """Index of the oldest id still retained (``history_limit``)."""
        if self.config.history_limit is None:
            return 0
        return max(0, tape.count(stream) - self.config.history_limit)

    def _now(self, request: web.Request) -> int:
        now_us = int(self.clock.time() * 1_000_000)
        return now_us if _micro(request) else now_us // 1000


def _json(body: object, status: int = 200) -> web.Response:
    """A compact JSON response, as Binance writes them."""
    return web.Response(
        body=msgspec.json.encode(body), status=status, content_type="application/json"
    )


def _injected(status: int, retry_after: int) -> BinanceError:
    """The error body of an injected REST fault."""
    if status == 418:
        return _banned(retry_after)
    if status == 429:
        return BinanceError(
            429, -1003, "Too many requests; injected fault.", retry_after
        )
    if status >= 500:
        return BinanceError(
            status,
            -1001,
            "Internal error; unable to process your request. Please try again.",
        )
    return BinanceError(status, -1000, "An unknown error occurred; injected fault.")


def _micro(request: web.Request) -> bool:
    """True when ``X-MBX-TIME-UNIT: MICROSECOND`` asks for microsecond times."""
    unit = request.headers.get("X-MBX-TIME-UNIT", "MILLISECOND").upper()
    if unit not in ("MILLISECOND", "MICROSECOND"):
        raise BinanceError(
            400,
            -1100,
            "Invalid X-MBX-TIME-UNIT header; use MILLISECOND or MICROSECOND.",
        )
    return unit == "MICROSECOND"


def _integer(request: web.Request, name: str) -> int | None:
    text = request.query.get(name)
    if text is None:
        return None
    if not text.isdigit() or len(text) > 20:
        raise BinanceError(
            400,
            -1100,
            f"Illegal characters found in parameter '{name}'; "
            "legal range is '^[0-9]{1,20}$'.",
        )
    return int(text)


def _limit(request: web.Request) -> int:
    """``limit``: default 500; above 1000 it is capped at 1000."""
    limit = _integer(request, "limit")
    if limit is None:
        return DEFAULT_LIMIT
    if limit < 1:
        raise BinanceError(400, -1130, "Data sent for parameter 'limit' is not valid.")
    return min(limit, MAX_LIMIT)


def _time_parameter(request: web.Request, name: str, *, end: bool) -> int | None:
    """A time parameter in microseconds; Binance accepts ms or µs by magnitude.

    An ``endTime`` in milliseconds covers its whole millisecond.
    """
    value = _integer(request, name)
    if value is None:
        return None
    if value >= _MICROSECOND_PARAMETER:
        return value
    return value * 1000 + (999 if end else 0)


def _wanted_symbols(request: web.Request) -> list[str] | None:
    symbol = request.query.get("symbol")
    symbols = request.query.get("symbols")
    if symbol is not None and symbols is not None:
        raise BinanceError(400, -1128, "Combination of optional parameters invalid.")
    if symbol is not None:
        return [symbol]
    if symbols is None:
        return None

    try:
        names = json.loads(symbols)
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BinanceError(
            400,
            -1100,
            "Illegal characters found in parameter 'symbols'; "
            'send a JSON array such as ["BTCUSDT","ETHUSDT"].',
        )
    return names


def _symbol_info(spec: SymbolSpec) -> dict[str, Any]:
    """One ``symbols[]`` entry of exchangeInfo, with the fields clients read."""
    decimals = len(spec.price.partition(".")[2])
    tick = format_units(10 ** (8 - min(decimals, 8)))
    return {
        "symbol": spec.symbol,
        "status": spec.status,
        "baseAsset": spec.base,
        "baseAssetPrecision": 8,
        "quoteAsset": spec.quote,
        "quotePrecision": 8,
        "quoteAssetPrecision": 8,
        "baseCommissionPrecision": 8,
        "quoteCommissionPrecision": 8,
        "orderTypes": [
            "LIMIT",
            "LIMIT_MAKER",
            "MARKET",
            "STOP_LOSS_LIMIT",
            "TAKE_PROFIT_LIMIT",
        ],
        "icebergAllowed": True,
        "ocoAllowed": True,
        "otoAllowed": True,
        "quoteOrderQtyMarketAllowed": True,
        "allowTrailingStop": True,
        "cancelReplaceAllowed": True,
        "isSpotTradingAllowed": True,
        "isMarginTradingAllowed": False,
        "filters": [
            {
                "filterType": "PRICE_FILTER",
                "minPrice": tick,
                "maxPrice": "1000000.00000000",
                "tickSize": tick,
            },
            {
                "filterType": "LOT_SIZE",
                "minQty": format_units(QUANTITY_STEP),
                "maxQty": "9000.00000000",
                "stepSize": format_units(QUANTITY_STEP),
            },
        ],
        "permissions": [],
        "permissionSets": [["SPOT"]],
        "defaultSelfTradePreventionMode": "EXPIRE_MAKER",
        "allowedSelfTradePreventionModes": [
            "EXPIRE_TAKER",
            "EXPIRE_MAKER",
            "EXPIRE_BOTH",
        ],
    }


def _quote_quantity(price: int, quantity: int) -> str:
    """price x quantity at 8 decimals, rounded half to even when not exact."""
    whole, rest = divmod(price * quantity, UNITS)
    if rest * 2 > UNITS or (rest * 2 == UNITS and whole % 2):
        whole += 1
    return format_units(whole)


def _trade_items(tape: Tape, lo: int, hi: int, micro: bool) -> list[dict[str, Any]]:
    """``/trades`` and ``/historicalTrades`` items for trade indexes ``[lo, hi)``."""
    divisor = 1 if micro else 1000
    items: list[dict[str, Any]] = []
    if lo >= hi:
        return items

    agg = tape.agg_of(lo)
    agg_end = tape.agg_end(agg)
    for index in range(lo, hi):
        if index == agg_end:
            agg += 1
            agg_end = tape.agg_end(agg)
        price = tape.agg_price[agg]
        quantity = fill_quantity(tape.trade_size[index])
        items.append(
            {
                "id": tape.first_id + index,
                "price": format_units(price),
                "qty": format_units(quantity),
                "quoteQty": _quote_quantity(price, quantity),
                "time": tape.agg_time[agg] // divisor,
                "isBuyerMaker": bool(tape.agg_maker[agg]),
                "isBestMatch": True,
            }
        )
    return items


def _agg_items(tape: Tape, lo: int, hi: int, micro: bool) -> list[dict[str, Any]]:
    """``/aggTrades`` items for aggregate indexes ``[lo, hi)``."""
    divisor = 1 if micro else 1000
    return [
        {
            "a": tape.first_agg_id + index,
            "p": format_units(tape.agg_price[index]),
            "q": format_units(tape.agg_quantity(index)),
            "f": tape.first_id + tape.agg_first[index],
            "l": tape.first_id + tape.agg_end(index) - 1,
            "T": tape.agg_time[index] // divisor,
            "m": bool(tape.agg_maker[index]),
            "M": True,
        }
        for index in range(lo, hi)
    ]
