"""The workflow engine on every backend: revert, continue, compact, cancel, the client API."""

from __future__ import annotations

import asyncio

import pytest

from substantial import (
    Conductor,
    Context,
    InvalidArgument,
    ResultTimeout,
    RunCancelled,
    RunConflict,
    RunNotFound,
    RunReverted,
    SerializationError,
    UnknownWorkflow,
    workflow,
)
from tests.harness import Harness
from tests.test_engine import Opaque, add_steps, greeter, kinds, records_of

# -- revert, continue, compact, cancel ------------------------------------------------


undo: list[str] = []


@workflow()
async def booking(c: Context) -> None:
    await c.save(lambda: "car-1", compensate_with=lambda car: undo.append(f"cancel {car}"))
    await c.save(lambda: "hotel-7", compensate_with=lambda: undo.append("cancel hotel"))
    await c.save(lambda: "no-undo")
    await c.revert()


async def test_revert_runs_compensations_newest_first(conductor: Conductor, agent: None) -> None:
    undo.clear()
    conductor.register(booking)
    run = await conductor.start(booking)
    with pytest.raises(RunReverted):
        await run.result(timeout=10)
    assert undo == ["cancel hotel", "cancel car-1"]
    recs = await records_of(conductor.backend, run.run_id)
    assert [r["name"] for r in recs if r["k"] == "compensated"] == [
        recs[2]["name"],
        recs[1]["name"],
    ]
    assert (await run.status()).status == "reverted"


@workflow()
async def countdown(c: Context, n: int = 3, acc: int = 0) -> int:
    acc += await c.save(lambda: n)
    if n == 0:
        return acc
    await c.continue_using(countdown, n=n - 1, acc=acc)
    raise AssertionError("continue_using returned")


async def test_continue_using_chains_runs_and_result_follows(
    conductor: Conductor, agent: None
) -> None:
    conductor.register(countdown)
    run = await conductor.start(countdown, {"n": 3}, run_id="chain")
    assert await run.result(timeout=10) == 6
    assert (await conductor.get("chain").status()).status == "continued"
    assert (await conductor.get("chain+3").status()).status == "completed"


@workflow()
async def counter(c: Context, total: int = 0, rounds: int = 0) -> int:
    setup = await c.save(lambda: "configured", key="setup")
    assert setup == "configured"
    while True:
        n = await c.receive("add")
        if n is None:
            return total
        total += n
        rounds += 1
        if rounds % 5 == 0:
            await c.compact(total=total, rounds=rounds)


async def test_compact_restarts_from_a_snapshot_and_keeps_replay_bounded(
    conductor: Conductor,
) -> None:
    conductor.register(counter)
    run = await conductor.start(counter)
    for i in range(12):
        await run.send("add", i)
    await run.send("add", None)
    agent = conductor.run(poll_interval=0.2)
    try:
        assert await run.result(timeout=10) == sum(range(12))
    finally:
        agent.cancel()
        await agent
    recs = await records_of(conductor.backend, run.run_id)
    assert kinds(recs).count("snapshot") == 2
    assert sum(1 for r in recs if r["k"] == "step") == 1  # the keyed step ran once
    info = await run.status()
    assert info.log_start > 0


@workflow()
async def forever(c: Context) -> None:
    while True:
        await c.sleep(0.05)


async def test_cancel_ends_a_run(conductor: Conductor, agent: None) -> None:
    conductor.register(forever)
    run = await conductor.start(forever)
    await asyncio.sleep(0.2)
    await run.cancel()
    with pytest.raises(RunCancelled):
        await run.result(timeout=10)
    assert (await run.status()).status == "cancelled"


# -- the client API --------------------------------------------------------------------


async def test_start_with_run_id_is_idempotent(conductor: Conductor, agent: None) -> None:
    conductor.register(add_steps)
    a = await conductor.start(add_steps, {"a": 1}, run_id="only-once")
    b = await conductor.start(add_steps, {"a": 1}, run_id="only-once")
    assert a.run_id == b.run_id == "only-once"
    assert await b.result(timeout=10) == 3
    assert kinds(await records_of(conductor.backend, "only-once")).count("start") == 1
    # The same id with other arguments is a conflict, not a silent no-op.
    with pytest.raises(RunConflict, match="other arguments"):
        await conductor.start(add_steps, {"a": 999}, run_id="only-once")


async def test_bad_input_gives_clear_errors(conductor: Conductor) -> None:
    with pytest.raises(UnknownWorkflow, match="register"):
        await conductor.start("no-such-workflow")
    with pytest.raises(InvalidArgument, match="@workflow"):
        conductor.register(lambda c: None)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="async def"):
        workflow()(lambda c: None)  # type: ignore[arg-type, return-value]
    conductor.register(add_steps)
    with pytest.raises(SerializationError):
        await conductor.start(add_steps, {"a": Opaque()})
    with pytest.raises(InvalidArgument, match="invalid run id"):
        await conductor.start(add_steps, run_id="has space")
    with pytest.raises(RunNotFound):
        await conductor.get("ghost").result(timeout=30)  # answered at once, however slow the store
    run = await conductor.start(add_steps)
    with pytest.raises(SerializationError):
        await run.send("x", Opaque())
    with pytest.raises(ResultTimeout):
        await run.result(timeout=0.05)  # no worker is running


async def test_runs_of_an_unregistered_workflow_wait_for_a_worker_that_has_it(
    harness: Harness,
) -> None:
    client = Conductor(await harness.open())
    client.register(add_steps)
    run = await client.start(add_steps)
    other = Conductor(await harness.open())
    other.register(greeter)
    agent = other.run(poll_interval=0.1)
    await asyncio.sleep(0.3)
    assert (await run.status()).status == "active"
    assert await client.backend.read_log(run.run_id) != []
    agent.cancel()
    await agent
    helper = client.run(poll_interval=0.1)
    try:
        assert await run.result(timeout=10) == 3
    finally:
        helper.cancel()
        await helper


async def test_agent_cancel_then_await_is_clean(conductor: Conductor) -> None:
    agent = conductor.run()
    await asyncio.sleep(0.05)
    agent.cancel()
    await agent
    assert agent.done()


async def test_a_conductor_as_a_context_manager_closes_its_backend(harness: Harness) -> None:
    backend = await harness.open()
    closes: list[int] = []
    close = backend.close

    async def counted_close() -> None:
        closes.append(1)
        await close()

    backend.close = counted_close  # type: ignore[method-assign]
    async with Conductor(backend) as conductor:
        conductor.register(add_steps)
        agent = conductor.run(poll_interval=0.1)
        assert await (await conductor.start(add_steps)).result(timeout=10) is not None
        agent.cancel()
        await agent
        assert closes == []
    assert closes == [1]
    closed = Conductor(await harness.open())
    await closed.aclose()
    await closed.aclose()  # closing twice is harmless
