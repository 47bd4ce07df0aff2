"""docs/concurrency.md: gather, TaskGroup, first-completed, timeouts, children, deadlines."""

import asyncio
import time
from datetime import timedelta

from substantial import ChildFailed, Conductor, Context, WorkflowFailed, workflow
from substantial.testing import replay

ran: list[str] = []


async def lookup(sku: str) -> dict[str, object]:
    ran.append(sku)
    await asyncio.sleep(0.1)  # a 100 ms call to another service
    return {"sku": sku, "price": 10 + len(sku)}


@workflow()
async def enrich(c: Context, skus: list[str]) -> list[dict[str, object]]:
    # Ten lookups at once: about as long as the slowest one, not the sum.
    return await asyncio.gather(*(c.save(lambda s=s: lookup(s), name=f"lookup-{s}") for s in skus))


@workflow()
async def approval(c: Context, wait: float) -> str:
    try:
        async with asyncio.timeout(wait):  # a durable timer of the run
            return f"approved by {await c.receive('approve')}"
    except TimeoutError:
        return "no answer in time"


async def slow_quote() -> str:
    await asyncio.sleep(2)
    return "slow quote"


@workflow()
async def fastest(c: Context) -> str:
    quotes = {
        asyncio.ensure_future(c.save(slow_quote, name="carrier-a")): "a",
        asyncio.ensure_future(c.child(quote, {"seconds": 0.05})): "b",
    }
    done, pending = await asyncio.wait(quotes, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
    return done.pop().result()


@workflow()
async def quote(c: Context, seconds: float) -> str:
    await c.sleep(seconds)
    return "child quote"


@workflow()
async def price(c: Context, sku: str) -> int:
    if sku == "broken":
        raise ValueError(f"no price for {sku!r}")
    return await c.save(lambda: 10 * len(sku), name="price")


@workflow()
async def basket(c: Context, skus: list[str]) -> int:
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(c.child(price, {"sku": s})) for s in skus]
    total = sum(t.result() for t in tasks)
    c.publish("total", total)
    for sku in skus:
        c.emit("lines", sku)
    return total


@workflow()
async def checked(c: Context, skus: list[str]) -> str:
    try:
        await asyncio.gather(*(c.child(price, {"sku": s}) for s in skus))
    except ChildFailed as exc:
        return f"{exc.status}: {exc.message}"
    return "all priced"


@workflow(timeout=timedelta(seconds=0.2))
async def slow_report(c: Context) -> str:
    try:
        await c.sleep(60)
    finally:
        await c.save(lambda: "cleaned up", name="cleanup")  # runs before the run ends
    return "done"


async def main() -> None:
    conductor = Conductor("memory://")
    for wf in (enrich, approval, fastest, quote, price, basket, checked, slow_report):
        conductor.register(wf)
    agent = conductor.run()

    skus = [f"sku-{n}" for n in range(10)]
    started = time.monotonic()
    run = await conductor.start(enrich, {"skus": skus})
    rows = await run.result(timeout=10)
    print("ten 100 ms lookups took under 0.5 s:", time.monotonic() - started < 0.5)
    print("results in issue order:", [r["sku"] for r in rows] == skus)
    before = len(ran)
    replayed = await replay(enrich, await conductor.backend.read_log(run.run_id))
    print("replayed to the same end:", replayed.matches, "| lookups run again:", len(ran) - before)

    answered = await conductor.start(approval, {"wait": 5})
    await answered.send("approve", "ana")
    print("approval:", await answered.result(timeout=10))
    ignored = await conductor.start(approval, {"wait": 0.05})
    print("approval:", await ignored.result(timeout=10))

    print("first quote:", await (await conductor.start(fastest)).result(timeout=10))

    order = await conductor.start(basket, {"skus": ["pen", "ink"]}, run_id="basket-1")
    print("basket total:", await order.result(timeout=10))
    print("published total:", await order.read("total"))
    print("streamed lines:", [line async for line in order.stream("lines")])
    children = await conductor.list(parent="basket-1")
    print("children:", sorted((info.run_id, info.status) for info in children))

    bad = await conductor.start(checked, {"skus": ["pen", "broken"]})
    print("checked:", await bad.result(timeout=10))

    report = await conductor.start(slow_report)
    try:
        await report.result(timeout=10)
    except WorkflowFailed as exc:
        print("report:", (await report.status()).status, "|", exc.error_type)

    agent.cancel()
    await agent
    await conductor.close()


if __name__ == "__main__":
    asyncio.run(main())
