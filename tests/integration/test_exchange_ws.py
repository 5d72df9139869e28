"""The bundled exchange's WebSocket side, seen by a real aiohttp client on loopback."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from k2stream.exchange import Exchange, SymbolSpec


SYMBOLS = (
    SymbolSpec(
        "BTCUSDT",
        base="BTC",
        quote="USDT",
        rate=200.0,
        price="50000.00",
        first_id=1_000_000,
        first_agg_id=500_000,
    ),
    SymbolSpec("ETHUSDT", base="ETH", quote="USDT", rate=100.0, price="3000.00"),
    SymbolSpec("XRPUSDT", base="XRP", quote="USDT", price="0.5000", status="BREAK"),
)

StartExchange = Callable[..., Awaitable[Exchange]]


async def events(
    ws: aiohttp.ClientWebSocketResponse, count: int, within: float = 3.0
) -> list[Any]:
    """The next ``count`` text messages, decoded; pings and pongs are skipped."""
    received: list[Any] = []
    async with asyncio.timeout(within):
        while len(received) < count:
            message = await ws.receive()
            if message.type in (aiohttp.WSMsgType.PING, aiohttp.WSMsgType.PONG):
                continue
            assert message.type is aiohttp.WSMsgType.TEXT, message
            received.append(json.loads(message.data))
    return received


async def reply(ws: aiohttp.ClientWebSocketResponse, request: dict[str, Any]) -> Any:
    """Send a control message and return the reply, skipping data events."""
    await ws.send_str(json.dumps(request))
    async with asyncio.timeout(3.0):
        while True:
            message = await ws.receive()
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            body = json.loads(message.data)
            if "result" in body or "error" in body:
                return body


async def closed(
    ws: aiohttp.ClientWebSocketResponse, within: float
) -> aiohttp.WSMessage:
    """Read until the server ends the connection; return the ending message."""
    async with asyncio.timeout(within):
        while True:
            message = await ws.receive()
            if message.type in (
                aiohttp.WSMsgType.CLOSE,
                aiohttp.WSMsgType.CLOSED,
                aiohttp.WSMsgType.ERROR,
            ):
                return message


async def wait_until(condition: Callable[[], bool], within: float) -> None:
    """Poll ``condition`` every 20 ms until it holds; fail after ``within`` s."""
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition still false after {within} s")


def assert_trade_matches_truth(
    exchange: Exchange, event: dict[str, Any], unit: int
) -> None:
    truth = exchange.market.trade(event["s"], event["t"])
    assert event == {
        "e": "trade",
        "E": truth.event_time_us // unit,
        "s": truth.symbol,
        "t": truth.id,
        "p": truth.price,
        "q": truth.quantity,
        "T": truth.trade_time_us // unit,
        "m": truth.buyer_is_maker,
        "M": True,
    }


class TestStreams:
    async def test_raw_trade_stream_matches_ground_truth(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """/ws/<symbol>@trade delivers raw trade events equal to the ground truth."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            received = await events(ws, 60)

        ids = [e["t"] for e in received]
        assert ids == list(range(ids[0], ids[0] + 60))
        for event in received:
            assert_trade_matches_truth(exchange, event, unit=1000)

    async def test_combined_multi_symbol_stream_matches_ground_truth(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """/stream wraps each event with its stream; every stream is gap-free and true."""
        exchange = await start_exchange()
        url = exchange.ws_urls[1] + (
            "/stream?streams=btcusdt@trade/ethusdt@trade/btcusdt@aggTrade"
        )

        async with session.ws_connect(url) as ws:
            received = await events(ws, 300)

        by_stream: dict[str, list[dict[str, Any]]] = {}
        for envelope in received:
            by_stream.setdefault(envelope["stream"], []).append(envelope["data"])
        assert set(by_stream) == {"btcusdt@trade", "ethusdt@trade", "btcusdt@aggTrade"}

        for name in ("btcusdt@trade", "ethusdt@trade"):
            trades = by_stream[name]
            assert [t["t"] for t in trades] == list(
                range(trades[0]["t"], trades[0]["t"] + len(trades))
            )
            for event in trades:
                assert_trade_matches_truth(exchange, event, unit=1000)

        aggs = by_stream["btcusdt@aggTrade"]
        for before, after in zip(aggs, aggs[1:], strict=False):
            assert after["a"] == before["a"] + 1
            assert after["f"] == before["l"] + 1
        for event in aggs:
            truth = exchange.market.agg_trade("BTCUSDT", event["a"])
            assert (event["p"], event["q"], event["f"], event["l"], event["T"]) == (
                truth.price,
                truth.quantity,
                truth.first_trade_id,
                truth.last_trade_id,
                truth.trade_time_us // 1000,
            )

    @pytest.mark.parametrize(
        "suffix",
        [
            "/ws/btcusdt@trade?timeUnit=MICROSECOND",
            "/stream?streams=btcusdt@trade&timeUnit=microsecond",
        ],
    )
    async def test_time_unit_microsecond_gives_microsecond_times(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession, suffix: str
    ) -> None:
        """timeUnit=MICROSECOND (either case) makes E and T microseconds."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + suffix) as ws:
            received = await events(ws, 10)

        for message in received:
            event = message.get("data", message)
            assert event["T"] > 10**15
            assert_trade_matches_truth(exchange, event, unit=1)

    async def test_unknown_symbol_in_url_is_silent(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A stream for an unlisted or halted symbol connects and sends nothing."""
        exchange = await start_exchange()
        url = exchange.ws_urls[0] + "/stream?streams=dogeusdt@trade/xrpusdt@trade"

        async with session.ws_connect(url) as ws:
            with pytest.raises(TimeoutError):
                await events(ws, 1, within=0.3)
            listed = await reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 1})

        assert listed == {"result": ["dogeusdt@trade", "xrpusdt@trade"], "id": 1}

    async def test_malformed_stream_in_url_is_refused(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A URL stream that is not <symbol>@trade or @aggTrade fails the handshake."""
        exchange = await start_exchange()

        with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
            await session.ws_connect(exchange.ws_urls[0] + "/ws/BTCUSDT@depth")

        assert caught.value.status == 400


class TestControlMessages:
    async def test_subscribe_list_unsubscribe(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """SUBSCRIBE starts data, LIST_SUBSCRIPTIONS names it, UNSUBSCRIBE ends it."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws") as ws:
            subscribed = await reply(
                ws, {"method": "SUBSCRIBE", "params": ["ethusdt@trade"], "id": 1}
            )
            first = await events(ws, 3)
            listed = await reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": "abc"})
            unsubscribed = await reply(
                ws, {"method": "UNSUBSCRIBE", "params": ["ethusdt@trade"], "id": 3}
            )

        assert subscribed == {"result": None, "id": 1}
        assert [e["s"] for e in first] == ["ETHUSDT"] * 3
        assert listed == {"result": ["ethusdt@trade"], "id": "abc"}
        assert unsubscribed == {"result": None, "id": 3}

    async def test_unsubscribed_connection_goes_quiet(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """After UNSUBSCRIBE no further data event arrives."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            await events(ws, 2)
            await reply(
                ws, {"method": "UNSUBSCRIBE", "params": ["btcusdt@trade"], "id": 1}
            )
            with pytest.raises(TimeoutError):
                await events(ws, 1, within=0.3)

    async def test_set_property_combined_wraps_events(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """combined is false on /ws; SET_PROPERTY true wraps later events."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            before = await reply(
                ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": 1}
            )
            changed = await reply(
                ws, {"method": "SET_PROPERTY", "params": ["combined", True], "id": 2}
            )
            after = await reply(
                ws, {"method": "GET_PROPERTY", "params": ["combined"], "id": 3}
            )
            wrapped = await events(ws, 3)

        assert before == {"result": False, "id": 1}
        assert changed == {"result": None, "id": 2}
        assert after == {"result": True, "id": 3}
        assert [e["stream"] for e in wrapped] == ["btcusdt@trade"] * 3

    @pytest.mark.parametrize(
        ("request_text", "code", "message"),
        [
            (
                '{"method":"SUBSCRIBE","params":["btcusdt@depth"],"id":7}',
                2,
                "Invalid request: invalid stream",
            ),
            (
                '{"method":"SUBSCRIBE","params":["BTCUSDT@trade"],"id":7}',
                2,
                "Invalid request: invalid stream",
            ),
            (
                '{"method":"SUBSCRIBE","params":[5],"id":7}',
                2,
                "Invalid request: invalid stream",
            ),
            (
                '{"method":"SET_PROPERTY","params":["colour",true],"id":7}',
                0,
                "Unknown property",
            ),
            (
                '{"method":"SET_PROPERTY","params":["combined","yes"],"id":7}',
                1,
                "Invalid value type: expected Boolean",
            ),
            (
                '{"method":"GET_PROPERTY","params":[1],"id":7}',
                2,
                "Invalid request: property name must be a string",
            ),
            (
                '{"method":"GET_PROPERTY","params":["combined","x"],"id":7}',
                2,
                "Invalid request: too many parameters",
            ),
            (
                '{"method":"PUBLISH","id":7}',
                2,
                "Invalid request: unknown variant `PUBLISH`",
            ),
            ('{"params":[],"id":7}', 2, "Invalid request: missing field `method`"),
        ],
    )
    async def test_bad_requests_get_binance_errors(
        self,
        start_exchange: StartExchange,
        session: aiohttp.ClientSession,
        request_text: str,
        code: int,
        message: str,
    ) -> None:
        """Each malformed request gets Binance's nested error with its code and the id."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws") as ws:
            await ws.send_str(request_text)
            answer = json.loads(await ws.receive_str(timeout=2.0))

        assert answer["id"] == 7
        assert answer["error"]["code"] == code
        assert answer["error"]["msg"].startswith(message)

    @pytest.mark.parametrize(
        ("request_text", "code", "message"),
        [
            ("{not json", 3, "Invalid JSON: expected value at line 1 column"),
            (
                '{"method":"LIST_SUBSCRIPTIONS","id":true}',
                2,
                "Invalid request: request ID",
            ),
            (
                '{"method":"LIST_SUBSCRIPTIONS","id":"has-dash"}',
                2,
                "Invalid request: request ID",
            ),
        ],
    )
    async def test_unreadable_requests_get_errors_without_id(
        self,
        start_exchange: StartExchange,
        session: aiohttp.ClientSession,
        request_text: str,
        code: int,
        message: str,
    ) -> None:
        """Bad JSON or a bad id gets an error whose id is null."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws") as ws:
            await ws.send_str(request_text)
            answer = json.loads(await ws.receive_str(timeout=2.0))

        assert answer["id"] is None
        assert answer["error"]["code"] == code
        assert answer["error"]["msg"].startswith(message)

    async def test_too_many_subscriptions_is_error_code_4(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """Subscribing past max_streams gets code 4 and subscribes nothing."""
        exchange = await start_exchange(max_streams=3)
        names = [
            "btcusdt@trade",
            "ethusdt@trade",
            "btcusdt@aggTrade",
            "ethusdt@aggTrade",
        ]

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            refused = await reply(ws, {"method": "SUBSCRIBE", "params": names, "id": 9})
            listed = await reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 10})

        assert refused == {
            "error": {"code": 4, "msg": "Too many subscriptions"},
            "id": 9,
        }
        assert listed == {"result": ["btcusdt@trade"], "id": 10}

    async def test_oversized_control_frame_gets_no_answer(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A SUBSCRIBE over 4096 bytes is ignored without a reply, as on Binance."""
        exchange = await start_exchange()
        names = [f"sym{n:05d}usdt@aggTrade" for n in range(250)]

        async with session.ws_connect(exchange.ws_urls[0] + "/ws") as ws:
            await ws.send_str(
                json.dumps({"method": "SUBSCRIBE", "params": names, "id": 1})
            )
            with pytest.raises(TimeoutError):
                await ws.receive(timeout=0.3)
            listed = await reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": 2})

        assert listed == {"result": [], "id": 2}


class TestConnectionRules:
    async def test_server_pings_carry_a_millisecond_timestamp(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """Server pings come every ping_interval with the time in ms as ASCII."""
        exchange = await start_exchange(ping_interval=0.2)

        async with session.ws_connect(
            exchange.ws_urls[0] + "/ws", autoping=False
        ) as ws:
            started = time.monotonic()
            message = await ws.receive(timeout=2.0)
            waited = time.monotonic() - started
            await ws.pong(message.data)

        assert message.type is aiohttp.WSMsgType.PING
        assert 0.1 < waited < 1.0
        assert message.data.isdigit() and len(message.data) == 13
        assert abs(int(message.data) - time.time() * 1000) < 5_000

    async def test_no_pong_closes_the_connection(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A client that never answers pings is closed after pong_timeout."""
        exchange = await start_exchange(ping_interval=0.2, pong_timeout=0.5)

        async with session.ws_connect(
            exchange.ws_urls[0] + "/ws", autoping=False
        ) as ws:
            started = time.monotonic()
            end = await closed(ws, within=3.0)
            waited = time.monotonic() - started

        assert end.type is aiohttp.WSMsgType.CLOSE
        assert (end.data, end.extra) == (1008, "Pong timeout")
        assert 0.6 < waited < 2.0

    async def test_answering_pings_keeps_the_connection(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A client that answers every ping stays connected past pong_timeout."""
        exchange = await start_exchange(ping_interval=0.3, pong_timeout=0.5)

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            received = await events(ws, 1)
            await asyncio.sleep(1.2)

            assert not ws.closed
        assert received

    async def test_client_ping_is_answered_with_its_payload(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A client ping gets a pong that echoes its payload."""
        exchange = await start_exchange()

        async with session.ws_connect(
            exchange.ws_urls[0] + "/ws", autoping=False
        ) as ws:
            await ws.ping(b"are you there")
            message = await ws.receive(timeout=2.0)

        assert message.type is aiohttp.WSMsgType.PONG
        assert message.data == b"are you there"

    async def test_five_messages_in_a_second_are_allowed(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """Five control messages in one second are all answered."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws") as ws:
            answers = [
                await reply(ws, {"method": "LIST_SUBSCRIPTIONS", "id": n})
                for n in range(5)
            ]
            assert not ws.closed

        assert [a["id"] for a in answers] == [0, 1, 2, 3, 4]

    async def test_six_messages_in_a_second_close_1008(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A sixth incoming frame within one second closes with 1008 Too many requests."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws") as ws:
            for n in range(5):
                await ws.send_str(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": n}))
            await ws.ping(b"one too many")
            end = await closed(ws, within=2.0)

        assert end.type is aiohttp.WSMsgType.CLOSE
        assert (end.data, end.extra) == (1008, "Too many requests")

    async def test_lifetime_cap_closes_the_connection(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A connection is closed with 1001 once its lifetime is over."""
        exchange = await start_exchange(lifetime=1.0)

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            started = time.monotonic()
            end = await closed(ws, within=3.0)
            waited = time.monotonic() - started

        assert end.type is aiohttp.WSMsgType.CLOSE
        assert end.data == 1001
        assert 0.8 < waited < 2.0

    async def test_reader_that_falls_behind_is_disconnected(
        self, start_exchange: StartExchange
    ) -> None:
        """A client that stops reading is dropped once max_send_buffer is exceeded."""
        fast = SymbolSpec("BTCUSDT", base="BTC", quote="USDT", rate=20_000.0)
        exchange = await start_exchange(
            symbols=(fast,), max_send_buffer=64 * 1024, close_timeout=0.3
        )
        host, port = exchange.ws_urls[0].removeprefix("ws://").split(":")

        # A raw socket with a tiny receive buffer that never reads.
        reader, writer = await asyncio.open_connection(host, int(port), limit=1024)
        try:
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            writer.write(
                b"GET /ws/btcusdt@trade HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"Sec-WebSocket-Version: 13\r\n\r\n"
            )
            await writer.drain()
            await wait_until(
                lambda: (
                    exchange.stats.accepted[0] == 1
                    and exchange.stats.connections[0] == 0
                ),
                within=5.0,
            )
        finally:
            writer.close()
            await writer.wait_closed()

        assert exchange.stats.accepted[0] == 1
        assert exchange.stats.connections[0] == 0


class TestLifecycle:
    async def test_stop_closes_clients_with_1001_and_is_idempotent(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """stop() closes every connection with 1001 and may be called twice."""
        exchange = await start_exchange()
        sockets = [
            await session.ws_connect(url + "/ws/btcusdt@trade")
            for url in exchange.ws_urls
        ]

        await exchange.stop()
        await exchange.stop()
        ends = [await closed(ws, within=2.0) for ws in sockets]

        assert [(end.type, end.data) for end in ends] == [
            (aiohttp.WSMsgType.CLOSE, 1001)
        ] * 2
        assert not exchange.market.running

    async def test_a_stopped_exchange_cannot_restart(
        self, start_exchange: StartExchange
    ) -> None:
        """start() after stop() fails and says to make a new exchange."""
        exchange = await start_exchange()
        await exchange.stop()

        with pytest.raises(RuntimeError, match="create a new one"):
            await exchange.start()

    async def test_handshake_during_stop_is_closed_or_refused(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """A client connecting while the exchange stops is refused or closed, never left open."""
        exchange = await start_exchange()

        connecting = asyncio.ensure_future(
            session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade")
        )
        await wait_until(lambda: exchange.stats.handshakes[0] == 1, within=2.0)
        await exchange.stop()
        try:
            ws = await connecting
        except (aiohttp.WSServerHandshakeError, aiohttp.ClientConnectionError):
            return
        end = await closed(ws, within=2.0)
        assert end.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert exchange.stats.connections == [0, 0]
