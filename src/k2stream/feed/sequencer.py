"""Id bookkeeping per (venue, symbol, stream): duplicates, gaps, checkpoints.

Binance trade and aggregate-trade ids go up by one per symbol (observed, not
promised: binance-protocol.md §4.7), so a jump is treated as "probably
missed" and verified against REST by the backfill. Ids that arrive late
(from the other connection during a rotation, or from REST) fill the open
gaps; ids seen before are duplicates and never reach the sink.

The checkpoint of a sequence is its contiguous watermark: the highest id
such that every id up to it has been handed to the sink. Because batches are
written in order, writing the watermark with a batch makes it durable exactly
when everything below it is.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from k2stream.records import StreamKey


GapListener = Callable[[StreamKey, int, int], None]
"""Called with (key, first missing id, last missing id) when a new gap opens."""


@dataclass(slots=True)
class _Sequence:
    next_id: int | None = None
    """The id expected next; None until the first id or a checkpoint."""
    gaps: list[list[int]] = field(default_factory=list)
    """Disjoint [first, last] ranges still missing, in ascending order."""
    duplicates: int = 0


class Sequencer:
    """Tracks every id sequence the feed delivers."""

    def __init__(
        self,
        on_gap: GapListener | None = None,
        on_healed: Callable[[StreamKey], None] | None = None,
    ) -> None:
        self._sequences: dict[StreamKey, _Sequence] = {}
        self._on_gap = on_gap
        self._on_healed = on_healed

    def listen(
        self,
        on_gap: GapListener | None = None,
        on_healed: Callable[[StreamKey], None] | None = None,
    ) -> None:
        """Set who hears of new gaps and of gaps closed (the backfill, the metrics)."""
        self._on_gap = on_gap
        self._on_healed = on_healed

    def resume(self, key: StreamKey, last_id: int) -> None:
        """Continue ``key`` after a checkpoint: ids from ``last_id + 1`` are expected."""
        self._sequences[key] = _Sequence(next_id=last_id + 1)

    def accept(self, key: StreamKey, id_: int) -> bool:
        """Record a live id; False for a duplicate the caller must drop."""
        sequence = self._sequences.get(key)
        if sequence is None:
            sequence = self._sequences[key] = _Sequence()
        expected = sequence.next_id

        if expected is None or id_ == expected:
            sequence.next_id = id_ + 1
            return True

        if id_ > expected:
            # Ids were skipped: they become a gap that late arrivals or REST fill.
            sequence.gaps.append([expected, id_ - 1])
            sequence.next_id = id_ + 1
            if self._on_gap is not None:
                self._on_gap(key, expected, id_ - 1)
            return True

        return self._fill(key, sequence, id_)

    def expect_until(self, key: StreamKey, last_id: int) -> None:
        """Ids up to ``last_id`` exist (the venue says so): what was not seen becomes a gap.

        A gap is otherwise noticed only when a later id arrives; this closes
        the tail when no later id will come (the stream stopped, shutdown).
        """
        sequence = self._sequences.get(key)
        if sequence is None or sequence.next_id is None or last_id < sequence.next_id:
            return
        first = sequence.next_id
        sequence.gaps.append([first, last_id])
        sequence.next_id = last_id + 1
        if self._on_gap is not None:
            self._on_gap(key, first, last_id)

    def fill(self, key: StreamKey, id_: int) -> bool:
        """Record a backfilled id; True only if it fills a gap."""
        sequence = self._sequences.get(key)
        if sequence is None or sequence.next_id is None or id_ >= sequence.next_id:
            return False
        return self._fill(key, sequence, id_)

    def mark_missing(self, key: StreamKey, id_: int) -> None:
        """An accepted id the sink could not take: it becomes (part of) a gap.

        It joins a gap it touches, so a run of refusals (a full sink, a
        backfilled page refused again) is one gap reported once, not one
        per id.
        """
        gaps = self._sequences[key].gaps
        if gaps and gaps[-1][1] == id_ - 1:
            gaps[-1][1] = id_
            return

        index = bisect.bisect_left(gaps, id_, key=_first)
        joins_next = index < len(gaps) and gaps[index][0] == id_ + 1
        joins_previous = index > 0 and gaps[index - 1][1] == id_ - 1
        if joins_previous and joins_next:
            gaps[index - 1][1] = gaps[index][1]
            del gaps[index]
        elif joins_previous:
            gaps[index - 1][1] = id_
        elif joins_next:
            gaps[index][0] = id_
        else:
            gaps.insert(index, [id_, id_])
            if self._on_gap is not None:
                self._on_gap(key, id_, id_)

    def give_up(self, key: StreamKey, first: int, last: int) -> int:
        """Stop waiting for ids ``first..last``; returns how many were still missing."""
        sequence = self._sequences.get(key)
        if sequence is None:
            return 0
        kept: list[list[int]] = []
        dropped = 0
        for low, high in sequence.gaps:
            if high < first or low > last:
                kept.append([low, high])
                continue
            dropped += min(high, last) - max(low, first) + 1
            if low < first:
                kept.append([low, first - 1])
            if high > last:
                kept.append([last + 1, high])
        sequence.gaps = kept
        return dropped

    def gaps(self, key: StreamKey) -> list[tuple[int, int]]:
        """The open gaps of ``key``, oldest first."""
        sequence = self._sequences.get(key)
        return [] if sequence is None else [(low, high) for low, high in sequence.gaps]

    def keys(self) -> list[StreamKey]:
        return list(self._sequences)

    def last_id(self, key: StreamKey) -> int | None:
        """The highest id accepted so far, or the checkpoint resumed from."""
        sequence = self._sequences.get(key)
        if sequence is None or sequence.next_id is None:
            return None
        return sequence.next_id - 1

    def missing(self, key: StreamKey) -> int:
        """Ids currently missing in the open gaps of ``key``."""
        sequence = self._sequences.get(key)
        if sequence is None:
            return 0
        return sum(high - low + 1 for low, high in sequence.gaps)

    def checkpoints(self) -> dict[StreamKey, int]:
        """The contiguous watermark of every sequence that has one."""
        marks = {}
        for key, sequence in self._sequences.items():
            if sequence.next_id is None:
                continue
            marks[key] = (
                sequence.gaps[0][0] - 1 if sequence.gaps else sequence.next_id - 1
            )
        return marks

    def _fill(self, key: StreamKey, sequence: _Sequence, id_: int) -> bool:
        gaps = sequence.gaps
        index = bisect.bisect_right(gaps, id_, key=_first) - 1
        if index < 0 or gaps[index][1] < id_:
            sequence.duplicates += 1
            return False

        low, high = gaps[index]
        if low == high:
            del gaps[index]
            if self._on_healed is not None:
                self._on_healed(key)
        elif id_ == low:
            gaps[index][0] = low + 1
        elif id_ == high:
            gaps[index][1] = high - 1
        else:
            gaps[index : index + 1] = [[low, id_ - 1], [id_ + 1, high]]
        return True


def _first(gap: list[int]) -> int:
    return gap[0]
