"""Micro-benchmark of backend primitives, each beside the raw cost of its storage.

Run ``python -m bench.bench_backends [--n 2000] [--backend fs,sqlite,memory]
[--durability process|fsync] [--repeat 3]``. Prints one JSON line per
measurement::

    {"workload": "append", "backend": "fs", "n": 2000, "seconds": ...,
     "per_op_ms": ..., "floor_ms": ..., "ratio": ..., "ok": true, ...}

Workloads, per record:

* ``append``: one run, positions 0..n-1, one awaited append after another
  (the shape of a workflow's steps).
* ``append_concurrent``: 50 runs appended at once by 50 tasks (group commit
  shows here).
* ``read``: ``read_log`` of the n-entry run.

The floor is the same work done on the raw store in the same process and
run: one O_EXCL file create + write (fs), one autocommit INSERT in WAL mode
(sqlite), a dict insert (memory); reads: open + read of one file, one row of
a SELECT, a list item. ``ratio`` = per_op_ms / floor_ms is our overhead. The
machine is shared and noisy, so each round measures the floor right beside
the workload, and the figures are medians over ``--repeat`` rounds: ``ratio``
is the median of the per-round ratios, ``ratio_range`` their extremes.

A new backend joins with one entry in ``TARGETS``: how to open it on a fresh
store, and its floor functions.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import os
import shutil
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bench_redis import open_redis, redis_append_floor, redis_read_floor
from bench.bench_s3 import open_s3, s3_append_floor, s3_read_floor
from substantial.backends.base import Backend
from substantial.records import decode_entry, encode_entry

CONCURRENT_RUNS = 50


def make_entry(i: int) -> bytes:
    """Return a typical one-step log entry (about 60 bytes)."""
    return encode_entry([{"k": "step", "name": "charge", "value": {"n": i, "ok": True}}])


# -- floors: (work dir, n, durability) -> seconds for n raw operations ----------------

Floor = Callable[[Path, int, str], float]


def fs_append_floor(work: Path, n: int, durability: str) -> float:
    d = work / "floor-fs"
    d.mkdir()
    data = make_entry(0)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    sync = durability == "fsync"
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(f"{d}/{i:012d}", flags, 0o444)
        os.write(fd, data)
        if sync:
            os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


def fs_read_floor(work: Path, n: int, durability: str) -> float:
    d = work / "floor-fs"
    if not d.exists():
        fs_append_floor(work, n, "process")
    t0 = time.perf_counter()
    for i in range(n):
        fd = os.open(f"{d}/{i:012d}", os.O_RDONLY)
        os.read(fd, 4096)
        os.close(fd)
    return time.perf_counter() - t0


def _floor_db(work: Path, durability: str) -> sqlite3.Connection:
    db = sqlite3.connect(work / "floor.db", isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {'FULL' if durability == 'fsync' else 'NORMAL'}")
    db.execute(
        "CREATE TABLE IF NOT EXISTS t (run_id TEXT, position INTEGER, entry BLOB, "
        "PRIMARY KEY (run_id, position)) WITHOUT ROWID"
    )
    return db


def sqlite_append_floor(work: Path, n: int, durability: str) -> float:
    db = _floor_db(work, durability)
    data = make_entry(0)
    t0 = time.perf_counter()
    for i in range(n):
        db.execute("INSERT INTO t VALUES (?, ?, ?)", ("r", i, data))
    elapsed = time.perf_counter() - t0
    db.close()
    return elapsed


def sqlite_read_floor(work: Path, n: int, durability: str) -> float:
    db = _floor_db(work, durability)
    if db.execute("SELECT count(*) FROM t").fetchone()[0] < n:
        db.execute("DELETE FROM t")
        db.executemany("INSERT INTO t VALUES ('r', ?, ?)", ((i, make_entry(i)) for i in range(n)))
    t0 = time.perf_counter()
    db.execute("SELECT entry FROM t WHERE run_id = 'r' ORDER BY position").fetchall()
    elapsed = time.perf_counter() - t0
    db.close()
    return elapsed


def memory_append_floor(work: Path, n: int, durability: str) -> float:
    store: dict[tuple[str, int], bytes] = {}
    data = make_entry(0)
    t0 = time.perf_counter()
    for i in range(n):
        store["r", i] = data
    return time.perf_counter() - t0


def memory_read_floor(work: Path, n: int, durability: str) -> float:
    log = [make_entry(i) for i in range(n)]
    t0 = time.perf_counter()
    list(log[0:])
    return time.perf_counter() - t0


# -- targets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """How to benchmark one backend: open it on a fresh store, and its floors."""

    open: Callable[[Path, str], Backend]
    floors: dict[str, Floor]


def _open_memory(work: Path, durability: str) -> Backend:
    from substantial.backends.memory import MemoryBackend

    return MemoryBackend()


def _open_fs(work: Path, durability: str) -> Backend:
    from substantial.backends.fs import FSBackend

    return FSBackend(work / "store", durability=durability)  # type: ignore[arg-type]


def _open_sqlite(work: Path, durability: str) -> Backend:
    from substantial.backends.sqlite import SQLiteBackend

    return SQLiteBackend(work / "store.db", durability=durability)  # type: ignore[arg-type]


# -- postgres: a private server, started on first use -----------------------------------

_pg_server: Any = None


def _pg_url() -> str:
    global _pg_server
    if _pg_server is None:
        from tests.postgres_server import PostgresServer

        _pg_server = PostgresServer()
        _pg_server.start()
        atexit.register(_pg_server.destroy)
    return str(_pg_server.url())


def postgres_url(work: Path) -> str:
    """Return the URL of the store of ``work`` on the bench server (one prefix per ``work``)."""
    digest = hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:16]
    return f"{_pg_url()}?prefix=b{digest}"


def _open_postgres(work: Path, durability: str) -> Backend:
    from substantial.backends.postgres import PostgresBackend

    return PostgresBackend.from_url(postgres_url(work))


def _in_thread(fn: Callable[[], Awaitable[float]]) -> float:
    # Floors are called from inside a running loop: give them a loop of their own.
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(fn())))  # type: ignore[arg-type]
    thread.start()
    thread.join()
    return out[0]


async def _pg_inserts(n: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(_pg_url())
    table = f"floor_{os.urandom(6).hex()}"
    try:
        await conn.execute(f"CREATE TABLE {table} (k bigint PRIMARY KEY, v bytea NOT NULL)")
        data = make_entry(0)
        t0 = time.perf_counter()
        for i in range(n):
            await conn.execute(
                f"INSERT INTO {table} VALUES ($1, $2) ON CONFLICT DO NOTHING", i, data
            )
        return time.perf_counter() - t0
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


async def _pg_select(n: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(_pg_url())
    table = f"floor_{os.urandom(6).hex()}"
    try:
        await conn.execute(f"CREATE TABLE {table} (k bigint PRIMARY KEY, v bytea NOT NULL)")
        rows = [(i, make_entry(i)) for i in range(n)]
        await conn.executemany(f"INSERT INTO {table} VALUES ($1, $2)", rows)
        t0 = time.perf_counter()
        await conn.fetch(f"SELECT k, v FROM {table} ORDER BY k")
        return time.perf_counter() - t0
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()


def postgres_append_floor(work: Path, n: int, durability: str) -> float:
    """Return seconds for n sequential INSERT round trips (the append floor)."""
    return _in_thread(lambda: _pg_inserts(n))


def postgres_read_floor(work: Path, n: int, durability: str) -> float:
    """Return seconds for one SELECT of n rows in key order (the read floor)."""
    return _in_thread(lambda: _pg_select(n))


_APPEND_AND_READ = ("append", "append_concurrent", "read")

TARGETS: dict[str, Target] = {
    "memory": Target(
        _open_memory,
        {"append": memory_append_floor, "read": memory_read_floor},
    ),
    "fs": Target(_open_fs, {"append": fs_append_floor, "read": fs_read_floor}),
    "sqlite": Target(_open_sqlite, {"append": sqlite_append_floor, "read": sqlite_read_floor}),
    # A private SeaweedFS, started on first use; the floor is one conditional PUT round trip.
    "s3": Target(open_s3, {"append": s3_append_floor, "read": s3_read_floor}),
    # A private redis-server, started on first use; the floor is one SET round trip.
    "redis": Target(open_redis, {"append": redis_append_floor, "read": redis_read_floor}),
    # A private PostgreSQL, started on first use; the floor is one INSERT round trip.
    "postgres": Target(
        _open_postgres, {"append": postgres_append_floor, "read": postgres_read_floor}
    ),
}

# -- workloads: (backend, n) -> (seconds, ok) -------------------------------------------


async def append_workload(backend: Backend, n: int) -> tuple[float, bool]:
    entries = [make_entry(i) for i in range(n)]
    t0 = time.perf_counter()
    for i, entry in enumerate(entries):
        await backend.append("bench", i, entry)
    elapsed = time.perf_counter() - t0
    return elapsed, len(await backend.read_log("bench")) == n


async def append_concurrent_workload(backend: Backend, n: int) -> tuple[float, bool]:
    per_run = max(1, n // CONCURRENT_RUNS)
    entries = [make_entry(i) for i in range(per_run)]

    async def one_run(run: int) -> None:
        for i, entry in enumerate(entries):
            await backend.append(f"bench-c{run}", i, entry)

    t0 = time.perf_counter()
    await asyncio.gather(*(one_run(r) for r in range(CONCURRENT_RUNS)))
    elapsed = time.perf_counter() - t0
    # Report per record: scale to n records.
    elapsed *= n / (per_run * CONCURRENT_RUNS)
    lengths = [len(await backend.read_log(f"bench-c{r}")) for r in range(CONCURRENT_RUNS)]
    ok = lengths == [per_run] * CONCURRENT_RUNS
    return elapsed, ok


async def read_workload(backend: Backend, n: int) -> tuple[float, bool]:
    if len(await backend.read_log("bench")) < n:
        for i in range(n):
            await backend.append("bench", i, make_entry(i))
    t0 = time.perf_counter()
    log = await backend.read_log("bench")
    elapsed = time.perf_counter() - t0
    ok = len(log) == n and decode_entry("bench", n - 1, log[-1])[0]["value"]["n"] == n - 1
    return elapsed, ok


WORKLOADS: dict[str, tuple[Callable[[Backend, int], Awaitable[tuple[float, bool]]], str]] = {
    # workload -> (function, which floor it is compared with)
    "append": (append_workload, "append"),
    "append_concurrent": (append_concurrent_workload, "append"),
    "read": (read_workload, "read"),
}


async def measure(
    name: str, target: Target, workload: str, n: int, args: argparse.Namespace
) -> dict[str, object]:
    fn, floor_name = WORKLOADS[workload]
    floor_fn = target.floors[floor_name]
    times: list[float] = []
    floors: list[float] = []
    ok = True
    for round_ in range(args.repeat):
        work = Path(tempfile.mkdtemp(prefix="substantial-bench-", dir=args.dir))
        try:
            # Alternate which goes first, so drift in a noisy machine hits both alike.
            if round_ % 2:
                floors.append(floor_fn(work, n, args.durability))
            backend = target.open(work, args.durability)
            try:
                seconds, round_ok = await fn(backend, n)
            finally:
                await backend.close()
            if not round_ % 2:
                floors.append(floor_fn(work, n, args.durability))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ok = ok and round_ok
        times.append(seconds)
    seconds = statistics.median(times)
    floor = statistics.median(floors)
    ratios = sorted(t / f for t, f in zip(times, floors, strict=True) if f > 0)
    return {
        "workload": workload,
        "backend": name,
        "n": n,
        "seconds": round(seconds, 6),
        "per_op_ms": round(seconds / n * 1000, 5),
        "floor_ms": round(floor / n * 1000, 5),
        "ratio": round(statistics.median(ratios), 2) if ratios else None,
        "ratio_range": [round(ratios[0], 2), round(ratios[-1], 2)] if ratios else None,
        "ok": ok,
        "durability": args.durability,
        "repeat": args.repeat,
    }


async def main_async(args: argparse.Namespace) -> None:
    for name in args.backend.split(","):
        if name not in TARGETS:
            raise SystemExit(f"unknown backend {name!r}: choose from {', '.join(TARGETS)}")
        for workload in args.workload.split(","):
            result = await measure(name, TARGETS[name], workload, args.n, args)
            print(json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="records per measurement")
    parser.add_argument("--backend", default="memory,fs,sqlite")
    parser.add_argument("--workload", default=",".join(WORKLOADS))
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    parser.add_argument("--repeat", type=int, default=5, help="rounds; medians are reported")
    parser.add_argument("--dir", default=None, help="where to create stores (default: temp dir)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
