"""End-to-end throughput: bundled exchange -> k2stream -> SQLite, and -> JSONL.

Every phase starts a fresh exchange in a child process (its own core) with
the market stopped, connects, starts the market and lets it publish a fixed
number of trades as fast as it can (``--rate`` per symbol, far above what one
Python client can take in), then stops it. What the client has not read yet
waits in the exchange's send buffer, so the client runs flat out from the
first trade to the last: the figure is the client's own ceiling, not the
market's rate. A phase ends when the last id is durable in the sink; then
the store is audited for every id (a fast but lossy run is not a result).

Three phases run on the same market (same seed, same trades):

* raw: an aiohttp client that only receives each frame and decodes it with
  ``k2stream.binance.messages.decode`` - the ceiling for any Python consumer
  on this stack;
* sqlite and jsonl: the whole service (``k2stream.service.Service``) in this
  process, with production settings.

CPU per trade is this process's CPU time (event loop and sink thread) over
the phase divided by the trades. Run from the repository root::

    PYTHONPATH=src .venv/bin/python bench/pipeline_throughput.py
    PYTHONPATH=src .venv/bin/python bench/pipeline_throughput.py --trades 200000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from common import (
    ExchangeProcess,
    MarketPlan,
    add_json_option,
    audit_jsonl,
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
from k2stream.binance.messages import Envelope, TradeEvent, decode
from k2stream.binance.streams import combined_url, names_for
from k2stream.records import TRADE


async def raw_phase(plan: MarketPlan) -> dict[str, Any]:
    """Receive and decode every frame, nothing more: the ceiling."""
    async with (
        ExchangeProcess(plan) as exchange,
        aiohttp.ClientSession() as http,
        http.ws_connect(
            combined_url(exchange.ws_urls[0], names_for(plan.symbols, [TRADE])),
            compress=0,
            max_msg_size=4 * 1024 * 1024,
            decode_text=False,
        ) as ws,
    ):
        newest = dict.fromkeys(plan.symbols, 0)
        gaps = 0
        wanted = plan.stop_after or 0
        final: dict[str, int] | None = None
        watch = _ExchangeWatch(exchange, wanted)

        started, cpu_started, exchange_cpu = _mark(exchange)
        await exchange.start_market()
        async for message in ws:
            event = decode(message.data)
            if type(event) is not Envelope or type(event.data) is not TradeEvent:
                continue
            trade = event.data
            if trade.id != newest[trade.symbol] + 1:
                gaps += 1
            newest[trade.symbol] = trade.id

            if final is None and min(newest.values()) >= wanted:
                final = {k.symbol: v for k, v in (await final_ids(exchange)).items()}
            if final is not None and newest == final:
                break
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        exchange_cpu = exchange.cpu_seconds() - exchange_cpu
        generated_in = await watch.finish()

    trades = sum(newest.values())
    return {
        "trades": trades,
        "seconds": elapsed,
        "trades_per_second": trades / elapsed,
        "cpu_us_per_trade": cpu / trades * 1e6,
        "exchange_cpu_share": exchange_cpu / elapsed,
        "exchange_generated_in_seconds": generated_in,
        "missing": gaps,
    }


async def service_phase(plan: MarketPlan, sink: str, path: Path) -> dict[str, Any]:
    """The whole service, from the first trade published to the last made durable."""
    async with ExchangeProcess(plan) as exchange:
        settings = service_settings(exchange, sink)
        async with running_service(settings) as service:
            await wait_connected(service)
            keys = keys_of(exchange)
            wanted = plan.stop_after or 0
            watch = _ExchangeWatch(exchange, wanted)

            started, cpu_started, exchange_cpu = _mark(exchange)
            await exchange.start_market()
            await until(
                lambda: all(durable(service, k) >= wanted for k in keys),
                within=600,
                what=f"{wanted} trades per symbol made durable",
                poll=0.005,
            )
            last = await final_ids(exchange)
            await until(
                lambda: all(durable(service, k) >= last[k] for k in keys),
                within=60,
                what="the last trades made durable",
                poll=0.005,
            )
            elapsed = time.perf_counter() - started
            cpu = time.process_time() - cpu_started
            exchange_cpu = exchange.cpu_seconds() - exchange_cpu
            generated_in = await watch.finish()

            metrics = service.metrics
            reconnects = counter_total(metrics.reconnects)
            backfilled = counter_total(metrics.backfilled)
            dropped = counter_total(metrics.sink_dropped)

    audit = audit_sqlite(path, last) if sink.startswith("sqlite") else audit_jsonl(path, last)
    trades = sum(last.values())
    return {
        "sink": sink.partition(":")[0],
        "trades": trades,
        "seconds": elapsed,
        "trades_per_second": trades / elapsed,
        "cpu_us_per_trade": cpu / trades * 1e6,
        "exchange_cpu_share": exchange_cpu / elapsed,
        "exchange_generated_in_seconds": generated_in,
        "reconnects": reconnects,
        "backfilled": backfilled,
        "sink_refused": dropped,
        **audit,
    }


class _ExchangeWatch:
    """Notes when the market has published everything: proof it was not the bottleneck."""

    def __init__(self, exchange: ExchangeProcess, wanted: int) -> None:
        self._exchange = exchange
        self._wanted = wanted
        self._started = time.perf_counter()
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> float:
        symbols = self._exchange.plan.symbols
        self._started = time.perf_counter()
        while True:
            ids = [await self._exchange.last_id(s) or 0 for s in symbols]
            if min(ids) >= self._wanted:
                return time.perf_counter() - self._started
            await asyncio.sleep(0.05)

    async def finish(self) -> float | None:
        if not self._task.done():
            self._task.cancel()
        try:
            return await self._task
        except asyncio.CancelledError:
            return None


def _mark(exchange: ExchangeProcess) -> tuple[float, float, float]:
    return time.perf_counter(), time.process_time(), exchange.cpu_seconds()


def _summary(phases: dict[str, dict[str, Any]]) -> str:
    raw = phases.get("raw")
    parts = []
    for name in ("sqlite", "jsonl"):
        phase = phases.get(name)
        if phase is None:
            continue
        ratio = f", {phase['trades_per_second'] / raw['trades_per_second']:.2f} of raw" if raw else ""
        complete = "complete" if phase["missing"] == 0 and phase["rows"] == phase["expected"] else (
            f"INCOMPLETE: {phase['missing']} missing, {phase['rows']} rows for {phase['expected']}"
        )
        parts.append(
            f"{name} {phase['trades_per_second']:,.0f} trades/s "
            f"({phase['cpu_us_per_trade']:.1f} us CPU/trade{ratio}, {complete})"
        )
    if raw:
        parts.append(
            f"raw receive+decode {raw['trades_per_second']:,.0f} trades/s "
            f"({raw['cpu_us_per_trade']:.1f} us CPU/trade)"
        )
    trades = max(p["trades"] for p in phases.values())
    return f"{trades:,} trades; " + "; ".join(parts)


async def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    rates = tuple([args.rate] * args.symbols)
    plan = MarketPlan(
        rates=rates,
        tick=args.tick,
        start_stopped=True,
        stop_after=args.trades // args.symbols,
    )
    phases: dict[str, dict[str, Any]] = {}
    for name in args.phases:
        progress(f"phase {name}: {plan.stop_after:,} trades x {args.symbols} symbols")
        if name == "raw":
            phases[name] = await raw_phase(plan)
        else:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                path = Path(tmp) / ("trades.db" if name == "sqlite" else "trades.jsonl")
                phases[name] = await service_phase(plan, f"{name}:///{path}", path)
        progress(f"  {phases[name]}")
    return phases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000, help="trades in total")
    parser.add_argument("--symbols", type=int, default=1, choices=(1, 2, 3, 4))
    parser.add_argument(
        "--rate", type=float, default=400_000.0, help="trades/s offered per symbol"
    )
    parser.add_argument("--tick", type=float, default=0.01, help="market step, s")
    parser.add_argument(
        "--phases",
        type=lambda text: text.split(","),
        default=["raw", "sqlite", "jsonl"],
        help="comma-separated: raw, sqlite, jsonl",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go")
    add_json_option(parser)
    args = parser.parse_args()

    quiet_logs()
    phases = asyncio.run(run(args))
    report("pipeline_throughput", _summary(phases), phases, args.json)


if __name__ == "__main__":
    main()
