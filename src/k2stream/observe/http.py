"""The one small HTTP server: /metrics, /livez, /readyz, /healthz and /status.

Liveness answers "is the process making progress" and never fails because
Binance is down: restarting k2stream does not bring an exchange back.
Readiness answers "is data flowing now": connected, and the last market data
is fresh. Both follow the Kubernetes probe conventions (/livez, /readyz;
/healthz is kept as an alias of /livez for older probes).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from k2stream.observe.metrics import Metrics


Check = Callable[[], str | None]
"""Returns None when healthy, else the reason it is not."""

_json = msgspec.json.Encoder()


class ProbeServer:
    """Serves the registry of ``metrics`` and the probes on ``host:port``."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        host: str,
        port: int,
        live: Check,
        ready: Check,
        status: Callable[[], dict[str, Any]],
    ) -> None:
        self._metrics = metrics
        self._host = host
        self._port = port
        self._live = live
        self._ready = ready
        self._status = status
        self._runner: web.AppRunner | None = None
        self.port = port

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._serve_metrics)
        app.router.add_get("/livez", self._serve_live)
        app.router.add_get("/healthz", self._serve_live)
        app.router.add_get("/readyz", self._serve_ready)
        app.router.add_get("/status", self._serve_status)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(
                f"cannot serve metrics on {self._host}:{self._port}: {exc.strerror}; "
                "choose another --metrics-port"
            ) from exc
        # With port 0 the system picks one; report the one actually bound.
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _serve_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _serve_live(self, request: web.Request) -> web.Response:
        return _probe(self._live())

    async def _serve_ready(self, request: web.Request) -> web.Response:
        return _probe(self._ready())

    async def _serve_status(self, request: web.Request) -> web.Response:
        return web.Response(
            body=_json.encode(self._status()), content_type="application/json"
        )


def _probe(problem: str | None) -> web.Response:
    if problem is None:
        return web.Response(text="ok\n")
    return web.Response(status=503, text=f"not ok: {problem}\n")
