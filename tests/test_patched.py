"""Changing a workflow while runs are in flight: patched() and deprecate_patch()."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from substantial import Conductor, Context, InvalidArgument, NonDeterminismError, workflow
from substantial.backends.memory import MemoryBackend
from substantial.testing import log_records, replay

ran: Counter[str] = Counter()


def step(name: str) -> Any:
    def run() -> str:
        ran[name] += 1
        return name

    return run


# The same workflow ("order") as four deployments: before the change, with the
# change behind patched(), with the old branch gone, and with the call removed.


@workflow(name="order")
async def order_v1(c: Context) -> list[str]:
    out = [await c.save(step("reserve"), name="reserve")]
    await c.receive("paid")
    out.append(await c.save(step("ship"), name="ship"))
    return out


@workflow(name="order")
async def order_v2(c: Context) -> list[str]:
    out = [await c.save(step("reserve"), name="reserve")]
    await c.receive("paid")
    if c.patched("insured-shipping"):
        out.append(await c.save(step("insure"), name="insure"))
        out.append(await c.save(step("ship-insured"), name="ship-insured"))
    else:
        out.append(await c.save(step("ship"), name="ship"))
    assert c.patched("insured-shipping") == (len(out) == 3)  # the same answer all run long
    return out


@workflow(name="order")
async def order_v3(c: Context) -> list[str]:
    out = [await c.save(step("reserve"), name="reserve")]
    await c.receive("paid")
    c.deprecate_patch("insured-shipping")
    out.append(await c.save(step("insure"), name="insure"))
    out.append(await c.save(step("ship-insured"), name="ship-insured"))
    return out


@workflow(name="order")
async def order_v4(c: Context) -> list[str]:
    out = [await c.save(step("reserve"), name="reserve")]
    await c.receive("paid")
    out.append(await c.save(step("insure"), name="insure"))
    out.append(await c.save(step("ship-insured"), name="ship-insured"))
    return out


async def deploy(backend: MemoryBackend, wf: Any) -> tuple[Conductor, Any]:
    conductor = Conductor(backend)
    conductor.register(wf)
    return conductor, conductor.run(poll_interval=0.2)


async def stop(agent: Any) -> None:
    agent.cancel()
    await agent


async def kinds(backend: MemoryBackend, run_id: str) -> list[str]:
    return [r["k"] for r in await log_records(backend, run_id)]


async def test_a_new_run_takes_the_new_branch_and_records_one_marker() -> None:
    backend = MemoryBackend()
    conductor, agent = await deploy(backend, order_v2)
    run = await conductor.start(order_v2, run_id="new")
    await run.send("paid")
    assert await run.result(timeout=10) == ["reserve", "insure", "ship-insured"]
    await stop(agent)
    records = await log_records(backend, "new")
    assert [r for r in records if r["k"] == "patch"] == [
        {"k": "patch", "c": 2, "id": "insured-shipping"}
    ]


async def test_a_run_that_already_ran_the_old_code_replays_the_old_branch() -> None:
    backend = MemoryBackend()
    conductor, agent = await deploy(backend, order_v1)
    run = await conductor.start(order_v1, run_id="old")
    await run.send("paid")
    assert await run.result(timeout=10) == ["reserve", "ship"]
    await stop(agent)
    entries = await backend.read_log("old")
    for wf in (order_v2, order_v1):  # the new code replays the old history, as the old did
        replayed = await replay(wf, entries)
        assert replayed.matches, replayed


async def test_a_run_in_flight_before_the_patch_point_takes_the_new_branch() -> None:
    backend = MemoryBackend()
    conductor, agent = await deploy(backend, order_v1)
    run = await conductor.start(order_v1, run_id="waiting")
    while "step" not in await kinds(backend, "waiting"):
        await conductor.backend.wait_for_work(0.01)
    await stop(agent)  # parked at receive("paid"), on the old code
    ran.clear()
    conductor, agent = await deploy(backend, order_v2)
    await conductor.get("waiting").send("paid")
    assert await run.result(timeout=10) == ["reserve", "insure", "ship-insured"]
    await stop(agent)
    assert ran["reserve"] == 0, "a completed step ran again"
    assert "patch" in await kinds(backend, "waiting")


async def test_deprecated_then_removed_patches_still_replay_runs_that_recorded_them() -> None:
    backend = MemoryBackend()
    conductor, agent = await deploy(backend, order_v2)
    run = await conductor.start(order_v2, run_id="marked")
    await run.send("paid")
    await run.result(timeout=10)
    await stop(agent)
    entries = await backend.read_log("marked")
    before = sum(ran.values())
    for wf in (order_v3, order_v4):
        assert (await replay(wf, entries)).matches
    assert sum(ran.values()) == before


async def test_replaying_old_history_without_the_marker_on_code_without_the_branch_diverges() -> (
    None
):
    backend = MemoryBackend()
    conductor, agent = await deploy(backend, order_v1)
    run = await conductor.start(order_v1, run_id="too-old")
    await run.send("paid")
    await run.result(timeout=10)
    await stop(agent)
    with pytest.raises(NonDeterminismError, match=r"step 'ship'.*step 'insure'"):
        await replay(order_v3, await backend.read_log("too-old"))


@workflow()
async def bad_patch(c: Context) -> bool:
    return c.patched("")


async def test_an_empty_patch_id_is_refused_clearly() -> None:
    backend = MemoryBackend()
    conductor, agent = await deploy(backend, bad_patch)
    run = await conductor.start(bad_patch)
    with pytest.raises(Exception, match="patched\\(\\) takes a non-empty string id"):
        await run.result(timeout=10)
    await stop(agent)
    assert InvalidArgument.__name__ in str((await run.status()).error)
