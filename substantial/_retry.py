"""Store calls tried again, with backoff, while the store is unavailable."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from substantial.errors import BackendUnavailable

__all__ = ["outlast"]

T = TypeVar("T")


async def outlast(
    call: Callable[[], Awaitable[T]],
    *,
    stopping: asyncio.Event | None = None,
    first: float = 0.05,
    cap: float = 10.0,
) -> T:
    """Await the idempotent ``call()`` again, with capped jittered backoff, during an outage.

    When ``stopping`` is set meanwhile, raise CancelledError: the task ends, and
    whoever takes the run next does it again.
    """
    pause = first
    while True:
        try:
            return await call()
        except BackendUnavailable:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause * random.uniform(0.5, 1.0)):
                    await (stopping or asyncio.Event()).wait()
            if stopping is not None and stopping.is_set():
                raise asyncio.CancelledError() from None
            pause = min(pause * 2, cap)
