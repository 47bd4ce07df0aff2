"""A backend in one SQLite file (WAL mode), shared safely by many processes of one machine.

Writes are group-committed: every write issued by the tasks of one process
during one event-loop iteration joins one ``BEGIN IMMEDIATE ... COMMIT``, each
in its own savepoint so a failing write fails alone. SQLite calls run on the
event-loop thread: a statement costs a few microseconds, less than a hop to
a worker thread would.

docs/PROTOCOL.md ("sqlite backend") describes the tables.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

from substantial.backends import _hostile
from substantial.backends._wake import WakeChannel
from substantial.backends.base import Backend, Durability, Event, Lease, RunInfo, validate_id
from substantial.errors import BackendUnavailable, InvalidArgument, PositionTaken, ProtocolMismatch

__all__ = ["SQLiteBackend"]

T = TypeVar("T")

#: The layout version, kept in ``PRAGMA user_version``.
SCHEMA_VERSION = 1

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS log (
    run_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    entry BLOB NOT NULL,
    PRIMARY KEY (run_id, position)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    data BLOB NOT NULL,
    posted_at REAL NOT NULL,
    UNIQUE (run_id, event_id)
);
CREATE INDEX IF NOT EXISTS inbox_by_run ON inbox (run_id, seq);
CREATE TABLE IF NOT EXISTS due (
    run_id TEXT PRIMARY KEY,
    at REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS due_by_at ON due (at, run_id);
CREATE TABLE IF NOT EXISTS leases (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    workflow TEXT NOT NULL,
    status TEXT NOT NULL,
    info BLOB NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, run_id);
CREATE INDEX IF NOT EXISTS runs_by_workflow ON runs (workflow, run_id);
PRAGMA user_version = 1;
COMMIT;
"""

_APPEND = "INSERT OR IGNORE INTO log (run_id, position, entry) VALUES (?, ?, ?)"
_POST = "INSERT OR IGNORE INTO inbox (run_id, event_id, data, posted_at) VALUES (?, ?, ?, ?)"
_SCHEDULE = (
    "INSERT INTO due (run_id, at) VALUES (?, ?) ON CONFLICT (run_id) DO UPDATE SET at = excluded.at"
)
_GET_LEASE = "SELECT owner, expires_at FROM leases WHERE run_id = ?"
_PUT_RUN = "INSERT OR REPLACE INTO runs (run_id, workflow, status, info) VALUES (?, ?, ?, ?)"
# A lease row that other code wrote with wrong types (SQLite keeps them) is unreadable:
# it counts as expired, and release removes it.
_UNREADABLE = (
    "(typeof(leases.owner) != 'text' OR leases.owner = '' "
    "OR typeof(leases.expires_at) NOT IN ('real', 'integer') OR abs(leases.expires_at) > 1e308)"
)
_ACQUIRE = f"""
INSERT INTO leases (run_id, owner, expires_at) VALUES (?1, ?2, ?3)
ON CONFLICT (run_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
WHERE leases.expires_at <= ?4 OR leases.owner = ?2 OR leases.owner = ?5 OR {_UNREADABLE}
"""
_RELEASE = f"DELETE FROM leases WHERE run_id = ?1 AND (leases.owner = ?2 OR {_UNREADABLE})"

_Write = Callable[[sqlite3.Connection], Any]


def _good_due(run_id: Any, at: Any) -> bool:
    return _hostile.is_valid_id(run_id) and _hostile.valid_time(at)


class _Op:
    """One queued write: what to run, and where its follower waits (None for the leader)."""

    __slots__ = ("fn", "fut", "single")

    def __init__(self, fn: _Write, fut: asyncio.Future[Any] | None, single: bool) -> None:
        self.fn = fn
        self.fut = fut
        self.single = single


class SQLiteBackend(Backend):
    """Store runs in one SQLite database file; safe for many processes of one machine.

    ``durability="process"`` (default) uses ``synchronous=NORMAL``: a commit
    survives the process being killed. ``"fsync"`` uses ``synchronous=FULL``:
    it survives power loss. ``timeout`` is how long a write waits for another
    process's transaction before failing with :class:`BackendUnavailable`.
    """

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durability: Durability = "process",
        timeout: float = 5.0,
    ) -> None:
        super().__init__()
        if durability not in ("process", "fsync"):
            raise InvalidArgument(f"durability={durability!r}: use 'process' or 'fsync'")
        self.path = Path(os.path.abspath(os.fspath(path)))
        self.durability: Durability = durability
        self.timeout = timeout
        self._db: sqlite3.Connection | None = None
        self._closed = False
        self._pending: list[_Op] = []
        self._wake_after_commit = False
        self._wake = WakeChannel(f"{self.path}.wake", self.waker)

    def describe(self) -> str:
        """Return the backend name and its database file."""
        return f"sqlite {self.path} (durability={self.durability})"

    # -- connection and errors --------------------------------------------

    def _unavailable(self, exc: sqlite3.Error | OSError, action: str) -> BackendUnavailable:
        """Translate a driver or OS error into the one error callers handle, saying what to do."""
        code = getattr(exc, "sqlite_errorname", "") or ""
        path = self.path
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            advice = (
                f"another process held {path} locked for more than {self.timeout}s; retry, or "
                "pass a larger timeout= if long transactions are expected"
            )
        elif code.startswith("SQLITE_FULL"):
            advice = f"the disk holding {path} is full; free space"
        elif code.startswith("SQLITE_READONLY") or isinstance(exc, PermissionError):
            advice = (
                f"{path} is read-only to this process; give its user write access to the file, "
                "its -wal and -shm files and their directory"
            )
        elif code.startswith("SQLITE_CANTOPEN") or isinstance(exc, OSError):
            advice = f"cannot open {path}; check that its directory exists and is writable"
        elif code.startswith("SQLITE_IOERR"):
            advice = f"the disk holding {path} reported an I/O error; check it (dmesg)"
        elif code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
            advice = (
                f"{path} is not a valid database (corrupt, or another kind of file); restore it "
                "from a backup or point the backend at another path"
            )
        else:
            advice = f"check that {path} is a reachable, writable SQLite database"
        return BackendUnavailable(f"cannot {action}: {exc}; {advice}, then retry")

    def _connect(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        if self._closed:
            raise BackendUnavailable(f"this backend for {self.path} is closed; open a new one")
        os.makedirs(self.path.parent, exist_ok=True)
        db = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=self.timeout
        )
        try:
            self._setup(db)
        except BaseException:
            db.close()
            raise
        self._db = db
        return db

    def _setup(self, db: sqlite3.Connection) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                # Switching a new file to WAL takes an exclusive lock without the
                # busy handler's help, so a crowd of first openers retries here.
                mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)
        if str(mode).lower() != "wal":
            raise BackendUnavailable(
                f"{self.path} cannot use write-ahead logging (journal_mode is {mode}); put the "
                "database on a local file system"
            )
        sync = "FULL" if self.durability == "fsync" else "NORMAL"
        db.execute(f"PRAGMA synchronous = {sync}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise ProtocolMismatch(
                f"{self.path} uses SQLite layout {version}; this version of substantial reads up "
                f"to {SCHEMA_VERSION}: upgrade substantial"
            )
        if version < SCHEMA_VERSION:
            db.executescript(_SCHEMA)

    def _read(self, sql: str, args: Sequence[Any], action: str) -> list[Any]:
        try:
            return self._connect().execute(sql, args).fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable(exc, action) from exc

    # -- group commit -----------------------------------------------------

    async def _write(self, fn: Callable[[sqlite3.Connection], T], *, single: bool = False) -> T:
        """Run ``fn`` in the transaction shared by the writes of this loop iteration.

        The first writer of an iteration leads: it yields once, so that every
        task ready in this iteration can queue its write, then commits them
        all and hands each follower its own outcome. ``single`` marks a write
        of one statement, which needs no explicit transaction when alone.
        """
        try:
            self._connect()  # fail in the caller, not in the batch, if the file cannot be opened
        except (sqlite3.Error, OSError) as exc:
            raise self._unavailable(exc, f"open {self.path}") from exc
        if self._pending:
            fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._pending.append(_Op(fn, fut, single))
            return cast(T, await fut)
        own = _Op(fn, None, single)
        self._pending.append(own)
        # asyncio's queue of callbacks to run before the next poll: when it is
        # empty no other task runs before we would resume, so nobody can join
        # the batch and yielding would only add latency.
        ready = getattr(asyncio.get_running_loop(), "_ready", None)
        if ready is None or ready:
            try:
                await asyncio.sleep(0)
            except BaseException:
                # Cancelled: this write does not happen, the followers' still do.
                self._pending.remove(own)
                self._flush(None)
                raise
        ok, value = self._flush(own)
        if not ok:
            raise value
        return cast(T, value)

    def _flush(self, own: _Op | None) -> tuple[bool, Any]:
        """Commit the queued writes; settle the followers and return the leader's outcome."""
        # A follower cancelled before the commit gets no write: its cancel means "did not happen".
        batch = [op for op in self._pending if op.fut is None or not op.fut.done()]
        self._pending = []
        if not batch:
            return True, None
        self._wake_after_commit = False
        try:
            outcomes = self._commit(batch)
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
        if self._wake_after_commit:
            self._wake_after_commit = False
            self._wake.broadcast()
        return mine

    def _commit(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """Run the batch in one transaction; each op's own failure is its outcome."""
        db = self._db
        if db is None:
            raise BackendUnavailable(f"this backend for {self.path} is closed; open a new one")
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
                    self._wake_after_commit = False
                    return [(False, exc)]
            else:
                for op in batch:
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
            self._wake_after_commit = False
            if db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
        return outcomes

    def _wake_if_due(self, at: float) -> None:
        if at <= time.time():
            self._wake_after_commit = True

    # -- the log ----------------------------------------------------------

    async def append(self, run_id: str, position: int, entry: bytes) -> None:
        """Insert the entry; the primary key refuses a taken position."""
        validate_id("run id", run_id)
        entry = bytes(entry)

        def write(db: sqlite3.Connection) -> None:
            if db.execute(_APPEND, (run_id, position, entry)).rowcount != 1:
                raise PositionTaken(run_id, position)

        await self._write(write, single=True)

    async def read_log(self, run_id: str, start: int = 0) -> list[bytes]:
        """Select entries from ``start`` and stop at the first gap."""
        validate_id("run id", run_id)
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

    async def post_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Insert the event unless (run, event id) is already there."""
        validate_id("run id", run_id)
        validate_id("event id", event_id)
        data = bytes(data)

        def write(db: sqlite3.Connection) -> bool:
            stored = db.execute(_POST, (run_id, event_id, data, time.time())).rowcount == 1
            self._wake_after_commit |= stored
            return stored

        return await self._write(write, single=True)

    async def send_event(self, run_id: str, event_id: str, data: bytes) -> bool:
        """Insert the event and make the run due now, in one transaction."""
        validate_id("run id", run_id)
        validate_id("event id", event_id)
        data = bytes(data)

        def write(db: sqlite3.Connection) -> bool:
            now = time.time()
            stored = db.execute(_POST, (run_id, event_id, data, now)).rowcount == 1
            db.execute(_SCHEDULE, (run_id, now))
            self._wake_after_commit = True
            return stored

        return await self._write(write)

    async def read_inbox(self, run_id: str) -> list[Event]:
        """Select pending events in ``seq`` (arrival) order."""
        validate_id("run id", run_id)
        rows = self._read(
            "SELECT event_id, data, posted_at FROM inbox WHERE run_id = ? ORDER BY seq",
            (run_id,),
            f"read the inbox of run {run_id!r}",
        )
        return [Event(event_id, data, posted_at) for event_id, data, posted_at in rows]

    async def ack_events(self, run_id: str, event_ids: Sequence[str]) -> None:
        """Delete the events; unknown ids match no row."""
        validate_id("run id", run_id)
        if not event_ids:
            return
        rows = [(run_id, validate_id("event id", e)) for e in event_ids]

        def write(db: sqlite3.Connection) -> None:
            db.executemany("DELETE FROM inbox WHERE run_id = ? AND event_id = ?", rows)

        await self._write(write)

    # -- the due index ----------------------------------------------------

    async def schedule(self, run_id: str, at: float) -> None:
        """Upsert the run's row in the ``due`` table."""
        validate_id("run id", run_id)
        at = float(at)

        def write(db: sqlite3.Connection) -> None:
            db.execute(_SCHEDULE, (run_id, at))
            self._wake_if_due(at)

        await self._write(write, single=True)

    async def unschedule(self, run_id: str) -> None:
        """Delete the run's row from the ``due`` table."""
        validate_id("run id", run_id)

        def write(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM due WHERE run_id = ?", (run_id,))

        await self._write(write, single=True)

    async def due(self, now: float, limit: int = 100) -> list[tuple[str, float]]:
        """Walk the ``(at, run_id)`` index up to ``now``."""
        self._wake.listen()
        self.waker.clear()  # this read covers every signal sent so far
        rows = self._read(
            "SELECT run_id, at FROM due WHERE at <= ? ORDER BY at, run_id LIMIT ?",
            (now, limit),
            "read the due index",
        )
        out = [(run_id, at) for run_id, at in rows if _good_due(run_id, at)]
        if len(out) < len(rows):
            await self._drop_bad_due([row for row in rows if not _good_due(*row)])
        return out

    async def next_due_at(self) -> float | None:
        """Read the first entry of the ``at`` index (text sorts after every number)."""
        for _ in range(16):
            rows = self._read(
                "SELECT run_id, at FROM due ORDER BY at, run_id LIMIT 16", (), "read the due index"
            )
            bad = [row for row in rows if not _good_due(*row)]
            good = [float(at) for run_id, at in rows if _good_due(run_id, at)]
            if bad:
                await self._drop_bad_due(bad)
            if good or len(rows) < 16:
                return good[0] if good else None
        return None

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

    async def acquire_lease(
        self, run_id: str, owner: str, ttl: float, *, steal_from: str | None = None
    ) -> bool:
        """Upsert the lease row only where the current lease allows it."""
        validate_id("run id", run_id)

        def write(db: sqlite3.Connection) -> bool:
            now = time.time()
            # Read first only to warn: an unreadable lease is replaced by the upsert.
            old = db.execute(_GET_LEASE, (run_id,)).fetchone()
            cur = db.execute(_ACQUIRE, (run_id, owner, now + ttl, now, steal_from))
            if old is not None and cur.rowcount == 1:
                self._check_lease(run_id, old, "replaced it")
            return cur.rowcount == 1

        return await self._write(write, single=True)

    async def release_lease(self, run_id: str, owner: str) -> None:
        """Delete the lease row if ``owner`` holds it."""
        validate_id("run id", run_id)

        def write(db: sqlite3.Connection) -> None:
            db.execute(_RELEASE, (run_id, owner))

        await self._write(write, single=True)

    async def get_lease(self, run_id: str) -> Lease | None:
        """Select the lease row."""
        validate_id("run id", run_id)
        rows = self._read(_GET_LEASE, (run_id,), f"read the lease of run {run_id!r}")
        return self._check_lease(run_id, rows[0], "reading it as expired") if rows else None

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

    async def put_run(self, info: RunInfo) -> None:
        """Insert or replace the run's row."""
        validate_id("run id", info.run_id)
        row = self._run_row(info)

        def write(db: sqlite3.Connection) -> None:
            db.execute(_PUT_RUN, row)

        await self._write(write, single=True)

    async def get_run(self, run_id: str) -> RunInfo | None:
        """Select the run's row."""
        validate_id("run id", run_id)
        rows = self._read(
            "SELECT info FROM runs WHERE run_id = ?", (run_id,), f"read metadata of run {run_id!r}"
        )
        return RunInfo.from_bytes(run_id, rows[0][0]) if rows else None

    async def list_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        limit: int = 100,
        after: str | None = None,
    ) -> list[RunInfo]:
        """Select runs in id order through the matching index."""
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
        out: list[RunInfo] = []
        cursor = after or ""
        while len(out) < limit:
            page = max(limit, 100) if status == "corrupt" else limit
            rows = self._read(sql, [cursor, *filters, page], "list runs")
            for run_id, data in rows:
                info = _hostile.read_listed(self, run_id, data)
                if _hostile.listed(info, status, workflow):
                    out.append(info)
                    if len(out) >= limit:
                        break
            if len(rows) < page:
                break
            cursor = rows[-1][0]
        return out

    async def create_run(self, info: RunInfo, entry: bytes, due_at: float) -> bool:
        """Write the first entry, metadata and schedule in one transaction."""
        validate_id("run id", info.run_id)
        run_id = info.run_id
        row = self._run_row(info)
        entry = bytes(entry)

        def write(db: sqlite3.Connection) -> bool:
            created = db.execute(_APPEND, (run_id, 0, entry)).rowcount == 1
            # A start that crashed between its writes (other backends) left a
            # log without metadata: complete it, as the base class does.
            if (
                not created
                and db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            ):
                return False
            db.execute(_PUT_RUN, row)
            db.execute(_SCHEDULE, (run_id, due_at))
            self._wake_if_due(due_at)
            return created

        return await self._write(write)

    # -- lifecycle and wake-ups -------------------------------------------

    async def wait_for_work(self, timeout: float) -> bool:
        """Sleep until a process sharing this database makes work due, or ``timeout`` passes."""
        return await self._wake.wait(timeout)

    async def close(self) -> None:
        """Commit queued writes, close the connection and stop listening for wake-ups."""
        # Let a leader that is yielding commit its batch before the connection goes.
        for _ in range(100):
            if not self._pending:
                break
            await asyncio.sleep(0)
        self._closed = True
        self._wake.close()
        if self._db is not None:
            self._db.close()
            self._db = None
