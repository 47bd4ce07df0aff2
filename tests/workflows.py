"""Workflows used by the engine tests, importable by worker subprocesses.

``conductor`` opens the backend named by $SUBSTANTIAL_TEST_URL, so a test
can run ``substantial worker tests.workflows:conductor`` against its store.
Steps append a line to $SUBSTANTIAL_TEST_TRACE so tests can count how many
times each step really ran.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from substantial import Conductor, Context, workflow


def trace(line: str) -> None:
    path = os.environ.get("SUBSTANTIAL_TEST_TRACE")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, f"{line} {os.getpid()}\n".encode())
        finally:
            os.close(fd)


@workflow()
async def hundred_steps(c: Context, n: int = 100, pause: float = 0.02) -> int:
    total = 0
    for i in range(n):

        async def step(i: int = i) -> int:
            trace(f"{c.run_id} start {i}")
            await asyncio.sleep(pause)
            trace(f"{c.run_id} end {i}")
            return i

        total += await c.save(step, name=f"step-{i}")
    return total


@workflow()
async def ten_steps(c: Context, tag: str = "") -> list[int]:
    out = []
    for i in range(10):

        def step(i: int = i) -> int:
            trace(f"{c.run_id} {i}")
            return i * i

        out.append(await c.save(step, name=f"sq-{i}"))
    return out


@workflow()
async def collect(c: Context, count: int = 3) -> list[Any]:
    got = []
    for _ in range(count):
        got.append(await c.receive("item"))
    return got


@workflow()
async def sleepy(c: Context, seconds: float = 0.5) -> float:
    t0 = await c.save(time.time)
    await c.sleep(seconds)
    return await c.save(time.time) - t0


def _conductor() -> Conductor:
    conductor = Conductor(os.environ.get("SUBSTANTIAL_TEST_URL", "memory://"))
    for wf in (hundred_steps, ten_steps, collect, sleepy):
        conductor.register(wf)
    return conductor


conductor = _conductor()
