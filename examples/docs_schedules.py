"""docs/schedules.md: a schedule every 0.2 s, its controls, a cron backfill across DST."""

import asyncio
from datetime import UTC, datetime

from substantial import Conductor, Context, workflow
from substantial.schedules import Schedule


@workflow()
async def report(c: Context, scheduled_at: str, team: str) -> str:
    # scheduled_at is the tick's time (ISO 8601, UTC), the same on every replay.
    return await c.save(lambda: f"report for {team} at {scheduled_at}", name="build")


async def count(conductor: Conductor) -> int:
    return len(await conductor.list(workflow="report"))


async def until(check) -> None:  # type: ignore[no-untyped-def]
    for _ in range(400):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("the schedule did not get there in 20 s")


async def main() -> None:
    conductor = Conductor("memory://")
    conductor.register(report)
    agent = conductor.run()

    beat = await conductor.schedule("beat", report, every=0.2, kwargs={"team": "ops"})
    await until(lambda: _at_least(conductor, 3))
    info = await beat.info()
    first = (await conductor.list(workflow="report"))[0]
    print("runs started:", await count(conductor) >= 3)
    print("a run's id names its tick:", first.run_id.startswith("schedule:beat:2"))
    print("result:", (await conductor.get(first.run_id).result()).startswith("report for ops"))
    print("every:", info.every, "| catch_up:", info.catch_up)

    await beat.pause()
    await until(lambda: _paused(beat))
    paused_at = await count(conductor)
    await asyncio.sleep(0.5)
    print("runs while paused:", await count(conductor) - paused_at)
    now = await beat.trigger()  # one run now, paused or not
    print("trigger:", (await now.result()).startswith("report for ops"))
    await beat.delete()
    await until(lambda: _none_left(conductor))
    print("schedules left:", await conductor.list_schedules())

    # 02:30 in Berlin does not exist on 30 March 2025: that day's run is at 03:00 CEST.
    nightly = await conductor.schedule(
        "nightly", report, cron="30 2 * * *", tz="Europe/Berlin", kwargs={"team": "data"}
    )
    runs = await nightly.backfill(
        datetime(2025, 3, 29, tzinfo=UTC), datetime(2025, 3, 31, 12, tzinfo=UTC)
    )
    print("backfill:", [r.run_id for r in runs])
    before = await count(conductor)
    await nightly.backfill(datetime(2025, 3, 29, tzinfo=UTC), datetime(2025, 3, 31, tzinfo=UTC))
    print("a second backfill starts:", await count(conductor) - before, "runs")

    agent.cancel()
    await agent


async def _at_least(conductor: Conductor, n: int) -> bool:
    return await count(conductor) >= n


async def _paused(schedule: Schedule) -> bool:
    return (await schedule.info()).paused


async def _none_left(conductor: Conductor) -> bool:
    return not await conductor.list_schedules()


if __name__ == "__main__":
    asyncio.run(main())
