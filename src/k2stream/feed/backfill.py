"""Healing gaps from the venue's REST history.

A gap is not fetched the moment it opens: during a make-before-break
rotation, or with a redundant connection, the ids usually arrive from the
other socket within moments. After ``grace`` seconds whatever is still
missing is paged from REST, oldest first, within the weight budget that the
fetch function honours. What REST cannot give back (history gone, a long
ban, a hole larger than ``max_backfill``) is given up *loudly*: logged at
error level, counted, and reported with its range.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import structlog

from k2stream.clock import SYSTEM_CLOCK, Clock
from k2stream.feed.pipeline import Pipeline
from k2stream.observe.metrics import Metrics
from k2stream.records import StreamKey, Trade


log = structlog.get_logger(__name__)

Fetch = Callable[[StreamKey, int, int], Awaitable[list[Trade]]]
"""fetch(key, from_id, limit): up to ``limit`` trades of ``key`` from ``from_id`` on, ascending."""


class FetchError(Exception):
    """A fetch failed. ``permanent`` gaps are given up; others are retried."""

    def __init__(
        self, message: str, *, retry_after: float | None = None, permanent: bool = False
    ):
        super().__init__(message)
        self.retry_after = retry_after
        self.permanent = permanent


@dataclass(frozen=True, slots=True)
class LostRange:
    """Ids that could not be healed, and why."""

    key: StreamKey
    first: int
    last: int
    reason: str


class Backfiller:
    """Heals the sequencer's gaps through ``fetch``."""

    def __init__(
        self,
        pipeline: Pipeline,
        fetch: Fetch,
        metrics: Metrics,
        *,
        clock: Clock = SYSTEM_CLOCK,
        grace: float = 1.0,
        max_backfill: int = 1_000_000,
        page: int = 1000,
        max_ban_wait: float = 300.0,
        retry_delay: float = 1.0,
        on_lost: Callable[[LostRange], None] | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._sequencer = pipeline.sequencer
        self._fetch = fetch
        self._metrics = metrics
        self._clock = clock
        self._grace = grace
        self._max_backfill = max_backfill
        self._page = page
        self._max_ban_wait = max_ban_wait
        self._retry_delay = retry_delay
        self._on_lost = on_lost
        self._pending: set[StreamKey] = set()
        self._wake = asyncio.Event()
        self.lost: collections.deque[LostRange] = collections.deque(maxlen=100)
        """The most recent lost ranges, for /status; the store's gaps table keeps them all."""
        self.healed_trades = 0
        self.busy = False

    def notify(self, key: StreamKey, first: int, last: int) -> None:
        """A gap opened (the sequencer's listener); bounded by ``max_backfill``."""
        size = last - first + 1
        self._metrics.gaps_detected.labels(key.symbol, key.stream).inc()
        log.warning("gap_detected", key=str(key), first=first, last=last, size=size)

        if size > self._max_backfill:
            # Only the newest ids are healed; the older part is reported lost.
            self._lose(key, first, last - self._max_backfill, "max_backfill")

        self._pending.add(key)
        self._wake.set()
        self.export(key)

    def export(self, key: StreamKey) -> None:
        """Refresh the open-gap gauges of ``key``."""
        self._metrics.gaps_open.labels(key.symbol, key.stream).set(
            len(self._sequencer.gaps(key))
        )
        self._metrics.gap_trades_missing.labels(key.symbol, key.stream).set(
            self._sequencer.missing(key)
        )

    async def run(self) -> None:
        """Heal gaps as they are reported, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._clock.sleep(self._grace)

            while self._pending:
                key = self._pending.pop()
                self.busy = True
                try:
                    await self.heal(key)
                finally:
                    self.busy = False

    async def heal(self, key: StreamKey) -> None:
        """Fetch every open gap of ``key`` until none is left."""
        failures = 0
        while gaps := self._sequencer.gaps(key):
            first, last = gaps[0]
            if not self._pipeline.outlet.accepting:
                # The sink is down or still catching up: a page fetched now
                # would only be refused again.
                await self._clock.sleep(self._retry_delay)
                continue

            try:
                trades = await self._fetch(
                    key, first, min(self._page, last - first + 1)
                )
            except FetchError as exc:
                failures += 1
                if not await self._after_failure(key, first, last, exc, failures):
                    return
                continue

            failures = 0
            self._apply(key, first, last, trades)
            self.export(key)

    def _apply(
        self, key: StreamKey, first: int, last: int, trades: list[Trade]
    ) -> None:
        if not trades or trades[-1].id < first:
            self._lose(key, first, last, "not_in_history")
            return

        if trades[0].id > first:
            # Binance clamps ids older than its retention instead of failing.
            self._lose(key, first, min(last, trades[0].id - 1), "history_gone")

        healed = 0
        for trade in trades:
            if trade.id > last:
                break
            if self._pipeline.deliver_backfill(trade):
                healed += 1
        self.healed_trades += healed
        self._metrics.backfilled.labels(key.symbol, key.stream).inc(healed)
        if healed:
            log.info(
                "gap_healed", key=str(key), first=first, trades=healed, source="rest"
            )

    async def _after_failure(
        self, key: StreamKey, first: int, last: int, exc: FetchError, failures: int
    ) -> bool:
        """Wait or give up after a failed fetch; False when healing ``key`` stops."""
        if exc.permanent:
            self._lose(key, first, last, "rejected")
            return True

        if exc.retry_after is not None and exc.retry_after > self._max_ban_wait:
            for low, high in self._sequencer.gaps(key):
                self._lose(key, low, high, "banned")
            return False

        delay = exc.retry_after or min(60.0, self._retry_delay * 2 ** min(failures, 6))
        log.warning(
            "backfill_retry", key=str(key), first=first, error=str(exc), retry_in=delay
        )
        await self._clock.sleep(delay)
        return True

    def _lose(self, key: StreamKey, first: int, last: int, reason: str) -> None:
        missing = self._sequencer.give_up(key, first, last)
        if not missing:
            return
        lost = LostRange(key, first, last, reason)
        self.lost.append(lost)
        self._metrics.gaps_unhealable.labels(key.symbol, key.stream).inc()
        self._metrics.errors.labels("gap_unhealable").inc()
        log.error(
            "gap_unhealable",
            key=str(key),
            first=first,
            last=last,
            missing=missing,
            reason=reason,
            action="run `k2stream verify --repair` when the cause is gone",
        )
        if self._on_lost is not None:
            self._on_lost(lost)
        self.export(key)
