"""Rotation timing and connection stability."""

from __future__ import annotations

import random

import pytest

from k2stream.clock import FakeClock
from k2stream.feed.rotation import CONNECTION_LIFETIME, Stability, rotation_delay


class TestRotationDelay:
    def test_default_lies_in_the_jitter_band(self) -> None:
        """The default delay is within 2 % below 23 h 30 min."""
        rng = random.Random(11)

        delays = [rotation_delay(rng=rng) for _ in range(200)]

        assert all(84_600.0 * 0.98 <= delay <= 84_600.0 for delay in delays)

    def test_zero_jitter_is_exact(self) -> None:
        """With jitter 0 the delay is rotate_after itself."""
        assert rotation_delay(3_600.0, jitter=0.0) == 3_600.0

    def test_never_after_24_hours(self) -> None:
        """Even the longest allowed setting rotates no later than Binance's 24 h cut."""
        rng = random.Random(5)

        delays = [rotation_delay(CONNECTION_LIFETIME, 0.01, rng) for _ in range(200)]

        assert max(delays) <= CONNECTION_LIFETIME

    def test_instances_spread_out(self) -> None:
        """Instances with different seeds rotate at different times across the band."""
        delays = [rotation_delay(rng=random.Random(seed)) for seed in range(50)]

        # The band is 2 % of 84 600 s, i.e. 1692 s wide.
        assert len(set(delays)) == 50
        assert max(delays) - min(delays) > 1_000.0

    @pytest.mark.parametrize(
        ("rotate_after", "jitter", "message"),
        [
            (86_401.0, 0.02, "rotate_after must be in"),
            (0.0, 0.02, "rotate_after must be in"),
            (float("nan"), 0.02, "rotate_after must be in"),
            (3_600.0, 1.0, r"jitter must be in \[0, 1\)"),
            (3_600.0, -0.5, r"jitter must be in \[0, 1\)"),
        ],
    )
    def test_bad_parameter_is_named(
        self, rotate_after: float, jitter: float, message: str
    ) -> None:
        """A parameter out of range raises ValueError naming it."""
        with pytest.raises(ValueError, match=message):
            rotation_delay(rotate_after, jitter)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


class TestStability:
    def test_stable_after_data_for_long_enough(self, clock: FakeClock) -> None:
        """A connection is stable once data started stable_after seconds ago."""
        stability = Stability(30.0, clock)
        stability.opened()
        stability.data()

        clock.advance(29.9)
        assert not stability.is_stable()

        clock.advance(0.1)
        assert stability.is_stable()

    def test_time_counts_from_first_data_not_from_open(self, clock: FakeClock) -> None:
        """Time spent open but silent does not count towards stability."""
        stability = Stability(30.0, clock)
        stability.opened()
        clock.advance(100.0)
        stability.data()

        clock.advance(20.0)

        assert not stability.is_stable()
        assert stability.first_data_at == clock.monotonic() - 20.0

    def test_later_data_does_not_move_the_start(self, clock: FakeClock) -> None:
        """Only the first data of a connection starts the clock."""
        stability = Stability(30.0, clock)
        stability.opened()
        stability.data()

        for _ in range(30):
            clock.advance(1.0)
            stability.data()

        assert stability.is_stable()

    def test_silent_connection_never_becomes_stable(self, clock: FakeClock) -> None:
        """An open connection that delivers nothing is never stable."""
        stability = Stability(30.0, clock)
        stability.opened()

        clock.advance(3_600.0)

        assert not stability.is_stable()

    def test_closed_connection_is_not_stable(self, clock: FakeClock) -> None:
        """After closed() the connection no longer counts as stable."""
        stability = Stability(30.0, clock)
        stability.opened()
        stability.data()
        clock.advance(60.0)

        stability.closed()

        assert not stability.is_stable()

    def test_new_connection_starts_over(self, clock: FakeClock) -> None:
        """opened() forgets the previous connection's first data."""
        stability = Stability(30.0, clock)
        stability.opened()
        stability.data()
        clock.advance(60.0)

        stability.opened()

        assert not stability.is_stable()
        assert stability.first_data_at is None

    def test_data_before_open_is_ignored(self, clock: FakeClock) -> None:
        """Data reported while no connection is open starts nothing."""
        stability = Stability(0.0, clock)

        stability.data()
        stability.opened()

        assert not stability.is_stable()

    def test_negative_stable_after_is_rejected(self, clock: FakeClock) -> None:
        """A negative stable_after is a ValueError naming it."""
        with pytest.raises(ValueError, match="stable_after must be"):
            Stability(-1.0, clock)
