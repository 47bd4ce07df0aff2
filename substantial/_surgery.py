"""Run surgery on the Conductor: resume, fork and restart runs (the work is in ``_repair``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING

from substantial import _clock
from substantial._durations import seconds
from substantial._offline import replay
from substantial._repair import fork_run, resume_run
from substantial.backends.base import Backend
from substantial.records import Record
from substantial.workflow import Registry

if TYPE_CHECKING:
    from substantial.conductor import Run

__all__ = ["Surgery"]


class Surgery:
    """Resume, fork and restart, as the Conductor offers them."""

    backend: Backend
    registry: Registry
    get: Callable[[str], Run]

    async def resume(self, run_id: str, *, timeout: timedelta | float | None = None) -> Run:
        """Make a failed, cancelled or timed-out run go on from where it stopped.

        What ended it is voided for replay (its end, failed steps and their
        attempts, a cancel, a passed deadline): the failed steps run again,
        with the code registered now and a fresh retry budget. ``timeout``
        gives the resumed run a new deadline. If this Conductor registers
        the run's workflow, the log is first replayed against it and a
        :class:`~substantial.NonDeterminismError` refuses the resume (e.g.
        the workflow handled the failure before ending: fork it instead).
        Both the log and the run's note record who resumed it and when.
        """
        limit = None if timeout is None else seconds(timeout, "resume(timeout=...)")

        async def check(records: list[tuple[int, Record]]) -> None:
            start = records[0][1]
            wf = self.registry.lookup(str(start.get("workflow")), start.get("version"))
            if wf is not None:
                last = max(position for position, _ in records) + 1
                by_position: dict[int, list[Record]] = {}
                for position, r in records:
                    by_position.setdefault(position, []).append(r)
                await replay(wf, [by_position.get(p, []) for p in range(last)])

        deadline = None if limit is None else _clock.now() + limit
        await resume_run(self.backend, run_id, deadline=deadline, check=check)
        return self.get(run_id)

    async def fork(self, run_id: str, *, at: int | None = None, new_id: str | None = None) -> Run:
        """Start a new run replaying the first ``at`` log entries of ``run_id``, then live.

        Without ``at``, the whole log less what ended the run. The new run
        (id ``new_id`` or a random one) records where it came from; the old
        run's log records the fork. Children started before the fork point
        are the old run's: the fork does not start them again.
        """
        return self.get(await fork_run(self.backend, run_id, at=at, new_id=new_id))

    async def restart(self, run_id: str, *, new_id: str | None = None) -> Run:
        """Start a new run of the same workflow, version and arguments, from the beginning."""
        return self.get(await fork_run(self.backend, run_id, at=1, new_id=new_id, op="restart"))
