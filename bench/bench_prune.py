"""Retention: does a store's size come back after pruning? (workload PR)

``python -m bench.bench_prune [--backend fs,sqlite,s3] [--runs 1000] [--steps 5]``
prints one JSON line per store (S3: the requests a prune sends per run,
on a private SeaweedFS server, instead of bytes on disk). A worker runs ``--runs`` workflows of
``--steps`` steps to completion on a fresh store; the store's bytes on disk
are measured empty, full, after ``conductor.prune(older_than=0)``, after the
same runs are stored again and pruned again, and (SQLite) after a
``VACUUM``. Bytes are the blocks the files occupy (``st_blocks``), plus for
SQLite the page counts; "empty" is the store after one run was stored and
pruned (its directories and tables exist). ``ok`` means every run was
deleted and the store came back: fs to its empty size but for the blocks
its directories grew to (under 1% of the full size, and no more after a
second cycle), SQLite to its full size at most when refilled
(deleted pages are reused: the file does not grow) and, after VACUUM, to
its empty size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from substantial import Conductor, Context, workflow
from substantial.backends import from_url


@workflow()
async def steps(c: Context, n: int = 5) -> int:
    for i in range(n):
        await c.save(lambda i=i: {"i": i, "payload": "x" * 64})
    return n


def disk_bytes(path: Path) -> int:
    """Return the bytes the files under ``path`` (or the file, with its -wal/-shm) occupy."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    if path.is_file():
        files += [Path(f"{path}{s}") for s in ("-wal", "-shm") if Path(f"{path}{s}").exists()]
    dirs = [p for p in path.rglob("*") if p.is_dir()] if path.is_dir() else []
    return sum(os.stat(p).st_blocks * 512 for p in [*files, *dirs])


def pages(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        count = con.execute("PRAGMA page_count").fetchone()[0]
        free = con.execute("PRAGMA freelist_count").fetchone()[0]
        size = con.execute("PRAGMA page_size").fetchone()[0]
    finally:
        con.close()
    return {"pages": count, "free_pages": free, "page_size": size}


async def fill(url: str, runs: int, n: int) -> float:
    conductor = Conductor(from_url(url))
    conductor.register(steps)
    agent = conductor.run()
    t0 = time.perf_counter()
    started = [await conductor.start(steps, {"n": n}) for _ in range(runs)]
    await asyncio.gather(*(r.result(timeout=1800) for r in started))
    seconds = time.perf_counter() - t0
    agent.cancel()
    await agent
    await conductor.close()
    return seconds


async def prune(url: str) -> tuple[int, int, float]:
    conductor = Conductor(from_url(url))
    t0 = time.perf_counter()
    report = await conductor.prune(older_than=0)
    seconds = time.perf_counter() - t0
    left = len(await conductor.list(limit=10))
    await conductor.close()
    assert left == 0, f"{left} run(s) left after prune"
    return report.count, report.bytes, seconds


def measure(kind: str, where: Path) -> dict[str, Any]:
    path = where / ("store" if kind == "fs" else "runs.db")
    out: dict[str, Any] = {"bytes": disk_bytes(path)}
    if kind == "sqlite":
        out.update(pages(path))
        out["bytes"] = disk_bytes(path)  # after the checkpoint emptied the WAL
    return out


async def one(kind: str, runs: int, n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-prune-") as tmp:
        where = Path(tmp)
        url = f"file://{where / 'store'}" if kind == "fs" else f"sqlite:///{where / 'runs.db'}"
        # One run stored and pruned: the store's own layout (directories, tables) is there.
        await fill(url, 1, n)
        await prune(url)
        empty = measure(kind, where)
        fill_s = await fill(url, runs, n)
        full = measure(kind, where)
        deleted, log_bytes, prune_s = await prune(url)
        pruned = measure(kind, where)
        await fill(url, runs, n)
        refilled = measure(kind, where)
        await prune(url)
        pruned_again = measure(kind, where)
        line: dict[str, Any] = {
            "workload": "PR",
            "backend": kind,
            "durability": "process",
            "n": runs,
            "steps": n,
            "seconds": round(prune_s, 4),
            "per_op_ms": round(prune_s / runs * 1000, 4),
            "runs_per_s": round(runs / prune_s, 1),
            "fill_runs_per_s": round(runs / fill_s, 1),
            "deleted": deleted,
            "log_and_meta_bytes": log_bytes,
            "empty": empty,
            "full": full,
            "pruned": pruned,
            "refilled": refilled,
            "pruned_again": pruned_again,
        }
        if kind == "sqlite":
            con = sqlite3.connect(where / "runs.db")
            con.execute("VACUUM")
            con.close()
            line["vacuumed"] = measure(kind, where)
            line["ok"] = (
                deleted == runs
                and refilled["pages"] <= full["pages"] * 1.05
                and line["vacuumed"]["pages"] <= empty["pages"]
            )
        else:
            # Directories keep the blocks they grew to (ext4 never shrinks one): a residue
            # that the next runs reuse, so a second cycle must leave no more.
            line["ok"] = (
                deleted == runs
                and pruned["bytes"] - empty["bytes"] <= 0.01 * full["bytes"]
                and pruned_again["bytes"] <= pruned["bytes"]
            )
        return line


async def s3_requests(runs: int, n: int) -> dict[str, Any]:
    """S3 has no disk to measure: count the requests a prune sends per run, by operation."""
    from collections import Counter

    from bench.bench_s3 import server_url
    from substantial.backends.s3 import S3Backend

    url = server_url(f"prune-{os.getpid()}-{time.time_ns()}")
    await fill(url, runs, n)
    backend = S3Backend.from_url(url)
    conductor = Conductor(backend)
    before = Counter(backend.requests)
    t0 = time.perf_counter()
    report = await conductor.prune(older_than=0)
    seconds = time.perf_counter() - t0
    sent = Counter(backend.requests) - before
    left = len(await conductor.list(limit=10))
    await conductor.close()
    per_run = {op: round(count / max(report.count, 1), 2) for op, count in sorted(sent.items())}
    return {
        "workload": "PR",
        "backend": "s3",
        "n": runs,
        "steps": n,
        "seconds": round(seconds, 4),
        "runs_per_s": round(runs / seconds, 1),
        "deleted": report.count,
        "requests_per_run": per_run,
        "requests_per_run_total": round(sum(sent.values()) / max(report.count, 1), 2),
        "ok": report.count == runs and left == 0,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--backend", default="fs,sqlite", help="Comma-separated: fs, sqlite, s3 (requests)."
    )
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    for kind in args.backend.split(","):
        try:
            if kind == "s3":
                line = await s3_requests(args.runs, args.steps)
            else:
                line = await one(kind, args.runs, args.steps)
        except Exception as exc:  # a failure is a line of its own, never a time
            line = {"workload": "PR", "backend": kind, "ok": False, "error": repr(exc)}
        sys.stdout.write(json.dumps(line) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    asyncio.run(main())
