"""The Backend contract on every backend: the shipped suite, plus what needs the harness.

``substantial.testing.contract`` is the suite a third-party backend runs on
itself; here it runs on each of ours, with the harness that opens (and, for
the tests below it, damages) each store.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from substantial._runs import store_run, take_lease
from substantial.backends.base import Backend, RunInfo, make_owner
from substantial.errors import CorruptRecord
from substantial.records import decode_entry, encode_entry
from substantial.testing.contract import BackendContract, Store
from tests.conftest import BACKENDS
from tests.harness import Harness

ROOT = Path(__file__).resolve().parent.parent


class TestContract(BackendContract):
    """The shipped suite, on every backend of this project."""

    # 32 Python processes per backend cost more than a minute of CI on two cores; 12
    # released at one instant race just as well (the 32-task race runs in one process).
    race_processes = 12

    @pytest.fixture(params=BACKENDS)
    async def store(self, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
        harness: Harness = request.getfixturevalue(f"{request.param}_harness")
        url = harness.url if harness.shared_across_processes else None
        yield Store(harness.open, url)
        await harness.aclose()


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def info(run_id: str, workflow: str = "wf", status: str = "active") -> RunInfo:
    now = time.time()
    return RunInfo(run_id, workflow, status, now, now)  # type: ignore[arg-type]


async def test_a_corrupt_entry_is_reported_and_the_rest_stays_readable(
    harness: Harness, backend: Backend
) -> None:
    for i in range(4):
        await backend.append("c", i, entry(i))
    await harness.corrupt_entry("c", 2)
    log = await backend.read_log("c")
    assert len(log) == 4
    with pytest.raises(CorruptRecord) as err:
        decode_entry("c", 2, log[2])
    assert "'c'" in str(err.value) and "record 2" in str(err.value)
    assert err.value.position == 2
    assert decode_entry("c", 3, (await backend.read_log("c", 3))[0])[0]["value"] == 3
    assert decode_entry("c", 1, log[1])[0]["value"] == 1


# -- the policy above the contract (substantial/_runs.py), on every backend ----------


async def test_the_lease_of_a_dead_process_on_this_host_is_taken_over(backend: Backend) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from substantial.backends.base import make_owner; print(make_owner())",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    dead_owner = proc.stdout.strip()
    held = await backend.lease("r", dead_owner, 3600)
    assert held is not None and held.owner == dead_owner
    me = make_owner()
    assert await backend.lease("r", me, 30) == held  # the store alone: still held
    taken = await take_lease(backend, "r", me, 30)
    assert taken is not None and taken.owner == me
    # A live owner on this host is never taken over.
    other = await take_lease(backend, "r", make_owner(), 30)
    assert other is not None and other.owner == me


async def test_store_run_is_idempotent(backend: Backend) -> None:
    first = info("once")
    assert await store_run(backend, first, entry("start"), time.time()) is True
    assert await store_run(backend, info("once"), entry("again"), time.time()) is False
    (stored,) = await backend.read_log("once")
    assert decode_entry("once", 0, stored)[0]["value"] == "start"
    assert await backend.get_run("once") == first
    assert [r for r, _ in await backend.due(time.time())] == ["once"]


async def test_store_run_completes_a_half_done_start(backend: Backend) -> None:
    await backend.append("half", 0, entry("start"))  # crashed before metadata
    assert await store_run(backend, info("half"), entry("start"), time.time()) is False
    assert await backend.get_run("half") is not None
    assert [r for r, _ in await backend.due(time.time())] == ["half"]
    # Crashed after the metadata, before the due entry: the retry schedules it again.
    await backend.append("nodue", 0, entry("start"))
    await backend.put_run(info("nodue"))
    assert await store_run(backend, info("nodue"), entry("start"), time.time()) is False
    assert "nodue" in [r for r, _ in await backend.due(time.time())]


async def test_a_run_with_corrupt_metadata_lists_newest_first_as_corrupt(
    harness: Harness, backend: Backend
) -> None:
    """Unreadable metadata lists once, as ``corrupt``; the cursor pages past it."""
    t0 = 1_700_000_000.0
    for i, run_id in enumerate(["m0", "m1", "m2", "m3"]):
        await backend.put_run(RunInfo(run_id, "wf", "active", t0 + i, t0 + i))
    await harness.corrupt_meta("m2", "garbage")
    await harness.corrupt_meta("m0", "types")
    listed = await backend.list_recent()
    assert sorted(r.run_id for r in listed) == ["m0", "m1", "m2", "m3"]
    assert {r.run_id for r in listed if r.status == "corrupt"} == {"m0", "m2"}
    assert [r.run_id for r in listed if r.status != "corrupt"] == ["m3", "m1"]
    keys = [(r.created_at, r.run_id) for r in listed]
    assert keys == sorted(keys, reverse=True)  # a corrupt run's place is its cursor
    walked: list[str] = []
    before = None
    while page := await backend.list_recent(limit=1, before=before):
        walked.append(page[0].run_id)
        before = (page[0].created_at, page[0].run_id)
    assert walked == [r.run_id for r in listed]
    assert [r.run_id for r in await backend.list_recent(status="corrupt")] == [
        r.run_id for r in listed if r.status == "corrupt"
    ]
    assert [r.run_id for r in await backend.list_recent(status="active")] == ["m3", "m1"]
