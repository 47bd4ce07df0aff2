"""Schedules: tick arithmetic (time zones, DST), the schedule run's life, and ticks started
exactly once by worker processes that are SIGKILLed and stopped."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from substantial import (
    Conductor,
    Cron,
    Every,
    InvalidArgument,
    RunNotFound,
    SerializationError,
    workflow,
)
from substantial._ticks import make_spec, next_tick, pick_due, tick_stamp, ticks_between
from substantial.backends.memory import MemoryBackend
from substantial.backends.sqlite import SQLiteBackend
from substantial.records import decode_entry
from tests.flow_workflows import declared, ticked, untimed

ROOT = Path(__file__).resolve().parent.parent


def spec(**kw: Any) -> Any:
    base: dict[str, Any] = {
        "cron": None,
        "every": None,
        "tz": "UTC",
        "catch_up": "latest",
        "jitter": None,
        "pass_time": True,
    }
    base.update(kw)
    return make_spec("ticked", None, {}, **base)


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()  # type: ignore[misc]


# -- ticks ---------------------------------------------------------------------------


def test_cron_ticks_follow_the_time_zone_across_daylight_saving() -> None:
    berlin = spec(cron="30 2 * * *", tz="Europe/Berlin")
    spring = ticks_between(berlin, utc(2025, 3, 28, 12), utc(2025, 4, 1, 12), 10)
    # 02:30 does not exist on 30 March: that day's run is at 03:00 CEST, as Debian cron does.
    assert spring == [
        utc(2025, 3, 29, 1, 30),
        utc(2025, 3, 30, 1, 0),
        utc(2025, 3, 31, 0, 30),
        utc(2025, 4, 1, 0, 30),
    ]
    autumn = ticks_between(berlin, utc(2025, 10, 25, 12), utc(2025, 10, 27, 12), 10)
    # 02:30 happens twice on 26 October: one run, at the first.
    assert autumn == [utc(2025, 10, 26, 0, 30), utc(2025, 10, 27, 1, 30)]
    hourly = spec(cron="0 * * * *", tz="Europe/Berlin")
    ticks = ticks_between(hourly, utc(2025, 10, 25, 22), utc(2025, 10, 26, 22), 100)
    assert len(ticks) == 24 and {b - a for a, b in itertools.pairwise(ticks)} == {3600}
    new_york = spec(cron="0 9 * * MON-FRI", tz="America/New_York")
    assert next_tick(new_york, utc(2025, 3, 7, 15)) == utc(2025, 3, 10, 13)  # EDT from the 9th
    seconds = spec(cron="*/15 * * * * *")
    assert ticks_between(seconds, utc(2025, 1, 1), utc(2025, 1, 1, 0, 1), 10)[:2] == [
        utc(2025, 1, 1, 0, 0, 15),
        utc(2025, 1, 1, 0, 0, 30),
    ]


def test_periodic_ticks_are_aligned_and_strictly_increasing() -> None:
    tenth = spec(every=timedelta(milliseconds=100))
    ticks = ticks_between(tenth, 1_700_000_000.05, 1_700_000_100.0, 2000)
    assert len(ticks) == 1000 and ticks[0] == 1_700_000_000.1
    assert all(b > a for a, b in itertools.pairwise(ticks))
    assert next_tick(tenth, ticks[5]) == ticks[6]  # a tick is never its own successor
    assert tick_stamp(utc(2025, 1, 1, 12)) == "20250101T120000Z"
    stamps = [tick_stamp(1_700_000_000 + i / 2) for i in range(6)]
    assert stamps == sorted(stamps), "run ids of one schedule sort in tick order"


def test_catch_up_decides_which_missed_ticks_start() -> None:
    due = [100.0, 101.0, 102.0, 103.0]
    # At 103.2 the last tick is on time (late by less than half a period), the rest missed.
    assert pick_due(spec(every=1, catch_up="all"), "s", due, 103.2) == (due, 0)
    assert pick_due(spec(every=1, catch_up="latest"), "s", due, 103.2) == ([103.0], 3)
    assert pick_due(spec(every=1, catch_up="none"), "s", due, 103.2) == ([103.0], 3)
    assert pick_due(spec(every=1, catch_up="latest"), "s", due, 104.9) == ([103.0], 3)
    assert pick_due(spec(every=1, catch_up="none"), "s", due, 104.9) == ([], 4)
    # A daily schedule picked up five minutes late is still on time (up to a minute late: not).
    daily = spec(cron="0 3 * * *", catch_up="none")
    assert pick_due(daily, "s", [utc(2025, 1, 1, 3)], utc(2025, 1, 1, 3, 0, 50))[0]
    assert not pick_due(daily, "s", [utc(2025, 1, 1, 3)], utc(2025, 1, 1, 3, 5))[0]


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({}, "exactly one of cron"),
        ({"cron": "* * * * *", "every": 5}, "exactly one of cron"),
        ({"cron": "61 * * * *"}, "invalid cron expression '61 * * * *'"),
        ({"cron": "0 0 30 2 *"}, "invalid cron expression"),
        ({"every": 0}, "every= must be at least a millisecond"),
        ({"every": 5, "tz": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ({"every": 5, "catch_up": "some"}, "catch_up= must be"),
        ({"every": 5, "jitter": -1}, "jitter= must be a duration >= 0"),
    ],
)
def test_bad_schedule_settings_are_refused_clearly(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidArgument, match=message.replace("*", r"\*")):
        spec(**kw)


# -- one process ---------------------------------------------------------------------


async def tick_runs(conductor: Conductor, workflow: str = "ticked") -> list[tuple[str, Any]]:
    """(run id, scheduled_at) of every run the schedules started, by id."""
    out = []
    for info in await conductor.list(workflow=workflow, limit=10_000):
        start = decode_entry(info.run_id, 0, (await conductor.backend.read_log(info.run_id))[0])
        out.append((info.run_id, start[0]["kwargs"].get("scheduled_at")))
    return out


async def wait_until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.02)


async def test_a_schedule_starts_one_run_per_tick_and_obeys_its_controls() -> None:
    conductor = Conductor(MemoryBackend())
    conductor.register(ticked)
    agent = conductor.run(poll_interval=0.5)
    try:
        sched = await conductor.schedule("beat", ticked, every=0.2, kwargs={"tag": "x"})
        assert await conductor.schedule("beat", ticked, every=0.2, kwargs={"tag": "x"})
        await wait_until(lambda: _count(conductor, 3))
        runs = await tick_runs(conductor)
        ticks = [datetime.fromisoformat(at).timestamp() for _, at in runs]
        assert [rid for rid, _ in runs] == [f"schedule:beat:{tick_stamp(t)}" for t in ticks], (
            "each run's id derives from its tick"
        )
        assert all(round(b - a, 6) == 0.2 for a, b in itertools.pairwise(ticks))
        info = await sched.info()
        assert (info.every, info.paused, info.kwargs) == (
            timedelta(seconds=0.2),
            False,
            {"tag": "x"},
        )
        assert [s.name for s in await conductor.list_schedules()] == ["beat"]

        await sched.pause()
        await wait_until(lambda: _paused(sched, True))
        paused_at = len(await tick_runs(conductor))
        await asyncio.sleep(0.5)
        assert len(await tick_runs(conductor)) == paused_at, "a paused schedule started a run"
        manual = await sched.trigger()
        at = datetime.fromisoformat(await manual.result(timeout=10)).timestamp()
        assert manual.run_id == f"schedule:beat:{tick_stamp(at)}"
        await sched.resume()
        await wait_until(lambda: _count(conductor, paused_at + 3))  # trigger + 2 ticks

        await sched.update(every=timedelta(seconds=0.5), kwargs={"tag": "y"})
        await wait_until(lambda: _tagged(conductor, "y"))
        await sched.delete()
        await wait_until(lambda: _deleted(conductor))
        stopped_at = len(await tick_runs(conductor))
        await asyncio.sleep(0.5)
        assert len(await tick_runs(conductor)) == stopped_at, "a deleted schedule started a run"
        # The same name creates it anew.
        await conductor.schedule("beat", ticked, every=0.2, kwargs={"tag": "z"})
        await wait_until(lambda: _tagged(conductor, "z"))
    finally:
        agent.cancel()
        await agent


async def _count(conductor: Conductor, n: int, wf: str = "ticked") -> bool:
    return len(await tick_runs(conductor, wf)) >= n


async def _paused(sched: Any, paused: bool) -> bool:
    return bool((await sched.info()).paused == paused)


async def _deleted(conductor: Conductor) -> bool:
    return await conductor.list_schedules() == []


async def _tagged(conductor: Conductor, tag: str) -> bool:
    for info in await conductor.list(workflow="ticked", limit=10_000):
        start = decode_entry(info.run_id, 0, (await conductor.backend.read_log(info.run_id))[0])
        if start[0]["kwargs"].get("tag") == tag:
            return True
    return False


async def test_a_workflow_declares_its_schedule() -> None:
    conductor = Conductor(MemoryBackend())
    conductor.register(declared)
    assert await conductor.list_schedules() == [], "stored when a worker starts, not before"
    agent = conductor.run(poll_interval=0.5)
    try:
        await wait_until(lambda: _count(conductor, 2, "declared"))
        (info,) = await conductor.list_schedules()
        assert (info.name, info.workflow, info.every, info.kwargs) == (
            "declared",
            "declared",
            timedelta(seconds=0.2),
            {"tag": "declared"},
        )
        run_id, at = (await tick_runs(conductor, "declared"))[0]
        assert await conductor.get(run_id).result(timeout=10) == f"declared {at}"
    finally:
        agent.cancel()
        await agent
    assert workflow(schedule="0 3 * * *")(declared.fn).schedule == Cron("0 3 * * *")
    assert workflow(schedule=timedelta(hours=1))(declared.fn).schedule == Every(timedelta(hours=1))
    for bad, error, message in [
        ("61 * * * *", InvalidArgument, "invalid cron expression '61 \\* \\* \\* \\*'"),
        (5, InvalidArgument, "takes a cron expression .* got 5 \\(for seconds: Every\\(5\\)\\)"),
        (Cron("0 3 * * *", tz="Mars/Olympus"), InvalidArgument, "unknown time zone 'Mars"),
        (Every(60, catch_up="some"), InvalidArgument, "catch_up= must be"),
        (Every(60, kwargs={"f": print}), SerializationError, "arguments of @workflow"),
    ]:
        with pytest.raises(error, match=message):
            workflow(schedule=bad)


async def test_backfill_and_trigger_start_each_tick_once() -> None:
    conductor = Conductor(MemoryBackend())
    sched = await conductor.schedule("daily", untimed, cron="0 6 * * *", tz="Europe/Paris")
    runs = await sched.backfill(
        datetime(2025, 1, 1, tzinfo=UTC), datetime(2025, 1, 3, 12, tzinfo=UTC)
    )
    assert [r.run_id for r in runs] == [
        "schedule:daily:20250101T050000Z",
        "schedule:daily:20250102T050000Z",
        "schedule:daily:20250103T050000Z",
    ]
    again = await sched.backfill(utc(2025, 1, 2), utc(2025, 1, 4, 12))
    assert [r.run_id for r in again][:2] == [r.run_id for r in runs][1:]
    listed = [info.run_id for info in await conductor.list(workflow="untimed")]
    assert len(listed) == 4 == len(set(listed))
    with pytest.raises(InvalidArgument, match="more than 10000 runs"):
        await sched.backfill(utc(2000, 1, 1), utc(2040, 1, 1))
    with pytest.raises(RunNotFound, match="no schedule named 'nope'"):
        await conductor.get_schedule("nope").pause()
    with pytest.raises(InvalidArgument, match="invalid schedule name"):
        conductor.get_schedule("a/b")


async def test_missed_ticks_follow_catch_up_after_downtime(tmp_path: Path) -> None:
    """With no worker for a while, 'latest' starts the newest missed tick and 'none' none."""
    conductor = Conductor(SQLiteBackend(tmp_path / "s.db"))
    conductor.register(ticked)
    agent = conductor.run(poll_interval=0.5)
    period = 0.25
    await conductor.schedule("latest", ticked, every=period, catch_up="latest", kwargs={"tag": "l"})
    await conductor.schedule("none", ticked, every=period, catch_up="none", kwargs={"tag": "n"})
    await wait_until(lambda: _both_ticked(conductor, 2))
    agent.cancel()
    await agent
    down_from = time.time()
    await asyncio.sleep(5 * period)
    back_at = time.time()
    agent = conductor.run(poll_interval=0.5)
    try:
        # A tick on time after the catch-up: the schedule goes on.
        await wait_until(lambda: _both_ticked(conductor, 1, after=back_at + 0.5))
    finally:
        agent.cancel()
        await agent
    for name in ("latest", "none"):
        ticks = [
            datetime.fromisoformat(at).timestamp()
            for rid, at in await tick_runs(conductor)
            if rid.startswith(f"schedule:{name}:")
        ]
        in_gap = [t for t in ticks if down_from + period < t < back_at - 0.5]
        if name == "latest":
            assert len(in_gap) <= 1, f"'latest' started {len(in_gap)} missed ticks"
            assert any(down_from < t < back_at for t in ticks), "'latest' skipped them all"
        else:
            assert in_gap == [], f"'none' started missed ticks {in_gap}"
        missing = round((max(ticks) - min(ticks)) / period) + 1 - len(ticks)
        assert missing >= 2, f"{name}: the downtime should have cost ticks"


async def _both_ticked(conductor: Conductor, n: int, after: float = 0.0) -> bool:
    runs = await tick_runs(conductor)
    for name in ("latest", "none"):
        later = [
            at
            for rid, at in runs
            if rid.startswith(f"schedule:{name}:")
            and datetime.fromisoformat(at).timestamp() > after
        ]
        if len(later) < n:
            return False
    return True


# -- worker processes ----------------------------------------------------------------


def spawn(url: str, trace: Path, go: Path | None = None) -> Any:
    """Start a worker process; with ``go``, it starts serving once that file exists."""
    import subprocess
    import sys

    env = {**os.environ, "SUBSTANTIAL_TEST_URL": url, "SUBSTANTIAL_TEST_TRACE": str(trace)}
    if go is not None:
        env["SUBSTANTIAL_TEST_GO"] = str(go)
    return subprocess.Popen(
        [sys.executable, "-m", "tests.flow_workflows"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def halt(proc: Any) -> None:
    """Stop a worker with SIGTERM (it hands its runs back), or kill it if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except Exception:
            proc.kill()
            proc.wait()


# -- the command line ----------------------------------------------------------------


def test_schedules_and_queues_from_the_command_line(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from substantial import Queue
    from substantial.cli import main
    from tests.flow_workflows import held

    url = f"sqlite://{tmp_path / 'cli.db'}"

    async def setup() -> None:
        conductor = Conductor(url, queues=[Queue("mail", concurrency=3)])
        conductor.register(held)
        await conductor.schedule("nightly", untimed, cron="0 3 * * *", tz="Europe/Paris")
        await conductor.start(held, {"n": 1}, queue="mail")
        await conductor.close()

    asyncio.run(setup())
    cli = CliRunner()

    def call(*args: str) -> str:
        result = cli.invoke(main, [*args, "--backend", url])
        assert result.exit_code == 0, result.output
        return result.stdout

    listed = call("schedules", "list", "--json")
    assert '"name":"nightly"' in listed and '"cron":"0 3 * * *"' in listed
    assert "nightly" in call("schedules", "list")
    assert call("schedules", "pause", "nightly") == "pause sent to schedule nightly\n"
    assert call("schedules", "trigger", "nightly").startswith("started schedule:nightly:")
    filled = call(
        "schedules", "backfill", "nightly", "2025-01-01T00:00:00Z", "2025-01-02T12:00:00Z"
    )
    assert filled.split() == [
        "schedule:nightly:20250101T020000Z",
        "schedule:nightly:20250102T020000Z",
    ]
    queues = call("queues", "list", "--json")
    assert '"name":"mail"' in queues and '"concurrency":3' in queues
    assert "mail" in call("queues", "list")
    bad = cli.invoke(main, ["schedules", "pause", "nope", "--backend", url])
    assert bad.exit_code != 0 and "no schedule named 'nope'" in bad.output
    bad = cli.invoke(
        main, ["schedules", "backfill", "nightly", "yesterday", "today", "--backend", url]
    )
    assert bad.exit_code != 0 and "ISO 8601" in bad.output
