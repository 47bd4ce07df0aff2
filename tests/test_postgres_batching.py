"""Postgres group commit: writes of many runs in one transaction, each with its own outcome."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from substantial._runs import store_run
from substantial.backends.base import NewEvent, RunInfo
from substantial.backends.postgres import PostgresBackend
from substantial.backends.postgres._schema import function_name
from substantial.errors import BackendError, BackendUnavailable, InvalidArgument, PositionTaken
from substantial.records import encode_entry
from tests.backend_postgres import PostgresHarness


@pytest.fixture
async def store(postgres_harness: PostgresHarness) -> AsyncIterator[PostgresHarness]:
    """Yield a fresh prefix on the session server; close its backends and drop its tables after."""
    yield postgres_harness
    await postgres_harness.aclose()


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def info(run_id: str, status: str = "active") -> RunInfo:
    now = time.time()
    return RunInfo(run_id, "wf", status, now, now)


async def open_backend(store: PostgresHarness, **kwargs: object) -> PostgresBackend:
    backend = PostgresBackend.from_url(store.url, **kwargs)
    store._opened.append(backend)
    return backend


async def query(store: PostgresHarness, sql: str, *args: object) -> list[Any]:
    conn = await store.raw()
    try:
        return list(await conn.fetch(sql.replace("{p}", store.prefix), *args))
    finally:
        await conn.close()


async def transactions(store: PostgresHarness, table: str, run_ids: list[str]) -> set[str]:
    """Return the ids of the transactions that wrote the runs' rows of ``table``."""
    rows = await query(
        store, f'SELECT xmin::text FROM "{{p}}_{table}" WHERE run_id = ANY($1)', run_ids
    )
    return {r[0] for r in rows}


async def test_one_batch_of_mixed_writes_settles_each_on_its_own(store: PostgresHarness) -> None:
    backend = await open_backend(store)
    await backend.append("old", 0, entry(0))
    await backend.append("old", 1, entry(1))
    assert await backend.acquire_lease("held", "alice", 30)
    # Issued in one loop iteration: one transaction. A stale writer's append at a
    # taken position is refused while every other write of the batch lands.
    outcomes = await asyncio.gather(
        backend.append("old", 1, entry("stale")),
        backend.append("old", 2, entry(2)),
        backend.append("old", 3, entry(3)),
        backend.append("gap", 5, entry(5)),
        backend.start_run(info("new"), entry("start"), time.time()),
        backend.start_run(info("old"), entry("again"), time.time()),
        backend.put_run(info("old")),
        backend.set_due("mail", time.time(), event=NewEvent("e1", b"x")),
        backend.set_due("mail", time.time(), event=NewEvent("e1", b"y")),
        backend.schedule("later", time.time() + 3600),
        backend.acquire_lease("held", "bob", 30),
        backend.acquire_lease("free", "bob", 30),
        backend.acquire_lease("free", "carol", 30),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], PositionTaken) and outcomes[0].position == 1
    assert outcomes[1:3] == [None, None]
    assert isinstance(outcomes[3], InvalidArgument) and "gap" in str(outcomes[3])
    assert outcomes[4:8] == [True, False, None, True]
    assert outcomes[8:] == [False, None, False, True, False]
    assert await backend.read_log("old") == [entry(0), entry(1), entry(2), entry(3)]
    assert await backend.read_log("new") == [entry("start")]
    assert (await backend.get_run("new")) is not None
    assert [e.data for e in await backend.read_inbox("mail")] == [b"x"]
    due = await backend.due(time.time())
    assert {r for r, _ in due} == {"new", "mail"} and due.next_at is not None
    assert (await backend.get_lease("held")).owner == "alice"  # type: ignore[union-attr]
    assert (await backend.get_lease("free")).owner == "bob"  # type: ignore[union-attr]
    # They shared one commit: every row they wrote carries one transaction id.
    written = [await transactions(store, t, ["old", "new", "mail", "later", "free"]) for t in (
        "due", "inbox", "leases", "runs"
    )]  # fmt: skip
    log_rows = await query(store, 'SELECT xmin::text FROM "{p}_log" WHERE position >= 2')
    assert len(set().union(*written, {r[0] for r in log_rows})) == 1


async def test_a_write_the_server_refuses_fails_alone_in_its_batch(
    store: PostgresHarness,
) -> None:
    backend = await open_backend(store)
    await backend.append("a", 0, entry(0))  # the tables exist
    conn = await store.raw()
    try:
        # A real refusal by the server, for one run only.
        await conn.execute(
            f"CREATE FUNCTION {store.prefix}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ "
            "BEGIN IF NEW.run_id = 'bad' THEN RAISE EXCEPTION 'refused by a trigger'; END IF; "
            "RETURN NEW; END $$"
        )
        await conn.execute(
            f"CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {store.table('runs')} "
            f"FOR EACH ROW EXECUTE FUNCTION {store.prefix}_refuse()"
        )
        outcomes = await asyncio.gather(
            backend.put_run(info("bad")),
            backend.put_run(info("good")),
            backend.append("a", 1, entry(1)),
            backend.append("a", 1, entry("second")),
            backend.schedule("good", time.time()),
            return_exceptions=True,
        )
        assert isinstance(outcomes[0], BackendError)
        assert not isinstance(outcomes[0], BackendUnavailable)  # retrying will not help
        assert "refused by a trigger" in str(outcomes[0])
        assert outcomes[1:3] == [None, None]
        assert isinstance(outcomes[3], PositionTaken)
        assert outcomes[4] is None
        assert await backend.get_run("bad") is None
        assert await backend.get_run("good") is not None
        assert await backend.read_log("a") == [entry(0), entry(1)]
        assert [r for r, _ in await backend.due(time.time())] == ["good"]
    finally:
        await conn.execute(f"DROP TRIGGER IF EXISTS refuse ON {store.table('runs')}")
        await conn.execute(f"DROP FUNCTION IF EXISTS {store.prefix}_refuse()")
        await conn.close()


async def test_a_connection_lost_mid_batch_writes_nothing_of_it(store: PostgresHarness) -> None:
    backend = await open_backend(store)
    await backend.append("b", 0, entry(0))
    blocker = await store.raw()
    try:
        # The batch applies its writes in run order: a's metadata and b's append,
        # then c's due row waits for the lock, when its connection is cut.
        await blocker.execute(f"BEGIN; LOCK TABLE {store.table('due')} IN ACCESS EXCLUSIVE MODE")
        writes = asyncio.gather(
            backend.put_run(info("a")),
            backend.append("b", 1, entry(1)),
            backend.schedule("c", time.time()),
            return_exceptions=True,
        )
        # Watched from a connection of its own: one transaction sees one snapshot of it.
        waiting: list[Any] = []
        for _ in range(400):
            waiting = await query(
                store,
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name = 'substantial' AND query LIKE '%write_v%'",
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert len(waiting) == 1, "the batch never reached the lock"
        await blocker.execute("SELECT pg_terminate_backend($1)", waiting[0][0])
        outcomes = await asyncio.wait_for(writes, 30)
        assert all(isinstance(o, BackendUnavailable) for o in outcomes), outcomes
        await blocker.execute("ROLLBACK")
        # All or nothing: the first two writes were done when the connection went.
        assert await backend.get_run("a") is None
        assert await backend.read_log("b") == [entry(0)]
        assert await backend.due(time.time()) == []
        # Sent again as they are, they land once.
        await asyncio.gather(
            backend.put_run(info("a")),
            backend.append("b", 1, entry(1)),
            backend.schedule("c", time.time()),
        )
        assert await backend.get_run("a") is not None
        assert await backend.read_log("b") == [entry(0), entry(1)]
        assert [r for r, _ in await backend.due(time.time())] == ["c"]
    finally:
        await blocker.close()


async def test_a_store_made_before_the_write_function_gets_it_and_keeps_its_runs(
    store: PostgresHarness,
) -> None:
    old = await open_backend(store)
    assert await store_run(old, info("r"), entry("start"), time.time())
    await old.append("r", 1, entry(1))
    await old.close()
    # A store made by the previous version: the same tables at layout 1, no function.
    await query(store, f"DROP FUNCTION {function_name(store.prefix)}")
    assert await query(store, "SELECT to_regproc($1)", function_name(store.prefix)) == [(None,)]
    new = await open_backend(store)
    assert await new.read_log("r") == [entry("start"), entry(1)]
    await asyncio.gather(new.append("r", 2, entry(2)), new.put_run(info("r", "completed")))
    assert await new.read_log("r") == [entry("start"), entry(1), entry(2)]
    assert (await new.get_run("r")).status == "completed"  # type: ignore[union-attr]
    # One batch again: the entry and the metadata were written by one transaction.
    log_rows = await query(store, 'SELECT xmin::text FROM "{p}_log" WHERE position = 2')
    assert {r[0] for r in log_rows} == await transactions(store, "runs", ["r"])
    assert await query(store, 'SELECT version FROM "{p}_schema"') == [(1,)]
    assert await query(store, "SELECT to_regproc($1) IS NOT NULL", function_name(store.prefix)) == [
        (True,)
    ]


async def test_without_the_right_to_create_functions_writes_go_alone(
    store: PostgresHarness,
) -> None:
    owner = await open_backend(store)
    await owner.append("r", 0, entry(0))
    await owner.close()
    await query(store, f"DROP FUNCTION {function_name(store.prefix)}")
    role = f"{store.prefix}_user"
    tables = ", ".join(store.table(t) for t in ("schema", "log", "inbox", "due", "leases", "runs"))
    conn = await store.raw()
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
        await conn.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {tables} TO {role}")
        # PostgreSQL 15's default for the public schema, said for older servers too.
        await conn.execute(f"REVOKE CREATE ON SCHEMA public FROM PUBLIC, {role}")
        url = f"postgresql://{role}:pw@127.0.0.1:{store.server.port}/postgres"
        limited = PostgresBackend(url, prefix=store.prefix)
        outcomes = await asyncio.gather(
            limited.append("r", 1, entry(1)),
            limited.append("r", 1, entry("again")),
            limited.put_run(info("r")),
            return_exceptions=True,
        )
        assert outcomes[0] is None and outcomes[2] is None
        assert isinstance(outcomes[1], PositionTaken)
        assert await limited.read_log("r") == [entry(0), entry(1)]
        await limited.close()
        # Each write was its own transaction.
        log_rows = await query(store, 'SELECT xmin::text FROM "{p}_log" WHERE position = 1')
        assert {r[0] for r in log_rows} != await transactions(store, "runs", ["r"])
    finally:
        await conn.execute(f"REVOKE ALL ON {tables} FROM {role}")
        await conn.execute(f"DROP ROLE IF EXISTS {role}")
        await conn.close()


async def test_more_calls_than_connections_take_turns_on_kept_connections(
    store: PostgresHarness,
) -> None:
    backend = await open_backend(store, pool_size=2, group_commit=False)
    await backend.append("r", 0, entry(0))
    # Twenty calls at once on two connections: each waits for one to be kept again.
    logs = await asyncio.gather(*(backend.read_log("r") for _ in range(20)))
    assert logs == [[entry(0)]] * 20
    # A failed call gives its connection back to the pool; the next calls still get one.
    with pytest.raises(PositionTaken):
        await backend.append("r", 0, entry("again"))
    conn = await store.raw()
    try:
        await conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'substantial' AND pid <> pg_backend_pid()"
        )
    finally:
        await conn.close()
    # The kept connections were cut: a call may still meet one before the driver has
    # seen it closed (and fail); the connection then goes back and is replaced.
    for _ in range(100):
        try:
            await backend.read_log("r")
            break
        except BackendError:
            await asyncio.sleep(0.05)
    results = await asyncio.gather(*(backend.read_log("r") for _ in range(6)))
    assert results == [[entry(0)]] * 6
    await backend.append("r", 1, entry(1))
    assert await backend.read_log("r") == [entry(0), entry(1)]


async def test_coalesced_reads_keep_one_plan_instead_of_planning_each_call(
    store: PostgresHarness,
) -> None:
    backend = await open_backend(store)
    for run_id in ("a", "b"):
        assert await store_run(backend, info(run_id), entry("start"), time.time())
    for _ in range(10):
        # Two runs' reads of one iteration: the statements taking arrays of runs.
        assert len(await asyncio.gather(backend.read_log("a"), backend.read_log("b"))) == 2
        assert await backend.list_runs(ids=["a", "b"]) != []
    # One connection served them all (the last used is taken again): its prepared
    # statements tell how often each was planned for its arguments (custom) and how
    # often it ran its one generic plan.
    rows = await backend._run(
        "read plans",
        lambda c: c.fetch(
            "SELECT statement, generic_plans, custom_plans FROM pg_prepared_statements"
        ),
    )
    plans = {r[0]: (r[1], r[2]) for r in rows if "_log" in r[0] or "_runs" in r[0]}
    read_logs, get_runs = backend._sql["read_logs"], backend._sql["get_runs"]
    assert set(plans) >= {read_logs, get_runs}
    for sql in (read_logs, get_runs):
        generic, custom = plans[sql]
        # The server tries five custom plans before it weighs the generic one.
        assert custom <= 5 and generic >= 5, (sql, plans[sql])


async def test_reads_of_one_iteration_each_get_their_own_rows(store: PostgresHarness) -> None:
    backend = await open_backend(store)
    for run_id, n in (("a", 3), ("b", 1)):
        assert await store_run(backend, info(run_id), entry("start"), time.time())
        for position in range(1, n):
            await backend.append(run_id, position, entry(position))
    await backend.send_event("a", "e1", b"1")
    await backend.send_event("a", "e2", b"2")
    await backend.send_event("b", "e3", b"3")
    # Issued in one iteration: one query per kind, each caller its own rows.
    logs, inboxes, infos = await asyncio.gather(
        asyncio.gather(
            backend.read_log("a"),
            backend.read_log("a", 2),
            backend.read_log("b"),
            backend.read_log("none"),
            backend.read_log("a", 9),
        ),
        asyncio.gather(backend.read_inbox("a"), backend.read_inbox("b"), backend.read_inbox("x")),
        asyncio.gather(
            backend.get_run("a"), backend.get_run("none"), backend.list_runs(ids=["b", "a"])
        ),
    )
    assert logs == [
        [entry("start"), entry(1), entry(2)],
        [entry(2)],
        [entry("start")],
        [],
        [],
    ]
    assert [[(e.event_id, e.data) for e in inbox] for inbox in inboxes] == [
        [("e1", b"1"), ("e2", b"2")],
        [("e3", b"3")],
        [],
    ]
    assert infos[0] is not None and infos[0].run_id == "a" and infos[1] is None
    assert [i.run_id for i in infos[2]] == ["a", "b"]


async def test_two_clients_batches_that_deadlock_each_land(store: PostgresHarness) -> None:
    a = await open_backend(store)
    b = await open_backend(store)
    await a.put_run(info("r"))
    await b.schedule("r", time.time() + 60)
    blocker = await store.raw()

    async def waiting(n: int) -> None:
        for _ in range(400):
            rows = await query(
                store,
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND application_name = 'substantial'",
            )
            if len(rows) >= n:
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{n} batches never waited for a lock")

    try:
        # The one deadlock sorting cannot prevent: one run's rows written in opposite
        # orders. a waits for r's metadata row; b takes r's due row, then waits behind a;
        # freed, a goes on to the due row b holds.
        await blocker.execute(f"BEGIN; UPDATE {store.table('runs')} SET status = status")
        first = asyncio.gather(a.put_run(info("r", "completed")), a.schedule("r", 1.0))
        await waiting(1)
        second = asyncio.gather(b.schedule("r", 2.0), b.put_run(info("r", "failed")))
        await waiting(2)
        await blocker.execute("ROLLBACK")
        # The server finds the deadlock (after deadlock_timeout, 1 s) and aborts one
        # batch; its writes are sent again alone and land after the other's.
        assert await asyncio.wait_for(first, 30) == [None, None]
        assert await asyncio.wait_for(second, 30) == [None, None]
        status = (await a.get_run("r")).status  # type: ignore[union-attr]
        at = list(await a.due(10.0))
        # Last writer wins, whole: never one batch's metadata with the other's due time.
        assert (status, at) in (("failed", [("r", 2.0)]), ("completed", [("r", 1.0)]))
    finally:
        await blocker.close()
