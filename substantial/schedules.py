"""Schedules: start a workflow on a cron timetable or at a fixed period, once per tick.

A schedule lives in the store as a run of the built-in workflow
``substantial.schedule`` (see :mod:`substantial._schedule_flow`), so it
survives restarts and every worker serves it; pausing, resuming, updating,
deleting, triggering and backfilling are events sent to that run. Each tick
starts a run whose id derives from the schedule's name and the tick's time,
so exactly one run starts per tick however many workers there are.
"""

from __future__ import annotations

import inspect
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from substantial._runs import create_run
from substantial._schedule_flow import (
    CONTROL,
    SCHEDULE_WORKFLOW,
    schedule_run_id,
    start_ticks,
)
from substantial._ticks import ScheduleSpec, make_spec, ticks_between
from substantial._timetable import Cron, Every
from substantial.errors import InvalidArgument, RunNotFound, UnknownWorkflow
from substantial.records import as_stored, decode_entry, start_record
from substantial.workflow import Workflow

if TYPE_CHECKING:
    from substantial.conductor import Conductor, Run

__all__ = ["Cron", "Every", "Schedule", "ScheduleInfo", "check_name", "list_schedules", "schedule"]

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.=-]{0,99}")
#: Most ticks one backfill may start.
BACKFILL_LIMIT = 10_000


def check_name(name: str) -> str:
    """Return ``name`` if it can name a schedule; raise :class:`InvalidArgument` if not."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid schedule name {name!r}: use 1-100 characters from A-Z a-z 0-9 _ . = -, "
            "not starting with '.', '=' or '-'"
        )
    return name


def _timestamp(when: datetime | float, what: str) -> float:
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise InvalidArgument(f"{what} must be an aware datetime (give it a tzinfo)")
        return when.timestamp()
    if isinstance(when, (int, float)) and not isinstance(when, bool):
        return float(when)
    raise InvalidArgument(f"{what} must be a datetime or epoch seconds, got {when!r}")


def _moment(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC)


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as it last reported itself."""

    name: str
    workflow: str
    cron: str | None
    every: timedelta | None
    tz: str
    catch_up: str
    paused: bool
    #: When the next tick is due (None while paused, or before a worker first ran it).
    next_at: datetime | None
    #: The latest tick started, and its run's id.
    last_at: datetime | None
    last_run: str | None
    kwargs: dict[str, Any]
    queue: str | None = None


def _info_from(name: str, spec: ScheduleSpec, public: dict[str, Any] | None) -> ScheduleInfo:
    last = (public or {}).get("last") or {}
    every = spec.get("every")
    return ScheduleInfo(
        name=name,
        workflow=spec["workflow"],
        cron=spec.get("cron"),
        every=None if every is None else timedelta(seconds=every),
        tz=spec.get("tz", "UTC"),
        catch_up=spec.get("catch_up", "latest"),
        paused=bool((public or {}).get("paused")),
        next_at=_moment((public or {}).get("next")),
        last_at=_moment(last.get("tick")),
        last_run=last.get("run_id"),
        kwargs=dict(spec.get("kwargs") or {}),
        queue=spec.get("queue"),
    )


class Schedule:
    """A handle on one schedule: inspect it, pause, resume, update, delete, trigger, backfill."""

    def __init__(self, conductor: Conductor, name: str) -> None:
        self._conductor = conductor
        self.name = check_name(name)
        #: The id of the run that is this schedule.
        self.run_id = schedule_run_id(name)

    def __repr__(self) -> str:
        return f"Schedule({self.name!r})"

    async def _send(self, op: dict[str, Any]) -> None:
        try:
            await self._conductor.get(self.run_id).send(CONTROL, op)
        except RunNotFound as exc:
            raise RunNotFound(
                f"no schedule named {self.name!r} in {self._conductor.backend.describe()}: "
                "create it with conductor.schedule(...)"
            ) from exc

    async def _spec(self) -> tuple[ScheduleSpec, dict[str, Any] | None]:
        backend = self._conductor.backend
        info = await backend.get_run(self.run_id)
        if info is None:
            raise RunNotFound(f"no schedule named {self.name!r} in {backend.describe()}")
        public = (info.published or {}).get("schedule")
        if public is not None:
            return public["spec"], public
        first = decode_entry(self.run_id, 0, (await backend.read_log(self.run_id, 0))[0])[0]
        return first["kwargs"]["spec"], None

    async def info(self) -> ScheduleInfo:
        """Return the schedule's settings and state, as its run last published them."""
        spec, public = await self._spec()
        return _info_from(self.name, spec, public)

    async def pause(self) -> None:
        """Stop starting runs until :meth:`resume`; ticks while paused are not caught up."""
        await self._send({"op": "pause"})

    async def resume(self) -> None:
        """Start runs again from the next tick."""
        await self._send({"op": "resume"})

    async def delete(self) -> None:
        """Stop the schedule for good; ``conductor.schedule`` with its name creates it anew."""
        await self._send({"op": "delete"})

    async def trigger(self) -> Run:
        """Start one run now, outside the timetable (paused or not); return its handle."""
        spec, _public = await self._spec()
        return (await self._start(spec, [time.time()]))[0]

    async def backfill(self, start: datetime | float, end: datetime | float) -> list[Run]:
        """Start the runs of every tick from ``start`` to ``end`` (inclusive) not yet started.

        A tick that already has its run is left alone (its id is derived from
        the tick), so backfilling twice starts nothing new. Returns every
        tick's run, started now or before.
        """
        a, b = _timestamp(start, "backfill start"), _timestamp(end, "backfill end")
        if b < a:
            raise InvalidArgument("backfill(start, end) needs start <= end")
        spec, _public = await self._spec()
        ticks = ticks_between(spec, a - 1e-6, b, BACKFILL_LIMIT + 1)
        if len(ticks) > BACKFILL_LIMIT:
            raise InvalidArgument(
                f"backfill of {self.name!r} would start more than {BACKFILL_LIMIT} runs: "
                "split the range"
            )
        return await self._start(spec, ticks)

    async def _start(self, spec: ScheduleSpec, ticks: list[float]) -> list[Run]:
        ids = await start_ticks(self._conductor.backend, self.name, spec, ticks)
        return [self._conductor.get(run_id) for run_id in ids]

    async def update(
        self,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        kwargs: dict[str, Any] | None = None,
        tz: str | None = None,
        catch_up: str | None = None,
        jitter: timedelta | float | None = None,
    ) -> None:
        """Change some settings; the others keep their values. Ticks restart from now."""
        spec, _public = await self._spec()
        timing = (cron, every) if cron is not None or every is not None else None
        checked = make_spec(
            spec["workflow"],
            spec["version"],
            spec["kwargs"]
            if kwargs is None
            else as_stored(dict(kwargs), "the schedule's arguments"),
            cron=spec["cron"] if timing is None else timing[0],
            every=spec["every"] if timing is None else timing[1],
            tz=spec["tz"] if tz is None else tz,
            catch_up=spec["catch_up"] if catch_up is None else catch_up,
            jitter=spec["jitter"] if jitter is None else jitter,
            pass_time=spec["pass_time"],
            queue=spec.get("queue"),
        )
        await self._send({"op": "update", "spec": checked})


def _accepts_time(wf: Workflow[Any]) -> bool:
    try:
        params = inspect.signature(wf.fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "scheduled_at" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


async def schedule(
    conductor: Conductor,
    name: str,
    wf: Workflow[Any] | str,
    *,
    cron: str | None = None,
    every: timedelta | float | None = None,
    kwargs: dict[str, Any] | None = None,
    tz: str = "UTC",
    catch_up: str = "latest",
    jitter: timedelta | float | None = None,
) -> Schedule:
    """Create the schedule ``name``, or bring an existing one to these settings."""
    check_name(name)
    if isinstance(wf, str):
        found = conductor.registry.latest(wf)
        if found is None:
            raise UnknownWorkflow(
                f"no workflow named {wf!r} is registered: register it, or pass the function"
            )
        wf = found
    if not isinstance(wf, Workflow):
        raise InvalidArgument(f"schedule() takes a @workflow() function or its name, got {wf!r}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise InvalidArgument("schedule() takes the workflow's arguments as a dict of kwargs")
    spec = make_spec(
        wf.name,
        wf.version,
        as_stored(dict(kwargs or {}), "the schedule's arguments"),
        cron=cron,
        every=every,
        tz=tz,
        catch_up=catch_up,
        jitter=jitter,
        pass_time=_accepts_time(wf),
    )
    handle = Schedule(conductor, name)
    record = start_record(
        handle.run_id, SCHEDULE_WORKFLOW, None, {"name": name, "spec": spec}, time.time()
    )
    if not await create_run(conductor.backend, record):
        current, _public = await handle._spec()
        info = await conductor.backend.get_run(handle.run_id)
        deleted = bool(info and (info.published or {}).get("schedule", {}).get("deleted"))
        if current != spec or deleted:
            await handle._send({"op": "update", "spec": spec})
    return handle


async def list_schedules(conductor: Conductor, *, limit: int = 1000) -> list[ScheduleInfo]:
    """Return the schedules in the store (not deleted ones), by name."""
    out: list[ScheduleInfo] = []
    after: str | None = None
    while len(out) < limit:
        page = await conductor.backend.list_runs(
            workflow=SCHEDULE_WORKFLOW, status="active", limit=500, after=after
        )
        for run in page:
            public = (run.published or {}).get("schedule")
            if public is not None:
                if not public.get("deleted"):
                    out.append(_info_from(public["name"], public["spec"], public))
                continue
            name = run.run_id.removeprefix("schedule:")
            try:
                spec, _ = await Schedule(conductor, name)._spec()
            except (InvalidArgument, RunNotFound):
                continue
            out.append(_info_from(name, spec, None))
        if len(page) < 500:
            break
        after = page[-1].run_id
    return out[:limit]
