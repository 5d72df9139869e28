"""``k2stream demo`` and ``k2stream exchange``: the bundled exchange at work.

The demo is a rehearsal of the promises: the bundled exchange runs on free
loopback ports, the service captures it while faults are injected on a
schedule, and the summary compares the store with the exchange's ground
truth. The market stops first and the pipeline drains, so the comparison
covers every trade published from the first one received to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from k2stream.config import resolve
from k2stream.exchange import Exchange, ExchangeConfig, SymbolSpec
from k2stream.observe.logs import configure
from k2stream.records import BINANCE, StreamKey
from k2stream.service import Service


DEMO_SINK = "sqlite:///data/demo.db"
QUOTES = ("USDT", "USDC", "FDUSD", "BTC", "ETH", "BNB", "EUR", "TRY")


@dataclass(frozen=True, slots=True)
class Fault:
    at: float
    name: str
    action: Callable[[Exchange], Any]


def symbol_specs(symbols: list[str], rate: float) -> tuple[SymbolSpec, ...]:
    """Specs for the demo market (ours, so it may split symbols by suffix)."""
    specs = []
    for index, symbol in enumerate(symbols):
        quote = next(
            (q for q in QUOTES if symbol.endswith(q) and symbol != q), symbol[-4:]
        )
        specs.append(
            SymbolSpec(
                symbol,
                base=symbol[: -len(quote)],
                quote=quote,
                rate=rate / (1 + index % 3),
                price=f"{100 * (index + 1) ** 3}.00",
            )
        )
    return tuple(specs)


def fault_schedule(duration: float) -> list[Fault]:
    """A mix of the failures k2stream promises to survive, spread over the run."""
    plan: list[tuple[float, str, Callable[[Exchange], Any]]] = [
        (0.12, "kill every connection", lambda ex: ex.faults.kill()),
        (
            0.24,
            "freeze the primary for 4 s",
            lambda ex: ex.faults.freeze(4.0, endpoint=0),
        ),
        (0.40, "garbage: 200 malformed frames", lambda ex: ex.faults.garbage(200)),
        (0.50, "refuse the primary for 6 s, then kill", _refuse_then_kill),
        (0.75, "serverShutdown on every connection", lambda ex: ex.faults.shutdown()),
        (0.85, "stall the active endpoints for 3 s", lambda ex: ex.faults.stall(3.0)),
    ]
    return [Fault(duration * at, name, action) for at, name, action in plan]


def _refuse_then_kill(exchange: Exchange) -> None:
    exchange.faults.refuse(6.0, endpoint=0)
    exchange.faults.kill(endpoint=0)


async def run_demo(args: argparse.Namespace) -> int:
    flags = dict(vars(args))
    duration = float(flags.pop("duration", None) or 20.0)
    flags.setdefault("sink", None)
    sink = flags.get("sink") or DEMO_SINK
    if sink == DEMO_SINK:
        _remove_demo_store()

    base = resolve(
        {"symbols": flags.get("symbols"), "log_format": flags.get("log_format")}
    )
    # Quieter than `run` unless asked: the status line and the summary are the demo's output.
    configure(base.log_format, args.log_level or "warning")
    specs = symbol_specs(base.symbols, args.rate)
    config = ExchangeConfig(
        symbols=specs, seed=args.seed, ws_ports=(0, 0, 0), lifetime=duration / 3
    )

    async with Exchange(config) as exchange:
        overrides = {
            "endpoint": exchange.ws_urls,
            "rest_url": exchange.rest_url,
            "sink": sink,
            "duration": None,
        }
        timings = {
            "reconnect_delay": "0.5",
            "max_reconnect_delay": "4",
            "stable_after": "2",
            "failback_interval": "3",
            "recovery_timeout": "3",
            "health_check_interval": "1",
            "backfill_grace": "0.5",
        }
        for name, value in timings.items():
            if flags.get(name) is None:
                flags[name] = value
        settings = resolve({**flags, **overrides})
        configure(
            settings.log_format, settings.log_level if args.log_level else "warning"
        )
        service = Service(settings)
        return await _drive(
            service, exchange, duration, args.faults == "mix", settings.sink
        )


def _remove_demo_store() -> None:
    """The demo market is deterministic: last run's rows would mask this run's."""
    for suffix in ("", "-wal", "-shm"):
        Path("data/demo.db" + suffix).unlink(missing_ok=True)


async def _drive(
    service: Service, exchange: Exchange, duration: float, faults: bool, sink: str
) -> int:
    task = asyncio.create_task(service.run())
    await asyncio.wait(
        {task, asyncio.create_task(service.started.wait())},
        return_when=asyncio.FIRST_COMPLETED,
    )
    if task.done():
        return task.result()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, service.stop)

    start = time.monotonic()
    schedule = fault_schedule(duration) if faults else []
    while not task.done() and (elapsed := time.monotonic() - start) < duration:
        while schedule and schedule[0].at <= elapsed:
            fault = schedule.pop(0)
            _line(f"fault at {elapsed:5.1f}s: {fault.name}", end="\n")
            fault.action(exchange)
        _line(_status_line(service, elapsed))
        await asyncio.sleep(0.5)

    exchange.market.stop()
    _line("market stopped; draining the pipeline", end="\n")
    await drain(service, exchange, within=30.0)
    service.stop()
    code = await task
    _line("", end="")
    print(_summary(service, exchange, sink), flush=True)
    return code


async def drain(service: Service, exchange: Exchange, within: float) -> None:
    """Wait until every published id has reached the sink, or ``within`` seconds."""
    deadline = time.monotonic() + within
    await asyncio.sleep(0.5)
    await service.heal_tail()
    while time.monotonic() < deadline:
        pending = False
        for key in service.sequencer.keys():
            last = exchange.market.last_id(key.symbol, key.stream)
            if last is None:
                continue
            if (service.sequencer.last_id(key) or -1) < last or service.sequencer.gaps(
                key
            ):
                pending = True
        if not pending and service.writer is not None and service.writer.backlog == 0:
            return
        await asyncio.sleep(0.2)


def _summary(service: Service, exchange: Exchange, sink: str) -> str:
    """Compare the store with the ground truth, from the first id stored to the last published.

    The store's primary key rules out a second row for an id, so
    ``duplicates`` counts rows beyond the ids the market published; it is
    the same line a JSONL or Kafka comparison would print.
    """
    from k2stream.sinks.store import count_ids, counts

    path = _path(sink)
    found = counts(path)
    generated = stored = missing = duplicates = 0
    for spec in exchange.config.symbols:
        for stream in service.settings.streams:
            key = StreamKey(BINANCE, spec.symbol, stream)
            last = exchange.market.last_id(spec.symbol, stream)
            if last is None or key not in found:
                continue
            rows, first, _ = found[key]
            distinct = count_ids(path, key, first, last)
            expected = last - first + 1
            generated += expected
            stored += distinct
            missing += expected - distinct
            duplicates += rows - distinct
    return f"generated {generated}, stored {stored}, missing {missing}, duplicates {duplicates}"


def _path(sink: str) -> str:
    return sink.removeprefix("sqlite:///")


def _status_line(service: Service, elapsed: float) -> str:
    supervisor = service.supervisor
    link = supervisor.link if supervisor is not None else None
    where = link.endpoint.label if link is not None else "reconnecting"
    writer = service.writer
    durable = sum(writer.durable_checkpoints.values()) if writer else 0
    gaps = sum(service.sequencer.missing(k) for k in service.sequencer.keys())
    delivered = service.backfiller.healed_trades if service.backfiller else 0
    return (
        f"{elapsed:5.1f}s  {where:<22} backlog {writer.backlog if writer else 0:>6}"
        f"  missing now {gaps:>5}  healed {delivered:>6}  checkpoint-sum {durable}"
    )


def _line(text: str, end: str = "\r") -> None:
    if sys.stderr.isatty():
        print(f"\x1b[2K{text}", end=end, file=sys.stderr, flush=True)
    elif end == "\n":
        print(text, file=sys.stderr, flush=True)


async def run_exchange(args: argparse.Namespace) -> int:
    """Serve the bundled exchange until SIGINT or SIGTERM."""
    symbols = [s.strip().upper() for s in args.symbols.split(",") if s.strip()]
    ports = tuple(args.ws_port) if args.ws_port else (0,) * args.endpoints
    config = ExchangeConfig(
        symbols=symbol_specs(symbols, args.rate),
        seed=args.seed,
        host=args.host,
        ws_ports=ports,
        rest_port=args.rest_port,
        control_port=args.control_port,
        lifetime=args.lifetime,
        ping_interval=args.ping_interval,
    )
    configure("auto", "info")  # to stderr: stdout carries only the URLs
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Exchange(config) as exchange:
        print(
            json.dumps(
                {
                    "ws": exchange.ws_urls,
                    "rest": exchange.rest_url,
                    "control": exchange.control_url,
                }
            ),
            flush=True,
        )
        await stop.wait()
    return 0
