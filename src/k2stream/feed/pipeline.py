"""The single path from a feed to the sink, shared by live data and backfill.

Every trade passes the sequencer (duplicates stop here) and is offered to
the sink writer. When the writer's backlog is full the trade is not lost
silently: its id becomes a gap, healed from REST once the sink recovers.
"""

from __future__ import annotations

from typing import Protocol

from k2stream.feed.sequencer import Sequencer
from k2stream.observe.metrics import Metrics
from k2stream.records import StreamKey, Trade


class Outlet(Protocol):
    """What the pipeline needs of the sink writer."""

    def offer(self, trade: Trade) -> bool: ...

    @property
    def available(self) -> bool: ...

    @property
    def accepting(self) -> bool: ...


class Pipeline:
    """Sequencer, then sink; counts what it drops."""

    def __init__(self, sequencer: Sequencer, outlet: Outlet, metrics: Metrics) -> None:
        self.sequencer = sequencer
        self.outlet = outlet
        self._metrics = metrics
        self._duplicates: dict[StreamKey, int] = {}
        self.delivered = 0

    def deliver(self, key: StreamKey, trade: Trade) -> bool:
        """Hand on a live trade; False when it was a duplicate."""
        if not self.sequencer.accept(key, trade.id):
            self._duplicates[key] = self._duplicates.get(key, 0) + 1
            return False
        if not self.outlet.offer(trade):
            self.sequencer.mark_missing(key, trade.id)
            return True
        self.delivered += 1
        return True

    def deliver_backfill(self, trade: Trade) -> bool:
        """Hand on a trade fetched from REST; False when it filled no gap."""
        key = trade.key
        if not self.sequencer.fill(key, trade.id):
            return False
        if not self.outlet.offer(trade):
            self.sequencer.mark_missing(key, trade.id)
            return False
        self.delivered += 1
        return True

    def flush_metrics(self) -> None:
        """Move the hot path's local counts into the exported metrics."""
        for key, count in self._duplicates.items():
            if count:
                self._metrics.duplicates.labels(key.symbol, key.stream).inc(count)
        self._duplicates.clear()
