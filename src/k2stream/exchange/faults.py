"""Fault injection: what can go wrong between Binance and a client, on demand.

Each WebSocket fault targets one endpoint (an index into ``Exchange.ws_urls``)
or, with ``endpoint=None``, all of them. Faults with a duration are deadlines
on the endpoint: they apply to the connections open now and to those that
open while the fault lasts, and end by themselves (a loop timer logs the end;
no threads). The instantaneous ones (kill, close, shutdown, garbage) act on
the connections open at the time of the call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

import structlog


log = structlog.get_logger(__name__)

_RESERVED_CLOSE_CODES: Final = frozenset({1004, 1005, 1006, 1015})
"""Close codes an endpoint must never send (RFC 6455 section 7.4.1)."""


@dataclass(slots=True)
class EndpointFaults:
    """The timed faults of one WebSocket endpoint, as deadlines on the loop clock."""

    stalled_until: float = 0.0
    frozen_until: float = 0.0
    refused_until: float = 0.0
    ratelimited_until: float = 0.0
    ratelimit_retry_after: float = 0.0
    banned_until: float = 0.0
    slow_until: float = 0.0
    slow_rate: float = 0.0
    garbage_pending: int = 0
    """Malformed frames owed to the next connection when none was open."""

    def stalled(self, now: float) -> bool:
        return now < self.stalled_until

    def frozen(self, now: float) -> bool:
        return now < self.frozen_until

    def data_blocked(self, now: float) -> bool:
        """True while data must not flow: the endpoint is stalled or frozen."""
        return now < self.stalled_until or now < self.frozen_until

    def slowed(self, now: float) -> bool:
        return now < self.slow_until

    def handshake_refusal(self, now: float) -> tuple[int, int] | None:
        """HTTP status and Retry-After seconds for a refused handshake, if any.

        A ban outranks a rate limit, which outranks a plain refusal, as a
        client would see once the more serious condition starts.
        """
        if now < self.banned_until:
            return 418, math.ceil(self.banned_until - now)
        if now < self.ratelimited_until:
            return 429, math.ceil(self.ratelimit_retry_after)
        if now < self.refused_until:
            return 503, 0
        return None

    def active(self, now: float) -> dict[str, float]:
        """Seconds left of each timed fault that is on, for /status."""
        deadlines = {
            "stall": self.stalled_until,
            "freeze": self.frozen_until,
            "refuse": self.refused_until,
            "ratelimit": self.ratelimited_until,
            "ban": self.banned_until,
            "slow": self.slow_until,
        }
        return {
            name: round(until - now, 3)
            for name, until in deadlines.items()
            if until > now
        }


@dataclass(slots=True)
class RestFaults:
    """Injected REST failures: the next ``count`` requests fail, or a ban."""

    error_status: int = 500
    errors_left: int = 0
    banned_until: float = 0.0

    def take(self, now: float) -> tuple[int, int] | None:
        """Status and Retry-After for this request if a fault claims it."""
        if now < self.banned_until:
            return 418, math.ceil(self.banned_until - now)
        if self.errors_left > 0:
            self.errors_left -= 1
            return self.error_status, 1
        return None


class FaultTarget(Protocol):
    """A connection, as the fault injector sees it."""

    def kill(self) -> None: ...

    def begin_close(self, code: int, reason: str) -> None: ...

    def begin_shutdown(self) -> None: ...

    def add_garbage(self, count: int) -> None: ...


class FaultEndpoint(Protocol):
    """An endpoint, as the fault injector sees it."""

    @property
    def index(self) -> int: ...

    @property
    def faults(self) -> EndpointFaults: ...

    @property
    def connections(self) -> Sequence[FaultTarget]: ...


class Faults:
    """The fault-injection API; the control port exposes the same calls over HTTP."""

    def __init__(self, endpoints: Sequence[FaultEndpoint], rest: RestFaults) -> None:
        self._endpoints = endpoints
        self.rest = rest
        self._timers: set[asyncio.TimerHandle] = set()

    # -- instantaneous ------------------------------------------------------------

    def kill(self, endpoint: int | None = None) -> int:
        """Abort the TCP connections with no close frame (the client sees 1006)."""
        return self._each_connection("kill", endpoint, lambda c: c.kill())

    def close(
        self, code: int = 1001, reason: str = "", endpoint: int | None = None
    ) -> int:
        """Close the connections with ``code`` and ``reason``."""
        if not 1000 <= code <= 4999 or code in _RESERVED_CLOSE_CODES:
            raise ValueError(
                f"close code {code} cannot be sent; use 1000-4999 except "
                "1004, 1005, 1006 and 1015"
            )
        return self._each_connection(
            "close", endpoint, lambda c: c.begin_close(code, reason)
        )

    def shutdown(self, endpoint: int | None = None) -> int:
        """Send the ``serverShutdown`` event, then close (1001)."""
        return self._each_connection("shutdown", endpoint, lambda c: c.begin_shutdown())

    def garbage(self, n: int, endpoint: int | None = None) -> int:
        """Interleave ``n`` malformed frames into each connection's data.

        With no connection open on an endpoint, the next one gets them.
        """
        if n < 1:
            raise ValueError(f"garbage needs n >= 1 frames, got {n}")

        affected = 0
        for target in self._targets(endpoint):
            for connection in target.connections:
                connection.add_garbage(n)
                affected += 1
            if not target.connections:
                target.faults.garbage_pending += n
        log.info("fault_applied", fault="garbage", endpoint=endpoint, n=n)
        return affected

    # -- timed --------------------------------------------------------------------

    def stall(self, seconds: float, endpoint: int | None = None) -> None:
        """Socket open, nothing sent: no data, no pings, client pings unanswered."""
        for target in self._timed("stall", seconds, endpoint):
            target.faults.stalled_until = self._until(seconds)

    def freeze(self, seconds: float, endpoint: int | None = None) -> None:
        """Data stops; pings still go out and are answered (the silent stream)."""
        for target in self._timed("freeze", seconds, endpoint):
            target.faults.frozen_until = self._until(seconds)

    def refuse(self, seconds: float, endpoint: int | None = None) -> None:
        """Reject WebSocket handshakes with HTTP 503."""
        for target in self._timed("refuse", seconds, endpoint):
            target.faults.refused_until = self._until(seconds)

    def ratelimit(
        self,
        seconds: float,
        retry_after: float | None = None,
        endpoint: int | None = None,
    ) -> None:
        """Reject handshakes with HTTP 429 and ``Retry-After`` (default: ``seconds``)."""
        for target in self._timed("ratelimit", seconds, endpoint):
            target.faults.ratelimited_until = self._until(seconds)
            target.faults.ratelimit_retry_after = (
                seconds if retry_after is None else retry_after
            )

    def ban(self, seconds: float, endpoint: int | None = None) -> None:
        """Reject handshakes with HTTP 418 and ``Retry-After`` until the ban ends."""
        for target in self._timed("ban", seconds, endpoint):
            target.faults.banned_until = self._until(seconds)

    def slow(
        self, seconds: float, messages_per_second: float, endpoint: int | None = None
    ) -> None:
        """Send at most ``messages_per_second`` data frames per connection.

        What cannot be sent waits in a bounded per-connection queue; a
        connection whose queue passes ``max_send_buffer`` bytes is closed
        as too slow, exactly as a slow reader would be.
        """
        if messages_per_second <= 0:
            raise ValueError("slow needs messages_per_second > 0; use freeze for 0")
        for target in self._timed("slow", seconds, endpoint):
            target.faults.slow_until = self._until(seconds)
            target.faults.slow_rate = messages_per_second

    # -- REST -----------------------------------------------------------------------

    def rest_error(self, status: int = 500, count: int = 1) -> None:
        """Answer the next ``count`` REST requests with HTTP ``status``."""
        if not 400 <= status <= 599 or count < 1:
            raise ValueError("rest_error needs a status of 400-599 and count >= 1")
        self.rest.error_status = status
        self.rest.errors_left = count
        log.info("fault_applied", fault="rest_error", status=status, count=count)

    def rest_ban(self, seconds: float) -> None:
        """Answer every REST request with 418 and ``Retry-After`` for ``seconds``."""
        _check_seconds("rest_ban", seconds)
        self.rest.banned_until = self._until(seconds)
        self._remind("rest_ban", seconds, None)
        log.info("fault_applied", fault="rest_ban", seconds=seconds)

    # -- clearing -----------------------------------------------------------------

    def clear(self, endpoint: int | None = None) -> None:
        """End every fault now (and the REST faults too when ``endpoint`` is None)."""
        for target in self._targets(endpoint):
            target.faults.stalled_until = 0.0
            target.faults.frozen_until = 0.0
            target.faults.refused_until = 0.0
            target.faults.ratelimited_until = 0.0
            target.faults.banned_until = 0.0
            target.faults.slow_until = 0.0
            target.faults.garbage_pending = 0
        if endpoint is None:
            self.rest.errors_left = 0
            self.rest.banned_until = 0.0
            self.cancel_timers()
        log.info("faults_cleared", endpoint=endpoint)

    def cancel_timers(self) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()

    # -- helpers --------------------------------------------------------------------

    def _targets(self, endpoint: int | None) -> Sequence[FaultEndpoint]:
        if endpoint is None:
            return self._endpoints
        if not 0 <= endpoint < len(self._endpoints):
            raise ValueError(
                f"endpoint {endpoint} does not exist; use 0..{len(self._endpoints) - 1}"
                " or None for all"
            )
        return [self._endpoints[endpoint]]

    def _each_connection(self, fault: str, endpoint: int | None, act: _Act) -> int:
        affected = 0
        for target in self._targets(endpoint):
            for connection in list(target.connections):
                act(connection)
                affected += 1
        log.info("fault_applied", fault=fault, endpoint=endpoint, connections=affected)
        return affected

    def _timed(
        self, fault: str, seconds: float, endpoint: int | None
    ) -> Sequence[FaultEndpoint]:
        _check_seconds(fault, seconds)
        targets = self._targets(endpoint)
        self._remind(fault, seconds, endpoint)
        log.info("fault_applied", fault=fault, endpoint=endpoint, seconds=seconds)
        return targets

    def _until(self, seconds: float) -> float:
        return asyncio.get_running_loop().time() + seconds

    def _remind(self, fault: str, seconds: float, endpoint: int | None) -> None:
        """Log the end of a timed fault when its deadline passes."""
        loop = asyncio.get_running_loop()
        timer: asyncio.TimerHandle

        def ended() -> None:
            self._timers.discard(timer)
            log.info("fault_ended", fault=fault, endpoint=endpoint)

        timer = loop.call_later(seconds, ended)
        self._timers.add(timer)


class _Act(Protocol):
    def __call__(self, connection: FaultTarget, /) -> None: ...


def _check_seconds(fault: str, seconds: float) -> None:
    if not seconds > 0:
        raise ValueError(f"{fault} needs seconds > 0, got {seconds}")
