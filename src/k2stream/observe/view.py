"""``k2stream status``: a running service's /status, readable in a terminal."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import aiohttp


async def show_status(url: str, *, watch: float = 0.0, raw: bool = False) -> int:
    """Print the status once, or every ``watch`` seconds until interrupted."""
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(
                    url.rstrip("/") + "/status", timeout=aiohttp.ClientTimeout(total=5)
                ) as response:
                    status = await response.json()
            except (aiohttp.ClientError, TimeoutError) as exc:
                print(
                    f"k2stream status: cannot read {url}/status: {exc}", file=sys.stderr
                )
                return 1
            text = json.dumps(status, indent=2) if raw else render(status)
            if watch > 0 and sys.stdout.isatty():
                print("\x1b[2J\x1b[H", end="")
            print(text, flush=True)
            if watch <= 0:
                return 0
            await asyncio.sleep(watch)


def render(status: dict[str, Any]) -> str:
    """The status as aligned text: endpoints, connection, streams, backfill, REST, sink."""
    lines = []
    connection = status.get("connection")
    if connection:
        lines.append(
            f"connected to {connection['endpoint']} ({connection['venue']}), "
            f"age {connection['age']:.0f} s, {connection['rate'] or 0:.0f} msg/s, "
            f"silent {connection['silent_for']:.1f} s, rtt {_ms(connection['heartbeat_rtt'])}"
        )
    else:
        wait = status.get("next_attempt_in")
        lines.append(
            "NOT CONNECTED"
            + (f", next attempt in {wait:.1f} s" if wait is not None else "")
        )

    lines.append("")
    lines.append(
        f"{'endpoint':<28} {'venue':<11} {'breaker':<10} {'tries':>6} {'fails':>6}  last error"
    )
    for e in status.get("endpoints", []):
        marker = "*" if e["active"] else " "
        lines.append(
            f"{marker}{e['label']:<27} {e['venue']:<11} {e['breaker']:<10} "
            f"{e['tries']:>6} {e['failures']:>6}  {e['last_error'][:60]}"
        )

    lines.append("")
    lines.append(
        f"{'stream':<34} {'last id':>14} {'rate/s':>8} {'silent':>7} {'missing':>8}"
    )
    for s in status.get("streams", []):
        lines.append(
            f"{s['key']:<34} {s['last_id'] if s['last_id'] is not None else '-':>14} "
            f"{s['rate'] if s['rate'] is not None else '-':>8} "
            f"{s['silent_for'] if s['silent_for'] is not None else '-':>7} {s['missing']:>8}"
        )

    backfill = status.get("backfill", {})
    lines.append("")
    lines.append(
        f"backfill: {'busy' if backfill.get('busy') else 'idle'}, "
        f"{backfill.get('healed_trades', 0)} trades healed, "
        f"{len(backfill.get('lost', []))} ranges lost"
    )
    for lost in backfill.get("lost", []):
        lines.append(
            f"  LOST {lost['key']} {lost['first']}..{lost['last']} ({lost['reason']})"
        )
    for venue, rest in status.get("rest", {}).items():
        lines.append(
            f"rest {venue}: weight {rest['weight_used']}/{rest['weight_allowance']} per minute"
        )
    sink = status.get("sink", {})
    lines.append(
        f"sink {sink.get('url')}: {'available' if sink.get('available') else 'UNAVAILABLE'}, "
        f"backlog {sink.get('backlog', 0)}"
    )
    return "\n".join(lines)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"
