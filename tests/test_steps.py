"""Where step functions run: quick sync ones inline on the loop, the others in threads."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from substantial import Context, RetryPolicy, workflow
from substantial.testing import log_records, running

names: list[str] = []
slow_from: list[int] = []


def where() -> str:
    names.append(threading.current_thread().name)
    if slow_from and len(names) >= slow_from[0]:
        time.sleep(0.005)
    return names[-1]


@workflow()
async def five_calls(c: Context) -> list[str]:
    return [await c.save(where) for _ in range(5)]


def threaded(name: str) -> bool:
    return name.startswith("substantial-step")


async def test_a_quick_sync_step_runs_inline_after_one_call_in_a_thread() -> None:
    names.clear()
    slow_from.clear()
    async with running(five_calls) as conductor:
        got = await (await conductor.start(five_calls)).result(timeout=10)
    assert threaded(got[0])
    assert got[1:] == [threading.current_thread().name] * 4


async def test_a_step_that_turns_slow_goes_back_to_a_thread() -> None:
    names.clear()
    slow_from[:] = [3]  # the third call takes 5 ms, over the 1 ms bar
    async with running(five_calls) as conductor:
        got = await (await conductor.start(five_calls)).result(timeout=10)
    assert [threaded(n) for n in got] == [True, False, False, True, True]


async def test_inline_below_zero_keeps_every_sync_step_in_a_thread() -> None:
    names.clear()
    slow_from.clear()
    async with running(five_calls, inline_below=0) as conductor:
        got = await (await conductor.start(five_calls)).result(timeout=10)
    assert all(threaded(n) for n in got)


barrier = threading.Barrier(4, timeout=10)


def meet() -> int:
    time.sleep(0.01)
    return barrier.wait()  # breaks (and fails the step) unless all four run at once


@workflow()
async def two_gathers(c: Context) -> list[int]:
    first = await asyncio.gather(*(c.save(meet, retry=RetryPolicy(1)) for _ in range(4)))
    second = await asyncio.gather(*(c.save(meet, retry=RetryPolicy(1)) for _ in range(4)))
    return sorted(first) + sorted(second)


async def test_a_gather_of_blocking_sync_steps_still_runs_them_at_once() -> None:
    barrier.reset()
    async with running(two_gathers) as conductor:
        got = await (await conductor.start(two_gathers)).result(timeout=30)
    assert got == [0, 1, 2, 3, 0, 1, 2, 3]


attempts: list[int] = []


def fails_on_second_call() -> int:
    attempts.append(1)
    if len(attempts) == 2:
        raise RuntimeError("second call fails")
    return len(attempts)


@workflow()
async def retried_inline(c: Context) -> list[int]:
    policy = RetryPolicy(max_attempts=3, initial_delay=0.01)
    return [await c.save(fails_on_second_call, retry=policy) for _ in range(2)]


async def test_an_inline_step_that_fails_is_retried_and_the_attempt_recorded() -> None:
    attempts.clear()
    async with running(retried_inline) as conductor:
        run = await conductor.start(retried_inline)
        assert await run.result(timeout=10) == [1, 3]
        records = await log_records(conductor.backend, run.run_id)
    failed = [r for r in records if r["k"] == "attempt"]
    assert len(failed) == 1 and failed[0]["error"]["message"] == "second call fails"


async def doubled(n: int) -> int:
    await asyncio.sleep(0)
    return 2 * n


def makes_a_coroutine(n: int) -> Any:
    return doubled(n)


@workflow()
async def awaitable_results(c: Context) -> list[int]:
    return [await c.save(lambda n=n: makes_a_coroutine(n)) for n in range(4)]


async def test_a_sync_step_returning_an_awaitable_is_awaited_wherever_it_ran() -> None:
    async with running(awaitable_results) as conductor:
        got = await (await conductor.start(awaitable_results)).result(timeout=10)
    assert got == [0, 2, 4, 6]


calls: list[int] = []


async def counted() -> int:
    calls.append(1)
    return len(calls)


@workflow()
async def one_async_step(c: Context) -> int:
    return await c.save(counted)


async def test_a_command_whose_work_dies_unexpectedly_hands_the_run_back(
    monkeypatch: Any, caplog: Any
) -> None:
    """A bug outside the step function (here the step-call hook) must not leave the run
    waiting forever for a completion that will never come: the run is handed back,
    taken up again, and finishes."""
    import substantial._steps as steps_module

    calls.clear()
    broken: list[int] = []

    def hook(run_id: str, c: int, name: str | None) -> None:
        if not broken:
            broken.append(1)
            raise RuntimeError("broken hook")

    monkeypatch.setattr(steps_module, "watch", hook)
    async with running(one_async_step, poll_interval=0.05) as conductor:
        got = await (await conductor.start(one_async_step)).result(timeout=20)
    assert got == 1  # the step function itself ran once: the hook failed before it
    assert broken == [1]
    assert any("failed unexpectedly" in r.getMessage() for r in caplog.records)
