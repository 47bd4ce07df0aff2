"""Helpers for testing workflows: an in-memory store and a worker, in one call.

::

    async def test_greeting() -> None:
        async with running(greeter) as conductor:
            run = await conductor.start(greeter)
            await run.send("name", "ada")
            assert await run.result(timeout=5) == "hello, ada"
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from substantial import _clock
from substantial._crashtest import CrashPoint, CrashReport, crash_test
from substantial._offline import Replayed, replay
from substantial._timeskip import keep_time
from substantial.backends.base import Backend
from substantial.backends.memory import MemoryBackend
from substantial.conductor import Conductor
from substantial.records import Record, decode_entry
from substantial.workflow import Workflow

__all__ = [
    "CrashPoint",
    "CrashReport",
    "MemoryBackend",
    "Replayed",
    "crash_test",
    "log_records",
    "replay",
    "running",
]


@contextlib.asynccontextmanager
async def running(
    *workflows: Workflow[Any],
    backend: Backend | None = None,
    time_skipping: bool = False,
    **worker_options: Any,
) -> AsyncIterator[Conductor]:
    """Yield a Conductor on ``backend`` (a fresh memory store by default) with a worker running.

    ``worker_options`` go to :meth:`Conductor.run` (``idle_timeout``, ``lease_ttl``, ...).
    With ``time_skipping``, durable time jumps ahead whenever the test awaits
    a run and every run waits (a 30-day ``c.sleep`` ends at once, timers
    still fire in order); the clock returns to real time on exit. One
    time-skipping block at a time per process.
    """
    conductor = Conductor(backend or MemoryBackend())
    for wf in workflows:
        conductor.register(wf)
    agent = conductor.run(**worker_options)
    keeper = asyncio.create_task(keep_time(conductor, agent.worker)) if time_skipping else None
    try:
        yield conductor
    finally:
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        agent.cancel()
        await agent
        await conductor.close()
        if keeper is not None:
            _clock.reset()


async def log_records(backend: Backend, run_id: str) -> list[Record]:
    """Return every record of a run's log, in order: for assertions on what was recorded."""
    out: list[Record] = []
    for position, data in enumerate(await backend.read_log(run_id)):
        out.extend(decode_entry(run_id, position, data))
    return out
