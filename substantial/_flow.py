"""Flow control on the Conductor: schedules (and queues), as methods of one mixin.

The Conductor inherits :class:`FlowControl`; the work is done in
:mod:`substantial.schedules`, whose built-in workflow every Conductor
registers so that any of its workers serves any schedule.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from substantial import schedules
from substantial._schedule_flow import schedule_workflow
from substantial.backends.base import Backend
from substantial.workflow import Registry, Workflow

if TYPE_CHECKING:
    from substantial.conductor import Conductor

__all__ = ["FlowControl"]


class FlowControl:
    """Schedules, as the Conductor offers them."""

    backend: Backend
    registry: Registry

    def _register_flow(self) -> None:
        self.registry.register(schedule_workflow(self.backend))

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
