"""The simulated market: a seeded trade generator and the ground truth it keeps.

Each symbol has a :class:`Tape`, the complete record of every trade and
aggregate trade it produced, stored column-wise in ``array`` objects so that
millions of trades cost tens of bytes each rather than a Python object each.
The WebSocket and REST sides read from the tapes; tests and the demo ask the
tape what really happened ("ground truth").

Generation is deterministic: the contents of trade *n* (price, quantity,
side, grouping into orders) depend only on the seed and the symbol, never on
how ticks happened to fall. Only the timestamps come from the clock.
"""

from __future__ import annotations

import asyncio
import bisect
import random
import sys
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Final

import structlog

from k2stream.clock import SYSTEM_CLOCK, Clock


log = structlog.get_logger(__name__)

UNITS: Final = 100_000_000
"""Prices and quantities are integers of 1e-8, Binance's usual precision."""

TRADING: Final = "TRADING"
SYMBOL_STATUSES: Final = ("TRADING", "END_OF_DAY", "HALT", "BREAK", "CANCEL_ONLY")
"""Symbol statuses from binance-spot-api-docs/enums.md; only TRADING trades."""

STREAM_TRADE: Final = "trade"
STREAM_AGG_TRADE: Final = "aggTrade"

QUANTITY_STEP: Final = 1_000
"""Fill quantities are multiples of 0.00001, like most spot lot sizes."""

_SIZE_BLOCK: Final = 4096
"""Fill sizes are drawn this many at a time from their own random stream."""

_WALK: Final = (-2, -1, -1, 0, 0, 1, 1, 2)
"""Price steps between orders, indexed by 3 random bits: symmetric, no drift."""

_CATCH_UP_TICKS: Final = 5.0
"""A late tick generates at most this many ticks' worth of trades."""

_FILLS: Final = (1, 1, 1, 1, 2, 2, 3, 4)
"""Fills per price level, indexed by 3 random bits: mostly one, sometimes four."""


def fill_quantity(code: int) -> int:
    """The quantity (in 1e-8) of a fill stored as a size code."""
    return (code + 1) * QUANTITY_STEP


def format_units(value: int) -> str:
    """An integer of 1e-8 as Binance writes it: ``"50000.12000000"``."""
    whole, fraction = divmod(value, UNITS)
    return f"{whole}.{fraction:08d}"


def parse_units(text: str) -> int:
    """A decimal string as an integer of 1e-8; more than 8 decimals is an error."""
    try:
        value = Decimal(text) * UNITS
    except InvalidOperation:
        raise ValueError(f"price {text!r} is not a decimal number") from None

    if value != value.to_integral_value() or value <= 0:
        raise ValueError(
            f"price {text!r} must be positive with at most 8 decimals, e.g. '50000.00'"
        )
    return int(value)


@dataclass(frozen=True, slots=True)
class SymbolSpec:
    """One listed symbol and how its market behaves.

    ``rate`` is trades per second. ``price`` is the opening price; its number
    of decimals sets the price step (``"50000.00"`` moves by 0.01).
    ``first_id`` and ``first_agg_id`` are the first trade and aggregate trade
    ids. A ``status`` other than ``TRADING`` lists the symbol in exchangeInfo
    but generates no trades, as a halted market does.
    """

    symbol: str
    base: str
    quote: str
    rate: float = 10.0
    price: str = "100.00"
    first_id: int = 1
    first_agg_id: int = 1
    status: str = TRADING

    def __post_init__(self) -> None:
        symbol = self.symbol
        if not (symbol.isascii() and symbol.isalnum() and symbol == symbol.upper()):
            raise ValueError(
                f"symbol {self.symbol!r} must be upper-case letters and digits, "
                "e.g. 'BTCUSDT'"
            )
        if self.status not in SYMBOL_STATUSES:
            raise ValueError(
                f"status {self.status!r} of {self.symbol} is not one of "
                f"{', '.join(SYMBOL_STATUSES)}"
            )
        if self.rate < 0:
            raise ValueError(f"rate of {self.symbol} must be >= 0 trades/s")
        if self.first_id < 0 or self.first_agg_id < 0:
            raise ValueError(f"first ids of {self.symbol} must be >= 0")
        parse_units(self.price)

    @property
    def trading(self) -> bool:
        return self.status == TRADING


@dataclass(frozen=True, slots=True)
class TradeTruth:
    """One trade as the exchange recorded it (``<symbol>@trade``, ``/trades``)."""

    symbol: str
    id: int
    price: str
    quantity: str
    trade_time_us: int
    event_time_us: int
    buyer_is_maker: bool
    agg_id: int


@dataclass(frozen=True, slots=True)
class AggTradeTruth:
    """One aggregate trade: the fills of one taker order at one price."""

    symbol: str
    id: int
    price: str
    quantity: str
    first_trade_id: int
    last_trade_id: int
    trade_time_us: int
    event_time_us: int
    buyer_is_maker: bool


class Tape:
    """Every trade and aggregate trade of one symbol, in columns.

    A trade stores only a size code (its quantity is ``(code + 1) * 0.00001``):
    its price, times and side are its aggregate's, since the fills of one
    aggregate share them, and its aggregate is found by bisecting
    ``agg_first``. An aggregate's quantity is the sum of its fills. That is
    2 bytes per trade plus 29 per aggregate: under 20 bytes per trade.
    """

    def __init__(self, spec: SymbolSpec) -> None:
        self.spec = spec
        self.symbol = spec.symbol
        self.first_id = spec.first_id
        self.first_agg_id = spec.first_agg_id

        self.trade_size = array("H")
        self.agg_price = array("q")
        self.agg_first = array("I")
        """Index (not id) of each aggregate's first trade."""
        self.agg_time = array("q")
        self.agg_event = array("q")
        self.agg_maker = bytearray()

    @property
    def trade_count(self) -> int:
        return len(self.trade_size)

    @property
    def agg_count(self) -> int:
        return len(self.agg_price)

    def count(self, stream: str) -> int:
        return self.agg_count if stream == STREAM_AGG_TRADE else self.trade_count

    def first(self, stream: str) -> int:
        return self.first_agg_id if stream == STREAM_AGG_TRADE else self.first_id

    def agg_of(self, index: int) -> int:
        """Index of the aggregate that holds the trade at ``index``."""
        return bisect.bisect_right(self.agg_first, index) - 1

    def agg_end(self, index: int) -> int:
        """Index one past the last trade of the aggregate at ``index``."""
        if index + 1 < len(self.agg_first):
            return self.agg_first[index + 1]
        return len(self.trade_size)

    def agg_quantity(self, index: int) -> int:
        """Quantity (in 1e-8) of the aggregate at ``index``: its fills, summed exactly."""
        first, end = self.agg_first[index], self.agg_end(index)
        return (sum(self.trade_size[first:end]) + end - first) * QUANTITY_STEP

    def trade_at(self, index: int) -> TradeTruth:
        agg = self.agg_of(index)
        return TradeTruth(
            symbol=self.symbol,
            id=self.first_id + index,
            price=format_units(self.agg_price[agg]),
            quantity=format_units(fill_quantity(self.trade_size[index])),
            trade_time_us=self.agg_time[agg],
            event_time_us=self.agg_event[agg],
            buyer_is_maker=bool(self.agg_maker[agg]),
            agg_id=self.first_agg_id + agg,
        )

    def agg_at(self, index: int) -> AggTradeTruth:
        return AggTradeTruth(
            symbol=self.symbol,
            id=self.first_agg_id + index,
            price=format_units(self.agg_price[index]),
            quantity=format_units(self.agg_quantity(index)),
            first_trade_id=self.first_id + self.agg_first[index],
            last_trade_id=self.first_id + self.agg_end(index) - 1,
            trade_time_us=self.agg_time[index],
            event_time_us=self.agg_event[index],
            buyer_is_maker=bool(self.agg_maker[index]),
        )


class _OrderFlow:
    """The seeded source of taker orders for one symbol.

    Each order is one side, one to three price levels walked in the taker's
    direction, and one or more fills per level. Each level becomes one
    aggregate trade; each fill one trade. Fill quantities come from their own
    random stream, drawn in fixed blocks, so that what trade *n* looks like
    never depends on where tick boundaries fell.
    """

    def __init__(self, spec: SymbolSpec, seed: int) -> None:
        shapes = random.Random(f"{seed}/{spec.symbol}/orders")
        self.draw = shapes.getrandbits
        """Random bits that decide one order (see :meth:`Market._generate`)."""
        self._sizes = random.Random(f"{seed}/{spec.symbol}/sizes")
        self._block = array("H")
        self._position = 0
        self.price = parse_units(spec.price)
        decimals = len(spec.price.partition(".")[2])
        self.step = 10 ** (8 - min(decimals, 8))

    def sizes(self, count: int) -> array[int]:
        """The next ``count`` fill-size codes (quantity = (code + 1) * 0.00001)."""
        if self._position + count > len(self._block):
            block = self._block[self._position :]
            while len(block) < count:
                fresh = array("H", self._sizes.randbytes(2 * _SIZE_BLOCK))
                if sys.byteorder == "big":
                    fresh.byteswap()
                block += fresh
            self._block = block
            self._position = 0

        start = self._position
        self._position = start + count
        return self._block[start : self._position]


@dataclass(frozen=True, slots=True)
class TapeSlice:
    """What one tick added to one tape: index ranges ``[lo, hi)``."""

    tape: Tape
    trade_lo: int
    trade_hi: int
    agg_lo: int
    agg_hi: int


TickListener = Callable[[list[TapeSlice]], None]
"""Called once per tick with what each symbol generated during that tick."""


class Market:
    """All symbols' trade generators, their tapes, and the tick that drives them.

    :meth:`advance` is the pure step: it generates whatever is due by the
    clock and returns it. :meth:`start` runs it every ``tick`` seconds on the
    event loop and hands each tick's slices to the listeners.
    """

    def __init__(
        self,
        symbols: Iterable[SymbolSpec],
        *,
        seed: int = 0,
        tick: float = 0.01,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if tick <= 0:
            raise ValueError("tick must be > 0 seconds, e.g. 0.01")

        self.tick = tick
        self._clock = clock
        self._tapes: dict[str, Tape] = {}
        self._flows: dict[str, _OrderFlow] = {}
        for spec in symbols:
            if spec.symbol in self._tapes:
                raise ValueError(f"symbol {spec.symbol} is listed twice")
            self._tapes[spec.symbol] = Tape(spec)
            self._flows[spec.symbol] = _OrderFlow(spec, seed)

        self._listeners: list[TickListener] = []
        self._timer: asyncio.TimerHandle | None = None
        self._base_monotonic = 0.0
        self._base_counts: dict[str, int] = {}
        self._last_wall_us = 0
        self.running = False
        self.forgone = 0
        """Trades not generated because the loop fell behind (see :meth:`advance`)."""

    # -- symbols and ground truth -------------------------------------------------

    @property
    def symbols(self) -> list[SymbolSpec]:
        return [tape.spec for tape in self._tapes.values()]

    def spec(self, symbol: str) -> SymbolSpec:
        return self.tape(symbol).spec

    def has_symbol(self, symbol: str) -> bool:
        return symbol in self._tapes

    def tape(self, symbol: str) -> Tape:
        try:
            return self._tapes[symbol]
        except KeyError:
            listed = ", ".join(self._tapes)
            raise KeyError(
                f"symbol {symbol!r} is not listed; use one of: {listed}"
            ) from None

    def count(self, symbol: str, stream: str = STREAM_TRADE) -> int:
        """How many trades (or aggregate trades) ``symbol`` has generated."""
        return self.tape(symbol).count(_checked_stream(stream))

    def first_id(self, symbol: str, stream: str = STREAM_TRADE) -> int | None:
        """The first id generated, or None before the first trade."""
        tape = self.tape(symbol)
        stream = _checked_stream(stream)
        return tape.first(stream) if tape.count(stream) else None

    def last_id(self, symbol: str, stream: str = STREAM_TRADE) -> int | None:
        """The newest id generated, or None before the first trade."""
        tape = self.tape(symbol)
        stream = _checked_stream(stream)
        count = tape.count(stream)
        return tape.first(stream) + count - 1 if count else None

    def trade(self, symbol: str, id_: int) -> TradeTruth:
        tape = self.tape(symbol)
        return tape.trade_at(_index(tape, STREAM_TRADE, id_))

    def agg_trade(self, symbol: str, agg_id: int) -> AggTradeTruth:
        tape = self.tape(symbol)
        return tape.agg_at(_index(tape, STREAM_AGG_TRADE, agg_id))

    def trades(self, symbol: str, from_id: int, limit: int) -> list[TradeTruth]:
        """Up to ``limit`` trades with ids ``>= from_id``, ascending."""
        tape = self.tape(symbol)
        lo = max(0, from_id - tape.first_id)
        hi = min(tape.trade_count, lo + max(0, limit))
        return [tape.trade_at(i) for i in range(lo, hi)]

    def agg_trades(self, symbol: str, from_id: int, limit: int) -> list[AggTradeTruth]:
        """Up to ``limit`` aggregate trades with ids ``>= from_id``, ascending."""
        tape = self.tape(symbol)
        lo = max(0, from_id - tape.first_agg_id)
        hi = min(tape.agg_count, lo + max(0, limit))
        return [tape.agg_at(i) for i in range(lo, hi)]

    # -- listeners ------------------------------------------------------------------

    def add_listener(self, listener: TickListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: TickListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    # -- generation -----------------------------------------------------------------

    def advance(self, catch_up: float | None = None) -> list[TapeSlice]:
        """Generate every trade that is due by the clock; return what was added.

        A symbol owes ``rate`` trades per second since :meth:`start` (or since
        the first call, when driven by hand). Orders are never split across
        ticks, so a tick may run ahead by the fills of one order. With
        ``catch_up``, a symbol that owes more than that many ticks' worth
        generates only that much and forgets the rest: an overloaded loop
        then lowers the rate instead of spiralling into ever longer ticks.
        """
        if not self._base_counts:
            self._rebase()

        now_wall_us = int(self._clock.time() * 1_000_000)
        elapsed = self._clock.monotonic() - self._base_monotonic
        start_us = min(
            max(self._last_wall_us, now_wall_us - int(self.tick * 1e6)), now_wall_us
        )
        self._last_wall_us = now_wall_us

        slices = []
        for symbol, tape in self._tapes.items():
            if not tape.spec.trading:
                continue

            # The epsilon keeps float sums of tick lengths (0.05 * 60) whole.
            due = self._base_counts[symbol] + int(tape.spec.rate * elapsed + 1e-6)
            owed = due - tape.trade_count
            if owed <= 0:
                continue
            if catch_up is not None:
                most = max(1, int(tape.spec.rate * self.tick * catch_up))
                if owed > most:
                    self._base_counts[symbol] -= owed - most
                    self.forgone += owed - most
                    owed = most

            trade_lo, agg_lo = tape.trade_count, tape.agg_count
            self._generate(tape, self._flows[symbol], owed, start_us, now_wall_us)
            slices.append(
                TapeSlice(tape, trade_lo, tape.trade_count, agg_lo, tape.agg_count)
            )
        return slices

    def _generate(
        self, tape: Tape, flow: _OrderFlow, owed: int, start_us: int, end_us: int
    ) -> None:
        """Append whole orders until ``owed`` trades exist, spreading their times.

        This is the hot path of generation, so an order is decided by one draw
        of 32 bits: 3 for the price walk, 1 for the side, 5 for the number of
        levels, 3 per level for its number of fills, 8 for the event delay.
        Fill sizes are drawn in one slice once the tick's fill count is known.
        """
        prices: list[int] = []
        firsts: list[int] = []
        times: list[int] = []
        events: list[int] = []
        makers: list[int] = []
        draw = flow.draw
        step = flow.step
        price = flow.price
        span = end_us - start_us
        start = trade = len(tape.trade_size)
        target = trade + owed

        while trade < target:
            bits = draw(32)
            price += step * _WALK[bits & 7]
            if price < step:
                price = step
            maker = (bits >> 3) & 1

            # Orders in one tick get increasing times across the tick's span;
            # the event is stamped a little after the trade, as on Binance.
            trade_time = end_us - span * (target - trade - 1) // owed
            event_time = trade_time + (bits >> 24) * 4

            prices.append(price)
            firsts.append(trade)
            times.append(trade_time)
            events.append(event_time)
            makers.append(maker)
            trade += _FILLS[(bits >> 9) & 7]

            # One order in five sweeps a second level, one in sixteen a third.
            levels = (bits >> 4) & 31
            if levels >= 26:
                level_price = price
                direction = -step if maker else step
                for level in (1, 2) if levels >= 30 else (1,):
                    level_price = max(step, level_price + direction)
                    prices.append(level_price)
                    firsts.append(trade)
                    times.append(trade_time)
                    events.append(event_time)
                    makers.append(maker)
                    trade += _FILLS[(bits >> (9 + 3 * level)) & 7]

        flow.price = price
        tape.agg_price.extend(prices)
        tape.agg_first.extend(firsts)
        tape.agg_time.extend(times)
        tape.agg_event.extend(events)
        tape.agg_maker.extend(makers)
        tape.trade_size.extend(flow.sizes(trade - start))

    def _rebase(self) -> None:
        """Count what is owed from now on, from the current tape lengths."""
        self._base_monotonic = self._clock.monotonic()
        self._base_counts = {s: t.trade_count for s, t in self._tapes.items()}
        self._last_wall_us = int(self._clock.time() * 1_000_000)

    def start(self) -> None:
        """Generate every ``tick`` seconds on the running loop until :meth:`stop`."""
        if self.running:
            return

        self._rebase()
        self.running = True
        loop = asyncio.get_running_loop()
        self._schedule(loop, loop.time())
        log.info("market_started", symbols=list(self._tapes), tick=self.tick)

    def stop(self) -> None:
        """Stop generating; the tapes stay readable."""
        if not self.running:
            return

        self.running = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._base_counts = {}
        log.info(
            "market_stopped", trades={s: t.trade_count for s, t in self._tapes.items()}
        )

    def _schedule(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        self._timer = loop.call_at(when, self._on_tick, loop, when)

    def _on_tick(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        # Next tick on a fixed grid; a late tick skips ahead rather than bunching.
        next_when = max(when + self.tick, loop.time())
        self._schedule(loop, next_when)

        slices = self.advance(catch_up=_CATCH_UP_TICKS)
        if not slices:
            return
        for listener in list(self._listeners):
            try:
                listener(slices)
            except Exception as exc:
                log.exception("market_listener_failed", error=repr(exc))


def _checked_stream(stream: str) -> str:
    if stream not in (STREAM_TRADE, STREAM_AGG_TRADE):
        raise ValueError(f"stream {stream!r} is unknown; use 'trade' or 'aggTrade'")
    return stream


def _index(tape: Tape, stream: str, id_: int) -> int:
    first = tape.first(stream)
    count = tape.count(stream)
    index = id_ - first
    if not 0 <= index < count:
        newest = first + count - 1
        raise IndexError(
            f"{stream} id {id_} of {tape.symbol} was not generated "
            f"(ids {first}..{newest} exist)"
        )
    return index
