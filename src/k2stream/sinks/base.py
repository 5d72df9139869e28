"""The sink contract, its errors, and the choice of a sink by URL.

A sink is the store at the end of the pipeline. It promises three things the
rest of k2stream is built on: a write is durable when it returns, the
checkpoints travel in the same atomic write as the trades they cover, and a
trade written twice is stored once. :class:`~k2stream.sinks.writer.SinkWriter`
drives a sink from its own thread; nothing here touches the event loop.

Errors::

    SinkError            fatal: retrying will not help, the service stops
    └── SinkUnavailable  retryable: locked, busy, disk full, broker down

Sink URLs follow SQLAlchemy's path rule: after ``scheme:///`` comes the path,
so ``sqlite:///data/trades.db`` is the relative path ``data/trades.db`` and
``sqlite:////var/lib/k2/trades.db`` the absolute ``/var/lib/k2/trades.db``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from k2stream.records import StreamKey, Trade


ERROR_REASONS: Final = ("busy", "unavailable", "error")
"""Values of the ``reason`` label of ``k2_sink_errors_total``."""

DEFAULT_SINK_URL: Final = "sqlite:///data/trades.db"

ACCEPTED_FORMS: Final = (
    "sqlite:///relative/trades.db, sqlite:////absolute/trades.db, "
    "jsonl:///relative/trades.jsonl, jsonl:////absolute/trades.jsonl, jsonl:- "
    "(stdout) or kafka://host:port[,host:port]/topic"
)

_SINK_MODULES: Final[dict[str, str]] = {
    "sqlite": "k2stream.sinks.sqlite",
    "jsonl": "k2stream.sinks.jsonl",
    # Imported only when asked for: confluent-kafka is an optional extra.
    "kafka": "k2stream.sinks.kafka",
}
"""Scheme to the module implementing it; each defines ``from_url(url, **options)``."""

_PATH_SCHEMES: Final = ("sqlite", "jsonl")


class SinkError(Exception):
    """A sink failed in a way that retrying will not fix.

    The message says what went wrong and what the operator can do about it.
    """

    reason: str = "error"
    """The ``reason`` label for ``k2_sink_errors_total``: one of ERROR_REASONS."""


class SinkUnavailable(SinkError):
    """The store cannot take writes right now; the same write may succeed later."""

    def __init__(self, message: str, *, reason: str = "unavailable") -> None:
        super().__init__(message)
        self.reason = reason if reason in ERROR_REASONS else "unavailable"


class Sink(Protocol):
    """A durable, idempotent store of trades and checkpoints.

    Every method is called from one thread, the writer's, never from the
    event loop: implementations may block.
    """

    name: str
    """``sqlite``, ``jsonl`` or ``kafka``: the ``sink`` label of the metrics."""

    def open(self) -> dict[StreamKey, int]:
        """Open or create the store and return the checkpoint per id sequence.

        A checkpoint is the last id such that every id up to it is durable,
        as written by :meth:`write`.
        """
        ...

    def write(
        self, trades: Sequence[Trade], checkpoints: Mapping[StreamKey, int]
    ) -> None:
        """Store ``trades`` and ``checkpoints`` atomically; durable on return.

        A trade already stored (same exchange, symbol, stream and id) is
        ignored. Raises :class:`SinkUnavailable` when a later retry may
        succeed and :class:`SinkError` when it cannot.
        """
        ...

    def close(self) -> None:
        """Release the store; a closed sink is not used again."""
        ...


@dataclass(frozen=True, slots=True)
class SinkUrl:
    """A parsed sink URL."""

    scheme: str
    path: Path | None
    """The file for ``sqlite`` and ``jsonl``; None for stdout and for ``kafka``."""
    url: str
    """The URL as given, for messages and for sinks that parse the rest."""


def parse_sink_url(url: str) -> SinkUrl:
    """Split ``url`` into scheme and path, applying the SQLAlchemy path rule.

    Raises ValueError naming the URL and the accepted forms when it is not one
    of them. Only ``sqlite`` and ``jsonl`` are checked here: a ``kafka`` URL
    is handed whole to the Kafka sink, which knows its own syntax.
    """
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if not colon or not scheme:
        raise _invalid(url, "it has no scheme")

    if scheme not in _SINK_MODULES:
        raise _invalid(url, f"the scheme {scheme!r} is not a known sink")

    if scheme not in _PATH_SCHEMES:
        return SinkUrl(scheme, None, url)

    if scheme == "jsonl" and rest == "-":
        return SinkUrl(scheme, None, url)

    if rest in ("//", "///"):
        raise _invalid(url, "it names no file")

    if not rest.startswith("//"):
        raise _invalid(url, f"{scheme} needs three slashes before the path")

    if not rest.startswith("///"):
        raise _invalid(url, f"{scheme} takes no host, only a path after ///")

    path = rest[3:]
    if path.endswith("/"):
        raise _invalid(url, "it names no file")

    if "?" in path or "#" in path:
        raise _invalid(url, "query strings are not supported; use the options")

    return SinkUrl(scheme, Path(path), url)


def open_sink(url: str, **options: Any) -> Sink:
    """The sink for ``url``, not yet opened: the writer opens it in its thread.

    ``options`` go to the sink's constructor (for example ``busy_timeout``
    for SQLite). Raises ValueError for a malformed URL and SinkError when the
    sink's module cannot be loaded (a missing optional dependency).
    """
    parsed = parse_sink_url(url)
    module_name = _SINK_MODULES[parsed.scheme]

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SinkError(
            f"the {parsed.scheme} sink cannot be loaded ({exc}); "
            f"install what it needs, e.g. pip install 'k2stream[{parsed.scheme}]'"
        ) from exc

    from_url = getattr(module, "from_url", None)
    if from_url is None:
        raise SinkError(
            f"{module_name} defines no from_url(url, **options); "
            "the sink module does not follow the sink contract"
        )

    sink: Sink = from_url(parsed, **options)
    return sink


def _invalid(url: str, why: str) -> ValueError:
    return ValueError(f"sink URL {url!r} is not valid: {why}; use {ACCEPTED_FORMS}")
