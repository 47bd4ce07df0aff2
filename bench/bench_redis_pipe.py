"""Client CPU of one round trip on Redis: redis-py's Pipeline against the backend's RoundTrip.

Run ``python -m bench.bench_redis_pipe [--n 2000]``. A private redis-server
is started. For batches of 1, 4, 16 and 64 append-sized ``EVALSHA`` calls
it prints one JSON line per way of sending them: the client CPU per batch
and per command (``time.process_time``), and the wall time per batch.
The two ways alternate batch by batch, so a busy machine slows both alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from substantial.backends.redis._connect import open_client
from substantial.backends.redis._trip import Command, RoundTrip
from tests.redis_server import RedisServer


async def main_async(n: int) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bench-redis-pipe-"))
    server = RedisServer(directory)
    server.start()
    client = open_client(
        server.url,
        cluster=False,
        socket_timeout=5.0,
        connect_timeout=2.0,
        retries=3,
        max_connections=50,
    )
    assert isinstance(client, Redis)
    try:
        sha = await client.script_load("return 1")
        trip = RoundTrip(client)

        async def pipeline(commands: list[Command]) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            return list(await pipe.execute(raise_on_error=False))

        ways: dict[str, Callable[[list[Command]], Awaitable[list[Any]]]] = {
            "redis-py Pipeline": pipeline,
            "RoundTrip": trip.send,
        }
        for size in (1, 4, 16, 64):
            commands: list[Command] = [
                ("EVALSHA", sha, 2, f"{{p:r{i}}}:log", f"{{p:r{i}}}:append", 3, b"x" * 60, "f" * 16)
                for i in range(size)
            ]
            batches = max(50, n // size)
            cpu = dict.fromkeys(ways, 0.0)
            wall = dict.fromkeys(ways, 0.0)
            for _ in range(batches):
                for name, send in ways.items():
                    c0, t0 = time.process_time(), time.perf_counter()
                    replies = await send(commands)
                    cpu[name] += time.process_time() - c0
                    wall[name] += time.perf_counter() - t0
                    assert replies == [1] * size, replies
            for name in ways:
                line = {
                    "bench": "redis_round_trip",
                    "way": name,
                    "commands": size,
                    "batches": batches,
                    "client_cpu_us_per_batch": round(cpu[name] / batches * 1e6, 1),
                    "client_cpu_us_per_command": round(cpu[name] / batches / size * 1e6, 2),
                    "wall_us_per_batch": round(wall[name] / batches * 1e6, 1),
                    "ok": True,
                }
                print(json.dumps(line), flush=True)
    finally:
        await client.aclose()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="commands per batch size and way")
    asyncio.run(main_async(parser.parse_args().n))


if __name__ == "__main__":
    main()
