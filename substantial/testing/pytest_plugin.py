"""The pytest plugin of substantial: a time-skipping workflow environment per test.

Installed with substantial (entry point ``pytest11``, name ``substantial``),
like anyio's and hypothesis's plugins: it only adds fixtures, which do
nothing unless a test asks for them. ``pytest -p no:substantial`` turns it off.

::

    async def test_trial(substantial_env: WorkflowEnv) -> None:
        run = await substantial_env.start(trial, {"user": "ada"})
        assert await substantial_env.result(run) == "reminded ada"   # 30 days, at once

The fixtures are synchronous: the environment starts at the test's first
``await``, in the test's own event loop, so the test may be run by
pytest-asyncio (any mode) or anyio (asyncio backend).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from substantial.backends.base import Backend
from substantial.backends.memory import MemoryBackend
from substantial.testing._env import WorkflowEnv

__all__ = ["substantial_backend", "substantial_env", "substantial_worker_options"]


@pytest.fixture
def substantial_backend() -> Backend:
    """Give ``substantial_env`` its store: a fresh memory store; override it to use another."""
    return MemoryBackend()


@pytest.fixture
def substantial_worker_options() -> dict[str, Any]:
    """Give ``substantial_env``'s worker its options (:meth:`Conductor.run`); override them."""
    return {}


@pytest.fixture
def substantial_env(
    substantial_backend: Backend, substantial_worker_options: dict[str, Any]
) -> Iterator[WorkflowEnv]:
    """Yield a :class:`WorkflowEnv`: a worker on ``substantial_backend`` whose clock skips ahead.

    Awaiting a run's result jumps the clock past durable sleeps and
    timeouts; ``skip(delta)`` moves it on explicitly. The worker stops and
    the clock returns to real time when the test ends.
    """
    env = WorkflowEnv(backend=substantial_backend, **substantial_worker_options)
    try:
        yield env
    finally:
        env.close_after()
