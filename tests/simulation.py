"""Crash simulation: run a workflow, kill its worker right after its k-th durable write, resume.

A :class:`CrashingBackend` wraps the store for one simulated worker process.
It counts the writes that worker makes (log entries, inbox, acks, due index,
metadata); once the k-th has landed, the process is dead: that call and
every later one raises :class:`Crashed`, so nothing more of it reaches the
store, and step functions it would still call do nothing (their side
effects are tied to the process that runs them). A fresh worker on the same
store then finishes the run, as after a SIGKILL and a restart on the same
host (the dead worker's leases name a process that no longer exists, so
they are taken over at once).

The workflow is a small interpreter, :func:`sim`, of a program drawn at
random: steps (sync and async), steps with compensations, sleeps, receives,
``asyncio.gather`` of those, child runs, and an optional ``revert``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import socket
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from substantial import Conductor, Context, ResultTimeout, RunReverted, workflow
from substantial.backends.base import Backend, Event, Lease, RunInfo
from substantial.backends.memory import MemoryBackend
from substantial.records import decode_entry

T = TypeVar("T")

#: A lease owner naming a process of this host that does not exist: a worker killed here.
DEAD_OWNER = f"{socket.gethostname()}/999999999/1/crashed"


class Crashed(asyncio.CancelledError):
    """The simulated worker process died; nothing after this reaches the store.

    A cancellation, so the dead worker's tasks end as cancelled, not with an error
    that asyncio reports when they are collected.
    """


class CrashingBackend(Backend):
    """One worker process's view of a shared store, that dies after its k-th write."""

    name = "crashing"

    def __init__(self, inner: Backend, crash_after: int | None) -> None:
        super().__init__()
        self.inner = inner
        self.crash_after = crash_after
        self.writes = 0
        #: What each write was, in order: for a failure's message.
        self.trace: list[str] = []
        self.dead = asyncio.Event()

    def check_alive(self) -> None:
        if self.dead.is_set():
            raise Crashed()

    async def _read(self, call: Callable[[], Awaitable[T]]) -> T:
        self.check_alive()
        return await call()

    async def _write(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        self.check_alive()
        result = await call()
        self.writes += 1
        self.trace.append(what)
        if self.writes == self.crash_after:
            self.dead.set()
            raise Crashed()  # the write landed; its caller never hears of it
        return result

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        await self._write(
            f"append {run_id}@{position} {entry[:60]!r}",
            lambda: self.inner.append(run_id, position, entry),
        )

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        return await self._read(lambda: self.inner.read_log(run_id, start))

    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        return await self._write(
            f"post {run_id} {event_id}", lambda: self.inner.post_event(run_id, event_id, data)
        )

    async def read_inbox(self, run_id: str) -> list[Event]:
        return await self._read(lambda: self.inner.read_inbox(run_id))

    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        await self._write(
            f"ack {run_id} {list(event_ids)}", lambda: self.inner.ack_events(run_id, event_ids)
        )

    async def schedule(self, run_id: str, at: float) -> None:
        await self._write(f"schedule {run_id}", lambda: self.inner.schedule(run_id, at))

    async def unschedule(self, run_id: str) -> None:
        await self._write(f"unschedule {run_id}", lambda: self.inner.unschedule(run_id))

    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        return await self._read(lambda: self.inner.due(now, limit))

    async def next_due_at(self) -> float | None:
        return await self._read(self.inner.next_due_at)

    # Leases are not counted: a crash right after taking one is a crash before any write.
    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        return await self._read(
            lambda: self.inner.acquire_lease(run_id, owner, ttl, steal_from=steal_from)
        )

    async def release_lease(self, run_id: str, owner: str) -> None:
        await self._read(lambda: self.inner.release_lease(run_id, owner))

    async def get_lease(self, run_id: str) -> Lease | None:
        return await self._read(lambda: self.inner.get_lease(run_id))

    async def put_run(self, info: RunInfo) -> None:
        await self._write(f"put_run {info.run_id} {info.status}", lambda: self.inner.put_run(info))

    async def get_run(self, run_id: str) -> RunInfo | None:
        return await self._read(lambda: self.inner.get_run(run_id))

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        return await self._read(
            lambda: self.inner.list_runs(status=status, workflow=workflow, limit=limit, after=after)
        )

    async def wait_for_work(self, timeout: float) -> bool:
        self.check_alive()
        return await self.inner.wait_for_work(timeout)


# -- the workflow under test: an interpreter of random programs ---------------------------

#: The process a step function runs in (tasks and step threads inherit it).
PROCESS: contextvars.ContextVar[CrashingBackend] = contextvars.ContextVar("PROCESS")
#: Side effects of steps and compensations, counted outside the engine.
LEDGER: Counter[str] = Counter()
TRACES: list[list[str]] = []


def effect(sid: str) -> str:
    PROCESS.get().check_alive()  # a killed process runs nothing more
    LEDGER[sid] += 1
    return f"v{sid}"


async def async_effect(sid: str) -> str:
    await asyncio.sleep(0)
    return effect(sid)


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
        return await c.save(functools.partial(async_effect, sid), name=sid)
    if kind == "comp":
        return await c.save(
            functools.partial(effect, sid), compensate_with=functools.partial(undo, sid), name=sid
        )
    if kind == "sleep":
        await c.sleep(op[1] / 1000)
        return "slept"
    if kind == "recv":
        return await c.receive(op[1])
    if kind == "gather":
        subs = [run_op(c, sub, f"{sid}.{j}") for j, sub in enumerate(op[1])]
        return list(await asyncio.gather(*subs))
    if kind == "child":
        return await c.child(sim, {"program": op[1], "tag": sid})
    raise AssertionError(f"unknown op {op!r}")


def receives(program: list[Any]) -> list[str]:
    """Event names the run itself receives, in program order (children receive none)."""
    names: list[str] = []
    for op in program:
        if op[0] == "recv":
            names.append(op[1])
        elif op[0] == "gather":
            names.extend(receives(op[1]))
    return names


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


# -- one scenario ------------------------------------------------------------------------


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


async def _process(
    inner: Backend, crash_after: int | None, idle_timeout: float
) -> tuple[Conductor, CrashingBackend, Any]:
    view = CrashingBackend(inner, crash_after)
    conductor = Conductor(view)
    conductor.register(sim)
    token = PROCESS.set(view)
    try:
        agent = conductor.run(
            poll_interval=0.05, idle_timeout=idle_timeout, shutdown_grace=0.0, step_threads=0
        )
    finally:
        PROCESS.reset(token)
    if crash_after is not None:
        agent.worker.owner = DEAD_OWNER
    return conductor, view, agent


async def _kill(agent: Any) -> None:
    agent.cancel()
    with contextlib.suppress(Crashed, asyncio.CancelledError):
        await agent


def _quiet_crashes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    exc = context.get("exception")
    while exc is not None and not isinstance(exc, Crashed):
        exc = exc.__context__
    if exc is None:
        loop.default_exception_handler(context)


async def _result(conductor: Conductor, run_id: str, timeout: float) -> Any:
    try:
        return await conductor.get(run_id).result(timeout=timeout)
    except RunReverted:
        return "reverted"


async def _recorded(backend: Backend) -> tuple[set[str], Counter[str], int]:
    steps: set[str] = set()
    events: Counter[str] = Counter()
    inbox = 0
    for info in await backend.list_runs(limit=10_000):
        for position, data in enumerate(await backend.read_log(info.run_id)):
            for record in decode_entry(info.run_id, position, data):
                if record["k"] in ("step", "compensated") and "error" not in record:
                    prefix = "" if record["k"] == "step" else "undo:"
                    steps.add(prefix + record["name"])
                elif record["k"] == "event":
                    events[record["id"]] += 1
        inbox += len(await backend.read_inbox(info.run_id))
    return steps, events, inbox


async def scenario(
    program: list[Any],
    *,
    revert: bool,
    crash_after: int | None,
    idle_timeout: float = 60.0,
    timeout: float = 20.0,
) -> Outcome:
    """Run ``program``, killing the worker after its ``crash_after``-th write if it makes one."""
    LEDGER.clear()
    asyncio.get_running_loop().set_exception_handler(_quiet_crashes)
    inner = MemoryBackend()
    client = Conductor(inner)
    run = await client.start(sim, {"program": program, "revert": revert}, run_id="sim")
    sends = [(f"e{i}", name, f"{name}{i}") for i, name in enumerate(receives(program))]
    # Events called "a" are in the inbox before any worker runs; those called "b" arrive
    # while the first worker runs (or after it died).
    for event_id, name, value in sends:
        if name == "a":
            await run.send(name, value, event_id=event_id)

    async def send_late() -> None:
        await asyncio.sleep(0.002)
        for event_id, name, value in sends:
            if name == "b":
                await run.send(name, value, event_id=event_id)

    late = asyncio.ensure_future(send_late())
    conductor, view, agent = await _process(inner, crash_after, idle_timeout)
    waiting = asyncio.ensure_future(_result(conductor, "sim", timeout))
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
        await _kill(agent)
        recorded, _events, _inbox = await _recorded(inner)
        conductor, _view, agent = await _process(inner, None, idle_timeout)
        waiting = asyncio.ensure_future(_result(conductor, "sim", timeout))
    try:
        result = await waiting
    except ResultTimeout as exc:
        trace = "\n  ".join(first.trace)
        raise AssertionError(
            f"the run did not end after a crash at write {crash_after} of:\n  {trace}"
        ) from exc
    finally:
        await _kill(agent)
        await late
    _steps, events, inbox = await _recorded(inner)
    TRACES.append(view.trace)
    return Outcome(result, crashed, view.writes, Counter(LEDGER), recorded, events, inbox, inner)
