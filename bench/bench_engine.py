"""Workflow-engine benchmarks from BENCH.md, each beside its storage floor.

Each is a workload of ``python -m bench`` (bench/__main__.py runs them on
every store, checks each result and prints JSON lines); ``python -m
bench.bench_engine [--backend fs,sqlite] [--workload W1,W2,...]`` is the same
with these workloads preselected. ``n`` is each workload's size:

* W1: one workflow, n (1,000) sequential ``save`` steps (per_op = one step).
* W2: n (200) workflows x 10 steps, one worker (``wf_per_s``); the ratio is to
  16 floor writes, the durable writes one 10-step run needs.
* W3s: overhead of n (50) durable 10 ms ``sleep`` calls beyond their duration.
* W3e: event latency, ``send`` from another process -> seen in the workflow, p50
  of n (50) events.
* W4: SIGKILL a worker mid-step n/2 of n (100); ms from the new worker being
  ready to its first resumed step, and how many completed steps ran again.
* W6: 4 worker processes on one store, n (500) workflows x 10 steps, against 1 worker.
* R: resume an n-step (10,000) run from its log (replay only).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import Counter
from typing import Any

from bench._harness import (
    ROOT,
    Sitting,
    requests,
    spent,
    stop,
    wait_until,
    worker_process,
)
from substantial import Conductor, Context, workflow
from substantial.testing import running

latencies: list[float] = []


@workflow()
async def steps(c: Context, n: int = 1000) -> int:
    for i in range(n):
        await c.save(lambda i=i: i)
    return n


@workflow()
async def naps(c: Context, n: int = 50, seconds: float = 0.01) -> int:
    for _ in range(n):
        await c.sleep(seconds)
    return n


@workflow()
async def pings(c: Context, n: int = 50) -> int:
    for _ in range(n):
        sent_at = await c.receive("ping")
        if not c.replaying:
            latencies.append(time.time() - sent_at)
    return n


@workflow()
async def long_then_wait(c: Context, n: int = 10_000) -> str:
    for i in range(n):
        await c.save(lambda i=i: i)
    return str(await c.receive("done"))


ENGINE_WORKFLOWS = (steps, naps, pings, long_then_wait)


async def w1(s: Sitting) -> dict[str, Any]:
    async with running(*ENGINE_WORKFLOWS, backend=s.open()) as conductor:
        await (await conductor.start(steps, {"n": 2})).result(timeout=120)  # connect, warm up
        before = requests(conductor.backend)
        t0 = time.perf_counter()
        result = await (await conductor.start(steps, {"n": s.n})).result(timeout=1800)
        seconds = time.perf_counter() - t0
        sent = spent(conductor.backend, before, s.n, "step")
    return {
        "seconds": round(seconds, 5),
        "per_op_ms": round(seconds / s.n * 1000, 5),
        "ok": result == s.n,
        **sent,
    }


async def w2(s: Sitting) -> dict[str, Any]:
    async with running(*ENGINE_WORKFLOWS, backend=s.open()) as conductor:
        before = requests(conductor.backend)
        t0 = time.perf_counter()
        runs = [await conductor.start(steps, {"n": 10}) for _ in range(s.n)]
        results = await asyncio.gather(*(r.result(timeout=1800) for r in runs))
        seconds = time.perf_counter() - t0
        sent = spent(conductor.backend, before, s.n, "workflow")
    per = seconds / s.n * 1000
    return {
        "seconds": round(seconds, 5),
        "per_op_ms": round(per, 5),
        "wf_per_s": round(s.n / seconds, 1),
        "steps_per_s": round(s.n * 10 / seconds, 1),
        "ratio": round(per / (s.floor_ms * 16), 3),
        "ok": results == [10] * s.n,
        **sent,
        "note": "ratio against 16 floor writes, the durable writes one 10-step run needs",
    }


async def timer_overshoot_ms(nap: float, n: int) -> float:
    """Median lateness of a plain ``asyncio.sleep(nap)`` on this loop, in ms.

    It is the floor of a durable sleep: no engine wakes a run sooner than the loop
    wakes a bare coroutine, and on a VM the kernel alone can be a few tenths late.
    """
    late = []
    for _ in range(n):
        t0 = time.perf_counter()
        await asyncio.sleep(nap)
        late.append(time.perf_counter() - t0 - nap)
    return statistics.median(late) * 1000


async def w3s(s: Sitting) -> dict[str, Any]:
    nap = 0.01
    timer_floor = await timer_overshoot_ms(nap, min(s.n, 50))
    async with running(*ENGINE_WORKFLOWS, backend=s.open()) as conductor:
        t0 = time.perf_counter()
        run = await conductor.start(naps, {"n": s.n, "seconds": nap})
        result = await run.result(timeout=600)
        seconds = time.perf_counter() - t0
    per = (seconds - s.n * nap) / s.n * 1000
    # A durable sleep is the loop's timer plus two writes (the sleep, then its end).
    floor = timer_floor + 2 * s.floor_ms
    return {
        "seconds": round(seconds, 5),
        "per_op_ms": round(per, 5),
        "timer_floor_ms": round(timer_floor, 5),
        "ratio": round(per / floor, 3) if floor > 0 else None,
        "ok": result == s.n,
        "note": "ratio against a bare asyncio.sleep's lateness plus two floor writes",
    }


SENDER = """
import asyncio, sys, time
from substantial import Conductor
async def main():
    c = Conductor(sys.argv[1])
    run = c.get(sys.argv[2])
    for _ in range(int(sys.argv[3])):
        await asyncio.sleep(float(sys.argv[4]))
        await run.send("ping", time.time())
    await c.close()
asyncio.run(main())
"""


async def w3e(s: Sitting) -> dict[str, Any]:
    url = s.url()
    assert url is not None
    # A store found by polling (S3) gets events far enough apart to see each poll's delay.
    gap = 0.3 if s.backend == "s3" else 0.02
    latencies.clear()
    async with running(*ENGINE_WORKFLOWS, backend=s.open()) as conductor:
        run = await conductor.start(pings, {"n": s.n})
        await asyncio.sleep(0.2)
        sender = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER, url, run.run_id, str(s.n), str(gap), cwd=ROOT
        )
        result = await run.result(timeout=600)
        await sender.wait()
    got = sorted(latencies)
    ok = result == s.n and sender.returncode == 0 and len(got) == s.n
    if not ok:
        return {
            "ok": False,
            "error": f"{len(got)} of {s.n} events seen, sender {sender.returncode}",
        }
    p50 = statistics.median(got) * 1000
    return {
        "seconds": round(sum(got), 5),
        "per_op_ms": round(p50, 4),
        "p90_ms": round(got[int(len(got) * 0.9)] * 1000, 4),
        "ok": True,
        "note": f"events sent {gap} s apart from another process; p50",
    }


async def w4(s: Sitting) -> dict[str, Any]:
    url = s.url()
    assert url is not None
    trace = s.work / "trace.txt"
    kill_at = s.n // 2
    from tests.workflows import hundred_steps

    client = Conductor(s.open())
    client.register(hundred_steps)
    first = second = None
    try:
        run = await client.start(hundred_steps, {"n": s.n, "pause": 0.02})
        first = worker_process(url, trace)
        mark = f"{run.run_id} start {kill_at} "
        await wait_until(lambda: trace.exists() and mark in trace.read_text(), 300, "step n/2")
        first.kill()
        first.communicate()
        second = worker_process(url, trace)
        ready = time.perf_counter()
        mine = f" {second.pid}\n"
        await wait_until(lambda: mine in trace.read_text(), 300, "the new worker's first step")
        to_first = time.perf_counter() - ready
        result = await run.result(timeout=600)
        seconds = time.perf_counter() - ready
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                stop(proc)
        await client.close()
    lines = trace.read_text().splitlines()
    starts = Counter(int(ln.split()[2]) for ln in lines if " start " in ln)
    rerun = sum(1 for i, c in starts.items() if c > 1 and i != kill_at)
    ok = result == sum(range(s.n)) and rerun == 0 and set(starts) == set(range(s.n))
    return {
        "seconds": round(seconds, 5),
        "per_op_ms": round(to_first * 1000, 3),
        "completed_steps_rerun": rerun,
        "in_flight_step_runs": starts[kill_at],
        "ok": ok,
        **({} if ok else {"error": f"result {result!r}, {rerun} completed steps ran again"}),
        "note": "per_op_ms = worker ready -> first resumed step",
    }


async def r(s: Sitting) -> dict[str, Any]:
    async def open_conductor() -> Conductor:
        conductor = Conductor(s.open())
        for wf in ENGINE_WORKFLOWS:
            conductor.register(wf)
        return conductor

    def waiting(agent: Any, run_id: str) -> bool:
        live = agent.worker.runs.get(run_id)
        return bool(live and live.driver and live.driver.idle)

    conductor = await open_conductor()
    agent = conductor.run()
    run = await conductor.start(long_then_wait, {"n": s.n})
    await wait_until(lambda: waiting(agent, run.run_id), 1800, "the run to wait")
    agent.cancel()
    await agent
    await conductor.close()
    # A second client on the same store: the run's log is all it has.
    conductor = await open_conductor()
    best = float("inf")
    for _ in range(3):
        # The run waits for an event, so it is not due: make it due to have a worker load it.
        await conductor.backend.schedule(run.run_id, time.time())
        agent = conductor.run()
        t0 = time.perf_counter()
        await wait_until(lambda a=agent: waiting(a, run.run_id), 600, "the replay")
        best = min(best, time.perf_counter() - t0)
        agent.cancel()
        await agent
    run = conductor.get(run.run_id)
    await run.send("done", "yes")
    agent = conductor.run()
    result = await run.result(timeout=600)
    agent.cancel()
    await agent
    await conductor.close()
    return {
        "seconds": round(best, 5),
        "per_op_ms": round(best * 1000, 4),
        "per_entry_ms": round(best / s.n * 1000, 6),
        "ratio": round(best / s.n * 1000 / s.floor_ms, 4),
        "ok": result == "yes",
        "note": "per_op_ms = the whole replay, best of 3; ratio per entry against the floor",
    }


async def w6(s: Sitting) -> dict[str, Any]:
    url = s.url()
    assert url is not None
    from tests.workflows import ten_steps

    client = Conductor(s.open())
    client.register(ten_steps)
    trace = s.work / "trace.txt"
    figures = {}
    try:
        for workers in (1, 4):
            procs = [worker_process(url, trace) for _ in range(workers)]
            try:
                t0 = time.perf_counter()
                runs = [await client.start(ten_steps, {"tag": str(workers)}) for _ in range(s.n)]
                results = await asyncio.gather(*(r.result(timeout=1800) for r in runs))
                figures[workers] = time.perf_counter() - t0
            finally:
                for p in procs:
                    stop(p)
            if results != [[i * i for i in range(10)]] * s.n:
                return {"ok": False, "error": f"wrong results with {workers} workers"}
    finally:
        await client.close()
    # Each step notes "<run> <i> <pid>" when it runs: a step run twice is a line seen twice.
    counts = Counter(" ".join(ln.split()[:2]) for ln in trace.read_text().splitlines())
    twice = sum(1 for c in counts.values() if c > 1)
    per = figures[4] / s.n * 1000
    return {
        "seconds": round(figures[4], 5),
        "per_op_ms": round(per, 5),
        "wf_per_s": round(s.n / figures[4], 1),
        "one_worker_wf_per_s": round(s.n / figures[1], 1),
        "speedup": round(figures[1] / figures[4], 3),
        "steps_run_twice": twice,
        "ratio": round(per / (s.floor_ms * 16), 3),
        "ok": twice == 0 and len(counts) == 2 * s.n * 10,
        "note": "4 worker processes vs 1; the client in another process",
    }


def main() -> None:
    """Run the engine workloads through ``python -m bench`` (same options)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="fs,sqlite")
    parser.add_argument("--workload", default="W1,W2,W3s,W3e,W4,W6,R")
    args, rest = parser.parse_known_args()
    from bench.__main__ import main as bench_main

    bench_main(["--backend", args.backend, "--workload", args.workload, *rest])


if __name__ == "__main__":
    main()
