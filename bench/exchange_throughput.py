"""How many trade messages per second the bundled exchange delivers to one client.

The exchange runs in this process with one symbol at a very high rate; the
client runs in a child process, so the two do not share a core and the
number measures delivery, not a shared event loop. The server's own CPU use
is printed too: below 100 % means the exchange was not the bottleneck.

The client is aiohttp (``decode_text=False``, counting text frames), as a
k2stream connection would be. ``--raw`` swaps it for a bare socket that
only walks frame headers, which costs far less per message than aiohttp and
so shows how much the exchange itself can push.

    PYTHONPATH=src .venv/bin/python bench/exchange_throughput.py --seconds 8
    PYTHONPATH=src .venv/bin/python bench/exchange_throughput.py --seconds 8 --raw
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from urllib.parse import urlsplit

import aiohttp
import structlog

from k2stream.exchange import Exchange, ExchangeConfig, SymbolSpec


async def count_frames(url: str, seconds: float, warmup: float) -> dict[str, object]:
    """Connect with aiohttp, skip ``warmup`` s, then count text frames for ``seconds``."""
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


async def count_raw_frames(
    url: str, seconds: float, warmup: float
) -> dict[str, object]:
    """Handshake on a bare socket, then count frames by walking their headers."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    await reader.readuntil(b"\r\n\r\n")

    counting_from = time.monotonic() + warmup
    deadline = counting_from + seconds
    counted = 0
    pending = b""
    first_payload = last_payload = b""
    now = counting_from
    while now < deadline:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        now = time.monotonic()
        data = pending + chunk
        position = 0
        frames = 0
        while True:
            if position + 4 > len(data):
                break
            size = data[position + 1]
            header = 2
            if size == 126:
                size = int.from_bytes(data[position + 2 : position + 4], "big")
                header = 4
            end = position + header + size
            if end > len(data):
                break
            if counted == 0 and frames == 0 and now >= counting_from:
                first_payload = data[position + header : end]
            last_payload = data[position + header : end]
            position = end
            frames += 1
        pending = data[position:]
        if now >= counting_from:
            counted += frames
    writer.close()
    await writer.wait_closed()

    elapsed = max(1e-9, min(now, deadline) - counting_from)
    return {
        "messages": counted,
        "seconds": elapsed,
        "per_second": counted / elapsed,
        "consecutive": _trade_id(last_payload) - _trade_id(first_payload)
        == counted - 1,
        "ended": "time" if now >= deadline else "connection closed",
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
            "--raw-client" if args.raw else "--client",
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
    client_kind = "raw-socket" if args.raw else "aiohttp"
    return (
        f"exchange_throughput: 1 {client_kind} client, 1 symbol offered at "
        f"{args.rate:,.0f} trades/s (tick {args.tick} s): received "
        f"{result['per_second']:,.0f} msgs/s over {result['seconds']:.1f} s "
        f"(ended by {result['ended']}), ids consecutive={result['consecutive']}, "
        f"server CPU {server_cpu:.0%}, {generated:,} trades generated, "
        f"{forgone:,} forgone by a late loop"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=250_000.0)
    parser.add_argument("--tick", type=float, default=0.01)
    parser.add_argument(
        "--raw", action="store_true", help="count with a bare socket, not aiohttp"
    )
    parser.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--raw-client", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client or args.raw_client:
        count = count_raw_frames if args.raw_client else count_frames
        url = args.raw_client or args.client
        result = asyncio.run(count(url, args.seconds, args.warmup))
        print(json.dumps(result))
        return
    print(asyncio.run(serve_and_measure(args)))


if __name__ == "__main__":
    main()
