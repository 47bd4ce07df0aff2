"""Run surgery: resume after a fix, fork at a position, restart; each recorded in both logs."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from substantial import (
    Conductor,
    Context,
    InvalidArgument,
    NonDeterminismError,
    RetryPolicy,
    RunNotFound,
    StepFailed,
    WorkflowFailed,
    workflow,
)
from substantial.testing import log_records, replay, running

ran: Counter[str] = Counter()
broken = {"charge": True}
ONCE = RetryPolicy(max_attempts=1)


def charge() -> str:
    ran["charge"] += 1
    if broken["charge"]:
        raise RuntimeError("card service rejects the amount format")
    return "charged"


def counted(name: str) -> str:
    ran[name] += 1
    return name


@workflow()
async def checkout(c: Context) -> list[str]:
    done = [await c.save(lambda: counted("reserve"), name="reserve")]
    done.append(await c.save(charge, retry=RetryPolicy(max_attempts=2, initial_delay=0.01)))
    done.append(await c.save(lambda: counted("ship"), name="ship"))
    return done


async def test_a_failed_run_resumes_after_the_fix_without_repeating_completed_steps() -> None:
    ran.clear()
    broken["charge"] = True
    async with running(checkout) as conductor:
        run = await conductor.start(checkout, run_id="order-1")
        with pytest.raises(WorkflowFailed, match="rejects the amount"):
            await run.result(timeout=10)
        assert ran == {"reserve": 1, "charge": 2}
        broken["charge"] = False  # the fix is deployed
        resumed = await conductor.resume("order-1")
        assert (await resumed.status()).note.startswith("resumed by ")
        assert await resumed.result(timeout=10) == ["reserve", "charged", "ship"]
        records = await log_records(conductor.backend, "order-1")
    assert ran == {"reserve": 1, "charge": 3, "ship": 1}
    repairs = [r for r in records if r["k"] == "repair"]
    assert [r["op"] for r in repairs] == ["resume"] and "@" in repairs[0]["by"]
    assert [r["status"] for r in records if r["k"] == "end"] == ["failed", "completed"]
    assert (await replay(checkout, [[r] for r in records])).matches


@workflow()
async def waits(c: Context) -> str:
    return str(await c.receive("go"))


async def test_a_cancelled_run_resumes_and_takes_events_again() -> None:
    async with running(waits) as conductor:
        run = await conductor.start(waits, run_id="w-1")
        await run.cancel()
        while (await run.status()).status != "cancelled":
            await conductor.backend.wait_for_work(0.01)
        await conductor.resume("w-1")
        await run.send("go", "now")
        assert await run.result(timeout=10) == "now"


@workflow(timeout=0.2)
async def slow(c: Context) -> str:
    await c.sleep(0.5)
    return await c.save(lambda: "late but done", name="finish")


async def test_a_timed_out_run_resumes_with_a_new_deadline() -> None:
    async with running(slow) as conductor:
        run = await conductor.start(slow, run_id="s-1")
        with pytest.raises(WorkflowFailed, match="WorkflowTimeout"):
            await run.result(timeout=10)
        await conductor.resume("s-1", timeout=30)
        assert await run.result(timeout=10) == "late but done"
        assert (await run.status()).deadline is not None


@workflow()
async def handles_failure(c: Context) -> str:
    try:
        await c.save(charge, retry=ONCE)
    except StepFailed:
        await c.save(lambda: counted("refund"), name="refund")
        raise
    return "paid"


async def test_resume_refuses_what_cannot_be_resumed() -> None:
    broken["charge"] = True
    async with running(handles_failure, checkout) as conductor:
        run = await conductor.start(handles_failure, run_id="h-1")
        with pytest.raises(WorkflowFailed):
            await run.result(timeout=10)
        with pytest.raises(NonDeterminismError, match="step 'refund'"):
            await conductor.resume("h-1")  # it handled the failure before ending: fork instead
        assert (await run.status()).status == "failed"
        broken["charge"] = False
        done = await conductor.start(checkout, run_id="done-1")
        await done.result(timeout=10)
        with pytest.raises(InvalidArgument, match="is completed: only failed"):
            await conductor.resume("done-1")
        with pytest.raises(RunNotFound):
            await conductor.resume("nobody")


@workflow()
async def three_then_wait(c: Context) -> str:
    for name in ("a", "b", "c"):
        await c.save(lambda name=name: counted(name), name=name)
    return str(await c.receive("go"))


async def test_fork_replays_the_first_entries_then_runs_live_and_both_logs_say_so() -> None:
    ran.clear()
    async with running(three_then_wait) as conductor:
        run = await conductor.start(three_then_wait, run_id="f-1")
        while len(await conductor.backend.read_log("f-1")) < 4:  # start, a, b, c: now it waits
            await conductor.backend.wait_for_work(0.01)
        await run.send("go", "original")
        assert await run.result(timeout=10) == "original"
        whole = await conductor.fork("f-1", new_id="f-1-copy")  # the event comes with the log
        assert await whole.result(timeout=10) == "original"
        early = await conductor.fork("f-1", at=2, new_id="f-1-early")  # start + step "a"
        await early.send("go", "early")
        assert await early.result(timeout=10) == "early"
        restarted = await conductor.restart("f-1")
        await restarted.send("go", "again")
        assert await restarted.result(timeout=10) == "again"
        old = await log_records(conductor.backend, "f-1")
        copy = await log_records(conductor.backend, "f-1-copy")
        with pytest.raises(InvalidArgument, match="has 8 log entries"):
            await conductor.fork("f-1", at=99)
    assert ran == {"a": 2, "b": 3, "c": 3}  # once each, again after "a" for early, all for restart
    notes = [(r["op"], r["to"]) for r in old if r["k"] == "repair"]
    assert notes == [
        ("forked", "f-1-copy"),
        ("forked", "f-1-early"),
        ("restarted", restarted.run_id),
    ]
    assert copy[0]["from"]["run_id"] == "f-1" and copy[0]["from"]["op"] == "fork"
    assert (await replay(three_then_wait, [[r] for r in old])).matches


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "substantial.cli", "runs", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )


async def test_the_cli_resumes_forks_and_restarts(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    broken["charge"] = True
    conductor = Conductor(url)
    conductor.register(checkout)
    agent = conductor.run(poll_interval=0.2)
    run = await conductor.start(checkout, run_id="cli-1")
    with pytest.raises(WorkflowFailed):
        await run.result(timeout=10)
    agent.cancel()
    await agent
    proc = await asyncio.to_thread(cli, "resume", "cli-1", "--backend", url)
    assert proc.returncode == 0, proc.stderr
    assert "resumed cli-1" in proc.stdout
    again = await asyncio.to_thread(cli, "resume", "cli-1", "--backend", url)
    assert again.returncode == 1 and "is active: only failed" in again.stderr
    broken["charge"] = False
    agent = conductor.run(poll_interval=0.2)
    assert await run.result(timeout=10) == ["reserve", "charged", "ship"]
    agent.cancel()
    await agent
    fork = await asyncio.to_thread(
        cli, "fork", "cli-1", "--at", "2", "--run-id", "cli-2", "--backend", url
    )
    assert fork.returncode == 0 and "forked cli-1 as cli-2" in fork.stdout, fork.stderr
    restart = await asyncio.to_thread(cli, "restart", "cli-1", "--backend", url)
    assert restart.returncode == 0 and "restarted cli-1 as " in restart.stdout, restart.stderr
    ids = {info.run_id for info in await conductor.list()}
    assert {"cli-1", "cli-2", restart.stdout.split()[-1]} <= ids
    await conductor.close()
