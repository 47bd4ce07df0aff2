"""The workflow the simulations and the chaos suite run, and what it must give.

The workflow is a small interpreter, :func:`sim`, of a program drawn at
random (by hypothesis, or by :func:`random_program` from a seed): steps
(sync and async, some taking a while), steps with compensations, sleeps,
receives, a handler that collects events, ``asyncio.gather`` of those,
child runs, and an optional ``revert``. Its result follows from the program
alone (:func:`expected`).

Every call of a step (or compensation) function is its side effect, noted
outside the engine: in memory with the simulated process that made it, and,
in worker processes of the chaos suite, as a line appended to the file
named by $SUBSTANTIAL_TEST_TRACE. ``tests.sim_checks.audit_runs`` then
tells which step ran more than once, and whether a process that died with
the step in flight explains each extra run.

This module also crashes one worker right after its k-th durable write
(:func:`scenario`): tests/test_simulation.py does so after every write in
turn. tests/sim_seeds.py injects every kind of fault from a seed.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import os
import random
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from substantial import Conductor, Context, RunReverted, workflow
from substantial.backends.base import Backend
from substantial.backends.memory import MemoryBackend
from tests.sim_checks import read_store
from tests.sim_faults import (
    ORDER,
    CrashAfter,
    Crashed,
    Faults,
    FaultyBackend,
    VirtualLoop,
    virtual_time,
)
from tests.workflows import trace

T = TypeVar("T")

#: Virtual seconds the worker may take to finish what follows the end of the run.
SETTLE = 600.0

#: A lease owner naming a process of this host that does not exist: a worker killed here.
DEAD_OWNER = f"{socket.gethostname()}/999999999/1/crashed"


# -- the workflow under test: an interpreter of random programs ---------------------------

#: The process a step function runs in (tasks inherit it), in a simulation.
PROCESS: contextvars.ContextVar[FaultyBackend] = contextvars.ContextVar("PROCESS")
#: Side effects of steps and compensations, counted outside the engine.
LEDGER: Counter[str] = Counter()
#: Each call of a step function: (step id, process, ORDER tick when it started).
EXECUTIONS: list[tuple[str, str, int]] = []
TRACES: list[list[str]] = []


def effect(sid: str) -> str:
    process = PROCESS.get(None)
    if process is not None:
        process.check_alive()  # a killed process runs nothing more
        EXECUTIONS.append((sid, f"p{process.no}", next(ORDER)))
    LEDGER[sid] += 1
    trace(f"{sid} {time.time():.6f}")  # in a worker process: a line in the ledger file
    return f"v{sid}"


async def async_effect(sid: str, pause: float) -> str:
    await asyncio.sleep(0)
    value = effect(sid)
    await asyncio.sleep(pause)  # in flight: a kill now leaves the effect done, not recorded
    return value


def undo(sid: str, value: str) -> None:
    assert value == f"v{sid}"
    effect(f"undo:{sid}")


@workflow()
async def sim(c: Context, program: list[Any], tag: str = "r", revert: bool = False) -> list[Any]:
    out = [await run_op(c, op, f"{tag}.{i}") for i, op in enumerate(program)]
    if revert:
        await c.revert()
    return out


async def run_op(c: Context, op: list[Any], sid: str) -> Any:
    kind = op[0]
    if kind == "step":
        return await c.save(functools.partial(effect, sid), name=sid)
    if kind == "astep":
        pause = op[1] / 1000 if len(op) > 1 else 0.0
        return await c.save(functools.partial(async_effect, sid, pause), name=sid)
    if kind == "comp":
        return await c.save(
            functools.partial(effect, sid), compensate_with=functools.partial(undo, sid), name=sid
        )
    if kind == "sleep":
        await c.sleep(op[1] / 1000)
        return "slept"
    if kind == "recv":
        return await c.receive(op[1])
    if kind == "collect":
        got: list[Any] = []
        c.handle("h", got.append)
        await c.ensure(lambda: len(got) >= op[1])
        return got
    if kind == "gather":
        subs = [run_op(c, sub, f"{sid}.{j}") for j, sub in enumerate(op[1])]
        return list(await asyncio.gather(*subs))
    if kind == "child":
        return await c.child(sim, {"program": op[1], "tag": sid})
    raise AssertionError(f"unknown op {op!r}")


def _conductor() -> Conductor:
    conductor = Conductor(os.environ.get("SUBSTANTIAL_TEST_URL", "memory://"))
    conductor.register(sim)
    return conductor


#: What `substantial worker tests.simulation:conductor` serves (the chaos suite's workers).
conductor = _conductor()


# -- programs, and what they must give ------------------------------------------------------


def random_program(rng: random.Random, *, max_ops: int = 6, pause_ms: int = 0) -> list[Any]:
    """Draw a program: what hypothesis draws in tests/test_simulation.py, plus a collector.

    Async steps take up to ``pause_ms``; children hold steps and sleeps; at most one
    ``collect`` (of ``h`` events), at top level, where its order is plain.
    """

    def leaf(child: bool = False) -> list[Any]:
        r = rng.random()
        if r < 0.2:
            return ["step"]
        if r < 0.45:
            return ["astep", rng.randint(0, pause_ms)]
        if r < 0.6 and not child:
            return ["comp"]
        if r < 0.8 or child:
            return ["sleep", rng.choice([0, 1, 3, 20, 100])]
        return ["recv", rng.choice("ab")]

    program: list[Any] = []
    for _ in range(rng.randint(1, max_ops)):
        r = rng.random()
        if r < 0.55:
            program.append(leaf())
        elif r < 0.75:
            program.append(["gather", [leaf() for _ in range(rng.randint(1, 3))]])
        elif r < 0.9:
            program.append(["child", [leaf(child=True) for _ in range(rng.randint(1, 3))]])
        elif not any(op[0] == "collect" for op in program):
            program.append(["collect", rng.randint(1, 3)])
    return program


def receives(program: list[Any]) -> list[str]:
    """Event names the run itself receives, in program order (children receive none)."""
    names: list[str] = []
    for op in program:
        if op[0] == "recv":
            names.append(op[1])
        elif op[0] == "gather":
            names.extend(receives(op[1]))
    return names


def sends(program: list[Any]) -> list[tuple[str, str, str]]:
    """The events a program needs, as (event id, name, value): one per receive, then collected."""
    out = [(f"e{i}", name, f"{name}{i}") for i, name in enumerate(receives(program))]
    for op in program:
        if op[0] == "collect":
            out.extend((f"h{j}", "h", f"h{j}") for j in range(op[1]))
    return out


def expected(program: list[Any], tag: str = "r", revert: bool = False) -> Any:
    """The result of ``program``: what its run must return, whatever went wrong meanwhile."""
    if revert:
        return "reverted"
    received = itertools.count()

    def value(op: list[Any], sid: str) -> Any:
        kind = op[0]
        if kind in ("step", "astep", "comp"):
            return f"v{sid}"
        if kind == "sleep":
            return "slept"
        if kind == "recv":
            return f"{op[1]}{next(received)}"  # a receive of a name gets its events in order
        if kind == "collect":
            return [f"h{j}" for j in range(op[1])]
        if kind == "gather":
            return [value(sub, f"{sid}.{j}") for j, sub in enumerate(op[1])]
        return expected(op[1], sid)

    return [value(op, f"{tag}.{i}") for i, op in enumerate(program)]


def effects(program: list[Any], tag: str = "r") -> list[str]:
    """Every step id of the program and its children."""
    out: list[str] = []
    for i, op in enumerate(program):
        sid = f"{tag}.{i}"
        if op[0] in ("step", "astep", "comp"):
            out.append(sid)
        elif op[0] in ("gather", "child"):
            out.extend(effects(op[1], sid))
    return out


def compensated(program: list[Any], tag: str = "r") -> list[str]:
    """Ids of the top-level run's steps that revert() compensates."""
    out: list[str] = []
    for i, op in enumerate(program):
        if op[0] == "comp":
            out.append(f"{tag}.{i}")
        elif op[0] == "gather":
            out.extend(compensated(op[1], f"{tag}.{i}"))
    return out


def side_effects(program: list[Any], revert: bool, tag: str = "r") -> list[str]:
    """Every step and compensation id the run must call."""
    undone = compensated(program, tag) if revert else []
    return effects(program, tag) + [f"undo:{s}" for s in undone]


# -- one crash after the k-th write --------------------------------------------------------


@dataclass
class Outcome:
    """What one scenario came to."""

    result: Any
    crashed: bool
    writes: int
    ledger: Counter[str]
    #: Step ids whose completion the store held when the worker died.
    recorded_at_crash: set[str] = field(default_factory=set)
    #: Every event record of every log, by event id.
    events_recorded: Counter[str] = field(default_factory=Counter)
    inbox_left: int = 0
    #: The store, as the run left it.
    store: Backend | None = None


async def start_process(
    inner: Backend, view: FaultyBackend, idle_timeout: float, owner: str, poll: float = 0.05
) -> tuple[Conductor, Any]:
    """Start a worker on ``view``, as a process of its own, named ``owner`` in leases."""
    conductor = Conductor(view)
    conductor.register(sim)
    token = PROCESS.set(view)
    try:
        agent = conductor.run(
            poll_interval=poll, idle_timeout=idle_timeout, shutdown_grace=0.0, step_threads=0
        )
    finally:
        PROCESS.reset(token)
    agent.worker.owner = owner
    return conductor, agent


async def kill(agent: Any) -> None:
    agent.cancel()
    with contextlib.suppress(Crashed, asyncio.CancelledError):
        await agent


def quiet_crashes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    while exc is not None and not isinstance(exc, Crashed):
        exc = exc.__context__
    if exc is None:
        loop.default_exception_handler(context)


async def run_result(conductor: Conductor, run_id: str, timeout: float | None = None) -> Any:
    """Wait for the run's result; ``timeout`` is on the loop's clock (virtual, in a simulation)."""
    try:
        async with asyncio.timeout(timeout):
            return await conductor.get(run_id).result()
    except RunReverted:
        return "reverted"


async def settle(store: Backend, agent: Any) -> None:
    """Wait until nothing is due and the worker holds no run: what follows ends is done.

    Metadata, a parent's report, inbox cleanup. Virtual seconds cost nothing; on a real
    loop (the property tests) it looks every 10 ms, within the same bound.
    """
    pause = 1.0 if isinstance(asyncio.get_running_loop(), VirtualLoop) else 0.01
    for _ in range(int(SETTLE / pause)):
        await asyncio.sleep(pause)
        if not agent.worker.runs and not await store.due(time.time() + 365 * 86400.0, 1):
            return
    raise AssertionError(f"runs still due {SETTLE}s after the run ended")


def run_virtual(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main()`` on a fresh loop in virtual time."""
    loop = VirtualLoop()
    with virtual_time(loop), asyncio.Runner(loop_factory=lambda: loop) as runner:
        return runner.run(main())


async def send_all(run: Any, events: list[tuple[str, str, str]], delay: float = 0.0) -> None:
    await asyncio.sleep(delay)
    for event_id, name, value in events:
        await run.send(name, value, event_id=event_id)


async def scenario(
    program: list[Any],
    *,
    revert: bool,
    crash_after: int | None,
    idle_timeout: float = 60.0,
    timeout: float = 3600.0,
    faults: Faults | None = None,
) -> Outcome:
    """Run ``program``, killing the worker after its ``crash_after``-th write if it makes one.

    ``faults``, if given, decides instead what goes wrong at the first worker's calls.
    On a :class:`VirtualLoop`, ``timeout`` is virtual seconds.
    """
    LEDGER.clear()
    asyncio.get_running_loop().set_exception_handler(quiet_crashes)
    inner = MemoryBackend()
    client = Conductor(inner)
    run = await client.start(sim, {"program": program, "revert": revert}, run_id="sim")
    events = sends(program)
    # Events called "a" are in the inbox before any worker runs; the others arrive while
    # the first worker runs (or after it died).
    await send_all(run, [e for e in events if e[1] == "a"])
    late = asyncio.ensure_future(send_all(run, [e for e in events if e[1] != "a"], 0.002))
    view = FaultyBackend(inner, faults or CrashAfter(crash_after))
    owner = DEAD_OWNER if crash_after is not None else "live"
    conductor, agent = await start_process(inner, view, idle_timeout, owner)
    waiting = asyncio.ensure_future(run_result(conductor, "sim", timeout))
    died = asyncio.ensure_future(view.dead.wait())
    await asyncio.wait([waiting, died], return_when=asyncio.FIRST_COMPLETED)
    crashed = view.dead.is_set()
    died.cancel()
    recorded: set[str] = set()
    first = view
    if crashed:
        waiting.cancel()
        with contextlib.suppress(Crashed, asyncio.CancelledError):
            await waiting
        await kill(agent)
        recorded = {sid for _run, sid in (await read_store(inner)).steps}
        conductor, agent = await start_process(
            inner, FaultyBackend(inner, CrashAfter(None)), idle_timeout, "live"
        )
        waiting = asyncio.ensure_future(run_result(conductor, "sim", timeout))
    try:
        result = await waiting
        await settle(inner, agent)
    except TimeoutError as exc:
        trace = "\n  ".join(first.trace)
        raise AssertionError(
            f"the run did not end after a crash at write {crash_after} of:\n  {trace}"
        ) from exc
    finally:
        await kill(agent)
        await late
    stored = await read_store(inner)
    assert not stored.problems, stored.problems
    TRACES.append(first.trace)
    events_by_id = Counter({eid: n for (_run, eid), n in stored.events.items()})
    return Outcome(
        result,
        crashed,
        first.writes,
        Counter(LEDGER),
        recorded,
        events_by_id,
        stored.inbox_left,
        inner,
    )
