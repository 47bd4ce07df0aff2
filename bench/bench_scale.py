"""W5: a store holding n waiting runs; one more run, the worker's memory, a listing.

BENCH.md's W5 holds a million (``--n W5=1000000``); ``python -m bench`` uses
100,000 unless told.

1. ``n`` runs are put in the store, each parked a day ahead in the due index
   (waiting on a timer: due times 0.1 s apart from a day ahead, 36,000 an hour), with
   a start entry and metadata like a started run.
   SQLite: written directly in transactions of 50,000 rows with the
   backend's own statements (``APPEND``, ``PUT_RUN``, ``SCHEDULE``), then read
   back through the backend. Other stores: through the backend, as the
   Conductor writes a new run (``store_run``: first entry, then metadata and
   due time), CONCURRENCY runs at a time in one process per core.
2. A worker process serves that store and another an empty store of the same
   kind; ROUNDS runs of 10 steps are started and finished on each, one after
   the other, taking turns. Each run's time is read from its own metadata
   (``updated_at - created_at``: created to ended, free of the client's
   polling). ``slowdown`` = the full store's median over the empty one's;
   target ≤ 1.2. The workers' resident memory is read from /proc; target
   ≤ 100 MB.
3. W5-list: ``runs list`` of the newest 50 (``find_runs``, what ``substantial
   runs list`` and the web UI call; default scan limit), best of 3 (one if it
   takes over a second), in this
   process; and the command itself (``substantial runs list --limit 50
   --json``, a new process: its start-up included). The page must be the 50
   newest runs: a wrong page is an error, not a time. Target < 50 ms.

``python -m bench --workload W5 --backend sqlite,fs --n W5=1000000``; a small
``n`` makes a quick check.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import subprocess
import sys
import time
from typing import Any

import orjson

from bench._harness import ROOT, Sitting, memory_mb, stop, worker_process
from substantial import Conductor
from substantial._runs import store_run
from substantial.backends.base import Backend, RunInfo
from substantial.records import encode_entry, start_record
from substantial.search import RunQuery, find_runs

ROUNDS = 15
SEED_PROCS = max(2, os.cpu_count() or 2)
CONCURRENCY = 200
SQL_CHUNK = 50_000
PARKED = "parked-{:08d}"


async def serve(s: Sitting, client: Conductor, sub: str) -> Any:
    """Start a worker on the store (a process if it is shared); return what stops it."""
    url = s.url(sub)
    if url is None:
        return client.run()
    return worker_process(url)


async def done(worker: Any) -> dict[str, float]:
    """Stop a worker from :func:`serve`; return its memory (processes only)."""
    if hasattr(worker, "pid"):
        memory = memory_mb(worker.pid)
        stop(worker)
        return memory
    worker.cancel()
    await worker
    return {}


async def one_run(client: Conductor) -> tuple[float, str, float]:
    """Start and finish one run of 10 steps; its time from its own metadata, id, creation."""
    from tests.workflows import ten_steps

    run = await client.start(ten_steps)
    result = await run.result(timeout=600)
    if result != [i * i for i in range(10)]:
        raise AssertionError(f"run {run.run_id} returned {result!r}")
    info = await run.status()
    # Created to ended, from the run's own metadata: free of the client's polling.
    return info.updated_at - info.created_at, run.run_id, info.created_at


def _parked(i: int, base: float) -> tuple[RunInfo, bytes, float]:
    run_id = PARKED.format(i)
    at = base + i * 1e-6  # distinct creation times: "the newest 50" is one answer
    info = RunInfo(run_id, "ten_steps", "active", at, at)
    entry = encode_entry([dict(start_record(run_id, "ten_steps", None, {}, at))])
    return info, entry, base + 86_400 + i * 0.1  # 36,000 an hour: over a day for 1M


def _seed_sqlite(path: str, n: int, base: float) -> None:
    from substantial.backends.sqlite import SQLiteBackend
    from substantial.backends.sqlite._schema import APPEND, PUT_RUN, SCHEDULE

    db = sqlite3.connect(path, isolation_level=None, timeout=60)
    try:
        for first in range(0, n, SQL_CHUNK):
            rows = [_parked(i, base) for i in range(first, min(n, first + SQL_CHUNK))]
            db.execute("BEGIN IMMEDIATE")
            db.executemany(APPEND, ((info.run_id, 0, entry) for info, entry, _ in rows))
            db.executemany(PUT_RUN, (SQLiteBackend._run_row(info) for info, _, _ in rows))
            db.executemany(SCHEDULE, ((info.run_id, due) for info, _, due in rows))
            db.execute("COMMIT")
    finally:
        db.close()


async def seed_range(backend: Backend, first: int, last: int, base: float) -> None:
    """Store parked runs ``first`` to ``last - 1`` through the backend, CONCURRENCY at a time."""
    for start in range(first, last, CONCURRENCY):
        batch = [_parked(i, base) for i in range(start, min(last, start + CONCURRENCY))]
        made = await asyncio.gather(*(store_run(backend, *row) for row in batch))
        if not all(made):
            raise AssertionError("a parked run existed already")


async def seed(s: Sitting, backend: Backend, n: int, base: float) -> str:
    """Put ``n`` parked runs in the store; return how."""
    if backend.name == "sqlite":
        await backend.list_runs(limit=1)  # the backend creates its tables on first use
        await asyncio.to_thread(_seed_sqlite, str(backend.path), n, base)  # type: ignore[attr-defined]
        return f"direct SQL, transactions of {SQL_CHUNK:,} rows, the backend's statements"
    url = s.url()
    if url is None or n < 10_000:
        await seed_range(backend, 0, n, base)
        return f"store_run through the backend, {CONCURRENCY} at a time"
    # One process per core, each with its own slice: the Python above the store is the cost.
    step = -(-n // SEED_PROCS)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.bench_scale",
            url,
            str(i),
            str(min(n, i + step)),
            repr(base),
            cwd=ROOT,
        )
        for i in range(0, n, step)
    ]
    codes = [await p.wait() for p in procs]
    if any(codes):
        raise AssertionError(f"a seeding process failed: exit codes {codes}")
    return f"store_run through the backend, {SEED_PROCS} processes, {CONCURRENCY} at a time each"


async def check_seeded(backend: Backend, n: int, base: float) -> None:
    """Read some parked runs back through the backend: a seed the store cannot read is an error."""
    for i in {0, n // 2, n - 1}:
        info = await backend.get_run(PARKED.format(i))
        if info is None or info.status != "active" or info.created_at != base + i * 1e-6:
            raise AssertionError(f"parked run {i} reads back as {info!r}")
        if len(await backend.read_log(PARKED.format(i))) != 1:
            raise AssertionError(f"parked run {i} has no start entry")
    due = await backend.due(time.time(), 10)
    if list(due) or due.next_at is None or due.next_at < base + 86_000:
        raise AssertionError(f"the due index reads {due!r}, not {n} runs a day ahead")


async def listing(s: Sitting, backend: Backend, expected: list[str]) -> dict[str, Any]:
    """Time the newest-50 page in this process and through the command; check it."""
    best = float("inf")
    page = None
    for _ in range(3):
        t0 = time.perf_counter()
        page = await find_runs(backend, RunQuery(limit=50))
        best = min(best, time.perf_counter() - t0)
        if best > 1.0:
            break  # far off the target already: a second reading says nothing more
    assert page is not None
    got = [info.run_id for info in page.runs]
    out: dict[str, Any] = {"list_ms": round(best * 1000, 2), "list_scanned": page.scanned}
    out["list_right"] = got == expected
    url = s.url()
    if url is not None:
        cli_ids = cli_list(url, out)
        out["cli_list_right"] = cli_ids == expected
    return out


def cli_list(url: str, out: dict[str, Any]) -> list[str]:
    """Time ``substantial runs list --limit 50`` in a new process, and Python's start-up alone.

    Puts ``cli_list_ms`` and ``cli_startup_ms`` in ``out``; returns the ids listed.
    """
    cmd = [sys.executable, "-m", "substantial.cli", "runs", "list", "--backend", url]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, "--limit", "50", "--json"], capture_output=True, cwd=ROOT)
    out["cli_list_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import substantial.cli"], check=True, cwd=ROOT)
    out["cli_startup_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return [r["run_id"] for r in orjson.loads(proc.stdout)] if proc.returncode == 0 else []


async def w5(s: Sitting) -> dict[str, Any]:
    from tests.workflows import ten_steps

    empty, full = Conductor(s.open("empty")), Conductor(s.open())
    workers: dict[str, Any] = {}
    try:
        for c in (empty, full):
            c.register(ten_steps)
        base = time.time()
        t0 = time.perf_counter()
        how = await seed(s, full.backend, s.n, base)
        seed_s = time.perf_counter() - t0
        await check_seeded(full.backend, s.n, base)
        workers = {"empty": await serve(s, empty, "empty"), "full": await serve(s, full, "")}
        times: dict[str, list[float]] = {"empty": [], "full": []}
        created = {PARKED.format(i): base + i * 1e-6 for i in range(max(0, s.n - 60), s.n)}
        # Runs on the two stores take turns: a load that comes and goes weighs on both alike.
        for i in range(ROUNDS):
            for label in ("empty", "full") if i % 2 else ("full", "empty"):
                seconds, run_id, at = await one_run(empty if label == "empty" else full)
                times[label].append(seconds)
                if label == "full":
                    created[run_id] = at
        memory = {label: await done(w) for label, w in workers.items()}
        workers = {}
        expected = sorted(created, key=lambda r: created[r], reverse=True)[:50]
        listed = await listing(s, full.backend, expected)
    finally:
        for w in workers.values():
            await done(w)
        await empty.close()
        await full.close()
    e, f = statistics.median(times["empty"]), statistics.median(times["full"])
    slowdown = f / e
    rss = memory["full"].get("rss_mb")
    right = listed.pop("list_right") and listed.get("cli_list_right") is not False
    list_line: dict[str, Any] = {
        "workload": "W5-list",
        "seconds": listed["list_ms"] / 1000,
        "per_op_ms": listed.pop("list_ms"),
        "ratio": None,
        **listed,
        "ok": right,
        "note": "runs list of the newest 50 (find_runs, default scan limit), best of 3; "
        "cli_list_ms: the command, its start-up (cli_startup_ms) included",
    }
    if not right:
        # A wrong page is a wrong result: no time for it.
        for key in ("cli_list_ms", "cli_startup_ms"):
            list_line.pop(key, None)
        list_line["error"] = (
            f"runs list did not return the 50 newest runs: it read {listed['list_scanned']} "
            f"of {s.n + 2 * ROUNDS} runs"
        )
    return {
        "seconds": round(f, 5),
        "per_op_ms": round(f * 1000, 3),
        "empty_ms": round(e * 1000, 3),
        "best_ms": round(min(times["full"]) * 1000, 3),
        "empty_best_ms": round(min(times["empty"]) * 1000, 3),
        "slowdown": round(slowdown, 3),
        "worker_rss_mb": rss,
        "worker_peak_rss_mb": memory["full"].get("peak_rss_mb"),
        "worker_rss_empty_mb": memory["empty"].get("rss_mb"),
        "ratio": round(f * 1000 / (s.floor_ms * 16), 3),
        "seed_s": round(seed_s, 2),
        "seed_runs_per_s": round(s.n / seed_s, 1) if seed_s else None,
        "seed": how,
        "targets_met": {
            "slowdown<=1.2": slowdown <= 1.2,
            "rss<=100MB": rss is not None and rss <= 100,
            "list<50ms": right and list_line["per_op_ms"] < 50,
        },
        "ok": True,
        "note": f"per_op_ms: median of {ROUNDS} runs of 10 steps, created to ended, beside n "
        f"parked runs, taking turns with {ROUNDS} on an empty store (empty_ms); ratio against "
        "16 floor writes",
        "lines": [list_line],
    }


if __name__ == "__main__":
    # A seeding process: python -m bench.bench_scale URL FIRST LAST BASE
    from substantial.backends import from_url

    async def _seed_main(url: str, first: int, last: int, base: float) -> None:
        backend = from_url(url)
        try:
            await seed_range(backend, first, last, base)
        finally:
            await backend.close()

    asyncio.run(_seed_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])))
