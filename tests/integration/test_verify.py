"""`k2stream verify`: find the holes in a store, and heal them from REST."""

from __future__ import annotations

import argparse
import sqlite3

from conftest import assert_complete, settings_for, wait_for
from k2stream.records import BINANCE, StreamKey
from k2stream.sinks.store import missing_ranges
from k2stream.verify import run_verify


def arguments(db, exchange, repair: bool) -> argparse.Namespace:
    return argparse.Namespace(
        sink=f"sqlite:///{db}",
        symbols=None,
        repair=repair,
        rest_url=exchange.rest_url,
        rest_url_us=exchange.rest_url,
    )


async def test_verify_lists_holes_and_repair_heals_them(
    exchange, start_service, tmp_path, capsys
):
    """Holes cut into a store are listed with their ranges; --repair fills them from REST."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db))
    await wait_for(lambda: run.service.delivered > 1000, what="a capture")
    assert 0 == await run.stop(exchange)
    key = StreamKey(BINANCE, "BTCUSDT", "trade")
    with sqlite3.connect(db) as conn:
        first = conn.execute(
            "SELECT min(id) FROM trades WHERE symbol = 'BTCUSDT'"
        ).fetchone()[0]
        conn.execute(
            "DELETE FROM trades WHERE symbol = 'BTCUSDT' AND (id BETWEEN ? AND ? OR id = ?)",
            (first + 10, first + 29, first + 100),
        )
    assert {
        key: [(first + 10, first + 29), (first + 100, first + 100)]
    } == missing_ranges(db)

    assert 1 == await run_verify(arguments(db, exchange, repair=False))
    listed = capsys.readouterr().out
    assert f"{first + 10}..{first + 29}" in listed
    assert "21 missing in 2 range(s)" in listed

    assert 0 == await run_verify(arguments(db, exchange, repair=True))
    assert "no missing ids" in capsys.readouterr().out.splitlines()[-1]
    assert {} == missing_ranges(db)
    assert_complete(exchange, db)


async def test_verify_of_a_complete_store_exits_0(
    exchange, start_service, tmp_path, capsys
):
    """A store without holes is reported as such."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db))
    await wait_for(lambda: run.service.delivered > 300, what="a capture")
    assert 0 == await run.stop(exchange)

    assert 0 == await run_verify(arguments(db, exchange, repair=False))
    assert "no missing ids" in capsys.readouterr().out
