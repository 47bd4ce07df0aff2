"""Edge cases of the engine: fencing, crashes between writes, corruption, bad input."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest

from substantial import (
    Conductor,
    Context,
    InvalidArgument,
    ResultTimeout,
    RetryPolicy,
    RunNotFound,
    StepFailed,
    workflow,
)
from substantial.backends.memory import MemoryBackend
from substantial.records import encode_entry
from substantial.testing import log_records
from tests.harness import Harness

ROOT = Path(__file__).resolve().parent.parent


async def wait_until_waiting(conductor_agent: Any, run_id: str) -> None:
    for _ in range(1000):
        live = conductor_agent.worker.runs.get(run_id)
        if live is not None and live.driver is not None and live.driver.idle:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the run never started waiting")


@workflow()
async def two_items(c: Context) -> list[Any]:
    return [await c.receive("item"), await c.receive("item")]


async def test_a_worker_that_loses_the_append_race_stops_without_writing(
    harness: Harness,
) -> None:
    conductor = Conductor(await harness.open())
    conductor.register(two_items)
    agent = conductor.run(poll_interval=0.1)
    run = await conductor.start(two_items, run_id="fenced")
    await wait_until_waiting(agent, "fenced")
    position = len(await conductor.backend.read_log("fenced"))
    foreign = encode_entry([{"k": "log", "level": 20, "msg": "another writer was here"}])
    await conductor.backend.append("fenced", position, foreign)
    await run.send("item", 1)
    for _ in range(200):
        if "fenced" not in agent.worker.runs:
            break
        await asyncio.sleep(0.01)
    assert "fenced" not in agent.worker.runs
    agent.cancel()
    await agent
    log = await conductor.backend.read_log("fenced")
    assert len(log) == position + 1 and log[position] == foreign
    assert (await run.status()).status == "active"


async def test_an_event_recorded_but_not_acked_is_delivered_once(harness: Harness) -> None:
    conductor = Conductor(await harness.open())
    conductor.register(two_items)
    run = await conductor.start(two_items, run_id="ack-crash")
    # A worker recorded event e1 and died before deleting it from the inbox.
    await conductor.backend.post_event("ack-crash", "e1", b'{"name": "item", "value": "one"}')
    await conductor.backend.append(
        "ack-crash", 1, encode_entry([{"k": "event", "id": "e1", "name": "item", "value": "one"}])
    )
    await run.send("item", "two", event_id="e2")
    agent = conductor.run(poll_interval=0.1)
    try:
        assert await run.result(timeout=10) == ["one", "two"]
    finally:
        agent.cancel()
        await agent
    events = [
        r["id"] for r in await log_records(conductor.backend, "ack-crash") if r["k"] == "event"
    ]
    assert events == ["e1", "e2"]
    assert await conductor.backend.read_inbox("ack-crash") == []


async def test_a_corrupt_record_stops_the_run_clearly_and_leaves_the_log_alone(
    harness: Harness,
) -> None:
    conductor = Conductor(await harness.open())
    conductor.register(two_items)
    run = await conductor.start(two_items, run_id="broken")
    await conductor.backend.append(
        "broken", 1, encode_entry([{"k": "event", "id": "e1", "name": "item", "value": 1}])
    )
    await harness.corrupt_entry("broken", 1)
    before = await conductor.backend.read_log("broken")
    await run.send("item", 2)
    agent = conductor.run(poll_interval=0.1)
    try:
        for _ in range(300):
            info = await run.status()
            if info.note:
                break
            await asyncio.sleep(0.01)
    finally:
        agent.cancel()
        await agent
    assert info.status == "active"
    assert info.note is not None and "corrupt" in info.note and "record 1" in info.note
    assert await conductor.backend.read_log("broken") == before


async def handed_back(conductor: Conductor, agent: Any, run_id: str) -> None:
    """Wait until the worker has evicted the run: out of memory, with no due time."""
    for _ in range(3000):
        due = await conductor.backend.due(time.time() + 86400, 10)
        if not agent.worker.runs and run_id not in {r for r, _ in due}:
            break
        await asyncio.sleep(0.01)
    assert agent.worker.runs == {}, "the idle run should have left memory"


@workflow()
async def careful(c: Context) -> str:
    try:
        return str(await c.receive("go"))
    finally:
        c.log("cleanup ran")
        await c.save(lambda: "cleaned", name="cleanup")


async def test_eviction_does_not_record_from_finally_blocks(harness: Harness) -> None:
    conductor = Conductor(await harness.open())
    conductor.register(careful)
    agent = conductor.run(poll_interval=0.1, idle_timeout=0.05)
    try:
        run = await conductor.start(careful)
        # Taken, then evicted while it waits for "go": handed back with no due time.
        await handed_back(conductor, agent, run.run_id)
        await run.send("go", "now")
        assert await run.result(timeout=10) == "now"
    finally:
        agent.cancel()
        await agent
    kinds = [r["k"] for r in await log_records(conductor.backend, run.run_id)]
    assert kinds == ["start", "event", "log", "step", "end"]


@workflow()
async def shapes(c: Context) -> list[Any]:
    first = await c.save(lambda: (1, 2))
    await c.receive("go")
    again = await c.save(lambda: (1, 2), name="again")
    return [first, again, first == again]


async def test_a_step_returns_the_same_value_live_and_on_replay() -> None:
    conductor = Conductor("memory://")
    conductor.register(shapes)
    agent = conductor.run(poll_interval=0.1, idle_timeout=0.05)
    try:
        run = await conductor.start(shapes)
        # Evicted while it waits for "go", so that "again" runs after a replay of "first".
        await handed_back(conductor, agent, run.run_id)
        await run.send("go")
        assert await run.result(timeout=10) == [[1, 2], [1, 2], True]
    finally:
        agent.cancel()
        await agent


@workflow()
async def bounded(c: Context) -> str:
    async def slow() -> str:
        await asyncio.sleep(2)
        return "late"

    try:
        await c.save(lambda: slow(), timeout=0.05, retry=RetryPolicy(max_attempts=1))
    except StepFailed as exc:
        return exc.error_type

    return "not bounded"


@workflow()
async def own_timeout(c: Context) -> str:
    def fails() -> str:
        raise TimeoutError("upstream said 504")

    try:
        await c.save(fails, timeout=5, retry=RetryPolicy(max_attempts=1))
    except StepFailed as exc:
        return f"{exc.error_type}: {exc.message}"
    return "?"


async def test_timeouts_bound_async_lambdas_and_keep_a_steps_own_timeout_error() -> None:
    conductor = Conductor("memory://")
    conductor.register(bounded)
    conductor.register(own_timeout)
    agent = conductor.run()
    try:
        t0 = time.monotonic()
        assert await (await conductor.start(bounded)).result(timeout=10) == "StepTimeout"
        assert time.monotonic() - t0 < 1.5
        out = await (await conductor.start(own_timeout)).result(timeout=10)
        assert out == "TimeoutError: upstream said 504"
    finally:
        agent.cancel()
        await agent


@workflow()
async def saga_compact(c: Context) -> None:
    await c.save(lambda: 1, compensate_with=lambda: None)
    try:
        await c.compact()
    except InvalidArgument as exc:
        raise RuntimeError(str(exc)) from exc


async def test_compact_refuses_to_drop_compensations() -> None:
    conductor = Conductor("memory://")
    conductor.register(saga_compact)
    agent = conductor.run()
    try:
        run = await conductor.start(saga_compact)
        with pytest.raises(Exception, match="compensations"):
            await run.result(timeout=10)
    finally:
        agent.cancel()
        await agent


@workflow()
async def relay(c: Context, hops: int = 2) -> Any:
    if hops:
        await c.continue_using(relay, hops=hops - 1)
    return await c.receive("x")


async def test_send_checks_the_run_and_follows_continuations(harness: Harness) -> None:
    conductor = Conductor(await harness.open())
    conductor.register(relay)
    with pytest.raises(RunNotFound, match="start it first"):
        await conductor.get("nobody").send("x", 1)
    with pytest.raises(InvalidArgument, match="'\\+'"):
        await conductor.start(relay, run_id="a+1")
    agent = conductor.run(poll_interval=0.1)
    try:
        run = await conductor.start(relay, run_id="hop")
        while (
            await conductor.get("hop+2").status()
            if await conductor.backend.get_run("hop+2")
            else None
        ) is None:
            await asyncio.sleep(0.01)
        await run.send("x", "made it")
        assert await run.result(timeout=10) == "made it"
        with pytest.raises(InvalidArgument, match="has ended"):
            await run.send("x", "too late")
    finally:
        agent.cancel()
        await agent


def test_the_package_never_uses_pickle_or_eval() -> None:
    pattern = re.compile(r"^\s*(import|from)\s+(pickle|dill|marshal|shelve|cloudpickle)\b|\beval\(")
    for path in (ROOT / "substantial").rglob("*.py"):
        for line in path.read_text().splitlines():
            assert not pattern.search(line), f"{path}: {line}"


@workflow()
async def tally(c: Context, total: int = 0) -> int:
    n = await c.receive("n")
    if n is None:
        return total
    await c.compact(total=total + n)
    return -1


async def test_replay_after_compaction_reads_from_the_snapshot(harness: Harness) -> None:
    backend = await harness.open()
    reads: list[int] = []
    original = backend.read_log

    async def spy(run_id: str, start: int = 0) -> list[bytes]:
        reads.append(start)
        return await original(run_id, start)

    backend.read_log = spy  # type: ignore[method-assign]
    conductor = Conductor(backend)
    conductor.register(tally)
    agent = conductor.run(poll_interval=0.1, idle_timeout=0.05)
    try:
        run = await conductor.start(tally, run_id="tally")
        snapshot = 0
        for n in (1, 2, 3):
            await run.send("n", n)
            # Compacted again, then evicted while it waits for the next "n".
            for _ in range(3000):
                info = await backend.get_run("tally")
                if info and info.log_start > snapshot and "tally" not in agent.worker.runs:
                    snapshot = info.log_start
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail(f"the run was not compacted and evicted after n={n}")
        reads.clear()
        await run.send("n", None)
        assert await run.result(timeout=10) == 6
    finally:
        agent.cancel()
        await agent
    info = await run.status()
    assert info.log_start > 0
    assert reads and 0 not in reads, f"replay re-read the log from 0: {reads}"


@workflow()
async def pay_then_continue(c: Context, step: int = 0) -> Any:
    got = await c.receive("pay")
    if step == 0:
        await c.continue_using(pay_then_continue, step=1)
    return got


async def test_a_resent_event_is_not_delivered_again_to_a_successor() -> None:
    conductor = Conductor("memory://")
    conductor.register(pay_then_continue)
    agent = conductor.run(poll_interval=0.1)
    try:
        run = await conductor.start(pay_then_continue, run_id="acct")
        await run.send("pay", "first", event_id="pay-1")
        while await conductor.backend.get_run("acct+1") is None:
            await asyncio.sleep(0.01)
        await run.send("pay", "first again", event_id="pay-1")  # a retry of the same send
        await run.send("pay", "second", event_id="pay-2")
        assert await run.result(timeout=10) == "second"
    finally:
        agent.cancel()
        await agent


class _SlowLeases(MemoryBackend):
    """A store whose lease calls each take a while, counting how many overlap."""

    def __init__(self) -> None:
        super().__init__()
        self.in_flight = 0
        self.most = 0

    async def lease(self, run_id: str, owner: str | None = None, ttl: float = 0, **kw: Any) -> Any:
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(0.2)
            return await super().lease(run_id, owner, ttl, **kw)
        finally:
            self.in_flight -= 1


_go: list[asyncio.Event] = []


async def _until_go() -> str:
    await _go[0].wait()
    return "yes"


@workflow()
async def busy_until_go(c: Context) -> str:
    return await c.save(_until_go)


async def test_a_worker_renews_the_leases_it_holds_side_by_side() -> None:
    """One after the other, 20 renewals of 0.2 s take 4 s: past a 3 s lease, the last ones
    would have expired (and another worker could take their runs) before being renewed.
    (Runs in a step: an idle run's lease is left to lapse instead, see test_parking.)"""
    _go[:] = [asyncio.Event()]
    store = _SlowLeases()
    conductor = Conductor(store)
    conductor.register(busy_until_go)
    agent = conductor.run(lease_ttl=3.0, poll_interval=0.05)
    runs = [await conductor.start(busy_until_go) for _ in range(20)]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (len(store.leases) >= 20 and store.in_flight == 0):
        await asyncio.sleep(0.05)
    store.most = 0  # the takes, side by side too, are not what is checked
    renewals = time.monotonic() + 10  # a pass comes every lease_ttl / 3 = 1 s
    while time.monotonic() < renewals and store.most < 20:
        await asyncio.sleep(0.05)
    overlapped = store.most
    _go[0].set()
    assert [await r.result(timeout=30) for r in runs] == ["yes"] * 20
    agent.cancel()
    await agent
    assert overlapped >= 20  # a housekeeping pass renewed all 20 at once


@workflow()
async def quick_one(c: Context) -> int:
    return 1


async def test_a_run_found_held_is_taken_as_soon_as_it_is_made_due_again() -> None:
    """A worker that found a run's lease held (a resume, a delete, another worker) waits for
    the lease to expire, unless the run is made due anew: then it tries at once."""
    store = MemoryBackend()
    conductor = Conductor(store)
    conductor.register(quick_one)
    run = await conductor.start(quick_one)
    await store.lease(run.run_id, "another-host/1/1/repair", 60)
    agent = conductor.run(poll_interval=0.05)
    try:
        with pytest.raises(ResultTimeout):
            await run.result(timeout=0.5)  # held: the worker skips it
        await store.lease(run.run_id, "another-host/1/1/repair", 0)
        await store.schedule(run.run_id, time.time())
        assert await run.result(timeout=5) == 1  # not the 30 s of its lease_ttl
    finally:
        agent.cancel()
        await agent


# -- timers: finishing a wait without holding others up ----------------------------------


async def test_a_timer_blocks_the_loop_only_when_nothing_else_is_ready_or_due() -> None:
    from substantial._live import _quiet

    loop = asyncio.get_running_loop()
    await asyncio.sleep(0)  # whatever the test runner queued has run
    assert _quiet(loop, 0.002)
    # Another timer due meanwhile (a worker with many sleeping runs) must not wait.
    soon = loop.call_later(0.001, lambda: None)
    assert not _quiet(loop, 0.002)
    assert _quiet(loop, 0.0005)
    soon.cancel()
    # A callback ready to run must not wait either.
    ready = loop.call_soon(lambda: None)
    assert not _quiet(loop, 0.002)
    ready.cancel()
