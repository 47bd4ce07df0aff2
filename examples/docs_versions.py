"""docs/determinism.md: deploying a changed workflow as a new version."""

import asyncio

from substantial import Conductor, Context, workflow
from substantial.backends.base import Backend
from substantial.backends.memory import MemoryBackend


def reserve() -> str:
    return "stock-17"


def price() -> float:
    return 41.5


@workflow(name="order", version=1)  # the code runs in flight were started with: kept as is
async def order_v1(c: Context) -> dict[str, object]:
    stock = await c.save(reserve)
    paid = await c.receive("pay")
    return {"version": 1, "stock": stock, "paid": paid}


@workflow(name="order", version=2)  # the changed code: a new step before the wait
async def order_v2(c: Context) -> dict[str, object]:
    stock = await c.save(reserve)
    amount = await c.save(price)
    paid = await c.receive("pay")
    return {"version": 2, "stock": stock, "amount": amount, "paid": paid}


async def wait_for_entries(backend: Backend, run_id: str, count: int) -> None:
    """Wait (up to 10 s) until the run's log holds ``count`` entries."""
    for _ in range(1000):
        if len(await backend.read_log(run_id)) >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{run_id} never reached {count} log entries")


async def main() -> None:
    store = MemoryBackend()  # one store; each Conductor below is a deploy of the workers

    before = Conductor(store)
    before.register(order_v1)
    agent = before.run()
    await before.start(order_v1, run_id="order-1")
    await wait_for_entries(store, "order-1", 2)  # reserved; now waiting for "pay"
    agent.cancel()
    await agent

    # A worker that only knows version 2 leaves version-1 runs alone.
    v2_only = Conductor(store)
    v2_only.register(order_v2)
    agent = v2_only.run(poll_interval=0.1)
    await v2_only.get("order-1").send("pay", "card")
    await asyncio.sleep(0.3)
    print("order-1 on a v2-only worker:", (await v2_only.get("order-1").status()).status)
    agent.cancel()
    await agent

    # The safe deploy: both versions registered, the new one last.
    after = Conductor(store)
    after.register(order_v1)
    after.register(order_v2)
    agent = after.run(poll_interval=0.1)
    print("order-1 finishes on v1:", await after.get("order-1").result(timeout=10))
    fresh = await after.start("order", run_id="order-2")  # by name: the last registered
    await fresh.send("pay", "cash")
    print("order-2 starts on v2:", await fresh.result(timeout=10))
    active = await after.list(status="active", workflow="order")
    print("active version-1 runs left:", [r.run_id for r in active if r.version == "1"])
    agent.cancel()
    await agent


if __name__ == "__main__":
    asyncio.run(main())
