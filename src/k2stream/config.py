"""Settings from flags, environment and a config file, in that order of precedence.

Every setting is one row of :data:`OPTIONS`: its name (also the config-file
key), the flag, the ``K2_`` environment variable, the default, the parser and
a sentence of help. The command line, the README's configuration table and
the validation all come from this one table.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from k2stream.binance.streams import DEFAULT_ENDPOINTS, DEFAULT_REST_URLS
from k2stream.feed.settings import FeedSettings
from k2stream.records import BINANCE, BINANCE_US, STREAMS


class ConfigError(ValueError):
    """A setting has a value k2stream cannot use; the message says which and what is accepted."""


@dataclass(frozen=True)
class Option:
    name: str
    default: Any
    parse: Callable[[str], Any]
    help: str
    env: str
    flag: str
    accepts: str

    @property
    def is_list(self) -> bool:
        return isinstance(self.default, list | tuple)


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise ValueError
    return value


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _positive_count(text: str) -> int:
    value = _count(text)
    if value < 1:
        raise ValueError
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


def _symbol(text: str) -> str:
    symbol = text.strip().upper()
    if not symbol.isalnum():
        raise ValueError
    return symbol


def _stream(text: str) -> str:
    for stream in STREAMS:
        if text.strip().lower() == stream.lower():
            return stream
    raise ValueError


def _endpoint(text: str) -> str:
    url = text.strip()
    parts = urlsplit(url)
    if parts.scheme == "wss" and parts.hostname:
        return url
    if parts.scheme == "ws" and _is_loopback(parts.hostname):
        return url
    raise ValueError


def _http_url(text: str) -> str:
    url = text.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and _is_loopback(parts.hostname):
        return url
    raise ValueError


def _sink(text: str) -> str:
    if text.startswith(("sqlite:///", "jsonl:///", "kafka://")) or text == "jsonl:-":
        return text
    raise ValueError


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    shard = (int(index), int(count))
    if not 0 <= shard[0] < shard[1]:
        raise ValueError
    return shard


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError
        return text

    return parse


def _is_loopback(host: str | None) -> bool:
    return host in ("localhost", "::1") or (host or "").startswith("127.")


_FEED = FeedSettings()

_ROWS: list[tuple[str, Any, Callable[[str], Any], str, str, str]] = [
    # name, default, parser, env, accepts, help
    (
        "symbols",
        ["BTCUSDT", "ETHUSDT"],
        _symbol,
        "K2_SYMBOLS",
        "comma-separated symbols",
        "Symbols to capture.",
    ),
    (
        "streams",
        ["trade"],
        _stream,
        "K2_STREAMS",
        "trade, aggTrade",
        "Streams per symbol.",
    ),
    (
        "endpoint",
        list(DEFAULT_ENDPOINTS),
        _endpoint,
        "K2_BINANCE_WEBSOCKET_URL",
        "wss:// URLs (ws:// on loopback only)",
        "WebSocket endpoint; repeat for fallbacks, primary first. The environment gives "
        "the primary in K2_BINANCE_WEBSOCKET_URL and the fallbacks in K2_BINANCE_FAILOVER_URLS.",
    ),
    (
        "rest_url",
        DEFAULT_REST_URLS[BINANCE],
        _http_url,
        "K2_REST_URL",
        "an https:// URL (http:// on loopback only)",
        "REST base URL for Binance (backfill).",
    ),
    (
        "rest_url_us",
        DEFAULT_REST_URLS[BINANCE_US],
        _http_url,
        "K2_REST_URL_US",
        "an https:// URL (http:// on loopback only)",
        "REST base URL for Binance.US.",
    ),
    (
        "sink",
        "sqlite:///data/trades.db",
        _sink,
        "K2_SINK",
        "sqlite:///PATH, jsonl:///PATH, jsonl:-, kafka://HOST:PORT[,...]/TOPIC",
        "Where trades are delivered (sqlite:///rel/path, sqlite:////abs/path).",
    ),
    (
        "metrics_port",
        9090,
        _port,
        "K2_METRICS_PORT",
        "a port 0-65535 (0 picks a free one)",
        "Port of /metrics, /livez, /readyz, /healthz and /status.",
    ),
    (
        "metrics_host",
        "127.0.0.1",
        str,
        "K2_METRICS_HOST",
        "an address to bind",
        "Address the metrics server binds; loopback unless you open it deliberately.",
    ),
    (
        "duration",
        0.0,
        _seconds,
        "K2_DURATION",
        "seconds >= 0",
        "Stop after this many seconds; 0 runs until stopped.",
    ),
    (
        "log_format",
        "auto",
        _choice("auto", "json", "console"),
        "K2_LOG_FORMAT",
        "auto, json, console",
        "Log format; auto is console on a terminal, JSON lines otherwise.",
    ),
    (
        "log_level",
        "info",
        _choice("debug", "info", "warning", "error"),
        "K2_LOG_LEVEL",
        "debug, info, warning, error",
        "Lowest level logged.",
    ),
    (
        "reconnect_delay",
        _FEED.reconnect_delay,
        _positive_seconds,
        "K2_BINANCE_RECONNECT_DELAY",
        "seconds > 0",
        "First delay of the reconnect backoff; it doubles per failed attempt.",
    ),
    (
        "max_reconnect_delay",
        _FEED.max_reconnect_delay,
        _positive_seconds,
        "K2_BINANCE_MAX_RECONNECT_DELAY",
        "seconds > 0",
        "Cap of the reconnect backoff.",
    ),
    (
        "max_reconnect_attempts",
        _FEED.max_reconnect_attempts,
        _count,
        "K2_BINANCE_MAX_RECONNECT_ATTEMPTS",
        "a whole number >= 0",
        "Consecutive failed attempts before exiting with status 75; 0 never gives up.",
    ),
    (
        "stable_after",
        _FEED.stable_after,
        _seconds,
        "K2_BINANCE_STABLE_AFTER",
        "seconds >= 0",
        "Data must flow this long before the backoff resets.",
    ),
    (
        "health_check_interval",
        _FEED.health_check_interval,
        _positive_seconds,
        "K2_BINANCE_HEALTH_CHECK_INTERVAL",
        "seconds > 0",
        "How often per-symbol silence is judged and reported.",
    ),
    (
        "health_check_timeout",
        _FEED.health_check_timeout,
        _positive_seconds,
        "K2_BINANCE_HEALTH_CHECK_TIMEOUT",
        "seconds > 0",
        "Longest silence tolerated on a connection (quiet markets); busy ones are judged "
        "against their own rate and replaced within seconds.",
    ),
    (
        "heartbeat_interval",
        _FEED.heartbeat_interval,
        _seconds,
        "K2_BINANCE_HEARTBEAT_INTERVAL",
        "seconds >= 0 (0 disables)",
        "Interval of the client's heartbeat ping.",
    ),
    (
        "heartbeat_timeout",
        _FEED.heartbeat_timeout,
        _positive_seconds,
        "K2_BINANCE_HEARTBEAT_TIMEOUT",
        "seconds > 0",
        "A heartbeat without pong for this long means the connection is dead.",
    ),
    (
        "open_timeout",
        _FEED.open_timeout,
        _positive_seconds,
        "K2_BINANCE_OPEN_TIMEOUT",
        "seconds > 0",
        "Longest handshake plus subscription.",
    ),
    (
        "recovery_timeout",
        _FEED.recovery_timeout,
        _positive_seconds,
        "K2_BINANCE_RECOVERY_TIMEOUT",
        "seconds > 0",
        "How long an endpoint's open breaker waits before a trial connection.",
    ),
    (
        "failure_threshold",
        _FEED.failure_threshold,
        _positive_count,
        "K2_BINANCE_FAILURE_THRESHOLD",
        "a whole number >= 1",
        "Consecutive failures that open an endpoint's breaker.",
    ),
    (
        "failback_interval",
        _FEED.failback_interval,
        _positive_seconds,
        "K2_BINANCE_FAILBACK_INTERVAL",
        "seconds > 0",
        "While on a fallback, how often a preferred endpoint is probed.",
    ),
    (
        "switch_timeout",
        _FEED.switch_timeout,
        _positive_seconds,
        "K2_BINANCE_SWITCH_TIMEOUT",
        "seconds > 0",
        "How long a replacement connection may take to carry every stream before a "
        "rotation goes ahead, or a failback is abandoned.",
    ),
    (
        "rotate_after",
        _FEED.rotate_after,
        _positive_seconds,
        "K2_BINANCE_ROTATE_AFTER",
        "seconds > 0",
        "Age at which a connection is replaced, make-before-break "
        "(Binance cuts at 24 h); shortened by up to 2 % jitter.",
    ),
    (
        "max_backfill",
        1_000_000,
        _count,
        "K2_BINANCE_MAX_BACKFILL",
        "a whole number >= 0",
        "Most ids healed from REST per gap; older ones are reported lost.",
    ),
    (
        "backfill_grace",
        1.0,
        _seconds,
        "K2_BINANCE_BACKFILL_GRACE",
        "seconds >= 0",
        "Wait before fetching a gap, for late arrivals from another connection.",
    ),
    (
        "batch_size",
        5000,
        _positive_count,
        "K2_SINK_BATCH_SIZE",
        "a whole number >= 1",
        "Most trades per sink transaction.",
    ),
    (
        "batch_interval",
        0.05,
        _positive_seconds,
        "K2_SINK_BATCH_INTERVAL",
        "seconds > 0",
        "Longest a trade waits for its batch.",
    ),
    (
        "max_backlog",
        250_000,
        _positive_count,
        "K2_SINK_MAX_BACKLOG",
        "a whole number >= 1",
        "Trades buffered while the sink is slow or down; past it, ids become gaps healed later.",
    ),
    (
        "sink_busy_timeout",
        5.0,
        _seconds,
        "K2_SINK_BUSY_TIMEOUT",
        "seconds >= 0",
        "How long a SQLite write waits for another process's lock before it is retried later.",
    ),
    (
        "redundancy",
        1,
        _positive_count,
        "K2_REDUNDANCY",
        "a whole number >= 1",
        "Connections per stream group, each on a different endpoint, merged by id: "
        "losing one costs no time and needs no backfill.",
    ),
    (
        "streams_per_connection",
        1024,
        _positive_count,
        "K2_STREAMS_PER_CONNECTION",
        "a whole number from 1 to 1024",
        "Most streams on one connection (Binance allows 1024); more are split across connections.",
    ),
    (
        "shard",
        (0, 1),
        _shard,
        "K2_SHARD",
        "I/N with 0 <= I < N",
        "Capture only the symbols that hash to shard I of N.",
    ),
]

OPTIONS: dict[str, Option] = {
    name: Option(
        name, default, parse, help_, env, "--" + name.replace("_", "-"), accepts
    )
    for name, default, parse, env, accepts, help_ in _ROWS
}


@dataclass(frozen=True)
class Settings:
    """Every setting, validated."""

    values: Mapping[str, Any]

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None

    def feed(self) -> FeedSettings:
        names = set(FeedSettings.__dataclass_fields__)
        return FeedSettings(**{k: v for k, v in self.values.items() if k in names})


def add_arguments(
    parser: argparse.ArgumentParser, names: Sequence[str] | None = None
) -> None:
    """Add a flag per option (all when ``names`` is None); defaults stay None.

    A None tells :func:`resolve` that the flag was not given.
    """
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file of settings (keys as below)."
    )
    for option in OPTIONS.values():
        if names is not None and option.name not in names:
            continue
        default = (
            ",".join(option.default)
            if option.name in ("symbols", "streams")
            else option.default
        )
        if option.name == "endpoint":
            default = " ".join(option.default)
        parser.add_argument(
            option.flag,
            dest=option.name,
            action="append" if option.name == "endpoint" else "store",
            default=None,
            metavar=option.name.upper(),
            help=f"{option.help} [{option.env}; default: {default}]".replace("%", "%%"),
        )


def resolve(
    flags: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Settings:
    """Merge defaults, file, environment and flags (later wins) and validate each value."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {name: option.default for name, option in OPTIONS.items()}

    path = flags.get("config") or config_file or environ.get("K2_CONFIG")
    if path:
        for name, raw in _read_file(path).items():
            values[name] = _from_file(name, raw, path)

    for name, option in OPTIONS.items():
        if name == "endpoint":
            endpoints = _endpoints_from_env(environ)
            if endpoints is not None:
                values[name] = endpoints
            continue
        if option.env in environ:
            values[name] = _parse(option, environ[option.env], option.env)

    for name, raw in flags.items():
        if raw is None or name not in OPTIONS:
            continue
        option = OPTIONS[name]
        if name == "endpoint":
            values[name] = [_parse_one(option, item, option.flag) for item in raw]
        else:
            values[name] = _parse(option, raw, option.flag)

    _check(values)
    return Settings(values)


def _endpoints_from_env(environ: Mapping[str, str]) -> list[str] | None:
    option = OPTIONS["endpoint"]
    primary = environ.get("K2_BINANCE_WEBSOCKET_URL")
    failover = environ.get("K2_BINANCE_FAILOVER_URLS")
    if primary is None and failover is None:
        return None
    urls = []
    if primary:
        urls.append(_parse_one(option, primary, "K2_BINANCE_WEBSOCKET_URL"))
    if failover:
        urls += [
            _parse_one(option, item, "K2_BINANCE_FAILOVER_URLS")
            for item in failover.split(",")
            if item.strip()
        ]
    return urls


def _read_file(path: str) -> dict[str, Any]:
    try:
        with Path(path).open("rb") as file:
            data = tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"--config: no such file {path!r}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - set(OPTIONS))
    if unknown:
        raise ConfigError(
            f"--config: {path} has unknown key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(OPTIONS)}"
        )
    return data


def _from_file(name: str, raw: Any, path: str) -> Any:
    option = OPTIONS[name]
    where = f"{path}: {name}"
    if option.is_list and name != "shard":
        items = raw if isinstance(raw, list) else str(raw).split(",")
        return [_parse_one(option, str(item), where) for item in items]
    return _parse_one(option, str(raw), where)


def _parse(option: Option, raw: str, where: str) -> Any:
    if option.is_list and option.name != "shard":
        items = [item for item in raw.split(",") if item.strip()]
        if not items:
            raise ConfigError(f"{where}: empty; accepted: {option.accepts}")
        return [_parse_one(option, item, where) for item in items]
    return _parse_one(option, raw, where)


def _parse_one(option: Option, raw: str, where: str) -> Any:
    try:
        return option.parse(raw)
    except (ValueError, TypeError):
        raise ConfigError(
            f"{where}: {raw!r} is not accepted; expected {option.accepts}"
        ) from None


def _check(values: dict[str, Any]) -> None:
    if values["max_reconnect_delay"] < values["reconnect_delay"]:
        raise ConfigError(
            f"--max-reconnect-delay ({values['max_reconnect_delay']}) must be at least "
            f"--reconnect-delay ({values['reconnect_delay']})"
        )
    if not values["endpoint"]:
        raise ConfigError("--endpoint: at least one endpoint is needed")
    if values["rotate_after"] > 86_400:
        raise ConfigError(
            f"--rotate-after: {values['rotate_after']} is past Binance's 24 h "
            "(86400 s) connection lifetime; use at most 86400"
        )
    if values["streams_per_connection"] > 1024:
        raise ConfigError(
            f"--streams-per-connection: {values['streams_per_connection']} is over "
            "Binance's 1024 streams per connection"
        )
    values["symbols"] = list(dict.fromkeys(values["symbols"]))
    values["streams"] = list(dict.fromkeys(values["streams"]))
