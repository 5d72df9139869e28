"""Memory: RSS after start, after a burst of 1M trades, and over a compressed soak.

The service runs in this process against a bundled exchange in a child
process (two symbols), storing into SQLite, and this process's resident set
size is sampled every ``--sample`` seconds. The schedule is time-compressed
so that ten minutes hold what would take days on Binance:

1. start, connect, settle: "after start";
2. a burst of ``--burst`` trades at ``--burst-rate`` per symbol, the most the
   service takes without falling behind: "after 1M trades";
3. the soak: ``--minutes`` at ``--rate`` per symbol, with connections cut by
   the exchange after ``--lifetime`` seconds and replaced by the service
   make-before-break after ``--rotate-after`` (hundreds of rotations), and a
   fault every ``--fault-every`` seconds in turn: kill every connection,
   freeze the data for 3 s, 100 garbage frames.

At the end the market stops, the pipeline drains and the store is audited:
every id from the first stored to the market's last, exactly once. Growth is
the median RSS of the soak's last minute minus that of its first minute.
Durations are shortened where the soak needs it (reconnect backoff, backfill
grace, stability) and printed with the result. Run from the repository root::

    PYTHONPATH=src .venv/bin/python bench/memory_soak.py --minutes 10
    PYTHONPATH=src .venv/bin/python bench/memory_soak.py --minutes 1 --burst 200000
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import (
    ExchangeProcess,
    MarketPlan,
    add_json_option,
    audit_sqlite,
    counter_total,
    durable,
    final_ids,
    progress,
    quiet_logs,
    report,
    rss_mb,
    running_service,
    service_settings,
    until,
    wait_connected,
)

from k2stream.service import Service


SOAK_SETTINGS = {
    "reconnect_delay": "0.2",
    "max_reconnect_delay": "2",
    "stable_after": "1",
    "recovery_timeout": "2",
    "failback_interval": "5",
    "backfill_grace": "0.3",
    "max_reconnect_attempts": "0",
}
"""The production schedule, compressed; detection (watchdog, heartbeats) is unchanged."""

FAULTS: tuple[tuple[str, Callable[[ExchangeProcess], Awaitable[Any]]], ...] = (
    ("kill", lambda ex: ex.fault("kill")),
    ("freeze 3 s", lambda ex: ex.fault("freeze", seconds=3.0)),
    ("garbage x100", lambda ex: ex.fault("garbage", n=100)),
)


class Sampler:
    """RSS of this process every ``interval`` seconds, with the phase it belongs to."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.samples: list[tuple[float, str, float]] = []
        self.phase = "start"
        self._started = time.monotonic()
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            self.take()
            await asyncio.sleep(self.interval)

    def take(self) -> float:
        rss = rss_mb()
        self.samples.append(
            (round(time.monotonic() - self._started, 1), self.phase, rss)
        )
        return rss

    async def stop(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def of(
        self, phase: str, since: float = 0.0, until: float = float("inf")
    ) -> list[float]:
        return [
            rss for at, p, rss in self.samples if p == phase and since <= at < until
        ]


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    plan = MarketPlan(rates=(args.rate, args.rate), lifetime=args.lifetime, endpoints=3)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        db = Path(tmp) / "trades.db"
        async with ExchangeProcess(plan) as exchange:
            settings = service_settings(
                exchange,
                f"sqlite:///{db}",
                rotate_after=str(args.rotate_after),
                **SOAK_SETTINGS,
            )
            async with running_service(settings) as service:
                await wait_connected(service)
                sampler = Sampler(args.sample)
                try:
                    result = await _phases(args, exchange, service, sampler)
                finally:
                    await sampler.stop()

                await exchange.stop_market()
                last = await final_ids(exchange)
                await _drain(service, last)
                result.update(_counters(service))
            result["audit"] = audit_sqlite(db, last, first=None)

    result["samples"] = sampler.samples
    return result


async def _phases(
    args: argparse.Namespace,
    exchange: ExchangeProcess,
    service: Service,
    sampler: Sampler,
) -> dict[str, Any]:
    await asyncio.sleep(args.settle)
    after_start = sampler.take()
    progress(f"after start: {after_start:.1f} MiB")

    # The burst: only the delivered count matters, faults wait.
    sampler.phase = "burst"
    await exchange.set_rates([args.burst_rate, args.burst_rate])
    await until(
        lambda: service.delivered >= args.burst,
        within=args.burst / args.burst_rate * 4 + 60,
        what=f"{args.burst:,} trades delivered",
        poll=0.1,
    )
    await exchange.set_rates([args.rate, args.rate])
    await until(
        lambda: service.writer is not None and service.writer.backlog == 0, 60, "drain"
    )
    after_burst = sampler.take()
    progress(f"after {service.delivered:,} trades: {after_burst:.1f} MiB")

    sampler.phase = "soak"
    soak_started = time.monotonic()
    next_fault = soak_started + args.fault_every
    faults = 0
    end = soak_started + args.minutes * 60
    while (now := time.monotonic()) < end:
        if now >= next_fault:
            name, inject = FAULTS[faults % len(FAULTS)]
            await inject(exchange)
            faults += 1
            next_fault += args.fault_every
            progress(
                f"{(now - soak_started) / 60:5.1f} min: {name}; RSS "
                f"{sampler.samples[-1][2]:.1f} MiB, {service.delivered:,} trades"
            )
        await asyncio.sleep(0.5)

    soak_seconds = time.monotonic() - soak_started
    return {
        "after_start_mb": after_start,
        "after_burst_mb": after_burst,
        "burst_trades": args.burst,
        "faults_injected": faults,
        "soak_minutes": round(soak_seconds / 60, 2),
        **_growth(sampler, soak_seconds),
    }


def _growth(sampler: Sampler, soak_seconds: float) -> dict[str, float]:
    """Median RSS of the soak's first and last minutes, and the maximum."""
    soak = sampler.of("soak")
    if not soak:
        return {}
    start = min(at for at, p, _ in sampler.samples if p == "soak")
    window = min(60.0, soak_seconds / 2)
    first = sampler.of("soak", start, start + window)
    last = sampler.of("soak", start + soak_seconds - window)
    return {
        "soak_first_minute_mb": statistics.median(first),
        "soak_last_minute_mb": statistics.median(last),
        "soak_max_mb": max(soak),
        "soak_growth_mb": statistics.median(last) - statistics.median(first),
    }


async def _drain(service: Service, last: dict[Any, int]) -> None:
    await until(
        lambda: all(
            durable(service, key) >= last_id and not service.sequencer.gaps(key)
            for key, last_id in last.items()
        ),
        within=120,
        what="every id durable after the market stopped",
        poll=0.1,
    )


def _counters(service: Service) -> dict[str, float]:
    metrics = service.metrics
    return {
        "trades_delivered": service.delivered,
        "rotations": counter_total(metrics.rotations),
        "reconnects": counter_total(metrics.reconnects),
        "backfilled": counter_total(metrics.backfilled),
        "gaps_detected": counter_total(metrics.gaps_detected),
        "gaps_unhealable": counter_total(metrics.gaps_unhealable),
        "errors": counter_total(metrics.errors),
    }


def _summary(result: dict[str, Any]) -> str:
    audit = result["audit"]
    verdict = (
        "complete"
        if audit["missing"] == 0 and audit["rows"] == audit["expected"]
        else f"INCOMPLETE: {audit['missing']} missing, {audit['rows']} rows for "
        f"{audit['expected']}"
    )
    return (
        f"RSS after start {result['after_start_mb']:.1f} MiB, after "
        f"{result['burst_trades']:,} trades {result['after_burst_mb']:.1f} MiB; "
        f"{result['soak_minutes']:.1f} min soak: {result['soak_first_minute_mb']:.1f} -> "
        f"{result['soak_last_minute_mb']:.1f} MiB (growth "
        f"{result['soak_growth_mb']:+.1f} MiB, max {result['soak_max_mb']:.1f}); "
        f"{result['rotations']:.0f} rotations, {result['reconnects']:.0f} reconnects, "
        f"{result['faults_injected']} faults, {result['trades_delivered']:,} trades, "
        f"{verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="soak length")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="trades/s per symbol"
    )
    parser.add_argument(
        "--burst", type=int, default=1_000_000, help="trades in the burst"
    )
    parser.add_argument(
        "--burst-rate", type=float, default=15_000.0, help="trades/s per symbol"
    )
    parser.add_argument("--lifetime", type=float, default=4.0, help="connection cut, s")
    parser.add_argument("--rotate-after", type=float, default=3.0, help="rotation, s")
    parser.add_argument("--fault-every", type=float, default=20.0, help="seconds")
    parser.add_argument("--sample", type=float, default=5.0, help="RSS every N s")
    parser.add_argument(
        "--settle", type=float, default=5.0, help="before 'after start'"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the store goes")
    add_json_option(parser)
    args = parser.parse_args()

    quiet_logs()
    result = asyncio.run(soak(args))
    report("memory_soak", _summary(result), result, args.json)


if __name__ == "__main__":
    main()
