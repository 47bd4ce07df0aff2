"""Outages: a store that refuses writes or stops answering never crashes a worker.

A full disk on the directory backend (ENOSPC injected at the OS write call
of one run's log) makes that run wait with backoff, its step not run again,
while the worker serves other runs; when space returns the run completes.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import time
from collections import Counter
from typing import Any

from substantial import Conductor, Context, workflow
from substantial.backends.fs import FSBackend
from tests.harness import Harness

#: Side effects of steps, counted outside the engine.
LEDGER: Counter[str] = Counter()


def effect(tag: str) -> str:
    LEDGER[tag] += 1
    return tag


@workflow()
async def one_step(c: Context, tag: str) -> str:
    return await c.save(lambda: effect(tag), name="effect")


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_a_full_disk_backs_off_without_rerunning_the_step_and_others_go_on(
    fs_harness: Harness, monkeypatch: Any
) -> None:
    LEDGER.clear()
    backend = await fs_harness.open()
    assert isinstance(backend, FSBackend)
    conductor = Conductor(backend)
    conductor.register(one_step)
    run = await conductor.start(one_step, {"tag": "full"}, run_id="full")
    log_dir = str(backend.entry_path("full", 0).parent)
    refused: list[float] = []
    disk_full = True
    real_open = os.open

    def open_on_a_full_disk(
        path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None
    ) -> int:
        # Every new file of this run's log fails as on a full file system.
        if disk_full and str(path).startswith(log_dir) and flags & (os.O_WRONLY | os.O_RDWR):
            refused.append(time.monotonic())
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", open_on_a_full_disk)
    agent = conductor.run(poll_interval=0.2, lease_ttl=2.0)
    try:
        await wait_for(lambda: refused)
        started = time.monotonic()
        # The worker serves other runs meanwhile.
        other = await conductor.start(one_step, {"tag": "other"})
        assert await other.result(timeout=30) == "other"
        window = 4.0
        await asyncio.sleep(max(0.0, started + window - time.monotonic()))
        # Over the window: the step ran once (its result waits in memory for the disk),
        # and the write was retried with growing pauses, not in a loop.
        assert LEDGER["full"] == 1
        in_window = [t for t in refused if t >= started]
        assert 2 <= len(in_window) <= 10, len(in_window)
        gaps = [b - a for a, b in itertools.pairwise(in_window)]
        assert max(gaps) > 0.5, gaps
        assert not agent.done()
        disk_full = False
        assert await run.result(timeout=30) == "full"
        assert LEDGER["full"] == 1
    finally:
        agent.cancel()
        await agent
