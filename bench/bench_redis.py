"""The Redis backend on a real redis-server, each figure beside its floor.

Run ``python -m bench.bench_redis [--workload floor,W1,W2,W3e] [--url redis://...]``:
without ``--url`` a private redis-server (127.0.0.1, a free port, a temp dir,
AOF on with ``appendfsync everysec``) is started and stopped at the end.
Prints one JSON line per measurement: ``{"workload", "backend", "n",
"seconds", "per_op_ms", "floor_ms", "ratio", "ok", ...}``. The floor is one
SET round trip of a ~60-byte entry through redis-py's asyncio client, the
same driver the backend uses, measured in the same run.

* floor: n sequential SETs to fresh keys.
* W1: one workflow, 1,000 sequential ``save`` steps (per_op = one step).
* W2: 200 workflows x 10 steps, one worker (``wf_per_s``).
* W3e: event latency, ``send`` from another process -> seen in the workflow, p50.

Also provides the redis entry of bench.bench_backends.TARGETS (``open_redis``,
``redis_append_floor``, ``redis_read_floor``).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis.asyncio

from substantial.backends.redis import RedisBackend
from substantial.records import encode_entry
from tests.redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent

_server: RedisServer | None = None
_external_url: str | None = None


def server_url() -> str:
    """Return the URL of the bench server, starting a private one on first use."""
    global _server
    if _external_url is not None:
        return _external_url
    if _server is None:
        directory = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        _server = RedisServer(directory)
        _server.start()
        atexit.register(shutil.rmtree, directory, ignore_errors=True)
        atexit.register(_server.stop)  # runs first: atexit is last-in, first-out
    return _server.url


def backend_url(prefix: str) -> str:
    """Return a ``redis://`` URL of the bench server with a key prefix."""
    return f"{server_url()}?prefix={prefix}"


def open_redis(work: Path, durability: str) -> RedisBackend:
    """Open the store of ``work`` (the bench_backends ``open`` hook).

    The prefix is derived from the work directory, so opening the same
    ``work`` twice opens the same store, as with fs and sqlite.
    """
    digest = hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:16]
    return RedisBackend.from_url(backend_url(f"bench-{digest}"))


def _in_thread(fn: Callable[[], Awaitable[float]]) -> float:
    # Floors are called from inside a running loop: give them a loop of their own.
    out: list[float] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(fn())))  # type: ignore[arg-type]
    thread.start()
    thread.join()
    return out[0]


def _entry() -> bytes:
    return encode_entry([{"k": "step", "name": "charge", "value": {"n": 0, "ok": True}}])


async def _raw_sets(n: int) -> float:
    client = redis.asyncio.Redis.from_url(server_url())
    tag = uuid.uuid4().hex[:12]
    data = _entry()
    try:
        await client.ping()  # connect before the clock starts
        t0 = time.perf_counter()
        for i in range(n):
            await client.set(f"floor:{tag}:{i}", data)
        elapsed = time.perf_counter() - t0
        await client.delete(*(f"floor:{tag}:{i}" for i in range(n)))
    finally:
        await client.aclose()
    return elapsed


async def _raw_lrange(n: int) -> float:
    client = redis.asyncio.Redis.from_url(server_url())
    key = f"floor:{uuid.uuid4().hex[:12]}"
    try:
        await client.rpush(key, *(_entry() for _ in range(n)))
        t0 = time.perf_counter()
        await client.lrange(key, 0, -1)
        elapsed = time.perf_counter() - t0
        await client.delete(key)
    finally:
        await client.aclose()
    return elapsed


def redis_append_floor(work: Path, n: int, durability: str) -> float:
    """Return seconds for n sequential SET round trips (the append floor)."""
    return _in_thread(lambda: _raw_sets(n))


def redis_read_floor(work: Path, n: int, durability: str) -> float:
    """Return seconds for one LRANGE of an n-entry list (the read floor)."""
    return _in_thread(lambda: _raw_lrange(n))


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


FLOOR_N = 1000


async def floor_seconds(n: int = FLOOR_N) -> float:
    """Return the best of three: seconds for n sequential SET round trips."""
    return min([await _raw_sets(n) for _ in range(3)])


async def floor(floor: float) -> None:
    emit(
        workload="floor",
        backend="redis",
        n=FLOOR_N,
        seconds=round(floor * FLOOR_N / 1000, 4),
        per_op_ms=round(floor, 4),
        floor_ms=round(floor, 4),
        ratio=1.0,
        ok=True,
        note="one SET round trip of a 60-byte value, redis.asyncio, best of 3 x 1000",
    )


async def w1(floor: float) -> None:
    from bench import bench_engine

    with tempfile.TemporaryDirectory(prefix="bench-redis-w1-") as work:
        await bench_engine.w1("redis", Path(work), floor)


async def w2(floor: float) -> None:
    from bench import bench_engine

    with tempfile.TemporaryDirectory(prefix="bench-redis-w2-") as work:
        await bench_engine.w2("redis", Path(work), floor)


async def w3e(floor: float) -> None:
    from bench import bench_engine
    from substantial import Conductor

    bench_engine.latencies.clear()
    url = backend_url(f"bench-{uuid.uuid4().hex[:12]}")
    conductor = Conductor(url)
    conductor.register(bench_engine.pings)
    agent = conductor.run()
    n = 50
    run = await conductor.start(bench_engine.pings, {"n": n})
    await asyncio.sleep(0.2)
    sender = await asyncio.create_subprocess_exec(
        sys.executable, "-c", bench_engine.SENDER, url, run.run_id, str(n), cwd=ROOT
    )
    ok = await run.result(timeout=120) == n
    await sender.wait()
    agent.cancel()
    await agent
    await conductor.close()
    latencies = sorted(bench_engine.latencies)
    p50 = statistics.median(latencies) * 1000
    emit(
        workload="W3e",
        backend="redis",
        n=n,
        seconds=round(sum(latencies), 4),
        per_op_ms=round(p50, 4),
        p90_ms=round(latencies[int(n * 0.9)] * 1000, 4),
        floor_ms=round(floor, 4),
        ratio=round(p50 / floor, 2),
        ok=ok and sender.returncode == 0,
    )


WORKLOADS: dict[str, Callable[[float], Awaitable[None]]] = {
    "floor": floor,
    "W1": w1,
    "W2": w2,
    "W3e": w3e,
}


async def main_async(args: argparse.Namespace) -> None:
    global _external_url
    _external_url = args.url
    ms = await floor_seconds() / FLOOR_N * 1000
    for name in args.workload.split(","):
        if name not in WORKLOADS:
            raise SystemExit(f"unknown workload {name!r}: choose from {', '.join(WORKLOADS)}")
        await WORKLOADS[name](ms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default=",".join(WORKLOADS))
    parser.add_argument("--url", default=None, help="an existing server (default: a private one)")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
