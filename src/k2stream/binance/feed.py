"""Binance on a connection: what to subscribe, and what each frame means.

The supervisor in :mod:`k2stream.feed` keeps connections alive without
knowing any exchange; this module gives it, per connection, a
:class:`StreamSession` that subscribes, audits the subscriptions, decodes
frames and hands trades to the pipeline.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import structlog

from k2stream.binance.messages import (
    AggTradeEvent,
    Envelope,
    MalformedFrame,
    Reply,
    ServerShutdown,
    TradeEvent,
    decode,
    decoder,
    sample,
)
from k2stream.binance.normalize import Normalizer
from k2stream.binance.streams import (
    combined_url,
    names_for,
    parse_stream_name,
    subscribe_frames,
    url_carries_streams,
)
from k2stream.feed.connection import ConnectError, Connection
from k2stream.feed.endpoints import Endpoint
from k2stream.feed.pipeline import Pipeline
from k2stream.observe.metrics import Metrics
from k2stream.records import StreamKey


log = structlog.get_logger(__name__)

_decode_event = decoder().decode

LAG_SAMPLE_EVERY = 16
"""Event lag is observed on one message in this many: the histogram stays cheap."""


class BinanceFeed:
    """The Binance side of every connection of one service."""

    def __init__(
        self,
        symbols: Sequence[str],
        streams: Sequence[str],
        *,
        normalizers: dict[str, Normalizer],
        pipeline: Pipeline,
        metrics: Metrics,
        reply_timeout: float = 10.0,
    ) -> None:
        self.symbols = list(symbols)
        self.streams = list(streams)
        self.names = names_for(self.symbols, self.streams)
        self.normalizers = normalizers
        self.pipeline = pipeline
        self.metrics = metrics
        self.reply_timeout = reply_timeout
        self.malformed = 0
        self._request_ids = itertools.count(1)

    def url(self, endpoint: Endpoint) -> str:
        return combined_url(endpoint.url, self.names)

    def session(self, endpoint: Endpoint, connection: Connection) -> StreamSession:
        normalizer = self.normalizers.get(endpoint.venue)
        if normalizer is None:
            raise ConnectError(
                endpoint.label,
                f"no symbol information for venue {endpoint.venue}; "
                "its REST URL must be reachable at start-up",
            )
        return StreamSession(self, endpoint, connection, normalizer)

    def next_request_id(self) -> int:
        return next(self._request_ids)


class StreamSession:
    """One connection's subscriptions and frames."""

    def __init__(
        self,
        feed: BinanceFeed,
        endpoint: Endpoint,
        connection: Connection,
        normalizer: Normalizer,
    ) -> None:
        self._feed = feed
        self._endpoint = endpoint
        self._connection = connection
        self._normalizer = normalizer
        self._pipeline = feed.pipeline
        self._replies: dict[int | str | None, asyncio.Future[Reply]] = {}
        self._label = endpoint.label
        self._lag_by_stream = {
            stream: feed.metrics.event_lag.labels(stream) for stream in feed.streams
        }
        self._lag_countdown = LAG_SAMPLE_EVERY

        exchange = normalizer.exchange
        self._routes: dict[str, StreamKey] = {}
        for name in feed.names:
            symbol, stream = parse_stream_name(name)
            self._routes[name] = StreamKey(exchange, symbol, stream)

        self.counts: dict[StreamKey, int] = dict.fromkeys(self._routes.values(), 0)
        self.shutdown_requested = False
        self.malformed = 0

    @property
    def keys(self) -> list[StreamKey]:
        return list(self._routes.values())

    def all_streams_seen(self) -> bool:
        return all(self.counts.values())

    async def subscribe(self) -> None:
        """Subscribe (when the URL could not carry the streams), then audit.

        Binance has been seen to restore only part of a subscription, so the
        list the server reports is compared with the one wanted and what is
        missing is subscribed again.
        """
        wanted = self._feed.names
        if not url_carries_streams(self._connection.url):
            for frame in subscribe_frames(
                wanted, self._feed.next_request_id() * 10_000
            ):
                await self._request(frame)

        reply = await self._request({"method": "LIST_SUBSCRIPTIONS"})
        active = set(reply.result or [])
        missing = [name for name in wanted if name not in active]
        if missing:
            log.warning(
                "subscription_repaired",
                endpoint=self._endpoint.label,
                missing=len(missing),
                sample=missing[:5],
            )
            for frame in subscribe_frames(
                missing, self._feed.next_request_id() * 10_000
            ):
                await self._request(frame)
        self._feed.metrics.subscribed_streams.set(len(wanted))

    def on_frame(self, frame: bytes) -> None:
        """Decode one frame and act on it; the hot path of the whole service.

        Written flat on purpose: at a few hundred thousand frames a second,
        every call and attribute lookup here shows in the profile.
        """
        try:
            message = _decode_event(frame)
        except msgspec.DecodeError:
            self._on_other(frame)
            return

        data = message.data
        key = self._routes.get(message.stream)
        if key is None:
            self._on_unexpected(message)
            return

        received_us = time.time_ns() // 1000
        if type(data) is TradeEvent:
            trade = self._normalizer.from_trade_event(data, self._label, received_us)
        elif type(data) is AggTradeEvent:
            trade = self._normalizer.from_agg_event(data, self._label, received_us)
        else:
            self._on_unexpected(message)
            return
        self.counts[key] += 1
        self._lag_countdown -= 1
        if not self._lag_countdown:
            self._lag_countdown = LAG_SAMPLE_EVERY
            lag = (received_us - data.event_time) / 1_000_000
            self._lag_by_stream[key.stream].observe(max(0.0, lag))
        self._pipeline.deliver(key, trade)

    def _on_other(self, frame: bytes) -> None:
        """A frame that is not a stream event: a control reply, or malformed."""
        try:
            message = decode(frame)
        except MalformedFrame as exc:
            self._on_malformed(exc)
            return
        if isinstance(message, Reply):
            self._on_reply(message)

    def _on_unexpected(self, message: Envelope) -> None:
        if type(message.data) is ServerShutdown:
            self.shutdown_requested = True
            log.warning(
                "server_shutdown",
                endpoint=self._endpoint.label,
                action="opening a replacement connection before this one closes",
            )
            return
        log.debug(
            "unexpected_stream", endpoint=self._endpoint.label, stream=message.stream
        )

    def _on_reply(self, reply: Reply) -> None:
        future = self._replies.pop(reply.id, None)
        if reply.error is not None:
            self._feed.metrics.errors.labels("protocol").inc()
            log.warning(
                "request_rejected",
                endpoint=self._endpoint.label,
                code=reply.error.code,
                message=reply.error.msg,
                request_id=reply.id,
            )
        if future is not None and not future.done():
            future.set_result(reply)

    def _on_malformed(self, exc: MalformedFrame) -> None:
        self.malformed += 1
        self._feed.malformed += 1
        self._feed.metrics.errors.labels("malformed_frame").inc()
        if self.malformed == 1 or self.malformed % 1000 == 0:
            # Logged once per connection (and every 1000th after) so a flood
            # of garbage cannot flood the logs too.
            log.warning(
                "malformed_frame",
                endpoint=self._endpoint.label,
                reason=exc.reason,
                sample=sample(exc.frame),
                count=self.malformed,
            )

    async def _request(self, payload: dict[str, Any]) -> Reply:
        request_id = payload.get("id")
        if request_id is None:
            request_id = self._feed.next_request_id()
            payload = {**payload, "id": request_id}
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._replies[request_id] = future
        await self._connection.send_json(payload)
        try:
            async with asyncio.timeout(self._feed.reply_timeout):
                reply = await future
        except TimeoutError:
            self._replies.pop(request_id, None)
            raise ConnectError(
                self._endpoint.label,
                f"no answer to {payload['method']} within {self._feed.reply_timeout} s",
            ) from None
        if reply.error is not None:
            raise ConnectError(
                self._endpoint.label,
                f"{payload['method']} rejected: {reply.error.code} {reply.error.msg}",
            )
        return reply
