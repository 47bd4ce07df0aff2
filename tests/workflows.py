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


def traced_step(c: Context, name: str, value: int, pause: float) -> Any:
    """A step that notes (with the time) each time it really starts."""

    async def step() -> int:
        trace(f"{c.run_id} {name} {time.time():.6f}")
        await asyncio.sleep(pause)
        return value

    return step


@workflow()
async def fan_child(c: Context, i: int = 0) -> int:
    total = 0
    for j in range(5):
        total += await c.save(traced_step(c, f"s{j}", i * 10 + j, 0.15), name=f"s{j}")
    return total


@workflow()
async def fan_parent(c: Context, children: int = 20, steps: int = 10) -> list[int]:
    kids = asyncio.gather(*(c.child(fan_child, {"i": i}) for i in range(children)))
    own = asyncio.gather(
        *(c.save(traced_step(c, f"p{k}", k, 0.3), name=f"p{k}") for k in range(steps))
    )
    done_kids, done_own = await asyncio.gather(kids, own)
    return [sum(done_kids), sum(done_own)]


def _conductor() -> Conductor:
    conductor = Conductor(os.environ.get("SUBSTANTIAL_TEST_URL", "memory://"))
    for wf in (hundred_steps, ten_steps, collect, sleepy, fan_child, fan_parent):
        conductor.register(wf)
    return conductor


conductor = _conductor()
