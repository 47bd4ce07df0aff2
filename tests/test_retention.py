"""Retention: delete and prune ended runs through the Conductor, a worker's policy and the CLI.

The backend primitive is in the shipped suite (substantial/testing/_suite_delete.py);
here is the policy above it, on every backend: only ended runs go, never a
run a worker or a resume holds, and a delete cut short (SIGKILL) is finished
by the next.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from click.testing import CliRunner

from substantial import Conductor, Context, InvalidArgument, RunConflict, RunNotFound, workflow
from substantial._cli_retention import _keep
from substantial._retention import delete_run, prune_runs
from substantial._runs import create_run
from substantial.backends import from_url
from substantial.backends.base import Backend, Capabilities, RunInfo
from substantial.backends.memory import MemoryBackend
from substantial.cli import main
from substantial.codecs import Compress
from substantial.errors import Unsupported
from substantial.records import decode_entry, encode_entry, start_record
from substantial.retention import Retention
from tests.conftest import BACKENDS
from tests.harness import Harness

ROOT = Path(__file__).resolve().parent.parent


async def ended(
    backend: Backend,
    run_id: str,
    status: str = "completed",
    *,
    age: float = 0.0,
    workflow_name: str = "wf",
    steps: int = 2,
) -> None:
    """Store a run that ran ``steps`` steps and ended ``age`` seconds ago."""
    at = time.time() - age
    await create_run(backend, start_record(run_id, workflow_name, None, {"n": 1}, at))
    for c in range(steps):
        step = {"k": "step", "c": c, "name": "s", "value": "x" * 100}
        await backend.append(run_id, 1 + c, encode_entry([step]))
    end = {"k": "end", "status": status, "value": 1}
    await backend.append(run_id, 1 + steps, encode_entry([end]))
    info = RunInfo(run_id, workflow_name, status, at, at)  # type: ignore[arg-type]
    await backend.put_run(info)
    await backend.unschedule(run_id)


async def gone(backend: Backend, run_id: str) -> bool:
    return (
        await backend.get_run(run_id) is None
        and await backend.read_log(run_id) == []
        and await backend.read_inbox(run_id) == []
        and await backend.lease(run_id) is None
    )


async def test_delete_takes_only_ended_runs_and_says_what_to_do(backend: Backend) -> None:
    conductor = Conductor(backend)
    await ended(backend, "done")
    await create_run(backend, start_record("live", "wf", None, {}, time.time()))
    assert await conductor.delete("done") is True
    assert await gone(backend, "done")
    assert await conductor.delete("done") is False
    # A late sender (a child ending after its parent went) leaves an event and a due entry:
    # deleting the id again clears them, so no worker keeps looking at it.
    await backend.send_event("done", "child-ended.x", b"{}")
    assert await conductor.delete("done") is False
    assert await gone(backend, "done")
    assert "done" not in [r for r, _ in await backend.due(time.time() + 60)]
    with pytest.raises(InvalidArgument, match=r"'live' is active.*cancel it first"):
        await conductor.delete("live")
    assert (await backend.get_run("live")) is not None
    assert len(await backend.read_log("live")) == 1  # untouched
    # A worker holding an ended run (finishing it) keeps it from the delete.
    await ended(backend, "held")
    await backend.lease("held", "some-worker", 30)
    with pytest.raises(RunConflict, match="held by some-worker"):
        await delete_run(backend, "held", wait=0.2)
    assert len(await backend.read_log("held")) == 4


@pytest.fixture(params=[b for b in ("memory", "sqlite") if b in BACKENDS])
async def local(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A store of this machine: for what is the same on every store (the primitive is not)."""
    harness: Harness = request.getfixturevalue(f"{request.param}_harness")
    yield await harness.open()
    await harness.aclose()


async def test_prune_filters_reports_bytes_and_dry_runs(local: Backend) -> None:
    backend = local
    conductor = Conductor(backend)
    for i in range(3):
        await ended(backend, f"old-ok-{i}", age=3600)
    await ended(backend, "old-failed", "failed", age=3600)
    await ended(backend, "old-other", age=3600, workflow_name="other")
    await ended(backend, "new-ok")
    await create_run(backend, start_record("old-live", "wf", None, {}, time.time() - 3600))
    dry = await conductor.prune(older_than=60, dry_run=True)
    assert dry.dry_run and sorted(r.run_id for r in dry.runs) == [
        "old-failed",
        "old-ok-0",
        "old-ok-1",
        "old-ok-2",
        "old-other",
    ]
    sizes = [sum(map(len, await backend.read_log(r.run_id))) for r in dry.runs]
    assert all(r.bytes > size > 300 for r, size in zip(dry.runs, sizes, strict=True))
    assert dry.bytes == sum(r.bytes for r in dry.runs)
    assert len(await backend.list_runs()) == 7  # nothing went
    only = await conductor.prune(older_than=60, status="completed", workflow="wf")
    assert sorted(r.run_id for r in only.runs) == ["old-ok-0", "old-ok-1", "old-ok-2"]
    assert only.count == 3 and not only.skipped
    rest = await conductor.prune(older_than=60)
    assert sorted(r.run_id for r in rest.runs) == ["old-failed", "old-other"]
    assert sorted(i.run_id for i in await backend.list_runs()) == ["new-ok", "old-live"]
    with pytest.raises(InvalidArgument, match="cancel it first"):
        await conductor.prune(older_than=0, status="active")
    with pytest.raises(InvalidArgument, match="older_than"):
        await conductor.prune(older_than=-1)


async def test_a_policy_reads_a_bounded_slice_of_the_store_per_pass() -> None:
    """``scan`` bounds the runs read per pass; the next pass goes on from there, then wraps."""
    backend = MemoryBackend()
    for i in range(5):
        await ended(backend, f"r{i}", age=60)
    await ended(backend, "r2-young")  # read, not old enough: kept
    policy = Retention(completed=30, scan=2, per_pass=10)
    cursors: dict[str, str | None] = {}
    passes = []
    for _ in range(4):
        (report,) = await policy.apply(backend, cursors=cursors)
        passes.append(([r.run_id for r in report.runs], cursors["completed"]))
    assert passes == [
        (["r0", "r1"], "r1"),
        (["r2"], "r2-young"),
        (["r3", "r4"], None),  # the end of the listing: the next pass starts over
        ([], None),
    ]
    assert [i.run_id for i in await backend.list_runs()] == ["r2-young"]
    limited = await prune_runs(backend, older_than=0, limit=0)
    assert limited.count == 0 and limited.resume_after is None


async def test_many_deleters_racing_a_resume_never_leave_half_a_run(backend: Backend) -> None:
    """Either the resume wins and the run is whole and active, or the deletes win and it is gone.

    A restart racing them copies the run or finds it gone; it never leaves a
    note where the run was.
    """
    conductor = Conductor(backend)
    outcomes = set()
    for round_ in range(2):
        run_id = f"race-{round_}"
        await ended(backend, run_id, "failed")

        async def later(coro: object, pause: float) -> object:
            await asyncio.sleep(pause)
            return await coro  # type: ignore[misc]

        resume_at = 0.003 * round_  # the resume starts with the deletes, or after
        results = await asyncio.gather(
            *(conductor.delete(run_id) for _ in range(3)),
            later(conductor.resume(run_id), resume_at),
            later(conductor.restart(run_id, new_id=f"again-{round_}"), resume_at),
            return_exceptions=True,
        )
        deletes, resumed = results[:3], results[3]
        for outcome in results:
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, RunConflict | RunNotFound | InvalidArgument), outcome
        info = await backend.get_run(run_id)
        if isinstance(resumed, BaseException):
            assert True in deletes
            assert await gone(backend, run_id)
            outcomes.add("deleted")
        else:
            assert True not in deletes
            assert info is not None and info.status == "active"
            log = await backend.read_log(run_id)
            notes = [decode_entry(run_id, p, e)[-1].get("op") for p, e in enumerate(log)][4:]
            assert notes in (["resume"], ["resume", "restarted"], ["restarted", "resume"])
            assert await backend.lease(run_id) is None  # the resume gave it up: workers may go
            outcomes.add("resumed")
    assert outcomes  # which won is timing; that nothing is ever half done is the test


async def test_a_delete_cut_short_after_its_fence_is_finished_and_never_resumed() -> None:
    backend = MemoryBackend()
    conductor = Conductor(backend, codec=Compress())
    await ended(conductor.backend, "cut", "failed")
    fence = {"k": "repair", "op": "delete", "by": "someone", "at": time.time()}
    await conductor.backend.append("cut", 4, encode_entry([fence]))  # then the deleter died
    with pytest.raises(RunNotFound, match="being deleted"):
        await conductor.resume("cut")
    with pytest.raises(RunNotFound, match="being deleted"):
        await conductor.fork("cut")
    assert await conductor.delete("cut") is True  # through the codec, to the store
    assert await gone(backend, "cut")


async def test_a_deleted_child_has_told_its_waiting_parent_and_a_parent_its_children() -> None:
    """What a dead worker may not have posted (a child's end, a cancel) is posted first, once."""
    backend = MemoryBackend()
    conductor = Conductor(backend)
    for run_id in ("parent", "left-child"):
        await create_run(backend, start_record(run_id, "wf", None, {}, time.time()))
    await create_run(backend, start_record("child", "wf", None, {}, time.time(), parent="parent"))
    done = {"k": "end", "status": "completed", "value": 5}
    await backend.append("child", 1, encode_entry([done]))
    await backend.put_run(RunInfo("child", "wf", "completed", 0.0, 0.0))
    assert await conductor.delete("child") is True
    (told,) = await backend.read_inbox("parent")
    assert told.event_id == "child-ended.child"
    reported = orjson.loads(told.data)["value"]
    assert reported == {"run_id": "child", "status": "completed", "value": 5}
    # A parent that ended without cancelling its children (its worker died) cancels them now.
    end = {"k": "end", "status": "failed", "error": {}, "cancel_children": ["left-child", "gone"]}
    await backend.append("parent", 1, encode_entry([end]))
    await backend.put_run(RunInfo("parent", "wf", "failed", 0.0, 0.0))
    assert await conductor.delete("parent") is True
    assert [e.event_id for e in await backend.read_inbox("left-child")] == ["parent-ended.parent"]
    assert await backend.read_inbox("gone") == []  # nothing posted to a run that is not there


async def test_a_store_that_cannot_delete_says_so() -> None:
    class NoDelete(MemoryBackend):
        name = "nodelete"
        capabilities = Capabilities(wake_ups=True, shared=False)

    backend = NoDelete()
    await ended(backend, "r")
    with pytest.raises(Unsupported, match="cannot delete runs"):
        await Conductor(backend).delete("r")
    with pytest.raises(Unsupported, match="cannot delete runs"):
        await Conductor(backend).prune(older_than=0)
    assert len(await backend.read_log("r")) == 4  # and nothing was written


@workflow(name="retained")
async def retained(c: Context, fail: bool = False) -> int:
    value = await c.save(lambda: 7)
    if fail:
        raise ValueError("failed on purpose")
    return value


async def test_a_worker_prunes_by_policy_and_one_bad_run_does_not_stop_it(tmp_path: Path) -> None:
    backend = from_url(f"sqlite:///{tmp_path / 'runs.db'}")
    conductor = Conductor(backend)
    conductor.register(retained)
    # Unreadable: metadata says completed, the log cannot be decoded.
    await backend.append("bad", 0, b"not json")
    await backend.put_run(RunInfo("bad", "retained", "completed", 0.0, 0.0))
    policy = Retention(completed=0.2, every=0.05, pause=0)
    agent = conductor.run(poll_interval=0.1, retention=policy)
    runs = [await conductor.start(retained, {"fail": i == 0}) for i in range(4)]
    failed = runs[0].run_id
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        left = {i.run_id: i.status for i in await backend.list_runs()}
        if left == {"bad": "completed", failed: "failed"}:
            break
        await asyncio.sleep(0.05)
    # The completed runs went; the failed one stays (no age for failures), the bad one too.
    assert left == {"bad": "completed", failed: "failed"}
    assert not agent.done()
    agent.cancel()
    await agent
    await backend.close()
    with pytest.raises(InvalidArgument, match=r"Retention\(failed=\.\.\.\)"):
        Retention(failed=-1)


def cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["runs", *args], env={"COLUMNS": "250"})
    return result.exit_code, result.stdout, result.stderr


def test_the_cli_deletes_and_prunes_with_a_dry_run(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'store'}"

    async def fill() -> None:
        backend = from_url(url)
        for i in range(3):
            await ended(backend, f"old-{i}", age=10 * 86400)
        await ended(backend, "old-failed", "failed", age=10 * 86400)
        await ended(backend, "recent", age=3600)
        await create_run(backend, start_record("live", "wf", None, {}, time.time() - 86400 * 30))
        await backend.close()

    asyncio.run(fill())
    code, out, _ = cli("prune", "--older-than", "7d", "--dry-run", "--backend", url)
    assert code == 0
    assert out.count("would delete old-") == 4 and "recent" not in out and "live" not in out
    assert "would delete 4 run(s)" in out
    code, out, _ = cli("prune", "--older-than", "7d", "--status", "failed", "--backend", url)
    assert code == 0 and "deleted old-failed" in out and "deleted 1 run(s)" in out
    code, out, _ = cli("prune", "--older-than", "1w", "--json", "--backend", url)
    report = orjson.loads(out)
    assert report["count"] == 3 and report["bytes"] > 0 and not report["dry_run"]
    code, out, err = cli("delete", "recent", "live", "nothing", "--backend", url)
    assert code == 1
    assert "deleted recent" in out and "no run nothing" in out
    assert "'live' is active" in err and "cancel it first" in err
    code, _, err = cli("prune", "--older-than", "soon", "--backend", url)
    assert code == 2 and "--older-than" in err
    code, _, err = cli("prune", "--older-than", "1d", "--status", "active", "--backend", url)
    assert code == 2
    assert os.listdir(tmp_path / "store" / "runs") == ["live"]
    # The worker's policy from the command line.
    result = CliRunner().invoke(main, ["worker", "app:conductor", "--keep", "active=1d"])
    assert result.exit_code == 2 and "use STATUS=AGE with an end status" in result.stderr
    policy = _keep(None, None, ("completed=7d", "failed=2w"))  # type: ignore[arg-type]
    assert policy.ages() == pytest.approx({"completed": 7 * 86400, "failed": 14 * 86400})


CRASH_PRUNE = """
import asyncio, sys
from substantial._retention import prune_runs
from substantial.backends import from_url

async def main() -> None:
    backend = from_url(sys.argv[1])
    print("ready", flush=True)
    # Each delete says so at once; a short pause leaves the killer time to act mid-way.
    await prune_runs(backend, older_than=0, pause=0.002, progress=lambda n: print(n, flush=True))

asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["fs", "sqlite"])
async def test_a_prune_killed_midway_is_finished_by_the_next(tmp_path: Path, kind: str) -> None:
    """SIGKILL mid-prune: every run is whole, or metadata only with no log and no due, or gone."""
    url = f"file://{tmp_path / 'store'}" if kind == "fs" else f"sqlite:///{tmp_path / 'r.db'}"
    backend = from_url(url)
    n = 100
    for i in range(n):
        await ended(backend, f"k{i:03d}", steps=3)
    proc = subprocess.Popen(
        [sys.executable, "-c", CRASH_PRUNE, url],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    assert (await asyncio.to_thread(proc.stdout.readline)).strip() == b"ready"
    while int(await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 60)) < n // 4:
        pass
    proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(proc.wait)
    proc.stdout.close()
    listed = await backend.list_runs(limit=n)
    assert 0 < len(listed) < n  # killed mid-way
    for info in listed:
        assert info.status == "completed"
        log = await backend.read_log(info.run_id)
        assert len(log) in (0, 5, 6), (info.run_id, len(log))  # whole (+ the fence), or none
    assert await backend.next_due_at() is None
    report = await Conductor(backend).prune(older_than=0)
    assert report.count == len(listed) and not report.skipped
    assert await backend.list_runs() == []
    await backend.close()
    if kind == "fs":
        root = tmp_path / "store"
        assert os.listdir(root / "runs") == [] and os.listdir(root / "trash") == []
