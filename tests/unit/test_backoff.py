"""The reconnect delay schedule."""

from __future__ import annotations

import random
from typing import Any

import pytest

from k2stream.feed.backoff import Backoff


DEFAULT_NOMINALS = [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0]


class TestSchedule:
    def test_seeded_sequence_stays_within_jitter_band(self) -> None:
        """Each delay lies in [0.8 d, d] around the nominal 5, 10, 20, 40, 60, 60."""
        backoff = Backoff(rng=random.Random(7))

        delays = [backoff.next_delay() for _ in DEFAULT_NOMINALS]

        for delay, nominal in zip(delays, DEFAULT_NOMINALS, strict=True):
            assert nominal * 0.8 <= delay <= nominal

    def test_seeded_sequence_is_reproducible(self) -> None:
        """The same seed gives the same delays."""
        first = Backoff(rng=random.Random(3))
        second = Backoff(rng=random.Random(3))

        assert [first.next_delay() for _ in range(6)] == [
            second.next_delay() for _ in range(6)
        ]

    def test_zero_jitter_gives_exact_nominal_delays(self) -> None:
        """With jitter 0 the delays are exactly 5, 10, 20, 40, 60, 60, 60."""
        backoff = Backoff(jitter=0.0)

        assert [backoff.next_delay() for _ in DEFAULT_NOMINALS] == DEFAULT_NOMINALS

    def test_reset_restarts_at_initial(self) -> None:
        """After reset the next delay is the initial one again."""
        backoff = Backoff(jitter=0.0)
        for _ in range(4):
            backoff.next_delay()

        backoff.reset()

        assert backoff.attempt == 0
        assert backoff.next_delay() == 5.0

    def test_attempt_counts_delays_handed_out(self) -> None:
        """attempt is the number of delays given since the last reset."""
        backoff = Backoff()

        for _ in range(3):
            backoff.next_delay()

        assert backoff.attempt == 3

    def test_jitter_never_exceeds_maximum(self) -> None:
        """Jitter only shortens, so no delay is ever above maximum."""
        backoff = Backoff(initial=1.0, maximum=8.0, jitter=0.5, rng=random.Random(1))

        delays = [backoff.next_delay() for _ in range(500)]

        assert max(delays) <= 8.0
        assert min(delays[10:]) >= 4.0

    def test_distinct_seeds_spread_out(self) -> None:
        """Instances with different seeds pick different delays across the band."""
        firsts = [
            Backoff(maximum=60.0, rng=random.Random(seed)).next_delay()
            for seed in range(50)
        ]

        # The first delay's band is [4, 5]: the seeds cover most of it.
        assert len(set(firsts)) == 50
        assert max(firsts) - min(firsts) > 0.5

    def test_custom_multiplier_and_cap(self) -> None:
        """initial 1, multiplier 1.5, maximum 3 gives 1, 1.5, 2.25, 3, 3."""
        backoff = Backoff(initial=1.0, maximum=3.0, multiplier=1.5, jitter=0.0)

        assert [backoff.next_delay() for _ in range(5)] == [1.0, 1.5, 2.25, 3.0, 3.0]

    def test_multiplier_one_is_constant(self) -> None:
        """A multiplier of 1 keeps every delay at initial."""
        backoff = Backoff(initial=2.0, maximum=10.0, multiplier=1.0, jitter=0.0)

        assert [backoff.next_delay() for _ in range(4)] == [2.0, 2.0, 2.0, 2.0]


class TestNominal:
    def test_nominal_does_not_overflow_on_long_outages(self) -> None:
        """The nominal delay of a huge attempt number is the cap, not an overflow."""
        backoff = Backoff()

        assert backoff.nominal(100_000) == 60.0

    def test_nominal_does_not_advance_the_schedule(self) -> None:
        """nominal() only looks; it does not consume an attempt."""
        backoff = Backoff()

        assert backoff.nominal(2) == 20.0
        assert backoff.attempt == 0

    def test_negative_attempt_is_rejected(self) -> None:
        """A negative attempt number is a ValueError."""
        with pytest.raises(ValueError, match="attempt must be >= 0"):
            Backoff().nominal(-1)


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"initial": 0.0}, "initial must be"),
            ({"initial": -1.0}, "initial must be"),
            ({"initial": float("inf")}, "initial must be"),
            ({"initial": 5.0, "maximum": 4.0}, "maximum must be"),
            ({"maximum": float("nan")}, "maximum must be"),
            ({"multiplier": 0.5}, "multiplier must be >= 1"),
            ({"jitter": -0.1}, r"jitter must be in \[0, 1\)"),
            ({"jitter": 1.0}, r"jitter must be in \[0, 1\)"),
        ],
    )
    def test_bad_parameter_is_named(self, kwargs: dict[str, Any], message: str) -> None:
        """A parameter out of range raises ValueError naming it and its range."""
        with pytest.raises(ValueError, match=message):
            Backoff(**kwargs)
