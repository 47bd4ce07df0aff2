"""docs/waiting.md: a durable sleep outlives the worker that started it."""

import asyncio
import tempfile
import time

from substantial import Conductor, Context, workflow


@workflow()
async def nap(c: Context, seconds: float) -> float:
    began = await c.save(time.time, name="began")
    await c.sleep(seconds)
    ended = await c.save(time.time, name="ended")
    return ended - began


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite://{tmp}/runs.db"

        # Worker one starts the run; the run goes idle in its sleep and is evicted.
        first = Conductor(url)
        first.register(nap)
        agent = first.run(idle_timeout=0.1, poll_interval=0.2)
        run = await first.start(nap, {"seconds": 1.0}, run_id="nap-1")
        await asyncio.sleep(0.5)
        print("held in memory after eviction:", run.run_id in agent.worker.runs)
        agent.cancel()
        await agent
        print("status with no worker:", (await run.status()).status)
        await first.close()

        # Worker two (think: another process, after a deploy) finishes the sleep.
        second = Conductor(url)
        second.register(nap)
        agent = second.run(poll_interval=0.2)
        slept = await second.get("nap-1").result(timeout=10)
        print("slept at least 1 s:", slept >= 1.0)
        agent.cancel()
        await agent
        await second.close()


if __name__ == "__main__":
    asyncio.run(main())
