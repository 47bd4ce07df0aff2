"""W7: fan-out inside one run against independent runs, on the same store in one sitting.

One parent gathers n (100) children of 10 steps each (``c.child``); its
throughput in steps per second is given beside W2's (2n independent runs of
10 steps) measured right before it on the same kind of store, with the
store's floor. A workload of ``python -m bench``; ``python -m
bench.bench_fanout --backend fs,sqlite`` preselects it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import replace
from typing import Any

from bench._harness import Sitting
from bench.bench_engine import steps
from bench.bench_engine import w2 as bench_w2
from substantial import Context, workflow
from substantial.testing import running


@workflow()
async def ten(c: Context, i: int = 0) -> int:
    for j in range(10):
        await c.save(lambda j=j: j, name=f"s{j}")
    return i


@workflow()
async def fan(c: Context, children: int = 100) -> list[int]:
    return list(await asyncio.gather(*(c.child(ten, {"i": i}) for i in range(children))))


async def w7(s: Sitting) -> dict[str, Any]:
    # W2 of this sitting, on its own store: the pair shares the machine's load of the minute.
    (s.work / "w2").mkdir()
    w2 = await bench_w2(replace(s, work=s.work / "w2", n=2 * s.n))
    if w2.get("ok") is not True:
        return {"ok": False, "error": f"W2 beside W7 failed: {w2.get('error')}"}
    async with running(ten, fan, steps, backend=s.open()) as conductor:
        t0 = time.perf_counter()
        result = await (await conductor.start(fan, {"children": s.n})).result(timeout=1800)
        seconds = time.perf_counter() - t0
    n_steps = s.n * 10
    rate = n_steps / seconds
    return {
        "seconds": round(seconds, 5),
        "per_op_ms": round(seconds / n_steps * 1000, 5),
        "steps_per_s": round(rate, 1),
        "w2_steps_per_s": w2["steps_per_s"],
        "ratio_to_w2": round(rate / w2["steps_per_s"], 3),
        "ok": result == list(range(s.n)),
        "note": "one parent gathering n children x 10 steps; per_op_ms per child step; "
        "W2 (2n runs of 10 steps) measured just before on the same kind of store",
    }


def main() -> None:
    """Run W7 through ``python -m bench`` (same options)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="fs,sqlite")
    args, rest = parser.parse_known_args()
    from bench.__main__ import main as bench_main

    bench_main(["--backend", args.backend, "--workload", "W7", *rest])


if __name__ == "__main__":
    main()
