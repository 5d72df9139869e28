"""Scale-out: shards, streams split across connections, redundant connections."""

from __future__ import annotations

import asyncio

from conftest import (
    assert_complete,
    exchange_config,
    metric_value,
    settings_for,
    wait_for,
)
from k2stream.exchange import Exchange, SymbolSpec
from k2stream.service import shard_symbols
from k2stream.sinks.store import counts


FOUR = (
    SymbolSpec("BTCUSDT", base="BTC", quote="USDT", rate=100.0, price="50000.00"),
    SymbolSpec("ETHUSDT", base="ETH", quote="USDT", rate=100.0, price="3000.00"),
    SymbolSpec("ADAUSDT", base="ADA", quote="USDT", rate=50.0, price="0.50"),
    SymbolSpec("SOLUSDT", base="SOL", quote="USDT", rate=50.0, price="150.00"),
)


def test_shards_partition_symbols_stably():
    """Every symbol lands in exactly one shard, the same one on every run and host."""
    symbols = [f"SYM{i}USDT" for i in range(200)]
    shards = [shard_symbols(symbols, i, 3) for i in range(3)]

    assert sorted(symbols) == sorted(s for shard in shards for s in shard)
    assert all(shards)
    assert ["BTCUSDT", "ADAUSDT"] == shard_symbols([s.symbol for s in FOUR], 1, 2)


async def test_two_shards_capture_every_symbol_exactly_once(start_service, tmp_path):
    """Instances with --shard 0/2 and 1/2 together store every symbol, each in one store only."""
    async with Exchange(exchange_config(symbols=FOUR)) as exchange:
        dbs = [tmp_path / "s0.db", tmp_path / "s1.db"]
        runs = [
            await start_service(settings_for(exchange, db, shard=f"{i}/2"))
            for i, db in enumerate(dbs)
        ]
        await wait_for(
            lambda: all(r.service.delivered > 200 for r in runs),
            what="both shards flowing",
        )
        exchange.market.stop()
        for run in runs:
            assert 0 == await run.stop(exchange)

        stored = [{key.symbol for key in counts(db)} for db in dbs]
        assert not stored[0] & stored[1]
        assert {s.symbol for s in FOUR} == stored[0] | stored[1]
        for db, symbols in zip(dbs, stored, strict=True):
            assert_complete(exchange, db, symbols=symbols)


async def test_streams_beyond_one_connection_are_split(
    exchange, start_service, tmp_path
):
    """With two streams per connection, two symbols times two streams use two connections."""
    db = tmp_path / "t.db"
    run = await start_service(
        settings_for(exchange, db, streams="trade,aggTrade", streams_per_connection="2")
    )
    await wait_for(lambda: run.service.delivered > 500, what="flowing")

    assert 2 == len(run.service.supervisors)
    assert 2 == sum(exchange.stats.connections)
    assert 0 == await run.stop(exchange)
    assert_complete(exchange, db, ("trade", "aggTrade"))


async def test_redundant_connections_survive_a_kill_without_backfill(
    exchange, start_service, tmp_path
):
    """With redundancy 2, killing either connection leaves no gap and needs no REST."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db, redundancy="2"))
    await wait_for(
        lambda: all(s.link is not None for s in run.service.supervisors),
        what="both connected",
    )
    endpoints = {s.link.endpoint.index for s in run.service.supervisors}
    assert 2 == len(endpoints), "the two connections share an endpoint"
    await wait_for(lambda: run.service.delivered > 500, what="flowing")

    for index in sorted(endpoints):
        before = run.service.delivered
        exchange.faults.kill(endpoint=index)
        await wait_for(
            lambda before=before: run.service.delivered > before + 300,
            what="still flowing",
        )
        await asyncio.sleep(0.5)

    assert 0 == await run.stop(exchange, within=5)
    assert_complete(exchange, db)
    for symbol in ("BTCUSDT", "ETHUSDT"):
        assert 0 == metric_value(
            run.service, "k2_binance_gaps_detected_total", symbol=symbol, stream="trade"
        )
        assert 0 == metric_value(
            run.service,
            "k2_binance_backfilled_trades_total",
            symbol=symbol,
            stream="trade",
        )
