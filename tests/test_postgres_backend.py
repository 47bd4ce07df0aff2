"""What only the Postgres backend promises: races, wake-ups, schema, secrets, outages."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from substantial._runs import store_run
from substantial.backends import from_url
from substantial.backends.base import NewEvent, RunInfo
from substantial.backends.postgres import SCHEMA_VERSION, PostgresBackend
from substantial.errors import (
    BackendError,
    BackendUnavailable,
    InvalidArgument,
    PositionTaken,
    ProtocolMismatch,
)
from substantial.records import encode_entry
from tests.backend_postgres import PostgresHarness, start_server
from tests.postgres_server import PASSWORD, PostgresServer

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
async def store(postgres_harness: PostgresHarness) -> AsyncIterator[PostgresHarness]:
    """Yield a fresh prefix on the session server; close its backends and drop its tables after."""
    yield postgres_harness
    await postgres_harness.aclose()


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of the test's own, for tests that stop it."""
    server = start_server()
    yield server
    server.destroy()


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def info(run_id: str, workflow: str = "wf") -> RunInfo:
    now = time.time()
    return RunInfo(run_id, workflow, "active", now, now)


async def open_backend(store: PostgresHarness, **kwargs: object) -> PostgresBackend:
    backend = PostgresBackend.from_url(store.url, **kwargs)
    store._opened.append(backend)
    return backend


# -- races ------------------------------------------------------------------------


@pytest.mark.parametrize("group_commit", [True, False])
async def test_many_connections_appending_at_one_position_exactly_one_wins(
    store: PostgresHarness, group_commit: bool
) -> None:
    clients = [await open_backend(store, group_commit=group_commit) for _ in range(8)]
    await clients[0].append("race", 0, entry("base"))
    for position in range(1, 4):

        async def attempt(i: int, position: int = position) -> bool:
            try:
                await clients[i % len(clients)].append("race", position, entry(f"w{i}"))
                return True
            except PositionTaken:
                return False

        results = await asyncio.gather(*(attempt(i) for i in range(64)))
        assert sum(results) == 1, position
    assert len(await clients[3].read_log("race")) == 4


async def test_one_batch_settles_each_append_on_its_own(store: PostgresHarness) -> None:
    backend = await open_backend(store)
    await backend.append("a", 0, entry("a0"))
    # Issued in one loop iteration, so they leave as one INSERT: a taken position,
    # two appends of one free position, and fresh positions of other runs.
    outcomes = await asyncio.gather(
        backend.append("a", 0, entry("again")),
        backend.append("a", 1, entry("first")),
        backend.append("a", 1, entry("second")),
        *(backend.append(f"r{i}", 0, entry(i)) for i in range(20)),
        return_exceptions=True,
    )
    assert isinstance(outcomes[0], PositionTaken)
    assert outcomes[1] is None
    assert isinstance(outcomes[2], PositionTaken) and outcomes[2].position == 1
    assert outcomes[3:] == [None] * 20
    log = await backend.read_log("a")
    assert log == [entry("a0"), entry("first")]
    assert [len(await backend.read_log(f"r{i}")) for i in range(20)] == [1] * 20


async def test_one_batch_tells_gaps_from_taken_positions(store: PostgresHarness) -> None:
    backend = await open_backend(store)
    await backend.append("a", 0, entry("a0"))
    # One batch: consecutive positions of one run (the second needs the first, which a
    # statement cannot see among its own rows), a gap, and a gap behind a taken position.
    outcomes = await asyncio.gather(
        backend.append("a", 1, entry(1)),
        backend.append("a", 2, entry(2)),
        backend.append("b", 3, entry(3)),
        backend.append("a", 0, entry("again")),
        return_exceptions=True,
    )
    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], InvalidArgument) and "gap" in str(outcomes[2])
    assert isinstance(outcomes[3], PositionTaken)
    assert await backend.read_log("a") == [entry("a0"), entry(1), entry(2)]
    assert await backend.read_log("b") == []


async def test_a_cancelled_append_is_not_written(store: PostgresHarness) -> None:
    backend = await open_backend(store)
    task = asyncio.create_task(backend.append("c", 0, entry("never")))
    await asyncio.sleep(0)  # queued in the batch, which has not left yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    assert await backend.read_log("c") == []


# -- wake-ups ---------------------------------------------------------------------


async def test_notify_wakes_another_instance_at_once(store: PostgresHarness) -> None:
    waiter = await open_backend(store)
    sender = await open_backend(store)
    await waiter.due(time.time())  # starts listening, and waits until it does
    latencies = []
    for i in range(10):
        await waiter.due(time.time())
        task = asyncio.create_task(waiter.wait_for_work(10))
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        await sender.send_event("r", f"e{i}", b"1")
        assert await asyncio.wait_for(task, 5) is True
        latencies.append(time.perf_counter() - t0)
    # The write's own round trip included: well under any poll interval.
    assert statistics.median(latencies) < 0.05, latencies


async def test_a_later_time_from_another_instance_wakes_when_it_falls_due(
    store: PostgresHarness,
) -> None:
    waiter = await open_backend(store)
    sender = await open_backend(store)
    await waiter.due(time.time())
    t0 = time.time()
    await sender.schedule("later", t0 + 0.4)
    assert await waiter.wait_for_work(0.2) is False  # not due yet: no early wake
    assert await waiter.wait_for_work(5) is True
    assert 0.35 < time.time() - t0 < 1.0


async def test_wake_ups_resume_after_a_server_restart(own_server: PostgresServer) -> None:
    url = own_server.url() + "?prefix=w"
    waiter = PostgresBackend.from_url(url)
    sender = PostgresBackend.from_url(url)
    try:
        await waiter.due(time.time())
        own_server.restart()
        # The listener reconnects on its own and wakes its worker, since
        # notifications sent while it was away are lost.
        assert await waiter.wait_for_work(10) is True
        await asyncio.wait_for(waiter._listener.listening.wait(), 10)
        await waiter.due(time.time())
        task = asyncio.create_task(waiter.wait_for_work(10))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        await sender.send_event("r", "e", b"1")  # a stale pooled connection is replaced
        assert await asyncio.wait_for(task, 5) is True
        assert time.monotonic() - t0 < 1
    finally:
        await waiter.close()
        await sender.close()


# -- schema -----------------------------------------------------------------------


async def test_several_processes_create_the_schema_at_once(store: PostgresHarness) -> None:
    start_at = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-m", "tests.proc_helpers", "append-race",
                store.url, "schema", "0", f"p{i}", str(start_at),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(12)
    ]  # fmt: skip
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        outputs.append(out.strip())
    assert sorted(outputs) == ["lost"] * 11 + ["won"]
    conn = await store.raw()
    try:
        assert await conn.fetchval(f"SELECT version FROM {store.table('schema')}") == 1
    finally:
        await conn.close()


async def test_a_newer_schema_is_refused(store: PostgresHarness) -> None:
    backend = await open_backend(store)
    await backend.append("r", 0, entry(0))
    conn = await store.raw()
    try:
        await conn.execute(f"UPDATE {store.table('schema')} SET version = $1", SCHEMA_VERSION + 1)
    finally:
        await conn.close()
    newer = await open_backend(store)
    with pytest.raises(ProtocolMismatch, match="upgrade substantial") as err:
        await newer.read_log("r")
    assert f"layout {SCHEMA_VERSION + 1}" in str(err.value)
    assert store.prefix in str(err.value)


async def test_prefixes_isolate_applications(postgres_server: PostgresServer) -> None:
    a = PostgresBackend.from_url(postgres_server.url() + "?prefix=app_a")
    b = PostgresBackend.from_url(postgres_server.url() + "?prefix=app_b")
    try:
        now = time.time()
        await store_run(a, info("same"), entry("a"), now - 1)
        await a.set_due("same", now - 1, event=NewEvent("e", b"a"))
        await a.lease("same", "alice", 30)
        assert await b.read_log("same") == []
        assert await b.read_inbox("same") == []
        assert await b.due(now) == []
        assert await b.lease("same") is None
        assert await b.list_runs() == []
        await b.append("same", 0, entry("b"))
        assert [r for r, _ in await a.due(now)] == ["same"]
    finally:
        await a.close()
        await b.close()
        conn = await asyncpg.connect(postgres_server.url())
        try:
            for p in ("app_a", "app_b"):
                tables = ", ".join(f'"{p}_{t}"' for t in ("schema", "log", "inbox", "due"))
                await conn.execute(f'DROP TABLE {tables}, "{p}_leases", "{p}_runs"')
        finally:
            await conn.close()


# -- URLs and secrets -------------------------------------------------------------


async def test_url_options_and_invalid_prefixes() -> None:
    b = from_url("postgres://me:pw@127.0.0.1:1/app?prefix=shop&pool_size=3&command_timeout=2.5")
    assert isinstance(b, PostgresBackend)
    assert (b.prefix, b.pool_size, b.command_timeout) == ("shop", 3, 2.5)
    assert b.describe() == "postgres me@127.0.0.1:1/app prefix=shop"
    await b.close()
    for bad in ["", "1abc", "a-b", 'a"b', "x" * 41]:
        with pytest.raises(InvalidArgument, match="invalid Postgres table prefix"):
            PostgresBackend("postgresql://127.0.0.1/db", prefix=bad)
    with pytest.raises(InvalidArgument, match=r"'postgresql://u:\*\*\*@h/d\?pool_size=many'"):
        from_url("postgresql://u:topsecret@h/d?pool_size=many")


async def test_the_password_never_shows(postgres_server: PostgresServer) -> None:
    secret = "Sup3r-s3cret-value"
    wrong = PostgresBackend.from_url(postgres_server.url(password=secret) + "?prefix=pw")
    down = PostgresBackend.from_url(
        f"postgresql://substantial:{secret}@127.0.0.1:1/postgres?connect_timeout=1"
    )
    right = PostgresBackend.from_url(postgres_server.url() + "?prefix=pw")
    try:
        for backend in (wrong, down, right):
            assert secret not in backend.describe() and PASSWORD not in backend.describe()
        with pytest.raises(BackendError, match="password") as err:
            await wrong.read_log("r")
        assert not isinstance(err.value, BackendUnavailable)  # retrying will not help
        with pytest.raises(BackendUnavailable) as err2:
            await down.read_log("r")
        for e in (err.value, err2.value):
            assert secret not in str(e) and secret not in repr(e.__cause__)
        with pytest.raises(InvalidArgument) as err3:
            await PostgresBackend.from_url(postgres_server.url() + "?sslmode=bogus").read_log("r")
        assert PASSWORD not in str(err3.value)
    finally:
        for backend in (wrong, down, right):
            await backend.close()


# -- outages ----------------------------------------------------------------------


async def test_server_stopped_mid_call_is_unavailable_then_recovers(
    own_server: PostgresServer,
) -> None:
    backend = PostgresBackend.from_url(own_server.url() + "?prefix=o&connect_timeout=2")
    try:
        await backend.append("r", 0, entry(0))
        blocker = await asyncpg.connect(own_server.url())
        await blocker.execute('BEGIN; LOCK TABLE "o_log" IN ACCESS EXCLUSIVE MODE')
        # The append waits for the lock, on the server, when the server goes away.
        call = asyncio.create_task(backend.append("r", 1, entry(1)))
        await asyncio.sleep(0.3)
        assert not call.done()
        # Immediate: a fast stop ends the blocker's transaction first, and the waiting
        # append may then commit before its own session ends (a success, but no test).
        own_server.kill()
        with pytest.raises(BackendUnavailable, match="unavailable"):
            await call
        blocker.terminate()
        for attempt in (backend.read_log("r"), backend.due(time.time()), backend.get_run("r")):
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await attempt
            assert time.monotonic() - t0 < 5, "a call during an outage must not hang"
        own_server.start()
        assert len(await backend.read_log("r")) == 1  # the interrupted append wrote nothing
        await backend.append("r", 1, entry(1))
        assert len(await backend.read_log("r")) == 2
    finally:
        await backend.close()


async def test_a_store_made_before_the_creation_index_gets_it_and_lists_from_it(
    store: PostgresHarness,
) -> None:
    from substantial.backends.postgres._recent import recent_query

    first = await open_backend(store)
    for i in range(5):
        await first.put_run(RunInfo(f"r{i}", "wf", "active", 1000.0 - i, 1000.0))
    conn = await store.raw()
    try:
        await conn.execute(f"DROP INDEX {store.table('runs_by_created')}")
        again = await open_backend(store)
        assert [r.run_id for r in await again.list_recent(limit=3)] == ["r0", "r1", "r2"]
        assert await conn.fetchval("SELECT to_regclass($1)", store.table("runs_by_created"))
        # The cursor bounds a walk of the index: no sort, however many runs there are.
        await conn.execute("SET enable_seqscan = off")
        sql = recent_query(store.table("runs"), cursor=True, status=False, workflow=False)
        plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", 1000.0, "r1", 50))
        assert "Index Scan Backward using" in plan and "runs_by_created" in plan, plan
        assert "Sort" not in plan, plan
    finally:
        await conn.close()


async def test_unschedule_idle_waits_for_a_post_that_holds_the_due_row(
    store: PostgresHarness,
) -> None:
    backend = await store.open()
    assert isinstance(backend, PostgresBackend)
    await backend.set_due("r", time.time() - 1)
    raw = await store.raw()
    try:
        # A post in flight, as the write function does it: the event, then the due row,
        # not yet committed. An inbox read now would not see the event.
        post = raw.transaction()
        await post.start()
        await raw.execute(
            f"INSERT INTO {store.table('inbox')} (run_id, event_id, data, posted_at) "
            "VALUES ('r', 'e', '\\x7b7d'::bytea, 0)"
        )
        await raw.execute(f"UPDATE {store.table('due')} SET at = 1 WHERE run_id = 'r'")
        unscheduling = asyncio.ensure_future(backend.unschedule_idle("r"))
        await asyncio.sleep(0.3)
        assert not unscheduling.done()  # waits on the due row the post holds
        await post.commit()
        assert await asyncio.wait_for(unscheduling, 10) is False  # then sees its event
    finally:
        await raw.close()
    assert [r for r, _ in await backend.due(time.time())] == ["r"]
    await backend.read_inbox("r", ack=["e"])
    assert await backend.unschedule_idle("r") is True
    assert await backend.due(time.time() + 3600) == []
