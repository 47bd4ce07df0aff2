"""Group commit for SQLite: the writes of one event-loop iteration share one transaction.

Every write issued by the tasks of one process during one loop iteration
joins one ``BEGIN IMMEDIATE ... COMMIT``, each in its own savepoint so a
failing write fails alone. SQLite calls run on the event-loop thread: a
statement costs a few microseconds, less than a hop to a worker thread would.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar, cast

from substantial.backends.sqlite._writer_lock import WriterLock
from substantial.errors import BackendUnavailable

__all__ = ["GroupCommit", "Write"]

T = TypeVar("T")

#: One write: statements run on the shared connection inside the batch's transaction.
Write = Callable[[sqlite3.Connection], Any]


class _Op:
    """One queued write: what to run, and where its follower waits (None for the leader)."""

    __slots__ = ("fn", "fut", "single")

    def __init__(self, fn: Write, fut: asyncio.Future[Any] | None, single: bool) -> None:
        self.fn = fn
        self.fut = fut
        self.single = single


class GroupCommit:
    """Queue writes and commit each loop iteration's writes together."""

    def __init__(
        self,
        connection: Callable[[], sqlite3.Connection | None],
        unavailable: Callable[[sqlite3.Error | OSError, str], BackendUnavailable],
        closed: Callable[[], BackendUnavailable],
        wake: Callable[[], None],
        lock: WriterLock | None = None,
        committed: Callable[[], None] = lambda: None,
    ) -> None:
        self._connection = connection
        self._lock = lock
        self._committed = committed
        self._unavailable = unavailable
        self._closed = closed
        self._wake = wake
        self.pending: list[_Op] = []
        #: Set by a write that made work due; the waiters are woken after the commit.
        self.wake_after_commit = False

    async def write(self, fn: Callable[[sqlite3.Connection], T], *, single: bool = False) -> T:
        """Run ``fn`` in the transaction shared by the writes of this loop iteration.

        The first writer of an iteration leads: it yields once, so that every
        task ready in this iteration can queue its write, then commits them
        all and hands each follower its own outcome. ``single`` marks a write
        of one statement that leaves nothing behind when it fails: alone, it
        needs no explicit transaction; in a batch, no savepoint.
        """
        if self.pending:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self.pending.append(_Op(fn, fut, single))
            return cast(T, await fut)
        own = _Op(fn, None, single)
        self.pending.append(own)
        # asyncio's queue of callbacks to run before the next poll: when it is
        # empty no other task runs before we would resume, so nobody can join
        # the batch and yielding would only add latency.
        ready = getattr(asyncio.get_running_loop(), "_ready", None)
        if ready is None or ready:
            try:
                await asyncio.sleep(0)
            except BaseException:
                # Cancelled: this write does not happen, the followers' still do.
                self.pending.remove(own)
                self._flush(None)
                raise
        ok, value = self._flush(own)
        if not ok:
            raise value
        return cast(T, value)

    def _flush(self, own: _Op | None) -> tuple[bool, Any]:
        """Commit the queued writes; settle the followers and return the leader's outcome."""
        # A follower cancelled before the commit gets no write: its cancel means "did not happen".
        batch = [op for op in self.pending if op.fut is None or not op.fut.done()]
        self.pending = []
        if not batch:
            return True, None
        self.wake_after_commit = False
        try:
            outcomes = self._commit(batch)
            self._committed()
        except (sqlite3.Error, OSError) as exc:
            outcomes = [(False, self._unavailable(exc, "commit writes")) for _ in batch]
        except BackendUnavailable as exc:
            outcomes = [(False, BackendUnavailable(*exc.args)) for _ in batch]
        except BaseException:
            for op in batch:
                if op.fut is not None:
                    op.fut.cancel()
            raise
        mine: tuple[bool, Any] = (True, None)
        for op, outcome in zip(batch, outcomes, strict=True):
            if op is own:
                mine = outcome
            elif op.fut is not None:
                if outcome[0]:
                    op.fut.set_result(outcome[1])
                else:
                    op.fut.set_exception(outcome[1])
        if self.wake_after_commit:
            self.wake_after_commit = False
            self._wake()
        return mine

    def _commit(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Run the batch in one transaction, holding the store's writer lock meanwhile."""
        db = self._connection()
        if db is None:
            raise self._closed()
        held = self._lock is not None and self._lock.acquire()
        try:
            return self._transaction(db, batch)
        finally:
            if held:
                assert self._lock is not None
                self._lock.release()

    def _transaction(self, db: sqlite3.Connection, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Run the batch in one transaction; each op's own failure is its outcome."""
        if len(batch) == 1 and batch[0].single:
            # One statement is a transaction by itself (autocommit): skip BEGIN/COMMIT.
            try:
                return [(True, batch[0].fn(db))]
            except sqlite3.Error:
                raise
            except Exception as exc:
                return [(False, exc)]
        db.execute("BEGIN IMMEDIATE")
        outcomes: list[tuple[bool, Any]] = []
        try:
            if len(batch) == 1:
                # Alone in the transaction: a rollback undoes exactly this op.
                try:
                    outcomes.append((True, batch[0].fn(db)))
                except sqlite3.Error:
                    raise
                except Exception as exc:
                    db.execute("ROLLBACK")
                    self.wake_after_commit = False
                    return [(False, exc)]
            else:
                for op in batch:
                    if op.single:
                        # One statement that leaves nothing behind when it fails (an append
                        # refused, a row replaced): no savepoint needed to undo it alone.
                        try:
                            outcomes.append((True, op.fn(db)))
                        except sqlite3.Error:
                            raise
                        except Exception as exc:
                            outcomes.append((False, exc))
                        continue
                    db.execute("SAVEPOINT op")
                    try:
                        outcomes.append((True, op.fn(db)))
                    except sqlite3.Error:
                        raise  # the transaction itself may be gone: fail the whole batch
                    except Exception as exc:
                        db.execute("ROLLBACK TO op")
                        outcomes.append((False, exc))
                    db.execute("RELEASE op")
            db.execute("COMMIT")
        except BaseException:
            self.wake_after_commit = False
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        return outcomes

    async def settle(self) -> None:
        """Let a leader that is yielding commit its batch (bounded)."""
        for _ in range(100):
            if not self.pending:
                break
            await asyncio.sleep(0)
