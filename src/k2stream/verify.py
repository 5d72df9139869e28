"""``k2stream verify``: audit a store for missing ids, and repair from REST.

The audit reads the store only; it is safe while the service writes. The
repair fetches each missing range from the venue's REST API within the same
weight budget the service uses, and writes through the sink, whose key makes
a trade written twice stored once.
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp

from k2stream.binance.normalize import Normalizer
from k2stream.binance.rest import BinanceRest, RestError, RestRateLimited, fetch_page
from k2stream.clock import SYSTEM_CLOCK
from k2stream.feed.budget import WeightBudget
from k2stream.observe.metrics import Metrics
from k2stream.records import BINANCE, StreamKey
from k2stream.sinks.base import Sink, open_sink
from k2stream.sinks.store import missing_ranges


async def run_verify(args: argparse.Namespace) -> int:
    """Print the missing ranges; with ``--repair``, heal them. Exit 0 when none remain."""
    if not args.sink.startswith("sqlite:///"):
        print(
            f"k2stream verify: --sink {args.sink!r}: only sqlite:/// stores can be audited"
        )
        return 2
    path = args.sink.removeprefix("sqlite:///")
    symbols = (
        None
        if not args.symbols
        else {s.strip().upper() for s in args.symbols.split(",")}
    )

    holes = _filter(missing_ranges(path), symbols)
    _report(holes)
    if not holes or not args.repair:
        return 1 if holes else 0

    await _repair(args, holes)
    remaining = _filter(missing_ranges(path), symbols)
    print("after repair:")
    _report(remaining)
    return 1 if remaining else 0


def _filter(
    holes: dict[StreamKey, list[tuple[int, int]]], symbols: set[str] | None
) -> dict[StreamKey, list[tuple[int, int]]]:
    return {
        key: ranges
        for key, ranges in holes.items()
        if ranges and (symbols is None or key.symbol in symbols)
    }


def _report(holes: dict[StreamKey, list[tuple[int, int]]]) -> None:
    if not holes:
        print("no missing ids")
        return
    for key, ranges in sorted(holes.items()):
        total = sum(last - first + 1 for first, last in ranges)
        print(f"{key}: {total} missing in {len(ranges)} range(s)")
        for first, last in ranges[:50]:
            print(f"  {first}..{last}")
        if len(ranges) > 50:
            print(f"  ... {len(ranges) - 50} more")


async def _repair(
    args: argparse.Namespace, holes: dict[StreamKey, list[tuple[int, int]]]
) -> None:
    sink = open_sink(args.sink)
    sink.open()
    metrics = Metrics()
    try:
        async with aiohttp.ClientSession() as http:
            for venue in sorted({key.exchange for key in holes}):
                keys = [key for key in holes if key.exchange == venue]
                rest = BinanceRest(
                    args.rest_url if venue == BINANCE else args.rest_url_us,
                    session=http,
                    budget=WeightBudget(6000, clock=SYSTEM_CLOCK),
                    metrics=metrics,
                )
                symbols = sorted({key.symbol for key in keys})
                normalizer = Normalizer(venue, await rest.exchange_info(symbols))
                for key in keys:
                    for first, last in holes[key]:
                        await _repair_range(rest, normalizer, sink, key, first, last)
    finally:
        sink.close()


async def _repair_range(
    rest: BinanceRest,
    normalizer: Normalizer,
    sink: Sink,
    key: StreamKey,
    first: int,
    last: int,
) -> None:
    cursor = first
    while cursor <= last:
        try:
            trades = await fetch_page(
                rest, normalizer, key, cursor, last - cursor + 1, received_us=0
            )
        except RestRateLimited as exc:
            print(f"{key}: rate limited, waiting {exc.retry_after:.0f} s")
            await asyncio.sleep(exc.retry_after)
            continue
        except RestError as exc:
            print(f"{key}: cannot repair {cursor}..{last}: {exc}")
            return
        wanted = [t for t in trades if cursor <= t.id <= last]
        if not wanted:
            print(f"{key}: {cursor}..{last} is no longer in the venue's history")
            return
        sink.write(wanted, {})
        print(
            f"{key}: repaired {len(wanted)} ids from {wanted[0].id} to {wanted[-1].id}"
        )
        cursor = wanted[-1].id + 1
