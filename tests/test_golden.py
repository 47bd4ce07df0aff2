"""Golden logs of concurrent shapes: replaying them must give the recorded end, running nothing.

Each file in tests/golden/ holds the log of one run of a workflow below,
recorded live (``python -m tests.test_golden`` rewrites them). Completions
are recorded in the order they happened, which is not the order the
commands were issued; replay must still hand each task its own result.
Changed code must raise NonDeterminismError naming the command.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from substantial import Conductor, Context, NonDeterminismError, workflow
from substantial._runs import store_run
from substantial.backends.base import RunInfo
from substantial.backends.memory import MemoryBackend
from substantial.records import encode_entry
from substantial.testing import replay

GOLDEN = Path(__file__).parent / "golden"
ran: Counter[str] = Counter()


def nap(name: str, seconds: float) -> Any:
    async def step() -> str:
        ran[name] += 1
        await asyncio.sleep(seconds)
        return name

    return step


@workflow(name="g_gather")
async def g_gather(c: Context) -> list[str]:
    # Issued a, b, c; completed c, b, a.
    return list(
        await asyncio.gather(
            c.save(nap("a", 0.06), name="a"),
            c.save(nap("b", 0.03), name="b"),
            c.save(nap("c", 0.0), name="c"),
        )
    )


@workflow(name="g_gather")
async def g_gather_changed(c: Context) -> list[str]:
    return list(
        await asyncio.gather(c.save(nap("a", 0.0), name="a"), c.save(nap("x", 0.0), name="x"))
    )


@workflow(name="g_timers")
async def g_timers(c: Context) -> str:
    await asyncio.gather(c.sleep(0.05), c.sleep(0.02), asyncio.sleep(0.03))
    return "slept"


@workflow(name="g_timers")
async def g_timers_changed(c: Context) -> str:
    await asyncio.gather(c.sleep(0.05), c.save(nap("extra", 0.0), name="extra"))
    return "slept"


@workflow(name="g_taskgroup")
async def g_taskgroup(c: Context) -> list[Any]:
    async with asyncio.TaskGroup() as tg:
        slow = tg.create_task(c.save(nap("slow", 0.05), name="slow"))
        event = tg.create_task(c.receive("go"))
        tg.create_task(c.sleep(0.01))
    return [slow.result(), event.result(), str(c.uuid4())]


@workflow(name="g_taskgroup")
async def g_taskgroup_changed(c: Context) -> list[Any]:
    async with asyncio.TaskGroup() as tg:
        event = tg.create_task(c.receive("go"))
        slow = tg.create_task(c.save(nap("slow", 0.05), name="slow"))
    return [slow.result(), event.result()]


@workflow(name="g_first")
async def g_first(c: Context) -> str:
    fast = asyncio.ensure_future(c.save(nap("fast", 0.01), name="fast"))
    slow = asyncio.ensure_future(c.sleep(60))
    done, pending = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    after = await c.save(nap("after", 0.0), name="after")
    return f"{done.pop().result()}+{after}"


@workflow(name="g_first")
async def g_first_changed(c: Context) -> str:
    slow = asyncio.ensure_future(c.sleep(60))
    fast = asyncio.ensure_future(c.save(nap("fast", 0.01), name="fast"))
    done, _ = await asyncio.wait({fast, slow}, return_when=asyncio.FIRST_COMPLETED)
    return str(done.pop().result())


@workflow(name="g_timeout")
async def g_timeout(c: Context) -> list[str]:
    out = []
    for limit in (0.02, 30.0):
        try:
            async with asyncio.timeout(limit):
                out.append(str(await c.receive("answer")))
        except TimeoutError:
            out.append("timed out")
    return out


@workflow(name="g_timeout")
async def g_timeout_changed(c: Context) -> list[str]:
    return [str(await c.receive("answer"))]


@workflow(name="g_child")
async def g_child(c: Context, n: int = 0) -> int:
    await c.save(nap(f"child-{n}", 0.01 * (3 - n)), name="work")
    return n * 10


@workflow(name="g_parent")
async def g_parent(c: Context) -> list[int]:
    return list(await asyncio.gather(*(c.child(g_child, {"n": i}) for i in range(3))))


@workflow(name="g_parent")
async def g_parent_changed(c: Context) -> list[int]:
    first = await c.save(nap("pre", 0.0), name="pre")
    del first
    return list(await asyncio.gather(*(c.child(g_child, {"n": i}) for i in range(3))))


SHAPES: dict[str, tuple[Any, Any]] = {
    "gather": (g_gather, g_gather_changed),
    "timers": (g_timers, g_timers_changed),
    "taskgroup": (g_taskgroup, g_taskgroup_changed),
    "first": (g_first, g_first_changed),
    "timeout": (g_timeout, g_timeout_changed),
    "parent": (g_parent, g_parent_changed),
}
EVENTS = {"taskgroup": [("go", 5)], "timeout": [("answer", "yes")]}


async def record(shape: str) -> list[Any]:
    """Run one shape live on a memory store and return its log (to write a golden file)."""
    wf = SHAPES[shape][0]
    conductor = Conductor(MemoryBackend())
    conductor.register(wf)
    conductor.register(g_child)
    agent = conductor.run()
    run = await conductor.start(wf, run_id=f"golden-{shape}")
    if shape == "timeout":
        await asyncio.sleep(0.1)  # the first receive times out, the second gets the answer
    for name, value in EVENTS.get(shape, []):
        await run.send(name, value)
    await run.result(timeout=10)
    agent.cancel()
    await agent
    return [orjson.loads(e) for e in await conductor.backend.read_log(run.run_id)]


def load(shape: str) -> list[Any]:
    path = GOLDEN / f"{shape}.json"
    assert path.exists(), "run `python -m tests.test_golden` to record the golden logs"
    return list(orjson.loads(path.read_bytes()))


@pytest.mark.parametrize("shape", sorted(SHAPES))
async def test_golden_log_replays_to_its_recorded_end_without_running_steps(shape: str) -> None:
    entries = load(shape)
    assert entries[-1][-1]["k"] == "end"
    ran.clear()
    replayed = await replay(SHAPES[shape][0], entries)
    assert replayed.end is not None and replayed.matches, (replayed.end, entries[-1][-1])
    assert sum(ran.values()) == 0


def test_golden_logs_hold_out_of_order_completions() -> None:
    steps = [r["c"] for e in load("gather") for r in e if r["k"] == "step"]
    assert steps != sorted(steps), "the golden gather completed in issue order: re-record it"


@pytest.mark.parametrize("shape", sorted(SHAPES))
async def test_changed_code_raises_nondeterminism_naming_the_command(shape: str) -> None:
    ran.clear()
    with pytest.raises(NonDeterminismError) as err:
        await replay(SHAPES[shape][1], load(shape))
    assert "golden-" + shape in str(err.value)
    assert err.value.recorded != err.value.requested
    assert sum(ran.values()) == 0


async def test_nondeterminism_cannot_be_swallowed_by_the_workflow() -> None:
    @workflow(name="g_gather")
    async def swallowing(c: Context) -> str:
        try:
            await c.save(nap("x", 0.0), name="x")
        except Exception:
            return "pretended all is well"
        return "unreachable"

    with pytest.raises(NonDeterminismError, match="command 0"):
        await replay(swallowing, load("gather"))


async def test_a_protocol_1_log_is_refused_clearly_and_left_alone() -> None:
    entries = orjson.loads((GOLDEN / "order-v1.json").read_bytes())
    backend = MemoryBackend()
    await store_run(
        backend,
        RunInfo("old", "order", "active", 1.0, 1.0, version="1", protocol=1),
        encode_entry(entries[0]),
        0.0,
    )
    for position, entry in enumerate(entries[1:], start=1):
        await backend.append("old", position, encode_entry(entry))
    before = await backend.read_log("old")
    conductor = Conductor(backend)

    @workflow(name="order", version=1)
    async def order(c: Context, item: str = "book") -> str:
        return "must not run"

    conductor.register(order)
    agent = conductor.run(poll_interval=0.05)
    try:
        for _ in range(200):
            info = await conductor.get("old").status()
            if info.note:
                break
            await asyncio.sleep(0.01)
    finally:
        agent.cancel()
        await agent
    assert info.status == "active"
    assert info.note is not None and "protocol 1" in info.note and "protocol 2" in info.note
    assert await backend.read_log("old") == before


if __name__ == "__main__":
    GOLDEN.mkdir(exist_ok=True)
    for name in SHAPES:
        log = asyncio.run(record(name))
        (GOLDEN / f"{name}.json").write_bytes(orjson.dumps(log, option=orjson.OPT_INDENT_2))
        print(f"wrote {name}.json: {sum(len(e) for e in log)} records")
