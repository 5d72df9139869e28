"""How many trades per second a sink stores, in batches as the writer cuts them.

Run from the repository root::

    PYTHONPATH=src .venv/bin/python bench/sink_throughput.py
    PYTHONPATH=src .venv/bin/python bench/sink_throughput.py --sink jsonl
    PYTHONPATH=src .venv/bin/python bench/sink_throughput.py --synchronous full

``--through-writer`` pushes the trades through :class:`SinkWriter` on an event
loop instead of calling ``Sink.write`` directly, to show what the asyncio
side costs on top. Files go to a temporary directory unless ``--dir`` says
otherwise; the best of ``--repeat`` runs is reported.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import structlog

from k2stream.observe.metrics import Metrics
from k2stream.records import StreamKey, Trade
from k2stream.sinks.base import Sink
from k2stream.sinks.jsonl import JsonlSink
from k2stream.sinks.sqlite import SqliteSink, Synchronous
from k2stream.sinks.writer import SinkWriter


SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")


def make_trades(count: int) -> list[Trade]:
    """``count`` trades spread over a few symbols, ids consecutive per symbol."""
    trades = []
    for n in range(count):
        symbol = SYMBOLS[n % len(SYMBOLS)]
        trades.append(
            Trade(
                exchange="BINANCE",
                symbol=symbol,
                stream="trade",
                id=10_000_000 + n // len(SYMBOLS),
                price=f"{60000 + n % 997}.{n % 100:02d}000000",
                quantity=f"0.{n % 100000:05d}000",
                trade_time_us=1_700_000_000_000_000 + n * 100,
                event_time_us=1_700_000_000_000_050 + n * 100,
                buyer_is_maker=n % 3 == 0,
                best_match=True,
                base_asset=symbol[:-4],
                quote_asset="USDT",
                source="ws",
                endpoint="stream.binance.com:9443",
                received_us=1_700_000_000_000_900 + n * 100,
            )
        )
    return trades


def open_sink(kind: str, directory: Path, synchronous: str) -> Sink:
    if kind == "sqlite":
        return SqliteSink(
            directory / "trades.db", synchronous=cast(Synchronous, synchronous)
        )
    return JsonlSink(directory / "trades.jsonl")


def watermarks(trades: list[Trade]) -> dict[StreamKey, int]:
    last: dict[StreamKey, int] = {}
    for trade in trades:
        last[trade.key] = trade.id
    return last


def run_direct(sink: Sink, trades: list[Trade], batch_size: int) -> tuple[float, float]:
    """Wall and CPU seconds to write ``trades`` with Sink.write, batch by batch."""
    batches = [
        (batch, watermarks(batch))
        for batch in (
            trades[start : start + batch_size]
            for start in range(0, len(trades), batch_size)
        )
    ]
    sink.open()

    started, cpu_started = time.perf_counter(), time.process_time()
    for batch, checkpoints in batches:
        sink.write(batch, checkpoints)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    sink.close()
    return elapsed, cpu


async def run_writer(
    sink: Sink, trades: list[Trade], batch_size: int
) -> tuple[float, float]:
    """Wall and CPU seconds to offer ``trades`` to a SinkWriter and drain it."""
    offered: dict[StreamKey, int] = {}

    def checkpoints() -> Mapping[StreamKey, int]:
        return offered

    writer = SinkWriter(
        sink,
        Metrics(),
        checkpoints=checkpoints,
        batch_size=batch_size,
        max_backlog=len(trades) + 1,
    )
    await writer.start()

    started, cpu_started = time.perf_counter(), time.process_time()
    for n, trade in enumerate(trades):
        writer.offer(trade)
        offered[trade.key] = trade.id
        if n % batch_size == 0:
            await asyncio.sleep(0)
    await writer.drain()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started

    await writer.close()
    return elapsed, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sink", choices=("sqlite", "jsonl"), default="sqlite")
    parser.add_argument("--trades", type=int, default=500_000)
    parser.add_argument("--batch-size", type=int, default=5000)
    parser.add_argument("--synchronous", choices=("normal", "full"), default="normal")
    parser.add_argument("--through-writer", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()

    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING)
    )
    trades = make_trades(args.trades)
    rates, cpu_rates = [], []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            sink = open_sink(args.sink, Path(tmp), args.synchronous)
            if args.through_writer:
                elapsed, cpu = asyncio.run(run_writer(sink, trades, args.batch_size))
            else:
                elapsed, cpu = run_direct(sink, trades, args.batch_size)
        rates.append(len(trades) / elapsed)
        cpu_rates.append(len(trades) / cpu)

    # On a shared machine the wall-clock rate says as much about the
    # neighbours as about the sink; the CPU-time rate is the sink's own cost.
    how = "SinkWriter" if args.through_writer else "Sink.write"
    extra = f", synchronous={args.synchronous}" if args.sink == "sqlite" else ""
    print(
        f"{args.sink}{extra}: {len(trades)} trades in batches of {args.batch_size} "
        f"via {how}\n"
        f"  wall clock: best {max(rates):,.0f} trades/s "
        f"(runs: {', '.join(f'{r:,.0f}' for r in rates)})\n"
        f"  per CPU second: best {max(cpu_rates):,.0f} trades/s\n"
        f"  load average during the run: {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
