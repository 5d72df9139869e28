"""How the supervisor chooses endpoints, fails back and gives up, on a fake clock."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from k2stream.clock import FakeClock
from k2stream.feed.breaker import Breaker
from k2stream.feed.endpoints import Endpoint
from k2stream.feed.settings import FeedSettings
from k2stream.feed.supervisor import GiveUp, Supervisor
from k2stream.observe.metrics import Metrics


URLS = ("wss://a.example:9443", "wss://b.example:443", "wss://c.example")


def endpoints(clock: FakeClock) -> list[Endpoint]:
    made = []
    for index, url in enumerate(URLS):
        label = url.removeprefix("wss://")
        breaker = Breaker(
            label, clock=clock, failure_threshold=2, recovery_timeout=30.0
        )
        made.append(Endpoint(url, label, "BINANCE", index, breaker))
    return made


def supervisor(clock: FakeClock, listed: list[Endpoint], **kwargs: Any) -> Supervisor:
    return Supervisor(
        listed,
        adapter=SimpleNamespace(),  # not called: nothing connects here
        settings=FeedSettings(),
        metrics=Metrics(),
        http=None,  # type: ignore[arg-type]
        clock=clock,
        **kwargs,
    )


def on(endpoint: Endpoint) -> Any:
    return SimpleNamespace(endpoint=endpoint)


def test_an_open_breaker_takes_its_endpoint_out_until_it_half_opens():
    """Two failures open the primary's breaker; it is skipped until recovery_timeout passes."""
    clock = FakeClock()
    listed = endpoints(clock)
    chooser = supervisor(clock, listed)
    listed[0].breaker.record_failure("refused")
    listed[0].breaker.record_failure("refused")

    assert listed[1:] == chooser._usable()
    clock.advance(30.0)
    assert listed == chooser._usable()


def test_failback_goes_to_the_most_preferred_usable_endpoint():
    """On a fallback, failback targets the primary once its breaker allows; never on the primary."""
    clock = FakeClock()
    listed = endpoints(clock)
    chooser = supervisor(clock, listed)
    for _ in range(2):
        listed[0].breaker.record_failure("refused")

    assert listed[1] is chooser._best(on(listed[2]))
    assert chooser._preferred(on(listed[2])) is listed[1]
    assert chooser._preferred(on(listed[1])) is None
    clock.advance(30.0)
    assert chooser._preferred(on(listed[1])) is listed[0]
    assert chooser._preferred(on(listed[0])) is None


def test_a_blocked_endpoint_waits_for_its_retry_after():
    """An endpoint under Retry-After (429 or 418) is not usable until the time has passed."""
    clock = FakeClock()
    listed = endpoints(clock)
    chooser = supervisor(clock, listed)
    listed[0].blocked_until = clock.monotonic() + 120.0

    assert listed[0] not in chooser._usable()
    clock.advance(120.0)
    assert listed[0] in chooser._usable()


def test_redundant_siblings_are_not_failed_back_onto():
    """Failback skips an endpoint a redundant sibling connection is already on."""
    clock = FakeClock()
    listed = endpoints(clock)
    chooser = supervisor(clock, listed, siblings=lambda: [listed[0]])

    assert chooser._preferred(on(listed[2])) is listed[1]
    assert listed[1] is chooser._best(on(listed[2]))


def test_giving_up_names_every_endpoint_tried_with_its_last_error():
    """The give-up message names each endpoint tried, its tries, last error and the remedy."""
    clock = FakeClock()
    listed = endpoints(clock)
    listed[0].tries, listed[0].last_error = 6, "HTTP 503"
    listed[1].tries, listed[1].last_error = 4, "ConnectionRefusedError"

    message = str(GiveUp(10, listed))

    assert message.startswith("gave up after 10 failed connection attempts")
    assert "wss://a.example:9443 (6 tries, last error: HTTP 503)" in message
    assert (
        "wss://b.example:443 (4 tries, last error: ConnectionRefusedError)" in message
    )
    assert "wss://c.example" not in message
    assert "--max-reconnect-attempts" in message


def test_the_give_up_limit_counts_consecutive_failed_attempts():
    """max_reconnect_attempts failed attempts raise GiveUp; 0 never gives up."""
    clock = FakeClock()
    limited = supervisor(clock, endpoints(clock))
    endless = Supervisor(
        endpoints(clock),
        adapter=SimpleNamespace(),
        settings=FeedSettings(max_reconnect_attempts=0),
        metrics=Metrics(),
        http=None,  # type: ignore[arg-type]
        clock=clock,
    )

    for _ in range(9):
        limited._record_failed_attempt("HTTP 503")
        endless._record_failed_attempt("HTTP 503")
    try:
        limited._record_failed_attempt("HTTP 503")
    except GiveUp as exc:
        assert 10 == exc.attempts
    else:
        raise AssertionError("the tenth failed attempt did not give up")
    for _ in range(100):
        endless._record_failed_attempt("HTTP 503")
