"""Keeping a live, subscribed connection at all times.

The supervisor chooses the endpoint (in order of preference, skipping those
whose breaker is open or whose Retry-After has not passed), backs off between
failed attempts, watches the live connection for silence, and replaces it
make-before-break before the venue's lifetime cut, on the server's shutdown
notice, and to return to a preferred endpoint (failback).

One attempt is a pass over the usable endpoints; the backoff delay comes
between attempts. The schedule resets only once a connection has delivered
data for ``stable_after`` seconds, so a server that accepts and then drops
cannot drive a fast loop; after such a stable connection is lost, the first
attempt goes at once.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp
import structlog

from k2stream.clock import SYSTEM_CLOCK, Clock
from k2stream.feed.backoff import Backoff
from k2stream.feed.budget import AttemptBudget
from k2stream.feed.connection import ConnectError, Connection
from k2stream.feed.endpoints import Endpoint
from k2stream.feed.rotation import Stability, rotation_delay
from k2stream.feed.settings import FeedSettings
from k2stream.feed.watchdog import RateWatchdog
from k2stream.observe.metrics import Metrics
from k2stream.records import StreamKey


log = structlog.get_logger(__name__)


class Session(Protocol):
    """The exchange's side of one connection (see ``k2stream.binance.feed``)."""

    counts: dict[StreamKey, int]
    shutdown_requested: bool

    async def subscribe(self) -> None: ...

    def on_frame(self, frame: bytes) -> None: ...

    def all_streams_seen(self) -> bool: ...


class Adapter(Protocol):
    """What the supervisor needs to know about an exchange."""

    def url(self, endpoint: Endpoint) -> str: ...

    def session(self, endpoint: Endpoint, connection: Connection) -> Any: ...


class GiveUp(Exception):
    """Every endpoint kept failing for ``max_reconnect_attempts`` attempts."""

    def __init__(self, attempts: int, endpoints: Sequence[Endpoint]) -> None:
        self.attempts = attempts
        tried = "; ".join(
            f"{e.url} ({e.tries} tries, last error: {e.last_error or 'none'})"
            for e in endpoints
            if e.tries
        )
        super().__init__(
            f"gave up after {attempts} failed connection attempts: {tried}. "
            "Check the network and the endpoints, or raise --max-reconnect-attempts "
            "(0 never gives up)"
        )


@dataclass(slots=True, eq=False)
class Link:
    """A live connection, its session and its reader."""

    endpoint: Endpoint
    connection: Connection
    session: Session
    reader: asyncio.Task[str]
    watchdog: RateWatchdog
    stability: Stability
    symbol_watchdogs: dict[StreamKey, RateWatchdog]
    frames_seen: int = 0
    counts_seen: dict[StreamKey, int] = field(default_factory=dict)
    silent_keys: set[StreamKey] = field(default_factory=set)
    stable: bool = False


class Supervisor:
    """Owns the connections of one service."""

    def __init__(
        self,
        endpoints: Sequence[Endpoint],
        adapter: Adapter,
        settings: FeedSettings,
        metrics: Metrics,
        *,
        http: aiohttp.ClientSession,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        on_flush: Callable[[], None] | None = None,
        on_state: Callable[[], None] | None = None,
        budget: AttemptBudget | None = None,
        siblings: Callable[[], list[Endpoint | None]] | None = None,
        name: str = "feed",
    ) -> None:
        self.endpoints = list(endpoints)
        self._adapter = adapter
        self._settings = settings
        self._metrics = metrics
        self._http = http
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_flush = on_flush
        self._on_state = on_state
        self._siblings = siblings
        self.name = name
        self._backoff = Backoff(
            initial=settings.reconnect_delay,
            maximum=settings.max_reconnect_delay,
            jitter=settings.reconnect_jitter,
            rng=self._rng,
        )
        self._budget = budget or AttemptBudget(
            settings.connection_attempts, settings.connection_window, clock=clock
        )
        self._stopping = asyncio.Event()
        self._watchdog = self._make_watchdog()
        self._symbol_watchdogs: dict[StreamKey, RateWatchdog] = {}
        self._failed_attempts = 0
        self.link: Link | None = None
        self.reconnects = 0
        self.next_attempt_at: float | None = None
        self._last_flush = 0.0

    def stop(self) -> None:
        """Ask :meth:`run` to close the connection with 1000 and return."""
        self._stopping.set()

    async def run(self) -> None:
        """Stream until :meth:`stop`; raises :class:`GiveUp` when every endpoint keeps failing."""
        cause = ""
        immediate = True
        avoid: Endpoint | None = None
        while not self._stopping.is_set():
            if not immediate:
                await self._schedule_retry(cause, self._first_usable())
            link = await self._connect(avoid)
            if link is None:
                break
            cause, stable = await self._serve(link)
            # A connection that went silent makes its endpoint suspect: the
            # next attempt tries the others first, and failback returns
            # once the endpoint serves data again.
            avoid = link.endpoint if cause in ("stale", "heartbeat_timeout") else None
            immediate = stable
            # A silent connection backs off but does not count towards giving
            # up: the endpoint answers, the market may simply be halted, and
            # the stale-data alert is what tells an operator.
            if not stable and cause != "stale" and not self._stopping.is_set():
                self._record_failed_attempt(cause)

    async def _connect(self, avoid: Endpoint | None = None) -> Link | None:
        """Try the usable endpoints in order until one connects, backing off between passes."""
        while not self._stopping.is_set():
            errors: list[str] = []
            order = self._usable()
            # Endpoints a redundant sibling is on, and one that just went
            # silent, are tried last.
            taken = self._taken()
            order.sort(key=lambda e: (e in taken, e is avoid))
            avoid = None
            for endpoint in order:
                link = await self._try(endpoint, errors)
                if link is not None:
                    return link
                if self._stopping.is_set():
                    return None

            if not errors:
                # Every breaker is open or every endpoint is blocked: wait for the first to reopen.
                await self._wait_for_endpoint()
                continue

            self._record_failed_attempt(errors[-1])
            await self._schedule_retry(errors[-1], self._first_usable())
        return None

    async def _try(self, endpoint: Endpoint, errors: list[str]) -> Link | None:
        if (
            endpoint.blocked_until > self._clock.monotonic()
            or not endpoint.breaker.allow()
        ):
            return None
        while (wait := self._budget.acquire()) > 0:
            log.warning("connection_budget_wait", seconds=round(wait, 1))
            if await self._pause(wait):
                endpoint.breaker.release()
                return None
        try:
            return await self.open(endpoint)
        except ConnectError as exc:
            errors.append(str(exc))
            return None

    async def open(self, endpoint: Endpoint) -> Link:
        """Connect to ``endpoint``, subscribe and audit; records the outcome."""
        endpoint.tries += 1
        connection = Connection(
            self._adapter.url(endpoint),
            label=endpoint.label,
            session=self._http,
            open_timeout=self._settings.open_timeout,
            heartbeat_interval=self._settings.heartbeat_interval,
            heartbeat_timeout=self._settings.heartbeat_timeout,
            clock=self._clock,
        )
        connection.on_rtt = self._metrics.heartbeat_rtt.observe
        reader: asyncio.Task[str] | None = None
        try:
            await connection.open()
            session = self._adapter.session(endpoint, connection)
            reader = asyncio.create_task(connection.read(session.on_frame))
            await self._subscribe(endpoint, session, reader)
        except ConnectError as exc:
            if reader is not None:
                reader.cancel()
            await connection.close()
            self._on_connect_failed(endpoint, exc)
            raise

        endpoint.breaker.record_success()
        self._metrics.connection_attempts.labels(endpoint.label, "success").inc()
        log.info("connection_opened", endpoint=endpoint.label, venue=endpoint.venue)
        return self._new_link(endpoint, connection, session, reader)

    async def _subscribe(
        self, endpoint: Endpoint, session: Session, reader: asyncio.Task[str]
    ) -> None:
        subscribe = asyncio.create_task(session.subscribe())
        done, _ = await asyncio.wait(
            {subscribe, reader}, return_when=asyncio.FIRST_COMPLETED
        )
        if subscribe in done:
            subscribe.result()
            return
        subscribe.cancel()
        raise ConnectError(
            endpoint.label, f"closed while subscribing: {reader.result()}"
        )

    def _new_link(
        self,
        endpoint: Endpoint,
        connection: Connection,
        session: Session,
        reader: asyncio.Task[str],
    ) -> Link:
        # The watchdogs outlive connections: the rate they learnt belongs to the
        # subscribed streams, so a replacement that opens silent is caught as fast.
        watchdog = self._watchdog
        watchdog.reset()
        for key in session.counts:
            if key not in self._symbol_watchdogs:
                self._symbol_watchdogs[key] = self._make_watchdog()
            self._symbol_watchdogs[key].reset()

        stability = Stability(self._settings.stable_after, self._clock)
        stability.opened()
        return Link(
            endpoint=endpoint,
            connection=connection,
            session=session,
            reader=reader,
            watchdog=watchdog,
            stability=stability,
            symbol_watchdogs={
                key: self._symbol_watchdogs[key] for key in session.counts
            },
            counts_seen=dict.fromkeys(session.counts, 0),
        )

    def _make_watchdog(self) -> RateWatchdog:
        return RateWatchdog(
            timeout=self._settings.health_check_timeout,
            min_silence=self._settings.min_silence,
            clock=self._clock,
        )

    async def _serve(self, link: Link) -> tuple[str, bool]:
        """Watch the live link, replacing it as needed, until lost: (cause, stable)."""
        self._activate(link)
        now = self._clock.monotonic()
        settings = self._settings
        rotate_at = now + rotation_delay(
            settings.rotate_after, settings.rotate_jitter, self._rng
        )
        failback_at = now + settings.failback_interval
        health_at = now + settings.health_check_interval
        stop = asyncio.create_task(self._stopping.wait())

        try:
            while True:
                await asyncio.wait(
                    {link.reader, stop},
                    timeout=settings.watchdog_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if self._stopping.is_set():
                    await self._close(link, "stopped")
                    return "stopped", True
                if link.reader.done():
                    if link.session.shutdown_requested:
                        # The server closed right after its notice, before a
                        # replacement could open: reconnect at once.
                        self._metrics.reconnects.labels(
                            link.endpoint.label, "server_shutdown"
                        ).inc()
                        log.info(
                            "reconnecting",
                            endpoint=link.endpoint.label,
                            reason="server_shutdown",
                        )
                        return "server_shutdown", True
                    return self._lost(link), link.stable

                now = self._clock.monotonic()
                self._watch(link, now)
                if link.watchdog.is_stale():
                    self._on_stale(link)
                    return "stale", link.stable

                replacement = None
                if link.session.shutdown_requested:
                    replacement = await self._replace(
                        link, "server_shutdown", self._best(link)
                    )
                    if replacement is None:
                        await self._close(link, "server_shutdown")
                        return "server_shutdown", link.stable
                elif now >= rotate_at:
                    replacement = await self._replace(
                        link, "lifetime", self._best(link)
                    )
                    rotate_at = now + (
                        rotation_delay(
                            settings.rotate_after, settings.rotate_jitter, self._rng
                        )
                        if replacement
                        else settings.health_check_interval
                    )
                elif now >= failback_at:
                    failback_at = now + settings.failback_interval
                    preferred = self._preferred(link)
                    if preferred is not None:
                        replacement = await self._replace(link, "failback", preferred)

                if replacement is not None:
                    link = replacement
                    self._activate(link)
                if now >= health_at:
                    health_at = now + settings.health_check_interval
                    self._check_symbols(link)
        finally:
            stop.cancel()
            self._deactivate()

    def _watch(self, link: Link, now: float) -> None:
        """Feed the watchdogs and publish counters; runs every watchdog tick."""
        frames = link.connection.frames
        delta = frames - link.frames_seen
        link.frames_seen = frames
        link.watchdog.observe(delta)
        if delta:
            link.stability.data()
        if not link.stable and link.stability.is_stable():
            link.stable = True
            self._failed_attempts = 0
            self._backoff.reset()
            log.info(
                "connection_stable",
                endpoint=link.endpoint.label,
                after=link.stability.stable_after,
            )

        wall = self._clock.time()
        for key, count in link.session.counts.items():
            new = count - link.counts_seen[key]
            link.symbol_watchdogs[key].observe(new)
            if new:
                link.counts_seen[key] = count
                self._metrics.messages_received.labels(key.symbol, key.stream).inc(new)
                self._metrics.last_message.labels(key.symbol, key.stream).set(wall)

        self._metrics.connection_age.set(link.connection.age)
        if now - self._last_flush >= 1.0 and self._on_flush is not None:
            self._last_flush = now
            self._on_flush()

    def _check_symbols(self, link: Link) -> None:
        """Report symbols that fell silent against their own rate while others flow."""
        for key, watchdog in link.symbol_watchdogs.items():
            stale = watchdog.is_stale()
            if stale and key not in link.silent_keys:
                link.silent_keys.add(key)
                self._metrics.stale_detections.labels("symbol").inc()
                log.warning(
                    "symbol_silent",
                    endpoint=link.endpoint.label,
                    key=str(key),
                    silent_for=round(watchdog.silent_for(), 1),
                    limit=round(watchdog.silence_limit(), 1),
                )
            elif not stale and key in link.silent_keys:
                link.silent_keys.discard(key)
                log.info("symbol_resumed", endpoint=link.endpoint.label, key=str(key))

    def _on_stale(self, link: Link) -> None:
        watchdog = link.watchdog
        log.warning(
            "stale_detected",
            endpoint=link.endpoint.label,
            silent_for=round(watchdog.silent_for(), 2),
            limit=round(watchdog.silence_limit(), 2),
            rate=None if watchdog.rate is None else round(watchdog.rate, 1),
            action="reconnecting; the gap is healed from REST",
        )
        self._metrics.stale_detections.labels("data_timeout").inc()
        self._metrics.errors.labels("stale").inc()
        self._metrics.reconnects.labels(link.endpoint.label, "stale").inc()
        link.endpoint.last_error = "stale: no data"
        link.endpoint.breaker.record_failure("stale")
        link.connection.abort("stale")
        link.reader.cancel()

    def _lost(self, link: Link) -> str:
        reason = "connection lost"
        if not link.reader.cancelled():
            exc = link.reader.exception()
            reason = f"reader failed: {exc!r}" if exc else link.reader.result()
        kind = "heartbeat_timeout" if "heartbeat" in reason else "connection_lost"
        if kind == "heartbeat_timeout":
            self._metrics.stale_detections.labels("heartbeat").inc()
        log.warning(
            "connection_lost",
            endpoint=link.endpoint.label,
            reason=reason,
            age=round(link.connection.age, 1),
            stable=link.stable,
        )
        self._metrics.errors.labels("connection_lost").inc()
        self._metrics.reconnects.labels(link.endpoint.label, kind).inc()
        link.endpoint.last_error = reason
        if not link.stable:
            link.endpoint.breaker.record_failure("dropped before stable")
        return reason

    async def _replace(
        self, old: Link, reason: str, endpoint: Endpoint | None
    ) -> Link | None:
        """Make before break: the new link carries every stream before the old one closes."""
        if endpoint is None:
            return None
        if (
            endpoint.blocked_until > self._clock.monotonic()
            or not endpoint.breaker.allow()
        ):
            return None
        if self._budget.acquire() > 0:
            endpoint.breaker.release()
            return None

        log.info(
            "rotation_started",
            reason=reason,
            old=old.endpoint.label,
            new=endpoint.label,
        )
        try:
            new = await self.open(endpoint)
        except ConnectError as exc:
            log.warning(
                "rotation_failed",
                reason=reason,
                endpoint=endpoint.label,
                error=str(exc),
            )
            return None

        deadline = self._clock.monotonic() + self._settings.switch_timeout
        next_watch = 0.0
        while not new.session.all_streams_seen():
            now = self._clock.monotonic()
            if new.reader.done() or now >= deadline:
                break
            if now >= next_watch:
                # The old link is still the live one: keep watching it, and
                # stop waiting if it dies or goes silent meanwhile.
                next_watch = now + self._settings.watchdog_interval
                self._watch(old, now)
                if old.reader.done() or old.watchdog.is_stale():
                    break
            await asyncio.sleep(0.02)
        complete = new.session.all_streams_seen()
        if new.reader.done() or (
            not complete and (reason == "failback" or not new.connection.frames)
        ):
            # Traffic only moves to a connection that serves data.
            log.warning(
                "rotation_failed",
                reason=reason,
                endpoint=endpoint.label,
                error="no data within switch_timeout"
                if not new.reader.done()
                else "closed",
            )
            endpoint.breaker.record_failure("no data")
            await self._close(new, "abandoned")
            return None

        # Both read for a moment: whatever either misses the other carries.
        await self._pause(self._settings.overlap)
        await self._close(old, reason)
        self._metrics.rotations.labels(reason).inc()
        self._metrics.reconnects.labels(endpoint.label, _reconnect_reason(reason)).inc()
        event = "failback" if reason == "failback" else "rotated"
        log.info(event, reason=reason, old=old.endpoint.label, new=endpoint.label)
        return new

    async def _close(self, link: Link, reason: str) -> None:
        await link.connection.close(1000, reason)
        try:
            async with asyncio.timeout(2.0):
                await asyncio.shield(link.reader)
        except (TimeoutError, asyncio.CancelledError):
            link.reader.cancel()
        except Exception:  # the reader's own failure was already logged
            pass
        self._watch(link, self._clock.monotonic())

    @property
    def on_preferred(self) -> bool:
        """Whether the live link is on this supervisor's first endpoint."""
        return self.link is not None and self.link.endpoint is self.endpoints[0]

    def _activate(self, link: Link) -> None:
        previous = self.link
        self.link = link
        self.next_attempt_at = None
        if previous is not None and previous.endpoint is not link.endpoint:
            self._metrics.endpoint_active.labels(previous.endpoint.label).set(0)
        self._metrics.endpoint_active.labels(link.endpoint.label).set(1)
        self._metrics.reconnect_delay.set(0)
        if self._on_state is not None:
            self._on_state()
        if not self.on_preferred:
            log.warning(
                "failover",
                endpoint=link.endpoint.label,
                venue=link.endpoint.venue,
                preferred=self.endpoints[0].label,
                action="the preferred endpoint is probed every failback_interval",
                failback_interval=self._settings.failback_interval,
            )

    def _deactivate(self) -> None:
        if self.link is not None:
            self._metrics.endpoint_active.labels(self.link.endpoint.label).set(0)
        self.link = None
        if self._on_state is not None:
            self._on_state()

    def _on_connect_failed(self, endpoint: Endpoint, exc: ConnectError) -> None:
        endpoint.failures += 1
        endpoint.last_error = exc.cause
        endpoint.breaker.record_failure(exc.kind)
        self._metrics.connection_attempts.labels(endpoint.label, "failure").inc()

        if exc.status in (418, 429):
            wait = exc.retry_after if exc.retry_after is not None else 60.0
            endpoint.blocked_until = self._clock.monotonic() + wait
            if exc.status == 418:
                self._metrics.bans.labels("ws").inc()
                self._metrics.errors.labels("banned").inc()
                self._metrics.banned_until.set(self._clock.time() + wait)
                log.error(
                    "banned",
                    kind="ws",
                    endpoint=endpoint.label,
                    retry_after=wait,
                    action="no handshake is tried on this endpoint until the ban ends",
                )
                return
            self._metrics.rate_limited.labels("ws").inc()
            self._metrics.errors.labels("rate_limited").inc()
            log.warning(
                "rate_limited", kind="ws", endpoint=endpoint.label, retry_after=wait
            )
            return

        self._metrics.errors.labels("connect").inc()
        log.warning("connect_failed", endpoint=endpoint.label, error=exc.cause)

    def _record_failed_attempt(self, cause: str) -> None:
        self._failed_attempts += 1
        limit = self._settings.max_reconnect_attempts
        if limit and self._failed_attempts >= limit:
            log.error("reconnect_given_up", attempts=self._failed_attempts, cause=cause)
            raise GiveUp(self._failed_attempts, self.endpoints)

    async def _schedule_retry(self, cause: str, endpoint: Endpoint | None) -> None:
        delay = self._backoff.next_delay()
        now = self._clock.monotonic()
        if endpoint is not None and endpoint.blocked_until > now:
            delay = max(delay, endpoint.blocked_until - now)
        self.next_attempt_at = now + delay
        self._metrics.reconnect_delay.set(delay)
        log.info(
            "reconnect_scheduled",
            attempt=self._backoff.attempt,
            delay=round(delay, 2),
            nominal=self._backoff.nominal(self._backoff.attempt - 1),
            endpoint=endpoint.label if endpoint else None,
            cause=cause,
        )
        self.reconnects += 1
        await self._pause(delay)

    def _usable(self) -> list[Endpoint]:
        now = self._clock.monotonic()
        return [
            e
            for e in self.endpoints
            if e.blocked_until <= now and e.breaker.state.value != "open"
        ]

    def _first_usable(self) -> Endpoint | None:
        usable = self._usable()
        return usable[0] if usable else (self.endpoints[0] if self.endpoints else None)

    def _best(self, link: Link) -> Endpoint | None:
        """Where a rotation goes: the most preferred usable endpoint, else the current one."""
        taken = self._taken()
        usable = [e for e in self._usable() if e not in taken]
        return usable[0] if usable else link.endpoint

    def _preferred(self, link: Link) -> Endpoint | None:
        """A usable endpoint preferred to the current one, for failback."""
        for endpoint in self._usable():
            if endpoint is link.endpoint:
                return None
            if endpoint not in self._taken():
                return endpoint
        return None

    def _taken(self) -> list[Endpoint]:
        """Endpoints that sibling supervisors (redundant connections) are on."""
        return [
            e for e in (self._siblings() if self._siblings else []) if e is not None
        ]

    async def _wait_for_endpoint(self) -> None:
        now = self._clock.monotonic()
        moments = [e.blocked_until for e in self.endpoints if e.blocked_until > now]
        moments += [
            t for e in self.endpoints if (t := e.breaker.retry_at()) is not None
        ]
        wait = (
            max(0.05, min(moments) - now) if moments else self._settings.reconnect_delay
        )
        log.info("endpoints_unavailable", wait=round(wait, 2))
        self._metrics.reconnect_delay.set(wait)
        await self._pause(wait)

    async def _pause(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when stopped meanwhile."""
        if seconds <= 0:
            return self._stopping.is_set()
        try:
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        except TimeoutError:
            return False
        return True


def _reconnect_reason(reason: str) -> str:
    return {"lifetime": "rotation", "failback": "failback"}.get(reason, reason)
