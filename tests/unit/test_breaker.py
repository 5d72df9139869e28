"""The per-endpoint circuit breaker, driven on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from k2stream.clock import FakeClock
from k2stream.feed.breaker import Breaker, BreakerSnapshot, BreakerState


CLOSED = BreakerState.CLOSED
OPEN = BreakerState.OPEN
HALF_OPEN = BreakerState.HALF_OPEN

Transition = tuple[str, BreakerState, BreakerState, str]


class Recorder:
    """Collects on_transition calls, and the state the breaker showed during each."""

    def __init__(self) -> None:
        self.transitions: list[Transition] = []
        self.breaker: Breaker | None = None
        self.seen_states: list[BreakerState] = []

    def __call__(
        self, name: str, old: BreakerState, new: BreakerState, reason: str
    ) -> None:
        self.transitions.append((name, old, new, reason))
        if self.breaker is not None:
            self.seen_states.append(self.breaker.snapshot().state)

    @property
    def states(self) -> list[tuple[BreakerState, BreakerState]]:
        return [(old, new) for _, old, new, _ in self.transitions]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


def make_breaker(clock: FakeClock, recorder: Recorder, **kwargs: Any) -> Breaker:
    breaker = Breaker("primary", clock=clock, on_transition=recorder, **kwargs)
    recorder.breaker = breaker
    return breaker


def fail(breaker: Breaker, times: int, reason: str = "refused") -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.record_failure(reason)


def trip(breaker: Breaker) -> None:
    """Open a default breaker with consecutive failures."""
    fail(breaker, breaker.failure_threshold)
    assert breaker.state is OPEN


class TestClosed:
    def test_allows_every_attempt(self, clock: FakeClock, recorder: Recorder) -> None:
        """A new breaker is CLOSED and lets attempts through."""
        breaker = make_breaker(clock, recorder)

        assert breaker.state is CLOSED
        assert all(breaker.allow() for _ in range(20))

    def test_opens_on_consecutive_failures(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """Three consecutive failures open the breaker, two do not."""
        breaker = make_breaker(clock, recorder)

        fail(breaker, 2)
        assert breaker.state is CLOSED

        fail(breaker, 1, reason="handshake timeout")
        assert breaker.state is OPEN
        assert recorder.transitions == [
            (
                "primary",
                CLOSED,
                OPEN,
                "3 consecutive failures, last: handshake timeout",
            )
        ]

    def test_success_breaks_a_run_of_failures(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """A success between failures restarts the consecutive count."""
        breaker = make_breaker(clock, recorder, minimum_calls=10)

        fail(breaker, 2)
        breaker.record_success()
        fail(breaker, 2)

        assert breaker.state is CLOSED
        assert breaker.snapshot().consecutive_failures == 2

    def test_rate_waits_for_minimum_calls(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """Four failures in four calls do not open before minimum_calls; the fifth does."""
        breaker = make_breaker(clock, recorder, failure_threshold=100)

        fail(breaker, 4)
        assert breaker.state is CLOSED

        fail(breaker, 1)
        assert breaker.state is OPEN
        assert (
            recorder.transitions[0][3] == "failure rate 5/5 reached 0.5, last: refused"
        )

    def test_four_of_ten_stay_closed_five_of_ten_open(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """With rate 0.5, 4 failures in the last 10 keep it closed, 5 in 10 open it."""
        breaker = make_breaker(clock, recorder)
        pattern = "SSSSFSFFSF"  # 4 failures, never 3 in a row, no prefix at 50 %

        for outcome in pattern:
            if outcome == "F":
                breaker.record_failure()
            else:
                breaker.record_success()
        assert breaker.state is CLOSED
        assert breaker.snapshot().failure_rate == 0.4

        # The oldest success leaves the window: now 5 failures in the last 10.
        breaker.record_failure("reset by peer")
        assert breaker.state is OPEN
        assert recorder.transitions[0][3] == (
            "failure rate 5/10 reached 0.5, last: reset by peer"
        )

    def test_window_forgets_old_outcomes(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """Only the last `window` outcomes count towards the rate."""
        breaker = make_breaker(clock, recorder, window=4, minimum_calls=4)

        for outcome in "FSFS" + "SS":
            if outcome == "F":
                breaker.record_failure()
            else:
                breaker.record_success()

        snapshot = breaker.snapshot()
        assert (snapshot.calls, snapshot.failures) == (4, 1)
        assert breaker.state is CLOSED


class TestOpen:
    def test_rejects_until_recovery_timeout(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """OPEN rejects attempts for recovery_timeout, then turns HALF_OPEN."""
        breaker = make_breaker(clock, recorder, recovery_timeout=30.0)
        trip(breaker)
        opened_at = clock.monotonic()

        assert breaker.retry_at() == opened_at + 30.0
        clock.advance(29.9)
        assert not breaker.allow()
        assert breaker.state is OPEN

        clock.advance(0.1)
        assert breaker.state is HALF_OPEN
        assert breaker.retry_at() is None
        assert recorder.transitions[-1] == (
            "primary",
            OPEN,
            HALF_OPEN,
            "recovery timeout of 30s elapsed",
        )

    def test_outcomes_while_open_are_ignored(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """A late outcome from an attempt started before opening changes nothing."""
        breaker = make_breaker(clock, recorder)
        trip(breaker)
        retry_at = breaker.retry_at()

        clock.advance(5.0)
        breaker.record_success()
        breaker.record_failure("late")

        assert breaker.state is OPEN
        assert breaker.retry_at() == retry_at
        assert len(recorder.transitions) == 1


class TestHalfOpen:
    def test_admits_exactly_half_open_trials_at_once(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """HALF_OPEN admits half_open_trials attempts at once and rejects the next."""
        breaker = make_breaker(clock, recorder, half_open_trials=2)
        trip(breaker)
        clock.advance(30.0)

        assert [breaker.allow() for _ in range(3)] == [True, True, False]
        assert breaker.snapshot().trials_in_flight == 2

    def test_release_frees_a_slot(self, clock: FakeClock, recorder: Recorder) -> None:
        """An abandoned trial released with no outcome lets another trial in."""
        breaker = make_breaker(clock, recorder)
        trip(breaker)
        clock.advance(30.0)
        assert breaker.allow()
        assert not breaker.allow()

        breaker.release()

        assert breaker.state is HALF_OPEN
        assert breaker.allow()

    def test_success_closes_with_a_fresh_window(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """A trial success closes the breaker and forgets the failures before it."""
        breaker = make_breaker(clock, recorder)
        trip(breaker)
        clock.advance(30.0)
        assert breaker.allow()

        breaker.record_success()

        assert breaker.state is CLOSED
        snapshot = breaker.snapshot()
        assert (snapshot.calls, snapshot.failures, snapshot.consecutive_failures) == (
            0,
            0,
            0,
        )
        fail(breaker, 2)
        assert breaker.state is CLOSED

    def test_success_threshold_needs_that_many_successes(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """With success_threshold 2, one trial success keeps it HALF_OPEN."""
        breaker = make_breaker(clock, recorder, success_threshold=2)
        trip(breaker)
        clock.advance(30.0)

        assert breaker.allow()
        breaker.record_success()
        assert breaker.state is HALF_OPEN

        assert breaker.allow()
        breaker.record_success()
        assert breaker.state is CLOSED
        assert recorder.transitions[-1][3] == "2 trial attempt(s) succeeded"

    def test_failure_reopens_for_a_new_period(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """A trial failure reopens the breaker for a full recovery period from now."""
        breaker = make_breaker(clock, recorder)
        trip(breaker)
        clock.advance(31.0)
        assert breaker.allow()

        breaker.record_failure("no first message")

        assert breaker.state is OPEN
        assert breaker.retry_at() == clock.monotonic() + 30.0
        assert recorder.transitions[-1][2:] == (
            OPEN,
            "trial attempt failed, last: no first message",
        )

    def test_recovery_grows_up_to_its_cap_and_resets_on_close(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """Each failed trial doubles the recovery period up to the cap; closing restores it."""
        breaker = make_breaker(clock, recorder, max_recovery_timeout=100.0)
        trip(breaker)
        periods = []

        for _ in range(3):
            clock.advance(breaker.snapshot().recovery_timeout)
            assert breaker.allow()
            breaker.record_failure()
            periods.append(breaker.retry_at() - clock.monotonic())  # type: ignore[operator]

        assert periods == [60.0, 100.0, 100.0]
        clock.advance(100.0)
        assert breaker.allow()
        breaker.record_success()
        trip(breaker)
        assert breaker.retry_at() == clock.monotonic() + 30.0

    def test_recovery_is_fixed_by_default(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """Without max_recovery_timeout a failed trial reopens for the same period."""
        breaker = make_breaker(clock, recorder, recovery_timeout=10.0)
        trip(breaker)
        clock.advance(10.0)
        assert breaker.allow()

        breaker.record_failure()

        assert breaker.snapshot().recovery_timeout == 10.0


class TestTransitions:
    def test_reported_in_order_with_reasons(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """A full cycle reports every transition once, in order, with its reason."""
        breaker = make_breaker(clock, recorder, recovery_timeout=5.0)

        fail(breaker, 3, reason="refused")
        clock.advance(5.0)
        assert breaker.allow()
        breaker.record_failure("timeout")
        clock.advance(5.0)
        assert breaker.allow()
        breaker.record_success()

        assert recorder.transitions == [
            ("primary", CLOSED, OPEN, "3 consecutive failures, last: refused"),
            ("primary", OPEN, HALF_OPEN, "recovery timeout of 5s elapsed"),
            ("primary", HALF_OPEN, OPEN, "trial attempt failed, last: timeout"),
            ("primary", OPEN, HALF_OPEN, "recovery timeout of 5s elapsed"),
            ("primary", HALF_OPEN, CLOSED, "1 trial attempt(s) succeeded"),
        ]

    def test_callback_sees_the_new_state(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """The callback runs after the state changed, so it can read it."""
        breaker = make_breaker(clock, recorder)

        trip(breaker)
        clock.advance(30.0)
        breaker.allow()

        assert recorder.seen_states == [OPEN, HALF_OPEN]

    def test_failure_without_reason_has_no_suffix(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """A failure recorded without a reason leaves the transition reason plain."""
        breaker = make_breaker(clock, recorder)

        for _ in range(3):
            breaker.record_failure()

        assert recorder.transitions[0][3] == "3 consecutive failures"

    def test_no_callback_is_fine(self, clock: FakeClock) -> None:
        """A breaker without on_transition still moves between states."""
        breaker = Breaker("solo", clock=clock)

        trip(breaker)

        assert breaker.state is OPEN


class TestHooks:
    def test_force_open_opens_for_one_period(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """force_open opens a CLOSED breaker with the given reason."""
        breaker = make_breaker(clock, recorder)

        breaker.force_open("operator drain")

        assert not breaker.allow()
        assert breaker.retry_at() == clock.monotonic() + 30.0
        assert recorder.transitions == [("primary", CLOSED, OPEN, "operator drain")]

    def test_reset_closes_and_forgets(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """reset closes an OPEN breaker and clears its counts."""
        breaker = make_breaker(clock, recorder)
        trip(breaker)

        breaker.reset()

        assert breaker.state is CLOSED
        assert breaker.snapshot().calls == 0
        assert recorder.transitions[-1] == ("primary", OPEN, CLOSED, "reset")

    def test_reset_of_a_closed_breaker_reports_nothing(
        self, clock: FakeClock, recorder: Recorder
    ) -> None:
        """Resetting a CLOSED breaker clears counts without a transition."""
        breaker = make_breaker(clock, recorder)
        fail(breaker, 2)

        breaker.reset()

        assert breaker.snapshot().consecutive_failures == 0
        assert recorder.transitions == []


class TestSnapshot:
    def test_open_snapshot(self, clock: FakeClock, recorder: Recorder) -> None:
        """A snapshot of an OPEN breaker carries its counts and retry time."""
        breaker = make_breaker(clock, recorder)
        breaker.record_success()
        trip(breaker)
        clock.advance(10.0)

        snapshot = breaker.snapshot()

        assert snapshot == BreakerSnapshot(
            name="primary",
            state=OPEN,
            consecutive_failures=3,
            failures=3,
            calls=4,
            failure_rate=0.75,
            trials_in_flight=0,
            recovery_timeout=30.0,
            retry_at=clock.monotonic() + 20.0,
            retry_in=20.0,
        )

    def test_to_dict_is_json_ready(self, clock: FakeClock, recorder: Recorder) -> None:
        """to_dict gives the state as its label and no retry time when CLOSED."""
        breaker = make_breaker(clock, recorder)

        fields = breaker.snapshot().to_dict()

        assert fields["state"] == "closed"
        assert fields["retry_at"] is None
        assert fields["failure_rate"] == 0.0

    def test_snapshot_is_frozen(self, clock: FakeClock, recorder: Recorder) -> None:
        """A snapshot cannot be changed after it was taken."""
        snapshot = make_breaker(clock, recorder).snapshot()

        with pytest.raises(AttributeError):
            snapshot.calls = 3  # type: ignore[misc]


class TestValidation:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"failure_threshold": 0}, "failure_threshold must be >= 1"),
            ({"failure_rate": 0.0}, r"failure_rate must be in \(0, 1\]"),
            ({"failure_rate": 1.5}, r"failure_rate must be in \(0, 1\]"),
            ({"window": 0}, "window must be >= 1"),
            ({"minimum_calls": 11}, r"minimum_calls must be in \[1, window=10\]"),
            ({"minimum_calls": 0}, "minimum_calls must be in"),
            ({"recovery_timeout": 0.0}, "recovery_timeout must be > 0"),
            ({"half_open_trials": 0}, "half_open_trials must be >= 1"),
            ({"success_threshold": 0}, "success_threshold must be >= 1"),
            ({"max_recovery_timeout": 10.0}, "max_recovery_timeout must be >="),
        ],
    )
    def test_bad_parameter_is_named(
        self, clock: FakeClock, kwargs: dict[str, Any], message: str
    ) -> None:
        """A parameter out of range raises ValueError naming it and its range."""
        with pytest.raises(ValueError, match=message):
            Breaker("primary", clock=clock, **kwargs)
