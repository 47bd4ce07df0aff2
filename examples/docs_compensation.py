"""docs/steps.md: compensations and `revert()` (a saga)."""

import asyncio

from substantial import Conductor, Context, RetryPolicy, RunReverted, StepFailed, workflow

undone: list[str] = []


def book_flight() -> dict[str, str]:
    return {"flight": "LH-400", "seat": "12A"}


def cancel_flight(booking: dict[str, str]) -> None:  # takes the step's recorded value
    undone.append(f"cancel flight {booking['flight']}")


def book_hotel() -> str:
    return "hotel-7"


def cancel_hotel() -> None:  # takes no argument: called without the value
    undone.append("cancel hotel")


def charge_card() -> str:
    raise RuntimeError("card declined")


@workflow()
async def trip(c: Context) -> str:
    await c.save(book_flight, compensate_with=cancel_flight)
    await c.save(book_hotel, compensate_with=cancel_hotel)
    try:
        await c.save(charge_card, retry=RetryPolicy(max_attempts=2, initial_delay=0.01))
    except StepFailed:
        await c.revert()  # runs cancel_hotel, then cancel_flight; never returns
    return "booked"


async def main() -> None:
    conductor = Conductor("memory://")
    conductor.register(trip)
    agent = conductor.run()
    run = await conductor.start(trip, run_id="trip-1")
    try:
        print(await run.result(timeout=10))
    except RunReverted as exc:
        print(exc)
    print("compensations, newest first:", undone)
    print("status:", (await run.status()).status)
    agent.cancel()
    await agent


if __name__ == "__main__":
    asyncio.run(main())
