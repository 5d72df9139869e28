"""`k2stream status URL`: a running service's /status, read by an operator."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

from conftest import settings_for, wait_for
from k2stream.exchange import Exchange


SRC = Path(__file__).resolve().parents[2] / "src"


async def k2stream_status(*args: str) -> tuple[int, str, str]:
    """Run `python -m k2stream status ...`; the exit status, stdout and stderr."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "k2stream",
        "status",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def running(exchange: Exchange, start_service, tmp_path: Path):
    run = await start_service(settings_for(exchange, tmp_path / "t.db"))
    await wait_for(
        lambda: (
            run.service.delivered > 200
            and all(
                run.service.sequencer.last_id(k) for k in run.service.sequencer.keys()
            )
        ),
        what="data flowing on every stream",
    )
    return run


async def test_status_shows_endpoints_streams_backfill_rest_and_sink(
    exchange: Exchange, start_service, tmp_path
):
    """The view shows endpoints, breakers, streams, backfill, REST weight and the sink."""
    run = await running(exchange, start_service, tmp_path)
    url = f"http://127.0.0.1:{run.service.probe.port}"

    code, out, err = await k2stream_status(url)

    assert 0 == code, err
    assert out.startswith("connected to ")
    for ws_url in exchange.ws_urls:
        label = ws_url.split("://", 1)[1]
        assert any(label in line and "closed" in line for line in out.splitlines()), (
            f"{label} with its breaker state is missing:\n{out}"
        )
    for key in run.service.sequencer.keys():
        line = next(line for line in out.splitlines() if line.startswith(str(key)))
        last_id = int(line.split()[1])
        assert 0 < last_id <= run.service.sequencer.last_id(key)
    assert "backfill: " in out
    assert "rest BINANCE: weight " in out
    assert f"sink {run.service.settings.sink}: available" in out


async def test_status_json_is_the_raw_status(
    exchange: Exchange, start_service, tmp_path
):
    """`--json` prints the /status document as valid JSON."""
    run = await running(exchange, start_service, tmp_path)
    url = f"http://127.0.0.1:{run.service.probe.port}"

    code, out, err = await k2stream_status(url, "--json")
    status = json.loads(out)

    assert 0 == code, err
    assert status["connected"] is True
    assert [e["url"] for e in status["endpoints"]] == list(exchange.ws_urls)
    assert {str(k) for k in run.service.sequencer.keys()} == {
        s["key"] for s in status["streams"]
    }
    assert run.service.settings.sink == status["sink"]["url"]


async def test_an_unreachable_service_exits_1_with_a_clear_message():
    """A URL where nothing listens: exit 1, nothing on stdout, stderr names the URL."""
    url = f"http://127.0.0.1:{closed_port()}"

    code, out, err = await k2stream_status(url)

    assert 1 == code
    assert "" == out
    assert f"cannot read {url}/status" in err
    assert "Traceback" not in err
