"""Workflow-engine benchmarks from BENCH.md, each beside its storage floor.

Run ``python -m bench.bench_engine [--backend fs,sqlite] [--workload W1,W2,W3s,W3e,W4,R]``.
Prints one JSON line per measurement: ``{"workload", "backend", "n", "seconds",
"per_op_ms", "floor_ms", "ratio", "ok", ...}``. ``floor_ms`` is the raw cost
of one record write on that store (from bench.bench_backends), measured in
the same run; ``ratio`` = per_op_ms / floor_ms.

* W1: one workflow, 1,000 sequential ``save`` steps (per_op = one step).
* W2: 200 workflows x 10 steps, one worker (``wf_per_s``).
* W3s: overhead of a durable 10 ms ``sleep`` beyond its duration.
* W3e: event latency, ``send`` from another process -> seen in the workflow, p50.
* W4: SIGKILL a worker mid-step 50 of 100; seconds from the new worker being
  ready to its first resumed step, and how many completed steps ran again.
* W5: 100,000 runs parked in the due index a day ahead; start and finish one
  more 10-step run, against the same with none parked; the worker's RSS.
* W6: 4 worker processes on one store, 500 workflows x 10 steps, against 1 worker.
* R: resume a 10,000-step run from its log (replay only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.bench_backends import TARGETS
from substantial import Conductor, Context, workflow
from substantial.backends.base import Backend
from substantial.testing import running

ROOT = Path(__file__).resolve().parent.parent
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


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def one_floor(name: str, work: Path) -> float:
    floor = TARGETS[name].floors["append"]
    n = 500
    times = []
    for i in range(3):
        (work / f"floor{i}").mkdir()
        times.append(floor(work / f"floor{i}", n, "process"))
    best = min(times)
    return best / n * 1000


async def open_conductor(name: str, work: Path) -> Conductor:
    backend: Backend = TARGETS[name].open(work, "process")
    conductor = Conductor(backend)
    for wf in (steps, naps, pings, long_then_wait):
        conductor.register(wf)
    return conductor


def serving(name: str, work: Path) -> contextlib.AbstractAsyncContextManager[Conductor]:
    """Open the backend with the benchmark workflows registered and a worker running."""
    backend = TARGETS[name].open(work, "process")
    return running(steps, naps, pings, long_then_wait, backend=backend)


async def w1(name: str, work: Path, floor: float) -> None:
    n = 1000
    async with serving(name, work) as conductor:
        t0 = time.perf_counter()
        ok = await (await conductor.start(steps, {"n": n})).result(timeout=300) == n
        seconds = time.perf_counter() - t0
    per = seconds / n * 1000
    emit(
        workload="W1",
        backend=name,
        n=n,
        seconds=round(seconds, 4),
        per_op_ms=round(per, 4),
        floor_ms=round(floor, 4),
        ratio=round(per / floor, 2),
        ok=ok,
    )


async def w2(name: str, work: Path, floor: float) -> None:
    n = 200
    async with serving(name, work) as conductor:
        t0 = time.perf_counter()
        runs = [await conductor.start(steps, {"n": 10}) for _ in range(n)]
        results = await asyncio.gather(*(r.result(timeout=300) for r in runs))
        seconds = time.perf_counter() - t0
    per = seconds / n * 1000
    emit(
        workload="W2",
        backend=name,
        n=n,
        seconds=round(seconds, 4),
        per_op_ms=round(per, 4),
        wf_per_s=round(n / seconds, 1),
        floor_ms=round(floor, 4),
        ratio=round(per / (floor * 16), 2),
        ok=all(r == 10 for r in results),
        note="ratio against 16 floor writes, the durable writes one 10-step run needs",
    )


async def w3s(name: str, work: Path, floor: float) -> None:
    n, nap = 50, 0.01
    async with serving(name, work) as conductor:
        t0 = time.perf_counter()
        run = await conductor.start(naps, {"n": n, "seconds": nap})
        ok = await run.result(timeout=300) == n
        seconds = time.perf_counter() - t0
    per = (seconds - n * nap) / n * 1000
    emit(
        workload="W3s",
        backend=name,
        n=n,
        seconds=round(seconds, 4),
        per_op_ms=round(per, 4),
        floor_ms=round(floor, 4),
        ratio=round(per / floor, 2),
        ok=ok,
    )


SENDER = """
import asyncio, sys, time
from substantial import Conductor
async def main():
    c = Conductor(sys.argv[1])
    run = c.get(sys.argv[2])
    for _ in range(int(sys.argv[3])):
        await run.send("ping", time.time())
        await asyncio.sleep(0.02)
    await c.close()
asyncio.run(main())
"""


def worker_process(url: str, trace: Path | None = None) -> subprocess.Popen[str]:
    """Start ``substantial worker`` for tests.workflows on ``url``; return once it serves."""
    env = {**os.environ, "SUBSTANTIAL_TEST_URL": url, "PYTHONPATH": str(ROOT)}
    if trace is not None:
        env["SUBSTANTIAL_TEST_TRACE"] = str(trace)
    cmd = [sys.executable, "-m", "substantial.cli", "worker", "tests.workflows:conductor"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    proc.stderr.readline()  # the worker prints "worker ready ..." once it can serve
    return proc


def url_of(name: str, work: Path) -> str | None:
    if name == "fs":
        return f"file://{work}/store"
    if name == "sqlite":
        return f"sqlite://{work}/store.db"
    if name == "postgres":
        from bench.bench_backends import postgres_url

        return postgres_url(work)
    return None


async def w3e(name: str, work: Path, floor: float) -> None:
    url = url_of(name, work)
    if url is None:
        return
    latencies.clear()
    n = 50
    async with serving(name, work) as conductor:
        run = await conductor.start(pings, {"n": n})
        await asyncio.sleep(0.2)
        sender = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER, url, run.run_id, str(n), cwd=ROOT
        )
        ok = await run.result(timeout=120) == n
        await sender.wait()
    p50 = statistics.median(latencies) * 1000
    emit(
        workload="W3e",
        backend=name,
        n=n,
        seconds=round(sum(latencies), 4),
        per_op_ms=round(p50, 4),
        p90_ms=round(sorted(latencies)[int(n * 0.9)] * 1000, 4),
        floor_ms=round(floor, 4),
        ratio=round(p50 / floor, 2),
        ok=ok,
    )


async def w4(name: str, work: Path, floor: float) -> None:
    url = url_of(name, work)
    if url is None:
        return
    trace = work / "trace.txt"
    from tests.workflows import hundred_steps

    client = Conductor(TARGETS[name].open(work, "process"))
    client.register(hundred_steps)
    run = await client.start(hundred_steps, {"n": 100, "pause": 0.02})
    first = worker_process(url, trace)
    while not trace.exists() or f"{run.run_id} start 50 " not in trace.read_text():
        await asyncio.sleep(0.002)
    first.send_signal(signal.SIGKILL)
    first.communicate()
    second = worker_process(url, trace)
    ready = time.perf_counter()
    mine = f" {second.pid}\n"
    while mine not in trace.read_text():
        await asyncio.sleep(0.0005)
    to_first = time.perf_counter() - ready
    ok = await run.result(timeout=120) == sum(range(100))
    seconds = time.perf_counter() - ready
    second.send_signal(signal.SIGTERM)
    second.communicate(timeout=30)
    starts = Counter(int(ln.split()[2]) for ln in trace.read_text().splitlines() if " start " in ln)
    rerun = sum(1 for i, c in starts.items() if c > 1 and i != 50)
    await client.close()
    emit(
        workload="W4",
        backend=name,
        n=100,
        seconds=round(seconds, 4),
        per_op_ms=round(to_first * 1000, 2),
        floor_ms=round(floor, 4),
        ratio=round(to_first * 1000 / floor, 1),
        completed_steps_rerun=rerun,
        in_flight_step_runs=starts[50],
        ok=ok and rerun == 0,
        note="per_op_ms = worker ready -> first resumed step",
    )


async def r(name: str, work: Path, floor: float) -> None:
    n = 10_000
    conductor = await open_conductor(name, work)
    agent = conductor.run()
    run = await conductor.start(long_then_wait, {"n": n})
    while True:
        live = agent.worker.runs.get(run.run_id)
        if live and live.driver and live.driver.idle:
            break
        await asyncio.sleep(0.01)
    agent.cancel()
    await agent
    await conductor.close()
    conductor = await open_conductor(name, work)
    best = float("inf")
    for _ in range(3):
        # The run waits for an event, so it is not due: make it due to have a worker load it.
        await conductor.backend.schedule(run.run_id, time.time())
        agent = conductor.run()
        t0 = time.perf_counter()
        while True:
            live = agent.worker.runs.get(run.run_id)
            if live and live.driver and live.driver.idle:
                break
            await asyncio.sleep(0.0005)
        best = min(best, time.perf_counter() - t0)
        agent.cancel()
        await agent
    run = conductor.get(run.run_id)
    await run.send("done", "yes")
    agent = conductor.run()
    ok = await run.result(timeout=120) == "yes"
    agent.cancel()
    await agent
    await conductor.close()
    emit(
        workload="R",
        backend=name,
        n=n,
        seconds=round(best, 4),
        per_op_ms=round(best / n * 1000, 5),
        floor_ms=round(floor, 4),
        ratio=round(best / n * 1000 / floor, 3),
        ok=ok,
    )


async def w6(name: str, work: Path, floor: float) -> None:
    url = url_of(name, work)
    if url is None:
        return
    from tests.workflows import ten_steps

    client = Conductor(TARGETS[name].open(work, "process"))
    client.register(ten_steps)
    figures = {}
    for workers in (1, 4):
        procs = [worker_process(url) for _ in range(workers)]
        n = 500
        t0 = time.perf_counter()
        runs = [await client.start(ten_steps, {"tag": str(workers)}) for _ in range(n)]
        results = await asyncio.gather(*(r.result(timeout=600) for r in runs))
        figures[workers] = time.perf_counter() - t0
        for p in procs:
            p.send_signal(signal.SIGTERM)
            p.communicate(timeout=30)
        assert all(res == [i * i for i in range(10)] for res in results)
    await client.close()
    emit(
        workload="W6",
        backend=name,
        n=500,
        seconds=round(figures[4], 4),
        per_op_ms=round(figures[4] / 500 * 1000, 4),
        wf_per_s=round(500 / figures[4], 1),
        one_worker_wf_per_s=round(500 / figures[1], 1),
        speedup=round(figures[1] / figures[4], 2),
        floor_ms=round(floor, 4),
        ratio=round(figures[4] / 500 * 1000 / (floor * 16), 2),
        ok=True,
        note="4 worker processes vs 1 on a 2-core machine; client in a 5th process",
    )


async def w5(name: str, work: Path, floor: float) -> None:
    url = url_of(name, work)
    if url is None:
        return
    from tests.workflows import ten_steps

    client = Conductor(TARGETS[name].open(work, "process"))
    client.register(ten_steps)
    waiting = 100_000

    async def one_more() -> tuple[float, int]:
        proc = worker_process(url)
        best = float("inf")
        for _ in range(7):
            run = await client.start(ten_steps)
            ok = await run.result(timeout=120)
            assert ok == [i * i for i in range(10)]
            # Created -> ended, from the run's own metadata: free of the client's polling.
            info = await run.status()
            best = min(best, info.updated_at - info.created_at)
        rss_kb = next(
            int(line.split()[1])
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            if line.startswith("VmRSS:")
        )
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        return best, rss_kb

    empty, rss_empty = await one_more()
    # Runs parked on timers a day away: in the due index, not due.
    now = time.time()
    from substantial._runs import store_run
    from substantial.backends.base import RunInfo
    from substantial.worker import encode_start

    batch = 1000
    for first in range(0, waiting, batch):
        await asyncio.gather(
            *(
                store_run(
                    client.backend,
                    RunInfo(f"parked-{i}", "ten_steps", "active", now, now),
                    encode_start(f"parked-{i}", "ten_steps", None, {}, now),
                    now + 86_400 + i,
                )
                for i in range(first, first + batch)
            )
        )
    full, rss_full = await one_more()
    await client.close()
    emit(
        workload="W5",
        backend=name,
        n=waiting,
        seconds=round(full, 4),
        per_op_ms=round(full * 1000, 3),
        empty_ms=round(empty * 1000, 3),
        slowdown=round(full / empty, 2),
        worker_rss_mb=round(rss_full / 1024, 1),
        worker_rss_empty_mb=round(rss_empty / 1024, 1),
        floor_ms=round(floor, 4),
        ratio=round(full * 1000 / (floor * 16), 2),
        ok=full / empty <= 1.2 and rss_full < 102400,
        note="per_op_ms = start and finish one 10-step run beside 100k parked runs",
    )


WORKLOADS = {"W1": w1, "W2": w2, "W3s": w3s, "W3e": w3e, "W4": w4, "W5": w5, "W6": w6, "R": r}


async def main_async(args: argparse.Namespace) -> None:
    for name in args.backend.split(","):
        base = Path(tempfile.mkdtemp(prefix=f"bench-engine-{name}-"))
        try:
            floor = await one_floor(name, base)
            for wl in args.workload.split(","):
                work = base / wl
                work.mkdir()
                await WORKLOADS[wl](name, work, floor)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="fs,sqlite")
    parser.add_argument(
        "--workload",
        default=",".join(w for w in WORKLOADS if w != "W5"),
        help="W5 (100k runs) is left out unless named",
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
