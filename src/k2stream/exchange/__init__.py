"""A Binance-compatible exchange that runs in-process, for tests, demos and drills.

See docs/exchange.md for the configuration, the control API and how it
differs from Binance.
"""

from k2stream.exchange.config import ExchangeConfig
from k2stream.exchange.faults import Faults
from k2stream.exchange.market import AggTradeTruth, Market, SymbolSpec, TradeTruth
from k2stream.exchange.server import Exchange, ExchangeStats


__all__ = [
    "AggTradeTruth",
    "Exchange",
    "ExchangeConfig",
    "ExchangeStats",
    "Faults",
    "Market",
    "SymbolSpec",
    "TradeTruth",
]
