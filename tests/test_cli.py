"""The ``substantial`` command on a store with real runs: list, search, show, watch, tail."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from click.testing import CliRunner, Result

from substantial import Conductor, Context, Queue, RetryPolicy, WorkflowFailed, workflow
from substantial.cli import main


@workflow()
async def kid(c: Context, x: int = 1) -> int:
    return await c.save(lambda: x * 2)


_flaky_calls: dict[str, int] = {}


@workflow()
async def busy(c: Context) -> int:
    def flaky() -> int:
        _flaky_calls[c.run_id] = _flaky_calls.get(c.run_id, 0) + 1
        if _flaky_calls[c.run_id] < 3:
            raise ValueError(f"flaky failure {_flaky_calls[c.run_id]}")
        return 7

    a = await c.save(flaky, retry=RetryPolicy(initial_delay=0.01))
    c.publish("progress", {"a": a})
    c.emit("ticks", 1)
    await c.sleep(0.05)
    b = await c.child(kid, {"x": a})
    v = await c.receive("go")
    return int(await c.save(lambda: a + b + v))


@workflow()
async def fails(c: Context, msg: str = "fatal error") -> None:
    await c.save(lambda: 1, name="prepare")
    raise RuntimeError(msg)


@workflow()
async def small(c: Context, n: int = 1) -> int:
    return n


def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
    # Wide enough that rich never folds a cell in the middle of what a test looks for.
    return CliRunner().invoke(main, list(args), env={"COLUMNS": "250", **(env or {})})


def ok(*args: str, env: dict[str, str] | None = None) -> str:
    result = invoke(*args, env=env)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SQLite store holding finished, failed, waiting and child runs."""
    url = f"sqlite:///{tmp_path_factory.mktemp('cli') / 'store.db'}"

    async def fill() -> None:
        conductor = Conductor(url)
        for wf in (kid, busy, fails, small):
            conductor.register(wf)
        agent = conductor.run(poll_interval=0.2)
        done = await conductor.start(busy, run_id="busy-done")
        waiting = await conductor.start(busy, run_id="busy-waiting")
        for i in range(3):
            await conductor.start(fails, {"msg": f"fatal {i}"}, run_id=f"fail-{i}")
        await conductor.start(fails, {"msg": "[bold]markup\x1b[31m"}, run_id="fail-hostile")
        for n in range(5):
            await conductor.start(small, {"n": n}, run_id=f"small-{n}")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            info = await conductor.backend.get_run("busy-waiting:4")
            if info is not None and info.status == "completed":
                break
            await asyncio.sleep(0.02)
        await done.send("go", 3)
        assert await done.result(timeout=20) == 24
        for n in range(5):
            assert await conductor.get(f"small-{n}").result(timeout=20) == n
        for run_id in ("fail-0", "fail-1", "fail-2", "fail-hostile"):
            with pytest.raises(WorkflowFailed):
                await conductor.get(run_id).result(timeout=20)
        assert (await waiting.status()).status == "active"
        agent.cancel()
        await agent
        await conductor.close()

    asyncio.run(fill())
    yield url


def runs_json(*args: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = orjson.loads(ok("runs", "list", "--json", *args))
    return out


def test_list_filters_by_status_workflow_parent_and_id(store: str) -> None:
    ids = {r["run_id"] for r in runs_json("--backend", store, "--status", "failed")}
    assert ids == {"fail-0", "fail-1", "fail-2", "fail-hostile"}
    ids = {r["run_id"] for r in runs_json("--backend", store, "--workflow", "small")}
    assert ids == {f"small-{n}" for n in range(5)}
    ids = {r["run_id"] for r in runs_json("--backend", store, "--parent", "busy-done")}
    assert ids == {"busy-done:4"}
    ids = {r["run_id"] for r in runs_json("--backend", store, "--id", "ail-")}
    assert ids == {"fail-0", "fail-1", "fail-2", "fail-hostile"}
    assert runs_json("--backend", store, "--since", "2h", "--status", "active") == [
        r for r in runs_json("--backend", store, "--status", "active")
    ]
    assert runs_json("--backend", store, "--since", str(time.time() + 3600)) == []
    assert {r["run_id"] for r in runs_json("--backend", store, "--until", "1h")} == set()
    waiting = runs_json("--backend", store, "--id", "busy-waiting", "--sort", "id")
    assert [r["status"] for r in waiting] == ["active", "completed"]


def test_list_sorts_and_pages(store: str) -> None:
    first = runs_json("--backend", store, "--workflow", "small", "--sort", "id", "--limit", "2")
    second = runs_json(
        "--backend", store, "--workflow", "small", "--sort", "id", "--limit", "2", "--offset", "2"
    )
    assert [r["run_id"] for r in first + second] == [f"small-{n}" for n in range(4)]
    rev = runs_json("--backend", store, "--workflow", "small", "--sort", "id", "--reverse")
    assert [r["run_id"] for r in rev] == [f"small-{n}" for n in reversed(range(5))]
    newest = runs_json("--backend", store, "--workflow", "small")
    created = [r["created_at"] for r in newest]
    assert created == sorted(created, reverse=True)
    table = ok("runs", "list", "--backend", store, "--workflow", "small", "--limit", "2")
    # Newest first stops reading once the page and one run more are found: "3+".
    assert "1-2 of 3+ runs; next page: --offset 2" in table
    assert "raise --scan-limit" not in table
    pages = [
        runs_json("--backend", store, "--workflow", "small", "--limit", "2", "--offset", str(o))
        for o in (0, 2, 4)
    ]
    assert [r["run_id"] for page in pages for r in page] == [r["run_id"] for r in newest]
    assert len(newest) == 5
    # The cursor pages without reading the runs before it; the footer gives it.
    walked: list[str] = []
    after: list[str] = []
    while page := runs_json("--backend", store, "--workflow", "small", "--limit", "2", *after):
        walked += [r["run_id"] for r in page]
        after = ["--before", f"{page[-1]['created_at']!r},{page[-1]['run_id']}"]
    assert walked == [r["run_id"] for r in newest]
    tail = newest[1]
    assert f"or --before {tail['created_at']!r},{tail['run_id']}" in table
    for bad in ("soon,x", "12.5", "nan,x"):
        result = invoke("runs", "list", "--backend", store, "--before", bad)
        assert result.exit_code == 2 and "--before" in result.output, result.output


def test_list_table_shows_status_outcome_and_parent(store: str) -> None:
    table = ok("runs", "list", "--backend", store, "--sort", "id")
    lines = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    assert "completed" in lines["busy-done"] and "24" in lines["busy-done"]
    assert "RuntimeError: fatal 1" in lines["fail-1"]
    assert "busy-done" in lines["busy-done:4"]  # the parent column
    assert "active" in lines["busy-waiting"]


def test_where_searches_results_errors_and_times(store: str) -> None:
    expr = '{"or": [{"lt": 3}, {"contains": "fatal"}]}'
    ids = {r["run_id"] for r in runs_json("--backend", store, "--where", expr)}
    assert ids == {"small-0", "small-1", "small-2", "fail-0", "fail-1", "fail-2"}
    expr = '{"and": [{"status": {"eq": "completed"}}, {"not": {"in": [0, 1, 2, 3]}}]}'
    ids = {r["run_id"] for r in runs_json("--backend", store, "--where", expr, "--sort", "id")}
    assert ids == {"small-4", "busy-done", "busy-done:4", "busy-waiting:4"}
    assert runs_json("--backend", store, "--where", '{"ended_at": {"lt": 1}}') == []
    recent = runs_json("--backend", store, "--where", '{"started_at": {"gte": "1h"}}')
    assert len(recent) == len(runs_json("--backend", store))
    ended = runs_json("--backend", store, "--where", '{"not": {"ended_at": {"gt": 0}}}')
    assert {r["run_id"] for r in ended} == {"busy-waiting"}
    result = invoke("runs", "list", "--backend", store, "--where", '{"ended_at": {"gt": "soon"}}')
    assert result.exit_code == 2 and "cannot read 'soon' as a time" in result.output


def test_malformed_where_names_the_operator(store: str) -> None:
    result = invoke("runs", "list", "--backend", store, "--where", '{"or": {"lt": 3}}')
    assert result.exit_code == 2
    assert "'or' expects a non-empty list of expressions" in result.output
    result = invoke("runs", "list", "--backend", store, "--where", '{"lt": [1]}')
    assert "'lt' expects a number or a string" in result.output
    result = invoke("runs", "list", "--backend", store, "--where", '{"like": "x"}')
    assert "unknown operator 'like'" in result.output
    result = invoke("runs", "list", "--backend", store, "--where", "{nope")
    assert result.exit_code == 2 and "--where" in result.output and "JSON" in result.output


def test_show_draws_a_readable_timeline(store: str) -> None:
    out = ok("runs", "show", "busy-done", "--backend", store)
    assert "run busy-done  workflow busy  completed after" in out
    assert "result 24" in out
    lines = out.splitlines()
    flaky = next(line for line in lines if "flaky in busy" in line)
    assert flaky.split()[0].startswith("+") and " ok " in flaky
    attempts = [line for line in lines if "attempt" in line and "failed" in line]
    assert len(attempts) == 2
    assert "ValueError: flaky failure 1" in attempts[0] and "retry +" in attempts[0]
    assert any(" sleep " in line and "until " in line for line in lines)
    assert any("child kid busy-done:4" in line and " ok " in line for line in lines)
    assert any("event go" in line and line.rstrip().endswith("3") for line in lines)
    assert 'progress = {"a":7}' in out
    assert "ticks: 1 value(s)" in out
    assert any(line.split()[:3] == ["busy-done:4", "kid", "completed"] for line in lines)
    assert any("lambda in busy" in line for line in lines)


def test_show_tells_what_an_active_run_waits_for(store: str) -> None:
    out = ok("runs", "show", "busy-waiting", "--backend", store)
    assert "active for" in out and "held by no worker" in out
    assert "waiting for an event, or a condition that an event will make true" in out


def test_show_json_and_raw(store: str) -> None:
    data = orjson.loads(ok("runs", "show", "busy-done", "--json", "--backend", store))
    assert data["status"] == "completed" and data["value"] == 24
    assert data["published"] == {"progress": {"a": 7}}
    assert data["children"] == [
        {"run_id": "busy-done:4", "workflow": "kid", "status": "completed", "error": None}
    ]
    step = next(r for r in data["rows"] if r["kind"] == "step" and r["c"] == 0)
    assert [a["n"] for a in step["attempts"]] == [1, 2] and step["value"] == 7
    assert data["records"][0]["record"]["k"] == "start"
    raw = ok("runs", "show", "busy-done", "--raw", "--backend", store).splitlines()
    assert raw[0].split()[:2] == ["0", "start"] and raw[-1].split()[1] == "end"


def test_hostile_text_is_shown_as_text(store: str) -> None:
    out = ok("runs", "show", "fail-hostile", "--backend", store)
    assert "RuntimeError: [bold]markup\\x1b[31m" in out
    assert "\x1b" not in out
    listing = ok("runs", "list", "--backend", store, "--id", "hostile")
    assert "[bold]markup\\x1b[31m" in listing and "\x1b" not in listing


def test_errors_are_one_line_saying_what_to_do(store: str, tmp_path: Path) -> None:
    result = invoke("runs", "show", "no-such-run", "--backend", store)
    assert result.exit_code == 1
    assert result.output.count("\n") == 1
    assert "no run 'no-such-run'" in result.output and "check the id" in result.output
    result = invoke("runs", "list", "--backend", "bogus://x")
    assert result.exit_code == 1 and "unknown backend URL scheme 'bogus'" in result.output
    assert result.output.count("\n") == 1
    result = invoke("runs", "send", "busy-done", "go", "1", "--backend", store)
    assert result.exit_code == 1 and "has ended (completed)" in result.output
    result = invoke("runs", "list", "--backend", store, "--since", "yesterday-ish")
    assert result.exit_code == 2 and "use ISO 8601" in result.output


def test_backend_from_environment(store: str) -> None:
    ids = orjson.loads(
        ok("runs", "list", "--json", "--id", "small-3", env={"SUBSTANTIAL_BACKEND": store})
    )
    assert [r["run_id"] for r in ids] == ["small-3"]


@pytest.fixture
async def live_store(tmp_path: Path) -> AsyncIterator[tuple[str, Conductor]]:
    url = f"sqlite:///{tmp_path / 'live.db'}"
    conductor = Conductor(url)
    for wf in (kid, busy, small):
        conductor.register(wf)
    yield url, conductor
    await conductor.close()


async def cli_in_thread(*args: str) -> Result:
    return await asyncio.to_thread(invoke, *args)


async def wait_until(check: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_workers_lists_leases_held_by_a_live_worker(
    live_store: tuple[str, Conductor],
) -> None:
    url, conductor = live_store
    agent = conductor.run(poll_interval=0.2)
    try:
        run = await conductor.start(busy, run_id="held")

        async def waiting() -> bool:
            info = await conductor.backend.get_run("held:4")
            return info is not None and info.status == "completed"

        await wait_until(waiting)
        result = await cli_in_thread("workers", "--json", "--backend", url)
        assert result.exit_code == 0, result.output
        data = orjson.loads(result.output)
        (worker,) = data["workers"]
        assert worker["runs"] == ["held"] and worker["pid"] == str(os.getpid())
        assert worker["owner"] == agent.worker.owner and not worker["gone"]
        table = await cli_in_thread("workers", "--backend", url)
        assert "held" in table.output and str(os.getpid()) in table.output
        await run.send("go", 1)
        await run.result(timeout=20)
    finally:
        agent.cancel()
        await agent
    result = await cli_in_thread("workers", "--backend", url)
    assert "no worker holds an active run" in result.output


async def test_watch_follows_a_run_until_it_ends(live_store: tuple[str, Conductor]) -> None:
    url, conductor = live_store
    agent = conductor.run(poll_interval=0.2)
    try:
        run = await conductor.start(busy, run_id="watched")
        watcher = asyncio.ensure_future(
            cli_in_thread("runs", "watch", "watched", "--interval", "0.05", "--backend", url)
        )

        async def child_done() -> bool:
            info = await conductor.backend.get_run("watched:4")
            return info is not None and info.status == "completed"

        await wait_until(child_done)
        assert not watcher.done()
        await run.send("go", 5)
        result = await asyncio.wait_for(watcher, 30)
    finally:
        agent.cancel()
        await agent
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any("flaky in busy" in line for line in lines)
    assert any("event go" in line and line.rstrip().endswith("5") for line in lines)
    assert lines[-1] == "run watched completed"


async def test_tail_prints_new_records_across_runs(live_store: tuple[str, Conductor]) -> None:
    url, conductor = live_store
    agent = conductor.run(poll_interval=0.2)
    try:
        tail = asyncio.ensure_future(
            cli_in_thread(
                "runs",
                "tail",
                "--history",
                "--workflow",
                "small",
                "--interval",
                "0.05",
                "--max-records",
                "4",
                "--backend",
                url,
            )
        )
        await conductor.start(small, {"n": 1}, run_id="tail-1")
        await conductor.get("tail-1").result(timeout=20)
        await conductor.start(small, {"n": 2}, run_id="tail-2")
        result = await asyncio.wait_for(tail, 30)
    finally:
        agent.cancel()
        await agent
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 4
    assert "tail-1  start small" in lines[0] and "tail-1  end completed 1" in lines[1]
    assert "tail-2  start small" in lines[2] and "tail-2  end completed 2" in lines[3]


async def test_show_a_resumed_run_as_active_again(live_store: tuple[str, Conductor]) -> None:
    url, conductor = live_store
    conductor.register(fails)
    agent = conductor.run(poll_interval=0.2)
    try:
        run = await conductor.start(fails, {"msg": "broken"}, run_id="resumed")
        with pytest.raises(WorkflowFailed):
            await run.result(timeout=20)
    finally:
        agent.cancel()
        await agent
    await conductor.resume("resumed")  # no worker: it stays active, its old end voided
    data = orjson.loads(
        (await cli_in_thread("runs", "show", "resumed", "--json", "--backend", url)).output
    )
    assert data["status"] == "active" and data["ended_at"] is None and data["error"] is None
    kinds = [r["kind"] for r in data["rows"]]
    assert kinds[-2:] == ["end", "repair"]  # the old end stays in the history
    assert data["rows"][-1]["label"].startswith("resumed by ")
    shown = (await cli_in_thread("runs", "show", "resumed", "--backend", url)).output
    assert "fails  active for" in shown and "resumed by" in shown


def test_list_by_queue(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'queues.db'}"

    async def fill() -> None:
        conductor = Conductor(url, queues=[Queue("mail")])
        conductor.register(small)
        for n in (1, 2):  # parked: no worker runs here
            await conductor.start(small, {"n": n}, queue="mail", run_id=f"mail-{n}")
        await conductor.start(small, {"n": 3}, run_id="not-queued")
        await conductor.close()

    asyncio.run(fill())
    found = runs_json("--queue", "mail", "--sort", "id", "--backend", url)
    assert [(r["run_id"], r["status"]) for r in found] == [
        ("mail-1", "active"),
        ("mail-2", "active"),
    ]
    table = ok("runs", "list", "--queue", "mail", "--backend", url)
    assert "waiting in queue 'mail'" in table and "not-queued" not in table
    result = invoke("runs", "list", "--queue", "nope", "--backend", url)
    assert result.exit_code == 1
    line = result.output.strip()
    assert "\n" not in line and line.startswith("Error: no queue named 'nope' in sqlite ")
    assert line.endswith(": `substantial queues list` names the queues of this store")
