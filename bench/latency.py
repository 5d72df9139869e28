"""Latency per trade: frame arrival to hand-over to the sink, and to durable commit.

For each rate in ``--rates`` a bundled exchange in a child process publishes
one symbol at that rate, and the service in this process stores it in SQLite
with production settings. Two timings are taken per trade, after a warm-up:

* processing: from the moment aiohttp hands a frame to k2stream
  (``StreamSession.on_frame`` is entered) to the moment the trade has been
  offered to the sink writer (``on_frame`` returns; the offer is its last
  step), with ``time.perf_counter_ns``;
* durable: from ``Trade.received_us`` (stamped in ``on_frame`` as the frame
  arrives) to the end of the SQLite commit of the batch that holds it, by a
  measuring sink that wraps the real ``SqliteSink`` and notes the time after
  each ``write`` returns.

Both probes are installed by this script (``on_frame`` is wrapped, the
service's ``open_sink`` is swapped for one that wraps the sink); nothing in
``src/`` changes. Durable latency is mostly the writer's batching: a batch is
cut ``batch_interval`` (0.05 s) after its first trade or at ``batch_size``
trades. Run from the repository root::

    PYTHONPATH=src .venv/bin/python bench/latency.py
    PYTHONPATH=src .venv/bin/python bench/latency.py --rates 1000,10000 --seconds 20
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
from array import array
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from common import (
    ExchangeProcess,
    MarketPlan,
    add_json_option,
    counter_total,
    percentiles,
    progress,
    quiet_logs,
    report,
    running_service,
    service_settings,
    wait_connected,
)

import k2stream.service as service_module
from k2stream.binance.feed import StreamSession
from k2stream.records import StreamKey, Trade
from k2stream.sinks.base import Sink


POINTS = (50, 90, 99, 99.9)


class Probe:
    """Where the timings go; records only while ``active``."""

    def __init__(self) -> None:
        self.active = False
        self.processing_ns = array("q")
        self.durable_us = array("q")


class CommitTimer:
    """A sink that delegates to the real one and notes when each trade became durable.

    ``write`` runs in the writer's thread; the arrays are only read once the
    service has stopped.
    """

    def __init__(self, inner: Sink, probe: Probe) -> None:
        self.name = inner.name
        self._inner = inner
        self._probe = probe

    def open(self) -> dict[StreamKey, int]:
        return self._inner.open()

    def write(
        self, trades: Sequence[Trade], checkpoints: Mapping[StreamKey, int]
    ) -> None:
        self._inner.write(trades, checkpoints)
        committed_us = int(time.time() * 1_000_000)
        if self._probe.active:
            self._probe.durable_us.extend(
                committed_us - trade.received_us for trade in trades
            )

    def close(self) -> None:
        self._inner.close()


@contextlib.contextmanager
def instrumented(probe: Probe) -> Iterator[None]:
    """Wrap ``StreamSession.on_frame`` and the service's sink in probes, then restore them."""
    real_open_sink = getattr(service_module, "open_sink")  # noqa: B009
    real_on_frame = StreamSession.on_frame

    def open_sink(url: str, **options: Any) -> Sink:
        return CommitTimer(real_open_sink(url, **options), probe)

    def on_frame(session: StreamSession, frame: bytes) -> None:
        started = time.perf_counter_ns()
        real_on_frame(session, frame)
        if probe.active:
            probe.processing_ns.append(time.perf_counter_ns() - started)

    # The service looks its open_sink up in its own module at start-up.
    setattr(service_module, "open_sink", open_sink)  # noqa: B010
    setattr(StreamSession, "on_frame", on_frame)  # noqa: B010 - a method is replaced
    try:
        yield
    finally:
        setattr(service_module, "open_sink", real_open_sink)  # noqa: B010
        setattr(StreamSession, "on_frame", real_on_frame)  # noqa: B010


async def measure(rate: float, args: argparse.Namespace) -> dict[str, Any]:
    """Run the service against one symbol at ``rate`` trades/s; time every trade."""
    probe = Probe()
    plan = MarketPlan(rates=(rate,), tick=args.tick)
    with instrumented(probe), tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        async with ExchangeProcess(plan) as exchange:
            sink = f"sqlite:///{Path(tmp) / 'trades.db'}"
            settings = service_settings(exchange, sink)
            async with running_service(settings) as service:
                await wait_connected(service)
                await asyncio.sleep(args.warmup)
                probe.active = True
                await asyncio.sleep(args.seconds)
                probe.active = False
                await asyncio.sleep(settings.batch_interval * 4)
                reconnects = counter_total(service.metrics.reconnects)

    processing = percentiles([ns / 1000 for ns in probe.processing_ns], POINTS)
    durable = percentiles([us / 1000 for us in probe.durable_us], POINTS)
    return {
        "rate": rate,
        "tick": args.tick,
        "seconds": args.seconds,
        "frames": len(probe.processing_ns),
        "trades_durable": len(probe.durable_us),
        "processing_us": processing,
        "durable_ms": durable,
        "reconnects": reconnects,
        "batch_interval": settings.batch_interval,
        "batch_size": settings.batch_size,
    }


def _line(result: Mapping[str, Any]) -> str:
    p = result["processing_us"]
    d = result["durable_ms"]
    return (
        f"at {result['rate']:,.0f}/s processing p50 {p['p50']:.1f} us, "
        f"p99 {p['p99']:.1f} us, max {p['max']:,.0f} us; "
        f"durable p50 {d['p50']:.1f} ms, p99 {d['p99']:.1f} ms, max {d['max']:.1f} ms"
    )


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for rate in args.rates:
        progress(
            f"{rate:,.0f} trades/s for {args.seconds} s after {args.warmup} s of warm-up"
        )
        result = await measure(rate, args)
        progress(f"  {result}")
        results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rates",
        type=lambda text: [float(r) for r in text.split(",") if r],
        default=[1000.0, 10000.0],
        help="comma-separated trades/s",
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="measured, per rate"
    )
    parser.add_argument("--warmup", type=float, default=3.0, help="not measured, s")
    parser.add_argument("--tick", type=float, default=0.01, help="market step, s")
    parser.add_argument("--dir", type=Path, default=None, help="where the store goes")
    add_json_option(parser)
    args = parser.parse_args()

    quiet_logs()
    results = asyncio.run(run(args))
    report(
        "latency", "; ".join(_line(r) for r in results), {"runs": results}, args.json
    )


if __name__ == "__main__":
    main()
