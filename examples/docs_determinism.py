"""docs/determinism.md: recorded values survive replay; divergent code fails loudly."""

import asyncio
import logging

from substantial import Conductor, Context, WorkflowFailed, workflow
from substantial.backends.base import Backend
from substantial.backends.memory import MemoryBackend

executions: list[tuple[str, str, str]] = []


class Count(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@workflow()
async def raffle(c: Context, entrants: list[str]) -> str:
    drawn_at = c.now()  # not datetime.now()
    ticket = c.uuid4()  # not uuid.uuid4()
    winner = entrants[int(c.random() * len(entrants))]  # not random.random()
    c.log("drew %s", winner, ticket=str(ticket))  # not print(): emitted once
    executions.append((drawn_at.isoformat(), str(ticket), winner))
    await c.receive("confirm")  # the run idles here, is evicted, and is replayed
    return winner


def reserve() -> str:
    return "stock-17"


def price() -> float:
    return 41.5


@workflow(name="order", version=1)
async def order(c: Context) -> list[object]:
    stock = await c.save(reserve)
    amount = await c.save(price)
    return [stock, amount, await c.receive("pay")]


@workflow(name="order", version=1)  # same name and version, steps swapped: a bad deploy
async def order_edited(c: Context) -> list[object]:
    amount = await c.save(price)
    stock = await c.save(reserve)
    return [stock, amount, await c.receive("pay")]


async def wait_for_entries(backend: Backend, run_id: str, count: int) -> None:
    """Wait (up to 10 s) until the run's log holds ``count`` entries."""
    for _ in range(1000):
        if len(await backend.read_log(run_id)) >= count:
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{run_id} never reached {count} log entries")


async def main() -> None:
    log = Count()
    logger = logging.getLogger("substantial.workflow")  # where c.log() lines go
    logger.setLevel(logging.INFO)
    logger.addHandler(log)
    conductor = Conductor("memory://")
    conductor.register(raffle)
    agent = conductor.run(idle_timeout=0.1, poll_interval=0.2)
    run = await conductor.start(raffle, {"entrants": ["ada", "bob", "cy"]}, run_id="raffle-1")
    await asyncio.sleep(0.5)  # long enough to be evicted from memory
    await run.send("confirm")
    winner = await run.result(timeout=10)
    agent.cancel()
    await agent
    print("function executions:", len(executions))
    print("same values on replay:", executions[0] == executions[1])
    print("winner is the recorded draw:", winner == executions[0][2])
    print("c.log lines emitted:", len(log.lines))

    store = MemoryBackend()
    old = Conductor(store)
    old.register(order)
    agent = old.run()
    await old.start(order, run_id="order-1")
    await wait_for_entries(store, "order-1", 3)  # start + both steps: waiting for "pay"
    agent.cancel()
    await agent

    new = Conductor(store)
    new.register(order_edited)
    agent = new.run()
    await new.get("order-1").send("pay", "card")
    try:
        await new.get("order-1").result(timeout=10)
    except WorkflowFailed as exc:
        print(exc.error_type)
        print(exc.message)
    agent.cancel()
    await agent


if __name__ == "__main__":
    asyncio.run(main())
