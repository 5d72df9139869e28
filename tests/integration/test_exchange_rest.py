"""The bundled exchange's REST side, seen by a real aiohttp client on loopback.

The exchange runs on a FakeClock here: trades appear only when a test moves
the clock, and the weight minute cannot roll over in the middle of a test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import aiohttp
import pytest

from k2stream.clock import FakeClock
from k2stream.exchange import Exchange, ExchangeConfig, SymbolSpec


WALL = 1_700_000_000.0
"""Wall time of the fake clock: 20 s into a minute, so 40 s remain."""

SYMBOLS = (
    SymbolSpec(
        "BTCUSDT",
        base="BTC",
        quote="USDT",
        rate=1000.0,
        price="50000.00",
        first_id=1_000_000,
        first_agg_id=500_000,
    ),
    SymbolSpec("ETHUSDT", base="ETH", quote="USDT", rate=100.0, price="3000.00"),
    SymbolSpec("XRPUSDT", base="XRP", quote="USDT", price="0.5000", status="HALT"),
)


class Venue:
    """An exchange on a fake clock, and an HTTP client for its REST port."""

    def __init__(
        self, exchange: Exchange, clock: FakeClock, http: aiohttp.ClientSession
    ):
        self.exchange = exchange
        self.clock = clock
        self.http = http

    def trade_for(self, seconds: float) -> None:
        """Let the market generate ``seconds`` worth of trades, right now."""
        self.exchange.market.advance()
        self.clock.advance(seconds)
        self.exchange.market.advance()

    async def get(
        self, path: str, headers: dict[str, str] | None = None, **params: Any
    ) -> tuple[int, Any, Any]:
        url = self.exchange.rest_url + path
        query = {k: str(v) for k, v in params.items()}
        async with self.http.get(url, params=query, headers=headers) as response:
            return response.status, await response.json(), response.headers


StartVenue = Callable[..., Awaitable[Venue]]


@pytest.fixture
async def start_venue() -> AsyncIterator[StartVenue]:
    """Start exchanges on fake clocks with a client; stop them afterwards."""
    started: list[Exchange] = []

    async with aiohttp.ClientSession() as http:

        async def start(**overrides: Any) -> Venue:
            settings: dict[str, Any] = {"symbols": SYMBOLS, "seed": 7}
            settings.update(overrides)
            clock = FakeClock(wall=WALL)
            exchange = Exchange(ExchangeConfig(**settings), clock=clock)
            await exchange.start()
            started.append(exchange)
            return Venue(exchange, clock, http)

        yield start
        for exchange in started:
            await exchange.stop()


class TestGeneral:
    async def test_ping_and_time(self, start_venue: StartVenue) -> None:
        """ping answers {} and time the server time in ms, each costing weight 1."""
        venue = await start_venue()

        ping_status, ping, ping_headers = await venue.get("/api/v3/ping")
        time_status, server_time, time_headers = await venue.get("/api/v3/time")

        assert (ping_status, ping) == (200, {})
        assert (time_status, server_time) == (200, {"serverTime": int(WALL * 1000)})
        assert ping_headers["X-MBX-USED-WEIGHT-1M"] == "1"
        assert time_headers["X-MBX-USED-WEIGHT-1M"] == "2"

    async def test_exchange_info_lists_symbols_with_assets(
        self, start_venue: StartVenue
    ) -> None:
        """exchangeInfo lists every symbol, halted ones too, with assets and precision."""
        venue = await start_venue()

        status, info, _ = await venue.get("/api/v3/exchangeInfo")

        assert status == 200
        symbols = {s["symbol"]: s for s in info["symbols"]}
        assert set(symbols) == {"BTCUSDT", "ETHUSDT", "XRPUSDT"}
        assert symbols["XRPUSDT"]["status"] == "HALT"
        btc = symbols["BTCUSDT"]
        assert (btc["status"], btc["baseAsset"], btc["quoteAsset"]) == (
            "TRADING",
            "BTC",
            "USDT",
        )
        assert btc["baseAssetPrecision"] == 8 and btc["quoteAssetPrecision"] == 8
        assert info["rateLimits"][0]["limit"] == 6000

    async def test_exchange_info_filters_by_symbol_and_symbols(
        self, start_venue: StartVenue
    ) -> None:
        """symbol= and symbols= narrow exchangeInfo; an unknown one is -1121."""
        venue = await start_venue()

        _, one, _ = await venue.get("/api/v3/exchangeInfo", symbol="ETHUSDT")
        _, two, _ = await venue.get(
            "/api/v3/exchangeInfo", symbols='["XRPUSDT","BTCUSDT"]'
        )
        status, error, _ = await venue.get("/api/v3/exchangeInfo", symbol="DOGEUSDT")

        assert [s["symbol"] for s in one["symbols"]] == ["ETHUSDT"]
        assert [s["symbol"] for s in two["symbols"]] == ["XRPUSDT", "BTCUSDT"]
        assert (status, error) == (400, {"code": -1121, "msg": "Invalid symbol."})

    @pytest.mark.parametrize(
        "path", ["/api/v3/trades", "/api/v3/historicalTrades", "/api/v3/aggTrades"]
    )
    async def test_unknown_symbol_is_1121(
        self, start_venue: StartVenue, path: str
    ) -> None:
        """Every trade endpoint answers an unknown symbol with 400 and -1121."""
        venue = await start_venue()

        status, error, headers = await venue.get(path, symbol="DOGEUSDT")

        assert (status, error) == (400, {"code": -1121, "msg": "Invalid symbol."})
        assert "X-MBX-USED-WEIGHT-1M" in headers

    async def test_bad_parameters_get_binance_codes(
        self, start_venue: StartVenue
    ) -> None:
        """A missing symbol is -1102; a non-numeric fromId is -1100."""
        venue = await start_venue()

        missing, missing_error, _ = await venue.get("/api/v3/trades")
        illegal, illegal_error, _ = await venue.get(
            "/api/v3/historicalTrades", symbol="BTCUSDT", fromId="ten"
        )

        assert (missing, missing_error["code"]) == (400, -1102)
        assert (illegal, illegal_error["code"]) == (400, -1100)


class TestTrades:
    async def test_historical_trades_pages_equal_ground_truth(
        self, start_venue: StartVenue
    ) -> None:
        """Paging historicalTrades by fromId returns every trade, equal to the truth."""
        venue = await start_venue()
        venue.trade_for(2.5)
        market = venue.exchange.market
        last = market.last_id("BTCUSDT")
        assert last is not None

        collected: list[dict[str, Any]] = []
        from_id = 1_000_000
        while from_id <= last:
            status, page, _ = await venue.get(
                "/api/v3/historicalTrades", symbol="BTCUSDT", fromId=from_id, limit=1000
            )
            assert status == 200 and len(page) <= 1000
            collected.extend(page)
            from_id = page[-1]["id"] + 1

        assert [t["id"] for t in collected] == list(range(1_000_000, last + 1))
        for item in collected:
            truth = market.trade("BTCUSDT", item["id"])
            quote = item.pop("quoteQty")
            assert item == {
                "id": truth.id,
                "price": truth.price,
                "qty": truth.quantity,
                "time": truth.trade_time_us // 1000,
                "isBuyerMaker": truth.buyer_is_maker,
                "isBestMatch": True,
            }
            assert Decimal(quote) == Decimal(truth.price) * Decimal(truth.quantity)

    async def test_trades_returns_the_latest(self, start_venue: StartVenue) -> None:
        """trades returns the most recent limit trades, oldest first, default 500."""
        venue = await start_venue()
        venue.trade_for(1.0)
        last = venue.exchange.market.last_id("BTCUSDT")
        assert last is not None

        _, latest, _ = await venue.get("/api/v3/trades", symbol="BTCUSDT", limit=5)
        _, default, _ = await venue.get("/api/v3/trades", symbol="BTCUSDT")

        assert [t["id"] for t in latest] == list(range(last - 4, last + 1))
        assert len(default) == 500 and default[-1]["id"] == last

    async def test_agg_trades_pages_equal_ground_truth_and_tile(
        self, start_venue: StartVenue
    ) -> None:
        """Paging aggTrades by fromId tiles all trade ids; q sums the fills exactly."""
        venue = await start_venue()
        venue.trade_for(2.0)
        market = venue.exchange.market
        last_agg = market.last_id("BTCUSDT", "aggTrade")
        assert last_agg is not None

        collected: list[dict[str, Any]] = []
        from_id = 500_000
        while from_id <= last_agg:
            _, page, _ = await venue.get(
                "/api/v3/aggTrades", symbol="BTCUSDT", fromId=from_id, limit=1000
            )
            collected.extend(page)
            from_id = page[-1]["a"] + 1

        assert [a["a"] for a in collected] == list(range(500_000, last_agg + 1))
        assert collected[0]["f"] == 1_000_000
        assert collected[-1]["l"] == market.last_id("BTCUSDT")
        for before, after in zip(collected, collected[1:], strict=False):
            assert after["f"] == before["l"] + 1
        for item in collected[:300]:
            fills = market.trades("BTCUSDT", item["f"], item["l"] - item["f"] + 1)
            assert Decimal(item["q"]) == sum(Decimal(f.quantity) for f in fills)
            assert {f.price for f in fills} == {item["p"]}
            assert set(item) == {"a", "p", "q", "f", "l", "T", "m", "M"}

    async def test_agg_trades_by_time_window(self, start_venue: StartVenue) -> None:
        """startTime/endTime select aggTrades whose T lies in the window, inclusive."""
        venue = await start_venue()
        venue.trade_for(2.0)
        market = venue.exchange.market
        aggs = market.agg_trades("BTCUSDT", 500_000, 10_000)
        start_ms = aggs[100].trade_time_us // 1000
        end_ms = aggs[200].trade_time_us // 1000

        _, window, _ = await venue.get(
            "/api/v3/aggTrades",
            symbol="BTCUSDT",
            startTime=start_ms,
            endTime=end_ms,
            limit=1000,
        )

        expected = [a.id for a in aggs if start_ms <= a.trade_time_us // 1000 <= end_ms]
        assert [a["a"] for a in window] == expected

    async def test_agg_trades_rejects_from_id_with_times(
        self, start_venue: StartVenue
    ) -> None:
        """fromId together with startTime is -1128, a bad combination."""
        venue = await start_venue()

        status, error, _ = await venue.get(
            "/api/v3/aggTrades", symbol="BTCUSDT", fromId=1, startTime=1
        )

        assert (status, error["code"]) == (400, -1128)

    async def test_microsecond_header_gives_microsecond_times(
        self, start_venue: StartVenue
    ) -> None:
        """X-MBX-TIME-UNIT: MICROSECOND returns times in microseconds."""
        venue = await start_venue()
        venue.trade_for(0.5)
        micro = {"X-MBX-TIME-UNIT": "MICROSECOND"}

        _, trades, _ = await venue.get(
            "/api/v3/historicalTrades",
            headers=micro,
            symbol="BTCUSDT",
            fromId=1_000_000,
        )
        _, aggs, _ = await venue.get(
            "/api/v3/aggTrades", headers=micro, symbol="BTCUSDT", fromId=500_000
        )
        _, server_time, _ = await venue.get("/api/v3/time", headers=micro)

        truth = venue.exchange.market.trade("BTCUSDT", 1_000_000)
        assert trades[0]["time"] == truth.trade_time_us
        assert aggs[0]["T"] == truth.trade_time_us
        assert server_time["serverTime"] == int(WALL * 1_000_000 + 0.5 * 1_000_000)

    async def test_history_limit_clamps_old_from_id(
        self, start_venue: StartVenue
    ) -> None:
        """A fromId older than the retained history starts at the oldest kept id."""
        venue = await start_venue(history_limit=100)
        venue.trade_for(1.0)
        market = venue.exchange.market
        last = market.last_id("BTCUSDT")
        last_agg = market.last_id("BTCUSDT", "aggTrade")
        assert last is not None and last_agg is not None

        status, trades, _ = await venue.get(
            "/api/v3/historicalTrades", symbol="BTCUSDT", fromId=1_000_000, limit=1000
        )
        _, aggs, _ = await venue.get(
            "/api/v3/aggTrades", symbol="BTCUSDT", fromId=500_000, limit=1000
        )
        _, recent, _ = await venue.get(
            "/api/v3/historicalTrades", symbol="BTCUSDT", fromId=last - 9
        )

        assert status == 200
        assert [t["id"] for t in trades] == list(range(last - 99, last + 1))
        assert [a["a"] for a in aggs] == list(range(last_agg - 99, last_agg + 1))
        assert [t["id"] for t in recent] == list(range(last - 9, last + 1))


class TestWeight:
    async def test_every_response_reports_the_weight_used(
        self, start_venue: StartVenue
    ) -> None:
        """X-MBX-USED-WEIGHT-1M adds each endpoint's weight: 20, 25, 25, 4, 1."""
        venue = await start_venue()
        calls: list[tuple[str, dict[str, Any]]] = [
            ("/api/v3/exchangeInfo", {}),
            ("/api/v3/trades", {"symbol": "BTCUSDT"}),
            ("/api/v3/historicalTrades", {"symbol": "BTCUSDT"}),
            ("/api/v3/aggTrades", {"symbol": "BTCUSDT"}),
            ("/api/v3/ping", {}),
        ]

        used = []
        for path, params in calls:
            _, _, headers = await venue.get(path, **params)
            used.append(int(headers["X-MBX-USED-WEIGHT-1M"]))

        assert used == [20, 45, 70, 74, 75]

    async def test_over_the_limit_429_then_ban_418(
        self, start_venue: StartVenue
    ) -> None:
        """Past the limit: 429 with Retry-After to the minute's end, then a 418 ban."""
        venue = await start_venue(weight_limit=50, ban_after=2, ban_seconds=120.0)

        answers = []
        for _ in range(5):
            status, body, headers = await venue.get("/api/v3/trades", symbol="BTCUSDT")
            answers.append((status, headers.get("Retry-After"), body))
        after_ban, _, ping_headers = await venue.get("/api/v3/ping")

        assert [a[0] for a in answers] == [200, 200, 429, 429, 418]
        assert answers[2][1] == "40"
        assert answers[2][2]["code"] == -1003
        assert answers[4][1] == "120"
        assert answers[4][2]["code"] == -1003
        assert after_ban == 418
        assert ping_headers["X-MBX-USED-WEIGHT-1M"] == "50"

    async def test_weight_resets_with_the_next_minute(
        self, start_venue: StartVenue
    ) -> None:
        """A new minute brings the used weight back to zero."""
        venue = await start_venue(weight_limit=50)
        for _ in range(3):
            await venue.get("/api/v3/trades", symbol="BTCUSDT")

        venue.clock.advance(40.0)
        status, _, headers = await venue.get("/api/v3/trades", symbol="BTCUSDT")

        assert status == 200
        assert headers["X-MBX-USED-WEIGHT-1M"] == "25"

    async def test_ban_ends_after_ban_seconds(self, start_venue: StartVenue) -> None:
        """A 418 ban lifts once ban_seconds have passed."""
        venue = await start_venue(weight_limit=30, ban_after=1, ban_seconds=30.0)
        statuses = [
            (await venue.get("/api/v3/trades", symbol="BTCUSDT"))[0] for _ in range(3)
        ]

        venue.clock.advance(31.0)
        status, _, _ = await venue.get("/api/v3/ping")

        assert statuses == [200, 429, 418]
        assert status == 200
