"""The JSON of /status: what an operator needs to see at a glance.

Endpoints with their breakers, the live connection and its age, per id
sequence the last id, its age and rate, open and lost gaps, REST weight and
the sink's backlog.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any


if TYPE_CHECKING:
    from k2stream.service import Service


def build_status(service: Service) -> dict[str, Any]:
    """A JSON-ready snapshot of ``service``."""
    clock = service.clock
    now = clock.monotonic()
    supervisor = service.supervisor
    link = supervisor.link if supervisor is not None else None

    endpoints = []
    for endpoint in supervisor.endpoints if supervisor is not None else []:
        snapshot = endpoint.breaker.snapshot()
        endpoints.append(
            {
                "url": endpoint.url.split("#", 1)[0],
                "label": endpoint.label,
                "venue": endpoint.venue,
                "primary": endpoint.primary,
                "active": link is not None and link.endpoint is endpoint,
                "breaker": snapshot.state.value,
                "tries": endpoint.tries,
                "failures": endpoint.failures,
                "last_error": endpoint.last_error,
                "blocked_for": max(0.0, round(endpoint.blocked_until - now, 1)),
            }
        )

    connection = None
    if link is not None:
        connection = {
            "endpoint": link.endpoint.label,
            "venue": link.endpoint.venue,
            "age": round(link.connection.age, 1),
            "stable": link.stable,
            "frames": link.connection.frames,
            "rate": None
            if link.watchdog.rate is None
            else round(link.watchdog.rate, 1),
            "silent_for": round(link.watchdog.silent_for(), 2),
            "heartbeat_rtt": link.connection.rtt,
        }

    sequencer = service.sequencer
    checkpoints = sequencer.checkpoints()
    streams = []
    for key in sequencer.keys():
        watchdog = link.symbol_watchdogs.get(key) if link is not None else None
        streams.append(
            {
                "key": str(key),
                "exchange": key.exchange,
                "symbol": key.symbol,
                "stream": key.stream,
                "last_id": sequencer.last_id(key),
                "checkpoint": checkpoints.get(key),
                "silent_for": None
                if watchdog is None
                else round(watchdog.silent_for(), 2),
                "rate": None
                if watchdog is None or watchdog.rate is None
                else round(watchdog.rate, 1),
                "open_gaps": [list(g) for g in sequencer.gaps(key)[:20]],
                "missing": sequencer.missing(key),
            }
        )

    backfiller = service.backfiller
    writer = service.writer
    rest = {
        venue: {
            "url": client.base_url,
            "weight_used": client.budget.used,
            "weight_allowance": client.budget.allowance,
            "blocked_until": client.budget.blocked_until,
        }
        for venue, client in service.rests.items()
    }
    return {
        "connected": link is not None,
        "next_attempt_in": (
            None
            if supervisor is None or supervisor.next_attempt_at is None
            else max(0.0, round(supervisor.next_attempt_at - now, 1))
        ),
        "endpoints": endpoints,
        "connection": connection,
        "streams": streams,
        "backfill": {
            "busy": backfiller.busy if backfiller else False,
            "healed_trades": backfiller.healed_trades if backfiller else 0,
            "lost": [
                {
                    "key": str(lost.key),
                    "first": lost.first,
                    "last": lost.last,
                    "reason": lost.reason,
                }
                for lost in (list(backfiller.lost)[-20:] if backfiller else [])
            ],
        },
        "rest": rest,
        "sink": {
            "url": service.settings.sink,
            "backlog": writer.backlog if writer else 0,
            "available": writer.available if writer else False,
        },
    }
