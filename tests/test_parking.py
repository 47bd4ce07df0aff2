"""An idle run held in memory is handed back to the due index and its lease left to lapse.

On S3 each lease renewal is a request; a worker renewed every held run's lease every
``lease_ttl / 3``, sleeping ones included. Now an idle run goes back into the due index
(at its wake-up time) before its lease would need renewing, the lease lapses, and the
worker takes it again when the run wakes, unless another worker has the run by then.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from substantial import Context, workflow
from substantial.backends.fs import FSBackend
from substantial.backends.memory import MemoryBackend
from substantial.backends.sqlite import SQLiteBackend
from substantial.testing import log_records, running

hits: list[int] = []


@workflow()
async def nap_then_step(c: Context, seconds: float) -> int:
    await c.save(lambda: "before")
    await c.sleep(seconds)
    return await c.save(lambda: hits.append(1) or len(hits))


class LeaseCounts:
    """Counts lease writes by run, in front of any store."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lease_writes: Counter[str] = Counter()

    async def lease(self, run_id, owner=None, ttl=0.0, *, take_from=None):  # type: ignore[no-untyped-def]
        if owner is not None:
            self.lease_writes[run_id] += 1
        return await super().lease(run_id, owner, ttl, take_from=take_from)  # type: ignore[misc]


class Counting(LeaseCounts, MemoryBackend):
    """A memory store that counts lease writes by run."""


async def test_a_sleeping_run_costs_no_lease_renewals() -> None:
    hits.clear()
    store = Counting()
    # A renewal every 0.2 s: a 3 s sleep renewed throughout would cost about 15.
    async with running(nap_then_step, backend=store, lease_ttl=0.6, idle_timeout=60) as c:
        run = await c.start(nap_then_step, {"seconds": 3.0})
        assert await run.result(timeout=30) == 1
    # Taken, maybe renewed once before the sleep, taken again on waking, released.
    assert store.lease_writes[run.run_id] <= 5, store.lease_writes
    assert hits == [1]


async def test_a_run_taken_while_parked_is_dropped_not_run_twice() -> None:
    hits.clear()
    store = MemoryBackend()
    async with running(nap_then_step, backend=store, lease_ttl=0.6, idle_timeout=60) as c:
        run = await c.start(nap_then_step, {"seconds": 2.0})
        woken_at = time.time() + 2.0
        # Once the lease is left to lapse another worker can take the run: here, a thief
        # that holds it past the wake-up without doing anything.
        deadline = time.monotonic() + 10
        while not await store.acquire_lease(run.run_id, "thief", 3.0):
            assert time.monotonic() < deadline, "the sleeping run's lease never lapsed"
            await asyncio.sleep(0.05)
        await asyncio.sleep(max(0.0, woken_at - time.time()) + 0.8)
        # Woken, the first worker found the run taken and left it: nothing ran or was written.
        assert hits == []
        assert [r["k"] for r in await log_records(store, run.run_id)][-1] == "sleep"
        await store.release_lease(run.run_id, "thief")
        assert await run.result(timeout=30) == 1
    assert hits == [1]


class FlakyRenewals(Counting):
    """Renewing one run's lease fails once with a bug (not a store error)."""

    def __init__(self) -> None:
        super().__init__()
        self.broke = False

    async def lease(self, run_id, owner=None, ttl=0.0, *, take_from=None):  # type: ignore[no-untyped-def]
        if owner is not None and ttl > 0 and self.lease_writes[run_id] == 1 and not self.broke:
            self.broke = True
            self.lease_writes[run_id] += 1
            raise RuntimeError("a bug in one renewal")
        return await super().lease(run_id, owner, ttl, take_from=take_from)


@workflow()
async def busy(c: Context) -> int:
    return await c.save(slow_step)


async def slow_step() -> int:
    await asyncio.sleep(1.5)
    return 7


async def test_a_renewal_that_raises_does_not_end_the_renewals() -> None:
    store = FlakyRenewals()
    # Busy for 1.5 s at a lease of 0.3 s: its lease must be renewed all along. Before,
    # the renewing task ended at the first unexpected error, and the lease lapsed.
    async with running(busy, backend=store, lease_ttl=0.3, idle_timeout=60) as c:
        run = await c.start(busy)
        assert await run.result(timeout=30) == 7
    assert store.broke
    assert store.lease_writes[run.run_id] >= 6, store.lease_writes


@workflow()
async def wait_for_go(c: Context) -> str:
    await c.save(lambda: "before")
    return str(await c.receive("go"))


class CountingSQLite(LeaseCounts, SQLiteBackend):
    """A SQLite store that counts lease writes by run."""


class CountingFS(LeaseCounts, FSBackend):
    """A directory store that counts lease writes by run."""


@pytest.mark.parametrize("kind", ["memory", "sqlite", "fs"])
async def test_a_run_waiting_for_an_event_alone_parks_where_the_store_unschedules_it_safely(
    kind: str, tmp_path: Path
) -> None:
    stores = {"memory": Counting, "sqlite": CountingSQLite, "fs": CountingFS}
    store = stores[kind]() if kind == "memory" else stores[kind](tmp_path / "s")
    assert store.capabilities.unschedule_idle
    async with running(wait_for_go, backend=store, lease_ttl=0.6, idle_timeout=60) as c:
        run = await c.start(wait_for_go)
        await asyncio.sleep(2.0)
        # Out of the due index, its lease left to lapse, its workflow still in memory.
        assert run.run_id not in {r for r, _ in await store.due(time.time() + 3600, 100)}
        assert await store.get_lease(run.run_id) is None or (
            (await store.get_lease(run.run_id)).expires_at <= time.time()  # type: ignore[union-attr]
        )
        await run.send("go", "now")
        assert await run.result(timeout=30) == "now"
    # Taken, maybe renewed once, taken again on the event, released; renewed all along,
    # about 10.
    assert store.lease_writes[run.run_id] <= 5, store.lease_writes
