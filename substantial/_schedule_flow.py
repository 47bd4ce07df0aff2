"""The built-in workflow behind every schedule.

A schedule is a run with id ``schedule:<name>`` of the workflow
``substantial.schedule``, registered by every Conductor. Its body loops:
compute the next tick, wait durably until then (or until a control event
arrives), start the tick's run with an id derived from the schedule name and
the tick time, so that a tick starts once by create-if-absent whatever the
number of workers, and compact its log now and then so replay stays short.
After downtime the ticks that passed are started or skipped per
``catch_up``. Temporal implements its scheduler as a workflow the same way.
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime
from typing import Any

from substantial._runs import create_run
from substantial._ticks import (
    ScheduleSpec,
    jitter_of,
    next_tick,
    pick_due,
    tick_stamp,
    ticks_between,
)
from substantial.backends.base import Backend
from substantial.context import Context
from substantial.errors import ReceiveTimeout
from substantial.records import start_record
from substantial.workflow import Workflow

__all__ = ["CONTROL", "SCHEDULE_WORKFLOW", "schedule_run_id", "schedule_workflow", "tick_run_id"]

SCHEDULE_WORKFLOW = "substantial.schedule"
#: The event name of every control message sent to a schedule run.
CONTROL = "substantial.schedule.control"
#: Loop turns between two compactions of the schedule's log.
COMPACT_EVERY = 200
#: Most ticks started by one step (a long backfill or catch-up takes several).
BATCH = 200


def schedule_run_id(name: str) -> str:
    """Return the id of the run that is the schedule ``name``."""
    return f"schedule:{name}"


def tick_run_id(name: str, tick: float) -> str:
    """Return the id of the run a schedule starts for ``tick``: the same on every worker."""
    return f"schedule:{name}:{tick_stamp(tick)}"


async def start_ticks(
    backend: Backend, name: str, spec: ScheduleSpec, ticks: list[float]
) -> list[str]:
    """Start one run per tick unless it exists (create-if-absent); return their ids."""
    out = []
    for tick in ticks:
        run_id = tick_run_id(name, tick)
        kwargs = dict(spec["kwargs"])
        if spec["pass_time"]:
            kwargs["scheduled_at"] = datetime.fromtimestamp(tick, UTC).isoformat()
        now = datetime.now(UTC).timestamp()
        record = start_record(run_id, spec["workflow"], spec["version"], kwargs, now)
        await create_run(backend, record)
        out.append(run_id)
    return out


class _State:
    """What the schedule run knows between two turns of its loop."""

    def __init__(
        self,
        name: str,
        spec: ScheduleSpec,
        cursor: float,
        paused: bool,
        deleted: bool,
        last: dict[str, Any] | None,
    ) -> None:
        self.name = name
        self.spec = spec
        #: The latest tick already handled (started or skipped).
        self.cursor = cursor
        self.paused = paused
        self.deleted = deleted
        self.last = last
        self.published: dict[str, Any] | None = None

    def public(self) -> dict[str, Any]:
        waiting = not (self.paused or self.deleted)
        return {
            "name": self.name,
            "spec": self.spec,
            "paused": self.paused,
            "deleted": self.deleted,
            "next": next_tick(self.spec, self.cursor) if waiting else None,
            "last": self.last,
        }

    def kwargs(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "cursor": self.cursor,
            "paused": self.paused,
            "deleted": self.deleted,
            "last": self.last,
        }


def schedule_workflow(backend: Backend) -> Workflow[None]:
    """Build the schedule workflow; its steps start runs on ``backend``."""

    async def run_ticks(c: Context, state: _State, ticks: list[float], why: str) -> None:
        for i in range(0, len(ticks), BATCH):
            chunk = ticks[i : i + BATCH]
            step = functools.partial(start_ticks, backend, state.name, state.spec, chunk)
            ids = await c.save(step, name=why)
            state.last = {"tick": chunk[-1], "run_id": ids[-1]}

    async def apply(c: Context, state: _State, op: Any) -> None:
        now = c.now().timestamp()
        kind = op.get("op") if isinstance(op, dict) else None
        if kind == "update":
            state.spec = op["spec"]
            state.deleted = False
            # Ticks of the new timetable that fell before the change are not missed ones.
            state.cursor = max(state.cursor, now)
        elif kind == "pause":
            state.paused = True
        elif kind == "resume":
            if state.paused:
                state.paused = False
                state.cursor = max(state.cursor, now)
        elif kind == "delete":
            state.deleted = True
        else:
            c.log("ignored an unknown schedule control message: %r", op)

    async def body(
        c: Context,
        name: str,
        spec: ScheduleSpec,
        cursor: float | None = None,
        paused: bool = False,
        deleted: bool = False,
        last: dict[str, Any] | None = None,
    ) -> None:
        start = c.now().timestamp() if cursor is None else cursor
        state = _State(name, spec, start, paused, deleted, last)
        for _turn in range(COMPACT_EVERY):
            public = state.public()
            if public != state.published:
                c.publish("schedule", public)
                state.published = public
            if state.paused or state.deleted:
                await apply(c, state, await c.receive(CONTROL))
                continue
            now = c.now().timestamp()
            tick = next_tick(state.spec, state.cursor)
            wake = tick + jitter_of(state.spec, name, tick)
            if wake > now:
                try:
                    op = await c.receive(CONTROL, timeout=wake - now)
                except ReceiveTimeout:
                    now = c.now().timestamp()
                else:
                    await apply(c, state, op)
                    continue
            due = []
            for t in ticks_between(state.spec, state.cursor, now, 100 * BATCH):
                if t + jitter_of(state.spec, name, t) > now:
                    break
                due.append(t)
            if not due:
                continue
            chosen, _skipped = pick_due(state.spec, name, due, now)
            state.cursor = due[-1]
            if chosen:
                await run_ticks(c, state, chosen, "start-ticks")
        await c.compact(**state.kwargs())

    return Workflow(fn=body, name=SCHEDULE_WORKFLOW)
