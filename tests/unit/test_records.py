"""The Trade record and its K2 TradeV2 shape."""

import uuid

from k2stream.records import AGG_TRADE, TRADE, Trade, message_id, to_trade_v2, trade_id


def make(stream: str = TRADE, maker: bool = False, **extra) -> Trade:
    return Trade(
        "BINANCE",
        "BTCUSDT",
        stream,
        935421409,
        "34188.03000000",
        "0.01200000",
        1624832253271000,
        1624832253279000,
        maker,
        True,
        "BTC",
        "USDT",
        "ws",
        "stream.binance.com:9443",
        1624832253280000,
        **extra,
    )


def test_message_id_is_the_rfc_4122_name_based_uuid():
    """message_id equals uuid5 over the trade's identity, and is the same on replay."""
    namespace = uuid.UUID("6f1d3c2a-5b0e-4e8f-9a47-2d1f0c9b7e31")
    for id_ in (0, 1, 935421409, 2**62):
        expected = str(uuid.uuid5(namespace, f"BINANCE:BTCUSDT:trade:{id_}"))
        assert expected == message_id("BINANCE", "BTCUSDT", "trade", id_)


def test_trade_v2_fields_follow_the_k2_schema():
    """The TradeV2 record has K2's field names, exact decimals and the taker's side."""
    record = to_trade_v2(make())

    assert "BINANCE-935421409" == record["trade_id"]
    assert "34188.03000000" == record["price"]
    assert "BUY" == record["side"]
    assert "USDT" == record["currency"]
    assert 1624832253271000 == record["timestamp"]
    assert 935421409 == record["source_sequence"]
    assert "BTC" == record["vendor_data"]["base_asset"]
    assert {
        "source": "ws",
        "endpoint": "stream.binance.com:9443",
    }.items() <= record.items()


def test_a_maker_buyer_means_the_taker_sold():
    """Binance's m=true (buyer was maker) is a SELL by the taker."""
    assert "SELL" == to_trade_v2(make(maker=True))["side"]


def test_agg_trades_have_their_own_trade_id_space():
    """An aggTrade id never collides with a trade id in trade_id or message_id."""
    agg = make(AGG_TRADE, first_trade_id=1, last_trade_id=3)

    assert "BINANCE-A935421409" == trade_id(agg)
    assert to_trade_v2(agg)["message_id"] != to_trade_v2(make())["message_id"]
    assert "3" == to_trade_v2(agg)["vendor_data"]["last_trade_id"]
