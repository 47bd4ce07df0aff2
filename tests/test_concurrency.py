"""Concurrency inside a run: every asyncio shape, live and replayed from its log.

Each workflow here runs live on every backend; then its log is replayed
offline (``substantial.testing.replay``) against the same code, which must
arrive at the same end without running a single step.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest

from substantial import (
    ChildFailed,
    Conductor,
    Context,
    InvalidArgument,
    RunCancelled,
    RunNotFound,
    WorkflowFailed,
    WorkflowMisuse,
    workflow,
)
from substantial.testing import log_records, replay
from tests.harness import Harness

calls: Counter[str] = Counter()


@pytest.fixture
async def conductor(harness: Harness) -> AsyncIterator[Conductor]:
    c = Conductor(await harness.open())
    agent = c.run(poll_interval=0.5)
    yield c
    agent.cancel()
    await agent


async def finish(conductor: Conductor, wf: Any, kwargs: dict[str, Any] | None = None) -> Any:
    """Run ``wf`` to its end, then check its log replays to the same end, running nothing."""
    conductor.register(wf)
    run = await conductor.start(wf, kwargs)
    value = await run.result(timeout=20)
    entries = await conductor.backend.read_log(run.run_id)
    before = sum(calls.values())
    replayed = await replay(wf, entries)
    assert replayed.matches, (replayed.end, replayed.recorded_end)
    assert sum(calls.values()) == before, "replay ran a step"
    return value


def nap_step(name: str, seconds: float) -> Any:
    async def step() -> str:
        calls[name] += 1
        await asyncio.sleep(seconds)
        return name

    return step


@workflow()
async def gather_steps(c: Context, n: int = 10) -> dict[str, Any]:
    t0 = await c.save(time.monotonic)
    names = await asyncio.gather(*(c.save(nap_step(f"s{i}", 0.1), name=f"s{i}") for i in range(n)))
    return {"names": names, "took": await c.save(time.monotonic) - t0}


async def test_gather_of_async_steps_runs_them_at_once(conductor: Conductor) -> None:
    out = await finish(conductor, gather_steps)
    assert out["names"] == [f"s{i}" for i in range(10)]
    assert out["took"] < 0.6, "ten 100 ms steps ran one after another"


def blocking(name: str) -> Any:
    def step() -> str:
        calls[name] += 1
        time.sleep(0.1)
        return name

    return step


@workflow()
async def gather_sync_steps(c: Context) -> float:
    t0 = await c.save(time.monotonic)
    await asyncio.gather(*(c.save(blocking(f"b{i}"), name=f"b{i}") for i in range(8)))
    return float(await c.save(time.monotonic) - t0)


async def test_sync_steps_run_in_threads_concurrently(conductor: Conductor) -> None:
    assert await finish(conductor, gather_sync_steps) < 0.6


@workflow()
async def gather_timers(c: Context) -> float:
    t0 = await c.save(time.time)
    await asyncio.gather(c.sleep(0.3), c.sleep(0.6))
    return float(await c.save(time.time) - t0)


async def test_gather_of_timers_ends_with_the_longest(conductor: Conductor) -> None:
    took = await finish(conductor, gather_timers)
    assert 0.59 <= took < 1.5


@workflow()
async def task_group(c: Context) -> list[Any]:
    async with asyncio.TaskGroup() as tg:
        a = tg.create_task(c.save(nap_step("tg-a", 0.05), name="a"))
        b = tg.create_task(c.receive("go"))
        tg.create_task(c.sleep(0.05))
    return [a.result(), b.result()]


async def test_task_group_of_step_event_and_timer(conductor: Conductor) -> None:
    conductor.register(task_group)
    run = await conductor.start(task_group)
    await run.send("go", 7)
    assert await run.result(timeout=20) == ["tg-a", 7]
    replayed = await replay(task_group, await conductor.backend.read_log(run.run_id))
    assert replayed.matches


@workflow()
async def first_completed(c: Context) -> str:
    fast = asyncio.ensure_future(c.save(nap_step("fast", 0.01), name="fast"))
    slow = asyncio.ensure_future(c.sleep(30))
    done, pending = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return str(done.pop().result())


async def test_wait_first_completed_and_cancel_the_rest(conductor: Conductor) -> None:
    assert await finish(conductor, first_completed) == "fast"


@workflow()
async def timeout_races_event(c: Context, limit: float = 0.2) -> str:
    try:
        async with asyncio.timeout(limit):
            return str(await c.receive("answer"))
    except TimeoutError:
        return "timed out"


async def test_asyncio_timeout_is_a_durable_timer(conductor: Conductor) -> None:
    assert await finish(conductor, timeout_races_event) == "timed out"
    conductor.register(timeout_races_event)
    run = await conductor.start(timeout_races_event, {"limit": 30})
    await run.send("answer", "yes")
    assert await run.result(timeout=20) == "yes"
    recs = await log_records(conductor.backend, run.run_id)
    assert [r.get("for") for r in recs if r["k"] == "sleep"] == ["timer"]
    assert (await replay(timeout_races_event, await conductor.backend.read_log(run.run_id))).matches


@workflow()
async def wait_for_and_sleep(c: Context) -> list[Any]:
    t0 = await c.save(time.time)
    await asyncio.sleep(0.1)  # durable: the loop's timers are the run's timers
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(c.receive("never"), 0.1)
    return [round(await c.save(time.time) - t0, 1) >= 0.2]


async def test_asyncio_sleep_and_wait_for_are_durable(conductor: Conductor) -> None:
    assert await finish(conductor, wait_for_and_sleep) == [True]


@workflow()
async def misuse(c: Context) -> str:
    loop = asyncio.get_running_loop()
    try:
        await loop.run_in_executor(None, time.time)
    except WorkflowMisuse as exc:
        return str(exc)
    return "allowed"


async def test_io_facilities_inside_a_workflow_raise_a_clear_error(conductor: Conductor) -> None:
    message = await finish(conductor, misuse)
    assert "run_in_executor" in message and "c.save" in message


@workflow()
async def create_tasks_with_handlers(c: Context) -> list[Any]:
    seen: list[Any] = []
    c.handle("note", seen.append)
    worker = asyncio.create_task(c.save(nap_step("bg", 0.05), name="bg"))
    await c.ensure(lambda: len(seen) >= 2)
    return [await worker, seen]


async def test_create_task_beside_handlers_and_ensure(conductor: Conductor) -> None:
    conductor.register(create_tasks_with_handlers)
    run = await conductor.start(create_tasks_with_handlers)
    await run.send("note", 1)
    await run.send("note", 2)
    assert await run.result(timeout=20) == ["bg", [1, 2]]
    assert (
        await replay(create_tasks_with_handlers, await conductor.backend.read_log(run.run_id))
    ).matches


# -- children ---------------------------------------------------------------------------


@workflow()
async def square(c: Context, n: int = 0) -> int:
    return int(await c.save(lambda: n * n, name="square"))


@workflow()
async def fails(c: Context) -> None:
    raise ValueError("child broke")


@workflow()
async def parent(c: Context, n: int = 5) -> dict[str, Any]:
    values = await asyncio.gather(*(c.child(square, {"n": i}) for i in range(n)))
    try:
        await c.child(fails)
        failure = None
    except ChildFailed as exc:
        failure = [exc.status, exc.error_type, exc.message]
    return {"values": values, "failure": failure}


async def test_children_run_and_report_back(conductor: Conductor) -> None:
    conductor.register(square)
    conductor.register(fails)
    out = await finish(conductor, parent)
    assert out["values"] == [0, 1, 4, 9, 16]
    assert out["failure"] == ["failed", "ValueError", "child broke"]
    runs = await conductor.list(workflow="parent")
    children = await conductor.list(parent=runs[0].run_id)
    assert sorted(info.run_id for info in children) == sorted(
        f"{runs[0].run_id}:{c}" for c in range(6)
    )
    assert all(info.parent == runs[0].run_id for info in children)
    # Newest first, children too, paged by the cursor of the last run of a page.
    key = lambda info: (info.created_at, info.run_id)  # noqa: E731
    newest = await conductor.list(parent=runs[0].run_id, newest_first=True)
    assert newest == sorted(children, key=key, reverse=True)
    after = await conductor.list(
        parent=runs[0].run_id, newest_first=True, before=key(newest[1]), limit=2
    )
    assert after == newest[2:4]
    everything = await conductor.list(newest_first=True, limit=3)
    assert everything == sorted(await conductor.list(limit=100), key=key, reverse=True)[:3]
    with pytest.raises(InvalidArgument, match="newest_first=True"):
        await conductor.list(before=key(newest[0]))


@workflow()
async def waits_for_stop(c: Context) -> str:
    return str(await c.receive("stop"))


@workflow()
async def parent_of_sleepers(c: Context) -> list[str]:
    keep = await c.start_child(waits_for_stop, abandon=True)
    doomed = await c.start_child(waits_for_stop)
    await keep.send("stop", "kept")
    await c.receive("end-now")
    return [keep.run_id, doomed.run_id]


async def test_cancelling_a_parent_cancels_its_children_unless_abandoned(
    conductor: Conductor,
) -> None:
    conductor.register(waits_for_stop)
    conductor.register(parent_of_sleepers)
    run = await conductor.start(parent_of_sleepers)
    for _ in range(500):
        if len(await conductor.list(parent=run.run_id)) == 2:
            break
        await asyncio.sleep(0.01)
    await run.cancel()
    with pytest.raises(RunCancelled):
        await run.result(timeout=20)
    kept = conductor.get(f"{run.run_id}:0")
    doomed = conductor.get(f"{run.run_id}:1")
    assert await kept.result(timeout=20) == "kept"
    with pytest.raises(RunCancelled):
        await doomed.result(timeout=20)


# -- deadlines ----------------------------------------------------------------------------


@workflow()
async def slow_with_cleanup(c: Context) -> str:
    try:
        await c.sleep(30)
    finally:
        await c.save(lambda: calls.update(["cleanup"]) or "cleaned", name="cleanup")
    return "unreachable"


async def test_a_deadline_raises_inside_then_ends_timed_out(conductor: Conductor) -> None:
    conductor.register(slow_with_cleanup)
    before = calls["cleanup"]
    run = await conductor.start(slow_with_cleanup, timeout=0.2)
    with pytest.raises(WorkflowFailed) as err:
        await run.result(timeout=20)
    assert err.value.error_type == "WorkflowTimeout"
    assert (await run.status()).status == "timed_out"
    assert calls["cleanup"] == before + 1, "the finally block did not run its step"


@workflow(timeout=60)
async def parent_with_deadline(c: Context) -> Any:
    child = await c.start_child(waits_for_stop)
    return await child.result()


async def test_a_child_inherits_its_parents_deadline(conductor: Conductor) -> None:
    conductor.register(waits_for_stop)
    conductor.register(parent_with_deadline)
    run = await conductor.start(parent_with_deadline)
    child = conductor.get(f"{run.run_id}:0")
    for _ in range(400):  # the inherited deadline is the point, not waiting for it to pass
        with contextlib.suppress(RunNotFound):
            info = await child.status()
            break
        await asyncio.sleep(0.05)
    parent = await run.status()
    assert info.deadline is not None and parent.deadline is not None
    assert info.deadline <= parent.deadline
    await run.cancel()
    with pytest.raises(RunCancelled):
        await run.result(timeout=20)


# -- published state -------------------------------------------------------------------


@workflow()
async def progress(c: Context, n: int = 3) -> int:
    for i in range(n):
        c.publish("done", i + 1)
        c.emit("lines", f"line {i}")
        await c.save(lambda: None, name=f"work-{i}")
    await c.receive("finish")
    return n


async def test_publish_is_readable_and_emit_is_a_stream(conductor: Conductor) -> None:
    conductor.register(progress)
    run = await conductor.start(progress)
    for _ in range(500):
        if await run.read("done", timeout=5) == 3:
            break
        await asyncio.sleep(0.01)
    assert await run.read("done") == 3
    await run.send("finish")
    lines = [line async for line in run.stream("lines", timeout=20)]
    assert lines == ["line 0", "line 1", "line 2"]
    assert (await replay(progress, await conductor.backend.read_log(run.run_id))).matches


# -- the seed's continue_using with positional arguments ----------------------------------


@workflow()
async def countdown(c: Context, n: int, label: str = "go") -> str:
    if n <= 0:
        return label
    await c.continue_using(countdown, n - 1, label=label)
    return "unreachable"


async def test_continue_using_takes_positional_arguments(conductor: Conductor) -> None:
    conductor.register(countdown)
    run = await conductor.start(countdown, {"n": 2, "label": "lift-off"})
    assert await run.result(timeout=20) == "lift-off"
    assert (await conductor.get(f"{run.run_id}+2").status()).status == "completed"
