"""The reconnect delay schedule: exponential, capped, with jitter that only shortens.

The schedule is a plain object rather than a retry decorator because a
reconnect loop needs what retry libraries do not give: the supervisor resets
it only after a connection has proved stable (see :mod:`k2stream.feed.rotation`),
not when a handshake succeeds, so a server that accepts and then drops at once
cannot drive a tight loop.
"""

from __future__ import annotations

import math
import random


class Backoff:
    """Exponential reconnect delays, capped at ``maximum``, with bounded jitter.

    The nominal n-th delay (n counted from 0 since the last reset) is
    ``min(maximum, initial * multiplier**n)``. The delay handed out is drawn
    uniformly from ``[nominal * (1 - jitter), nominal]``: jitter only ever
    shortens, so ``maximum`` is a true cap, and instances that failed together
    spread out instead of reconnecting in step.

    With the defaults the nominal sequence is 5, 10, 20, 40, 60, 60, ... seconds.
    """

    def __init__(
        self,
        initial: float = 5.0,
        maximum: float = 60.0,
        multiplier: float = 2.0,
        jitter: float = 0.2,
        rng: random.Random | None = None,
    ) -> None:
        if not (math.isfinite(initial) and initial > 0):
            raise ValueError(
                f"initial must be a finite number of seconds > 0, got {initial}"
            )
        if not (math.isfinite(maximum) and maximum >= initial):
            raise ValueError(
                f"maximum must be a finite number of seconds >= initial ({initial}), "
                f"got {maximum}"
            )
        if not (math.isfinite(multiplier) and multiplier >= 1):
            raise ValueError(f"multiplier must be >= 1, got {multiplier}")
        if not 0 <= jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")

        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0

        # Past this many steps the nominal delay is pinned at the cap; clamping
        # the exponent keeps ``multiplier**n`` from overflowing on long outages.
        if multiplier == 1 or maximum == initial:
            self._steps_to_cap = 0
        else:
            self._steps_to_cap = math.ceil(
                math.log(maximum / initial) / math.log(multiplier)
            )

    @property
    def attempt(self) -> int:
        """Delays handed out since the last reset."""
        return self._attempt

    def nominal(self, attempt: int) -> float:
        """The delay before jitter for the ``attempt``-th delay (0-based)."""
        if attempt < 0:
            raise ValueError(f"attempt must be >= 0, got {attempt}")

        exponent = min(attempt, self._steps_to_cap)
        return min(self.maximum, self.initial * self.multiplier**exponent)

    def next_delay(self) -> float:
        """The next delay in seconds; advances the schedule."""
        nominal = self.nominal(self._attempt)
        self._attempt += 1

        return self._rng.uniform(nominal * (1 - self.jitter), nominal)

    def reset(self) -> None:
        """Start again from ``initial``: call once a connection has proved stable."""
        self._attempt = 0

    def __repr__(self) -> str:
        return (
            f"Backoff(initial={self.initial}, maximum={self.maximum}, "
            f"multiplier={self.multiplier}, jitter={self.jitter}, "
            f"attempt={self._attempt})"
        )
