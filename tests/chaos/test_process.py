"""The service as a process: signals, kill -9, a locked store, bad symbols, giving up."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

from conftest import FAST, assert_complete, wait_for
from k2stream.demo import drain
from k2stream.sinks.store import checkpoints, counts


def command(exchange, db: Path, *extra: str) -> list[str]:
    args = [
        sys.executable,
        "-m",
        "k2stream",
        "run",
        "--rest-url",
        exchange.rest_url,
        "--sink",
        f"sqlite:///{db}",
    ]
    for url in exchange.ws_urls:
        args += ["--endpoint", url]
    for name, value in FAST.items():
        args += ["--" + name.replace("_", "-"), value]
    return args + list(extra)


async def spawn(args: list[str]) -> asyncio.subprocess.Process:
    env = {**os.environ, "K2_LOG_FORMAT": "json"}
    return await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env
    )


def stored(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        return sum(rows for rows, _, _ in counts(db).values())
    except (sqlite3.Error, ValueError):
        # The file exists a moment before its schema does.
        return 0


async def lock_store(db: Path, seconds: float) -> asyncio.subprocess.Process:
    """Another process holding the store's write lock for ``seconds``; returns once held."""
    holder = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import sqlite3,sys,time; c=sqlite3.connect(sys.argv[1], isolation_level=None);"
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True);"
        "time.sleep(float(sys.argv[2])); c.execute('COMMIT')",
        str(db),
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
    )
    assert holder.stdout is not None
    assert b"locked" in await holder.stdout.readline()
    return holder


async def test_sigterm_flushes_checkpoints_and_exits_0(exchange, tmp_path):
    """SIGTERM mid-stream: exit 0 within 5 s, and every checkpointed id is stored."""
    db = tmp_path / "t.db"
    process = await spawn(command(exchange, db))
    await wait_for(lambda: stored(db) > 500, within=20, what="trades stored")

    started = asyncio.get_running_loop().time()
    process.send_signal(signal.SIGTERM)
    code = await asyncio.wait_for(process.wait(), 10)
    took = asyncio.get_running_loop().time() - started
    _, stderr = await process.communicate()

    assert 0 == code, stderr.decode()[-2000:]
    assert took < 5.0
    events = [
        json.loads(line)["event"]
        for line in stderr.decode().splitlines()
        if line.startswith("{")
    ]
    assert "signal_received" in events and "service_stopped" in events
    for key, last_id in checkpoints(db).items():
        rows, first, _ = counts(db)[key]
        assert last_id - first + 1 <= rows, (
            f"{key}: checkpoint {last_id} ahead of the stored ids"
        )


async def test_kill_9_then_restart_heals_the_hole_without_duplicates(
    exchange, tmp_path
):
    """kill -9, a pause, a restart: resume from the checkpoint and heal the hole from REST."""
    db = tmp_path / "t.db"
    first = await spawn(command(exchange, db))
    await wait_for(lambda: stored(db) > 500, within=20, what="trades stored")
    first.kill()
    await first.wait()
    await asyncio.sleep(1.0)  # the market runs on while nobody listens

    second = await spawn(command(exchange, db))
    before = stored(db)
    await wait_for(lambda: stored(db) > before + 800, within=20, what="capture resumed")
    exchange.market.stop()
    await asyncio.sleep(1.5)
    second.send_signal(signal.SIGTERM)
    assert 0 == await asyncio.wait_for(second.wait(), 10)
    _, stderr = await second.communicate()

    assert_complete(exchange, db)
    events = [
        json.loads(line)
        for line in stderr.decode().splitlines()
        if line.startswith("{")
    ]
    assert any(e["event"] == "resuming" for e in events)
    assert any(e["event"] == "gap_healed" for e in events)


async def test_a_locked_store_delays_writes_but_loses_nothing(
    exchange, start_service, tmp_path
):
    """Another process holds the SQLite write lock for 2 s: writes wait, nothing is lost."""
    from conftest import settings_for

    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db, sink_busy_timeout="0.1"))
    await wait_for(lambda: run.service.delivered > 300, what="flowing")

    holder = await lock_store(db, seconds=2)
    await wait_for(
        lambda: not run.service.writer.available,
        within=5,
        what="the sink to notice the lock",
    )
    await holder.wait()
    await wait_for(
        lambda: run.service.writer.available, within=10, what="the sink to recover"
    )

    assert 0 == await run.stop(exchange)
    assert_complete(exchange, db)
    errors = run.service.metrics.registry.get_sample_value(
        "k2_sink_errors_total", {"sink": "sqlite", "reason": "busy"}
    )
    assert errors and errors >= 1


async def test_a_full_backlog_becomes_gaps_healed_once_the_store_is_back(
    exchange, start_service, tmp_path
):
    """Store locked past max_backlog: refused trades become gaps, healed from REST later."""
    from conftest import settings_for

    db = tmp_path / "t.db"
    settings = settings_for(exchange, db, sink_busy_timeout="0.1", max_backlog="200")
    run = await start_service(settings)
    await wait_for(lambda: run.service.delivered > 300, what="flowing")

    holder = await lock_store(db, seconds=3)
    metrics = run.service.metrics.registry
    await wait_for(
        lambda: (
            (
                metrics.get_sample_value(
                    "k2_sink_dropped_trades_total", {"sink": "sqlite"}
                )
                or 0
            )
            > 100
        ),
        within=8,
        what="trades refused by the full backlog",
    )
    await holder.wait()

    assert 0 == await run.stop(exchange, within=30)
    assert_complete(exchange, db)
    assert run.service.backfiller.healed_trades > 100


async def test_an_unknown_symbol_exits_2_naming_it(exchange, tmp_path):
    """A symbol the venue does not list stops start-up with exit 2 and its name."""
    db = tmp_path / "t.db"
    process = await spawn(command(exchange, db, "--symbols", "BTCUSDT,NOPEUSDT"))
    code = await asyncio.wait_for(process.wait(), 20)
    stdout, stderr = await process.communicate()

    assert 2 == code
    assert "NOPEUSDT" in stdout.decode()
    assert "BTCUSDT" not in stdout.decode().split("unknown symbol(s):")[1].split(";")[0]
    assert not db.exists() or stored(db) == 0


async def test_giving_up_exits_75_naming_every_endpoint(exchange, tmp_path):
    """Every endpoint refusing for longer than the attempts allow: exit 75 with what was tried."""
    db = tmp_path / "t.db"
    exchange.faults.refuse(60.0)
    args = command(exchange, db)
    args[args.index("--max-reconnect-attempts") + 1] = "3"
    process = await spawn(args)
    code = await asyncio.wait_for(process.wait(), 30)
    stdout, stderr = await process.communicate()
    text = stdout.decode()

    assert 75 == code, stderr.decode()[-2000:]
    assert "gave up after 3 failed connection attempts" in text
    for url in exchange.ws_urls:
        assert url in text
    assert "HTTP 503" in text


async def test_refusing_for_long_logs_the_exponential_schedule(exchange, tmp_path):
    """While everything refuses, reconnect_scheduled events show base, doubling and cap."""
    db = tmp_path / "t.db"
    exchange.faults.refuse(60.0)
    args = command(
        exchange, db, "--reconnect-delay", "0.1", "--max-reconnect-delay", "0.8"
    )
    args[args.index("--max-reconnect-attempts") + 1] = "7"
    process = await spawn(args)
    await asyncio.wait_for(process.wait(), 30)
    _, stderr = await process.communicate()

    events = [
        json.loads(line)
        for line in stderr.decode().splitlines()
        if line.startswith("{")
    ]
    scheduled = [e for e in events if e["event"] == "reconnect_scheduled"]
    assert [0.1, 0.2, 0.4, 0.8, 0.8, 0.8] == [e["nominal"] for e in scheduled]
    assert [1, 2, 3, 4, 5, 6] == [e["attempt"] for e in scheduled]
    for event in scheduled:
        # Jitter only shortens a delay, by at most 20 % (the log rounds to 0.01 s).
        assert event["nominal"] * 0.8 - 0.01 <= event["delay"] <= event["nominal"]
        assert event["cause"] and event["endpoint"]


async def test_drain_helper_is_bounded(exchange, start_service, tmp_path):
    """The drain used by the demo returns once everything published is stored."""
    from conftest import settings_for

    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db))
    await wait_for(lambda: run.service.delivered > 200, what="flowing")
    exchange.market.stop()
    await asyncio.wait_for(drain(run.service, exchange, within=10), 12)

    assert 0 == await run.stop()
    assert_complete(exchange, db)
