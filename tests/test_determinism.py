"""Deterministic replay, checked against golden logs committed in tests/golden/.

Each golden file holds the entries of a run of ``order`` (below) that
stopped while waiting for its "pay" event. Replaying it with the same code
must reproduce the recorded values without re-running any step; replaying
it with changed code must fail with NonDeterminismError, never silently.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from substantial import Conductor, Context, NonDeterminismError, WorkflowFailed, workflow
from substantial.backends.memory import MemoryBackend
from substantial.records import decode_entry, encode_entry

GOLDEN = Path(__file__).parent / "golden" / "order-v1.json"
calls: list[str] = []


def reserve() -> str:
    calls.append("reserve")
    return "stock-17"


def price() -> float:
    calls.append("price")
    return 41.5


@workflow(name="order", version=1)
async def order(c: Context, item: str = "book") -> dict[str, Any]:
    stock = await c.save(reserve)
    token = str(c.uuid4())
    amount = await c.save(price)
    await c.sleep(0.01)
    paid = await c.receive("pay")
    return {"item": item, "stock": stock, "amount": amount, "paid": paid, "token": token}


@workflow(name="order", version=1)
async def order_reordered(c: Context, item: str = "book") -> dict[str, Any]:
    amount = await c.save(price)  # steps swapped
    stock = await c.save(reserve)
    return {"amount": amount, "stock": stock}


@workflow(name="order", version=1)
async def order_without_sleep(c: Context, item: str = "book") -> dict[str, Any]:
    stock = await c.save(reserve)
    token = str(c.uuid4())
    amount = await c.save(price)
    paid = await c.receive("pay")  # the sleep was removed
    return {"stock": stock, "amount": amount, "paid": paid, "token": token}


@workflow(name="order", version=2)
async def order_v2(c: Context, item: str = "book") -> str:
    return "v2"


async def record_golden() -> list[Any]:
    """Run ``order`` until it waits for "pay" and return its log (used to make the file)."""
    backend = MemoryBackend()
    conductor = Conductor(backend)
    conductor.register(order)
    agent = conductor.run()
    run = await conductor.start(order, {"item": "lamp"}, run_id="golden")
    while not any(
        r["k"] == "timer" for e in backend.logs.get("golden", []) for r in orjson.loads(e)
    ):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    agent.cancel()
    await agent
    return [orjson.loads(e) for e in await backend.read_log(run.run_id)]


async def load_golden(backend: MemoryBackend) -> None:
    entries = orjson.loads(GOLDEN.read_bytes())
    conductor = Conductor(backend)
    conductor.register(order)
    # Recreate the run exactly as recorded: its entries, metadata and schedule.
    start = entries[0][0]
    await conductor._create(start["workflow"], start["version"], start["kwargs"], "golden")
    for position, entry in enumerate(entries[1:], start=1):
        await backend.append("golden", position, encode_entry(entry))


async def run_golden(wf: Any, *, send_pay: bool = True) -> tuple[MemoryBackend, Any]:
    calls.clear()
    backend = MemoryBackend()
    await load_golden(backend)
    conductor = Conductor(backend)
    conductor.register(wf)
    agent = conductor.run(poll_interval=0.1)
    try:
        run = conductor.get("golden")
        if send_pay:
            await run.send("pay", "card-ok")
        try:
            return backend, await run.result(timeout=10)
        except WorkflowFailed as exc:
            return backend, exc
    finally:
        agent.cancel()
        await agent


def test_golden_log_is_current() -> None:
    assert GOLDEN.exists(), "run `python -m tests.test_determinism` to record the golden log"
    entries = orjson.loads(GOLDEN.read_bytes())
    assert [r["k"] for e in entries for r in e] == [
        "start",
        "step",
        "uuid",
        "step",
        "sleep",
        "timer",
    ]


async def test_replay_of_golden_log_returns_recorded_values_without_rerunning_steps() -> None:
    _, out = await run_golden(order)
    entries = orjson.loads(GOLDEN.read_bytes())
    token = entries[2][0]["value"] if entries[2][0]["k"] == "uuid" else entries[1][1]["value"]
    assert out == {
        "item": "lamp",
        "stock": "stock-17",
        "amount": 41.5,
        "paid": "card-ok",
        "token": token,
    }
    assert calls == []


async def test_swapped_steps_raise_nondeterminism_naming_position_and_records() -> None:
    backend, out = await run_golden(order_reordered, send_pay=False)
    assert isinstance(out, WorkflowFailed)
    assert out.error_type == "NonDeterminismError"
    assert "step 1" in out.message
    assert "'reserve'" in out.message and "'price'" in out.message
    assert calls == []
    # The failure is recorded once at the end; the recorded history is untouched.
    log = [decode_entry("golden", p, e) for p, e in enumerate(await backend.read_log("golden"))]
    assert [r["k"] for e in log for r in e][-1] == "end"
    assert [r["k"] for e in log for r in e][:6] == [
        "start",
        "step",
        "uuid",
        "step",
        "sleep",
        "timer",
    ]


async def test_removed_sleep_raises_nondeterminism() -> None:
    _, out = await run_golden(order_without_sleep)
    assert isinstance(out, WorkflowFailed) and out.error_type == "NonDeterminismError"
    assert "sleep" in out.message and "deadline" not in out.message


async def test_nondeterminism_error_cannot_be_swallowed() -> None:
    @workflow(name="order", version=1)
    async def swallowing(c: Context, item: str = "book") -> str:
        try:  # noqa: SIM105 - a user's over-broad except is the point
            await c.save(price)
        except Exception:
            pass
        return "pretended all is well"

    _, out = await run_golden(swallowing, send_pay=False)
    assert isinstance(out, WorkflowFailed) and out.error_type == "NonDeterminismError"


async def test_a_new_version_does_not_replay_runs_of_the_old_one() -> None:
    backend = MemoryBackend()
    await load_golden(backend)
    new_only = Conductor(backend)
    new_only.register(order_v2)
    agent = new_only.run(poll_interval=0.05)
    await asyncio.sleep(0.3)
    assert (await new_only.get("golden").status()).status == "active"
    agent.cancel()
    await agent
    both = Conductor(backend)
    both.register(order)
    both.register(order_v2)
    agent = both.run(poll_interval=0.05)
    try:
        await both.get("golden").send("pay", "cash")
        assert (await both.get("golden").result(timeout=10))["paid"] == "cash"
        fresh = await both.start("order")
        assert await fresh.result(timeout=10) == "v2"
    finally:
        agent.cancel()
        await agent


def test_nondeterminism_error_names_everything() -> None:
    err = NonDeterminismError("r1", 7, "step 'a'", "sleep")
    assert "r1" in str(err) and "step 7" in str(err) and "step 'a'" in str(err)
    assert err.position == 7


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_bytes(orjson.dumps(asyncio.run(record_golden()), option=orjson.OPT_INDENT_2))
    print(f"wrote {GOLDEN}")
