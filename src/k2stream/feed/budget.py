"""Process-wide budgets that keep k2stream inside Binance's per-IP limits.

Binance counts per IP, not per connection: 300 WebSocket connection attempts
per 5 minutes, and 6000 REST request weight per minute, reported back in the
``X-MBX-USED-WEIGHT-1M`` header (binance-spot-api-docs ``web-socket-streams.md``
"WebSocket Limits", ``rest-api.md`` "LIMITS"). Going over gets connections
dropped, then 429s, then an IP ban of 2 minutes up to 3 days, so both budgets
keep a margin unused and answer "how long to wait" instead of failing.
"""

from __future__ import annotations

import collections
import math

from k2stream.clock import Clock


MINUTE = 60.0
"""Length of Binance's REST weight window, in seconds."""


class AttemptBudget:
    """Connection attempts allowed per sliding window, process-wide.

    Binance allows 300 attempts per 5 minutes per IP.

    One instance is shared by every supervisor in the process. ``reserve`` is
    the fraction of ``limit`` kept unused as a margin, so the budget allows
    ``floor(limit * (1 - reserve))`` attempts in any ``window`` seconds.
    """

    def __init__(
        self,
        limit: int = 300,
        window: float = 300.0,
        *,
        clock: Clock,
        reserve: float = 0.1,
    ) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 attempts, got {limit}")
        if not (math.isfinite(window) and window > 0):
            raise ValueError(
                f"window must be a finite number of seconds > 0, got {window}"
            )
        if not 0 <= reserve < 1:
            raise ValueError(f"reserve must be in [0, 1), got {reserve}")

        allowance = math.floor(limit * (1 - reserve))
        if allowance < 1:
            raise ValueError(
                f"limit={limit} with reserve={reserve} leaves no attempt; "
                "raise limit or lower reserve"
            )

        self.limit = limit
        self.window = window
        self.reserve = reserve
        self.allowance = allowance
        self._clock = clock
        self._attempts: collections.deque[float] = collections.deque()

    def acquire(self) -> float:
        """0.0 and record the attempt if one is allowed now, else the seconds to wait.

        Waiting records nothing: call again after the returned delay.
        """
        now = self._clock.monotonic()
        self._forget_before(now)

        if len(self._attempts) < self.allowance:
            self._attempts.append(now)
            return 0.0

        oldest = self._attempts[0]
        return self.window - (now - oldest)

    @property
    def used(self) -> int:
        """Attempts recorded in the last ``window`` seconds."""
        self._forget_before(self._clock.monotonic())
        return len(self._attempts)

    def _forget_before(self, now: float) -> None:
        """Drop attempts that have left the window."""
        while self._attempts and now - self._attempts[0] >= self.window:
            self._attempts.popleft()


class WeightBudget:
    """REST request weight per minute, kept under Binance's 6000/min per IP.

    The count keeps a safety margin, is corrected by the server's
    ``X-MBX-USED-WEIGHT-1M``, and the budget closes entirely during a
    Retry-After or a ban.

    The minute follows the wall clock (``clock.time()``) as Binance's counter
    does, so a new minute starts with a fresh count. The allowance is
    ``floor(limit * (1 - margin))``. A block (429 Retry-After, 418 ban) is
    timed on the monotonic clock so that a wall-clock step cannot shorten it;
    :attr:`blocked_until` is therefore a monotonic time.
    """

    def __init__(self, limit: int = 6000, *, clock: Clock, margin: float = 0.2) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1 weight per minute, got {limit}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin}")

        allowance = math.floor(limit * (1 - margin))
        if allowance < 1:
            raise ValueError(
                f"limit={limit} with margin={margin} leaves no weight; "
                "raise limit or lower margin"
            )

        self.limit = limit
        self.margin = margin
        self._allowance = allowance
        self._clock = clock
        self._minute = self._current_minute()
        self._used = 0
        self._blocked_until: float | None = None
        self.block_reason: str | None = None
        """Why the budget is blocked (e.g. ``429 Retry-After``); None when open."""

    @property
    def allowance(self) -> int:
        """Weight k2stream allows itself per minute: Binance's limit less the margin."""
        return self._allowance

    @property
    def used(self) -> int:
        """Weight counted in the current minute, ours or the server's if higher."""
        self._roll_minute()
        return self._used

    @property
    def blocked_until(self) -> float | None:
        """Monotonic time a block ends; None when not blocked."""
        if self._blocked_until is None:
            return None

        if self._clock.monotonic() >= self._blocked_until:
            self._blocked_until = None
            self.block_reason = None
        return self._blocked_until

    def reserve(self, weight: int) -> float:
        """0.0 and count ``weight`` if it fits now, else the seconds until it will fit.

        It fits when the minute's count plus ``weight`` stays within the
        allowance and no block is in force. Waiting counts nothing: call again
        after the returned delay.
        """
        if not 0 <= weight <= self._allowance:
            raise ValueError(
                f"weight must be in [0, allowance={self._allowance}], got {weight}; "
                "split the request or raise the limit"
            )

        self._roll_minute()
        now = self._clock.time()
        blocked_until = self.blocked_until
        if blocked_until is None and self._used + weight <= self._allowance:
            self._used += weight
            return 0.0

        block_left = 0.0
        if blocked_until is not None:
            block_left = blocked_until - self._clock.monotonic()

        # Nothing is allowed before the block ends; if it ends within this
        # minute and the weight still does not fit, wait for the next minute.
        free_at = now + block_left
        new_minute = _minute_of(free_at) > self._minute
        if new_minute or self._used + weight <= self._allowance:
            return block_left

        return (self._minute + 1) * MINUTE - now

    def observe(self, used_weight: int) -> None:
        """Take in the server's ``X-MBX-USED-WEIGHT-1M``: its count wins when higher.

        Another process on the same IP, or requests lost in flight, make the
        server's count the truth; a lower value is ignored because it may
        describe the previous minute.
        """
        if used_weight < 0:
            raise ValueError(f"used_weight must be >= 0, got {used_weight}")

        self._roll_minute()
        self._used = max(self._used, used_weight)

    def block(self, seconds: float, reason: str) -> None:
        """Allow nothing for ``seconds`` (a 429 Retry-After or a 418 ban)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"seconds must be a finite number >= 0, got {seconds}")

        until = self._clock.monotonic() + seconds
        current = self.blocked_until
        if current is None or until > current:
            self._blocked_until = until
            self.block_reason = reason

    def _roll_minute(self) -> None:
        """Start a fresh count when the wall clock enters a new minute.

        A clock stepped back keeps the count: over-counting only delays.
        """
        minute = self._current_minute()
        if minute > self._minute:
            self._minute = minute
            self._used = 0

    def _current_minute(self) -> int:
        return _minute_of(self._clock.time())


def _minute_of(wall: float) -> int:
    """Index of the wall-clock minute holding ``wall`` (epoch seconds)."""
    return math.floor(wall / MINUTE)
