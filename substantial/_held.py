"""The runs a worker holds, and their leases: renewed while busy, left to lapse while idle.

A busy run's lease is renewed every ``lease_ttl / 3``. An idle one that waits for a
timer (or its deadline), nothing of it running, is handed back to the due index at its
wake-up time before its lease would need renewing, and the lease is left to lapse: on
S3 each renewal is a request, and a run may sleep for long. One that waits for events
alone does the same on a store that unschedules it safely (:func:`sort_held`). The
workflow stays in memory; when it wakes, the worker takes the lease again
(:func:`retake`) and carries on, unless another worker took the run meanwhile, in
which case this one drops it unwritten.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from substantial import _clock
from substantial._handback import hand_back
from substantial._live import Driver
from substantial.backends.base import Backend, RunInfo
from substantial.errors import BackendError, BackendUnavailable

__all__ = ["Holder", "LiveRun", "keep_leases", "lease_end", "park", "retake", "sort_held"]

logger = logging.getLogger("substantial.worker")


@dataclass
class LiveRun:
    """A run this worker holds: its lease, its task and its driver."""

    run_id: str
    known_at: float
    task: asyncio.Task[None] | None = None
    driver: Driver | None = None
    info: RunInfo | None = None
    #: Another worker took the lease: hand nothing back to the due index.
    lost: bool = False
    #: Until when the lease surely holds (a margin before it expires).
    lease_until: float = 0.0
    #: The driver's wake count when the idle run was handed back to the due index and its
    #: lease left to lapse (-1: not handed back); unchanged, it is still so.
    parked_wakes: int = -1

    def held_until(self, until: float) -> None:
        """Note the lease taken or renewed until ``until``: the driver need not check it."""
        self.lease_until = until
        if self.driver is not None:
            self.driver.lease_until = math.inf

    @property
    def parked(self) -> bool:
        """The idle run is in the due index and its lease left to lapse, since its last wake."""
        return self.driver is not None and self.parked_wakes == self.driver.wakes


def sort_held(
    runs: Iterable[LiveRun], events_only: bool = False
) -> tuple[list[LiveRun], list[LiveRun]]:
    """Split held runs into those whose lease is renewed and the idle ones that may park.

    One that waits for a timer is handed back due at that time: at worst it wakes then.
    One that waits for events alone parks only with ``events_only``, where the store
    unschedules it only if its inbox is empty, in one step
    (``capabilities.unschedule_idle``). Elsewhere it keeps its lease (until
    ``idle_timeout``): handing it back takes it out of the due index, and a kill before
    the inbox is read again would strand an event that came meanwhile
    (docs/RELIABILITY.md, "Known window").
    """
    renewed: list[LiveRun] = []
    idle: list[LiveRun] = []
    for run in runs:
        driver = run.driver
        parks = (
            driver is not None and driver.idle and (events_only or driver.wakes_at() is not None)
        )
        (idle if parks else renewed).append(run)
    return renewed, idle


class Holder(Protocol):
    """The worker, as :func:`keep_leases` sees it."""

    owner: str
    lease_ttl: float
    poll_interval: float
    runs: dict[str, LiveRun]


async def keep_leases(backend: Backend, holder: Holder, period: float, now: float) -> None:
    """Renew the leases of the runs held, or park the idle ones, for the next ``period``.

    A run whose renewal or hand-back fails is logged and left to the next round; it
    never stops the others' renewals.
    """
    lives, idle = sort_held(holder.runs.values(), backend.capabilities.unschedule_idle)
    to_park = [r for r in idle if not r.parked and r.lease_until <= now + period]
    parked = await asyncio.gather(
        *(park(backend, r, holder.poll_interval) for r in to_park), return_exceptions=True
    )
    for live, done in zip(to_park, parked, strict=True):
        if done is not True:
            lives.append(live)  # it keeps its lease meanwhile
            _unexpected(live, done, "hand back")
    # Side by side: one after the other, a slow store let the last leases expire first.
    renewals = await asyncio.gather(
        *(backend.acquire_lease(r.run_id, holder.owner, holder.lease_ttl) for r in lives),
        return_exceptions=True,
    )
    down = [e for e in renewals if isinstance(e, BackendUnavailable)]
    if down:
        logger.warning("could not renew %d lease(s): %s", len(down), down[0])
    for live, held in zip(lives, renewals, strict=True):
        if isinstance(held, BaseException):
            _unexpected(live, held, "renew the lease of")
        elif held:
            live.held_until(lease_end(now, holder.lease_ttl))
        elif live.driver is not None:
            logger.warning("lost the lease of run %s; dropping it", live.run_id)
            live.lost = True
            live.driver.stop(lost=True)


def _unexpected(live: LiveRun, outcome: object, action: str) -> None:
    if not isinstance(outcome, BaseException) or isinstance(outcome, BackendUnavailable):
        return  # an outage is reported once per round, not once per run
    if not isinstance(outcome, Exception):
        raise outcome  # cancelled: the worker is stopping
    if isinstance(outcome, BackendError):
        logger.warning("could not %s run %s: %s", action, live.run_id, outcome)
    else:
        logger.error("could not %s run %s", action, live.run_id, exc_info=outcome)


def lease_end(taken_at: float, ttl: float) -> float:
    """Until when a lease taken at ``taken_at`` surely holds: a margin before it expires."""
    return taken_at + ttl - min(1.0, ttl / 3)


async def park(backend: Backend, live: LiveRun, cap: float) -> bool:
    """Hand an idle run back to the due index and let its lease lapse; False if it woke."""
    driver = live.driver
    assert driver is not None
    wakes = driver.wakes
    await hand_back(backend, live.run_id, driver.wakes_at(), cap)
    if driver.wakes != wakes or not driver.idle:
        return False  # it woke meanwhile: keep its lease
    live.parked_wakes = wakes
    driver.lease_until = live.lease_until  # woken after this, it takes the lease again
    return True


async def retake(backend: Backend, live: LiveRun, owner: str, ttl: float) -> bool:
    """Take a parked run's lapsed lease again; False (the run dropped) if it is gone."""
    now = _clock.now()
    if await backend.acquire_lease(live.run_id, owner, ttl):
        live.held_until(lease_end(now, ttl))
        return True
    logger.info("run %s was taken by another worker while parked here; dropped", live.run_id)
    live.lost = True
    return False
