"""The SQLite layout: tables, statements, and preparing a connection (docs/PROTOCOL.md)."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from substantial.backends.base import Durability
from substantial.backends.sqlite._checkpoint import BACKSTOP_PAGES
from substantial.errors import BackendUnavailable, ProtocolMismatch

__all__ = [
    "ACQUIRE",
    "ACQUIRE_UNREADABLE",
    "APPEND",
    "CREATED",
    "GET_LEASE",
    "HAS_ENTRY",
    "POST",
    "PROBE",
    "PUT_RUN",
    "RECENT_INDEX",
    "RELEASE",
    "RELEASE_UNREADABLE",
    "SCHEDULE",
    "SCHEMA_VERSION",
    "probe_query",
    "recent_query",
    "setup",
]

#: The layout version, kept in ``PRAGMA user_version``.
SCHEMA_VERSION = 1

# A run's creation time, read from its metadata: an index on this expression orders runs
# newest first for every writer of the table (no column to keep in step, no new layout
# version), and unreadable metadata counts as created at 0, as a listing reports it.
_INFO = "CAST(info AS TEXT)"
CREATED = (
    f"coalesce(CASE WHEN json_valid({_INFO}) AND json_type({_INFO}, '$.created_at') "
    f"IN ('real', 'integer') THEN json_extract({_INFO}, '$.created_at') END, 0.0)"
)
#: Created when a database is opened, if missing: stores made before it get it too.
RECENT_INDEX = f"CREATE INDEX IF NOT EXISTS runs_by_created ON runs ({CREATED}, run_id)"

SCHEMA = """
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

# Only at 0 or right after an existing entry: a gap is refused like a taken position
# (no row), and the caller tells the two apart.
# A position past the first free one becomes NULL, which the NOT NULL key refuses and
# OR IGNORE skips, like a taken one. The check sits in VALUES: as INSERT ... SELECT from
# the same table, SQLite would first copy the row through a temporary table.
APPEND = (
    "INSERT OR IGNORE INTO log (run_id, position, entry) VALUES (?1, CASE WHEN ?2 = 0 OR "
    "EXISTS (SELECT 1 FROM log WHERE run_id = ?1 AND position = ?2 - 1) THEN ?2 END, ?3)"
)
HAS_ENTRY = "SELECT 1 FROM log WHERE run_id = ? AND position = ?"
POST = "INSERT OR IGNORE INTO inbox (run_id, event_id, data, posted_at) VALUES (?, ?, ?, ?)"
SCHEDULE = (
    "INSERT INTO due (run_id, at) VALUES (?, ?) ON CONFLICT (run_id) DO UPDATE SET at = excluded.at"
)
GET_LEASE = "SELECT owner, expires_at FROM leases WHERE run_id = ?"
PUT_RUN = "INSERT OR REPLACE INTO runs (run_id, workflow, status, info) VALUES (?, ?, ?, ?)"
# A lease row that other code wrote with wrong types (SQLite keeps them) is unreadable:
# it counts as expired, and release removes it.
_UNREADABLE = (
    "(typeof(leases.owner) != 'text' OR leases.owner = '' "
    "OR typeof(leases.expires_at) NOT IN ('real', 'integer') OR abs(leases.expires_at) > 1e308)"
)
# A take (or a release) is one statement where it succeeds; only where it fails is the row
# read, and an unreadable one taken (or removed) by the second statement of each pair.
_TAKE = """
INSERT INTO leases (run_id, owner, expires_at) VALUES (?1, ?2, ?3)
ON CONFLICT (run_id) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
WHERE """
ACQUIRE = _TAKE + "leases.expires_at <= ?4 OR leases.owner = ?2 OR leases.owner = ?5"
ACQUIRE_UNREADABLE = _TAKE + _UNREADABLE
# Giving the lease up (a take with no time left): where a take would succeed.
RELEASE = (
    "DELETE FROM leases WHERE run_id = ?1 AND (leases.expires_at <= ?3 OR leases.owner = ?2 "
    "OR leases.owner = ?4)"
)
RELEASE_UNREADABLE = f"DELETE FROM leases WHERE run_id = ?1 AND {_UNREADABLE}"


def setup(db: sqlite3.Connection, path: Path, durability: Durability, timeout: float) -> None:
    """Switch a new connection to WAL, set its durability, create or check the tables."""
    deadline = time.monotonic() + timeout
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
            f"{path} cannot use write-ahead logging (journal_mode is {mode}); put the "
            "database on a local file system"
        )
    sync = "FULL" if durability == "fsync" else "NORMAL"
    db.execute(f"PRAGMA synchronous = {sync}")
    if durability == "process":
        # Checkpoints are the backend's thread's (_checkpoint.py); a commit checkpoints
        # only when the log has grown far past SQLite's default of 1,000 pages.
        db.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise ProtocolMismatch(
            f"{path} uses SQLite layout {version}; this version of substantial reads up "
            f"to {SCHEMA_VERSION}: upgrade substantial"
        )
    if version < SCHEMA_VERSION:
        db.executescript(SCHEMA)
    named = "SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'runs_by_created'"
    if db.execute(named).fetchone() is None:
        # Once per database; a big one made before the index takes a few seconds here.
        try:
            db.execute(RECENT_INDEX)
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc):
                raise  # a read-only copy still lists, newest first by the slower plan


#: Fewer matches of a filter than this: its own index and a sort beat walking by time.
PROBE = 2000


def probe_query(column: str) -> str:
    """Return the query counting a filter's matches, up to PROBE, on its own index."""
    return f"SELECT count(*) FROM (SELECT 1 FROM runs WHERE {column} = ? LIMIT {PROBE})"


def recent_query(*, cursor: bool, status: bool, workflow: bool, via: str | None = None) -> str:
    """Return the newest-first page query: cursor ``(at, id)``, status, workflow, then limit.

    It walks ``runs_by_created`` backwards (``+`` keeps the planner off the
    filters' indexes); ``via`` a filter column with few matches (see
    ``probe_query``) reads them through that column's index and sorts them.
    """
    # Not a row value: SQLite bounds an index range on the first term only in this form.
    terms = [f"{CREATED} <= ?1 AND ({CREATED} < ?1 OR run_id < ?2)"] if cursor else []
    mark = "" if via else "+"
    terms += [f"{mark}status = ?"] if status else []
    terms += [f"{mark}workflow = ?"] if workflow else []
    where = f" WHERE {' AND '.join(terms)}" if terms else ""
    index = f" INDEXED BY runs_by_{via}" if via else ""
    return (
        f"SELECT run_id, {CREATED}, info FROM runs{index}{where} "
        f"ORDER BY {CREATED} DESC, run_id DESC LIMIT ?"
    )
