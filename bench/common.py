"""What the benchmarks share: a bundled exchange in its own process, a service
in this one, and the measuring, checking and reporting around them.

The exchange runs in a child process so that it has a core of its own: the
numbers then describe k2stream, not a loop shared with the market that feeds
it. The child is this file run as a script; it prints its URLs as one JSON
line, takes a few commands on stdin (change a symbol's rate, quit) and is
driven otherwise through the exchange's own control API (faults, market
start and stop, ground truth).

The service runs in the benchmark's process, so that the process CPU time
(event loop plus the sink thread) is k2stream's own and the bench can watch
its internals: the sequencer, the writer's durable checkpoints, the metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import platform
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Final

import aiohttp
import structlog

from k2stream.config import Settings, resolve
from k2stream.exchange import Exchange, ExchangeConfig, SymbolSpec
from k2stream.exchange.market import TapeSlice
from k2stream.records import BINANCE, TRADE, StreamKey
from k2stream.service import Service
from k2stream.sinks.store import count_ids, counts


BENCH_DIR: Final = Path(__file__).resolve().parent

CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
"""Units of the CPU times in /proc/<pid>/stat."""

PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")

PRICES: Final = ("50000.00", "3000.00", "600.00", "150.00")
"""Opening prices of the benchmark symbols, in listing order."""


# -- the machine and the report --------------------------------------------------------


def machine() -> dict[str, Any]:
    """What a figure depends on: cores, CPU model, Python, and how busy the box was."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "commit": _commit(),
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def _commit() -> str:
    """The checked-out commit, with ``+changes`` when the work tree differs from it."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=BENCH_DIR, capture_output=True, text=True, check=False
        )
        return done.stdout.strip()

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", "src")
    return head + ("+changes" if changed else "")


def quiet_logs(level: int = logging.ERROR) -> None:
    """Drop log events below ``level``: the benchmarks measure work, not printing.

    In normal operation the service logs per connection and per gap, never
    per trade, so its log output costs nothing measurable on the hot path.
    """
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )


def progress(message: str) -> None:
    """A line of progress on stderr; stdout carries only the result line."""
    print(message, file=sys.stderr, flush=True)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--json",
        type=Path,
        metavar="FILE",
        help="also write the full result, with the machine, as JSON to FILE",
    )


def report(
    name: str, line: str, result: Mapping[str, Any], json_path: Path | None
) -> None:
    """Print the one result line; write it with the details and the machine as JSON."""
    print(f"{name}: {line}", flush=True)
    if json_path is None:
        return

    document = {
        "bench": name,
        "summary": line,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "result": result,
    }
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def percentiles(
    samples: Sequence[float], points: Iterable[float] = (50, 99)
) -> dict[str, float]:
    """Nearest-rank percentiles plus the maximum; empty samples give an empty dict."""
    if not samples:
        return {}

    ordered = sorted(samples)
    found = {}
    for point in points:
        rank = max(1, -(-len(ordered) * point // 100))
        found[f"p{point:g}"] = ordered[int(rank) - 1]
    found["max"] = ordered[-1]
    return found


# -- process measurements ---------------------------------------------------------------


def rss_mb(pid: int | None = None) -> float:
    """Resident set size of ``pid`` (this process by default), in MiB."""
    statm = Path(f"/proc/{pid or os.getpid()}/statm").read_text().split()
    return int(statm[1]) * PAGE_SIZE / (1024 * 1024)


def cpu_seconds(pid: int | None = None) -> float:
    """User plus system CPU seconds of ``pid``, every thread included."""
    if pid is None:
        return time.process_time()
    return _stat_cpu(Path(f"/proc/{pid}/stat"))


def thread_cpu_seconds() -> dict[str, float]:
    """CPU seconds of this process's event loop thread and of its sink thread.

    The two can run at once on two cores, except while one waits for the
    GIL: what each costs per trade says which one bounds the throughput.
    """
    found: dict[str, float] = {}
    for thread in threading.enumerate():
        if thread is threading.main_thread():
            role = "event_loop"
        elif thread.name.startswith("k2-sink"):
            role = "sink"
        else:
            continue
        task = Path(f"/proc/self/task/{thread.native_id}/stat")
        with contextlib.suppress(OSError):
            found[role] = found.get(role, 0.0) + _stat_cpu(task)
    return found


def _stat_cpu(stat: Path) -> float:
    fields = stat.read_text().rsplit(")", 1)[1].split()
    # Counting from the state after the command name, utime and stime are 12th and 13th.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# -- the exchange in its own process ----------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class MarketPlan:
    """How the child's exchange is set up; travels to the child as JSON."""

    rates: tuple[float, ...]
    """Trades per second of each symbol; one symbol per entry (BTCUSDT, ETHUSDT, ...)."""
    tick: float = 0.01
    lifetime: float = 86_400.0
    endpoints: int = 3
    start_stopped: bool = False
    """Bind the listeners with the market stopped; ``start_market`` starts it."""
    stop_after: int | None = None
    """Stop the market once every symbol has published this many trades."""
    max_send_buffer: int = 1 << 30
    """Generous: a burst may sit in the server's buffer while the client catches up."""
    handshake_limit: int | None = 300
    seed: int = 11

    @property
    def symbols(self) -> list[str]:
        return [_SYMBOLS[n] for n in range(len(self.rates))]


_SYMBOLS: Final = ("BTCUSDT", "ETHUSDT", "BNBUSDT", "SOLUSDT")


@dataclasses.dataclass(frozen=True, slots=True)
class Burst:
    """A burst queued in the exchange: how long the market took, and its last ids."""

    seconds: float
    last: dict[StreamKey, int]


class ExchangeProcess:
    """The bundled exchange in a child process; an async context manager."""

    def __init__(self, plan: MarketPlan) -> None:
        if not 1 <= len(plan.rates) <= len(_SYMBOLS):
            raise ValueError(f"give 1 to {len(_SYMBOLS)} rates, one per symbol")
        self.plan = plan
        self.ws_urls: list[str] = []
        self.rest_url = ""
        self.control_url = ""
        self._child: asyncio.subprocess.Process | None = None
        self._http: aiohttp.ClientSession | None = None

    @property
    def pid(self) -> int:
        assert self._child is not None, "the exchange is not running"
        return self._child.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.pid)

    async def __aenter__(self) -> ExchangeProcess:
        self._child = await asyncio.create_subprocess_exec(
            sys.executable,
            str(BENCH_DIR / "common.py"),
            "--serve-exchange",
            json.dumps(dataclasses.asdict(self.plan)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": _pythonpath()},
        )
        assert self._child.stdout is not None
        line = await asyncio.wait_for(self._child.stdout.readline(), 20.0)
        if not line:
            await self._child.wait()
            raise RuntimeError(
                f"the exchange process exited with {self._child.returncode} "
                "before printing its URLs; run bench/common.py --serve-exchange "
                "by hand to see why"
            )

        urls = json.loads(line)
        self.ws_urls = urls["ws_urls"]
        self.rest_url = urls["rest_url"]
        self.control_url = urls["control_url"]
        self._http = aiohttp.ClientSession()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._http is not None:
            await self._http.close()
        child = self._child
        if child is None or child.returncode is not None:
            return

        assert child.stdin is not None
        with contextlib.suppress(ConnectionError):
            child.stdin.write(b'{"quit": true}\n')
            await child.stdin.drain()
            child.stdin.close()
        try:
            await asyncio.wait_for(child.wait(), 15.0)
        except TimeoutError:
            child.kill()
            await child.wait()

    async def control(self, path: str, **arguments: Any) -> Any:
        """POST to the exchange's control API; returns its JSON answer."""
        assert self._http is not None
        async with self._http.post(self.control_url + path, json=arguments) as answer:
            body = await answer.json()
            if answer.status != 200:
                raise RuntimeError(f"control {path} answered {answer.status}: {body}")
            return body

    async def fault(self, name: str, **arguments: Any) -> Any:
        return await self.control(f"/faults/{name}", **arguments)

    async def start_market(self) -> None:
        await self.control("/market/start")

    async def stop_market(self) -> None:
        await self.control("/market/stop")

    async def connections(self) -> int:
        """Client connections open on all endpoints now."""
        assert self._http is not None
        async with self._http.get(self.control_url + "/status") as answer:
            status = await answer.json()
        return sum(endpoint["connections"] for endpoint in status["endpoints"])

    async def last_id(self, symbol: str, stream: str = TRADE) -> int | None:
        """The newest id the market generated for ``symbol``."""
        assert self._http is not None
        url = f"{self.control_url}/truth/{symbol}?stream={stream}"
        async with self._http.get(url) as answer:
            value: int | None = (await answer.json())["last_id"]
            return value

    def queue_burst(self, within: float = 120.0) -> Burst:
        """Start the market and block this whole process until it stopped itself.

        Blocking is the point: while the event loop cannot run, the client
        reads nothing and the burst queues up in the exchange's send buffer,
        to be drained flat out once the loop runs again. The market's own
        speed then cannot limit what is measured. Needs ``plan.stop_after``.
        """
        trades = self.plan.stop_after
        if trades is None:
            raise ValueError("queue_burst needs a MarketPlan with stop_after")

        request = urllib.request.Request(
            self.control_url + "/market/start", method="POST"
        )
        with urllib.request.urlopen(request, timeout=10):
            pass

        started = time.monotonic()
        deadline = started + within
        while True:
            ids = [self._last_id_blocking(s) for s in self.plan.symbols]
            if min(ids) >= trades:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the market did not reach {trades} trades in {within} s"
                )
            time.sleep(0.02)

        # The market stopped itself in the tick that reached ``stop_after``:
        # what it published is final.
        seconds = time.monotonic() - started
        last = {
            StreamKey(BINANCE, s, TRADE): self._last_id_blocking(s)
            for s in self.plan.symbols
        }
        return Burst(seconds, last)

    def _last_id_blocking(self, symbol: str) -> int:
        url = f"{self.control_url}/truth/{symbol}?stream={TRADE}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            value: int | None = json.loads(answer.read())["last_id"]
            return value or 0

    async def set_rates(self, rates: Sequence[float]) -> None:
        """Change the rate of every symbol; the market goes on from its current ids."""
        child = self._child
        assert (
            child is not None and child.stdin is not None and child.stdout is not None
        )
        child.stdin.write(json.dumps({"rates": list(rates)}).encode() + b"\n")
        await child.stdin.drain()
        await asyncio.wait_for(child.stdout.readline(), 10.0)


def _pythonpath() -> str:
    source = str(BENCH_DIR.parent / "src")
    current = os.environ.get("PYTHONPATH")
    return f"{source}{os.pathsep}{current}" if current else source


async def _serve_exchange(plan: MarketPlan) -> None:
    """The child's side: run the exchange until told to quit or stdin closes."""
    quiet_logs(logging.ERROR)
    config = ExchangeConfig(
        symbols=tuple(
            SymbolSpec(symbol, base=symbol[:-4], quote="USDT", rate=rate, price=price)
            for symbol, rate, price in zip(
                plan.symbols, plan.rates, PRICES, strict=False
            )
        ),
        seed=plan.seed,
        ws_ports=(0,) * plan.endpoints,
        tick=plan.tick,
        lifetime=plan.lifetime,
        max_send_buffer=plan.max_send_buffer,
        handshake_limit=plan.handshake_limit,
    )
    async with Exchange(config) as exchange:
        market = exchange.market
        if plan.start_stopped:
            market.stop()
        if plan.stop_after is not None:
            market.add_listener(_stopper(exchange, plan.stop_after))

        urls = {
            "ws_urls": exchange.ws_urls,
            "rest_url": exchange.rest_url,
            "control_url": exchange.control_url,
        }
        print(json.dumps(urls), flush=True)
        await _obey(exchange)


def _stopper(exchange: Exchange, limit: int) -> Callable[[list[TapeSlice]], None]:
    """A tick listener that stops the market once every symbol reached ``limit``."""
    market = exchange.market

    def listen(slices: list[TapeSlice]) -> None:
        if all(market.count(spec.symbol) >= limit for spec in market.symbols):
            market.stop()

    return listen


async def _obey(exchange: Exchange) -> None:
    """Read commands, one JSON object per line, until quit or end of input."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    while line := await reader.readline():
        command = json.loads(line)
        if command.get("quit"):
            return
        if "rates" in command:
            _set_rates(exchange, command["rates"])
            print(json.dumps({"ok": True}), flush=True)


def _set_rates(exchange: Exchange, rates: Sequence[float]) -> None:
    """Give each symbol a new rate; the market restarts its schedule from now."""
    market = exchange.market
    running = market.running
    market.stop()
    for spec, rate in zip(list(market.symbols), rates, strict=False):
        market.tape(spec.symbol).spec = dataclasses.replace(spec, rate=float(rate))
    if running:
        market.start()


# -- the service in this process --------------------------------------------------------


def service_settings(
    exchange: ExchangeProcess, sink: str, **overrides: str | list[str]
) -> Settings:
    """Production settings pointed at ``exchange``, with ``overrides`` on top."""
    flags: dict[str, Any] = {
        "endpoint": exchange.ws_urls,
        "rest_url": exchange.rest_url,
        "symbols": ",".join(exchange.plan.symbols),
        "sink": sink,
        "metrics_port": "0",
        "log_level": "error",
    }
    flags.update(overrides)
    return resolve(flags, environ={})


@contextlib.asynccontextmanager
async def running_service(settings: Settings) -> AsyncIterator[Service]:
    """A started service, stopped cleanly (drained and closed) on exit."""
    service = Service(settings)
    task = asyncio.create_task(service.run())
    started = asyncio.create_task(service.started.wait())
    await asyncio.wait({task, started}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
    started.cancel()
    if task.done():
        raise RuntimeError(f"the service exited at start with status {task.result()}")

    try:
        yield service
    finally:
        service.stop()
        await asyncio.wait_for(task, 60.0)


async def until(
    condition: Callable[[], bool], within: float, what: str, poll: float = 0.01
) -> float:
    """Poll ``condition`` until it holds; returns the time.monotonic() it first held."""
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {within} s")
        await asyncio.sleep(poll)
    return time.monotonic()


async def wait_connected(service: Service, within: float = 20.0) -> None:
    """Until the service holds a subscribed connection."""
    await until(
        lambda: service.supervisor is not None and service.supervisor.link is not None,
        within,
        "subscribed connection",
    )


def keys_of(exchange: ExchangeProcess) -> list[StreamKey]:
    return [StreamKey(BINANCE, symbol, TRADE) for symbol in exchange.plan.symbols]


def durable(service: Service, key: StreamKey) -> int:
    """The id up to which ``key`` is durable in the sink (-1 before the first write)."""
    writer = service.writer
    if writer is None:
        return -1
    return writer.durable_checkpoints.get(key, -1)


async def final_ids(exchange: ExchangeProcess) -> dict[StreamKey, int]:
    """The last id of every symbol, once the market has stopped."""
    last: dict[StreamKey, int] = {}
    for key in keys_of(exchange):
        value = await exchange.last_id(key.symbol, key.stream)
        if value is None:
            raise RuntimeError(f"the market generated no trade for {key}")
        last[key] = value
    return last


def audit_sqlite(
    db: Path, last: Mapping[StreamKey, int], first: int | None = 1
) -> dict[str, int]:
    """Ids ``first..last`` of every key stored once each; counts what is missing.

    With ``first=None`` each key is audited from the lowest id it stored: a
    service that connects to a running market starts wherever it joins.
    """
    stored = counts(db)
    expected = missing = rows = 0
    for key, last_id in last.items():
        held, lowest, _ = stored.get(key, (0, last_id + 1, 0))
        start = lowest if first is None else first
        rows += held
        expected += last_id - start + 1
        missing += (last_id - start + 1) - count_ids(db, key, start, last_id)
    return {"expected": expected, "rows": rows, "missing": missing}


def audit_jsonl(
    path: Path, last: Mapping[StreamKey, int], first: int = 1
) -> dict[str, int]:
    """The same audit for a JSON-lines file: every id once, none missing."""
    import msgspec

    class _Line(msgspec.Struct):
        symbol: str
        source_sequence: int

    decoder = msgspec.json.Decoder(_Line)
    seen: dict[str, set[int]] = {key.symbol: set() for key in last}
    rows = 0
    with path.open("rb") as lines:
        for raw in lines:
            line = decoder.decode(raw)
            seen.setdefault(line.symbol, set()).add(line.source_sequence)
            rows += 1

    missing = 0
    for key, last_id in last.items():
        ids = seen[key.symbol]
        missing += sum(1 for i in range(first, last_id + 1) if i not in ids)
    expected = sum(last_id - first + 1 for last_id in last.values())
    return {"expected": expected, "rows": rows, "missing": missing}


def counter_total(counter: Any) -> float:
    """The sum of a prometheus counter over all its labels."""
    return float(
        sum(
            sample.value
            for metric in counter.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-exchange", metavar="PLAN", required=True)
    args = parser.parse_args()
    fields = json.loads(args.serve_exchange)
    fields["rates"] = tuple(fields["rates"])
    asyncio.run(_serve_exchange(MarketPlan(**fields)))


if __name__ == "__main__":
    main()
