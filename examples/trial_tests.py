"""docs/testing.md: a user's tests of a 30-day trial, with the substantial_env fixture.

The fixture comes with substantial (a pytest plugin, loaded by pytest); the
async tests run under pytest-asyncio in auto mode here (anyio works too).
``python -m examples.docs_testing`` runs this file under pytest.
"""

from datetime import timedelta

from substantial import Context, ReceiveTimeout, workflow
from substantial.testing import WorkflowEnv

DAY = timedelta(days=1)


@workflow()
async def trial(c: Context, user: str) -> str:
    started = c.now()
    try:
        plan = await c.receive("upgrade", timeout=30 * DAY)
    except ReceiveTimeout:
        await c.save(lambda: f"mail {user}: your trial has ended", name="notify")
        return f"{user}: trial ended on day {(c.now() - started).days}"
    return f"{user}: upgraded to {plan} on day {(c.now() - started).days}"


async def test_the_trial_ends_after_thirty_days(substantial_env: WorkflowEnv) -> None:
    run = await substantial_env.start(trial, {"user": "ada"})
    assert await substantial_env.result(run) == "ada: trial ended on day 30"  # in milliseconds
    steps = [r["name"] for r in await substantial_env.records(run) if r["k"] == "step"]
    assert steps == ["notify"]


async def test_an_upgrade_on_day_ten(substantial_env: WorkflowEnv) -> None:
    run = await substantial_env.start(trial, {"user": "bob"})
    await substantial_env.skip(10 * DAY)  # the run sees ten days pass
    await substantial_env.send(run, "upgrade", "pro")
    assert await substantial_env.result(run) == "bob: upgraded to pro on day 10"
