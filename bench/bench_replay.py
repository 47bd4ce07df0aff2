"""The offline replay checker's speed: stored runs checked per second.

Run ``python -m bench.bench_replay [--backend sqlite,fs] [--runs 2000]``. Stores
``--runs`` completed runs of 10 steps each, then replays every one against
the same code with :func:`substantial.checker.check_store` (nothing runs,
nothing is written). Then migrates the store to a fresh one of the same kind (workload MG, runs
per second, each log read back and checksummed). Prints JSON lines: ``{"workload": "RC",
"backend", "n", "seconds", "runs_per_s", "floor_ms", "ratio", "ok"}``, where
``floor_ms`` is one log read on that store (bench.bench_backends) and
``ratio`` the time per run against it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from bench.bench_backends import TARGETS
from substantial import Conductor, Context, workflow
from substantial.checker import check_store
from substantial.portable import migrate


@workflow()
async def ten_steps(c: Context, n: int = 10) -> int:
    for i in range(n):
        await c.save(lambda i=i: i)
    return n


async def one(name: str, work: Path, runs: int) -> None:
    read = TARGETS[name].floors["read"]
    (work / "floor").mkdir()
    floor_ms = min(read(work / "floor", 200, "process") for _ in range(3)) / 200 * 1000
    conductor = Conductor(TARGETS[name].open(work, "process"))
    conductor.register(ten_steps)
    agent = conductor.run()
    started = [await conductor.start(ten_steps) for _ in range(runs)]
    await asyncio.gather(*(r.result(timeout=600) for r in started))
    agent.cancel()
    await agent
    t0 = time.perf_counter()
    report = await check_store(conductor.registry, conductor.backend)
    seconds = time.perf_counter() - t0
    per_ms = seconds / runs * 1000
    (work / "copy").mkdir()
    target = TARGETS[name].open(work / "copy", "process")
    t0 = time.perf_counter()
    moved = await migrate(conductor.backend, target)
    migrate_s = time.perf_counter() - t0
    await target.close()
    await conductor.close()
    line = {
        "workload": "RC",
        "backend": name,
        "n": runs,
        "seconds": round(seconds, 4),
        "runs_per_s": round(runs / seconds, 1),
        "floor_ms": round(floor_ms, 4),
        "ratio": round(per_ms / floor_ms, 2),
        "ok": report.ok and report.checked == runs,
    }
    print(json.dumps(line), flush=True)
    line = {
        "workload": "MG",
        "backend": name,
        "n": runs,
        "seconds": round(migrate_s, 4),
        "runs_per_s": round(runs / migrate_s, 1),
        "ok": moved.ok and moved.copied == runs,
        "note": "migrate to a fresh store of the same kind, every log read back and checksummed",
    }
    print(json.dumps(line), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--backend", default="sqlite")
    parser.add_argument("--runs", type=int, default=2000)
    args = parser.parse_args()
    for name in args.backend.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            await one(name, Path(tmp), args.runs)


if __name__ == "__main__":
    asyncio.run(main())
