"""The conformance suite, part five: ``list_recent``, runs newest first.

Every backend answers it (the base class pages ``list_runs`` where the
store has no index in creation order); the order, the cursor, the filters
and deletes are checked alike on all.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from substantial.backends.base import Backend, RunInfo
from substantial.errors import InvalidArgument
from substantial.testing._support import Opener

__all__ = ["RecentTests"]

T0 = 1_700_000_000.0


def made(run_id: str, at: float, workflow: str = "wf", status: str = "active") -> RunInfo:
    """Return metadata of a run created at ``at``."""
    return RunInfo(run_id, workflow, status, at, at + 1)  # type: ignore[arg-type]


async def ids(backend: Backend, **kwargs: object) -> list[str]:
    """Return the ids ``list_recent`` lists with these arguments."""
    return [r.run_id for r in await backend.list_recent(**kwargs)]  # type: ignore[arg-type]


async def walk(backend: Backend, page: int, **kwargs: object) -> list[str]:
    """Return every run ``list_recent`` lists, page by page, following the cursor."""
    out: list[str] = []
    before: tuple[float, str] | None = None
    while True:
        found = await backend.list_recent(limit=page, before=before, **kwargs)  # type: ignore[arg-type]
        out += [r.run_id for r in found]
        if len(found) < page:
            return out
        before = (found[-1].created_at, found[-1].run_id)


class RecentTests:
    """Newest first by (created_at, run_id), filtered, paged by a cursor, deletes gone."""

    async def test_runs_list_newest_first_ties_by_id_filtered_and_paged(
        self, backend: Backend
    ) -> None:
        """Order is created_at then id, both descending; filters and the cursor page it."""
        assert await backend.list_recent() == []
        runs = [
            made("a", T0 + 3, "alpha"),
            made("b", T0 + 1, "beta"),
            made("c", T0 + 3, "beta", "completed"),  # same time as "a": the id decides
            made("d", T0 + 2, "alpha", "failed"),
            made("e", T0 + 0.5, "alpha"),
        ]
        for info in runs:
            await backend.put_run(info)
        newest = ["c", "a", "d", "b", "e"]
        listed = await backend.list_recent()
        assert [r.run_id for r in listed] == newest
        assert listed[0] == runs[2]  # the metadata as stored
        assert await ids(backend, limit=2) == ["c", "a"]
        assert await ids(backend, limit=0) == []
        assert await ids(backend, before=(T0 + 3, "c")) == ["a", "d", "b", "e"]
        assert await ids(backend, before=(T0 + 3, "b")) == ["a", "d", "b", "e"]
        assert await ids(backend, before=(T0 + 3, "")) == ["d", "b", "e"]  # created before T0+3
        assert await ids(backend, before=[T0 + 2, "d"]) == ["b", "e"]  # a cursor read from JSON
        assert await ids(backend, workflow="alpha") == ["a", "d", "e"]
        assert await ids(backend, status="active") == ["a", "b", "e"]
        assert await ids(backend, status="active", workflow="alpha", limit=1) == ["a"]
        assert await ids(backend, workflow="alpha", before=(T0 + 3, "a")) == ["d", "e"]
        assert await ids(backend, status="corrupt") == []
        for page in (1, 2, 3):
            assert await walk(backend, page) == newest
            assert await walk(backend, page, workflow="alpha") == ["a", "d", "e"]
        # A new status leaves a run where it was: its creation time is its place.
        await backend.put_run(runs[4].with_status("completed"))
        assert await ids(backend) == newest
        assert await ids(backend, status="completed") == ["c", "e"]
        assert await ids(backend, status="active") == ["a", "b"]
        assert await ids(backend, status="no-such-status") == []
        for bad in ((T0, None), ("soon", "a"), (float("nan"), "a"), T0, (T0,)):
            with pytest.raises(InvalidArgument, match="not a cursor"):
                await backend.list_recent(before=bad)  # type: ignore[arg-type]

    async def test_runs_created_concurrently_list_once_each_in_order(
        self, open_client: Opener
    ) -> None:
        """Clients creating runs at once: every run lists once; a walk skips and repeats none."""
        clients = [await open_client() for _ in range(3)]
        # Ties in time too. Stores without an index read every run per page: few of each.
        runs = [made(f"r{i:03d}", T0 + (i * 7919 % 40) / 8) for i in range(60)]
        await asyncio.gather(*(clients[i % 3].put_run(info) for i, info in enumerate(runs)))
        expected = [
            r.run_id for r in sorted(runs, key=lambda r: (r.created_at, r.run_id), reverse=True)
        ]
        assert await ids(clients[0], limit=500) == expected
        assert await walk(clients[1], 23) == expected
        # Runs created while a reader pages are newer than its cursor: they never
        # show up in its later pages, and no older run is skipped or repeated.
        first = await clients[0].list_recent(limit=30)
        now = time.time()
        await asyncio.gather(*(clients[i % 3].put_run(made(f"n{i}", now + i)) for i in range(10)))
        rest = await walk_from(clients[2], first[-1])
        assert [r.run_id for r in first] + rest == expected
        assert (await ids(clients[0], limit=10)) == [f"n{i}" for i in range(9, -1, -1)]

    async def test_deleted_runs_no_longer_list(self, backend: Backend) -> None:
        """A deleted run is gone from the newest-first listing; the others stay in order."""
        if not backend.capabilities.delete:
            return
        for i in range(6):
            await backend.put_run(made(f"x{i}", T0 + i))
        assert await backend.delete("x4") is True
        assert await backend.delete("x1") is True
        assert await ids(backend) == ["x5", "x3", "x2", "x0"]
        assert await walk(backend, 1) == ["x5", "x3", "x2", "x0"]
        await backend.put_run(made("x4", T0 - 1))  # the id used again, created later
        assert await ids(backend) == ["x5", "x3", "x2", "x0", "x4"]


async def walk_from(backend: Backend, last: RunInfo) -> list[str]:
    """Return every run listed after ``last``, two pages' worth at a time."""
    out: list[str] = []
    before = (last.created_at, last.run_id)
    while True:
        found = await backend.list_recent(limit=25, before=before)
        out += [r.run_id for r in found]
        if len(found) < 25:
            return out
        before = (found[-1].created_at, found[-1].run_id)
