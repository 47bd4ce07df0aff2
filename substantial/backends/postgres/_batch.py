"""Group commit of appends: the appends of one event-loop iteration share one INSERT.

A worker drives many runs in one process; their appends, issued by tasks
woken together, go to the server as one multi-row ``INSERT ... ON CONFLICT
DO NOTHING RETURNING``: one round trip and one commit (one WAL flush)
instead of one each. The rows that come back were stored; every other row
found its position taken.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from substantial.backends._common import gap_error
from substantial.errors import BackendError, InvalidArgument, PositionTaken

__all__ = ["AppendBatcher"]

Key = tuple[str, int]
#: Store the rows (sorted by key); return the keys stored now and, of the others, those
#: whose position holds an entry (taken). A row in neither would have left a gap.
Insert = Callable[[list[tuple[str, int, bytes]]], Awaitable[tuple[set[Key], set[Key]]]]


class AppendBatcher:
    """Collect the appends of one loop iteration and insert them together."""

    def __init__(self, insert: Insert) -> None:
        self._insert = insert
        self._batch: list[tuple[str, int, bytes, asyncio.Future[None]]] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Store the entry with the others of this iteration; raise PositionTaken if taken."""
        loop = asyncio.get_running_loop()
        if self._batch is None:
            # asyncio's queue of callbacks to run before the next poll: when it is
            # empty no other task can join a batch, so waiting for one only adds latency.
            ready = getattr(loop, "_ready", None)
            if ready is not None and not ready:
                stored, taken = await self._insert([(run_id, position, entry)])
                if (run_id, position) not in stored:
                    raise _refusal(run_id, position, taken)
                return
            self._batch = []
            # Runs after every callback already queued: each task that is ready in
            # this iteration gets to add its append before the batch leaves.
            loop.call_soon(self._send)
        fut: asyncio.Future[None] = loop.create_future()
        self._batch.append((run_id, position, entry, fut))
        await fut

    def _send(self) -> None:
        batch, self._batch = self._batch or [], None
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[str, int, bytes, asyncio.Future[None]]]) -> None:
        # A caller cancelled before the batch left gets no write: its cancel means "did not happen".
        live = [item for item in batch if not item[3].done()]
        # Of two appends of one key in one batch, the first goes in the INSERT and the
        # second loses to it (or to the row that was already there).
        first: dict[Key, tuple[bytes, asyncio.Future[None]]] = {}
        for run_id, position, entry, fut in live:
            first.setdefault((run_id, position), (entry, fut))
        # One order for every process's batches: two multi-row inserts that wait on
        # each other's rows in opposite orders would deadlock.
        rows = sorted((key[0], key[1], entry) for key, (entry, _) in first.items())
        try:
            stored, taken = await self._insert(rows) if rows else (set(), set())
        except BaseException as exc:
            for *_, fut in live:
                if fut.done():
                    continue
                if isinstance(exc, BackendError):
                    own = type(exc)(*exc.args)  # one instance each: tracebacks stay apart
                    own.__cause__ = exc.__cause__
                    fut.set_exception(own)
                elif isinstance(exc, Exception):
                    fut.set_exception(exc)
                else:
                    fut.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        for run_id, position, _, fut in live:
            if fut.done():
                continue
            key = (run_id, position)
            if key in stored and first[key][1] is fut:
                fut.set_result(None)
            elif key in stored:
                fut.set_exception(PositionTaken(run_id, position))  # lost to the first
            else:
                fut.set_exception(_refusal(run_id, position, taken))

    async def drain(self) -> None:
        """Wait until every batch that has left is settled."""
        while self._batch is not None or self._flushes:
            if self._flushes:
                await asyncio.wait(set(self._flushes))
            else:
                await asyncio.sleep(0)


def _refusal(run_id: str, position: int, taken: set[Key]) -> PositionTaken | InvalidArgument:
    if (run_id, position) in taken:
        return PositionTaken(run_id, position)
    return gap_error(run_id, position)
