"""What the conformance suite cannot see of the sqlite backend: pragmas, group commit, errors."""

from __future__ import annotations

import asyncio
import gc
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from substantial._runs import store_run
from substantial.backends import from_url
from substantial.backends.base import RunInfo
from substantial.backends.sqlite import SQLiteBackend
from substantial.errors import BackendUnavailable, PositionTaken, ProtocolMismatch
from substantial.records import decode_entry, encode_entry
from tests.test_fs_backend import lease_race, wake_from_another_process

ROOT = Path(__file__).resolve().parent.parent


def entry(value: object) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "s", "value": value}])


def info(run_id: str) -> RunInfo:
    now = time.time()
    return RunInfo(run_id, "wf", "active", now, now)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "store.db"


@pytest.fixture
async def backend(db_path: Path) -> AsyncIterator[SQLiteBackend]:
    b = SQLiteBackend(db_path)
    yield b
    await b.close()


def trace(backend: SQLiteBackend) -> list[str]:
    """Record every statement the backend's connection runs from now on."""
    statements: list[str] = []
    backend._connect().set_trace_callback(statements.append)
    return statements


def transactions(statements: list[str]) -> int:
    return sum(s.strip().upper().startswith("BEGIN") for s in statements)


async def test_pragmas_follow_the_durability_mode(db_path: Path) -> None:
    process = SQLiteBackend(db_path)
    fsync = from_url(f"sqlite://{db_path}?durability=fsync")
    assert isinstance(fsync, SQLiteBackend) and fsync.durability == "fsync"
    await fsync.append("r", 0, entry(0))
    await process.append("r", 1, entry(1))
    for backend, level in [(process, 1), (fsync, 2)]:  # NORMAL, FULL
        db = backend._connect()
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA synchronous").fetchone()[0] == level
        assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    assert len(await fsync.read_log("r")) == 2
    await process.close()
    await fsync.close()


async def test_concurrent_writes_share_one_transaction(backend: SQLiteBackend) -> None:
    await backend.append("hot", 0, entry("base"))
    statements = trace(backend)

    async def contender(i: int) -> str:
        try:
            await backend.append("hot", 1, entry(f"c{i}"))
            return "won"
        except PositionTaken:
            return "lost"

    results = await asyncio.gather(
        *(backend.append(f"run{i}", 0, entry(i)) for i in range(40)),
        *(contender(i) for i in range(10)),
        backend.post_event("run0", "e", b"1"),
        backend.schedule("run1", time.time()),
        backend.put_run(info("run2")),
        backend.acquire_lease("run3", "me", 30),
    )
    assert transactions(statements) == 1
    assert sum(s.startswith("COMMIT") for s in statements) == 1
    assert results[:40] == [None] * 40
    assert results[40:50].count("won") == 1
    assert results[50:] == [True, None, None, True]
    for i in range(40):
        (stored,) = await backend.read_log(f"run{i}")
        assert decode_entry(f"run{i}", 0, stored)[0]["value"] == i
    winner = results[40:50].index("won")
    assert decode_entry("hot", 1, (await backend.read_log("hot"))[1])[0]["value"] == f"c{winner}"


async def test_a_lone_write_commits_at_once_without_an_explicit_transaction(
    backend: SQLiteBackend,
) -> None:
    await backend.append("r", 0, entry(0))
    statements = trace(backend)
    for i in range(1, 4):
        await backend.append("r", i, entry(i))
    assert transactions(statements) == 0
    assert sum("INSERT" in s for s in statements) == 3
    assert len(await backend.read_log("r")) == 4


async def test_create_run_and_send_event_are_one_transaction_each(
    backend: SQLiteBackend,
) -> None:
    await backend.read_log("warm-up")
    statements = trace(backend)
    assert await store_run(backend, info("r"), entry("start"), time.time())
    assert transactions(statements) == 1
    assert await backend.send_event("r", "e", b"1")
    assert transactions(statements) == 2
    assert [r for r, _ in await backend.due(time.time())] == ["r"]
    assert [e.event_id for e in await backend.read_inbox("r")] == ["e"]


async def test_a_cancelled_write_does_not_happen_and_the_others_do(
    backend: SQLiteBackend,
) -> None:
    await backend.read_log("warm-up")
    leader = asyncio.create_task(backend.append("a", 0, entry("a")))
    follower = asyncio.create_task(backend.append("b", 0, entry("b")))
    other = asyncio.create_task(backend.append("c", 0, entry("c")))
    await asyncio.sleep(0)  # all three queued; none committed yet
    follower.cancel()
    await leader
    await other
    with pytest.raises(asyncio.CancelledError):
        await follower
    assert await backend.read_log("b") == []
    assert len(await backend.read_log("a")) == len(await backend.read_log("c")) == 1

    leader = asyncio.create_task(backend.append("d", 0, entry("d")))
    follower = asyncio.create_task(backend.append("e", 0, entry("e")))
    await asyncio.sleep(0)
    leader.cancel()
    await follower
    with pytest.raises(asyncio.CancelledError):
        await leader
    assert await backend.read_log("d") == []
    assert len(await backend.read_log("e")) == 1


async def test_a_held_lock_gives_backend_unavailable_and_nothing_written(db_path: Path) -> None:
    backend = SQLiteBackend(db_path, timeout=0.2)
    await backend.append("r", 0, entry(0))
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        results = await asyncio.gather(
            backend.append("r", 1, entry(1)),
            backend.post_event("r", "e", b"1"),
            return_exceptions=True,
        )
    finally:
        other.execute("ROLLBACK")
        other.close()
    for result in results:
        assert isinstance(result, BackendUnavailable)
        assert "locked" in str(result) and "timeout=" in str(result)
    assert len(await backend.read_log("r")) == 1
    assert await backend.read_inbox("r") == []
    await backend.append("r", 1, entry(1))  # retry as is
    assert len(await backend.read_log("r")) == 2
    await backend.close()


async def test_writers_queue_on_the_writer_lock_and_go_on_without_it_when_it_is_held_too_long(
    db_path: Path,
) -> None:
    """Another process's writer holds ``<db>.lock`` (a second open file stands in for it): a
    write waits for it, and once the lock is given up the write goes through at once; a
    lock held past the timeout no longer stops writes (SQLite's own locks still apply)."""
    import fcntl
    import os

    backend = SQLiteBackend(db_path, timeout=0.3)
    await backend.append("r", 0, entry(0))
    other = os.open(f"{db_path}.lock", os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        waiting = asyncio.ensure_future(asyncio.to_thread(backend._writer.acquire))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # queued behind the holder
        fcntl.flock(other, fcntl.LOCK_UN)
        assert await asyncio.wait_for(waiting, 5) is True
        backend._writer.release()
        fcntl.flock(other, fcntl.LOCK_EX)
        started = time.monotonic()
        await backend.append("r", 1, entry(1))  # held past the timeout: written anyway
        assert time.monotonic() - started >= 0.3
    finally:
        os.close(other)
    assert len(await backend.read_log("r")) == 2
    await backend.close()


def test_a_forked_child_takes_the_writer_lock_as_its_own_process(db_path: Path) -> None:
    """flock belongs to an open file: a child that kept its parent's would share its lock."""
    import os

    from substantial.backends.sqlite._writer_lock import WriterLock

    lock = WriterLock(db_path, timeout=0.2)
    assert lock.acquire()
    pid = os.fork()
    if pid == 0:  # the child: the parent holds the lock, so this must time out
        os._exit(0 if lock.acquire() is False else 1)
    _, status = os.waitpid(pid, 0)
    lock.release()
    lock.close()
    assert os.waitstatus_to_exitcode(status) == 0


async def test_a_path_under_a_file_is_unavailable_with_advice(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    backend = SQLiteBackend(blocker / "store.db")
    with pytest.raises(BackendUnavailable, match="check that its directory exists"):
        await backend.append("r", 0, entry(0))
    with pytest.raises(BackendUnavailable, match="check that its directory exists"):
        await backend.read_log("r")
    await backend.close()


async def test_a_file_that_is_not_a_database_is_unavailable(db_path: Path) -> None:
    db_path.write_bytes(b"this is not a database, but it is long enough to have a header" * 20)
    backend = SQLiteBackend(db_path)
    with pytest.raises(BackendUnavailable, match="not a valid database"):
        await backend.append("r", 0, entry(0))
    await backend.close()


async def test_a_newer_layout_is_refused(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.append("r", 0, entry(0))
    await backend.close()
    with sqlite3.connect(db_path) as db:
        db.execute("PRAGMA user_version = 99")
    db.close()
    newer = SQLiteBackend(db_path)
    with pytest.raises(ProtocolMismatch, match="upgrade substantial"):
        await newer.read_log("r")
    await newer.close()


def test_a_read_only_database_is_unavailable_with_advice() -> None:
    # Root ignores permission bits, so the writer is a child that drops to "nobody".
    base = Path(tempfile.mkdtemp(prefix="substantial-ro-", dir="/tmp"))
    try:
        base.chmod(0o755)
        path = base / "store.db"

        async def prepare() -> None:
            backend = SQLiteBackend(path)
            await backend.append("r", 0, entry(0))
            await backend.close()

        asyncio.run(prepare())
        script = textwrap.dedent(
            f"""
            import asyncio, os
            from substantial.backends.sqlite import SQLiteBackend
            from substantial.errors import BackendUnavailable
            os.setgroups([]); os.setgid(65534); os.setuid(65534)
            async def main():
                backend = SQLiteBackend({str(path)!r})
                try:
                    await backend.append("r", 1, b'[{{"k": "x"}}]')
                    print("written")
                except BackendUnavailable as exc:
                    print(exc)
                await backend.close()
            asyncio.run(main())
            """
        )
        out = subprocess.run(
            [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        assert "written" not in out and "then retry" in out, out
    finally:
        shutil.rmtree(base)


async def test_one_lease_holder_among_processes_opening_a_new_file(db_path: Path) -> None:
    outputs = lease_race(f"sqlite://{db_path}")  # every process also races to create the file
    assert outputs.count("won") == 1, outputs
    backend = SQLiteBackend(db_path)
    lease = await backend.get_lease("hot")
    assert lease is not None and lease.owner == f"p{outputs.index('won')}"
    await backend.close()


async def test_an_event_from_another_process_wakes_the_waiter(db_path: Path) -> None:
    waiter = SQLiteBackend(db_path)
    t0 = time.perf_counter()
    await wake_from_another_process(f"sqlite://{db_path}", waiter)
    assert time.perf_counter() - t0 < 10
    assert len(list(Path(f"{db_path}.wake").iterdir())) == 1
    await waiter.close()
    assert list(Path(f"{db_path}.wake").iterdir()) == []


async def test_writes_after_close_are_refused(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.append("r", 0, entry(0))
    await backend.close()
    with pytest.raises(BackendUnavailable, match="closed"):
        await backend.append("r", 1, entry(1))


async def test_a_new_run_is_one_transaction_and_a_taken_id_writes_nothing(
    backend: SQLiteBackend,
) -> None:
    now = time.time()
    assert await backend.start_run(info("r"), entry("first"), now - 1) is True
    assert len(await backend.read_log("r")) == 1
    assert [r for r, _ in await backend.due(now)] == ["r"]
    other = RunInfo("r", "other", "completed", now, now)
    assert await backend.start_run(other, entry("second"), now + 100) is False
    (stored,) = await backend.read_log("r")
    assert decode_entry("r", 0, stored)[0]["value"] == "first"
    got = await backend.get_run("r")
    assert got is not None and got.workflow == "wf" and got.status == "active"
    assert [r for r, _ in await backend.due(now)] == ["r"]  # its due time unchanged


async def test_a_database_made_before_the_creation_index_gets_it_and_lists_from_it(
    db_path: Path,
) -> None:
    from substantial.backends.sqlite._schema import recent_query

    first = SQLiteBackend(db_path)
    for i in range(5):
        await first.put_run(RunInfo(f"r{i}", "wf", "active", 1000.0 - i, 1000.0))
    await first.close()
    with sqlite3.connect(db_path) as db:  # as a release before the index left it
        db.execute("DROP INDEX runs_by_created")
    again = SQLiteBackend(db_path)
    try:
        assert [r.run_id for r in await again.list_recent(limit=3)] == ["r0", "r1", "r2"]
        db = again._connect()
        for cursor in (False, True):
            sql = recent_query(cursor=cursor, status=True, workflow=True)
            args = [1.0, "x"] * cursor + ["active", "wf", 50]
            (plan,) = db.execute(f"EXPLAIN QUERY PLAN {sql}", args).fetchall()
            # A walk of the creation-time index, bounded by the cursor: never a sort.
            expected = "SEARCH" if cursor else "SCAN"
            assert plan[3] == f"{expected} runs USING INDEX runs_by_created" + (
                " (<expr><?)" if cursor else ""
            )
        sql = recent_query(cursor=True, status=True, workflow=False, via="status")
        plan = db.execute(f"EXPLAIN QUERY PLAN {sql}", [1.0, "x", "active", 50]).fetchall()
        assert [p[3] for p in plan] == [
            "SEARCH runs USING INDEX runs_by_status (status=?)",
            "USE TEMP B-TREE FOR ORDER BY",
        ]
    finally:
        await again.close()


@pytest.mark.parametrize("probe", [0, 2000])
async def test_filters_list_newest_first_by_either_plan(
    backend: SQLiteBackend, monkeypatch: pytest.MonkeyPatch, probe: int
) -> None:
    # 0: every filter counts as common, the walk of the creation index filters as it goes.
    monkeypatch.setattr("substantial.backends.sqlite._backend.PROBE", probe)
    for i in range(12):
        status = "failed" if i % 3 == 0 else "active"
        await backend.put_run(RunInfo(f"r{i:02d}", f"w{i % 2}", status, 1000.0 + i, 1000.0))  # type: ignore[arg-type]
    failed = await backend.list_recent(status="failed", limit=2)
    assert [r.run_id for r in failed] == ["r09", "r06"]
    cursor = (failed[-1].created_at, failed[-1].run_id)
    assert [r.run_id for r in await backend.list_recent(status="failed", before=cursor)] == [
        "r03",
        "r00",
    ]
    both = await backend.list_recent(status="active", workflow="w1", before=(1010.0, ""))
    assert [r.run_id for r in both] == ["r07", "r05", "r01"]


async def test_checkpoints_run_off_the_event_loop_and_stop_with_the_backend(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.append("r", 0, entry(0))
    base = db_path.stat().st_size
    # Below the commits' own checkpoint (BACKSTOP_PAGES): only the thread copies these
    # pages from the log into the database file.
    for i in range(1, 300):
        await backend.append("r", i, entry("x" * 200))
    checkpoints = backend._checkpoints
    deadline = time.monotonic() + 20
    while checkpoints.passes == 0 or db_path.stat().st_size <= base:
        assert time.monotonic() < deadline, "no checkpoint was run after the writes"
        await asyncio.sleep(0.02)
    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000  # its own default
    thread = checkpoints._thread
    assert thread is not None and thread.is_alive()
    await backend.close()
    assert not thread.is_alive()
    # With fsync every commit syncs the log; SQLite checkpoints as by default there.
    synced = SQLiteBackend(db_path.with_name("fsync.db"), durability="fsync")
    await synced.append("r", 0, entry(0))
    assert synced._checkpoints._thread is None
    assert synced._connect().execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 1000
    await synced.close()


async def test_a_backend_dropped_unclosed_ends_its_checkpoint_thread(db_path: Path) -> None:
    backend = SQLiteBackend(db_path)
    await backend.append("r", 0, entry(0))
    thread = backend._checkpoints._thread
    assert thread is not None
    deadline = time.monotonic() + 10
    while not thread.is_alive():  # started a moment after the first commit
        assert time.monotonic() < deadline, "the checkpoint thread never started"
        await asyncio.sleep(0.01)
    del backend
    gc.collect()
    thread.join(10)
    assert not thread.is_alive()
