"""The crash simulator users run on their own workflows (substantial.testing.crash_test)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from datetime import timedelta

from substantial import Context, workflow
from substantial.testing import crash_test

ledger: Counter[str] = Counter()


def charge(amount: int) -> str:
    ledger["charge"] += 1
    return f"charged {amount}"


@workflow()
async def price(c: Context, sku: str) -> int:
    return await c.save(lambda: 10 * len(sku), name="price")


@workflow()
async def checkout(c: Context, skus: list[str]) -> dict[str, object]:
    prices = await asyncio.gather(*(c.child(price, {"sku": s}) for s in skus))
    total = sum(prices)
    receipt = await c.save(lambda: charge(total), name="charge")
    await c.sleep(timedelta(milliseconds=5))
    address = await c.receive("address")
    shipped = await asyncio.gather(
        c.save(lambda: f"box 1 to {address}", name="ship-1"),
        c.save(lambda: f"box 2 to {address}", name="ship-2"),
    )
    return {"total": total, "receipt": receipt, "shipped": shipped}


async def test_a_deterministic_workflow_passes_every_crash_point() -> None:
    report = await crash_test(
        checkout, {"skus": ["pen", "ink"]}, events=[("address", "Main St 1")], workflows=[price]
    )
    assert report.reference[0] == "value" and report.reference[1]["total"] == 60
    assert len(report.points) >= 5, report.points
    assert report.ok, report.describe()
    # The charge step ran twice only where a crash fell between running it and recording it.
    assert "charge (command 2)" in report.at_least_once
    assert "passed" in report.describe()


@workflow()
async def flaky(c: Context) -> float:
    first = await c.save(lambda: 1, name="one")
    draw = random.random()  # not recorded: a replay draws again
    if draw < 2:  # always true, but the value returned differs on every replay
        await c.save(lambda: 2, name="two")
    return first + draw


async def test_a_workflow_that_is_not_deterministic_fails_and_says_where() -> None:
    report = await crash_test(flaky)
    assert not report.ok
    failed = [p for p in report.points if not p.ok]
    assert failed and all(not p.matches for p in failed)
    assert "ended differently" in report.describe()
