"""What the conformance suite's test classes share: the store under test and small helpers."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import pytest

from substantial.backends import from_url
from substantial.backends.base import Backend, RunInfo

__all__ = ["CHILD_TIMEOUT", "NEVER_CLOSED", "Opener", "Store", "info", "url_of"]

#: How long a child process of a race or crash test may take (a loaded machine is slow).
CHILD_TIMEOUT = 90.0

#: Opens one more client of the store under test (the suite closes them all after).
Opener = Callable[[], Awaitable[Backend]]


@dataclass(frozen=True)
class Store:
    """The backend under test, as the suite reaches it.

    ``open`` returns a new client of the one store under test (a coroutine
    function or a plain one); the suite closes every client it opened.
    ``url``, if set, opens the same store from another process with
    :func:`substantial.backends.from_url`: the cross-process race, crash
    and lifecycle tests run only then.
    """

    open: Callable[[], Backend | Awaitable[Backend]]
    url: str | None = None

    @classmethod
    def from_url(cls, url: str) -> Store:
        """Reach the store through its URL, from this process and from others."""
        return cls(lambda: from_url(url), url)


def url_of(store: Store) -> str:
    """Return the store's URL, or skip the test: other processes cannot open it."""
    if store.url is None:
        pytest.skip("Store.url is not set: other processes cannot open this store")
    return store.url


def info(run_id: str, workflow: str = "wf", status: str = "active") -> RunInfo:
    """Return fresh metadata of an active run."""
    now = time.time()
    return RunInfo(run_id, workflow, status, now, now)  # type: ignore[arg-type]


#: The seed README's pattern: make a backend, run a worker, stop it, return; close nothing.
NEVER_CLOSED = """
import asyncio
import sys

from substantial import Conductor, Context, workflow
from substantial.backends import from_url


@workflow()
async def example(c: Context, by: int = 1) -> int:
    return await c.save(lambda: 2 * by)


async def main() -> None:
    conductor = Conductor(from_url(sys.argv[1]))
    conductor.register(example)
    agent = conductor.run()
    run = await conductor.start(example, {"by": 21})
    print(await run.result(timeout=60))
    agent.cancel()
    await agent


asyncio.run(main())
"""
