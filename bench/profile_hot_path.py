"""Where the time goes while k2stream drains a burst: py-spy on the live service.

The scenario is the sqlite (or jsonl) phase of ``pipeline_throughput.py``: a
burst queued in a bundled exchange in a child process, drained by the service
in this process. py-spy attaches to this process only for the drain, so
start-up, imports and the final audit stay out of the profile. Samples are
taken per thread, idle time excluded; each is charged to the innermost frame
that belongs to a known stage of the hot path (see ``STAGES``), and the top
functions by own time are listed too.

py-spy needs ptrace rights over this process (root, or CAP_SYS_PTRACE, or
``kernel.yama.ptrace_scope=0``). Run from the repository root::

    PYTHONPATH=src .venv/bin/python bench/profile_hot_path.py
    PYTHONPATH=src .venv/bin/python bench/profile_hot_path.py --stacks /tmp/stacks.txt

``--stacks`` keeps the collapsed stacks, which speedscope.app and
flamegraph.pl read as they are.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from common import (
    ExchangeProcess,
    MarketPlan,
    add_json_option,
    durable,
    progress,
    quiet_logs,
    report,
    running_service,
    service_settings,
    until,
    wait_connected,
)


STAGES: Final = (
    ("decode", "decode (k2stream/binance/messages.py"),
    ("normalize", "Normalizer."),
    ("sequencer", "Sequencer."),
    ("writer.offer", "SinkWriter.offer"),
    ("pipeline", "Pipeline."),
    ("metrics", "prometheus_client/"),
    ("on_frame (own code)", "StreamSession.on_frame"),
    ("receive (aiohttp, Connection.read)", "aiohttp/"),
    ("receive (aiohttp, Connection.read)", "Connection.read (k2stream/feed"),
    ("sqlite: insert (bind + execute)", "_insert_trades"),
    ("sqlite: execute, commit", "k2stream/sinks/sqlite.py"),
    ("jsonl: TradeV2 records", "to_trade_v2"),
    ("jsonl: TradeV2 records", "message_id"),
    ("jsonl: encode, write", "k2stream/sinks/jsonl.py"),
    ("writer: batching", "k2stream/sinks/writer.py"),
    ("supervisor, watchdog", "k2stream/feed/"),
    ("asyncio loop", "asyncio/"),
    ("thread pool", "concurrent/futures/"),
)
"""(stage, marker): a sample belongs to the stage of the innermost frame holding
its marker; order breaks ties between markers of one frame."""

_LINE: Final = re.compile(r":\d+\)$")


@dataclass(frozen=True, slots=True)
class Sample:
    thread: str
    frames: list[str]
    """Outermost first, line numbers removed: ``function (file)``."""
    count: int


def read_stacks(path: Path) -> Iterator[Sample]:
    """Samples from py-spy's raw (collapsed) output recorded with ``--threads``."""
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        thread, *frames = stack.split(";")
        name = thread.split(":", 1)[1].strip() if ":" in thread else thread
        yield Sample(name, [_LINE.sub(")", f) for f in frames], int(count))


def stage_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for stage, marker in STAGES:
            if marker in frame:
                return stage
    return "other"


def summarise(samples: list[Sample], top: int) -> dict[str, Any]:
    """Shares of the samples by thread, by stage and by function (own time)."""
    total = sum(s.count for s in samples) or 1
    threads: collections.Counter[str] = collections.Counter()
    stages: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    for sample in samples:
        thread = _thread_role(sample.thread)
        threads[thread] += sample.count
        stages[f"{thread}: {stage_of(sample.frames)}"] += sample.count
        if sample.frames:
            own[sample.frames[-1]] += sample.count

    def shares(
        counter: collections.Counter[str], n: int | None = None
    ) -> dict[str, float]:
        return {name: round(c / total, 4) for name, c in counter.most_common(n)}

    return {
        "samples": total,
        "threads": shares(threads),
        "stages": shares(stages),
        "functions": shares(own, top),
    }


def _thread_role(name: str) -> str:
    if name.startswith("k2-sink"):
        return "sink thread"
    if name == "MainThread":
        return "event loop"
    return name or "other thread"


async def profile(args: argparse.Namespace, stacks: Path) -> dict[str, Any]:
    plan = MarketPlan(rates=(args.rate,), start_stopped=True, stop_after=args.trades)
    async with ExchangeProcess(plan) as exchange:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = Path(tmp) / (
                "trades.db" if args.sink == "sqlite" else "trades.jsonl"
            )
            # The whole burst fits the writer's buffer, as in pipeline_throughput.
            settings = service_settings(
                exchange,
                f"{args.sink}:///{path}",
                max_backlog=str(2 * args.trades),
            )
            async with running_service(settings) as service:
                await wait_connected(service)
                burst = exchange.queue_burst()
                spy = _attach(stacks, args.hz, args.gil)
                try:
                    await until(
                        lambda: all(
                            durable(service, key) >= last_id
                            for key, last_id in burst.last.items()
                        ),
                        within=600,
                        what="the burst made durable",
                        poll=0.005,
                    )
                finally:
                    _detach(spy)

    return {"trades": sum(burst.last.values()), "sink": args.sink}


def _attach(stacks: Path, hz: int, gil: bool) -> subprocess.Popen[str]:
    """Start py-spy on this process; blocks until it samples, so nothing is missed."""
    spy = _py_spy()
    process = subprocess.Popen(
        [
            spy,
            "record",
            *(["--gil"] if gil else []),
            "--pid",
            str(os.getpid()),
            "--rate",
            str(hz),
            "--threads",
            "--nonblocking",
            "--format",
            "raw",
            "--output",
            str(stacks),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    first = process.stdout.readline()
    if "Sampling" not in first:
        process.wait()
        raise RuntimeError(
            f"py-spy did not start ({first.strip()}); it needs ptrace rights: run as "
            "root or with CAP_SYS_PTRACE"
        )
    return process


def _detach(process: subprocess.Popen[str]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise SystemExit(
            "py-spy is not installed; install it with "
            ".venv/bin/pip install 'py-spy>=0.3,<1'"
        )
    return found


def _table(summary: dict[str, Any]) -> str:
    lines = [f"{summary['samples']} samples"]
    lines.append("by thread and stage:")
    lines += [f"  {share:6.1%}  {name}" for name, share in summary["stages"].items()]
    lines.append("by function, own time:")
    lines += [f"  {share:6.1%}  {name}" for name, share in summary["functions"].items()]
    return "\n".join(lines)


def _headline(summary: dict[str, Any]) -> str:
    stages = list(summary["stages"].items())[:4]
    threads = ", ".join(
        f"{name} {share:.0%}" for name, share in summary["threads"].items()
    )
    top = "; ".join(f"{name} {share:.0%}" for name, share in stages)
    return f"{threads}; top stages: {top}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=500_000)
    parser.add_argument(
        "--rate", type=float, default=400_000.0, help="trades/s offered"
    )
    parser.add_argument("--sink", choices=("sqlite", "jsonl"), default="sqlite")
    parser.add_argument("--hz", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=15, help="functions listed")
    parser.add_argument(
        "--gil",
        action="store_true",
        help="sample only the thread holding the GIL: who keeps whom waiting",
    )
    parser.add_argument("--stacks", type=Path, help="keep the collapsed stacks here")
    parser.add_argument("--dir", type=Path, default=None, help="where the store goes")
    add_json_option(parser)
    args = parser.parse_args()

    quiet_logs()
    with tempfile.TemporaryDirectory() as tmp:
        stacks = args.stacks or Path(tmp) / "stacks.txt"
        run = asyncio.run(profile(args, stacks))
        summary = summarise(list(read_stacks(stacks)), args.top)

    progress(_table(summary))
    report("profile_hot_path", _headline(summary), {**run, **summary}, args.json)


if __name__ == "__main__":
    main()
