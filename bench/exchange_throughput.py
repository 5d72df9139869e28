"""How many trade messages per second the bundled exchange delivers to one client.

The exchange runs in this process with one symbol at a very high rate; the
client (aiohttp, ``decode_text=False``, counting text frames) runs in a child
process, so the two do not share a core and the number measures delivery,
not a shared event loop. The server's own CPU use is printed too: below
100 % means the exchange was not the bottleneck.

    PYTHONPATH=src .venv/bin/python bench/exchange_throughput.py --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time

import aiohttp
import structlog

from k2stream.exchange import Exchange, ExchangeConfig, SymbolSpec


async def count_frames(url: str, seconds: float, warmup: float) -> dict[str, object]:
    """Connect, skip ``warmup`` seconds, then count text frames for ``seconds``."""
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(url, decode_text=False, max_msg_size=0) as ws,
    ):
        counting_from = time.monotonic() + warmup
        deadline = counting_from + seconds
        counted = 0
        first = last = b'{"t":0}'
        ended = "time"
        now = counting_from
        async for message in ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                ended = f"{message.type.name} {ws.close_code}"
                break
            now = time.monotonic()
            if now < counting_from:
                continue
            if now >= deadline:
                break
            if counted == 0:
                first = message.data
            last = message.data
            counted += 1

    elapsed = max(1e-9, min(now, deadline) - counting_from)
    return {
        "messages": counted,
        "seconds": elapsed,
        "per_second": counted / elapsed,
        "consecutive": _trade_id(last) - _trade_id(first) == counted - 1,
        "ended": ended,
    }


def _trade_id(data: bytes) -> int:
    return int(json.loads(data)["t"])


async def serve_and_measure(args: argparse.Namespace) -> str:
    """Run the exchange, start the client process, report one line."""
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(30),  # warnings and up
    )
    config = ExchangeConfig(
        symbols=(
            SymbolSpec(
                "BTCUSDT", base="BTC", quote="USDT", rate=args.rate, price="50000.00"
            ),
        ),
        tick=args.tick,
        max_send_buffer=256 * 1024 * 1024,
    )
    async with Exchange(config) as exchange:
        url = exchange.ws_urls[0] + "/ws/btcusdt@trade"
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            url,
            "--seconds",
            str(args.seconds),
            "--warmup",
            str(args.warmup),
            stdout=subprocess.PIPE,
        )

        await asyncio.sleep(args.warmup)
        cpu_before = time.process_time()
        wall_before = time.monotonic()
        output, _ = await client.communicate()
        server_cpu = (time.process_time() - cpu_before) / (
            time.monotonic() - wall_before
        )
        generated = exchange.market.count("BTCUSDT")
        forgone = exchange.market.forgone

    result = json.loads(output)
    return (
        f"exchange_throughput: 1 client, 1 symbol offered at {args.rate:,.0f} trades/s "
        f"(tick {args.tick} s): received {result['per_second']:,.0f} msgs/s over "
        f"{result['seconds']:.1f} s (ended by {result['ended']}), "
        f"ids consecutive={result['consecutive']}, server CPU {server_cpu:.0%}, "
        f"{generated:,} trades generated, {forgone:,} forgone by a late loop"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=250_000.0)
    parser.add_argument("--tick", type=float, default=0.01)
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client:
        result = asyncio.run(count_frames(args.client, args.seconds, args.warmup))
        print(json.dumps(result))
        return
    print(asyncio.run(serve_and_measure(args)))


if __name__ == "__main__":
    main()
