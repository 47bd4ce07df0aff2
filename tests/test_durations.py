"""Durations a user passes are finite, in range and named when refused, live and on replay.

A NaN or infinite duration used to be stored as ``until: null`` and then
fail on the next worker (or spin a core live). Every duration and timeout
is now checked before anything is recorded, with an error that names the
argument and what to pass; the refusal happens the same way on replay, so a
workflow that catches it behaves the same on every worker.
"""

from __future__ import annotations

import asyncio
import math
from datetime import timedelta
from typing import Any

import pytest

from substantial import (
    Conductor,
    Context,
    InvalidArgument,
    RetryPolicy,
    WorkflowFailed,
    workflow,
)
from substantial.testing import log_records, running
from tests.harness import Harness

NAN, INF = math.nan, math.inf
BAD = [NAN, INF, -INF, -1, None, "5", timedelta(days=366_000 * 2)]
RAN: list[str] = []


def step() -> str:
    RAN.append("step")
    return "ran"


@workflow()
async def child_wf(c: Context) -> str:
    return "child"


@workflow()
async def refuses(c: Context) -> dict[str, Any]:
    attempts: dict[str, Any] = {
        "sleep": lambda d: c.sleep(d),
        "receive": lambda d: c.receive("go", timeout=d),
        "save": lambda d: c.save(step, timeout=d),
        "child": lambda d: c.child(child_wf, timeout=d),
    }
    refused: dict[str, list[str]] = {name: [] for name in attempts}
    for name, attempt in attempts.items():
        for bad in [NAN, INF, -1.0, None, "5"]:
            if bad is None and name != "sleep":
                continue  # None means "no timeout" for the others
            try:
                await attempt(bad)
            except InvalidArgument as exc:
                refused[name].append(str(exc))
    go = await c.receive("go")
    await c.sleep(0.01)
    return {"refused": refused, "go": go}


async def wait_idle(agent: Any, run_id: str) -> None:
    for _ in range(2000):
        live = agent.worker.runs.get(run_id)
        if live is not None and live.driver is not None and live.driver.idle:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"run {run_id} never started waiting")


async def test_primitives_refuse_bad_durations_live_and_on_another_worker(
    fs_harness: Harness,
) -> None:
    RAN.clear()
    first = Conductor(await fs_harness.open())
    first.register(refuses)
    first.register(child_wf)
    agent = first.run(poll_interval=0.2)
    await first.start(refuses, run_id="durations")
    await wait_idle(agent, "durations")
    agent.cancel()
    await agent
    # A fresh worker replays the refusals from scratch (no step of them was recorded).
    second = Conductor(await fs_harness.open())
    second.register(refuses)
    second.register(child_wf)
    agent = second.run(poll_interval=0.2)
    try:
        await second.get("durations").send("go", "now")
        out = await second.get("durations").result(timeout=30)
    finally:
        agent.cancel()
        await agent
    assert out["go"] == "now"
    refused = out["refused"]
    assert len(refused["sleep"]) == 5 and len(refused["receive"]) == 4
    assert len(refused["save"]) == 4 and len(refused["child"]) == 4
    assert "c.sleep() takes a finite number of seconds" in refused["sleep"][0]
    assert "got nan" in refused["sleep"][0] and "got inf" in refused["sleep"][1]
    assert "c.sleep() takes a number of seconds or a datetime.timedelta" in refused["sleep"][3]
    assert "c.receive(timeout=...)" in refused["receive"][0]
    assert "c.save(timeout=...)" in refused["save"][0]
    assert "c.child(timeout=...) takes a finite number of seconds above 0" in refused["child"][2]
    assert RAN == []  # a step with a bad timeout never ran
    records = await log_records(second.backend, "durations")
    sleeps = [r for r in records if r["k"] == "sleep"]
    assert len(sleeps) == 1 and math.isfinite(sleeps[0]["until"])
    assert not [r for r in records if r["k"] == "child"]


@workflow()
async def asyncio_timer(c: Context, how: str) -> str:
    await c.receive("go")
    delay = float(how.split(":")[1])
    if how.startswith("sleep"):
        await asyncio.sleep(delay)
    elif how.startswith("timeout"):
        async with asyncio.timeout(delay):
            await c.receive("never")
    else:
        await asyncio.wait_for(c.receive("never"), timeout=delay)
    return "done"


@workflow()
async def quick(c: Context) -> str:
    await c.sleep(0.01)
    return await c.save(lambda: "ok")


@pytest.mark.parametrize("how", ["sleep:nan", "timeout:inf", "wait_for:nan", "sleep:1e300"])
async def test_an_asyncio_timer_with_no_storable_due_time_fails_the_run_clearly(
    sqlite_harness: Harness, how: str
) -> None:
    async with running(
        asyncio_timer, quick, backend=await sqlite_harness.open(), poll_interval=0.2
    ) as conductor:
        bad = await conductor.start(asyncio_timer, {"how": how})
        # A run sharing the same group commits is not disturbed.
        good = await conductor.start(quick)
        await bad.send("go")
        with pytest.raises(WorkflowFailed, match="an asyncio timer of the workflow") as err:
            await bad.result(timeout=30)
        assert "pass a finite delay, or None for no timeout" in str(err.value)
        assert await good.result(timeout=30) == "ok"
        records = await log_records(conductor.backend, bad.run_id)
        assert all(math.isfinite(r["until"]) for r in records if r["k"] == "sleep")
        assert records[-1]["k"] == "end" and records[-1]["error"]["type"] == "InvalidArgument"


@pytest.mark.parametrize("bad", BAD)
def test_retry_policy_delays_are_checked(bad: Any) -> None:
    for field in ("initial_delay", "max_delay"):
        with pytest.raises(InvalidArgument, match=rf"RetryPolicy\({field}=\.\.\.\) takes"):
            RetryPolicy(**{field: bad})


@pytest.mark.parametrize("bad", [NAN, INF, 0, -1, 2.5, True, "3"])
def test_retry_policy_attempts_and_backoff_are_checked(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match=r"max_attempts=\.\.\.\) takes a whole number"):
        RetryPolicy(max_attempts=bad)
    if bad not in (2.5, True):
        with pytest.raises(InvalidArgument, match=r"backoff=\.\.\.\) takes a finite number >= 1"):
            RetryPolicy(backoff=bad)


def test_retry_delays_stay_capped_however_many_attempts() -> None:
    policy = RetryPolicy(max_attempts=10_000, initial_delay=0.5, backoff=10, max_delay=7)
    assert policy.delay(5_000) == 7.0
    assert RetryPolicy(initial_delay=0, max_attempts=10_000).delay(5_000) == 0.0
    assert RetryPolicy(initial_delay=timedelta(milliseconds=250)).initial_delay == 0.25


@pytest.mark.parametrize("bad", [NAN, INF, 0, -5, "60"])
async def test_run_timeouts_are_checked_before_anything_is_stored(bad: Any) -> None:
    with pytest.raises(InvalidArgument, match=r"@workflow\(timeout=\.\.\.\) takes"):
        workflow(timeout=bad)
    conductor = Conductor("memory://")
    conductor.register(quick)
    with pytest.raises(InvalidArgument, match=r"start\(timeout=\.\.\.\).*pass None for no dead"):
        await conductor.start(quick, run_id="never", timeout=bad)
    assert await conductor.backend.get_run("never") is None


@pytest.mark.parametrize("bad", [NAN, INF, -1, "1"])
async def test_client_waits_refuse_timeouts_that_never_or_always_expire(bad: Any) -> None:
    async with running(quick) as conductor:
        run = await conductor.start(quick)
        hint = "pass None to wait without a limit"
        with pytest.raises(InvalidArgument, match=rf"result\(timeout=\.\.\.\).*{hint}"):
            await run.result(timeout=bad)
        with pytest.raises(InvalidArgument, match=r"read\(timeout=\.\.\.\)"):
            await run.read("k", timeout=bad)
        with pytest.raises(InvalidArgument, match=r"stream\(timeout=\.\.\.\)"):
            async for _ in run.stream("s", timeout=bad):
                pass
        assert await run.result(timeout=30) == "ok"


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("lease_ttl", INF),
        ("lease_ttl", 0),
        ("idle_timeout", NAN),
        ("poll_interval", 0),
        ("poll_interval", NAN),
        ("shutdown_grace", -1),
        ("inline_below", INF),
        ("concurrency", 0),
        ("step_threads", 1.5),
    ],
)
async def test_worker_options_are_checked(option: str, bad: Any) -> None:
    conductor = Conductor("memory://")
    with pytest.raises(InvalidArgument, match=f"{option}= takes"):
        conductor.run(**{option: bad})
