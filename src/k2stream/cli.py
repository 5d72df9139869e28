"""The ``k2stream`` command: run, demo, exchange, status, verify."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from k2stream import __version__
from k2stream.config import OPTIONS, ConfigError, add_arguments, resolve
from k2stream.observe.logs import configure


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        code: int = args.handler(args)
    except ConfigError as exc:
        print(f"k2stream {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="k2stream",
        description="Capture Binance trades completely and exactly once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"k2stream {__version__}"
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="stream, heal and deliver trades; serve metrics",
        description="Stream Binance trades into the sink. Flags win over K2_* environment "
        "variables, which win over the --config file.",
    )
    add_arguments(run)
    run.set_defaults(handler=_run)

    demo = commands.add_parser(
        "demo",
        help="run the pipeline against the bundled exchange, with scheduled faults",
        description="Start the bundled exchange on free loopback ports, run the service "
        "against it while faults are injected, then compare the store with the "
        "exchange's ground truth.",
    )
    add_arguments(
        demo, [n for n in OPTIONS if n not in ("endpoint", "rest_url", "rest_url_us")]
    )
    demo.add_argument(
        "--rate", type=float, default=200.0, help="trades per second per symbol"
    )
    demo.add_argument("--seed", type=int, default=7, help="seed of the market")
    demo.add_argument(
        "--faults",
        choices=("mix", "none"),
        default="mix",
        help="'mix' injects kill, freeze, refuse, serverShutdown, garbage and rotations",
    )
    demo.set_defaults(handler=_demo)

    exchange = commands.add_parser(
        "exchange",
        help="run the bundled Binance-compatible exchange alone",
        description="Serve a deterministic Binance-compatible market on loopback, "
        "with a fault-control API. Prints its URLs as one JSON line, then runs until stopped.",
    )
    exchange.add_argument(
        "--symbols", default="BTCUSDT,ETHUSDT", help="comma-separated symbols"
    )
    exchange.add_argument(
        "--rate", type=float, default=50.0, help="trades per second per symbol"
    )
    exchange.add_argument("--seed", type=int, default=7, help="seed of the market")
    exchange.add_argument("--host", default="127.0.0.1", help="address to bind")
    exchange.add_argument(
        "--ws-port",
        type=int,
        action="append",
        help="WebSocket port; repeat for more endpoints",
    )
    exchange.add_argument(
        "--endpoints", type=int, default=3, help="listeners when no --ws-port"
    )
    exchange.add_argument(
        "--rest-port", type=int, default=0, help="REST port (0: any free)"
    )
    exchange.add_argument(
        "--control-port", type=int, default=0, help="fault-control port"
    )
    exchange.add_argument(
        "--lifetime", type=float, default=86400.0, help="connection lifetime, s"
    )
    exchange.add_argument(
        "--ping-interval", type=float, default=20.0, help="server ping period, s"
    )
    exchange.set_defaults(handler=_exchange)

    status = commands.add_parser("status", help="show a running service's /status")
    status.add_argument(
        "url", nargs="?", default="http://127.0.0.1:9090", help="service base URL"
    )
    status.add_argument(
        "--watch", type=float, default=0.0, help="refresh every N seconds"
    )
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    status.set_defaults(handler=_status)

    verify = commands.add_parser(
        "verify",
        help="list missing id ranges in a store; --repair heals them from REST",
    )
    verify.add_argument(
        "--sink", default="sqlite:///data/trades.db", help="a sqlite:/// store"
    )
    verify.add_argument(
        "--symbols", default=None, help="only these symbols (comma-separated)"
    )
    verify.add_argument(
        "--repair", action="store_true", help="fetch the missing ids from REST"
    )
    verify.add_argument(
        "--rest-url", default="https://api.binance.com", help="REST base URL"
    )
    verify.add_argument(
        "--rest-url-us", default="https://api.binance.us", help="Binance.US REST"
    )
    verify.set_defaults(handler=_verify)
    return parser


def _run(args: argparse.Namespace) -> int:
    settings = resolve(vars(args))
    configure(settings.log_format, settings.log_level)

    from k2stream.service import Service

    return asyncio.run(Service(settings).run())


def _demo(args: argparse.Namespace) -> int:
    from k2stream.demo import run_demo

    return asyncio.run(run_demo(args))


def _exchange(args: argparse.Namespace) -> int:
    from k2stream.demo import run_exchange

    return asyncio.run(run_exchange(args))


def _status(args: argparse.Namespace) -> int:
    from k2stream.observe.view import show_status

    return asyncio.run(show_status(args.url, watch=args.watch, raw=args.json))


def _verify(args: argparse.Namespace) -> int:
    from k2stream.verify import run_verify

    return asyncio.run(run_verify(args))
