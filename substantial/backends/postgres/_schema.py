"""The tables of one prefix, the statements on them, and creating them on first use.

docs/PROTOCOL.md ("postgres backend") describes the same layout for people.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from typing import Any

import asyncpg

from substantial.backends.postgres._recent import ensure_recent_index
from substantial.errors import InvalidArgument, ProtocolMismatch

__all__ = [
    "ACQUIRE",
    "APPEND",
    "FUNCTION_REVISION",
    "GIVE_UP",
    "PUT_RUN",
    "SCHEDULE",
    "SCHEMA_VERSION",
    "SEND",
    "START",
    "UNSCHEDULE",
    "Statements",
    "ensure_schema",
    "function_ddl",
    "function_name",
    "validate_prefix",
]

#: The layout version, kept in the ``<prefix>_schema`` table. The write function
#: (``_writes.py``) is versioned by its name: adding it changes no table, so
#: clients of earlier versions keep working on a store that has it.
SCHEMA_VERSION = 1

log = logging.getLogger("substantial.postgres")

#: The revision of the write function; a new revision gets a new name, so clients
#: of every version can share one database while a fleet is upgraded.
FUNCTION_REVISION = 1

#: The kinds of write the write function applies.
APPEND, PUT_RUN, SCHEDULE, UNSCHEDULE, SEND, ACQUIRE, GIVE_UP, START = range(1, 9)

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
        #: The quoted name of the write function (group commit).
        self.function = function_name(prefix)
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
            # Many runs' logs from a position each (coalesced reads); $1 runs, $2 starts.
            # LATERAL walks the primary key once per run: as a plain join the planner
            # hashes the few keys and scans the whole log, a cost growing with the store.
            # The arrays come through (SELECT $n), here and in get_runs, so that no plan
            # can see their length: then the prepared statement's generic plan costs
            # what a plan made for the given arrays would, and the server keeps it
            # instead of planning every call again (about 70 us of server time per
            # call, more than the read itself).
            "read_logs": (
                "SELECT q.i, l.position, l.entry FROM unnest((SELECT $1::text[]), "
                "(SELECT $2::bigint[])) WITH ORDINALITY AS q(r, s, i) CROSS JOIN LATERAL "
                f"(SELECT position, entry FROM {log} WHERE run_id = q.r "
                "AND position >= q.s ORDER BY position) l ORDER BY q.i, l.position"
            ),
            "read_inboxes": (
                f"SELECT run_id, event_id, data, posted_at FROM {inbox} "
                "WHERE run_id = ANY($1::text[]) ORDER BY run_id, seq"
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
            # The runs due by $2 (up to $1) and the first one after them, not a page of the
            # runs waiting: with a million of them, each poll would read a thousand. NaN sorts
            # after every number, so a bad time is met as the one after.
            # unschedule_idle: the due row locked first, so the inbox read after it (a new
            # snapshot, READ COMMITTED) sees the event of any post that held the row.
            "lock_due": f"SELECT 1 FROM {due} WHERE run_id = $1 FOR UPDATE",
            "inbox_waits": f"SELECT EXISTS (SELECT 1 FROM {inbox} WHERE run_id = $1)",
            "drop_due": f"DELETE FROM {due} WHERE run_id = $1",
            "due_head": (
                f"SELECT run_id, at FROM ((SELECT run_id, at FROM {due} WHERE at <= $2::float8 "
                f"ORDER BY at, run_id LIMIT $1::int) UNION ALL (SELECT run_id, at FROM {due} "
                f"WHERE at > $2::float8 ORDER BY at, run_id LIMIT 1)) AS head "
                "ORDER BY at, run_id"
            ),
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
            # $1 run, $2 entry, $3 workflow, $4 status, $5 info, $6 due at, $7 channel
            "start": (
                f"WITH ins AS (INSERT INTO {log} (run_id, position, entry) "
                "VALUES ($1::text, 0, $2::bytea) ON CONFLICT DO NOTHING RETURNING 1), "
                f"r AS (INSERT INTO {runs} (run_id, workflow, status, info) "
                "SELECT $1::text, $3::text, $4::text, $5::bytea WHERE EXISTS (SELECT 1 FROM ins) "
                f"{upsert_run}), "
                f"d AS (INSERT INTO {due} (run_id, at) SELECT $1::text, $6::float8 "
                f"WHERE EXISTS (SELECT 1 FROM ins) {upsert_due}) "
                "SELECT EXISTS (SELECT 1 FROM ins), "
                "(SELECT pg_notify($7::text, $6::float8::text) FROM ins)"
            ),
            "put_run": (
                f"INSERT INTO {runs} (run_id, workflow, status, info) "
                f"VALUES ($1::text, $2::text, $3::text, $4::bytea) {upsert_run}"
            ),
            "get_runs": (
                f"SELECT run_id, info FROM {runs} WHERE run_id = ANY((SELECT $1::text[])::text[])"
            ),
            # Writes of many runs in one transaction (group commit, see _writes.py).
            # One statement, so a run's rows all go or none (returns how many went).
            "delete_run": "WITH "
            + ", ".join(
                f"d{i} AS (DELETE FROM {t(name)} WHERE run_id = $1::text RETURNING 1)"
                for i, name in enumerate(("due", "leases", "inbox", "log", "runs"))
            )
            + " SELECT "
            + " + ".join(f"(SELECT count(*) FROM d{i})" for i in range(5)),
            "write_many": (
                f"SELECT o_state, o_owner, o_new, o_old FROM {self.function}($1::int[], "
                "$2::text[], $3::bigint[], $4::text[], $5::text[], $6::bytea[], $7::float8[], "
                "$8::float8[], $9::bytea[])"
            ),
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

    def function_ddl(self) -> str:
        """Return the script that creates (or replaces) the write function."""
        return function_ddl(self.prefix, self.table, self.channel)

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


async def ensure_schema(conn: Any, statements: Statements, where: str) -> bool:
    """Create the prefix's tables and write function unless they exist; refuse a newer layout.

    Many processes may open a new store at once: ``CREATE TABLE IF NOT
    EXISTS`` alone can still fail when two create one table concurrently,
    so creation runs under a transaction-scoped advisory lock of the prefix.
    A store made by an earlier version has its tables and gets the function
    here (its own transaction: tables made by an administrator stay usable
    by a user who may not create functions). Return whether the function
    is there; without it every write is sent alone.
    """
    function = statements.function
    # One round trip tells whether all three exist: an existing store costs no lock.
    by_created = statements.table("runs_by_created")
    tables, has_function, indexed = await conn.fetchrow(
        "SELECT to_regclass($1) IS NOT NULL, to_regproc($2) IS NOT NULL, "
        "to_regclass($3) IS NOT NULL",
        statements.table("schema"),
        function,
        by_created,
    )
    version = int(await conn.fetchval(statements["version"]) or 0) or None if tables else None
    _check(version, where, statements.prefix)
    if version == SCHEMA_VERSION and has_function and indexed:
        return True
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", statements.lock_key)
        version = await stored_version(conn, statements)
        _check(version, where, statements.prefix)
        if version != SCHEMA_VERSION:
            await conn.execute(statements.ddl())
    if not indexed:
        await ensure_recent_index(conn, statements.table, statements.lock_key, where)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", statements.lock_key)
            if not await _has_function(conn, function):
                await conn.execute(statements.function_ddl())
    except asyncpg.InsufficientPrivilegeError as exc:
        log.warning(
            "cannot create the function %s in %s (%s): each write goes alone, one round "
            "trip each; grant CREATE on the schema to share commits",
            function,
            where,
            exc,
        )
        return False
    return True


async def _has_function(conn: Any, name: str) -> bool:
    return bool(await conn.fetchval("SELECT to_regproc($1) IS NOT NULL", name))


def function_name(prefix: str) -> str:
    """Return the quoted name of the prefix's write function."""
    return f'"{prefix}_write_v{FUNCTION_REVISION}"'


def function_ddl(prefix: str, table: Callable[[str], str], channel: str) -> str:
    """Return ``CREATE OR REPLACE FUNCTION`` for the prefix's write function.

    One row per write, in the order given. ``state``: append 0 stored,
    1 position taken, 2 a gap; send 1 if the event was stored now; give-up
    1 if the lease was removed. Leases also return the row they found
    (``owner``, ``old_expiry``) and, when taken, the new expiry. One
    notification carries the earliest due time the batch set.
    """
    log, inbox, due, leases, runs = (table(t) for t in ("log", "inbox", "due", "leases", "runs"))
    now, unreadable = _NOW, _UNREADABLE
    # The prefix and channel hold only [A-Za-z0-9_] (validate_prefix): safe to inline.
    return f"""
CREATE OR REPLACE FUNCTION {function_name(prefix)}(
    _k int[], _r text[], _p bigint[], _t1 text[], _t2 text[], _b bytea[],
    _f1 float8[], _f2 float8[], _b2 bytea[]
) RETURNS TABLE (o_state int, o_owner text, o_new float8, o_old float8)
LANGUAGE plpgsql AS $fn$
DECLARE
    w record;
    wake float8;
    now_ float8;
BEGIN
    FOR w IN SELECT * FROM unnest(_k, _r, _p, _t1, _t2, _b, _f1, _f2, _b2)
        AS t(k, r, p, t1, t2, b, f1, f2, b2)
    LOOP
        o_state := 0; o_owner := NULL; o_new := NULL; o_old := NULL;
        IF w.k = {APPEND} THEN
            -- Only at 0 or right after an entry; the primary key refuses a taken position.
            INSERT INTO {log} (run_id, position, entry)
            SELECT w.r, w.p, w.b WHERE w.p = 0 OR EXISTS
                (SELECT 1 FROM {log} WHERE run_id = w.r AND position = w.p - 1)
            ON CONFLICT DO NOTHING;
            IF NOT FOUND THEN
                o_state := CASE WHEN EXISTS
                    (SELECT 1 FROM {log} WHERE run_id = w.r AND position = w.p)
                    THEN 1 ELSE 2 END;
            END IF;
        ELSIF w.k = {START} THEN
            -- A new run: its first entry, metadata and due time, or nothing if it exists.
            INSERT INTO {log} (run_id, position, entry) VALUES (w.r, 0, w.b)
            ON CONFLICT DO NOTHING;
            IF FOUND THEN
                INSERT INTO {runs} (run_id, workflow, status, info)
                VALUES (w.r, w.t1, w.t2, w.b2)
                ON CONFLICT (run_id) DO UPDATE SET workflow = excluded.workflow,
                    status = excluded.status, info = excluded.info;
                INSERT INTO {due} (run_id, at) VALUES (w.r, w.f1)
                ON CONFLICT (run_id) DO UPDATE SET at = excluded.at;
                wake := least(wake, w.f1);
            ELSE
                o_state := 1;
            END IF;
        ELSIF w.k = {PUT_RUN} THEN
            INSERT INTO {runs} (run_id, workflow, status, info) VALUES (w.r, w.t1, w.t2, w.b)
            ON CONFLICT (run_id) DO UPDATE SET workflow = excluded.workflow,
                status = excluded.status, info = excluded.info;
        ELSIF w.k = {SCHEDULE} THEN
            INSERT INTO {due} (run_id, at) VALUES (w.r, w.f1)
            ON CONFLICT (run_id) DO UPDATE SET at = excluded.at;
            wake := least(wake, w.f1);
        ELSIF w.k = {UNSCHEDULE} THEN
            DELETE FROM {due} WHERE run_id = w.r;
        ELSIF w.k = {SEND} THEN
            INSERT INTO {inbox} (run_id, event_id, data, posted_at) VALUES (w.r, w.t1, w.b, w.f1)
            ON CONFLICT DO NOTHING;
            IF FOUND THEN o_state := 1; END IF;
            INSERT INTO {due} (run_id, at) VALUES (w.r, w.f2)
            ON CONFLICT (run_id) DO UPDATE SET at = excluded.at;
            wake := least(wake, w.f2);
        ELSIF w.k = {ACQUIRE} OR w.k = {GIVE_UP} THEN
            SELECT owner, expires_at INTO o_owner, o_old FROM {leases} WHERE run_id = w.r;
            now_ := {now};
            IF w.k = {ACQUIRE} THEN
                INSERT INTO {leases} AS l (run_id, owner, expires_at)
                VALUES (w.r, w.t1, now_ + w.f1)
                ON CONFLICT (run_id) DO UPDATE
                SET owner = excluded.owner, expires_at = excluded.expires_at
                WHERE l.expires_at <= now_ OR l.owner = w.t1 OR l.owner = w.t2 OR {unreadable}
                RETURNING l.expires_at INTO o_new;
            ELSE
                DELETE FROM {leases} AS l WHERE l.run_id = w.r AND (l.expires_at <= now_
                    OR l.owner = w.t1 OR l.owner = w.t2 OR {unreadable});
                IF FOUND THEN o_state := 1; END IF;
            END IF;
        ELSE
            RAISE EXCEPTION 'unknown write kind %', w.k;
        END IF;
        RETURN NEXT;
    END LOOP;
    IF wake IS NOT NULL THEN
        PERFORM pg_notify('{channel}', wake::text);
    END IF;
END
$fn$;
"""
