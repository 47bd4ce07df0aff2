"""Newest-first listing: the cursor, its checks, and the fallback every backend inherits.

``Backend.list_recent`` orders runs by ``(created_at, run_id)``, newest
first; a page's last run is the cursor (``before``) of the next. Stores with
an index in creation order (SQL, Redis) answer a page from it; any other
backend gets :func:`scan_recent`, which is correct with the contract alone
but reads every run's metadata.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeAlias

from substantial.backends._types import RunInfo
from substantial.errors import InvalidArgument

__all__ = ["SCAN_PAGE", "Cursor", "check_before", "keep_newest", "scan_recent", "sort_key"]

#: Where a page ends: the ``(created_at, run_id)`` of its last (oldest) run.
Cursor: TypeAlias = tuple[float, str]

#: Runs asked of ``list_runs`` per call by the fallback.
SCAN_PAGE = 500


def sort_key(info: RunInfo) -> Cursor:
    """Return the run's place in newest-first order (compared descending)."""
    return (info.created_at, info.run_id)


def check_before(before: object) -> Cursor | None:
    """Return ``before`` as a cursor; raise :class:`InvalidArgument` if it is not one.

    A cursor is ``(created_at, run_id)``: a finite number of epoch seconds
    and a string (``""`` stands before every id: ``(t, "")`` keeps runs
    created before ``t``). A list of the two (a cursor read back from JSON)
    is accepted.
    """
    if before is None:
        return None
    if isinstance(before, tuple | list) and len(before) == 2:
        at, run_id = before
        number = isinstance(at, int | float) and not isinstance(at, bool)
        if number and math.isfinite(at) and isinstance(run_id, str):
            return (float(at), run_id)
    raise InvalidArgument(
        f"before={before!r} is not a cursor: pass (created_at, run_id) of the last run of "
        "the previous page, e.g. (page[-1].created_at, page[-1].run_id)"
    )


def keep_newest(
    infos: Iterable[RunInfo],
    *,
    status: str | None,
    workflow: str | None,
    limit: int,
    before: object,
) -> list[RunInfo]:
    """Return the newest ``limit`` of ``infos`` after ``before`` that pass the filters.

    For a store that reads every run anyway (one pass, ``O(limit)`` memory);
    unreadable metadata has status ``corrupt`` and lists as such.
    """
    cursor = check_before(before)
    kept = (
        info
        for info in infos
        if (status is None or info.status == status)
        and (workflow is None or info.workflow == workflow)
        and (cursor is None or sort_key(info) < cursor)
    )
    return heapq.nlargest(max(0, limit), kept, key=sort_key)


async def scan_recent(
    list_runs: Callable[..., Awaitable[list[RunInfo]]],
    *,
    status: str | None,
    workflow: str | None,
    limit: int,
    before: Cursor | None,
) -> list[RunInfo]:
    """Answer ``list_recent`` by paging ``list_runs`` over the whole store: O(n) reads.

    Keeps only the newest ``limit`` runs seen (:func:`keep_newest` over them and
    each page), so memory stays ``O(limit + page)`` however large the store.
    """
    if limit <= 0:
        return []
    newest: list[RunInfo] = []
    after: str | None = None
    while True:
        found = await list_runs(status=status, workflow=workflow, limit=SCAN_PAGE, after=after)
        # The filters were the store's to apply; only the cursor and the count are left.
        newest = keep_newest(
            [*newest, *found], status=None, workflow=None, limit=limit, before=before
        )
        if len(found) < SCAN_PAGE:
            return newest
        after = found[-1].run_id
