"""Flow control on the Conductor: schedules and queues, as methods of one mixin.

The Conductor inherits :class:`FlowControl`; the work is done in
:mod:`substantial.schedules` and :mod:`substantial.queues`, whose built-in
workflows every Conductor registers so that any of its workers serves any
schedule and any queue.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from substantial import queues, schedules
from substantial._queue_flow import queue_workflow
from substantial._schedule_flow import schedule_workflow
from substantial.backends.base import Backend
from substantial.errors import BackendUnavailable, InvalidArgument, RunConflict, SubstantialError
from substantial.records import StartRecord
from substantial.workflow import Registry, Workflow

if TYPE_CHECKING:
    from substantial.conductor import Conductor, Run

__all__ = ["FlowControl"]

logger = logging.getLogger("substantial.schedules")


class FlowControl:
    """Schedules and queues, as the Conductor offers them."""

    backend: Backend
    registry: Registry

    def _register_flow(self, declared: Sequence[queues.Queue] = ()) -> None:
        self.registry.register(schedule_workflow(self.backend))
        self.registry.register(queue_workflow(self.backend))
        self.queues: dict[str, queues.Queue] = {}
        for queue in declared:
            if not isinstance(queue, queues.Queue):
                raise InvalidArgument(f"Conductor(queues=...) takes Queue objects, got {queue!r}")
            self.queues[queue.name] = queue
        #: Queues known to be stored with this process's limits.
        self._stored_queues: set[str] = set()
        #: The check of a queue under way, which concurrent starts into it share.
        self._storing: dict[str, asyncio.Future[None]] = {}
        #: Workflows registered with ``@workflow(schedule=...)``, by schedule name.
        self._scheduled: dict[str, Workflow[Any]] = {}
        self._storing_schedules: asyncio.Task[None] | None = None

    def _declare_schedule(self, wf: Any) -> None:
        if isinstance(wf, Workflow) and wf.schedule is not None:
            self._scheduled[schedules.check_name(wf.schedule.name or wf.name)] = wf

    def _store_schedules(self) -> None:
        """Store, in the background, the schedules of the workflows registered with one."""
        task = self._storing_schedules
        if self._scheduled and (task is None or task.done()):
            self._storing_schedules = asyncio.get_running_loop().create_task(
                self._store_declared(dict(self._scheduled)), name="substantial-schedules"
            )

    async def _store_declared(self, pending: dict[str, Workflow[Any]]) -> None:
        # A store that is down when the worker starts is retried, as the worker retries it.
        pause = 1.0
        while pending:
            for name, wf in list(pending.items()):
                assert wf.schedule is not None
                try:
                    await self.schedule(name, wf, **wf.schedule.settings())
                except BackendUnavailable as exc:
                    logger.warning("schedule %r not stored yet, retrying: %s", name, exc)
                    continue
                except SubstantialError as exc:
                    logger.error("schedule %r of workflow %r not stored: %s", name, wf.name, exc)
                del pending[name]
            if pending:
                await asyncio.sleep(pause)
                pause = min(2 * pause, 60.0)

    async def _queue_ready(self, name: str) -> None:
        if name in self._stored_queues:
            return
        # A burst of starts into a queue not yet checked: one check, not one per start.
        pending = self._storing.get(name)
        if pending is None or pending.get_loop() is not asyncio.get_running_loop():
            pending = self._storing[name] = asyncio.ensure_future(self._store_queue(name))
            pending.add_done_callback(functools.partial(self._stored, name))
        await asyncio.shield(pending)

    def _stored(self, name: str, check: asyncio.Future[None]) -> None:
        if self._storing.get(name) is check:
            del self._storing[name]  # done: the next start looks at _stored_queues, or retries

    async def _store_queue(self, name: str) -> None:
        declared = self.queues.get(name)
        if declared is not None:
            await queues.ensure_queue(self.backend, declared)
        elif await self.backend.get_run(queues.queue_run_id(name)) is None:
            raise InvalidArgument(
                f"no queue named {name!r}: declare it, Conductor(backend, "
                f"queues=[Queue({name!r}, concurrency=...)])"
            )
        self._stored_queues.add(name)

    async def _enqueue(
        self,
        record: StartRecord,
        queue: str | None,
        chosen_id: bool,
        key: str | None,
        priority: int,
        dedup_id: str | None,
        delay: timedelta | float | None,
        debounce: timedelta | float | None,
    ) -> Run | None:
        """Start a run through ``queue``; None when no queue option is given (a plain start)."""
        if queue is None:
            if (key, dedup_id, delay, debounce) != (None, None, None, None) or priority:
                raise InvalidArgument(
                    "key=, priority=, dedup_id=, delay= and debounce= need queue=: "
                    "declare a Queue and start the run in it"
                )
            return None
        wait, spread = queues.check_options(key, priority, delay, debounce, dedup_id)
        queues.queue_run_id(queue)
        if dedup_id is not None:
            if chosen_id:
                raise InvalidArgument("give run_id= or dedup_id=, not both")
            # One run per dedup id: the id derives from it, and create-if-absent decides.
            record["run_id"] = f"dedup:{queue}:{dedup_id}"[:200]
        await self._queue_ready(queue)
        created = await queues.start_queued(
            self.backend, record, queue, key=key, priority=priority, delay=wait, debounce=spread
        )
        if not created and chosen_id:
            from substantial._runs import existing_start, same_start

            existing = await existing_start(self.backend, record["run_id"])
            if not same_start(existing, record):
                raise RunConflict(
                    f"run {record['run_id']!r} already exists with other arguments: "
                    "choose another run_id"
                )
        return self._me().get(record["run_id"])

    def _me(self) -> Conductor:
        return self  # type: ignore[return-value]

    async def schedule(
        self,
        name: str,
        wf: Workflow[Any] | str,
        *,
        cron: str | None = None,
        every: timedelta | float | None = None,
        kwargs: dict[str, Any] | None = None,
        tz: str = "UTC",
        catch_up: str = "latest",
        jitter: timedelta | float | None = None,
    ) -> schedules.Schedule:
        """Start ``wf`` on a timetable: ``cron="*/5 * * * *"`` (in ``tz``) or ``every=timedelta``.

        The schedule is stored in the backend under ``name`` and served by
        any worker; calling this again with the same name updates it. Each
        tick starts one run, with id ``schedule:<name>:<UTC stamp>``, whatever
        the number of workers; a workflow that takes ``scheduled_at`` gets the
        tick's time (ISO 8601, UTC). After downtime the missed ticks are all
        started (``catch_up="all"``), only the latest (``"latest"``) or none
        (``"none"``). ``jitter`` delays each tick's run by up to that much.
        ``every`` ticks are aligned to the Unix epoch.
        """
        return await schedules.schedule(
            self._me(),
            name,
            wf,
            cron=cron,
            every=every,
            kwargs=kwargs,
            tz=tz,
            catch_up=catch_up,
            jitter=jitter,
        )

    def get_schedule(self, name: str) -> schedules.Schedule:
        """Return a handle on the schedule ``name`` (pause, resume, trigger, backfill...)."""
        return schedules.Schedule(self._me(), name)

    async def list_schedules(self, *, limit: int = 1000) -> list[schedules.ScheduleInfo]:
        """Return the schedules stored in the backend, with their state."""
        return await schedules.list_schedules(self._me(), limit=limit)

    async def list_queues(self, *, limit: int = 1000) -> list[queues.QueueInfo]:
        """Return the queues stored in the backend: limits, runs waiting and running."""
        for name in self.queues:
            await self._queue_ready(name)
        return await queues.list_queues(self._me(), limit=limit)
