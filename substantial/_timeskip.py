"""Time skipping for tests: a month-long sleep ends at once, in the right order.

While a client awaits a run (``result``, ``read``, ``stream``) and every run
the worker holds is blocked on a timer, an event or a child, the engine's
clock jumps to the next timer, deadline or due time, as Temporal's
time-skipping test server does. Events the test has yet to send are not
skipped past: nothing jumps while no client waits.
"""

from __future__ import annotations

import asyncio

from substantial import _clock
from substantial.backends.base import Backend
from substantial.conductor import Conductor
from substantial.worker import Worker

__all__ = ["keep_time"]

#: How often (real seconds) the keeper looks whether everything waits.
TICK = 0.002
#: How far ahead (seconds) the due index is looked at: a century.
FAR = 100 * 365 * 86400.0


async def _next_time(worker: Worker, backend: Backend) -> float | None:
    times: list[float] = []
    for live in list(worker.runs.values()):
        driver = live.driver
        if driver is None or not driver.idle:
            return None  # something runs or is being loaded: time must not jump now
        inbox = await backend.read_inbox(live.run_id)
        if any(event.event_id not in driver.x.seen_ids for event in inbox):
            return None  # an event is on its way in: it comes before any later timer
        wakeup = driver.x.next_wakeup()
        if wakeup is not None:
            times.append(wakeup)
        if driver.deadline is not None and not driver.x.timed_out:
            times.append(driver.deadline)
    # The index also holds the runs the worker holds (at their old due time): skip those.
    horizon = _clock.now() + FAR
    for run_id, at in await backend.due(horizon, len(worker.runs) + 1):
        if run_id not in worker.runs:
            times.append(at)
            break
    return min(times, default=None)


async def keep_time(conductor: Conductor, worker: Worker) -> None:
    """Jump the clock to the next thing due whenever a client waits and every run is blocked."""
    backend = conductor.backend
    while True:
        await asyncio.sleep(TICK)
        if not conductor._ended:  # no client awaits a run
            continue
        target = await _next_time(worker, backend)
        now = _clock.now()
        if target is None or target <= now:
            continue
        _clock.advance(target - now)
        for live in list(worker.runs.values()):
            if live.driver is not None:
                live.driver.rearm()
        backend.waker.notify()
