"""The simulated market: deterministic generation and the ground truth it keeps."""

from __future__ import annotations

import asyncio
import json
import sys
from decimal import Decimal

import pytest

from k2stream.clock import FakeClock, SystemClock
from k2stream.exchange import Market, SymbolSpec
from k2stream.exchange.frames import Variant, agg_trade_frames, trade_frames
from k2stream.exchange.market import TapeSlice


BTC = SymbolSpec(
    "BTCUSDT",
    base="BTC",
    quote="USDT",
    rate=200.0,
    price="50000.00",
    first_id=1_000_000,
    first_agg_id=500_000,
)
ETH = SymbolSpec("ETHUSDT", base="ETH", quote="USDT", rate=100.0, price="3000.00")


def run(market: Market, clock: FakeClock, seconds: float, step: float) -> None:
    """Drive ``market`` by hand for ``seconds`` in steps of ``step``."""
    market.advance()
    elapsed = 0.0
    while elapsed < seconds - 1e-9:
        clock.advance(step)
        elapsed += step
        market.advance()


def fingerprint(market: Market, symbol: str, count: int) -> list[tuple[object, ...]]:
    """What a trade is, apart from its timestamps."""
    first = market.first_id(symbol)
    assert first is not None
    return [
        (t.id, t.price, t.quantity, t.buyer_is_maker, t.agg_id)
        for t in market.trades(symbol, first, count)
    ]


def parse_frames(data: bytes) -> list[dict[str, object]]:
    """Split unmasked text frames and decode their JSON payloads."""
    events = []
    while data:
        assert data[0] == 0x81
        size = data[1]
        offset = 2
        if size == 126:
            size = int.from_bytes(data[2:4], "big")
            offset = 4
        events.append(json.loads(data[offset : offset + size]))
        data = data[offset + size :]
    return events


class TestGeneration:
    def test_trade_ids_are_consecutive_from_first_id(self) -> None:
        """Trade ids start at first_id and go up by one, per symbol."""
        clock = FakeClock()
        market = Market([BTC, ETH], seed=7, clock=clock)

        run(market, clock, seconds=2.0, step=0.01)

        assert market.first_id("BTCUSDT") == 1_000_000
        assert market.first_id("ETHUSDT") == 1
        last = market.last_id("BTCUSDT")
        assert last is not None
        ids = [t.id for t in market.trades("BTCUSDT", 1_000_000, 10_000)]
        assert list(range(1_000_000, last + 1)) == ids

    def test_rate_is_trades_per_second(self) -> None:
        """A symbol produces rate trades per second, ahead by at most one order."""
        clock = FakeClock()
        market = Market([BTC, ETH], seed=7, clock=clock)

        run(market, clock, seconds=3.0, step=0.05)

        assert 600 <= market.count("BTCUSDT") <= 600 + 12
        assert 300 <= market.count("ETHUSDT") <= 300 + 12

    def test_same_seed_gives_same_trades_whatever_the_ticks(self) -> None:
        """Trade contents depend on the seed alone, not on where ticks fell."""
        fine_clock, coarse_clock = FakeClock(), FakeClock()
        fine = Market([BTC], seed=7, clock=fine_clock)
        coarse = Market([BTC], seed=7, clock=coarse_clock)

        run(fine, fine_clock, seconds=3.0, step=0.01)
        run(coarse, coarse_clock, seconds=3.0, step=0.7)

        count = min(fine.count("BTCUSDT"), coarse.count("BTCUSDT"))
        assert count > 500
        assert fingerprint(fine, "BTCUSDT", count) == fingerprint(
            coarse, "BTCUSDT", count
        )

    def test_different_seeds_give_different_trades(self) -> None:
        """Another seed yields another market."""
        clock_a, clock_b = FakeClock(), FakeClock()
        a = Market([BTC], seed=7, clock=clock_a)
        b = Market([BTC], seed=8, clock=clock_b)

        run(a, clock_a, seconds=1.0, step=0.1)
        run(b, clock_b, seconds=1.0, step=0.1)

        assert fingerprint(a, "BTCUSDT", 100) != fingerprint(b, "BTCUSDT", 100)

    def test_non_trading_symbol_generates_nothing(self) -> None:
        """A symbol in BREAK is listed but never trades."""
        clock = FakeClock()
        halted = SymbolSpec("XRPUSDT", base="XRP", quote="USDT", status="BREAK")
        market = Market([BTC, halted], seed=7, clock=clock)

        run(market, clock, seconds=1.0, step=0.1)

        assert market.count("XRPUSDT") == 0
        assert market.first_id("XRPUSDT") is None
        assert market.last_id("XRPUSDT") is None
        assert market.count("BTCUSDT") > 0

    def test_late_tick_forgoes_what_it_cannot_catch_up(self) -> None:
        """With a catch-up cap, a long pause costs trades instead of a huge tick."""
        clock = FakeClock()
        market = Market([BTC], seed=7, tick=0.01, clock=clock)
        market.advance()

        clock.advance(10.0)
        market.advance(catch_up=5.0)

        assert 10 <= market.count("BTCUSDT") <= 10 + 12
        assert market.forgone >= 1_980


class TestAggregates:
    def test_aggregates_tile_trade_ids_without_holes(self) -> None:
        """Consecutive aggTrades cover consecutive trade id ranges, f to l."""
        clock = FakeClock()
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=2.0, step=0.01)

        aggs = market.agg_trades("BTCUSDT", 500_000, 10_000)

        assert [a.id for a in aggs] == list(range(500_000, 500_000 + len(aggs)))
        assert aggs[0].first_trade_id == 1_000_000
        for before, after in zip(aggs, aggs[1:], strict=False):
            assert after.first_trade_id == before.last_trade_id + 1
        assert aggs[-1].last_trade_id == market.last_id("BTCUSDT")

    def test_aggregate_is_fills_at_one_price_time_and_side(self) -> None:
        """An aggTrade's fills share price, time and side; q is their exact sum."""
        clock = FakeClock()
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=2.0, step=0.01)

        for agg in market.agg_trades("BTCUSDT", 500_000, 10_000):
            fills = [
                market.trade("BTCUSDT", i)
                for i in range(agg.first_trade_id, agg.last_trade_id + 1)
            ]
            assert {f.price for f in fills} == {agg.price}
            assert {f.trade_time_us for f in fills} == {agg.trade_time_us}
            assert {f.buyer_is_maker for f in fills} == {agg.buyer_is_maker}
            assert {f.agg_id for f in fills} == {agg.id}
            assert sum(Decimal(f.quantity) for f in fills) == Decimal(agg.quantity)

    def test_some_orders_have_several_fills_and_levels(self) -> None:
        """Taker orders yield multi-fill aggregates and multi-level orders."""
        clock = FakeClock()
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=5.0, step=0.01)

        aggs = market.agg_trades("BTCUSDT", 500_000, 10_000)
        sizes = {a.last_trade_id - a.first_trade_id + 1 for a in aggs}
        shared_times = sum(
            1
            for a, b in zip(aggs, aggs[1:], strict=False)
            if a.trade_time_us == b.trade_time_us
        )

        assert max(sizes) >= 3
        assert shared_times > 0


class TestGroundTruth:
    def test_numbers_are_eight_decimal_strings(self) -> None:
        """Prices and quantities read like Binance's: '50000.12000000'."""
        clock = FakeClock()
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=1.0, step=0.1)

        trade = market.trade("BTCUSDT", 1_000_000)

        for text in (trade.price, trade.quantity):
            whole, dot, fraction = text.partition(".")
            assert dot == "." and len(fraction) == 8 and whole.isdigit()
        assert Decimal(trade.price) % Decimal("0.01") == 0

    def test_times_follow_the_clock_and_never_go_back(self) -> None:
        """Trade times lie within the ticks that made them and only go forward."""
        clock = FakeClock(wall=1_700_000_000.0)
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=1.0, step=0.01)

        trades = market.trades("BTCUSDT", 1_000_000, 10_000)
        times = [t.trade_time_us for t in trades]

        assert times == sorted(times)
        assert 1_700_000_000_000_000 <= times[0]
        assert times[-1] <= 1_700_000_001_000_000
        assert all(t.event_time_us >= t.trade_time_us for t in trades)

    def test_lookups_outside_what_was_generated_fail_clearly(self) -> None:
        """Unknown symbols and ungenerated ids raise with the valid range."""
        clock = FakeClock()
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=0.5, step=0.1)

        with pytest.raises(KeyError, match="not listed"):
            market.trade("DOGEUSDT", 1)
        with pytest.raises(IndexError, match="ids 1000000.."):
            market.trade("BTCUSDT", 999_999)
        with pytest.raises(ValueError, match="stream"):
            market.last_id("BTCUSDT", "depth")

    def test_pages_start_at_from_id(self) -> None:
        """trades() and agg_trades() page ascending from from_id."""
        clock = FakeClock()
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=1.0, step=0.1)

        page = market.trades("BTCUSDT", 1_000_010, 5)
        aggs = market.agg_trades("BTCUSDT", 500_003, 2)

        assert [t.id for t in page] == list(range(1_000_010, 1_000_015))
        assert [a.id for a in aggs] == [500_003, 500_004]

    def test_storage_is_compact(self) -> None:
        """Trades cost tens of bytes each, so 2 M fit well under 200 MB."""
        clock = FakeClock()
        spec = SymbolSpec("BTCUSDT", base="BTC", quote="USDT", rate=200_000.0)
        market = Market([spec], seed=7, clock=clock)
        run(market, clock, seconds=1.0, step=0.1)

        tape = market.tape("BTCUSDT")
        columns = (
            tape.trade_size,
            tape.agg_price,
            tape.agg_first,
            tape.agg_time,
            tape.agg_event,
            tape.agg_maker,
        )
        per_trade = sum(sys.getsizeof(c) for c in columns) / tape.trade_count

        assert per_trade < 40


class TestFrames:
    def test_trade_frames_encode_the_ground_truth(self) -> None:
        """Encoded trade frames carry exactly the recorded trade, in ms or µs."""
        clock = FakeClock()
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=1.0, step=0.1)
        tape = market.tape("BTCUSDT")

        for micro in (False, True):
            frames = trade_frames(tape, 0, tape.agg_count, Variant(False, micro))
            events = parse_frames("".join(frames).encode("latin-1"))
            divisor = 1 if micro else 1000

            assert len(events) == tape.trade_count
            for event in events:
                truth = market.trade("BTCUSDT", event["t"])  # type: ignore[arg-type]
                assert event == {
                    "e": "trade",
                    "E": truth.event_time_us // divisor,
                    "s": "BTCUSDT",
                    "t": truth.id,
                    "p": truth.price,
                    "q": truth.quantity,
                    "T": truth.trade_time_us // divisor,
                    "m": truth.buyer_is_maker,
                    "M": True,
                }

    def test_frames_stay_exact_when_ids_gain_a_digit(self) -> None:
        """Frame lengths stay right across an id that gains a digit (999 -> 1000)."""
        clock = FakeClock()
        spec = SymbolSpec("BTCUSDT", base="BTC", quote="USDT", rate=2000.0, first_id=1)
        market = Market([spec], seed=7, clock=clock)
        run(market, clock, seconds=1.0, step=1.0)
        tape = market.tape("BTCUSDT")

        frames = trade_frames(tape, 0, tape.agg_count, Variant(True, False))
        events = parse_frames("".join(frames).encode("latin-1"))

        assert [e["data"]["t"] for e in events] == list(  # type: ignore[index]
            range(1, tape.trade_count + 1)
        )

    def test_agg_trade_frames_encode_the_ground_truth(self) -> None:
        """Encoded aggTrade frames carry the recorded aggregate, in its envelope."""
        clock = FakeClock()
        market = Market([BTC], seed=7, clock=clock)
        run(market, clock, seconds=1.0, step=0.1)
        tape = market.tape("BTCUSDT")

        frames = agg_trade_frames(tape, 0, tape.agg_count, Variant(True, False))
        events = parse_frames("".join(frames).encode("latin-1"))

        for event in events:
            assert event["stream"] == "btcusdt@aggTrade"
            data = event["data"]
            truth = market.agg_trade("BTCUSDT", data["a"])  # type: ignore[index]
            assert data == {
                "e": "aggTrade",
                "E": truth.event_time_us // 1000,
                "s": "BTCUSDT",
                "a": truth.id,
                "p": truth.price,
                "q": truth.quantity,
                "f": truth.first_trade_id,
                "l": truth.last_trade_id,
                "T": truth.trade_time_us // 1000,
                "m": truth.buyer_is_maker,
                "M": True,
            }


class TestRunning:
    async def test_listeners_get_every_trade_once_in_order(self) -> None:
        """A running market hands each tick's new trades to listeners exactly once."""
        market = Market([BTC, ETH], seed=7, tick=0.01, clock=SystemClock())
        seen: dict[str, list[TapeSlice]] = {"BTCUSDT": [], "ETHUSDT": []}

        def listen(slices: list[TapeSlice]) -> None:
            for piece in slices:
                seen[piece.tape.symbol].append(piece)

        market.add_listener(listen)

        market.start()
        await asyncio.sleep(0.3)
        market.stop()

        for symbol, slices in seen.items():
            assert slices, symbol
            assert slices[0].trade_lo == 0
            for before, after in zip(slices, slices[1:], strict=False):
                assert after.trade_lo == before.trade_hi
                assert after.agg_lo == before.agg_hi
            assert slices[-1].trade_hi == market.count(symbol)

    async def test_stop_ends_generation(self) -> None:
        """After stop() the tapes no longer grow and running is False."""
        market = Market([BTC], seed=7, tick=0.01, clock=SystemClock())
        market.start()
        await asyncio.sleep(0.1)

        market.stop()
        count = market.count("BTCUSDT")
        await asyncio.sleep(0.1)

        assert not market.running
        assert count > 0
        assert market.count("BTCUSDT") == count


class TestSymbolSpec:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"symbol": "btcusdt"}, "upper-case"),
            ({"status": "OPEN"}, "status"),
            ({"price": "1.123456789"}, "8 decimals"),
            ({"rate": -1.0}, "rate"),
        ],
    )
    def test_bad_specs_are_refused(
        self, kwargs: dict[str, object], message: str
    ) -> None:
        """A SymbolSpec that Binance could not list is refused with a reason."""
        fields: dict[str, object] = {
            "symbol": "BTCUSDT",
            "base": "BTC",
            "quote": "USDT",
        }
        fields.update(kwargs)

        with pytest.raises(ValueError, match=message):
            SymbolSpec(**fields)  # type: ignore[arg-type]
