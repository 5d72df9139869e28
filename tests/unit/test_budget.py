"""The connection-attempt and REST-weight budgets, driven on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from k2stream.clock import FakeClock
from k2stream.feed.budget import AttemptBudget, WeightBudget


@pytest.fixture
def clock() -> FakeClock:
    # The wall clock starts 20 s into a minute (1_700_000_000 = 28_333_333 min + 20 s).
    return FakeClock(start=1_000.0, wall=1_700_000_000.0)


class TestAttemptBudget:
    def test_defaults_keep_a_tenth_in_reserve(self, clock: FakeClock) -> None:
        """Binance's 300 attempts per 5 minutes become 270 with the default reserve."""
        budget = AttemptBudget(clock=clock)

        assert budget.allowance == 270
        assert [budget.acquire() for _ in range(270)] == [0.0] * 270
        assert budget.acquire() == 300.0

    def test_allows_up_to_the_allowance_then_says_how_long(
        self, clock: FakeClock
    ) -> None:
        """Past the allowance, acquire returns the wait until the oldest attempt ages out."""
        budget = AttemptBudget(10, 60.0, clock=clock, reserve=0.1)
        for _ in range(9):
            assert budget.acquire() == 0.0
            clock.advance(1.0)

        assert budget.acquire() == pytest.approx(60.0 - 9.0)

    def test_waiting_records_nothing(self, clock: FakeClock) -> None:
        """A refused acquire does not count as an attempt."""
        budget = AttemptBudget(2, 10.0, clock=clock, reserve=0.0)
        budget.acquire()
        budget.acquire()

        for _ in range(5):
            assert budget.acquire() > 0

        assert budget.used == 2

    def test_window_slides(self, clock: FakeClock) -> None:
        """After waiting the returned delay an attempt is allowed again."""
        budget = AttemptBudget(3, 30.0, clock=clock, reserve=0.0)
        budget.acquire()
        clock.advance(10.0)
        budget.acquire()
        budget.acquire()

        wait = budget.acquire()
        assert wait == pytest.approx(20.0)

        clock.advance(wait)
        assert budget.acquire() == 0.0
        assert budget.used == 3

    def test_used_forgets_attempts_outside_the_window(self, clock: FakeClock) -> None:
        """used counts only the attempts of the last window seconds."""
        budget = AttemptBudget(10, 60.0, clock=clock, reserve=0.0)
        budget.acquire()
        clock.advance(30.0)
        budget.acquire()

        clock.advance(30.0)

        assert budget.used == 1

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"limit": 0}, "limit must be >= 1"),
            ({"window": 0.0}, "window must be"),
            ({"reserve": 1.0}, r"reserve must be in \[0, 1\)"),
            ({"limit": 1, "reserve": 0.5}, "leaves no attempt"),
        ],
    )
    def test_bad_parameter_is_named(
        self, clock: FakeClock, kwargs: dict[str, Any], message: str
    ) -> None:
        """A parameter out of range raises ValueError naming it."""
        with pytest.raises(ValueError, match=message):
            AttemptBudget(clock=clock, **kwargs)


class TestWeightBudget:
    def test_default_allowance_keeps_a_fifth_unused(self, clock: FakeClock) -> None:
        """Binance's 6000 weight per minute becomes 4800 with the default margin."""
        budget = WeightBudget(clock=clock)

        assert budget.allowance == 4800
        assert budget.used == 0

    def test_counts_weight_that_fits(self, clock: FakeClock) -> None:
        """A reservation that fits returns 0 and is counted."""
        budget = WeightBudget(100, clock=clock, margin=0.0)

        assert budget.reserve(25) == 0.0
        assert budget.reserve(75) == 0.0
        assert budget.used == 100

    def test_full_minute_waits_for_the_next(self, clock: FakeClock) -> None:
        """A reservation that does not fit returns the seconds to the next wall minute."""
        budget = WeightBudget(100, clock=clock, margin=0.0)
        budget.reserve(90)

        assert budget.reserve(25) == pytest.approx(40.0)
        assert budget.used == 90

    def test_new_minute_starts_fresh(self, clock: FakeClock) -> None:
        """The count resets when the wall clock enters a new minute."""
        budget = WeightBudget(100, clock=clock, margin=0.0)
        budget.reserve(100)

        clock.advance(39.0)
        assert budget.reserve(1) == pytest.approx(1.0)
        clock.advance(1.0)

        assert budget.used == 0
        assert budget.reserve(100) == 0.0

    def test_weight_above_allowance_is_rejected(self, clock: FakeClock) -> None:
        """A single request heavier than the allowance could never fit: ValueError."""
        budget = WeightBudget(100, clock=clock, margin=0.2)

        with pytest.raises(ValueError, match=r"weight must be in \[0, allowance=80\]"):
            budget.reserve(81)
        with pytest.raises(ValueError, match="weight must be"):
            budget.reserve(-1)

    def test_server_count_wins_when_higher(self, clock: FakeClock) -> None:
        """observe raises the count to the server's X-MBX-USED-WEIGHT-1M value."""
        budget = WeightBudget(6000, clock=clock)
        budget.reserve(25)

        budget.observe(4790)

        assert budget.used == 4790
        assert budget.reserve(25) == pytest.approx(40.0)

    def test_lower_server_count_is_ignored(self, clock: FakeClock) -> None:
        """A server count below ours leaves ours in place."""
        budget = WeightBudget(6000, clock=clock)
        budget.reserve(500)

        budget.observe(100)

        assert budget.used == 500

    def test_negative_server_count_is_rejected(self, clock: FakeClock) -> None:
        """A negative header value is a ValueError."""
        with pytest.raises(ValueError, match="used_weight must be >= 0"):
            WeightBudget(clock=clock).observe(-5)


class TestWeightBudgetBlock:
    def test_block_closes_the_budget(self, clock: FakeClock) -> None:
        """During a Retry-After nothing fits, and the wait is the time left."""
        budget = WeightBudget(clock=clock)

        budget.block(30.0, "429 Retry-After")

        assert budget.reserve(1) == pytest.approx(30.0)
        assert budget.blocked_until == clock.monotonic() + 30.0
        assert budget.block_reason == "429 Retry-After"
        assert budget.used == 0

    def test_block_ends(self, clock: FakeClock) -> None:
        """Once the block has passed, reservations fit again."""
        budget = WeightBudget(clock=clock)
        budget.block(30.0, "429 Retry-After")

        clock.advance(30.0)

        assert budget.blocked_until is None
        assert budget.block_reason is None
        assert budget.reserve(1) == 0.0

    def test_block_ending_in_a_full_minute_waits_for_the_next(
        self, clock: FakeClock
    ) -> None:
        """If the minute is still full when the block ends, the wait runs to the next minute."""
        budget = WeightBudget(100, clock=clock, margin=0.0)
        budget.reserve(100)

        budget.block(10.0, "429 Retry-After")

        assert budget.reserve(1) == pytest.approx(40.0)

    def test_block_past_the_minute_waits_for_the_block(self, clock: FakeClock) -> None:
        """A block that outlasts the minute decides the wait on its own."""
        budget = WeightBudget(100, clock=clock, margin=0.0)
        budget.reserve(100)

        budget.block(120.0, "418 banned")

        assert budget.reserve(1) == pytest.approx(120.0)

    def test_shorter_block_does_not_shorten_a_ban(self, clock: FakeClock) -> None:
        """A later, shorter Retry-After does not end a longer ban early."""
        budget = WeightBudget(clock=clock)
        budget.block(120.0, "418 banned")

        budget.block(5.0, "429 Retry-After")

        assert budget.reserve(1) == pytest.approx(120.0)
        assert budget.block_reason == "418 banned"

    def test_negative_block_is_rejected(self, clock: FakeClock) -> None:
        """A negative block duration is a ValueError."""
        with pytest.raises(ValueError, match="seconds must be"):
            WeightBudget(clock=clock).block(-1.0, "bad header")

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"limit": 0}, "limit must be >= 1"),
            ({"margin": 1.0}, r"margin must be in \[0, 1\)"),
            ({"limit": 1, "margin": 0.5}, "leaves no weight"),
        ],
    )
    def test_bad_parameter_is_named(
        self, clock: FakeClock, kwargs: dict[str, Any], message: str
    ) -> None:
        """A parameter out of range raises ValueError naming it."""
        with pytest.raises(ValueError, match=message):
            WeightBudget(clock=clock, **kwargs)
