"""Round trips, commands and CPU per unit of work on Redis, counted, not timed.

Run ``python -m bench.bench_redis_trips [--idle 30] [--group-commit yes,no]``.
A private redis-server is started. Prints one JSON line per workload:
client round trips (redis-py calls and pipelines) and commands per run,
the server's calls per run (``INFO commandstats``, which also counts the
calls inside scripts), and the CPU seconds the client process and the
server spent per run.

* one: a run of one step, alone (start, step, end).
* sleep: the same with a durable 50 ms sleep after the step.
* event: the same waiting for an event sent from the same process.
* W2: 200 runs of 10 steps started one after the other, one worker.
* idle: a worker with nothing to do, per minute.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import redis.asyncio
from redis.asyncio.client import Pipeline, Redis

from substantial import Conductor, Context, workflow
from substantial.backends.redis import RedisBackend
from substantial.backends.redis._trip import Command, RoundTrip
from substantial.testing import running
from tests.redis_server import RedisServer

trips: collections.Counter[str] = collections.Counter()
_execute_command = Redis.execute_command
_execute_pipeline = Pipeline.execute
_send_round_trip = RoundTrip.send


async def _counted_command(self: Redis, *args: Any, **options: Any) -> Any:
    if not isinstance(self, Pipeline):  # a pipeline's queued command is no round trip
        trips["round_trips"] += 1
        trips["commands"] += 1
    return await _execute_command(self, *args, **options)


async def _counted_pipeline(self: Pipeline, raise_on_error: bool = True) -> Any:
    trips["round_trips"] += 1
    trips["commands"] += len(self.command_stack)
    return await _execute_pipeline(self, raise_on_error)


async def _counted_round_trip(self: RoundTrip, commands: Sequence[Command]) -> list[Any]:
    # The backend's own pipelines (single server): one write, one round trip.
    trips["round_trips"] += 1
    trips["commands"] += len(commands)
    return await _send_round_trip(self, commands)


@workflow()
async def one(c: Context) -> int:
    await c.save(lambda: 1)
    return 1


@workflow()
async def napper(c: Context) -> int:
    await c.save(lambda: 1)
    await c.sleep(0.05)
    return 1


@workflow()
async def waiter(c: Context) -> int:
    await c.save(lambda: 1)
    return int(await c.receive("go"))


@workflow()
async def ten(c: Context) -> int:
    for i in range(10):
        await c.save(lambda i=i: i)
    return 10


async def _server_figures(raw: redis.asyncio.Redis) -> tuple[int, float]:
    stats = await raw.info("commandstats")
    calls = sum(
        v["calls"]
        for k, v in stats.items()
        if k not in ("cmdstat_info", "cmdstat_config|resetstat")
    )
    cpu = await raw.info("cpu")
    return calls, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


async def measure(
    url: str,
    raw: redis.asyncio.Redis,
    name: str,
    work: Callable[[Conductor], Awaitable[int]],
    runs: int,
) -> dict[str, Any]:
    backend = RedisBackend.from_url(url)
    async with running(one, napper, waiter, ten, backend=backend) as conductor:
        await work(conductor)  # warm: connections open, scripts loaded
        await raw.config_resetstat()
        _, server0 = await _server_figures(raw)
        trips.clear()
        cpu0, t0 = time.process_time(), time.perf_counter()
        done = 0
        while done < runs:
            done += await work(conductor)
        seconds = time.perf_counter() - t0
        client_cpu = time.process_time() - cpu0
        counted = dict(trips)
        calls, server1 = await _server_figures(raw)
    return {
        "workload": name,
        "backend": "redis",
        "n": done,
        "seconds": round(seconds, 4),
        "round_trips_per_run": round(counted.get("round_trips", 0) / done, 2),
        "commands_per_run": round(counted.get("commands", 0) / done, 2),
        "server_calls_per_run": round(calls / done, 1),
        "client_cpu_ms_per_run": round(client_cpu / done * 1000, 3),
        "server_cpu_ms_per_run": round((server1 - server0) / done * 1000, 3),
        "ok": True,
    }


async def idle(url: str, raw: redis.asyncio.Redis, seconds: float) -> dict[str, Any]:
    backend = RedisBackend.from_url(url)
    async with running(one, backend=backend):
        await asyncio.sleep(1)
        await raw.config_resetstat()
        trips.clear()
        cpu0 = time.process_time()
        await asyncio.sleep(seconds)
        client_cpu = time.process_time() - cpu0
        counted = dict(trips)
        calls, _ = await _server_figures(raw)
    per_minute = 60 / seconds
    return {
        "workload": "idle",
        "backend": "redis",
        "n": 1,
        "seconds": seconds,
        "round_trips_per_minute": round(counted.get("round_trips", 0) * per_minute, 1),
        "server_calls_per_minute": round(calls * per_minute, 1),
        "client_cpu_percent": round(client_cpu / seconds * 100, 3),
        "note": "the worker's client; the listener's PINGs go on its own connection",
        "ok": True,
    }


async def main_async(args: argparse.Namespace) -> None:
    directory = Path(tempfile.mkdtemp(prefix="bench-redis-trips-"))
    server = RedisServer(directory)
    server.start()
    Redis.execute_command = _counted_command  # type: ignore[method-assign]
    Pipeline.execute = _counted_pipeline  # type: ignore[method-assign]
    RoundTrip.send = _counted_round_trip  # type: ignore[method-assign]
    raw = redis.asyncio.Redis.from_url(server.url)
    try:

        async def single(c: Conductor) -> int:
            assert await (await c.start(one)).result(timeout=60) == 1
            return 1

        async def sleep(c: Conductor) -> int:
            assert await (await c.start(napper)).result(timeout=60) == 1
            return 1

        async def event(c: Conductor) -> int:
            run = await c.start(waiter)
            await run.send("go", 2)
            assert await run.result(timeout=60) == 2
            return 1

        async def w2(c: Conductor) -> int:
            runs = [await c.start(ten) for _ in range(200)]
            results = await asyncio.gather(*(r.result(timeout=300) for r in runs))
            assert results == [10] * 200
            return 200

        for group_commit in args.group_commit.split(","):
            for name, work, n in (
                ("one", single, 50),
                ("sleep", sleep, 30),
                ("event", event, 30),
                ("W2", w2, 200),
            ):
                url = f"{server.url}?prefix={name}{group_commit}&group_commit={group_commit}"
                result = await measure(url, raw, name, work, n)
                print(json.dumps({**result, "group_commit": group_commit}), flush=True)
            if args.idle > 0:
                url = f"{server.url}?prefix=idle{group_commit}&group_commit={group_commit}"
                result = await idle(url, raw, args.idle)
                print(json.dumps({**result, "group_commit": group_commit}), flush=True)
    finally:
        Redis.execute_command = _execute_command  # type: ignore[method-assign]
        Pipeline.execute = _execute_pipeline  # type: ignore[method-assign]
        RoundTrip.send = _send_round_trip  # type: ignore[method-assign]
        await raw.aclose()
        server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle worker; 0: skip")
    parser.add_argument("--group-commit", default="yes,no", help="yes, no or both")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
