"""W8: runs through a queue, and what idle queues cost, beside W2 on the same store.

* throughput: ``--n`` runs of 10 steps started into a queue with
  ``concurrency=100``, drained by one worker; runs per second beside W2
  (200 independent runs of 10 steps) measured in the same sitting;
* idle cost: a worker with no queue, then one with 50 queues that have each
  run one job and now wait: CPU of the process and backend calls per minute
  over ``--idle`` seconds (every call of a Backend method counts).

    python -m bench.bench_queues --backend sqlite --n 10000 --idle 30
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

from substantial import Conductor, Context, Queue, workflow
from substantial.backends import from_url
from substantial.backends.base import Backend

CALLS = [
    *("append", "read_log", "post_event", "read_inbox", "ack_events", "schedule"),
    *("unschedule", "due", "next_due_at", "acquire_lease", "release_lease", "get_lease"),
    *("put_run", "get_run", "list_runs", "wait_for_work", "create_run"),
]
URLS = {"fs": "file://{work}/store", "sqlite": "sqlite://{work}/store.db"}


@workflow()
async def steps(c: Context, n: int = 10) -> int:
    for i in range(n):
        await c.save(lambda i=i: i)
    return n


def emit(**fields: Any) -> None:
    print(orjson.dumps(fields).decode(), flush=True)


def open_store(name: str, work: Path) -> Backend:
    if name not in URLS:
        raise SystemExit(f"--backend takes {', '.join(URLS)} (servers: pass a URL), got {name}")
    return from_url(URLS[name].format(work=work))


async def w2(name: str, work: Path) -> float:
    """W2 in this sitting: 200 independent runs of 10 steps, no queue; runs per second."""
    n = 200
    conductor = Conductor(open_store(name, work))
    conductor.register(steps)
    agent = conductor.run()
    try:
        t0 = time.perf_counter()
        runs = [await conductor.start(steps, {"n": 10}) for _ in range(n)]
        await asyncio.gather(*(r.result(timeout=300) for r in runs))
        seconds = time.perf_counter() - t0
    finally:
        agent.cancel()
        await agent
        await conductor.close()
    emit(
        workload="W2",
        backend=name,
        n=n,
        seconds=round(seconds, 4),
        runs_per_s=round(n / seconds, 1),
    )
    return n / seconds


def count_calls(backend: Backend) -> dict[str, int]:
    """Count every call of the backend's methods (``wait_for_work`` counts its wake-ups)."""
    counts: dict[str, int] = dict.fromkeys(CALLS, 0)
    for name in CALLS:
        method = getattr(backend, name)

        async def counted(*args: Any, _m: Any = method, _n: str = name, **kw: Any) -> Any:
            counts[_n] += 1
            return await _m(*args, **kw)

        setattr(backend, name, counted)
    return counts


async def w8_throughput(name: str, work: Path, w2_rate: float, n: int) -> None:
    backend = open_store(name, work)
    conductor = Conductor(backend, queues=[Queue("bulk", concurrency=100)])
    conductor.register(steps)
    agent = conductor.run()
    try:
        t0 = time.perf_counter()
        runs = []
        for i in range(0, n, 500):
            runs += await asyncio.gather(
                *(conductor.start(steps, {"n": 10}, queue="bulk") for _ in range(min(500, n - i)))
            )
        started = time.perf_counter() - t0
        results = await asyncio.gather(*(r.result(timeout=3600) for r in runs))
        seconds = time.perf_counter() - t0
    finally:
        agent.cancel()
        await agent
        await conductor.close()
    emit(
        workload="W8",
        backend=name,
        n=n,
        seconds=round(seconds, 4),
        start_seconds=round(started, 4),
        per_op_ms=round(seconds / n * 1000, 4),
        runs_per_s=round(n / seconds, 1),
        ratio_to_w2=round(n / seconds / w2_rate, 3),
        ok=results == [10] * n,
        note="runs of 10 steps through a queue with concurrency=100; compare runs_per_s with W2",
    )


async def idle_cost(name: str, work: Path, queues: int, window: float) -> None:
    for label, count in (("no queue", 0), (f"{queues} idle queues", queues)):
        (work / label.replace(" ", "-")).mkdir()
        backend = open_store(name, work / label.replace(" ", "-"))
        declared = [Queue(f"q{i}", concurrency=2) for i in range(count)]
        conductor = Conductor(backend, queues=declared)
        conductor.register(steps)
        # Waiting runs leave memory after 2 s here (60 s by default): what is measured is
        # the steady state, not the one-time eviction.
        agent = conductor.run(idle_timeout=2.0)
        try:
            runs = [await conductor.start(steps, {"n": 1}, queue=q.name) for q in declared]
            await asyncio.gather(*(r.result(timeout=120) for r in runs))
            await asyncio.sleep(5.0)
            calls = count_calls(backend)
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(window)
            cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
        finally:
            agent.cancel()
            await agent
            await conductor.close()
        total = sum(calls.values())
        emit(
            workload="W8-idle",
            backend=name,
            what=label,
            seconds=round(elapsed, 2),
            cpu_percent=round(100 * cpu / elapsed, 3),
            calls_per_min=round(total * 60 / elapsed, 1),
            calls={k: v for k, v in calls.items() if v},
        )


async def main_async(args: argparse.Namespace) -> None:
    for name in args.backend.split(","):
        base = Path(tempfile.mkdtemp(prefix=f"bench-queues-{name}-"))
        try:
            (base / "W2").mkdir()
            rate = await w2(name, base / "W2")
            (base / "W8").mkdir()
            await w8_throughput(name, base / "W8", rate, args.n)
            (base / "idle").mkdir()
            await idle_cost(name, base / "idle", 50, args.idle)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="sqlite")
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--idle", type=float, default=30.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
