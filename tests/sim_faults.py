"""Faults for the simulations: one worker process's view of a store, and virtual time.

:class:`FaultyBackend` stands between one simulated worker process and the
shared store. Before each backend call a :class:`Faults` policy decides what
goes wrong: nothing; an error (``BackendUnavailable``, nothing happened); a
delay; a lost reply (the call reached the store, then raises
``BackendUnavailable``); or the death of the process before or after the
call reached the store. Once dead, the process makes no more calls and its
step functions do nothing more (their side effects belong to it).

The wrapper is made from the methods :class:`Backend` declares abstract, so
it follows the contract as it changes; a method a backend has beyond them
(helpers written once on the primitives) is run on the wrapper, so its
primitive calls meet faults too.

:class:`VirtualLoop` is an asyncio loop whose clock jumps to the next timer
whenever nothing is ready, so a simulated hour costs nothing, and
:func:`virtual_time` makes ``time.time()`` (the engine's and the memory
store's clock) read that same clock. Nothing here depends on real time, so a
seed replays the same way. It is a few lines on asyncio's own selector loop;
the libraries that fast-forward asyncio patch the loop's clock only, and the
wall clock, which the engine and the store read, must move with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import random
import selectors
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from unittest import mock

from substantial.backends.base import Backend
from substantial.errors import BackendUnavailable

#: What a policy may do to one call.
OK, ERROR, DELAY, LOST, CRASH_BEFORE, CRASH_AFTER = (
    "ok",
    "error",
    "delay",
    "lost",
    "crash-before",
    "crash-after",
)
#: Calls that change the store's data (runs, logs, inboxes, due index, metadata).
WRITES = frozenset(
    {
        "append",
        "post_event",
        "ack_events",
        "schedule",
        "unschedule",
        "unschedule_idle",
        "put_run",
        "set_due",
    }
)
#: Calls that change a lease.
LEASES = frozenset({"acquire_lease", "release_lease"})


#: One clock of causality for a simulation: step calls, writes landing and deaths take ticks.
ORDER = itertools.count()


class Crashed(asyncio.CancelledError):
    """The simulated worker process died; nothing after this reaches the store.

    A cancellation, so the dead worker's tasks end as cancelled, not with an error
    that asyncio reports when they are collected.
    """


def kind_of(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Tell whether a call reads, writes data, or changes a lease."""
    if name in WRITES or (name == "read_inbox" and kwargs.get("ack")):
        return "write"
    if name in LEASES or (name == "lease" and (len(args) > 1 or kwargs.get("owner"))):
        return "lease"
    return "read"


def describe(name: str, args: tuple[Any, ...]) -> str:
    """One line naming a call, for a failure's message."""
    shown = [repr(a[:60]) if isinstance(a, bytes) else repr(a) for a in args]
    return f"{name} {' '.join(shown)}"


class Faults:
    """Decides what goes wrong at each call of one process (here: nothing)."""

    def choose(self, kind: str, name: str, args: tuple[Any, ...]) -> str:
        """Return the fault for the call ``name(*args)``, of ``kind``."""
        return OK

    def delay(self) -> float:
        """Return how long (virtual seconds) a delayed call waits."""
        return 0.0


@dataclass
class CrashAfter(Faults):
    """Kill the process right after its k-th write of data (leases do not count)."""

    k: int | None
    writes: int = 0

    def choose(self, kind: str, name: str, args: tuple[Any, ...]) -> str:
        if kind != "write":
            return OK
        self.writes += 1
        return CRASH_AFTER if self.writes == self.k else OK


@dataclass
class RandomFaults(Faults):
    """Each call meets a fault with probability ``rate``, drawn from one seeded RNG.

    ``crashes`` is shared by every process of one simulation: how many more may die.
    Lost replies and crashes after the call only make sense for calls that change
    something; a read that would lose its reply fails instead.
    """

    rng: random.Random
    rate: float
    crashes: list[int]
    #: Faults injected so far, by kind.
    injected: Counter[str] = field(default_factory=Counter)
    #: False once the simulation wants the run to end: no more faults.
    on: bool = True

    def choose(self, kind: str, name: str, args: tuple[Any, ...]) -> str:
        if not self.on or self.rng.random() >= self.rate:
            return OK
        r = self.rng.random()
        if r < 0.3:
            fault = ERROR
        elif r < 0.6:
            fault = DELAY
        elif r < 0.85:
            fault = LOST if kind != "read" else ERROR
        elif self.crashes[0] > 0:
            self.crashes[0] -= 1
            fault = CRASH_AFTER if kind != "read" and self.rng.random() < 0.5 else CRASH_BEFORE
        else:
            fault = DELAY
        self.injected[fault] += 1
        return fault

    def delay(self) -> float:
        # Mostly short, sometimes as long as a lease renewal period.
        return self.rng.choice([0.001, 0.01, 0.1, 1.0, 5.0]) * self.rng.random()


@dataclass
class Scripted(Faults):
    """Faults at chosen calls: each rule (fault, call name, test of its arguments) in turn.

    A rule applies to the first call that matches it once the rule before it applied.
    """

    rules: list[tuple[str, str, Callable[[tuple[Any, ...]], bool]]]
    pause: float = 0.01

    def choose(self, kind: str, name: str, args: tuple[Any, ...]) -> str:
        if self.rules and self.rules[0][1] == name and self.rules[0][2](args):
            return self.rules.pop(0)[0]
        return OK

    def delay(self) -> float:
        return self.pause


class FaultyBackend(Backend):
    """One worker process's view of a shared store, with faults at every call."""

    name = "faulty"

    def __init__(self, inner: Backend, faults: Faults, no: int = 0) -> None:
        super().__init__()
        self.inner = inner
        self.capabilities = inner.capabilities
        self.faults = faults
        #: Which simulated process this is (0, 1, ...).
        self.no = no
        #: Data writes that reached the store, in order: for a failure's message.
        self.trace: list[str] = []
        self.dead = asyncio.Event()
        #: The ORDER tick at which the process died, or None.
        self.died_at: int | None = None
        #: Told of each call as (name, args, fault), and of each write when it lands.
        self.on_call: Callable[[str, tuple[Any, ...], str], None] | None = None
        self.on_landed: Callable[[str, tuple[Any, ...]], None] | None = None

    @property
    def writes(self) -> int:
        return len(self.trace)

    def check_alive(self) -> None:
        if self.dead.is_set():
            raise Crashed()

    def die(self) -> Crashed:
        self.dead.set()
        self.died_at = next(ORDER)
        return Crashed()

    async def call(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.check_alive()
        kind = kind_of(name, args, kwargs)
        fault = self.faults.choose(kind, name, args)
        if self.on_call is not None:
            self.on_call(name, args, fault)
        if fault == ERROR:
            raise BackendUnavailable(f"injected: {name} failed before reaching the store")
        if fault == CRASH_BEFORE:
            raise self.die()
        if fault == DELAY:
            await asyncio.sleep(self.faults.delay())
            self.check_alive()
        result = await getattr(self.inner, name)(*args, **kwargs)
        if kind == "write":
            self.trace.append(describe(name, args))
            if self.on_landed is not None:
                self.on_landed(name, args)
        if fault == CRASH_AFTER:
            raise self.die()  # the call landed; its caller never hears of it
        if fault == LOST:
            raise BackendUnavailable(f"injected: the reply to {name} was lost")
        return result

    def __getattr__(self, name: str) -> Any:
        # A coroutine the store's own class defines is a primitive: it meets faults. One it
        # inherits from a shared helper class is written on the primitives: run it on this
        # view, so the primitives it calls meet faults. Other attributes come from the store.
        cls = type(self.inner)
        attr = getattr(cls, name, None)
        if attr is None or not asyncio.iscoroutinefunction(attr):
            return getattr(self.inner, name)
        if name in vars(cls):
            return lambda *args, **kwargs: self.call(name, args, kwargs)
        return functools.partial(attr, self)

    async def wait_for_work(self, timeout: float) -> bool:
        self.check_alive()
        return await self.inner.wait_for_work(timeout)


def _forward(name: str) -> Callable[..., Any]:
    async def method(self: FaultyBackend, *args: Any, **kwargs: Any) -> Any:
        return await self.call(name, args, kwargs)

    method.__name__ = name
    return method


# Every primitive the contract declares, whatever it is called when this is imported, and
# the optional ones the engine calls when the store declares them.
for _name in (*Backend.__abstractmethods__, "unschedule_idle"):
    setattr(FaultyBackend, _name, _forward(_name))
FaultyBackend.__abstractmethods__ = frozenset()


# -- virtual time ---------------------------------------------------------------------------

#: Where the virtual wall clock starts (epoch seconds): any fixed time works.
EPOCH = 1_800_000_000.0


class Deadlock(RuntimeError):
    """Nothing is ready and no timer is set: the simulated system can never move again."""


class _JumpingSelector(selectors.BaseSelector):
    """A selector that never waits: when nothing is ready it moves the clock instead."""

    def __init__(self, loop: VirtualLoop) -> None:
        self._real = selectors.DefaultSelector()
        self._loop = loop

    def register(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.register(fileobj, events, data)

    def unregister(self, fileobj: Any) -> selectors.SelectorKey:
        return self._real.unregister(fileobj)

    def modify(self, fileobj: Any, events: int, data: Any = None) -> selectors.SelectorKey:
        return self._real.modify(fileobj, events, data)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        events = self._real.select(0)
        if events or timeout == 0:
            return events
        if timeout is None:
            raise Deadlock("every task waits and no timer is set")
        self._loop.now += timeout
        return []

    def get_map(self) -> Any:
        return self._real.get_map()

    def close(self) -> None:
        self._real.close()


class VirtualLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time: a timer fires as soon as nothing else can run."""

    def __init__(self) -> None:
        self.now = 0.0
        super().__init__(_JumpingSelector(self))

    def time(self) -> float:
        return self.now


@contextlib.contextmanager
def virtual_time(loop: VirtualLoop) -> Iterator[None]:
    """Make ``time.time()`` read ``loop``'s clock (from :data:`EPOCH`) meanwhile.

    ``time.sleep`` (the engine sleeps the last fraction of a millisecond before a
    timer) moves that clock instead of waiting.
    """

    def sleep(seconds: float) -> None:
        loop.now += max(0.0, seconds)

    with (
        mock.patch.object(time, "time", lambda: EPOCH + loop.now),
        mock.patch.object(time, "sleep", sleep),
    ):
        yield
