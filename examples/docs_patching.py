"""docs/determinism.md: change a workflow in place with patched(), runs in flight included."""

import asyncio
from typing import Any

from substantial import Conductor, Context, workflow
from substantial.backends.memory import MemoryBackend
from substantial.conductor import Agent
from substantial.testing import log_records, replay
from substantial.workflow import Workflow


@workflow(name="order")
async def order_before(c: Context, item: str) -> list[str]:
    done = [await c.save(lambda: f"reserved {item}", name="reserve")]
    await c.receive("paid")
    done.append(await c.save(lambda: f"shipped {item}", name="ship"))
    return done


@workflow(name="order")
async def order_after(c: Context, item: str) -> list[str]:
    done = [await c.save(lambda: f"reserved {item}", name="reserve")]
    await c.receive("paid")
    if c.patched("insure-before-shipping"):
        done.append(await c.save(lambda: f"insured {item}", name="insure"))
    done.append(await c.save(lambda: f"shipped {item}", name="ship"))
    return done


async def deploy(backend: MemoryBackend, wf: Workflow[Any]) -> tuple[Conductor, Agent]:
    conductor = Conductor(backend)
    conductor.register(wf)
    return conductor, conductor.run()


async def main() -> None:
    backend = MemoryBackend()
    conductor, agent = await deploy(backend, order_before)
    finished = await conductor.start(order_before, {"item": "lamp"}, run_id="order-1")
    await finished.send("paid")
    await finished.result(timeout=10)
    waiting = await conductor.start(order_before, {"item": "desk"}, run_id="order-2")
    while len(await backend.read_log("order-2")) < 2:  # reserved, now waiting for "paid"
        await backend.wait_for_work(0.01)
    agent.cancel()
    await agent

    # The new code is deployed while order-2 waits for its payment.
    conductor, agent = await deploy(backend, order_after)
    old = await replay(order_after, await backend.read_log("order-1"))
    print("order-1 (finished on the old code) replays on the new:", old.matches)
    await conductor.get("order-2").send("paid")
    print("order-2 (in flight):", await waiting.result(timeout=10))
    fresh = await conductor.start(order_after, {"item": "chair"}, run_id="order-3")
    await fresh.send("paid")
    print("order-3 (new):", await fresh.result(timeout=10))
    markers = [r["id"] for r in await log_records(backend, "order-3") if r["k"] == "patch"]
    print("order-3 recorded the marker:", markers)
    agent.cancel()
    await agent


if __name__ == "__main__":
    asyncio.run(main())
