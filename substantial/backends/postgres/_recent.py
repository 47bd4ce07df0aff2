"""Newest first on Postgres: an index on each run's creation time, read from its metadata.

The index is on an expression of the stored metadata, not on a column: every
writer of the table (the write function of any revision, clients of earlier
versions) keeps it in step without knowing of it, and stores made before it
get it when first opened (``ensure_schema``). Metadata with no readable
``created_at`` counts as created at 0, as a listing reports it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from substantial.backends._common import RecentPage, recent_runs
from substantial.backends._recent import Cursor, check_before
from substantial.backends.base import RunInfo

__all__ = ["CREATED", "ensure_recent_index", "list_recent", "recent_index_ddl"]

log = logging.getLogger("substantial.postgres")

# The metadata is orjson's output (no spaces, created_at once at the top level, before
# any nested value); the pattern allows spaces for JSON written by others. Escaping
# bytea never fails, whatever the bytes; the match is a number float8 always reads.
CREATED = (
    "coalesce(substring(encode(info, 'escape') from "
    "'\"created_at\"\\s*:\\s*(-?[0-9]+(?:\\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)')::float8, 0)"
)


def recent_index_ddl(runs: str, index: str) -> str:
    """Return the statement that creates the creation-time index unless it exists."""
    return f"CREATE INDEX IF NOT EXISTS {index} ON {runs} (({CREATED}), run_id)"


async def ensure_recent_index(
    conn: Any, table: Callable[[str], str], lock_key: int, where: str
) -> None:
    """Create the creation-time index if missing; without the right to, warn and go on.

    Added beside the layout, not in it (clients of earlier versions keep
    working): a store made before it gets it here, once; writers wait while
    a big one is built. Without it, newest-first listing still answers, by
    sorting.
    """
    runs, index = table("runs"), table("runs_by_created")
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
            await conn.execute(recent_index_ddl(runs, index))
    except asyncpg.InsufficientPrivilegeError as exc:
        log.warning(
            "cannot create the index %s in %s (%s): listing runs newest first sorts every "
            "run; open the store once as the owner of its tables to create it",
            index,
            where,
            exc,
        )


def recent_query(runs: str, *, cursor: bool, status: bool, workflow: bool) -> str:
    """Return the page query: ``$1`` time and ``$2`` id of the cursor, filters, then limit."""
    terms = [f"({CREATED}, run_id) < ($1::float8, $2::text)"] if cursor else []
    n = 3 if cursor else 1
    for used, column in ((status, "status"), (workflow, "workflow")):
        if used:
            terms.append(f"{column} = ${n}::text")
            n += 1
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    return (
        f"SELECT run_id, {CREATED}, info FROM {runs}{where} "
        f"ORDER BY {CREATED} DESC, run_id DESC LIMIT ${n}::int"
    )


async def list_recent(
    backend: object,
    run: Callable[[str, Callable[[Any], Awaitable[Any]]], Awaitable[Any]],
    runs: str,
    status: str | None,
    workflow: str | None,
    limit: int,
    before: object,
) -> list[RunInfo]:
    """Page the index backwards from the cursor with ``run(action, fn)``, filters in the query."""
    cursor = check_before(before)
    # Unreadable metadata lists as "corrupt", which no status column holds: read all.
    by_status = status if status != "corrupt" else None
    filters = [f for f in (by_status, workflow) if f is not None]

    async def fetch(at: Cursor | None, n: int) -> RecentPage:
        sql = recent_query(
            runs, cursor=at is not None, status=by_status is not None, workflow=bool(workflow)
        )
        args = [*(at or ()), *filters, n]
        rows = await run("list recent runs", lambda c: c.fetch(sql, *args))
        return [(r, float(t), bytes(d)) for r, t, d in rows], len(rows) >= n

    return await recent_runs(
        backend,
        fetch,
        status=status,
        workflow=workflow,
        limit=limit,
        before=cursor,
        page_size=max(limit, 100) if status == "corrupt" else limit,
    )
