"""What the simulations and the chaos suite check once the runs ended.

:func:`read_store` reads every log and says what is wrong with its shape;
:func:`audit_runs` matches each call of a step function (its side effect,
noted outside the engine) with when its completion was recorded and when
processes died.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from substantial.backends.base import Backend
from substantial.records import decode_entry


@dataclass
class Stored:
    """What the logs of a store hold, read after the runs ended."""

    #: (run id, step id) of each completed step and compensation -> its record's time "t".
    steps: dict[tuple[str, str], float] = field(default_factory=dict)
    #: Every event record, by (run id, event id).
    events: Counter[tuple[str, str]] = field(default_factory=Counter)
    inbox_left: int = 0
    runs: int = 0
    #: What is wrong with a log: every one must be well formed.
    problems: list[str] = field(default_factory=list)


async def read_store(backend: Backend, run_ids: Iterable[str] | None = None) -> Stored:
    """Read every log (of ``run_ids`` and their children, or of every run) and check its shape."""
    out = Stored()
    if run_ids is None:
        ids = [info.run_id for info in await backend.list_runs(limit=100_000)]
    else:
        ids = list(run_ids)
    seen: set[str] = set()
    while ids:
        run_id = ids.pop()
        if run_id in seen:
            continue
        seen.add(run_id)
        out.runs += 1
        records = [
            r
            for position, data in enumerate(await backend.read_log(run_id))
            for r in decode_entry(run_id, position, data)
        ]
        if not records or records[0]["k"] != "start":
            out.problems.append(f"{run_id}: the log does not begin with its start")
        ends = [i for i, r in enumerate(records) if r["k"] == "end"]
        if ends != [len(records) - 1]:
            out.problems.append(f"{run_id}: end records at {ends} of {len(records)}")
        done: set[tuple[str, int]] = set()
        for r in records:
            if r["k"] in ("step", "compensated", "child") and "error" not in r:
                if (r["k"], r["c"]) in done:
                    out.problems.append(f"{run_id}: command {r['c']} completed twice")
                done.add((r["k"], r["c"]))
            if r["k"] in ("step", "compensated") and "error" not in r:
                sid = r["name"] if r["k"] == "step" else f"undo:{r['name']}"
                out.steps[(run_id, sid)] = float(r["t"])
            elif r["k"] == "event":
                out.events[(run_id, r["id"])] += 1
            elif r["k"] == "child" and "error" not in r:
                ids.append(r["run_id"])
        out.inbox_left += len(await backend.read_inbox(run_id))
    return out


@dataclass
class Audit:
    """Who ran which step how often, against when its completion was recorded."""

    #: Step calls, all counted.
    calls: int = 0
    #: Extra calls of steps whose earlier call was in a process that died before the
    #: completion was recorded: in flight at a kill.
    in_flight: int = 0
    #: Extra calls no death explains (the step ran twice in processes that lived on).
    unexplained: int = 0
    #: Steps called after their completion was recorded, and steps never called.
    problems: list[str] = field(default_factory=list)


def audit_runs(
    executions: Iterable[tuple[str, str, float]],
    recorded: dict[str, float],
    deaths: dict[str, float],
) -> Audit:
    """Check each step's calls, given (step, process, when) of each call.

    ``recorded`` tells when each step's completion was recorded, ``deaths`` when each
    killed process died, on one clock. A call after the record is a recorded step run
    again. Of several calls, all but one must be in processes that died before the
    record; the others are counted as unexplained.
    """
    out = Audit()
    calls: dict[str, list[tuple[str, float]]] = {}
    for sid, process, when in executions:
        calls.setdefault(sid, []).append((process, when))
        out.calls += 1
    for sid, at in recorded.items():
        made = calls.pop(sid, [])
        if not made:
            out.problems.append(f"step {sid} was recorded but never ran")
            continue
        late = [(p, w) for p, w in made if w > at]
        if late:
            out.problems.append(f"step {sid}, recorded at {at}, ran again after: {late}")
        died = sum(1 for p, _w in made if p in deaths and deaths[p] <= at)
        extra = len(made) - 1
        out.in_flight += min(died, extra)
        out.unexplained += max(0, extra - died)
    for sid, made in calls.items():
        out.problems.append(f"step {sid} ran {len(made)} times and was never recorded")
    return out
