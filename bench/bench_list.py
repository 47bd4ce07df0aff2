"""LS: the newest 50 runs beside n runs, newest first: what ``substantial runs list`` shows.

The store is filled as W5 fills it (``bench_scale.seed``: n parked runs with
distinct creation times, read back by ``check_seeded``), plus a few runs
created through the backend afterwards, so the newest page holds both.
Then, each the best of REPEATS (one if it takes over a second):

* ``per_op_ms``: ``Backend.list_recent(limit=50)``, the primitive;
* ``page2_ms``: the next page, through the cursor of the first;
* ``find_ms``: ``find_runs(RunQuery(limit=50))``, the listing the CLI and
  the web UI call (newest first by default; ``find_read`` runs read; on a
  store without an index it stops at its scan limit, ``find_truncated``);
* ``filtered_ms``: ``list_recent(status="completed", limit=50)``, a filter
  that only the few newest runs pass, so the walk stops early;
* ``cli_list_ms``: ``substantial runs list --limit 50 --json`` in a new
  process, its start-up (``cli_startup_ms``) included.

Every page is checked against the runs known to be newest: a wrong page is
an error, not a time. Target: under 50 ms at n = 1,000,000.

``python -m bench --workload LS --backend sqlite --n LS=1000000``
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench._harness import Sitting
from bench.bench_scale import PARKED, check_seeded, cli_list, seed
from substantial.backends.base import Backend, RunInfo
from substantial.search import RunQuery, find_runs

REPEATS = 5
#: Runs created after the fill, the newest of the store; half of them completed.
FRESH = 20


async def best_ms(fn: Callable[[], Awaitable[list[RunInfo]]]) -> tuple[float, list[str]]:
    """Return the best time of ``fn`` in ms and the ids of its last answer."""
    best = float("inf")
    found: list[RunInfo] = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        found = await fn()
        best = min(best, time.perf_counter() - t0)
        if best > 1.0:
            break  # far off the target already: another reading says nothing more
    return round(best * 1000, 3), [r.run_id for r in found]


async def fill(s: Sitting, backend: Backend) -> tuple[list[str], dict[str, Any]]:
    """Fill the store; return every run id newest first (enough of them) and how it was filled."""
    base = time.time()
    t0 = time.perf_counter()
    how = await seed(s, backend, s.n, base)
    seed_s = time.perf_counter() - t0
    await check_seeded(backend, s.n, base)
    fresh = []
    newer = max(time.time(), base + s.n * 1e-6)  # after the last parked run, however fast
    for i in range(FRESH):
        at = newer + (i + 1) * 1e-3
        info = RunInfo(f"fresh-{i:03d}", "ten_steps", "active", at, at)
        await backend.put_run(info.with_status("completed") if i % 2 else info)
        fresh.append(info.run_id)
    parked = [PARKED.format(i) for i in range(s.n - 1, max(-1, s.n - 200), -1)]
    filled = {"seed_s": round(seed_s, 2), "seed": how}
    return [*reversed(fresh), *parked], filled


async def ls(s: Sitting) -> dict[str, Any]:
    """Fill the store, time the newest pages, check each."""
    backend = s.open()
    try:
        newest, filled = await fill(s, backend)
        first = await backend.list_recent(limit=50)
        cursor = (first[-1].created_at, first[-1].run_id) if first else None
        per_op, page1 = await best_ms(lambda: backend.list_recent(limit=50))
        page2_ms, page2 = await best_ms(lambda: backend.list_recent(limit=50, before=cursor))
        filtered_ms, done = await best_ms(lambda: backend.list_recent(status="completed", limit=50))

        pages: list[Any] = []

        async def find() -> list[RunInfo]:
            pages.append(await find_runs(backend, RunQuery(limit=50)))
            return list(pages[-1].runs)

        find_ms, found = await best_ms(find)
        indexed = backend.capabilities.list_recent
    finally:
        await backend.close()
    completed = [r for i, r in enumerate(reversed(newest[:FRESH])) if i % 2][::-1]
    checks = {
        "page1": page1 == newest[:50],
        "page2": page2 == newest[50:100],
        "filtered": done == completed,
        # Without an index, find_runs reads up to its scan limit and says so (truncated):
        # past it the page is the newest of those read, as documented.
        "find": found == newest[:50] or (not indexed and pages[-1].truncated),
    }
    out: dict[str, Any] = {
        "seconds": per_op / 1000,
        "per_op_ms": per_op,
        "page2_ms": page2_ms,
        "filtered_ms": filtered_ms,
        "find_ms": find_ms,
        "find_read": pages[-1].scanned,
        "find_truncated": pages[-1].truncated,
        "indexed": indexed,
        "ratio": None,  # a listing is reads, not writes: no floor to compare with
        **filled,
    }
    url = s.url()
    if url is not None:
        listed = cli_list(url, out)
        checks["cli"] = listed == newest[:50] or (not indexed and pages[-1].truncated)
    wrong = [name for name, right in checks.items() if not right]
    if wrong:
        return {"ok": False, "error": f"wrong newest-first pages: {', '.join(wrong)}"}
    out["ok"] = True
    out["note"] = f"best of {REPEATS}; per_op_ms: list_recent(limit=50)"
    return out
