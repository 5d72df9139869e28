"""The service: stream, heal, deliver, expose, and stop cleanly.

Start-up order matters for "no trade lost": the store's checkpoints are read
before the first frame, so the first live id of each sequence shows the hole
left by the last run and the backfill heals it. Shutdown reverses it: stop
reading, let the sink write everything accepted with its checkpoints, close
the socket with 1000.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp
import structlog

from k2stream import __version__
from k2stream.binance.feed import BinanceFeed
from k2stream.binance.normalize import Normalizer, SymbolInfo
from k2stream.binance.rest import BinanceRest, RestError, UnknownSymbols, fetch_page
from k2stream.binance.streams import endpoint_label, venue_of
from k2stream.clock import SYSTEM_CLOCK, Clock
from k2stream.config import Settings
from k2stream.feed.backfill import Backfiller, Fetch, FetchError, LostRange
from k2stream.feed.breaker import Breaker, BreakerState
from k2stream.feed.budget import AttemptBudget, WeightBudget
from k2stream.feed.endpoints import Endpoint
from k2stream.feed.pipeline import Pipeline
from k2stream.feed.sequencer import Sequencer
from k2stream.feed.supervisor import GiveUp, Supervisor
from k2stream.observe.http import ProbeServer
from k2stream.observe.metrics import Metrics
from k2stream.observe.status import build_status
from k2stream.records import AGG_TRADE, BINANCE, BINANCE_US, StreamKey, Trade
from k2stream.sinks.base import SinkError, open_sink
from k2stream.sinks.writer import SinkWriter


log = structlog.get_logger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_GAVE_UP = 75  # EX_TEMPFAIL: every endpoint kept failing; a later start may succeed


def shard_symbols(symbols: Sequence[str], index: int, count: int) -> list[str]:
    """The symbols of shard ``index`` of ``count``, by a hash stable across runs and hosts."""
    return [s for s in symbols if zlib.crc32(s.encode()) % count == index]


class Service:
    """One k2stream process."""

    def __init__(
        self,
        settings: Settings,
        *,
        metrics: Metrics | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.rng = rng or random.Random()
        self.symbols = shard_symbols(settings.symbols, *settings.shard)
        self.started = asyncio.Event()
        self.stopped = False
        self.supervisor: Supervisor | None = None
        self.supervisors: list[Supervisor] = []
        self.groups: list[list[Supervisor]] = []
        self.writer: SinkWriter | None = None
        self.backfiller: Backfiller | None = None
        self.sequencer = Sequencer()
        self.pipeline: Pipeline | None = None
        self.probe: ProbeServer | None = None
        self.rests: dict[str, BinanceRest] = {}
        self._stop = asyncio.Event()
        self._background: set[asyncio.Future[None]] = set()

    @property
    def delivered(self) -> int:
        """Trades handed to the sink so far."""
        return 0 if self.pipeline is None else self.pipeline.delivered

    def stop(self) -> None:
        """Begin a clean shutdown (what SIGINT and SIGTERM do)."""
        self._stop.set()

    async def run(self) -> int:
        """Run until stopped, the duration ends, or a fatal error; returns the exit status."""
        log.info(
            "service_starting",
            version=__version__,
            symbols=self.symbols,
            streams=self.settings.streams,
            sink=self.settings.sink,
        )
        if not self.symbols:
            log.error(
                "no_symbols",
                shard=self.settings.shard,
                action="check --shard and --symbols",
            )
            return EXIT_USAGE

        async with aiohttp.ClientSession() as http:
            try:
                return await self._run(http)
            except UnknownSymbols as exc:
                log.error("symbols_refused", error=str(exc))
                print(f"k2stream: {exc}", flush=True)
                return EXIT_USAGE
            except GiveUp as exc:
                log.error("gave_up", error=str(exc))
                print(f"k2stream: {exc}", flush=True)
                return EXIT_GAVE_UP
            except SinkError as exc:
                log.error("sink_failed", error=str(exc))
                print(f"k2stream: {exc}", flush=True)
                return EXIT_FAILURE
            except RestError as exc:
                log.error("startup_failed", error=str(exc))
                print(f"k2stream: cannot start: {exc}", flush=True)
                return EXIT_FAILURE

    async def _run(self, http: aiohttp.ClientSession) -> int:
        settings = self.settings
        endpoints = self._endpoints()
        venues = {e.venue for e in endpoints}

        self.rests = {
            venue: BinanceRest(
                settings.rest_url if venue == BINANCE else settings.rest_url_us,
                session=http,
                budget=WeightBudget(6000, clock=self.clock),
                metrics=self.metrics,
                clock=self.clock,
            )
            for venue in venues | {BINANCE}
        }
        self.metrics.rest_weight_limit.set(self.rests[BINANCE].budget.allowance)
        normalizers = await self._symbol_info(venues)

        options = (
            {"busy_timeout": settings.sink_busy_timeout}
            if settings.sink.startswith("sqlite:")
            else {}
        )
        writer = self.writer = SinkWriter(
            open_sink(settings.sink, **options),
            self.metrics,
            checkpoints=self.sequencer.checkpoints,
            batch_size=settings.batch_size,
            batch_interval=settings.batch_interval,
            max_backlog=settings.max_backlog,
            clock=self.clock,
        )
        checkpoints = await writer.start()
        wanted = {
            StreamKey(n.exchange, s, st)
            for n in normalizers.values()
            for s in self.symbols
            for st in settings.streams
        }
        for key, last_id in checkpoints.items():
            if key in wanted:
                self.sequencer.resume(key, last_id)
                log.info("resuming", key=str(key), checkpoint=last_id)

        pipeline = self.pipeline = Pipeline(self.sequencer, writer, self.metrics)
        backfiller = self.backfiller = Backfiller(
            pipeline,
            self._fetch_for(normalizers),
            self.metrics,
            clock=self.clock,
            grace=settings.backfill_grace,
            max_backfill=settings.max_backfill,
            on_lost=self._on_lost,
        )
        self.sequencer.listen(backfiller.notify, self._on_healed)

        self.supervisors = self._supervisors(endpoints, normalizers, pipeline, http)
        self.supervisor = self.supervisors[0]

        self.probe = ProbeServer(
            self.metrics,
            host=settings.metrics_host,
            port=settings.metrics_port,
            live=self._live,
            ready=self._ready,
            status=lambda: build_status(self),
        )
        await self.probe.start()
        log.info("metrics_serving", host=settings.metrics_host, port=self.probe.port)
        self.started.set()

        return await self._supervise(self.supervisors, backfiller, writer)

    def _supervisors(
        self,
        endpoints: list[Endpoint],
        normalizers: dict[str, Normalizer],
        pipeline: Pipeline,
        http: aiohttp.ClientSession,
    ) -> list[Supervisor]:
        """One supervisor per connection: stream groups times redundancy.

        Streams beyond one connection's limit go to further groups; with
        redundancy, each member of a group starts on a different endpoint
        and all of them feed the same sequencer, which keeps each id once.
        """
        settings = self.settings
        per_symbol = len(settings.streams)
        symbols_per_group = max(1, settings.streams_per_connection // per_symbol)
        groups = [
            self.symbols[i : i + symbols_per_group]
            for i in range(0, len(self.symbols), symbols_per_group)
        ]
        budget = AttemptBudget(
            settings.feed().connection_attempts,
            settings.feed().connection_window,
            clock=self.clock,
        )

        supervisors: list[Supervisor] = []
        self.groups = []
        for number, symbols in enumerate(groups):
            feed = BinanceFeed(
                symbols,
                settings.streams,
                normalizers=normalizers,
                pipeline=pipeline,
                metrics=self.metrics,
                reply_timeout=settings.open_timeout,
            )
            members: list[Supervisor] = []
            for member in range(settings.redundancy):
                shift = member % len(endpoints)
                supervisor = Supervisor(
                    endpoints[shift:] + endpoints[:shift],
                    feed,
                    settings.feed(),
                    self.metrics,
                    http=http,
                    clock=self.clock,
                    rng=self.rng,
                    on_flush=pipeline.flush_metrics,
                    on_state=self._on_connection_state,
                    budget=budget,
                    siblings=_siblings_of(members, member),
                    name=f"group{number}.{member}",
                )
                members.append(supervisor)
            self.groups.append(members)
            supervisors += members
        return supervisors

    def _on_connection_state(self) -> None:
        """Export the connection state of all supervisors as the operators' gauges."""
        groups = self.groups
        connected = bool(groups) and all(any(s.link for s in group) for group in groups)
        self.metrics.connection_status.set(1 if connected else 0)
        self.metrics.failover_active.set(
            1
            if any(
                group[0].link is not None and not group[0].on_preferred
                for group in groups
            )
            else 0
        )
        us = any(
            s.link is not None and s.link.endpoint.venue == BINANCE_US
            for s in self.supervisors
        )
        self.metrics.binanceus_active.set(1 if us else 0)
        if not any(s.link for s in self.supervisors):
            self.metrics.connection_age.set(0)

    async def _supervise(
        self, supervisors: list[Supervisor], backfiller: Backfiller, writer: SinkWriter
    ) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)

        feed_tasks = [asyncio.create_task(s.run(), name=s.name) for s in supervisors]
        backfill_task = asyncio.create_task(backfiller.run(), name="backfill")
        stop_task = asyncio.create_task(self._stop.wait(), name="stop")
        waiting: set[asyncio.Task[Any]] = {*feed_tasks, stop_task, backfill_task}
        duration = self.settings.duration
        try:
            async with asyncio.timeout(duration if duration > 0 else None):
                done, _ = await asyncio.wait(
                    waiting, return_when=asyncio.FIRST_COMPLETED
                )
        except TimeoutError:
            log.info("duration_reached", seconds=duration)
            done = set()

        try:
            # Stop reading first, then drain what was accepted, then close the sink.
            for supervisor in supervisors:
                supervisor.stop()
            await asyncio.wait(feed_tasks, timeout=3.0)
            backfill_task.cancel()
            await writer.close()
            for task in done:
                task.result()
            for task in feed_tasks:
                if task.done() and not task.cancelled():
                    task.result()
        finally:
            for task in (*feed_tasks, backfill_task, stop_task):
                task.cancel()
            await asyncio.gather(
                *feed_tasks, backfill_task, stop_task, return_exceptions=True
            )
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            if self.probe is not None:
                await self.probe.stop()
            self.stopped = True

        log.info(
            "service_stopped",
            checkpoints={str(k): v for k, v in writer.durable_checkpoints.items()},
        )
        return EXIT_OK

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("signal_received", signal=sig.name, action="stopping cleanly")
        self.stop()

    def _endpoints(self) -> list[Endpoint]:
        endpoints = []
        for index, url in enumerate(self.settings.endpoint):
            label = endpoint_label(url)
            breaker = Breaker(
                label,
                clock=self.clock,
                failure_threshold=self.settings.failure_threshold,
                recovery_timeout=self.settings.recovery_timeout,
                max_recovery_timeout=self.settings.recovery_timeout * 8,
                on_transition=self._on_breaker,
            )
            self.metrics.set_breaker_state(label, "closed")
            endpoints.append(Endpoint(url, label, venue_of(url), index, breaker))
        return endpoints

    def _on_breaker(
        self, name: str, old: BreakerState, new: BreakerState, reason: str
    ) -> None:
        self.metrics.set_breaker_state(name, new.value)
        self.metrics.breaker_transitions.labels(name, new.value).inc()
        event = {"open": "breaker_opened", "half_open": "breaker_half_open"}.get(
            new.value, "breaker_closed"
        )
        level = log.warning if new is BreakerState.OPEN else log.info
        level(event, endpoint=name, previous=old.value, reason=reason)

    async def _symbol_info(self, venues: set[str]) -> dict[str, Normalizer]:
        normalizers = {}
        infos: dict[str, SymbolInfo] = await self.rests[BINANCE].exchange_info(
            self.symbols
        )
        normalizers[BINANCE] = Normalizer(BINANCE, infos)
        if BINANCE_US in venues:
            try:
                us = await self.rests[BINANCE_US].exchange_info(self.symbols)
            except RestError as exc:
                log.warning(
                    "venue_unavailable",
                    venue=BINANCE_US,
                    error=str(exc),
                    action="Binance.US endpoints are skipped",
                )
            else:
                normalizers[BINANCE_US] = Normalizer(BINANCE_US, us)
        return normalizers

    def _fetch_for(self, normalizers: dict[str, Normalizer]) -> Fetch:
        async def fetch(key: StreamKey, from_id: int, limit: int) -> list[Trade]:
            rest = self.rests.get(key.exchange)
            normalizer = normalizers.get(key.exchange)
            if rest is None or normalizer is None:
                raise FetchError(f"no REST for {key.exchange}", permanent=True)
            now_us = int(self.clock.time() * 1_000_000)
            try:
                return await fetch_page(rest, normalizer, key, from_id, limit, now_us)
            except RestError as exc:
                retry_after = getattr(exc, "retry_after", None)
                raise FetchError(
                    str(exc), retry_after=retry_after, permanent=not exc.retryable
                ) from exc

        return fetch

    async def heal_tail(self) -> None:
        """Ask REST for each sequence's latest id, so that the tail is healed too.

        Used when the stream stops for good (the demo's drain): a gap is
        otherwise noticed only when a later id arrives.
        """
        for key in self.sequencer.keys():
            rest = self.rests.get(key.exchange)
            if rest is None:
                continue
            try:
                if key.stream == AGG_TRADE:
                    latest = [a.id for a in await rest.agg_trades(key.symbol, None, 1)]
                else:
                    latest = [t.id for t in await rest.recent_trades(key.symbol, 1)]
            except RestError as exc:
                log.warning("tail_check_failed", key=str(key), error=str(exc))
                continue
            if latest:
                self.sequencer.expect_until(key, latest[-1])

    def _on_healed(self, key: StreamKey) -> None:
        self.metrics.gaps_healed.labels(key.symbol, key.stream).inc()
        if self.backfiller is not None:
            self.backfiller.export(key)

    def _on_lost(self, lost: LostRange) -> None:
        """Keep the lost range in the store too, where `k2stream verify` finds it."""
        writer = self.writer
        if writer is None:
            return

        def record(sink: Any) -> None:
            if hasattr(sink, "record_gap"):
                sink.record_gap(lost.key, lost.first, lost.last, reason=lost.reason)

        task = asyncio.ensure_future(writer.run_in_sink(record))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _live(self) -> str | None:
        if self.writer is not None and self.writer.failed is not None:
            return f"sink failed: {self.writer.failed}"
        return None

    def _ready(self) -> str | None:
        if not self.groups or not all(
            any(s.link for s in group) for group in self.groups
        ):
            return "not connected"
        now = self.clock.time()
        ages = {
            f"{sample.labels['symbol']}@{sample.labels['stream']}": now - sample.value
            for metric in self.metrics.last_message.collect()
            for sample in metric.samples
            if sample.value > 0
        }
        if not ages:
            return "no market data yet"
        freshest = min(ages.values())
        if freshest > self.settings.health_check_timeout:
            stalest = max(ages, key=lambda name: ages[name])
            return f"no market data for {freshest:.0f} s (stalest: {stalest})"
        if self.writer is not None and not self.writer.available:
            return "sink unavailable"
        return None


def _siblings_of(
    members: list[Supervisor], member: int
) -> Callable[[], list[Endpoint | None]]:
    """The endpoints the other members of a redundant group are on."""

    def siblings() -> list[Endpoint | None]:
        return [
            other.link.endpoint if other.link is not None else None
            for index, other in enumerate(members)
            if index != member
        ]

    return siblings
