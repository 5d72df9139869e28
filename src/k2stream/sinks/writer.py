"""The asyncio side of delivery: batches trades and writes them off the loop.

The feed calls :meth:`SinkWriter.offer` for every trade on its hot path; the
writer gathers them into batches and hands each whole batch to one dedicated
thread that owns the sink (an sqlite3 connection belongs to the thread that
made it). A batch is cut when ``batch_size`` trades are pending or
``batch_interval`` seconds after the first of them arrived, whichever comes
first.

At the cut the writer asks the sequencer for its checkpoints (the contiguous
watermark per id sequence: everything at or below it has been offered by
then, so it is in this batch or an earlier one) and writes that snapshot in
the same atomic write as the batch. :attr:`SinkWriter.durable_checkpoints`
only ever reports what a successful write made durable.

When the sink is unavailable the batch is kept and retried with a doubling
delay; offers keep buffering up to ``max_backlog`` and are refused after
that, each refusal becoming a gap the feed heals from REST later. A fatal
:class:`SinkError` stops the writer; :meth:`drain` and :meth:`close` raise it
so that the service can exit with its message.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Final, TypeVar

import structlog
from prometheus_client import Counter

from k2stream.clock import SYSTEM_CLOCK, Clock
from k2stream.observe.metrics import Metrics
from k2stream.records import StreamKey, Trade
from k2stream.sinks.base import ERROR_REASONS, Sink, SinkError, SinkUnavailable


log = structlog.get_logger(__name__)

T = TypeVar("T")

FAILURE_LOG_INTERVAL: Final = 30.0
"""Seconds between repeated ``sink_write_failed`` warnings during one outage."""


@dataclass(slots=True)
class _Batch:
    trades: list[Trade]
    checkpoints: dict[StreamKey, int]
    """Watermarks to make durable with the trades; empty for all but the last
    chunk of a cut, so that no chunk acknowledges trades of a later one."""


class SinkWriter:
    """Delivers offered trades to ``sink`` in batches, from one worker thread."""

    def __init__(
        self,
        sink: Sink,
        metrics: Metrics,
        *,
        checkpoints: Callable[[], Mapping[StreamKey, int]],
        batch_size: int = 5000,
        batch_interval: float = 0.05,
        max_backlog: int = 250_000,
        retry_delay: float = 0.2,
        max_retry_delay: float = 5.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if batch_size < 1 or max_backlog < 1:
            raise ValueError(
                f"batch_size={batch_size} and max_backlog={max_backlog} "
                "must both be at least 1"
            )
        if batch_interval < 0 or retry_delay <= 0 or max_retry_delay < retry_delay:
            raise ValueError(
                f"batch_interval={batch_interval} must be >= 0 and "
                f"0 < retry_delay={retry_delay} <= max_retry_delay={max_retry_delay}"
            )

        self._sink = sink
        self._checkpoints = checkpoints
        self._batch_size = batch_size
        self._batch_interval = batch_interval
        self._max_backlog = max_backlog
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._clock = clock

        self._pending: list[Trade] = []
        self._first_pending_at = 0.0
        self._batches: deque[_Batch] = deque()
        self._accepted = 0
        """Trades accepted by offer() since the start; with _written, the backlog."""
        self._written = 0
        self._durable: dict[StreamKey, int] = {}

        self._available = True
        self._refusing = False
        self._outage_started: float | None = None
        self._outage_attempts = 0
        self._failure_logged_at = 0.0
        self._fatal: SinkError | None = None

        self._wake = asyncio.Event()
        self._drains: list[tuple[int, asyncio.Future[None]]] = []
        """Pending drain() calls: how many trades each waits for, and its future."""
        self._closing = False
        self._closed = False
        self._opened = False
        # One thread, started on first use, owns the sink for its whole life.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"k2-sink-{sink.name}",
        )
        self._task: asyncio.Task[None] | None = None

        name = sink.name
        self._m_writes = metrics.sink_writes.labels(name)
        self._m_trades = metrics.sink_trades.labels(name)
        self._m_latency = metrics.sink_latency.labels(name)
        self._m_backlog = metrics.sink_backlog.labels(name)
        self._m_dropped = metrics.sink_dropped.labels(name)
        self._m_available = metrics.sink_available.labels(name)
        self._m_errors = {r: metrics.sink_errors.labels(name, r) for r in ERROR_REASONS}

    async def start(self) -> dict[StreamKey, int]:
        """Open the sink in the writer's thread and start writing.

        Returns the checkpoints the sink holds. While the store is
        unavailable (say, locked by another process) opening is retried with
        the same backoff as writes; a fatal error is raised, and the writer
        cannot be used after it.
        """
        if self._opened or self._closing:
            raise RuntimeError("a SinkWriter starts once; make a new one")

        try:
            checkpoints = await self._open_sink()
        except BaseException:
            # Fatal or cancelled: this writer is done, and so is its thread.
            self._closing = self._closed = True
            self._executor.shutdown(wait=False, cancel_futures=True)
            raise

        self._opened = True
        self._durable = dict(checkpoints)
        self._m_available.set(1)
        self._m_backlog.set(0)

        self._task = asyncio.create_task(self._run(), name=f"sink-{self._sink.name}")
        log.info(
            "sink_writer_started", sink=self._sink.name, sequences=len(checkpoints)
        )
        return dict(checkpoints)

    def offer(self, trade: Trade) -> bool:
        """Accept ``trade`` for delivery; False when the backlog is full.

        Runs on the feed's hot path: constant time, no await. A refused trade
        is not stored; the caller treats its id as a gap.
        """
        backlog = self._accepted - self._written
        if backlog >= self._max_backlog or self._closing or self._fatal is not None:
            self._refuse()
            return False

        pending = self._pending
        pending.append(trade)
        self._accepted += 1

        # Wake the batching loop only on the two transitions it waits for.
        if len(pending) == 1:
            self._first_pending_at = self._clock.monotonic()
            self._wake.set()
        elif len(pending) == self._batch_size:
            self._wake.set()
        return True

    @property
    def backlog(self) -> int:
        """Trades offered and not yet durable."""
        return self._accepted - self._written

    @property
    def available(self) -> bool:
        """False while writes are failing (and after a fatal error)."""
        return self._available

    @property
    def accepting(self) -> bool:
        """Whether the backlog has room for a backfill page: below half of ``max_backlog``.

        The backfill waits while it is False, so that what it fetches is not
        refused again by a sink that is still catching up.
        """
        return self.backlog < self._max_backlog // 2 and self._available

    @property
    def failed(self) -> SinkError | None:
        """The fatal error that stopped the writer, if one did."""
        return self._fatal

    @property
    def durable_checkpoints(self) -> dict[StreamKey, int]:
        """The checkpoints made durable by the last successful writes."""
        return dict(self._durable)

    # The contract takes a timeout and answers False rather than raising.
    async def drain(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until every trade offered before the call is durable.

        Pending trades are cut at once instead of after the batch interval.
        Returns False if ``timeout`` seconds pass first (the backlog stays
        queued). Raises the sink's fatal error if the writer stopped on one.
        """
        self._raise_if_failed()
        target = self._accepted
        if self._written >= target:
            return True

        if self._task is None:
            return False

        drained = asyncio.get_running_loop().create_future()
        entry = (target, drained)
        self._drains.append(entry)
        self._wake.set()
        try:
            await asyncio.wait_for(drained, timeout)
        except TimeoutError:
            return False
        finally:
            self._drains.remove(entry)

        self._raise_if_failed()
        return True

    async def run_in_sink(self, call: Callable[[Sink], T]) -> T:
        """Run ``call(sink)`` in the writer's thread, between two batches.

        For what only the sink's own thread may do, such as
        ``SqliteSink.record_gap``.
        """
        if not self._opened or self._closed:
            raise RuntimeError("the SinkWriter is not running; start() it first")

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, call, self._sink)

    async def close(self, drain_timeout: float | None = None) -> None:
        """Drain, write the final checkpoints and close the sink.

        With ``drain_timeout``, gives up draining after that many seconds: what is
        left is not written and not acknowledged, so it is healed after the
        restart. Raises the sink's fatal error, after closing the sink, if
        the writer stopped on one.
        """
        if self._closed:
            self._raise_if_failed()
            return

        self._closing = True
        self._wake.set()
        try:
            if self._task is not None:
                await self._finish(self._task, drain_timeout)
        finally:
            self._closed = True
            await self._close_sink()

        self._raise_if_failed()

    async def _finish(
        self, task: asyncio.Task[None], drain_timeout: float | None
    ) -> None:
        """Drain and stop the batching loop, then store the final checkpoints."""
        try:
            drained = await self.drain(drain_timeout)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        if not drained:
            log.warning(
                "sink_close_incomplete",
                sink=self._sink.name,
                backlog=self.backlog,
                drain_timeout=drain_timeout,
            )
            return

        # The sequencer may have moved on since the last cut (a gap given up
        # on, say) without a trade to carry the news: store it now.
        final = dict(self._checkpoints())
        if any(self._durable.get(key, -1) < last_id for key, last_id in final.items()):
            try:
                await self._write_once(_Batch([], final))
            except SinkError as exc:
                log.warning(
                    "sink_final_checkpoints_failed",
                    sink=self._sink.name,
                    error=str(exc),
                )

    async def _close_sink(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._opened:
                await loop.run_in_executor(self._executor, self._sink.close)
        except Exception as exc:
            log.warning("sink_close_failed", sink=self._sink.name, error=str(exc))
        finally:
            self._executor.shutdown(wait=True)

        log.info("sink_writer_closed", sink=self._sink.name, backlog=self.backlog)

    async def _open_sink(self) -> dict[StreamKey, int]:
        loop = asyncio.get_running_loop()
        delay = self._retry_delay
        while True:
            try:
                return await loop.run_in_executor(self._executor, self._sink.open)
            except SinkUnavailable as exc:
                self._error_counter(exc).inc()
                log.warning(
                    "sink_open_failed",
                    sink=self._sink.name,
                    reason=exc.reason,
                    error=str(exc),
                    retry_in=delay,
                )

            await self._clock.sleep(delay)
            delay = min(delay * 2, self._max_retry_delay)

    async def _run(self) -> None:
        """Cut batches and write them, one at a time, until closed or failed."""
        try:
            while True:
                await self._wait_for_trades()
                if not self._pending:
                    return

                await self._wait_for_cut()
                self._cut()
                while self._batches:
                    await self._write(self._batches[0])
                    self._batches.popleft()
        except SinkError as exc:
            self._fail(exc)
        except Exception as exc:
            self._fail(
                SinkError(
                    f"the {self._sink.name} sink writer failed unexpectedly ({exc!r}); "
                    "this is a bug, please report it with the log"
                )
            )

    async def _wait_for_trades(self) -> None:
        while not self._pending and not self._closing:
            self._wake.clear()
            await self._wake.wait()

    async def _wait_for_cut(self) -> None:
        """Wait until the batch is full, its interval is over, or a drain asks."""
        deadline = self._first_pending_at + self._batch_interval
        while not self._must_cut():
            remaining = deadline - self._clock.monotonic()
            if remaining <= 0:
                return

            self._wake.clear()
            await self._sleep_or_wake(remaining)

    def _must_cut(self) -> bool:
        return (
            len(self._pending) >= self._batch_size
            or bool(self._drains)
            or self._closing
        )

    async def _sleep_or_wake(self, seconds: float) -> None:
        woken = asyncio.ensure_future(self._wake.wait())
        slept = asyncio.ensure_future(self._clock.sleep(seconds))
        try:
            await asyncio.wait((woken, slept), return_when=asyncio.FIRST_COMPLETED)
        finally:
            woken.cancel()
            slept.cancel()
            await asyncio.gather(woken, slept, return_exceptions=True)

    def _cut(self) -> None:
        """Turn the pending trades into batches carrying the current checkpoints.

        After an outage more than ``batch_size`` trades may be pending: they
        are split, and only the last chunk carries the checkpoints.
        """
        snapshot = dict(self._checkpoints())
        trades, self._pending = self._pending, []

        size = self._batch_size
        if len(trades) <= size:
            self._batches.append(_Batch(trades, snapshot))
        else:
            for start in range(0, len(trades), size):
                last = start + size >= len(trades)
                chunk = trades[start : start + size]
                self._batches.append(_Batch(chunk, snapshot if last else {}))

        self._m_backlog.set(self.backlog)

    async def _write(self, batch: _Batch) -> None:
        """Write ``batch``, retrying while the sink is unavailable."""
        delay = self._retry_delay
        while True:
            try:
                await self._write_once(batch)
            except SinkUnavailable as exc:
                self._note_failure(exc, delay)
            else:
                self._note_recovery()
                return

            await self._clock.sleep(delay)
            delay = min(delay * 2, self._max_retry_delay)

    async def _write_once(self, batch: _Batch) -> None:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        await loop.run_in_executor(
            self._executor, self._sink.write, batch.trades, batch.checkpoints
        )

        self._m_latency.observe(time.perf_counter() - started)
        self._m_writes.inc()
        self._m_trades.inc(len(batch.trades))
        for key, last_id in batch.checkpoints.items():
            self._durable[key] = max(last_id, self._durable.get(key, last_id))

        self._written += len(batch.trades)
        self._m_backlog.set(self.backlog)
        if self.backlog < self._max_backlog:
            self._refusing = False
        for target, drained in self._drains:
            if target <= self._written and not drained.done():
                drained.set_result(None)

    def _note_failure(self, exc: SinkUnavailable, retry_in: float) -> None:
        """Count a failed write; warn at the start of an outage and now and then."""
        self._error_counter(exc).inc()
        self._m_available.set(0)
        self._m_backlog.set(self.backlog)
        self._available = False

        now = self._clock.monotonic()
        self._outage_attempts += 1
        if self._outage_started is None:
            self._outage_started = now
        elif now - self._failure_logged_at < FAILURE_LOG_INTERVAL:
            return

        self._failure_logged_at = now
        log.warning(
            "sink_write_failed",
            sink=self._sink.name,
            reason=exc.reason,
            error=str(exc),
            retry_in=retry_in,
            attempts=self._outage_attempts,
            outage_seconds=round(now - self._outage_started, 3),
            backlog=self.backlog,
        )

    def _note_recovery(self) -> None:
        if self._outage_started is not None:
            log.info(
                "sink_write_recovered",
                sink=self._sink.name,
                attempts=self._outage_attempts,
                outage_seconds=round(self._clock.monotonic() - self._outage_started, 3),
            )
            self._outage_started = None
            self._outage_attempts = 0

        self._available = True
        self._m_available.set(1)

    def _refuse(self) -> None:
        self._m_dropped.inc()
        if self._refusing:
            return

        self._refusing = True
        log.warning(
            "sink_backlog_full",
            sink=self._sink.name,
            backlog=self.backlog,
            max_backlog=self._max_backlog,
            closing=self._closing,
            failed=self._fatal is not None,
        )

    def _fail(self, exc: SinkError) -> None:
        """Stop on a fatal error: nothing more is written or acknowledged."""
        self._fatal = exc
        self._available = False
        self._m_available.set(0)
        self._m_errors["error"].inc()
        for _, drained in self._drains:
            if not drained.done():
                drained.set_result(None)
        log.error("sink_failed", sink=self._sink.name, error=str(exc))

    def _error_counter(self, exc: SinkUnavailable) -> Counter:
        # A sink's own SinkUnavailable subclass may carry any reason: keep the
        # label to the documented few.
        return self._m_errors.get(exc.reason, self._m_errors["unavailable"])

    def _raise_if_failed(self) -> None:
        if self._fatal is not None:
            raise self._fatal
