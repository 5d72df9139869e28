"""Decoding Binance frames."""

import pytest

from k2stream.binance.messages import (
    AggTradeEvent,
    Envelope,
    MalformedFrame,
    Reply,
    ServerShutdown,
    TradeEvent,
    decode,
)


TRADE = (
    b'{"stream":"btcusdt@trade","data":{"e":"trade","E":1624832253279,"s":"BTCUSDT",'
    b'"t":935421409,"p":"34188.03000000","q":"0.01200000","T":1624832253271,'
    b'"m":false,"M":true}}'
)


def test_a_trade_event_decodes_into_a_typed_record():
    """A combined-stream trade keeps its exact price and quantity strings."""
    message = decode(TRADE)

    assert isinstance(message, Envelope)
    assert isinstance(message.data, TradeEvent)
    assert 935421409 == message.data.id
    assert "34188.03000000" == message.data.price
    assert not message.data.buyer_is_maker


def test_an_agg_trade_event_carries_its_trade_range():
    """An aggTrade event decodes with its first and last trade ids."""
    frame = (
        b'{"stream":"bnbbtc@aggTrade","data":{"e":"aggTrade","E":1,"s":"BNBBTC","a":12,'
        b'"p":"0.001","q":"100","f":100,"l":105,"T":1,"m":true,"M":true}}'
    )
    data = decode(frame)

    assert isinstance(data, Envelope) and isinstance(data.data, AggTradeEvent)
    assert (100, 105) == (data.data.first_trade_id, data.data.last_trade_id)


def test_server_shutdown_is_recognised():
    """The combined serverShutdown event decodes as such."""
    message = decode(
        b'{"stream":"!serverShutdown","data":{"e":"serverShutdown","E":5}}'
    )

    assert isinstance(message, Envelope) and isinstance(message.data, ServerShutdown)


def test_replies_and_nested_errors_decode():
    """Control replies decode, including Binance's nested error objects."""
    ok = decode(b'{"result":["btcusdt@trade"],"id":3}')
    error = decode(
        b'{"error":{"code":2,"msg":"Invalid request: invalid stream"},"id":2}'
    )

    assert isinstance(ok, Reply) and ["btcusdt@trade"] == ok.result
    assert (
        isinstance(error, Reply) and error.error is not None and 2 == error.error.code
    )


@pytest.mark.parametrize(
    "frame",
    [
        b"not json",
        b'{"stream":"btcusdt@trade","data":{"e":"trade","E":1}}',
        b'{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"X","t":"x",'
        b'"p":"1","q":"1","T":1,"m":false}}',
        b'{"stream":"btcusdt@trade","data":{"e":"trade","E":1,"s":"BTCUSDT","t":1,"p":"1",',
        b"[1,2,3]",
    ],
)
def test_malformed_frames_raise_with_a_sample(frame):
    """Invalid JSON, missing fields, wrong types and truncation are all malformed."""
    with pytest.raises(MalformedFrame) as caught:
        decode(frame)

    assert caught.value.frame == frame
    assert "malformed frame" in str(caught.value)
