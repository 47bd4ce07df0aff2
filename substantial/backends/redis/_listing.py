"""Listing runs on Redis: id order from the runs shards, newest first from their creation indexes.

Each runs shard ``{prefix:runs:k}`` (score 0: members in id order) has a
creation index ``{prefix:runs:k}:recent`` (score: the run's ``created_at``)
and one per status, ``{prefix:runs:k}:recent:<status>``, all in the same
cluster slot. One script changes them together (``index_run`` in
``put_run``, ``unindex_run`` in ``delete``): the first two hold the same
runs at every instant, and a run is in the set of its status alone, so a
status filter reads only its runs. A store written before creation indexes
existed shows as shards of different sizes and is indexed once, by the
first listing that finds it so.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from redis import exceptions as rx

from substantial.backends._common import Page, RecentPage, filtered_runs, recent_runs
from substantial.backends._hostile import is_valid_id, read_listed
from substantial.backends._recent import Cursor, check_before
from substantial.backends.base import RunInfo
from substantial.backends.redis._errors import Client, Health
from substantial.backends.redis._pipe import Pipe

__all__ = ["STATUSES", "Listing", "score"]

#: The statuses with a creation index of their own, in the order the scripts get their
#: keys (part of the layout: every client of a prefix uses this order).
STATUSES = ("active", "completed", "failed", "cancelled", "reverted", "continued", "timed_out")

#: Runs read per round while indexing a store written before creation indexes.
REINDEX_PAGE = 500


def score(created_at: float) -> str:
    """Return a creation time as a sorted-set score; one Redis cannot hold counts as 0."""
    return repr(float(created_at)) if math.isfinite(created_at) else "0.0"


class Listing:
    """The two listings of one prefix, over every shard."""

    def __init__(
        self,
        backend: object,
        client: Client,
        pipe: Pipe,
        health: Health,
        meta_key: Callable[[str], str],
        runs_keys: list[str],
        reindex: Callable[[str, float, int], Awaitable[Any]],
    ) -> None:
        self._backend = backend
        self._client = client
        self._pipe = pipe
        self._health = health
        self._meta_key = meta_key
        self.runs_keys = runs_keys
        #: The creation index of each runs shard (same hash tag: same slot).
        self.recent_keys = [f"{key}:recent" for key in runs_keys]
        self._by_status = {s: [f"{key}:recent:{s}" for key in runs_keys] for s in STATUSES}
        self._reindex = reindex
        self._indexed = False

    def index_keys(self, shard: int) -> list[str]:
        """Return the keys of shard ``shard`` the index scripts take, in their order."""
        statuses = [self._by_status[s][shard] for s in STATUSES]
        return [self.runs_keys[shard], self.recent_keys[shard], *statuses]

    @staticmethod
    def status_arg(status: str) -> int:
        """Return the position (from 1) in ``index_keys`` of the status's set; 0: none."""
        return 3 + STATUSES.index(status) if status in STATUSES else 0

    async def metas(self, ids: Sequence[str]) -> list[tuple[str, bytes | RunInfo | None]]:
        """Return each run's stored metadata (None: missing; unreadable: flagged), one trip."""
        if not ids:
            return []
        async with self._health.io("list_runs"):
            # A key of another type fails alone, not the listing.
            found = await self._pipe.group(
                [("GET", self._meta_key(run_id)) for run_id in ids], raise_on_error=False
            )
        page: list[tuple[str, bytes | RunInfo | None]] = []
        for run_id, data in zip(ids, found, strict=True):
            # None: indexed by a put_run that crashed before its SET.
            if isinstance(data, rx.ResponseError):
                data = RunInfo.unreadable(run_id, f"metadata cannot be read: {data}")
            page.append((run_id, data))
        return page

    async def list_runs(
        self,
        status: str | None,
        workflow: str | None,
        limit: int,
        after: str | None,
        ids: Sequence[str] | None,
    ) -> list[RunInfo]:
        """Page through the runs shards in id order (ZRANGE BYLEX), filtering on metadata."""

        async def fetch(cursor: str | None, n: int) -> Page:
            found = await self._next_run_ids(cursor, n)
            return await self.metas(found), len(found) >= n

        async def fetch_ids(wanted: list[str]) -> Page:
            return await self.metas(wanted), False

        return await filtered_runs(
            self._backend,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            after=after,
            page_size=max(limit, 100) if status or workflow else limit,
            ids=ids,
            fetch_ids=fetch_ids,
        )

    async def _next_run_ids(self, after: str | None, count: int) -> list[str]:
        """Return the ``count`` smallest run ids above ``after`` over all shards.

        Each shard's first ``count`` ids above ``after`` contain every id of
        the merged first ``count``, so one read per shard is enough.
        """
        low = b"-" if after is None else b"(" + after.encode()
        async with self._health.io("list_runs"):
            pipe = self._client.pipeline(transaction=False)
            for key in self.runs_keys:
                pipe.zrangebylex(key, low, b"+", start=0, num=count)
            shards: list[list[bytes]] = await pipe.execute()
        return sorted(run_id.decode() for shard in shards for run_id in shard)[:count]

    async def list_recent(
        self, status: str | None, workflow: str | None, limit: int, before: object
    ) -> list[RunInfo]:
        """Merge the creation indexes newest first from the cursor; filter on metadata."""
        cursor = check_before(before)
        if status is None or status == "corrupt":
            keys = self.recent_keys  # unreadable metadata is in no status's set
        elif status in STATUSES:
            keys = self._by_status[status]
        else:
            return []  # a status no run is stored with
        if not self._indexed:
            await self._index_older_runs()

        async def fetch(at: Cursor | None, n: int) -> RecentPage:
            newest = await self._newest(keys, at, n)
            metas = await self.metas([run_id for _, run_id in newest])
            page = [(run_id, t, data) for (t, _), (run_id, data) in zip(newest, metas, strict=True)]
            return page, len(newest) >= n

        return await recent_runs(
            self._backend,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            before=cursor,
            page_size=max(limit, 100) if workflow or status == "corrupt" else limit,
        )

    async def _newest(
        self, keys: list[str], cursor: Cursor | None, n: int
    ) -> list[tuple[float, str]]:
        """Return the ``n`` index entries after ``cursor``, newest first, over all shards.

        Per shard: the entries older than the cursor's time (``n`` at most:
        they hold every one of the merged first ``n``), and those at exactly
        its time, of which the ids below the cursor's come after it.
        """
        high = "+inf" if cursor is None else "(" + repr(cursor[0])
        async with self._health.io("list_recent"):
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.zrevrangebyscore(key, high, "-inf", start=0, num=n, withscores=True)
                if cursor is not None:
                    pipe.zrevrangebyscore(key, repr(cursor[0]), repr(cursor[0]), withscores=True)
            replies: list[list[tuple[bytes, float]]] = await pipe.execute()
        # A member no run can have (written by something else) is passed over, not read.
        named = ((at, member.decode(errors="replace")) for reply in replies for member, at in reply)
        found = [(at, run_id) for at, run_id in named if is_valid_id(run_id)]
        if cursor is not None:
            found = [entry for entry in found if entry < cursor]
        found.sort(reverse=True)
        return found[:n]

    async def _index_older_runs(self) -> None:
        """Index the runs a store written before creation indexes holds, once.

        The shards' sizes tell (one round trip): if the creation sets hold
        fewer runs than the runs sets, some are not indexed, and each run of
        the store is indexed by its metadata's time (an unreadable one at 0,
        where it lists), unless it was meanwhile.
        """
        async with self._health.io("list_recent"):
            pipe = self._client.pipeline(transaction=False)
            for key in (*self.runs_keys, *self.recent_keys):
                pipe.zcard(key)
            sizes: list[int] = await pipe.execute()
        half = len(self.runs_keys)
        if sum(sizes[half:]) < sum(sizes[:half]):  # runs the creation sets lack
            after: str | None = None
            while ids := await self._next_run_ids(after, REINDEX_PAGE):
                places = [
                    _place(self._backend, run_id, data) for run_id, data in await self.metas(ids)
                ]
                # Sent together: one round trip per page on a single server.
                await asyncio.gather(
                    *(self._reindex(r, at, self.status_arg(st)) for r, at, st in places)
                )
                after = ids[-1]
        self._indexed = True


def _place(backend: object, run_id: str, data: bytes | RunInfo | None) -> tuple[str, float, str]:
    """Return where a run goes in the creation indexes: id, time, status.

    Metadata not written yet (a start cut short) is indexed at 0 like
    unreadable metadata: the listings pass over it until a ``put_run``
    places the run, and the sets' sizes agree from then on.
    """
    if data is None:
        return run_id, 0.0, "corrupt"
    info = read_listed(backend, run_id, data) if isinstance(data, bytes) else data
    return run_id, info.created_at, info.status
