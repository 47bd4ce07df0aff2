"""Time skipping for tests: a month-long sleep ends at once, in the right order.

While a client awaits a run (``result``, ``read``, ``stream``) and every run
the worker holds is blocked on a timer, an event or a child, the engine's
clock jumps to the next timer, deadline or due time, as Temporal's
time-skipping test server does. Events the test has yet to send are not
skipped past: nothing jumps while no client waits.
"""

from __future__ import annotations

import asyncio
import time

from substantial import _clock
from substantial.backends.base import Backend
from substantial.conductor import Conductor
from substantial.worker import Worker

__all__ = ["keep_time", "settle", "skip_time"]

#: How often (real seconds) the keeper looks whether everything waits.
TICK = 0.002
#: How far ahead (seconds) the due index is looked at: a century.
FAR = 100 * 365 * 86400.0


class _Busy:
    """Something runs, is being loaded, or is due now: time must not jump yet."""


BUSY = _Busy()


async def _next_time(worker: Worker, backend: Backend) -> float | _Busy | None:
    """Return the next time anything waits for (None: nothing), or BUSY while work is due."""
    times: list[float] = []
    for live in list(worker.runs.values()):
        driver = live.driver
        if driver is None or not driver.idle:
            return BUSY  # something runs or is being loaded
        inbox = await backend.read_inbox(live.run_id)
        if any(event.event_id not in driver.x.seen_ids for event in inbox):
            return BUSY  # an event is on its way in: it comes before any later timer
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
    target = min(times, default=None)
    if target is not None and target <= _clock.now():
        return BUSY  # due already: the worker has yet to take it
    return target


def _jump(worker: Worker, backend: Backend, target: float) -> None:
    """Move the clock to ``target`` and re-arm every held run's timers against it."""
    now = _clock.now()
    if target <= now:
        return
    _clock.advance(target - now)
    for live in list(worker.runs.values()):
        if live.driver is not None:
            live.driver.rearm()
    backend.waker.notify()


async def keep_time(conductor: Conductor, worker: Worker) -> None:
    """Jump the clock to the next thing due whenever a client waits and every run is blocked."""
    backend = conductor.backend
    while True:
        await asyncio.sleep(TICK)
        if not conductor._ended:  # no client awaits a run
            continue
        target = await _next_time(worker, backend)
        if isinstance(target, float):
            _jump(worker, backend, target)


async def settle(worker: Worker, backend: Backend, patience: float) -> float | None:
    """Wait until every run only waits; return the next time one is due (None: never).

    Raises ``TimeoutError`` if runs are still busy after ``patience`` real seconds.
    """
    give_up = time.monotonic() + patience
    while isinstance(target := await _next_time(worker, backend), _Busy):
        if time.monotonic() > give_up:
            raise TimeoutError
        await asyncio.sleep(TICK)
    return target


async def skip_time(worker: Worker, backend: Backend, seconds: float, patience: float) -> None:
    """Move the clock ``seconds`` ahead, letting each timer on the way fire at its own time.

    Between jumps the runs settle (their steps run, on the real clock), so a
    timer due in 2 days runs its sequel before one due in 3 days fires.
    """
    target = await settle(worker, backend, patience)  # runs just started take their time first
    end = _clock.now() + max(0.0, seconds)
    while True:
        if target is None or target > end:
            _jump(worker, backend, end)
            await settle(worker, backend, patience)
            return
        _jump(worker, backend, target)
        target = await settle(worker, backend, patience)
