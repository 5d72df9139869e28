"""The deploy/ files: the systemd unit and the Docker image's settings and
HEALTHCHECK, checked against the tools and a running service."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import settings_for


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


REPO = Path(__file__).resolve().parents[2]
UNIT = REPO / "deploy" / "systemd" / "k2stream.service"
DOCKERFILE = REPO / "deploy" / "docker" / "Dockerfile"


def unit_settings() -> dict[str, list[str]]:
    """Every Key=Value of the unit file, values of repeated keys in order."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def verifiable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this checkout: verify needs the program."""
    text = UNIT.read_text().replace(
        "ExecStart=/opt/k2stream/bin/k2stream",
        f"ExecStart={sys.executable} -m k2stream",
    )
    assert text != UNIT.read_text(), "ExecStart moved; update verifiable_unit()"
    path = tmp_path / UNIT.name
    path.write_text(text)
    return path


def docker_instruction(name: str) -> str:
    """The last ``name`` instruction of the Dockerfile (the run stage's), joined."""
    joined = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line for line in joined.splitlines() if line.startswith(name + " ")]
    assert lines, f"the Dockerfile has no {name}"
    return lines[-1]


class TestDeployFiles:
    def test_the_systemd_unit_verifies_cleanly(self, tmp_path: Path) -> None:
        """systemd-analyze verify accepts the unit without a single warning."""
        if shutil.which("systemd-analyze") is None:
            pytest.skip("systemd-analyze is not installed")

        done = subprocess.run(
            ["systemd-analyze", "verify", str(verifiable_unit(tmp_path))],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert (0, "") == (done.returncode, done.stderr)

    def test_the_systemd_unit_is_hardened(self, tmp_path: Path) -> None:
        """systemd-analyze security rates the unit's exposure at 1.5 or lower."""
        if shutil.which("systemd-analyze") is None:
            pytest.skip("systemd-analyze is not installed")

        done = subprocess.run(
            ["systemd-analyze", "security", "--offline=true", "--threshold=15"]
            + [str(verifiable_unit(tmp_path))],
            capture_output=True,
            text=True,
            timeout=60,
        )

        assert 0 == done.returncode, done.stdout[-2000:] + done.stderr

    def test_the_unit_restarts_failures_but_not_bad_settings(self) -> None:
        """Exit 1 and 75 restart after a delay; exit 2 (bad settings) does not."""
        settings = unit_settings()

        assert ["on-failure"] == settings["Restart"]
        assert ["2"] == settings["RestartPreventExitStatus"]
        assert ["30s"] == settings["RestartSec"]
        assert ["0"] == settings["StartLimitIntervalSec"]
        assert (["yes"], ["k2stream"], ["strict"]) == (
            settings["DynamicUser"],
            settings["StateDirectory"],
            settings["ProtectSystem"],
        )

    def test_the_image_opens_the_metrics_server_to_its_network(self) -> None:
        """The image binds metrics to 0.0.0.0, exposes 9090 and runs as non-root."""
        env = docker_instruction("ENV")

        assert "K2_METRICS_HOST=0.0.0.0" in env.split()
        assert "EXPOSE 9090" == docker_instruction("EXPOSE")
        assert "USER k2stream:k2stream" == docker_instruction("USER")
        assert docker_instruction("FROM").startswith("FROM python:3.11-slim")

    async def test_the_image_healthcheck_follows_livez(
        self, exchange: Any, start_service: Any, tmp_path: Path
    ) -> None:
        """The HEALTHCHECK command passes against a live service, fails on a closed port."""
        command = json.loads(docker_instruction("HEALTHCHECK").partition(" CMD ")[2])
        assert ["python", "-c"] == command[:2] and "/livez" in command[2]
        run = await start_service(settings_for(exchange, tmp_path / "trades.db"))

        async def check(port: int) -> int:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *command[1:],
                env={**os.environ, "K2_METRICS_PORT": str(port)},
                stderr=asyncio.subprocess.DEVNULL,
            )
            return await asyncio.wait_for(process.wait(), 20)

        assert 0 == await check(run.service.probe.port)
        assert 0 != await check(closed_port())
