"""Recovery: time without data after each failure, and time to heal a gap from REST.

A bundled exchange with three endpoints runs in a child process; the service
runs in this process with production settings (only ``stable_after`` is
shortened, so the bench need not wait 30 s between faults; a stable
connection is what earns the immediate first reconnect). A tap on
``StreamSession.on_frame`` notes when each connection delivered its first
data frame. Each scenario waits
for a stable connection, injects one fault on the endpoint in use, and
measures:

* without data: from the fault to the first live trade after it;
* detected: from the fault to the moment the service let go of the faulted
  connection (for stall and freeze this is the watchdog's silence limit);
* healed: from the fault to the moment the ids missed meanwhile are durable,
  fetched from REST.

Scenarios: ``kill`` (TCP reset), ``stall`` (socket open, nothing sent, pings
unanswered), ``freeze`` (data stops, pings answered), ``refuse`` (the
endpoint refuses handshakes with 503 and its connection is killed; another
endpoint is available). Then ``gap``: the service stops cleanly, the market
runs on for ``--gap`` trades, and a new service on the same store heals the
hole from REST within Binance's request-weight budget. The store is audited
at the end. Run from the repository root::

    PYTHONPATH=src .venv/bin/python bench/recovery.py
    PYTHONPATH=src .venv/bin/python bench/recovery.py --repeat 3 --gap 10000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
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
    keys_of,
    progress,
    quiet_logs,
    report,
    running_service,
    service_settings,
    until,
    wait_connected,
)

from k2stream.binance.feed import StreamSession
from k2stream.binance.rest import WEIGHTS
from k2stream.config import Settings
from k2stream.records import StreamKey
from k2stream.service import Service
from k2stream.sinks.store import checkpoints


Inject = Callable[[ExchangeProcess, int], Awaitable[Any]]


async def _kill(exchange: ExchangeProcess, endpoint: int) -> None:
    await exchange.fault("kill", endpoint=endpoint)


async def _stall(exchange: ExchangeProcess, endpoint: int) -> None:
    await exchange.fault("stall", seconds=10.0, endpoint=endpoint)


async def _freeze(exchange: ExchangeProcess, endpoint: int) -> None:
    await exchange.fault("freeze", seconds=10.0, endpoint=endpoint)


async def _refuse(exchange: ExchangeProcess, endpoint: int) -> None:
    # The primary refuses, whichever endpoint is in use: the reconnect tries
    # it first, is refused, and must go on to the next one.
    await exchange.fault("refuse", seconds=10.0, endpoint=0)
    await exchange.fault("kill")


SCENARIOS: dict[str, Inject] = {
    "kill": _kill,
    "stall": _stall,
    "freeze": _freeze,
    "refuse": _refuse,
}


class FrameTap:
    """Notes, per connection, when its first and latest data frame arrived.

    Installed by wrapping ``StreamSession.on_frame`` (one session per
    connection) for the life of the bench; nothing in ``src/`` changes.
    """

    def __init__(self) -> None:
        self.first: dict[object, float] = {}
        self.last: dict[object, float] = {}

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        real_on_frame = StreamSession.on_frame

        def on_frame(session: StreamSession, frame: bytes) -> None:
            if frame.startswith(b'{"stream"'):
                now = time.monotonic()
                self.first.setdefault(session, now)
                self.last[session] = now
            real_on_frame(session, frame)

        setattr(StreamSession, "on_frame", on_frame)  # noqa: B010 - a method is replaced
        try:
            yield
        finally:
            setattr(StreamSession, "on_frame", real_on_frame)  # noqa: B010

    def data_since(self, session: object) -> float | None:
        """When ``session`` delivered its first data frame, if it has."""
        return self.first.get(session)

    def first_data_after(self, moment: float) -> float | None:
        """The first data frame of the first connection opened after ``moment``."""
        return min((t for t in self.first.values() if t > moment), default=None)


async def scenario(
    name: str,
    inject: Inject,
    exchange: ExchangeProcess,
    service: Service,
    tap: FrameTap,
) -> dict[str, Any]:
    """Inject one fault on the endpoint in use; time the outage, detection and healing."""
    supervisor = service.supervisor
    assert supervisor is not None
    await until(
        lambda: supervisor.link is not None and supervisor.link.stable,
        within=120,
        what="a stable connection",
        poll=0.05,
    )
    await asyncio.sleep(0.5)
    old = supervisor.link
    assert old is not None
    key = keys_of(exchange)[0]
    backfilled = counter_total(service.metrics.backfilled)

    faulted_at = time.monotonic()
    await inject(exchange, old.endpoint.index)
    detected_at = await until(
        lambda: supervisor.link is not old,
        within=120,
        what="the fault noticed",
        poll=0.002,
    )
    await until(
        lambda: (
            supervisor.link is not None
            and tap.data_since(supervisor.link.session) is not None
        ),
        within=120,
        what="data on a new connection",
        poll=0.005,
    )
    new = supervisor.link
    assert new is not None
    resumed_at = tap.data_since(new.session) or 0.0
    target = service.sequencer.last_id(key) or 0
    healed_at = await until(
        lambda: durable(service, key) >= target and not service.sequencer.gaps(key),
        within=120,
        what="the gap healed",
        poll=0.01,
    )

    return {
        "scenario": name,
        "endpoint_faulted": old.endpoint.label,
        "endpoint_after": new.endpoint.label,
        "without_data_s": resumed_at - faulted_at,
        "detected_s": detected_at - faulted_at,
        "healed_s": healed_at - faulted_at,
        "healed_trades": counter_total(service.metrics.backfilled) - backfilled,
    }


async def clear(exchange: ExchangeProcess) -> None:
    """End every fault, so that the next scenario starts from a healthy exchange."""
    await exchange.fault("clear")


async def heal_gap(
    exchange: ExchangeProcess, settings: Settings, tap: FrameTap, gap: int
) -> tuple[dict[StreamKey, int], dict[str, Any]]:
    """Start on the store of a stopped service once ``gap`` trades went by; time the healing.

    Returns the market's last ids (it is stopped and its tail stored at the
    end) and the timings.
    """
    key = keys_of(exchange)[0]
    checkpoint = checkpoints(settings.sink.removeprefix("sqlite:///"))[key]
    await until_market(exchange, key, checkpoint + gap)

    started = time.monotonic()
    async with running_service(settings) as service:
        sequencer = service.sequencer
        await until(
            lambda: (sequencer.last_id(key) or 0) > checkpoint,
            30,
            "live data",
            poll=0.002,
        )
        gaps = sequencer.gaps(key)
        first_live = gaps[0][1] + 1 if gaps else checkpoint + 1
        live_at = tap.first_data_after(started) or time.monotonic()
        healed_at = await until(
            lambda: durable(service, key) >= first_live and not sequencer.gaps(key),
            within=300,
            what=f"the {gap:,}-trade gap healed",
            poll=0.01,
        )
        metrics = service.metrics
        pages = _rest_requests(metrics.rest_requests, "/api/v3/historicalTrades")
        refusals = counter_total(metrics.rate_limited) + counter_total(metrics.bans)
        healed = counter_total(metrics.backfilled)

        # Stop the market and store its tail, so that the audit can cover it all.
        await exchange.stop_market()
        last = await final_ids(exchange)
        await until(
            lambda: all(durable(service, k) >= v for k, v in last.items()),
            within=120,
            what="the tail stored",
            poll=0.05,
        )

    return last, {
        "gap_trades": first_live - checkpoint - 1,
        "healed_trades": healed,
        "first_live_after_start_s": live_at - started,
        "healed_after_first_live_s": healed_at - live_at,
        "rest_requests": pages,
        "rest_weight": pages * WEIGHTS["/api/v3/historicalTrades"],
        "rate_limited_or_banned": refusals,
        "backfill_grace_s": settings.backfill_grace,
    }


def _rest_requests(counter: Any, path: str) -> float:
    """Requests to ``path`` counted by ``k2_binance_rest_requests_total``."""
    return float(
        sum(
            sample.value
            for metric in counter.collect()
            for sample in metric.samples
            if sample.name.endswith("_total") and path in sample.labels.values()
        )
    )


async def until_market(exchange: ExchangeProcess, key: StreamKey, last_id: int) -> None:
    """Until the market has published ``last_id`` for ``key``."""
    while True:
        if (await exchange.last_id(key.symbol) or 0) >= last_id:
            return
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = MarketPlan(rates=(args.rate,), endpoints=3)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        db = Path(tmp) / "trades.db"
        async with ExchangeProcess(plan) as exchange:
            settings = service_settings(
                exchange, f"sqlite:///{db}", stable_after=str(args.stable_after)
            )
            runs = []
            tap = FrameTap()
            with tap.installed():
                async with running_service(settings) as service:
                    await wait_connected(service)
                    for _ in range(args.repeat):
                        for name in args.scenarios:
                            result = await scenario(
                                name, SCENARIOS[name], exchange, service, tap
                            )
                            progress(f"  {result}")
                            runs.append(result)
                            await clear(exchange)

                progress(f"gap of {args.gap:,} trades across a restart")
                last, gap = await heal_gap(exchange, settings, tap, args.gap)
            progress(f"  {gap}")
        audit = audit_sqlite(db, last, first=None)

    return {
        "settings": {
            name: getattr(settings, name)
            for name in (
                "stable_after",
                "reconnect_delay",
                "health_check_timeout",
                "heartbeat_interval",
                "heartbeat_timeout",
                "backfill_grace",
                "failback_interval",
            )
        },
        "scenarios": _by_scenario(runs),
        "runs": runs,
        "gap": gap,
        "audit": audit,
    }


def _by_scenario(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    table: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["scenario"] for r in runs):
        mine = [r for r in runs if r["scenario"] == name]
        table[name] = {
            f"{measure}_{how}": fn([r[measure] for r in mine])
            for measure in ("without_data_s", "detected_s", "healed_s")
            for how, fn in (("median", statistics.median), ("max", max))
        }
    return table


def _summary(result: dict[str, Any]) -> str:
    parts = [
        f"{name} {row['without_data_s_median']:.2f} s without data "
        f"(max {row['without_data_s_max']:.2f}), healed {row['healed_s_median']:.2f} s"
        for name, row in result["scenarios"].items()
    ]
    gap = result["gap"]
    audit = result["audit"]
    verdict = (
        "store complete" if audit["missing"] == 0 else f"{audit['missing']} MISSING"
    )
    parts.append(
        f"{gap['gap_trades']:,}-trade gap healed {gap['healed_after_first_live_s']:.2f} s "
        f"after the first live trade ({gap['rest_requests']:.0f} REST requests, "
        f"weight {gap['rest_weight']:.0f} of 6000/min, "
        f"{gap['rate_limited_or_banned']:.0f} refusals)"
    )
    return "; ".join(parts) + f"; {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--scenarios",
        type=lambda text: [s for s in text.split(",") if s],
        default=list(SCENARIOS),
        help=f"comma-separated, from {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rate", type=float, default=2000.0, help="trades/s")
    parser.add_argument("--gap", type=int, default=10_000, help="trades to heal")
    parser.add_argument("--stable-after", type=float, default=3.0, help="seconds")
    parser.add_argument("--dir", type=Path, default=None, help="where the store goes")
    add_json_option(parser)
    args = parser.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(
            f"unknown scenario(s) {sorted(unknown)}; use {', '.join(SCENARIOS)}"
        )

    quiet_logs()
    result = asyncio.run(run(args))
    report("recovery", _summary(result), result, args.json)


if __name__ == "__main__":
    main()
