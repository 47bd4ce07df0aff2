"""The offline replay checker's speed: stored runs checked per second.

Workloads RC and MG of ``python -m bench``; ``python -m bench.bench_replay
[--backend sqlite,fs] [--runs 2000]`` preselects them. Stores
``--runs`` completed runs of 10 steps each, then replays every one against
the same code with :func:`substantial.checker.check_store` (nothing runs,
nothing is written). Then migrates the store to a fresh one of the same kind (workload MG, runs
per second, each log read back and checksummed). RC's ``floor_ms`` is one log read on that store
(bench.bench_backends) and ``ratio`` the time per run against it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from bench._harness import Sitting
from substantial import Conductor, Context, workflow
from substantial.checker import check_store
from substantial.portable import JOBS, migrate


@workflow()
async def ten_steps(c: Context, n: int = 10) -> int:
    for i in range(n):
        await c.save(lambda i=i: i)
    return n


async def stored(s: Sitting) -> Conductor:
    """Store ``s.n`` completed runs of 10 steps; return the Conductor on their store."""
    conductor = Conductor(s.open())
    conductor.register(ten_steps)
    agent = conductor.run()
    started = [await conductor.start(ten_steps) for _ in range(s.n)]
    await asyncio.gather(*(r.result(timeout=1800) for r in started))
    agent.cancel()
    await agent
    return conductor


def read_floor_ms(s: Sitting) -> float:
    """One log read on the raw store, in ms (best of 3 x 200)."""
    read = s.target.floors["read"]
    (s.work / "floor").mkdir()
    return min(read(s.work / "floor", 200, s.durability) for _ in range(3)) / 200 * 1000


async def rc(s: Sitting) -> dict[str, Any]:
    floor_ms = read_floor_ms(s)
    conductor = await stored(s)
    try:
        t0 = time.perf_counter()
        report = await check_store(conductor.registry, conductor.backend)
        seconds = time.perf_counter() - t0
    finally:
        await conductor.close()
    per_ms = seconds / s.n * 1000
    return {
        "seconds": round(seconds, 4),
        "per_op_ms": round(per_ms, 5),
        "runs_per_s": round(s.n / seconds, 1),
        "floor_ms": round(floor_ms, 5),
        "ratio": round(per_ms / floor_ms, 2),
        "ok": report.ok and report.checked == s.n,
        "note": "per_op_ms per stored run replayed; floor = one log read",
    }


async def mg(s: Sitting) -> dict[str, Any]:
    conductor = await stored(s)
    target = s.open("copy")
    try:
        t0 = time.perf_counter()
        moved = await migrate(conductor.backend, target)
        migrate_s = time.perf_counter() - t0
    finally:
        await target.close()
        await conductor.close()
    return {
        "seconds": round(migrate_s, 4),
        "per_op_ms": round(migrate_s / s.n * 1000, 5),
        "runs_per_s": round(s.n / migrate_s, 1),
        "ok": moved.ok and moved.copied == s.n,
        "ratio": None,
        "jobs": JOBS,
        "note": "migrate to a fresh store of the same kind, every log read back and checksummed",
    }


def main() -> None:
    """Run RC and MG through ``python -m bench`` (``--runs`` is their n)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="sqlite")
    parser.add_argument("--runs", default="2000")
    args, rest = parser.parse_known_args()
    from bench.__main__ import main as bench_main

    argv = ["--backend", args.backend, "--workload", "RC,MG", "--n", args.runs]
    bench_main([*argv, "--repeat", "1", *rest])


if __name__ == "__main__":
    main()
