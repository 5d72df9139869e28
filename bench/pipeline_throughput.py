"""End-to-end throughput: bundled exchange -> k2stream -> SQLite, and -> JSONL.

Each phase starts a fresh exchange in a child process (so it has a core of
its own), connects with the market stopped, then queues a burst: the market
publishes a fixed number of trades at ``--rate`` per symbol while this
process is blocked and reads nothing, so the whole burst waits in the
exchange's send buffer. Then the loop runs again and the client drains the
burst flat out. The figure is the client's own capacity from the first
frame read to the last trade made durable; the market's speed cannot limit
it, and the exchange only flushes its buffer meanwhile (its CPU share is
reported). ``--live`` instead lets the client read while the market
publishes, both processes busy at once.

Three phases run on the same market (same seed, same trades):

* raw: an aiohttp client that only receives each frame and decodes it with
  ``k2stream.binance.messages.decode``: the ceiling for any consumer in
  Python on this stack;
* sqlite and jsonl: the whole service (``k2stream.service.Service``) in this
  process with production settings, until the last id is durable.

Every phase ends with an audit: every id from 1 to the market's last stored
exactly once (a fast but lossy run is not a result). CPU per trade is this
process's CPU time over the phase (event loop and sink thread) divided by the
trades, also given per thread. Run from the repository root::

    PYTHONPATH=src .venv/bin/python bench/pipeline_throughput.py
    PYTHONPATH=src .venv/bin/python bench/pipeline_throughput.py --trades 200000 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
from common import (
    BENCH_DIR,
    ExchangeProcess,
    MarketPlan,
    add_json_option,
    audit_jsonl,
    audit_sqlite,
    counter_total,
    cpu_seconds,
    durable,
    final_ids,
    keys_of,
    progress,
    quiet_logs,
    report,
    running_service,
    service_settings,
    thread_cpu_seconds,
    until,
    wait_connected,
)

from k2stream.binance.messages import Envelope, TradeEvent, decode
from k2stream.binance.streams import combined_url, names_for
from k2stream.records import TRADE, StreamKey
from k2stream.service import Service, shard_symbols
from k2stream.sinks.store import checkpoints


DRAIN_LIMIT = 900.0
"""Seconds a phase may take before the bench gives up on it."""


class Window:
    """Wall and CPU time of one measured stretch, for this process and the exchange."""

    def __init__(self, exchange: ExchangeProcess) -> None:
        self._exchange = exchange
        self._wall = time.perf_counter()
        self._cpu = time.process_time()
        self._threads = thread_cpu_seconds()
        self._exchange_cpu = exchange.cpu_seconds()

    def close(self, trades: int) -> dict[str, Any]:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        threads = thread_cpu_seconds()
        per_thread = {
            f"{role}_cpu_us_per_trade": (seconds - self._threads.get(role, 0.0))
            / trades
            * 1e6
            for role, seconds in threads.items()
        }
        return {
            "trades": trades,
            "seconds": wall,
            "trades_per_second": trades / wall,
            "cpu_us_per_trade": cpu / trades * 1e6,
            **per_thread,
            "exchange_cpu_share": (self._exchange.cpu_seconds() - self._exchange_cpu)
            / wall,
            "load_average_1m": os.getloadavg()[0],
        }


async def raw_phase(plan: MarketPlan, live: bool) -> dict[str, Any]:
    """Receive and decode every frame, nothing more: the ceiling.

    The loop is shaped like ``Connection.read`` (one ``receive`` per frame) and
    checks only that ids follow each other.
    """
    url_names = names_for(plan.symbols, [TRADE])
    async with (
        ExchangeProcess(plan) as exchange,
        aiohttp.ClientSession() as http,
        http.ws_connect(
            combined_url(exchange.ws_urls[0], url_names),
            compress=0,
            max_msg_size=4 * 1024 * 1024,
            decode_text=False,
        ) as ws,
    ):
        generated_in = None
        expected: int | None = None
        if live:
            window = Window(exchange)
            await exchange.start_market()
        else:
            burst = exchange.queue_burst()
            generated_in, expected = burst.seconds, sum(burst.last.values())
            window = Window(exchange)

        wanted = (plan.stop_after or 0) * len(plan.symbols)
        newest = dict.fromkeys(plan.symbols, 0)
        received = gaps = 0
        while received != expected:
            message = await ws.receive()
            if message.type is not aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"the stream ended early: {message.type.name}")
            event = decode(message.data)
            if type(event) is not Envelope or type(event.data) is not TradeEvent:
                continue
            trade = event.data
            if trade.id != newest[trade.symbol] + 1:
                gaps += 1
            newest[trade.symbol] = trade.id
            received += 1
            if expected is None and received >= wanted:
                expected = sum((await final_ids(exchange)).values())
        result = window.close(received)

    return {**result, "exchange_generated_in_seconds": generated_in, "missing": gaps}


async def service_phase(
    plan: MarketPlan, sink: str, path: Path, live: bool, max_backlog: int
) -> dict[str, Any]:
    """The whole service, from the first frame read to the last trade made durable."""
    async with ExchangeProcess(plan) as exchange:
        settings = service_settings(exchange, sink, max_backlog=str(max_backlog))
        async with running_service(settings) as service:
            await wait_connected(service)
            keys = keys_of(exchange)
            generated_in = None
            if live:
                window = Window(exchange)
                await exchange.start_market()
                wanted = plan.stop_after or 0
                await until(
                    lambda: all(_received(service, k) >= wanted for k in keys),
                    within=600,
                    what=f"{wanted} trades per symbol received",
                    poll=0.005,
                )
                last = await final_ids(exchange)
            else:
                burst = exchange.queue_burst()
                generated_in, last = burst.seconds, burst.last
                window = Window(exchange)

            received_in = await _drain(service, last)
            result = window.close(sum(last.values()))

            metrics = service.metrics
            counts = {
                "reconnects": counter_total(metrics.reconnects),
                "backfilled": counter_total(metrics.backfilled),
                "sink_refused": counter_total(metrics.sink_dropped),
            }

    if sink.startswith("sqlite"):
        audit = audit_sqlite(path, last)
    else:
        audit = audit_jsonl(path, last)
    return {
        "sink": sink.partition(":")[0],
        "max_backlog": max_backlog,
        **result,
        "all_received_after_seconds": received_in,
        "exchange_generated_in_seconds": generated_in,
        **counts,
        **audit,
    }


async def sharded_phase(
    plan: MarketPlan, directory: Path, max_backlog: int
) -> dict[str, Any]:
    """One ``k2stream run --shard i/N`` process per symbol, each into its own store.

    Each process has its own interpreter and GIL: this is how k2stream scales
    out. The processes are stopped (SIGSTOP) while the burst is queued, so
    that they too drain it flat out once continued.
    """
    shards = len(plan.symbols)
    async with ExchangeProcess(plan) as exchange:
        stores = [directory / f"shard{i}.db" for i in range(shards)]
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "k2stream",
                "run",
                *[arg for url in exchange.ws_urls for arg in ("--endpoint", url)],
                "--rest-url",
                exchange.rest_url,
                "--symbols",
                ",".join(plan.symbols),
                "--shard",
                f"{i}/{shards}",
                "--sink",
                f"sqlite:///{store}",
                "--metrics-port",
                "0",
                "--max-backlog",
                str(max_backlog),
                "--log-level",
                "error",
                stdout=asyncio.subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(BENCH_DIR.parent / "src")},
            )
            for i, store in enumerate(stores)
        ]
        try:
            await until_async(
                lambda: _connected(exchange, shards), 30, "every shard connected"
            )
            for process in processes:
                process.send_signal(signal.SIGSTOP)
            burst = exchange.queue_burst()
            started = time.perf_counter()
            cpu = [cpu_seconds(process.pid) for process in processes]
            for process in processes:
                process.send_signal(signal.SIGCONT)

            done = await _stores_reach(stores, burst.last)
            elapsed = time.perf_counter() - started
            cpu = [cpu_seconds(p.pid) - c for p, c in zip(processes, cpu, strict=True)]
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGCONT)
                    process.terminate()
            for process in processes:
                await process.wait()

    trades = sum(burst.last.values())
    audits = [
        audit_sqlite(store, {key: last_id})
        for store, (key, last_id) in zip(stores, _shard_order(burst.last), strict=True)
    ]
    return {
        "processes": shards,
        "trades": trades,
        "seconds": elapsed,
        "trades_per_second": trades / elapsed,
        "cpu_us_per_trade": sum(cpu) / trades * 1e6,
        "per_process_seconds": done,
        "exchange_generated_in_seconds": burst.seconds,
        "load_average_1m": os.getloadavg()[0],
        "expected": sum(a["expected"] for a in audits),
        "rows": sum(a["rows"] for a in audits),
        "missing": sum(a["missing"] for a in audits),
    }


async def _connected(exchange: ExchangeProcess, count: int) -> bool:
    return await exchange.connections() >= count


async def until_async(
    condition: Callable[[], Awaitable[bool]], within: float, what: str
) -> None:
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {within} s")
        await asyncio.sleep(0.1)


def _shard_order(last: Mapping[StreamKey, int]) -> list[tuple[StreamKey, int]]:
    """Each shard's one key, in shard order (see ``service.shard_symbols``)."""
    symbols = [key.symbol for key in last]
    ordered = []
    for index in range(len(symbols)):
        owned = shard_symbols(symbols, index, len(symbols))
        if len(owned) != 1:
            raise ValueError(
                f"shard {index} of {len(symbols)} owns {owned}; the sharded phase "
                "needs symbols that hash to one shard each"
            )
        ordered += [(key, v) for key, v in last.items() if key.symbol == owned[0]]
    return ordered


async def _stores_reach(
    stores: list[Path], last: Mapping[StreamKey, int]
) -> list[float]:
    """Poll each store's checkpoints until its key is durable to the last id."""
    started = time.perf_counter()
    wanted = dict(zip(stores, _shard_order(last), strict=True))
    finished: dict[Path, float] = {}
    while len(finished) < len(stores):
        for store, (key, last_id) in wanted.items():
            if store not in finished and store.exists():
                with contextlib.suppress(FileNotFoundError, ValueError, sqlite3.Error):
                    if checkpoints(store).get(key, -1) >= last_id:
                        finished[store] = time.perf_counter() - started
        if time.perf_counter() - started > DRAIN_LIMIT:
            raise TimeoutError(f"the shards were not durable within {DRAIN_LIMIT} s")
        await asyncio.sleep(0.02)
    return [finished[store] for store in stores]


async def _drain(service: Service, last: Mapping[StreamKey, int]) -> float:
    """Wait until the last ids are durable; returns when they had all been received."""
    started = time.perf_counter()
    received_at = None
    while not all(durable(service, key) >= last_id for key, last_id in last.items()):
        if received_at is None and all(
            _received(service, key) >= last_id for key, last_id in last.items()
        ):
            received_at = time.perf_counter()
        if service.stopped:
            raise RuntimeError(
                "the service stopped before the burst was durable; its error "
                "log above says why"
            )
        if time.perf_counter() - started > DRAIN_LIMIT:
            raise TimeoutError(
                f"the burst was not durable within {DRAIN_LIMIT} s; received up to "
                f"{[_received(service, k) for k in last]}, durable up to "
                f"{[durable(service, k) for k in last]} of {list(last.values())}"
            )
        await asyncio.sleep(0.005)
    return (received_at or time.perf_counter()) - started


def _received(service: Service, key: StreamKey) -> int:
    return service.sequencer.last_id(key) or 0


def _summary(phases: Mapping[str, Mapping[str, Any]]) -> str:
    raw = phases.get("raw")
    parts = []
    for name in ("sqlite", "jsonl"):
        phase = phases.get(name)
        if phase is None:
            continue
        ratio = ""
        if raw:
            ratio = (
                f", {phase['trades_per_second'] / raw['trades_per_second']:.2f} of raw"
            )
        complete = phase["missing"] == 0 and phase["rows"] == phase["expected"]
        verdict = (
            "complete"
            if complete
            else (
                f"INCOMPLETE: {phase['missing']} missing, "
                f"{phase['rows']} rows for {phase['expected']}"
            )
        )
        parts.append(
            f"{name} {phase['trades_per_second']:,.0f} trades/s "
            f"({phase['cpu_us_per_trade']:.1f} us CPU/trade{ratio}, {verdict})"
        )
    sharded = phases.get("sharded")
    if sharded:
        complete = sharded["missing"] == 0 and sharded["rows"] == sharded["expected"]
        parts.append(
            f"sqlite in {sharded['processes']} shard processes "
            f"{sharded['trades_per_second']:,.0f} trades/s together "
            f"({sharded['cpu_us_per_trade']:.1f} us CPU/trade, "
            f"{'complete' if complete else 'INCOMPLETE'})"
        )
    if raw:
        verdict = "no gap" if raw["missing"] == 0 else f"{raw['missing']} GAPS"
        parts.append(
            f"raw receive+decode {raw['trades_per_second']:,.0f} trades/s "
            f"({raw['cpu_us_per_trade']:.1f} us CPU/trade, {verdict})"
        )
    trades = max(p["trades"] for p in phases.values())
    return f"{trades:,} trades; " + "; ".join(parts)


def _backlog_note(phases: Mapping[str, Mapping[str, Any]]) -> str:
    refused = sum(p.get("sink_refused", 0) for p in phases.values())
    healed = sum(p.get("backfilled", 0) for p in phases.values())
    if not refused and not healed:
        return ""
    return f"; {refused:,.0f} offers refused by a full backlog, {healed:,.0f} healed from REST"


async def run(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    plan = MarketPlan(
        rates=tuple([args.rate] * args.symbols),
        tick=args.tick,
        start_stopped=True,
        stop_after=args.trades // args.symbols,
    )
    mode = "live" if args.live else "queued burst"
    # The market overshoots stop_after by up to a few ticks of trades.
    max_backlog = args.max_backlog or 2 * args.trades
    phases: dict[str, dict[str, Any]] = {}
    for name in args.phases:
        progress(f"phase {name} ({mode}): {args.trades:,} trades")
        if name == "raw":
            phases[name] = await raw_phase(plan, args.live)
        elif name == "sharded":
            sharded = dataclasses.replace(
                plan,
                rates=(args.rate, args.rate),
                stop_after=args.trades // 2,
            )
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                phases[name] = await sharded_phase(sharded, Path(tmp), max_backlog)
        else:
            with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
                file = "trades.db" if name == "sqlite" else "trades.jsonl"
                path = Path(tmp) / file
                phases[name] = await service_phase(
                    plan, f"{name}:///{path}", path, args.live, max_backlog
                )
        progress("  " + ", ".join(f"{k}={_short(v)}" for k, v in phases[name].items()))
    return phases


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=1_000_000, help="trades in all")
    parser.add_argument("--symbols", type=int, default=1, choices=(1, 2, 3, 4))
    parser.add_argument(
        "--rate", type=float, default=400_000.0, help="trades/s offered per symbol"
    )
    parser.add_argument("--tick", type=float, default=0.01, help="market step, s")
    parser.add_argument(
        "--live",
        action="store_true",
        help="read while the market publishes instead of draining a queued burst",
    )
    parser.add_argument(
        "--phases",
        type=lambda text: [p for p in text.split(",") if p],
        default=["raw", "sqlite", "jsonl", "sharded"],
        help="comma-separated, from raw, sqlite, jsonl, sharded (two processes, "
        "one symbol each)",
    )
    parser.add_argument(
        "--max-backlog",
        type=int,
        default=None,
        help="the writer's buffer; by default twice the burst, so that it fits; "
        "250000 is production's",
    )
    parser.add_argument("--dir", type=Path, default=None, help="where the stores go")
    add_json_option(parser)
    args = parser.parse_args()
    unknown = set(args.phases) - {"raw", "sqlite", "jsonl", "sharded"}
    if unknown:
        parser.error(
            f"unknown phase(s) {sorted(unknown)}; use raw, sqlite, jsonl, sharded"
        )
    if "sharded" in args.phases and args.live:
        parser.error("the sharded phase drains a queued burst; drop --live")

    quiet_logs()
    phases = asyncio.run(run(args))
    summary = _summary(phases) + _backlog_note(phases)
    report("pipeline_throughput", summary, phases, args.json)


if __name__ == "__main__":
    main()
