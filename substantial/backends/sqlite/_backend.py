"""The sqlite backend: tables in one database file, written through group commit."""

from __future__ import annotations

import os
import sqlite3
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from substantial.backends import _hostile
from substantial.backends._common import (
    Page,
    RecentPage,
    ack_ids,
    check_due,
    check_durability,
    check_position,
    check_ttl,
    filtered_runs,
    gap_error,
    local_store_url,
    recent_runs,
)
from substantial.backends._recent import Cursor, check_before
from substantial.backends._wake import WakeChannel
from substantial.backends.base import (
    Backend,
    Capabilities,
    DueRuns,
    Durability,
    Event,
    Lease,
    NewEvent,
    RunInfo,
    validate_id,
)
from substantial.backends.sqlite._batch import GroupCommit
from substantial.backends.sqlite._checkpoint import Checkpointer
from substantial.backends.sqlite._errors import unavailable
from substantial.backends.sqlite._schema import (
    ACQUIRE,
    ACQUIRE_UNREADABLE,
    APPEND,
    GET_LEASE,
    HAS_ENTRY,
    POST,
    PROBE,
    PUT_RUN,
    RELEASE,
    RELEASE_UNREADABLE,
    SCHEDULE,
    probe_query,
    recent_query,
    setup,
)
from substantial.backends.sqlite._writer_lock import WriterLock
from substantial.errors import BackendUnavailable, PositionTaken

__all__ = ["SQLiteBackend"]

T = TypeVar("T")


class SQLiteBackend(Backend):
    """Store runs in one SQLite database file; safe for many processes of one machine.

    ``durability="process"`` (default) uses ``synchronous=NORMAL``: a commit
    survives the process being killed. ``"fsync"`` uses ``synchronous=FULL``:
    it survives power loss. ``timeout`` is how long a write waits for another
    process's transaction before failing with :class:`BackendUnavailable`.
    """

    name = "sqlite"
    capabilities = Capabilities(
        wake_ups=True, group_commit=True, delete=True, list_recent=True, unschedule_idle=True
    )

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "process",
        timeout: float = 5.0,
    ) -> None:
        super().__init__()
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.durability: Durability = check_durability(durability)
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._wake = WakeChannel(f"{self.path}.wake", self.waker)
        self._writer = WriterLock(self.path, timeout)
        self._checkpoints = Checkpointer(self.path, timeout)  # durability="process" only
        weakref.finalize(self, self._checkpoints.stop)  # a backend dropped unclosed
        self._batch = GroupCommit(
            lambda: self._db,
            self._unavailable,
            self._closed_error,
            self._wake.broadcast,
            self._writer,
            self._checkpoints.committed if self.durability == "process" else lambda: None,
        )

    @classmethod
    def from_url(cls, url: str) -> SQLiteBackend:
        """Open ``sqlite:///path/to.db``, ``?durability=fsync`` optional."""
        path, durability = local_store_url(url)
        return cls(path, durability=durability)

    def describe(self) -> str:
        """Return the backend name and its database file."""
        return f"sqlite {self.path} (durability={self.durability})"

    # -- connection and errors --------------------------------------------

    def _unavailable(self, exc: sqlite3.Error | OSError, action: str) -> BackendUnavailable:
        """Translate a driver or OS error into the one error callers handle, saying what to do."""
        return unavailable(self.path, self.timeout, exc, action)

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        if self._closed:
            raise self._closed_error()
        os.makedirs(self.path.parent, exist_ok=True)
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.timeout
        )
        try:
            setup(db, self.path, self.durability, self.timeout)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _closed_error(self) -> BackendUnavailable:
        return BackendUnavailable(f"this backend for {self.path} is closed; open a new one")

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, single: bool = False) -> T:
        """Run ``fn`` in the transaction shared by the writes of this loop iteration."""
        try:
            self._connect()  # fail in the caller, not in the batch, if the file cannot be opened
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable(exc, f"open {self.path}") from exc
        return await self._batch.write(fn, single=single)

    def _read(self, sql: str, args: Sequence[Any], action: str) -> list[Any]:
        try:
            return self._connect().execute(sql, args).fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable(exc, action) from exc

    def _wake_if_due(self, at: float) -> None:
        if at <= time.time():
            self._batch.wake_after_commit = True

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Insert the entry; the primary key refuses a taken position."""
        validate_id("run id", run_id)
        check_position(run_id, position)
        entry = bytes(entry)

        def write(db: sqlite3.Connection) -> None:
            if db.execute(APPEND, (run_id, position, entry)).rowcount != 1:
                if db.execute(HAS_ENTRY, (run_id, position)).fetchone():
                    raise PositionTaken(run_id, position)
                raise gap_error(run_id, position)

        await self._write(write, single=True)

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Select entries from ``start`` and stop at the first gap."""
        validate_id("run id", run_id)
        check_position(run_id, start, "log start")
        rows = self._read(
            "SELECT position, entry FROM log WHERE run_id = ? AND position >= ? ORDER BY position",
            (run_id, start),
            f"read the log of run {run_id!r}",
        )
        out: list[bytes] = []
        expected = start
        for position, entry in rows:
            if position != expected:
                break
            out.append(entry)
            expected += 1
        return out

    # -- the inbox --------------------------------------------------------

    async def read_inbox(self, run_id: str, *, ack: Sequence[str] = ()) -> list[Event]:
        """Delete the acknowledged events, then select the rest in ``seq`` (arrival) order."""
        validate_id("run id", run_id)
        rows = [(run_id, e) for e in ack_ids(ack)]
        if rows:

            def write(db: sqlite3.Connection) -> None:
                db.executemany("DELETE FROM inbox WHERE run_id = ? AND event_id = ?", rows)

            await self._write(write)
        found = self._read(
            "SELECT event_id, data, posted_at FROM inbox WHERE run_id = ? ORDER BY seq",
            (run_id,),
            f"read the inbox of run {run_id!r}",
        )
        return [Event(event_id, data, posted_at) for event_id, data, posted_at in found]

    # -- the due index ----------------------------------------------------

    async def set_due(
        self, run_id: str, at: float | None, *, event: NewEvent | None = None
    ) -> bool:
        """Insert the event, if any, and upsert (or delete) the run's ``due`` row: one commit."""
        at = check_due(run_id, at, event)
        data = None if event is None else bytes(event.data)

        def write(db: sqlite3.Connection) -> bool:
            now = time.time()
            stored = False
            if event is not None:
                args = (run_id, event.event_id, data, now)
                stored = db.execute(POST, args).rowcount == 1
            if at is None:
                db.execute("DELETE FROM due WHERE run_id = ?", (run_id,))
            else:
                db.execute(SCHEDULE, (run_id, at))
                self._wake_if_due(at)
            return stored

        return await self._write(write, single=event is None)

    async def unschedule_idle(self, run_id: str) -> bool:
        """Delete the run's ``due`` row unless its inbox has a row: one transaction."""
        validate_id("run id", run_id)

        def write(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM inbox WHERE run_id = ? LIMIT 1", (run_id,)).fetchone():
                return False
            db.execute("DELETE FROM due WHERE run_id = ?", (run_id,))
            return True

        return await self._write(write)

    async def due(self, now: float, limit: int = 100) -> DueRuns:
        """Walk the ``(at, run_id)`` index: the runs due by ``now``, and the one after them."""
        self._wake.listen()
        self.waker.clear()  # this read covers every signal sent so far
        limit = max(0, limit)
        for _ in range(16):
            # Only what is due, and the first entry after it: with a million runs waiting,
            # a poll must not read a page of them. Text sorts after every number in SQLite,
            # so a bad time never hides a good one, and is met as the "next" entry.
            rows = self._read(
                "SELECT run_id, at FROM due WHERE at <= ? ORDER BY at, run_id LIMIT ?",
                (now, limit + 1),
                "read the due index",
            )
            if len(rows) <= limit:
                rows += self._read(
                    "SELECT run_id, at FROM due WHERE at > ? ORDER BY at, run_id LIMIT 1",
                    (now,),
                    "read the due index",
                )
            bad = [row for row in rows if not _hostile.good_due(*row)]
            if not bad:
                break
            await self._drop_bad_due(bad)
        runs = [(run_id, float(at)) for run_id, at in rows[:limit] if at <= now]
        rest = rows[len(runs) :]
        return DueRuns(runs, float(rest[0][1]) if rest else None)

    async def _drop_bad_due(self, rows: list[Any]) -> None:
        """Remove due rows no worker can act on; a good run id with a bad time is due now."""
        now = time.time()

        def write(db: sqlite3.Connection) -> None:
            for run_id, at in rows:
                valid = _hostile.is_valid_id(run_id)
                action = "scheduling it now" if valid else "removing it from the due index"
                _hostile.warn_once(self, "due entry", run_id, f"due at {at!r}", action)
                if valid:
                    db.execute("UPDATE due SET at = ? WHERE run_id = ?", (now, run_id))
                else:
                    db.execute("DELETE FROM due WHERE run_id = ?", (run_id,))

        try:
            await self._write(write)
        except BackendUnavailable as exc:
            _hostile.log.warning("could not drop bad due entries: %s", exc)

    # -- leases -----------------------------------------------------------

    async def lease(
        self,
        run_id: str,
        owner: str | None = None,
        ttl: float = 0.0,
        *,
        take_from: str | None = None,
    ) -> Lease | None:
        """Read the lease row, or upsert (or delete) it only where the current lease allows."""
        validate_id("run id", run_id)
        ttl = check_ttl(ttl)
        if owner is None:
            found = self._read(GET_LEASE, (run_id,), f"read the lease of run {run_id!r}")
            return self._check_lease(run_id, found[0], "reading it as expired") if found else None

        def write(db: sqlite3.Connection) -> Lease | None:
            now = time.time()
            mine = Lease(run_id, owner, now + ttl) if ttl > 0 else None
            if ttl > 0:
                cur = db.execute(ACQUIRE, (run_id, owner, now + ttl, now, take_from))
            else:
                cur = db.execute(RELEASE, (run_id, owner, now, take_from))
            if cur.rowcount == 1:
                return mine
            old = db.execute(GET_LEASE, (run_id,)).fetchone()
            if old is None:
                return None
            lease = self._check_lease(run_id, old, "replacing it")  # warns if unreadable
            if not _hostile.is_unreadable(lease):
                return lease  # held by another
            if ttl > 0:
                db.execute(ACQUIRE_UNREADABLE, (run_id, owner, now + ttl))
            else:
                db.execute(RELEASE_UNREADABLE, (run_id,))
            return mine

        return await self._write(write)

    def _check_lease(self, run_id: str, row: tuple[Any, Any], action: str) -> Lease:
        lease = _hostile.lease_or_none(run_id, *row)
        if lease is None:
            _hostile.warn_once(self, "lease", run_id, f"row {row!r}", action)
            return _hostile.unreadable_lease(run_id)
        return lease

    # -- run metadata -----------------------------------------------------

    @staticmethod
    def _run_row(info: RunInfo) -> tuple[str, str, str, bytes]:
        return (info.run_id, info.workflow, info.status, info.to_bytes())

    async def start_run(self, info: RunInfo, entry: bytes, due_at: float) -> bool | None:
        """Insert the entry at 0 and, if it went in, the metadata and due row: one transaction."""
        validate_id("run id", info.run_id)
        at = check_due(info.run_id, due_at, None)
        assert at is not None
        entry = bytes(entry)
        row = self._run_row(info)

        def write(db: sqlite3.Connection) -> bool:
            if db.execute(APPEND, (info.run_id, 0, entry)).rowcount != 1:
                return False  # position 0 is taken: nothing written
            db.execute(PUT_RUN, row)
            db.execute(SCHEDULE, (info.run_id, at))
            self._wake_if_due(at)
            return True

        return await self._write(write)

    async def put_run(self, info: RunInfo) -> None:
        """Insert or replace the run's row."""
        validate_id("run id", info.run_id)
        row = self._run_row(info)

        def write(db: sqlite3.Connection) -> None:
            db.execute(PUT_RUN, row)

        await self._write(write, single=True)

    async def delete(self, run_id: str) -> bool:
        """Delete the run's rows from every table in one transaction: all go, or none."""
        validate_id("run id", run_id)

        def write(db: sqlite3.Connection) -> bool:
            tables = ("due", "leases", "inbox", "log", "runs")
            counts = [db.execute(f"DELETE FROM {t} WHERE run_id = ?", (run_id,)) for t in tables]
            return any(cur.rowcount > 0 for cur in counts)

        return await self._write(write)

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
        ids: Sequence[str] | None = None,
    ) -> list[RunInfo]:
        """Select runs in id order through the matching index."""
        one = ids is not None and len(ids) == 1 and limit > 0
        if one and status is None and workflow is None and after is None:
            assert ids is not None
            # get_run: the one row, without the paging machinery (a client's send does two).
            run_id = validate_id("run id", ids[0])
            rows = self._read("SELECT info FROM runs WHERE run_id = ?", (run_id,), "read a run")
            data = rows[0][0] if rows else None  # NULL metadata: a run half created, skipped
            return [] if data is None else [_hostile.read_listed(self, run_id, data)]
        sql = "SELECT run_id, info FROM runs WHERE run_id > ?"
        filters: list[Any] = []
        # Unreadable metadata lists as "corrupt", which no status column holds: read all.
        if status is not None and status != "corrupt":
            sql += " AND status = ?"
            filters.append(status)
        if workflow is not None:
            sql += " AND workflow = ?"
            filters.append(workflow)
        sql += " ORDER BY run_id LIMIT ?"

        async def fetch(cursor: str | None, n: int) -> Page:
            rows = self._read(sql, [cursor or "", *filters, n], "list runs")
            return rows, len(rows) >= n

        async def fetch_ids(wanted: list[str]) -> Page:
            found: dict[str, bytes] = {}
            for i in range(0, len(wanted), 500):  # within SQLite's limit of parameters
                chunk = wanted[i : i + 500]
                marks = ", ".join("?" * len(chunk))
                sql = f"SELECT run_id, info FROM runs WHERE run_id IN ({marks})"
                found.update(self._read(sql, chunk, "read run metadata"))
            return [(r, found.get(r)) for r in wanted], False

        return await filtered_runs(
            self,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            after=after,
            page_size=max(limit, 100) if status == "corrupt" else limit,
            ids=ids,
            fetch_ids=fetch_ids,
        )

    async def list_recent(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: Cursor | None = None,
    ) -> list[RunInfo]:
        """Walk ``runs_by_created`` backwards from the cursor, filters in the same query."""
        cursor = check_before(before)
        by_status = status if status is not None and status != "corrupt" else None
        named = {"status": by_status, "workflow": workflow}
        filters = {k: v for k, v in named.items() if v is not None}
        # A filter few runs pass would walk the whole index: count its matches first.
        found = {k: self._read(probe_query(k), [v], "count runs")[0][0] for k, v in filters.items()}
        rarest = min(found, key=found.__getitem__, default=None)
        via = rarest if rarest is not None and found[rarest] < PROBE else None

        async def fetch(at: Cursor | None, n: int) -> RecentPage:
            sql = recent_query(
                cursor=at is not None, status="status" in filters, workflow=bool(workflow), via=via
            )
            args = [*(at or ()), *filters.values(), n]
            rows = self._read(sql, args, "list recent runs")
            return rows, len(rows) >= n

        return await recent_runs(
            self,
            fetch,
            status=status,
            workflow=workflow,
            limit=limit,
            before=cursor,
            page_size=max(limit, 100) if status == "corrupt" else limit,
        )

    # -- lifecycle and wake-ups -------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until a process sharing this database makes work due, or ``timeout`` passes."""
        return await self._wake.wait(timeout)

    async def close(self) -> None:
        """Commit queued writes, close the connection and stop listening for wake-ups."""
        # Let a leader that is yielding commit its batch before the connection goes.
        await self._batch.settle()
        self._closed = True
        self._wake.close()
        self._writer.close()
        self._checkpoints.close()
        if self._db is not None:
            self._db.close()
            self._db = None
