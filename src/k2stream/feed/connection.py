"""One WebSocket connection to one endpoint.

The connection opens, reads frames and hands each data frame to a callback,
answers the server's pings at once with the same payload, sends its own
heartbeat pings, and paces every frame it sends so that the server's limit
on incoming messages (5 per second on Binance, pings and pongs included) is
never reached. It knows nothing about what the frames mean.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import WSMsgType

from k2stream.clock import SYSTEM_CLOCK, Clock


log = structlog.get_logger(__name__)

_ENCODE = msgspec.json.Encoder()

_closing: set[asyncio.Task[None]] = set()
"""Closes under way after an abort; held so that they are not collected mid-way."""


class ConnectError(Exception):
    """Opening a connection failed.

    ``status`` is the HTTP status of a refused handshake (429, 418, 503, ...)
    and ``retry_after`` the server's Retry-After, when it sent one.
    """

    def __init__(
        self,
        endpoint: str,
        cause: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.cause = cause
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"cannot connect to {endpoint}: {cause}")

    @property
    def kind(self) -> str:
        """A bounded name for the failure: banned, rate_limited, refused or network."""
        if self.status == 418:
            return "banned"
        if self.status == 429:
            return "rate_limited"
        if self.status is not None:
            return "refused"
        return "network"


class Pacer:
    """At most ``limit`` sends in any ``window`` seconds; ``wait`` blocks until one is allowed."""

    def __init__(
        self, limit: int, window: float = 1.0, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._limit = limit
        self._window = window
        self._clock = clock
        self._sent: collections.deque[float] = collections.deque()

    def delay(self) -> float:
        """Seconds until a send is allowed; 0 when it is allowed now."""
        now = self._clock.monotonic()
        while self._sent and now - self._sent[0] >= self._window:
            self._sent.popleft()
        if len(self._sent) < self._limit:
            return 0.0
        return self._window - (now - self._sent[0])

    async def wait(self) -> None:
        while (delay := self.delay()) > 0:
            await self._clock.sleep(delay)
        self._sent.append(self._clock.monotonic())


class Connection:
    """A WebSocket to ``url``; ``label`` names its endpoint in logs and metrics."""

    def __init__(
        self,
        url: str,
        *,
        label: str,
        session: aiohttp.ClientSession,
        open_timeout: float = 10.0,
        heartbeat_interval: float = 30.0,
        heartbeat_timeout: float = 10.0,
        max_sends_per_second: int = 4,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.url = url
        self.label = label
        self._session = session
        self._open_timeout = open_timeout
        self._heartbeat_interval = heartbeat_interval
        self._heartbeat_timeout = heartbeat_timeout
        self._clock = clock
        self._pacer = Pacer(max_sends_per_second, clock=clock)
        self._ws: aiohttp.ClientWebSocketResponse[Any] | None = None
        self._ping_sent: dict[bytes, float] = {}
        self._heartbeat: asyncio.Task[None] | None = None

        self.opened_at: float | None = None
        self.frames = 0
        """Data frames received: the watchdog reads how this grows."""
        self.rtt: float | None = None
        self.close_reason = ""
        self.on_rtt: Callable[[float], None] | None = None

    async def open(self) -> None:
        """Handshake; raises :class:`ConnectError` with the server's answer."""
        try:
            async with asyncio.timeout(self._open_timeout):
                self._ws = await self._session.ws_connect(
                    self.url,
                    autoping=False,
                    compress=0,
                    max_msg_size=4 * 1024 * 1024,
                    timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                    decode_text=False,
                    ssl=True,  # TLS verification is never switched off
                )
        except aiohttp.WSServerHandshakeError as exc:
            retry_after = _retry_after(exc.headers)
            raise ConnectError(
                self.label,
                f"HTTP {exc.status}",
                status=exc.status,
                retry_after=retry_after,
            ) from exc
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            cause = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            raise ConnectError(self.label, cause) from exc

        self.opened_at = self._clock.monotonic()
        if self._heartbeat_interval > 0:
            self._heartbeat = asyncio.create_task(self._send_heartbeats())

    @property
    def age(self) -> float:
        return (
            0.0 if self.opened_at is None else self._clock.monotonic() - self.opened_at
        )

    @property
    def closed(self) -> bool:
        return self._ws is None or self._ws.closed

    async def read(self, on_frame: Callable[[bytes], None]) -> str:
        """Hand every data frame to ``on_frame`` until the connection ends; returns why."""
        ws = self._ws
        assert ws is not None, "open() first"
        data_types = (WSMsgType.TEXT, WSMsgType.BINARY)

        while True:
            message = await ws.receive()
            kind = message.type
            if kind in data_types:
                self.frames += 1
                on_frame(message.data)
                continue
            if kind is WSMsgType.PING:
                # Binance closes a connection whose pings go unanswered for a minute.
                await ws.pong(message.data)
                continue
            if kind is WSMsgType.PONG:
                self._on_pong(message.data)
                continue
            break

        if not self.close_reason:
            code = ws.close_code
            self.close_reason = (
                f"closed by server ({code})" if code else "connection lost"
            )
        return self.close_reason

    async def send_json(self, payload: dict[str, Any]) -> None:
        """Send a control request, paced under the server's message limit."""
        ws = self._ws
        assert ws is not None, "open() first"
        await self._pacer.wait()
        await ws.send_str(_ENCODE.encode(payload).decode())

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with ``code`` (1000 by default) and stop the heartbeat."""
        if reason and not self.close_reason:
            self.close_reason = reason
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._ws is not None and not self._ws.closed:
            try:
                await self._ws.close(code=code)
            except (TimeoutError, aiohttp.ClientError, OSError):
                pass

    def abort(self, reason: str) -> None:
        """Drop the connection at once, without a closing handshake."""
        if not self.close_reason:
            self.close_reason = reason
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        ws = self._ws
        if ws is not None and not ws.closed:
            # Closing with a short timeout: a silent peer must not hold us.
            task = asyncio.get_running_loop().create_task(_close_quietly(ws))
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def _send_heartbeats(self) -> None:
        while True:
            await self._clock.sleep(self._heartbeat_interval)
            await self._pacer.wait()
            payload = str(int(self._clock.time() * 1000)).encode()
            self._ping_sent[payload] = self._clock.monotonic()
            ws = self._ws
            if ws is None or ws.closed:
                return
            try:
                await ws.ping(payload)
            except (aiohttp.ClientError, OSError, ConnectionError):
                return

            await self._clock.sleep(self._heartbeat_timeout)
            if payload in self._ping_sent:
                log.warning(
                    "heartbeat_timeout",
                    endpoint=self.label,
                    timeout=self._heartbeat_timeout,
                    action="reconnecting",
                )
                self.abort("heartbeat_timeout")
                return

    def _on_pong(self, payload: bytes) -> None:
        sent = self._ping_sent.pop(payload, None)
        if sent is None:
            return
        self.rtt = self._clock.monotonic() - sent
        if self.on_rtt is not None:
            self.on_rtt(self.rtt)


async def _close_quietly(ws: aiohttp.ClientWebSocketResponse[Any]) -> None:
    try:
        await asyncio.wait_for(ws.close(code=1000), timeout=1.0)
    except (TimeoutError, aiohttp.ClientError, OSError):
        pass


def _retry_after(headers: Any) -> float | None:
    if headers is None:
        return None
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
