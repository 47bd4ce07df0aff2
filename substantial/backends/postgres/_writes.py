"""Group commit: the writes of one event-loop iteration share one round trip and one commit.

A worker drives many runs in one process. The writes their tasks issue
together (appends, leases, metadata, due times, events; of many runs) go
to the server as one call of the prefix's write function, which applies
them in order in one transaction: one round trip and one WAL flush
instead of one each. A write alone in its iteration is sent at once as its
own statement.

Each write keeps its own outcome. The function reports one row per write
(an append's position taken is an outcome, not an error); if the server
refuses the batch as a whole (a bad value, a deadlock), the transaction
left nothing behind and each write is sent again alone, so only the write
at fault fails. A connection lost under a batch fails every write in it
with ``BackendUnavailable``: the batch is one transaction, so all of it
was stored or none.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import asyncpg

from substantial.backends.postgres._errors import (
    fail_each,
    is_connection_error,
    is_connection_lost,
)
from substantial.backends.postgres._schema import (
    ACQUIRE,
    APPEND,
    PUT_RUN,
    SCHEDULE,
    SEND,
    START,
    UNSCHEDULE,
    Statements,
)
from substantial.errors import BackendError

__all__ = ["Op", "Outcome", "WriteBatcher", "unschedule_idle"]

T = TypeVar("T")
Conn = Any  # asyncpg.Connection: asyncpg ships no type information
#: The backend's ``_run(action, fn, retry=...)``: fn on a pooled connection, errors translated.
Run = Callable[..., Awaitable[Any]]


class Op(NamedTuple):
    """One write; the meaning of each field depends on ``kind`` (``_schema.function_ddl``)."""

    kind: int
    run_id: str
    position: int | None = None
    text1: str | None = None
    text2: str | None = None
    blob: bytes | None = None
    num1: float | None = None
    num2: float | None = None
    blob2: bytes | None = None


class Outcome(NamedTuple):
    """What one write reports: ``state`` and, for leases, the old row and the new expiry."""

    state: int
    owner: str | None = None
    new_expiry: float | None = None
    old_expiry: float | None = None


class WriteBatcher:
    """Collect writes and send them together as one transaction.

    A batch holds the writes of one loop iteration, and all those issued
    while ``max_in_flight`` transactions are on their way (classic group
    commit: the busier the store, the larger the batches). One at a time
    makes the fewest round trips: with 1,000 runs of 10 steps in one
    worker, 1.0 batch per run instead of 2.1 with two on their way, and
    less client and server CPU per run; a write alone still goes at once.
    """

    def __init__(self, run: Run, sql: Statements, max_in_flight: int = 1) -> None:
        self._run = run
        self._sql = sql
        self._max = max_in_flight
        self._in_flight = 0
        self._batch: list[tuple[Op, asyncio.Future[Outcome]]] | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        #: False while the server lacks the write function: every write goes alone.
        self.enabled = True

    async def write(self, op: Op) -> Outcome:
        """Apply ``op`` with the writes issued beside it; return its outcome."""
        if not self.enabled:
            return await self.write_one(op)
        loop = asyncio.get_running_loop()
        if self._batch is None:
            # asyncio's queue of callbacks to run before the next poll: when it is
            # empty no other task can join a batch, so waiting for one only adds latency.
            ready = getattr(loop, "_ready", None)
            if self._in_flight < self._max and ready is not None and not ready:
                self._in_flight += 1
                try:
                    return await self.write_one(op)
                finally:
                    self._in_flight -= 1
                    self._next()
            self._batch = []
            # Runs after every callback already queued: each task that is ready in
            # this iteration gets to add its write before the batch leaves (or, with
            # enough transactions on their way, when the first of them is back).
            loop.call_soon(self._next)
        fut: asyncio.Future[Outcome] = loop.create_future()
        self._batch.append((op, fut))
        return await fut

    def _next(self) -> None:
        """Send the waiting batch if fewer than ``max_in_flight`` are on their way."""
        if self._batch is None or self._in_flight >= self._max:
            return
        batch, self._batch = self._batch, None
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._flush(batch))
        self._flushes.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._flushes.discard(task)
        self._in_flight -= 1
        self._next()

    async def _flush(self, batch: list[tuple[Op, asyncio.Future[Outcome]]]) -> None:
        # A caller cancelled before the batch left gets no write: its cancel means "did not happen".
        live = [item for item in batch if not item[1].done()]
        if not live:
            return
        # One order for every process's batches (by run, each run's writes in the order
        # issued): two batches locking rows in opposite orders would deadlock.
        live.sort(key=lambda item: item[0].run_id)
        if len(live) == 1 or not self.enabled:
            await self._one_by_one(live)
            return
        try:
            outcomes = await self.write_many([op for op, _ in live])
        except BackendError as exc:
            if self._refused(exc):
                # Rolled back whole: each write again alone, so only the one at fault fails.
                await self._one_by_one(live)
                return
            _fail(live, exc)
            return
        except BaseException as exc:
            _fail(live, exc)
            if not isinstance(exc, Exception):
                raise
            return
        for (_, fut), outcome in zip(live, outcomes, strict=True):
            if not fut.done():
                fut.set_result(outcome)

    async def _one_by_one(self, items: list[tuple[Op, asyncio.Future[Outcome]]]) -> None:
        for op, fut in items:
            if fut.done():
                continue
            try:
                outcome = await self.write_one(op)
            except BaseException as exc:
                _fail([(op, fut)], exc)
                if not isinstance(exc, Exception):
                    _fail(items, exc)
                    raise
                continue
            if not fut.done():
                fut.set_result(outcome)

    async def write_one(self, op: Op) -> Outcome:
        """Send one write as its own statement (one implicit transaction)."""
        run, sql, run_id = self._run, self._sql, op.run_id
        if op.kind == APPEND:

            async def append(c: Conn) -> Outcome:
                status = await c.execute(sql["append"], run_id, op.position, op.blob)
                if str(status).endswith(" 1"):
                    return Outcome(0)
                taken = await c.fetch(sql["taken"], [run_id], [op.position])
                return Outcome(1 if taken else 2)

            # Not retried: after a lost reply the retry would find its own row and fail.
            outcome: Outcome = await run("append", append, retry=False)
            return outcome
        if op.kind == START:
            args: tuple[Any, ...] = (
                run_id,
                op.blob,
                op.text1,
                op.text2,
                op.blob2,
                op.num1,
                sql.channel,
            )
            # Not retried, as an append: after a lost reply the retry would find the
            # run it created and report it as there before.
            row = await run("start", lambda c: c.fetchrow(sql["start"], *args), retry=False)
            return Outcome(0 if row[0] else 1)
        if op.kind == PUT_RUN:
            args = (run_id, op.text1, op.text2, op.blob)
            await run("put_run", lambda c: c.execute(sql["put_run"], *args))
        elif op.kind == SCHEDULE:
            args = (run_id, op.num1, sql.channel)
            await run("set_due", lambda c: c.execute(sql["schedule"], *args))
        elif op.kind == UNSCHEDULE:
            await run("set_due", lambda c: c.execute(sql["unschedule"], run_id))
        elif op.kind == SEND:
            args = (run_id, op.text1, op.blob, op.num1, op.num2, sql.channel)
            row = await run("set_due", lambda c: c.fetchrow(sql["send_at"], *args))
            return Outcome(1 if row[0] else 0)
        else:
            take = op.kind == ACQUIRE
            name = "acquire" if take else "give_up"
            args = (run_id, op.text1, op.num1, op.text2) if take else (run_id, op.text1, op.text2)
            # Retrying is safe: a first try that took the lease makes the retry a renewal.
            done, owner, old = await run("lease", lambda c: c.fetchrow(sql[name], *args))
            if take:
                return Outcome(0, owner, done, old)
            return Outcome(1 if done else 0, owner, None, old)
        return Outcome(0)

    async def write_many(self, ops: list[Op]) -> list[Outcome]:
        """Apply the writes in order in one call of the write function: one transaction."""
        n = len(ops)
        # A column of NULLs goes as a NULL array, which unnest pads with NULLs: an
        # append-only batch leaves five of the nine unencoded (the driver's array
        # encoder checks each element's type, a cost per element).
        columns = [None if c.count(None) == n else list(c) for c in zip(*ops, strict=True)]
        rows = await self._run(
            "write",
            lambda c: c.fetch(self._sql["write_many"], *columns),
            # Every write but an append or a new run may be sent again after a lost reply.
            retry=all(op.kind not in (APPEND, START) for op in ops),
        )
        return [Outcome(*row) for row in rows]

    def _refused(self, exc: BackendError) -> bool:
        """Tell whether the server refused a batch whole (so nothing of it was stored)."""
        cause = exc.__cause__
        if cause is None or is_connection_lost(cause):
            return False
        if isinstance(cause, asyncpg.UndefinedFunctionError):
            # Dropped since the pool opened: write alone until the pool is opened again.
            self.enabled = False
        # A deadlock between two processes' batches rolled back this one; alone, they pass.
        return isinstance(cause, asyncpg.TransactionRollbackError) or not is_connection_error(cause)

    async def drain(self) -> None:
        """Wait until every batch that has left is settled."""
        while self._batch is not None or self._flushes:
            if self._flushes:
                await asyncio.wait(set(self._flushes))
            else:
                await asyncio.sleep(0)


def _fail(items: list[tuple[Op, asyncio.Future[Outcome]]], exc: BaseException) -> None:
    fail_each((fut for _, fut in items), exc)


async def unschedule_idle(conn: Conn, sql: Statements, run_id: str) -> bool:
    """Delete the run's due row unless an event waits: one transaction, the row locked first.

    A post inserts its event and upserts the due row in one transaction. If it
    holds the row, the lock waits for its commit, and the inbox read after the
    lock (a new snapshot) sees its event. If it comes after the lock, its upsert
    waits for this commit and inserts the row anew.
    """
    async with conn.transaction():
        await conn.fetch(sql["lock_due"], run_id)
        if await conn.fetchval(sql["inbox_waits"], run_id):
            return False
        await conn.execute(sql["drop_due"], run_id)
        return True
