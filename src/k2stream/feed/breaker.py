"""A circuit breaker per endpoint, with Resilience4j's semantics.

A *call* is one connection attempt. The supervisor asks :meth:`Breaker.allow`
before connecting and reports the outcome with :meth:`Breaker.record_success`
or :meth:`Breaker.record_failure` (or :meth:`Breaker.release` when an attempt
ends with no outcome, e.g. on shutdown).

CLOSED lets every attempt through and keeps the last ``window`` outcomes. It
opens on ``failure_threshold`` consecutive failures, or once the window holds
at least ``minimum_calls`` outcomes and the share of failures reaches
``failure_rate``. OPEN rejects every attempt until ``recovery_timeout`` has
passed, then turns HALF_OPEN, which admits up to ``half_open_trials`` attempts
at once: one failure reopens it for a new recovery period,
``success_threshold`` successes close it with a fresh window.

The breaker neither logs nor touches metrics: it reports every transition to
``on_transition`` and the supervisor turns that into log events and gauges.
Outcomes reported while OPEN are ignored: they belong to attempts that started
before the breaker opened and say nothing about the endpoint now.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from collections.abc import Callable
from typing import Any, TypeAlias

from k2stream.clock import Clock


class BreakerState(enum.Enum):
    """Where a breaker stands; the values are the ``state`` metric label."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


OnTransition: TypeAlias = Callable[[str, BreakerState, BreakerState, str], None]
"""Called as ``on_transition(name, old, new, reason)`` after each change of state."""


@dataclasses.dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A breaker's state at one instant, for /status."""

    name: str
    state: BreakerState
    consecutive_failures: int
    failures: int
    """Failures among the outcomes in the window."""
    calls: int
    """Outcomes in the window (at most ``window``)."""
    failure_rate: float
    """``failures / calls``, 0.0 with no calls."""
    trials_in_flight: int
    recovery_timeout: float
    """The recovery period in force (it grows if ``max_recovery_timeout`` allows)."""
    retry_at: float | None
    """Monotonic time at which an OPEN breaker turns HALF_OPEN; None unless OPEN."""
    retry_in: float | None
    """Seconds until then; None unless OPEN."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, the state as its label."""
        fields = dataclasses.asdict(self)
        fields["state"] = self.state.value
        return fields


class Breaker:
    """One endpoint's circuit breaker; see the module docstring for the rules."""

    def __init__(
        self,
        name: str,
        *,
        clock: Clock,
        failure_threshold: int = 3,
        failure_rate: float = 0.5,
        window: int = 10,
        minimum_calls: int = 5,
        recovery_timeout: float = 30.0,
        half_open_trials: int = 1,
        success_threshold: int = 1,
        max_recovery_timeout: float | None = None,
        on_transition: OnTransition | None = None,
    ) -> None:
        """Create a CLOSED breaker.

        ``max_recovery_timeout``: when set above ``recovery_timeout``, the
        recovery period doubles each time a HALF_OPEN trial fails, up to this
        cap, and falls back to ``recovery_timeout`` when the breaker closes.
        None (the default) keeps the period fixed.
        """
        _check_parameters(
            failure_threshold=failure_threshold,
            failure_rate=failure_rate,
            window=window,
            minimum_calls=minimum_calls,
            recovery_timeout=recovery_timeout,
            half_open_trials=half_open_trials,
            success_threshold=success_threshold,
            max_recovery_timeout=max_recovery_timeout,
        )

        self.name = name
        self._clock = clock
        self.failure_threshold = failure_threshold
        self.failure_rate = failure_rate
        self.window = window
        self.minimum_calls = minimum_calls
        self.recovery_timeout = recovery_timeout
        self.max_recovery_timeout = (
            recovery_timeout if max_recovery_timeout is None else max_recovery_timeout
        )
        self.half_open_trials = half_open_trials
        self.success_threshold = success_threshold
        self._on_transition = on_transition

        self._state = BreakerState.CLOSED
        # The last ``window`` outcomes while CLOSED, True for a failure.
        self._outcomes: collections.deque[bool] = collections.deque(maxlen=window)
        self._consecutive_failures = 0
        self._current_recovery = recovery_timeout
        self._retry_at = 0.0
        self._trials_in_flight = 0
        self._trial_successes = 0

    @property
    def state(self) -> BreakerState:
        """The current state; OPEN turns HALF_OPEN on read once its period is over."""
        if (
            self._state is BreakerState.OPEN
            and self._clock.monotonic() >= self._retry_at
        ):
            self._trials_in_flight = 0
            self._trial_successes = 0
            self._move_to(
                BreakerState.HALF_OPEN,
                f"recovery timeout of {self._current_recovery:g}s elapsed",
            )
        return self._state

    def allow(self) -> bool:
        """Whether an attempt may start now; in HALF_OPEN it takes a trial slot."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True

        if state is BreakerState.OPEN:
            return False

        if self._trials_in_flight >= self.half_open_trials:
            return False
        self._trials_in_flight += 1
        return True

    def record_success(self) -> None:
        """Report an attempt that succeeded."""
        state = self.state
        if state is BreakerState.CLOSED:
            self._consecutive_failures = 0
            self._outcomes.append(False)
            return

        if state is BreakerState.HALF_OPEN:
            self._end_trial()
            self._trial_successes += 1
            if self._trial_successes >= self.success_threshold:
                self._close(f"{self._trial_successes} trial attempt(s) succeeded")

    def record_failure(self, reason: str = "") -> None:
        """Report an attempt that failed; ``reason`` is carried into the transition."""
        state = self.state
        last = f", last: {reason}" if reason else ""

        if state is BreakerState.CLOSED:
            self._consecutive_failures += 1
            self._outcomes.append(True)
            self._open_if_tripped(last)
            return

        if state is BreakerState.HALF_OPEN:
            self._end_trial()
            longer = min(self.max_recovery_timeout, self._current_recovery * 2)
            self._open(f"trial attempt failed{last}", recovery=longer)

    def release(self) -> None:
        """Free the trial slot of an attempt abandoned with no outcome."""
        if self._state is BreakerState.HALF_OPEN:
            self._end_trial()

    def retry_at(self) -> float | None:
        """Monotonic time at which this OPEN breaker turns HALF_OPEN, else None."""
        if self.state is BreakerState.OPEN:
            return self._retry_at
        return None

    def force_open(self, reason: str) -> None:
        """Open for one recovery period, whatever the state (operator/test hook)."""
        self._open(reason, recovery=self.recovery_timeout)

    def reset(self) -> None:
        """Close and forget every outcome (operator and test hook)."""
        self._close("reset")

    def snapshot(self) -> BreakerSnapshot:
        """The state, counts and retry time as of now."""
        state = self.state
        calls = len(self._outcomes)
        failures = sum(self._outcomes)
        retry_at = self._retry_at if state is BreakerState.OPEN else None
        retry_in = None if retry_at is None else retry_at - self._clock.monotonic()

        return BreakerSnapshot(
            name=self.name,
            state=state,
            consecutive_failures=self._consecutive_failures,
            failures=failures,
            calls=calls,
            failure_rate=failures / calls if calls else 0.0,
            trials_in_flight=self._trials_in_flight,
            recovery_timeout=self._current_recovery,
            retry_at=retry_at,
            retry_in=retry_in,
        )

    def _open_if_tripped(self, last: str) -> None:
        """Open when the consecutive count or the failure rate crossed its limit."""
        if self._consecutive_failures >= self.failure_threshold:
            self._open(
                f"{self._consecutive_failures} consecutive failures{last}",
                recovery=self.recovery_timeout,
            )
            return

        calls = len(self._outcomes)
        if calls < self.minimum_calls:
            return

        failures = sum(self._outcomes)
        if failures / calls >= self.failure_rate:
            self._open(
                f"failure rate {failures}/{calls} reached {self.failure_rate:g}{last}",
                recovery=self.recovery_timeout,
            )

    def _open(self, reason: str, *, recovery: float) -> None:
        """Enter OPEN for ``recovery`` seconds from now."""
        self._current_recovery = recovery
        self._retry_at = self._clock.monotonic() + self._current_recovery
        self._trials_in_flight = 0
        self._trial_successes = 0
        self._move_to(BreakerState.OPEN, reason)

    def _close(self, reason: str) -> None:
        self._outcomes.clear()
        self._consecutive_failures = 0
        self._current_recovery = self.recovery_timeout
        self._trials_in_flight = 0
        self._trial_successes = 0
        self._move_to(BreakerState.CLOSED, reason)

    def _end_trial(self) -> None:
        self._trials_in_flight = max(0, self._trials_in_flight - 1)

    def _move_to(self, new: BreakerState, reason: str) -> None:
        """Enter ``new``, then report it, so the callback sees the new state."""
        old = self._state
        self._state = new
        if old is not new and self._on_transition is not None:
            self._on_transition(self.name, old, new, reason)

    def __repr__(self) -> str:
        return f"Breaker({self.name!r}, state={self._state.value})"


def _check_parameters(
    *,
    failure_threshold: int,
    failure_rate: float,
    window: int,
    minimum_calls: int,
    recovery_timeout: float,
    half_open_trials: int,
    success_threshold: int,
    max_recovery_timeout: float | None,
) -> None:
    """Raise ValueError naming the first parameter outside its accepted range."""
    if failure_threshold < 1:
        raise ValueError(f"failure_threshold must be >= 1, got {failure_threshold}")
    if not 0 < failure_rate <= 1:
        raise ValueError(f"failure_rate must be in (0, 1], got {failure_rate}")
    if window < 1:
        raise ValueError(f"window must be >= 1 attempts, got {window}")
    if not 1 <= minimum_calls <= window:
        raise ValueError(
            f"minimum_calls must be in [1, window={window}], got {minimum_calls}"
        )
    if not recovery_timeout > 0:
        raise ValueError(
            f"recovery_timeout must be > 0 seconds, got {recovery_timeout}"
        )
    if half_open_trials < 1:
        raise ValueError(f"half_open_trials must be >= 1, got {half_open_trials}")
    if success_threshold < 1:
        raise ValueError(f"success_threshold must be >= 1, got {success_threshold}")
    if max_recovery_timeout is not None and max_recovery_timeout < recovery_timeout:
        raise ValueError(
            f"max_recovery_timeout must be >= recovery_timeout "
            f"({recovery_timeout}) seconds or None, got {max_recovery_timeout}"
        )
