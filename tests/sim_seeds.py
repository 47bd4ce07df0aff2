"""Deterministic simulation: from one seed, a workflow, a client, faults, crashes and restarts.

A seed decides everything: the program (:func:`tests.simulation.random_program`),
when the client sends each event, how often the worker's backend calls
fail and how (``tests.sim_faults.RandomFaults``: errors, delays, lost
replies, deaths before or after a write), how many worker processes may die
and how long a dead one takes to come back. Faults stop at a horizon drawn
from the seed, so the run must then end. Time is virtual and the engine's
jitter draws from the seeded ``random``, so a seed replays the same calls in
the same order: :attr:`World.fingerprint` says so, and a failing seed is
reproduced by its number alone (``SUBSTANTIAL_SIM_SEED=n``).

Checked for every seed: the result is the program's; every log is well
formed (a start first, one end last, no command completed twice); every
event sent was recorded exactly once and no inbox keeps one; no step ran
after its completion was recorded, and each extra run of a step is in a
process that died before the completion landed (or is counted as
unexplained, see :class:`tests.simulation.Audit`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from substantial import Conductor
from substantial.backends.memory import MemoryBackend
from substantial.records import decode_entry
from tests.sim_checks import Audit, audit_runs, read_store
from tests.sim_faults import ORDER, FaultyBackend, RandomFaults
from tests.simulation import (
    EXECUTIONS,
    LEDGER,
    expected,
    kill,
    quiet_crashes,
    random_program,
    run_result,
    run_virtual,
    sends,
    settle,
    side_effects,
    sim,
    start_process,
)

#: Virtual seconds a run has to end once faults stop before it counts as stuck.
STALL = 600.0
#: Virtual seconds a seed may last in all.
LIMIT = 6 * 3600.0
_HOST = socket.gethostname()


@dataclass
class World:
    """What one seed drew, and what became of it."""

    seed: int
    program: list[Any]
    revert: bool
    rate: float
    idle_timeout: float
    result: Any = None
    processes: int = 0
    deaths: int = 0
    faults: Counter[str] = field(default_factory=Counter)
    audit: Audit = field(default_factory=Audit)
    #: Every backend call of every worker, in order: (process, call, fault).
    calls: list[str] = field(default_factory=list)
    virtual_seconds: float = 0.0
    #: Runs found in the known window and woken (see :func:`_wake_the_window`).
    windows: int = 0

    @property
    def fingerprint(self) -> str:
        """A digest of every call the worker made: equal for two runs of one seed."""
        return hashlib.sha256("\n".join(self.calls).encode()).hexdigest()[:16]

    def describe(self) -> str:
        return (
            f"seed {self.seed}: program={self.program!r} revert={self.revert} "
            f"fault rate={self.rate} idle_timeout={self.idle_timeout} "
            f"processes={self.processes} deaths={self.deaths} faults={dict(self.faults)}"
        )


def draw(seed: int) -> World:
    """The world a seed describes, before it runs."""
    rng = random.Random(seed)
    program = random_program(rng, pause_ms=rng.choice([0, 5, 50]))
    return World(
        seed,
        program,
        revert=rng.random() < 0.15,
        rate=rng.choice([0.0, 0.02, 0.05, 0.1, 0.2, 0.3]),
        idle_timeout=rng.choice([0.001, 0.5, 60.0]),
    )


class _Errors(logging.Handler):
    """Collects what the engine logs as an error: an injected fault never warrants one."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name}: {record.getMessage()} {record.exc_info or ''}")


def simulate(seed: int) -> World:
    """Run one seed in virtual time and check it; raise AssertionError naming the seed."""
    world = draw(seed)
    saved = random.getstate()
    random.seed(seed)  # the engine's jitter (retry pauses) draws from the global RNG
    errors = _Errors()
    loggers = [logging.getLogger(name) for name in ("substantial", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(errors)
        lg.setLevel(logging.ERROR)  # the warnings faults cause are expected, and many
    try:
        run_virtual(lambda: _run(world))
        assert not errors.messages, errors.messages
    except Exception as exc:  # a wrong result, or the run failed or never ended
        raise AssertionError(f"{world.describe()}\n{type(exc).__name__}: {exc}") from exc
    finally:
        random.setstate(saved)
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(errors)
            lg.setLevel(level)
    return world


async def _send(run: Any, events: list[tuple[str, str, str]], rng: random.Random) -> None:
    # Each event at its own time in the first two virtual seconds, in order per name.
    for event_id, name, value in events:
        await asyncio.sleep(rng.choice([0.0, 0.001, 0.01, 0.1, 1.0]) * rng.random())
        await run.send(name, value, event_id=event_id)


async def _run(world: World) -> None:
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quiet_crashes)
    rng = random.Random(f"{world.seed}/world")
    EXECUTIONS.clear()
    LEDGER.clear()
    inner = MemoryBackend()
    client = Conductor(inner)
    client.register(sim)
    run = await client.start(sim, {"program": world.program, "revert": world.revert}, run_id="sim")
    events = sends(world.program)
    sender = asyncio.ensure_future(_send(run, events, rng))
    result = asyncio.ensure_future(run_result(client, "sim"))
    crashes = [rng.choice([0, 1, 1, 2, 3])]
    horizon = loop.time() + rng.choice([0.1, 1.0, 10.0, 100.0])
    landed: dict[str, int] = {}
    deaths: dict[str, int] = {}
    last_write: dict[int, tuple[str, tuple[Any, ...]]] = {}
    #: Runs a worker took out of the due index right before it died (the known window).
    window: set[str] = set()

    def note_landed(no: int, name: str, args: tuple[Any, ...]) -> None:
        last_write[no] = (name, args)
        if name != "append":
            return
        run_id, position, entry = args
        tick = next(ORDER)
        for r in decode_entry(run_id, position, entry):
            if r["k"] in ("step", "compensated") and "error" not in r:
                landed.setdefault(r["name"] if r["k"] == "step" else f"undo:{r['name']}", tick)

    async with asyncio.timeout(LIMIT):
        while True:
            no = world.processes
            world.processes += 1
            faults = RandomFaults(random.Random(f"{world.seed}/{no}"), world.rate, crashes)
            faults.on = loop.time() < horizon
            view = FaultyBackend(inner, faults, no)
            view.on_landed = lambda name, args, no=no: note_landed(no, name, args)
            view.on_call = lambda name, args, fault, no=no: world.calls.append(
                f"{loop.time():.6f} p{no} {name} {args!r:.200} {fault}"
            )
            owner = f"{_HOST}/{999_000_000 + no}/1/sim"  # a pid no process has: dead once killed
            _conductor, agent = await start_process(
                inner, view, world.idle_timeout, owner, poll=0.5
            )
            died = asyncio.ensure_future(view.dead.wait())
            while not (result.done() or died.done()):
                quiet = not faults.on
                wait = STALL if quiet else horizon - loop.time()
                await asyncio.wait(
                    [result, died], timeout=wait, return_when=asyncio.FIRST_COMPLETED
                )
                if loop.time() >= horizon:
                    faults.on = False  # from now on the run must end
                if quiet and not (result.done() or died.done()):
                    world.windows += await _wake_the_window(inner, window)
            world.faults.update(faults.injected)
            if result.done():
                faults.on = False
                await settle(inner, agent)
                died.cancel()
                await kill(agent)
                break
            assert view.died_at is not None
            deaths[f"p{no}"] = view.died_at
            name, args = last_write.get(no, ("", ()))
            if name == "set_due" and args[1] is None:
                window.add(args[0])
            world.deaths += 1
            await kill(agent)
            await asyncio.sleep(rng.choice([0.0, 0.01, 1.0, 30.0]))
    await sender
    world.result = result.result()
    world.virtual_seconds = loop.time()
    await _check(world, inner, events, landed, deaths)


async def _wake_the_window(store: MemoryBackend, window: set[str]) -> int:
    """Wake the runs left in the known window; fail if any other run is stuck.

    docs/RELIABILITY.md: a worker that evicts a run waiting for events takes it out
    of the due index, then reads its inbox again; an event posted in between, with the
    worker killed right after the first call, waits for the run's next wake-up. Here
    nothing else would wake it: do what a restart of the run does, and go on checking.
    """
    due = {run_id for run_id, _at in await store.due(time.time() + 365 * 86400.0, 10_000)}
    stuck = set()
    for info in await store.list_runs(status="active", limit=10_000):
        recorded = {
            r["id"]
            for position, data in enumerate(await store.read_log(info.run_id))
            for r in decode_entry(info.run_id, position, data)
            if r["k"] == "event"
        }
        inbox = await store.read_inbox(info.run_id)
        if info.run_id not in due and any(e.event_id not in recorded for e in inbox):
            stuck.add(info.run_id)
    assert stuck, f"the run did not end within {STALL:.0f} virtual seconds after the faults"
    assert stuck <= window, f"runs {sorted(stuck - window)} wait for ever with an event"
    for run_id in stuck:
        await store.schedule(run_id, time.time())
    return len(stuck)


async def _check(
    world: World,
    store: MemoryBackend,
    events: list[tuple[str, str, str]],
    landed: dict[str, int],
    deaths: dict[str, int],
) -> None:
    assert world.result == expected(world.program, revert=world.revert), world.result
    stored = await read_store(store)
    assert not stored.problems, stored.problems
    for event_id, _name, _value in events:
        assert stored.events[("sim", event_id)] == 1, f"event {event_id} recorded wrongly"
    assert all(n == 1 for n in stored.events.values()), stored.events
    assert stored.inbox_left == 0, "an event was left in an inbox"
    steps = {sid for _run, sid in stored.steps}
    assert steps == set(side_effects(world.program, world.revert)), steps
    assert set(landed) == steps, "a step completion is in a log but was never written"
    world.audit = audit_runs(EXECUTIONS, landed, deaths)
    assert not world.audit.problems, world.audit.problems
