"""Hand a run that leaves a worker's memory back to the due index, whatever fails meanwhile."""

from __future__ import annotations

from substantial import _clock
from substantial._retry import outlast
from substantial.backends.base import Backend

__all__ = ["hand_back"]


async def hand_back(backend: Backend, run_id: str, until: float | None, cap: float) -> None:
    """Make the run due at ``until`` (None: when an event comes), trying until it lands.

    It takes several calls, and one that fails may leave the run out of the index with
    an event waiting (an earlier one landed, or a lost reply did): nothing would ever
    take it again. So during an outage the whole is tried again.
    """
    await outlast(lambda: _hand_back(backend, run_id, until), cap=cap)


async def _hand_back(backend: Backend, run_id: str, until: float | None) -> None:
    if until is None and backend.capabilities.unschedule_idle:
        # In one step the store unschedules the run only if no event waits: an event
        # posted meanwhile is seen, or makes the run due again after.
        if not await backend.unschedule_idle(run_id):
            await backend.schedule(run_id, _clock.now())
        return
    if until is None and await backend.read_inbox(run_id):
        # An event already waits: keep the run due rather than unschedule it and
        # re-schedule after, which a crash in between would leave out of the index.
        until = 0.0
    if until is not None:
        await backend.schedule(run_id, until)
    else:
        await backend.unschedule(run_id)
    # An event posted between our last inbox read and this write must not wait for the
    # timer (or, with no timer, forever): its own schedule may have been overwritten.
    if await backend.read_inbox(run_id):
        await backend.schedule(run_id, _clock.now())
