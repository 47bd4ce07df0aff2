"""The Redis store of the benchmarks: a private redis-server and the SET floor.

``python -m bench --backend redis`` runs every workload on it (W1, W2, W3s,
W3e, ...); ``python -m bench.bench_redis [--workload W1,W2,W3e] [--url
redis://...]`` is the same with this backend preselected. Without ``--url`` a
private redis-server (127.0.0.1, a free port, a temp dir, AOF on with
``appendfsync everysec``) is started on first use and stopped at exit. The
floor is one SET round trip of a ~60-byte entry through redis-py's asyncio
client, the same driver the backend uses, measured in the same run.

Provides the redis entry of bench.bench_backends.TARGETS
(``redis_store_url``, ``redis_append_floor``, ``redis_read_floor``).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis.asyncio

from substantial.records import encode_entry
from tests.redis_server import RedisServer

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


def redis_store_url(work: Path, durability: str = "process") -> str:
    """Return the URL of the store of ``work``: one key prefix per work dir, from any process."""
    digest = hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:16]
    return backend_url(f"bench-{digest}")


def _in_thread(fn: Callable[[], Awaitable[float]]) -> float:
    # Floors are called from inside a running loop: give them a loop of their own.
    server_url()  # start the server (if needed) from this thread, not the helper
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="W1,W2,W3e")
    parser.add_argument("--url", default=None, help="an existing server (default: a private one)")
    args, rest = parser.parse_known_args()
    # Run as __main__, this is not the module TARGETS imports: set the URL on that one.
    from bench import bench_redis
    from bench.__main__ import main as bench_main

    bench_redis._external_url = args.url

    bench_main(["--backend", "redis", "--workload", args.workload, *rest])


if __name__ == "__main__":
    main()
