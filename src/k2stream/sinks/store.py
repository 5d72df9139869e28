"""Read-only questions about a SQLite store, for ``k2stream verify`` and audits.

Every function opens the file read-only (``mode=ro``), so it can run while
k2stream writes to it (WAL readers never block the writer) and can never
change it. The queries follow the primary key (exchange, symbol, stream, id),
so they walk the table in order without sorting, even on millions of rows.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Final

from k2stream.records import StreamKey
from k2stream.sinks.sqlite import Gap, gap_from_row


_KEY: Final = "exchange = ? AND symbol = ? AND stream = ?"
_KEY_NAMED: Final = "exchange = :exchange AND symbol = :symbol AND stream = :stream"

_WINDOW_SPAN: Final = 1 << 14
"""Ranges of at most this many ids are searched with the window query."""


def missing_ranges(
    path: str | os.PathLike[str],
    exchange: str | None = None,
    symbol: str | None = None,
    stream: str | None = None,
) -> dict[StreamKey, list[tuple[int, int]]]:
    """Holes between the lowest and highest stored id of each sequence.

    Each hole is an inclusive ``(first_missing, last_missing)`` range, in id
    order. Sequences without a hole are left out, so an empty answer means
    the store is complete between its ends. ``exchange``, ``symbol`` and
    ``stream`` narrow the audit.
    """
    holes: dict[StreamKey, list[tuple[int, int]]] = {}
    with _reader(path) as conn:
        for key in _keys(conn, exchange, symbol, stream):
            stored, lowest, highest = _count_range(conn, key)
            if stored < highest - lowest + 1:
                holes[key] = _holes_between(conn, key, lowest, highest)
    return holes


def counts(path: str | os.PathLike[str]) -> dict[StreamKey, tuple[int, int, int]]:
    """Per sequence: how many trades are stored, the lowest id and the highest."""
    with _reader(path) as conn:
        return {key: _count_range(conn, key) for key in _keys(conn)}


def count_ids(
    path: str | os.PathLike[str], key: StreamKey, first: int, last: int
) -> int:
    """How many trades of ``key`` are stored with ``first <= id <= last``.

    The primary key makes a duplicate impossible, so a complete range counts
    ``last - first + 1``.
    """
    with _reader(path) as conn:
        return count_ids_in(conn, key, first, last)


def count_ids_in(
    conn: sqlite3.Connection, key: StreamKey, first: int, last: int
) -> int:
    """:func:`count_ids` on an open connection."""
    sql = f"SELECT count(*) FROM trades WHERE {_KEY} AND id BETWEEN ? AND ?"
    stored: int = conn.execute(sql, (*key, first, last)).fetchone()[0]
    return stored


def checkpoints(path: str | os.PathLike[str]) -> dict[StreamKey, int]:
    """The stored checkpoint of each sequence."""
    sql = "SELECT exchange, symbol, stream, last_id FROM checkpoints"
    with _reader(path) as conn:
        return {
            StreamKey(exchange, symbol, stream): last_id
            for exchange, symbol, stream, last_id in conn.execute(sql)
        }


def recorded_gaps(path: str | os.PathLike[str], status: str | None = None) -> list[Gap]:
    """The gaps k2stream recorded (see ``SqliteSink.record_gap``), in key order."""
    sql = "SELECT * FROM gaps"
    params: tuple[str, ...] = ()
    if status is not None:
        sql += " WHERE status = ?"
        params = (status,)

    with _reader(path) as conn:
        rows = conn.execute(sql + " ORDER BY 1, 2, 3, 4", params).fetchall()
    return [gap_from_row(row) for row in rows]


@contextmanager
def _reader(path: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    """A read-only connection to an existing k2stream store."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"no SQLite store at {file}; check the --sink path")

    uri = f"{file.resolve().as_uri()}?mode=ro"
    with closing(sqlite3.connect(uri, uri=True)) as conn:
        try:
            rows = conn.execute("SELECT name FROM sqlite_master").fetchall()
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"{file} is not a k2stream store ({exc})") from exc

        if not {"trades", "checkpoints", "gaps"} <= {name for (name,) in rows}:
            raise ValueError(f"{file} is not a k2stream store (no trades table)")
        yield conn


def _keys(
    conn: sqlite3.Connection,
    exchange: str | None = None,
    symbol: str | None = None,
    stream: str | None = None,
) -> list[StreamKey]:
    """The sequences stored, narrowed to the given exchange, symbol and stream."""
    rows = conn.execute("SELECT DISTINCT exchange, symbol, stream FROM trades")
    wanted = (exchange, symbol, stream)
    return [
        StreamKey(*row)
        for row in rows
        if all(
            want is None or want == have for want, have in zip(wanted, row, strict=True)
        )
    ]


def _count_range(conn: sqlite3.Connection, key: StreamKey) -> tuple[int, int, int]:
    """Count, lowest and highest id of ``key``: one range scan of the key."""
    sql = f"SELECT count(*), min(id), max(id) FROM trades WHERE {_KEY}"
    stored, lowest, highest = conn.execute(sql, key).fetchone()
    return stored, lowest, highest


def _holes_between(
    conn: sqlite3.Connection, key: StreamKey, first: int, last: int
) -> list[tuple[int, int]]:
    """The holes of ``key`` in ``first..last``, found by halving.

    SQLite counts the ids in a range of the primary key far faster than a
    window function walks them, so the range is halved until each part is
    complete (skipped), empty (a hole) or small enough for the window query.
    A store with few holes is audited at the speed of counting.
    """
    holes: list[tuple[int, int]] = []
    parts = [(first, last)]
    while parts:
        low, high = parts.pop()
        span = high - low + 1
        stored = count_ids_in(conn, key, low, high)
        if stored == span:
            continue

        if stored == 0:
            holes.append((low, high))
        elif span <= _WINDOW_SPAN:
            holes.extend(_holes_by_window(conn, key, low, high))
        else:
            middle = (low + high) // 2
            parts.append((middle + 1, high))
            parts.append((low, middle))

    return _merge_adjacent(holes)


def _holes_by_window(
    conn: sqlite3.Connection, key: StreamKey, low: int, high: int
) -> list[tuple[int, int]]:
    """The holes of ``key`` in ``low..high``, which holds at least one id."""
    sql = f"""
        SELECT previous + 1, id - 1
        FROM (
            SELECT id, lag(id, 1, :low - 1) OVER (ORDER BY id) AS previous
            FROM trades
            WHERE {_KEY_NAMED} AND id BETWEEN :low AND :high
        )
        WHERE id - previous > 1
        UNION ALL
        SELECT max(id) + 1, :high
        FROM trades
        WHERE {_KEY_NAMED} AND id BETWEEN :low AND :high
        HAVING max(id) < :high
    """
    params = {**key._asdict(), "low": low, "high": high}
    return sorted(conn.execute(sql, params).fetchall())


def _merge_adjacent(holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join holes that touch: halving can cut one hole into neighbours."""
    merged: list[tuple[int, int]] = []
    for first, last in holes:
        if merged and merged[-1][1] + 1 == first:
            merged[-1] = (merged[-1][0], last)
        else:
            merged.append((first, last))
    return merged
