"""W7: fan-out inside one run against independent runs, on the same store in one sitting.

One parent gathers 100 children of 10 steps each (``c.child``); its
throughput in steps per second is printed beside W2's (200 independent runs
of 10 steps) measured in the same run, with the store's floor.

    python -m bench.bench_fanout --backend fs,sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path

from bench.bench_engine import TARGETS, emit, one_floor, steps
from bench.bench_engine import w2 as bench_w2
from substantial import Context, workflow
from substantial.testing import running


@workflow()
async def ten(c: Context, i: int = 0) -> int:
    for j in range(10):
        await c.save(lambda j=j: j, name=f"s{j}")
    return i


@workflow()
async def fan(c: Context, children: int = 100) -> int:
    done = await asyncio.gather(*(c.child(ten, {"i": i}) for i in range(children)))
    return len(done)


async def w7(name: str, work: Path, floor: float) -> None:
    children = 100
    async with running(ten, fan, steps, backend=TARGETS[name].open(work, "process")) as conductor:
        t0 = time.perf_counter()
        ok = await (await conductor.start(fan, {"children": children})).result(timeout=600)
        seconds = time.perf_counter() - t0
    n_steps = children * 10
    emit(
        workload="W7",
        backend=name,
        n=n_steps,
        seconds=round(seconds, 4),
        per_op_ms=round(seconds / n_steps * 1000, 4),
        steps_per_s=round(n_steps / seconds, 1),
        floor_ms=round(floor, 4),
        ok=ok == children,
        note="one parent gathering 100 children x 10 steps; compare steps_per_s with W2 x 10",
    )


async def main_async(args: argparse.Namespace) -> None:
    for name in args.backend.split(","):
        base = Path(tempfile.mkdtemp(prefix=f"bench-fanout-{name}-"))
        try:
            floor = await one_floor(name, base)
            for label, fn in (("W2", bench_w2), ("W7", w7)):
                work = base / label
                work.mkdir()
                await fn(name, work, floor)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="fs,sqlite")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
