"""The tables of one prefix, the statements on them, and creating them on first use.

docs/PROTOCOL.md ("postgres backend") describes the same layout for people.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from substantial.errors import InvalidArgument, ProtocolMismatch

__all__ = ["SCHEMA_VERSION", "Statements", "ensure_schema", "validate_prefix"]

#: The layout version, kept in the ``<prefix>_schema`` table.
SCHEMA_VERSION = 1

# Table names are "<prefix>_<table>" and Postgres truncates identifiers at 63
# bytes: the longest suffix below ("_runs_by_workflow") must still fit.
_PREFIX_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")

_DDL = """
CREATE TABLE IF NOT EXISTS {schema} (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    version integer NOT NULL
);
CREATE TABLE IF NOT EXISTS {log} (
    run_id text COLLATE "C" NOT NULL,
    position bigint NOT NULL,
    entry bytea NOT NULL,
    PRIMARY KEY (run_id, position)
);
CREATE TABLE IF NOT EXISTS {inbox} (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id text COLLATE "C" NOT NULL,
    event_id text COLLATE "C" NOT NULL,
    data bytea NOT NULL,
    posted_at double precision NOT NULL,
    CONSTRAINT {inbox_event} UNIQUE (run_id, event_id)
);
CREATE INDEX IF NOT EXISTS {inbox_by_run} ON {inbox} (run_id, seq);
CREATE TABLE IF NOT EXISTS {due} (
    run_id text COLLATE "C" PRIMARY KEY,
    at double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS {due_by_at} ON {due} (at, run_id);
CREATE TABLE IF NOT EXISTS {leases} (
    run_id text COLLATE "C" PRIMARY KEY,
    owner text NOT NULL,
    expires_at double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS {runs} (
    run_id text COLLATE "C" PRIMARY KEY,
    workflow text NOT NULL,
    status text NOT NULL,
    info bytea NOT NULL
);
CREATE INDEX IF NOT EXISTS {runs_by_status} ON {runs} (status, run_id);
CREATE INDEX IF NOT EXISTS {runs_by_workflow} ON {runs} (workflow, run_id);
INSERT INTO {schema} (version) VALUES ({version})
ON CONFLICT (singleton) DO UPDATE SET version = excluded.version
WHERE {schema}.version < excluded.version;
"""

# The server's clock, in epoch seconds: lease expiry is judged by one clock for all workers.
_NOW = "extract(epoch FROM clock_timestamp())::float8"
# A lease row no reader can use (no owner, or an expiry that is NaN or infinite): it
# counts as expired. NaN sorts above every number in Postgres, so it fails "< Infinity".
_UNREADABLE = (
    "(l.owner = '' OR NOT (l.expires_at > '-Infinity'::float8 "
    "AND l.expires_at < 'Infinity'::float8))"
)


def validate_prefix(prefix: str) -> str:
    """Check that ``prefix`` can start a table name; return it."""
    if not isinstance(prefix, str) or _PREFIX_RE.fullmatch(prefix) is None:
        raise InvalidArgument(
            f"invalid Postgres table prefix {prefix!r}: use 1-40 characters from "
            "A-Z a-z 0-9 _, not starting with a digit"
        )
    return prefix


class Statements:
    """Every SQL statement the backend sends, with the prefix's table names filled in.

    Parameters carry explicit casts: one parameter used in two places (a
    column value and a notification payload) must not be typed two ways.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = validate_prefix(prefix)
        #: The NOTIFY channel of this prefix (unquoted: ``pg_notify`` takes it as text).
        self.channel = f"{prefix}_wake"
        digest = hashlib.blake2b(f"substantial schema {prefix}".encode(), digest_size=8)
        #: The advisory lock that serializes schema creation for this prefix.
        self.lock_key = int.from_bytes(digest.digest(), "big", signed=True)
        t = self.table
        log, inbox, due, leases, runs = t("log"), t("inbox"), t("due"), t("leases"), t("runs")
        upsert_due = "ON CONFLICT (run_id) DO UPDATE SET at = excluded.at"
        upsert_run = (
            "ON CONFLICT (run_id) DO UPDATE SET workflow = excluded.workflow, "
            "status = excluded.status, info = excluded.info"
        )
        self.sql: dict[str, str] = {
            "version": f"SELECT version FROM {t('schema')}",
            # Only at 0 or right after an existing entry: a gap is refused like a taken
            # position (no row); "taken" below tells the two apart.
            "append": (
                f"INSERT INTO {log} (run_id, position, entry) "
                "SELECT $1::text, $2::bigint, $3::bytea WHERE $2::bigint = 0 OR EXISTS "
                f"(SELECT 1 FROM {log} WHERE run_id = $1::text AND position = $2::bigint - 1) "
                "ON CONFLICT DO NOTHING"
            ),
            "append_many": (
                f"INSERT INTO {log} (run_id, position, entry) "
                "SELECT r, p, e FROM unnest($1::text[], $2::bigint[], $3::bytea[]) AS t(r, p, e) "
                f"WHERE p = 0 OR EXISTS (SELECT 1 FROM {log} "
                "WHERE run_id = r AND position = p - 1) "
                "ON CONFLICT DO NOTHING RETURNING run_id, position"
            ),
            # Of the given positions, those that hold an entry.
            "taken": (
                f"SELECT l.run_id, l.position FROM {log} l "
                "JOIN unnest($1::text[], $2::bigint[]) AS t(r, p) "
                "ON l.run_id = t.r AND l.position = t.p"
            ),
            "read_log": (
                f"SELECT position, entry FROM {log} WHERE run_id = $1::text "
                "AND position >= $2::bigint ORDER BY position"
            ),
            "read_inbox": (
                f"SELECT event_id, data, posted_at FROM {inbox} WHERE run_id = $1::text "
                "ORDER BY seq"
            ),
            # Acknowledge and read in one statement: the SELECT sees the rows as they were
            # before the DELETE, so it leaves the acknowledged ones out itself.
            "ack_read": (
                f"WITH del AS (DELETE FROM {inbox} WHERE run_id = $1::text "
                "AND event_id = ANY($2::text[])) "
                f"SELECT event_id, data, posted_at FROM {inbox} WHERE run_id = $1::text "
                "AND NOT (event_id = ANY($2::text[])) ORDER BY seq"
            ),
            # $1 run, $2 event id, $3 data, $4 now, $5 due at, $6 channel
            "send_at": (
                f"WITH ev AS (INSERT INTO {inbox} (run_id, event_id, data, posted_at) "
                "VALUES ($1::text, $2::text, $3::bytea, $4::float8) "
                "ON CONFLICT DO NOTHING RETURNING 1), "
                f"d AS (INSERT INTO {due} (run_id, at) VALUES ($1::text, $5::float8) "
                f"{upsert_due}) "
                "SELECT EXISTS (SELECT 1 FROM ev), pg_notify($6::text, $5::float8::text)"
            ),
            # $1 run, $2 at, $3 channel
            "schedule": (
                f"WITH d AS (INSERT INTO {due} (run_id, at) VALUES ($1::text, $2::float8) "
                f"{upsert_due}) SELECT pg_notify($3::text, $2::float8::text)"
            ),
            "unschedule": f"DELETE FROM {due} WHERE run_id = $1::text",
            # The head of the index; the caller keeps those due by now (NaN sorts last).
            "due_head": f"SELECT run_id, at FROM {due} ORDER BY at, run_id LIMIT $1::int",
            # Entries no worker can act on: $1 valid ids with a bad time (due now, $3),
            # $2 bad ids (removed).
            "due_repair": (
                f"WITH fix AS (UPDATE {due} SET at = $3::float8 WHERE run_id = ANY($1::text[])) "
                f"DELETE FROM {due} WHERE run_id = ANY($2::text[])"
            ),
            # $1 run, $2 owner, $3 ttl, $4 steal_from (NULL matches nobody). The old row
            # comes back only so that replacing an unreadable one can be reported.
            "acquire": (
                f"WITH old AS (SELECT owner, expires_at FROM {leases} WHERE run_id = $1::text), "
                f"up AS (INSERT INTO {leases} AS l (run_id, owner, expires_at) "
                f"VALUES ($1::text, $2::text, {_NOW} + $3::float8) "
                "ON CONFLICT (run_id) DO UPDATE "
                "SET owner = excluded.owner, expires_at = excluded.expires_at "
                f"WHERE l.expires_at <= {_NOW} OR l.owner = $2::text OR l.owner = $4::text "
                f"OR {_UNREADABLE} RETURNING l.expires_at) "
                "SELECT (SELECT expires_at FROM up), "
                "(SELECT owner FROM old), (SELECT expires_at FROM old)"
            ),
            # Giving the lease up (a take with no time left): where a take would succeed.
            # $1 run, $2 owner, $3 take_from. Returns the row that was there.
            "give_up": (
                f"WITH old AS (SELECT owner, expires_at FROM {leases} WHERE run_id = $1::text), "
                f"gone AS (DELETE FROM {leases} AS l WHERE run_id = $1::text "
                f"AND (l.expires_at <= {_NOW} OR l.owner = $2::text OR l.owner = $3::text "
                f"OR {_UNREADABLE}) RETURNING 1) "
                "SELECT EXISTS (SELECT 1 FROM gone), "
                "(SELECT owner FROM old), (SELECT expires_at FROM old)"
            ),
            "get_lease": f"SELECT owner, expires_at FROM {leases} WHERE run_id = $1::text",
            "put_run": (
                f"INSERT INTO {runs} (run_id, workflow, status, info) "
                f"VALUES ($1::text, $2::text, $3::text, $4::bytea) {upsert_run}"
            ),
            "get_runs": f"SELECT run_id, info FROM {runs} WHERE run_id = ANY($1::text[])",
        }

    def table(self, name: str) -> str:
        """Return the quoted name of one of the prefix's tables or indexes."""
        return f'"{self.prefix}_{name}"'

    def __getitem__(self, name: str) -> str:
        """Return the statement called ``name``."""
        return self.sql[name]

    def ddl(self) -> str:
        """Return the script that creates the tables (idempotent)."""
        names = {
            n: self.table(n)
            for n in (
                "schema", "log", "inbox", "inbox_event", "inbox_by_run", "due", "due_by_at",
                "leases", "runs", "runs_by_status", "runs_by_workflow",
            )
        }  # fmt: skip
        return _DDL.format(version=SCHEMA_VERSION, **names)

    def list_runs(self, status: bool, workflow: bool) -> str:
        """Return the listing query: ``$1`` after, then status and/or workflow, then limit."""
        sql = f"SELECT run_id, info FROM {self.table('runs')} WHERE run_id > $1::text"
        n = 2
        if status:
            sql += f" AND status = ${n}::text"
            n += 1
        if workflow:
            sql += f" AND workflow = ${n}::text"
            n += 1
        return sql + f" ORDER BY run_id LIMIT ${n}::int"


async def stored_version(conn: Any, statements: Statements) -> int | None:
    """Return the layout version of the prefix's tables, or None if there are none yet."""
    if await conn.fetchval("SELECT to_regclass($1)", statements.table("schema")) is None:
        return None
    version = await conn.fetchval(statements["version"])
    return None if version is None else int(version)


def _check(version: int | None, where: str, prefix: str) -> None:
    if version is not None and version > SCHEMA_VERSION:
        raise ProtocolMismatch(
            f"the tables with prefix {prefix!r} in {where} use Postgres layout {version}; "
            f"this version of substantial reads up to {SCHEMA_VERSION}: upgrade substantial, "
            "or use another prefix"
        )


async def ensure_schema(conn: Any, statements: Statements, where: str) -> None:
    """Create the prefix's tables unless they exist; refuse a layout newer than ours.

    Many processes may open a new store at once: ``CREATE TABLE IF NOT
    EXISTS`` alone can still fail when two create one table concurrently,
    so creation runs under a transaction-scoped advisory lock of the prefix.
    """
    version = await stored_version(conn, statements)
    _check(version, where, statements.prefix)
    if version == SCHEMA_VERSION:
        return
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", statements.lock_key)
        version = await stored_version(conn, statements)
        _check(version, where, statements.prefix)
        if version != SCHEMA_VERSION:
            await conn.execute(statements.ddl())
