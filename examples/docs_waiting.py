"""docs/waiting.md: sleep, receive, handle, ensure, sending events and cancelling."""

import asyncio
import time
from dataclasses import dataclass, field
from datetime import timedelta

from substantial import (
    Conductor,
    Context,
    InvalidArgument,
    ReceiveTimeout,
    RunCancelled,
    RunNotFound,
    workflow,
)


@workflow()
async def reminder(c: Context, seconds: float) -> str:
    await c.sleep(timedelta(seconds=seconds))  # durable: survives restarts
    return await c.save(lambda: "reminder sent", name="send-reminder")


@workflow()
async def approval(c: Context, wait: float) -> str:
    try:
        decision = await c.receive("decision", timeout=wait)
    except ReceiveTimeout:
        return "escalated: no decision in time"
    return f"decided: {decision}"


@workflow()
async def two_names(c: Context) -> list[str]:
    # Events wait in the run's mailbox until a receive for their name takes them.
    first = await c.receive("first")
    second = await c.receive("second")
    return [first, second]


@dataclass
class Cart:
    items: list[str] = field(default_factory=list)
    checked_out: bool = False


@workflow()
async def cart(c: Context) -> list[str]:
    state = Cart()
    c.handle("add", lambda item: state.items.append(item))
    c.handle("checkout", lambda _: setattr(state, "checked_out", True))
    await c.ensure(lambda: state.checked_out)  # re-checked after each event
    return state.items


@workflow()
async def heartbeat(c: Context) -> None:
    while True:
        await c.sleep(0.05)


async def main() -> None:
    conductor = Conductor("memory://")
    for wf in (reminder, approval, two_names, cart, heartbeat):
        conductor.register(wf)

    # Events sent before any worker runs wait in the run's inbox.
    basket = await conductor.start(cart, run_id="cart-1")
    await basket.send("add", "apple", event_id="add-1")
    await basket.send("add", "apple", event_id="add-1")  # a retry: delivered once
    await basket.send("add", "pear", event_id="add-2")
    await basket.send("checkout")

    agent = conductor.run()
    print("cart:", await basket.result(timeout=10))
    try:
        await basket.send("add", "plum")  # the cart has completed
    except InvalidArgument as exc:
        print("send after the end:", exc)
    try:
        await conductor.get("cart-9").send("add", "plum")  # never started
    except RunNotFound as exc:
        print("send to an unknown run:", exc)

    started = time.monotonic()
    nudge = await conductor.start(reminder, {"seconds": 0.2})
    print("reminder:", await nudge.result(timeout=10))
    print("slept at least 0.2 s:", time.monotonic() - started >= 0.2)

    quick = await conductor.start(approval, {"wait": 5})
    await quick.send("decision", "yes")
    print("approval:", await quick.result(timeout=10))
    slow = await conductor.start(approval, {"wait": 0.2})
    print("approval:", await slow.result(timeout=10))

    pair = await conductor.start(two_names)
    await pair.send("second", "b")
    await pair.send("first", "a")
    print("receive by name:", await pair.result(timeout=10))

    beat = await conductor.start(heartbeat)
    await asyncio.sleep(0.2)
    await beat.cancel()
    try:
        await beat.result(timeout=10)
    except RunCancelled as exc:
        print("heartbeat:", type(exc).__name__, (await beat.status()).status)

    agent.cancel()
    await agent


if __name__ == "__main__":
    asyncio.run(main())
