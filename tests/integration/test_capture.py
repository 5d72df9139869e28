"""Capturing the bundled exchange end to end, over real loopback sockets."""

from __future__ import annotations

import asyncio

from conftest import assert_complete, settings_for, wait_for


async def test_a_multi_symbol_capture_equals_the_ground_truth(
    exchange, start_service, tmp_path
):
    """Two symbols, trades and aggTrades, captured for a while: every id once, fields exact."""
    db = tmp_path / "trades.db"
    run = await start_service(settings_for(exchange, db, streams="trade,aggTrade"))
    await wait_for(lambda: run.service.delivered > 500, what="trades stored")
    await asyncio.sleep(1.0)

    assert 0 == await run.stop(exchange)
    totals = assert_complete(exchange, db, ("trade", "aggTrade"))
    assert all(count > 100 for count in totals.values()), totals
