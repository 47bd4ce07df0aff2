"""The offline replay checker, export and import: check new code against stored runs, move runs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from substantial import Conductor, Context, workflow
from substantial._runs import store_run
from substantial.backends import from_url
from substantial.backends._paging import iter_runs
from substantial.backends.base import RunInfo
from substantial.backends.memory import MemoryBackend
from substantial.checker import check_store
from substantial.errors import BackendUnavailable, InvalidArgument
from substantial.portable import checksum, export_runs, import_runs, migrate, read_exported
from substantial.testing import log_records

ROOT = Path(__file__).resolve().parent.parent

FLOWS = """
from substantial import Conductor, Context, workflow

@workflow(name="order")
async def order(c: Context, item: str) -> str:
    await c.save(lambda: "reserved " + item, name="reserve")
    {middle}
    await c.receive("paid")
    return await c.save(lambda: "shipped " + item, name="ship")

conductor = Conductor("memory://")
conductor.register(order)
"""


@workflow(name="order")
async def order(c: Context, item: str) -> str:
    await c.save(lambda: "reserved " + item, name="reserve")
    await c.receive("paid")
    return await c.save(lambda: "shipped " + item, name="ship")


@workflow(name="other")
async def other(c: Context) -> int:
    return await c.save(lambda: 1, name="one")


async def seed(url: str) -> None:
    """Three finished orders, two waiting for payment, one run of a workflow the code lacks."""
    conductor = Conductor(url)
    conductor.register(order)
    conductor.register(other)
    agent = conductor.run(poll_interval=0.2)
    for n in range(5):
        run = await conductor.start(order, {"item": f"i{n}"}, run_id=f"order-{n}")
        if n < 3:
            await run.send("paid")
            await run.result(timeout=10)
    await (await conductor.start(other, run_id="other-0")).result(timeout=10)
    for n in (3, 4):
        while [r["k"] for r in await log_records(conductor.backend, f"order-{n}")][-1] != "step":
            await conductor.backend.wait_for_work(0.01)
    agent.cancel()
    await agent
    await conductor.close()


def cli(tmp_path: Path, middle: str, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "flows.py").write_text(textwrap.dedent(FLOWS.format(middle=middle)))
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"}
    return subprocess.run(
        [sys.executable, "-m", "substantial.cli", "replay", "flows:conductor", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_compatible_code_replays_every_run_and_exits_0(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    await seed(url)
    proc = cli(tmp_path, "", "--backend", url, "--workflow", "order")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "5 run(s) checked" in proc.stdout and "5 replay, 0 diverge" in proc.stdout


async def test_a_changed_sequence_is_reported_per_run_and_exits_1(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    await seed(url)
    changed = 'await c.save(lambda: "insured", name="insure")'
    proc = cli(tmp_path, changed, "--backend", url, "--json")
    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    diverged = {f["run_id"]: f for f in report["findings"] if f["kind"] == "nondeterministic"}
    # Finished runs and runs past the change diverge; the code for "other" is missing.
    assert sorted(diverged) == [f"order-{n}" for n in range(3)]
    first = diverged["order-0"]
    # The new step takes command 1 (the receive records nothing), so the log's "ship"
    # completes command 2, which the changed code never issues.
    assert first["command"] == 2 and first["position"] == 3
    assert first["recorded"].startswith("step 'ship'") and "waits" in first["requested"]
    unknown = [f for f in report["findings"] if f["kind"] == "unknown-workflow"]
    assert [f["run_id"] for f in unknown] == ["other-0"]
    assert report["checked"] == 2  # the two waiting orders replay up to where they wait


async def test_filters_select_the_runs_checked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    await seed(url)
    conductor = Conductor(url)
    conductor.register(order)
    report = await check_store(conductor.registry, conductor.backend, status="active")
    assert (report.checked, report.findings) == (2, [])
    report = await check_store(conductor.registry, conductor.backend, since=4e9)
    assert (report.checked, report.findings) == (0, [])
    await conductor.close()


async def test_an_export_checks_and_imports_elsewhere_where_waiting_runs_resume(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    await seed(url)
    source = from_url(url)
    lines = [line async for line in export_runs(source, ["order-0", "order-3"])]
    await source.close()
    (tmp_path / "runs.jsonl").write_bytes(b"".join(lines))
    proc = cli(tmp_path, "", "--file", str(tmp_path / "runs.jsonl"))
    assert proc.returncode == 0 and "2 run(s) checked" in proc.stdout, proc.stdout + proc.stderr

    laptop = Conductor(f"file://{tmp_path / 'laptop'}")
    laptop.register(order)
    assert await import_runs(laptop.backend, read_exported(lines)) == ["order-0", "order-3"]
    agent = laptop.run(poll_interval=0.2)
    assert await laptop.get("order-0").result(timeout=10) == "shipped i0"
    await laptop.get("order-3").send("paid")
    assert await laptop.get("order-3").result(timeout=10) == "shipped i3"
    agent.cancel()
    await agent
    kinds = [r["k"] for r in await log_records(laptop.backend, "order-3")]
    assert kinds.count("step") == 2, kinds  # "reserve" came with the log and did not run again
    await laptop.close()


def test_a_malformed_export_line_is_refused_naming_the_line(tmp_path: Path) -> None:
    from substantial.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="line 2 of the export"):
        list(read_exported([b"", b'{"format": "something-else"}']))


async def test_migrate_copies_every_run_verified_and_resumes_after_an_interruption(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    await seed(url)
    source, target = from_url(url), from_url(f"file://{tmp_path / 'copy'}")
    # An earlier migration died half-way through order-1: only its first entry is there.
    first = [line async for line in export_runs(source, ["order-1"])]
    partial = next(iter(read_exported(first)))
    await store_run(target, partial.info, partial.entries()[0], 0.0)
    report = await migrate(source, target)
    assert (report.copied, report.present, report.differ) == (6, 0, [])
    for run_id in ("order-0", "order-1", "order-4", "other-0"):
        assert checksum(await target.read_log(run_id)) == checksum(await source.read_log(run_id))
        assert await target.get_run(run_id) == await source.get_run(run_id)
    again = await migrate(source, target)
    assert (again.copied, again.present, again.differ) == (0, 6, [])
    await source.close()
    await target.close()
    # A different run under an existing id is reported, not overwritten; the CLI exits 1.
    clash_url = f"file://{tmp_path / 'other'}"
    clash = Conductor(clash_url)
    clash.register(other)
    agent = clash.run(poll_interval=0.2)
    await (await clash.start(other, run_id="order-0")).result(timeout=10)
    agent.cancel()
    await agent
    await clash.close()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "substantial.cli",
            "migrate",
            "--from",
            url,
            "--to",
            clash_url,
            "-j3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 1, proc.stderr
    assert "order-0: the target holds a different log" in proc.stdout
    assert "5 run(s) copied and verified, 0 already there, 1 differ" in proc.stdout


class FlakyTarget(MemoryBackend):
    """A target store that counts appends in flight and fails once, as an outage would."""

    def __init__(self, fail_append_at: int = 0, fail_final_put: bool = False) -> None:
        super().__init__()
        self.fail_append_at, self.fail_final_put = fail_append_at, fail_final_put
        self.appends = self.in_flight = self.most = 0

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        self.appends += 1
        if self.appends == self.fail_append_at:
            raise BackendUnavailable("the target went away")
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0)  # a round trip: the other copies go on meanwhile
            await super().append(run_id, position, entry)
        finally:
            self.in_flight -= 1

    async def put_run(self, info: RunInfo) -> None:
        if self.fail_final_put and info.status == "completed":
            self.fail_final_put = False  # a run's whole log is there, its final metadata not
            raise BackendUnavailable("the target went away")
        await super().put_run(info)


async def test_migrate_copies_runs_at_once_bounded_and_resumes_after_an_outage() -> None:
    source = MemoryBackend()
    conductor = Conductor(source)
    conductor.register(other)
    agent = conductor.run()
    runs = [await conductor.start(other, run_id=f"r{n:02}") for n in range(30)]
    await asyncio.gather(*(r.result(timeout=20) for r in runs))
    agent.cancel()
    await agent
    with pytest.raises(InvalidArgument, match="jobs"):
        await migrate(source, MemoryBackend(), jobs=0)

    target = FlakyTarget(fail_append_at=25)
    with pytest.raises(BackendUnavailable):
        await migrate(source, target, jobs=4)
    assert 1 < target.most <= 4  # copies overlapped, never more than jobs of them
    first_copied = len(await target.list_runs(status="completed", limit=100))
    assert 0 < first_copied < 30  # the outage cut the migration short, several runs half-way

    target.fail_final_put = True
    with pytest.raises(BackendUnavailable):
        await migrate(source, target, jobs=4)
    done: list[int] = []
    report = await migrate(source, target, jobs=4, progress=done.append)
    assert report.ok and report.copied + report.present == 30 and report.copied >= 1
    assert sorted(done) == list(range(1, 31))
    for n in range(30):
        run_id = f"r{n:02}"
        assert checksum(await target.read_log(run_id)) == checksum(await source.read_log(run_id))
        assert await target.get_run(run_id) == await source.get_run(run_id)
    assert list(await target.due(time.time() + 3600)) == []  # ended runs are not due there
    again = await migrate(source, target)
    assert (again.copied, again.present, again.differ) == (0, 30, [])


async def test_iter_runs_pages_through_every_run_in_id_order_with_filters() -> None:
    backend = MemoryBackend()
    for n in range(7):
        status = "completed" if n % 2 else "active"
        await backend.put_run(RunInfo(f"r{n}", "w" if n < 5 else "v", status, n, n))
    every = [i.run_id async for i in iter_runs(backend, page=2)]
    assert every == [f"r{n}" for n in range(7)]
    done = [i.run_id async for i in iter_runs(backend, status="completed", page=2)]
    assert done == ["r1", "r3", "r5"]
    late = [i.run_id async for i in iter_runs(backend, workflow="w", since=2, page=2)]
    assert late == ["r2", "r3", "r4"]
