"""A sink of JSON lines: one K2 TradeV2 object per line, in a file or on stdout.

A batch is appended, flushed and fsynced before its checkpoints are written
to the sidecar ``<file>.checkpoints.json`` (a temporary file fsynced and then
renamed over the old one), so the sidecar never claims a line that is not on
disk.

Idempotence is weaker than SQLite's: a file of lines cannot look up a trade
cheaply, so :meth:`JsonlSink.write` skips only trades at or below the stored
checkpoint of their sequence. That makes a replay from the checkpoint (what
k2stream does after a restart) write each trade once; a trade replayed above
the checkpoint, for instance after a crash between the lines and the sidecar,
can appear twice. Consumers that need exact once should dedup on
``message_id``, which is the same on every replay.

On stdout there is no sidecar: lines are flushed, never fsynced, and a
restart begins with no checkpoints.
"""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO, Final

import msgspec
import structlog

from k2stream.records import StreamKey, Trade, to_trade_v2
from k2stream.sinks.base import SinkError, SinkUnavailable, SinkUrl


log = structlog.get_logger(__name__)

SIDECAR_SUFFIX: Final = ".checkpoints.json"
SIDECAR_VERSION: Final = 1

_RETRYABLE_ERRNOS: Final = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EAGAIN}
)
"""Write errors that may clear by themselves (space freed, storage back)."""


class _Checkpoint(msgspec.Struct, frozen=True):
    exchange: str
    symbol: str
    stream: str
    last_id: int


class _Sidecar(msgspec.Struct, frozen=True):
    version: int
    checkpoints: list[_Checkpoint]


class JsonlSink:
    """TradeV2 lines appended to ``path``, or written to stdout when ``path`` is None."""

    name: str = "jsonl"

    def __init__(
        self, path: str | os.PathLike[str] | None, *, fsync: bool = True
    ) -> None:
        self.path = Path(path) if path is not None else None
        self.sidecar = (
            self.path.with_name(self.path.name + SIDECAR_SUFFIX) if self.path else None
        )
        """Where the checkpoints of the file are kept; None on stdout."""
        self._fsync = fsync
        self._out: BinaryIO | None = None
        self._checkpoints: dict[StreamKey, int] = {}
        self._unconfirmed: set[tuple[StreamKey, int]] = set()
        self._encoder = msgspec.json.Encoder()

    def open(self) -> dict[StreamKey, int]:
        """Open the file for appending and read its checkpoints from the sidecar."""
        if self.path is None or self.sidecar is None:
            self._out = sys.stdout.buffer
            return {}

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._checkpoints = _read_sidecar(self.sidecar)
            # Unbuffered: after a failed write no stale bytes may linger in a
            # buffer, to be flushed later behind the truncation.
            self._out = open(self.path, "ab", buffering=0)
        except OSError as exc:
            raise SinkError(
                f"cannot open the jsonl sink {self.path} ({exc}); "
                "check the path and its permissions or choose another --sink"
            ) from exc

        log.info(
            "jsonl_sink_opened",
            path=str(self.path),
            sequences=len(self._checkpoints),
        )
        return dict(self._checkpoints)

    def write(
        self, trades: Sequence[Trade], checkpoints: Mapping[StreamKey, int]
    ) -> None:
        """Append the trades above their checkpoint, then store the checkpoints."""
        out = self._stream()
        fresh = [t for t in trades if self._is_new(t)]
        lines = self._encoder.encode_lines([to_trade_v2(t) for t in fresh])

        if self.sidecar is None:
            self._write_stdout(out, lines)
            return

        self._append(out, lines)
        self._unconfirmed.update((t.key, t.id) for t in fresh)

        merged = dict(self._checkpoints)
        for key, last_id in checkpoints.items():
            merged[key] = max(last_id, merged.get(key, last_id))
        self._write_sidecar(self.sidecar, merged)

        self._checkpoints = merged
        self._unconfirmed.clear()

    def close(self) -> None:
        """Close the file (stdout stays open: it is not ours)."""
        out, self._out = self._out, None
        if out is None or self.path is None:
            return

        try:
            out.close()
        except OSError as exc:
            log.warning("jsonl_close_failed", path=str(self.path), error=str(exc))

    def _stream(self) -> BinaryIO:
        if self._out is None:
            raise SinkError(
                f"the jsonl sink {self.path} is not open; call open() first"
            )
        return self._out

    def _is_new(self, trade: Trade) -> bool:
        """False for a trade the file already holds, as far as the sink knows.

        A trade is held when it is at or below its checkpoint, or when it was
        appended by an earlier attempt whose sidecar write failed (the retry
        of that batch must not append it again).
        """
        key = trade.key
        if trade.id <= self._checkpoints.get(key, -1):
            return False
        return (key, trade.id) not in self._unconfirmed

    def _append(self, out: BinaryIO, lines: bytes) -> None:
        """Append ``lines`` durably; on failure, cut the file back to where it was."""
        size = out.tell()
        try:
            _write_all(out, lines)
            if self._fsync:
                os.fsync(out.fileno())
        except OSError as exc:
            self._truncate(out, size)
            raise self._error(exc, "append to") from exc

    def _truncate(self, out: BinaryIO, size: int) -> None:
        """Drop a partly written batch so that the file holds only whole lines."""
        try:
            out.truncate(size)
        except OSError as exc:
            log.warning(
                "jsonl_truncate_failed",
                path=str(self.path),
                size=size,
                error=str(exc),
            )

    def _write_stdout(self, out: BinaryIO, lines: bytes) -> None:
        try:
            out.write(lines)
            out.flush()
        except OSError as exc:
            raise SinkError(
                f"cannot write to stdout ({exc}); whatever reads k2stream's output "
                "has gone away"
            ) from exc

    def _write_sidecar(
        self, sidecar: Path, checkpoints: Mapping[StreamKey, int]
    ) -> None:
        """Replace the sidecar atomically: temp file, fsync, rename, fsync the directory."""
        document = _Sidecar(
            version=SIDECAR_VERSION,
            checkpoints=[
                _Checkpoint(*key, last_id)
                for key, last_id in sorted(checkpoints.items())
            ],
        )
        temporary = sidecar.with_name(sidecar.name + ".tmp")

        try:
            with open(temporary, "wb") as out:
                out.write(msgspec.json.encode(document))
                out.flush()
                if self._fsync:
                    os.fsync(out.fileno())
            os.replace(temporary, sidecar)
            if self._fsync:
                _fsync_directory(sidecar.parent)
        except OSError as exc:
            raise self._error(exc, "write the checkpoints of") from exc

    def _error(self, exc: OSError, doing: str) -> SinkError:
        if exc.errno in _RETRYABLE_ERRNOS:
            return SinkUnavailable(
                f"cannot {doing} the jsonl sink {self.path} ({exc}); "
                "k2stream retries, free disk space or repair the storage"
            )
        return SinkError(
            f"cannot {doing} the jsonl sink {self.path} ({exc}); "
            "check the path and its permissions"
        )


def from_url(url: SinkUrl, **options: Any) -> JsonlSink:
    """The sink for a parsed ``jsonl:`` URL; see :func:`k2stream.sinks.base.open_sink`."""
    return JsonlSink(url.path, **options)


def _read_sidecar(sidecar: Path) -> dict[StreamKey, int]:
    """The checkpoints stored next to a file; none when it has no sidecar yet."""
    try:
        raw = sidecar.read_bytes()
    except FileNotFoundError:
        return {}

    try:
        stored = msgspec.json.decode(raw, type=_Sidecar)
    except msgspec.DecodeError as exc:
        raise SinkError(
            f"the checkpoint file {sidecar} is not valid ({exc}); restore it, "
            "or delete it to start the file's checkpoints over"
        ) from exc

    if stored.version != SIDECAR_VERSION:
        raise SinkError(
            f"the checkpoint file {sidecar} has version {stored.version}, not "
            f"{SIDECAR_VERSION}; use the k2stream that wrote it or another --sink"
        )

    return {
        StreamKey(c.exchange, c.symbol, c.stream): c.last_id for c in stored.checkpoints
    }


def _write_all(out: BinaryIO, data: bytes) -> None:
    """Write all of ``data``: an unbuffered write may take only part of it."""
    view = memoryview(data)
    while view:
        written = out.write(view)
        view = view[written:]


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
