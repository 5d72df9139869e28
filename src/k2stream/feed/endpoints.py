"""The ordered list of endpoints, each with its breaker and its record.

Order is preference: the first endpoint is the primary, and traffic returns
to it (failback) whenever it serves data again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from k2stream.feed.breaker import Breaker


@dataclass(slots=True)
class Endpoint:
    """One WebSocket base URL."""

    url: str
    label: str
    """``host:port``: the ``endpoint`` label of the metrics."""
    venue: str
    index: int
    breaker: Breaker
    blocked_until: float = 0.0
    """Monotonic time before which no handshake may be tried (Retry-After, ban)."""
    tries: int = 0
    failures: int = 0
    last_error: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def primary(self) -> bool:
        return self.index == 0
