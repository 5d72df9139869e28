"""Fault injection, observed the way a client observes it: over real sockets."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from k2stream.exchange import Exchange, SymbolSpec


SYMBOLS = (
    SymbolSpec("BTCUSDT", base="BTC", quote="USDT", rate=200.0, price="50000.00"),
    SymbolSpec("ETHUSDT", base="ETH", quote="USDT", rate=100.0, price="3000.00"),
)

StartExchange = Callable[..., Awaitable[Exchange]]
TEXT = aiohttp.WSMsgType.TEXT
ENDINGS = (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


async def collect(
    ws: aiohttp.ClientWebSocketResponse, seconds: float, *, answer_pings: bool = False
) -> list[aiohttp.WSMessage]:
    """Every message (data, pings, endings) that arrives within ``seconds``."""
    messages: list[aiohttp.WSMessage] = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            message = await ws.receive(timeout=left)
        except TimeoutError:
            break
        messages.append(message)
        if message.type in ENDINGS:
            break
        if answer_pings and message.type is aiohttp.WSMsgType.PING:
            await ws.pong(message.data)
    return messages


async def ending(
    ws: aiohttp.ClientWebSocketResponse, within: float = 3.0
) -> aiohttp.WSMessage:
    """Read until the connection ends; return the message that ended it."""
    async with asyncio.timeout(within):
        while True:
            message = await ws.receive()
            if message.type in ENDINGS:
                return message


def texts(messages: list[aiohttp.WSMessage]) -> list[Any]:
    return [json.loads(m.data) for m in messages if m.type is TEXT]


async def wait_until(condition: Callable[[], bool], within: float = 3.0) -> None:
    """Poll ``condition`` every 20 ms until it holds; fail after ``within`` s."""
    for _ in range(int(within / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition still false after {within} s")


class TestDisconnects:
    async def test_kill_drops_tcp_without_a_close_frame(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """kill() aborts the connection: no CLOSE frame, the client sees 1006."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            await ws.receive(timeout=2.0)
            killed = exchange.faults.kill()
            end = await ending(ws)

        assert killed == 1
        assert end.type is not aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1006

    async def test_kill_of_one_endpoint_spares_the_other(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """kill(endpoint=0) ends only endpoint 0's connections."""
        exchange = await start_exchange()
        first = await session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade")
        second = await session.ws_connect(exchange.ws_urls[1] + "/ws/btcusdt@trade")
        await wait_until(lambda: exchange.stats.connections == [1, 1])

        exchange.faults.kill(endpoint=0)
        first_end = await ending(first)
        still_flowing = texts(await collect(second, 0.3))
        await second.close()

        assert first_end.type is not aiohttp.WSMsgType.CLOSE
        assert still_flowing

    async def test_kill_without_endpoint_hits_all(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """kill() with no endpoint ends the connections of every endpoint."""
        exchange = await start_exchange()
        sockets = [
            await session.ws_connect(url + "/ws/btcusdt@trade")
            for url in exchange.ws_urls
        ]
        await wait_until(lambda: exchange.stats.connections == [1, 1])

        exchange.faults.kill()
        ends = [await ending(ws) for ws in sockets]

        assert all(end.type is not aiohttp.WSMsgType.CLOSE for end in ends)
        assert [ws.close_code for ws in sockets] == [1006, 1006]

    async def test_close_sends_the_given_code_and_reason(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """close(code, reason) sends exactly that close frame."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[1] + "/ws/btcusdt@trade") as ws:
            await ws.receive(timeout=2.0)
            exchange.faults.close(code=4000, reason="maintenance", endpoint=1)
            end = await ending(ws)

        assert (end.type, end.data, end.extra) == (
            aiohttp.WSMsgType.CLOSE,
            4000,
            "maintenance",
        )

    @pytest.mark.parametrize(
        ("path", "expected"),
        [
            ("/ws/btcusdt@trade", {"e": "serverShutdown"}),
            (
                "/stream?streams=btcusdt@trade",
                {"stream": "!serverShutdown", "data": {"e": "serverShutdown"}},
            ),
        ],
    )
    async def test_shutdown_sends_server_shutdown_then_closes(
        self,
        start_exchange: StartExchange,
        session: aiohttp.ClientSession,
        path: str,
        expected: dict[str, Any],
    ) -> None:
        """shutdown() sends serverShutdown (raw or in its envelope), then closes 1001."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + path) as ws:
            await ws.receive(timeout=2.0)
            exchange.faults.shutdown()
            messages = await collect(ws, 2.0)

        last_text = texts(messages)[-1]
        event = last_text.get("data", last_text)
        assert abs(event.pop("E") - time.time() * 1000) < 5_000
        assert last_text == expected
        assert (messages[-1].type, messages[-1].data) == (aiohttp.WSMsgType.CLOSE, 1001)


class TestSilence:
    async def test_freeze_stops_data_but_not_pings(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """freeze() silences data while pings still come and get answered."""
        exchange = await start_exchange(ping_interval=0.3, pong_timeout=1.0)

        async with session.ws_connect(
            exchange.ws_urls[0] + "/ws/btcusdt@trade", autoping=False
        ) as ws:
            await ws.receive(timeout=2.0)
            exchange.faults.freeze(1.0, endpoint=0)
            await collect(ws, 0.05, answer_pings=True)
            during = await collect(ws, 0.7, answer_pings=True)
            await ws.ping(b"still there?")
            answers = await collect(ws, 0.1, answer_pings=True)
            await asyncio.sleep(0.2)
            after = await collect(ws, 0.3, answer_pings=True)
            open_after = not ws.closed

        assert texts(during) == []
        assert any(m.type is aiohttp.WSMsgType.PING for m in during)
        assert (aiohttp.WSMsgType.PONG, b"still there?") in [
            (m.type, m.data) for m in answers
        ]
        assert texts(after)
        assert open_after

    async def test_stall_sends_nothing_and_answers_nothing(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """stall() keeps the socket open with no data, no pings and no pongs."""
        exchange = await start_exchange(ping_interval=0.15)

        async with session.ws_connect(
            exchange.ws_urls[0] + "/ws/btcusdt@trade", autoping=False
        ) as ws:
            await ws.receive(timeout=2.0)
            exchange.faults.stall(0.8)
            await collect(ws, 0.05)
            await ws.ping(b"hello?")
            during = await collect(ws, 0.5)
            open_during = not ws.closed
            await asyncio.sleep(0.3)
            after = await collect(ws, 0.4)

        assert during == []
        assert open_during
        assert texts(after)

    async def test_data_lost_in_a_freeze_is_gone_from_the_stream(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """After a freeze the stream resumes at the live id: the gap is for REST."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            before = texts(await collect(ws, 0.2))
            exchange.faults.freeze(0.3)
            await asyncio.sleep(0.4)
            after = texts(await collect(ws, 0.2))

        ids = [e["t"] for e in before + after]
        jumps = [b - a for a, b in zip(ids, ids[1:], strict=False)]
        assert ids == sorted(ids)
        assert max(jumps) > 20


class TestHandshakes:
    async def test_refuse_rejects_handshakes_with_503(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """refuse() answers handshakes with 503 until it ends."""
        exchange = await start_exchange()
        exchange.faults.refuse(0.4, endpoint=0)

        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade")
        other = await session.ws_connect(exchange.ws_urls[1] + "/ws/btcusdt@trade")
        await other.close()
        await asyncio.sleep(0.5)
        later = await session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade")
        await later.close()

        assert refused.value.status == 503
        assert exchange.stats.handshakes == [2, 1]
        assert exchange.stats.accepted == [1, 1]

    async def test_ratelimit_answers_429_with_retry_after(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """ratelimit() answers handshakes with 429 and the given Retry-After."""
        exchange = await start_exchange()
        exchange.faults.ratelimit(5.0, retry_after=7)

        async with session.get(
            exchange.ws_urls[1].replace("ws:", "http:") + "/ws"
        ) as r:
            status, retry_after = r.status, r.headers.get("Retry-After")

        assert (status, retry_after) == (429, "7")

    async def test_ban_answers_418_with_the_time_left(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """ban() answers handshakes with 418 and Retry-After until the ban ends."""
        exchange = await start_exchange()
        exchange.faults.ban(30.0, endpoint=0)

        with pytest.raises(aiohttp.WSServerHandshakeError) as banned:
            await session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade")
        async with session.get(
            exchange.ws_urls[0].replace("ws:", "http:") + "/ws"
        ) as r:
            retry_after = r.headers.get("Retry-After")

        assert banned.value.status == 418
        assert retry_after == "30"

    async def test_too_many_attempts_get_429(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """Past handshake_limit attempts in the window, handshakes get 429."""
        exchange = await start_exchange(handshake_limit=3, handshake_window=0.5)
        url = exchange.ws_urls[0] + "/ws"

        for _ in range(3):
            await (await session.ws_connect(url)).close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as limited:
            await session.ws_connect(url)
        await asyncio.sleep(0.6)
        await (await session.ws_connect(url)).close()

        assert limited.value.status == 429
        assert limited.value.headers is not None
        assert limited.value.headers["Retry-After"] == "1"
        assert exchange.stats.handshakes[0] == 5
        assert exchange.stats.accepted[0] == 4

    async def test_clear_ends_faults_at_once(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """clear() lifts a refusal before its time."""
        exchange = await start_exchange()
        exchange.faults.refuse(60.0)

        exchange.faults.clear()
        ws = await session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade")
        await ws.close()

        assert exchange.stats.accepted[0] == 1


class TestBadData:
    async def test_garbage_interleaves_malformed_frames(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """garbage(n) inserts n malformed frames; valid data goes on with no gap."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            await ws.receive(timeout=2.0)
            exchange.faults.garbage(3, endpoint=0)
            messages = await collect(ws, 0.5)

        valid, malformed = [], []
        for message in messages:
            try:
                event = json.loads(message.data)
                assert isinstance(event["t"], int) and isinstance(event["p"], str)
                valid.append(event)
            except (ValueError, KeyError, AssertionError):
                malformed.append(message.data)

        assert len(malformed) == 3
        ids = [e["t"] for e in valid]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert len(ids) > 20

    async def test_garbage_with_no_connection_waits_for_the_next(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """garbage(n) on an idle endpoint goes to the next connection."""
        exchange = await start_exchange()
        exchange.faults.garbage(2, endpoint=1)

        async with session.ws_connect(
            exchange.ws_urls[1] + "/stream?streams=btcusdt@trade"
        ) as ws:
            messages = await collect(ws, 0.4)

        malformed = 0
        for message in messages:
            try:
                assert isinstance(json.loads(message.data)["data"]["t"], int)
            except (ValueError, KeyError, TypeError, AssertionError):
                malformed += 1
        assert malformed == 2

    async def test_slow_throttles_without_losing_data(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """slow() caps the message rate; what waits is sent afterwards, in order."""
        exchange = await start_exchange()

        async with session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade") as ws:
            await ws.receive(timeout=2.0)
            exchange.faults.slow(0.6, messages_per_second=20)
            during = texts(await collect(ws, 0.5))
            after = texts(await collect(ws, 0.5))

        assert len(during) <= 20
        ids = [e["t"] for e in during + after]
        assert ids == list(range(ids[0], ids[0] + len(ids)))
        assert len(after) > 60


class TestRestFaults:
    async def test_rest_error_fails_the_next_requests(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """rest_error(500, 2) fails the next two REST requests, then all is well."""
        exchange = await start_exchange()
        exchange.faults.rest_error(500, count=2)

        statuses = []
        for _ in range(3):
            async with session.get(exchange.rest_url + "/api/v3/ping") as response:
                statuses.append(response.status)

        assert statuses == [500, 500, 200]

    async def test_rest_ban_answers_418(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """rest_ban(seconds) answers every REST request with 418 and Retry-After."""
        exchange = await start_exchange()
        exchange.faults.rest_ban(10.0)

        async with session.get(exchange.rest_url + "/api/v3/time") as response:
            status, retry_after = response.status, response.headers.get("Retry-After")
            body = await response.json()

        assert (status, retry_after, body["code"]) == (418, "10", -1003)


class TestControlApi:
    async def test_faults_over_http(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """POST /faults/<name> applies the fault with the JSON body's arguments."""
        exchange = await start_exchange()
        ws = await session.ws_connect(exchange.ws_urls[0] + "/ws/btcusdt@trade")
        await wait_until(lambda: exchange.stats.connections[0] == 1)

        async with session.post(
            exchange.control_url + "/faults/kill", json={"endpoint": 0}
        ) as response:
            answer = await response.json()
        async with session.post(
            exchange.control_url + "/faults/refuse", json={"seconds": 5, "endpoint": 1}
        ) as response:
            refused = response.status
        end = await ending(ws)

        assert answer == {
            "ok": True,
            "fault": "kill",
            "arguments": {"endpoint": 0},
            "affected": 1,
        }
        assert refused == 200
        assert end.type is not aiohttp.WSMsgType.CLOSE
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(exchange.ws_urls[1] + "/ws")

    @pytest.mark.parametrize(
        ("path", "body", "status"),
        [
            ("/faults/explode", {}, 404),
            ("/faults/stall", {"secs": 1}, 400),
            ("/faults/stall", {"seconds": -1}, 400),
            ("/faults/kill", {"endpoint": 9}, 400),
        ],
    )
    async def test_bad_fault_requests_are_refused(
        self,
        start_exchange: StartExchange,
        session: aiohttp.ClientSession,
        path: str,
        body: dict[str, Any],
        status: int,
    ) -> None:
        """Unknown faults and bad arguments get 404/400 with a reason."""
        exchange = await start_exchange()

        async with session.post(exchange.control_url + path, json=body) as response:
            answer = await response.json()

        assert response.status == status
        assert answer["ok"] is False and answer["error"]

    async def test_market_stop_and_truth(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """POST /market/stop freezes the truth; GET /truth reports first, last, count."""
        exchange = await start_exchange()
        await wait_until(lambda: exchange.market.count("BTCUSDT") > 0)

        async with session.post(exchange.control_url + "/market/stop") as response:
            stopped = await response.json()
        await asyncio.sleep(0.05)
        async with session.get(
            exchange.control_url + "/truth/BTCUSDT?stream=trade"
        ) as r:
            truth = await r.json()
        async with session.get(exchange.control_url + "/truth/DOGEUSDT") as r:
            unknown = r.status

        count = exchange.market.count("BTCUSDT")
        assert stopped == {"ok": True, "running": False}
        assert truth == {
            "symbol": "BTCUSDT",
            "stream": "trade",
            "first_id": 1,
            "last_id": count,
            "count": count,
        }
        assert unknown == 404

    async def test_status_shows_connections_and_handshakes(
        self, start_exchange: StartExchange, session: aiohttp.ClientSession
    ) -> None:
        """GET /status shows connections, handshakes and active faults per endpoint."""
        exchange = await start_exchange()
        ws = await session.ws_connect(exchange.ws_urls[1] + "/ws/btcusdt@trade")
        await wait_until(lambda: exchange.stats.connections[1] == 1)
        exchange.faults.freeze(30.0, endpoint=0)

        async with session.get(exchange.control_url + "/status") as response:
            status = await response.json()
        await ws.close()

        endpoints = status["endpoints"]
        assert [e["connections"] for e in endpoints] == [0, 1]
        assert [e["handshakes"] for e in endpoints] == [0, 1]
        assert set(endpoints[0]["faults"]) == {"freeze"}
        assert status["market"]["running"] is True
