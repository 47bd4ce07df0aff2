"""Helpers for testing workflows: an in-memory store and a worker, in one call.

::

    async def test_greeting() -> None:
        async with running(greeter) as conductor:
            run = await conductor.start(greeter)
            await run.send("name", "ada")
            assert await run.result(timeout=5) == "hello, ada"
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from substantial._offline import Replayed, replay
from substantial.backends.base import Backend
from substantial.backends.memory import MemoryBackend
from substantial.conductor import Conductor
from substantial.records import Record, decode_entry
from substantial.workflow import Workflow

__all__ = ["MemoryBackend", "Replayed", "log_records", "replay", "running"]


@contextlib.asynccontextmanager
async def running(
    *workflows: Workflow[Any], backend: Backend | None = None, **worker_options: Any
) -> AsyncIterator[Conductor]:
    """Yield a Conductor on ``backend`` (a fresh memory store by default) with a worker running.

    ``worker_options`` go to :meth:`Conductor.run` (``idle_timeout``, ``lease_ttl``, ...).
    """
    conductor = Conductor(backend or MemoryBackend())
    for wf in workflows:
        conductor.register(wf)
    agent = conductor.run(**worker_options)
    try:
        yield conductor
    finally:
        agent.cancel()
        await agent
        await conductor.close()


async def log_records(backend: Backend, run_id: str) -> list[Record]:
    """Return every record of a run's log, in order: for assertions on what was recorded."""
    out: list[Record] = []
    for position, data in enumerate(await backend.read_log(run_id)):
        out.extend(decode_entry(run_id, position, data))
    return out
