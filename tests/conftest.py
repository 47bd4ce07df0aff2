"""Fixtures shared by every suite: one ``harness`` per backend under test.

``SUBSTANTIAL_TEST_BACKENDS=memory,fs`` narrows the set while developing;
CI runs them all, and a backend whose server cannot start fails its tests.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from substantial import Conductor
from tests.harness import FSHarness, Harness, MemoryHarness, SQLiteHarness

# Each server backend lives in tests/backend_<name>.py (its server fixture and harness).
pytest_plugins: list[str] = ["tests.backend_redis", "tests.backend_s3", "tests.backend_postgres"]

ALL_BACKENDS = ["memory", "fs", "sqlite", "redis", "s3", "postgres"]
BACKENDS = [
    b for b in os.environ.get("SUBSTANTIAL_TEST_BACKENDS", ",".join(ALL_BACKENDS)).split(",") if b
]
# Backends whose store other processes can open: the multi-process race and crash tests.
SHARED_BACKENDS = [b for b in BACKENDS if b != "memory"]


@pytest.fixture
def memory_harness() -> Harness:
    return MemoryHarness()


@pytest.fixture
def fs_harness(tmp_path: Path) -> Harness:
    return FSHarness(tmp_path / "store")


@pytest.fixture
def sqlite_harness(tmp_path: Path) -> Harness:
    return SQLiteHarness(tmp_path / "store.db")


@pytest.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h: Harness = request.getfixturevalue(f"{request.param}_harness")
    yield h
    await h.aclose()


@pytest.fixture(params=SHARED_BACKENDS)
async def shared_harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    h: Harness = request.getfixturevalue(f"{request.param}_harness")
    yield h
    await h.aclose()


@pytest.fixture
async def backend(harness: Harness):  # type: ignore[no-untyped-def]
    return await harness.open()


#: Tests of the shipped backend suite that open the store from other processes: the
#: memory store cannot be, and the Redis cluster run leaves them to the single server
#: (worker processes behave the same there), so they are deselected rather than skipped.
_CROSS_PROCESS = {
    "test_concurrent_processes_exactly_one_wins",
    "test_kill_9_mid_append_never_leaves_a_half_entry",
    "test_a_backend_never_closed_leaves_no_warning_at_exit",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    keep, drop = [], []
    for item in items:
        name = getattr(item, "originalname", item.name)
        cls = getattr(item, "cls", None)
        on_cluster = cls is not None and cls.__name__ == "TestContractOnCluster"
        if name in _CROSS_PROCESS and (item.name.endswith("[memory]") or on_cluster):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# A client of the harness's store, and a worker serving it (a module may define its own).
@pytest.fixture
async def conductor(harness: Harness) -> AsyncIterator[Conductor]:
    c = Conductor(await harness.open())
    yield c


@pytest.fixture
async def agent(conductor: Conductor) -> AsyncIterator[None]:
    a = conductor.run(poll_interval=0.5)
    yield
    a.cancel()
    await a
