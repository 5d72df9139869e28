"""Each failure of the promise table, injected into the bundled exchange.

Every test ends with the store equal to the exchange's ground truth: every
id from the first stored to the market's last, once.
"""

from __future__ import annotations

import asyncio

from conftest import (
    assert_complete,
    exchange_config,
    metric_value,
    settings_for,
    wait_for,
)
from k2stream.exchange import Exchange


async def flowing(run, more: int = 300) -> None:
    """Wait until ``more`` trades beyond the current count have been delivered."""
    target = run.service.delivered + more
    await wait_for(
        lambda: run.service.delivered >= target, within=15, what=f"{more} more trades"
    )


async def test_kill_reconnects_and_heals(exchange, start_service, tmp_path):
    """Connections dropped without a close frame: reconnect at once, heal the gap."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db))
    await flowing(run)

    exchange.faults.kill()
    await flowing(run)
    exchange.faults.kill()
    await flowing(run)

    assert 0 == await run.stop(exchange)
    assert_complete(exchange, db)
    assert 2 <= metric_value(
        run.service,
        "k2_binance_reconnects_total",
        endpoint=_label(exchange, 0),
        reason="connection_lost",
    )


async def test_failover_while_the_primary_refuses_then_failback(
    exchange, start_service, tmp_path
):
    """The primary refuses longer than the maximum delay: traffic fails over, then returns."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db, failure_threshold="2"))
    await flowing(run)

    exchange.faults.refuse(4.0, endpoint=0)
    exchange.faults.kill(endpoint=0)
    supervisor = run.service.supervisor
    await wait_for(
        lambda: supervisor.link is not None and supervisor.link.endpoint.index == 1,
        what="failover",
    )
    await flowing(run)
    assert 1 == metric_value(run.service, "k2_binance_failover_active")

    await wait_for(
        lambda: supervisor.link is not None and supervisor.link.endpoint.index == 0,
        within=15,
        what="failback",
    )
    await flowing(run)
    assert 0 == metric_value(run.service, "k2_binance_failover_active")

    assert 0 == await run.stop(exchange)
    assert_complete(exchange, db)
    assert 1 <= metric_value(
        run.service, "k2_binance_rotations_total", reason="failback"
    )


async def test_stall_is_noticed_and_healed(exchange, start_service, tmp_path):
    """Socket open, no data, pings unanswered: the connection is replaced and the gap healed."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db))
    await flowing(run)

    exchange.faults.stall(3.0, endpoint=0)
    await wait_for(
        lambda: (
            metric_value(
                run.service, "k2_binance_stale_detections_total", reason="data_timeout"
            )
            + metric_value(
                run.service, "k2_binance_stale_detections_total", reason="heartbeat"
            )
            >= 1
        ),
        what="stale detection",
    )
    await flowing(run)

    assert 0 == await run.stop(exchange)
    assert_complete(exchange, db)


async def test_freeze_is_declared_stale_within_seconds_with_default_settings(
    exchange, start_service, tmp_path
):
    """A busy connection that goes silent (pings still answered) is replaced in under 5 s."""
    db = tmp_path / "t.db"
    defaults = {
        "health_check_interval": "30",
        "health_check_timeout": "60",
        "heartbeat_interval": "30",
        "heartbeat_timeout": "10",
    }
    run = await start_service(settings_for(exchange, db, **defaults))
    await flowing(run, 1500)
    loop = asyncio.get_running_loop()
    accepted_before = sum(exchange.stats.accepted)

    frozen_at = loop.time()
    exchange.faults.freeze(20.0, endpoint=0)
    await wait_for(
        lambda: (
            metric_value(
                run.service, "k2_binance_stale_detections_total", reason="data_timeout"
            )
            >= 1
        ),
        within=5,
        what="stale within 5 s",
    )
    await wait_for(
        lambda: sum(exchange.stats.accepted) > accepted_before,
        within=5,
        what="a new connection",
    )
    replaced_after = loop.time() - frozen_at
    await flowing(run)

    assert replaced_after < 5.0
    assert 0 == await run.stop(exchange)
    assert_complete(exchange, db)


async def test_429_then_418_on_the_handshake(exchange, start_service, tmp_path):
    """Retry-After is obeyed on 429 and on a 418 ban; both are counted; nothing is lost."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db))
    await flowing(run)

    exchange.faults.ratelimit(1.5, retry_after=1, endpoint=None)
    exchange.faults.kill()
    await wait_for(
        lambda: (
            metric_value(run.service, "k2_binance_rate_limited_total", kind="ws") >= 1
        ),
        what="429 counted",
    )
    await flowing(run)
    exchange.faults.ban(1.5, endpoint=None)
    exchange.faults.kill()
    await wait_for(
        lambda: metric_value(run.service, "k2_binance_bans_total", kind="ws") >= 1,
        what="418 counted",
    )
    await flowing(run)

    assert 0 == await run.stop(exchange)
    assert_complete(exchange, db)
    handshakes = sum(exchange.stats.handshakes)
    assert handshakes < 20, f"{handshakes} handshakes: Retry-After was not obeyed"


async def test_lifetime_cap_rotations_lose_and_duplicate_nothing(
    start_service, tmp_path
):
    """With a lifetime of 1.5 s, connections rotate make-before-break several times."""
    async with Exchange(exchange_config(lifetime=1.5)) as exchange:
        db = tmp_path / "t.db"
        run = await start_service(settings_for(exchange, db, rotate_after="1.0"))
        await wait_for(
            lambda: (
                metric_value(
                    run.service, "k2_binance_rotations_total", reason="lifetime"
                )
                >= 3
            ),
            within=20,
            what="3 rotations",
        )
        await flowing(run)

        assert 0 == await run.stop(exchange)
        assert_complete(exchange, db)


async def test_server_shutdown_is_followed_by_an_immediate_replacement(
    exchange, start_service, tmp_path
):
    """On serverShutdown a replacement opens at once."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db))
    await flowing(run)

    exchange.faults.shutdown()
    await wait_for(
        lambda: (
            metric_value(
                run.service, "k2_binance_rotations_total", reason="server_shutdown"
            )
            + metric_value(
                run.service,
                "k2_binance_reconnects_total",
                endpoint=_label(exchange, 0),
                reason="server_shutdown",
            )
            >= 1
        ),
        what="replacement",
    )
    await flowing(run)

    assert 0 == await run.stop(exchange)
    assert_complete(exchange, db)


async def test_garbage_frames_are_counted_and_the_capture_continues(
    exchange, start_service, tmp_path
):
    """1,000 malformed frames are counted one by one; the stream goes on untouched."""
    db = tmp_path / "t.db"
    run = await start_service(settings_for(exchange, db))
    await flowing(run)

    exchange.faults.garbage(1000)
    await wait_for(
        lambda: (
            metric_value(run.service, "k2_binance_errors_total", kind="malformed_frame")
            >= 1000
        ),
        what="1000 malformed frames",
    )
    await flowing(run)

    assert 0 == await run.stop(exchange)
    assert 1000 == metric_value(
        run.service, "k2_binance_errors_total", kind="malformed_frame"
    )
    assert_complete(exchange, db)


def _label(exchange: Exchange, index: int) -> str:
    return exchange.ws_urls[index].split("://", 1)[1]
