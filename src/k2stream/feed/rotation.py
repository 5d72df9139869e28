"""When to replace a connection, and when a connection counts as stable.

Binance closes every stream connection at 24 h (binance-spot-api-docs
``web-socket-streams.md``, General WSS information). The supervisor replaces
a connection before that, make-before-break, after :func:`rotation_delay`.
It resets its reconnect backoff only once :class:`Stability` says the
connection has delivered data for a while, so a server that accepts and then
drops cannot drive a tight loop.
"""

from __future__ import annotations

import math
import random

from k2stream.clock import Clock


CONNECTION_LIFETIME = 86_400.0
"""Seconds Binance keeps a stream connection open before cutting it (24 h)."""

DEFAULT_ROTATE_AFTER = 84_600.0
"""23 h 30 min: leaves half an hour to open and fill the replacement."""


def rotation_delay(
    rotate_after: float = DEFAULT_ROTATE_AFTER,
    jitter: float = 0.02,
    rng: random.Random | None = None,
) -> float:
    """Seconds after a connection opens at which it should be replaced.

    The delay is drawn uniformly from ``[rotate_after * (1 - jitter),
    rotate_after]``: shortened only, so instances started together do not all
    rotate in the same second, and never later than ``rotate_after``.
    """
    if not (math.isfinite(rotate_after) and 0 < rotate_after <= CONNECTION_LIFETIME):
        raise ValueError(
            f"rotate_after must be in (0, {CONNECTION_LIFETIME:g}] seconds, "
            f"got {rotate_after}; Binance cuts connections at 24 h"
        )
    if not 0 <= jitter < 1:
        raise ValueError(f"jitter must be in [0, 1), got {jitter}")

    uniform = rng.uniform if rng is not None else random.uniform
    return uniform(rotate_after * (1 - jitter), rotate_after)


class Stability:
    """Whether the current connection has delivered data for ``stable_after`` seconds.

    The clock starts at the first data, not at the handshake: an endpoint
    that accepts connections but sends nothing never becomes stable.
    """

    def __init__(self, stable_after: float, clock: Clock) -> None:
        if not (math.isfinite(stable_after) and stable_after >= 0):
            raise ValueError(
                f"stable_after must be a finite number of seconds >= 0, "
                f"got {stable_after}"
            )

        self.stable_after = stable_after
        self._clock = clock
        self._open = False
        self._first_data: float | None = None

    def opened(self) -> None:
        """A new connection is open: forget the previous one's data."""
        self._open = True
        self._first_data = None

    def data(self) -> None:
        """Data arrived; only the first call per connection matters."""
        if self._open and self._first_data is None:
            self._first_data = self._clock.monotonic()

    def closed(self) -> None:
        """The connection is gone; it is no longer stable."""
        self._open = False

    @property
    def first_data_at(self) -> float | None:
        """Monotonic time of the first data on the current connection."""
        return self._first_data

    def is_stable(self) -> bool:
        """Open, and data started at least ``stable_after`` seconds ago."""
        if not self._open or self._first_data is None:
            return False

        return self._clock.monotonic() - self._first_data >= self.stable_after
