"""Reads of one event-loop iteration share one query per kind.

A worker loading many runs at once reads each one's metadata, log and
inbox; clients awaiting many results poll their metadata. Reads of one
kind issued by tasks woken together go to the server as one query (one
round trip, one statement's client work) and each caller gets its own
rows. A read alone in its iteration is sent at once as its own statement.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from substantial.backends.postgres._errors import fail_each
from substantial.backends.postgres._schema import Statements

__all__ = ["Reads"]

K = TypeVar("K")
V = TypeVar("V")
#: The backend's ``_run(action, fn)``: fn on a connection, errors translated.
Run = Callable[..., Awaitable[Any]]
LogRows = list[tuple[int, bytes]]
InboxRows = list[tuple[str, bytes, float]]


class _Coalesce(Generic[K, V]):
    """Send the keys asked for in one loop iteration to ``fetch`` together."""

    def __init__(self, fetch: Callable[[list[K]], Awaitable[list[V]]]) -> None:
        self._fetch = fetch  # one result per key, in order
        self._pending: list[tuple[K, asyncio.Future[V]]] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V:
        loop = asyncio.get_running_loop()
        if self._pending is None:
            # Nothing else ready to run this iteration: nobody could join, go at once.
            ready = getattr(loop, "_ready", None)
            if ready is not None and not ready:
                return (await self._fetch([key]))[0]
            self._pending = []
            loop.call_soon(self._send)
        fut: asyncio.Future[V] = loop.create_future()
        self._pending.append((key, fut))
        return await fut

    def _send(self) -> None:
        batch, self._pending = self._pending or [], None
        live = [item for item in batch if not item[1].done()]  # a cancelled caller is left out
        if live:
            task = asyncio.get_running_loop().create_task(self._flush(live))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[K, asyncio.Future[V]]]) -> None:
        try:
            results = await self._fetch([key for key, _ in batch])
        except BaseException as exc:
            fail_each((fut for _, fut in batch), exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if not fut.done():
                fut.set_result(result)


class Reads:
    """The coalesced reads: run metadata by ids, logs from a position, inboxes."""

    def __init__(self, run: Run, sql: Statements) -> None:
        self._run = run
        self._sql = sql
        self._runs = _Coalesce(self._fetch_runs)
        self._logs = _Coalesce(self._fetch_logs)
        self._inboxes = _Coalesce(self._fetch_inboxes)

    async def runs(self, ids: list[str]) -> dict[str, bytes]:
        """Return the stored metadata of those of ``ids`` that exist."""
        return await self._runs.get(tuple(ids))

    async def log(self, run_id: str, start: int) -> LogRows:
        """Return ``(position, entry)`` of the run's rows from ``start``, in order."""
        return await self._logs.get((run_id, start))

    async def inbox(self, run_id: str) -> InboxRows:
        """Return ``(event_id, data, posted_at)`` of the run's events in arrival order."""
        return await self._inboxes.get(run_id)

    async def _fetch_runs(self, keys: list[tuple[str, ...]]) -> list[dict[str, bytes]]:
        wanted = sorted({run_id for ids in keys for run_id in ids})
        sql = self._sql["get_runs"]
        rows = await self._run("read run metadata", lambda c: c.fetch(sql, wanted))
        found = {run_id: bytes(data) for run_id, data in rows}
        return [{r: found[r] for r in ids if r in found} for ids in keys]

    async def _fetch_logs(self, keys: list[tuple[str, int]]) -> list[LogRows]:
        if len(keys) == 1:
            (run_id, start), sql = keys[0], self._sql["read_log"]
            rows = await self._run(
                f"read the log of run {run_id!r}", lambda c: c.fetch(sql, run_id, start)
            )
            return [[(p, bytes(e)) for p, e in rows]]
        runs, starts = [k[0] for k in keys], [k[1] for k in keys]
        sql = self._sql["read_logs"]
        rows = await self._run("read logs", lambda c: c.fetch(sql, runs, starts))
        out: list[LogRows] = [[] for _ in keys]
        for i, position, entry in rows:
            out[i - 1].append((position, bytes(entry)))
        return out

    async def _fetch_inboxes(self, keys: list[str]) -> list[InboxRows]:
        if len(keys) == 1:
            run_id, sql = keys[0], self._sql["read_inbox"]
            rows = await self._run(
                f"read the inbox of run {run_id!r}", lambda c: c.fetch(sql, run_id)
            )
            return [[(e, bytes(d), t) for e, d, t in rows]]
        wanted = sorted(set(keys))
        sql = self._sql["read_inboxes"]
        rows = await self._run("read inboxes", lambda c: c.fetch(sql, wanted))
        found: dict[str, InboxRows] = {}
        for run_id, event_id, data, posted_at in rows:
            found.setdefault(run_id, []).append((event_id, bytes(data), posted_at))
        return [found.get(k, []) for k in keys]
