"""W5: a store holding n (1,000,000) waiting runs; one more run, the worker's memory, a listing.

1. On the empty store, a worker process starts and finishes ROUNDS runs of 10
   steps, one after the other; each run's time is read from its own metadata
   (``updated_at - created_at``: created to ended, free of the client's
   polling). The worker's resident memory is read from /proc.
2. ``n`` runs are put in the store, each parked a day ahead in the due index
   (waiting on a timer), with a start entry and metadata like a started run.
   SQLite: written directly in transactions of 50,000 rows with the
   backend's own statements (``APPEND``, ``PUT_RUN``, ``SCHEDULE``), then read
   back through the backend. Other stores: through the backend, as the
   Conductor writes a new run (``store_run``: first entry, then metadata and
   due time), CONCURRENCY runs at a time, so batching backends batch them.
3. The same as 1 with a fresh worker process: ``slowdown`` = 3's median run
   over 1's; target ≤ 1.2, worker RSS ≤ 100 MB.
4. ``runs list`` of the newest 50 (``find_runs``, what ``substantial runs
   list`` and the web UI call; default scan limit), best of 3, in this
   process; and the command itself (``substantial runs list --limit 50
   --json``, a new process: its start-up included). The page must be the 50
   newest runs: a wrong page is an error, not a time.

``python -m bench --workload W5 --backend sqlite,fs --n W5=1000000``; a small
``n`` makes a quick check.
"""

from __future__ import annotations

import asyncio
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

ROUNDS = 7
CONCURRENCY = 200
SQL_CHUNK = 50_000
PARKED = "parked-{:08d}"


async def one_more(s: Sitting, client: Conductor) -> dict[str, Any]:
    """Start and finish ROUNDS runs of 10 steps with a fresh worker; their times and its memory."""
    from tests.workflows import ten_steps

    url = s.url()
    proc = worker_process(url) if url is not None else None
    agent = client.run() if proc is None else None
    times: list[float] = []
    created: dict[str, float] = {}
    try:
        for _ in range(ROUNDS):
            run = await client.start(ten_steps)
            result = await run.result(timeout=600)
            if result != [i * i for i in range(10)]:
                raise AssertionError(f"run {run.run_id} returned {result!r}")
            info = await run.status()
            times.append(info.updated_at - info.created_at)
            created[run.run_id] = info.created_at
        memory = memory_mb(proc.pid) if proc is not None else {}
    finally:
        if proc is not None:
            stop(proc)
        if agent is not None:
            agent.cancel()
            await agent
    return {"median": statistics.median(times), "best": min(times), **memory, "created": created}


def _parked(i: int, base: float) -> tuple[RunInfo, bytes, float]:
    run_id = PARKED.format(i)
    at = base + i * 1e-6  # distinct creation times: "the newest 50" is one answer
    info = RunInfo(run_id, "ten_steps", "active", at, at)
    entry = encode_entry([dict(start_record(run_id, "ten_steps", None, {}, at))])
    return info, entry, base + 86_400 + i * 1e-3


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


async def seed(backend: Backend, n: int, base: float) -> str:
    """Put ``n`` parked runs in the store; return how."""
    if backend.name == "sqlite":
        await asyncio.to_thread(_seed_sqlite, str(backend.path), n, base)  # type: ignore[attr-defined]
        return f"direct SQL, transactions of {SQL_CHUNK} rows, the backend's statements"
    for first in range(0, n, CONCURRENCY):
        batch = [_parked(i, base) for i in range(first, min(n, first + CONCURRENCY))]
        made = await asyncio.gather(*(store_run(backend, *row) for row in batch))
        if not all(made):
            raise AssertionError("a parked run existed already")
    return f"store_run through the backend, {CONCURRENCY} at a time"


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
    assert page is not None
    got = [info.run_id for info in page.runs]
    out: dict[str, Any] = {"list_ms": round(best * 1000, 2), "list_scanned": page.scanned}
    out["list_right"] = got == expected
    url = s.url()
    if url is not None:
        cmd = [sys.executable, "-m", "substantial.cli", "runs", "list", "--backend", url]
        t0 = time.perf_counter()
        proc = subprocess.run([*cmd, "--limit", "50", "--json"], capture_output=True, cwd=ROOT)
        out["cli_list_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import substantial.cli"], check=True, cwd=ROOT)
        out["cli_startup_ms"] = round((time.perf_counter() - t0) * 1000, 1)
        cli_ids = [r["run_id"] for r in orjson.loads(proc.stdout)] if proc.returncode == 0 else []
        out["cli_list_right"] = cli_ids == expected
    return out


async def w5(s: Sitting) -> dict[str, Any]:
    from tests.workflows import ten_steps

    client = Conductor(s.open())
    client.register(ten_steps)
    try:
        empty = await one_more(s, client)
        base = time.time()
        t0 = time.perf_counter()
        how = await seed(client.backend, s.n, base)
        seed_s = time.perf_counter() - t0
        await check_seeded(client.backend, s.n, base)
        full = await one_more(s, client)
        created = {**empty["created"], **full["created"]}
        created.update((PARKED.format(i), base + i * 1e-6) for i in range(max(0, s.n - 60), s.n))
        expected = sorted(created, key=lambda r: created[r], reverse=True)[:50]
        listed = await listing(s, client.backend, expected)
    finally:
        await client.close()
    slowdown = full["median"] / empty["median"]
    rss = full.get("rss_mb")
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
        list_line["error"] = (
            f"runs list did not return the 50 newest runs: it read {listed['list_scanned']} "
            f"of {s.n + 2 * ROUNDS} runs"
        )
    return {
        "seconds": round(full["median"], 5),
        "per_op_ms": round(full["median"] * 1000, 3),
        "empty_ms": round(empty["median"] * 1000, 3),
        "best_ms": round(full["best"] * 1000, 3),
        "empty_best_ms": round(empty["best"] * 1000, 3),
        "slowdown": round(slowdown, 3),
        "worker_rss_mb": rss,
        "worker_peak_rss_mb": full.get("peak_rss_mb"),
        "worker_rss_empty_mb": empty.get("rss_mb"),
        "ratio": round(full["median"] * 1000 / (s.floor_ms * 16), 3),
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
        "parked runs; ratio against 16 floor writes",
        "lines": [list_line],
    }
