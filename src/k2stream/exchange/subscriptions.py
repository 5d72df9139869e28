"""Stream names, connection URLs and the JSON control messages, as Binance reads them.

Pure parsing and validation: no sockets. The replies and error texts follow
binance-spot-api-docs/web-socket-streams.md ("Live Subscribing/Unsubscribing
to streams", "Error Messages") and the nested ``{"error": {...}, "id": ...}``
form that the live servers actually send.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from k2stream.exchange.market import STREAM_AGG_TRADE, STREAM_TRADE


METHODS: Final = (
    "SUBSCRIBE",
    "UNSUBSCRIBE",
    "LIST_SUBSCRIPTIONS",
    "SET_PROPERTY",
    "GET_PROPERTY",
)

_STREAM: Final = re.compile(r"([a-z0-9]+)@(trade|aggTrade)")
_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9]{1,36}")
_INT64: Final = range(-(2**63), 2**63)


class ControlError(Exception):
    """A control message Binance would refuse; ``reply`` is what it sends back."""

    def __init__(self, code: int, msg: str, id_: object = None) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.id = id_

    def reply(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "msg": self.msg}, "id": self.id}


class InvalidStream(ControlError):
    def __init__(self, id_: object = None) -> None:
        super().__init__(2, "Invalid request: invalid stream", id_)


class TooManySubscriptions(ControlError):
    def __init__(self, id_: object = None) -> None:
        super().__init__(4, "Too many subscriptions", id_)


@dataclass(frozen=True, slots=True)
class StreamRef:
    """One stream by name: ``btcusdt@trade`` is symbol BTCUSDT, stream ``trade``."""

    name: str
    symbol: str
    stream: str


def parse_stream(name: object) -> StreamRef | None:
    """The stream ``name`` refers to, or None when it is not a trade stream name.

    A well-formed name for a symbol that is not listed is still a stream: as
    on Binance, subscribing to it succeeds and nothing ever arrives.
    """
    if not isinstance(name, str):
        return None
    match = _STREAM.fullmatch(name)
    if match is None:
        return None
    stream = STREAM_AGG_TRADE if match[2] == "aggTrade" else STREAM_TRADE
    return StreamRef(name, match[1].upper(), stream)


@dataclass(frozen=True, slots=True)
class Opening:
    """What a connection URL asks for."""

    streams: tuple[StreamRef, ...]
    combined: bool
    micro: bool


def parse_url(path: str, query: Mapping[str, str]) -> Opening:
    """Read ``/ws``, ``/ws/<s1>/<s2>`` or ``/stream?streams=<s1>/<s2>``.

    ``timeUnit`` may be MICROSECOND or MILLISECOND in either case (protocol
    section 1). Raises ValueError naming what was wrong.
    """
    if path == "/stream" or path == "/stream/":
        combined = True
        names = query.get("streams", "")
    elif path == "/ws" or path.startswith("/ws/"):
        combined = False
        names = path[len("/ws/") :]
    else:
        raise ValueError(f"path {path!r} is not /ws, /ws/<stream> or /stream")

    unit = query.get("timeUnit", "MILLISECOND").upper()
    if unit not in ("MILLISECOND", "MICROSECOND"):
        raise ValueError(
            f"timeUnit {query.get('timeUnit')!r} is invalid; "
            "use MILLISECOND or MICROSECOND"
        )

    streams = []
    for name in filter(None, names.split("/")):
        ref = parse_stream(name)
        if ref is None:
            raise ValueError(f"stream {name!r} is invalid; use e.g. btcusdt@trade")
        if ref not in streams:
            streams.append(ref)
    return Opening(tuple(streams), combined, unit == "MICROSECOND")


@dataclass(frozen=True, slots=True)
class Request:
    """One well-formed control message."""

    method: str
    params: list[Any]
    id: object


def parse_request(text: str) -> Request:
    """Read a control message; raise :class:`ControlError` with Binance's reply."""
    try:
        message = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ControlError(
            3, f"Invalid JSON: expected value at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(message, dict):
        raise ControlError(2, "Invalid request: expected a JSON object")

    id_ = message.get("id")
    if not _valid_id(message):
        raise ControlError(2, "Invalid request: request ID must be an unsigned integer")

    method = message.get("method")
    if method is None:
        raise ControlError(
            2,
            f"Invalid request: missing field `method` at line 1 column {len(text)}",
            id_,
        )
    if method not in METHODS:
        expected = ", ".join(f"`{m}`" for m in METHODS)
        column = text.find(str(method)) + len(str(method)) + 1
        raise ControlError(
            2,
            f"Invalid request: unknown variant `{method}`, expected one of "
            f"{expected} at line 1 column {column}",
            id_,
        )

    params = message.get("params", [])
    if not isinstance(params, list):
        raise ControlError(2, "Invalid request: params must be an array", id_)
    return Request(method, params, id_)


def _valid_id(message: dict[str, Any]) -> bool:
    """A signed 64-bit integer, an alphanumeric string of at most 36, or null."""
    if "id" not in message:
        return False
    id_ = message["id"]
    if id_ is None:
        return True
    if isinstance(id_, bool):
        return False
    if isinstance(id_, int):
        return id_ in _INT64
    return isinstance(id_, str) and _REQUEST_ID.fullmatch(id_) is not None


def parse_streams(request: Request) -> list[StreamRef]:
    """The streams named by a SUBSCRIBE or UNSUBSCRIBE, all valid or an error."""
    refs = []
    for name in request.params:
        ref = parse_stream(name)
        if ref is None:
            raise InvalidStream(request.id)
        refs.append(ref)
    return refs


def parse_set_property(request: Request) -> bool:
    """The new value of ``combined`` from SET_PROPERTY, or Binance's error."""
    _check_property_name(request, expected_params=2)
    value = request.params[1]
    if not isinstance(value, bool):
        raise ControlError(1, "Invalid value type: expected Boolean", request.id)
    return value


def parse_get_property(request: Request) -> None:
    """Check that GET_PROPERTY asks for ``combined``, the only property."""
    _check_property_name(request, expected_params=1)


def _check_property_name(request: Request, *, expected_params: int) -> None:
    if len(request.params) > expected_params:
        raise ControlError(2, "Invalid request: too many parameters", request.id)
    if len(request.params) < expected_params:
        raise ControlError(2, "Invalid request: missing parameters", request.id)

    name = request.params[0]
    if not isinstance(name, str):
        raise ControlError(
            2, "Invalid request: property name must be a string", request.id
        )
    if name != "combined":
        raise ControlError(0, "Unknown property", request.id)
