"""The WebSocket side: endpoints, connections and the fan-out of market data.

Connection rules follow binance-spot-api-docs/web-socket-streams.md: a ping
every ``ping_interval`` carrying the time in ms as ASCII, a close when a
ping stays unanswered for ``pong_timeout``, at most
``max_incoming_per_second`` client pings, pongs and text frames in any one
second (more closes with 1008 "Too many requests"), at most ``max_streams``
streams, and a close ``lifetime`` after the connection opened.

Data bypasses aiohttp's per-message path: each tick's frames are built once
per variant (see :mod:`frames`) and written to the transport as one buffer.
aiohttp's writer is still used for pings, pongs, replies and close frames;
both write whole frames in one synchronous call, so they never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

import structlog
from aiohttp import WSMsgType, web

from k2stream.exchange.config import ExchangeConfig
from k2stream.exchange.faults import EndpointFaults
from k2stream.exchange.frames import (
    FrameBatch,
    Variant,
    agg_trade_frames,
    batch,
    garbage_frames,
    prepare,
    server_shutdown_frame,
    trade_frames,
)
from k2stream.exchange.market import STREAM_AGG_TRADE, STREAM_TRADE, Market, TapeSlice
from k2stream.exchange.subscriptions import (
    ControlError,
    Opening,
    Request,
    StreamRef,
    TooManySubscriptions,
    parse_get_property,
    parse_request,
    parse_set_property,
    parse_streams,
    parse_url,
)


log = structlog.get_logger(__name__)

CLOSE_TOO_MANY_REQUESTS: Final = (1008, "Too many requests")
"""Close after the incoming message limit, as observed (connector-js#530)."""
CLOSE_PONG_TIMEOUT: Final = (1008, "Pong timeout")
"""Close after an unanswered ping; Binance's text from the 10-minute era."""
CLOSE_LIFETIME: Final = (1001, "Connection lifetime expired")
"""Close at the lifetime cap. Binance's code at 24 h is undocumented; 1001
(going away) says "reconnect", which is what the client must do."""
CLOSE_TOO_SLOW: Final = (1008, "Too slow")
"""Close a client that falls ``max_send_buffer`` bytes behind."""
CLOSE_SHUTDOWN: Final = (1001, "Server shutdown")
CLOSE_EXCHANGE_STOPPED: Final = (1001, "Exchange stopped")

_PACE_INTERVAL: Final = 0.02
"""How often a throttled (``slow``) connection sends what its rate allows."""


class Connection:
    """One client connection: its subscriptions, timers and fault state."""

    def __init__(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport,
        endpoint: WsEndpoint,
        opening: Opening,
        peer: str,
    ) -> None:
        self.ws = ws
        self.transport = transport
        self.endpoint = endpoint
        self.config = endpoint.config
        self.peer = peer
        self.combined = opening.combined
        self.micro = opening.micro
        self.subscriptions: dict[str, StreamRef] = {}
        self.open = True
        """False once closing began: no data frame may follow a close frame."""
        self.sent = 0
        self.dropped = 0
        self.close_code: int | None = None
        """The code this side closed with; None when the client closed or it was killed."""

        self._loop = asyncio.get_running_loop()
        self._incoming: deque[float] = deque()
        self._ping_outstanding = False
        self._pong_timer: asyncio.TimerHandle | None = None
        self._lifetime_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        """Closes started from timers and other tasks; awaited by :meth:`finish`."""
        self._pinger: asyncio.Task[None] | None = None
        self._garbage_left = 0
        self._garbage_sent = 0
        self._backlog: deque[str] = deque()
        self._backlog_bytes = 0
        self._pacer: asyncio.Task[None] | None = None

    @property
    def variant(self) -> Variant:
        return Variant(self.combined, self.micro)

    @property
    def faults(self) -> EndpointFaults:
        return self.endpoint.faults

    # -- the connection's life --------------------------------------------------------

    async def serve(self) -> None:
        """Run until the connection ends: read client frames, keep the timers."""
        self._lifetime_timer = self._loop.call_later(
            self.config.lifetime, self.begin_close, *CLOSE_LIFETIME
        )
        self._pinger = self._loop.create_task(self._ping_forever())

        try:
            await self._read_forever()
        finally:
            self.open = False
            self._stop_timers()

    async def _read_forever(self) -> None:
        while True:
            message = await self.ws.receive()
            kind = message.type
            if kind in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                return
            if kind is WSMsgType.ERROR:
                return

            # A stalled server answers nothing and counts nothing; a pong to a
            # ping sent before the stall still counts as answered.
            if kind is WSMsgType.PONG:
                self._on_pong()
            if self.faults.stalled(self._loop.time()):
                continue

            if self._over_message_limit():
                log.info(
                    "ws_client_over_message_limit",
                    endpoint=self.endpoint.index,
                    peer=self.peer,
                    limit=self.config.max_incoming_per_second,
                )
                await self.close(*CLOSE_TOO_MANY_REQUESTS)
                return

            try:
                if kind is WSMsgType.PING:
                    await self.ws.pong(message.data)
                elif kind is WSMsgType.TEXT:
                    await self._on_text(message.data)
            except ConnectionError:
                return

    def _over_message_limit(self) -> bool:
        """Count one incoming frame; True when the last second held too many."""
        now = self._loop.time()
        window = self._incoming
        window.append(now)
        while window and window[0] <= now - 1.0:
            window.popleft()
        return len(window) > self.config.max_incoming_per_second

    async def _ping_forever(self) -> None:
        """Ping every ``ping_interval``; arm the pong deadline on the first one."""
        while self.open:
            await asyncio.sleep(self.config.ping_interval)
            if not self.open:
                return
            if self.faults.stalled(self._loop.time()):
                continue

            if not self._ping_outstanding:
                self._ping_outstanding = True
                self._pong_timer = self._loop.call_later(
                    self.config.pong_timeout, self._pong_overdue
                )
            payload = str(int(time.time() * 1000)).encode()
            try:
                await self.ws.ping(payload)
            except ConnectionError:
                return

    def _on_pong(self) -> None:
        # Any pong answers the outstanding ping: Binance's streams were seen
        # not to check the payload. A pong with no ping out changes nothing.
        if not self._ping_outstanding:
            return
        self._ping_outstanding = False
        if self._pong_timer is not None:
            self._pong_timer.cancel()
            self._pong_timer = None

    def _pong_overdue(self) -> None:
        self._pong_timer = None
        if self._ping_outstanding:
            log.info("ws_pong_timeout", endpoint=self.endpoint.index, peer=self.peer)
            self.begin_close(*CLOSE_PONG_TIMEOUT)

    # -- control messages ---------------------------------------------------------------

    async def _on_text(self, text: str) -> None:
        if len(text) > self.config.max_control_frame:
            # Binance ignores oversized control frames without a word (connector-rust#27).
            return

        try:
            request = parse_request(text)
            reply = self._answer(request)
        except ControlError as exc:
            reply = exc.reply()
        await self.ws.send_str(json.dumps(reply, separators=(",", ":")))

    def _answer(self, request: Request) -> dict[str, Any]:
        result: object = None
        if request.method == "SUBSCRIBE":
            refs = parse_streams(request)
            fresh = {
                ref.name: ref for ref in refs if ref.name not in self.subscriptions
            }
            if len(self.subscriptions) + len(fresh) > self.config.max_streams:
                raise TooManySubscriptions(request.id)
            for ref in fresh.values():
                self.subscribe(ref)
        elif request.method == "UNSUBSCRIBE":
            for ref in parse_streams(request):
                self.unsubscribe(ref)
        elif request.method == "LIST_SUBSCRIPTIONS":
            result = list(self.subscriptions)
        elif request.method == "SET_PROPERTY":
            self.combined = parse_set_property(request)
        else:
            parse_get_property(request)
            result = self.combined
        return {"result": result, "id": request.id}

    def subscribe(self, ref: StreamRef) -> None:
        self.subscriptions[ref.name] = ref
        self.endpoint.hub.add(self, ref)

    def unsubscribe(self, ref: StreamRef) -> None:
        if self.subscriptions.pop(ref.name, None) is not None:
            self.endpoint.hub.discard(self, ref)

    # -- data -------------------------------------------------------------------------

    @property
    def writable(self) -> bool:
        """True while data frames may still be written (no close frame went out)."""
        return self.open and not self.ws.closed and not self.transport.is_closing()

    def deliver(self, frames: FrameBatch, symbol: str, now: float) -> None:
        """Send one tick's frames of one stream, as the endpoint's faults allow."""
        if not self.writable:
            return
        if self.faults.data_blocked(now):
            self.dropped += len(frames.frames)
            return

        if self._garbage_left:
            self._send_garbage(symbol)

        if self._backlog or self.faults.slowed(now):
            self._queue(frames.frames)
            return

        self.transport.write(frames.data)
        self.sent += len(frames.frames)
        if self.transport.get_write_buffer_size() > self.config.max_send_buffer:
            self._too_slow()

    def _send_garbage(self, symbol: str) -> None:
        kinds = garbage_frames(symbol, self.variant)
        self.transport.write(kinds[self._garbage_sent % len(kinds)])
        self._garbage_sent += 1
        self._garbage_left -= 1

    def _queue(self, frames: list[str]) -> None:
        """Hold frames for a throttled connection, within ``max_send_buffer``."""
        self._backlog.extend(frames)
        self._backlog_bytes += sum(map(len, frames))
        if self._backlog_bytes > self.config.max_send_buffer:
            self._too_slow()
            return
        if self._pacer is None:
            self._pacer = self._loop.create_task(self._pace())

    async def _pace(self) -> None:
        """Drip the backlog out at the ``slow`` rate; flush it when the fault ends."""
        credit = 0.0
        last = self._loop.time()
        try:
            while self.open and self._backlog:
                await asyncio.sleep(_PACE_INTERVAL)
                now = self._loop.time()
                if not self.faults.slowed(now):
                    self._send_backlog(len(self._backlog))
                    return

                credit += self.faults.slow_rate * (now - last)
                last = now
                count = min(int(credit), len(self._backlog))
                credit -= count
                self._send_backlog(count)
        finally:
            self._pacer = None

    def _send_backlog(self, count: int) -> None:
        if not count or not self.writable:
            return
        frames = [self._backlog.popleft() for _ in range(count)]
        self._backlog_bytes -= sum(map(len, frames))
        self.transport.write("".join(frames).encode("latin-1"))
        self.sent += count

    def _too_slow(self) -> None:
        log.warning(
            "ws_client_too_slow",
            endpoint=self.endpoint.index,
            peer=self.peer,
            buffered=self.transport.get_write_buffer_size() + self._backlog_bytes,
            limit=self.config.max_send_buffer,
        )
        self._backlog.clear()
        self._backlog_bytes = 0
        self.begin_close(*CLOSE_TOO_SLOW)

    # -- faults and closing -----------------------------------------------------------

    def add_garbage(self, count: int) -> None:
        self._garbage_left += count

    def kill(self) -> None:
        """Drop the TCP connection with a reset: no close frame, the client sees 1006."""
        self.open = False
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
        self.transport.abort()

    def begin_shutdown(self) -> None:
        """Send ``serverShutdown`` now, then close."""
        if not self.writable:
            return
        now_us = int(time.time() * 1_000_000)
        self.transport.write(server_shutdown_frame(now_us, self.variant))
        self.begin_close(*CLOSE_SHUTDOWN)

    def begin_close(self, code: int, reason: str) -> None:
        """Start a close from a timer or another task."""
        if self.open:
            self._spawn(self.close(code, reason))

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``; drop the socket if the client does not finish in time."""
        if not self.open:
            return
        self.open = False
        self.close_code = code
        log.info(
            "ws_connection_closing",
            endpoint=self.endpoint.index,
            peer=self.peer,
            code=code,
            reason=reason,
        )
        try:
            async with asyncio.timeout(self.config.close_timeout):
                await self.ws.close(code=code, message=reason.encode())
        except (TimeoutError, ConnectionError):
            self.transport.abort()

    def _spawn(self, coroutine: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _stop_timers(self) -> None:
        for timer in (self._pong_timer, self._lifetime_timer):
            if timer is not None:
                timer.cancel()

    async def finish(self) -> None:
        """Stop the pinger and pacer, and wait for closes still in flight."""
        pending = set(self._tasks)
        for task in (self._pinger, self._pacer):
            if task is not None:
                task.cancel()
                pending.add(task)
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)


class Hub:
    """Who listens to which stream, and the fan-out of each market tick."""

    def __init__(self, market: Market) -> None:
        self._listeners: dict[tuple[str, str], set[Connection]] = {}
        market.add_listener(self.on_tick)
        prepare()

    def add(self, connection: Connection, ref: StreamRef) -> None:
        self._listeners.setdefault((ref.symbol, ref.stream), set()).add(connection)

    def discard(self, connection: Connection, ref: StreamRef) -> None:
        listeners = self._listeners.get((ref.symbol, ref.stream))
        if listeners is not None:
            listeners.discard(connection)

    def drop(self, connection: Connection) -> None:
        for ref in connection.subscriptions.values():
            self.discard(connection, ref)

    def on_tick(self, slices: list[TapeSlice]) -> None:
        """Encode each stream's new events once per variant; hand them to listeners."""
        now = asyncio.get_running_loop().time()
        for piece in slices:
            symbol = piece.tape.symbol
            for stream in (STREAM_TRADE, STREAM_AGG_TRADE):
                listeners = self._listeners.get((symbol, stream))
                if not listeners:
                    continue

                encoded: dict[Variant, FrameBatch] = {}
                for connection in list(listeners):
                    variant = connection.variant
                    frames = encoded.get(variant)
                    if frames is None:
                        frames = encoded[variant] = _encode(piece, stream, variant)
                    connection.deliver(frames, symbol, now)


def _encode(piece: TapeSlice, stream: str, variant: Variant) -> FrameBatch:
    if stream == STREAM_TRADE:
        frames = trade_frames(piece.tape, piece.agg_lo, piece.agg_hi, variant)
    else:
        frames = agg_trade_frames(piece.tape, piece.agg_lo, piece.agg_hi, variant)
    return batch(frames)


class WsEndpoint:
    """One WebSocket listener: its handler, its connections and its faults."""

    def __init__(self, index: int, config: ExchangeConfig, hub: Hub) -> None:
        self.index = index
        self.config = config
        self.hub = hub
        self.faults = EndpointFaults()
        self._connections: set[Connection] = set()
        self._attempts: deque[float] = deque()
        self._handshaking = 0
        self._stopping = False
        self.handshakes = 0
        self.accepted = 0

        self.app = web.Application()
        self.app.router.add_get("/ws", self.handle)
        self.app.router.add_get("/ws/{streams:.*}", self.handle)
        self.app.router.add_get("/stream", self.handle)

    @property
    def connections(self) -> Sequence[Connection]:
        return list(self._connections)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """A handshake: refuse it if a fault or the attempt limit says so, else serve."""
        self.handshakes += 1
        if self._stopping:
            return _refusal(503, 0)
        now = asyncio.get_running_loop().time()
        refusal = self.faults.handshake_refusal(now) or self._over_attempt_limit(now)
        if refusal is not None:
            return _refusal(*refusal)

        try:
            opening = parse_url(request.path, request.query)
        except ValueError as exc:
            return _json({"code": -1100, "msg": str(exc)}, status=400)
        if len(opening.streams) > self.config.max_streams:
            return _json(TooManySubscriptions().reply(), status=400)

        ws = web.WebSocketResponse(
            autoping=False,
            compress=False,
            timeout=self.config.close_timeout,
            max_msg_size=64 * 1024,
        )
        if not ws.can_prepare(request).ok:
            return _json(
                {"code": -1100, "msg": "expected a WebSocket upgrade request"},
                status=400,
            )
        self._handshaking += 1
        try:
            await ws.prepare(request)
        finally:
            self._handshaking -= 1
        return await self._serve(ws, request, opening)

    def _over_attempt_limit(self, now: float) -> tuple[int, int] | None:
        """429 once more than ``handshake_limit`` attempts fell in the window.

        Binance allows 300 connection attempts per 5 minutes per IP; what it
        answers beyond that is not documented, so this is our choice.
        Refused attempts count too, as they would against an IP.
        """
        limit = self.config.handshake_limit
        if limit is None:
            return None

        window = self.config.handshake_window
        attempts = self._attempts
        attempts.append(now)
        while attempts[0] <= now - window:
            attempts.popleft()
        if len(attempts) <= limit:
            return None

        log.warning("ws_handshake_limit_exceeded", endpoint=self.index, limit=limit)
        return 429, math.ceil(attempts[0] + window - now)

    async def _serve(
        self, ws: web.WebSocketResponse, request: web.Request, opening: Opening
    ) -> web.WebSocketResponse:
        transport = request.transport
        assert transport is not None
        peer = str(request.remote)
        connection = Connection(ws, transport, self, opening, peer)
        for ref in opening.streams:
            connection.subscribe(ref)
        if self.faults.garbage_pending:
            connection.add_garbage(self.faults.garbage_pending)
            self.faults.garbage_pending = 0

        self._connections.add(connection)
        self.accepted += 1
        if self._stopping:
            connection.begin_close(*CLOSE_EXCHANGE_STOPPED)
        log.info(
            "ws_connection_opened",
            endpoint=self.index,
            peer=peer,
            streams=len(opening.streams),
            combined=opening.combined,
        )
        try:
            await connection.serve()
        finally:
            self._connections.discard(connection)
            self.hub.drop(connection)
            await connection.finish()
            log.info(
                "ws_connection_closed",
                endpoint=self.index,
                peer=peer,
                code=connection.close_code,
                sent=connection.sent,
                dropped=connection.dropped,
            )
        return ws

    async def close_all(self) -> None:
        """Refuse new handshakes, close every connection (1001), wait for handlers.

        A handshake already past its checks still completes, and its
        connection is closed as soon as it opens.
        """
        self._stopping = True
        for connection in list(self._connections):
            connection.begin_close(*CLOSE_EXCHANGE_STOPPED)

        # A client that never answers is dropped after the close timeout.
        deadline = asyncio.get_running_loop().time() + self.config.close_timeout + 1.0
        while self._connections or self._handshaking:
            if asyncio.get_running_loop().time() > deadline:
                for connection in list(self._connections):
                    connection.kill()
            await asyncio.sleep(0.01)


def _json(
    body: object, status: int, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(body, status=status, headers=headers, dumps=_compact_json)


def _compact_json(body: object) -> str:
    return json.dumps(body, separators=(",", ":"))


def _refusal(status: int, retry_after: int) -> web.Response:
    """The handshake answer of a refusing, rate-limiting or banning endpoint."""
    if status == 503:
        return _json(
            {"code": -1008, "msg": "Service unavailable; try again later."},
            status=503,
        )
    if status == 429:
        msg = "Too many connection attempts; back off for Retry-After seconds."
    else:
        msg = "IP banned for too many connection attempts; wait for Retry-After."
    return _json(
        {"code": -1003, "msg": msg},
        status=status,
        headers={"Retry-After": str(retry_after)},
    )
