"""Micro-benchmark of backend primitives, each beside the raw cost of its storage.

Workloads of ``python -m bench`` (``python -m bench.bench_backends [--n 2000]
[--backend fs,sqlite,memory] [--durability process|fsync] [--repeat 5]``
preselects them). One JSON line per measurement::

    {"workload": "append", "backend": "fs", "n": 2000, "seconds": ...,
     "per_op_ms": ..., "floor_ms": ..., "ratio": ..., "ok": true, ...}

Workloads, per record:

* ``append``: one run, positions 0..n-1, one awaited append after another
  (the shape of a workflow's steps).
* ``append_concurrent``: 50 runs appended at once by 50 tasks (group commit
  shows here).
* ``read``: ``read_log`` of the n-entry run.

The floor is the same work done on the raw store in the same process and
round: one write() to a file kept open in append mode (fs), one autocommit INSERT in WAL mode
(sqlite), a dict insert (memory); reads: a record of one file read whole, one row of
a SELECT, a list item. ``ratio`` = per_op_ms / floor_ms is our overhead. The
machine is shared and noisy, so each round measures the floor right beside
the workload, and the figures are medians over ``--repeat`` rounds: ``ratio``
is the median of the per-round ratios, ``ratio_range`` their extremes.

A new backend joins with one entry in ``TARGETS``: the URL of a fresh
store, and its floor functions.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import importlib
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from substantial.backends.base import Backend
from substantial.records import encode_entry

CONCURRENT_RUNS = 50


def make_entry(i: int) -> bytes:
    """Return a typical one-step log entry (about 60 bytes)."""
    return encode_entry([{"k": "step", "name": "charge", "value": {"n": i, "ok": True}}])


# -- floors: (work dir, n, durability) -> seconds for n raw operations ----------------

Floor = Callable[[Path, int, str], float]


def fs_append_floor(work: Path, n: int, durability: str) -> float:
    # The cheapest durable record a directory allows: one write() to a file kept open in
    # append mode (a log's segment file), and an fdatasync in fsync mode.
    d = work / "floor-fs"
    d.mkdir()
    data = make_entry(0)
    sync = durability == "fsync"
    fd = os.open(d / "floor.seg", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, data)
            if sync:
                os.fdatasync(fd)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def fs_read_floor(work: Path, n: int, durability: str) -> float:
    # One read of the whole file, cut into its n records.
    path = work / "floor-fs" / "floor.seg"
    if not path.exists():
        fs_append_floor(work, n, "process")
    size = len(make_entry(0))
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        data = f.read()
    records = [data[i : i + size] for i in range(0, size * n, size)]
    assert len(records) == n
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
    """How to benchmark one backend: the URL of a fresh store, and its floors."""

    #: (work dir, durability) -> the store's URL, the same for the same ``work`` (so a
    #: worker process opens the same store); None: the store lives in this process only.
    url: Callable[[Path, str], str | None]
    floors: dict[str, Floor]

    def open(self, work: Path, durability: str) -> Backend:
        """Open the store of ``work`` (one store per work dir, whoever opens it)."""
        url = self.url(work, durability)
        if url is None:
            from substantial.backends.memory import MemoryBackend

            return MemoryBackend()
        from substantial.backends import from_url

        return from_url(url)


def _local(template: str) -> Callable[[Path, str], str]:
    def url(work: Path, durability: str) -> str:
        query = "?durability=fsync" if durability == "fsync" else ""
        return template.format(work=work.resolve()) + query

    return url


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


def postgres_url(work: Path, durability: str = "process") -> str:
    """Return the URL of the store of ``work`` on the bench server (one prefix per ``work``)."""
    digest = hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:16]
    return f"{_pg_url()}?prefix=b{digest}"


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


def _lazy(module: str, name: str) -> Any:
    # The Redis and S3 helpers import their drivers: only when that store is benchmarked.
    def call(*args: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args)

    return call


_APPEND_AND_READ = ("append", "append_concurrent", "read")

TARGETS: dict[str, Target] = {
    "memory": Target(
        lambda work, durability: None,
        {"append": memory_append_floor, "read": memory_read_floor},
    ),
    "fs": Target(_local("file://{work}/store"), {"append": fs_append_floor, "read": fs_read_floor}),
    "sqlite": Target(
        _local("sqlite://{work}/store.db"),
        {"append": sqlite_append_floor, "read": sqlite_read_floor},
    ),
    # A private SeaweedFS, started on first use; the floor is one conditional PUT round trip.
    "s3": Target(
        _lazy("bench.bench_s3", "s3_store_url"),
        {
            "append": _lazy("bench.bench_s3", "s3_append_floor"),
            "read": _lazy("bench.bench_s3", "s3_read_floor"),
        },
    ),
    # A private redis-server, started on first use; the floor is one SET round trip.
    "redis": Target(
        _lazy("bench.bench_redis", "redis_store_url"),
        {
            "append": _lazy("bench.bench_redis", "redis_append_floor"),
            "read": _lazy("bench.bench_redis", "redis_read_floor"),
        },
    ),
    # A private PostgreSQL, started on first use; the floor is one INSERT round trip.
    "postgres": Target(
        postgres_url, {"append": postgres_append_floor, "read": postgres_read_floor}
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
    ok = len(log) == n and bytes(log[-1]) == make_entry(n - 1)
    return elapsed, ok


WORKLOADS: dict[str, tuple[Callable[[Backend, int], Awaitable[tuple[float, bool]]], str]] = {
    # workload -> (function, which floor it is compared with)
    "append": (append_workload, "append"),
    "append_concurrent": (append_concurrent_workload, "append"),
    "read": (read_workload, "read"),
}


def primitive(workload: str) -> Callable[[Any], Awaitable[dict[str, Any]]]:
    """Return ``workload`` as a workload of ``python -m bench``, beside its own floor."""
    fn, floor_name = WORKLOADS[workload]

    async def run(s: Any) -> dict[str, Any]:
        floor_fn = s.target.floors[floor_name]
        (s.work / "floor").mkdir()
        floor = floor_fn(s.work / "floor", s.n, s.durability)
        backend = s.open("primitive")
        try:
            seconds, ok = await fn(backend, s.n)
        finally:
            if s.url("primitive") is not None:
                await backend.close()
        per = seconds / s.n * 1000
        floor_ms = floor / s.n * 1000
        return {
            "seconds": round(seconds, 6),
            "per_op_ms": round(per, 6),
            "floor_ms": round(floor_ms, 6),
            "ratio": round(per / floor_ms, 3) if floor_ms > 0 else None,
            "ok": ok,
            "note": f"per record, against the {floor_name} floor measured beside it",
        }

    return run


def main() -> None:
    """Run the primitives through ``python -m bench`` (same options, these defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="memory,fs,sqlite")
    parser.add_argument("--workload", default=",".join(WORKLOADS))
    parser.add_argument("--n", default="2000", help="records per measurement")
    parser.add_argument("--repeat", default="5", help="rounds; medians are reported")
    args, rest = parser.parse_known_args()
    from bench.__main__ import main as bench_main

    argv = ["--backend", args.backend, "--workload", args.workload, "--n", args.n]
    bench_main([*argv, "--repeat", args.repeat, *rest])


if __name__ == "__main__":
    main()
