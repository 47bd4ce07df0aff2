"""A redis-server restart in the middle of a workload (AOF on, appendfsync always).

Workers ride through the outage: calls fail with BackendUnavailable for a
while, then everything resumes. Every run completes with the right result,
and no log position holds a step twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from pathlib import Path

import pytest

from substantial import Conductor, Context, workflow
from substantial.backends.redis import RedisBackend
from substantial.errors import BackendUnavailable, PositionTaken
from substantial.records import decode_entry, encode_entry
from substantial.testing import log_records
from tests.backend_redis import start_server

EXECUTED: Counter[tuple[str, int]] = Counter()


@workflow()
async def squares_through_restart(c: Context, n: int = 30, pause: float = 0.02) -> list[int]:
    out = []
    for i in range(n):

        async def step(i: int = i) -> int:
            EXECUTED[c.run_id, i] += 1
            await asyncio.sleep(pause)
            return i * i

        out.append(await c.save(step, name=f"sq-{i}"))
    return out


async def test_runs_complete_across_a_restart_with_no_step_recorded_twice(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="substantial.redis")
    server = start_server(tmp_path, appendfsync="always")
    url = f"{server.url}?prefix=restart"
    client = Conductor(url)
    workers = [Conductor(url) for _ in range(2)]
    agents = []
    EXECUTED.clear()
    n, steps = 12, 30
    try:
        for c in (client, *workers):
            c.register(squares_through_restart)
        agents = [w.run(poll_interval=1.0) for w in workers]
        runs = [
            await client.start(squares_through_restart, {"n": steps}, run_id=f"r{i}")
            for i in range(n)
        ]
        while sum(EXECUTED.values()) < n * steps // 4:
            await asyncio.sleep(0.01)
        done_before = sum(EXECUTED.values())

        def restart() -> None:
            server.stop()
            time.sleep(1.5)  # longer than the driver retries: calls fail, workers retry
            server.start()

        await asyncio.to_thread(restart)
        results = await asyncio.wait_for(asyncio.gather(*(r.result(timeout=60) for r in runs)), 90)
        assert done_before < n * steps, "the restart came after the workload"
        assert results == [[i * i for i in range(steps)]] * n
        for r in runs:
            records = await log_records(client.backend, r.run_id)
            names = [x["name"] for x in records if x["k"] == "step"]
            assert names == [f"sq-{i}" for i in range(steps)], f"{r.run_id}: {names}"
    finally:
        for a in agents:
            a.cancel()
            await a
        for c in (client, *workers):
            await c.close()
        server.stop()
    assert set(EXECUTED) == {(f"r{i}", s) for i in range(n) for s in range(steps)}
    # Only steps in flight when Redis went away may run again.
    assert sum(EXECUTED.values()) - n * steps <= 2 * n
    down = [
        r for r in caplog.records if r.levelno >= logging.WARNING and r.name == "substantial.redis"
    ]
    assert 1 <= len(down) <= 3, [r.getMessage() for r in down]  # one line per backend at most


async def test_concurrent_appenders_lose_nothing_across_a_restart(tmp_path: Path) -> None:
    server = start_server(tmp_path, appendfsync="always")
    url = f"{server.url}?prefix=appenders"
    clients = [RedisBackend.from_url(url) for _ in range(4)]
    per_run, writers = 150, 8
    claimed: dict[int, str] = {}  # shared run: position -> the writer that believes it won

    async def own_run(w: int) -> None:
        backend = clients[w % len(clients)]
        run_id = f"own-{w}"
        position = 0
        while position < per_run:
            try:
                await backend.append(run_id, position, entry(run_id, position))
                position += 1
            except BackendUnavailable:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.001)

    async def shared_run(w: int) -> None:
        backend = clients[w % len(clients)]
        position = 0
        unsure = False  # an earlier try at this position may have landed unanswered
        while position < per_run:
            mine = entry(f"w{w}", position)
            try:
                try:
                    await backend.append("shared", position, mine)
                    won = True
                except PositionTaken:
                    won = unsure and (await backend.read_log("shared", position))[0] == mine
                if won:
                    assert position not in claimed, f"two writers won position {position}"
                    claimed[position] = f"w{w}"
                position += 1
                unsure = False
            except BackendUnavailable:
                unsure = True
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.001)

    try:
        tasks = [asyncio.create_task(own_run(w)) for w in range(writers)]
        tasks += [asyncio.create_task(shared_run(w)) for w in range(writers)]
        while len(await clients[0].read_log("own-0")) < per_run // 4:
            await asyncio.sleep(0.01)
        await asyncio.to_thread(server.restart)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        for w in range(writers):
            log = await clients[0].read_log(f"own-{w}")
            assert [decode_entry("x", p, e)[0]["value"] for p, e in enumerate(log)] == [
                [f"own-{w}", p] for p in range(per_run)
            ]
        shared = await clients[0].read_log("shared")
        assert len(shared) == per_run
        assert {p: decode_entry("x", p, e)[0]["value"][0] for p, e in enumerate(shared)} == claimed
    finally:
        for c in clients:
            await c.close()
        server.stop()


def entry(writer: str, position: int) -> bytes:
    return encode_entry([{"k": "step", "c": 0, "name": "w", "value": [writer, position]}])
