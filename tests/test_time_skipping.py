"""The time-skipping test kit: long durable waits end at once, in order, with the right times."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from pathlib import Path

import pytest

from substantial import Context, ReceiveTimeout, WorkflowFailed, _clock, workflow
from substantial.backends import from_url
from substantial.testing import running

DAY = 86400.0


@workflow()
async def trial(c: Context) -> dict[str, float]:
    started = c.now().timestamp()
    await c.sleep(timedelta(days=30))
    reminded = c.now().timestamp()
    await asyncio.sleep(7 * DAY)  # an asyncio timer of the workflow is durable too
    ended = await c.save(lambda: time.time(), name="charge")
    return {"reminded": reminded - started, "ended": ended - started}


async def test_a_thirty_day_sleep_ends_at_once_at_its_recorded_time() -> None:
    wall = time.monotonic()
    async with running(trial, time_skipping=True) as conductor:
        got = await (await conductor.start(trial)).result(timeout=10)
    assert time.monotonic() - wall < 5
    assert 30 * DAY <= got["reminded"] < 30 * DAY + 5
    # The step ran on the worker with the jumped clock, so it saw real time: steps do
    # real I/O. The run's own clock is what moved.
    assert got["ended"] < 5
    assert _clock.offset == 0  # real time is back


@workflow()
async def race(c: Context) -> list[str]:
    order: list[str] = []

    async def after(days: float, name: str) -> None:
        await c.sleep(timedelta(days=days))
        order.append(name)

    await asyncio.gather(after(3, "third"), after(1, "first"), after(2, "second"))
    return order


async def test_timers_fire_in_due_order_whatever_the_issue_order() -> None:
    async with running(race, time_skipping=True) as conductor:
        assert await (await conductor.start(race)).result(timeout=10) == [
            "first",
            "second",
            "third",
        ]


@workflow()
async def approval(c: Context) -> str:
    try:
        return str(await c.receive("approve", timeout=timedelta(days=2)))
    except ReceiveTimeout:
        return "expired"


async def test_time_does_not_jump_past_an_event_while_no_client_waits() -> None:
    async with running(approval, time_skipping=True) as conductor:
        run = await conductor.start(approval)
        await asyncio.sleep(0.1)  # the test awaits no run: the clock stays put
        await run.send("approve", "yes")
        assert await run.result(timeout=10) == "yes"
        idle = await conductor.start(approval)
        assert await idle.result(timeout=10) == "expired"


@workflow(timeout=timedelta(hours=1))
async def overdue(c: Context) -> str:
    await c.sleep(timedelta(days=1))
    return "never"


async def test_deadlines_pass_in_skipped_time() -> None:
    async with running(overdue, time_skipping=True) as conductor:
        run = await conductor.start(overdue)
        with pytest.raises(WorkflowFailed, match="WorkflowTimeout"):
            await run.result(timeout=10)
        assert (await run.status()).status == "timed_out"


async def test_time_skipping_works_on_a_real_store(tmp_path: Path) -> None:
    backend = from_url(f"sqlite:///{tmp_path / 'runs.db'}")
    async with running(race, backend=backend, time_skipping=True) as conductor:
        assert await (await conductor.start(race)).result(timeout=10) == [
            "first",
            "second",
            "third",
        ]
