"""Noticing that a stream which normally carries data has gone silent.

Binance connections can freeze: the socket stays open and pings are answered,
but no data arrives (binance-connector-java#139, python-binance#353). A fixed
timeout is either too slow for a busy stream or too eager for a quiet one, so
the watchdog learns each stream's own message rate and allows a silence of
``expected_gaps`` mean inter-arrival times, between ``min_silence`` and
``timeout``.
"""

from __future__ import annotations

import math

from k2stream.clock import Clock


class RateWatchdog:
    """Decide when a stream that normally carries data has gone silent.

    Learns the message rate with an exponentially weighted moving average over
    ``halflife`` seconds (fed by ``observe(count)`` about once per health tick
    with the messages seen since the last call, or per message batch), and
    declares silence after ``max(min_silence, expected_gaps / rate)`` seconds
    without data, capped by ``timeout`` (``health_check_timeout``) for quiet
    markets.

    The rate is learnt from the intervals that end with data: a silence in
    progress does not lower it, otherwise a stream that falls silent would
    keep pushing its own limit away. Until ``warmup_messages`` messages have
    been seen there is no rate and ``timeout`` applies.

    :meth:`reset` on a new connection keeps the learnt rate, because the
    rate belongs to the subscribed streams, not to the socket: a replacement
    that opens silent is caught as fast as the connection it replaced. A
    connection that delivered nothing at all casts doubt on that rate (the
    market may simply have gone quiet), so resetting after one forgets the
    rate and falls back to ``timeout`` until it is learnt again; a genuine lull
    thus costs at most two quick reconnects, not a loop.
    """

    def __init__(
        self,
        *,
        timeout: float = 60.0,
        min_silence: float = 2.0,
        expected_gaps: float = 20.0,
        halflife: float = 30.0,
        warmup_messages: int = 20,
        clock: Clock,
    ) -> None:
        if not (math.isfinite(timeout) and timeout > 0):
            raise ValueError(
                f"timeout must be a finite number of seconds > 0, got {timeout}"
            )
        if not 0 < min_silence <= timeout:
            raise ValueError(
                f"min_silence must be in (0, timeout={timeout}] seconds, "
                f"got {min_silence}"
            )
        if not (math.isfinite(expected_gaps) and expected_gaps > 0):
            raise ValueError(f"expected_gaps must be > 0, got {expected_gaps}")
        if not (math.isfinite(halflife) and halflife > 0):
            raise ValueError(
                f"halflife must be a finite number of seconds > 0, got {halflife}"
            )
        if warmup_messages < 1:
            raise ValueError(f"warmup_messages must be >= 1, got {warmup_messages}")

        self.timeout = timeout
        self.min_silence = min_silence
        self.expected_gaps = expected_gaps
        self.halflife = halflife
        self.warmup_messages = warmup_messages
        self._clock = clock

        # The average is kept as a decayed sum of weighted rates and a decayed
        # sum of weights; their quotient is free of the bias towards zero an
        # average started at 0 would have.
        self._weighted_rates = 0.0
        self._weights = 0.0
        self._messages = 0

        now = clock.monotonic()
        self._since = now
        self._last_data: float | None = None
        self._interval_start = now
        self._pending = 0
        self._delivered = False

    def observe(self, count: int) -> None:
        """Take in the ``count`` messages received since the last call."""
        if count < 0:
            raise ValueError(f"count must be >= 0 messages, got {count}")
        if count == 0:
            return

        now = self._clock.monotonic()
        self._last_data = now
        self._delivered = True

        # Two calls at the same instant: fold their messages in together later.
        count += self._pending
        elapsed = now - self._interval_start
        if elapsed <= 0:
            self._pending = count
            return

        keep = 2.0 ** (-elapsed / self.halflife)
        self._weighted_rates = (
            self._weighted_rates * keep + (1 - keep) * count / elapsed
        )
        self._weights = self._weights * keep + (1 - keep)
        self._messages += count
        self._pending = 0
        self._interval_start = now

    @property
    def rate(self) -> float | None:
        """Learnt messages per second; None while warming up."""
        if self._messages < self.warmup_messages or self._weights <= 0:
            return None
        return self._weighted_rates / self._weights

    def silence_limit(self) -> float:
        """Seconds without data after which the stream counts as stale."""
        rate = self.rate
        if rate is None or rate <= 0:
            return self.timeout

        return min(self.timeout, max(self.min_silence, self.expected_gaps / rate))

    def silent_for(self) -> float:
        """Seconds since the last data, or since the connection opened if none yet."""
        last = self._last_data if self._last_data is not None else self._since
        return self._clock.monotonic() - last

    def is_stale(self) -> bool:
        """Whether the silence has reached the limit."""
        return self.silent_for() >= self.silence_limit()

    def reset(self) -> None:
        """A new connection opened: call once per connection, when it opens."""
        if not self._delivered:
            self._weighted_rates = 0.0
            self._weights = 0.0
            self._messages = 0

        now = self._clock.monotonic()
        self._since = now
        self._last_data = None
        self._interval_start = now
        self._pending = 0
        self._delivered = False
