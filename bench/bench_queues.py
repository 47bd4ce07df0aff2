"""W8: runs through a queue, and what idle queues cost, beside W2 on the same store.

* W2, in this sitting: 200 independent runs of 10 steps, no queue;
* W8: ``--n`` runs of 10 steps started into a queue with ``concurrency=100``
  while one worker drains it; runs per second, and the ratio to W2;
* W8-order: ``--order`` runs of 10 steps with priorities 0 to 4 queued while
  no worker runs, then drained: every run completes (none starves), admitted
  in priority order, first in first out within a priority; the drain alone
  is timed;
* W8-idle: a worker with no queue, then one with 50 queues that have each
  run one job and now wait: CPU of the process and backend calls per minute
  over ``--idle`` seconds (every call of a Backend contract method counts; on S3 also
  the HTTP requests, by operation).

W2 is run as bench_engine runs it (200 starts one after the other, results
awaited together). W8 starts its runs 500 at a time and awaits their results
one after the other, in start order: a client awaiting thousands of runs at
once polls each of them (``result()`` backs off to 0.25 s), which costs the
process more than the queue does; what is measured is how fast the queue
drains. ``cpu_ms_per_run`` (process time) is steadier than wall time on a
shared machine.

    python -m bench.bench_queues --backend sqlite --n 10000 --order 10000 --idle 30
    python -m bench.bench_queues --backend s3 --n 300 --order 0 --idle 60
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson

from bench._harness import Sitting
from bench.bench_backends import TARGETS
from substantial import Conductor, Context, Queue, Run, workflow
from substantial.backends.base import Backend
from substantial.records import decode_entry

#: The Backend contract's methods (every other call is built on them), and the wait.
CALLS = [
    *("append", "read_log", "read_inbox", "set_due", "due", "lease", "put_run", "list_runs"),
    "wait_for_work",
]
CHUNK = 500


@workflow()
async def steps(c: Context, n: int = 10) -> int:
    for i in range(n):
        await c.save(lambda i=i: i)
    return n


@workflow()
async def ranked(c: Context, priority: int, seq: int) -> int:
    for i in range(9):
        await c.save(lambda i=i: i)
    return await c.save(lambda: seq)


def emit(**fields: Any) -> None:
    print(orjson.dumps(fields).decode(), flush=True)


def open_store(name: str, work: Path) -> Backend:
    if name not in TARGETS:
        raise SystemExit(f"--backend takes {', '.join(TARGETS)}, got {name}")
    work.mkdir(parents=True, exist_ok=True)
    return TARGETS[name].open(work, "process")


def requests_of(backend: Backend) -> Counter[str]:
    """The HTTP requests an S3 backend has sent, by operation (empty for other stores)."""
    return Counter(getattr(backend, "requests", {}))


#: S3 Standard list prices (us-east-1), USD per request: PUT, COPY, POST and LIST
#: $0.005 per 1,000; GET and the rest $0.0004 per 1,000; DELETE free.
PRICES = {"PutObject": 5e-6, "CopyObject": 5e-6, "ListObjectsV2": 5e-6, "ListObjects": 5e-6}
FREE = {"DeleteObject", "DeleteObjects"}


def price(op: str) -> float:
    """Return the list price of one S3 request of operation ``op``."""
    return 0.0 if op in FREE else PRICES.get(op, 4e-7)


def bill(sent: Counter[str], per: float) -> dict[str, Any]:
    """Requests by operation divided by ``per`` (runs, or minutes), and what they cost."""
    if not sent:
        return {}
    return {
        "requests": round(sum(sent.values()) / per, 2),
        "by_op": {op: round(k / per, 2) for op, k in sorted(sent.items())},
        "usd_per_million": round(sum(k * price(op) for op, k in sent.items()) / per * 1e6, 2),
    }


async def drain(
    conductor: Conductor, starts: list[dict[str, Any]], wf: Any = steps, **opts: Any
) -> tuple[list[Run], list[Any]]:
    """Start the runs 500 at a time, then await their results one after the other."""
    runs: list[Run] = []
    for i in range(0, len(starts), CHUNK):
        chunk = starts[i : i + CHUNK]
        runs += await asyncio.gather(*(conductor.start(wf, kw, **opts) for kw in chunk))
    return runs, [await r.result(timeout=3600) for r in runs]


async def w2(name: str, work: Path) -> tuple[float, float]:
    """W2 in this sitting, as bench_engine runs it; print it, return runs/s and CPU s per run."""
    line = await w2_line(name, work)
    emit(**line)
    return line["runs_per_s"], line["cpu_ms_per_run"] / 1000


async def w2_line(name: str, work: Path) -> dict[str, Any]:
    """W2 in this sitting, as bench_engine runs it: its line, with runs/s and CPU per run."""
    n = 200
    backend = open_store(name, work)
    conductor = Conductor(backend)
    conductor.register(steps)
    agent = conductor.run()
    before = requests_of(backend)
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        runs = [await conductor.start(steps, {"n": 10}) for _ in range(n)]
        results = await asyncio.gather(*(r.result(timeout=300) for r in runs))
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        agent.cancel()
        await agent
        await conductor.close()
    return dict(
        workload="W2",
        backend=name,
        n=n,
        seconds=round(seconds, 4),
        runs_per_s=round(n / seconds, 1),
        cpu_ms_per_run=round(cpu / n * 1000, 3),
        ok=results == [10] * n,
        **({"per_run": bill(requests_of(backend) - before, n)} if requests_of(backend) else {}),
    )


def count_calls(backend: Backend) -> dict[str, int]:
    """Count every call of the contract's methods (``wait_for_work`` counts its wake-ups)."""
    counts: dict[str, int] = dict.fromkeys(CALLS, 0)
    for name in CALLS:
        method = getattr(backend, name)

        async def counted(*args: Any, _m: Any = method, _n: str = name, **kw: Any) -> Any:
            counts[_n] += 1
            return await _m(*args, **kw)

        setattr(backend, name, counted)
    return counts


async def w8_throughput(name: str, work: Path, w2_rate: tuple[float, float], n: int) -> None:
    """Print W8's line (see :func:`w8_line`)."""
    emit(**await w8_line(name, work, w2_rate, n))


async def w8_line(name: str, work: Path, w2_rate: tuple[float, float], n: int) -> dict[str, Any]:
    """Run ``n`` runs of 10 steps through a queue with concurrency 100; return W8's line."""
    backend = open_store(name, work)
    conductor = Conductor(backend, queues=[Queue("bulk", concurrency=100)])
    conductor.register(steps)
    agent = conductor.run()
    before = requests_of(backend)
    try:
        cpu0, t0 = time.process_time(), time.perf_counter()
        _runs, results = await drain(conductor, [{"n": 10}] * n, queue="bulk")
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    finally:
        agent.cancel()
        await agent
        await conductor.close()
    sent = requests_of(backend) - before
    extra = {"per_run": bill(sent, n)} if sent else {}
    return dict(
        workload="W8",
        backend=name,
        n=n,
        seconds=round(seconds, 4),
        per_op_ms=round(seconds / n * 1000, 4),
        runs_per_s=round(n / seconds, 1),
        ratio_to_w2=round(n / seconds / w2_rate[0], 3),
        cpu_ms_per_run=round(cpu / n * 1000, 3),
        cpu_ratio_to_w2=round(cpu / n / w2_rate[1], 3),
        ok=results == [10] * n,
        **extra,
        note="runs of 10 steps through a queue with concurrency=100; compare runs_per_s with W2",
    )


async def w8(s: Sitting) -> dict[str, Any]:
    """W8 as a workload of ``python -m bench``: W2 then W8 on fresh stores of this sitting."""
    w2 = await w2_line(s.backend, s.work / "w2")
    if w2["ok"] is not True:
        return {"ok": False, "error": "W2 beside W8 returned wrong results"}
    rate = (w2["runs_per_s"], w2["cpu_ms_per_run"] / 1000)
    line = await w8_line(s.backend, s.work / "w8", rate, s.n)
    for key in ("workload", "backend", "n"):
        del line[key]
    return {**line, "w2_runs_per_s": w2["runs_per_s"], "ratio": None}


async def admitted_at(backend: Backend, run_id: str) -> float:
    (record,) = decode_entry(run_id, 1, (await backend.read_log(run_id, 1))[0])
    return float(record["t"])


async def w8_order(name: str, work: Path, w2_rate: tuple[float, float], n: int) -> None:
    """Queue ``n`` runs of random priority with no worker, then drain them; check the order."""
    backend = open_store(name, work)
    conductor = Conductor(backend, queues=[Queue("backlog", concurrency=100)])
    conductor.register(ranked)
    draw = random.Random(8)
    starts = [{"priority": draw.randrange(5), "seq": i} for i in range(n)]
    runs = []
    try:
        t0 = time.perf_counter()
        # One at a time: the queue's first-in-first-out order is the order starts arrive.
        for kw in starts:
            runs.append(await conductor.start(ranked, kw, queue="backlog", priority=kw["priority"]))
        queued = time.perf_counter() - t0
        agent = conductor.run()
        try:
            cpu0, t1 = time.process_time(), time.perf_counter()
            results = [await r.result(timeout=3600) for r in runs]
            seconds, cpu = time.perf_counter() - t1, time.process_time() - cpu0
        finally:
            agent.cancel()
            await agent
        times = [await admitted_at(backend, r.run_id) for r in runs]
    finally:
        await conductor.close()
    # Runs admitted by one turn share its time; across turns, the rank must never go back.
    rank = sorted(range(n), key=lambda i: (-starts[i]["priority"], i))
    in_order = all(times[a] <= times[b] for a, b in itertools.pairwise(rank))
    emit(
        workload="W8-order",
        backend=name,
        n=n,
        queue_seconds=round(queued, 4),
        seconds=round(seconds, 4),
        runs_per_s=round(n / seconds, 1),
        ratio_to_w2=round(n / seconds / w2_rate[0], 3),
        cpu_ms_per_run=round(cpu / n * 1000, 3),
        ok=results == list(range(n)) and in_order,
        in_priority_order=in_order,
        note="a backlog of runs of 10 steps, priorities 0-4, drained through concurrency=100",
    )


async def idle_cost(name: str, work: Path, queues: int, window: float) -> None:
    for label, count in (("no queue", 0), (f"{queues} idle queues", queues)):
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
            before = requests_of(backend)
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(window)
            cpu, elapsed = time.process_time() - cpu0, time.perf_counter() - t0
            sent = requests_of(backend) - before
        finally:
            agent.cancel()
            await agent
            await conductor.close()
        total = sum(calls.values())
        extra = {"per_minute": bill(sent, elapsed / 60)} if sent else {}
        emit(
            workload="W8-idle",
            backend=name,
            what=label,
            seconds=round(elapsed, 2),
            cpu_percent=round(100 * cpu / elapsed, 3),
            calls_per_min=round(total * 60 / elapsed, 1),
            calls={k: v for k, v in calls.items() if v},
            **extra,
        )


async def main_async(args: argparse.Namespace) -> None:
    for name in args.backend.split(","):
        base = Path(tempfile.mkdtemp(prefix=f"bench-queues-{name}-"))
        try:
            # W2 and W8 take turns, so that a load that comes and goes weighs on both.
            for i in range(max(1, args.repeat)):
                rate = await w2(name, base / f"W2-{i}")
                if args.n:
                    await w8_throughput(name, base / f"W8-{i}", rate, args.n)
            if args.order:
                await w8_order(name, base / "order", rate, args.order)
            if args.idle:
                await idle_cost(name, base / "idle", 50, args.idle)
        finally:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="sqlite", help="fs, sqlite, s3 (comma-separated)")
    parser.add_argument("--n", type=int, default=10_000, help="runs through the queue (0: skip)")
    parser.add_argument("--order", type=int, default=0, help="backlog for W8-order (0: skip)")
    parser.add_argument("--idle", type=float, default=30.0, help="idle window, s (0: skip)")
    parser.add_argument("--repeat", type=int, default=3, help="W2 and W8 turns (ratios pair them)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
