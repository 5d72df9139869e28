"""Binance payloads to :class:`~k2stream.records.Trade` records.

Base and quote assets come from ``/api/v3/exchangeInfo``: symbols such as
``BTCUSDC`` or ``WBTCBTC`` cannot be split reliably by guessing at a suffix.
"""

from __future__ import annotations

from dataclasses import dataclass

from k2stream.binance.messages import AggTradeEvent, RestAggTrade, RestTrade, TradeEvent
from k2stream.records import AGG_TRADE, SOURCE_REST, SOURCE_WS, TRADE, Trade


@dataclass(frozen=True, slots=True)
class SymbolInfo:
    """What exchangeInfo says about one symbol."""

    symbol: str
    status: str
    base_asset: str
    quote_asset: str

    @property
    def trading(self) -> bool:
        return self.status == "TRADING"


class Normalizer:
    """Turns one venue's payloads into trades for the configured symbols."""

    def __init__(self, exchange: str, symbols: dict[str, SymbolInfo]) -> None:
        self.exchange = exchange
        self._assets = {
            name: (info.base_asset, info.quote_asset) for name, info in symbols.items()
        }

    def knows(self, symbol: str) -> bool:
        return symbol in self._assets

    def from_trade_event(
        self, event: TradeEvent, endpoint: str, received_us: int
    ) -> Trade:
        base, quote = self._assets[event.symbol]
        return Trade(
            self.exchange,
            event.symbol,
            TRADE,
            event.id,
            event.price,
            event.quantity,
            event.trade_time,
            event.event_time,
            event.buyer_is_maker,
            event.best_match,
            base,
            quote,
            SOURCE_WS,
            endpoint,
            received_us,
        )

    def from_agg_event(
        self, event: AggTradeEvent, endpoint: str, received_us: int
    ) -> Trade:
        base, quote = self._assets[event.symbol]
        return Trade(
            self.exchange,
            event.symbol,
            AGG_TRADE,
            event.id,
            event.price,
            event.quantity,
            event.trade_time,
            event.event_time,
            event.buyer_is_maker,
            event.best_match,
            base,
            quote,
            SOURCE_WS,
            endpoint,
            received_us,
            event.first_trade_id,
            event.last_trade_id,
        )

    def from_rest_trade(
        self, symbol: str, item: RestTrade, endpoint: str, received_us: int
    ) -> Trade:
        """A backfilled trade; REST has no event time, so the trade time stands in."""
        base, quote = self._assets[symbol]
        return Trade(
            self.exchange,
            symbol,
            TRADE,
            item.id,
            item.price,
            item.qty,
            item.time,
            item.time,
            item.isBuyerMaker,
            item.isBestMatch,
            base,
            quote,
            SOURCE_REST,
            endpoint,
            received_us,
        )

    def from_rest_agg(
        self, symbol: str, item: RestAggTrade, endpoint: str, received_us: int
    ) -> Trade:
        base, quote = self._assets[symbol]
        return Trade(
            self.exchange,
            symbol,
            AGG_TRADE,
            item.id,
            item.price,
            item.quantity,
            item.trade_time,
            item.trade_time,
            item.buyer_is_maker,
            item.best_match,
            base,
            quote,
            SOURCE_REST,
            endpoint,
            received_us,
            item.first_trade_id,
            item.last_trade_id,
        )
