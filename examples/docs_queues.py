"""docs/queues.md: concurrency, priority, per-key limits, rate limits, dedup, debounce, delay,
children through a queue."""

import asyncio
import time

from substantial import Conductor, Context, Queue, workflow

running: dict[str, int] = {}
peak: dict[str, int] = {}
order: list[str] = []
first_started = asyncio.Event()


@workflow()
async def send_email(c: Context, to: str, lane: str = "mail", hold: float = 0.05) -> str:
    async def deliver() -> str:
        running[lane] = running.get(lane, 0) + 1
        peak[lane] = max(peak.get(lane, 0), running[lane])
        order.append(to)
        if to == "first":
            first_started.set()
        await asyncio.sleep(hold)
        running[lane] -= 1
        return f"sent to {to}"

    return await c.save(deliver)


@workflow()
async def newsletter(c: Context, readers: list[str]) -> list[str]:
    # At most 2 at once (Queue("mail", concurrency=2)), whatever else goes through "mail".
    return list(
        await asyncio.gather(
            *(c.child(send_email, {"to": r, "lane": "kids"}, queue="mail") for r in readers)
        )
    )


async def main() -> None:
    conductor = Conductor(
        "memory://",
        queues=[
            Queue("mail", concurrency=2),
            Queue("one-by-one", concurrency=1),
            Queue("per-customer", per_key_concurrency=1),
            Queue("paced", rate_limit=(3, 0.5)),
        ],
    )
    conductor.register(send_email)
    conductor.register(newsletter)
    agent = conductor.run()

    runs = [await conductor.start(send_email, {"to": f"u{i}"}, queue="mail") for i in range(6)]
    await asyncio.gather(*(r.result() for r in runs))
    print("mail: at most at once:", peak["mail"])

    blocker = await conductor.start(
        send_email, {"to": "first", "lane": "one", "hold": 0.5}, queue="one-by-one"
    )
    await first_started.wait()  # the slot is taken: the next ones wait together
    waiting = [
        await conductor.start(send_email, {"to": to, "lane": "one"}, queue="one-by-one", priority=p)
        for to, p in [("low", 0), ("high", 9), ("mid", 5), ("high-2", 9)]
    ]
    await asyncio.gather(*(r.result() for r in [blocker, *waiting]))
    print("priority order:", order[6:])

    keyed = [
        await conductor.start(
            send_email, {"to": f"{who}{i}", "lane": who}, queue="per-customer", key=who
        )
        for i in range(3)
        for who in ("ann", "bob")
    ]
    await asyncio.gather(*(r.result() for r in keyed))
    print("per customer at once:", peak["ann"], peak["bob"])

    t0 = time.monotonic()
    paced = [await conductor.start(send_email, {"to": f"p{i}"}, queue="paced") for i in range(7)]
    await asyncio.gather(*(r.result() for r in paced))
    print("7 runs at 3 per 0.5 s took at least 1 s:", time.monotonic() - t0 >= 1.0)

    a = await conductor.start(send_email, {"to": "ann"}, queue="mail", dedup_id="welcome-ann")
    b = await conductor.start(send_email, {"to": "ann"}, queue="mail", dedup_id="welcome-ann")
    print("dedup:", a.run_id == b.run_id, a.run_id)

    edits = [
        await conductor.start(
            send_email, {"to": f"draft-{i}"}, queue="mail", key="doc-1", debounce=0.2
        )
        for i in range(4)
    ]
    print("debounce:", [await r.result() for r in edits])

    t1 = time.monotonic()
    later = await conductor.start(send_email, {"to": "later"}, queue="mail", delay=0.3)
    print("delay:", await later.result(), "| waited:", time.monotonic() - t1 >= 0.3)

    issue = await conductor.start(newsletter, {"readers": [f"r{i}" for i in range(6)]})
    print("children:", len(await issue.result()), "| at most at once:", peak["kids"])

    agent.cancel()
    await agent


if __name__ == "__main__":
    asyncio.run(main())
