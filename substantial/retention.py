"""A retention policy a worker applies in the background: ended runs go after an age.

``conductor.run(retention=Retention(completed=timedelta(days=7),
failed=timedelta(days=30)))`` makes the worker delete completed runs a week
after they ended and failed ones after a month, a few at a time, in a task
of its own: the runs it serves never wait for it, and a run it cannot
delete (held, changed, unreadable) is skipped and logged, never stopping it.
Every worker of a store may carry the same policy; a run's lease makes one
of them delete it.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from substantial._durations import seconds
from substantial._retention import PruneReport, prune_runs
from substantial.backends.base import Backend, make_owner
from substantial.errors import BackendError, InvalidArgument

__all__ = ["PruneReport", "Retention", "alongside"]

logger = logging.getLogger("substantial.retention")

Age = timedelta | float | None


@dataclass(frozen=True)
class Retention:
    """How long a worker keeps ended runs, per end status; None keeps them forever.

    Each pass reads at most ``scan`` runs of each status (going on where
    the last pass stopped, and from the start once through), deletes at most
    ``per_pass`` of them, ``pause`` seconds apart, so pruning stays a
    trickle beside the real work; passes come ``every`` seconds, and at once
    while a backlog fills whole passes. Listing is the cost: a store holding
    N ended runs of a status is read through once every N / ``scan`` passes.
    """

    completed: Age = None
    failed: Age = None
    cancelled: Age = None
    timed_out: Age = None
    reverted: Age = None
    continued: Age = None
    every: timedelta | float = 300.0
    per_pass: int = 1000
    scan: int = 5000
    pause: float = 0.01

    def __post_init__(self) -> None:
        for status, age in self.ages().items():
            seconds(age, f"Retention({status}=...)")
        seconds(self.every, "Retention(every=...)", positive=True)
        seconds(self.pause, "Retention(pause=...)")
        for name, n in (("per_pass", self.per_pass), ("scan", self.scan)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise InvalidArgument(f"Retention({name}=...) takes a whole number >= 1, got {n!r}")

    def ages(self) -> dict[str, timedelta | float]:
        """Return the age after which runs of each status go, for the statuses given one."""
        named = {
            "completed": self.completed,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "timed_out": self.timed_out,
            "reverted": self.reverted,
            "continued": self.continued,
        }
        return {status: age for status, age in named.items() if age is not None}

    async def apply(
        self,
        backend: Backend,
        owner: str | None = None,
        cursors: dict[str, str | None] | None = None,
    ) -> list[PruneReport]:
        """Make one pass over the store: delete what this policy no longer keeps.

        ``cursors`` (status -> run id) say where the last pass stopped; they
        are updated for the next one.
        """
        owner = owner or make_owner("retention-")
        cursors = {} if cursors is None else cursors
        reports = []
        for status, age in self.ages().items():
            report = await prune_runs(
                backend,
                older_than=age,
                status=status,
                limit=self.per_pass,
                pause=self.pause,
                owner=owner,
                after=cursors.get(status),
                scan=self.scan,
            )
            cursors[status] = report.resume_after
            for run_id, why in report.skipped.items():
                logger.info("retention left run %s: %s", run_id, why)
            reports.append(report)
        return reports

    async def keep_applying(self, backend: Backend) -> None:
        """Apply the policy every ``every`` seconds (jittered) until cancelled."""
        # An owner of its own: under the worker's, a run the worker is still finishing
        # would count as held by us.
        owner = make_owner("retention-")
        period = seconds(self.every, "Retention(every=...)", positive=True)
        if not backend.capabilities.delete:
            logger.error("retention is off: %s cannot delete runs", backend.describe())
            return
        cursors: dict[str, str | None] = {}
        backlog = False
        while True:
            # Jittered: workers started together do not all scan the store together.
            await asyncio.sleep((min(period, 1.0) if backlog else period) * random.uniform(0.5, 1))
            backlog = False
            try:
                reports = await self.apply(backend, owner, cursors)
            except BackendError as exc:
                logger.warning("retention pass failed, next one in about %.0fs: %s", period, exc)
                continue
            except Exception:  # a bug must not take the worker down with it
                logger.exception("retention pass failed")
                continue
            backlog = any(r.count >= self.per_pass for r in reports)  # more wait: go on soon
            deleted = sum(r.count for r in reports)
            if deleted:
                freed = sum(r.bytes for r in reports)
                logger.info("retention deleted %d run(s), %d bytes", deleted, freed)


class _Holder(Protocol):
    retention: Retention | None
    backend: Backend


async def alongside(main: Callable[[], Coroutine[Any, Any, None]], worker: _Holder) -> None:
    """Run ``main()`` with the worker's retention policy applied beside it; cancelling stops both.

    ``main`` is called here, not by the caller: a task cancelled before it starts would
    leave a coroutine made in advance never awaited.
    """
    if worker.retention is None:
        await main()
        return
    pruning = asyncio.ensure_future(worker.retention.keep_applying(worker.backend))
    try:
        await main()
    finally:
        pruning.cancel()
        await asyncio.gather(pruning, return_exceptions=True)
