"""Crash-test a workflow: crash it at every log boundary, resume it, compare with a clean run.

The workflow first runs once, uncrashed, on a memory store: that gives the
reference result and the run's log. Then, for each boundary ``k`` of that
log, a fresh store is given what a crash right after the run's ``k``-th
durable write leaves behind (the first ``k`` entries; the events the run
recorded later still waiting in its inbox; the other runs, such as
children, as they ended), and a fresh worker finishes the run. Every step
and compensation call is counted. A crash point fails if the run ends
differently, or if a step whose completion was already written runs
again. Steps whose completion was in the very write the crash prevented
ran before it and run again after it: that is the at-least-once edge every
durable engine has, reported so you can make those steps idempotent.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from substantial import _steps
from substantial.backends.memory import MemoryBackend
from substantial.conductor import Conductor
from substantial.errors import SubstantialError
from substantial.portable import ExportedRun, _store
from substantial.records import decode_entry, encode_value
from substantial.workflow import Workflow

__all__ = ["CrashPoint", "CrashReport", "crash_test"]


@dataclass
class CrashPoint:
    """What resuming after a crash right after log entry ``position - 1`` gave."""

    position: int
    outcome: Any
    matches: bool
    #: Steps already recorded before the crash that ran again: "name (command c)".
    reran: list[str] = field(default_factory=list)
    #: Steps that ran before the crash but whose completion it kept from being written.
    repeated: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Tell whether the run ended as uncrashed and no recorded step ran again."""
        return self.matches and not self.reran


@dataclass
class CrashReport:
    """The reference outcome and every crash point tried."""

    reference: Any
    points: list[CrashPoint]

    @property
    def ok(self) -> bool:
        """Tell whether every crash point passed."""
        return all(p.ok for p in self.points)

    @property
    def at_least_once(self) -> list[str]:
        """Return the steps that a crash at the wrong moment runs twice: make them idempotent."""
        return sorted({name for p in self.points for name in p.repeated})

    def describe(self) -> str:
        """Render the report for people, one line per failed crash point."""
        lines = [
            f"crash after entry {p.position - 1}: "
            + ("ended differently: " + repr(p.outcome) if not p.matches else "")
            + (f"recorded steps ran again: {', '.join(p.reran)}" if p.reran else "")
            for p in self.points
            if not p.ok
        ]
        passed = sum(p.ok for p in self.points)
        lines.append(f"{passed} of {len(self.points)} crash points passed")
        if self.at_least_once:
            lines.append("run twice by a badly timed crash: " + ", ".join(self.at_least_once))
        return "\n".join(lines)


async def _outcome(conductor: Conductor, run_id: str, timeout: float) -> Any:
    try:
        return ("value", await conductor.get(run_id).result(timeout=timeout))
    except SubstantialError as exc:
        return ("error", type(exc).__name__, str(exc))


def _label(name: str | None, c: int) -> str:
    return f"{name} (command {c})"


async def crash_test(
    wf: Workflow[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    events: Sequence[tuple[str, Any]] = (),
    workflows: Sequence[Workflow[Any]] = (),
    timeout: float = 30.0,
) -> CrashReport:
    """Crash ``wf`` at every boundary of its log and check each resumed run (see the module).

    ``events`` are sent to the run, in order, right after it starts;
    ``workflows`` are the others it needs registered (children).
    """
    everything = [wf, *workflows]
    calls: Counter[tuple[str, int]] = Counter()
    names: dict[tuple[str, int], str | None] = {}

    def count(run_id: str, c: int, name: str | None) -> None:
        calls[(run_id, c)] += 1
        names[(run_id, c)] = name

    async def serve(store: MemoryBackend, start: bool) -> tuple[Conductor, Any]:
        conductor = Conductor(store)
        for w in everything:
            conductor.register(w)
        agent = conductor.run(poll_interval=0.05)
        if start:
            run = await conductor.start(wf, kwargs, run_id="crash-test")
            for name, value in events:
                await run.send(name, value)
        try:
            return conductor, await _outcome(conductor, "crash-test", timeout)
        finally:
            agent.cancel()
            await agent

    previous, _steps.watch = _steps.watch, count
    try:
        reference_store = MemoryBackend()
        _, reference = await serve(reference_store, start=True)
        log = await reference_store.read_log("crash-test")
        others = [
            info
            for info in await reference_store.list_runs(limit=100_000)
            if info.run_id != "crash-test"
        ]
        main_info = await reference_store.get_run("crash-test")
        assert main_info is not None
        points: list[CrashPoint] = []
        for k in range(1, len(log)):
            calls.clear()
            store = MemoryBackend()
            for info in others:  # children and other runs, as they ended
                entries = [orjson.loads(e) for e in await reference_store.read_log(info.run_id)]
                await _store(store, ExportedRun(info.run_id, info, entries))
            prefix = [orjson.loads(e) for e in log[:k]]
            await _store(store, ExportedRun("crash-test", main_info.with_status("active"), prefix))
            written: set[int] = set()
            for position, data in enumerate(log):
                for record in decode_entry("crash-test", position, data):
                    if position < k and record["k"] in ("step", "compensated"):
                        written.add(record["c"])
                    if position >= k and record["k"] == "event":
                        body = {"name": record["name"], "value": record.get("value")}
                        await store.post_event("crash-test", record["id"], encode_value(body))
            lost = {
                r["c"]
                for r in decode_entry("crash-test", k, log[k])
                if r["k"] in ("step", "compensated")
            }
            _, outcome = await serve(store, start=False)
            reran = sorted(
                _label(names[key], key[1])
                for key, n in calls.items()
                if n and (key[0] != "crash-test" or key[1] in written)
            )
            repeated = sorted(
                _label(names[key], key[1])
                for key, n in calls.items()
                if key[0] == "crash-test" and key[1] in lost
            )
            points.append(CrashPoint(k, outcome, outcome == reference, reran, repeated))
        return CrashReport(reference, points)
    finally:
        _steps.watch = previous
