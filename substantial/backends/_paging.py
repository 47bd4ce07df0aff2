"""Every run of a store, page by page: the one loop over ``Backend.list_runs`` for its clients.

The replay checker, the CLI's export and ``migrate`` walk a whole store;
they share this iterator instead of each paging by hand. It uses only the
contract's ``list_runs`` (id order, ``after`` as the cursor), so it works on
every backend and needs nothing from one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from substantial.backends.base import Backend, RunInfo

__all__ = ["PAGE", "iter_runs"]

#: Runs asked for per ``list_runs`` call: one round trip per 500 runs.
PAGE = 500


async def iter_runs(
    backend: Backend,
    *,
    status: str | None = None,
    workflow: str | None = None,
    since: float | None = None,
    page: int = PAGE,
) -> AsyncIterator[RunInfo]:
    """Yield every run of ``backend`` in id order, filtered by status, workflow and age.

    ``since`` keeps runs created at or after that epoch time. A run whose
    metadata is unreadable is yielded with status ``corrupt`` (as
    ``list_runs`` lists it), so a caller can report it.
    """
    after: str | None = None
    while True:
        found = await backend.list_runs(status=status, workflow=workflow, limit=page, after=after)
        for info in found:
            if since is None or info.created_at >= since:
                yield info
        if len(found) < page:
            return
        after = found[-1].run_id
