"""Real crashes and real concurrency: worker processes killed with SIGKILL, and
several worker processes on one store."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from substantial import Conductor
from substantial.records import decode_entry
from tests.harness import Harness
from tests.workflows import fan_parent, hundred_steps, ten_steps

ROOT = Path(__file__).resolve().parent.parent


def spawn_worker(
    url: str, trace: Path, *extra: str, target: str = "tests.workflows:conductor"
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "SUBSTANTIAL_TEST_URL": url, "SUBSTANTIAL_TEST_TRACE": str(trace)}
    # Each worker's log goes beside the trace, for worker_logs() to show when a test fails.
    n = len(list(trace.parent.glob(f"{trace.name}.*.log")))
    with open(trace.parent / f"{trace.name}.{n}.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "substantial.cli", "worker", target, *extra],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )


def worker_logs(trace: Path) -> str:
    """Return the warnings and errors the workers of ``trace`` logged, for a failure message."""
    lines = [
        f"{log.name}: {line}"
        for log in sorted(trace.parent.glob(f"{trace.name}.*.log"))
        for line in log.read_text(errors="replace").splitlines()
        if "WARNING" in line or "ERROR" in line
    ]
    return "\n".join(lines[-60:])


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def wait_for_line(trace: Path, line: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if trace.exists() and any(
            row.rsplit(" ", 1)[0] == line for row in trace.read_text().splitlines()
        ):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{line!r} never appeared in {trace}")


async def step_records(conductor: Conductor, run_id: str) -> list[dict[str, Any]]:
    out = []
    for position, data in enumerate(await conductor.backend.read_log(run_id)):
        out.extend(r for r in decode_entry(run_id, position, data) if r["k"] == "step")
    return out


async def test_sigkill_mid_step_resumes_without_rerunning_completed_steps(
    shared_harness: Harness, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    client = Conductor(await shared_harness.open())
    client.register(hundred_steps)
    run = await client.start(hundred_steps, {"n": 100, "pause": 0.02}, run_id="crashy")
    first = spawn_worker(shared_harness.url, trace)
    try:
        await wait_for_line(trace, "crashy start 50")
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        stop(first)
    second = spawn_worker(shared_harness.url, trace)
    try:
        assert await run.result(timeout=90) == sum(range(100))
    finally:
        stop(second)
    starts = Counter(
        int(row.split()[2]) for row in trace.read_text().splitlines() if " start " in row
    )
    for i in range(100):
        if i == 50:
            assert 1 <= starts[i] <= 2, f"in-flight step ran {starts[i]} times"
        else:
            assert starts[i] == 1, f"completed step {i} ran {starts[i]} times"
    steps = await step_records(client, "crashy")
    assert [s["name"] for s in steps] == [f"step-{i}" for i in range(100)]


async def test_worker_processes_share_a_store_without_running_a_step_twice(
    shared_harness: Harness, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    client = Conductor(await shared_harness.open())
    client.register(ten_steps)
    workers = [spawn_worker(shared_harness.url, trace) for _ in range(3)]
    try:
        runs = [await client.start(ten_steps, run_id=f"multi-{i}") for i in range(30)]
        results = await asyncio.gather(*(r.result(timeout=120) for r in runs))
    finally:
        for w in workers:
            stop(w)
    assert all(res == [i * i for i in range(10)] for res in results)
    rows = [row.split() for row in trace.read_text().splitlines()]
    executed = Counter((run_id, int(i)) for run_id, i, _pid in rows)
    assert len(executed) == 300
    assert set(executed.values()) == {1}, (
        f"a step ran twice; the workers said:\n{worker_logs(trace)}"
    )
    for r in runs:
        names = [s["name"] for s in await step_records(client, r.run_id)]
        assert names == [f"sq-{i}" for i in range(10)]


async def test_sigterm_hands_runs_back_and_another_worker_finishes_them(
    shared_harness: Harness, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.txt"
    client = Conductor(await shared_harness.open())
    client.register(hundred_steps)
    run = await client.start(hundred_steps, {"n": 40, "pause": 0.02}, run_id="graceful")
    first = spawn_worker(shared_harness.url, trace)
    await wait_for_line(trace, "graceful start 10")
    t0 = time.monotonic()
    stop(first)
    assert first.returncode == 0
    assert time.monotonic() - t0 < 5
    assert (await run.status()).status == "active"
    second = spawn_worker(shared_harness.url, trace)
    try:
        assert await run.result(timeout=60) == sum(range(40))
    finally:
        stop(second)
    starts = Counter(
        int(row.split()[2]) for row in trace.read_text().splitlines() if " start " in row
    )
    assert set(starts.values()) == {1}, "a step ran twice after a graceful stop"
    pids = {row.split()[-1] for row in trace.read_text().splitlines()}
    assert len(pids) == 2, "the second worker should have finished the run"


async def test_fan_out_of_children_survives_random_sigkills(
    shared_harness: Harness, tmp_path: Path
) -> None:
    """A parent gathers 20 children of 5 steps plus 10 steps of its own while workers die."""
    trace = tmp_path / "trace.txt"
    client = Conductor(await shared_harness.open())
    client.register(fan_parent)
    run = await client.start(fan_parent, run_id="fan")
    workers = [spawn_worker(shared_harness.url, trace) for _ in range(2)]
    rng = random.Random(7)
    kills = 0
    result_task = asyncio.ensure_future(run.result(timeout=120))
    try:
        while not result_task.done():
            await asyncio.wait([result_task], timeout=rng.uniform(0.2, 0.4))
            if result_task.done() or kills >= 6:
                continue
            victim = workers.pop(rng.randrange(len(workers)))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            stop(victim)
            kills += 1
            workers.append(spawn_worker(shared_harness.url, trace))
        result = result_task.result()
    finally:
        for w in workers:
            stop(w)
    assert kills >= 2, "the run finished before the test could kill workers"
    assert result == [sum(i * 10 + j for i in range(20) for j in range(5)), sum(range(10))]
    children = await client.list(parent="fan", limit=1000)
    assert sorted(info.run_id for info in children) == sorted(f"fan:{c}" for c in range(20))
    # A step whose completion is in the log never starts again after that moment.
    recorded: dict[tuple[str, str], float] = {}
    for run_id in ["fan", *(info.run_id for info in children)]:
        log = await client.backend.read_log(run_id)
        starts = [
            r for p, e in enumerate(log) for r in decode_entry(run_id, p, e) if r["k"] == "start"
        ]
        assert len(starts) == 1, f"{run_id} was started {len(starts)} times"
        for step in await step_records(client, run_id):
            assert (run_id, step["name"]) not in recorded, "a step was recorded twice"
            recorded[(run_id, step["name"])] = step["t"]
    assert len(recorded) == 10 + 20 * 5
    for row in trace.read_text().splitlines():
        run_id, name, at, _pid = row.split()
        assert float(at) < recorded[(run_id, name)], f"{run_id} {name} ran after it was recorded"
    print(f"fan-out: {kills} SIGKILLs, {len(recorded)} steps, every result right")
