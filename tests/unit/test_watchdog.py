"""The rate-learning silence watchdog, driven on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from k2stream.clock import FakeClock
from k2stream.feed.watchdog import RateWatchdog


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def watchdog(clock: FakeClock) -> RateWatchdog:
    return RateWatchdog(clock=clock)


def stream(
    watchdog: RateWatchdog,
    clock: FakeClock,
    *,
    per_second: float,
    seconds: float,
    tick: float = 1.0,
) -> list[bool]:
    """Feed a steady stream tick by tick; return is_stale() after each tick."""
    stale = []
    owed = 0.0
    for _ in range(round(seconds / tick)):
        clock.advance(tick)
        owed += per_second * tick
        count = int(owed + 1e-9)
        owed -= count
        watchdog.observe(count)
        stale.append(watchdog.is_stale())
    return stale


def silence_until_stale(
    watchdog: RateWatchdog, clock: FakeClock, *, tick: float, limit: float
) -> float:
    """Tick with no data until the watchdog calls it stale; return the silence."""
    for _ in range(round(limit / tick)):
        if watchdog.is_stale():
            return watchdog.silent_for()
        clock.advance(tick)
        watchdog.observe(0)
    raise AssertionError(f"not declared stale within {limit} s")


class TestWarmUp:
    def test_no_data_uses_the_timeout(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """With no rate learnt the limit is timeout: stale at 60 s, not before."""
        assert watchdog.rate is None
        assert watchdog.silence_limit() == 60.0

        clock.advance(59.9)
        assert not watchdog.is_stale()

        clock.advance(0.1)
        assert watchdog.is_stale()

    def test_a_few_messages_are_not_yet_a_rate(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """Below warmup_messages the watchdog keeps the timeout."""
        clock.advance(0.1)
        watchdog.observe(19)

        assert watchdog.rate is None
        assert watchdog.silence_limit() == 60.0

    def test_warm_up_ends_at_warmup_messages(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """Once warmup_messages have arrived the learnt rate sets the limit."""
        clock.advance(1.0)
        watchdog.observe(20)

        assert watchdog.rate == pytest.approx(20.0)
        assert watchdog.silence_limit() == pytest.approx(2.0)


class TestBusyStream:
    def test_silence_is_noticed_within_seconds(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """A 300 msg/s stream that falls silent is stale after 2 s, well under 5 s."""
        assert not any(stream(watchdog, clock, per_second=300, seconds=10))
        assert watchdog.silence_limit() == 2.0

        silence = silence_until_stale(watchdog, clock, tick=0.25, limit=5.0)

        assert silence == pytest.approx(2.0)

    def test_silence_does_not_lower_the_learnt_rate(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """Ticks without data leave the rate as it was before the silence."""
        stream(watchdog, clock, per_second=300, seconds=10)
        before = watchdog.rate

        for _ in range(120):
            clock.advance(1.0)
            watchdog.observe(0)

        assert watchdog.rate == before

    def test_per_message_batches_learn_the_same_rate(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """Calling observe per message learns the same rate as per health tick."""
        for _ in range(2_000):
            clock.advance(0.01)
            watchdog.observe(1)

        assert watchdog.rate == pytest.approx(100.0)

    def test_messages_at_one_instant_are_not_lost(self, clock: FakeClock) -> None:
        """Two observations at the same instant both count towards the warm-up."""
        watchdog = RateWatchdog(warmup_messages=30, clock=clock)
        clock.advance(1.0)
        watchdog.observe(10)
        watchdog.observe(10)

        clock.advance(1.0)
        watchdog.observe(10)

        assert watchdog.rate is not None


class TestQuietStream:
    def test_normal_gaps_are_not_stale(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """A stream with one message per 10 s is never stale during its normal gaps."""
        stale = stream(watchdog, clock, per_second=0.1, seconds=600)

        assert not any(stale)
        assert watchdog.rate == pytest.approx(0.1, rel=0.05)
        assert watchdog.silence_limit() == 60.0

    def test_quiet_stream_is_stale_at_the_timeout(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """A quiet stream that stops is stale after timeout, not before."""
        stream(watchdog, clock, per_second=0.1, seconds=600)

        silence = silence_until_stale(watchdog, clock, tick=1.0, limit=61.0)

        assert silence == pytest.approx(60.0)

    def test_moderate_stream_gets_twenty_gaps(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """At 1 msg/s the limit is expected_gaps mean gaps: 20 s."""
        stream(watchdog, clock, per_second=1.0, seconds=120)

        assert watchdog.silence_limit() == pytest.approx(20.0)
        assert not any(stream(watchdog, clock, per_second=1.0, seconds=60))

    def test_rate_follows_a_slowing_market(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """After ten half-lives at a new rate the learnt rate is close to it."""
        stream(watchdog, clock, per_second=300, seconds=60)

        stream(watchdog, clock, per_second=10, seconds=300)

        assert watchdog.rate == pytest.approx(10.0, rel=0.05)


class TestReset:
    def test_reset_keeps_the_rate_of_a_connection_that_delivered(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """A replacement that opens silent is caught as fast as the one it replaced."""
        stream(watchdog, clock, per_second=300, seconds=10)
        rate = watchdog.rate
        clock.advance(30.0)

        watchdog.reset()

        assert watchdog.rate == rate
        assert watchdog.silent_for() == 0.0
        silence = silence_until_stale(watchdog, clock, tick=0.5, limit=5.0)
        assert silence == pytest.approx(2.0)

    def test_reset_after_a_silent_connection_forgets_the_rate(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """After a connection that delivered nothing, the timeout applies again."""
        stream(watchdog, clock, per_second=300, seconds=10)
        watchdog.reset()
        clock.advance(2.0)
        assert watchdog.is_stale()

        watchdog.reset()

        assert watchdog.rate is None
        assert watchdog.silence_limit() == 60.0

    def test_outage_between_connections_is_not_learnt(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """Time between connections does not count as a slow interval."""
        stream(watchdog, clock, per_second=300, seconds=10)
        clock.advance(600.0)
        watchdog.reset()

        stream(watchdog, clock, per_second=300, seconds=1)

        assert watchdog.rate == pytest.approx(300.0)

    def test_silence_counts_from_the_last_data(
        self, watchdog: RateWatchdog, clock: FakeClock
    ) -> None:
        """silent_for measures from the last observation that carried data."""
        clock.advance(1.0)
        watchdog.observe(5)
        clock.advance(3.0)
        watchdog.observe(0)

        assert watchdog.silent_for() == pytest.approx(3.0)


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"timeout": 0.0}, "timeout must be"),
            ({"min_silence": 0.0}, r"min_silence must be in \(0, timeout=60.0\]"),
            ({"min_silence": 61.0}, "min_silence must be in"),
            ({"expected_gaps": 0.0}, "expected_gaps must be > 0"),
            ({"halflife": -1.0}, "halflife must be"),
            ({"warmup_messages": 0}, "warmup_messages must be >= 1"),
        ],
    )
    def test_bad_parameter_is_named(
        self, clock: FakeClock, kwargs: dict[str, Any], message: str
    ) -> None:
        """A parameter out of range raises ValueError naming it."""
        with pytest.raises(ValueError, match=message):
            RateWatchdog(clock=clock, **kwargs)

    def test_negative_count_is_rejected(self, watchdog: RateWatchdog) -> None:
        """A negative message count is a ValueError."""
        with pytest.raises(ValueError, match="count must be >= 0"):
            watchdog.observe(-1)
