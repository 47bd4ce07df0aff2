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

from substantial._crashtest import CrashPoint, CrashReport, crash_test
from substantial._offline import Replayed, replay
from substantial.backends.base import Backend
from substantial.backends.memory import MemoryBackend
from substantial.conductor import Conductor
from substantial.testing._env import WorkflowEnv, log_records
from substantial.workflow import Workflow

__all__ = [
    "CrashPoint",
    "CrashReport",
    "MemoryBackend",
    "Replayed",
    "WorkflowEnv",
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
    time-skipping block at a time per process. :class:`WorkflowEnv` is the
    same with helpers (``skip``, ``send``, ``result``, ...).
    """
    env = WorkflowEnv(*workflows, backend=backend, time_skipping=time_skipping, **worker_options)
    async with env:
        yield env.conductor
