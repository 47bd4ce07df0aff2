"""docs/determinism.md: golden-log testing, the pattern of tests/test_determinism.py.

Record the log of a representative run once and commit it; a test replays it
against the current code. Same code: the recorded values come back and no step
runs again. Incompatible code: NonDeterminismError, so you know to bump version=.
"""

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from substantial import Conductor, Context, Workflow, WorkflowFailed, workflow
from substantial.backends.base import RunInfo
from substantial.backends.memory import MemoryBackend
from substantial.records import encode_entry

calls: list[str] = []


def reserve() -> str:
    calls.append("reserve")
    return "stock-17"


def price() -> float:
    calls.append("price")
    return 41.5


@workflow(name="order", version=1)
async def order(c: Context, item: str) -> dict[str, object]:
    stock = await c.save(reserve)
    amount = await c.save(price)
    paid = await c.receive("pay")
    return {"item": item, "stock": stock, "amount": amount, "paid": paid}


@workflow(name="order", version=1)
async def order_without_price(c: Context, item: str) -> dict[str, object]:
    stock = await c.save(reserve)  # the price step was removed: incompatible
    paid = await c.receive("pay")
    return {"item": item, "stock": stock, "paid": paid}


async def record_golden() -> bytes:
    """Run `order` until it waits for "pay"; return its log entries as JSON."""
    backend = MemoryBackend()
    conductor = Conductor(backend)
    conductor.register(order)
    agent = conductor.run()
    await conductor.start(order, {"item": "lamp"}, run_id="golden")
    for _ in range(1000):  # start + two steps, then it waits for "pay"
        if len(await backend.read_log("golden")) == 3:
            break
        await asyncio.sleep(0.01)
    agent.cancel()
    await agent
    entries = [orjson.loads(e) for e in await backend.read_log("golden")]
    return orjson.dumps(entries, option=orjson.OPT_INDENT_2)


async def replay_golden(golden: bytes, wf: Workflow[Any]) -> object:
    """Load a golden log into a fresh store, resume it with `wf`, return the outcome."""
    entries = orjson.loads(golden)
    start = entries[0][0]
    backend = MemoryBackend()
    now = time.time()
    info = RunInfo("golden", start["workflow"], "active", now, now, version=start["version"])
    for position, entry in enumerate(entries):
        await backend.append("golden", position, encode_entry(entry))
    await backend.put_run(info)
    await backend.set_due("golden", now)
    conductor = Conductor(backend)
    conductor.register(wf)
    agent = conductor.run()
    calls.clear()
    try:
        await conductor.get("golden").send("pay", "card-ok")
        return await conductor.get("golden").result(timeout=10)
    except WorkflowFailed as exc:
        return exc.error_type
    finally:
        agent.cancel()
        await agent


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "order-v1.json"  # in a project: tests/golden/order-v1.json
        path.write_bytes(asyncio.run(record_golden()))

        golden = path.read_bytes()  # what a test does on every run
        print("golden log:", [r["k"] for entry in orjson.loads(golden) for r in entry])
        outcome = asyncio.run(replay_golden(golden, order))
        print("same code:", outcome, "| steps re-run:", calls)
        print("changed code:", asyncio.run(replay_golden(golden, order_without_price)))


if __name__ == "__main__":
    main()
